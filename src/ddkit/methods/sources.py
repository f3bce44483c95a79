"""Where the matching engine gets its networks from.

- :class:`RandomNets`: a freshly initialised network every iteration (DM, IID, DDM).
- :class:`ModelQueue`: IDM's queue of networks that are trained a little after every iteration.
- :class:`PretrainedPool`: IID's pool of feature extractors trained on the real data on first use,
  cached on disk as safetensors with a manifest and reused by key.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from ddkit import precision
from ddkit.errors import DDKitError
from ddkit.methods.squeeze import build_net, frozen, train_cached
from ddkit.utils import check_number


def draw_seed(generator: torch.Generator) -> int:
    """A 31-bit seed drawn from ``generator`` (for initialising one network)."""
    return int(torch.randint(0, 2**31 - 1, (1,), generator=generator))


def use_channels_last(option, device) -> bool:
    """The ``channels_last`` option: "auto" means on the CPU; true/false force it."""
    if option == "auto":
        return torch.device(device).type == "cpu"
    if isinstance(option, bool):
        return option
    raise DDKitError(f"channels_last must be auto, true or false, got {option!r}")


def channels_last_twin(net: torch.nn.Module) -> torch.nn.Module | None:
    """A copy of ``net`` with its weights in channels-last layout (the same values), or None for a
    network with buffers (BatchNorm's running statistics), whose updates must reach ``net`` itself.

    The matching engine runs the real side (no gradients) through the twin and the synthetic side
    (forward and backward) through ``net`` in the standard layout: on the CPU the convolutions run
    faster channels-last, while GroupNorm's backward on 32 x 32 maps and the pools run several times
    slower there (docs/speed.md).
    """
    if any(True for _ in net.buffers()):
        return None
    return copy.deepcopy(net).to(memory_format=torch.channels_last)


class RandomNets:
    """A fresh, frozen, randomly initialised network for every iteration (DM)."""

    def __init__(self, model_config: dict, real, device, generator: torch.Generator):
        self.model_config, self.real, self.device, self.generator = model_config, real, device, generator

    def next(self, iteration: int) -> tuple[torch.nn.Module, float]:
        """The network to match with at ``iteration`` and its accuracy scale (1 here)."""
        net = build_net(self.model_config, self.real, draw_seed(self.generator), self.device)
        return frozen(net).train(), 1.0

    def after_step(self, iteration: int, sample_real) -> None:
        """Nothing to train."""


class ModelQueue:
    """IDM's model queue (Zhao et al., "Improved Distribution Matching for Dataset Condensation",
    CVPR 2023), as the authors' code runs it.

    Starts with ``initial`` random networks, each with its own SGD optimiser (``lr``, ``momentum``,
    ``weight_decay``) that it keeps for its whole life, so momentum carries across its training
    calls. Every ``push_every`` iterations, iteration 0 included, a new network is pushed and the
    oldest beyond ``max_size`` dropped. Each iteration one queued network is sampled for matching
    (in eval mode, as the reference matches); afterwards ``train_nets`` DISTINCT random queued
    networks are each trained ``train_steps`` SGD steps of cross-entropy on un-augmented real
    batches of ``train_batch`` images drawn from all classes without replacement, their passes in
    the run's precision (``precision_name``: autocast under bf16, the loss in fp32).

    A network's accuracy is its training accuracy accumulated over every step since the last
    reset, as the reference's torchnet ``ClassErrorMeter``; all meters are reset every
    ``accuracy_reset_every`` iterations (the reference resets at its evaluation interval; 0 = never)
    and a network never trained since reads 0, so it adds no class-aware CE.
    """

    def __init__(self, model_config: dict, queue_config: dict, real, device, generator: torch.Generator,
                 precision_name: str = "fp32"):
        self.model_config, self.config, self.real, self.device = model_config, queue_config, real, device
        self.generator = generator
        # the queue's training passes in the run's precision, with their own fp16 gradient scaler
        self.amp = precision.Amp(precision_name, device)
        self.nets: list[torch.nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        #: [correct, seen] training predictions per net since the last reset
        self.meters: list[list[int]] = []
        for _ in range(int(queue_config["initial"])):
            self._push()

    def _optimizer(self, net: torch.nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=float(self.config["lr"]), momentum=float(self.config["momentum"]),
                               weight_decay=float(self.config["weight_decay"]))

    def _push(self) -> None:
        net = build_net(self.model_config, self.real, draw_seed(self.generator), self.device).train()
        self.nets.append(net)
        self.optimizers.append(self._optimizer(net))
        self.meters.append([0, 0])
        while len(self.nets) > int(self.config["max_size"]):
            for members in (self.nets, self.optimizers, self.meters):
                members.pop(0)

    def accuracy(self, index: int) -> float:
        """Training accuracy of queued net ``index`` since the last reset, a fraction in [0, 1]."""
        correct, seen = self.meters[index]
        return correct / seen if seen else 0.0

    def next(self, iteration: int) -> tuple[torch.nn.Module, float]:
        """A queued network (frozen, eval mode, for the matching step) and its accuracy in [0, 1]."""
        reset = int(self.config.get("accuracy_reset_every", 0))
        if reset and iteration > 0 and iteration % reset == 0:
            self.meters = [[0, 0] for _ in self.nets]
        if iteration % int(self.config["push_every"]) == 0:
            self._push()
        index = int(torch.randint(len(self.nets), (1,), generator=self.generator))
        return frozen(self.nets[index]).eval(), self.accuracy(index)

    def after_step(self, iteration: int, sample_real) -> None:
        """Train ``train_nets`` distinct random queued networks for ``train_steps`` steps each."""
        steps, batch = int(self.config["train_steps"]), int(self.config["train_batch"])
        chosen = torch.randperm(len(self.nets), generator=self.generator)[:int(self.config["train_nets"])].tolist()
        for index in chosen:
            net, optimizer, meter = self.nets[index], self.optimizers[index], self.meters[index]
            for parameter in net.parameters():
                parameter.requires_grad_(True)
            net.train()
            for _ in range(steps):
                images, labels = sample_real(batch)
                with self.amp.autocast():
                    logits = self.amp.fp32(net(images))
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                self.amp.backward(loss)
                self.amp.step(optimizer)
                meter[0] += int((logits.detach().argmax(1) == labels).sum())
                meter[1] += labels.numel()

    # ---- checkpoints ------------------------------------------------------------------------
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        """Tensors (weights and optimiser momentum of every queued net) and JSON state (meters)."""
        tensors = {}
        for i, (net, optimizer) in enumerate(zip(self.nets, self.optimizers)):
            tensors.update({f"queue.{i}.{name}": value for name, value in net.state_dict().items()})
            for j, parameter in enumerate(net.parameters()):
                buffer = optimizer.state.get(parameter, {}).get("momentum_buffer")
                if buffer is not None:
                    tensors[f"queue_momentum.{i}.{j}"] = buffer
        return tensors, {"queue_meters": self.meters, "queue_size": len(self.nets)}

    def restore(self, tensors: dict[str, torch.Tensor], state: dict) -> None:
        """Rebuild the queue from :meth:`state`'s output (meters default to empty)."""
        size = int(state.get("queue_size", len(state.get("queue_accuracies", []))))
        self.nets, self.optimizers = [], []
        for i in range(size):
            net = build_net(self.model_config, self.real, seed=0, device=self.device)
            prefix = f"queue.{i}."
            net.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
            optimizer = self._optimizer(net.train())
            for j, parameter in enumerate(net.parameters()):
                buffer = tensors.get(f"queue_momentum.{i}.{j}")
                if buffer is not None:
                    optimizer.state[parameter]["momentum_buffer"] = buffer.to(self.device).clone()
            self.nets.append(net)
            self.optimizers.append(optimizer)
        self.meters = [list(m) for m in state.get("queue_meters", [[0, 0]] * size)]


