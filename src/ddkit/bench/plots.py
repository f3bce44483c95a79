"""Bench plots (PNG, matplotlib's Agg canvas; pyplot and the global backend are never touched).

- ``plots/accuracy-<dataset>-<protocol>-<arch>-<tier>.png``: accuracy against IPC, one line per
  method with the standard deviation as error bars; the baselines are dashed (``random`` black,
  ``random+M`` in M's colour).
- ``plots/storage-<dataset>-<arch>-<tier>.png``: accuracy against the bytes each set takes to
  store (images plus soft-label records), both protocols together; the random subset with hard
  labels (dashed black) is the baseline at equal storage.
- ``plots/loss-<set>.png``: the loss terms of a set's ``loss_log`` against the iteration (the
  statistics family's batches are concatenated, with a dotted line where a batch starts).
- every set of the bench gets its ``grid.png`` back if it is missing.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

import ddkit
from ddkit.bench.cells import BASELINE, is_baseline, relabelled_method, slug
from ddkit.bench.results import PLOTS_DIR, latest_results, read_results
from ddkit.bench.table import method_order, total_bytes
from ddkit.errors import DDKitError
from ddkit.store import save_grid
from ddkit.store.distilled import MANIFEST_FILE
from ddkit.utils import atomic_write

#: loss_log fields that are bookkeeping, not loss terms
NOT_LOSS_TERMS = frozenset({"iteration", "batch", "acc", "accuracy", "crop_min", "lr", "seconds"})


def new_figure(width: float = 6.4, height: float = 4.2) -> Figure:
    """A ``width`` x ``height`` inch figure at 100 dpi on an Agg canvas: no pyplot, so no global state."""
    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG bytes."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")
    return buffer.getvalue()


def save_figure(figure: Figure, path: str | Path) -> Path:
    """Write the figure as a PNG atomically (a temporary name of its own, then a rename), so that
    bench processes sharing a directory may rewrite the same plot at once."""
    path = Path(path)
    data = png_bytes(figure)
    atomic_write(path, lambda tmp: tmp.write_bytes(data))
    return path


def _colours(methods: list[str]) -> dict[str, object]:
    palette = colormaps["tab10"]
    plain = sorted({relabelled_method(m) or m for m in methods} - {BASELINE})
    colours = {m: palette(i % 10) for i, m in enumerate(plain)}
    colours[BASELINE] = "black"
    for method in methods:
        if relabelled_method(method):
            colours[method] = colours.get(relabelled_method(method), "grey")
    return colours


def _method_curves(axes, lines: list[dict], x_of, label_of) -> None:
    """One error-bar line per method of ``lines`` (mean, std against ``x_of(line)``), baselines
    dashed: ``random`` black, ``random+M`` in M's colour; ``label_of(method, line)`` names it."""
    methods = sorted({line["method"] for line in lines}, key=method_order)
    colours = _colours(methods)
    for method in methods:
        own = [line for line in lines if line["method"] == method]
        points = sorted((x_of(line), float(line["mean"]), float(line["std"])) for line in own)
        baseline = is_baseline(method)
        axes.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] for p in points],
                      label=label_of(method, own[0]), color=colours[method], linestyle="--" if baseline else "-",
                      marker="s" if baseline else "o", linewidth=2.0 if baseline else 1.5, capsize=4, markersize=6)


def _finish(axes, xlabel: str, title: str) -> None:
    axes.set_xlabel(xlabel)
    axes.set_ylabel("test accuracy %")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best")


def accuracy_figure(lines: list[dict], title: str) -> Figure:
    """Accuracy (mean, std error bars) against IPC for each method in ``lines`` (successful lines)."""
    figure = new_figure()
    axes = figure.add_subplot(1, 1, 1)
    _method_curves(axes, lines, lambda line: int(line["ipc"]),
                   lambda method, line: method + (" (baseline)" if is_baseline(method) else ""))
    ipcs = sorted({int(line["ipc"]) for line in lines})
    if ipcs and ipcs[-1] / ipcs[0] >= 5:
        axes.set_xscale("log")
    axes.set_xticks(ipcs)
    axes.set_xticklabels([str(i) for i in ipcs])
    axes.minorticks_off()
    _finish(axes, "images per class (IPC)", title)
    return figure


def loss_series(loss_log: list[dict]) -> tuple[list[float], dict[str, list[float]], list[float]]:
    """(x, {term: values}, batch starts) of a ``loss_log``; batches are laid end to end.

    Terms are the numeric fields other than :data:`NOT_LOSS_TERMS`; a term that is zero (or
    missing) on every row is dropped. Rows lacking a term get NaN there.
    """
    rows = [row for row in loss_log or [] if isinstance(row, dict) and isinstance(row.get("iteration"), (int, float))]
    spans: dict[object, float] = {}
    for row in rows:
        batch = row.get("batch", 0)
        spans[batch] = max(spans.get(batch, 0.0), float(row["iteration"]) + 1)
    offsets, total = {}, 0.0
    for batch, span in spans.items():
        offsets[batch] = total
        total += span
    x = [offsets[row.get("batch", 0)] + float(row["iteration"]) for row in rows]
    names = []
    for row in rows:
        for name, value in row.items():
            if name not in NOT_LOSS_TERMS and name not in names and isinstance(value, (int, float)) \
                    and not isinstance(value, bool):
                names.append(name)
    series = {}
    for name in names:
        values = [float(row[name]) if isinstance(row.get(name), (int, float)) else math.nan for row in rows]
        if any(v != 0 and not math.isnan(v) for v in values):
            series[name] = values
    terms = [name for name in series if name != "total"]
    if len(terms) == 1 and "total" in series:
        series.pop("total")  # one term: the total repeats it (times its weight)
    starts = list(offsets.values())[1:] if len(offsets) > 1 else []
    return x, series, starts


