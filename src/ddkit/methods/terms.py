"""Loss-term registries of the two engines: one function and one decorator per term.

A matching term (:func:`matching_term`) declares its name, the feature taps it reads, the weight
``--terms NAME`` gives it, the configuration keys only it reads, the engine settings it needs and
the constraints on its options; :class:`ddkit.methods.matching.MatchingEngine` computes the
enabled terms in registration order and backpropagates their weighted sum. A recover term
(:func:`recover_term`) declares its name, the recover option that weights it and its default;
:class:`ddkit.methods.recover.RecoverEngine` sums ``CE + sum(weight * term)`` in registration order.
The built-in terms are registered next to their engines (:mod:`ddkit.methods.matching`,
:mod:`ddkit.methods.recover`).
``ddkit distill --help``, the bench's preset comparison (:func:`active_options`) and the contract
tests read these registries, so a new term is one function here (or in a plug-in module) and its
test. See docs/extending.md.

The built-in matching terms, with the weight each paper uses:

======== ================================================================ =============
term     what                                                             paper weight
======== ================================================================ =============
mean     DM mean-feature matching on the final embedding                  1
cm       IID local covariance matching on the final feature map          0.01 / 0.03
style    DDM moment (mean/std) matching on every block's output           1e4
gram     DDM correlation (Gram) matching on every block's output          1e4 (off)
icd      DDM intra-class diversity (guarded -KL to k-NN means)            10
ce       IDM class-aware cross-entropy, scaled by the net's accuracy      0.5 / 0.1
cc       IID class centralization on a pretrained net's embedding        0.05 / 0.01
======== ================================================================ =============

Papers: Zhao & Bilen 2023, "Dataset Condensation with Distribution Matching" (DM); Zhao et al.
2023, "Improved Distribution Matching for Dataset Condensation" (IDM); Deng et al. 2024,
"Exploiting Inter-sample and Inter-feature Relations in Dataset Distillation" (IID); Malakshan et al.
2025, "Decomposed Distribution Matching in Dataset Condensation" (DDM); Yin et al. 2023, "Squeeze, Recover and Relabel" (SRe2L); Shao et al. 2024, "Generalized Large-Scale Data
Condensation via Various Backbone and Statistical Matching" (G-VBSM).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ddkit.errors import DDKitError
from ddkit import options as constraints

#: Tap names in the order the engine asks the network for them (``blocks`` = every block's output).
TAP_ORDER = ("blocks", "features", "embedding", "logits")


# ---- option constraints (declared next to the term, checked by the engine) ----------------------------
def number(**bounds) -> Callable[[str, Any], None]:
    """A constraint: the option is a number within ``bounds`` (``integer``, ``minimum``, ``above``,
    ``maximum``, as :func:`ddkit.utils.check_number`); ``allow``: extra literal values (``"auto"``)."""
    check = constraints.number(**bounds)
    return lambda name, value: check("distillation", name, value)


def flag() -> Callable[[str, Any], None]:
    """A constraint: the option is true or false."""
    check = constraints.flag()
    return lambda name, value: check("distillation", name, value)


# ---- matching terms ------------------------------------------------------------------------------------
@dataclass
class TermInputs:
    """What a matching term sees for one group of classes (class-major, ``K`` classes).

    Attributes:
        real, syn: tap name -> features ``[K*N, ...]``, class-major (real without gradient);
            :meth:`grouped` gives ``[K, N, ...]``. A term gets the taps it declared (``blocks``
            expands to the names in ``blocks``). A real tap that only terms registered with
            ``real_class_means`` read is ``[K, ...]``, each class's mean (``N`` = 1).
        blocks: the network's per-block tap names (when some enabled term asked for ``blocks``).
        syn_images: the augmented synthetic images ``[K*N, C, H, W]`` (normalised).
        class_ids: the global class index of each of the K groups.
        num_classes: classes of the dataset.
        config: the engine's resolved configuration.
        accuracy: the matching network's training accuracy (IDM's queue), else 0.
        engine: the :class:`ddkit.methods.matching.MatchingEngine` (``icd_k``, ``ipc1_branch``).
        extractor: this iteration's pretrained feature extractor (terms with ``extractor=True``).
    """

    real: dict
    syn: dict
    blocks: list
    syn_images: torch.Tensor
    class_ids: list
    num_classes: int
    config: dict
    accuracy: float
    engine: Any = None
    extractor: Any = None

    def grouped(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` [K*N, ...] as [K, N, ...]."""
        return tensor.reshape(len(self.class_ids), -1, *tensor.shape[1:])


