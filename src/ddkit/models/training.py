"""Generic classifier training on in-memory tensors: used to evaluate distilled sets, to train
the IDM model queue and the pretrained feature extractors of class centralization."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from torch.nn.parallel import DistributedDataParallel

from ddkit import distributed, precision
from ddkit.checkpoint import generator_state, load_tensors, restore_generator, save_tensors_atomic
from ddkit.errors import DDKitError
from ddkit.utils import check_flag, check_number, progress


class _SumOverRanks(torch.autograd.Function):
    """``all_reduce`` (sum) with its gradient: every rank's output is the sum of the inputs, so
    the gradient reaching each input is the sum of the output gradients of all ranks."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        total = tensor.clone()
        dist.all_reduce(total)
        return total

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        total = grad.clone()
        dist.all_reduce(total)
        return total


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics span every process's share of the batch.

    Under torchrun each process sees a slice of the batch; plain BatchNorm normalises with the
    slice's mean and variance (per GPU, as the papers' multi-GPU runs do). This layer sums
    per-channel ``sum x``, ``sum x^2`` and the count over the processes with a differentiable
    all-reduce, so forward, backward and the running statistics are those of the whole batch,
    the same as one process. Unlike ``torch.nn.SyncBatchNorm`` it also works on the CPU (gloo).
    In one process, or in eval mode, it is plain BatchNorm2d.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, C, H, W]`` normalised with the statistics of the whole batch across processes while training."""
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        channels = x.shape[1]
        count = torch.tensor([x.numel() / channels], dtype=x.dtype, device=x.device)
        totals = _SumOverRanks.apply(torch.cat([x.sum(dim=(0, 2, 3)), x.pow(2).sum(dim=(0, 2, 3)), count]))
        n = totals[-1]
        mean = totals[:channels] / n
        var = (totals[channels:2 * channels] / n - mean.pow(2)).clamp_min(0)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_(var.detach() * n / (n - 1).clamp_min(1), momentum)
        y = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + self.eps)
        if self.affine:
            y = y * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y


def synced_batch_norm(model: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm2d`` of ``model`` in place by a :class:`GlobalBatchNorm2d` that
    shares its parameters and starts from copies of its buffers (the state dict keeps its keys).
    Returns ``model``."""
    for name, child in list(model.named_children()):
        if type(child) is nn.BatchNorm2d:
            synced = GlobalBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            synced.to(next(child.buffers(), torch.zeros(())).device)
            if child.affine:
                synced.weight, synced.bias = child.weight, child.bias
            setattr(model, name, synced)
        else:
            synced_batch_norm(child)
    return model


class DataParallel:
    """Data parallelism for the in-memory training loops (hard and soft students, teachers).

    Under torchrun every rank draws the same batch order and augmentation; :meth:`share` gives
    this rank its contiguous slice of each batch and the factor its mean loss is scaled by, so
    that DistributedDataParallel's gradient average equals the gradient of the whole batch's mean
    loss, as in one process (a rank whose slice is empty trains on one sample with factor 0, since
    every rank must join the all-reduce). With ``sync_bn`` BatchNorm statistics span the whole
    batch (:class:`GlobalBatchNorm2d`); without it they are per process, as in the papers'
    multi-GPU runs. In one process it changes nothing.

    With ``compiled`` the training step calls ``torch.compile`` of that module: the same
    parameters and buffers, so the model's state dict, its checkpoints and its evaluation are
    those of the plain module, while the forward and backward run as fused kernels (faster
    after a first call that compiles; :func:`check_compile_available` says whether it can).

    Attributes:
        module: the module to call in the training step (the DDP wrapper under torchrun,
            compiled with ``compiled``).
    """

    def __init__(self, model: nn.Module, sync_bn: bool = False, compiled: bool = False):
        self.world = distributed.current()
        # the training passes' precision (ddkit.precision.using); the loss is computed in fp32
        self.amp = precision.current(next((p.device for p in model.parameters()), "cpu"))
        self.module = model
        if self.world.distributed:
            if sync_bn:
                synced_batch_norm(model)
            self.module = DistributedDataParallel(model)
        if compiled:
            if self.world.distributed:
                _quiet_ddp_profiler_notice()
            self.module = torch.compile(self.module)
        self.module = self.amp.wrap(self.module)

    def share(self, count: int) -> tuple[slice, float]:
        """(this rank's slice of a batch of ``count`` samples, its loss factor)."""
        if not self.world.distributed:
            return slice(0, count), 1.0
        mine = self.world.share(count)
        if not mine:
            return slice(count - 1, count), 0.0
        return slice(mine[0], mine[-1] + 1), self.world.size * len(mine) / count


