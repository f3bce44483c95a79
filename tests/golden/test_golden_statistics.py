"""The statistics family (SRe2L, CDA, G-VBSM) against the published code's numbers (README.md here).

Each test feeds a case's stored inputs through ddkit's own functions in float64 and checks every
output and gradient under the case's tolerance.
"""

from __future__ import annotations

import json

import pytest
import torch

from ddkit.augment.crops import CDA_MODES, cda_min_scale
from ddkit.losses.statistics import (
    ConvStatistics,
    bn_matching_loss,
    bn_statistics,
    conv_statistics,
    conv_statistics_distance,
    densification_loss,
)
from ddkit.methods.recover import (
    StatisticsHooks,
    capture_inputs,
    conv_modules,
    conv_target_statistics,
    hook_distance,
)

PATCH_SIZES = (32, 16, 8, 4, 2, 28, 14, 7)


def leaf(tensor: torch.Tensor) -> torch.Tensor:
    """A float64 copy of ``tensor`` that collects gradients."""
    return tensor.detach().to(torch.float64).clone().requires_grad_(True)


def test_sre2l_bn_loss(golden):
    case = golden("sre2l_bn_loss")
    inputs = [leaf(case[f"bn_input_l{layer}"]) for layer in range(4)]
    stats = [bn_statistics(x) for x in inputs]
    targets = [(case[f"running_mean_l{layer}"], case[f"running_var_l{layer}"]) for layer in range(4)]
    loss = bn_matching_loss(stats, targets, first_multiplier=float(case["first_bn_multiplier"]))
    case.check("loss", loss)
    case.check("r_feature", torch.stack([bn_matching_loss([s], [t], 1.0) for s, t in zip(stats, targets)]))
    for layer, grad in enumerate(torch.autograd.grad(loss, inputs)):
        case.check(f"grad_bn_input_l{layer}", grad)


@pytest.mark.parametrize("size", PATCH_SIZES)
def test_gvbsm_patch_stats_at_every_map_size(golden, size):
    case = golden("gvbsm_patch_stats")
    x = leaf(case[f"conv_input_s{size}"])
    stats = conv_statistics(x, patch=4, form="reference")
    case.check(f"chan_mean_s{size}", stats.mean)
    case.check(f"chan_var_s{size}", stats.var)
    case.check(f"patch_mean_s{size}", stats.patch_mean)
    case.check(f"patch_var_s{size}", stats.patch_var)
    target = ConvStatistics(*(case[f"target_{name}_s{size}"] for name in ("dd_mean", "dd_var", "patch_mean",
                                                                            "patch_var")))
    r = conv_statistics_distance(stats, target)
    case.check(f"r_feature_s{size}", r)
    case.check(f"grad_conv_input_s{size}", torch.autograd.grad(r, x)[0])


def test_gvbsm_patch_stats_sum_over_sizes(golden):
    case = golden("gvbsm_patch_stats")
    total = sum(conv_statistics_distance(
        conv_statistics(case[f"conv_input_s{size}"], 4),
        ConvStatistics(*(case[f"target_{name}_s{size}"] for name in ("dd_mean", "dd_var", "patch_mean", "patch_var"))))
        for size in PATCH_SIZES)
    case.check("loss_sum_over_sizes", total)


@pytest.mark.parametrize("name", ["gvbsm_densify_3ch32", "gvbsm_densify_1ch28"])
def test_gvbsm_densification_value_and_gradient(golden, name):
    case = golden(name)
    images, labels = leaf(case["images"]), case["labels"]
    tau = float(case["tau"])
    loss = densification_loss(images, labels, pool_size=32, temperature=tau)
    case.check("loss", loss)
    per_class = torch.stack([densification_loss(images[labels == c], labels[labels == c], 32, tau)
                             for c in torch.unique(labels).tolist()])
    case.check("loss_per_class", per_class)
    pooled = torch.nn.functional.adaptive_avg_pool2d(images.detach(), 32).flatten(1)
    eigvals = torch.stack([torch.linalg.eigvalsh(z @ z.T).flip(0) for z in
                           (pooled[labels == c] for c in torch.unique(labels).tolist())])
    case.check("eigvals_per_class", eigvals)
    case.check("grad_images", torch.autograd.grad(loss, images)[0])


