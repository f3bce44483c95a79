"""Soft labels that fit: relabel records in shards read lazily, top-k shards, online labelling."""

import json

import pytest
import torch

import ddkit
from ddkit.errors import DDKitError
from ddkit.evaluate import random_subset
from ddkit.evaluate.soft import SoftProtocol, resolve_soft_config
from ddkit.methods.relabel import relabel
from ddkit.methods.shards import SHARD_FOLDER
from ddkit.models import create


def _teacher(seed=0):
    torch.manual_seed(seed)
    return create("convnet", 1, 10, 8, width=8, depth=1).eval()


@pytest.fixture
def subset(digits):
    return random_subset(digits, 2, seed=0)


def _batches(distilled, config):
    source, _ = SoftProtocol(distilled, config).source("cpu")
    return [source.batch(epoch, torch.arange(20)) for epoch in range(source.epochs)]


@pytest.mark.parametrize("topk", [None, 3])
def test_sharded_records_equal_the_unsharded_ones_after_a_save(subset, tmp_path, topk):
    teacher = _teacher()
    whole = relabel(subset, teacher, epochs=5, seed=1, topk=topk, batch_size=7, show_progress=False)
    sharded = relabel(subset, teacher, epochs=5, seed=1, topk=topk, batch_size=7, show_progress=False,
                      shard_epochs=2, shard_dir=tmp_path / "staging")
    assert not any(k.endswith(("logits", "topk_values")) for k in sharded.extras)
    shards = sharded.meta["relabel"]["shards"]
    assert [s["epochs"] for s in shards] == [[0, 2], [2, 4], [4, 5]]
    sharded.save(tmp_path / "sharded")
    whole.save(tmp_path / "whole")
    assert not (tmp_path / "staging").exists() and len(list((tmp_path / "sharded" / SHARD_FOLDER).iterdir())) == 3
    manifest = json.loads((tmp_path / "sharded" / "manifest.json").read_text())
    assert [s["sha256"] for s in manifest["relabel"]["shards"]] == [s["sha256"] for s in shards]
    # per record: N * k fp16 values (and int16 indices for top-k) per epoch, plus safetensors headers
    per_epoch = 20 * (10 if topk is None else 3) * (2 if topk is None else 4)
    assert sum(s["bytes"] for s in shards) - 5 * per_epoch < 3 * 256
    ddkit.load(tmp_path / "sharded").save(tmp_path / "copy")  # a set saved elsewhere takes its shards along
    config = resolve_soft_config("smoke")
    for a, b in zip(_batches(ddkit.load(tmp_path / "whole"), config), _batches(ddkit.load(tmp_path / "copy"), config)):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.values, b.values)
        assert (a.indices is None) == (b.indices is None) and (a.indices is None or torch.equal(a.indices, b.indices))


def test_sharded_and_unsharded_sets_train_the_same_student(subset, digits, tmp_path):
    teacher = _teacher()
    for name, shard in (("whole", 0), ("sharded", 2)):
        relabel(subset, teacher, epochs=4, seed=1, show_progress=False, shard_epochs=shard).save(tmp_path / name)
    results = [ddkit.evaluate(ddkit.load(tmp_path / name), protocol="soft", preset="smoke", runs=1, real=digits,
                              show_progress=False, recipe="ddkit", overrides=["epochs=4"])
               for name in ("whole", "sharded")]
    assert results[0]["convnet"].accuracies == results[1]["convnet"].accuracies


def test_a_changed_or_missing_shard_is_refused_with_one_line(subset, digits, tmp_path):
    relabel(subset, _teacher(), epochs=3, show_progress=False, shard_epochs=1).save(tmp_path / "set")
    shard = sorted((tmp_path / "set" / SHARD_FOLDER).iterdir())[1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    source, _ = SoftProtocol(ddkit.load(tmp_path / "set"), resolve_soft_config("smoke")).source("cpu")
    source.batch(0, torch.arange(4))  # shard 0 is intact
    with pytest.raises(DDKitError, match="differs from the hash") as err:
        source.batch(1, torch.arange(4))
    assert "\n" not in str(err.value)
    shard.unlink()
    with pytest.raises(DDKitError, match="is missing"):
        SoftProtocol(ddkit.load(tmp_path / "set"), resolve_soft_config("smoke")).source("cpu")[0].batch(1, torch.arange(4))


def test_online_mode_labels_each_batch_with_the_teacher(subset, digits):
    """No records at all: the teacher labels every replayed batch while the student trains, and a
    set relabelled with the same teacher and plan gives the same student."""
    teacher = _teacher()
    online = ddkit.evaluate(subset, protocol="soft", preset="smoke", runs=1, real=digits, show_progress=False,
                            recipe="ddkit", overrides=["epochs=3", "online.mix=cutmix"], teachers=[teacher],
                            record=False)
    assert online["convnet"].config["targets"] == "online" and len(online["convnet"].accuracies) == 1
    stored = relabel(subset, teacher, epochs=3, seed=0, show_progress=False)
    recorded = ddkit.evaluate(stored, protocol="soft", preset="smoke", runs=1, real=digits, show_progress=False,
                              recipe="ddkit", overrides=["epochs=3"], record=False)
    assert online["convnet"].accuracies == pytest.approx(recorded["convnet"].accuracies)
