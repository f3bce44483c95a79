"""Readers for the datasets that come from a bundled copy or from a user's directory.

Every reader returns ``(train, test, class_names)`` with :class:`~ddkit.data.core.Split` objects
(``uint8 [N, C, H, W]`` images, ``int64 [N]`` labels) and raises a one-line
:class:`~ddkit.errors.DDKitError` for a missing or malformed file.

Formats:

* digits: :func:`sklearn.datasets.load_digits`, 8x8 values 0..16 scaled to ``round(v*255/16)``.
* CIFAR-10/100: the official "python version" pickles, read with a restricted unpickler
  (:mod:`ddkit.data.safe_pickle`), from the unpacked folder or straight from the ``.tar.gz``.
* SVHN: the official MATLAB v5 ``train_32x32.mat`` / ``test_32x32.mat`` (needs scipy).
* Tiny-ImageNet: the official ``tiny-imagenet-200`` folder; its labelled ``val`` is the test split.
* imagefolder: one sub-folder per class, resized with Pillow (bilinear).
"""

from __future__ import annotations

import sys
import tarfile
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ddkit.data.core import Split, one_line
from ddkit.data.safe_pickle import safe_load
from ddkit.errors import DDKitError

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm"}
)
_GRAY_MODES = frozenset({"1", "L", "LA"})
_PROGRESS_MIN = 2000  # show a progress bar when decoding at least this many image files


