"""Speed as a fraction of the machine's limit: peak GEMM / convolution rate against what the engines achieve.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/speed_of_light.py [--device cpu|cuda] [--iterations 3]
        [--precision fp32|bf16] [--json out.json]

    # a check that it runs, in seconds (digits, tiny networks and layers):
    .venv/bin/python benchmarks/speed_of_light.py --quick

Everything is measured in one process:

1. **Peaks**: a square GEMM (``--gemm-size``) and a ConvNet-sized convolution (``--conv-batch`` maps,
   128 -> 128 channels, 3x3, 16x16 and 32x32 maps, channels-last and standard layout), each in fp32
   and bf16. FLOPs are counted as 2 per multiply-add; the rate is the median over ``--repeat`` runs.
2. **Steps**, each timed as the median over ``--iterations`` steps after one warm-up, and its
   FLOPs counted with ``torch.utils.flop_counter.FlopCounterMode`` over one further step
   (convolutions and matrix products, forward and backward):

   - ``dm@64`` / ``dm@256``: ddkit's matching engine with DM's quick preset at 64 (quick) and 256
     (paper) real images per class, Fashion-MNIST IPC 10, ConvNet-3 width 128, instance norm;
   - ``official@64`` / ``official@256``: the same iteration as the published DM code runs it, a
     Python loop over the classes (``benchmarks/dm_reference_loop.py``: per class its own real
     batch, one shared DSA draw for its real and synthetic images, a random network's embeddings,
     the squared distance of the mean embeddings summed over classes; then one SGD step). It
     alternates step by step with ``dm@...``, so drift of the machine's speed hits both alike, and
     the output gives ``official / ddkit`` seconds per step;
   - ``idm``: one IDM step of the quick preset (per-class image steps, the model queue and its training);
   - ``iid``: one IID step of the quick preset (DM with local covariance matching and class
     centralization through a pretrained extractor, here untrained);
   - ``ddm``: one DDM step of the quick preset (style moments of every block's maps, intra-class diversity);
   - ``sre2l``: one SRe2L recover iteration of the quick preset (a BatchNorm ConvNet teacher, here
     untrained: the FLOPs and time do not depend on its weights), one batch of 100 images.

   Each step's rate is printed as a fraction of the best convolution peak of its precision
   (``conv``) and of the GEMM peak (``gemm``). With ``--precision bf16`` the ddkit steps run under
   ``ddkit.precision`` autocast, and ``bf16/fp32`` rows time the DM step both ways side by side.

Timings on a shared machine vary; compare numbers only within one run (ratios).
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from dm_reference_loop import ReferenceDM  # noqa: E402  (a script beside this one)

from ddkit import precision as ddkit_precision  # noqa: E402
from ddkit.data import load_dataset  # noqa: E402
from ddkit.methods import dm_family, stats_family  # noqa: E402
from ddkit.methods.matching import MatchingEngine  # noqa: E402
from ddkit.methods.recover import RecoverEngine  # noqa: E402
from ddkit.methods.squeeze import Teacher, build_net, frozen  # noqa: E402
try:  # a tree before the one-pass first block (to time it with this same script)
    from ddkit.models import fused  # noqa: E402
except ImportError:
    fused = None
from ddkit.utils import apply_overrides, resolve_device  # noqa: E402

#: Sizes of the full run and of ``--quick`` (a check that the script runs, in seconds).
SIZES = {
    "full": {"dataset": "fashion-mnist", "ipc": 10, "width": 128, "batches": (64, 256), "gemm": 2048,
             "conv_batch": 64, "conv_channels": 128, "conv_sizes": (16, 32), "teacher_width": 32},
    "quick": {"dataset": "digits", "ipc": 2, "width": 16, "batches": (8, 16), "gemm": 256,
              "conv_batch": 8, "conv_channels": 32, "conv_sizes": (8, 16), "teacher_width": 8},
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


#: ``wall``: elapsed seconds; ``cpu``: this process's CPU seconds (``time.process_time``), which on a
#: shared machine does not count the time other processes hold the cores (use it with ``--threads 1``:
#: with more threads, waiting threads spin and count)
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]


def timed(fn, device: torch.device) -> float:
    """Seconds one call of ``fn`` takes on :data:`clock`, the device's queue included."""
    synchronize(device)
    started = clock()
    fn()
    synchronize(device)
    return clock() - started


