"""Reliability of the set format: nothing non-finite or empty is scored, the manifest's meaningful
fields sit under the hash, evaluations append without breaking it, older sets still load."""

import json

import pytest
import torch
from safetensors.torch import save_file

import ddkit
from ddkit.cli import main
from ddkit.errors import DDKitError
from ddkit.store import DistilledSet, load
from ddkit.store import distilled as store
from ddkit.utils import sha256_of


def forge(out, tensors=None, **fields):
    """Rewrite a saved set's data file and manifest fields as a careful forger would: the data
    hash (and the manifest's seal, where the format has one) recomputed, so that only ddkit's own
    content checks can catch what was changed."""
    if tensors is not None:
        save_file(tensors, str(out / "data.safetensors"), metadata={"format": "ddkit-distilled-set"})
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(fields)
    manifest["sha256"]["data.safetensors"] = sha256_of(out / "data.safetensors")
    seal = getattr(store, "seal_manifest", None)
    if seal is not None:
        manifest = seal(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))


def one_line(capsys, words):
    code = main([str(w) for w in words])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ddkit: error:") and "Traceback" not in err, err
    return code, lines[0]


# ---- 1. non-finite, empty and mislabelled sets are refused ---------------------------------------
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_set_with_non_finite_pixels_is_refused_by_load(tmp_path, tiny_set, value):
    out = tiny_set.save(tmp_path / "set")
    images = tiny_set.images.clone()
    images[3, 0, 2, 2] = value
    forge(out, {"images": images, "labels": tiny_set.labels})
    with pytest.raises(DDKitError, match="NaN or infinite") as caught:
        load(out)
    assert "\n" not in str(caught.value) and str(out) in str(caught.value)


def test_a_set_with_no_images_is_refused_by_load(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    forge(out, {"images": torch.zeros(0, 1, 8, 8), "labels": torch.zeros(0, dtype=torch.int64)}, num_images=0, ipc=0)
    with pytest.raises(DDKitError, match="no images"):
        load(out)


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0.0, 0, 1, 1, 2, 2]), "labels"),  # float labels
    (torch.tensor([0, 0, 1, 1, 2, 7]), "labels run from 0 to 7"),
    (torch.tensor([True, False, True, False, True, False]), "labels"),
])
def test_labels_of_the_wrong_kind_are_refused_by_load(tmp_path, tiny_set, labels, match):
    out = tiny_set.save(tmp_path / "set")
    forge(out, {"images": tiny_set.images, "labels": labels})
    with pytest.raises(DDKitError, match=match) as caught:
        load(out)
    assert str(out) in str(caught.value)


