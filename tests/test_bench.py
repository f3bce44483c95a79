"""`ddkit bench` and `ddkit report`: the grid, resuming, failures, the table, plots and the HTML page.

Every grid here is tiny (digits, smoke tier, one evaluation run) so the whole file takes seconds.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddkit
from ddkit.bench import plan_cells, protocol_for, read_results, run_bench, write_report
from ddkit.bench.grid import plan_bench
from ddkit.bench.plots import loss_series
from ddkit.cli import main
from ddkit.errors import DDKitError

LINE_FIELDS = ("dataset", "method", "ipc", "tier", "protocol", "arch", "accuracies", "mean", "std", "distill_seconds",
               "eval_seconds_per_run", "peak_memory_bytes", "image_bytes", "soft_label_bytes", "set", "date", "device")


def small_grid(out, methods=("dm",), ipcs=(1, 2)):
    return run_bench("smoke", ["digits"], list(methods), list(ipcs), runs=1, out=out, show_progress=False)


def table_rows(out):
    """{(ipc, method): [cells]} parsed from table.md."""
    rows = {}
    for text in (out / "table.md").read_text().splitlines():
        if text.startswith("| digits |"):
            cells = [cell.strip() for cell in text.strip("|").split("|")]
            rows[(int(cells[1]), cells[2])] = cells
    return rows


# ---- planning ---------------------------------------------------------------------------------------
def test_plan_puts_baselines_first_and_adds_relabelled_baselines():
    cells = plan_cells(["digits"], ["dm", "sre2l"], [1, 10])
    assert [c.method for c in cells if c.ipc == 1] == ["random", "random+sre2l", "dm", "sre2l"]
    assert {c.ipc for c in cells} == {1, 10}
    assert [protocol_for(m) for m in ("random", "dm", "idm", "ddm", "sre2l", "cda", "gvbsm", "random+gvbsm")] == \
        ["hard", "hard", "hard", "hard", "soft", "soft", "soft", "soft"]
    assert cells[2].name == "digits-dm-ipc1"
    two = plan_cells(["digits", "mnist"], ["dm"], [10, 1])
    assert [(c.ipc, c.dataset) for c in two] == [(1, "digits"), (1, "digits"), (1, "mnist"), (1, "mnist"),
                                                 (10, "digits"), (10, "digits"), (10, "mnist"), (10, "mnist")]


def test_loss_series_concatenates_batches_and_keeps_only_loss_terms():
    log = [{"batch": 0, "iteration": 0, "ce": 2.0, "bn": 1.0, "conv": 0.0, "total": 3.0, "acc": 0.1, "crop_min": 0.08},
           {"batch": 0, "iteration": 4, "ce": 1.0, "bn": 0.5, "conv": 0.0, "total": 1.5, "acc": 0.5, "crop_min": 0.08},
           {"batch": 1, "iteration": 0, "ce": 2.5, "bn": 1.5, "conv": 0.0, "total": 4.0, "acc": 0.0, "crop_min": 0.08},
           {"batch": 1, "iteration": 4, "ce": 0.9, "bn": 0.4, "conv": 0.0, "total": 1.3, "acc": 0.6, "crop_min": 0.08}]
    x, series, starts = loss_series(log)
    assert x == [0.0, 4.0, 5.0, 9.0]
    assert starts == [5.0]
    assert sorted(series) == ["bn", "ce", "total"]  # conv is zero throughout; acc and crop_min are no losses
    x, series, starts = loss_series([{"iteration": 0, "mean": 0.2, "total": 0.2},
                                     {"iteration": 1, "mean": 0.1, "total": 0.1}])
    assert (x, sorted(series), starts) == ([0.0, 1.0], ["mean"], [])


# ---- the grid ---------------------------------------------------------------------------------------
def test_grid_writes_results_table_plots_matching_the_manifests(isolated_data, tmp_path):
    out = tmp_path / "bench"
    lines = small_grid(out)
    assert [(l["method"], l["ipc"]) for l in lines] == [("random", 1), ("dm", 1), ("random", 2), ("dm", 2)]
    stored = read_results(out)
    assert len(stored) == 4
    for line in stored:
        assert "error" not in line
        assert all(field in line for field in LINE_FIELDS), line
        assert (line["tier"], line["protocol"], line["arch"], line["device"]) == ("smoke", "hard", "convnet", "cpu")
        assert len(line["accuracies"]) == 1
        assert line["machine"].endswith(" cores")  # which CPU: timings compare only on one machine
    plots = out / "plots"
    assert (plots / "accuracy-digits-hard-convnet-smoke.png").stat().st_size > 1000
    assert (plots / "loss-digits-dm-ipc1.png").is_file() and (plots / "loss-digits-dm-ipc2.png").is_file()
    assert not (plots / "loss-digits-random-ipc1.png").exists()  # the random subset has no loss log

    rows = table_rows(out)
    assert list(rows) == [(1, "random"), (1, "dm"), (2, "random"), (2, "dm")]  # baselines first
    for line in stored:
        set_dir = out / line["set"]
        assert (set_dir / "grid.png").is_file()
        distilled = ddkit.load(set_dir)
        manifest = json.loads((set_dir / "manifest.json").read_text())
        evaluation = [e for e in manifest["evaluations"] if e["preset"] == "smoke" and e["protocol"] == "hard"][-1]
        assert line["accuracies"] == evaluation["accuracies"]
        assert line["distill_seconds"] == manifest["timings"]["distill_seconds"]
        assert line["peak_memory_bytes"] == manifest["peak_memory_bytes"]
        sizes = distilled.stored_bytes()
        assert (line["image_bytes"], line["soft_label_bytes"]) == (sizes["images"], sizes["soft_labels"])
        cells = rows[(line["ipc"], line["method"])]
        assert cells[3] == "hard"
        assert len(evaluation["accuracies"]) == 1 and cells[5] == f"{evaluation['mean']:.2f} (1 run)"
        assert cells[6] == f"{manifest['timings']['distill_seconds']:.1f}"
        assert cells[7] == f"{evaluation['seconds_per_run']:.1f}"
        assert cells[8] == f"{manifest['peak_memory_bytes'] / 2**20:.0f}"
        assert (cells[9], cells[10]) == (str(sizes["images"]), str(sizes["soft_labels"]))


def test_second_run_skips_finished_cells_and_saved_sets(isolated_data, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    first = small_grid(out, ipcs=(1,))
    results = (out / "results.jsonl").read_text()

    def refuse(*args, **kwargs):
        raise AssertionError("a finished cell was run again")

    monkeypatch.setattr(ddkit, "distill", refuse)
    monkeypatch.setattr(ddkit, "evaluate", refuse)
    assert small_grid(out, ipcs=(1,)) == first
    assert (out / "results.jsonl").read_text() == results

    # Lost results but kept sets: nothing is distilled again and the stored evaluations are reused.
    (out / "results.jsonl").unlink()
    monkeypatch.undo()
    monkeypatch.setattr(ddkit, "distill", refuse)
    trained = []
    protocols = sys.modules["ddkit.evaluate.protocols"]
    real_train = protocols.train_classifier
    monkeypatch.setattr(protocols, "train_classifier", lambda *a, **k: trained.append(1) or real_train(*a, **k))
    again = small_grid(out, ipcs=(1,))
    assert trained == []
    assert [(l["method"], l["accuracies"]) for l in again] == [(l["method"], l["accuracies"]) for l in first]


def test_failing_cell_is_recorded_the_rest_continue_and_a_rerun_retries_it(isolated_data, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    real_distill = ddkit.distill

    def flaky(method, **kwargs):
        if method == "dm" and kwargs["ipc"] == 1:
            raise RuntimeError("boom <b>in dm</b>")
        return real_distill(method, **kwargs)

    monkeypatch.setattr(ddkit, "distill", flaky)
    lines = small_grid(out)
    failed = [l for l in lines if "error" in l]
    assert [(l["method"], l["ipc"]) for l in failed] == [("dm", 1)]
    assert failed[0]["error"] == "RuntimeError: boom <b>in dm</b>" and "Traceback" in failed[0]["traceback"]
    assert sum("error" not in l for l in lines) == 3
    assert table_rows(out)[(1, "dm")][5].startswith("failed: RuntimeError: boom")
    assert main(["bench", "--tier", "smoke", "--datasets", "digits", "--methods", "dm", "--ipc", "1,2", "--runs", "1",
                 "--out", str(out), "--quiet"]) == 1  # still failing: exit 1, the failure listed

    monkeypatch.setattr(ddkit, "distill", real_distill)
    lines = small_grid(out)
    assert all("error" not in l for l in lines)
    assert len(read_results(out)) == 6  # 4 + the failure again + the retried cell
    assert not table_rows(out)[(1, "dm")][5].startswith("failed")


def test_soft_label_cell_with_its_relabelled_random_baseline(isolated_data, tmp_path):
    out = tmp_path / "bench"
    lines = small_grid(out, methods=("sre2l",), ipcs=(1,))
    assert [(l["method"], l["protocol"]) for l in lines] == [("random", "hard"), ("random+sre2l", "soft"),
                                                             ("sre2l", "soft")]
    assert all("error" not in l for l in lines), lines
    by_method = {l["method"]: l for l in lines}
    assert by_method["random"]["soft_label_bytes"] == 0
    assert by_method["random+sre2l"]["soft_label_bytes"] > 0 and by_method["sre2l"]["soft_label_bytes"] > 0
    relabelled = ddkit.load(out / by_method["random+sre2l"]["set"])
    random_set = ddkit.load(out / by_method["random"]["set"])
    assert relabelled.meta["relabelled_like"] == {"method": "sre2l", "preset": "smoke"}
    assert relabelled.images.equal(random_set.images)
    assert relabelled.meta["timings"]["relabel_seconds"] >= 0
    assert (out / "plots" / "accuracy-digits-soft-convnet-smoke.png").is_file()
    assert (out / "plots" / "loss-digits-sre2l-ipc1.png").is_file()


def test_compile_reaches_every_distillation_relabel_and_evaluation(isolated_data, tmp_path, monkeypatch):
    """``run_bench(compiled=True)`` asks for it everywhere (each is run eagerly here, for speed)."""
    from ddkit.methods import stats_family

    asked = []

    def eager(what, function):
        def call(*args, **kwargs):
            asked.append((what, kwargs.get("compiled", False)))
            return function(*args, **dict(kwargs, compiled=False))
        return call

    real_distill = ddkit.distill

    def distill_as_if_compiled(method, **kwargs):  # eager, but recorded as a compiled distillation would be
        result = real_distill(method, **kwargs)
        if method != "random":  # which has nothing to compile
            manifest = Path(kwargs["out"]) / "manifest.json"
            from ddkit.store.distilled import seal_manifest  # the manifest is sealed: edit it as ddkit would

            manifest.write_text(json.dumps(seal_manifest(dict(json.loads(manifest.read_text()), compiled=True))))
        return result

    monkeypatch.setattr(ddkit, "distill", eager("distill", distill_as_if_compiled))
    monkeypatch.setattr(ddkit, "evaluate", eager("evaluate", ddkit.evaluate))
    monkeypatch.setattr(stats_family, "method_teachers", eager("teachers", stats_family.method_teachers))
    lines = run_bench("smoke", ["digits"], ["sre2l"], [1], runs=1, out=tmp_path / "bench", show_progress=False,
                      compiled=True)
    assert all("error" not in line for line in lines), lines
    # random, random+sre2l (its teachers), sre2l (whose own teacher call comes from the eager distill)
    assert asked == [("distill", True), ("evaluate", True), ("teachers", True), ("evaluate", True),
                     ("distill", True), ("teachers", False), ("evaluate", True)]
    # the lines say which sets were made compiled
    assert [line.get("distill_compiled", False) for line in lines] == [False, False, True]


def test_a_cell_holding_the_same_set_as_another_reuses_its_evaluation(isolated_data, tmp_path, monkeypatch):
    from ddkit.evaluate import soft

    trained = []
    real_train = soft.train_soft
    monkeypatch.setattr(sys.modules["ddkit.evaluate.protocols"], "train_soft",
                        lambda *a, **k: trained.append(k["desc"]) or real_train(*a, **k))
    from ddkit.methods import stats_family

    out = tmp_path / "bench"
    # On Tiny-ImageNet sre2l and cda share teachers and relabel options (CDA follows SRe2L's), so
    # random+cda is random+sre2l's set, byte for byte; here sre2l takes its Tiny recipe on digits too.
    monkeypatch.setitem(stats_family.PUBLISHED, ("sre2l", "cifar100"), stats_family.PUBLISHED[("sre2l", "tiny")])
    lines = {l["method"]: l for l in small_grid(out, methods=("sre2l", "cda"), ipcs=(1,))}
    assert len(trained) == 3  # random+sre2l, sre2l, cda; not random+cda
    twin = lines["random+cda"]
    assert twin["evaluation_reused_from"] == "sets/digits-random+sre2l-ipc1"
    assert twin["accuracies"] == lines["random+sre2l"]["accuracies"]
    assert "evaluation_reused_from" not in lines["cda"] and "evaluation_reused_from" not in lines["random+sre2l"]
    record = ddkit.load(out / twin["set"]).meta["evaluations"][-1]
    assert record["reused_from"] == "digits-random+sre2l-ipc1" and record["protocol"] == "soft"


def test_a_twin_evaluation_is_adopted_only_when_it_was_computed_the_same_way(isolated_data, tmp_path, digits):
    from ddkit.bench.grid import Cell, adopt_twin_evaluations
    from ddkit.evaluate import random_subset
    from ddkit.evaluate.protocols import EvalResult, evaluation_config

    sets = tmp_path / "sets"
    for name in ("digits-random-ipc1", "digits-dm-ipc1"):  # two cells, one set (as if DM changed nothing)
        random_subset(digits, 1, seed=0).save(sets / name)
    source = ddkit.load(sets / "digits-random-ipc1")
    config = evaluation_config(source, "hard", "smoke")
    source.record_evaluation(EvalResult("hard", "smoke", "convnet", [50.0], 1.0, config, [0], "cpu", 10,
                                        compiled=True).to_record())
    twin = Cell("digits", "dm", 1)
    target = ddkit.load(sets / twin.name)
    assert adopt_twin_evaluations(target, twin, sets, "smoke", ["convnet"], 1, 0, "cpu") == {}  # eager wanted
    assert adopt_twin_evaluations(target, twin, sets, "smoke", ["convnet"], 1, 0, "cuda") == {}
    assert adopt_twin_evaluations(target, twin, sets, "smoke", ["convnet"], 1, 0, "cpu", compiled=True) == {
        "convnet": "digits-random-ipc1"}
    assert ddkit.load(sets / twin.name).meta["evaluations"][-1]["accuracies"] == [50.0]


# ---- the command line -------------------------------------------------------------------------------
@pytest.mark.parametrize("words, match", [
    (["bench", "--methods", "nomethod"], "unknown method"),
    (["bench", "--datasets", "no-such-set"], "unknown"),
    (["bench", "--tier", "huge"], "unknown tier"),
    (["bench", "--ipc", "1,ten"], "positive integers"),
    (["bench", "--ipc", "0"], "positive integers"),
    (["bench", "--arch", "nonet"], "unknown architecture"),
    # digits first in the grid, but nothing runs: a dataset not fetched is refused before any cell
    (["bench", "--datasets", "digits,mnist"], "mnist is not fetched yet"),
    (["report", "EMPTY"], "neither a distilled set"),
    (["report", "MISSING"], "not a directory"),
])
def test_bad_input_is_one_line_and_exit_2(words, match, capsys, tmp_path, isolated_data):
    (tmp_path / "empty").mkdir()
    if words[0] == "bench":  # a valid tiny grid, then the bad option (argparse keeps the last value)
        words = ["bench", "--out", str(tmp_path / "bench"), "--tier", "smoke", "--datasets", "digits",
                 "--methods", "dm", "--ipc", "1", "--runs", "1", "--quiet", *words[1:]]
    else:
        words = [{"EMPTY": str(tmp_path / "empty"), "MISSING": str(tmp_path / "missing")}.get(w, w) for w in words]
    code = main(words)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("ddkit: error:") and err.count("\n") == 1 and match in err, err
    assert not (tmp_path / "bench").exists()  # refused before anything is written


@pytest.mark.parametrize("command", ["bench", "report"])
def test_commands_have_help(command, capsys):
    with pytest.raises(SystemExit) as stop:
        main([command, "--help"])
    assert stop.value.code == 0
    assert "usage: ddkit" in capsys.readouterr().out


def test_run_bench_refuses_a_set_directory_as_out(isolated_data, tmp_path):
    ddkit.distill("random", dataset="digits", ipc=1, out=tmp_path / "set")
    with pytest.raises(DDKitError, match="is a distilled set"):
        small_grid(tmp_path / "set")


# ---- the HTML report --------------------------------------------------------------------------------
def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def image_check(page, profile):
    """(number of <img>, number loaded) as the page's own script reports them in headless Chromium."""
    binary = chromium_binary()
    if binary is None:
        pytest.skip("Chromium not installed: apt-get install chromium (Debian) to run the report rendering test")
    done = subprocess.run([binary, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
                           f"--user-data-dir={profile}", "--dump-dom", page.as_uri()],
                          capture_output=True, text=True, timeout=180)
    span = re.search(r'<span[^>]*id="image-check"[^>]*>', done.stdout)
    assert span, f"no image check in Chromium's DOM (exit {done.returncode}): {done.stderr[-2000:]}"
    images = re.search(r'data-images="(\d+)"', span.group(0))
    loaded = re.search(r'data-loaded="(\d+)"', span.group(0))
    assert images and loaded, span.group(0)
    return int(images.group(1)), int(loaded.group(1))


