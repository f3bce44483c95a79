"""Datasets whose images stay on disk: ImageNet-layout folders, Tiny-ImageNet and any ImageFolder.

An in-memory :class:`~ddkit.data.core.RealDataset` holds every image as one ``uint8`` tensor,
which is right for MNIST or CIFAR and impossible for ImageNet-1K (about 193 GB at 224 px). A
:class:`StreamingDataset` has the same interface (``name``, ``train``, ``test``, ``class_names``,
``mean``, ``std``, ``num_classes``, ``image_shape``, ``class_indices``) but its splits are
:class:`StreamingSplit` s: a list of files and an ``int64`` label tensor. Images are decoded with
Pillow when they are asked for:

* ``split.images[index]`` decodes just those images with the *evaluation* transform (resize the
  shorter side to ``round(size * resize_ratio)``, centre crop ``size``; ImageNet's 256 -> 224 rule,
  ``resize_ratio = 256 / 224``, scaled to the image size) into ``uint8 [n, C, size, size]``; this
  is how per-class sampling (random baselines, initialisation from real images, conv targets) and
  the class-order check reach single images without decoding the rest;
* :meth:`StreamingSplit.loader` is a ``torch.utils.data.DataLoader`` with worker processes that
  decodes and augments per sample (RandomResizedCrop + horizontal flip for training, the
  evaluation transform otherwise), so memory is O(batch x workers), never O(dataset).

A whole-split conversion (``split.images.float()``) is refused with one line: a stage that needs
it does not stream yet.

Dataset names (:func:`streaming_name`): ``imagenet:PATH`` (ImageNet-1K layout, 224 px),
``imagenet21k:PATH`` (the same layout with ImageNet-21K's classes, 224 px) and ``stream:PATH``
(any ImageFolder or the ``tiny-imagenet-200`` folder, at the first training image's size unless
``image_size`` is given). Layout: ``train/<class>/**/*.JPEG`` and ``val/`` (or ``test/``) either
as class folders or flat (``val/`` or ``val/images/``) with a label file that names each file's
class: Tiny-ImageNet's ``val_annotations.txt`` (``FILE<TAB>WNID ...``), Kaggle's
``LOC_val_solution.csv`` (``ImageId,WNID ...``) or a ``val_labels.txt`` / ``labels.txt`` with
``FILE WNID`` lines. Without ``train/`` the folder's class sub-folders are split 80/20 per class
as ``imagefolder:PATH`` does.
"""

from __future__ import annotations

import math
import os
import random
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from ddkit.augment.crops import augment_batch, padding_for
from ddkit.data.core import RealDataset, one_line
from ddkit.data.formats import IMAGE_EXTENSIONS, imagefolder_layout
from ddkit.data.registry import GRAY_MEAN, GRAY_STD, IMAGENET_MEAN, IMAGENET_STD
from ddkit.errors import DDKitError
from ddkit.utils import normalize