def test_non_finite_soft_labels_are_refused_by_load(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    soft = torch.zeros(6, 3)
    soft[0, 0] = float("nan")
    forge(out, {"images": tiny_set.images, "labels": tiny_set.labels, "soft_labels": soft}, has_soft_labels=True)
    with pytest.raises(DDKitError, match="NaN or infinite"):
        load(out)


def test_evaluation_never_scores_a_non_finite_or_empty_set(tiny_set, digits):
    bad = DistilledSet(images=torch.full((10, 1, 8, 8), float("nan")), labels=torch.arange(10),
                       class_names=list(digits.class_names), dataset="digits", mean=digits.mean, std=digits.std)
    with pytest.raises(DDKitError, match="NaN or infinite"):
        ddkit.evaluate(bad, preset="smoke", runs=1, overrides={"epochs": 1}, show_progress=False, real=digits)
    empty = DistilledSet(images=torch.zeros(0, 1, 8, 8), labels=torch.zeros(0, dtype=torch.int64),
                         class_names=list(digits.class_names), dataset="digits", mean=digits.mean, std=digits.std)
    with pytest.raises(DDKitError, match="no images"):
        ddkit.evaluate(empty, preset="smoke", runs=1, overrides={"epochs": 1}, show_progress=False, real=digits)


def test_ddkit_eval_of_a_nan_set_is_one_line_and_stores_nothing(tmp_path, capsys):
    out = tmp_path / "random"
    assert main(["baseline", "random", "--dataset", "digits", "--ipc", "1", "--out", str(out)]) == 0
    distilled = load(out)
    images = distilled.images.clone()
    images[0] = float("nan")
    forge(out, {"images": images, "labels": distilled.labels})
    code, line = one_line(capsys, ["eval", out, "--preset", "smoke", "--runs", "1", "--set", "epochs=1", "--quiet"])
    assert code == 2 and "NaN or infinite" in line
    assert json.loads((out / "manifest.json").read_text())["evaluations"] == []


def test_save_refuses_a_non_finite_set_so_none_is_ever_written(tmp_path, tiny_set):
    tiny_set.images[0, 0, 0, 0] = float("nan")
    with pytest.raises(DDKitError, match="NaN or infinite"):
        tiny_set.save(tmp_path / "set")
    assert not (tmp_path / "set").exists()


# ---- 2. the manifest under the hash ------------------------------------------------------------
EDITS = {
    "normalization.std": lambda m: m["normalization"].update(std=[0.0]),
    "normalization.mean": lambda m: m["normalization"].update(mean=[0.1]),
    "decode": lambda m: m.update(decode={"kind": "partition", "factor": 2}),
    "ipc": lambda m: m.update(ipc=50),
    "num_classes": lambda m: m.update(num_classes=4),
    "class_names": lambda m: m.update(class_names=["a", "b", "z"]),
    "image_shape": lambda m: m.update(image_shape=[3, 8, 8]),
    "method": lambda m: m.update(method="dm"),
    "dataset": lambda m: m.update(dataset="mnist"),
    "config": lambda m: m["config"].update(x=2),
    "seeds": lambda m: m.update(seeds={"run": 7}),
    "dataset_options": lambda m: m.update(dataset_options={"image_size": 16}),
    "data hash": lambda m: m["sha256"].update({"data.safetensors": "0" * 64}),
}


@pytest.mark.parametrize("field", list(EDITS))
def test_an_edited_manifest_field_is_refused_with_one_line(tmp_path, tiny_set, field):
    out = tiny_set.save(tmp_path / "set")
    manifest = json.loads((out / "manifest.json").read_text())
    EDITS[field](manifest)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(DDKitError) as caught:
        load(out)
    message = str(caught.value)
    assert "\n" not in message and str(out) in message
    assert "edited" in message or "sha256" in message


def test_the_same_fields_reformatted_still_load(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    manifest = json.loads((out / "manifest.json").read_text())
    # another JSON writer: other key order and layout, same values
    (out / "manifest.json").write_text(json.dumps(dict(reversed(list(manifest.items()))), indent=None))
    assert load(out).std == (0.25,)


def test_evaluation_records_append_without_breaking_the_seal(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    tiny_set.record_evaluation({"protocol": "hard", "arch": "convnet", "mean": 50.0})
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["evaluations"].append({"protocol": "hard", "arch": "mlp", "mean": 40.0})  # another tool's record
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert [e["mean"] for e in load(out).meta["evaluations"]] == [50.0, 40.0]


def test_an_evaluation_does_not_rehash_a_data_file_it_did_not_write(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    loaded = load(out)
    other = DistilledSet(images=1.0 - tiny_set.images, labels=tiny_set.labels, class_names=["a", "b", "c"],
                         dataset="digits", mean=(0.5,), std=(0.25,)).save(tmp_path / "other")
    # the data file changes under a running evaluation
    (out / "data.safetensors").write_bytes((other / "data.safetensors").read_bytes())
    try:
        loaded.record_evaluation({"protocol": "hard", "mean": 50.0})
    except DDKitError:
        pass  # refusing to record is fine too
    with pytest.raises(DDKitError, match="sha256"):
        load(out)  # the changed file did not become valid


def test_an_evaluation_checks_the_hash_it_loaded_without_reading_the_data_again(tmp_path, tiny_set, monkeypatch):
    out = tiny_set.save(tmp_path / "set")
    loaded = load(out)

    def no_rehash(path):
        raise AssertionError(f"re-hashed {path}")

    monkeypatch.setattr(store, "sha256_of", no_rehash)
    loaded.record_evaluation({"protocol": "hard", "mean": 50.0})
    monkeypatch.undo()
    assert load(out).meta["evaluations"][-1]["mean"] == 50.0


def test_the_manifest_records_a_seal_and_the_current_format_version(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == store.FORMAT_VERSION == 2
    assert len(manifest["sha256"]["manifest.json"]) == 64


# ---- 2b. sets of the previous format version ------------------------------------------------------
def as_version_1(out):
    """Rewrite a saved set's manifest as ddkit wrote it in format version 1 (no seal)."""
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = 1
    manifest["sha256"] = {"data.safetensors": manifest["sha256"]["data.safetensors"]}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_a_version_1_set_still_loads_and_is_sealed_on_its_next_write(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    as_version_1(out)
    loaded = load(out)
    assert torch.equal(loaded.images, tiny_set.images) and loaded.std == (0.25,)
    loaded.record_evaluation({"protocol": "hard", "mean": 50.0})
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and len(manifest["sha256"]["manifest.json"]) == 64
    assert load(out).meta["evaluations"][-1]["mean"] == 50.0


@pytest.mark.parametrize("field, value", [("ipc", 9), ("num_classes", 4), ("num_images", 60),
                                          ("image_shape", [1, 4, 4]), ("has_soft_labels", True)])
def test_a_version_1_set_whose_fields_contradict_its_data_is_refused(tmp_path, tiny_set, field, value):
    out = tiny_set.save(tmp_path / "set")
    as_version_1(out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest[field] = value
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDKitError, match=field):
        load(out)
