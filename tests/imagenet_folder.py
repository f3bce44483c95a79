"""Builds small ImageNet-layout folders of real JPEG files from the cached Fashion-MNIST.

``train/<wnid>/<wnid>_<i>.JPEG`` and a flat ``val/`` with a ``val_labels.txt`` naming each file's
wnid (the devkit-style label file); every image is the Fashion-MNIST digit upscaled to ``size``
px, put on a random-coloured background so that it is RGB.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

#: wnid-style folder names, one per Fashion-MNIST class (sorted order = class order)
WNIDS = [f"n0{1000000 + 17 * k:07d}" for k in range(10)]


def build_imagenet_folder(root: Path, per_class: int = 6, val_per_class: int = 2, size: int = 48,
                          classes: int = 10, seed: int = 0) -> Path:
    """Write the folder under ``root`` and return it; ``classes`` <= 10 Fashion-MNIST classes."""
    from PIL import Image

    from ddkit.data import fetch_dataset, load_dataset

    fetch_dataset("fashion-mnist", quiet=True)
    real = load_dataset("fashion-mnist")
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for split, count, source in (("train", per_class, real.train), ("val", val_per_class, real.test)):
        for k in range(classes):
            pick = np.flatnonzero(source.labels.numpy() == k)[:count]
            folder = root / "train" / WNIDS[k] if split == "train" else root / "val"
            folder.mkdir(parents=True, exist_ok=True)
            for i, index in enumerate(pick):
                gray = source.images[int(index), 0].numpy().astype(np.float32) / 255.0
                tint = rng.uniform(0.2, 1.0, size=3).astype(np.float32)
                rgb = (gray[:, :, None] * tint[None, None, :] * 255).astype(np.uint8)
                image = Image.fromarray(rgb).resize((size, size + 8 * (i % 2)), Image.BILINEAR)
                name = (f"{WNIDS[k]}_{i}.JPEG" if split == "train"
                        else f"ILSVRC2012_val_{k * count + i + 1:08d}.JPEG")
                image.save(folder / name, quality=90)
                if split == "val":
                    lines.append(f"{name} {WNIDS[k]}")
    (root / "val" / "val_labels.txt").write_text("\n".join(lines) + "\n")
    return root