#: name prefix -> (default image size, evaluation resize ratio, what it is)
STREAMING_KINDS = {
    "imagenet": (224, 256 / 224, "ImageNet-1K layout"),
    "imagenet21k": (224, 256 / 224, "ImageNet-21K layout"),
    "stream": (None, 1.0, "any image folder, streamed"),
}
#: label files a flat ``val/`` may come with, in the order they are looked for
VAL_LABEL_FILES = ("val_annotations.txt", "LOC_val_solution.csv", "val_labels.txt", "labels.txt")
#: RandomResizedCrop's defaults (Szegedy et al. 2015, "Going deeper with convolutions"; torchvision)
CROP_SCALE = (0.08, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def streaming_name(name: str) -> tuple[str, Path] | None:
    """``(kind, folder)`` for a streaming dataset name (``imagenet:PATH``, ``imagenet21k:PATH``,
    ``stream:PATH``), else ``None``. The path is made absolute, not checked."""
    if not isinstance(name, str) or ":" not in name:
        return None
    kind, _, path = name.strip().partition(":")
    kind = kind.lower()
    if kind not in STREAMING_KINDS:
        return None
    if not path:
        raise DDKitError(f"{kind} needs a path: write {kind}:PATH with PATH the folder that holds train/ and val/")
    return kind, Path(path).expanduser().absolute()


# ---- layout -------------------------------------------------------------------------------------
def _val_label_file(root: Path, split_dir: Path | None) -> Path | None:
    for folder in [d for d in (split_dir, root) if d is not None]:
        for name in VAL_LABEL_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def _read_label_file(path: Path, index: dict[str, int]) -> list[tuple[str, int]]:
    """``[(file stem or name, label)]`` from a val label file (see the module docstring)."""
    pairs = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        text = line.strip()
        if not text or (lineno == 1 and text.lower().startswith("imageid")):
            continue
        fields = text.replace(",", " ").replace("\t", " ").split()
        if len(fields) < 2:
            raise DDKitError(f"{path}:{lineno} is not 'FILE CLASS'; each line names a file and its class folder")
        name, wnid = fields[0], fields[1]
        if wnid not in index:
            hint = " (numbers are the devkit's ILSVRC2012 ids: convert them to wnids)" if wnid.isdigit() else ""
            raise DDKitError(f"{path}:{lineno} names class {wnid!r}, which train/ does not have{hint}")
        pairs.append((name, index[wnid]))
    return pairs


def streaming_layout(root: Path) -> tuple[list[str], list[tuple[Path, int]], list[tuple[Path, int]]]:
    """Scan ``root`` without decoding: ``(class_names, train files, test files)`` (see the module
    docstring for the layouts). Files are ``(path, label)`` pairs."""
    classes, train, test = imagefolder_layout(root)
    if test or not (root / "train").is_dir():
        return classes, train, test
    split_dir = next((root / s for s in ("val", "test") if (root / s).is_dir()), None)
    label_file = _val_label_file(root, split_dir)
    if label_file is None:
        raise DDKitError(f"{root} has train/ but no labelled val/: give val/ class folders or a label file "
                         f"({', '.join(VAL_LABEL_FILES)}) next to the val images")
    folders = [d for d in (split_dir, split_dir / "images" if split_dir else None) if d is not None and d.is_dir()]
    found = {}
    for folder in folders:
        for path in sorted(folder.iterdir()):
            if path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file():
                found.setdefault(path.name, path)
                found.setdefault(path.stem, path)
    test = []
    for name, label in _read_label_file(label_file, {c: i for i, c in enumerate(classes)}):
        path = found.get(name)
        if path is None:
            raise DDKitError(f"{name} (listed in {label_file}) is not in {split_dir}; the copy is incomplete")
        test.append((path, label))
    return classes, train, test


# ---- decoding and transforms --------------------------------------------------------------------
def open_image(path: str, channels: int):
    """Decode ``path`` with Pillow as RGB (``channels`` 3) or grayscale (1); one-line error if damaged."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                return im.convert("RGB" if channels == 3 else "L")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError,
            Image.DecompressionBombWarning) as exc:
        raise DDKitError(f"cannot read image {path} ({one_line(exc)}); delete or replace it") from None


def random_resized_box(width: int, height: int, rng: random.Random, scale=CROP_SCALE,
                       ratio=CROP_RATIO) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box ``(left, top, w, h)`` in pixels: an area fraction from ``scale`` and a
    log-uniform aspect ratio from ``ratio``, ten tries, then the centre crop of the clamped ratio
    (the rule of torchvision's ``RandomResizedCrop.get_params``)."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def eval_transform(image, size: int, resize_ratio: float):
    """Resize the shorter side to ``round(size * resize_ratio)`` (bilinear, antialiased), then centre
    crop ``size`` x ``size`` (ImageNet: 256 then 224)."""
    short = max(size, int(round(size * resize_ratio)))
    width, height = image.size
    if width <= height:
        new = (short, max(short, int(round(height * short / width))))
    else:
        new = (max(short, int(round(width * short / height))), short)
    if new != (width, height):
        image = image.resize(new, Image.BILINEAR)
    left, top = (new[0] - size) // 2, (new[1] - size) // 2
    return image.crop((left, top, left + size, top + size))


def train_transform(image, size: int, rng: random.Random, scale=CROP_SCALE, flip_prob: float = 0.5):
    """RandomResizedCrop to ``size`` (area ``scale``, ratio 3/4..4/3) and a horizontal flip with
    probability ``flip_prob``."""
    left, top, w, h = random_resized_box(*image.size, rng, scale)
    image = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
    if rng.random() < flip_prob:
        image = image.transpose(Image.FLIP_LEFT_RIGHT)
    return image


def to_tensor(image, channels: int) -> torch.Tensor:
    """A Pillow image as ``uint8 [C, H, W]``."""
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)[:channels]))


_POOL = []


def _thread_pool():
    """One process-wide pool of decoding threads (``$DDKIT_WORKERS`` or min(8, CPU cores))."""
    if not _POOL:
        configured = os.environ.get("DDKIT_WORKERS", "").strip()
        threads = int(configured) if configured.isdigit() and int(configured) > 0 else min(8, os.cpu_count() or 1)
        _POOL.append(ThreadPoolExecutor(max_workers=threads, thread_name_prefix="ddkit-decode"))
    return _POOL[0]


class _Samples(torch.utils.data.Dataset):
    """The map-style dataset a DataLoader reads: ``(uint8 [C, S, S], label)`` per index.

    ``augment``: the training transform, drawn from ``random.Random((seed, epoch, index))`` so that
    a sample's crop does not depend on which worker decodes it; else the evaluation transform."""

    def __init__(self, split: "StreamingSplit", augment: bool, seed: int = 0, epoch: int = 0):
        self.split, self.augment, self.seed, self.epoch = split, augment, seed, epoch

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index: int):
        index = int(index)
        rng = random.Random(hash((self.seed, self.epoch, index))) if self.augment else None
        return self.split.decode(index, rng), self.split.labels[index]


