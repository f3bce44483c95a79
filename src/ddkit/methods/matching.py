"""The distribution-matching engine: one loop that DM, IDM, IID and DDM (and any mix) share.

Each iteration:
1. a network from the model source (fresh random net, or the IDM queue);
2. a real batch of ``batch_real`` images per class and the synthetic images (decoded by IDM's
   partition-and-expansion when ``partition > 1``), both augmented with one siamese DSA draw per
   class;
3. ONE batched forward for all classes on each side (real under ``no_grad``), or a per-class
   forward for BatchNorm networks / tight memory (``forward: per_class``);
4. the weighted sum of the enabled loss terms (``weights``), each a pure function of
   ``ddkit.losses`` on class-grouped features:

   ======== ================================================================ =============
   term     what                                                             paper weight
   ======== ================================================================ =============
   mean     DM mean-feature matching on the final embedding                  1
   cm       IID local covariance matching on the final feature map          0.01 / 0.03
   cc       IID class centralization on a pretrained net's embedding        0.05 / 0.01
   style    DDM moment (mean/std) matching on every block's output           1e4
   gram     DDM correlation (Gram) matching on every block's output          1e4 (off)
   icd      DDM intra-class diversity (guarded -KL to k-NN means)            10
   ce       IDM class-aware cross-entropy, scaled by the net's accuracy      0.5 / 0.1
   ======== ================================================================ =============
5. one SGD step on every synthetic pixel.

With instance-norm networks a class's features depend on its own samples only, so the batched
pass gives exactly the per-class result, far faster. Synthetic images are kept as one leaf tensor
per class; an elementwise optimiser over them is exactly "separate optimiser state per class", so
stepping per class (the IDM reference) needs no separate optimiser objects.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ddkit.augment import DSA, dsa_strategy_for
from ddkit.augment.grouped import siamese_per_class
from ddkit.augment.partition import partition_expand
from ddkit.data.sampling import check_ipc, sample_real_per_class
from ddkit.errors import DDKitError
from ddkit.losses import (
    class_centralization_loss, gram_loss, icd_neighbours, intra_class_kl_loss, local_covariance_loss,
    mean_feature_loss, moment_loss,
)
from ddkit import distributed
from ddkit.checkpoint import commit, generator_state, load_latest, restore_generator, write_part
from ddkit.methods.sources import ModelQueue, PretrainedPool, RandomNets, use_channels_last
from ddkit.methods.squeeze import build_net
from ddkit.models.training import taps_forward
from ddkit.utils import check_flag, check_number, denormalize, make_generator, normalize, progress

TERMS = ("mean", "cm", "cc", "style", "gram", "icd", "ce")
#: Weight a term gets when switched on with ``--terms`` without an explicit ``--weight``.
DEFAULT_TERM_WEIGHTS = {"mean": 1.0, "cm": 0.01, "cc": 0.05, "style": 1e4, "gram": 1e4, "icd": 10.0, "ce": 0.5}


class NonFiniteLoss(DDKitError):
    """The loss became NaN or infinite; ``partial`` holds the last good synthetic set."""

    def __init__(self, message: str, partial=None):
        super().__init__(message)
        self.partial = partial


def check_config(config: dict, real, ipc: int) -> None:
    """Refuse impossible settings with one line each (negative weights, unknown terms, ...)."""
    weights = config["weights"]
    unknown = sorted(set(weights) - set(TERMS))
    if unknown:
        raise DDKitError(f"unknown loss term(s) {', '.join(unknown)}; choose from: {', '.join(TERMS)}")
    for term, weight in weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise DDKitError(f"weight of term {term!r} must be a non-negative number, got {weight!r}")
    if not any(weights.values()):
        raise DDKitError("every loss term has weight 0; enable at least one with --terms or --weight")
    if weights.get("ce") and config["model_source"] != "queue":
        raise DDKitError("the ce term needs trained networks; add --set model_source=queue (as IDM does)")
    if config["model_source"] not in ("random", "queue"):
        raise DDKitError(f"model_source must be random or queue, got {config['model_source']!r}")
    if config["forward"] not in ("batched", "per_class"):
        raise DDKitError(f"forward must be batched or per_class, got {config['forward']!r}")
    if config["init"] not in ("real", "noise"):
        raise DDKitError(f"init must be real or noise, got {config['init']!r}")
    for key in ("iterations", "batch_real", "partition", "log_every"):
        check_number("distillation", key, config[key], integer=True, minimum=1)
    check_number("distillation", "real_chunk", config["real_chunk"], integer=True, minimum=0)
    check_number("distillation", "lr_img", config["lr_img"], above=0)
    check_number("distillation", "momentum_img", config["momentum_img"], minimum=0, maximum=1)
    check_number("distillation", "ce_accuracy_scale", config["ce_accuracy_scale"], minimum=0)
    for key in ("dsa", "legacy_step_per_class"):
        check_flag("distillation", key, config[key])
    queue = config["queue"]
    for key in ("initial", "push_every", "max_size", "train_nets", "train_steps", "train_batch"):
        check_number("distillation", f"queue.{key}", queue[key], integer=True, minimum=1)
    check_number("distillation", "queue.lr", queue["lr"], above=0)
    factor = config["partition"]
    _, height, width = real.image_shape
    if height % factor or width % factor:
        raise DDKitError(f"partition {factor} must be a positive divisor of the image size {height}x{width}")
    check_ipc(real, ipc * factor * factor if config["init"] == "real" else ipc)
    if config["batch_real"] > int(torch.bincount(real.train.labels).min()):
        raise DDKitError(f"batch_real {config['batch_real']} exceeds the smallest class of {real.name}; lower it")


def initial_images(real, ipc: int, factor: int, init: str, generator: torch.Generator) -> torch.Tensor:
    """Starting synthetic images in pixel space, class-major: float [K*ipc, C, H, W].

    ``init="real"``: random real images of each class; with ``factor > 1`` every cell of the
    factor x factor grid is a different real image downscaled by ``factor`` (IDM).
    ``init="noise"``: N(0, 1) in normalised space, mapped back to pixels.
    """
    channels, height, width = real.image_shape
    count = real.num_classes * ipc
    if init == "noise":
        noise = torch.randn(count, channels, height, width, generator=generator)
        return denormalize(noise, real.mean, real.std)
    cells = factor * factor
    index = sample_real_per_class(real, ipc * cells, generator)
    images = real.train.images[index].float() / 255.0
    if factor == 1:
        return images
    small = F.interpolate(images, size=(height // factor, width // factor), mode="bilinear",
                          align_corners=False, antialias=True)
    small = small.reshape(count, factor, factor, channels, height // factor, width // factor)
    return small.permute(0, 3, 1, 4, 2, 5).reshape(count, channels, height, width)


class RealSampler:
    """Real training images kept on the device as uint8 and normalised per batch."""

    def __init__(self, real, device, generator: torch.Generator):
        self.images = real.train.images.to(device)
        self.labels = real.train.labels.to(device)
        self.class_indices = [idx.to(device) for idx in real.class_indices("train")]
        self.mean, self.std, self.generator, self.device = real.mean, real.std, generator, device

    def _prepare(self, index: torch.Tensor) -> torch.Tensor:
        return normalize(self.images[index].float().div_(255.0), self.mean, self.std)

    def per_class(self, count: int, kept: list[int] | None = None) -> torch.Tensor:
        """``count`` distinct random images of every class, class-major, normalised: [K*count, C, H, W].

        ``kept``: only these classes' images are gathered (a class-split run), while the draws of
        every class are made as in an unsplit run, so each class gets the same images anywhere.
        """
        picks = [torch.randperm(idx.numel(), generator=self.generator)[:count] for idx in self.class_indices]
        classes = range(len(picks)) if kept is None else kept
        return self._prepare(torch.cat([self.class_indices[c][picks[c].to(self.device)] for c in classes]))

    def mixed(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` random images from all classes (no augmentation): (images, labels)."""
        index = torch.randint(self.labels.numel(), (count,), generator=self.generator).to(self.device)
        return self._prepare(index), self.labels[index]


