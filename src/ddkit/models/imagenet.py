"""ImageNet-layout networks whose state-dict keys are torchvision's, so its checkpoints load as is.

The statistics family's ImageNet recipes start from off-the-shelf torchvision networks (SRe2L,
Yin et al. 2023; CDA, Yin & Shen 2024; G-VBSM, Shao et al. 2024). These are the same networks
written for ddkit, module for module, so ``model.load_state_dict(torch.load("resnet18.pth",
weights_only=True))`` works on a checkpoint saved from torchvision (or a ``.safetensors`` of it),
and the logits are torchvision's (tests/test_imagenet_models.py checks both against torchvision):

* ``imagenet_resnet18`` / ``imagenet_resnet50``: He et al. 2016, "Deep Residual Learning for
  Image Recognition", with the 7x7 stride-2 stem and 3x3 max-pool (v1.5: the stride of a
  bottleneck on its 3x3 conv); final layer ``fc``.
* ``imagenet_mobilenet_v2``: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks", ``width_mult`` 1.0; final layers ``classifier`` = (Dropout 0.2, Linear).
* ``imagenet_shufflenet_v2``: Ma et al. 2018, "ShuffleNet V2: Practical Guidelines for Efficient
  CNN Architecture Design", ``multiplier`` x0.5 (default), x1.0, x1.5 or x2.0; final layer ``fc``.
* ``imagenet_efficientnet_b0``: Tan & Le 2019, "EfficientNet: Rethinking Model Scaling for
  Convolutional Neural Networks", B0 (MBConv with squeeze-and-excitation, SiLU, stochastic depth
  0.2 in training); final layers ``classifier`` = (Dropout 0.2, Linear).

Each is a :class:`~ddkit.models.base.TapModel` that takes any input size (a global average pool
before the classifier); the taps are the stem, each stage, ``embedding`` and ``logits``. For
these models ``model.classifier`` is the final ``nn.Linear`` as for every ddkit model.
:data:`TORCHVISION_NAMES` maps torchvision's model names to them.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ddkit.models.base import TapModel, check_choice, check_positive_int
from ddkit.models.registry import register

#: torchvision model name -> (ddkit model name, options)
TORCHVISION_NAMES = {
    "resnet18": ("imagenet_resnet18", {}),
    "resnet50": ("imagenet_resnet50", {}),
    "mobilenet_v2": ("imagenet_mobilenet_v2", {}),
    "shufflenet_v2_x0_5": ("imagenet_shufflenet_v2", {"multiplier": "x0.5"}),
    "shufflenet_v2_x1_0": ("imagenet_shufflenet_v2", {"multiplier": "x1.0"}),
    "efficientnet_b0": ("imagenet_efficientnet_b0", {}),
}


def _init_conv_bn(model: nn.Module) -> None:
    """torchvision's initialisation: convolutions Kaiming-normal (fan out, ReLU), BatchNorm 1 / 0."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)


class _ImageNetModel(TapModel):
    """Shared parts: any input size; ``_stages()`` gives ``(tap name, module)`` in order and
    ``_head(x)`` the pooled, flattened embedding."""

    fixed_input_size = False

    def _stages(self) -> list[tuple[str, nn.Module]]:
        raise NotImplementedError

    def _stream(self, x: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
        for name, module in self._stages():
            x = module(x)
            yield name, x
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        yield "embedding", x
        yield "logits", self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)

    @property
    def classifier(self) -> nn.Linear:  # the final Linear (``fc`` in torchvision's key names)
        return self.fc


# ---- ResNet --------------------------------------------------------------------------------------
class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (``downsample`` = 1x1 conv + BN where the shape changes)."""

    expansion = 1

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C', H/s, W/s]``: two 3x3 convs plus the (downsampled) input."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here, "v1.5") -> 1x1 x4, with a shortcut."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, 4P, H/s, W/s]``: 1x1 -> 3x3 -> 1x1 convs plus the (downsampled) input."""
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.relu(self.bn3(self.conv3(out)) + identity)


