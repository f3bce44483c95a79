"""The contract every registered method and every registered model keeps, checked over the registries
(as timm tests every model of ``list_models()`` and scikit-learn's ``check_estimator`` every estimator):
a new method or model gets these tests by registering, with no edit here.

Methods (digits, smoke preset, 2 images per class): shapes, finite pixels, class-major labels,
the same seed gives the same bits, a run killed and resumed equals one never stopped (methods whose
spec declares checkpoints), the saved set loads back equal, and a loss that turns NaN leaves the
last good state (methods with a loss: the matching and statistics families).
Models: logits and taps of the declared shapes, the same seed builds the same weights, and a state
dict saved as safetensors loads back into a fresh network that computes the same logits.
"""

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import ddkit
from ddkit import distributed
from ddkit.errors import DDKitError
from ddkit.evaluate.protocols import build_model
from ddkit.methods import get_spec, method_names
from ddkit.methods.terms import MATCHING_TERMS, RECOVER_TERMS, matching_term, recover_term
from ddkit.models import available

IPC = 2
SEED = 3
LOSS_FAMILIES = ("matching", "statistics")
#: Options that keep a family cheap here (the statistics family trains its teachers and relabels):
#: smaller than the smoke preset, the same code paths.
SMALLER = {"statistics": {"squeeze.epochs": 1, "squeeze.warmup_epochs": 0, "squeeze.train_subset": 300,
                          "relabel.epochs": 2, "recover.conv_target_images": 50}}


@pytest.fixture(scope="module")
def contract_data(tmp_path_factory):
    """One private $DDKIT_DATA for the module, so each teacher pool is trained once."""
    root = tmp_path_factory.mktemp("contract-data")
    before = os.environ.get("DDKIT_DATA")
    os.environ["DDKIT_DATA"] = str(root)
    yield root
    if before is None:
        os.environ.pop("DDKIT_DATA", None)
    else:
        os.environ["DDKIT_DATA"] = before


@pytest.fixture(scope="module")
def reference_runs(contract_data):
    """name -> the uninterrupted smoke run of that method (made once, on first use)."""
    made = {}

    def get(name):
        if name not in made:
            made[name] = distill(name)
        return made[name]

    return get


def distill(name, overrides=None, **options):
    overrides = {**SMALLER.get(get_spec(name).family, {}), **(overrides or {})}
    return ddkit.distill(name, dataset="digits", ipc=IPC, preset="smoke", seed=SEED, show_progress=False,
                         overrides=overrides or None, **options)


def same_set(a, b) -> bool:
    """Bit-equal images, labels, soft labels and extra tensors (the soft-label records)."""
    soft = (a.soft_labels is None and b.soft_labels is None) or torch.equal(a.soft_labels, b.soft_labels)
    return (torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and soft
            and a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras))


class Stop(Exception):
    """The 'kill' of the kill-then-resume test."""


@pytest.fixture
def stop_at_step_two(monkeypatch):
    """Both engines call ``distributed.maybe_inject_fault(step)`` when a step starts: stop at step 2."""

    def fault(step):
        if step == 2:
            raise Stop

    monkeypatch.setattr(distributed, "maybe_inject_fault", fault)


@pytest.fixture
def nan_from_step_two(monkeypatch):
    """A loss term in each engine that is 0 until step 2 starts and NaN from then on (registered
    here: the registries need no edit), switched on by the returned options."""
    armed = {"on": False}

    def fault(step):
        armed["on"] = armed["on"] or step == 2

    monkeypatch.setattr(distributed, "maybe_inject_fault", fault)

    @matching_term("contract_nan", weight=1.0, taps=("embedding",), summary="test: NaN from step 2")
    def matching_nan(inputs):
        return inputs.syn["embedding"].sum() * (float("nan") if armed["on"] else 0.0)

    @recover_term("contract_nan", weight_option="contract_nan_weight", summary="test: NaN from step 2")
    def recover_nan(inputs):
        return inputs.x.sum() * (float("nan") if armed["on"] else 0.0)

    yield {"matching": {"terms": "contract_nan"}, "statistics": {"overrides": {"recover.contract_nan_weight": 1.0}}}, armed
    MATCHING_TERMS.pop("contract_nan")
    RECOVER_TERMS.pop("contract_nan")