def _drop_profiler_notice(record) -> bool:
    return not str(record.msg).startswith("Profiler record function")


def _quiet_ddp_profiler_notice() -> None:
    """Drop the warning torch.compile logs on every rank when it traces DDP's forward: DDP marks it
    with a profiler ``record_function``, which the compiled graph leaves out. Harmless, and with no
    profiler running there is nothing to lose; every other message of that logger still shows."""
    logger = logging.getLogger("torch._dynamo.variables.ctx_manager")
    if _drop_profiler_notice not in logger.filters:
        logger.addFilter(_drop_profiler_notice)


def check_compile_available(device) -> None:
    """Raise a one-line :class:`DDKitError` when ``torch.compile`` cannot build kernels for
    ``device``: its CPU backend compiles C++ (needs ``g++``, ``c++`` or ``clang++``, or ``$CXX``);
    its CUDA backend needs Triton."""
    if torch.device(device).type == "cuda":
        if importlib.util.find_spec("triton") is None:
            raise DDKitError("--compile on a GPU needs Triton (pip install triton); drop --compile to train eagerly")
        return
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    if not any(name and shutil.which(name) for name in compilers):
        raise DDKitError("--compile on the CPU needs a C++ compiler (g++, c++ or clang++, or $CXX); install one "
                         "(e.g. apt install g++) or drop --compile to train eagerly")


def _taps_of(net: nn.Module, images: torch.Tensor, taps: tuple[str, ...], sums=None) -> dict[str, torch.Tensor]:
    return net.forward_taps(images, taps, sums=sums)


_COMPILED_TAPS_OF = None


def taps_forward(compiled: bool = False):
    """The function ``(net, images [N, C, H, W], taps: tuple of names, sums=None) -> {tap: tensor}``
    that runs ``net.forward_taps`` (``sums``: a :class:`~ddkit.models.base.TapSums`); with
    ``compiled``, through ``torch.compile``.

    The distillation loops draw a new network every iteration. One compiled function serves them
    all: the parameters are inputs of the compiled graph, not constants, so a new network of the
    same architecture reuses the kernels compiled for the first; only a new batch shape, tap list
    or grad mode compiles again. Call :func:`check_compile_available` first for a one-line error.
    """
    global _COMPILED_TAPS_OF
    if not compiled:
        return _taps_of
    if _COMPILED_TAPS_OF is None:
        _COMPILED_TAPS_OF = torch.compile(_taps_of)
    return _COMPILED_TAPS_OF


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, factor: float = 1.0, amp=None) -> None:
    """One step on ``loss * factor`` (``factor`` from :meth:`DataParallel.share`): clear the
    gradients, backpropagate, update (through ``amp``, a :class:`ddkit.precision.Amp`, when given:
    fp16's gradient scaling)."""
    optimizer.zero_grad(set_to_none=True)
    scaled = loss * factor if factor != 1.0 else loss
    if amp is None:
        scaled.backward()
        optimizer.step()
    else:
        amp.backward(scaled)
        amp.step(optimizer)


