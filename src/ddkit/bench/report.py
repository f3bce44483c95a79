"""One self-contained HTML page for a distilled set or a bench directory.

Every image is embedded as a base64 ``data:`` URI and the style sheet is inline, so the page can be
mailed or archived as one file and never loads anything from elsewhere. All text taken from files
(manifests, results, error messages) is escaped with :func:`html.escape`.

A tiny inline script writes, once the page has loaded, how many ``<img>`` elements it has and how
many of them decoded into ``#image-check`` (``data-images`` / ``data-loaded``); the tests read that
back from headless Chromium.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import json
import os
from pathlib import Path

import ddkit
from ddkit.bench.cells import is_baseline
from ddkit.bench.plots import loss_figure, png_bytes, write_plots
from ddkit.bench.results import PLOTS_DIR, RESULTS_FILE, SPEC_FILE, latest_results, read_results
from ddkit.bench.table import sorted_lines, table_rows
from ddkit.errors import DDKitError
from ddkit.evaluate.protocols import accuracy_text, preset_label
from ddkit.evaluate.scores import LEGEND, SCORE_NAMES
from ddkit.store import save_grid
from ddkit.store.distilled import MANIFEST_FILE
from ddkit.utils import write_text_atomic

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 2em; border-bottom: 1px solid #ccc; }
h3 { font-size: 1em; margin-bottom: 0.3em; }
table { border-collapse: collapse; margin: 0.5em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.baseline td { background: #f7f7ff; }
tr.failed td { background: #fff0f0; color: #900; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
img { max-width: 100%; border: 1px solid #ddd; }
.figures { display: flex; flex-wrap: wrap; gap: 1em; }
.figures figure { margin: 0; }
figcaption { font-size: 0.85em; color: #555; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
.check { font-size: 0.8em; color: #777; }
"""

IMAGE_CHECK_SCRIPT = """
window.addEventListener("load", function () {
  var images = document.getElementsByTagName("img");
  var loaded = 0;
  for (var i = 0; i < images.length; i++) {
    if (images[i].complete && images[i].naturalWidth > 0) { loaded += 1; }
  }
  var box = document.getElementById("image-check");
  box.setAttribute("data-images", String(images.length));
  box.setAttribute("data-loaded", String(loaded));
  box.textContent = images.length + " images, " + loaded + " loaded";
});
"""

esc = html.escape
MIB = 1024 * 1024


