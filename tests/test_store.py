"""The distilled-set format: round trip, atomic writes, refusal of damaged sets, export, grid."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import ddkit
from ddkit.augment.partition import decode_images, partition_expand
from ddkit.errors import DDKitError
from ddkit.store import DistilledSet, export_imagefolder, load


def test_round_trip_keeps_tensors_and_manifest(tmp_path, tiny_set):
    tiny_set.soft_labels = torch.randn(6, 3)
    out = tiny_set.save(tmp_path / "set")
    loaded = load(out)
    assert torch.equal(loaded.images, tiny_set.images)
    assert torch.equal(loaded.labels, tiny_set.labels)
    assert torch.equal(loaded.soft_labels, tiny_set.soft_labels)
    assert loaded.class_names == ["a", "b", "c"] and loaded.dataset == "digits"
    assert loaded.mean == (0.5,) and loaded.std == (0.25,)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["ipc"] == 2 and manifest["image_shape"] == [1, 8, 8]
    assert manifest["config"] == {"x": 1}
    assert manifest["versions"]["torch"] == torch.__version__
    assert len(manifest["sha256"]["data.safetensors"]) == 64
    assert (out / "grid.png").is_file()


@pytest.mark.parametrize("umask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_a_saved_set_has_the_permissions_the_umask_gives(tmp_path, tiny_set, umask, dir_mode, file_mode):
    import os
    import stat

    previous = os.umask(umask)
    try:
        out = tiny_set.save(tmp_path / "set")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode  # not mkdtemp's 0700 whatever the umask
    for name in ("data.safetensors", "manifest.json", "grid.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == file_mode, name


def test_replacing_a_set_through_a_path_with_dotdot_keeps_it_in_place(tmp_path, tiny_set):
    tiny_set.save(tmp_path / "set")
    tiny_set.images = 1.0 - tiny_set.images
    tiny_set.save(tmp_path / "set" / ".." / "set")  # its parent "set/.." vanishes while the old set is moved
    assert torch.equal(load(tmp_path / "set").images, tiny_set.images)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no staging or retired directory left


@pytest.mark.parametrize("labels, message", [
    (torch.tensor([0.0, 0.5, 1.0, 1.0, 2.0, 2.0]), "integer tensor"),  # would be truncated to 0 silently
    (torch.tensor([0, 0, 1, 1, 2, 3]), "labels run from 0 to 3, but there are 3 class names"),
    (torch.tensor([-1, 0, 1, 1, 2, 2]), "give labels 0 to 2"),
])
def test_labels_that_are_not_class_indices_are_refused(tiny_set, labels, message):
    with pytest.raises(DDKitError, match=message):
        DistilledSet(images=tiny_set.images, labels=labels, class_names=["a", "b", "c"], dataset="digits",
                     mean=(0.5,), std=(0.25,))


def test_uint8_images_load_as_pixel_floats(tmp_path, tiny_set):
    tiny_set.images = (tiny_set.images * 255).round().to(torch.uint8)
    out = tiny_set.save(tmp_path / "set")
    assert load(out).images.dtype == torch.float32
    assert float(load(out).images.max()) == pytest.approx(1.0)


def test_edited_tensor_file_is_refused(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    data = bytearray((out / "data.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (out / "data.safetensors").write_bytes(bytes(data))
    with pytest.raises(DDKitError, match="sha256"):
        load(out)


@pytest.mark.parametrize("edit, match", [
    (lambda m: m.update(format_version=99), "format version 99"),
    (lambda m: m.update(format="other"), "not a ddkit manifest"),
    (lambda m: m.pop("class_names"), "was edited"),
    # a version-1 manifest has no seal: the missing field itself is named
    (lambda m: (m.pop("class_names"), m.update(format_version=1), m["sha256"].pop("manifest.json")), "lacks the field"),
])
def test_bad_manifest_is_refused(tmp_path, tiny_set, edit, match):
    out = tiny_set.save(tmp_path / "set")
    manifest = json.loads((out / "manifest.json").read_text())
    edit(manifest)
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DDKitError, match=match):
        load(out)


def test_missing_and_garbage_sets_are_refused(tmp_path, tiny_set):
    with pytest.raises(DDKitError, match="not a directory"):
        load(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DDKitError, match="not a distilled set"):
        load(tmp_path / "empty")
    out = tiny_set.save(tmp_path / "set")
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(DDKitError, match="not valid JSON"):
        load(out)


def test_resave_is_atomic_and_keeps_foreign_files(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    (out / "notes.txt").write_text("mine")
    tiny_set.images = tiny_set.images * 0.5
    tiny_set.save(out)
    assert (out / "notes.txt").read_text() == "mine"
    assert torch.allclose(load(out).images, tiny_set.images)
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "set"]
    assert leftovers == []


@pytest.mark.parametrize("failing_step", ["park the old set", "move the new set in"])
def test_a_resave_that_fails_mid_swap_restores_the_old_set_and_the_users_files(
        tmp_path, tiny_set, monkeypatch, failing_step):
    out = tiny_set.save(tmp_path / "set")
    (out / "notes.txt").write_text("mine")
    old_images = load(out).images.clone()
    real_replace = os.replace

    def replace(src, dst):
        src, dst = os.fspath(src), os.fspath(dst)
        parking = failing_step == "park the old set" and dst.endswith("/set") and ".old-" in dst
        moving_in = failing_step == "move the new set in" and dst == str(out.resolve()) and ".tmp-" in src
        if parking or moving_in:
            raise OSError(28, "No space left on device")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    tiny_set.images = tiny_set.images * 0.5
    with pytest.raises(OSError, match="No space"):
        tiny_set.save(out)
    monkeypatch.undo()
    assert (out / "notes.txt").read_text() == "mine"
    assert torch.equal(load(out).images, old_images)
    assert [p.name for p in tmp_path.iterdir()] == ["set"]


def test_loading_a_set_whose_save_was_killed_mid_swap_says_where_the_old_copy_is(tmp_path, tiny_set):
    # What a SIGKILL between the two renames of save() leaves: no "set", its old copy parked.
    parked = tmp_path / ".set.old-x1y2" / "set"
    tiny_set.save(parked)
    with pytest.raises(DDKitError) as e:
        load(tmp_path / "set")
    message = str(e.value)
    assert "interrupted" in message and str(parked) in message
    with pytest.raises(DDKitError, match="not a directory"):
        load(tmp_path / "other")


def test_save_refuses_a_foreign_directory(tmp_path, tiny_set):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "thesis.tex").write_text("x")
    with pytest.raises(DDKitError, match="not a distilled set"):
        tiny_set.save(tmp_path / "busy")
    assert (tmp_path / "busy" / "thesis.tex").read_text() == "x"


def test_record_evaluation_rewrites_manifest_only(tmp_path, tiny_set):
    out = tiny_set.save(tmp_path / "set")
    before = (out / "data.safetensors").read_bytes()
    tiny_set.record_evaluation({"protocol": "hard", "mean": 50.0})
    assert load(out).meta["evaluations"][-1]["mean"] == 50.0
    assert (out / "data.safetensors").read_bytes() == before


def test_partition_expand_cells_and_labels():
    image = torch.zeros(1, 1, 4, 4)
    image[0, 0, :2, 2:] = 1.0  # top-right cell is white
    expanded = partition_expand(image, 2)
    assert expanded.shape == (4, 1, 4, 4)
    assert torch.allclose(expanded[1], torch.ones(1, 4, 4))  # row-major: cell 1 is top-right
    assert torch.allclose(expanded[[0, 2, 3]], torch.zeros(3, 1, 4, 4))
    images, labels = decode_images(torch.rand(3, 1, 4, 4), torch.tensor([0, 1, 2]), {"kind": "partition", "factor": 2})
    assert images.shape[0] == 12 and labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    with pytest.raises(DDKitError, match="does not divide"):
        partition_expand(torch.rand(1, 1, 5, 5), 2)


def test_partition_set_decodes_for_training(tmp_path, tiny_set):
    tiny_set.decode = {"kind": "partition", "factor": 2}
    loaded = load(tiny_set.save(tmp_path / "set"))
    images, labels = loaded.decoded()
    assert images.shape == (24, 1, 8, 8) and loaded.decode_factor == 4
    assert len(loaded.as_dataset()) == 24


def test_export_imagefolder_round_trips_pixels(tmp_path, tiny_set):
    out = export_imagefolder(tiny_set.images, tiny_set.labels, tiny_set.class_names, tmp_path / "png")
    folders = sorted(p.name for p in out.iterdir())
    assert folders == ["0_a", "1_b", "2_c"]
    first = Image.open(out / "0_a" / "0.png")
    assert first.size == (8, 8)
    expected = (tiny_set.images[0, 0] * 255 + 0.5).to(torch.uint8)
    assert torch.equal(torch.tensor(np.array(first)), expected)
    with pytest.raises(DDKitError, match="not empty"):
        export_imagefolder(tiny_set.images, tiny_set.labels, tiny_set.class_names, out)


def test_grid_has_one_row_per_class(tmp_path, tiny_set):
    path = tiny_set.save(tmp_path / "set") / "grid.png"
    grid = Image.open(path)
    # 8 px images are upscaled x4 to 32 px cells with a 2 px gap: 3 rows.
    assert grid.size[1] == 3 * (32 + 2)


def test_as_dataset_and_api_names(tiny_set):
    dataset = tiny_set.as_dataset()
    image, label = dataset[3]
    assert image.shape == (1, 8, 8) and int(label) == 1
    assert ddkit.load is load and ddkit.DistilledSet is DistilledSet


def test_bad_construction_is_refused():
    with pytest.raises(DDKitError, match="one label per image"):
        DistilledSet(images=torch.rand(3, 1, 4, 4), labels=torch.tensor([0, 1]), class_names=["a", "b"],
                     dataset="digits", mean=(0.5,), std=(0.5,))


def test_extra_tensors_round_trip_and_count_as_soft_label_bytes(tmp_path, tiny_set):
    tiny_set.extras = {"relabel.logits": torch.randn(4, 6, 3).half(),
                       "relabel.crop": torch.zeros(4, 6, 4, dtype=torch.int16)}
    assert tiny_set.has_soft_labels
    loaded = load(tiny_set.save(tmp_path / "set"))
    assert set(loaded.extras) == {"relabel.logits", "relabel.crop"}
    assert torch.equal(loaded.extras["relabel.logits"], tiny_set.extras["relabel.logits"])
    assert loaded.extras["relabel.crop"].dtype == torch.int16
    assert json.loads((tmp_path / "set" / "manifest.json").read_text())["has_soft_labels"] is True
    sizes = loaded.stored_bytes()
    assert sizes["soft_labels"] == 4 * 6 * 3 * 2 + 4 * 6 * 4 * 2
    assert sizes["images"] == 6 * 1 * 8 * 8 * 4 and sizes["other"] == 0


def test_reserved_extra_names_are_refused(tiny_set):
    with pytest.raises(DDKitError, match="reserved"):
        DistilledSet(tiny_set.images, tiny_set.labels, tiny_set.class_names, "digits", (0.5,), (0.25,),
                     extras={"images": torch.zeros(1)})
