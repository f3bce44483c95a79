"""DM, IDM, IID, IDM+IID and DDM: presets over the one matching engine.

A method is data: which loss terms are on, their weights, and the engine's switches (partition
factor, model queue). Presets are three tiers: ``paper`` (SPEC section 2's published settings per
dataset and IPC, with the published accuracy where there is one), ``quick`` (minutes on two CPU
cores) and ``smoke`` (seconds, for tests). Any option can be overridden (``--set key=value``),
and any term switched on or re-weighted (``--terms``, ``--weight``).
"""

from __future__ import annotations

import copy

from ddkit.errors import DDKitError
from ddkit.methods.matching import DEFAULT_TERM_WEIGHTS, TERMS, MatchingEngine
from ddkit.methods.registry import register_method
from ddkit.utils import apply_overrides, parse_value

#: Engine defaults = DM's published settings (SPEC 2.1).
ENGINE_DEFAULTS: dict = {
    "iterations": 20000,
    "lr_img": 1.0,
    "momentum_img": 0.5,
    "batch_real": 256,
    "init": "real",
    "model": {"arch": "convnet", "width": 128, "depth": None, "norm": "instance"},
    "dsa": True,
    "dsa_strategy": "auto",
    "forward": "batched",
    "real_chunk": 128,  # real images per no-grad forward chunk (0 = all at once); see docs/benchmarks.md
    # Random nets in channels-last layout: "auto" = on the CPU, where oneDNN convolutions run about
    # 15 % faster that way (docs/benchmarks.md); true/false force it. Same mathematics either way.
    "channels_last": "auto",
    "partition": 1,
    "model_source": "random",
    "queue": {"initial": 3, "push_every": 30, "max_size": 100, "train_nets": 2, "train_steps": 10,
              "train_batch": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
    "weights": {term: 0.0 for term in TERMS} | {"mean": 1.0},
    # The IDM reference multiplies by accuracy in percent (0..100); ddkit uses a fraction (0..1)
    # times this scale, so scale 100 reproduces the reference's effective weight.
    "ce_accuracy_scale": 1.0,
    # IDM reference quirk: one shared optimiser stepped once per class (momentum then moves every
    # other class's images again). Off = separate state per class, the intended behaviour.
    "legacy_step_per_class": False,
    "cc": {"form": "square", "beta": 0.0, "temperature": 0.02, "pool_size": 5,
           "model": {"arch": "resnet18", "norm": "instance"}, "epochs": 40, "train_subset": 0,
           "batch_size": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4},
    "icd": {"max_kl": 5.0},
    "log_every": 10,
}

IDM_SWITCHES = {"partition": 2, "model_source": "queue", "lr_img": 0.2, "weights": {"ce": 0.5}}
METHOD_SETTINGS: dict[str, dict] = {
    "dm": {},
    "idm": IDM_SWITCHES,
    "iid": {"weights": {"cm": 0.01, "cc": 0.05}},
    "idm-iid": {**IDM_SWITCHES, "weights": {"ce": 0.5, "cm": 0.03, "cc": 0.01}},
    "ddm": {"weights": {"style": 1e4, "icd": 10.0}},
}

#: Published settings that differ per (dataset, IPC) (SPEC 2.2); MNIST-like sets have none
#: published for IDM, so they take CIFAR-10's.
PAPER_PER_SETTING: dict[tuple[str, str, int], dict] = {
    ("idm", "cifar10", 1): {"batch_real": 5000, "queue": {"push_every": 5}, "weights": {"ce": 0.5}},
    ("idm", "cifar10", 10): {"weights": {"ce": 0.5}},
    ("idm", "cifar10", 50): {"weights": {"ce": 0.1}},
    ("idm", "cifar100", 1): {"batch_real": 5000, "queue": {"push_every": 5}, "weights": {"ce": 0.5}},
    ("idm", "cifar100", 10): {"weights": {"ce": 0.1}, "queue": {"train_steps": 50}},
    ("idm", "cifar100", 50): {"weights": {"ce": 0.1}, "queue": {"train_steps": 40}},
    ("idm", "tiny-imagenet", 1): {"weights": {"ce": 0.5}, "queue": {"push_every": 5}},
    ("idm", "tiny-imagenet", 10): {"weights": {"ce": 0.5}},
    ("idm", "tiny-imagenet", 50): {"weights": {"ce": 0.8}, "queue": {"train_steps": 50}},
}

#: Published ConvNet-3 accuracies (SPEC 2), recorded in the manifest of paper-tier runs.
PUBLISHED: dict[tuple[str, str, int], float] = {
    **{("dm", "mnist", i): a for i, a in ((1, 89.7), (10, 97.5), (50, 98.6))},
    **{("dm", "cifar10", i): a for i, a in ((1, 26.0), (10, 48.9), (50, 63.0))},
    **{("dm", "cifar100", i): a for i, a in ((1, 11.4), (10, 29.7), (50, 43.6))},
    **{("dm", "tiny-imagenet", i): a for i, a in ((1, 3.9), (10, 12.9), (50, 24.1))},
    **{("idm", "cifar10", i): a for i, a in ((1, 45.6), (10, 58.6), (50, 67.5))},
    **{("idm", "cifar100", i): a for i, a in ((1, 20.1), (10, 45.1), (50, 50.0))},
    **{("idm", "tiny-imagenet", i): a for i, a in ((1, 10.1), (10, 21.9), (50, 27.7))},
    ("iid", "cifar10", 10): 55.1, ("iid", "cifar100", 10): 32.2, ("iid", "tiny-imagenet", 10): 15.4,
}

#: CPU tiers. quick: Fashion-MNIST IPC 10 in at most ~10 minutes on two cores (docs/benchmarks.md).
TIER_SETTINGS: dict[str, dict] = {
    "paper": {},
    "quick": {
        "iterations": 200, "batch_real": 64, "log_every": 5,
        "queue": {"train_nets": 1, "train_steps": 2, "train_batch": 128, "push_every": 10, "max_size": 20},
        # The paper's extractor (instance-norm ResNet-18, pooled embedding) at width 16: a 128-d pooled
        # embedding keeps the class-centralization term on the scale its weight was tuned for. An
        # unpooled width-64 ConvNet (1024-d) let the term dominate and cost IID 6 points
        # (docs/benchmarks.md, "IID quick extractor").
        "cc": {"pool_size": 1, "model": {"arch": "resnet18", "width": 16, "norm": "instance"}, "epochs": 2,
               "train_subset": 10000},
    },
    "smoke": {
        "iterations": 4, "batch_real": 8, "log_every": 1, "model": {"width": 16},
        "queue": {"initial": 2, "train_nets": 1, "train_steps": 1, "train_batch": 16, "push_every": 2, "max_size": 3},
        "cc": {"pool_size": 1, "model": {"arch": "convnet", "width": 8, "norm": "instance"}, "epochs": 1,
               "train_subset": 200},
    },
}


#: Tier settings that depend on the method: IDM matches 4x as many (expanded) images and trains its
#: queue every iteration, so its quick tier runs fewer iterations to stay near 10 CPU minutes.
TIER_METHOD_SETTINGS: dict[tuple[str, str], dict] = {
    ("idm", "quick"): {"iterations": 150},
    ("idm-iid", "quick"): {"iterations": 150},
}


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in, recursively for nested dicts."""
    merged = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_preset(method: str, dataset: str, ipc: int, preset: str) -> dict:
    """The engine configuration of ``method`` at ``preset`` for (dataset, IPC), before overrides."""
    if method not in METHOD_SETTINGS:
        raise DDKitError(f"unknown method {method!r}; choose one of: {', '.join(METHOD_SETTINGS)}")
    if preset not in TIER_SETTINGS:
        raise DDKitError(f"unknown preset {preset!r}; choose one of: {', '.join(TIER_SETTINGS)}")
    config = deep_merge(ENGINE_DEFAULTS, METHOD_SETTINGS[method])
    base_method = "idm" if method.startswith("idm") else method
    config = deep_merge(config, PAPER_PER_SETTING.get((base_method, dataset, ipc), {}))
    config = deep_merge(config, TIER_SETTINGS[preset])
    return deep_merge(config, TIER_METHOD_SETTINGS.get((method, preset), {}))


def active_options(config: dict) -> dict:
    """``config`` without the sections its run never reads, for comparing two configurations.

    The ``cc`` extractor settings matter only with a class-centralization weight, ``icd`` only with
    an intra-class-diversity weight, and ``queue`` only when the nets come from IDM's queue; DM's
    result does not depend on IID's extractor.
    """
    weights = config.get("weights") or {}
    inert = {section for section, used in (("cc", weights.get("cc", 0) > 0), ("icd", weights.get("icd", 0) > 0),
                                           ("queue", config.get("model_source") == "queue")) if not used}
    return {key: value for key, value in config.items() if key not in inert}


def apply_term_flags(config: dict, terms=None, weights=None) -> dict:
    """Switch terms on (``terms``: names or "a,b") and set weights (``weights``: "name=value" strings or dict).

    A term switched on without a weight gets :data:`DEFAULT_TERM_WEIGHTS`; ``--weight t=0`` turns
    one off. Unknown terms and negative weights raise DDKitError.
    """
    config = copy.deepcopy(config)
    names = []
    for item in ([terms] if isinstance(terms, str) else (terms or [])):
        names.extend(part.strip() for part in str(item).split(",") if part.strip())
    pairs = weights.items() if isinstance(weights, dict) else []
    if not isinstance(weights, dict):
        parsed = []
        for item in weights or []:
            for part in str(item).split(","):
                if "=" not in part:
                    raise DDKitError(f"--weight expects term=value, got {part!r}")
                name, value = part.split("=", 1)
                parsed.append((name.strip(), parse_value(value)))
        pairs = parsed
    for name in names + [name for name, _ in pairs]:
        if name not in TERMS:
            raise DDKitError(f"unknown loss term {name!r}; choose from: {', '.join(TERMS)}")
    for name in names:
        if not config["weights"].get(name):
            config["weights"][name] = DEFAULT_TERM_WEIGHTS[name]
    for name, value in pairs:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise DDKitError(f"weight of {name!r} must be a non-negative number, got {value!r}")
        config["weights"][name] = float(value)
    if "ce" in names and config["model_source"] != "queue":
        config["model_source"] = "queue"
    return config


def distill_matching(method: str):
    """The registered entry point of one matching-family method."""

    def run(real, ipc, preset="quick", overrides=None, seed=0, device="cpu", show_progress=True,
            terms=None, weights=None, checkpoint=None, compiled=False):
        config = resolve_preset(method, real.name, ipc, preset)
        config = apply_term_flags(config, terms, weights)
        config = apply_overrides(config, overrides, what=f"{method} option")
        engine = MatchingEngine(real, ipc, config, seed, device, show_progress, compiled=compiled)
        result = engine.run(method, checkpoint=checkpoint)
        expected = PUBLISHED.get((method, real.name, ipc))
        if expected is not None and preset == "paper":
            result.meta["published_accuracy"] = expected
        return result

    run.__doc__ = (f"Distill with {method} (matching engine; preset per SPEC section 2); ``compiled``: the "
                   "matching networks' forward runs through torch.compile.")
    run.supports_checkpoints = True
    run.supports_compile = True
    run.splits_work = True
    return run


for _name in METHOD_SETTINGS:
    register_method(_name)(distill_matching(_name))
