"""`ddkit bench --scores`: DD-Ranking's scores of every cell, from the cell's extra evaluations, its
baseline's line and the cached full-data reference; cells finished before get the missing
evaluations only."""

import math

import pytest

from ddkit.bench.results import TABLE_FILE, read_results
from ddkit.bench.runner import run_bench
from ddkit.bench.scores import baseline_method, line_scores
import ddkit
from ddkit.evaluate import references
from ddkit.evaluate.scores import augmentation_robust_score


def test_baselines_are_the_random_subset_or_its_relabelled_form():
    assert baseline_method("dm") == "random"
    assert baseline_method("sre2l") == "random+sre2l"
    assert baseline_method("random") is None and baseline_method("random+gvbsm") is None


def test_line_scores_use_the_baseline_of_the_same_cell():
    base = {"dataset": "d", "ipc": 1, "arch": "convnet", "tier": "smoke", "runs": 1, "seed": 0, "protocol": "hard"}
    random_line = {**base, "method": "random", "mean": 50.0, "plain_mean": 40.0}
    other_ipc = {**random_line, "ipc": 10, "mean": 99.0}
    dm = {**base, "method": "dm", "mean": 60.0, "plain_mean": 50.0, "full_data_hard": 90.0}
    scores = line_scores(dm, [random_line, other_ipc, dm])
    assert scores["IOR"] == 10.0 and scores["HLR"] == 30.0
    assert scores["ARS"] == pytest.approx(100 * (math.exp(0.1) - math.exp(-1)) / (math.exp(1) - math.exp(-1)),
                                          abs=1e-4)
    assert line_scores({**dm, "error": "boom"}, [random_line]) == {}
    assert line_scores(dm, [other_ipc]) == {"HLR": 30.0}


@pytest.mark.slow
def test_bench_scores_every_cell_and_adds_them_to_finished_cells(tmp_path, isolated_data, monkeypatch):
    monkeypatch.setitem(references.FULL_DATA_EPOCHS, "smoke", 2)  # the plumbing, not the reference's quality
    out = tmp_path / "bench"
    run_bench("smoke", ["digits"], ["dm"], [1], runs=1, out=out, show_progress=False)
    before = len(read_results(out))
    lines = run_bench("smoke", ["digits"], ["dm", "sre2l"], [1], runs=1, out=out, show_progress=False, scores=True)
    by_method = {line["method"]: line for line in lines}
    assert set(by_method) == {"random", "dm", "random+sre2l", "sre2l"}
    # random and dm were finished: each got one more line (with the scores' evaluations), not a new run
    assert len(read_results(out)) == before + 4
    full = by_method["dm"]["full_data_hard"]
    assert all(line["full_data_hard"] == full for line in lines)  # one cached reference for the dataset
    dm, random_line = by_method["dm"], by_method["random"]
    assert dm["scores"]["IOR"] == pytest.approx(dm["mean"] - random_line["mean"], abs=1e-3)
    assert dm["scores"]["HLR"] == pytest.approx(full - dm["mean"], abs=1e-3)
    assert set(dm["scores"]) == {"HLR", "IOR", "LRS", "ARS"} and "plain_mean" in dm
    sre2l, relabelled = by_method["sre2l"], by_method["random+sre2l"]
    assert sre2l["protocol"] == "soft" and "hard_mean" in sre2l and "plain_mean" in sre2l
    assert sre2l["scores"]["IOR"] == pytest.approx(sre2l["mean"] - relabelled["mean"], abs=1e-3)
    assert sre2l["scores"]["HLR"] == pytest.approx(full - sre2l["hard_mean"], abs=1e-3)
    plain_gap = sre2l["plain_mean"] - relabelled["plain_mean"]
    assert sre2l["scores"]["ARS"] == pytest.approx(augmentation_robust_score(sre2l["scores"]["IOR"], plain_gap),
                                                   abs=1e-3)
    stored = ddkit.load(out / sre2l["set"]).meta["evaluations"]
    plain = [record for record in stored if record["config"].get("targets") == "online"]
    assert len(plain) == 1 and plain[0]["config"]["online"]["plan"] == "plain"
    table = (out / TABLE_FILE).read_text()
    assert "| HLR | IOR | LRS | ARS |" in table and "- LRS: label-robust score" in table
    again = len(read_results(out))
    run_bench("smoke", ["digits"], ["dm", "sre2l"], [1], runs=1, out=out, show_progress=False, scores=True)
    assert len(read_results(out)) == again  # nothing left to add


def test_the_storage_plot_puts_both_protocols_on_one_bytes_axis(tmp_path):
    from ddkit.bench.plots import storage_figure, write_storage_plots

    base = {"dataset": "digits", "arch": "convnet", "tier": "smoke", "runs": 1, "seed": 0, "std": 0.5}
    lines = [{**base, "method": "random", "protocol": "hard", "ipc": ipc, "mean": 40.0 + ipc, "image_bytes": 640 * ipc,
              "soft_label_bytes": 0} for ipc in (1, 10, 50)]
    lines += [{**base, "method": "sre2l", "protocol": "soft", "ipc": ipc, "mean": 60.0 + ipc,
               "image_bytes": 640 * ipc, "soft_label_bytes": 4000 * ipc} for ipc in (1, 10)]
    lines.append({**base, "method": "dm", "protocol": "hard", "ipc": 1, "error": "boom"})
    axes = storage_figure(lines[:5], "t").axes[0]
    assert axes.get_xscale() == "log"
    labels = [text.get_text() for text in axes.get_legend().get_texts()]
    assert labels == ["random (hard labels), baseline", "sre2l (soft labels)"]
    xs = sorted({float(x) for line in axes.get_lines() for x in line.get_xdata()})
    assert xs == [640, 4640, 6400, 32000, 46400]  # images + soft-label records, per set
    written = write_storage_plots(lines, tmp_path)
    assert [path.name for path in written] == ["storage-digits-convnet-smoke.png"]