def assert_self_contained(text):
    assert "<img" in text
    assert not re.search(r'(src|href)\s*=\s*"(?!data:)', text), "a resource outside the page"
    assert "<link" not in text and "@import" not in text


def test_report_renders_in_headless_chromium_with_every_image_loaded(isolated_data, tmp_path):
    out = tmp_path / "bench"
    small_grid(out, ipcs=(1,))
    # A hostile error message must come out as text, not as markup (an <img> here would fail to load).
    with open(out / "results.jsonl", "a") as handle:
        handle.write(json.dumps({"dataset": "digits", "method": "dm", "ipc": 7, "tier": "smoke", "protocol": "hard",
                                 "arch": "convnet", "runs": 1, "seed": 0, "error": '<img src="nowhere.png">',
                                 "set": "sets/digits-dm-ipc7", "date": "-", "device": "cpu"}) + "\n")
    page = write_report(out)
    assert page == out / "report.html"
    text = page.read_text()
    assert_self_contained(text)
    assert "&lt;img src=&quot;nowhere.png&quot;&gt;" in text
    images = text.count("<img ")
    assert images == 5  # the accuracy and storage plots, two grids (random, dm) and dm's loss curve

    set_page = write_report(out / "sets" / "digits-dm-ipc1", tmp_path / "set.html")
    set_text = set_page.read_text()
    assert_self_contained(set_text)
    assert "Evaluations" in set_text and "hard" in set_text and set_text.count("<img ") == 2

    for path, expected in ((page, images), (set_page, 2)):
        count, loaded = image_check(path, tmp_path / "chromium-profile")
        assert count == expected > 0
        assert loaded == count


