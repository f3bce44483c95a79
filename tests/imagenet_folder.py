"""Builds small ImageNet-layout folders of real JPEG files from the cached Fashion-MNIST.

``train/<wnid>/<wnid>_<i>.JPEG`` and a flat ``val/`` with a ``val_labels.txt`` naming each file's
wnid (the devkit-style label file); every image is the Fashion-MNIST digit upscaled to ``size``
px, put on a random-coloured background so that it is RGB.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np


@contextlib.contextmanager
def one_thread():
    """torch on one intra-op thread while the block runs: these networks are tiny, and on a shared
    2-core machine two spinning threads make a step tens of times slower than one."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)

#: the architecture of :func:`train_tiny_teacher`'s network, as ``--teacher ARCH:FILE`` spells it
TEACHER_ARCH = "convnet(width=16,depth=2)"
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


def train_tiny_teacher(root: Path, out: Path, size: int = 32, epochs: int = 30, seed: int = 0) -> Path:
    """Train ddkit's default ``convnet`` on the folder's training images (``size`` px, the
    streaming evaluation transform) with plain Adam, save its state dict as ``out`` (.safetensors)
    and return ``out``; the teacher ``convnet(width=16,depth=2):<out>`` (:data:`TEACHER_ARCH`) then
    fits ``imagenet:<root>`` at ``size``."""
    import torch
    import torch.nn.functional as F
    from safetensors.torch import save_file

    from ddkit.data import load_dataset
    from ddkit.methods.squeeze import build_net
    from ddkit.utils import normalize

    real = load_dataset(f"imagenet:{root}", image_size=size)
    images = normalize(real.train.images[range(len(real.train))].float() / 255, real.mean, real.std)
    labels = real.train.labels
    net = build_net({"arch": "convnet", "width": 16, "depth": 2}, real, seed=seed, device="cpu")
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(seed)
    with one_thread():
        for _ in range(epochs):
            for index in torch.randperm(len(labels), generator=generator).split(16):
                optimizer.zero_grad()
                F.cross_entropy(net(images[index]), labels[index]).backward()
                optimizer.step()
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out))
    return out