class RunCheckpoint:
    """End-of-epoch checkpoints of one training run, so that a stopped run continues where it was.

    A quick IPC-50 evaluation run takes most of an hour on a CPU; this keeps all but about the last
    minute of it. The file (safetensors, no pickle, written through a temporary name and a rename)
    holds the model's state dict, the optimiser's state, the state of the generator that draws
    batch order and augmentation, and the loop's counters. Since all of a run's randomness comes
    from that generator, a resumed run gives the same weights, bit for bit on a CPU, as one that
    was never stopped.

    Under torchrun (data-parallel training) every rank restores from the file and rank 0 alone
    writes and removes it: the weights, optimiser and generator are the same on every rank, so
    rank 0's copy is everyone's. Per-process BatchNorm running statistics are the exception (each
    rank restores rank 0's); they never enter training, and rank 0's model is the one evaluated
    and saved, so its result is still that of a run never stopped. The folder must be on a file
    system every rank sees; :meth:`restore` fails on every rank if they did not all find the file.

    Args:
        path: the checkpoint file (its folder is created when first written).
        identity: JSON-able description of the run (what is trained, on what data, with which
            options and seed). A file written under another identity is ignored and replaced.
        every_seconds: least time between two writes (0: after every epoch).

    Attributes:
        seconds_before: seconds the run had taken before it was stopped (0 for a fresh run), so
            that a resumed run can report its whole time.
    """

    def __init__(self, path: str | Path, identity: dict, every_seconds: float = 60.0):
        self.path = Path(path)
        self.identity = json.loads(json.dumps(identity))
        self.every_seconds = float(every_seconds)
        self.seconds_before = 0.0
        self._started = self._last = time.monotonic()
        self._writer = distributed.current().is_main

    def restore(self, model: nn.Module, generator: torch.Generator) -> tuple[dict, dict] | None:
        """Load the model weights and the generator state of a matching checkpoint.

        Returns:
            (the optimiser's state dict, the loop's counters) to continue from, or None when there
            is no checkpoint of this run (or it is damaged).
        Raises:
            DDKitError: under torchrun, on every rank, when the ranks did not find the same checkpoint.
        """
        found = self._read()
        # Under torchrun, a rank that resumed while another started afresh would train a different
        # model in lockstep and hang or diverge silently: agree first, on every rank.
        position = -1 if found is None else int(found[1]["loop"].get("next_epoch", 0))
        if distributed.current().distributed:
            differs = int(distributed.broadcast_int(position) != position)
            if distributed.all_reduce_sum({"differs": differs})["differs"]:
                raise DDKitError(f"the processes of this run did not all find the epoch checkpoint {self.path}; "
                                 "put the output on a file system every process sees")
        if found is None:
            return None
        tensors, state = found
        model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        restore_generator(generator, tensors["generator"])
        optimizer_state = {"param_groups": state["optimizer"]["param_groups"], "state": {}}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = value
        for key, value in state["optimizer"]["scalars"].items():
            index, name = key.split(".", 1)
            optimizer_state["state"].setdefault(int(index), {})[name] = value
        self.seconds_before = float(state.get("seconds", 0.0))
        return optimizer_state, state["loop"]

    def _read(self) -> tuple[dict, dict] | None:
        """(tensors, state) of this run's checkpoint, or None (none, damaged, another identity)."""
        if not self.path.is_file():
            return None
        try:
            tensors, state = load_tensors(self.path)
        except (OSError, SafetensorError, ValueError, KeyError):
            return None
        return (tensors, state) if state.get("identity") == self.identity else None

    def maybe_save(self, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
                   loop: dict, final: bool = False) -> bool:
        """Write a checkpoint if ``every_seconds`` passed since the last one, or if ``final``.

        ``loop``: the JSON-able counters the loop needs to continue (next epoch, losses, ...).
        ``final``: the run's last epoch. Its checkpoint is always written and stays until the
        caller has stored what the run produced (:meth:`remove`): a stop between the end of
        training and that store then costs no training at all.
        Returns whether it wrote (never on a rank other than 0)."""
        if not self._writer:
            return False
        if not final and time.monotonic() - self._last < self.every_seconds:
            return False
        tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
        tensors["generator"] = generator_state(generator)
        optimizer_state = optimizer.state_dict()
        scalars = {}
        for index, values in optimizer_state["state"].items():
            for name, value in values.items():
                if torch.is_tensor(value):
                    tensors[f"optimizer.{index}.{name}"] = value
                else:
                    scalars[f"{index}.{name}"] = value
        self.path.parent.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(self.path, tensors, {
            "identity": self.identity, "loop": loop, "seconds": self.seconds_before + time.monotonic() - self._started,
            "optimizer": {"param_groups": optimizer_state["param_groups"], "scalars": scalars},
        })
        self._last = time.monotonic()
        return True

    def remove(self) -> None:
        """Delete the checkpoint, and its folder if that is now empty.

        Called by the owner of the run once its result (a teacher file, an evaluation record) is
        stored; the training loops never delete it themselves. A no-op on a rank other than 0."""
        if not self._writer:
            return
        self.path.unlink(missing_ok=True)
        try:
            self.path.parent.rmdir()
        except OSError:
            pass


