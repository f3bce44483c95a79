"""Name -> factory registry behind :func:`ddkit.models.create`."""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable

import torch
from torch import nn

from ddkit.errors import DDKitError
from ddkit.models.base import TapModel
from ddkit.utils import seeded_global_rng

Factory = Callable[..., nn.Module]

# name -> (factory, allowed option names or None when the factory takes **options)
_REGISTRY: dict[str, tuple[Factory, tuple[str, ...] | None]] = {}


def _option_names(factory: Factory) -> tuple[str, ...] | None:
    params = list(inspect.signature(factory).parameters.values())
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    if len(params) < 3:
        raise TypeError(
            f"model factory {factory!r} must take (in_channels, num_classes, image_size, **options)"
        )
    return tuple(
        p.name
        for p in params[3:]
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    )


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register ``factory(in_channels, num_classes, image_size, **options)`` as ``name``.

    The factory must return a :class:`TapModel`. Its keyword parameters after the first three are
    the options :func:`create` accepts; anything else is reported as an unknown option. Names are
    case-insensitive. Registering a name twice is a programming error (``ValueError``).
    """
    key = name.lower()

    def decorator(factory: Factory) -> Factory:
        if key in _REGISTRY:
            raise ValueError(f"model name {name!r} is already registered")
        _REGISTRY[key] = (factory, _option_names(factory))
        return factory

    return decorator


def available() -> list[str]:
    """Sorted names of all registered models."""
    return sorted(_REGISTRY)


def create(name: str, in_channels: int, num_classes: int, image_size: int, **options) -> TapModel:
    """Build the model registered as ``name``.

    Args:
        name: one of :func:`available` (case-insensitive).
        in_channels: channels of the input images.
        num_classes: number of logits.
        image_size: side of the square input images.
        **options: model-specific options (see each factory's docstring).

    Returns:
        a freshly initialised :class:`TapModel` taking ``[N, in_channels, image_size, image_size]``
        and returning logits ``[N, num_classes]``.

    Raises:
        DDKitError: unknown name, unknown option, or an invalid option or size.
    """
    key = name.lower() if isinstance(name, str) else name
    if key not in _REGISTRY:
        raise DDKitError(f"unknown model {name!r}; choose one of: {', '.join(available())}")
    for arg, value in (
        ("in_channels", in_channels),
        ("num_classes", num_classes),
        ("image_size", image_size),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DDKitError(f"model {key!r}: {arg}={value!r} is not valid; give an integer >= 1")
    factory, allowed = _REGISTRY[key]
    if allowed is not None:
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            valid = ", ".join(allowed) if allowed else "(none)"
            raise DDKitError(
                f"unknown option(s) {', '.join(unknown)} for model {key!r}; valid options: {valid}"
            )
    _check_size(key, factory, in_channels, num_classes, image_size, options)
    try:
        model = factory(in_channels, num_classes, image_size, **options)
    except (RuntimeError, OverflowError, MemoryError) as exc:  # a width too large to allocate; else a bug
        if isinstance(exc, RuntimeError) and not any(word in str(exc).lower() for word in ("alloc", "overflow")):
            raise
        raise DDKitError(f"model {key!r} cannot be built with {options} ({' '.join(str(exc).split())[:160]}); "
                         f"choose smaller model options") from None
    if not isinstance(model, TapModel):
        raise TypeError(f"factory for {key!r} returned {type(model).__name__}, not a TapModel")
    return model


def build(name: str, in_channels: int, num_classes: int, image_size: int, seed: int, device="cpu",
          **options) -> TapModel:
    """:func:`create` with the initial weights drawn from ``seed``, moved to ``device``.

    The one way ddkit makes a seeded network (teachers, random matching nets, evaluation models):
    the same ``seed`` gives the same weights bit for bit, and the caller's global RNG is left as
    it was (:func:`ddkit.utils.seeded_global_rng`).
    """
    with seeded_global_rng(seed):
        model = create(name, in_channels=in_channels, num_classes=num_classes, image_size=image_size, **options)
    return model.to(device)


#: the (factory, sizes, options) that :func:`_check_size` has passed: a distillation loop builds the
#: same network every iteration, and the meta-device probe was 40 % of a ConvNet's build time
_SIZE_CHECKED: set = set()


def _check_size(key: str, factory: Factory, in_channels: int, num_classes: int, image_size: int, options: dict) -> None:
    """Refuse options whose parameters alone would not fit in this machine's memory (``--set
    model.width=1000000000000``), before anything is allocated: the model is first built on the
    ``meta`` device, which allocates nothing and draws no random numbers. Done once per factory,
    sizes and options."""
    try:
        checked = (factory, in_channels, num_classes, image_size, tuple(sorted(options.items())))
        hash(checked)
    except TypeError:  # an unhashable option value: check every time
        checked = None
    if checked is not None and checked in _SIZE_CHECKED:
        return
    _probe_size(key, factory, in_channels, num_classes, image_size, options)
    if checked is not None:
        _SIZE_CHECKED.add(checked)


def _probe_size(key: str, factory: Factory, in_channels: int, num_classes: int, image_size: int, options: dict) -> None:
    try:
        with torch.device("meta"):
            probe = factory(in_channels, num_classes, image_size, **options)
        size = sum(p.numel() * p.element_size() for p in probe.parameters())
    except DDKitError:
        raise
    except Exception:  # noqa: BLE001 - a model the meta device cannot build is checked by the real build
        return
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    if size > memory:
        raise DDKitError(f"model {key!r} with {options} would hold {size / 2 ** 30:.3g} GiB of parameters, more than "
                         f"this machine's {memory / 2 ** 30:.3g} GiB of memory; choose smaller model options")


def option_names(name: str) -> tuple[str, ...] | None:
    """The options model ``name`` accepts (its factory's keyword parameters), or None when it takes
    any (``**options``) or the name is not registered (:func:`create` then reports it)."""
    entry = _REGISTRY.get(name.lower()) if isinstance(name, str) else None
    return None if entry is None else entry[1]