class PretrainedPool:
    """IID's pool of feature extractors trained on the real data (Deng et al., "Exploiting
    Inter-sample and Inter-feature Relations in Dataset Distillation", CVPR 2024), one drawn per
    iteration.

    Member ``i`` is trained with seed ``1000 + i`` through :func:`ddkit.methods.squeeze.train_cached`
    with the recipe of ``config`` (``epochs``, ``lr``, ``momentum``, ``weight_decay``,
    ``batch_size``, ``train_subset``; ``lr_decay_at`` / ``lr_decay_factor``: a step decay, none in
    the reference, which trains at a constant lr), and cached under ``$DDKIT_DATA/pretrained``, so
    any change of recipe trains new networks. A member is trained (or loaded) the first time it is
    drawn, and at most ``in_memory`` members stay loaded: the reference's pool of 1000 ResNet-18s
    would not fit in memory at once. ``compiled``: train through torch.compile.
    """

    def __init__(self, config: dict, real, device, show_progress: bool = False, compiled: bool = False):
        self.config, self.real, self.device, self.compiled = config, real, device, compiled
        self.show_progress = show_progress
        check_number("cc", "pool_size", config["pool_size"], integer=True, minimum=1)
        check_number("cc", "in_memory", config.get("in_memory", 4), integer=True, minimum=1)
        self.size = int(config["pool_size"])
        self.loaded: dict[int, torch.nn.Module] = {}

    def _member(self, index: int) -> torch.nn.Module:
        keys = ("epochs", "train_subset", "batch_size", "lr", "momentum", "weight_decay")
        schedule = {k: self.config[k] for k in keys}
        schedule["decay_at"] = float(self.config.get("lr_decay_at", 0.5))
        schedule["decay_factor"] = float(self.config.get("lr_decay_factor", 1.0))
        teacher = train_cached(self.real, self.config["model"], schedule, seed=1000 + index, device=self.device,
                               kind="pretrained", show_progress=self.show_progress,
                               desc=f"pretrain feature net {index}", compiled=self.compiled, options_name="cc")
        return teacher.model

    def get(self, index: int) -> torch.nn.Module:
        """Member ``index``, trained or loaded on first use; the least recently used is dropped."""
        if index in self.loaded:
            self.loaded[index] = self.loaded.pop(index)
        else:
            self.loaded[index] = self._member(index)
            while len(self.loaded) > int(self.config.get("in_memory", 4)):
                self.loaded.pop(next(iter(self.loaded)))
        return self.loaded[index]

    def next(self, generator: torch.Generator) -> torch.nn.Module:
        """One member, chosen uniformly with ``generator``."""
        return self.get(int(torch.randint(self.size, (1,), generator=generator)))