def test_report_of_a_folder_of_sets_puts_their_evaluations_side_by_side(isolated_data, tmp_path):
    runs = tmp_path / "runs"
    record = {"protocol": "hard", "preset": "quick", "arch": "convnet", "seeds": [0], "seconds_per_run": 2.0}
    random_set = ddkit.distill("random", dataset="digits", ipc=1, out=runs / "random")
    random_set.record_evaluation(dict(record, accuracies=[40.0], mean=40.0, std=0.0))
    theirs = ddkit.import_set(runs / "random" / "data.safetensors", dataset="digits", method="dm-original")
    theirs.save(runs / "dm-original")
    theirs.record_evaluation(dict(record, accuracies=[60.0, 62.0], mean=61.0, std=1.0))
    ddkit.distill("random", dataset="digits", ipc=1, out=runs / "damaged")
    (runs / "damaged" / "data.safetensors").write_bytes(b"not a tensor file")
    (runs / "notes").mkdir()  # not a set: ignored
    page = write_report(runs)
    text = page.read_text()
    assert_self_contained(text)
    assert "ddkit sets: runs" in text
    # better first among sets judged alike; the baseline row is marked
    assert text.index("61.00 +- 1.00") < text.index("40.00 (1 run)")  # one run has no spread to show
    assert re.search(r'<tr class="baseline"><td>random</td>', text)
    assert "damaged: " in text and "sha256" in text
    count, loaded = image_check(page, tmp_path / "chromium-profile")
    assert count == loaded == 2  # the two readable sets' grids


