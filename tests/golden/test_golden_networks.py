"""ddkit's networks against the official ones (see README.md here).

* ``convnet_forward_*``: the DC ConvNet (Zhao et al., DC/DSA/DM code), logits, embedding, the
  gradient of a probe loss and the DDM style taps (post-ReLU, pre-pool).
* ``dm_mean_convnet``: DM's loss end to end: images -> ConvNet embedding -> mean-embedding loss.
* ``crd_*``: G-VBSM's teacher networks from the CRD model zoo, with weights made by the fixture's
  rule and loaded through :func:`ddkit.models.load_crd_state_dict`: eval and train logits, the
  network's feature list and the input gradient. The modules G-VBSM hooks (every Conv2d and
  BatchNorm2d, in module order) are checked to be the same modules in the same order.

Everything is computed in float64, as the fixtures are.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from ddkit.losses import mean_feature_loss
from ddkit.models import CRD_MODELS, create, crd_to_ddkit_keys, load_crd_state_dict

# -- the DC ConvNet -------------------------------------------------------------------------------

CONVNET_CASES = {  # case -> (channels, image size, width)
    "convnet_forward_1ch28": (1, 28, 32),
    "convnet_forward_3ch32": (3, 32, 32),
    "convnet_forward_3ch32_w128": (3, 32, 128),
}


def _official_convnet(case, channels: int, size: int, width: int) -> nn.Module:
    """ddkit's ConvNet-3 (instance norm) with the fixture's weights, stored under the official keys
    (``features.N.*``, ``classifier.*``), which are ddkit's keys too: the map is the identity."""
    model = create("convnet", channels, 10, size, width=width, depth=3, norm="instance")
    official = case.prefixed("sd.")
    assert sorted(official) == sorted(model.state_dict())  # the same keys
    model.load_state_dict(official, strict=True)
    return model.double()


@pytest.mark.parametrize("name", sorted(CONVNET_CASES))
def test_convnet_forward(golden, name):
    case = golden(name)
    model = _official_convnet(case, *CONVNET_CASES[name])
    x = case["x"].clone().requires_grad_(True)
    taps = model.forward_taps(x, ["block0", "block1", "block2", "embedding", "logits"])
    case.check("logits", taps["logits"])
    case.check("embedding", taps["embedding"])
    probe_loss = (taps["embedding"] * case["probe"]).sum()
    case.check("probe_loss", probe_loss)
    (grad,) = torch.autograd.grad(probe_loss, x)
    case.check("grad_x", grad)
    for block in range(3):
        tap = taps[f"block{block}"]
        case.check(f"tap_block{block}_channel_mean", tap.mean(dim=(2, 3)))
        case.check(f"tap_block{block}_min", tap.flatten(1).min(dim=1).values)
    case.check("tap_block2", taps["block2"])


def test_dm_loss_through_the_convnet(golden):
    case = golden("dm_mean_convnet")
    model = _official_convnet(case, 1, 28, 32).train()  # the official loop's mode; no effect here
    syn = case["syn_images"].clone().requires_grad_(True)
    emb_real = model.embed(case["real_images"]).detach()
    emb_syn = model.embed(syn)
    case.check("emb_real", emb_real)
    case.check("emb_syn", emb_syn)
    classes = 3
    loss = mean_feature_loss(emb_real.reshape(classes, -1, emb_real.shape[1]),
                             emb_syn.reshape(classes, -1, emb_syn.shape[1]))
    case.check("loss", loss)
    (grad,) = torch.autograd.grad(loss, syn)
    case.check("grad_syn_images", grad)


# -- G-VBSM's teachers (the CRD model zoo) ---------------------------------------------------------

CRD_CASES = {"crd_resnet18": "ResNet18", "crd_wrn_16_2": "WRN_16_2", "crd_mobilenetv2_half": "MobileNetV2",
             "crd_shufflenetv2_half": "ShuffleNetV2_0_5"}
# the reference's feature list (``is_feat=True``) as ddkit taps; maps are averaged over space
CRD_FEATURE_TAPS = {
    "crd_resnet18": ("stem", "layer1", "layer2", "layer3", "layer4", "embedding"),
    "crd_wrn_16_2": ("stem", "group1", "group2", "group3", "embedding"),
    "crd_mobilenetv2_half": ("stem", "stage2", "stage3", "stage5", "stage7", "embedding"),
    "crd_shufflenetv2_half": ("stem", "stage2", "stage3", "stage4", "embedding"),
}


def _rule_weights(case) -> dict[str, torch.Tensor]:
    """The fixture's weights, under the reference keys, in the reference order.

    Entry j (in ``state_dict()`` order) is 0 where it is an integer; otherwise
    ``param_offset[j] + param_scale[j] * (2u - 1)`` with ``u`` the entry's number of ``torch.rand``
    float64 draws after seeding the CPU generator with ``weight_seed0 + j``, reshaped row-major.
    """
    keys = json.loads(case.meta["state_dict_keys"])
    seed0 = int(case["weight_seed0"])
    offset, scale = case["param_offset"], case["param_scale"]
    weights = {}
    generator = torch.Generator()
    for j, (key, shape, dtype) in enumerate(keys):
        if dtype.startswith("int"):
            weights[key] = torch.zeros(shape, dtype=getattr(torch, dtype))
            continue
        generator.manual_seed(seed0 + j)
        numel = int(torch.Size(shape).numel())
        u = torch.rand(numel, dtype=torch.float64, generator=generator).reshape(shape)
        weights[key] = offset[j] + scale[j] * (2 * u - 1)
    return weights


@pytest.fixture(scope="module")
def one_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.mark.parametrize("name", sorted(CRD_CASES))
def test_crd_teacher_forward(golden, name, one_thread):
    case = golden(name)
    arch = CRD_MODELS[CRD_CASES[name]]
    weights = _rule_weights(case)
    case.check("param_sum", torch.stack([w.double().sum() for w in weights.values()]))
    case.check("param_abs_sum", torch.stack([w.double().abs().sum() for w in weights.values()]))

    model = create(arch, 3, 100, 32).double()
    load_crd_state_dict(model, weights)
    model.eval()
    x = case["x"].clone().requires_grad_(True)
    feature_taps = CRD_FEATURE_TAPS[name]
    taps = model.forward_taps(x, (*feature_taps, "logits"))
    case.check("logits_eval", taps["logits"])
    for n, tap in enumerate(feature_taps):
        value = taps[tap]
        case.check(f"feat{n}_eval", value.mean(dim=(2, 3)) if value.dim() == 4 else value)
    (grad,) = torch.autograd.grad(taps["logits"].sum(), x)
    case.check("grad_x_of_logit_sum", grad)
    with torch.no_grad():
        case.check("logits_train", model.train()(case["x"]))  # BatchNorm on the batch's statistics


@pytest.mark.parametrize("name", sorted(CRD_CASES))
def test_crd_teacher_hooks_the_same_modules_in_the_same_order(golden, name):
    """G-VBSM hooks every Conv2d and BatchNorm2d in module order and weights the first one x10: the
    ddkit twin must list the same modules (by the key map) in the same order."""
    case = golden(name)
    reference = json.loads(case.meta["gvbsm_hook_order"])
    model = create(CRD_MODELS[CRD_CASES[name]], 3, 100, 32)
    ours = [(module_name, type(module).__name__) for module_name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.BatchNorm2d))]
    renamed = crd_to_ddkit_keys(model, {f"{module}.weight": None for module, _ in reference})
    expected = [(key.removesuffix(".weight"), kind) for key, (_, kind) in zip(renamed, reference)]
    assert ours == expected
    assert ours[0][1] == "Conv2d"