class LazyImages:
    """``split.images`` of a streaming split: ``shape`` and indexing decode on demand.

    ``images[i]`` (int) -> ``uint8 [C, S, S]``; ``images[index]`` (slice, list or int64 tensor) ->
    ``uint8 [n, C, S, S]``, each with the evaluation transform. Anything that would turn the whole
    split into one tensor (``float()``, ``to()``, ``clone()``...) raises a one-line DDKitError."""

    def __init__(self, split: "StreamingSplit"):
        self.split = split

    @property
    def shape(self) -> torch.Size:
        """``[N, C, S, S]``: the split's images as they will be decoded (uint8, S = the crop side)."""
        return torch.Size([len(self.split), self.split.channels, self.split.size, self.split.size])

    dtype = torch.uint8

    def dim(self) -> int:
        """4: images are ``[N, C, H, W]``."""
        return 4

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, index):
        if isinstance(index, (int, np.integer)) or (torch.is_tensor(index) and index.dim() == 0):
            return self.split.decode(int(index))
        if isinstance(index, slice):
            positions = range(*index.indices(len(self.split)))
        else:
            positions = torch.as_tensor(index).flatten().tolist()
        if not positions:
            return torch.empty((0, *self.shape[1:]), dtype=torch.uint8)
        return self.split.decode_many(positions)

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise DDKitError(
            f"{self.split.name} streams its images from disk and cannot be loaded whole (images.{name}); this stage "
            f"does not stream yet: use a stage that does, or an in-memory dataset (imagefolder:PATH --image-size N)")


