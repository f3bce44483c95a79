"""MobileNetV2 (Sandler et al., CVPR 2018) for small images, in two forms.

Inverted residual blocks (1x1 expand -> 3x3 depthwise -> 1x1 linear projection, BatchNorm after
every conv, an activation after the first two), a residual connection when the block keeps its
shape. Two registered forms share this code:

* ``mobilenetv2_crd``: the MobileNetV2 of the CRD model zoo (Tian et al., "Contrastive
  Representation Distillation", ICLR 2020) that G-VBSM (Shao et al., CVPR 2024) uses as a teacher
  (``mobile_half``): a stride-2 stem, ReLU, widths ``int(c * width_mult)`` and a 1x1 expand conv in
  every block, also where the expansion is 1. A 32 px image reaches the head as a 2x2 map.
* ``mobilenetv2``: ddkit's own small-image form of the paper's network: a stride-1 stem, ReLU6,
  widths rounded to multiples of 8, no expand conv where the expansion is 1, and stage 2 at stride
  1, so a 32 px image reaches the head as a 4x4 map. It is not a G-VBSM teacher.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ddkit.errors import DDKitError
from ddkit.models.base import GlobalPoolTapModel, check_positive_int
from ddkit.models.registry import register

# (expansion t, output channels c, repeats n, first stride s) of the seven bottleneck stages, as
# in Table 2 of the MobileNetV2 paper with the CIFAR change: stage 2 has stride 1, not 2.
MOBILENETV2_STAGES = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)
STEM_CHANNELS = 32
LAST_CHANNELS = 1280


def make_divisible(value: float, divisor: int = 8) -> int:
    """Round a channel count to the nearest multiple of ``divisor`` (at least ``divisor``).

    The usual MobileNet rule: never go more than 10 % below ``value``.
    """
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def check_width_mult(arch: str, value: object) -> float:
    """Return ``value`` as a float if it is a positive finite number, else raise DDKitError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1e3:
        raise DDKitError(
            f"{arch}: width_mult={value!r} is not valid; give a positive number such as 0.5 or 1.0"
        )
    return float(value)


