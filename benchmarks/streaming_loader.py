"""Images per second and peak memory of the streaming loader against decoding a folder whole.

Usage: python benchmarks/streaming_loader.py [--images 400] [--size 224] [--workers 2] [--folder DIR]

Writes (or reuses) an ImageNet-layout folder of JPEG files at ImageNet's typical size (500 x 375,
quality 90; Fashion-MNIST pictures upscaled and tinted, 10 wnid folders), then measures, each in a
fresh process so that its peak resident memory is its own:

* ``plain``: every file decoded with Pillow, resized (short side 256/224 x size) and centre
  cropped in one loop, kept as one uint8 tensor (what an in-memory dataset holds);
* ``stream-eval``: ``imagenet:DIR`` through its DataLoader, the evaluation transform, ``--workers``
  worker processes, batches of 64, nothing kept;
* ``stream-train``: the same with the training transform (RandomResizedCrop + flip).

Prints one line per mode (images/s, peak RSS of the process and of its workers) and a summary
line with ``lscpu``'s model name, the core count and the date, for docs/imagenet.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path


def build_folder(root: Path, count: int) -> Path:
    """``count`` JPEGs of 500 x 375 in ``root/train/<wnid>/`` and a labelled ``root/val/``."""
    import numpy as np
    from PIL import Image

    from ddkit.data import fetch_dataset, load_dataset

    if (root / "done.json").is_file() and json.loads((root / "done.json").read_text())["count"] == count:
        return root
    fetch_dataset("fashion-mnist", quiet=True)
    real = load_dataset("fashion-mnist")
    rng = np.random.default_rng(0)
    wnids = [f"n0{1000000 + 17 * k:07d}" for k in range(10)]
    lines = []
    (root / "val").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        k = i % 10
        gray = real.train.images[i, 0].numpy().astype(np.float32) / 255.0
        tint = rng.uniform(0.2, 1.0, size=3).astype(np.float32)
        rgb = (gray[:, :, None] * tint * 230 + rng.uniform(0, 25, size=(28, 28, 3))).astype(np.uint8)
        image = Image.fromarray(rgb).resize((500, 375), Image.BICUBIC)
        folder = root / "train" / wnids[int(real.train.labels[i])]
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"img_{i:06d}.JPEG", quality=90)
        if i < 10:
            image.save(root / "val" / f"val_{i}.JPEG", quality=90)
            lines.append(f"val_{i}.JPEG {wnids[int(real.train.labels[i])]}")
    (root / "val" / "val_labels.txt").write_text("\n".join(lines) + "\n")
    (root / "done.json").write_text(json.dumps({"count": count}))
    return root


def peak_mb() -> tuple[float, float]:
    """Peak resident memory (MB) of this process and of its largest finished child."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return own, children


def measure(mode: str, folder: Path, size: int, workers: int) -> dict:
    """Run one mode in this process and return its figures."""
    import torch

    from ddkit.data import load_dataset
    from ddkit.data.streaming import eval_transform, open_image, to_tensor

    real = load_dataset(f"imagenet:{folder}", image_size=size)
    split = real.train
    started = time.perf_counter()
    if mode == "plain":
        kept = torch.empty((len(split), 3, size, size), dtype=torch.uint8)
        for i, path in enumerate(split.files):
            kept[i] = to_tensor(eval_transform(open_image(path, 3), size, split.resize_ratio), 3)
        count = len(split)
    else:
        count = 0
        for images, _ in split.loader(64, augment=mode == "stream-train", shuffle=True, workers=workers):
            count += images.shape[0]
    seconds = time.perf_counter() - started
    own, children = peak_mb()
    return {"mode": mode, "images": count, "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 1),
            "peak_rss_mb": round(own), "peak_worker_rss_mb": round(children),
            "decoded_mb": round(len(split) * 3 * size * size / 2 ** 20, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--folder", default=None, help="where the JPEG folder is written (default: a temp dir)")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    folder = Path(args.folder or Path(os.environ.get("TMPDIR", "/tmp")) / f"ddkit-loader-bench-{args.images}")
    if args.measure:
        print(json.dumps(measure(args.measure, folder, args.size, args.workers)))
        return
    build_folder(folder, args.images)
    results = []
    for mode in ("plain", "stream-eval", "stream-train"):
        line = subprocess.run([sys.executable, __file__, "--measure", mode, "--folder", str(folder), "--size",
                               str(args.size), "--workers", str(args.workers)], check=True, capture_output=True,
                              text=True).stdout.strip().splitlines()[-1]
        results.append(json.loads(line))
        print(line)
    model = next((line.split(":", 1)[1].strip() for line in subprocess.run(
        ["lscpu"], capture_output=True, text=True).stdout.splitlines() if line.startswith("Model name")), "?")
    summary = "; ".join(f"{r['mode']} {r['images_per_s']} img/s, peak RSS {r['peak_rss_mb']} MB"
                        + (f" (+ workers {r['peak_worker_rss_mb']} MB)" if r["mode"] != "plain" else "")
                        for r in results)
    print(f"{args.images} JPEGs 500x375 -> {args.size} px ({results[0]['decoded_mb']} MB decoded), "
          f"{args.workers} workers: {summary}. `python benchmarks/streaming_loader.py --images {args.images} "
          f"--workers {args.workers}`, {model}, {os.cpu_count()} cores, "
          f"{datetime.date.today().isoformat()}, load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