def block_taps(net) -> list[str]:
    """The per-block intermediate taps of a network (``block0``, ``block1``, ... for ConvNet)."""
    names = [t for t in net.tap_names if t.startswith("block") or t.startswith("layer")]
    if not names:
        raise DDKitError(f"{net.arch} exposes no block taps for style/gram matching; use convnet or resnet18")
    return names


class MatchingEngine:
    """Runs the matching loop for one configuration (see the module docstring)."""

    def __init__(self, real, ipc: int, config: dict, seed: int, device, show_progress: bool = True,
                 compiled: bool = False):
        check_config(config, real, ipc)
        distributed.check_supported(config)
        self.world = distributed.current()
        # this process's classes; every rank still makes every random draw (see docs/scaling.md)
        self.classes = self.world.share(real.num_classes)
        self.real, self.ipc, self.config, self.seed, self.device = real, ipc, config, seed, device
        self.show_progress = show_progress
        # the matching network's forward (real and synthetic side), compiled or not: an execution
        # detail like the device, so it is not part of ``config``
        self.taps_of = taps_forward(compiled)
        self.weights = {t: float(w) for t, w in config["weights"].items() if w}
        self.factor = int(config["partition"])
        self.generator = make_generator(seed)
        strategy = dsa_strategy_for(real.name) if config["dsa_strategy"] == "auto" else config["dsa_strategy"]
        self.dsa = DSA(strategy if config["dsa"] else "none")
        self.sampler = RealSampler(real, device, self.generator)
        if config["model_source"] == "queue":
            self.source = ModelQueue(config["model"], config["queue"], real, device, self.generator)
        else:
            self.source = RandomNets(config["model"], real, device, self.generator,
                                     channels_last=use_channels_last(config.get("channels_last", "auto"), device))
        self.pool = (PretrainedPool(config["cc"], real, device, show_progress, compiled=compiled)
                     if "cc" in self.weights else None)
        pixels = initial_images(real, ipc, self.factor, config["init"], self.generator)
        start = normalize(pixels, real.mean, real.std).to(device)
        # One leaf tensor per class: per-class optimiser state comes for free (see module docstring).
        self.synthetic = [start[c * ipc:(c + 1) * ipc].clone().requires_grad_(True) for c in range(real.num_classes)]
        self.optimizer = torch.optim.SGD(self.synthetic, lr=float(config["lr_img"]),
                                         momentum=float(config["momentum_img"]))
        self.expanded_per_class = ipc * self.factor * self.factor
        self.icd_k = icd_neighbours(self.expanded_per_class)
        self.log: list[dict] = []

    # ---- one iteration ---------------------------------------------------------------------
    def _taps(self, net) -> tuple[list[str], list[str], list[str]]:
        blocks = block_taps(net) if ("style" in self.weights or "gram" in self.weights) else []
        real_taps = blocks + (["features"] if "cm" in self.weights else []) + ["embedding"]
        syn_taps = real_taps + (["logits"] if "ce" in self.weights else [])
        return blocks, real_taps, syn_taps

    def _real_taps(self, net, real_aug: torch.Tensor, taps: list[str]) -> dict[str, torch.Tensor]:
        """Real features without gradient, in chunks of ``real_chunk`` images.

        Chunks keep the activations cache-sized (faster on CPUs, less memory on GPUs) and are exact
        for networks whose normalisation couples no samples; BatchNorm nets use forward=per_class.
        """
        chunk = int(self.config["real_chunk"]) or real_aug.shape[0]
        with torch.no_grad():
            parts = [self.taps_of(net, real_aug[i:i + chunk], tuple(taps)) for i in range(0, real_aug.shape[0], chunk)]
        return {name: torch.cat([part[name] for part in parts]) for name in taps}

    def _class_losses(self, net, accuracy: float, real_aug, syn_aug, syn_labels, classes: int, extractor) -> dict:
        """Weighted terms for ``classes`` class-major groups already augmented."""
        blocks, real_taps, syn_taps = self._taps(net)
        real_out = self._real_taps(net, real_aug, real_taps)
        syn_out = self.taps_of(net, syn_aug, tuple(syn_taps))

        def grouped(t):
            return t.reshape(classes, -1, *t.shape[1:])

        terms = {}
        if "mean" in self.weights:
            terms["mean"] = mean_feature_loss(grouped(real_out["embedding"]), grouped(syn_out["embedding"]))
        if "cm" in self.weights:
            terms["cm"] = local_covariance_loss(grouped(real_out["features"]), grouped(syn_out["features"]))
        if "style" in self.weights:
            terms["style"] = moment_loss([grouped(real_out[b]) for b in blocks], [grouped(syn_out[b]) for b in blocks])
        if "gram" in self.weights:
            terms["gram"] = gram_loss([grouped(real_out[b]) for b in blocks], [grouped(syn_out[b]) for b in blocks])
        if "icd" in self.weights:
            if self.icd_k >= 1:
                terms["icd"] = intra_class_kl_loss(grouped(syn_out["embedding"]), k=self.icd_k,
                                                   max_kl=float(self.config["icd"]["max_kl"]))
        if "ce" in self.weights:
            # Sum over classes of each class's mean cross-entropy, as the per-class reference loop does.
            per_class = syn_aug.shape[0] // classes
            ce = F.cross_entropy(syn_out["logits"], syn_labels, reduction="sum") / per_class
            terms["ce"] = ce * accuracy * float(self.config["ce_accuracy_scale"])
        if "cc" in self.weights:
            cc_config = self.config["cc"]
            terms["cc"] = class_centralization_loss(grouped(extractor.embed(syn_aug)), form=cc_config["form"],
                                                    beta=float(cc_config["beta"]),
                                                    temperature=float(cc_config["temperature"]))
        return terms

    def step(self, iteration: int) -> dict[str, float]:
        """One matching iteration; returns the unweighted value of each term and the total."""
        net, accuracy = self.source.next(iteration)
        split = self.world.distributed
        k = len(self.classes)
        real = self.sampler.per_class(int(self.config["batch_real"]), kept=self.classes if split else None)
        syn = partition_expand(torch.cat([self.synthetic[c] for c in self.classes]), self.factor)
        syn_labels = torch.tensor(self.classes, device=self.device).repeat_interleave(self.expanded_per_class)
        real_aug, syn_aug = siamese_per_class(self.dsa, real, syn, k, self.generator, self.real.num_classes,
                                              self.classes if split else None)
        # one extractor per iteration, drawn before any forward, whatever the forward mode or split
        extractor = self.pool.next(self.generator) if self.pool is not None else None
        self.optimizer.zero_grad(set_to_none=not self.config.get("legacy_step_per_class"))
        values: dict[str, float] = {}
        total_value = 0.0
        legacy_steps = bool(self.config.get("legacy_step_per_class"))
        if self.config["forward"] == "batched" and not legacy_steps:
            groups = [(slice(0, real.shape[0]), slice(0, syn.shape[0]), k)]
            syn_input = syn_aug
        else:
            nr, ns = int(self.config["batch_real"]), self.expanded_per_class
            groups = [(slice(c * nr, (c + 1) * nr), slice(c * ns, (c + 1) * ns), 1) for c in range(k)]
            # Each class backpropagates into this leaf and frees its own graph at once; the summed
            # gradient then goes through the shared augmentation and expansion in one backward.
            syn_input = syn_aug.detach().requires_grad_(True)
        for real_part, syn_part, classes in groups:
            terms = self._class_losses(net, accuracy, real_aug[real_part], syn_input[syn_part],
                                       syn_labels[syn_part], classes, extractor)
            total = sum(self.weights[name] * value for name, value in terms.items())
            if not torch.isfinite(total):
                bad = {name: float(value.detach()) for name, value in terms.items()}
                raise NonFiniteLoss(f"the loss became {float(total.detach())} at iteration {iteration} (terms {bad}); "
                                    "lower the image learning rate (--set lr_img=...) or a term's weight")
            total.backward()
            for name, value in terms.items():
                values[name] = values.get(name, 0.0) + float(value.detach())
            total_value += float(total.detach())
            if legacy_steps:
                # IDM reference: one shared optimiser stepped after every class, so momentum moves
                # the other classes' images again (their gradient is zero, not absent).
                syn_aug.backward(syn_input.grad, retain_graph=True)
                syn_input.grad = None
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=False)
        if not legacy_steps:
            if syn_input is not syn_aug:
                syn_aug.backward(syn_input.grad)
            self.optimizer.step()
        self.source.after_step(iteration, self.sampler.mixed)
        values["total"] = total_value
        return values

    # ---- the whole run -----------------------------------------------------------------------
    def pixels(self) -> torch.Tensor:
        """Current synthetic images in pixel space: float [K*ipc, C, H, W] on the CPU."""
        with torch.no_grad():
            return denormalize(torch.cat(self.synthetic).detach(), self.real.mean, self.real.std).cpu()

    # ---- checkpoints -------------------------------------------------------------------------
    def state_part(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's share of the run state: its classes' images and momentum, the RNG and (rank 0)
        the model queue. Every rank holds the same RNG and queue, so one copy is enough."""
        tensors = {"generator": generator_state(self.generator)}
        for c in self.classes:
            tensors[f"syn.{c}"] = self.synthetic[c].detach()
            buffer = self.optimizer.state.get(self.synthetic[c], {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"momentum.{c}"] = buffer
        state = {"classes": self.classes, "log": self.log}
        if isinstance(self.source, ModelQueue) and self.world.is_main:
            for i, net in enumerate(self.source.nets):
                tensors.update({f"queue.{i}.{name}": value for name, value in net.state_dict().items()})
            state["queue_accuracies"] = self.source.accuracies
        return tensors, state

    def restore(self, parts: list[tuple[dict, dict]]) -> None:
        """Load the state of every part of a checkpoint (written by any number of processes)."""
        restore_generator(self.generator, parts[0][0]["generator"])
        for tensors, _ in parts:
            for name, value in tensors.items():
                kind, _, index = name.partition(".")
                if kind == "syn":
                    with torch.no_grad():
                        self.synthetic[int(index)].copy_(value.to(self.device))
                elif kind == "momentum":
                    self.optimizer.state[self.synthetic[int(index)]]["momentum_buffer"] = value.to(self.device).clone()
        main_tensors, main_state = parts[0]
        self.log = list(main_state["log"])
        if isinstance(self.source, ModelQueue):
            accuracies = main_state["queue_accuracies"]
            nets = []
            for i in range(len(accuracies)):
                net = build_net(self.config["model"], self.real, seed=0, device=self.device)
                prefix = f"queue.{i}."
                net.load_state_dict({k[len(prefix):]: v for k, v in main_tensors.items() if k.startswith(prefix)})
                nets.append(net.train())
            self.source.nets, self.source.accuracies = nets, list(accuracies)

    def _checkpoint(self, checkpoint: dict, next_iteration: int) -> None:
        tensors, state = self.state_part()
        write_part(checkpoint["dir"], next_iteration, self.world.rank, tensors, state)
        distributed.barrier()
        if self.world.is_main:
            commit(checkpoint["dir"], next_iteration, self.world.size, checkpoint["run"])

    def run(self, method: str, checkpoint: dict | None = None):
        """All iterations; returns a DistilledSet (or raises NonFiniteLoss with the last good one).

        Args:
            checkpoint: ``{"dir": path, "every": iterations (0 = about every ``seconds``),
                "seconds": float, "resume": bool, "run": JSON record of how the run started}``,
                or None for no checkpoints.
        """
        iterations = int(self.config["iterations"])
        log_every = max(1, int(self.config["log_every"]))
        start = 0
        if checkpoint and checkpoint.get("resume"):
            start, parts = load_latest(checkpoint["dir"])
            self.restore(parts)
        every = int(checkpoint.get("every") or 0) if checkpoint else 0
        started = time.perf_counter()
        bar = progress(range(start, iterations), desc=method, enabled=self.show_progress, initial=start,
                       total=iterations)
        for iteration in bar:
            distributed.maybe_inject_fault(iteration)
            try:
                values = self.step(iteration)
            except NonFiniteLoss as exc:
                exc.partial = self.result(method, time.perf_counter() - started, iteration,
                                          status=f"stopped at iteration {iteration}: non-finite loss", resumed_at=start)
                raise
            if iteration % log_every == 0 or iteration == iterations - 1:
                values = distributed.all_reduce_sum(values)
                self.log.append({"iteration": iteration, **{k: round(v, 6) for k, v in values.items()}})
                bar.set_postfix({k: f"{v:.3g}" for k, v in values.items()})
            if checkpoint and not every and iteration == start + 2:
                per_iteration = (time.perf_counter() - started) / 3
                every = distributed.broadcast_int(max(1, int(float(checkpoint.get("seconds", 180)) / per_iteration)))
            if checkpoint and every and (iteration + 1) % every == 0 and iteration + 1 < iterations:
                self._checkpoint(checkpoint, iteration + 1)
        return self.result(method, time.perf_counter() - started, iterations, status="complete", resumed_at=start)

    def result(self, method: str, seconds: float, iterations_done: int, status: str, resumed_at: int = 0):
        """The current synthetic images as a DistilledSet with the run's record.

        ``iterations_done`` counts every iteration of the run, those before a resume included;
        ``seconds`` is this process's time, spent on the iterations from ``resumed_at`` on."""
        from ddkit.store import DistilledSet

        decode = {"kind": "partition", "factor": self.factor} if self.factor > 1 else {"kind": "identity"}
        return DistilledSet(
            images=self.pixels(),
            labels=torch.arange(self.real.num_classes).repeat_interleave(self.ipc),
            class_names=list(self.real.class_names),
            dataset=self.real.name,
            mean=self.real.mean,
            std=self.real.std,
            method=method,
            decode=decode,
            meta={
                "config": self.config,
                "seeds": {"run": self.seed},
                "timings": {"matching_seconds": round(seconds, 3),
                            "seconds_per_iteration": round(seconds / max(1, iterations_done - resumed_at), 4)},
                "iterations_done": iterations_done,
                **({"resumed_at_iteration": resumed_at} if resumed_at else {}),
                "status": status,
                "loss_log": self.log,
            },
        )