def median_seconds(fn, device: torch.device, repeat: int) -> float:
    """Median seconds of ``repeat`` calls of ``fn`` after one warm-up call."""
    fn()
    return statistics.median(timed(fn, device) for _ in range(repeat))


@contextlib.contextmanager
def layer_by_layer(gradients_only: bool = False):
    """Within it ddkit's networks run layer by layer: the one-pass first block
    (:mod:`ddkit.models.fused`) is off; with ``gradients_only``, only where gradients are recorded
    (:class:`ddkit.models.fused.FirstBlockWithGradients`), the forwards without gradients keep it."""
    if fused is None:
        yield
        return
    kept = fused.fusable_first_block
    if gradients_only:
        fused.fusable_first_block = lambda layers, x: not torch.is_grad_enabled() and kept(layers, x)
    else:
        fused.fusable_first_block = lambda layers, x: False
    try:
        yield
    finally:
        fused.fusable_first_block = kept


def counted_flops(fn) -> int:
    """FLOPs (2 per multiply-add) of the convolutions and matrix products one call of ``fn`` runs,
    forward and backward, as ``torch.utils.flop_counter`` counts them, with the networks run layer
    by layer: the work of the network as written, the same for every way of computing it (the
    one-pass first block does the first convolution's multiply-adds as matrix products, plus a
    9 x 9 patch covariance per image)."""
    with layer_by_layer(), FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


# ---- peaks ------------------------------------------------------------------------------------

def gemm_rate(size: int, dtype: torch.dtype, device: torch.device, repeat: int) -> float:
    """FLOP/s of ``[size, size] @ [size, size]`` in ``dtype``."""
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=generator).to(device, dtype)
    b = torch.randn(size, size, generator=generator).to(device, dtype)
    return 2 * size ** 3 / median_seconds(lambda: torch.mm(a, b), device, repeat)