def data_uri(png: bytes) -> str:
    """``data:image/png;base64,...`` for PNG bytes."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def image_tag(png: bytes, alt: str, caption: str | None = None) -> str:
    """An ``<img>`` with the PNG embedded as a data URI, inside a ``<figure>`` when ``caption`` is given."""
    tag = f'<img src="{data_uri(png)}" alt="{esc(alt)}">'
    if caption is None:
        return tag
    return f"<figure>{tag}<figcaption>{esc(caption)}</figcaption></figure>"


def html_table(header: list[str], rows: list[list[str]], row_classes: list[str] | None = None,
               numeric: set[int] | None = None) -> str:
    """An escaped HTML table."""
    numeric = numeric or set()
    head = "".join(f"<th>{esc(str(h))}</th>" for h in header)
    body = []
    for index, row in enumerate(rows):
        css = f' class="{esc(row_classes[index])}"' if row_classes and row_classes[index] else ""
        cells = "".join(f'<td class="number">{esc(str(c))}</td>' if i in numeric else f"<td>{esc(str(c))}</td>"
                        for i, c in enumerate(row))
        body.append(f"<tr{css}>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def page(title: str, body: list[str]) -> str:
    """A whole HTML document: inline style, the body parts, the image check and its script."""
    created = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en">',
        "<head>",
        '<meta charset="utf-8">',
        f"<title>{esc(title)}</title>",
        f"<style>{STYLE}</style>",
        "</head>",
        "<body>",
        f"<h1>{esc(title)}</h1>",
        *body,
        f'<p class="check">written by ddkit on {esc(created)}; <span id="image-check">images: not checked '
        "(scripts off)</span></p>",
        f"<script>{IMAGE_CHECK_SCRIPT}</script>",
        "</body>",
        "</html>",
        "",
    ])


def _runs(record: dict):
    """Runs of an evaluation record; "2 of 3 (interrupted)" for a partial one."""
    count = len(record.get("accuracies", []))
    if record.get("partial"):
        return f"{count} of {record.get('runs_planned', '?')} (interrupted)"
    return count


def _accuracy(record: dict) -> str:
    """``"80.76 +- 0.09"`` of an evaluation record, or ``"not evaluated"`` for a set without one."""
    if "mean" not in record:
        return "not evaluated"
    return accuracy_text(record["mean"], record.get("std", float("nan")), len(record.get("accuracies") or []) or None)


def _preset(record: dict) -> str:
    """The preset of an evaluation record with every option that differs from it ("quick, epochs=20")."""
    if "preset" not in record:
        return "-"
    return preset_label(record.get("protocol", "hard"), record["preset"], record.get("config"))


def _seconds(value) -> str:
    if value is None:
        return "-"
    value = float(value)
    return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"


# ---- a single set ------------------------------------------------------------------------------------
def set_body(directory: Path) -> tuple[str, list[str]]:
    """(title, body parts) of a set's report."""
    distilled = ddkit.load(directory)
    meta = distilled.meta
    sizes = distilled.stored_bytes()
    timings = meta.get("timings") or {}
    versions = meta.get("versions") or {}
    peak = meta.get("peak_memory_bytes")
    summary = [
        ("method", distilled.method), ("dataset", distilled.dataset), ("images per class", distilled.ipc),
        ("stored images", f"{distilled.images.shape[0]} of shape {' x '.join(map(str, distilled.image_shape))}"),
        ("decode", json.dumps(distilled.decode)), ("preset", meta.get("preset", "-")),
        ("status", meta.get("status", "-")), ("created", meta.get("created", "-")),
        ("seeds", json.dumps(meta.get("seeds") or {})), ("device", meta.get("device", "-")),
    ]
    summary += [(f"time: {name}", _seconds(value)) for name, value in timings.items()]
    summary += [
        ("peak memory", "-" if peak is None else f"{peak / MIB:.0f} MiB"),
        ("image bytes", sizes["images"]), ("soft-label bytes", sizes["soft_labels"]),
        ("soft labels", "yes" if distilled.has_soft_labels else "no"),
    ]
    if meta.get("relabelled_like"):
        summary.append(("relabelled like", json.dumps(meta["relabelled_like"])))
    if meta.get("published_accuracy") is not None:
        summary.append(("published accuracy %", meta["published_accuracy"]))
    summary += [(f"version: {name}", value) for name, value in versions.items()]
    body = ["<h2>Summary</h2>", html_table(["field", "value"], [[k, v] for k, v in summary])]

    evaluations = meta.get("evaluations") or []
    body.append("<h2>Evaluations</h2>")
    if evaluations:
        rows = [[e.get("protocol", "-"), _preset(e), e.get("arch", "-"), _runs(e),
                 _accuracy(e),
                 ", ".join(f"{float(a):.2f}" for a in e.get("accuracies", [])), _seconds(e.get("seconds_per_run")),
                 e.get("device", "-"), e.get("date", "-")] for e in evaluations]
        body.append(html_table(["protocol", "preset", "arch", "runs", "accuracy % (mean +- std)", "per run",
                                "s/run", "device", "date"], rows, numeric={3, 6}))
    else:
        body.append("<p>No evaluation stored yet; run <code>ddkit eval</code> on this set.</p>")

    grid_path = directory / "grid.png"
    if not grid_path.is_file():
        save_grid(distilled.images, distilled.labels, distilled.class_names, grid_path)
    body += ["<h2>Images</h2>", image_tag(grid_path.read_bytes(), f"{directory.name} grid",
                                          "one row per class (stored images)")]
    figure = loss_figure(meta.get("loss_log") or [], f"{directory.name}: loss terms")
    if figure is not None:
        body += ["<h2>Loss curve</h2>", image_tag(png_bytes(figure), f"{directory.name} loss curve")]
    config = json.dumps(meta.get("config") or {}, indent=2, sort_keys=True, default=str)
    body += ["<h2>Configuration</h2>", f"<details><summary>resolved configuration</summary><pre>{esc(config)}</pre>"
             "</details>"]
    return f"ddkit set: {directory.name}", body


