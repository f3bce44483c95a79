"""The benchmark grid: distill every (dataset, method, IPC) once, evaluate it, record one line per cell.

A bench directory holds

- ``sets/<dataset>-<method>-ipc<N>/``: the distilled sets (the ordinary set format);
- ``results.jsonl``: one JSON line per finished (cell, architecture) (:mod:`ddkit.bench.results`);
- ``table.md`` and ``plots/``: rewritten after every cell from ``results.jsonl``;
- ``bench.json``: the parameters of the latest ``run_bench`` call;
- ``.claims/<cell>.lock``: which bench process is running which cell (:mod:`ddkit.bench.claims`).

Resuming: a cell whose line (same dataset, method, IPC, tier, architecture, runs and seed) is
already in ``results.jsonl`` without an error is skipped; a set already saved is not distilled
again, a distillation that was interrupted continues from its checkpoint (``ddkit.resume``), and
stored evaluations are reused (``ddkit.evaluate(..., reuse=True)``). A failed cell is recorded with
``"error"`` and tried again on the next run. A cell whose preset changed since its set was made is
not finished: its set is renamed to ``<name>.superseded-<time>`` and the cell is made and evaluated
again; a cell whose evaluation preset changed keeps its set and is evaluated again
(:mod:`ddkit.bench.staleness`).

The grid lives in five modules, one concern each: :mod:`~ddkit.bench.cells` (what a cell is, the
checks of a request, the run order), :mod:`~ddkit.bench.results` (the results store),
:mod:`~ddkit.bench.staleness` (whether a result still stands), :mod:`~ddkit.bench.claims` (cells
shared between processes) and :mod:`~ddkit.bench.runner` (:func:`run_bench`, :func:`plan_bench`).
This module keeps the names scripts import from ``ddkit.bench.grid``.
"""

from ddkit.bench.cells import (  # noqa: F401
    BASELINE, TIERS, Cell, cell_key, check_archs, check_datasets, check_ipcs, check_methods, check_tier,
    is_baseline, plan_cells, protocol_for, relabelled_baseline, set_name, slug, statistics_methods,
)
from ddkit.bench.claims import CLAIMS_DIR, CellClaim, cell_held_elsewhere, claim_cell  # noqa: F401
from ddkit.bench.results import (  # noqa: F401
    KEY_FIELDS, PLOTS_DIR, RESULTS_FILE, SETS_DIR, SPEC_FILE, TABLE_FILE, append_result, latest_by_key,
    latest_results, line_key, read_results,
)
from ddkit.bench.runner import (  # noqa: F401
    TWIN_FIELDS, _peak_memory, adopt_twin_evaluations, check_bench_request, plan_bench, run_bench, run_cell,
)
from ddkit.bench.staleness import (  # noqa: F401
    CellStatus, cell_status, evaluation_changes, line_changes, preset_changes, reasons_to_remake,
    trusted_unchecked, work_in_progress,
)
from ddkit.evaluate.protocols import EVAL_CHECKPOINT_DIR  # noqa: F401
