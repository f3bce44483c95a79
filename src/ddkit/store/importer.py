"""Bring a set made elsewhere into ddkit's format, so ddkit's evaluator can judge it.

Research scripts save their synthetic sets in their own ways: DM and IDM write a torch file
``{"data": [[images, labels], ...], ...}`` with one pair per experiment, in normalised space; MTT
writes the images and the labels as two torch files; others write ``.npz``/``.npy`` arrays, image
folders, or safetensors. :func:`import_set` reads any of these
without executing code from the file, checks the images against the real dataset they claim to
come from (channels, height, width, classes), converts them to ddkit's pixel space and returns a
:class:`~ddkit.store.DistilledSet` that ``ddkit eval`` judges exactly like ddkit's own sets.

Only hard labels are imported. The soft-label protocol replays relabel records made by ddkit's own
teachers; to compare an imported set under it, relabel it with ``ddkit relabel`` (the same
teachers then label every set in the comparison).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file as load_safetensors

from ddkit.data import dataset_info
from ddkit.data.formats import class_folders, decode_images, images_under
from ddkit.errors import DDKitError
from ddkit.store.distilled import MANIFEST_FILE, DistilledSet
from ddkit.store.tensorfile import declared_space
from ddkit.utils import sha256_of

#: how the numbers of an imported image tensor map to pixels
SPACES = ("auto", "pixel", "byte", "normalized")
#: the pixel range a clearly pixel-space tensor keeps to (matching methods overshoot [0, 1] a little)
_PIXEL_RANGE = (-0.05, 1.05)
#: share of values inside ``_PIXEL_RANGE`` for ``auto`` to call a space
_CLEAR_SHARE = 0.95
_METHOD_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _tensor(value, what: str, source: Path) -> torch.Tensor:
    if isinstance(value, np.ndarray):
        if value.dtype == object:
            raise DDKitError(f"{source}: '{what}' is an array of Python objects; save it as a numeric array")
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    raise DDKitError(f"{source}: '{what}' is a {type(value).__name__}, not a tensor or array")


_FILE_KINDS = {".safetensors": "safetensors file", ".npz": "npz file", ".npy": "npy file", ".pt": "torch file",
               ".pth": "torch file"}
_WHAT_TO_PASS = "pass a .pt/.pth, .npz, .npy or .safetensors file, or a folder of class folders"


def load_file(source: Path):
    """The contents of a tensor file, read without executing anything from it.

    Returns a tensor or array (``.npy``, a torch file holding one tensor), a dict of them
    (``.safetensors``, ``.npz``), or the plain containers of a torch file (loaded with
    ``weights_only=True``: tensors, dicts, lists, numbers and strings only).
    """
    return _load_with_metadata(source)[0]


def _safetensors_metadata(source: Path) -> dict:
    """The string metadata of a safetensors header ({} when it has none)."""
    with safe_open(str(source), "pt") as handle:
        return dict(handle.metadata() or {})


def _load_with_metadata(source: Path):
    """``(contents, safetensors header metadata or None)`` of a tensor file (see :func:`load_file`)."""
    if not source.is_file():
        raise DDKitError(f"{source} does not exist; {_WHAT_TO_PASS}")
    suffix = source.suffix.lower()
    if suffix == ".safetensors":
        try:
            return load_safetensors(str(source)), _safetensors_metadata(source)
        except (SafetensorError, OSError, ValueError) as exc:
            raise DDKitError(f"{source} cannot be read as safetensors ({exc})") from None
    if suffix in (".npz", ".npy"):
        try:
            with open(source, "rb") as handle:
                loaded = np.load(handle, allow_pickle=False)
                return (dict(loaded) if isinstance(loaded, np.lib.npyio.NpzFile) else loaded), None
        except ValueError as exc:
            detail = " ".join(str(exc).split())[:160]
            if "header" in detail.lower():  # numpy refuses headers above max_header_size (10 000 bytes)
                raise DDKitError(f"{source} has a .npy header larger than numpy reads safely ({detail[:60]}...); "
                                 f"ddkit does not read it: save the arrays again with numpy.save") from None
            # object arrays need pickle, which stays off
            raise DDKitError(f"{source} cannot be read without pickle ({detail}); save numeric arrays") from None
        except (OSError, EOFError) as exc:
            raise DDKitError(f"{source} cannot be read as {suffix[1:]} ({' '.join(str(exc).split())[:160]})") from None
    if suffix in (".pt", ".pth"):
        try:
            return torch.load(source, map_location="cpu", weights_only=True), None
        except pickle.UnpicklingError as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsupported content"
            raise DDKitError(
                f"{source} holds more than tensors and plain containers ({first[:160]}); ddkit does not run "
                f"code from a file: save the images and labels as tensors (torch.save({{'images': x, 'labels': y}}))"
            ) from None
        except (RuntimeError, EOFError, OSError) as exc:
            raise DDKitError(f"{source} cannot be read as a torch file ({str(exc)[:160]})") from None
    raise DDKitError(f"{source}: unknown kind '{suffix}'; {_WHAT_TO_PASS}")


def _keys(mapping) -> str:
    return ", ".join(sorted(map(str, mapping))) or "nothing"


def images_and_labels(obj, source: Path, entry: int = 0, images_key: str = "images", labels_key: str = "labels"):
    """Find the images (and labels, when the file has them) in what :func:`load_file` returned.

    Layouts: a dict with ``images_key`` (and ``labels_key``); the DM-script dict
    ``{"data": [[images, labels], ...]}`` (experiment ``entry``); an ``[images, labels]`` pair; a
    lone tensor or array of images (MTT-style files, labels in a second file).

    Returns:
        ``(images, labels or None, where)``: values as stored, and e.g. ", experiment 0 of 5".
    """
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj, None, ""
    if isinstance(obj, dict) and images_key in obj:
        return obj[images_key], obj.get(labels_key), ""
    if isinstance(obj, dict) and isinstance(obj.get("data"), (list, tuple)):
        pairs = obj["data"]  # DM / IDM scripts: one [images, labels] pair per experiment
        if not -len(pairs) <= entry < len(pairs):
            raise DDKitError(f"{source} holds {len(pairs)} experiment(s) under 'data'; pass --entry 0 to {len(pairs) - 1}")
        pair = pairs[entry]
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DDKitError(f"{source}: data[{entry}] is not an [images, labels] pair")
        return pair[0], pair[1], f", experiment {entry % len(pairs)} of {len(pairs)}"
    if isinstance(obj, (list, tuple)) and len(obj) == 2:
        return obj[0], obj[1], ""
    if isinstance(obj, dict):
        raise DDKitError(f"{source} has no {images_key!r} (it holds: {_keys(obj)}); name the images with --images-key")
    raise DDKitError(
        f"{source} holds a {type(obj).__name__}; ddkit reads a dict of images and labels, an [images, labels] "
        f"pair, a tensor of images, or the DM-script layout {{'data': [[images, labels], ...]}}"
    )


def labels_in(obj, source: Path, labels_key: str = "labels"):
    """The labels in a separate labels file: a lone tensor or array, or ``labels_key`` of a dict."""
    if isinstance(obj, (torch.Tensor, np.ndarray)):
        return obj
    if isinstance(obj, dict) and labels_key in obj:
        return obj[labels_key]
    found = f" (it holds: {_keys(obj)})" if isinstance(obj, dict) else f" (a {type(obj).__name__})"
    raise DDKitError(f"{source} has no labels{found}; save one tensor of labels, or name them with --labels-key")


def _read_folder(source: Path, channels: int, show_progress: bool):
    """An image folder: one sub-folder per class in label order (as ``ddkit export`` writes)."""
    folders = class_folders(source)
    if not folders:
        raise DDKitError(f"{source} has no class sub-folders; put each class's images in its own folder, in label order")
    files, labels = [], []
    for label, folder in enumerate(folders):
        found = images_under(folder)
        files += found
        labels += [label] * len(found)
    if not files:
        raise DDKitError(f"{source} holds no image files in its class folders")
    images, all_gray = decode_images(files, None, "imported images", quiet=not show_progress)
    if channels == 1:
        if not all_gray and not (images[:, :1] == images).all():
            raise DDKitError(f"the images under {source} are in colour, but the dataset has one channel")
        images = images[:, :1]
    return torch.from_numpy(images), torch.tensor(labels), f"image folder, {len(folders)} class folders", folders


def read_source(source: str | Path, entry: int = 0, images_key: str = "images", labels_key: str = "labels",
                channels: int = 3, show_progress: bool = True, labels_file: str | Path | None = None):
    """Read images and labels from files or a folder, never executing code stored in them.

    Args:
        source: a ``.safetensors``, ``.npz`` or ``.npy`` file, a torch file (``.pt``/``.pth``, loaded
            with ``weights_only=True``) or a folder of per-class image folders in label order.
        entry: which experiment of a DM-script torch file (``{"data": [[images, labels], ...]}``).
        images_key, labels_key: tensor names in safetensors, npz and dict torch files.
        channels: the dataset's channels; a grayscale image folder is read with one channel.
        show_progress: a progress bar while a large image folder is decoded.
        labels_file: a second file holding the labels (MTT writes ``images_best.pt`` and
            ``labels_best.pt``); it takes precedence over labels inside ``source``.

    Returns:
        ``(images, labels, description, class_folders, declared)``: tensors as stored (any dtype or
        layout), a few words on what was read, the class folders of an image folder (else ``None``),
        and the space the file's writer declared with why (:func:`ddkit.store.tensorfile.declared_space`;
        ``None`` when the file does not say).
    """
    source = Path(source)
    if source.is_dir():
        if (source / MANIFEST_FILE).is_file():
            raise DDKitError(f"{source} is a ddkit set already (it holds manifest.json): evaluate it with "
                             f"`ddkit eval {source}`, or copy the folder")
        if labels_file is not None:
            raise DDKitError(f"{source} is an image folder, whose class folders are the labels; leave out --labels")
        return (*_read_folder(source, channels, show_progress), ("byte", "image files"))
    contents, metadata = _load_with_metadata(source)
    images, labels, where = images_and_labels(contents, source, entry, images_key, labels_key)
    declared = declared_space(contents, metadata, images)
    description = _FILE_KINDS[source.suffix.lower()] + where
    if labels_file is not None:
        labels_file = Path(labels_file)
        labels = labels_in(load_file(labels_file), labels_file, labels_key)
        description += f", labels from {labels_file.name}"
    elif labels is None:
        raise DDKitError(f"{source} holds images but no {labels_key!r}; pass the labels file with --labels "
                         f"or name the labels with --labels-key")
    return (_tensor(images, images_key, source), _tensor(labels, labels_key, Path(labels_file or source)),
            description, None, declared)


def to_nchw(images: torch.Tensor, shape: tuple[int, int, int], dataset: str) -> tuple[torch.Tensor, bool]:
    """Images as ``[N, C, H, W]`` of the dataset's ``shape``; also accepts ``[N, H, W, C]`` and, for
    one channel, ``[N, H, W]``. Returns the tensor and whether it was channels-last."""
    channels, height, width = shape
    if images.dim() == 3 and channels == 1 and tuple(images.shape[1:]) == (height, width):
        return images.unsqueeze(1), False
    if images.dim() == 4 and tuple(images.shape[1:]) == shape:
        return images, False
    if images.dim() == 4 and tuple(images.shape[1:]) == (height, width, channels):
        return images.permute(0, 3, 1, 2).contiguous(), True
    raise DDKitError(
        f"the images have shape {list(images.shape)}, but {dataset} needs [N, {channels}, {height}, {width}] "
        f"(or [N, {height}, {width}, {channels}]); import a set made for this dataset at its resolution"
    )


def to_class_indices(labels: torch.Tensor, count: int, num_classes: int) -> torch.Tensor:
    """Hard labels int64 ``[N]`` from class indices ``[N]`` or one-hot rows ``[N, K]``."""
    if labels.dim() == 2 and labels.shape == (count, num_classes):
        values = labels.float()
        if not (((values == 0) | (values == 1)).all() and (values.sum(1) == 1).all()):
            raise DDKitError(
                "the labels are soft ([N, K] but not one-hot); ddkit imports hard labels only: save their argmax "
                "as labels, then `ddkit relabel` the imported set to judge it with soft labels"
            )
        return values.argmax(1)
    if labels.dim() != 1 or labels.shape[0] != count:
        raise DDKitError(f"{count} images but labels of shape {list(labels.shape)}; give one class index per image")
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise DDKitError("the labels are not whole numbers; give class indices 0 to K-1")
    labels = labels.to(torch.int64)
    if count and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise DDKitError(
            f"labels run from {int(labels.min())} to {int(labels.max())}, but the dataset has classes 0 to {num_classes - 1}"
        )
    return labels


def scale_integer_images(images: torch.Tensor, space: str) -> tuple[torch.Tensor, str, str] | None:
    """Refuse images no space can describe, and scale wide integer images by ddkit's fixed rule.

    - complex or boolean images: refused;
    - integer images must hold bytes 0..255 (uint8 or any wider integer type; left to
      :func:`to_pixel_space`, which divides them by 255), except uint16, whose values above 255
      are 16-bit pixels: divided by 65535 (with ``space`` auto);
    - other integers outside 0..255, integer images taken as normalised values, and integers
      above 1 taken as pixel values are refused with one line.

    Returns:
        ``(pixels float32, "pixel", why)`` for 16-bit images, else None (float images, and integer
        bytes, go on to :func:`to_pixel_space`).
    """
    name = str(images.dtype).replace("torch.", "")
    if images.is_complex():
        raise DDKitError(f"the images are complex numbers ({name}); ddkit imports real pixel values: save the "
                         f"real part or the magnitude as a float array")
    if images.dtype == torch.bool:
        raise DDKitError("the images are boolean; save them as uint8 (0 and 255) or as float pixel values "
                         "(0.0 and 1.0)")
    if images.is_floating_point() or images.numel() == 0:
        return None
    values = images.to(torch.float64)
    low, high = float(values.min()), float(values.max())
    if space == "normalized":
        raise DDKitError(f"the images are integers ({name}), which are not normalised values; leave out --space "
                         f"normalized (integers are read as bytes 0 to 255) or save float values")
    if 0 <= low and high <= 255:
        if space == "pixel" and high > 1:
            raise DDKitError(f"the images are integers ({name}) up to {high:.0f}, not pixel values in [0, 1]; pass "
                             f"--space byte or auto (divided by 255)")
        return None
    if images.dtype == torch.uint16:
        if space != "auto":
            raise DDKitError(f"the images are 16-bit (uint16, values up to {high:.0f}); leave out --space {space}: "
                             f"16-bit images are divided by 65535")
        return (values / 65535.0).to(torch.float32), "pixel", "uint16: 16-bit values divided by 65535"
    raise DDKitError(f"the images are {name} with values from {low:.0f} to {high:.0f}; ddkit reads integer images "
                     f"as bytes 0 to 255 (uint16 as 16-bit, divided by 65535): scale them to float pixel values "
                     f"in [0, 1] and import those")


def _share_in_pixel_range(values: torch.Tensor) -> float:
    low, high = _PIXEL_RANGE
    return float(((values >= low) & (values <= high)).float().mean())


def to_pixel_space(images: torch.Tensor, space: str, mean, std) -> tuple[torch.Tensor, str, str]:
    """Images as float32 pixel space ``[0, 1]`` (values are kept, not clipped).

    Args:
        images: ``[N, C, H, W]``, any numeric dtype.
        space: ``"pixel"`` (already [0, 1]), ``"byte"`` (0 to 255), ``"normalized"``
            (``(pixel - mean) / std`` with the dataset's per-channel constants) or ``"auto"``: uint8
            tensors are bytes, whole numbers above 1.5 are bytes, a tensor with 95 % of its values in
            [-0.05, 1.05] is pixel space, one that is so after undoing the normalisation is normalised;
            anything else is refused with a request for ``--space``.
        mean, std: the dataset's per-channel normalisation (``C`` numbers each).

    Returns:
        ``(pixels float32 [N, C, H, W], resolved space, why)``.
    """
    if space not in SPACES:
        raise DDKitError(f"unknown space {space!r}; choose one of: {', '.join(SPACES)}")
    values = images.float() if images.is_floating_point() else images.to(torch.float32)
    if not torch.isfinite(values).all():
        raise DDKitError("the images hold NaN or infinite values; they cannot be evaluated")
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    why = "given"
    if space == "auto":
        if images.dtype == torch.uint8 or (values.numel() and float(values.min()) >= 0 and float(values.max()) > 1.5
                                           and torch.equal(values, values.round()) and float(values.max()) <= 255):
            space, why = "byte", "auto: whole numbers 0 to 255"
        else:
            as_pixel = _share_in_pixel_range(values)
            as_normalized = _share_in_pixel_range(values * std_t + mean_t)
            if as_pixel >= _CLEAR_SHARE:
                space, why = "pixel", f"auto: {100 * as_pixel:.0f}% of values in [0, 1]"
            elif as_normalized >= _CLEAR_SHARE:
                space, why = "normalized", (f"auto: {100 * (1 - as_pixel):.0f}% of values outside [0, 1], "
                                            f"{100 * as_normalized:.0f}% inside after undoing the normalisation; "
                                            f"a guess from the values: pass --space pixel if they are pixels")
            else:
                raise DDKitError(
                    f"cannot tell the images' space: {100 * as_pixel:.0f}% of values lie in [0, 1] as they are and "
                    f"{100 * as_normalized:.0f}% after undoing the normalisation; pass --space pixel, byte or normalized"
                )
    if space == "byte":
        return values / 255.0, space, why
    if space == "normalized":
        return values * std_t + mean_t, space, why
    return values.contiguous(), space, why


def _space_to_use(space: str, declared: tuple[str, str] | None, source) -> tuple[str, str | None]:
    """The space to read a file in, and why when its writer declared it (else None: the values decide).

    Under ``auto`` a declared space wins over any guess from the values. A space given against what
    ddkit itself wrote into the file is refused (ddkit knows what it wrote); against the DM-script
    layout (a convention, not a mark) the given space is used.
    """
    if space not in SPACES:
        raise DDKitError(f"unknown space {space!r}; choose one of: {', '.join(SPACES)}")
    if declared is None:
        return space, None
    declared_as, why = declared
    if space == "auto":
        return declared_as, f"auto: {why}"
    if space != declared_as and why.startswith(("written by ddkit", "a ddkit set")):
        raise DDKitError(f"{source} holds {declared_as} values ({why}); leave out --space {space}")
    return space, None


def import_set(
    source: str | Path,
    dataset: str,
    space: str = "auto",
    method: str = "imported",
    entry: int = 0,
    images_key: str = "images",
    labels_key: str = "labels",
    image_size: int | None = None,
    show_progress: bool = True,
    decode_factor: int = 1,
    labels_file: str | Path | None = None,
) -> DistilledSet:
    """Read a set made by another tool as a (not yet saved) :class:`DistilledSet` of ``dataset``.

    Args:
        source: see :func:`read_source` (safetensors, npz, torch file or image folder).
        dataset: the real dataset the set was made from; its test split will judge it, so the images
            must have its ``(C, H, W)`` and the labels its classes.
        space: how the numbers map to pixels (:func:`to_pixel_space`); DM-family scripts save
            normalised images, image folders are bytes.
        method: the name the manifest gives the set's method, e.g. ``"dm-original"``.
        entry: experiment of a DM-script torch file; images_key, labels_key: tensor names.
        image_size: resize side of an ``imagefolder:PATH`` dataset (as for ``ddkit baseline``).
        show_progress: a progress bar while a large image folder is decoded.
        decode_factor: for multi-formation sets (IDC, IDM): each stored image holds a
            ``factor x factor`` grid of training images, decoded as ddkit's own IDM sets are
            (:func:`ddkit.augment.partition.partition_expand`). 1 (default): images as stored.
        labels_file: a separate file of labels (see :func:`read_source`).

    Returns:
        A DistilledSet: images float32 [N, C, H, W] in pixel space (unclipped), labels int64 [N], and
        a manifest recording the source, its sha256 and the space conversion under ``imported``.
    """
    if not _METHOD_NAME.match(method or ""):
        raise DDKitError(f"method name {method!r} is not valid; use letters, digits and . _ + -, e.g. dm-original")
    info = dataset_info(dataset, image_size=image_size)
    shape = tuple(int(v) for v in info["image_shape"])
    num_classes = int(info["num_classes"])
    class_names = list(info["class_names"]) or [str(c) for c in range(num_classes)]
    if decode_factor < 1 or shape[1] % decode_factor or shape[2] % decode_factor:
        raise DDKitError(
            f"decode factor {decode_factor} does not divide the image size {shape[1]}x{shape[2]}; give 1 or a divisor"
        )
    raw_images, raw_labels, description, folders, declared = read_source(
        source, entry, images_key, labels_key, shape[0], show_progress, labels_file)
    images, channels_last = to_nchw(raw_images, shape, info["name"])
    if images.shape[0] == 0:
        raise DDKitError(f"{source} holds no images")
    if folders is not None and len(folders) != num_classes:
        raise DDKitError(f"{source} has {len(folders)} class folders, but {info['name']} has {num_classes} classes")
    labels = to_class_indices(raw_labels, images.shape[0], num_classes)
    if folders is not None:
        if space not in ("auto", "byte"):
            raise DDKitError(f"{source} is an image folder, and image files hold bytes; leave out --space {space}")
        pixels, resolved, why = images.float() / 255.0, "byte", "image files"
    else:
        space, given_why = _space_to_use(space, declared, source)
        scaled = scale_integer_images(images, space)
        pixels, resolved, why = scaled or to_pixel_space(images, space, info["mean"], info["std"])
        why = given_why or why
    source = Path(source)
    record = {
        "source": str(source), "kind": description, "space": resolved, "space_reason": why,
        "channels_last": channels_last,
        "sha256": sha256_of(source) if source.is_file() else None,
    }
    if labels_file is not None:
        record.update(labels_source=str(labels_file), labels_sha256=sha256_of(Path(labels_file)))
    if folders is not None:
        record["class_folders"] = [f.name for f in folders]
    if not folders and (entry or images_key != "images" or labels_key != "labels"):
        record.update(entry=entry, images_key=images_key, labels_key=labels_key)
    decode = {"kind": "partition", "factor": decode_factor} if decode_factor > 1 else {"kind": "identity"}
    counts = torch.bincount(labels, minlength=num_classes)
    meta = {"config": {"ipc": int(counts.max())}, "imported": record}
    if image_size:
        meta["dataset_options"] = {"image_size": image_size}
    return DistilledSet(
        images=pixels, labels=labels, class_names=class_names, dataset=info["name"], mean=info["mean"],
        std=info["std"], method=method, decode=decode, meta=meta,
    )


def class_count_note(distilled: DistilledSet) -> str | None:
    """A line when classes hold unequal numbers of images (IPC is then the largest count), else None."""
    counts = torch.bincount(distilled.labels, minlength=distilled.num_classes)
    low, high = int(counts.min()), int(counts.max())
    if low == high:
        return None
    return f"note: classes hold {low} to {high} images; the set's IPC is taken as {high}"
