"""Seconds per DM iteration: ddkit's matching engine against the original DM script's loop.

Usage:
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/dm_reference_loop.py [--dataset fashion-mnist] [--ipc 10]
        [--preset quick] [--iterations 5] [--batch-real N] [--width N] [--device cpu] [--seed 0]

    # a check that it runs, in seconds (tiny settings):
    .venv/bin/python benchmarks/dm_reference_loop.py --dataset digits --ipc 2 --iterations 2 --batch-real 16 --width 16

Both sides use identical settings: the DM preset of ``--preset`` (default quick: ConvNet-3 width 128
with instance norm, 64 real images per class, DSA with ddkit's strategy for the dataset, SGD on the
pixels with lr 1 and momentum 0.5), the same dataset, IPC, network builder and iteration count.
``--batch-real`` and ``--width`` override the preset on both sides.

- **ddkit**: :class:`ddkit.methods.matching.MatchingEngine`, one ``step`` per iteration (a fresh
  random ConvNet; one siamese DSA draw per class, grouped by family; one batched forward per side,
  the real side without gradients in chunks of ``real_chunk``).
- **reference**: a re-implementation of how the original DM script (Zhao & Bilen, "Dataset
  Condensation with Distribution Matching") runs an iteration. Per iteration a fresh random
  ConvNet; then a Python loop over the classes, each class doing
  1. its own real batch (``np.random.permutation`` of the class's index list, then indexing a
     normalised float copy of the whole training set);
  2. its own DSA call on the real batch and one on the synthetic images, both re-seeding torch's
     global RNG from the same per-call seed (siamese: the same family and parameters for the real
     and the synthetic images of that class). As in the original ``DiffAugment``, each operation
     re-seeds and draws one value per sample, builds per-sample affine matrices in Python for scale
     and rotate, and then copies the first sample's draw to every sample;
  3. its own real forward (detached) and synthetic forward, adding the class's squared
     mean-embedding distance to the loss; the forwards run the ConvNet's layers in the standard
     layout with PyTorch's own kernels (``plain_embed``), as the original network does.
  Then one backward and one SGD step on the single synthetic tensor.
  The per-call seed comes from a seeded NumPy generator instead of the wall clock, so runs repeat.

- **ddkit_contiguous**: ddkit's engine with ``channels_last=false``, the layout it used before the
  ``channels_last`` option (its default "auto" keeps CPU nets in channels-last layout).

Timing: one warm-up iteration each, then the three sides alternate iteration by iteration, so drift
of the machine's speed hits all alike. The output is JSON with the seconds per iteration of each
and ``reference_over_ddkit`` (``..._contiguous``), the speed-up of ddkit's engine.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import time

import numpy as np
import torch
import torch.nn.functional as F

from ddkit.augment import dsa_strategy_for
from ddkit.data import load_dataset
from ddkit.methods.dm_family import resolve_preset
from ddkit.methods.matching import MatchingEngine
from ddkit.methods.squeeze import build_net, frozen
from ddkit.utils import apply_overrides, normalize, resolve_device


class ReferenceDSA:
    """DSA as the original ``DiffAugment`` applies it in mode "S" with a seed (siamese).

    The constants are the original ``ParamDiffAug`` defaults, which equal ddkit's ``DSA`` defaults.
    """

    prob_flip = 0.5
    ratio_scale = 1.2
    ratio_rotate = 15.0
    ratio_crop_pad = 0.125
    ratio_cutout = 0.5
    brightness = 1.0
    saturation = 2.0
    contrast = 0.5

    def __init__(self, strategy: str):
        self.families = [] if strategy.lower() in ("", "none") else [n for n in strategy.split("_") if n]
        self.next_seed = -1

    # Each operation re-seeds torch's global RNG with the running seed, as the original does.
    def _reseed(self) -> None:
        torch.random.manual_seed(self.next_seed)
        self.next_seed += 1

    def __call__(self, x: torch.Tensor, seed: int) -> torch.Tensor:
        if not self.families:
            return x
        self.next_seed = seed
        self._reseed()
        family = self.families[torch.randint(0, len(self.families), size=(1,)).item()]
        for op in {"color": (self.brightness_op, self.saturation_op, self.contrast_op), "crop": (self.crop_op,),
                   "cutout": (self.cutout_op,), "flip": (self.flip_op,), "scale": (self.scale_op,),
                   "rotate": (self.rotate_op,)}[family]:
            x = op(x)
        return x.contiguous()

    def _per_sample(self, x: torch.Tensor) -> torch.Tensor:
        """One U[0, 1) draw per sample, then the first sample's value for all (siamese)."""
        self._reseed()
        values = torch.rand(x.shape[0], 1, 1, 1, dtype=x.dtype, device=x.device)
        values[:] = values[0].clone()
        return values

    def brightness_op(self, x):
        return x + (self._per_sample(x) - 0.5) * self.brightness

    def saturation_op(self, x):
        mean = x.mean(dim=1, keepdim=True)
        return (x - mean) * (self._per_sample(x) * self.saturation) + mean

    def contrast_op(self, x):
        mean = x.mean(dim=[1, 2, 3], keepdim=True)
        return (x - mean) * (self._per_sample(x) + self.contrast) + mean

    def flip_op(self, x):
        return torch.where(self._per_sample(x) < self.prob_flip, x.flip(3), x)

    def _affine(self, x, rows) -> torch.Tensor:
        """Resample ``x`` with per-sample 2x3 matrices built in Python (then all set to the first)."""
        theta = torch.tensor(rows, dtype=torch.float)
        theta[:] = theta[0].clone()
        grid = F.affine_grid(theta, list(x.shape), align_corners=True).to(x.device)
        return F.grid_sample(x, grid, align_corners=True)

    def scale_op(self, x):
        low, high = 1.0 / self.ratio_scale, self.ratio_scale
        self._reseed()
        sx = torch.rand(x.shape[0]) * (high - low) + low
        self._reseed()
        sy = torch.rand(x.shape[0]) * (high - low) + low
        return self._affine(x, [[[float(sx[i]), 0.0, 0.0], [0.0, float(sy[i]), 0.0]] for i in range(x.shape[0])])

    def rotate_op(self, x):
        self._reseed()
        angle = (torch.rand(x.shape[0]) - 0.5) * 2 * self.ratio_rotate / 180 * math.pi
        rows = [[[float(torch.cos(angle[i])), float(torch.sin(-angle[i])), 0.0],
                 [float(torch.sin(angle[i])), float(torch.cos(angle[i])), 0.0]] for i in range(x.shape[0])]
        return self._affine(x, rows)

    def crop_op(self, x):
        n, _, h, w = x.shape
        shift_h, shift_w = int(h * self.ratio_crop_pad + 0.5), int(w * self.ratio_crop_pad + 0.5)
        self._reseed()
        move_h = torch.randint(-shift_h, shift_h + 1, size=[n, 1, 1], device=x.device)
        self._reseed()
        move_w = torch.randint(-shift_w, shift_w + 1, size=[n, 1, 1], device=x.device)
        move_h[:] = move_h[0].clone()
        move_w[:] = move_w[0].clone()
        batch, rows, cols = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(h, device=x.device),
                                           torch.arange(w, device=x.device), indexing="ij")
        rows = torch.clamp(rows + move_h + 1, 0, h + 1)
        cols = torch.clamp(cols + move_w + 1, 0, w + 1)
        padded = F.pad(x, [1, 1, 1, 1])
        return padded.permute(0, 2, 3, 1).contiguous()[batch, rows, cols].permute(0, 3, 1, 2)

    def cutout_op(self, x):
        n, _, h, w = x.shape
        size_h, size_w = int(h * self.ratio_cutout + 0.5), int(w * self.ratio_cutout + 0.5)
        self._reseed()
        centre_h = torch.randint(0, h + (1 - size_h % 2), size=[n, 1, 1], device=x.device)
        self._reseed()
        centre_w = torch.randint(0, w + (1 - size_w % 2), size=[n, 1, 1], device=x.device)
        centre_h[:] = centre_h[0].clone()
        centre_w[:] = centre_w[0].clone()
        batch, rows, cols = torch.meshgrid(torch.arange(n, device=x.device), torch.arange(size_h, device=x.device),
                                           torch.arange(size_w, device=x.device), indexing="ij")
        rows = torch.clamp(rows + centre_h - size_h // 2, min=0, max=h - 1)
        cols = torch.clamp(cols + centre_w - size_w // 2, min=0, max=w - 1)
        mask = torch.ones(n, h, w, dtype=x.dtype, device=x.device)
        mask[batch, rows, cols] = 0
        return x * mask.unsqueeze(1)


class ReferenceDM:
    """The original DM iteration: a Python loop over classes, per-class real and synthetic forwards."""

    def __init__(self, real, ipc: int, config: dict, seed: int, device):
        self.real, self.ipc, self.config, self.device = real, ipc, config, device
        self.numpy_rng = np.random.RandomState(seed)
        self.net_seeds = np.random.RandomState(seed + 1)
        # The original keeps the whole normalised training set as one float tensor on the device.
        self.images_all = normalize(real.train.images.float() / 255.0, real.mean, real.std).to(device)
        labels = real.train.labels.tolist()
        self.indices_class = [[] for _ in range(real.num_classes)]
        for index, label in enumerate(labels):
            self.indices_class[label].append(index)
        start = torch.cat([self.get_images(c, ipc) for c in range(real.num_classes)]).detach().clone()
        self.image_syn = start.requires_grad_(True)
        self.optimizer = torch.optim.SGD([self.image_syn], lr=float(config["lr_img"]),
                                         momentum=float(config["momentum_img"]))
        strategy = dsa_strategy_for(real.name) if config["dsa_strategy"] == "auto" else config["dsa_strategy"]
        self.dsa = ReferenceDSA(strategy if config["dsa"] else "none")

    def get_images(self, c: int, n: int) -> torch.Tensor:
        shuffled = self.numpy_rng.permutation(self.indices_class[c])[:n]
        return self.images_all[shuffled]

    def step(self) -> float:
        net = frozen(build_net(self.config["model"], self.real, int(self.net_seeds.randint(2**31 - 1)),
                               self.device)).train()
        loss = torch.tensor(0.0, device=self.device)
        channels, height, width = self.real.image_shape
        for c in range(self.real.num_classes):
            img_real = self.get_images(c, int(self.config["batch_real"]))
            img_syn = self.image_syn[c * self.ipc:(c + 1) * self.ipc].reshape(self.ipc, channels, height, width)
            seed = int(self.numpy_rng.randint(100000))
            img_real = self.dsa(img_real, seed)
            img_syn = self.dsa(img_syn, seed)
            output_real = plain_embed(net, img_real).detach()
            output_syn = plain_embed(net, img_syn)
            loss = loss + torch.sum((output_real.mean(dim=0) - output_syn.mean(dim=0)) ** 2)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())


def plain_embed(net: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The ConvNet's embedding ``[N, D]`` as the published code computes it: the feature layers in
    order with PyTorch's own kernels (``nn.AvgPool2d``'s, not ddkit's faster pool), then flatten."""
    h = images
    for layer in net.features:
        h = torch.nn.AvgPool2d.forward(layer, h) if isinstance(layer, torch.nn.AvgPool2d) else layer(h)
    return torch.flatten(h, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", default="fashion-mnist", help="dataset name (default fashion-mnist)")
    parser.add_argument("--ipc", type=int, default=10, help="synthetic images per class (default 10)")
    parser.add_argument("--preset", default="quick", help="DM preset whose settings both sides use (default quick)")
    parser.add_argument("--iterations", type=int, default=5, help="timed iterations per side (default 5)")
    parser.add_argument("--batch-real", type=int, default=None, help="override the preset's real images per class")
    parser.add_argument("--width", type=int, default=None, help="override the preset's ConvNet width")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--seed", type=int, default=0, help="seed of both sides (default 0)")
    args = parser.parse_args()
    device = resolve_device(args.device)
    real = load_dataset(args.dataset)
    overrides = {}
    if args.batch_real is not None:
        overrides["batch_real"] = args.batch_real
    if args.width is not None:
        overrides["model.width"] = args.width
    config = apply_overrides(resolve_preset("dm", real.name, args.ipc, args.preset), overrides)
    contiguous = apply_overrides(config, {"channels_last": False})
    sides = {
        "ddkit": MatchingEngine(real, args.ipc, config, args.seed, device, show_progress=False),
        "ddkit_contiguous": MatchingEngine(real, args.ipc, contiguous, args.seed, device, show_progress=False),
        "reference": ReferenceDM(real, args.ipc, config, args.seed, device),
    }
    steps = {"ddkit": lambda iteration: sides["ddkit"].step(iteration),
             "ddkit_contiguous": lambda iteration: sides["ddkit_contiguous"].step(iteration),
             "reference": lambda iteration: sides["reference"].step()}
    for name in sides:  # warm-up
        steps[name](0)
    seconds = {name: [] for name in sides}
    for iteration in range(1, args.iterations + 1):
        for name in sides:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            steps[name](iteration)
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - started)
    mean = {name: sum(values) / len(values) for name, values in seconds.items()}
    print(json.dumps({
        "dataset": real.name, "ipc": args.ipc, "preset": args.preset, "batch_real": config["batch_real"],
        "model": config["model"], "dsa": config["dsa"], "iterations": args.iterations, "device": str(device),
        "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
        "seconds_per_iteration": {name: round(value, 4) for name, value in mean.items()},
        "channels_last": config["channels_last"],
        "reference_over_ddkit": round(mean["reference"] / mean["ddkit"], 3),
        "reference_over_ddkit_contiguous": round(mean["reference"] / mean["ddkit_contiguous"], 3),
    }, indent=2))


if __name__ == "__main__":
    main()
