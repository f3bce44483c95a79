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
    if kept is not None:
        return _siamese_share(dsa, real, syn, nr, ns, generator, int(draw_classes), list(kept))
    shape = tuple(real.shape[1:])
    real_k, syn_k = real.reshape(k, nr, *shape), syn.reshape(k, ns, *shape)
    family_of = torch.randint(len(dsa.families), (k,), generator=generator, device=generator.device).tolist()
    order, real_parts, syn_parts = [], [], []
    for family_index in sorted(set(family_of)):
        classes = [c for c in range(k) if family_of[c] == family_index]
        params = dsa.sample(len(classes), shape, generator, real.device, per_sample=True,
                            family=dsa.families[family_index])
        pick = torch.tensor(classes, device=real.device)
        real_parts.append(dsa.apply(real_k[pick].reshape(-1, *shape), repeat_params(params, nr)))
        syn_parts.append(dsa.apply(syn_k[pick].reshape(-1, *shape), repeat_params(params, ns)))
        order.extend(classes)
    # Undo the grouping: position of class c in the concatenated groups.
    inverse = torch.empty(k, dtype=torch.long)
    inverse[torch.tensor(order)] = torch.arange(k)
    inverse = inverse.to(real.device)
    real_out = torch.cat(real_parts).reshape(k, nr, *shape)[inverse].reshape(k * nr, *shape)
    syn_out = torch.cat(syn_parts).reshape(k, ns, *shape)[inverse].reshape(k * ns, *shape)
    return real_out, syn_out


def _siamese_share(dsa: DSA, real, syn, nr: int, ns: int, generator, total: int, kept: list[int]):
    """:func:`siamese_per_class` for the classes ``kept`` of ``total`` (draws for all of them)."""
    shape = tuple(real.shape[1:])
    real_k, syn_k = real.reshape(len(kept), nr, *shape), syn.reshape(len(kept), ns, *shape)
    family_of = torch.randint(len(dsa.families), (total,), generator=generator, device=generator.device).tolist()
    position = {c: i for i, c in enumerate(kept)}
    real_out, syn_out = [None] * len(kept), [None] * len(kept)
    for family_index in sorted(set(family_of)):
        classes = [c for c in range(total) if family_of[c] == family_index]
        params = dsa.sample(len(classes), shape, generator, real.device, per_sample=True,
                            family=dsa.families[family_index])
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