def test_report_refuses_a_folder_without_sets(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DDKitError, match="nor a folder of sets"):
        write_report(tmp_path / "empty")


def test_report_command_prints_the_page(isolated_data, tmp_path, capsys):
    ddkit.distill("random", dataset="digits", ipc=1, out=tmp_path / "set")
    assert main(["report", str(tmp_path / "set")]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "set" / "report.html")
    text = (tmp_path / "set" / "report.html").read_text()
    assert "No evaluation stored yet" in text and "ddkit set: set" in text


def test_report_marks_an_interrupted_evaluation(isolated_data, tmp_path):
    distilled = ddkit.distill("random", dataset="digits", ipc=1, out=tmp_path / "set")
    distilled.record_evaluation({"protocol": "hard", "preset": "quick", "arch": "convnet", "seeds": [0, 1],
                                 "accuracies": [41.5, 42.5], "mean": 42.0, "std": 0.5, "seconds_per_run": 3.0,
                                 "partial": True, "runs_planned": 3})
    text = write_report(tmp_path / "set").read_text()
    assert "2 of 3 (interrupted)" in text and "42.00 +- 0.50" in text


def test_a_set_without_a_numeric_peak_memory_gets_none_not_a_crash():
    from ddkit.bench.grid import _peak_memory
    from ddkit.bench.table import row_cells

    assert _peak_memory({"peak_memory_bytes": {}}) is None  # what sets of an earlier version recorded
    assert _peak_memory({}) is None and _peak_memory({"peak_memory_bytes": 2**20}) == 2**20
    line = {"dataset": "mnist", "ipc": 1, "method": "random", "protocol": "hard", "runs": 1, "mean": 50.0,
            "std": 0.0, "peak_memory_bytes": None}
    assert row_cells(line)[8] == "-"


def test_a_distillation_interrupted_inside_a_bench_is_resumed_not_refused(isolated_data, tmp_path, monkeypatch):
    import os

    import torch

    out = tmp_path / "bench"
    target = out / "sets" / "digits-dm-ipc1"
    command = [sys.executable, "-m", "ddkit", "distill", "dm", "--dataset", "digits", "--ipc", "1", "--preset", "smoke",
               "--out", str(target), "--checkpoint-every", "2", "-q"]
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    killed = subprocess.run(command, env={**os.environ, "DDKIT_FAULT_AT_ITERATION": "3"}, capture_output=True)
    assert killed.returncode == -9 and (target / "checkpoint" / "latest.json").is_file()
    lines = small_grid(out, ipcs=(1,))
    assert all("error" not in line for line in lines)
    whole = ddkit.distill("dm", dataset="digits", ipc=1, preset="smoke", show_progress=False)
    assert torch.equal(ddkit.load(target).images, whole.images)


def test_a_cell_made_under_an_older_preset_is_made_again_and_its_old_set_kept(isolated_data, tmp_path, monkeypatch):
    from ddkit.methods import dm_family

    out = tmp_path / "bench"
    first = {l["method"]: l for l in small_grid(out, ipcs=(1,))}
    assert ddkit.load(out / first["dm"]["set"]).meta["config"]["iterations"] == 4

    smoke = dict(dm_family.TIER_SETTINGS["smoke"], iterations=3)
    monkeypatch.setitem(dm_family.TIER_SETTINGS, "smoke", smoke)
    second = {l["method"]: l for l in small_grid(out, ipcs=(1,))}

    assert ddkit.load(out / second["dm"]["set"]).meta["config"]["iterations"] == 3
    superseded = list((out / "sets").glob("digits-dm-ipc1.superseded-*"))
    assert len(superseded) == 1
    assert ddkit.load(superseded[0]).meta["config"]["iterations"] == 4  # kept whole, not overwritten
    assert second["random"] == first["random"]  # the baseline has no preset: untouched
    assert len(read_results(out)) == 3

    # Stopped between setting the old set aside and saving the new one: the line stays, the set is gone.
    shutil.rmtree(out / second["dm"]["set"])
    third = {l["method"]: l for l in small_grid(out, ipcs=(1,))}
    assert (out / third["dm"]["set"] / "manifest.json").is_file()
    assert len(read_results(out)) == 4 and third["dm"]["date"] >= second["dm"]["date"]  # a new line (dates: seconds)


