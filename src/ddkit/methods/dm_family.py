"""DM, IDM, IID, IDM+IID and DDM: presets over the one matching engine.

A method is data: which loss terms are on, their weights, and the engine's switches (partition
factor, model queue, image steps). Presets are three tiers: ``paper`` (the published settings per
dataset and IPC, with the published accuracy where there is one), ``quick`` (minutes on two CPU
cores: the same algorithm, smaller) and ``smoke`` (seconds, for tests). Any option can be overridden (``--set key=value``),
and any term switched on or re-weighted (``--terms``, ``--weight``).
"""

from __future__ import annotations

import copy

from ddkit.errors import DDKitError
from ddkit.methods.matching import MatchingEngine
from ddkit.methods.terms import MATCHING_TERMS, active_options as _term_active_options, default_weights, unknown_term
from ddkit.methods.registry import MethodSpec, register
from ddkit.tiers import check_tier, check_tier_table
from ddkit.utils import apply_overrides, override_items, parse_value, split_names

#: Engine defaults = DM's published settings (Zhao & Bilen, "Dataset Condensation with Distribution
#: Matching", WACV 2023, and its code).
ENGINE_DEFAULTS: dict = {
    "iterations": 20000,
    "lr_img": 1.0,
    "momentum_img": 0.5,
    # real images per class per iteration; a class with fewer gives all it has (as the references draw)
    "batch_real": 256,
    "init": "real",
    # IDM's quadrant initialisation: the reference's plain bilinear downscale (a 2x2 mean at factor 2)
    "init_downscale": "bilinear",
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
    # per_iteration: DM's one optimiser step after all classes; per_class: IDM's step after each class
    "image_step": "per_iteration",
    # accuracy_reset_every: the reference resets its accuracy meters at every evaluation interval
    "queue": {"initial": 3, "push_every": 30, "max_size": 100, "train_nets": 2, "train_steps": 10,
              "train_batch": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4, "accuracy_reset_every": 100},
    # every registered term, weight 0 (resolve_preset adds terms registered later), DM's mean on
    "weights": {term: 0.0 for term in MATCHING_TERMS} | {"mean": 1.0},
    # IDM's CE multiplier is the queued net's accuracy times this: 100 = percent, as the reference
    # (its weights 0.5 / 0.1 assume it); 1 = a fraction, which makes the term 100x weaker
    "ce_accuracy_scale": 100.0,
    # IDM's branch for IPC 1 without the partition: keep this many lowest-CE real images per class
    "real_lowest_loss": 2560,
    # IID's pretrained pool (Deng et al., CVPR 2024, pre_model.py): instance-norm ResNet-18s, 40
    # epochs at a constant lr on un-augmented data; trained (and cached) when first drawn
    "cc": {"form": "square", "beta": 0.0, "temperature": 0.02, "pool_size": 1000, "in_memory": 4,
           "model": {"arch": "resnet18", "norm": "instance"}, "epochs": 40, "train_subset": 0,
           "batch_size": 256, "lr": 0.01, "momentum": 0.9, "weight_decay": 5e-4,
           "lr_decay_at": 0.5, "lr_decay_factor": 1.0},
    # DDM: the authors' calc_mean_std uses torch.var's unbiased default
    "style": {"unbiased": True},
    # DDM scripts never reset their style accumulator between classes (about 1.4x-1.5x on the style term)
    "legacy_style_accumulator": False,
    # k "auto" = round(0.2 IPC) clipped to [1, IPC-1]; the authors' script fixes k = 2
    "icd": {"max_kl": 5.0, "k": "auto"},
    "log_every": 10,
}

IDM_SWITCHES = {"partition": 2, "model_source": "queue", "lr_img": 0.2, "image_step": "per_class",
                "weights": {"ce": 0.5}}
METHOD_SETTINGS: dict[str, dict] = {
    "dm": {},
    "idm": IDM_SWITCHES,
    "iid": {"weights": {"cm": 0.01, "cc": 0.05}},
    "idm-iid": {**IDM_SWITCHES, "weights": {"ce": 0.5, "cm": 0.03, "cc": 0.01}},
    "ddm": {"weights": {"style": 1e4, "icd": 10.0}},
}

