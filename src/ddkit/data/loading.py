"""``load_dataset`` and ``dataset_info``: turning a dataset name into tensors or a summary."""

from __future__ import annotations

import json
from pathlib import Path

from ddkit.data import formats
from ddkit.data.cache import CACHE_FILE, load_cache, read_cache_meta
from ddkit.data.core import RealDataset, Split, resize_images
from ddkit.data.fetch import cache_path, cached, read_directory
from ddkit.data.streaming import load_streaming, streaming_name
from ddkit.data.registry import (
    STREAMING_NAMES,
    DATASETS,
    GRAY_MEAN,
    GRAY_STD,
    IMAGEFOLDER_PREFIX,
    IMAGEFOLDER_SUMMARY,
    IMAGENET_MEAN,
    IMAGENET_STD,
    resolve_name,
)
from ddkit.errors import DDKitError


def _check_size(image_size) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise DDKitError(
            f"image size must be a positive whole number of pixels, got {image_size!r}"
        )
    if image_size > 4096:
        raise DDKitError(f"image size {image_size} is too large; use at most 4096 pixels")
    return image_size


def _resolve(name: str, root) -> tuple[str, Path | None]:
    # "imagefolder" with a root is the same as "imagefolder:ROOT".
    if isinstance(name, str) and name.strip().lower() == "imagefolder":
        if root is None:
            raise DDKitError(
                "imagefolder needs a path: write imagefolder:PATH with PATH the folder that holds "
                "one sub-folder per class"
            )
        return resolve_name(f"{IMAGEFOLDER_PREFIX}{root}")
    return resolve_name(name)


def _not_ready(name: str) -> DDKitError:
    spec = DATASETS[name]
    where = cache_path(name)
    if spec.kind == "fetch":
        return DDKitError(
            f"{name} is not fetched yet (no {where}); run `ddkit data fetch {name}` (or "
            f"`ddkit data fetch {name} --from DIR` with your copy of the four official IDX files)"
        )
    return DDKitError(
        f"{name} is not set up yet (no {where}); run `ddkit data fetch {name} --from DIR` with "
        f"DIR holding the official {spec.title} files (or pass DIR as the dataset root)"
    )


def check_available(name: str) -> None:
    """Raise the one-line :class:`DDKitError` :func:`load_dataset` would give for a dataset that is
    not fetched or set up yet, without reading any images (a file-existence check).

    For commands that load a dataset late, after other work: they call this first, so that a
    missing dataset fails the command at once rather than hours in. ``imagefolder:PATH`` is
    checked when it is loaded.
    """
    canonical, folder = _resolve(name, None)
    if folder is None and DATASETS[canonical].kind != "bundled" and not cache_path(canonical).is_file():
        raise _not_ready(canonical)


def _resized(split: Split, size: int | None) -> Split:
    if size is None or tuple(split.images.shape[2:]) == (size, size):
        return split
    return Split(resize_images(split.images, size), split.labels)


def load_dataset(
    name: str, root: str | Path | None = None, image_size: int | None = None
) -> RealDataset:
    """Load a dataset into memory as a :class:`RealDataset`.

    Args:
        name: a name from :func:`list_datasets` (case-insensitive; ``cifar-10``, ``fmnist``...
            also work) or ``imagefolder:PATH``.
        root: a directory with the dataset's official files in their official layout (for
            mnist/fashion-mnist the four IDX files, raw or gzipped, which are SHA-256 verified),
            or a directory that ``fetch_dataset`` wrote (it has ``cache.safetensors``). ``None``
            reads the cache ``data_root()/<name>/``. Ignored by ``digits``; for
            ``name="imagefolder"`` it is the folder.
        image_size: resize every image to ``image_size`` x ``image_size`` pixels (bilinear,
            antialiased; Pillow for imagefolder/Tiny-ImageNet files, torch otherwise).
            ``None`` keeps the native size. Required for ``imagefolder``. For the streaming
            names (``imagenet:PATH``, ``imagenet21k:PATH``, ``stream:PATH``) the side of the
            decoded samples (default 224 for ImageNet, the first image's for ``stream:``).

    Returns:
        For a streaming name a :class:`ddkit.data.streaming.StreamingDataset` (same interface,
        images decoded from disk when indexed or loaded in batches); otherwise a
        ``RealDataset`` with ``uint8 [N, C, H, W]`` images and ``int64 [N]`` labels per split,
        class names and per-channel ``mean``/``std`` in ``[0, 1]`` pixel units.

    Raises :class:`DDKitError` when the dataset is unknown, not fetched, or its files are
    missing or malformed.
    """
    size = _check_size(image_size)
    canonical, folder = _resolve(name, root)
    if streaming_name(canonical) is not None:
        return load_streaming(canonical, size)
    if folder is not None:
        train, test, class_names, gray = formats.load_imagefolder(folder, size)
        mean, std = (GRAY_MEAN, GRAY_STD) if gray else (IMAGENET_MEAN, IMAGENET_STD)
        return RealDataset(canonical, train, test, class_names, mean, std)

    spec = DATASETS[canonical]
    if spec.kind == "bundled":
        train, test, class_names = formats.load_digits_splits()
    elif root is not None:
        directory = Path(root).expanduser()
        if (directory / CACHE_FILE).is_file():
            train, test, class_names, _ = load_cache(directory / CACHE_FILE, canonical)
        else:
            formats.require_dir(
                directory, spec.title,
                f"pass the folder with the official {spec.title} files (or fetch it with "
                f"`ddkit data fetch {canonical}`)",
            )
            train, test, class_names = read_directory(canonical, directory, size, quiet=False)
    else:
        if not cache_path(canonical).is_file():
            raise _not_ready(canonical)
        train, test, class_names = cached(canonical)
    formats.check_labels(train, test, len(class_names), canonical)
    train, test = _resized(train, size), _resized(test, size)
    return RealDataset(canonical, train, test, class_names, spec.mean, spec.std)