def conv_rate(batch: int, channels: int, size: int, dtype: torch.dtype, channels_last: bool,
              device: torch.device, repeat: int) -> float:
    """FLOP/s of a ``channels -> channels`` 3x3 convolution (padding 1) on ``[batch, channels, size, size]``."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, channels, size, size, generator=generator).to(device, dtype)
    w = torch.randn(channels, channels, 3, 3, generator=generator).to(device, dtype)
    if channels_last:
        x, w = x.contiguous(memory_format=torch.channels_last), w.contiguous(memory_format=torch.channels_last)
    flops = 2 * batch * channels * channels * 9 * size * size
    with torch.no_grad():
        return flops / median_seconds(lambda: F.conv2d(x, w, padding=1), device, repeat)


def measure_peaks(sizes: dict, device: torch.device, repeat: int) -> list[dict]:
    """One row per peak measurement: kind, precision, layout, shape and FLOP/s."""
    rows = []
    for name, dtype in DTYPES.items():
        rows.append({"kind": "gemm", "precision": name, "layout": "-", "shape": f"{sizes['gemm']}^2",
                     "flops_per_s": gemm_rate(sizes["gemm"], dtype, device, repeat)})
        for size in sizes["conv_sizes"]:
            for channels_last in (True, False):
                rate = conv_rate(sizes["conv_batch"], sizes["conv_channels"], size, dtype, channels_last, device, repeat)
                rows.append({"kind": "conv", "precision": name, "layout": "channels_last" if channels_last else "nchw",
                             "shape": f"{sizes['conv_batch']}x{sizes['conv_channels']}x{size}x{size}",
                             "flops_per_s": rate})
    return rows


def best_peak(rows: list[dict], kind: str, precision: str) -> float:
    """The highest FLOP/s among the peak rows of ``kind`` and ``precision``."""
    return max(r["flops_per_s"] for r in rows if r["kind"] == kind and r["precision"] == precision)


# ---- steps ------------------------------------------------------------------------------------

def dm_config(method: str, dataset: str, ipc: int, width: int, batch_real: int | None = None) -> dict:
    """The quick preset of a matching method with the given ConvNet width (and real batch)."""
    overrides = {"model.width": width}
    if batch_real is not None:
        overrides["batch_real"] = batch_real
    return apply_overrides(dm_family.resolve_preset(method, dataset, ipc, "quick"), overrides)


def matching_step(real, method: str, sizes: dict, device, precision: str, batch_real: int | None = None):
    """A function running one step of a fresh matching engine (iteration numbers count up). IID's
    pretrained extractors are untrained here (built, not trained: the time does not depend on
    their weights)."""
    config = dm_config(method, real.name, sizes["ipc"], sizes["width"], batch_real)
    with ddkit_precision.using(precision, device):
        engine = MatchingEngine(real, sizes["ipc"], config, 0, device, show_progress=False)
    if engine.pool is not None:
        engine.pool._member = lambda index: frozen(build_net(engine.pool.config["model"], real, 1000 + index,
                                                             device)).eval()
    counter = iter(range(10 ** 9))
    return lambda: engine.step(next(counter))


def reference_step(real, sizes: dict, device, batch_real: int):
    """A function running one iteration of the official-style per-class DM loop."""
    reference = ReferenceDM(real, sizes["ipc"], dm_config("dm", real.name, sizes["ipc"], sizes["width"], batch_real),
                            0, device)
    return reference.step


def recover_step(real, sizes: dict, device, precision: str, method: str = "sre2l"):
    """A function running ONE recover iteration of ``method``'s quick preset on one batch, with
    untrained teachers (the time does not depend on their weights): SRe2L's BatchNorm ConvNet at
    ``teacher_width``, or every teacher of the preset as it is (G-VBSM's four backbones)."""
    config = stats_family.resolve_preset(method, real.name, preset="quick", real=real)
    model_configs = ([dict(config["teachers"][0], width=sizes["teacher_width"])] if method == "sre2l"
                     else config["teachers"])
    scratch = Path(tempfile.mkdtemp(prefix="ddkit-speed-"))  # G-VBSM caches its real targets beside the teacher
    atexit.register(shutil.rmtree, scratch, True)
    teachers = [Teacher(model=frozen(build_net(model_config, real, index, device)).eval(), model_config=model_config,
                        recipe={}, test_accuracy=0.0, path=scratch / f"teacher-{index}")
                for index, model_config in enumerate(model_configs)]
    for teacher in teachers:
        teacher.path.mkdir()
    overrides = {"iterations": 1, "batch_size": real.num_classes * sizes["ipc"]}
    if "conv_target_images" in config["recover"]:  # targets from 512 real images: the step's time is the same
        overrides["conv_target_images"] = 512
    recover = apply_overrides(config["recover"], overrides)
    with ddkit_precision.using(precision, device):
        engine = RecoverEngine(real, sizes["ipc"], recover, teachers, 0, device, show_progress=False)
    return engine.run


def measure_steps(real, sizes: dict, device, iterations: int, precision: str) -> tuple[list[dict], dict]:
    """Rows (name, FLOPs per step, seconds per step) and the official/ddkit ratios per batch."""
    rows, ratios = [], {}
    for batch in sizes["batches"]:
        sides = {f"dm@{batch}": matching_step(real, "dm", sizes, device, precision, batch),
                 f"official@{batch}": reference_step(real, sizes, device, batch)}
        if precision != "fp32":
            sides[f"dm@{batch} fp32"] = matching_step(real, "dm", sizes, device, "fp32", batch)
        flops = {name: counted_flops(step) for name, step in sides.items()}
        for step in sides.values():  # warm-up
            step()
        seconds = {name: [] for name in sides}
        for _ in range(iterations):  # alternate, so drift of the machine's speed hits every side alike
            for name, step in sides.items():
                seconds[name].append(timed(step, device))
        for name in sides:
            rows.append({"step": name, "precision": "fp32" if name.startswith("official") or name.endswith("fp32")
                         else precision, "flops": flops[name], "seconds": statistics.median(seconds[name])})
        ratios[f"official/ddkit@{batch}"] = (statistics.median(seconds[f"official@{batch}"])
                                             / statistics.median(seconds[f"dm@{batch}"]))
        if precision != "fp32":
            ratios[f"{precision}-speedup@{batch}"] = (statistics.median(seconds[f"dm@{batch} fp32"])
                                                      / statistics.median(seconds[f"dm@{batch}"]))
    for name, step in (("idm", matching_step(real, "idm", sizes, device, precision)),
                       ("iid", matching_step(real, "iid", sizes, device, precision)),
                       ("ddm", matching_step(real, "ddm", sizes, device, precision)),
                       ("sre2l", recover_step(real, sizes, device, precision))):
        flops = counted_flops(step)
        step()  # warm-up
        rows.append({"step": name, "precision": precision, "flops": flops,
                     "seconds": statistics.median(timed(step, device) for _ in range(iterations))})
    return rows, ratios


def profile_steps(real, sizes: dict, device, precision: str, steps: int = 2, rows: int = 12) -> None:
    """Print torch.profiler's operators by self time over ``steps`` DM steps at the quick batch and
    ``steps`` SRe2L recover iterations (after one warm-up each)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    for name, step in ((f"dm@{sizes['batches'][0]}", matching_step(real, "dm", sizes, device, precision,
                                                                   sizes["batches"][0])),
                       ("sre2l", recover_step(real, sizes, device, precision))):
        step()
        with profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                step()
            synchronize(device)
        print(f"## profile of {steps} {name} steps ({precision})")
        print(prof.key_averages(group_by_input_shape=True).table(sort_by=sort, row_limit=rows,
                                                                 max_name_column_width=32, max_shapes_column_width=60))


# ---- report -----------------------------------------------------------------------------------

def machine_name(device: torch.device) -> str:
    """The CPU model name and core count, or the GPU's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads"


def report(peaks: list[dict], steps: list[dict], ratios: dict, device: torch.device, precision: str) -> dict:
    """Every measurement with its fractions of peak (``conv``, ``gemm`` of the step's precision)."""
    for row in steps:
        row["flops_per_s"] = row["flops"] / row["seconds"]
        row["of_conv_peak"] = row["flops_per_s"] / best_peak(peaks, "conv", row["precision"])
        row["of_gemm_peak"] = row["flops_per_s"] / best_peak(peaks, "gemm", row["precision"])
    return {"machine": machine_name(device), "device": str(device), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "precision": precision,
            "peaks": peaks, "steps": steps, "ratios": ratios}


def print_table(result: dict) -> None:
    """The report as two plain-text tables and the ratios."""
    print(f"# {result['machine']} ({result['device']}), torch {result['torch']}, {result['date']}, "
          f"{result.get('clock', 'wall')} clock")
    print(f"{'peak':<6}{'prec':<6}{'layout':<15}{'shape':<18}{'GFLOP/s':>10}")
    for r in result["peaks"]:
        print(f"{r['kind']:<6}{r['precision']:<6}{r['layout']:<15}{r['shape']:<18}{r['flops_per_s'] / 1e9:>10.1f}")
    print(f"{'step':<16}{'prec':<6}{'GFLOP':>9}{'s/step':>9}{'GFLOP/s':>9}{'conv':>7}{'gemm':>7}")
    for r in result["steps"]:
        print(f"{r['step']:<16}{r['precision']:<6}{r['flops'] / 1e9:>9.2f}{r['seconds']:>9.3f}"
              f"{r['flops_per_s'] / 1e9:>9.1f}{r['of_conv_peak']:>7.2f}{r['of_gemm_peak']:>7.2f}")
    for name, value in result["ratios"].items():
        print(f"{name}: {value:.2f}x")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--iterations", type=int, default=3, help="timed steps per engine (default 3)")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per peak measurement (default 5)")
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="precision of the ddkit steps (default fp32); bf16 also times the fp32 DM step")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall (default) or cpu: process CPU seconds, for a machine shared with other work "
                             "(with --threads 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes on digits: a check that it runs")
    parser.add_argument("--json", default=None, help="also write the report as JSON to this file")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the table, print torch.profiler's top operators of the DM step at the quick "
                             "batch and of the SRe2L recover iteration")
    args = parser.parse_args(argv)
    global clock
    clock = CLOCKS[args.clock]
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    sizes = SIZES["quick" if args.quick else "full"]
    real = load_dataset(sizes["dataset"])
    if args.profile:
        profile_steps(real, sizes, device, args.precision)
        return {}
    peaks = measure_peaks(sizes, device, args.repeat)
    steps, ratios = measure_steps(real, sizes, device, args.iterations, args.precision)
    result = report(peaks, steps, ratios, device, args.precision)
    result["clock"] = args.clock
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
