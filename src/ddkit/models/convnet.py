"""ConvNet: the standard backbone of dataset distillation (DC / DSA / DM / MTT and followers).

``depth`` blocks of ``Conv3x3(width) -> norm -> activation -> pool 2x2``, then flatten and one
``Linear``. Modules sit in ``features`` (an ``nn.Sequential``; a norm or pool of ``"none"`` adds
no module) and ``classifier``, the same layout and names as the reference DC code.
"""

from __future__ import annotations

import math

from torch import nn

from ddkit.errors import DDKitError
from ddkit.models.base import NORMS, AvgPool2x2, SequentialTapModel, check_choice, check_positive_int, make_norm
from ddkit.models.registry import register

POOLINGS = ("avg", "max", "none")
ACTIVATIONS = ("relu", "leakyrelu", "sigmoid", "gelu")


def default_depth(image_size: int) -> int:
    """Usual ConvNet depth for square images of side ``image_size``.

    3 up to 32 px (8 px digits give 8 -> 4 -> 2 -> 1), then one more block per doubling:
    4 for 64, 5 for 128, 6 for 256.
    """
    size = check_positive_int("convnet", "image_size", image_size)
    if size <= 32:
        return 3
    return 3 + math.ceil(math.log2(size / 32))


def _activation(kind: str) -> nn.Module:
    # ReLU in place: it follows a conv or a norm, whose backward needs their input, not their output,
    # so the values and gradients are the same with one map less to allocate and write per block
    # (docs/speed.md)
    if kind == "relu":
        return nn.ReLU(inplace=True)
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=False)
    if kind == "sigmoid":
        return nn.Sigmoid()
    return nn.GELU()


class ConvNet(SequentialTapModel):
    """ConvNet-D (D = ``depth``) with ``width`` channels per block.

    Input ``[N, in_channels, S, S]`` with ``S = image_size``. Each block keeps the spatial size
    through the 3x3 conv (padding 1) and halves it in the 2x2 pool (floor). One-channel 28 px
    images (MNIST-like) get padding 3 in the first conv, so they behave like 32 px: at depth 3 the
    final map is ``[N, width, 4, 4]`` and the embedding is 2048-d for width 128. (The reference
    code pads every one-channel input by 3; here only 28 px ones are, so 8 px one-channel digits
    go 8 -> 4 -> 2 -> 1 like three-channel ones.)

    Norms: ``instance`` = ``GroupNorm(width, width)``, ``group`` = ``GroupNorm(4, width)``,
    ``batch`` = ``BatchNorm2d(width)``, ``none`` = no layer, all with affine parameters.
    ``layer`` = ``GroupNorm(1, width)``: it normalises each sample over C, H, W like the
    reference code's ``nn.LayerNorm([C, H, W])``, but its affine is per channel instead of per
    element, so it does not depend on the map size.

    Taps:
        ``block0`` .. ``block{depth-1}``: output of each block's activation, before the pool,
        ``[N, width, h_i, h_i]``.
        ``features``: the final map after the last pool ``[N, width, h, h]``.
        ``embedding``: ``features`` flattened, ``[N, width * h * h]``.
        ``logits``: ``[N, num_classes]``.
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int,
        width: int = 128,
        depth: int = 3,
        norm: str = "instance",
        pooling: str = "avg",
        activation: str = "relu",
    ) -> None:
        super().__init__(in_channels, num_classes, image_size, arch="convnet")
        width = check_positive_int("convnet", "width", width)
        depth = check_positive_int("convnet", "depth", depth)
        norm = check_choice("convnet", "norm", norm, NORMS)
        pooling = check_choice("convnet", "pooling", pooling, POOLINGS)
        activation = check_choice("convnet", "activation", activation, ACTIVATIONS)
        self.width, self.depth, self.norm, self.pooling = width, depth, norm, pooling
        self.activation = activation

        layers: list[nn.Module] = []
        tap_after: dict[int, str] = {}  # index in `features` -> tap name yielded after it
        size = image_size
        channels = in_channels
        for d in range(depth):
            pad = 3 if (d == 0 and in_channels == 1 and image_size == 28) else 1
            layers.append(nn.Conv2d(channels, width, kernel_size=3, padding=pad))
            size = size + 2 * pad - 2
            norm_layer = make_norm(norm, width, "convnet")
            if norm_layer is not None:
                layers.append(norm_layer)
            layers.append(_activation(activation))
            tap_after[len(layers) - 1] = f"block{d}"
            if pooling != "none":
                if size // 2 < 1:
                    hint = f"use depth <= {d} or pooling='none'" if d else "use pooling='none'"
                    raise DDKitError(
                        f"convnet: depth {depth} pools a {image_size}px image below 1x1 at block "
                        f"{d}; {hint}"
                    )
                layers.append(AvgPool2x2() if pooling == "avg" else nn.MaxPool2d(2, 2))
                size //= 2
            channels = width
        self._finish(layers, tap_after, (width, size, size), num_classes)



@register("convnet")
def convnet(
    in_channels: int,
    num_classes: int,
    image_size: int,
    width: int = 128,
    depth: int | None = 3,
    norm: str = "instance",
    pooling: str = "avg",
    activation: str = "relu",
) -> ConvNet:
    """ConvNet factory; ``depth=None`` means :func:`default_depth` of ``image_size``.

    Options: width (128), depth (3), norm (instance | batch | group | layer | none),
    pooling (avg | max | none), activation (relu | leakyrelu | sigmoid | gelu).
    """
    if depth is None:
        depth = default_depth(image_size)
    return ConvNet(in_channels, num_classes, image_size, width, depth, norm, pooling, activation)