#: IDM's published settings per (dataset, IPC), from the authors' command.txt: CE weight, real batch,
#: push interval, queue training steps, and the evaluation interval at which the accuracy meters
#: reset. Datasets without published IDM settings (MNIST, Fashion-MNIST, SVHN, ...) take CIFAR-10's.
IDM_PAPER: dict[tuple[str, int], dict] = {
    ("cifar10", 1): {"batch_real": 5000, "queue": {"push_every": 5, "accuracy_reset_every": 100}, "weights": {"ce": 0.5}},
    ("cifar10", 10): {"queue": {"accuracy_reset_every": 100}, "weights": {"ce": 0.5}},
    ("cifar10", 50): {"queue": {"accuracy_reset_every": 500}, "weights": {"ce": 0.1}},
    # 5000 asked, CIFAR-100 has 500 per class: the reference (and ddkit) use all of the class
    ("cifar100", 1): {"batch_real": 5000, "queue": {"push_every": 5, "accuracy_reset_every": 100},
                      "weights": {"ce": 0.5}},
    ("cifar100", 10): {"queue": {"train_steps": 50, "accuracy_reset_every": 100}, "weights": {"ce": 0.1}},
    ("cifar100", 50): {"queue": {"train_steps": 40, "accuracy_reset_every": 500}, "weights": {"ce": 0.1}},
    ("tiny-imagenet", 1): {"queue": {"accuracy_reset_every": 100}, "weights": {"ce": 0.5}},
    ("tiny-imagenet", 10): {"queue": {"accuracy_reset_every": 500}, "weights": {"ce": 0.5}},
    ("tiny-imagenet", 50): {"queue": {"train_steps": 50, "accuracy_reset_every": 1000}, "weights": {"ce": 0.8}},
}
IDM_PAPER_DATASETS = {dataset for dataset, _ in IDM_PAPER}


def paper_settings(method: str, dataset: str, ipc: int) -> dict:
    """The published settings of ``method`` that depend on (dataset, IPC), or {}.

    IDM (and IDM+IID, which runs IDM's script): :data:`IDM_PAPER`, CIFAR-10's for other datasets;
    at an IPC the table lacks, the nearest published IPC below it (IPC 1 below 10). DM on CIFAR-10
    at IPC >= 100: image lr 10 (the DM code's README).
    """
    if method.startswith("idm"):
        source = dataset if dataset in IDM_PAPER_DATASETS else "cifar10"
        published = sorted(i for d, i in IDM_PAPER if d == source)
        nearest = max([i for i in published if i <= ipc], default=published[0])
        return IDM_PAPER[(source, nearest)]
    if method == "dm" and dataset == "cifar10" and ipc >= 100:
        return {"lr_img": 10.0}
    return {}


#: Published ConvNet-3 accuracies, recorded in the manifest of paper-tier runs.
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
TIER_SETTINGS: dict[str, dict] = check_tier_table({
    "paper": {},
    "quick": {
        # 64 real images per class (256 in the papers) and 1 queued net trained 2 steps of 128 images
        # per iteration (2 nets x 10 x 256), a push every 10 iterations and at most 20 nets (30, 100)
        "iterations": 200, "batch_real": 64, "real_lowest_loss": 64, "log_every": 5,
        "queue": {"train_nets": 1, "train_steps": 2, "train_batch": 128, "push_every": 10, "max_size": 20},
        # ONE extractor (the reference draws from 1000) of the paper's kind (instance-norm ResNet-18,
        # pooled embedding) at width 16, 2 epochs on 10,000 images: a 128-d pooled embedding keeps
        # the class-centralization term on the scale its weight was tuned for. An unpooled width-64
        # ConvNet (1024-d) let the term dominate and cost IID 6 points (docs/benchmarks.md).
        "cc": {"pool_size": 1, "model": {"arch": "resnet18", "width": 16, "norm": "instance"}, "epochs": 2,
               "train_subset": 10000},
    },
    "smoke": {
        "iterations": 4, "batch_real": 8, "real_lowest_loss": 4, "log_every": 1, "model": {"width": 16},
        "queue": {"initial": 2, "train_nets": 1, "train_steps": 1, "train_batch": 16, "push_every": 2, "max_size": 3},
        "cc": {"pool_size": 1, "model": {"arch": "convnet", "width": 8, "norm": "instance"}, "epochs": 1,
               "train_subset": 200},
    },
}, "TIER_SETTINGS")


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


def resolve_preset(method: str, dataset: str, ipc: int, preset: str, overrides=None, real=None, terms=None,
                   weights=None) -> dict:
    """The engine configuration a run of ``method`` at ``preset`` on (``dataset``, ``ipc``) uses.

    The method's settings over :data:`ENGINE_DEFAULTS`, the published ones for (dataset, IPC)
    at ``paper``, the tier's; then the term switches ``terms``/``weights``
    (:func:`apply_term_flags`) and the ``overrides`` (dict or ``key=value`` strings). The same
    signature as :func:`ddkit.methods.stats_family.resolve_preset`; ``real`` is accepted for it
    and not needed here (the presets read the dataset's name only).
    """
    if method not in METHOD_SETTINGS:
        raise DDKitError(f"unknown method {method!r}; choose one of: {', '.join(METHOD_SETTINGS)}")
    check_tier(preset)
    defaults = deep_merge({"weights": {term: 0.0 for term in MATCHING_TERMS}}, ENGINE_DEFAULTS)
    config = deep_merge(defaults, METHOD_SETTINGS[method])
    config = deep_merge(config, paper_settings(method, dataset, ipc))
    config = deep_merge(config, TIER_SETTINGS[preset])
    config = deep_merge(config, TIER_METHOD_SETTINGS.get((method, preset), {}))
    if terms or weights:
        config = apply_term_flags(config, terms, weights)
    if overrides:
        check_renamed(overrides, f"{method} option")
        config = apply_overrides(config, overrides, what=f"{method} option")
    return config


