"""Plug-ins, as docs/extending.md shows them: a matching loss term, a matching method and a standalone
method registered from this file are picked up by the engine, the command line and the bench with
no edit anywhere else in ddkit."""

import json

import pytest
import torch
from torch import nn

import ddkit
from ddkit.bench import read_results, run_bench
from ddkit.cli import main
from ddkit.errors import DDKitError
from ddkit.methods import get_spec, register_method, unregister
from ddkit.methods.dm_family import METHOD_SETTINGS, register_matching_method
from ddkit.methods.terms import MATCHING_TERMS, matching_term
from ddkit.models.base import TapModel
from ddkit.models.registry import _REGISTRY, register as register_model
from ddkit.store import DistilledSet


# ---- a matching loss term ---------------------------------------------------------------------------
@pytest.fixture
def variance_term():
    """Registers ``var``: per-class embedding variance matching (default weight 2); yields what the
    engine handed it at each call."""
    seen = []

    @matching_term("var", weight=2.0, taps=("embedding",), summary="per-class embedding variance matching")
    def variance(inputs):
        real = inputs.grouped(inputs.real["embedding"])
        syn = inputs.grouped(inputs.syn["embedding"])
        seen.append((tuple(real.shape), tuple(syn.shape), list(inputs.class_ids)))
        return (real.var(dim=1, correction=0) - syn.var(dim=1, correction=0)).pow(2).sum(dim=1).mean()

    yield seen
    MATCHING_TERMS.pop("var")


def test_a_registered_term_is_summed_by_the_engine_at_its_default_weight(variance_term, digits):
    plain = ddkit.distill("dm", dataset="digits", ipc=2, preset="smoke", show_progress=False)
    with_var = ddkit.distill("dm", dataset="digits", ipc=2, preset="smoke", show_progress=False, terms="var")
    # one batched forward per iteration: 10 classes, 8 real (smoke batch_real) and 2 synthetic each,
    # 16 features (smoke width 16, pooled to 1x1 on 8x8 digits)
    assert len(variance_term) == 4 and variance_term[0][:2] == ((10, 8, 16), (10, 2, 16))
    assert variance_term[0][2] == list(range(10))
    assert with_var.meta["config"]["weights"]["var"] == 2.0
    for entry in with_var.meta["loss_log"]:
        assert entry["total"] == pytest.approx(entry["mean"] + 2.0 * entry["var"], rel=1e-4, abs=1e-6)
    assert not torch.equal(with_var.images, plain.images)
    # weight 0 switches it off: the run is DM's, bit for bit
    off = ddkit.distill("dm", dataset="digits", ipc=2, preset="smoke", show_progress=False, weights=["var=0"])
    assert torch.equal(off.images, plain.images) and "var" not in off.meta["loss_log"][0]


