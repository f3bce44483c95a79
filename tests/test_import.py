"""`ddkit import`: sets made by other tools read safely, checked, converted to pixel space."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import ddkit
from ddkit.cli import main
from ddkit.errors import DDKitError
from ddkit.store import export_imagefolder
from ddkit.store.importer import to_pixel_space


@pytest.fixture(scope="module")
def real_subset(digits):
    """Three real digits images per class: pixels float [30, 1, 8, 8] in [0, 1], labels int64 [30]."""
    index = torch.cat([torch.nonzero(digits.train.labels == c).flatten()[:3] for c in range(10)])
    return digits.train.images[index].float() / 255.0, digits.train.labels[index].clone(), digits


def _normalize(pixels, digits):
    mean = torch.tensor(digits.mean).view(1, -1, 1, 1)
    std = torch.tensor(digits.std).view(1, -1, 1, 1)
    return (pixels - mean) / std


def test_safetensors_pixel_set_round_trips_unchanged(tmp_path, real_subset):
    pixels, labels, _ = real_subset
    pixels = pixels * 1.04 - 0.02  # a little outside [0, 1], as unclamped matching methods leave them
    save_file({"images": pixels, "labels": labels}, str(tmp_path / "set.safetensors"))
    imported = ddkit.import_set(tmp_path / "set.safetensors", dataset="digits", method="dm-original")
    assert torch.equal(imported.images, pixels) and torch.equal(imported.labels, labels)
    assert imported.method == "dm-original" and imported.ipc == 3 and imported.dataset == "digits"
    record = imported.meta["imported"]
    assert record["space"] == "pixel" and len(record["sha256"]) == 64
    loaded = ddkit.load(imported.save(tmp_path / "out"))
    assert torch.equal(loaded.images, pixels)
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["imported"]["kind"] == "safetensors file"


def test_dm_script_torch_file_is_denormalised_per_experiment(tmp_path, real_subset):
    pixels, labels, digits = real_subset
    second = pixels.flip(-1)
    torch.save({"data": [[_normalize(pixels, digits), labels], [_normalize(second, digits), labels]],
                "accs_all_exps": {"ConvNet": [0.9]}}, tmp_path / "res_DM.pt")
    first = ddkit.import_set(tmp_path / "res_DM.pt", dataset="digits")
    assert first.meta["imported"]["space"] == "normalized"
    torch.testing.assert_close(first.images, pixels, atol=1e-6, rtol=0)
    other = ddkit.import_set(tmp_path / "res_DM.pt", dataset="digits", entry=1)
    torch.testing.assert_close(other.images, second, atol=1e-6, rtol=0)
    with pytest.raises(DDKitError, match="2 experiment"):
        ddkit.import_set(tmp_path / "res_DM.pt", dataset="digits", entry=2)


def test_multi_formation_sets_decode_like_ddkits_idm_sets(tmp_path, real_subset):
    pixels, labels, _ = real_subset
    save_file({"images": pixels, "labels": labels}, str(tmp_path / "idm.safetensors"))
    imported = ddkit.import_set(tmp_path / "idm.safetensors", dataset="digits", decode_factor=2)
    images, expanded = imported.decoded()
    assert images.shape == (120, 1, 8, 8) and torch.equal(expanded, labels.repeat_interleave(4))
    # cell (0, 1) of the first stored image: its top-right 4x4 quarter, upsampled to 8x8
    quarter = torch.nn.functional.interpolate(pixels[:1, :, :4, 4:], size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(images[1:2], quarter)
    with pytest.raises(DDKitError, match="does not divide"):
        ddkit.import_set(tmp_path / "idm.safetensors", dataset="digits", decode_factor=3)


def test_images_and_labels_in_two_files_as_mtt_writes_them(tmp_path, real_subset):
    pixels, labels, digits = real_subset
    torch.save(_normalize(pixels, digits), tmp_path / "images_best.pt")
    torch.save(labels, tmp_path / "labels_best.pt")
    with pytest.raises(DDKitError, match="--labels"):
        ddkit.import_set(tmp_path / "images_best.pt", dataset="digits")
    imported = ddkit.import_set(tmp_path / "images_best.pt", dataset="digits", labels_file=tmp_path / "labels_best.pt")
    torch.testing.assert_close(imported.images, pixels, atol=1e-6, rtol=0)
    assert torch.equal(imported.labels, labels)
    assert len(imported.meta["imported"]["labels_sha256"]) == 64
    np.save(tmp_path / "labels.npy", labels.numpy()[::-1].copy())  # a .npy labels file wins over the file's own
    save_file({"images": pixels, "labels": labels}, str(tmp_path / "both.safetensors"))
    flipped = ddkit.import_set(tmp_path / "both.safetensors", dataset="digits", labels_file=tmp_path / "labels.npy")
    assert torch.equal(flipped.labels, labels.flip(0))


def test_channels_last_uint8_npz_and_one_hot_labels(tmp_path, real_subset):
    pixels, labels, _ = real_subset
    as_bytes = (pixels * 255).round().to(torch.uint8)
    one_hot = torch.nn.functional.one_hot(labels, 10).float().numpy()
    np.savez(tmp_path / "set.npz", x=as_bytes.permute(0, 2, 3, 1).numpy(), y=one_hot)
    imported = ddkit.import_set(tmp_path / "set.npz", dataset="digits", images_key="x", labels_key="y")
    assert torch.equal(imported.images, as_bytes.float() / 255.0)
    assert torch.equal(imported.labels, labels)
    assert imported.meta["imported"]["channels_last"] is True and imported.meta["imported"]["space"] == "byte"


def test_image_folder_from_export_comes_back_as_the_same_set(tmp_path, real_subset, digits):
    pixels, labels, _ = real_subset
    export_imagefolder(pixels, labels, digits.class_names, tmp_path / "folder")
    imported = ddkit.import_set(tmp_path / "folder", dataset="digits")
    assert imported.images.shape == (30, 1, 8, 8)  # grayscale PNGs come back with one channel
    assert torch.equal(imported.images, (pixels * 255).round() / 255.0)
    assert torch.equal(imported.labels, labels)
    assert imported.meta["imported"]["class_folders"][3] == "3_3"
    with pytest.raises(DDKitError, match="image folder"):
        ddkit.import_set(tmp_path / "folder", dataset="digits", space="normalized")


def test_auto_space_decisions_and_refusal():
    mean, std = (0.3,), (0.4,)
    pixel = torch.rand(4, 1, 8, 8)
    assert to_pixel_space(pixel, "auto", mean, std)[1] == "pixel"
    assert to_pixel_space((pixel * 255).round(), "auto", mean, std)[1] == "byte"
    out, space, _ = to_pixel_space((pixel - 0.3) / 0.4, "auto", mean, std)
    assert space == "normalized"
    torch.testing.assert_close(out, pixel, atol=1e-6, rtol=0)
    noise = torch.linspace(-3, 3, 256).reshape(4, 1, 8, 8)  # neither reading puts 95 % in [0, 1]
    with pytest.raises(DDKitError, match="--space"):
        to_pixel_space(noise, "auto", mean, std)
    assert torch.equal(to_pixel_space(noise, "pixel", mean, std)[0], noise)  # given: kept, not clipped
    with pytest.raises(DDKitError, match="NaN"):
        to_pixel_space(torch.full((1, 1, 8, 8), float("nan")), "pixel", mean, std)


@pytest.mark.parametrize("images, labels, message", [
    (torch.rand(30, 1, 28, 28), torch.arange(30) % 10, r"needs \[N, 1, 8, 8\]"),
    (torch.rand(30, 1, 8, 8), torch.arange(30) % 10 + 1, "classes 0 to 9"),
    (torch.rand(30, 1, 8, 8), torch.arange(29) % 10, "one class index per image"),
    (torch.rand(30, 1, 8, 8), torch.softmax(torch.randn(30, 10), 1), "soft"),
    (torch.rand(30, 1, 8, 8), (torch.arange(30) % 10).float() + 0.5, "whole numbers"),
])
def test_bad_contents_are_refused_with_what_to_do(tmp_path, images, labels, message):
    save_file({"images": images.contiguous(), "labels": labels.contiguous()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(DDKitError, match=message):
        ddkit.import_set(tmp_path / "bad.safetensors", dataset="digits")


class _RunsCodeWhenUnpickled:
    """Unpickling this calls ``Path.touch`` on a marker: what a hostile torch file could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        from pathlib import Path

        return (Path.touch, (Path(self.marker),))