def test_cda_schedule(golden):
    case = golden("cda_schedule")
    modes = ("step", "linear", "cosine")  # the case's mode_id 0, 1, 2
    assert set(modes) == set(CDA_MODES)
    low = [cda_min_scale(int(t), int(total), float(m), modes[int(mode)])
           for mode, m, t, total in zip(case["mode_id"], case["milestone"], case["iteration"],
                                        case["iterations_per_layer"])]
    case.check("min_crop", torch.tensor(low, dtype=torch.float64))
    case.check("max_crop", torch.ones(len(low), dtype=torch.float64))


# ==================================================================================================
# G-VBSM's EMA hooks and its whole statistics term (the recover engine's own functions)
# ==================================================================================================


@pytest.mark.parametrize("kind", ["bn", "conv"])
@pytest.mark.parametrize("form", ["as_written", "intended"])
def test_gvbsm_ema_over_four_forwards(golden, kind, form):
    """The EMA persists over the forwards; ``as_written`` starts it at 0 (``legacy_ema_zero_start``),
    ``intended`` at the first statistic (ddkit's default)."""
    case = golden(f"gvbsm_ema_{kind}_{form}")
    alpha = float(case["training_momentum"])
    weights = case["layer_weights"].tolist()
    start = "zero" if form == "as_written" else "statistic"
    if kind == "bn":
        targets = [(case[f"running_mean_l{layer}"], case[f"running_var_l{layer}"]) for layer in range(2)]
        fields = {0: "ema_mean", 1: "ema_var"}
    else:
        targets = [ConvStatistics(*(case[f"target_{name}_l{layer}"] for name in ("dd_mean", "dd_var", "patch_mean",
                                                                                 "patch_var"))) for layer in range(2)]
        fields = {0: "ema_dd_mean", 1: "ema_dd_var", 2: "ema_patch_mean", 3: "ema_patch_var"}
    ema, r_rows, losses, history = {}, [], [], {(layer, field): [] for layer in range(2) for field in fields}
    for t in range(4):
        inputs = [leaf(case[f"x_t{t}_l{layer}"]) for layer in range(2)]
        r = [hook_distance(x, target, ema, (0, layer), alpha, patch=4 if kind == "conv" else None, ema_start=start)
             for layer, (x, target) in enumerate(zip(inputs, targets))]
        loss = sum(w * value for w, value in zip(weights, r))
        for layer, grad in enumerate(torch.autograd.grad(loss, inputs)):
            case.check(f"grad_x_t{t}_l{layer}", grad)
        r_rows.append(torch.stack(r).detach())
        losses.append(loss.detach())
        for (layer, field) in history:
            history[(layer, field)].append(ema[(0, layer, field)])
    case.check("r_feature", torch.stack(r_rows))
    case.check("loss", torch.stack(losses))
    for (layer, field), values in history.items():
        case.check(f"{fields[field]}_l{layer}", torch.stack(values))


def crd_rule_weights(case, model: torch.nn.Module) -> None:
    """Load the README's rule-generated weights of a ``crd_*`` case into ``model`` by position.

    The rule numbers the official state-dict entries in order; ``model`` must list the same
    entries (shapes checked) in the same order, whatever it names its head."""
    state = model.state_dict()
    assert len(state) == case["param_offset"].numel()
    for j, (key, value) in enumerate(state.items()):
        if not value.is_floating_point():
            state[key] = torch.zeros_like(value)
            continue
        generator = torch.Generator().manual_seed(int(case["weight_seed0"]) + j)
        u = torch.rand(value.numel(), generator=generator, dtype=torch.float64).reshape(value.shape)
        state[key] = case["param_offset"][j] + case["param_scale"][j] * (2 * u - 1)
    model.load_state_dict(state)


