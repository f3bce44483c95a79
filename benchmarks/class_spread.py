"""How far apart a set's images are, within and between classes (in normalised units).

Usage: python benchmarks/class_spread.py SET_DIR [SET_DIR ...]

For each set with the same number of images per class: the mean pairwise L2 distance between two
images of the same class, and the mean pairwise distance between the class-mean images. Low
"between" with normal "within" means the classes are hard to tell apart; low "within" means a
class's images collapsed onto one another.
"""

import sys

import torch

import ddkit
from ddkit.utils import normalize


def spread(images: torch.Tensor, num_classes: int) -> tuple[float, float]:
    """(mean within-class pairwise distance, mean distance between class means) of class-major images."""
    per_class = images.shape[0] // num_classes
    x = images.reshape(num_classes, per_class, -1)
    within = torch.cdist(x, x).sum() / (num_classes * per_class * (per_class - 1))
    means = x.mean(1)
    between = torch.cdist(means, means).sum() / (num_classes * (num_classes - 1))
    return float(within), float(between)


def main(paths: list[str]) -> None:
    for path in paths:
        distilled = ddkit.load(path)
        within, between = spread(normalize(distilled.images, distilled.mean, distilled.std), distilled.num_classes)
        print(f"{path}: within-class {within:.2f}, between class means {between:.2f}")


if __name__ == "__main__":
    main(sys.argv[1:])
