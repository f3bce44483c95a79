"""Optimisers and learning-rate schedules of the published training recipes, as data.

The statistics family trains teachers (squeeze) and students (soft-label evaluation) with the
recipes of each paper's code: SGD or AdamW, optionally without weight decay on 1-d parameters
(biases and norm weights, as SRe2L's and G-VBSM's ``get_parameters`` do), and a learning rate
that is constant, a cosine over the steps, or a cosine over the epochs after a linear warm-up
(torchvision's ``LinearLR`` then ``CosineAnnealingLR``, stepped once per epoch).
"""

from __future__ import annotations

import math

import torch

from ddkit.errors import DDKitError
from ddkit.models.training import DataParallel, end_epoch, optimizer_step
from ddkit.utils import check_flag, check_number, check_option, progress

#: optimisers a recipe may name
OPTIMIZERS = ("sgd", "adamw")
#: ``cosine``: per step from ``lr`` to 0 over the run; ``cosine_epoch``: per epoch (PyTorch's
#: ``CosineAnnealingLR`` / ``LambdaLR`` stepped once an epoch); ``constant``; ``step``: times
#: ``decay_factor`` from ``decay_at`` of the epochs on
SCHEDULES = ("cosine", "cosine_epoch", "constant", "step")


def check_schedule_options(config: dict, what: str) -> None:
    """Refuse, with one line, schedule options no loop could use (``schedule``, ``warmup_epochs``,
    ``warmup_start``, ``optimizer``, ``exempt_1d``, where present)."""
    if "optimizer" in config:
        check_option(what, "optimizer", config["optimizer"], OPTIMIZERS)
    check_option(what, "schedule", config.get("schedule", "cosine"), SCHEDULES)
    check_number(what, "warmup_epochs", config.get("warmup_epochs", 0), integer=True, minimum=0)
    check_number(what, "warmup_start", config.get("warmup_start", 0.01), above=0, maximum=1)
    check_flag(what, "exempt_1d", config.get("exempt_1d", False))
    if config.get("warmup_epochs", 0) and config.get("warmup_epochs", 0) >= config["epochs"]:
        raise DDKitError(f"{what} option warmup_epochs={config['warmup_epochs']} leaves no epoch after the warm-up "
                         f"of {config['epochs']}; give fewer warm-up epochs")


def lr_factor(config: dict, epoch: int, step: int, total_steps: int) -> float:
    """The learning rate of ``config`` at ``epoch`` (0-based) and global ``step``, as a factor of ``lr``.

    During the first ``warmup_epochs`` epochs the factor rises linearly per epoch from
    ``warmup_start`` to 1 (``warmup_start + (1 - warmup_start) * epoch / warmup_epochs``); after
    them the ``schedule`` runs over the remaining epochs (``cosine_epoch``: ``(1 + cos(pi * e /
    E')) / 2`` with ``e``, ``E'`` counted from the warm-up's end), as torchvision's
    ``SequentialLR(LinearLR, CosineAnnealingLR)``. ``cosine`` (per step) ignores epochs:
    ``(1 + cos(pi * step / total_steps)) / 2``.
    """
    schedule = config.get("schedule", "cosine")
    warmup = int(config.get("warmup_epochs", 0) or 0)
    if epoch < warmup:
        start = float(config.get("warmup_start", 0.01))
        return start + (1.0 - start) * epoch / warmup
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * step / max(1, total_steps)))
    if schedule == "cosine_epoch":
        return 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup) / max(1, int(config["epochs"]) - warmup)))
    if schedule == "step":
        decay_at = config.get("decay_at")
        if decay_at and epoch >= int(round(int(config["epochs"]) * float(decay_at))):
            return float(config["decay_factor"])
    return 1.0