def test_trust_results_counts_a_line_whose_set_is_missing_as_finished(isolated_data, tmp_path, monkeypatch):
    from ddkit.bench.grid import cell_status, latest_by_key, plan_cells

    out = tmp_path / "bench"
    first = {l["method"]: l for l in small_grid(out, ipcs=(1,))}
    carried = tmp_path / "carried"  # results.jsonl alone, as carried to another machine
    carried.mkdir()
    shutil.copy(out / "results.jsonl", carried / "results.jsonl")
    assert plan_bench("smoke", ["digits"], ["dm"], [1], runs=1, out=carried)[-1] == "2 make again"
    plan = plan_bench("smoke", ["digits"], ["dm"], [1], runs=1, out=carried, trust_results=True)
    assert plan[-1] == "2 done" and plan[1].startswith("[2/2] digits dm ipc 1 (hard, convnet): done, ")

    def refuse(*args, **kwargs):
        raise AssertionError("a trusted cell was made again")

    monkeypatch.setattr(ddkit, "distill", refuse)
    monkeypatch.setattr(ddkit, "evaluate", refuse)
    lines = {l["method"]: l for l in run_bench("smoke", ["digits"], ["dm"], [1], runs=1, out=carried,
                                               show_progress=False, trust_results=True)}
    assert lines == first and not (carried / "sets" / "digits-dm-ipc1").exists()
    # A set that is there is still checked: the evaluation preset changed, so it is evaluated again.
    from ddkit.evaluate import HARD_PRESETS

    monkeypatch.setitem(HARD_PRESETS, "smoke", dict(HARD_PRESETS["smoke"], epochs=150))
    cell = plan_cells(["digits"], ["dm"], [1])[1]
    status = cell_status(cell, out / "sets", "smoke", ["convnet"], 1, 0, latest_by_key(out), trust_results=True)
    assert [s.state for s in status] == ["evaluate again"]
    assert main(["bench", "--tier", "smoke", "--datasets", "digits", "--methods", "dm", "--ipc", "1", "--runs",
                 "1", "--out", str(carried), "--trust-results", "--plan"]) == 0


def test_trust_results_keeps_a_random_cell_whose_subset_another_cell_made_again(isolated_data, tmp_path):
    from ddkit.bench.grid import EVAL_CHECKPOINT_DIR, cell_status, latest_by_key, plan_cells

    out = tmp_path / "bench"
    small_grid(out, ipcs=(1,))
    random_cell = plan_cells(["digits"], ["dm"], [1])[0]
    manifest_path = out / "sets" / random_cell.name / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    evaluated = manifest.pop("evaluations")
    manifest_path.write_text(json.dumps(manifest))  # the subset as a random+M cell makes it: never evaluated

    def states(cell, trust_results=True):
        return [s.state for s in cell_status(cell, out / "sets", "smoke", ["convnet"], 1, 0, latest_by_key(out),
                                             trust_results=trust_results)]

    assert states(random_cell, trust_results=False) == ["evaluate again"]
    assert states(random_cell) == ["done"]
    # A distilled set is not a function of its seed alone: the same state of its set is checked.
    dm_cell = plan_cells(["digits"], ["dm"], [1])[1]
    dm_path = out / "sets" / dm_cell.name / "manifest.json"
    dm_manifest = json.loads(dm_path.read_text())
    dm_manifest.pop("evaluations")
    dm_path.write_text(json.dumps(dm_manifest))
    assert states(dm_cell) == ["evaluate again"]
    # A random set the cell itself began to evaluate (a partial record, or a stopped run) is checked.
    manifest_path.write_text(json.dumps(dict(manifest, evaluations=[dict(evaluated[0], partial=True)])))
    assert states(random_cell) == ["evaluate again"]
    manifest_path.write_text(json.dumps(manifest))
    stopped = out / "sets" / random_cell.name / EVAL_CHECKPOINT_DIR / "hard-smoke-convnet-seed0.safetensors"
    stopped.parent.mkdir(exist_ok=True)
    stopped.write_bytes(b"")
    assert states(random_cell) == ["evaluate again"]


def _grid_to_docs():
    """benchmarks/grid_to_docs.py, imported from its path."""
    return _benchmarks_script("grid_to_docs")


