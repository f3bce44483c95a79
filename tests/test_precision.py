"""ddkit.precision and --precision: fp32 unchanged, bf16 close to fp32, recorded, bad values refused."""

import json

import pytest
import torch
import torch.nn.functional as F

import ddkit
from ddkit import precision
from ddkit.cli import main
from ddkit.errors import DDKitError
from ddkit.methods.dm_family import resolve_preset
from ddkit.methods.matching import MatchingEngine


def test_fp32_is_the_plain_computation():
    amp = precision.current("cpu")
    assert amp.name == "fp32" and not amp.enabled and amp.scaler is None
    x = torch.randn(2, 3)
    assert amp.fp32(x) is x
    model = torch.nn.Linear(3, 2)
    assert amp.wrap(model) is model
    with amp.autocast():
        assert model(x).dtype == torch.float32


def test_bf16_runs_passes_in_bf16_and_hands_back_fp32():
    model = torch.nn.Linear(3, 2)
    with precision.using("bf16", "cpu"):
        amp = precision.current("cpu")
        assert precision.active() == "bf16"
    assert precision.active() == "fp32"  # the block ended
    with amp.autocast():
        assert model(torch.randn(4, 3)).dtype == torch.bfloat16
    out = amp.wrap(model)(torch.randn(4, 3))
    assert out.dtype == torch.float32
    nested = amp.fp32({"a": torch.ones(2, dtype=torch.bfloat16), "b": [torch.ones(1, dtype=torch.bfloat16)],
                       "i": torch.ones(1, dtype=torch.int64)})
    assert nested["a"].dtype == nested["b"][0].dtype == torch.float32 and nested["i"].dtype == torch.int64


@pytest.mark.parametrize("bad", ["fp64", "BF16", "", None, 16])
def test_invalid_precision_is_refused(bad):
    with pytest.raises(DDKitError, match="precision .* is not valid; choose one of: fp32, bf16, fp16"):
        precision.check_precision(bad)


def test_fp16_on_the_cpu_is_refused():
    with pytest.raises(DDKitError, match="fp16 needs a CUDA GPU"):
        with precision.using("fp16", "cpu"):
            pass


def _run_steps(real, name: str, steps: int = 3):
    config = resolve_preset("dm", "digits", 2, "smoke")
    with precision.using(name):
        engine = MatchingEngine(real, 2, config, 0, "cpu", show_progress=False)
    losses = [engine.step(i)["total"] for i in range(steps)]
    return losses, engine.pixels()


def test_dm_engine_in_bf16_stays_close_to_fp32(digits):
    fp32_losses, fp32_pixels = _run_steps(digits, "fp32")
    again_losses, again_pixels = _run_steps(digits, "fp32")
    assert fp32_losses == again_losses and torch.equal(fp32_pixels, again_pixels)
    bf16_losses, bf16_pixels = _run_steps(digits, "bf16")
    assert bf16_losses != fp32_losses  # the passes did run in bf16 ...
    assert bf16_losses == pytest.approx(fp32_losses, rel=0.05)  # ... with an fp32-accurate loss
    # pixels moved by lr 1 steps: bf16's 8-bit mantissa in the features shifts them a little
    assert (bf16_pixels - fp32_pixels).abs().max() < 0.05


def test_recover_in_bf16_stays_close_to_fp32(digits):
    from pathlib import Path

    from ddkit.methods import stats_family
    from ddkit.methods.recover import RecoverEngine
    from ddkit.methods.squeeze import Teacher, build_net, frozen
    from ddkit.utils import apply_overrides

    config = stats_family.resolve_preset("sre2l", "digits", 10, "smoke", real=digits)
    model_config = config["teachers"][0]
    teacher = Teacher(frozen(build_net(model_config, digits, 0, "cpu")).eval(), model_config, {}, 0.0, Path("x"))
    recover = apply_overrides(config["recover"], {"iterations": 3, "batch_size": 20})
    results = {}
    for name in ("fp32", "bf16"):
        with precision.using(name):
            engine = RecoverEngine(digits, 2, recover, [teacher], 0, "cpu", show_progress=False)
        images, _, record = engine.run()
        results[name] = (images, [row["total"] for row in record["loss_log"]])
    assert results["bf16"][1] != results["fp32"][1]
    assert results["bf16"][1] == pytest.approx(results["fp32"][1], rel=0.05)
    # Adam moves every pixel by about lr whatever its gradient's size, so a pixel whose tiny gradient
    # changes sign under bf16 moves the other way; on average the images agree closely
    assert (results["bf16"][0] - results["fp32"][0]).abs().mean() < 0.01


