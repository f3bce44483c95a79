"""Siamese DSA with one draw PER CLASS, applied to class-major batches in a few batched calls.

The DM reference augments each class separately with its own seed, so every class gets its own
family and parameters while its real and synthetic batches share them. Looping over classes would
cost one call per class; here the classes are grouped by the family they drew and each group is
augmented in one call, with per-class parameters repeated over that class's samples.
"""

from __future__ import annotations

import torch

from ddkit.augment.dsa import DSA, DSAParams


def repeat_params(params: DSAParams, repeats: int) -> DSAParams:
    """Repeat every per-class parameter ``repeats`` times (class-major), for ``repeats`` samples per class."""
    return DSAParams(params.family, {k: v.repeat_interleave(repeats, dim=0) for k, v in params.values.items()})


def draw_per_class(dsa: DSA, num_classes: int, shape: tuple, generator: torch.Generator,
                   device) -> list[tuple[list[int], DSAParams]]:
    """One siamese draw per class, grouped by the family each class drew.

    Returns ``[(classes, params), ...]`` sorted by family: ``params`` holds one row per class in
    ``classes`` (in that order). Every call spends the generator the same way whatever subset of
    the classes is later augmented, so a class gets the same transform in any process.
    """
    family_of = torch.randint(len(dsa.families), (num_classes,), generator=generator, device=generator.device).tolist()
    groups = []
    for family_index in sorted(set(family_of)):
        classes = [c for c in range(num_classes) if family_of[c] == family_index]
        groups.append((classes, dsa.sample(len(classes), shape, generator, device, per_sample=True,
                                           family=dsa.families[family_index])))
    return groups


def class_params(groups: list[tuple[list[int], DSAParams]], class_index: int) -> DSAParams:
    """The draw of one class from :func:`draw_per_class`'s groups (a one-row :class:`DSAParams`)."""
    for classes, params in groups:
        if class_index in classes:
            row = classes.index(class_index)
            return DSAParams(params.family, {name: v[row:row + 1] for name, v in params.values.items()})
    raise KeyError(class_index)


def siamese_per_class(
    dsa: DSA,
    real: torch.Tensor,
    syn: torch.Tensor,
    num_classes: int,
    generator: torch.Generator,
    draw_classes: int | None = None,
    kept: list[int] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Augment class-major real and synthetic batches with one shared draw per class.

    Args:
        dsa: the augmentation.
        real: [K * Nr, C, H, W], class-major (class 0's Nr samples first).
        syn: [K * Ns, C, H, W], class-major.
        num_classes: K, the classes in ``real`` and ``syn``.
        generator: drives the family of each class and its parameters.
        draw_classes, kept: for a share of the classes (one rank of a class-split run): draws are
            made for all ``draw_classes`` classes, exactly as an unsplit run makes them, and only
            the classes ``kept`` (sorted, ``len(kept) == K``) are augmented, so every class gets
            the same transform whichever process handles it.

    Returns:
        (real_aug [K*Nr, C, H, W], syn_aug [K*Ns, C, H, W]); within class c every real and
        synthetic sample got the same family and the same parameters; differentiable in ``syn``.
    """
    if not dsa.enabled:
        return real, syn
    k = num_classes
    nr, ns = real.shape[0] // k, syn.shape[0] // k
    shape = tuple(real.shape[1:])
    kept = list(range(k)) if kept is None else list(kept)
    groups = draw_per_class(dsa, k if draw_classes is None else int(draw_classes), shape, generator, real.device)
    position = {c: i for i, c in enumerate(kept)}
    real_k, syn_k = real.reshape(k, nr, *shape), syn.reshape(k, ns, *shape)
    real_out, syn_out = [None] * k, [None] * k
    # one call per family group: the group's classes with their per-class parameters repeated
    for classes, params in groups:
        mine = [i for i, c in enumerate(classes) if c in position]
        if not mine:
            continue
        rows = torch.tensor(mine, device=real.device)
        own = DSAParams(params.family, {name: v[rows] for name, v in params.values.items()})
        pick = torch.tensor([position[classes[i]] for i in mine], device=real.device)
        real_aug = dsa.apply(real_k[pick].reshape(-1, *shape), repeat_params(own, nr)).reshape(len(mine), nr, *shape)
        syn_aug = dsa.apply(syn_k[pick].reshape(-1, *shape), repeat_params(own, ns)).reshape(len(mine), ns, *shape)
        for j, i in enumerate(mine):
            real_out[position[classes[i]]] = real_aug[j]
            syn_out[position[classes[i]]] = syn_aug[j]
    return torch.cat(real_out), torch.cat(syn_out)
