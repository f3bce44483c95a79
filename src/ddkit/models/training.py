"""Generic classifier training on in-memory tensors: used to evaluate distilled sets, to train
the IDM model queue and the pretrained feature extractors of class centralization."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ddkit.utils import progress


@torch.no_grad()
def test_accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on normalised images [N, C, H, W]."""
    model.eval()
    correct = 0
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / max(1, images.shape[0])


def train_classifier(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: dict,
    generator: torch.Generator,
    dsa=None,
    show_progress: bool = False,
    desc: str = "train",
) -> list[float]:
    """Train ``model`` with cross-entropy on in-memory normalised images (SPEC 1.3 schedule).

    Args:
        images: float [N, C, H, W], normalised, already on the model's device.
        labels: int64 [N] on the same device.
        config: epochs, lr, momentum, weight_decay, batch_size, decay_at, decay_factor, reset_momentum.
        generator: drives batch order and augmentation (CPU generator; draws are moved to the device).
        dsa: a :class:`ddkit.augment.DSA` applied per sample on every batch, or None.

    Under torchrun (``ddkit.distributed`` set up with several processes) the model is wrapped in
    DistributedDataParallel: every rank draws the same batch order and augmentation, trains on its
    contiguous share of each batch, and the gradients are averaged across ranks. BatchNorm
    statistics are then per process, as in the papers' multi-GPU training.

    Returns:
        The mean training loss of each epoch (this rank's share).
    """
    from ddkit import distributed

    world = distributed.current()
    ddp = world.distributed and int(config["batch_size"]) >= world.size
    trained = model
    if ddp:
        from torch.nn.parallel import DistributedDataParallel

        trained = DistributedDataParallel(model)
    epochs = int(config["epochs"])
    decay_epoch = int(round(epochs * float(config["decay_at"]))) if config.get("decay_at") else -1
    lr = float(config["lr"])

    def make_optimizer(rate):
        return torch.optim.SGD(model.parameters(), lr=rate, momentum=float(config["momentum"]),
                               weight_decay=float(config["weight_decay"]))

    optimizer = make_optimizer(lr)
    batch_size = int(config["batch_size"])
    n = images.shape[0]
    losses = []
    bar = progress(range(epochs), desc=desc, enabled=show_progress)
    for epoch in bar:
        if epoch == decay_epoch:
            lr *= float(config["decay_factor"])
            if config.get("reset_momentum", True):
                optimizer = make_optimizer(lr)
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
        model.train()
        order = torch.randperm(n, generator=generator).to(images.device)
        total, count = 0.0, 0
        for start in range(0, n, batch_size):
            index = order[start:start + batch_size]
            batch = images[index]
            if dsa is not None:
                batch = dsa(batch, generator, per_sample=True)
            if ddp:
                share = world.share(index.numel())
                if not share:
                    share = [index.numel() - 1]  # every rank must take part in the gradient all-reduce
                index, batch = index[share[0]:share[-1] + 1], batch[share[0]:share[-1] + 1]
            loss = F.cross_entropy(trained(batch), labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += float(loss.detach()) * index.numel()
            count += index.numel()
        losses.append(total / max(1, count))
        if show_progress:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
