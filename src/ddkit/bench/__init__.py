"""ddkit.bench: the benchmark grid (``ddkit bench``), its table and plots, and HTML reports (``ddkit report``).

    from ddkit.bench import run_bench, write_report
    lines = run_bench("quick", ["fashion-mnist"], ["dm", "sre2l"], [1, 10], runs=3, out="runs/bench")
    write_report("runs/bench")          # runs/bench/report.html, one self-contained page
"""

from ddkit.bench.cells import Cell, plan_cells, protocol_for
from ddkit.bench.results import read_results
from ddkit.bench.runner import run_bench
from ddkit.bench.plots import write_plots
from ddkit.bench.report import write_report
from ddkit.bench.table import write_table

__all__ = ["run_bench", "write_report", "write_table", "write_plots", "read_results", "plan_cells", "protocol_for",
           "Cell"]
