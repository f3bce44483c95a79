"""Wide ResNet (Zagoruyko & Komodakis, BMVC 2016) for small images; WRN-16-2 by default.

Pre-activation basic blocks ``BN -> ReLU -> conv3x3(stride) -> BN -> ReLU -> conv3x3`` with a
1x1 projection shortcut where the width or the stride changes, three groups of ``(depth - 4) / 6``
blocks with widths ``16k, 32k, 64k`` (``k = widen``) and strides 1, 2, 2, then BN -> ReLU, global
average pool and a linear classifier. No dropout (the G-VBSM teacher pool uses none).

``wrn16_2`` at the default stem width 16 is the ``WRN_16_2`` of the CRD model zoo (Tian et al.,
"Contrastive Representation Distillation", ICLR 2020) in G-VBSM's teacher pool;
:func:`ddkit.models.crd.load_crd_state_dict` loads its checkpoints.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ddkit.errors import DDKitError
from ddkit.models.base import GlobalPoolTapModel, check_positive_int
from ddkit.models.registry import register


class PreActBlock(nn.Module):
    """``[N, in_planes, H, W] -> [N, planes, H / stride, W / stride]``, pre-activation.

    ``out = conv2(relu(bn2(conv1(relu(bn1(x)))))) + shortcut``. When the shape changes the
    shortcut is ``conv1x1(stride)`` applied to ``relu(bn1(x))`` (the WRN convention), otherwise
    it is ``x`` itself.
    """

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output (a new tensor; the input is not modified)."""
        pre = F.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(F.relu(self.bn2(out)))
        skip = x if self.shortcut is None else self.shortcut(pre)
        return out + skip


class WideResNet(GlobalPoolTapModel):
    """WRN-``depth``-``widen`` for 8..64 px images.

    Stem ``Conv3x3(stride 1, w)`` (``w = width``, 16 in the paper), three groups of
    ``n = (depth - 4) / 6`` :class:`PreActBlock` with widths ``w*k, 2w*k, 4w*k`` and strides 1, 2,
    2, then ``BN -> ReLU``, global average pool and ``classifier = Linear(4w*k, num_classes)``.
    WRN-16-2: ``n = 2``, widths 32, 64, 128, a 128-d embedding. ``depth`` must be ``6n + 4``.
    Accepts any spatial size (global pool); checks only the channels.

    Tiny images: a stride-2 group that would leave a map smaller than 2x2 uses stride 1 (as in
    :class:`ddkit.models.resnet.ResNet18`).

    Taps: ``stem`` ``[N, w, S, S]``, ``group1`` .. ``group3`` (``group3`` is
    ``[N, 4w*k, S/4, S/4]``, before the final BN), ``features`` (after the final BN -> ReLU, before
    the pool), ``embedding`` ``[N, 4w*k]``, ``logits``.
    """


    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        depth: int = 16,
        widen: int = 2,
        width: int = 16,
        arch: str = "wrn",
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, arch=arch)
        depth = check_positive_int(arch, "depth", depth, minimum=10)
        if (depth - 4) % 6:
            raise DDKitError(
                f"{arch}: depth={depth} is not valid; a wide ResNet has depth 6n + 4 "
                "(10, 16, 22, 28, 40)"
            )
        widen = check_positive_int(arch, "widen", widen)
        width = check_positive_int(arch, "width", width)
        self.depth, self.widen, self.width = depth, widen, width
        n = (depth - 4) // 6

        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        planes_in = width
        size = image_size
        groups = []
        for mult, stride in ((1, 1), (2, 2), (4, 2)):
            planes = width * widen * mult
            if stride == 2 and (size + 1) // 2 < 2:
                stride = 1  # tiny images: keep maps >= 2x2
            size = (size + 1) // 2 if stride == 2 else size
            blocks = []
            for i in range(n):
                blocks.append(PreActBlock(planes_in, planes, stride if i == 0 else 1))
                planes_in = planes
            groups.append(nn.Sequential(*blocks))
        self.group1, self.group2, self.group3 = groups
        self.bn_final = nn.BatchNorm2d(planes_in)
        self.embedding_dim = planes_in
        self.classifier = nn.Linear(planes_in, num_classes)
        self._tap_names = ("stem", "group1", "group2", "group3", "features", "embedding", "logits")

    def _stream(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        h = self.conv1(x)
        yield "stem", h
        for name in ("group1", "group2", "group3"):
            h = getattr(self, name)(h)
            yield name, h
        h = F.relu(self.bn_final(h))
        yield from self._pooled_tail(h)


@register("wrn")
def wrn(
    in_channels: int,
    num_classes: int,
    image_size: int,
    depth: int = 16,
    widen: int = 2,
    width: int = 16,
) -> WideResNet:
    """Wide ResNet factory. Options: depth (16; 6n + 4), widen (2), width (stem width, 16)."""
    return WideResNet(in_channels, num_classes, image_size, depth, widen, width, "wrn")


@register("wrn16_2")
def wrn16_2(in_channels: int, num_classes: int, image_size: int, width: int = 16) -> WideResNet:
    """WRN-16-2 (the G-VBSM pool's). Option: width (stem width, 16; the quick tier shrinks it)."""
    return WideResNet(in_channels, num_classes, image_size, 16, 2, width, "wrn16_2")