@dataclass(frozen=True)
class MatchingTerm:
    """A registered matching loss term (see :func:`matching_term`)."""

    name: str
    fn: Callable[[TermInputs], torch.Tensor | None]
    weight: float
    real_taps: tuple[str, ...] = ()
    syn_taps: tuple[str, ...] = ()
    options: tuple[str, ...] = ()
    requires: dict = field(default_factory=dict)
    requires_why: str = ""
    constraints: dict = field(default_factory=dict)
    extractor: bool = False
    summary: str = ""
    real_class_means: bool = False


#: name -> term, in registration order (the order the engine computes and sums them).
MATCHING_TERMS: dict[str, MatchingTerm] = {}


def matching_term(name: str, *, weight: float, taps=(), syn_taps=(), options=(), requires=None, requires_why="",
                  constraints=None, extractor: bool = False, summary: str = "", real_class_means: bool = False):
    """Decorator: register ``fn(inputs: TermInputs) -> 0-dim tensor`` (or None: nothing this time)
    as the matching term ``name``.

    Args:
        weight: the weight ``--terms name`` gives it (``--weight name=W`` sets another).
        taps: feature taps it reads on both sides (``embedding``, ``features``, ``blocks``, ...).
        syn_taps: taps it reads on the synthetic side only (``logits``).
        options: configuration keys only this term reads (dropped by :func:`active_options` when off).
        requires: engine settings it needs, e.g. ``{"model_source": "queue"}``; ``--terms`` sets them,
            an explicit configuration without them is refused with ``requires_why``.
        constraints: ``{"dotted.option": check}`` (:func:`number`, :func:`flag`), checked on every run.
        extractor: it needs the pretrained feature extractor pool (``cc`` options).
        summary: one line for ``ddkit distill --help``.
        real_class_means: it reads its real taps only through their mean over each class's images,
            so the engine may hand it the class means ``[K, ...]`` (averaged chunk by chunk) instead
            of every image's features (see :func:`class_mean_taps`).
    """

    def decorate(fn):
        if name in MATCHING_TERMS:
            raise DDKitError(f"a matching term named {name!r} is registered already")
        MATCHING_TERMS[name] = MatchingTerm(name, fn, float(weight), tuple(taps), tuple(syn_taps), tuple(options),
                                            dict(requires or {}), requires_why, dict(constraints or {}), extractor,
                                            summary or (fn.__doc__ or "").strip().splitlines()[0],
                                            bool(real_class_means))
        return fn

    return decorate


def term_names() -> tuple[str, ...]:
    """The registered matching terms, in computation order."""
    return tuple(MATCHING_TERMS)


def default_weights() -> dict[str, float]:
    """{term: the weight ``--terms`` gives it}."""
    return {name: term.weight for name, term in MATCHING_TERMS.items()}


def describe_terms() -> str:
    """``name (default weight W): summary`` of every matching term, for help texts."""
    return "; ".join(f"{name} ({term.weight:g}): {term.summary}" for name, term in MATCHING_TERMS.items())


def unknown_term(name: str) -> DDKitError:
    """The one-line error for a term name that is not registered."""
    return DDKitError(f"unknown loss term {name!r}; choose from: {', '.join(MATCHING_TERMS)}")


def check_terms(config: dict) -> None:
    """Refuse, with one line, weights of unknown terms, an enabled term without the engine settings
    it requires, and term options outside their constraints (checked whether the term is on or not)."""
    weights = config["weights"]
    unknown = [name for name in weights if name not in MATCHING_TERMS]
    if unknown:
        raise DDKitError(f"unknown loss term(s) {', '.join(sorted(unknown))}; choose from: {', '.join(MATCHING_TERMS)}")
    for name, term in MATCHING_TERMS.items():
        if weights.get(name):
            for key, value in term.requires.items():
                if config.get(key) != value:
                    raise DDKitError(f"the {name} term needs {term.requires_why or f'{key}={value}'}; "
                                     f"add --set {key}={value}")
        for dotted, check in term.constraints.items():
            value = constraints.lookup(config, dotted)
            if value is not None:
                check(dotted, value)