def test_torch_file_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"images": torch.rand(10, 1, 8, 8), "labels": torch.arange(10),
                "payload": _RunsCodeWhenUnpickled(str(marker))}, tmp_path / "hostile.pt")
    with pytest.raises(DDKitError, match="does not run code"):
        ddkit.import_set(tmp_path / "hostile.pt", dataset="digits")
    assert not marker.exists()


def test_missing_keys_and_unknown_files_name_the_fix(tmp_path):
    save_file({"x": torch.rand(2, 1, 8, 8)}, str(tmp_path / "keys.safetensors"))
    with pytest.raises(DDKitError, match="--images-key"):
        ddkit.import_set(tmp_path / "keys.safetensors", dataset="digits")
    save_file({"images": torch.rand(2, 1, 8, 8)}, str(tmp_path / "no-labels.safetensors"))
    with pytest.raises(DDKitError, match="no 'labels'"):
        ddkit.import_set(tmp_path / "no-labels.safetensors", dataset="digits")
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DDKitError, match="without pickle"):
        ddkit.import_set(tmp_path / "objects.npy", dataset="digits")
    (tmp_path / "set.csv").write_text("1,2\n")
    with pytest.raises(DDKitError, match="unknown kind"):
        ddkit.import_set(tmp_path / "set.csv", dataset="digits")
    with pytest.raises(DDKitError, match="does not exist"):
        ddkit.import_set(tmp_path / "absent.pt", dataset="digits")
    with pytest.raises(DDKitError, match="method name"):
        ddkit.import_set(tmp_path / "keys.safetensors", dataset="digits", method="a b")