class ImageNetResNet(_ImageNetModel):
    """ResNet with the ImageNet stem (7x7/2 conv, BN, ReLU, 3x3/2 max-pool), four stages, global
    average pool and ``fc``; taps ``stem``, ``layer1`` .. ``layer4``, ``embedding``, ``logits``."""

    def __init__(self, block, layers: list[int], in_channels: int, num_classes: int, image_size: int, arch: str,
                 width: int = 64):
        super().__init__(in_channels, num_classes, image_size, arch=arch)
        width = check_positive_int(arch, "width", width)
        self.inplanes = width
        self.conv1 = nn.Conv2d(in_channels, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = self._make_layer(block, width, layers[0], 1)
        self.layer2 = self._make_layer(block, 2 * width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * width, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * width, layers[3], 2)
        self.fc = nn.Linear(8 * width * block.expansion, num_classes)
        del self.inplanes
        self.embedding_dim = 8 * width * block.expansion
        self._tap_names = ("stem", "layer1", "layer2", "layer3", "layer4", "embedding", "logits")
        _init_conv_bn(self)

    def _make_layer(self, block, planes: int, blocks: int, stride: int) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, 1, stride, bias=False),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _stages(self):
        return [("stem", self._stem), ("layer1", self.layer1), ("layer2", self.layer2), ("layer3", self.layer3),
                ("layer4", self.layer4)]


@register("imagenet_resnet18")
def imagenet_resnet18(in_channels: int, num_classes: int, image_size: int, width: int = 64) -> ImageNetResNet:
    """ResNet-18 (BasicBlock x [2, 2, 2, 2]) with torchvision's module names; 11.7 M parameters at 1000
    classes. ``width``: channels of the first stage (64 = torchvision's; smaller for quick tiers)."""
    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], in_channels, num_classes, image_size, "imagenet_resnet18", width)


@register("imagenet_resnet50")
def imagenet_resnet50(in_channels: int, num_classes: int, image_size: int, width: int = 64) -> ImageNetResNet:
    """ResNet-50 (Bottleneck x [3, 4, 6, 3]) with torchvision's module names; 25.6 M parameters at 1000
    classes. ``width`` as for ``imagenet_resnet18``."""
    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], in_channels, num_classes, image_size, "imagenet_resnet50", width)


# ---- MobileNetV2 ---------------------------------------------------------------------------------
def _divisible(value: float, divisor: int = 8) -> int:
    """Round ``value`` to a multiple of ``divisor``, never below 90 % of it (the MobileNet rule)."""
    new = max(divisor, int(value + divisor / 2) // divisor * divisor)
    return new + divisor if new < 0.9 * value else new


def _conv_bn_act(inp: int, oup: int, kernel: int, stride: int, groups: int = 1, act=nn.ReLU6) -> nn.Sequential:
    """torchvision's Conv2dNormActivation: conv (no bias) [0], BatchNorm [1], activation [2]."""
    layers = [nn.Conv2d(inp, oup, kernel, stride, (kernel - 1) // 2, groups=groups, bias=False), nn.BatchNorm2d(oup)]
    if act is not None:
        layers.append(act(inplace=True))
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion (unless ``expand_ratio`` 1), 3x3 depthwise, 1x1 linear
    projection, with the input added where stride is 1 and the widths agree. Sub-modules in ``conv``."""

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int):
        super().__init__()
        hidden = int(round(inp * expand_ratio))
        self.use_res_connect = stride == 1 and inp == oup
        layers = [] if expand_ratio == 1 else [_conv_bn_act(inp, hidden, 1, 1)]
        layers += [_conv_bn_act(hidden, hidden, 3, stride, groups=hidden), nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
                   nn.BatchNorm2d(oup)]
        self.conv = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C', H/s, W/s]``; the input is added back when shapes allow."""
        return x + self.conv(x) if self.use_res_connect else self.conv(x)


class ImageNetMobileNetV2(_ImageNetModel):
    """MobileNetV2 (``features`` 0..18, ``classifier`` = Dropout(0.2), Linear); taps ``features.<i>``
    after each of the 19 feature modules, ``embedding``, ``logits``."""

    SETTING = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
               (6, 320, 1, 1)]

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width_mult: float = 1.0,
                 dropout: float = 0.2):
        super().__init__(in_channels, num_classes, image_size, arch="imagenet_mobilenet_v2")
        channels = _divisible(32 * width_mult)
        last = _divisible(1280 * max(1.0, width_mult))
        features = [_conv_bn_act(in_channels, channels, 3, 2)]
        for t, c, n, s in self.SETTING:
            out = _divisible(c * width_mult)
            for i in range(n):
                features.append(InvertedResidual(channels, out, s if i == 0 else 1, t))
                channels = out
        features.append(_conv_bn_act(channels, last, 1, 1))
        self.features = nn.Sequential(*features)
        self._modules["classifier"] = nn.Sequential(nn.Dropout(dropout), nn.Linear(last, num_classes))
        self.embedding_dim = last
        self._tap_names = (*(f"features.{i}" for i in range(len(features))), "embedding", "logits")
        _init_conv_bn(self)
        linear = self._modules["classifier"][1]
        nn.init.normal_(linear.weight, 0, 0.01)
        nn.init.zeros_(linear.bias)

    @property
    def classifier(self) -> nn.Linear:
        """The final Linear layer (torchvision's key prefix ``classifier.1``)."""
        return self._modules["classifier"][1]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules["classifier"](x)

    def _stages(self):
        return [(f"features.{i}", module) for i, module in enumerate(self.features)]


@register("imagenet_mobilenet_v2")
def imagenet_mobilenet_v2(in_channels: int, num_classes: int, image_size: int, width_mult: float = 1.0
                          ) -> ImageNetMobileNetV2:
    """MobileNetV2 with torchvision's module names (``width_mult`` 1.0: 3.5 M parameters at 1000 classes)."""
    return ImageNetMobileNetV2(in_channels, num_classes, image_size, float(width_mult))


# ---- ShuffleNetV2 --------------------------------------------------------------------------------
SHUFFLENET_WIDTHS = {"x0.5": [24, 48, 96, 192, 1024], "x1.0": [24, 116, 232, 464, 1024],
                     "x1.5": [24, 176, 352, 704, 1024], "x2.0": [24, 244, 488, 976, 2048]}


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave the channels of ``groups`` groups: ``[N, g*c, H, W]`` -> the same shape."""
    n, channels, h, w = x.shape
    return x.view(n, groups, channels // groups, h, w).transpose(1, 2).reshape(n, channels, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's unit: a split (stride 1) or two branches (stride 2), concatenated and shuffled."""

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = oup // 2
        if stride > 1:
            self.branch1 = nn.Sequential(
                nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch, 1, 1, 0, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch, branch, 1, 1, 0, bias=False), nn.BatchNorm2d(branch),
            nn.ReLU(inplace=True),
            nn.Conv2d(branch, branch, 3, stride, 1, groups=branch, bias=False), nn.BatchNorm2d(branch),
            nn.Conv2d(branch, branch, 1, 1, 0, bias=False), nn.BatchNorm2d(branch), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C', H/s, W/s]``: split (or two branches at stride 2), concat, shuffle."""
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)