@dataclass(eq=False)
class StreamingSplit:
    """One split of a :class:`StreamingDataset`: files on disk and their labels.

    Attributes:
        files: one path per sample (str).
        labels: ``int64 [N]`` class indices.
        size: output side ``S`` in pixels.
        channels: 3 (RGB) or 1 (grayscale folders).
        resize_ratio: the evaluation transform's resize / crop ratio (ImageNet 256 / 224).
        name: the dataset name (for messages).
    """

    files: list[str]
    labels: torch.Tensor
    size: int
    channels: int = 3
    resize_ratio: float = 1.0
    name: str = "stream"
    images: LazyImages = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.files = [str(f) for f in self.files]
        if self.labels.dtype != torch.int64 or self.labels.shape != (len(self.files),):
            raise ValueError(f"StreamingSplit.labels must be int64 [{len(self.files)}]")
        self.images = LazyImages(self)

    def __len__(self) -> int:
        return len(self.files)

    def decode(self, index: int, rng: random.Random | None = None, scale=CROP_SCALE,
               flip_prob: float = 0.5) -> torch.Tensor:
        """Sample ``index`` as ``uint8 [C, S, S]``: the training transform when ``rng`` is given
        (RandomResizedCrop of area ``scale`` + flip with ``flip_prob``, drawn from it), else the
        evaluation transform."""
        image = open_image(self.files[index], self.channels)
        image = (train_transform(image, self.size, rng, scale, flip_prob) if rng is not None
                 else eval_transform(image, self.size, self.resize_ratio))
        return to_tensor(image, self.channels)

    def decode_many(self, rows, seeds=None, scale=CROP_SCALE, flip_prob: float = 0.5) -> torch.Tensor:
        """``uint8 [n, C, S, S]`` of samples ``rows``, decoded by a pool of threads (Pillow releases
        the GIL while it decodes and resizes); ``seeds`` (one per row) selects the training
        transform, drawn from ``random.Random(seed)``, else the evaluation transform."""
        rows = [int(r) for r in rows]
        rngs = [None] * len(rows) if seeds is None else [random.Random(int(s)) for s in seeds]
        if len(rows) < 8:
            return torch.stack([self.decode(r, g, scale, flip_prob) for r, g in zip(rows, rngs)])
        pool = _thread_pool()
        return torch.stack(list(pool.map(lambda pair: self.decode(pair[0], pair[1], scale, flip_prob),
                                         zip(rows, rngs))))

    def loader(self, batch_size: int, augment: bool = False, shuffle: bool = False, workers: int = 0,
               seed: int = 0, epoch: int = 0, indices=None) -> torch.utils.data.DataLoader:
        """A DataLoader of ``(uint8 [B, C, S, S], int64 [B])`` batches, decoded by ``workers``
        processes (0: in this process) with the training (``augment``) or evaluation transform.

        ``shuffle`` draws the order from ``(seed, epoch)``; ``indices`` restricts it to those samples.
        Memory: ``batch_size`` x (``workers`` x the loader's prefetch factor + 1) decoded images."""
        samples = _Samples(self, augment, seed, epoch)
        order = torch.arange(len(self)) if indices is None else torch.as_tensor(indices).flatten()
        if shuffle:
            generator = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))
            order = order[torch.randperm(order.numel(), generator=generator)]
        subset = torch.utils.data.Subset(samples, order.tolist())
        return torch.utils.data.DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers,
                                           persistent_workers=False, drop_last=False)

    def __repr__(self) -> str:
        return f"StreamingSplit({self.name}, {len(self)} files, {self.channels}x{self.size}x{self.size})"


@dataclass(eq=False, repr=False)
class StreamingDataset(RealDataset):
    """A :class:`~ddkit.data.core.RealDataset` whose splits are :class:`StreamingSplit` s.

    ``streaming`` is True (an in-memory dataset has no such attribute); everything else reads as
    the in-memory kind: ``image_shape`` is ``(C, S, S)`` of the decoded samples, and
    ``class_indices`` comes from the label tensor alone (nothing is decoded).
    """

    streaming = True


def load_streaming(name: str, image_size: int | None = None) -> StreamingDataset:
    """A :class:`StreamingDataset` for ``imagenet:PATH``, ``imagenet21k:PATH`` or ``stream:PATH``.

    Scans the folder (file names only) and, for ``stream:`` without ``image_size``, opens the first
    training image for its size and mode (a folder of grayscale images streams one channel).
    Raises :class:`DDKitError` for an unknown name, a missing folder or an unlabelled val/.
    """
    parsed = streaming_name(name)
    if parsed is None:
        raise DDKitError(f"{name!r} is not a streaming dataset name; write imagenet:PATH, imagenet21k:PATH or stream:PATH")
    kind, root = parsed
    default_size, ratio, _ = STREAMING_KINDS[kind]
    classes, train, test = streaming_layout(root)
    channels = 3
    size = image_size or default_size
    if kind == "stream":
        with Image.open(train[0][0]) as first:
            if first.mode in ("1", "L", "LA"):
                channels = 1
            size = size or min(first.size)
    canonical = f"{kind}:{root}"

    def split(pairs):
        labels = torch.tensor([label for _, label in pairs], dtype=torch.int64)
        return StreamingSplit([p for p, _ in pairs], labels, size, channels, ratio, canonical)

    mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else (GRAY_MEAN, GRAY_STD)
    if kind == "imagenet21k":  # ImageNet-21K-P (Ridnik et al. 2021) networks take [0, 1] pixels unnormalised
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return StreamingDataset(canonical, split(train), split(test), classes, mean, std)


def default_workers(count: int) -> int:
    """Loader worker processes for a pass over ``count`` images: none below 512 images (starting
    workers costs more than it saves), else ``$DDKIT_WORKERS`` or min(8, CPU cores)."""
    if count < 512:
        return 0
    configured = os.environ.get("DDKIT_WORKERS", "").strip()
    if configured.isdigit():
        return int(configured)
    return max(0, min(8, (os.cpu_count() or 1)))