def _benchmarks_script(name):
    """A script of benchmarks/ (not a package module), imported from its path."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_grid_to_docs_trusts_lines_recovered_from_an_earlier_table(tmp_path):
    from ddkit.bench.table import row_cells

    # two lines as rebuilt from the rows of an earlier docs/benchmarks.md table ("recovered_from")
    common = {"dataset": "fashion-mnist", "ipc": 10, "tier": "quick", "arch": "convnet", "runs": 3, "seed": 0,
              "device": "cpu", "machine": "AMD EPYC, AVX2, 2 cores", "recovered_from": "docs/benchmarks.md at abc1234"}
    line = {**common, "method": "gvbsm", "protocol": "soft", "mean": 80.82, "std": 0.23, "distill_seconds": 217.0,
            "eval_seconds_per_run": 351.9, "image_bytes": 313600, "soft_label_bytes": 1230000, "compiled": True,
            "peak_memory_bytes": 761 * 1024 * 1024}
    baseline = {**common, "method": "random", "protocol": "hard", "mean": 76.60, "std": 0.18, "distill_seconds": 0.0,
                "eval_seconds_per_run": 329.2, "image_bytes": 313600, "soft_label_bytes": 0}
    assert row_cells(line) == ["fashion-mnist", "10", "gvbsm", "soft", "3", "80.82 +- 0.23", "217.0",
                               "351.9 (compiled)", "761", "313600", "1230000", "1543600"]

    bench = tmp_path / "kept"  # results.jsonl alone, as kept in git
    bench.mkdir()
    (bench / "results.jsonl").write_text("".join(json.dumps(dict(l, dataset="fashion-mnist")) + "\n"
                                                 for l in (line, baseline)))
    docs = _grid_to_docs()
    assert docs.section(bench, ["fashion-mnist"], ["gvbsm"], [10]).startswith("**Progress:** 0 of 3 cells")
    trusted = docs.section(bench, ["fashion-mnist"], ["gvbsm"], [10], trust_results=True)
    assert trusted.startswith("**Progress:** 2 of 3 cells finished.")
    assert "2 lines from docs/benchmarks.md at abc1234" in trusted and "- IPC 10, fashion-mnist: random+gvbsm" in trusted
    assert "| fashion-mnist | 10 | gvbsm | soft | 3 | 80.82 +- 0.23 | 217.0 | 351.9 (compiled) | 761 |" in trusted
    assert "![" not in trusted  # plots only when asked for

    doc = tmp_path / "docs" / "benchmarks.md"
    plotted = docs.section(bench, ["fashion-mnist"], ["gvbsm"], [10], trust_results=True,
                           plots=tmp_path / "docs" / "img" / "grid", doc_dir=doc.parent)
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", plotted)  # hard (random) and soft (gvbsm, random+gvbsm)
    assert links == ["img/grid/accuracy-fashion-mnist-hard-convnet-quick.png",
                     "img/grid/accuracy-fashion-mnist-soft-convnet-quick.png"]
    for link in links:
        assert (doc.parent / link).read_bytes().startswith(b"\x89PNG")


def test_a_cell_evaluated_under_an_older_evaluation_preset_is_evaluated_again_on_its_set(
        isolated_data, tmp_path, monkeypatch, capsys):
    from ddkit.bench.grid import line_changes
    from ddkit.evaluate import HARD_PRESETS

    out = tmp_path / "bench"
    first = {l["method"]: l for l in small_grid(out, ipcs=(1,))}
    assert [line_changes(line, out / "sets") for line in first.values()] == [[], []]

    docs = _grid_to_docs()
    assert docs.section(out, ["digits"], ["dm"], [1]).startswith("**Progress:** 2 of 2 cells finished.")

    monkeypatch.setitem(HARD_PRESETS, "smoke", dict(HARD_PRESETS["smoke"], epochs=150))
    assert line_changes(first["dm"], out / "sets") == ["epochs: 200 -> 150"]
    stale = docs.section(out, ["digits"], ["dm"], [1])
    assert stale.startswith("**Progress:** 0 of 2 cells finished.") and "- IPC 1, digits: random, dm" in stale

    def refuse(*args, **kwargs):
        raise AssertionError("the set was distilled again")

    assert plan_bench("smoke", ["digits"], ["dm"], [1], runs=1, out=out) == [
        "[1/2] digits random ipc 1 (hard, convnet): evaluate again (epochs: 200 -> 150)",
        "[2/2] digits dm ipc 1 (hard, convnet): evaluate again (epochs: 200 -> 150)",
        "2 evaluate again",
    ]
    monkeypatch.setattr(ddkit, "distill", refuse)
    second = {l["method"]: l for l in run_bench("smoke", ["digits"], ["dm"], [1], runs=1, out=out)}
    assert len(read_results(out)) == 4  # two new lines (dates have whole seconds: a fast machine repeats them)
    err = capsys.readouterr().err
    assert "the evaluation preset changed since its result (epochs: 200 -> 150)" in err
    assert "\n[2/2] digits dm ipc 1 (hard): convnet " in err  # each cell's line starts a line, also in a log
    for method in ("dm", "random"):
        assert second[method]["date"] >= first[method]["date"]
        assert line_changes(second[method], out / "sets") == []
        records = ddkit.load(out / second[method]["set"]).meta["evaluations"]
        assert [r["config"]["epochs"] for r in records] == [200, 150]  # both kept in the manifest


def test_plan_says_what_a_bench_would_do_and_what_a_stopped_one_left(isolated_data, tmp_path, capsys):
    out = tmp_path / "bench"
    assert plan_bench("smoke", ["digits"], ["dm"], [1], runs=2, out=out)[-1] == "2 to run"
    assert not out.exists()  # the plan writes nothing
    (tmp_path / "a-file").write_text("")
    for runs, where, seed, message in ((0, out, 0, "runs must be a positive integer"),
                                       (1, tmp_path / "a-file", 0, "exists and is not a directory"),
                                       (1, out, -1, "seed must be an integer >= 0")):
        with pytest.raises(DDKitError, match=message):  # refused as a run would refuse it
            plan_bench("smoke", ["digits"], ["dm"], [1], runs=runs, out=where, seed=seed)
    small_grid(out, ipcs=(1,))  # runs=1
    with open(out / "results.jsonl", "a") as handle:  # a failed cell, as a bench records it
        handle.write(json.dumps({"dataset": "digits", "method": "dm", "ipc": 2, "tier": "smoke", "arch": "convnet",
                                 "runs": 1, "seed": 0, "error": "RuntimeError: boom\ntraceback"}) + "\n")
    plan = plan_bench("smoke", ["digits"], ["dm"], [1, 2], runs=1, out=out)
    assert plan[1].startswith("[2/4] digits dm ipc 1 (hard, convnet): done, ")
    assert plan[2:] == ["[3/4] digits random ipc 2 (hard, convnet): to run",
                        "[4/4] digits dm ipc 2 (hard, convnet): failed (RuntimeError: boom)", "2 done, 1 to run, 1 failed"]

    # A bench with --runs 2 stopped after the first run of the random cell's evaluation.
    random_set = ddkit.load(out / "sets" / "digits-random-ipc1")
    record = dict(random_set.meta["evaluations"][-1], partial=True, runs_planned=2)
    random_set.record_evaluation(record)
    from ddkit.checkpoint import save_tensors_atomic

    stopped = out / "sets" / "digits-random-ipc1" / "eval-checkpoint"
    stopped.mkdir()
    save_tensors_atomic(stopped / "hard-smoke-convnet-seed1.safetensors", {"weight": torch.zeros(1)},
                        {"identity": {"config": {"epochs": 200}}, "loop": {"next_epoch": 57}})
    (stopped / "hard-smoke-convnet-seed0.safetensors").write_bytes(b"")  # damaged: reported, not trusted
    (stopped / "soft-smoke-convnet-seed1.safetensors").write_bytes(b"")  # another protocol's: not this cell's
    assert main(["bench", "--tier", "smoke", "--datasets", "digits", "--methods", "dm", "--ipc", "1", "--runs", "2",
                 "--out", str(out), "--plan"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == ("[1/2] digits random ipc 1 (hard, convnet): to run; continues from 1 of 2 evaluation runs "
                          "stored, a stopped evaluation run (seed 0, unreadable), a stopped evaluation run "
                          "(seed 1, epoch 57 of 200)")


def test_preset_changes_names_each_changed_option_and_ignores_added_ones():
    from ddkit.bench.grid import Cell, preset_changes
    from ddkit.methods import stats_family

    config = json.loads(json.dumps(stats_family.resolve_preset("gvbsm", "digits", 10, "smoke")))
    manifest = {"config": json.loads(json.dumps(config))}
    cell = Cell("digits", "gvbsm", 10)
    assert preset_changes(cell, manifest, "smoke") == []
    manifest["config"]["recover"]["jitter"] = 4
    manifest["config"]["recover"]["lr"] = 0.2
    del manifest["config"]["recover"]["ema_alpha"]  # an option the preset gained later: not a change
    assert preset_changes(cell, manifest, "smoke") == [
        f"recover.jitter: 4 -> {config['recover']['jitter']}", f"recover.lr: 0.2 -> {config['recover']['lr']}"]

    # random+M: M's teachers and relabel options count, M's recover options do not.
    relabel = {"epochs": config["relabel"]["epochs"], "mix": config["relabel"]["mix"],
               "teacher_info": [{"name": "t", "model": model} for model in config["teachers"]]}
    baseline = Cell("digits", "random+gvbsm", 10)
    assert preset_changes(baseline, {"relabel": relabel}, "smoke") == []
    # a teacher's cache key holds its training recipe: another recipe means other soft labels
    keyed = dict(relabel, teacher_info=[dict(teacher, key=key) for teacher, key in
                                        zip(relabel["teacher_info"], stats_family.teacher_keys(config, "digits"))])
    assert preset_changes(baseline, {"relabel": keyed}, "smoke") == []
    keyed["teacher_info"][0]["key"] = "convnet-of-another-recipe"
    assert preset_changes(baseline, {"relabel": keyed}, "smoke")[0].startswith("teachers: ['convnet-of-another-recipe'")
    relabel["epochs"] += 1
    relabel["teacher_info"] = relabel["teacher_info"][:1]
    changes = preset_changes(baseline, {"relabel": relabel}, "smoke")
    assert [change.split(":")[0] for change in changes] == ["relabel.epochs", "teachers"]
    assert preset_changes(Cell("digits", "random", 10), {}, "smoke") == []


def test_matching_presets_compare_only_the_sections_the_method_uses():
    from ddkit.bench.grid import Cell, preset_changes
    from ddkit.methods import dm_family

    for method, counts in (("dm", False), ("ddm", False), ("iid", True)):
        stored = json.loads(json.dumps(dm_family.resolve_preset(method, "digits", 10, "smoke")))
        stored["cc"]["model"]["width"] += 8  # IID's extractor changed since the set was made
        changes = preset_changes(Cell("digits", method, 10), {"config": stored}, "smoke")
        assert changes == (["cc.model.width: 16 -> 8"] if counts else []), method


def test_the_table_marks_the_times_of_compiled_cells():
    from ddkit.bench.table import COLUMNS, row_cells

    line = {"dataset": "mnist", "ipc": 50, "method": "dm", "protocol": "hard", "runs": 3, "mean": 97.0, "std": 0.1,
            "distill_seconds": 10.0, "eval_seconds_per_run": 612.34, "image_bytes": 1, "soft_label_bytes": 0}
    distill, evaluation = COLUMNS.index("distill s"), COLUMNS.index("eval s/run")
    assert (row_cells(line)[distill], row_cells(line)[evaluation]) == ("10.0", "612.3")
    assert row_cells(dict(line, compiled=True))[distill:evaluation + 1] == ["10.0", "612.3 (compiled)"]
    assert row_cells(dict(line, distill_compiled=True))[distill:evaluation + 1] == ["10.0 (compiled)", "612.3"]


# ---- several bench processes on one directory ---------------------------------------------------------
def test_a_cell_claim_excludes_others_and_ends_with_its_process(tmp_path):
    from ddkit.bench.grid import Cell, cell_held_elsewhere, claim_cell

    cell = Cell("digits", "dm", 1)
    first = claim_cell(tmp_path, cell)
    second = claim_cell(tmp_path, cell)
    assert first.held and not second.held and second.holder["pid"] == os.getpid()
    assert cell_held_elsewhere(tmp_path, cell) is not None
    first.release()
    assert cell_held_elsewhere(tmp_path, cell) is None
    with claim_cell(tmp_path, cell) as third:
        assert third.held

    # A process that dies (SIGKILL: no clean-up runs) leaves no claim behind.
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ddkit.bench.grid import Cell, claim_cell; "
        f"claim = claim_cell({str(tmp_path)!r}, Cell('digits', 'dm', 1)); assert claim.held; "
        "print('held', flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        held = cell_held_elsewhere(tmp_path, cell)
        assert held is not None and held.holder["pid"] == holder.pid
        assert f"pid {holder.pid}" in held.describe()
    finally:
        holder.kill()
        holder.wait()
    assert cell_held_elsewhere(tmp_path, cell) is None


def test_cells_another_process_holds_are_left_to_it(isolated_data, tmp_path, capsys):
    from ddkit.bench.grid import Cell, claim_cell

    out = tmp_path / "bench"
    # random+sre2l needs the random subset, which the other process is making: both wait for it
    with claim_cell(out, Cell("digits", "random", 1)):
        lines = run_bench("smoke", ["digits"], ["sre2l"], [1], runs=1, out=out)
        assert [line["method"] for line in lines] == ["sre2l"]
        plan = plan_bench("smoke", ["digits"], ["sre2l"], [1], runs=1, out=out)
    err = capsys.readouterr().err
    assert "another bench process is running it" in err and "left to it" in err
    assert "another bench process is running its random subset (digits-random-ipc1)" in err
    assert plan[0].startswith("[1/3] digits random ipc 1 (hard, convnet): to run; a bench process is running it now")
    lines = run_bench("smoke", ["digits"], ["sre2l"], [1], runs=1, out=out, show_progress=False)
    assert [line["method"] for line in lines] == ["random", "random+sre2l", "sre2l"]


def test_a_cell_another_process_finished_meanwhile_is_not_run_again(isolated_data, tmp_path, monkeypatch):
    from ddkit.bench import runner

    done = small_grid(tmp_path / "done", ipcs=(1,))
    dm_line = next(line for line in done if line["method"] == "dm")
    out = tmp_path / "bench"
    real_claim = runner.claim_cell

    def claim_after_the_other_process(where, cell):
        if cell.method == "dm":  # the other process finished dm while this one ran the random subset
            shutil.copytree(tmp_path / "done" / dm_line["set"], Path(where) / dm_line["set"])
            runner.append_result(where, dm_line)
        return real_claim(where, cell)

    monkeypatch.setattr(runner, "claim_cell", claim_after_the_other_process)
    made = []
    real_distill = ddkit.distill
    monkeypatch.setattr(ddkit, "distill", lambda method, **kw: made.append(method) or real_distill(method, **kw))
    lines = small_grid(out, ipcs=(1,))
    assert made == ["random"]
    assert [line["method"] for line in lines] == ["random", "dm"] and lines[1] == dm_line


def test_describe_cpu_names_the_model_its_vector_width_and_cores():
    from ddkit.utils import describe_cpu, describe_device

    zen5 = ("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n"
            "model name\t: AMD EPYC\nflags\t\t: fpu sse avx2 avx512f avx512bw\n\n"
            "processor\t: 1\nmodel name\t: something else\n")
    assert describe_cpu(zen5, cores=2) == "AMD EPYC (family 26, model 2), AVX-512, 2 cores"
    assert describe_cpu("model name\t: Old CPU\nflags\t: sse avx2\n", cores=4) == "Old CPU, AVX2, 4 cores"
    assert describe_cpu("", cores=1).endswith(", 1 cores")  # no /proc/cpuinfo: the platform's name
    assert describe_device("cpu") == describe_cpu()


def test_a_table_of_lines_from_two_machines_names_the_machine_of_each_row():
    from ddkit.bench.table import extra_columns, row_cells

    line = {"dataset": "mnist", "method": "dm", "ipc": 1, "protocol": "hard", "runs": 3, "mean": 89.13, "std": 0.2,
            "distill_seconds": 10.0, "eval_seconds_per_run": 5.0, "image_bytes": 1, "soft_label_bytes": 0,
            "arch": "convnet", "tier": "quick", "machine": "A, AVX2, 2 cores"}
    other = dict(line, method="random", machine="B, AVX-512, 2 cores")
    assert extra_columns([line, dict(line, method="iid")]) == ()
    assert extra_columns([line, other]) == ("machine",)
    assert row_cells(other, ("machine",))[-1] == "B, AVX-512, 2 cores"


def test_report_of_runs_finds_sets_in_sub_folders_as_make_demo_writes_them(isolated_data, tmp_path, capsys):
    """`make demo` writes runs/demo/random-fmnist-ipc10 and runs/demo/dm-fmnist-ipc10; `ddkit report runs`
    (the README's line) must find them one folder down, and name them by their path under runs/."""
    runs = tmp_path / "runs"
    for name in ("random-a", "random-b"):
        ddkit.distill("random", dataset="digits", ipc=1, out=runs / "demo" / name)
    ddkit.distill("random", dataset="digits", ipc=1, out=runs / "top")
    (runs / "demo" / ".hidden").mkdir()
    assert main(["report", str(runs)]) == 0
    text = (runs / "report.html").read_text()
    assert "<td>demo/random-a</td>" in text and "<td>demo/random-b</td>" in text and "<td>top</td>" in text
    assert text.count("<h3>") == 3


def test_overridden_options_are_named_beside_the_preset(isolated_data, tmp_path, capsys):
    """`--set epochs=3` is not the smoke preset: the printed table and the reports name the change."""
    ddkit.distill("random", dataset="digits", ipc=1, out=tmp_path / "runs" / "set")
    set_dir = tmp_path / "runs" / "set"
    assert main(["eval", str(set_dir), "--preset", "smoke", "--runs", "1", "--quiet", "--set", "epochs=3",
                 "--set", "model.width=8"]) == 0
    table = capsys.readouterr().out
    assert "smoke, epochs=3, model.width=8" in table
    assert main(["eval", str(set_dir), "--preset", "smoke", "--runs", "1", "--quiet", "--set", "epochs=200"]) == 0
    plain = capsys.readouterr().out.splitlines()[1]  # epochs=200 is smoke's own value: no change to name
    assert plain.split()[2] == "smoke" and "epochs" not in plain
    for page in (write_report(set_dir), write_report(tmp_path / "runs")):
        text = page.read_text()
        assert "<td>smoke, epochs=3, model.width=8</td>" in text and "<td>smoke</td>" in text


def test_a_stored_value_that_auto_resolved_to_is_not_a_preset_change():
    """Relabel records store what ``crop_padding: auto`` became (1 on 8-pixel digits); a resumed
    bench must not remake the random+M cell over it, while a real change still counts."""
    from ddkit.bench.staleness import _differences

    stored = {"relabel": {"crop_padding": 1, "epochs": 20}}
    assert _differences(stored, {"relabel": {"crop_padding": "auto", "epochs": 20}}) == []
    assert _differences(stored, {"relabel": {"crop_padding": 2, "epochs": 20}}) == ["relabel.crop_padding: 1 -> 2"]


def test_an_unused_mix_beta_is_not_a_preset_change_of_a_relabelled_subset():
    """A relabel without mixing stores mix_beta None; the preset keeps its unused 1.0. A resumed
    bench must not remake random+cda (Tiny-ImageNet's relabel does not mix) over it."""
    from ddkit.bench.cells import Cell
    from ddkit.bench.staleness import preset_changes
    from ddkit.methods import stats_family

    config = stats_family.resolve_preset("cda", "digits", 1, "smoke")
    assert config["relabel"]["mix"] == "none" and config["relabel"]["mix_beta"] == 1.0
    teachers = [{"model": model} for model in config["teachers"]]
    relabel = {**config["relabel"], "mix_beta": None, "crop_padding": 0, "teacher_info": teachers}
    assert preset_changes(Cell("digits", "random+cda", 1), {"relabel": relabel}, "smoke") == []
    changed = {**relabel, "epochs": relabel["epochs"] + 1}
    assert preset_changes(Cell("digits", "random+cda", 1), {"relabel": changed}, "smoke") == [
        f"relabel.epochs: {relabel['epochs'] + 1} -> {relabel['epochs']}"]