def end_epoch(bar, losses: list[float], loss_sum: float, samples: int, checkpoint: RunCheckpoint | None,
              model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator, loop: dict,
              last: bool) -> None:
    """Close one epoch of a training loop (:func:`train_classifier`, the soft protocol's).

    Appends the epoch's mean loss (``loss_sum`` over ``samples``) to ``losses``, shows it on the
    progress ``bar``, and writes the epoch checkpoint: at most every ``checkpoint.every_seconds``,
    and always after the ``last`` epoch. ``loop``: the counters to continue from, without
    ``losses``, which this adds."""
    losses.append(loss_sum / max(1, samples))
    if not bar.disable:
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    if checkpoint is not None:
        checkpoint.maybe_save(model, optimizer, generator, {**loop, "losses": losses}, final=last)


@torch.no_grad()
def test_accuracy(model, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    """Top-1 accuracy in [0, 1] of ``model`` (put in eval mode) on normalised images [N, C, H, W]
    (a tensor, or a streaming split's :class:`ddkit.data.streaming.NormalizedSplit`, read through
    its loader; ``labels`` are then the split's own)."""
    model.eval()
    correct = 0
    if hasattr(images, "batches"):  # a split streamed from disk
        for batch, truth in images.batches(batch_size):
            correct += int((model(batch).argmax(1) == truth).sum())
        return correct / max(1, images.shape[0])
    for start in range(0, images.shape[0], batch_size):
        logits = model(images[start:start + batch_size])
        correct += int((logits.argmax(1) == labels[start:start + batch_size]).sum())
    return correct / max(1, images.shape[0])


def check_training_options(config: dict, what: str) -> None:
    """Refuse, with one line, options of a classifier-training config that no loop could use.

    Checks what is present of: ``epochs``, ``batch_size``, ``eval_batch_size`` (integers >= 1),
    ``lr`` (> 0), ``weight_decay`` (>= 0), ``momentum`` (in [0, 1]), ``decay_at`` (None or 0 for no
    decay, else in (0, 1]), ``decay_factor`` (> 0), ``reset_momentum`` and ``sync_bn`` (flags) and
    ``model`` (a dict). Without this a string reached ``int()`` deep inside the loop (a traceback),
    and ``epochs=0`` or a negative batch size trained nothing and went on as if it had.

    Args:
        config: the resolved options (preset plus ``--set`` overrides).
        what: names the options in the message: "evaluation", "squeeze", ...
    """
    for key in ("epochs", "batch_size", "eval_batch_size"):
        if key in config:
            check_number(what, key, config[key], integer=True, minimum=1)
    check_number(what, "lr", config["lr"], above=0)
    check_number(what, "weight_decay", config["weight_decay"], minimum=0)
    check_number(what, "momentum", config["momentum"], minimum=0, maximum=1)
    if config.get("decay_at") not in (None, 0):
        check_number(what, "decay_at", config["decay_at"], above=0, maximum=1)
    if "decay_factor" in config:
        check_number(what, "decay_factor", config["decay_factor"], above=0)
    for key in ("reset_momentum", "sync_bn"):
        if key in config:
            check_flag(what, key, config[key])
    if not isinstance(config.get("model", {}), dict):
        raise DDKitError(f"{what} option model={config['model']!r} is not valid; set model options one by one, "
                         f"e.g. --set model.width=64")


def train_classifier(
    model: torch.nn.Module,
    images: torch.Tensor,
    labels: torch.Tensor,
    config: dict,
    generator: torch.Generator,
    dsa=None,
    show_progress: bool = False,
    desc: str = "train",
    checkpoint: RunCheckpoint | None = None,
    compiled: bool = False,
) -> list[float]:
    """Train ``model`` with cross-entropy on in-memory normalised images, on the schedule of the
    matching family's hard-label evaluation (SGD with momentum, the lr times ``decay_factor`` at
    ``decay_at`` of the epochs: Zhao & Bilen 2021, "Dataset Condensation with Differentiable Siamese
    Augmentation", and Zhao & Bilen 2023, "Dataset Condensation with Distribution Matching").

    Args:
        images: float [N, C, H, W], normalised, already on the model's device.
        labels: int64 [N] on the same device.
        config: epochs, lr, momentum, weight_decay, batch_size, decay_at, decay_factor, reset_momentum.
        generator: drives batch order and augmentation (CPU generator; draws are moved to the device).
        dsa: a :class:`ddkit.augment.DSA` applied per sample on every batch, or None.
        checkpoint: a :class:`RunCheckpoint` to continue from and to write at epoch ends (under
            torchrun rank 0 writes it and every rank restores it), or None. The last epoch's is
            always written and left for the caller to remove once the trained model's result is
            stored.
        compiled: run the training step through ``torch.compile`` (:class:`DataParallel`).

    Under torchrun (``ddkit.distributed`` set up with several processes) the model trains with
    :class:`DataParallel`: each rank takes its slice of every batch and the averaged gradient is
    the whole batch's. BatchNorm statistics are per process unless ``config["sync_bn"]``.

    Returns:
        The mean training loss of each epoch (this rank's share).
    """
    parallel = DataParallel(model, bool(config.get("sync_bn", False)), compiled)
    epochs = int(config["epochs"])
    decay_epoch = int(round(epochs * float(config["decay_at"]))) if config.get("decay_at") else -1
    lr = float(config["lr"])

    def make_optimizer(rate):
        return torch.optim.SGD(model.parameters(), lr=rate, momentum=float(config["momentum"]),
                               weight_decay=float(config["weight_decay"]))

    optimizer = make_optimizer(lr)
    batch_size = int(config["batch_size"])
    n = images.shape[0]
    losses, first_epoch = [], 0
    resumed = checkpoint.restore(model, generator) if checkpoint is not None else None
    if resumed is not None:
        optimizer_state, loop = resumed
        lr, first_epoch, losses = float(loop["lr"]), int(loop["next_epoch"]), list(loop["losses"])
        optimizer = make_optimizer(lr)
        optimizer.load_state_dict(optimizer_state)
    bar = progress(range(first_epoch, epochs), desc=desc, enabled=show_progress, initial=first_epoch, total=epochs)
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
            mine, factor = parallel.share(index.numel())
            index, batch = index[mine], batch[mine]
            loss = F.cross_entropy(parallel.module(batch), labels[index])
            optimizer_step(optimizer, loss, factor, parallel.amp)
            total += float(loss.detach()) * index.numel()
            count += index.numel()
        end_epoch(bar, losses, total, count, checkpoint, model, optimizer, generator,
                  {"next_epoch": epoch + 1, "lr": lr}, last=epoch + 1 == epochs)
    return losses