class ImageNetShuffleNetV2(_ImageNetModel):
    """ShuffleNetV2 (``conv1``, ``maxpool``, ``stage2``-``stage4``, ``conv5``, ``fc``); taps ``stem``,
    ``stage2``, ``stage3``, ``stage4``, ``conv5``, ``embedding``, ``logits``."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, multiplier: str = "x0.5"):
        super().__init__(in_channels, num_classes, image_size, arch="imagenet_shufflenet_v2")
        widths = SHUFFLENET_WIDTHS[check_choice("imagenet_shufflenet_v2", "multiplier", multiplier,
                                                list(SHUFFLENET_WIDTHS))]
        self.conv1 = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 2, 1, bias=False), nn.BatchNorm2d(widths[0]),
                                   nn.ReLU(inplace=True))
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        channels = widths[0]
        for name, repeats, out in zip(("stage2", "stage3", "stage4"), (4, 8, 4), widths[1:4]):
            units = [ShuffleUnit(channels, out, 2)] + [ShuffleUnit(out, out, 1) for _ in range(repeats - 1)]
            setattr(self, name, nn.Sequential(*units))
            channels = out
        self.conv5 = nn.Sequential(nn.Conv2d(channels, widths[4], 1, 1, 0, bias=False), nn.BatchNorm2d(widths[4]),
                                   nn.ReLU(inplace=True))
        self.fc = nn.Linear(widths[4], num_classes)
        self.embedding_dim = widths[4]
        self._tap_names = ("stem", "stage2", "stage3", "stage4", "conv5", "embedding", "logits")

    def _stages(self):
        return [("stem", lambda x: self.maxpool(self.conv1(x))), ("stage2", self.stage2), ("stage3", self.stage3),
                ("stage4", self.stage4), ("conv5", self.conv5)]


@register("imagenet_shufflenet_v2")
def imagenet_shufflenet_v2(in_channels: int, num_classes: int, image_size: int, multiplier: str = "x0.5"
                           ) -> ImageNetShuffleNetV2:
    """ShuffleNetV2 with torchvision's module names (``multiplier`` x0.5: 1.4 M parameters at 1000 classes)."""
    return ImageNetShuffleNetV2(in_channels, num_classes, image_size, multiplier)