# ---- a bench directory ---------------------------------------------------------------------------------
def bench_body(directory: Path) -> tuple[str, list[str]]:
    """(title, body parts) of a bench directory's report."""
    write_plots(directory)
    body = []
    spec_path = directory / SPEC_FILE
    if spec_path.is_file():
        spec = json.loads(spec_path.read_text())
        rows = [[key, ", ".join(map(str, value)) if isinstance(value, list) else value] for key, value in spec.items()]
        body += ["<h2>Grid</h2>", html_table(["parameter", "value"], rows)]
    header, rows = table_rows(directory)
    lines = sorted_lines(latest_results(read_results(directory)))
    classes = ["failed" if "error" in line else ("baseline" if is_baseline(str(line.get("method"))) else "")
               for line in lines]
    body += ["<h2>Results</h2>",
             "<p>Final-epoch test accuracy, mean +- population std over the runs. <code>random</code> is the "
             "random real subset (hard labels); <code>random+M</code> is that subset relabelled with M's "
             "teachers, the fair baseline for soft-label methods.</p>",
             html_table(header, rows, classes, numeric={1, 4, 6, 7, 8, 9, 10, 11} | {
                 index for index, name in enumerate(header) if name in SCORE_NAMES})]
    shown = [name for name in SCORE_NAMES if name in header]
    if shown:
        body.append("<p>Scores, as DD-Ranking defines them (docs/bench.md, \"Scores\"):</p><ul>"
                    + "".join(f"<li><b>{name}</b>: {esc(LEGEND[name])}</li>" for name in shown) + "</ul>")
    failures = [line for line in lines if "error" in line]
    if failures:
        items = [f"<li>{esc(str(line.get('dataset')))} {esc(str(line.get('method')))} ipc {esc(str(line.get('ipc')))} "
                 f"({esc(str(line.get('arch')))}): {esc(str(line.get('error')))}</li>" for line in failures]
        body.append("<h3>Failed cells</h3><ul>" + "".join(items) + "</ul>")
    plots = directory / PLOTS_DIR
    accuracy = sorted(plots.glob("accuracy-*.png"))
    if accuracy:
        body += ["<h2>Accuracy against IPC</h2>", '<div class="figures">']
        body += [image_tag(p.read_bytes(), p.stem, p.stem) for p in accuracy]
        body.append("</div>")
    storage = sorted(plots.glob("storage-*.png"))
    if storage:
        body += ["<h2>Accuracy at equal storage</h2>",
                 "<p>Bytes stored per set (images plus soft-label records): a soft-label set is compared "
                 "with the random subset of as many bytes (more real images, hard labels), dashed.</p>",
                 '<div class="figures">']
        body += [image_tag(p.read_bytes(), p.stem, p.stem) for p in storage]
        body.append("</div>")
    set_dirs = sorted({directory / line["set"] for line in lines if line.get("set")})
    set_dirs = [d for d in set_dirs if (d / MANIFEST_FILE).is_file()]
    if set_dirs:
        body.append("<h2>Sets</h2>")
    for set_dir in set_dirs:
        body.append(f"<h3>{esc(set_dir.name)}</h3>")
        body.append('<div class="figures">')
        grid = set_dir / "grid.png"
        if grid.is_file():
            body.append(image_tag(grid.read_bytes(), f"{set_dir.name} grid", "images, one row per class"))
        loss = plots / f"loss-{set_dir.name}.png"
        if loss.is_file():
            body.append(image_tag(loss.read_bytes(), f"{set_dir.name} loss curve", "loss terms"))
        body.append("</div>")
    return f"ddkit bench: {directory.resolve().name}", body


# ---- a folder of sets ------------------------------------------------------------------------------------
def child_sets(directory: Path) -> list[Path]:
    """The set directories (holding ``manifest.json``) anywhere under ``directory``, sorted by path.

    Sub-folders are searched (``make demo`` writes ``runs/demo/dm-fmnist-ipc10``; a bench writes its
    sets inside its folder); a set's own folder and hidden folders (locks, a re-save's parked
    ``.NAME.old-*``) are not searched further.
    """
    found = []
    for root, folders, _ in os.walk(directory):
        folders[:] = sorted(name for name in folders if not name.startswith("."))
        for name in list(folders):
            if (Path(root) / name / MANIFEST_FILE).is_file():
                found.append(Path(root) / name)
                folders.remove(name)
    return sorted(found, key=lambda path: path.relative_to(directory).parts)


