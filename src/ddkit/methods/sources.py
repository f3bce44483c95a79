"""Where the matching engine gets its networks from.

- :class:`RandomNets`: a freshly initialised network every iteration (DM, IID, DDM).
- :class:`ModelQueue`: IDM's queue of networks that are trained a little after every iteration.
- :class:`PretrainedPool`: IID's pool of feature extractors trained once on the real data, cached
  on disk as safetensors with a manifest and reused by key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

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


class RandomNets:
    """A fresh, frozen, randomly initialised network for every iteration (DM).

    ``channels_last``: keep the network's weights (and so its activations) in channels-last
    layout, which the CPU's convolutions run faster; the weights' values are the same.
    """

    def __init__(self, model_config: dict, real, device, generator: torch.Generator, channels_last: bool = False):
        self.model_config, self.real, self.device, self.generator = model_config, real, device, generator
        self.channels_last = channels_last

    def next(self, iteration: int) -> tuple[torch.nn.Module, float]:
        """The network to match with at ``iteration`` and its accuracy scale (1 here)."""
        net = build_net(self.model_config, self.real, draw_seed(self.generator), self.device)
        if self.channels_last:
            net = net.to(memory_format=torch.channels_last)
        return frozen(net).train(), 1.0

    def after_step(self, iteration: int, sample_real) -> None:
        """Nothing to train."""


class ModelQueue:
    """IDM's model queue.

    Starts with ``initial`` random networks; every ``push_every`` iterations pushes a new one and
    drops the oldest beyond ``max_size``. Each iteration one queued network is sampled for matching;
    afterwards ``train_nets`` random queued networks are each trained ``train_steps`` SGD steps of
    cross-entropy on un-augmented real batches of ``train_batch`` images from all classes.
    A network's accuracy is its training accuracy over its most recent training call (a fraction
    in [0, 1]; 0 before it was ever trained).
    """

    def __init__(self, model_config: dict, queue_config: dict, real, device, generator: torch.Generator):
        self.model_config, self.config, self.real, self.device = model_config, queue_config, real, device
        self.generator = generator
        self.nets: list[torch.nn.Module] = []
        self.accuracies: list[float] = []
        for _ in range(int(queue_config["initial"])):
            self._push()

    def _push(self) -> None:
        self.nets.append(build_net(self.model_config, self.real, draw_seed(self.generator), self.device).train())
        self.accuracies.append(0.0)
        while len(self.nets) > int(self.config["max_size"]):
            self.nets.pop(0)
            self.accuracies.pop(0)

    def _pick(self) -> int:
        return int(torch.randint(len(self.nets), (1,), generator=self.generator))

    def next(self, iteration: int) -> tuple[torch.nn.Module, float]:
        """A queued network (frozen for the matching step) and its running accuracy in [0, 1]."""
        if iteration > 0 and iteration % int(self.config["push_every"]) == 0:
            self._push()
        index = self._pick()
        return frozen(self.nets[index]), self.accuracies[index]

    def after_step(self, iteration: int, sample_real) -> None:
        """Train ``train_nets`` random queued networks for ``train_steps`` steps each."""
        steps, batch = int(self.config["train_steps"]), int(self.config["train_batch"])
        for _ in range(int(self.config["train_nets"])):
            index = self._pick()
            net = self.nets[index]
            for parameter in net.parameters():
                parameter.requires_grad_(True)
            optimizer = torch.optim.SGD(net.parameters(), lr=float(self.config["lr"]),
                                        momentum=float(self.config["momentum"]),
                                        weight_decay=float(self.config["weight_decay"]))
            correct = total = 0
            net.train()
            for _ in range(steps):
                images, labels = sample_real(batch)
                logits = net(images)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                correct += int((logits.detach().argmax(1) == labels).sum())
                total += labels.numel()
            self.accuracies[index] = correct / max(1, total)


class PretrainedPool:
    """Feature extractors trained on the real data, cached under ``$DDKIT_DATA/pretrained``.

    Member ``i`` is trained with seed ``1000 + i`` through :func:`ddkit.methods.squeeze.train_cached`,
    so any change of recipe trains (and caches) new networks (``compiled``: through torch.compile).
    """

    def __init__(self, config: dict, real, device, show_progress: bool = False, compiled: bool = False):
        self.config, self.real, self.device, self.compiled = config, real, device, compiled
        check_number("cc", "pool_size", config["pool_size"], integer=True, minimum=1)
        self.nets = [self._member(index, show_progress) for index in range(config["pool_size"])]

    def _member(self, index: int, show_progress: bool) -> torch.nn.Module:
        keys = ("epochs", "train_subset", "batch_size", "lr", "momentum", "weight_decay")
        schedule = {"decay_at": 0.5, "decay_factor": 0.1, **{k: self.config[k] for k in keys}}
        teacher = train_cached(self.real, self.config["model"], schedule, seed=1000 + index, device=self.device,
                               kind="pretrained", show_progress=show_progress, desc=f"pretrain feature net {index}",
                               compiled=self.compiled, options_name="cc")
        return teacher.model

    def next(self, generator: torch.Generator) -> torch.nn.Module:
        """One member, chosen uniformly with ``generator``."""
        return self.nets[int(torch.randint(len(self.nets), (1,), generator=generator))]