def test_training_loop_in_bf16_keeps_an_fp32_loss():
    from ddkit.models.training import DataParallel

    model = torch.nn.Linear(4, 3)
    with precision.using("bf16"):
        parallel = DataParallel(model)
    logits = parallel.module(torch.randn(5, 4))
    assert logits.dtype == torch.float32
    loss = F.cross_entropy(logits, torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert model.weight.grad.dtype == torch.float32


def test_cached_networks_train_in_fp32_whatever_the_run(digits, isolated_data, monkeypatch):
    from ddkit.methods import squeeze

    seen = []
    monkeypatch.setattr(squeeze, "_train_into_cache", lambda *args: seen.append(precision.active()) or "trained")
    with precision.using("bf16"):
        assert squeeze.train_cached(digits, {"arch": "convnet", "width": 8}, {"epochs": 1, "lr": 0.01, "momentum": 0.9,
                                    "weight_decay": 0.0, "batch_size": 64}, 0, "cpu") == "trained"
    assert seen == ["fp32"]


def test_distill_records_the_precision_in_the_manifest(digits, isolated_data, tmp_path):
    with precision.using("bf16"):
        ds = ddkit.distill("dm", dataset="digits", ipc=1, preset="smoke", seed=0, out=tmp_path / "bf16",
                           show_progress=False)
    assert ds.meta["precision"] == "bf16"
    manifest = json.loads((tmp_path / "bf16" / "manifest.json").read_text())
    assert manifest["meta"]["precision"] == "bf16" if "meta" in manifest else manifest["precision"] == "bf16"
    plain = ddkit.distill("dm", dataset="digits", ipc=1, preset="smoke", seed=0, show_progress=False)
    assert plain.meta["precision"] == "fp32"


def test_cli_refuses_fp16_on_the_cpu_and_unknown_values_in_one_line(tmp_path, capsys, isolated_data):
    code = main(["distill", "dm", "--dataset", "digits", "--ipc", "1", "--preset", "smoke", "--out",
                 str(tmp_path / "a"), "--precision", "fp16", "-q"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0
    assert "fp16 needs a CUDA GPU" in err and "bf16 or fp32" in err
    assert not (tmp_path / "a").exists()
    code = main(["eval", str(tmp_path / "a"), "--precision", "half"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "precision 'half' is not valid; choose one of: fp32, bf16, fp16" in err


def test_cli_eval_in_bf16_is_recorded(tmp_path, capsys, isolated_data):
    assert main(["baseline", "random", "--dataset", "digits", "--ipc", "1", "--out", str(tmp_path / "set")]) == 0
    code = main(["eval", str(tmp_path / "set"), "--preset", "smoke", "--runs", "1", "--precision", "bf16", "-q"])
    assert code == 0, capsys.readouterr().err
    record = ddkit.load(tmp_path / "set").meta["evaluations"][-1]
    assert record["precision"] == "bf16"


def test_relabel_in_bf16_stores_logits_close_to_fp32_and_records_it(tiny_set):
    from ddkit.methods.relabel import relabel
    from ddkit.augment.replay import RECORD_PREFIX

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 3))
    fp32 = relabel(tiny_set, teacher, epochs=2, show_progress=False)
    with precision.using("bf16"):
        bf16 = relabel(tiny_set, teacher, epochs=2, show_progress=False)
    assert fp32.meta["relabel"]["precision"] == "fp32" and bf16.meta["relabel"]["precision"] == "bf16"
    a, b = fp32.extras[RECORD_PREFIX + "logits"].float(), bf16.extras[RECORD_PREFIX + "logits"].float()
    assert not torch.equal(a, b)  # the teacher ran in bf16 ...
    assert torch.allclose(a, b, atol=0.05 * a.abs().max().item())  # ... to within bf16's rounding


def test_a_trained_one_channel_first_convolution_runs_in_fp32_under_bf16_autocast():
    """Its output is the float32 convolution rounded to bf16 (oneDNN's bf16 weight gradient is slow
    for one input channel); the weight gradient is that of float32 up to the bf16 layers after it."""
    from ddkit.models import create

    torch.manual_seed(0)
    net = create("convnet", in_channels=1, num_classes=10, image_size=28, width=16, depth=2)
    x = torch.randn(4, 1, 28, 28)
    first = net.features[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = net.forward_taps(x, ("block0", "logits"))
    assert out["logits"].dtype == torch.bfloat16
    assert net._tap_after[2] == "block0"  # after the ReLU
    with torch.no_grad():
        reference = net.features[2](net.features[1](first(x).to(torch.bfloat16)))
    assert torch.equal(out["block0"].detach(), reference)
    labels = torch.arange(4)
    F.cross_entropy(out["logits"].float(), labels).backward()
    bf16_grad = first.weight.grad.clone()
    net.zero_grad()
    F.cross_entropy(net.forward_taps(x, ("logits",))["logits"], labels).backward()
    # bf16 noise of the layers after it: about 7 % here, as for the second convolution's gradient
    assert float((bf16_grad - first.weight.grad).norm()) < 0.15 * float(first.weight.grad.norm())
    # three input channels, or a frozen weight: autocast's bf16 convolution as before
    frozen = create("convnet", in_channels=1, num_classes=10, image_size=28, width=16, depth=2).requires_grad_(False)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.enable_grad():
        y = frozen.forward_taps(x.requires_grad_(True), ("block0",))["block0"]
        plain = frozen.features[2](frozen.features[1](frozen.features[0](x)))
    assert torch.equal(y, plain)
