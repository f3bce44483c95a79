"""Image grids (one row per class) and ImageFolder export, with Pillow only."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ddkit.errors import DDKitError

MIN_CELL_PIXELS = 32  # tiny images (8x8 digits) are upscaled so a grid is readable
LABEL_WIDTH = 96
MAX_COLUMNS = 20


def to_uint8_hwc(image: torch.Tensor) -> np.ndarray:
    """Pixel-space float [C, H, W] in [0, 1] -> uint8 [H, W, C] (or [H, W] for one channel)."""
    array = (image.detach().float().clamp(0, 1) * 255.0 + 0.5).to(torch.uint8).cpu().numpy()
    array = np.transpose(array, (1, 2, 0))
    return array[:, :, 0] if array.shape[2] == 1 else array


def save_grid(
    images: torch.Tensor,
    labels: torch.Tensor,
    class_names: list[str],
    path: str | Path,
    max_columns: int = MAX_COLUMNS,
    per_class: int | None = MAX_COLUMNS,
) -> Path:
    """Write a PNG grid: each class starts a row, and its images wrap into further rows of at most
    ``max_columns``.

    Args:
        images: float [N, C, H, W] in [0, 1] (clipped to it); labels: int64 [N]; class_names: K names.
        path: output PNG path (parent must exist).
        max_columns: images per row at most.
        per_class: the first ``per_class`` images of each class are drawn (None: all of them; the
            default, one row of 20, is the grid a saved set carries).

    Returns:
        The path written.
    """
    num_classes = len(class_names)
    _, channels, height, width = images.shape
    scale = max(1, -(-MIN_CELL_PIXELS // min(height, width)))
    cell_h, cell_w = height * scale, width * scale
    per_class_index = [torch.nonzero(labels == c).flatten()[:per_class] for c in range(num_classes)]
    columns = max(1, min(max_columns, max(len(idx) for idx in per_class_index)))
    rows = [max(1, -(-len(idx) // columns)) for idx in per_class_index]
    pad = 2
    canvas = Image.new("RGB", (LABEL_WIDTH + columns * (cell_w + pad), sum(rows) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    first_row = 0
    for c, indices in enumerate(per_class_index):
        top = first_row * (cell_h + pad)
        draw.text((4, top + cell_h // 2 - 5), str(class_names[c])[:14], fill="black")
        for k, index in enumerate(indices.tolist()):
            tile = Image.fromarray(to_uint8_hwc(images[index])).convert("RGB")
            tile = tile.resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile, (LABEL_WIDTH + (k % columns) * (cell_w + pad), top + (k // columns) * (cell_h + pad)))
        first_row += rows[c]
    path = Path(path)
    canvas.save(path)
    return path


def clipped_share(images: torch.Tensor) -> float:
    """Share (0 to 1) of the values of pixel-space ``images`` (any shape) outside [0, 1]: what an
    8-bit image file (a grid, a PNG export) clips."""
    if images.numel() == 0:
        return 0.0
    values = images.detach().float()
    return float(((values < 0) | (values > 1)).float().mean())


def safe_folder_name(name: str) -> str:
    """A class name made safe for a directory name (letters, digits, '-', '_')."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or "class"


def export_imagefolder(images: torch.Tensor, labels: torch.Tensor, class_names: list[str], out: str | Path) -> Path:
    """Write images as PNGs into one zero-padded folder per class: ``OUT/03_Dress/0007.png``.

    The index prefix keeps the sorted folder order equal to the label order, so any ImageFolder
    loader maps the folders back to the same labels.

    Args:
        images: float [N, C, H, W] in [0, 1]; labels: int64 [N]; class_names: K names.
        out: output directory (created; must be empty if it exists).
    """
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DDKitError(f"{out} exists and is not empty; choose an empty --to directory")
    out.mkdir(parents=True, exist_ok=True)
    class_digits = len(str(max(len(class_names) - 1, 0)))
    image_digits = len(str(max(images.shape[0] - 1, 0)))
    for c, name in enumerate(class_names):
        folder = out / f"{c:0{class_digits}d}_{safe_folder_name(name)}"
        folder.mkdir()
        for k, index in enumerate(torch.nonzero(labels == c).flatten().tolist()):
            Image.fromarray(to_uint8_hwc(images[index])).save(folder / f"{k:0{image_digits}d}.png")
    return out