# ---- EfficientNet-B0 -----------------------------------------------------------------------------
class SqueezeExcitation(nn.Module):
    """Channel gates ``sigmoid(fc2(SiLU(fc1(mean over H, W))))`` times the input (Hu et al. 2018)."""

    def __init__(self, channels: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` scaled per channel by a gate from its global average."""
        scale = self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(x, 1))))
        return x * torch.sigmoid(scale)


class MBConv(nn.Module):
    """EfficientNet's block (in ``block``): 1x1 expansion (unless ratio 1), k x k depthwise,
    squeeze-and-excitation on a quarter of the input width, 1x1 linear projection; the input is
    added where stride is 1 and the widths agree, after stochastic depth (whole samples dropped with
    probability ``drop`` in training, the rest scaled by 1 / (1 - drop); Huang et al. 2016)."""

    def __init__(self, expand: int, kernel: int, stride: int, inp: int, oup: int, drop: float):
        super().__init__()
        hidden = inp * expand
        layers = [] if hidden == inp else [_conv_bn_act(inp, hidden, 1, 1, act=nn.SiLU)]
        layers += [_conv_bn_act(hidden, hidden, kernel, stride, groups=hidden, act=nn.SiLU),
                   SqueezeExcitation(hidden, max(1, inp // 4)), _conv_bn_act(hidden, oup, 1, 1, act=None)]
        self.block = nn.Sequential(*layers)
        self.use_res_connect = stride == 1 and inp == oup
        self.drop = drop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` -> ``[N, C', H/s, W/s]``; stochastic depth and the residual when shapes allow."""
        out = self.block(x)
        if not self.use_res_connect:
            return out
        if self.training and self.drop > 0:
            keep = torch.empty(out.shape[0], 1, 1, 1, device=out.device).bernoulli_(1 - self.drop)
            out = out * keep / (1 - self.drop)
        return out + x


class ImageNetEfficientNetB0(_ImageNetModel):
    """EfficientNet-B0 (``features`` 0..8, ``classifier`` = Dropout(0.2), Linear); taps ``features.<i>``."""

    #: (expand ratio, kernel, stride, input width, output width, blocks) per stage
    SETTING = [(1, 3, 1, 32, 16, 1), (6, 3, 2, 16, 24, 2), (6, 5, 2, 24, 40, 2), (6, 3, 2, 40, 80, 3),
               (6, 5, 1, 80, 112, 3), (6, 5, 2, 112, 192, 4), (6, 3, 1, 192, 320, 1)]

    def __init__(self, in_channels: int, num_classes: int, image_size: int, dropout: float = 0.2,
                 stochastic_depth: float = 0.2):
        super().__init__(in_channels, num_classes, image_size, arch="imagenet_efficientnet_b0")
        features = [_conv_bn_act(in_channels, 32, 3, 2, act=nn.SiLU)]
        total, index = sum(stage[-1] for stage in self.SETTING), 0
        for expand, kernel, stride, inp, oup, blocks in self.SETTING:
            stage = []
            for b in range(blocks):
                stage.append(MBConv(expand, kernel, stride if b == 0 else 1, inp if b == 0 else oup, oup,
                                    stochastic_depth * index / total))
                index += 1
            features.append(nn.Sequential(*stage))
        features.append(_conv_bn_act(320, 1280, 1, 1, act=nn.SiLU))
        self.features = nn.Sequential(*features)
        self._modules["classifier"] = nn.Sequential(nn.Dropout(dropout), nn.Linear(1280, num_classes))
        self.embedding_dim = 1280
        self._tap_names = (*(f"features.{i}" for i in range(len(features))), "embedding", "logits")
        _init_conv_bn(self)
        linear = self._modules["classifier"][1]
        bound = 1.0 / math.sqrt(num_classes)
        nn.init.uniform_(linear.weight, -bound, bound)
        nn.init.zeros_(linear.bias)

    classifier = ImageNetMobileNetV2.classifier
    _logits = ImageNetMobileNetV2._logits

    def _stages(self):
        return [(f"features.{i}", module) for i, module in enumerate(self.features)]


@register("imagenet_efficientnet_b0")
def imagenet_efficientnet_b0(in_channels: int, num_classes: int, image_size: int) -> ImageNetEfficientNetB0:
    """EfficientNet-B0 with torchvision's module names (5.3 M parameters at 1000 classes)."""
    return ImageNetEfficientNetB0(in_channels, num_classes, image_size)