def first_fraction_mask(labels: np.ndarray, num: int = 4, den: int = 5) -> np.ndarray:
    """Boolean mask choosing, per class, the first ``ceil(n * num / den)`` samples in order.

    ``labels`` is ``[N]``; the result is ``[N]`` with True for "train". Deterministic (no RNG):
    with the default 4/5, a class of ``n`` samples puts its first ``ceil(0.8 n)`` samples (in
    file order) in train and the rest in test, so a class of one sample has no test sample.
    """
    labels = np.asarray(labels)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for cls in np.unique(labels):
        where = np.flatnonzero(labels == cls)
        n_train = -(-len(where) * num // den)
        mask[where[:n_train]] = True
    return mask


def _split(images: np.ndarray, labels: np.ndarray) -> Split:
    return Split(
        torch.from_numpy(np.ascontiguousarray(images, dtype=np.uint8)),
        torch.from_numpy(np.ascontiguousarray(labels, dtype=np.int64)),
    )


def require_dir(path: Path, what: str, hint: str) -> Path:
    """Return ``path`` when it is an existing directory, else raise a one-line DDKitError."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DDKitError(f"{what} directory {path} does not exist; {hint}")
    if not path.is_dir():
        raise DDKitError(f"{what} path {path} is not a directory; {hint}")
    return path


# --------------------------------------------------------------------------------------------
# digits


def load_digits_splits() -> tuple[Split, Split, list[str]]:
    """scikit-learn's 1797 8x8 digits as ``uint8 [N, 1, 8, 8]``, split 80/20 per class.

    Pixel values 0..16 become ``round(v * 255 / 16)`` (0..255). The split is
    :func:`first_fraction_mask`: the first ``ceil(0.8 n)`` samples of each class in the file's
    order are train (1442 in all), the rest test (355). Both splits keep the file order.
    """
    try:
        from sklearn.datasets import load_digits  # slow: ~1 s to import (-X importtime), only digits needs it
    except ImportError:  # pragma: no cover - scikit-learn is a dependency
        raise DDKitError("digits needs scikit-learn; run `pip install scikit-learn`") from None
    bunch = load_digits()
    values = np.asarray(bunch.data, dtype=np.float64).reshape(-1, 1, 8, 8)
    images = np.rint(values * 255.0 / 16.0).clip(0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    mask = first_fraction_mask(labels)
    names = [str(int(t)) for t in bunch.target_names]
    return _split(images[mask], labels[mask]), _split(images[~mask], labels[~mask]), names


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100

_CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "tarball": "cifar-10-python.tar.gz",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "labels": "labels",
        "names": "label_names",
        "title": "CIFAR-10",
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "tarball": "cifar-100-python.tar.gz",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "labels": "fine_labels",
        "names": "fine_label_names",
        "title": "CIFAR-100",
    },
}


def _text(value) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def _str_keys(obj, source: str, redo: str) -> dict[str, object]:
    if not isinstance(obj, dict):
        raise DDKitError(f"{source} does not hold a dict as a CIFAR batch does; {redo}")
    return {_text(k): v for k, v in obj.items()}


class _CifarFiles:
    """Finds the CIFAR files in a folder, its official sub-folder, or the official tarball."""

    def __init__(self, root: Path, spec: dict) -> None:
        self.spec = spec
        self.root = root
        self.folder: Path | None = None
        self.tar: Path | None = None
        wanted = [*spec["train"], *spec["test"], spec["meta"]]
        for cand in (root, root / spec["folder"]):
            if any((cand / f).is_file() for f in wanted):
                self.folder = cand
                break
        if self.folder is None:
            for cand in (root / spec["tarball"], root):
                if cand.is_file() and cand.name.endswith((".tar.gz", ".tgz", ".tar")):
                    self.tar = cand
                    break
        if self.folder is None and self.tar is None:
            raise DDKitError(
                f"{root} holds no {spec['title']} python batches ({', '.join(wanted)}) and no "
                f"{spec['tarball']}; pass the folder of the official {spec['title']} python "
                f"version ({spec['folder']})"
            )
        self._members: dict[str, bytes] | None = None

    @property
    def where(self) -> Path:
        return self.folder if self.folder is not None else self.tar  # type: ignore[return-value]

    def _read_tar(self) -> dict[str, bytes]:
        wanted = {*self.spec["train"], *self.spec["test"], self.spec["meta"]}
        out: dict[str, bytes] = {}
        try:
            with tarfile.open(self.tar, "r:*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if base in wanted and member.isfile() and base not in out:
                        handle = tar.extractfile(member)
                        if handle is not None:
                            out[base] = handle.read()
        except (tarfile.TarError, OSError, EOFError) as exc:
            raise DDKitError(
                f"{self.tar} is not a readable tar archive (truncated or corrupt: "
                f"{one_line(exc)}); download {self.spec['tarball']} again"
            ) from None
        return out

    def read(self, base: str) -> tuple[bytes, str]:
        """Bytes of one file and a name for it in messages."""
        if self.folder is not None:
            path = self.folder / base
            if not path.is_file():
                raise DDKitError(
                    f"{path} is missing; the {self.spec['title']} python version has "
                    f"{', '.join([*self.spec['train'], *self.spec['test'], self.spec['meta']])}"
                )
            return path.read_bytes(), str(path)
        if self._members is None:
            self._members = self._read_tar()
        if base not in self._members:
            raise DDKitError(
                f"{self.tar} has no member {base}; it is not the official {self.spec['tarball']}"
            )
        return self._members[base], f"{self.tar}:{base}"


def load_cifar(name: str, root: Path) -> tuple[Split, Split, list[str]]:
    """Read CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels).

    ``root`` may be the unpacked ``cifar-10-batches-py`` / ``cifar-100-python`` folder, the
    folder above it, or a folder holding the official ``.tar.gz`` (read without extracting).
    Images come back as ``uint8 [N, 3, 32, 32]`` (the batches store R, G, B planes row-major).
    """
    spec = _CIFAR[name]
    root = require_dir(
        root, spec["title"], f"pass the folder of the official {spec['title']} python version"
    )
    files = _CifarFiles(root, spec)
    redo = f"replace it with the file from the official {spec['tarball']}"

    def batch(base: str) -> tuple[np.ndarray, np.ndarray]:
        data, source = files.read(base)
        obj = _str_keys(safe_load(data, source, redo), source, redo)
        if "data" not in obj or spec["labels"] not in obj:
            raise DDKitError(
                f"{source} lacks the 'data' or '{spec['labels']}' entry of a {spec['title']} "
                f"batch; {redo}"
            )
        array = np.asarray(obj["data"])
        labels = np.asarray(obj[spec["labels"]], dtype=np.int64).reshape(-1)
        if array.dtype != np.uint8 or array.ndim != 2 or array.shape[1] != 3 * 32 * 32:
            raise DDKitError(
                f"{source} holds data of {array.dtype} {list(array.shape)}, expected uint8 "
                f"[N, 3072]; {redo}"
            )
        if array.shape[0] != labels.shape[0]:
            raise DDKitError(
                f"{source} has {array.shape[0]} images but {labels.shape[0]} labels; {redo}"
            )
        return array.reshape(-1, 3, 32, 32), labels

    def gather(bases: list[str]) -> Split:
        parts = [batch(b) for b in bases]
        return _split(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))

    meta_bytes, meta_source = files.read(spec["meta"])
    meta = _str_keys(safe_load(meta_bytes, meta_source, redo), meta_source, redo)
    if spec["names"] not in meta:
        raise DDKitError(f"{meta_source} lacks '{spec['names']}'; {redo}")
    class_names = [_text(n) for n in meta[spec["names"]]]
    train, test = gather(spec["train"]), gather(spec["test"])
    check_labels(train, test, len(class_names), str(files.where))
    return train, test, class_names


def check_labels(train: Split, test: Split, num_classes: int, source: str) -> None:
    """Raise DDKitError when a label is outside ``0 .. num_classes-1``."""
    for split_name, split in (("train", train), ("test", test)):
        if len(split) == 0:
            continue
        lo, hi = int(split.labels.min()), int(split.labels.max())
        if lo < 0 or hi >= num_classes:
            raise DDKitError(
                f"{source}: {split_name} labels range over {lo}..{hi} but there are "
                f"{num_classes} classes; the files are inconsistent"
            )


# --------------------------------------------------------------------------------------------
# SVHN


def _read_svhn_mat(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        import scipy.io  # optional: scipy is no declared dependency, and only SVHN needs it
    except ImportError:
        raise DDKitError(
            "svhn needs scipy to read its .mat files; run `pip install scipy`"
        ) from None
    if not path.is_file():
        raise DDKitError(
            f"{path} is missing; SVHN needs the official train_32x32.mat and test_32x32.mat"
        )
    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except NotImplementedError:
        raise DDKitError(
            f"{path} is a MATLAB v7.3 file; use the official SVHN train_32x32.mat/test_32x32.mat "
            f"(MATLAB v5)"
        ) from None
    except Exception as exc:  # scipy raises many types for damaged files
        raise DDKitError(
            f"{path} is not a readable MATLAB file (truncated or corrupt: {one_line(exc)}); "
            f"download it again"
        ) from None
    if "X" not in mat or "y" not in mat:
        raise DDKitError(f"{path} lacks the X and y arrays of the official SVHN files")
    x, y = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if x.ndim != 4 or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8:
        raise DDKitError(
            f"{path} holds X as {x.dtype} {list(x.shape)}, expected uint8 [32, 32, 3, N] as in "
            f"the official SVHN files"
        )
    if x.shape[3] != y.shape[0]:
        raise DDKitError(f"{path} has {x.shape[3]} images but {y.shape[0]} labels")
    labels = y.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() > 10):
        raise DDKitError(f"{path} has labels outside 1..10")
    labels[labels == 10] = 0  # SVHN stores digit 0 as label 10
    images = np.ascontiguousarray(x.transpose(3, 2, 0, 1))
    return images, labels


def load_svhn(root: Path) -> tuple[Split, Split, list[str]]:
    """Read SVHN's ``train_32x32.mat`` and ``test_32x32.mat`` from ``root``.

    ``X`` is ``[32, 32, 3, N]`` (H, W, C, N) and becomes ``uint8 [N, 3, 32, 32]``; ``y`` uses 10
    for the digit 0, mapped to label 0, so label ``k`` means digit ``k``.
    """
    root = require_dir(root, "SVHN", "pass the folder holding train_32x32.mat and test_32x32.mat")
    train = _split(*_read_svhn_mat(root / "train_32x32.mat"))
    test = _split(*_read_svhn_mat(root / "test_32x32.mat"))
    return train, test, [str(d) for d in range(10)]


# --------------------------------------------------------------------------------------------
# Image decoding shared by Tiny-ImageNet and imagefolder


def _decode(path: Path, size: int | None) -> tuple[np.ndarray, bool]:
    """Decode one image as RGB ``uint8 [H, W, 3]`` (resized to ``size`` when given) and whether
    the file itself is grayscale."""
    try:
        # an image above Pillow's MAX_IMAGE_PIXELS (a decompression bomb: a tiny file that decodes
        # to gigabytes) is refused like a damaged one, not decoded
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                gray = im.mode in _GRAY_MODES
                im = im.convert("RGB")
                if size is not None and im.size != (size, size):
                    im = im.resize((size, size), Image.BILINEAR)
                return np.asarray(im, dtype=np.uint8), gray
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DDKitError(
            f"cannot read image {path} ({one_line(exc)}); delete or replace it"
        ) from None


def decode_images(
    paths: list[Path], size: int | None, what: str, quiet: bool = False
) -> tuple[np.ndarray, bool]:
    """Decode image files into ``uint8 [N, 3, S, S]`` and report whether all were grayscale.

    With ``size=None`` every image must already share the first image's size. A tqdm bar on
    stderr is shown for long lists unless ``quiet``.
    """
    if not paths:
        return np.zeros((0, 3, size or 1, size or 1), dtype=np.uint8), False
    first, all_gray = _decode(paths[0], size)
    h, w = first.shape[:2]
    out = np.empty((len(paths), h, w, 3), dtype=np.uint8)
    out[0] = first
    bar = tqdm(
        total=len(paths), initial=1, desc=f"decoding {what}", unit="img", file=sys.stderr,
        leave=False, disable=quiet or len(paths) < _PROGRESS_MIN,
    )
    for i in range(1, len(paths)):
        path = paths[i]
        image, gray = _decode(path, size)
        bar.update(1)
        if image.shape != out.shape[1:]:
            raise DDKitError(
                f"image {path} is {image.shape[1]}x{image.shape[0]} but {paths[0]} is {w}x{h}; "
                f"pass an image size to resize them all"
            )
        out[i] = image
        all_gray = all_gray and gray
    bar.close()
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2)), all_gray


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet


def _tiny_root(root: Path) -> Path:
    root = require_dir(root, "Tiny-ImageNet", "pass the unpacked tiny-imagenet-200 folder")
    for cand in (root, root / "tiny-imagenet-200"):
        if (cand / "wnids.txt").is_file() or (cand / "train").is_dir():
            return cand
    raise DDKitError(
        f"{root} is not the Tiny-ImageNet folder (no wnids.txt or train/); pass the unpacked "
        f"tiny-imagenet-200 folder"
    )


def load_tiny_imagenet(
    root: Path, image_size: int | None = None, quiet: bool = False
) -> tuple[Split, Split, list[str]]:
    """Read the official ``tiny-imagenet-200`` layout; the labelled ``val`` becomes the test split.

    Classes are the sorted wnids (from ``train/``'s sub-folders, which must match ``wnids.txt``
    when present); class names are the first synonym in ``words.txt``, else the wnid. Images are
    ``uint8 [N, 3, S, S]`` with ``S = image_size or 64`` (grayscale files are expanded to RGB,
    other sizes resized with Pillow bilinear).
    """
    base = _tiny_root(root)
    train_dir = base / "train"
    if not train_dir.is_dir():
        raise DDKitError(f"{train_dir} is missing; pass the unpacked tiny-imagenet-200 folder")
    wnids = sorted(p.name for p in train_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not wnids:
        raise DDKitError(f"{train_dir} has no class folders; pass the unpacked tiny-imagenet-200")
    listed_file = base / "wnids.txt"
    if listed_file.is_file():
        lines = listed_file.read_text(encoding="utf-8", errors="replace").splitlines()
        listed = sorted({line.strip() for line in lines if line.strip()})
        if listed != wnids:
            raise DDKitError(
                f"{listed_file} lists {len(listed)} classes but {train_dir} has {len(wnids)} "
                f"class folders that differ; the copy is incomplete, unpack it again"
            )
    index = {w: i for i, w in enumerate(wnids)}
    names = dict.fromkeys(wnids)
    words = base / "words.txt"
    if words.is_file():
        with words.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                wnid, _, text = line.rstrip("\n").partition("\t")
                if wnid in names and text.strip():
                    names[wnid] = text.split(",")[0].strip()
    class_names = [names[w] or w for w in wnids]

    train_paths: list[Path] = []
    train_labels: list[int] = []
    for wnid in wnids:
        folder = train_dir / wnid / "images"
        if not folder.is_dir():
            folder = train_dir / wnid
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DDKitError(f"{folder} holds no images; the copy is incomplete, unpack it again")
        train_paths += files
        train_labels += [index[wnid]] * len(files)

    val_dir = base / "val"
    ann = val_dir / "val_annotations.txt"
    if not ann.is_file():
        raise DDKitError(f"{ann} is missing; the test split of Tiny-ImageNet is its labelled val/")
    test_paths: list[Path] = []
    test_labels: list[int] = []
    for lineno, line in enumerate(ann.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            fields = line.split()
        if len(fields) < 2:
            raise DDKitError(f"{ann}:{lineno} is not 'FILE<TAB>WNID...'; unpack it again")
        fname, wnid = fields[0].strip(), fields[1].strip()
        if wnid not in index:
            raise DDKitError(f"{ann}:{lineno} names class {wnid}, which train/ does not have")
        path = val_dir / "images" / fname
        if not path.is_file() and (val_dir / fname).is_file():
            path = val_dir / fname
        if not path.is_file():
            raise DDKitError(f"{path} (listed in {ann}:{lineno}) is missing; unpack it again")
        test_paths.append(path)
        test_labels.append(index[wnid])

    size = image_size or 64
    train_x, _ = decode_images(train_paths, size, "tiny-imagenet train", quiet)
    test_x, _ = decode_images(test_paths, size, "tiny-imagenet val", quiet)
    return (
        _split(train_x, np.asarray(train_labels)),
        _split(test_x, np.asarray(test_labels)),
        class_names,
    )


# --------------------------------------------------------------------------------------------
# imagefolder


def class_folders(root: Path) -> list[Path]:
    """The class sub-folders of ``root`` (hidden ones skipped), sorted by name: label order."""
    return sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def images_under(folder: Path) -> list[Path]:
    """Image files anywhere under ``folder`` (hidden paths skipped), sorted by relative path."""
    return sorted(
        (p for p in folder.rglob("*")
         if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
         and not any(part.startswith(".") for part in p.relative_to(folder).parts)),
        key=lambda p: p.relative_to(folder).as_posix(),
    )


def imagefolder_layout(
    root: Path,
) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Scan an image folder without decoding: ``(class_names, train files, test files)``.

    Classes are the sorted sub-folder names (of ``train/`` when ``root`` has ``train/`` plus
    ``val/`` or ``test/``; ``val/`` is preferred over ``test/`` when both exist). Without such
    sub-folders each class is split 80/20 in sorted file order (:func:`first_fraction_mask`).
    Files are ``(path, label)`` pairs; images in nested folders of a class count for that class.
    """
    root = require_dir(
        root, "imagefolder", "pass imagefolder:PATH with PATH a folder of per-class sub-folders"
    )
    split_dir = None
    if (root / "train").is_dir():
        split_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    if split_dir is not None:
        train_root = root / "train"
        classes = [p.name for p in class_folders(train_root)]
        if not classes:
            raise DDKitError(
                f"{train_root} has no class sub-folders; put each class's images in its own folder"
            )
        index = {c: i for i, c in enumerate(classes)}
        train = []
        for c in classes:
            files = images_under(train_root / c)
            if not files:
                raise DDKitError(
                    f"class folder {train_root / c} holds no images "
                    f"({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            train += [(f, index[c]) for f in files]
        test = []
        for folder in class_folders(split_dir):
            if folder.name not in index:
                raise DDKitError(
                    f"{folder} is a class that {train_root} does not have; every test class "
                    f"needs a train folder of the same name"
                )
            test += [(f, index[folder.name]) for f in images_under(folder)]
        return classes, train, test

    folders = class_folders(root)
    if not folders:
        raise DDKitError(
            f"{root} has no class sub-folders; imagefolder needs one sub-folder of images per class"
        )
    classes = [p.name for p in folders]
    files: list[tuple[Path, int]] = []
    for i, folder in enumerate(folders):
        found = images_under(folder)
        if not found:
            raise DDKitError(
                f"class folder {folder} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
            )
        files += [(f, i) for f in found]
    mask = first_fraction_mask(np.asarray([lab for _, lab in files]))
    train = [pair for pair, keep in zip(files, mask) if keep]
    test = [pair for pair, keep in zip(files, mask) if not keep]
    return classes, train, test


def load_imagefolder(
    root: Path, image_size: int | None, quiet: bool = False
) -> tuple[Split, Split, list[str], bool]:
    """Read an image folder as ``uint8 [N, C, S, S]`` splits; see :func:`imagefolder_layout`.

    Every image is converted to RGB and resized to ``image_size`` x ``image_size`` with Pillow's
    bilinear filter (aspect ratio not kept). When every file is grayscale (mode 1/L/LA) the
    result has one channel. Returns ``(train, test, class_names, grayscale)``.
    """
    # The layout first: a missing or empty folder is the more basic mistake to report.
    classes, train_files, test_files = imagefolder_layout(root)
    if image_size is None:
        raise DDKitError("imagefolder needs an image size; pass --image-size N")
    train_x, train_gray = decode_images([p for p, _ in train_files], image_size, "train", quiet)
    test_x, test_gray = decode_images([p for p, _ in test_files], image_size, "test", quiet)
    gray = train_gray and (test_gray or not test_files)
    if gray:
        train_x, test_x = train_x[:, :1], test_x[:, :1]
    train = _split(train_x, np.asarray([lab for _, lab in train_files], dtype=np.int64))
    test = _split(test_x, np.asarray([lab for _, lab in test_files], dtype=np.int64))
    return train, test, classes, gray
