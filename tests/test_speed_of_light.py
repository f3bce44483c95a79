"""benchmarks/speed_of_light.py: FLOP accounting against hand counts, and a tiny run's report."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def sol():
    """benchmarks/speed_of_light.py, imported from its path (benchmarks/ is not a package)."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed_of_light.py"
    spec = importlib.util.spec_from_file_location("speed_of_light", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_counted_flops_of_a_convolution_and_its_input_gradient(sol):
    x = torch.randn(3, 4, 6, 6, requires_grad=True)
    w = torch.randn(5, 4, 3, 3)
    forward = 2 * 3 * 4 * 5 * 9 * 6 * 6  # 2 per multiply-add, 'same' padding
    assert sol.counted_flops(lambda: F.conv2d(x, w, padding=1)) == forward
    # backward to the input only (frozen weights, as the engines run): one more convolution's worth
    assert sol.counted_flops(lambda: F.conv2d(x, w, padding=1).sum().backward()) == 2 * forward
    assert sol.counted_flops(lambda: torch.mm(torch.ones(7, 8), torch.ones(8, 9))) == 2 * 7 * 8 * 9


def test_best_peak_picks_the_fastest_row_of_its_kind_and_precision(sol):
    rows = [{"kind": "conv", "precision": "fp32", "flops_per_s": 3.0},
            {"kind": "conv", "precision": "fp32", "flops_per_s": 5.0},
            {"kind": "conv", "precision": "bf16", "flops_per_s": 9.0},
            {"kind": "gemm", "precision": "fp32", "flops_per_s": 7.0}]
    assert sol.best_peak(rows, "conv", "fp32") == 5.0
    assert sol.best_peak(rows, "gemm", "fp32") == 7.0


def test_quick_run_reports_every_step_as_a_sane_fraction_of_peak(sol, tmp_path, capsys):
    result = sol.main(["--quick", "--iterations", "1", "--repeat", "2", "--json", str(tmp_path / "r.json")])
    names = [row["step"] for row in result["steps"]]
    assert names == ["dm@8", "official@8", "dm@16", "official@16", "idm", "iid", "ddm", "sre2l"]
    kinds = {(r["kind"], r["precision"], r["layout"]) for r in result["peaks"]}
    assert ("conv", "bf16", "channels_last") in kinds and ("gemm", "fp32", "-") in kinds
    for row in result["steps"]:
        assert row["flops"] > 0 and row["seconds"] > 0
        assert 0 < row["of_conv_peak"] < 1.5, row
    # ddkit's engine and the per-class loop run the same convolutions: equal FLOPs up to the DSA's
    # small affine-grid products
    by_name = {row["step"]: row for row in result["steps"]}
    assert by_name["dm@8"]["flops"] == pytest.approx(by_name["official@8"]["flops"], rel=0.02)
    assert by_name["dm@16"]["flops"] > by_name["dm@8"]["flops"]
    assert all(math.isfinite(v) and v > 0 for v in result["ratios"].values())
    assert set(result["ratios"]) == {"official/ddkit@8", "official/ddkit@16"}
    printed = capsys.readouterr().out
    assert "official/ddkit@16:" in printed and "sre2l" in printed
    assert (tmp_path / "r.json").read_text().startswith("{")


def test_first_block_benchmark_times_both_paths_of_every_case(sol, capsys):
    """benchmarks/first_block_speed.py --quick: each case timed layer by layer and in one pass."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "first_block_speed.py"
    spec = importlib.util.spec_from_file_location("first_block_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--iterations", "1"])
    assert len(result) == 4 and any(case.startswith("DM step, 16 real images") for case in result)
    for times in result.values():
        assert times["layer by layer"] > 0 and times["one pass"] > 0 and times["speed-up"] > 0
    assert "one pass" in capsys.readouterr().out
    stages = module.main(["--quick", "--iterations", "1", "--layers"])
    assert list(stages)[0].startswith("first block (") and len(stages) == 9 and min(stages.values()) >= 0
    with_gradients = module.main(["--quick", "--iterations", "1", "--gradients"])
    assert len(with_gradients) == 5 and any(case.startswith("IDM step") for case in with_gradients)
    assert all(times["layer by layer"] > 0 and times["one pass"] > 0 for times in with_gradients.values())
    by_size = module.main(["--quick", "--iterations", "1", "--sizes"])
    assert len(by_size) == 5 and all(times["one pass"] > 0 for times in by_size.values())


def test_layer_by_layer_for_gradients_only_keeps_the_forwards_without_gradients_fused(sol):
    from ddkit.models import fused
    from ddkit.models.base import AvgPool2x2

    block = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.GroupNorm(8, 8), torch.nn.ReLU(),
                                AvgPool2x2())
    x = torch.randn(2, 1, 8, 8)
    with sol.layer_by_layer(gradients_only=True):
        assert not fused.fusable_first_block(block, x)
        with torch.no_grad():
            assert fused.fusable_first_block(block, x)
    with sol.layer_by_layer(), torch.no_grad():
        assert not fused.fusable_first_block(block, x)
    assert fused.fusable_first_block(block, x)


def test_statistics_benchmark_times_both_paths_of_every_case():
    """benchmarks/bn_statistics_speed.py --quick: BatchNorm and patch statistics, SRe2L and G-VBSM
    recover iterations, each timed with torch.var_mean and with the row reductions."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bn_statistics_speed.py"
    spec = importlib.util.spec_from_file_location("bn_statistics_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--iterations", "1"])
    assert len(result) == 4 and "G-VBSM recover iteration (quick), both statistics" in result
    for times in result.values():
        assert times["torch.var_mean"] > 0 and times["row reduction"] > 0