def test_a_registered_term_is_listed_and_switched_on_by_the_command_line(variance_term, tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "var (2): per-class embedding variance matching" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "set"
    assert main(["distill", "ddm", "--dataset", "digits", "--ipc", "2", "--preset", "smoke", "--terms", "var",
                 "--out", str(out), "--quiet"]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["config"]["weights"]["var"] == 2.0 and "var" in manifest["loss_log"][-1]


# ---- a standalone method ----------------------------------------------------------------------------
def nearest_to_mean(real, ipc):
    """Indices of the ``ipc`` training images of each class closest (L2, pixels) to the class mean."""
    picks = []
    for c in range(real.num_classes):
        index = torch.nonzero(real.train.labels == c).flatten()
        x = real.train.images[index].float().flatten(1)
        picks.append(index[(x - x.mean(0)).pow(2).sum(1).argsort()[:ipc]])
    return torch.cat(picks)


@pytest.fixture
def nearest_mean_method():
    @register_method("nearest-mean", family="standalone", protocol="hard")
    def distill_nearest_mean(real, ipc, preset="quick", overrides=None, seed=0, device="cpu", show_progress=True):
        """The real images nearest to their class mean (a herding-like selection)."""
        index = nearest_to_mean(real, ipc)
        return DistilledSet(images=real.train.images[index].float() / 255, labels=real.train.labels[index],
                            class_names=list(real.class_names), dataset=real.name, mean=real.mean, std=real.std,
                            method="nearest-mean", meta={"config": {"rule": "nearest to the class mean"}})

    yield
    unregister("nearest-mean")


def test_a_registered_method_runs_through_the_command_line_and_the_bench(nearest_mean_method, digits, isolated_data,
                                                                         tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["distill", "--help"])
    assert "standalone: nearest-mean" in " ".join(capsys.readouterr().out.split())
    out = tmp_path / "set"
    assert main(["distill", "nearest-mean", "--dataset", "digits", "--ipc", "2", "--out", str(out), "--quiet"]) == 0
    made = ddkit.load(out)
    index = nearest_to_mean(digits, 2)
    assert torch.equal(made.images, digits.train.images[index].float() / 255)
    assert made.labels.tolist() == [c for c in range(10) for _ in range(2)]
    # its spec declares no checkpoints: a resume is refused with one line naming the method
    with pytest.raises(DDKitError, match="nearest-mean does not checkpoint"):
        ddkit.distill("nearest-mean", dataset="digits", ipc=2, out=tmp_path / "again", resume=True)


# ---- both in the bench ------------------------------------------------------------------------------
def test_registered_methods_and_terms_run_through_the_bench(variance_term, nearest_mean_method, isolated_data,
                                                            tmp_path):
    register_matching_method("dm-var", {"weights": {"var": 2.0}})
    try:
        assert get_spec("dm-var").protocol == "hard"
        bench = tmp_path / "bench"
        lines = run_bench("smoke", ["digits"], ["dm-var", "nearest-mean"], [1], runs=1, out=bench,
                          show_progress=False)
        assert [(line["method"], line["protocol"]) for line in lines] == \
            [("random", "hard"), ("dm-var", "hard"), ("nearest-mean", "hard")]
        assert all("error" not in line and 0 <= line["mean"] <= 100 for line in lines)
        manifest = json.loads((bench / "sets" / "digits-dm-var-ipc1" / "manifest.json").read_text())
        assert manifest["config"]["weights"]["var"] == 2.0 and "var" in manifest["loss_log"][0]
        assert "dm-var" in (bench / "table.md").read_text()
        # the bench compares each stored preset with the registry's: unchanged, so every cell stands
        again = run_bench("smoke", ["digits"], ["dm-var", "nearest-mean"], [1], runs=1, out=bench,
                          show_progress=False)
        assert [line["date"] for line in again] == [line["date"] for line in lines]
        assert len(read_results(bench)) == 3
    finally:
        unregister("dm-var")
        METHOD_SETTINGS.pop("dm-var")


# ---- a model ----------------------------------------------------------------------------------------
class TinyNet(TapModel):
    def __init__(self, in_channels, num_classes, image_size, width=16):
        super().__init__(in_channels, num_classes, image_size, arch="tinynet")
        self.conv = nn.Conv2d(in_channels, width, 3, padding=1)
        self.embedding_dim = width
        self.classifier = nn.Linear(width, num_classes)
        self._tap_names = ("features", "embedding", "logits")

    def _stream(self, x):
        h = torch.relu(self.conv(x))
        yield "features", h
        h = h.mean(dim=(2, 3))
        yield "embedding", h
        yield "logits", self.classifier(h)


@pytest.fixture
def tinynet():
    @register_model("tinynet")
    def build_tinynet(in_channels, num_classes, image_size, width=16):
        """TinyNet factory. Options: width (16)."""
        return TinyNet(in_channels, num_classes, image_size, width)

    yield "tinynet"
    del _REGISTRY["tinynet"]


def test_a_registered_model_keeps_the_contract_and_evaluates_sets(tinynet, digits, tmp_path):
    import test_contract
    from ddkit.evaluate import random_subset

    test_contract.test_model_gives_logits_and_every_declared_tap(tinynet)
    test_contract.test_model_built_twice_from_one_seed_has_the_same_weights(tinynet)
    test_contract.test_model_state_dict_round_trips_through_safetensors(tinynet, tmp_path)
    result = ddkit.evaluate(random_subset(digits, 1, seed=0), protocol="hard", preset="smoke", runs=1, archs=[tinynet],
                            overrides={"epochs": 2}, show_progress=False)[tinynet]
    assert len(result.accuracies) == 1 and 0 <= result.mean <= 100