def active_options(config: dict) -> dict:
    """``config`` without the options its run never reads, for comparing two configurations.

    A term's own options (declared with :func:`ddkit.methods.terms.matching_term`: ``cc`` for the
    class-centralization extractor, ``icd``, ``style``, ``ce_accuracy_scale`` ...) matter only while
    its weight is above 0, and ``queue`` (with ``real_lowest_loss``) only when the nets come from
    IDM's queue; DM's result does not depend on IID's extractor.
    """
    queued = config.get("model_source") == "queue"
    used = {"queue": queued, "real_lowest_loss": queued}
    return {key: value for key, value in _term_active_options(config).items() if used.get(key, True)}


def apply_term_flags(config: dict, terms=None, weights=None) -> dict:
    """Switch terms on (``terms``: names or "a,b") and set weights (``weights``: "name=value" strings or dict).

    A term switched on without a weight gets its registered default weight
    (:func:`ddkit.methods.terms.default_weights`) and the engine settings it requires (the ``ce``
    term: IDM's queue of trained nets); ``--weight t=0`` turns one off. Unknown terms and negative
    weights raise DDKitError.
    """
    config = copy.deepcopy(config)
    names = []
    for item in ([terms] if isinstance(terms, str) else (terms or [])):
        names.extend(split_names(item))
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
        if name not in MATCHING_TERMS:
            raise unknown_term(name)
    defaults = default_weights()
    for name in names:
        if not config["weights"].get(name):
            config["weights"][name] = defaults[name]
    for name, value in pairs:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise DDKitError(f"weight of {name!r} must be a non-negative number, got {value!r}")
        config["weights"][name] = float(value)
    for name in names:
        config.update(MATCHING_TERMS[name].requires)
    return config


#: Options renamed since an earlier release: old name -> the line that says what to use now.
RENAMED_OPTIONS = {
    "legacy_step_per_class": "legacy_step_per_class is now image_step: --set image_step=per_class "
                             "(IDM's default) or image_step=per_iteration (DM's)",
}


def check_renamed(overrides, what: str) -> None:
    """Refuse an option of an earlier release with one line that names its new spelling."""
    for key, _ in override_items(overrides or [], what):
        if str(key) in RENAMED_OPTIONS:
            raise DDKitError(RENAMED_OPTIONS[str(key)])


def distill_matching(method: str):
    """The entry point of one matching-family method (registered by :func:`register_matching_method`)."""

    def run(real, ipc, preset="quick", overrides=None, seed=0, device="cpu", show_progress=True,
            terms=None, weights=None, checkpoint=None, compiled=False):
        config = resolve_preset(method, real.name, ipc, preset, overrides, real, terms, weights)
        engine = MatchingEngine(real, ipc, config, seed, device, show_progress, compiled=compiled)
        result = engine.run(method, checkpoint=checkpoint)
        expected = PUBLISHED.get((method, real.name, ipc))
        if expected is not None and preset == "paper":
            result.meta["published_accuracy"] = expected
        return result

    run.__doc__ = (f"Distill with {method} (matching engine; presets in ddkit.methods.dm_family); ``compiled``: "
                   "the matching networks' forward runs through torch.compile.")
    return run


def register_matching_method(name: str, settings: dict, summary: str = "") -> MethodSpec:
    """Register a matching-family method: ``settings`` (its terms' weights and engine switches, as
    :data:`METHOD_SETTINGS`) over :data:`ENGINE_DEFAULTS`, run by the matching engine.

    Example: ``register_matching_method("dm-cm", {"weights": {"cm": 0.01}})``.
    """
    METHOD_SETTINGS[name] = copy.deepcopy(settings)
    return register(MethodSpec(
        name=name, run=distill_matching(name), family="matching", protocol="hard",
        resolve=lambda dataset, ipc, preset, overrides=None, **flags: resolve_preset(name, dataset, ipc, preset,
                                                                                      overrides, **flags),
        active_options=active_options, checkpoints=True, compile=True, splits_work=True,
        summary=summary or f"matching engine with {settings or 'the engine defaults'}"))


for _name, _settings in list(METHOD_SETTINGS.items()):
    register_matching_method(_name, _settings)