def loss_figure(loss_log: list[dict], title: str) -> Figure | None:
    """The loss terms against the iteration; None when the log holds no loss term."""
    x, series, starts = loss_series(loss_log)
    if not series:
        return None
    figure = new_figure()
    axes = figure.add_subplot(1, 1, 1)
    for name, values in series.items():
        style = {"color": "black", "linewidth": 2.0} if name == "total" else {"linewidth": 1.2}
        axes.plot(x, values, label=name, marker="." if len(x) <= 40 else None, **style)
    for start in starts:
        axes.axvline(start, color="grey", linestyle=":", linewidth=0.8)
    finite = [v for values in series.values() for v in values if not math.isnan(v)]
    if finite and min(finite) > 0:
        axes.set_yscale("log")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel("iteration" + (" (batches laid end to end)" if starts else ""))
    axes.set_ylabel("loss (terms unweighted; total weighted)")
    axes.set_title(title, fontsize=10)
    axes.grid(True, alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    return figure


def accuracy_groups(lines: list[dict]) -> dict[tuple, list[dict]]:
    """Successful lines grouped by (dataset, protocol, arch, tier)."""
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        if "error" in line or line.get("mean") is None:
            continue
        key = (line["dataset"], line["protocol"], line.get("arch", "convnet"), line.get("tier", "-"))
        groups.setdefault(key, []).append(line)
    return groups


def accuracy_plot_name(dataset: str, protocol: str, arch: str, tier: str) -> str:
    """File name of the accuracy-against-IPC plot of one (dataset, protocol, arch, tier) group."""
    return f"accuracy-{slug(dataset)}-{protocol}-{arch}-{tier}.png"


def write_accuracy_plots(lines: list[dict], plots: str | Path) -> list[Path]:
    """Write one accuracy-against-IPC plot per (dataset, protocol, arch, tier) of ``lines`` (result
    lines, errors skipped) into the folder ``plots``; returns their paths, sorted."""
    plots = Path(plots)
    plots.mkdir(parents=True, exist_ok=True)
    written = []
    for (dataset, protocol, arch, tier), group in sorted(accuracy_groups(lines).items()):
        title = f"{dataset}: {protocol}-label protocol, {arch}, {tier} tier"
        figure = accuracy_figure(group, title)
        written.append(save_figure(figure, plots / accuracy_plot_name(dataset, protocol, arch, tier)))
    return written


def storage_figure(lines: list[dict], title: str) -> Figure:
    """Accuracy against the bytes a set takes to store (images plus soft-label records, log scale),
    one line per method over its IPCs, both protocols on one plot. The random subset with hard
    labels is the dashed black line: at any storage budget, more real images instead of soft
    labels; ``random+M`` is dashed in M's colour."""
    figure = new_figure()
    axes = figure.add_subplot(1, 1, 1)
    _method_curves(axes, lines, total_bytes, lambda method, line: f"{method} ({line['protocol']} labels)"
                   + (", baseline" if is_baseline(method) else ""))
    axes.set_xscale("log")
    _finish(axes, "bytes stored: images + soft-label records (log scale)", title)
    return figure


def storage_plot_name(dataset: str, arch: str, tier: str) -> str:
    """File name of the accuracy-against-storage plot of one (dataset, arch, tier) group."""
    return f"storage-{slug(dataset)}-{arch}-{tier}.png"


def write_storage_plots(lines: list[dict], plots: str | Path) -> list[Path]:
    """One accuracy-against-storage plot per (dataset, arch, tier) of ``lines`` whose lines say
    their stored bytes; returns their paths, sorted."""
    plots = Path(plots)
    plots.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list[dict]] = {}
    for line in lines:
        if "error" not in line and line.get("mean") is not None and line.get("image_bytes"):
            groups.setdefault((line["dataset"], line.get("arch", "convnet"), line.get("tier", "-")), []).append(line)
    written = []
    for (dataset, arch, tier), group in sorted(groups.items()):
        figure = storage_figure(group, f"{dataset}: accuracy at equal storage, {arch}, {tier} tier")
        written.append(save_figure(figure, plots / storage_plot_name(dataset, arch, tier)))
    return written


def write_plots(directory: str | Path) -> list[Path]:
    """(Re)write the bench directory's plots and missing grids; returns the plot paths, sorted."""
    directory = Path(directory)
    plots = directory / PLOTS_DIR
    lines = latest_results(read_results(directory))
    written = write_accuracy_plots(lines, plots) + write_storage_plots(lines, plots)
    for set_path in sorted({line["set"] for line in lines if line.get("set")}):
        set_dir = directory / set_path
        manifest_path = set_dir / MANIFEST_FILE
        if not manifest_path.is_file():
            continue
        if not (set_dir / "grid.png").is_file():
            try:
                distilled = ddkit.load(set_dir)
            except DDKitError:
                continue  # a damaged set: its cell's evaluation says so; the plots go on without it
            save_grid(distilled.images, distilled.labels, distilled.class_names, set_dir / "grid.png")
        target = plots / f"loss-{set_dir.name}.png"
        if target.is_file() and target.stat().st_mtime >= manifest_path.stat().st_mtime:
            written.append(target)
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            continue
        figure = loss_figure(manifest.get("loss_log") or [], f"{set_dir.name}: loss terms")
        if figure is not None:
            written.append(save_figure(figure, target))
    return sorted(written)