def test_cli_import_then_eval(tmp_path, capsys, real_subset):
    pixels, labels, digits = real_subset
    torch.save({"data": [[_normalize(pixels, digits), labels]]}, tmp_path / "res.pt")
    assert main(["import", str(tmp_path / "res.pt"), "--dataset", "digits", "--out", str(tmp_path / "set")]) == 0
    out = capsys.readouterr().out
    assert "imported 30 images (3 per class) of digits" in out and "space: normalized" in out
    assert main(["eval", str(tmp_path / "set"), "--preset", "smoke", "--runs", "1", "--quiet"]) == 0
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert manifest["method"] == "imported" and len(manifest["evaluations"]) == 1
    assert main(["import", str(tmp_path / "res.pt"), "--dataset", "mnist", "--out", str(tmp_path / "x")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("ddkit: error: the images have shape [30, 1, 8, 8]") and error.count("\n") == 1


@pytest.fixture
def overshooting_set(tmp_path, real_subset):
    """A saved set like ddkit's demo DM set: pixel space, with a third of its values outside [0, 1]."""
    pixels, labels, digits = real_subset
    synthetic = pixels * 1.6 - 0.3  # the digits' zeros land at -0.3, their 1s at 1.3
    share = float(((synthetic < 0) | (synthetic > 1)).float().mean())
    assert 0.3 < share < 0.8  # as_normalized would put all of these inside [0, 1]: the old auto squashed them
    from ddkit.store import DistilledSet

    made = DistilledSet(images=synthetic, labels=labels, class_names=digits.class_names, dataset="digits",
                        mean=digits.mean, std=digits.std, method="dm")
    return made.save(tmp_path / "dm"), synthetic, labels, share


@pytest.mark.parametrize("suffix", ["safetensors", "npz", "pt"])
def test_ddkits_tensor_export_comes_back_unchanged_under_auto(tmp_path, capsys, overshooting_set, suffix):
    set_dir, synthetic, labels, _ = overshooting_set
    target = tmp_path / f"dm.{suffix}"
    assert main(["export", str(set_dir), "--to", str(target)]) == 0
    assert "not clipped" in capsys.readouterr().out
    assert main(["import", str(target), "--dataset", "digits", "--out", str(tmp_path / "back")]) == 0
    out = capsys.readouterr().out
    assert "space: pixel, auto: written by ddkit export" in out
    back = ddkit.load(tmp_path / "back")
    assert torch.equal(back.images, synthetic) and torch.equal(back.labels, labels)
    # ddkit knows what it wrote: a space given against the mark is refused with one line
    assert main(["import", str(target), "--dataset", "digits", "--out", str(tmp_path / "x"), "--space",
                 "normalized"]) == 2
    assert "holds pixel values (written by ddkit export" in capsys.readouterr().err


def test_a_sets_own_data_file_is_read_in_pixel_space(tmp_path, overshooting_set):
    set_dir, synthetic, labels, _ = overshooting_set
    import shutil

    shutil.copy(set_dir / "data.safetensors", tmp_path / "copy.safetensors")
    imported = ddkit.import_set(tmp_path / "copy.safetensors", dataset="digits")
    assert imported.meta["imported"]["space"] == "pixel"
    assert "ddkit-distilled-set" in imported.meta["imported"]["space_reason"]
    assert torch.equal(imported.images, synthetic)
    with pytest.raises(DDKitError, match="is a ddkit set already"):
        ddkit.import_set(set_dir, dataset="digits")


def test_dm_script_layout_is_normalised_even_when_values_overshoot(tmp_path, overshooting_set):
    """The README's `res_DM_...pt`: a set saved as the DM scripts save it ((pixel - mean) / std under
    'data'); its overshooting values made the value-based guess refuse it as ambiguous."""
    _, synthetic, labels, _ = overshooting_set
    digits_mean, digits_std = ddkit.data.dataset_info("digits")["mean"], ddkit.data.dataset_info("digits")["std"]
    normalised = (synthetic - torch.tensor(digits_mean).view(1, -1, 1, 1)) / torch.tensor(digits_std).view(1, -1, 1, 1)
    torch.save({"data": [[normalised, labels]], "accs_all_exps": {"ConvNet": [0.5]}}, tmp_path / "res_DM.pt")
    imported = ddkit.import_set(tmp_path / "res_DM.pt", dataset="digits")
    record = imported.meta["imported"]
    assert record["space"] == "normalized" and "DM-script layout" in record["space_reason"]
    torch.testing.assert_close(imported.images, synthetic, atol=1e-5, rtol=0)
    given = ddkit.import_set(tmp_path / "res_DM.pt", dataset="digits", space="pixel")  # a convention: --space wins
    assert torch.equal(given.images, normalised)


def test_a_guess_from_the_values_says_so():
    pixel = torch.linspace(0, 1, 256).reshape(4, 1, 8, 8)
    _, space, why = to_pixel_space((pixel - 0.3) / 0.4, "auto", (0.3,), (0.4,))
    assert space == "normalized" and "guess from the values" in why and "--space pixel" in why


def test_png_export_says_how_much_it_clips(tmp_path, capsys, overshooting_set):
    set_dir, synthetic, _, share = overshooting_set
    assert main(["export", str(set_dir), "--to", str(tmp_path / "png")]) == 0
    out = capsys.readouterr().out
    assert f"note: {100 * share:.2f}% of the pixel values lie outside [0, 1] and were clipped" in out
    assert "--format safetensors" in out
    assert main(["export", str(set_dir), "--format", "npz", "--to", str(tmp_path / "x.pt")]) == 2
    assert "--to " + str(tmp_path / "x.npz") in capsys.readouterr().err
