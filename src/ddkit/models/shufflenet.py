"""ShuffleNetV2 (Ma et al., ECCV 2018) for small images, in two forms.

Each stage starts with a down-sampling unit (two branches, both stride 2, concatenated) followed by
basic units (channel split in halves, one half through ``1x1 -> 3x3 depthwise -> 1x1``, the other
untouched, concatenated), and every unit ends with a channel shuffle over 2 groups. No max-pool
after the stem, so a 32 px image reaches the head as a 4x4 map. The two registered forms differ
only in the stem:

* ``shufflenetv2_crd``: a 1x1 stem, as in the ShuffleNetV2 of the CRD model zoo (Tian et al.,
  "Contrastive Representation Distillation", ICLR 2020) that G-VBSM (Shao et al., CVPR 2024) uses
  as its ``ShuffleNetV2_0_5`` teacher.
* ``shufflenetv2``: ddkit's form with a 3x3 stem (the common CIFAR adaptation). It is not a G-VBSM
  teacher.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from ddkit.errors import DDKitError
from ddkit.models.base import GlobalPoolTapModel, check_positive_int
from ddkit.models.mobilenet import check_width_mult
from ddkit.models.registry import register

#: stage output channels of Table 5 of the ShuffleNetV2 paper, by width multiplier
SHUFFLENETV2_CHANNELS = {
    0.5: (48, 96, 192),
    1.0: (116, 232, 464),
    1.5: (176, 352, 704),
    2.0: (244, 488, 976),
}
STAGE_REPEATS = (4, 8, 4)
STEM_CHANNELS = 24


def stage_channels(width_mult: float) -> tuple[int, int, int]:
    """Output channels of the three stages for ``width_mult``.

    The paper's table for 0.5, 1.0, 1.5 and 2.0; any other multiplier scales the x0.5 row
    (``96 * width_mult * (1, 2, 4)``) rounded to an even number >= 2, so that the channel split
    works (the quick tier uses this for x0.25: 24, 48, 96).
    """
    if width_mult in SHUFFLENETV2_CHANNELS:
        return SHUFFLENETV2_CHANNELS[width_mult]
    base = 96.0 * width_mult
    return tuple(max(2, 2 * round(base * m / 2)) for m in (1, 2, 4))  # type: ignore[return-value]


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``x`` ``[N, C, H, W]`` from ``groups`` groups.

    ``C`` must be a multiple of ``groups``.

    Channel ``g * (C / groups) + i`` moves to position ``i * groups + g``.
    """
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _conv_bn_relu(in_ch: int, out_ch: int) -> list[nn.Module]:
    return [nn.Conv2d(in_ch, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


def _dw_bn(ch: int, stride: int) -> list[nn.Module]:
    return [
        nn.Conv2d(ch, ch, 3, stride=stride, padding=1, groups=ch, bias=False),
        nn.BatchNorm2d(ch),
    ]


class ShuffleUnit(nn.Module):
    """One ShuffleNetV2 unit, ``[N, in_ch, H, W] -> [N, out_ch, H / stride, W / stride]``.

    ``down=False`` (basic unit, needs ``in_ch == out_ch``, stride 1): split the channels in two
    halves, keep the first, pass the second through ``branch2`` =
    ``1x1 -> BN -> ReLU -> 3x3 dw -> BN -> 1x1 -> BN -> ReLU``, concatenate, shuffle.
    ``down=True`` (first unit of a stage): ``branch1`` = ``3x3 dw(stride) -> BN -> 1x1 -> BN ->
    ReLU`` on the whole input, ``branch2`` as above with the depthwise conv strided, each giving
    ``out_ch / 2`` channels, concatenated, shuffled. ``stride`` may be 1 in a down unit (tiny
    images); it still changes the width.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, down: bool) -> None:
        super().__init__()
        half = out_ch // 2
        self.down = down
        if down:
            self.branch1 = nn.Sequential(*_dw_bn(in_ch, stride), *_conv_bn_relu(in_ch, half))
            branch_in = in_ch
        else:
            self.branch1 = None
            branch_in = half
        self.branch2 = nn.Sequential(
            *_conv_bn_relu(branch_in, half), *_dw_bn(half, stride), *_conv_bn_relu(half, half)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Unit output (a new tensor; the input is not modified)."""
        if self.down:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        else:
            keep, work = x.chunk(2, dim=1)
            out = torch.cat((keep, self.branch2(work)), dim=1)
        return channel_shuffle(out, 2)


class ShuffleNetV2(GlobalPoolTapModel):
    """ShuffleNetV2 for 8..64 px images.

    Stem ``Conv(stride 1, 24) -> BN -> ReLU`` (no max-pool), 3x3 (``crd=False``) or 1x1
    (``crd=True``, the CRD zoo's), stages ``stage2`` .. ``stage4``
    of 4, 8, 4 :class:`ShuffleUnit` (the first a down-sampling unit, stride 2) with
    :func:`stage_channels` widths (x0.5: 48, 96, 192), a head ``Conv1x1(last) -> BN -> ReLU``
    (``last`` = 1024, 2048 for ``width_mult`` 2.0, or ``last_channels``), global average pool and
    ``classifier = Linear(last, num_classes)``. Accepts any spatial size; checks only the channels.
    With ``crd=True`` and ``width_mult`` 0.5 this is G-VBSM's ``ShuffleNetV2_0_5`` teacher;
    :func:`ddkit.models.crd.load_crd_state_dict` loads its checkpoints.

    Tiny images: a stage whose stride 2 would leave a map smaller than 2x2 uses stride 1 (as in
    :class:`ddkit.models.resnet.ResNet18`). 32 px inputs give maps 32, 16, 8, 4.

    Taps: ``stem`` ``[N, 24, S, S]``, ``stage2`` .. ``stage4`` (``stage4`` is
    ``[N, c4, S/8, S/8]``), ``head`` ``[N, last, S/8, S/8]``, ``features`` (= ``head``, before the
    pool), ``embedding`` ``[N, last]``, ``logits`` ``[N, num_classes]``.
    """


    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width_mult: float = 0.5,
        last_channels: int | None = None,
        arch: str = "shufflenetv2",
        crd: bool = False,
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, arch=arch)
        width_mult = check_width_mult(arch, width_mult)
        if last_channels is None:
            last_channels = 2048 if width_mult >= 2.0 else 1024
        last_channels = check_positive_int(arch, "last_channels", last_channels)
        self.width_mult, self.last_channels = width_mult, last_channels
        channels = stage_channels(width_mult)
        if any(c % 2 for c in channels):  # cannot happen with stage_channels; a guard for edits
            raise DDKitError(f"{arch}: stage widths {channels} must be even; change width_mult")

        self.crd = crd
        stem_kernel = 1 if crd else 3
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, STEM_CHANNELS, stem_kernel, stride=1, padding=stem_kernel // 2, bias=False),
            nn.BatchNorm2d(STEM_CHANNELS),
            nn.ReLU(),
        )
        in_ch = STEM_CHANNELS
        size = image_size
        stages = []
        for out_ch, repeats in zip(channels, STAGE_REPEATS):
            stride = 2
            if (size + 1) // 2 < 2:
                stride = 1  # tiny images: keep maps >= 2x2
            size = (size + 1) // 2 if stride == 2 else size
            units = [ShuffleUnit(in_ch, out_ch, stride, down=True)]
            units += [ShuffleUnit(out_ch, out_ch, 1, down=False) for _ in range(repeats - 1)]
            stages.append(nn.Sequential(*units))
            in_ch = out_ch
        self.stage2, self.stage3, self.stage4 = stages
        self.head = nn.Sequential(*_conv_bn_relu(in_ch, last_channels))
        self.embedding_dim = last_channels
        self.classifier = nn.Linear(last_channels, num_classes)
        self._tap_names = (
            "stem", "stage2", "stage3", "stage4", "head", "features", "embedding", "logits",
        )  # fmt: skip

    def _stream(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        h = self.stem(x)
        yield "stem", h
        for name in ("stage2", "stage3", "stage4"):
            h = getattr(self, name)(h)
            yield name, h
        h = self.head(h)
        yield "head", h
        yield from self._pooled_tail(h)


@register("shufflenetv2")
def shufflenetv2(
    in_channels: int,
    num_classes: int,
    image_size: int,
    width_mult: float = 0.5,
    last_channels: int | None = None,
) -> ShuffleNetV2:
    """ddkit's ShuffleNetV2 (3x3 stem; not the G-VBSM teacher, which is ``shufflenetv2_crd``).
    Options: width_mult (0.5; the paper's 0.5/1.0/1.5/2.0 widths, other values scale the x0.5
    row), last_channels (None = 1024, 2048 at x2.0)."""
    return ShuffleNetV2(in_channels, num_classes, image_size, width_mult, last_channels)


@register("shufflenetv2_crd")
def shufflenetv2_crd(
    in_channels: int,
    num_classes: int,
    image_size: int,
    width_mult: float = 0.5,
    last_channels: int | None = None,
) -> ShuffleNetV2:
    """The CRD zoo's ShuffleNetV2 (1x1 stem), G-VBSM's ``ShuffleNetV2_0_5`` teacher at the default
    width_mult 0.5. Options: width_mult (0.5), last_channels (None = 1024, 2048 at x2.0)."""
    return ShuffleNetV2(in_channels, num_classes, image_size, width_mult, last_channels,
                        arch="shufflenetv2_crd", crd=True)