def enabled_taps(terms, blocks: list[str]) -> tuple[list[str], list[str]]:
    """(real taps, synthetic taps) the ``terms`` read, in :data:`TAP_ORDER`; ``embedding`` always
    (the network's final features), ``blocks`` expanded to the block names."""
    real = {"embedding"}.union(*(term.real_taps for term in terms))
    syn = real.union(*(term.syn_taps for term in terms))

    def ordered(names):
        out = []
        for name in list(TAP_ORDER) + sorted(names - set(TAP_ORDER)):
            if name in names:
                out += blocks if name == "blocks" else [name]
        return out

    return ordered(real), ordered(syn)


def class_mean_taps(terms, blocks: list[str]) -> set[str]:
    """The real taps (``blocks`` expanded to the block names) that every one of ``terms`` reading
    them reads only through their class means (registered with ``real_class_means``): the engine
    averages those per class as the real side's chunks come, instead of keeping every image's
    maps (DDM's block maps: 335 MB at 64 real images per class, 1.3 GB at 256)."""
    readers: dict[str, list] = {}
    for term in terms:
        for tap in term.real_taps:
            for name in (blocks if tap == "blocks" else [tap]):
                readers.setdefault(name, []).append(term)
    return {name for name, readers_of_tap in readers.items() if all(t.real_class_means for t in readers_of_tap)}


def active_options(config: dict) -> dict:
    """``config`` without the term options its run never reads (those of terms with weight 0),
    for comparing two configurations (the engine options, e.g. the IDM queue, are the engine's)."""
    weights = config.get("weights") or {}
    owned: dict[str, bool] = {}
    for name, term in MATCHING_TERMS.items():
        for key in term.options:
            owned[key] = owned.get(key, False) or weights.get(name, 0) > 0
    return {key: value for key, value in config.items() if owned.get(key, True)}


# ---- recover terms -------------------------------------------------------------------------------------
@dataclass
class RecoverInputs:
    """What a recover term sees at one step: the augmented batch ``x`` [B, C, H, W] (normalised),
    ``labels`` [B], the teacher's ``logits`` [B, K], the captured module inputs ``taps`` and the
    teacher's index; ``engine`` is the :class:`ddkit.methods.recover.RecoverEngine`.
    ``shared`` caches what several terms compute once (the BatchNorm and Conv2d statistics)."""

    x: torch.Tensor
    labels: torch.Tensor
    logits: torch.Tensor
    taps: list
    teacher: int
    engine: Any
    shared: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RecoverTerm:
    """A registered recover term (see :func:`recover_term`)."""

    name: str
    fn: Callable[[RecoverInputs], torch.Tensor]
    weight_option: str | None
    default: float
    lazy: bool
    summary: str


#: name -> term in registration (summation) order; the first, ``ce``, has no weight.
RECOVER_TERMS: dict[str, RecoverTerm] = {}


def recover_term(name: str, *, weight_option: str | None, default: float = 0.0, lazy: bool = True,
                 summary: str = ""):
    """Decorator: register ``fn(inputs: RecoverInputs) -> 0-dim tensor`` as the recover term ``name``.

    Args:
        weight_option: the recover option that weights it (``r_bn``); None: weight 1, always on.
        default: the option's default (a recover option of every statistics method).
        lazy: not computed while its weight is 0 (logged as 0); False: always computed and summed,
            so a non-finite value stops the run even at weight 0.
    """

    def decorate(fn):
        if name in RECOVER_TERMS:
            raise DDKitError(f"a recover term named {name!r} is registered already")
        RECOVER_TERMS[name] = RecoverTerm(name, fn, weight_option, float(default), lazy,
                                          summary or (fn.__doc__ or "").strip().splitlines()[0])
        return fn

    return decorate


def recover_weight_defaults() -> dict[str, float]:
    """{weight option: default} of every weighted recover term."""
    return {t.weight_option: t.default for t in RECOVER_TERMS.values() if t.weight_option is not None}


def recover_loss(inputs: RecoverInputs, config: dict) -> tuple[torch.Tensor, dict]:
    """``(total, {term: value})``: the weighted sum of the recover terms, in registration order
    (a lazy term at weight 0 is not computed and logged as 0)."""
    total, values = None, {}
    for name, term in RECOVER_TERMS.items():
        weight = None if term.weight_option is None else float(config[term.weight_option])
        if term.lazy and weight is not None and weight <= 0:
            values[name] = None
            continue
        value = term.fn(inputs)
        values[name] = value
        part = value if weight is None else weight * value
        total = part if total is None else total + part
    return total, values