def parameter_groups(model: torch.nn.Module, weight_decay: float, exempt_1d: bool) -> list[dict]:
    """The optimiser's parameter groups: with ``exempt_1d`` (SRe2L's and G-VBSM's
    ``get_parameters``), weight decay only on parameters named ``weight`` with more than one
    dimension (conv and linear weights) and none on biases and norm weights; otherwise one group."""
    if not exempt_1d:
        return [{"params": list(model.parameters()), "weight_decay": float(weight_decay)}]
    decayed, exempt = [], []
    for name, parameter in model.named_parameters():
        (decayed if "weight" in name and parameter.dim() > 1 else exempt).append(parameter)
    return [{"params": decayed, "weight_decay": float(weight_decay)}, {"params": exempt, "weight_decay": 0.0}]


def make_optimizer(model: torch.nn.Module, config: dict) -> torch.optim.Optimizer:
    """SGD (``momentum``) or AdamW of ``config`` over ``model`` with ``lr``, ``weight_decay`` and
    ``exempt_1d`` (:func:`parameter_groups`)."""
    groups = parameter_groups(model, float(config["weight_decay"]), bool(config.get("exempt_1d", False)))
    lr = float(config["lr"])
    if config.get("optimizer", "sgd") == "adamw":
        return torch.optim.AdamW(groups, lr=lr)
    return torch.optim.SGD(groups, lr=lr, momentum=float(config["momentum"]))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every parameter group's learning rate to ``lr``."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def train_scheduled(model: torch.nn.Module, n: int, config: dict, generator: torch.Generator, batch_loss,
                    show_progress: bool = False, desc: str = "train", checkpoint=None,
                    compiled: bool = False) -> list[float]:
    """The training loop of the papers' recipes (teachers, soft-label students).

    Per epoch a ``torch.randperm(n, generator)`` order cut into batches of ``batch_size``; before
    each step the learning rate of :func:`lr_factor`; the optimiser of :func:`make_optimizer`.
    ``batch_loss(module, epoch, index, mine)`` returns the mean loss of this process's share
    ``index[mine]`` of the batch ``index`` (int64, CPU), computed with ``module`` (the model, or its
    DDP / compiled wrapper). Under torchrun the model trains with
    :class:`ddkit.models.training.DataParallel` (``sync_bn`` for whole-batch BatchNorm).

    Args:
        config: ``epochs``, ``batch_size``, ``lr``, the optimiser's and the schedule's options.
        generator: CPU generator of the batch order (``batch_loss`` may draw from it too).
        checkpoint: a :class:`ddkit.models.training.RunCheckpoint` to continue from and to write
            at epoch ends, or None; the last epoch's is always written.

    Returns:
        The mean training loss of each epoch (this process's shares).
    """
    parallel = DataParallel(model, bool(config.get("sync_bn", False)), compiled)
    optimizer = make_optimizer(model, config)
    epochs, batch_size, lr = int(config["epochs"]), int(config["batch_size"]), float(config["lr"])
    total_steps = epochs * -(-n // batch_size)
    step, losses, first_epoch = 0, [], 0
    resumed = checkpoint.restore(model, generator) if checkpoint is not None else None
    if resumed is not None:
        optimizer_state, loop = resumed
        optimizer.load_state_dict(optimizer_state)
        step, losses, first_epoch = int(loop["step"]), list(loop["losses"]), int(loop["next_epoch"])
    bar = progress(range(first_epoch, epochs), desc=desc, enabled=show_progress, initial=first_epoch, total=epochs)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=generator)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            set_lr(optimizer, lr * lr_factor(config, epoch, step, total_steps))
            index = order[start:start + batch_size]
            mine, factor = parallel.share(index.numel())
            loss = batch_loss(parallel.module, epoch, index, mine)
            optimizer_step(optimizer, loss, factor, parallel.amp)
            step += 1
            total += float(loss.detach()) * index[mine].numel()
            count += index[mine].numel()
        end_epoch(bar, losses, total, count, checkpoint, model, optimizer, generator,
                  {"next_epoch": epoch + 1, "step": step}, last=epoch + 1 == epochs)
    return losses