def test_tables_list_the_baselines_first_then_the_methods_best_first():
    from ddkit.bench.table import sorted_lines

    base = {"dataset": "d", "ipc": 1, "arch": "convnet", "tier": "smoke", "runs": 1, "seed": 0, "protocol": "hard",
            "std": 0.0}
    lines = [{**base, "method": "ddm", "mean": 55.0}, {**base, "method": "dm", "mean": 70.0},
             {**base, "method": "idm", "error": "boom"}, {**base, "method": "random", "mean": 50.0},
             {**base, "method": "iid", "mean": 60.0, "full_data_hard": 90.0},
             {**base, "ipc": 10, "method": "random", "mean": 80.0}]
    order = [(line["ipc"], line["method"]) for line in sorted_lines(lines)]
    # not every method has an LRS (only iid has a full-data reference): by accuracy; failed cells last
    assert order == [(1, "random"), (1, "dm"), (1, "iid"), (1, "ddm"), (1, "idm"), (10, "random")]
    for line in lines:
        if line["method"] in ("dm", "ddm"):
            line["full_data_hard"] = {"dm": 95.0, "ddm": 56.0}[line["method"]]
    # LRS for every method: ddm (HLR 1, IOR 5: a = 0.02) > dm (HLR 25, IOR 20: a = -0.025) > iid (a = -0.1)
    order = [(line["ipc"], line["method"]) for line in sorted_lines(lines)]
    assert order == [(1, "random"), (1, "ddm"), (1, "dm"), (1, "iid"), (1, "idm"), (10, "random")]


def test_table_to_docs_writes_the_scored_table_between_the_markers(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "table_to_docs.py"
    spec = importlib.util.spec_from_file_location("table_to_docs", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    base = {"dataset": "digits", "arch": "convnet", "tier": "smoke", "runs": 1, "seed": 0, "std": 0.0,
            "image_bytes": 640, "soft_label_bytes": 0, "date": "2026-12-02T10:00:00+00:00", "machine": "m"}
    lines = [{**base, "method": "random", "protocol": "hard", "ipc": 1, "mean": 50.0},
             {**base, "method": "dm", "protocol": "hard", "ipc": 1, "mean": 60.0, "full_data_hard": 90.0},
             {**base, "method": "dm", "protocol": "hard", "ipc": 10, "mean": 70.0}]
    (tmp_path / "results.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    doc = tmp_path / "doc.md"
    doc.write_text("# t\n<!-- s:start -->\nold\n<!-- s:end -->\ntail\n")
    script.replace_section(doc, "s", script.section(tmp_path, ipcs=[1]))
    text = doc.read_text()
    assert "old" not in text and text.endswith("<!-- s:end -->\ntail\n")
    assert "| HLR | IOR | LRS |" in text and "| 30.00 | 10.00 | 22.85 |" in text
    assert "| digits | 10 |" not in text and "- LRS: label-robust score" in text
    assert "Cells not measured" not in text  # no grid named: nothing to compare against

    ipc1 = [line for line in lines if line["ipc"] == 1]
    assert script.missing_cells(ipc1, ["digits"], ["dm"], [1]) == "Every cell of the grid has its line."
    assert script.missing_cells(ipc1, ["digits"], ["dm", "sre2l"], [1, 10]) == (
        "Cells not measured yet (6): digits IPC 1: random+sre2l, sre2l; "
        "digits IPC 10: random, random+sre2l, dm, sre2l.")


def test_a_line_written_before_its_baseline_is_rescored_once_the_baseline_is_there(tmp_path, isolated_data):
    """Two bench processes: the DM cell may finish before the random subset's; its stored scores
    then lack IOR, LRS and ARS until a later --scores pass, which adds them without evaluating."""
    from ddkit.bench.results import append_result

    out = tmp_path / "bench"
    out.mkdir()
    base = {"dataset": "digits", "ipc": 1, "arch": "convnet", "tier": "smoke", "runs": 1, "seed": 0,
            "protocol": "hard", "std": 0.0, "full_data_hard": 90.0}
    dm = {**base, "method": "dm", "mean": 60.0, "plain_mean": 50.0, "set": "sets/digits-dm-ipc1"}
    append_result(out, {**dm, "scores": {"HLR": 30.0}})  # scored while the random subset had no line
    append_result(out, {**base, "method": "random", "mean": 50.0, "plain_mean": 45.0, "set": "sets/digits-random-ipc1",
                        "scores": {"HLR": 40.0}})
    lines = run_bench("smoke", ["digits"], ["dm"], [1], runs=1, out=out, show_progress=False, scores=True,
                      trust_results=True)
    rescored = {line["method"]: line for line in lines}["dm"]
    assert rescored["scores"] == line_scores(dm, [dm, {**base, "method": "random", "mean": 50.0, "plain_mean": 45.0}])
    assert set(rescored["scores"]) == {"HLR", "IOR", "LRS", "ARS"} and rescored["scores"]["IOR"] == 10.0
    count = len(read_results(out))
    run_bench("smoke", ["digits"], ["dm"], [1], runs=1, out=out, show_progress=False, scores=True, trust_results=True)
    assert len(read_results(out)) == count  # up to date: nothing appended
