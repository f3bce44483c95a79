"""ResNet-18 with a small-image stem (CIFAR style), as in the dataset-condensation papers.

With BatchNorm and width 64 (``resnet18_bn``) it is the ``ResNet18`` of the CRD model zoo (Tian et
al., "Contrastive Representation Distillation", ICLR 2020) in G-VBSM's teacher pool;
:func:`ddkit.models.crd.load_crd_state_dict` loads its checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ddkit.models.base import GlobalPoolTapModel, check_choice, check_positive_int, make_norm
from ddkit.models.registry import register

RESNET_NORMS = ("batch", "instance")


class BasicBlock(nn.Module):
    """``conv3x3(stride) -> norm -> ReLU -> conv3x3 -> norm``, plus a shortcut, then ReLU.

    The shortcut is ``conv1x1(stride) -> norm`` when the stride or the width changes, identity
    otherwise. ``[N, in_planes, H, W] -> [N, planes, H / stride, W / stride]``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int, norm: str) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes, "resnet18")
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes, "resnet18")
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                make_norm(norm, planes, "resnet18"),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Residual block output (a new tensor; nothing is modified in place)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(GlobalPoolTapModel):
    """ResNet-18 for 8..64 px images.

    Stem ``Conv3x3(stride 1, w) -> norm -> ReLU`` (no max-pool), then four stages of two
    :class:`BasicBlock` with widths ``w, 2w, 4w, 8w`` and strides ``1, 2, 2, 2``, global average
    pool, ``classifier = Linear(8w, num_classes)``; ``w = width`` (64 by default, so 512-d
    embeddings). Module names (``conv1``, ``bn1``, ``layer1``.., ``shortcut``) follow the usual
    CIFAR ResNet code. Accepts any spatial size (global pool); checks only the channels.

    For tiny images a stage whose stride 2 would leave a map smaller than 2x2 uses stride 1
    (8 px: maps 8, 8, 4, 2, 2). Without this, ``GroupNorm(C, C)`` on a 1x1 map returns its bias
    whatever the input and the instance-norm net would ignore its input.

    ``norm``: ``batch`` = ``BatchNorm2d`` (default) or ``instance`` = ``GroupNorm(C, C)``.

    Taps: ``stem`` ``[N, w, S, S]``, ``layer1`` .. ``layer4`` (``layer4`` is ``[N, 8w, S/8, S/8]``),
    ``features`` (= ``layer4``, before the pool), ``embedding`` ``[N, 8w]``, ``logits``.
    """


    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        norm: str = "batch",
        width: int = 64,
        arch: str = "resnet18",
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, arch=arch)
        norm = check_choice(arch, "norm", norm, RESNET_NORMS)
        width = check_positive_int(arch, "width", width)
        self.norm, self.width = norm, width
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, width, arch)
        planes_in = width
        stages = []
        size = image_size
        for mult, stride in ((1, 1), (2, 2), (4, 2), (8, 2)):
            planes = width * mult
            if stride == 2 and (size + 1) // 2 < 2:
                stride = 1  # tiny images: keep maps >= 2x2 (see the class docstring)
            size = (size + 1) // 2 if stride == 2 else size
            stages.append(
                nn.Sequential(
                    BasicBlock(planes_in, planes, stride, norm),
                    BasicBlock(planes, planes, 1, norm),
                )
            )
            planes_in = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.embedding_dim = planes_in
        self.classifier = nn.Linear(planes_in, num_classes)
        self._tap_names = (
            "stem", "layer1", "layer2", "layer3", "layer4", "features", "embedding", "logits",
        )  # fmt: skip

    def _stream(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        h = F.relu(self.bn1(self.conv1(x)))
        yield "stem", h
        for name in ("layer1", "layer2", "layer3", "layer4"):
            h = getattr(self, name)(h)
            yield name, h
        yield from self._pooled_tail(h)


@register("resnet18")
def resnet18(
    in_channels: int, num_classes: int, image_size: int, norm: str = "batch", width: int = 64
) -> ResNet18:
    """ResNet-18 factory. Options: norm (batch | instance), width (base width, 64)."""
    return ResNet18(in_channels, num_classes, image_size, norm, width, "resnet18")


@register("resnet18_bn")
def resnet18_bn(in_channels: int, num_classes: int, image_size: int, width: int = 64) -> ResNet18:
    """ResNet-18 with BatchNorm. Option: width (64)."""
    return ResNet18(in_channels, num_classes, image_size, "batch", width, "resnet18_bn")


@register("resnet18_in")
def resnet18_in(in_channels: int, num_classes: int, image_size: int, width: int = 64) -> ResNet18:
    """ResNet-18 with instance norm (``GroupNorm(C, C)``). Option: width (64)."""
    return ResNet18(in_channels, num_classes, image_size, "instance", width, "resnet18_in")