def is_streaming(real) -> bool:
    """Whether ``real`` is a :class:`StreamingDataset` (its images stay on disk)."""
    return bool(getattr(real, "streaming", False))


def iterate_normalized(real, split: str, batch_size: int, device, workers: int = 0, augment: bool = False,
                       indices=None, seed: int = 0, epoch: int = 0):
    """Batches ``(float [B, C, S, S] normalised, int64 [B])`` of one split on ``device``, for the
    in-memory kind (slices of the tensors) and the streaming kind (its DataLoader) alike."""
    if is_streaming(real):
        for images, labels in real.split(split).loader(batch_size, augment, False, workers, seed, epoch, indices):
            yield normalize(images.float().div_(255.0), real.mean, real.std).to(device), labels.to(device)
        return
    data = real.split(split)
    order = torch.arange(len(data)) if indices is None else torch.as_tensor(indices).flatten()
    for start in range(0, order.numel(), batch_size):
        pick = order[start:start + batch_size]
        yield (normalize(data.images[pick].float().div_(255.0), real.mean, real.std).to(device),
               data.labels[pick].to(device))


class NormalizedSplit:
    """A split as a sequence of normalised float images for loops that slice ``images[a:b]``
    (:func:`ddkit.models.training.test_accuracy`): ``shape`` and slices, decoded batch by batch."""

    def __init__(self, real, split: str, device):
        self.real, self.split, self.data, self.device = real, split, real.split(split), device

    @property
    def shape(self) -> torch.Size:
        """``[N, C, H, W]`` of the wrapped split's images."""
        return self.data.images.shape

    def __getitem__(self, index):
        return normalize(self.data.images[index].float().div_(255.0), self.real.mean, self.real.std).to(self.device)

    def batches(self, batch_size: int):
        """``(images, labels)`` batches in order, decoded by :func:`default_workers` processes."""
        yield from iterate_normalized(self.real, self.split, batch_size, self.device, default_workers(len(self.data)))


def normalized_split(real, split: str, device):
    """``split`` of ``real`` as normalised float images on ``device``: a tensor for an in-memory
    dataset, a :class:`NormalizedSplit` (decoded per slice) for a streaming one."""
    if is_streaming(real):
        return NormalizedSplit(real, split, device)
    return normalize(real.split(split).images.float().div_(255.0), real.mean, real.std).to(device)


class StreamedInputs:
    """A streaming training split (or the rows ``pick`` of it) standing in for the normalised image
    tensor a teacher trains on (:func:`ddkit.methods.squeeze.train_teacher`).

    ``shape`` is ``[n, C, S, S]``; :func:`ddkit.methods.squeeze.train_teacher` runs its scheduled
    loop over :meth:`batch`, which decodes each batch from disk.
    """

    def __init__(self, real, pick, seed: int, device):
        self.real, self.seed, self.device = real, int(seed), device
        self.rows = torch.arange(len(real.train)) if pick is None else torch.as_tensor(pick)
        self.shape = torch.Size([self.rows.numel(), *real.image_shape])

    def batch(self, positions: torch.Tensor, epoch: int, recipe: dict, generator, flip_prob: float, fill):
        """Normalised ``float [n, C, S, S]`` on the device for positions into :attr:`rows`:
        ``crop="resized"`` crops each original file (RandomResizedCrop, area ``crop_scale_min``..1,
        seeded by (seed, epoch, row)); other crops (``padded``, ``none``) and the flip are applied to
        the evaluation-transformed image by :func:`ddkit.augment.crops.augment_batch` from ``generator``."""
        rows = self.rows[positions.cpu()]
        scale = (float(recipe.get("crop_scale_min", CROP_SCALE[0])), 1.0)
        if recipe.get("crop", "none") == "resized":
            seeds = [hash((self.seed, int(epoch), int(r))) for r in rows]
            pixels = self.real.train.decode_many(rows, seeds, scale, flip_prob)
            return normalize(pixels.float().div_(255.0), self.real.mean, self.real.std).to(self.device)
        pixels = self.real.train.decode_many(rows)
        x = normalize(pixels.float().div_(255.0), self.real.mean, self.real.std).to(self.device)
        size = int(x.shape[-1])
        padding = padding_for(size) if recipe.get("crop_padding", "auto") == "auto" else int(recipe["crop_padding"])
        return augment_batch(x, generator, recipe.get("crop", "none"), flip_prob, True, scale, padding, fill)
