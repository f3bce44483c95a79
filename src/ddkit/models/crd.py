"""Checkpoints of the CRD model zoo: the teacher networks of G-VBSM's reference code.

G-VBSM (Shao et al., "Generalized Large-Scale Data Condensation via Various Backbone and
Statistical Matching", CVPR 2024) recovers its CIFAR images against a pool of networks from the
model zoo of CRD (Tian et al., "Contrastive Representation Distillation", ICLR 2020), plus the DC
ConvNet. Each zoo network has a ddkit twin that computes the same function; only the module names
differ:

=====================  =====================  ============================================
CRD ``model_dict``     ddkit model            ddkit class
=====================  =====================  ============================================
``ResNet18``           ``resnet18_bn``        :class:`ddkit.models.resnet.ResNet18`
``WRN_16_2``           ``wrn16_2``            :class:`ddkit.models.wrn.WideResNet`
``MobileNetV2``        ``mobilenetv2_crd``    :class:`ddkit.models.mobilenet.MobileNetV2`
``ShuffleNetV2_0_5``   ``shufflenetv2_crd``   :class:`ddkit.models.shufflenet.ShuffleNetV2`
=====================  =====================  ============================================

:func:`crd_to_ddkit_keys` renames a zoo state dict to ddkit's keys, and :func:`load_crd_state_dict`
loads it into a ddkit model, so a checkpoint trained with the reference code (``squeeze_<name>.pth``)
can serve as a ddkit teacher.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ddkit.errors import DDKitError
from ddkit.models.mobilenet import MobileNetV2
from ddkit.models.resnet import ResNet18
from ddkit.models.shufflenet import ShuffleNetV2
from ddkit.models.wrn import WideResNet

#: CRD ``model_dict`` name -> ddkit model name (build with ``create(name, 3, num_classes, 32)``)
CRD_MODELS = {
    "ResNet18": "resnet18_bn",
    "WRN_16_2": "wrn16_2",
    "MobileNetV2": "mobilenetv2_crd",
    "ShuffleNetV2_0_5": "shufflenetv2_crd",
}

Rule = tuple[str, str | Callable[[re.Match], str]]

_MOBILENET_BLOCK = {"0": "expand.0", "1": "expand.1", "3": "depthwise.0", "4": "depthwise.1",
                    "6": "project.0", "7": "project.1"}
# a DownBlock's left branch (conv1, bn1, conv2, bn2) is ddkit's branch1, its right branch
# (conv3 .. bn5) and a BasicBlock's only branch (conv1 .. bn3) are branch2 (conv, bn, relu, dw conv,
# bn, conv, bn, relu)
_SHUFFLE_DOWN = {"conv1": "branch1.0", "bn1": "branch1.1", "conv2": "branch1.2", "bn2": "branch1.3",
                 "conv3": "branch2.0", "bn3": "branch2.1", "conv4": "branch2.3", "bn4": "branch2.4",
                 "conv5": "branch2.5", "bn5": "branch2.6"}
_SHUFFLE_BASIC = {"conv1": "branch2.0", "bn1": "branch2.1", "conv2": "branch2.3", "bn2": "branch2.4",
                  "conv3": "branch2.5", "bn3": "branch2.6"}


def _shuffle_unit(match: re.Match) -> str:
    stage, unit, layer = int(match[1]), int(match[2]), match[3]
    table = _SHUFFLE_DOWN if unit == 0 else _SHUFFLE_BASIC
    if layer not in table:
        return match[0]  # left as is: load_state_dict then names it as unexpected
    return f"stage{stage + 1}.{unit}.{table[layer]}."


# (pattern, replacement) rules per ddkit class, applied to the start of each key in order; the
# first rule that matches renames the key
_RULES: dict[type, list[Rule]] = {
    ResNet18: [(r"linear\.", "classifier.")],
    WideResNet: [
        (r"block(\d)\.layer\.(\d+)\.convShortcut\.", r"group\1.\2.shortcut."),
        (r"block(\d)\.layer\.", r"group\1."),
        (r"bn1\.", "bn_final."),
        (r"fc\.", "classifier."),
    ],
    MobileNetV2: [
        (r"conv1\.", "stem."),
        (r"blocks\.(\d+)\.(\d+)\.conv\.(\d)\.",
         lambda m: f"stages.{m[1]}.{m[2]}.{_MOBILENET_BLOCK.get(m[3], 'conv.' + m[3])}."),
        (r"conv2\.", "head."),
        (r"classifier\.0\.", "classifier."),
    ],
    ShuffleNetV2: [
        (r"conv1\.", "stem.0."),
        (r"bn1\.", "stem.1."),
        (r"layer(\d)\.(\d+)\.(\w+?)\.", _shuffle_unit),
        (r"conv2\.", "head.0."),
        (r"bn2\.", "head.1."),
        (r"linear\.", "classifier."),
    ],
}


def _check_crd_form(model: nn.Module) -> list[Rule]:
    """The renaming rules for ``model``, or DDKitError where ``model`` is not a CRD network's twin."""
    arch = getattr(model, "arch", type(model).__name__)
    rules = _RULES.get(type(model))
    is_crd = (
        rules is not None
        and (not isinstance(model, ResNet18) or model.norm == "batch")
        and (not isinstance(model, (MobileNetV2, ShuffleNetV2)) or model.crd)
    )
    if not is_crd:
        names = ", ".join(sorted(set(CRD_MODELS.values())))
        raise DDKitError(f"model {arch!r} has no counterpart in the CRD model zoo; create one of: {names}")
    return rules


def crd_to_ddkit_keys(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state_dict`` of a CRD zoo network with its keys renamed to ``model``'s.

    Args:
        model: a ddkit model of the CRD form (see :data:`CRD_MODELS`); only its class and form are
            read.
        state_dict: the zoo network's ``state_dict()`` (for example ``conv1.weight``,
            ``layer1.0.bn1.running_mean``, ``linear.bias`` for ``ResNet18``).

    Returns:
        a new dict with the same tensors (not copied) under ddkit's keys; a key no rule knows is
        kept unchanged, so that ``load_state_dict`` reports it.

    Raises:
        DDKitError: ``model`` is not the twin of a CRD zoo network.
    """
    rules = _check_crd_form(model)
    renamed = {}
    for key, value in state_dict.items():
        new_key = key
        for pattern, replacement in rules:
            new_key, count = re.subn("^" + pattern, replacement, key, count=1)
            if count:
                break
        renamed[new_key] = value
    return renamed


def load_crd_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> nn.Module:
    """Load a CRD zoo network's ``state_dict`` into its ddkit twin ``model`` (in place; strict).

    Returns:
        ``model``, which then computes what the zoo network computes.

    Raises:
        DDKitError: ``model`` has no CRD counterpart, or the state dict does not fit it (a
            missing, unexpected or differently shaped entry: another network, width or class count).
    """
    renamed = crd_to_ddkit_keys(model, state_dict)
    try:
        model.load_state_dict(renamed, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())
        raise DDKitError(f"the CRD state dict does not fit model {getattr(model, 'arch', '?')!r} ({detail[:300]}); "
                         "check the network name, width and class count") from None
    return model