def sets_body(directory: Path) -> tuple[str, list[str]]:
    """(title, body parts) of a folder of sets: every stored evaluation side by side, then each grid.

    Sets made by ddkit, baselines and imported sets (``ddkit import``) sit in one table, sorted so
    that sets judged alike (dataset, IPC, protocol, preset, architecture) are next to each other. A
    set that cannot be read is listed with its error instead of stopping the page.
    """
    rows, unreadable, loaded = [], [], []
    for set_dir in child_sets(directory):
        name = set_dir.relative_to(directory).as_posix()
        try:
            distilled = ddkit.load(set_dir)
        except DDKitError as exc:
            unreadable.append(f"<li>{esc(name)}: {esc(str(exc))}</li>")
            continue
        loaded.append(set_dir)
        evaluations = distilled.meta.get("evaluations") or [{}]
        for e in evaluations:
            key = (distilled.dataset, distilled.ipc, e.get("protocol", "~"), _preset(e) if e else "~",
                   e.get("arch", "~"), -float(e.get("mean", -1.0)), name)
            rows.append((key, [name, distilled.method, distilled.dataset, distilled.ipc,
                               e.get("protocol", "-"), _preset(e), e.get("arch", "-"),
                               _runs(e) if e else "-", _accuracy(e), _seconds(e.get("seconds_per_run")),
                               e.get("date", "-")],
                         "baseline" if is_baseline(distilled.method) else ""))
    if not loaded and not unreadable:
        raise DDKitError(f"{directory} holds no distilled sets; pass a set, a bench directory, or a folder of sets")
    rows.sort(key=lambda row: row[0])
    body = ["<h2>Evaluations</h2>",
            "<p>Every evaluation stored in the sets' manifests: final-epoch test accuracy, mean +- population std "
            "over the runs. Compare rows of the same dataset, IPC, protocol, preset and architecture.</p>",
            html_table(["set", "method", "dataset", "IPC", "protocol", "preset", "arch", "runs",
                        "accuracy % (mean +- std)", "s/run", "date"], [r[1] for r in rows], [r[2] for r in rows],
                       numeric={3, 7, 9})]
    if unreadable:
        body.append("<h3>Sets that could not be read</h3><ul>" + "".join(unreadable) + "</ul>")
    if loaded:
        body.append("<h2>Sets</h2>")
    for set_dir in loaded:
        name = set_dir.relative_to(directory).as_posix()
        body += [f"<h3>{esc(name)}</h3>"]
        grid = set_dir / "grid.png"
        if grid.is_file():
            body.append(image_tag(grid.read_bytes(), f"{name} grid", "images, one row per class"))
    return f"ddkit sets: {directory.resolve().name}", body


def is_bench_dir(directory: Path) -> bool:
    """Whether ``directory`` was written by ``ddkit bench`` (it holds results.jsonl or bench.json)."""
    return (directory / RESULTS_FILE).is_file() or (directory / SPEC_FILE).is_file()


def write_report(path: str | Path, out_html: str | Path | None = None) -> Path:
    """Write one self-contained HTML page for a set directory or a bench directory.

    Args:
        path: a distilled-set directory (``manifest.json``), a bench directory (``results.jsonl``), or a
            folder whose sub-folders are sets (e.g. ``runs/`` with ddkit's, baseline and imported sets).
        out_html: the page to write (default ``path/report.html``).

    Returns:
        The path of the page.

    Raises:
        DDKitError: ``path`` is none of these (or the single set is damaged).
    """
    directory = Path(path)
    if not directory.is_dir():
        raise DDKitError(f"{directory} is not a directory; pass a set directory or a bench directory")
    if (directory / MANIFEST_FILE).is_file():
        title, body = set_body(directory)
    elif is_bench_dir(directory):
        title, body = bench_body(directory)
    elif child_sets(directory):
        title, body = sets_body(directory)
    else:
        raise DDKitError(f"{directory} is neither a distilled set (no manifest.json), a bench directory "
                         "(no results.jsonl) nor a folder of sets; pass what `ddkit distill` or `ddkit bench` wrote")
    target = Path(out_html) if out_html is not None else directory / "report.html"
    if target.is_dir():
        raise DDKitError(f"{target} is a directory; pass a file name for the report, e.g. {target / 'report.html'}")
    write_text_atomic(target, page(title, body))
    return target