# ---- methods ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", method_names())
def test_method_makes_class_major_sets_of_the_declared_shape(name, reference_runs, digits):
    made = reference_runs(name)
    spec = get_spec(name)
    assert made.images.dtype == torch.float32 and tuple(made.images.shape) == (10 * IPC, 1, 8, 8)
    assert torch.isfinite(made.images).all()  # pixel space; the matching family does not clamp to [0, 1]
    assert made.labels.tolist() == [c for c in range(10) for _ in range(IPC)]
    assert made.method == name and made.class_names == list(digits.class_names)
    if spec.protocol == "soft":  # the soft protocol replays records the method stored
        assert any(key.startswith("relabel.") for key in made.extras)
    if spec.resolve is not None:  # the resolver gives the configuration the run used (before overrides)
        resolved = spec.resolve("digits", IPC, "smoke")
        assert made.meta["config"].keys() == resolved.keys()
        if spec.family not in SMALLER:
            assert made.meta["config"] == resolved


@pytest.mark.parametrize("name", method_names())
def test_method_gives_the_same_bits_for_the_same_seed(name, reference_runs):
    assert same_set(distill(name), reference_runs(name))


@pytest.mark.parametrize("name", method_names())
def test_method_set_survives_a_save_and_load(name, reference_runs, tmp_path):
    made = reference_runs(name)
    made.save(tmp_path / "set")
    loaded = ddkit.load(tmp_path / "set")
    assert same_set(loaded, made)
    assert (loaded.method, loaded.dataset, loaded.meta["config"]) == (made.method, made.dataset, made.meta["config"])


@pytest.mark.parametrize("name", [n for n in method_names() if get_spec(n).checkpoints])
def test_method_killed_and_resumed_equals_a_run_never_stopped(name, reference_runs, stop_at_step_two, monkeypatch,
                                                               tmp_path):
    out = tmp_path / "run"
    with pytest.raises(Stop):
        distill(name, out=out, checkpoint_every=1)
    assert (out / "checkpoint" / "latest.json").is_file() or any((out / "checkpoint").rglob("*.safetensors"))
    monkeypatch.setattr(distributed, "maybe_inject_fault", lambda step: None)
    assert same_set(ddkit.resume(out, show_progress=False), reference_runs(name))


@pytest.mark.parametrize("name", [n for n in method_names() if get_spec(n).family in LOSS_FAMILIES])
def test_method_keeps_the_last_good_state_when_the_loss_turns_nan(name, reference_runs, nan_from_step_two,
                                                                   monkeypatch, tmp_path):
    options, armed = nan_from_step_two
    family = get_spec(name).family
    out = tmp_path / "run"
    with pytest.raises(DDKitError, match="iteration 2"):
        distill(name, out=out, checkpoint_every=1, **options[family])
    if family == "matching":
        # the images before the step that went NaN are saved: those of a run of two iterations
        kept = ddkit.load(out)
        assert kept.meta["status"].startswith("stopped at iteration 2")
        two = distill(name, overrides={"iterations": 2})
        assert torch.equal(kept.images, two.images)
    else:
        # the checkpoint before the NaN step is kept: resumed, the run ends as one never stopped
        armed["on"] = False
        monkeypatch.setattr(distributed, "maybe_inject_fault", lambda step: None)
        assert same_set(ddkit.resume(out, show_progress=False), reference_runs(name))


# ---- models -----------------------------------------------------------------------------------------
def tiny_model(arch, seed=0):
    return build_model(arch, 3, 5, 32, {}, seed, "cpu").eval()


@pytest.mark.parametrize("arch", available())
def test_model_gives_logits_and_every_declared_tap(arch):
    net = tiny_model(arch)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = net(x)
        taps = net.forward_taps(x, net.tap_names)
    assert logits.shape == (2, 5) and torch.isfinite(logits).all()
    assert set(taps) == set(net.tap_names) and {"embedding", "logits"} <= set(taps)
    assert taps["embedding"].dim() == 2 and taps["embedding"].shape[0] == 2
    assert torch.allclose(taps["logits"], logits)


@pytest.mark.parametrize("arch", available())
def test_model_built_twice_from_one_seed_has_the_same_weights(arch):
    a, b, other = tiny_model(arch, 0).state_dict(), tiny_model(arch, 0).state_dict(), tiny_model(arch, 1).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], other[k]) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("arch", available())
def test_model_state_dict_round_trips_through_safetensors(arch, tmp_path):
    net, fresh = tiny_model(arch, 0), tiny_model(arch, 1)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, tmp_path / "model.safetensors")
    fresh.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fresh(x), net(x))
