"""`ddkit import` against hostile and odd files: complex and wide integer images, oversized .npy
headers, decompression bombs; each is one line or a documented conversion."""

import struct

import numpy as np
import pytest
import torch
from PIL import Image

import ddkit
from ddkit.cli import main
from ddkit.errors import DDKitError


def one_line(capsys, words):
    code = main([str(w) for w in words])
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("ddkit: error:") and "Traceback" not in err, err
    return lines[0]


def _labels():
    return np.repeat(np.arange(10), 2)


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
def test_complex_images_are_refused(tmp_path, dtype):
    images = (np.random.default_rng(0).random((20, 8, 8)) + 0.5j).astype(dtype)
    np.savez(tmp_path / "set.npz", images=images, labels=_labels())
    with pytest.raises(DDKitError, match="complex"):
        ddkit.import_set(tmp_path / "set.npz", dataset="digits")


def test_boolean_images_are_refused(tmp_path):
    np.savez(tmp_path / "set.npz", images=np.zeros((20, 8, 8), bool), labels=_labels())
    with pytest.raises(DDKitError, match="bool"):
        ddkit.import_set(tmp_path / "set.npz", dataset="digits")


def test_uint16_images_are_divided_by_65535(tmp_path):
    images = np.random.default_rng(0).integers(0, 65536, (20, 8, 8)).astype(np.uint16)
    np.savez(tmp_path / "set.npz", images=images, labels=_labels())
    imported = ddkit.import_set(tmp_path / "set.npz", dataset="digits")
    expected = torch.from_numpy(images.astype(np.float32) / 65535.0).unsqueeze(1)
    torch.testing.assert_close(imported.images, expected, rtol=0, atol=1e-7)
    assert "65535" in imported.meta["imported"]["space_reason"]


@pytest.mark.parametrize("dtype", [np.int16, np.int32, np.int64])
def test_wide_integer_images_holding_bytes_are_divided_by_255(tmp_path, dtype):
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8)).astype(dtype)
    np.savez(tmp_path / "set.npz", images=images, labels=_labels())
    imported = ddkit.import_set(tmp_path / "set.npz", dataset="digits")
    torch.testing.assert_close(imported.images, torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1))


@pytest.mark.parametrize("space", ["auto", "byte", "pixel", "normalized"])
def test_wide_integer_images_beyond_bytes_are_refused_whatever_the_space(tmp_path, space):
    images = np.random.default_rng(0).integers(0, 1000, (20, 8, 8)).astype(np.int32)
    np.savez(tmp_path / "set.npz", images=images, labels=_labels())
    with pytest.raises(DDKitError, match="int32"):
        ddkit.import_set(tmp_path / "set.npz", dataset="digits", space=space)


def test_integer_images_are_not_taken_as_normalised(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 8, 8)).astype(np.int32)
    np.savez(tmp_path / "set.npz", images=images, labels=_labels())
    with pytest.raises(DDKitError, match="integer"):
        ddkit.import_set(tmp_path / "set.npz", dataset="digits", space="normalized")


def test_an_oversized_npy_header_is_one_line(tmp_path, capsys):
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (20, 1, 8, 8), }"
    header = header + " " * (300000 - len(header)) + "\n"
    with open(tmp_path / "big.npy", "wb") as handle:
        handle.write(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(header)) + header.encode("latin1"))
        handle.write(np.zeros((20, 1, 8, 8), np.float32).tobytes())
    line = one_line(capsys, ["import", tmp_path / "big.npy", "--dataset", "digits", "--out", tmp_path / "out"])
    assert "header" in line and "pickle" not in line


def test_a_decompression_bomb_png_is_one_line(tmp_path, capsys):
    for label in range(10):
        (tmp_path / "png" / str(label)).mkdir(parents=True)
        Image.new("L", (8, 8)).save(tmp_path / "png" / str(label) / "0.png")
    Image.new("1", (20000, 20000)).save(tmp_path / "png" / "0" / "1.png")  # 400 M pixels in 49 KB
    line = one_line(capsys, ["import", tmp_path / "png", "--dataset", "digits", "--out", tmp_path / "out"])
    assert "1.png" in line and "pixels" in line