def dataset_info(
    name: str, root: str | Path | None = None, image_size: int | None = None
) -> dict:
    """Summary of a dataset without keeping its tensors.

    Returns a dict with keys ``name``, ``title``, ``description``, ``available`` (whether
    :func:`load_dataset` with these arguments would find data), ``location`` (cache file or
    directory, or ``None``), ``image_shape`` (``(C, H, W)`` after ``image_size``),
    ``num_classes``, ``class_names`` (``[]`` while only the files know them), ``train``,
    ``test``, ``total`` (image counts) and ``mean``/``std`` (per channel, ``[0, 1]`` units).

    For a fetched dataset only the cache header is read; for a dataset that is not fetched
    the official figures are returned with ``available=False``; a ``root`` or an imagefolder
    is loaded to be described. Raises :class:`DDKitError` like :func:`load_dataset`.
    """
    size = _check_size(image_size)
    canonical, folder = _resolve(name, root)
    spec = DATASETS.get(canonical)

    def describe(ds: RealDataset, location: str | None) -> dict:
        return {
            "name": ds.name,
            "title": spec.title if spec else "image folder",
            "description": spec.summary if spec else IMAGEFOLDER_SUMMARY,
            "available": True,
            "location": location,
            "image_shape": ds.image_shape,
            "num_classes": ds.num_classes,
            "class_names": list(ds.class_names),
            "train": len(ds.train),
            "test": len(ds.test),
            "total": len(ds.train) + len(ds.test),
            "mean": ds.mean,
            "std": ds.std,
        }

    if streaming_name(canonical) is not None:  # scans file names; no image is decoded
        described = describe(load_streaming(canonical, size), str(folder))
        described["description"] = next(text for key, text in STREAMING_NAMES.items()
                                         if key.split(":")[0] == canonical.split(":")[0])
        return described
    if folder is not None:
        return describe(load_dataset(canonical, image_size=size), str(folder))
    if spec.kind == "bundled" or root is not None:
        where = None if root is None else str(Path(root).expanduser())
        return describe(load_dataset(canonical, root, size), where)

    path = cache_path(canonical)
    c, h, w = spec.image_shape
    if path.is_file():
        meta, shapes = read_cache_meta(path, canonical)
        c, h, w = shapes["train_images"][1:]
        class_names = json.loads(meta["class_names"])
        train, test = shapes["train_labels"][0], shapes["test_labels"][0]
        available = True
    else:
        class_names = list(spec.class_names) if spec.class_names is not None else []
        train, test = spec.counts
        available = False
    if size is not None:
        h = w = size
    return {
        "name": canonical,
        "title": spec.title,
        "description": spec.summary,
        "available": available,
        "location": str(path) if available else None,
        "image_shape": (int(c), int(h), int(w)),
        "num_classes": len(class_names) if class_names else spec.num_classes,
        "class_names": class_names,
        "train": int(train),
        "test": int(test),
        "total": int(train) + int(test),
        "mean": spec.mean,
        "std": spec.std,
    }