def _conv_bn(in_ch: int, out_ch: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    """``Conv(kernel, stride, 'same' padding, no bias) -> BatchNorm2d``."""
    return nn.Sequential(
        nn.Conv2d(
            in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False
        ),
        nn.BatchNorm2d(out_ch),
    )


class InvertedResidual(nn.Module):
    """``[N, in_ch, H, W] -> [N, out_ch, H / stride, W / stride]``.

    ``expand``: 1x1 conv to ``in_ch * t`` -> BN -> activation (left out when ``t == 1`` unless
    ``expand_always``); ``depthwise``: 3x3 depthwise conv (stride) -> BN -> activation;
    ``project``: 1x1 conv -> BN, no activation (the linear bottleneck). Adds the input when
    ``stride == 1`` and ``in_ch == out_ch``. ``activation`` is ``F.relu6`` or ``F.relu``.
    """

    def __init__(self, in_ch: int, out_ch: int, stride: int, expansion: int,
                 activation: Callable[[torch.Tensor], torch.Tensor] = F.relu6,
                 expand_always: bool = False) -> None:
        super().__init__()
        hidden = in_ch * expansion
        self.use_residual = stride == 1 and in_ch == out_ch
        self.activation = activation
        self.expand = _conv_bn(in_ch, hidden, 1, 1) if expansion != 1 or expand_always else None
        self.depthwise = _conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.project = _conv_bn(hidden, out_ch, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Block output (a new tensor; the input is not modified)."""
        h = x if self.expand is None else self.activation(self.expand(x))
        h = self.activation(self.depthwise(h))
        h = self.project(h)
        return x + h if self.use_residual else h


class MobileNetV2(GlobalPoolTapModel):
    """MobileNetV2 for 8..64 px images, any ``width_mult``, in ddkit's or the CRD form.

    Stem ``Conv3x3(c0) -> BN -> act``, the seven bottleneck stages of :data:`MOBILENETV2_STAGES`
    (strides 1, 1, 2, 2, 1, 2, 1), a head ``Conv1x1(last) -> BN -> act``, global average pool and
    ``classifier = Linear(last, num_classes)``. ``last`` is 1280 for ``width_mult <= 1`` (the paper
    does not shrink the last conv) and ``width_mult * 1280`` rounded above; ``last_channels``
    overrides it (the quick tier uses a small value). Accepts any spatial size (global pool);
    checks only the channels.

    ``crd=False`` (``mobilenetv2``): stem stride 1, ``act`` = ReLU6, channels
    ``make_divisible(c * width_mult)``, no expand conv where ``t == 1``. 32 px inputs give maps 32,
    32, 32, 16, 8, 8, 4, 4.

    ``crd=True`` (``mobilenetv2_crd``): the CRD zoo's network (G-VBSM's ``MobileNetV2`` teacher at
    ``width_mult`` 0.5): stem stride 2, ``act`` = ReLU, channels ``int(c * width_mult)`` (no
    rounding), and the expand conv in every block. 32 px inputs give maps 16, 16, 16, 8, 4, 4, 2,
    2. The reference pools the 2x2 head map with ``AvgPool2d(2, ceil_mode=True)``, which is the
    global average used here. It starts from the CRD code's initialisation (:meth:`_crd_init`).
    :func:`ddkit.models.crd.load_crd_state_dict` loads its checkpoints.

    Tiny images: a stride-2 stage that would leave a map smaller than 2x2 uses stride 1 (as in
    :class:`ddkit.models.resnet.ResNet18`); from 17 px up (``crd=True``) or 9 px up
    (``crd=False``) no stage is affected.

    Taps: ``stem``, ``stage1`` .. ``stage7`` (each stage's output), ``head`` ``[N, last, h, h]``,
    ``features`` (= ``head``, before the pool), ``embedding`` ``[N, last]``, ``logits``
    ``[N, num_classes]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width_mult: float = 0.5,
        last_channels: int | None = None,
        arch: str = "mobilenetv2",
        crd: bool = False,
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, arch=arch)
        width_mult = check_width_mult(arch, width_mult)
        self.crd = crd
        # the CRD code truncates (int), ddkit's form rounds to multiples of 8
        scaled = (lambda c: int(c * width_mult)) if crd else (lambda c: make_divisible(c * width_mult))
        if last_channels is None:
            last_channels = scaled(LAST_CHANNELS) if width_mult > 1.0 else LAST_CHANNELS
        last_channels = check_positive_int(arch, "last_channels", last_channels)
        self.width_mult, self.last_channels = width_mult, last_channels
        self._act = F.relu if crd else F.relu6
        if scaled(MOBILENETV2_STAGES[0][1]) < 1:
            raise DDKitError(f"{arch}: width_mult={width_mult} leaves a stage without channels; give at least "
                             f"{1 / MOBILENETV2_STAGES[0][1]}")

        stem_ch = scaled(STEM_CHANNELS)
        stem_stride = 2 if crd else 1
        self.stem = _conv_bn(in_channels, stem_ch, 3, stem_stride)
        size = (image_size + 1) // 2 if crd else image_size
        in_ch = stem_ch
        stages = []
        for expansion, channels, repeats, stride in MOBILENETV2_STAGES:
            out_ch = scaled(channels)
            if stride == 2 and (size + 1) // 2 < 2:
                stride = 1  # tiny images: keep maps >= 2x2
            size = (size + 1) // 2 if stride == 2 else size
            blocks = []
            for i in range(repeats):
                blocks.append(InvertedResidual(in_ch, out_ch, stride if i == 0 else 1, expansion,
                                               self._act, expand_always=crd))
                in_ch = out_ch
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.ModuleList(stages)
        self.head = _conv_bn(in_ch, last_channels, 1, 1)
        self.embedding_dim = last_channels
        self.classifier = nn.Linear(last_channels, num_classes)
        self._tap_names = (
            "stem",
            *(f"stage{i + 1}" for i in range(len(stages))),
            "head",
            "features",
            "embedding",
            "logits",
        )
        if crd:
            self._crd_init()

    def _crd_init(self) -> None:
        """The CRD code's initialisation: convs He-normal over the fan-out (std sqrt(2 / (k * k *
        out_channels))), BatchNorm weight 1 and bias 0, the classifier N(0, 0.01) with bias 0."""
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, 0.0, 0.01)
                nn.init.zeros_(module.bias)

    def _stream(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        h = self._act(self.stem(x))
        yield "stem", h
        for i, stage in enumerate(self.stages):
            h = stage(h)
            yield f"stage{i + 1}", h
        h = self._act(self.head(h))
        yield "head", h
        yield from self._pooled_tail(h)


@register("mobilenetv2")
def mobilenetv2(
    in_channels: int,
    num_classes: int,
    image_size: int,
    width_mult: float = 0.5,
    last_channels: int | None = None,
) -> MobileNetV2:
    """ddkit's small-image MobileNetV2 (stride-1 stem, ReLU6; not the G-VBSM teacher, which is
    ``mobilenetv2_crd``). Options: width_mult (0.5), last_channels (None = 1280, the paper's head
    width for width_mult <= 1)."""
    return MobileNetV2(in_channels, num_classes, image_size, width_mult, last_channels)


@register("mobilenetv2_crd")
def mobilenetv2_crd(
    in_channels: int,
    num_classes: int,
    image_size: int,
    width_mult: float = 0.5,
    last_channels: int | None = None,
) -> MobileNetV2:
    """The CRD zoo's MobileNetV2 (stride-2 stem, ReLU, a 1x1 expand conv in every block), G-VBSM's
    ``MobileNetV2`` teacher at the default width_mult 0.5 (the CRD ``mobile_half``). Options:
    width_mult (0.5), last_channels (None = 1280 for width_mult <= 1)."""
    return MobileNetV2(in_channels, num_classes, image_size, width_mult, last_channels,
                       arch="mobilenetv2_crd", crd=True)