def test_kernel_benchmark_swaps_in_the_previous_kernels_and_restores_them(capsys):
    """benchmarks/kernel_speed.py: its ``before`` kernels compute what the current ones do, they are
    back in place afterwards, and a quick run times every case both ways."""
    from ddkit.models import base, fused

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_speed.py"
    spec = importlib.util.spec_from_file_location("kernel_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    current = (base.channels_last_instance_norm, base._HalvingAverage.backward, fused.conv_instance_norm_relu_pool,
               base.run_layer)
    norm = torch.nn.GroupNorm(128, 128)
    maps = torch.randn(3, 128, 16, 16).contiguous(memory_format=torch.channels_last)
    grad = torch.randn(2, 4, 3, 5)
    with torch.no_grad():
        now = base.run_norm(norm, maps), base._HalvingAverage.backward(None, grad)
        with module.previous_kernels():
            assert base.run_layer is base.run_norm
            before = base.run_norm(norm, maps), base._HalvingAverage.backward(None, grad)
    assert (base.channels_last_instance_norm, base._HalvingAverage.backward, fused.conv_instance_norm_relu_pool,
            base.run_layer) == current
    torch.testing.assert_close(now[0], before[0], atol=2e-6, rtol=1e-5)
    assert torch.equal(now[1], before[1])
    result = module.main(["--quick", "--iterations", "1"])
    assert len(result) == 12 and "DM step, 8 real images per class, bf16" in result
    assert all(times["before"] > 0 and times["after"] > 0 for times in result.values())
    assert "first conv" in capsys.readouterr().out


def test_step_breakdown_accounts_for_the_whole_step():
    """benchmarks/step_breakdown.py --quick: the parts (and the rest) add up to the mean step, the
    real side is timed, IDM's queue training is, and the engine is unwrapped afterwards."""
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "step_breakdown.py"
    spec = importlib.util.spec_from_file_location("step_breakdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    result = module.main(["--quick", "--iterations", "2", "--methods", "dm,idm"])
    assert set(result) == {"dm", "idm"}
    for method, row in result.items():
        parts = row["parts"]
        assert list(parts)[-1] == "rest" and parts["real side"] > 0 and parts["backward"] > 0, method
        assert all(value >= 0 for name, value in parts.items() if name != "rest"), method
    assert result["idm"]["parts"]["queue training"] > 0
    assert result["dm"]["parts"]["queue training"] < 1e-3  # DM: nothing to train
    import ddkit.methods.matching as matching
    assert not hasattr(matching.siamese_per_class, "__wrapped__") and matching.siamese_per_class.__name__ == "siamese_per_class"


def test_benchmark_threads_switch_to_the_wall_clock(sol):
    """--threads 1 (the default) times process CPU seconds on one thread; more threads, the wall clock."""
    import time

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bn_statistics_speed.py"
    spec = importlib.util.spec_from_file_location("bn_statistics_speed", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    threads = torch.get_num_threads()
    try:
        module.benchmark_arguments("doc", 3, ["--threads", "2"])
        assert torch.get_num_threads() == 2 and module.CLOCK["clock"] is time.perf_counter
        module.benchmark_arguments("doc", 3, [])
        assert torch.get_num_threads() == 1 and module.CLOCK["clock"] is time.process_time
        with pytest.raises(SystemExit):
            module.benchmark_arguments("doc", 3, ["--threads", "0"])
    finally:
        torch.set_num_threads(threads)