def test_gvbsm_hook_loss_on_the_official_resnet18(golden):
    """Every BatchNorm2d and Conv2d hooked in module order, the stem conv x10, momentum 0, no drop;
    the conv targets are the official pre-hook statistics of ``real_batch``."""
    from ddkit.methods import stats_family
    from ddkit.models import create

    case = golden("gvbsm_hook_loss_resnet18")
    model = create("resnet18", in_channels=3, num_classes=100, image_size=32).double()
    crd_rule_weights(case, model)
    model.eval()
    config = stats_family.resolve_preset("gvbsm", "cifar100", 10, "paper",
                                         {"ema_alpha": float(case["training_momentum"]),
                                          "first_multiplier": float(case["first_multiplier"])})["recover"]
    targets = conv_target_statistics(model, [case["real_batch"]], config)
    for n, target in enumerate(targets):
        for field, name in zip(ConvStatistics._fields, ("dd_mean", "dd_var", "patch_mean", "patch_var")):
            case.check(f"target_conv{n}_{name}", getattr(target, field))
    hooks = StatisticsHooks(model, config, targets)
    order = json.loads(case.meta["gvbsm_hook_order"])
    names = {module: name for name, module in model.named_modules()}
    assert [(names[m], type(m).__name__) for m in hooks.modules] == [tuple(entry) for entry in order]
    x = leaf(case["x"])
    with capture_inputs(model, (torch.nn.BatchNorm2d, torch.nn.Conv2d)) as taps:
        model(x)
    distances = hooks.distances(dict(taps), {}, 0)
    case.check("r_feature_per_hook", torch.stack(distances))
    bn_loss, conv_loss = hooks.losses(distances, x.sum() * 0)
    loss = bn_loss + conv_loss
    case.check("loss", loss)
    case.check("grad_x", torch.autograd.grad(loss, x)[0])


def test_gvbsm_first_layer_weights_table():
    """README "gvbsm_first_layer_weights": the x10 goes to the first hooked module, the stem conv."""
    from ddkit.methods import stats_family
    from ddkit.models import create

    config = stats_family.resolve_preset("gvbsm", "cifar100", 10, "paper")["recover"]
    for model in stats_family.GVBSM_POOL:
        options = {k: v for k, v in model.items() if k != "arch" and v is not None}
        net = create(model["arch"], in_channels=3, num_classes=100, image_size=32, **options)
        hooks = StatisticsHooks(net, config, [None] * len(conv_modules(net)))
        assert isinstance(hooks.modules[0], torch.nn.Conv2d) and hooks.weights[0] == 10.0
        assert all(w == 1.0 for w in hooks.weights[1:])
        assert hooks.modules[0] is conv_modules(net)[0]


def test_soft_eval_losses(golden):
    """SRe2L / CDA's KL (T 20, and T 30 on CIFAR-100), no T^2; G-VBSM's MSE + gamma CE of the base label."""
    from ddkit.evaluate.soft import soft_loss

    case = golden("soft_eval_losses")
    teacher, labels = case["teacher_logits"], case["labels"]
    for name, temperature in (("kl_T20", case["temperature_in"]), ("kl_T30", case["temperature_cifar"])):
        student = leaf(case["student_logits"])
        value = soft_loss(student, teacher, loss="kl", temperature=float(temperature), t2=False)
        case.check(name, value)
        case.check(f"grad_{name}", torch.autograd.grad(value, student)[0])
    student = leaf(case["student_logits"])
    lam = case["cutmix_lam"].expand(labels.numel())
    mixed_in = dict(partner_labels=case["labels_partner"], lam=lam)
    value = soft_loss(student, teacher, loss="mse_ce", gamma=float(case["gamma"]), labels=labels, ce_label="base",
                      **mixed_in)
    case.check("mse_ce", value)
    case.check("grad_mse_ce", torch.autograd.grad(value, student)[0])
    mixed = soft_loss(student, teacher, loss="mse_ce", gamma=float(case["gamma"]), labels=labels, ce_label="mixed",
                      **mixed_in)
    assert abs(float(mixed.detach()) - float(case["mse_ce"])) > 1e-3  # ddkit's former lambda-mixed CE is another number
