"""The distribution-matching engine: one loop that DM, IDM, IID and DDM (and any mix) share.

Each iteration:
1. a network from the model source (fresh random net, or the IDM queue);
2. a real batch of ``batch_real`` images per class and the synthetic images (decoded by IDM's
   partition-and-expansion when ``partition > 1``), both augmented with one siamese DSA draw per
   class;
3. ONE batched forward for all classes on each side (real under ``no_grad``), or a per-class
   forward for BatchNorm networks / tight memory (``forward: per_class``);
4. the weighted sum of the enabled loss terms (``weights``), each registered with
   :func:`ddkit.methods.terms.matching_term` (its taps, default weight and options; the table of
   built-in terms is in :mod:`ddkit.methods.terms`), computed in registration order on
   class-grouped features;
5. one SGD step on every synthetic pixel (``image_step: per_iteration``, DM's reference), or, as
   IDM's reference does, one class at a time (``image_step: per_class``): class c's loss is
   computed from its images as the earlier classes' steps left them, then ONE shared momentum
   optimiser steps, so momentum moves every other class's images too.

With instance-norm networks a class's features depend on its own samples only, so the batched
pass gives exactly the per-class result, far faster. Synthetic images are kept as one leaf tensor
per class; stepping with zero (not absent) gradients for the other classes is exactly the
reference's one optimiser over all images.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ddkit.augment import DSA, dsa_strategy_for
from ddkit.augment.grouped import class_params, draw_per_class, repeat_params, siamese_per_class
from ddkit.augment.partition import partition_expand
from ddkit.data.sampling import check_ipc, sample_real_per_class
from ddkit.data.streaming import is_streaming
from ddkit.errors import DDKitError
from ddkit.losses import (
    class_aware_ce_loss, class_centralization_loss, gram_loss, icd_neighbours, intra_class_kl_loss,
    local_covariance_loss, mean_feature_loss, moment_loss,
)
from ddkit import distributed, precision
from ddkit.checkpoint import commit, generator_state, load_latest, restore_generator, write_part
from ddkit.methods.sources import ModelQueue, PretrainedPool, RandomNets, channels_last_twin, use_channels_last
from ddkit.methods.terms import (MATCHING_TERMS, TermInputs, check_terms, class_mean_taps, enabled_taps, flag,
                                 matching_term, number)
from ddkit.models.base import TapSums
from ddkit.models.training import taps_forward
from ddkit import options as rules
from ddkit.store import DistilledSet
from ddkit.utils import denormalize, make_generator, normalize, progress


class NonFiniteLoss(DDKitError):
    """The loss became NaN or infinite; ``partial`` holds the last good synthetic set."""

    def __init__(self, message: str, partial=None):
        super().__init__(message)
        self.partial = partial


#: The engine's options and their constraints (the terms declare their own, :mod:`ddkit.methods.terms`).
ENGINE_OPTIONS = {
    "model_source": rules.choice("random", "queue"),
    "forward": rules.choice("batched", "per_class"),
    "init": rules.choice("real", "noise"),
    "init_downscale": rules.choice("bilinear", "antialias"),
    "image_step": rules.choice("per_iteration", "per_class"),
    "iterations": rules.number(integer=True, minimum=1),
    "batch_real": rules.number(integer=True, minimum=1),
    "partition": rules.number(integer=True, minimum=1),
    "log_every": rules.number(integer=True, minimum=1),
    "real_chunk": rules.number(integer=True, minimum=0),
    "lr_img": rules.number(above=0),
    "momentum_img": rules.number(minimum=0, maximum=1),
    "dsa": rules.flag(),
    "legacy_step_per_class": rules.flag(),
    "channels_last": rules.flag(allow=("auto",)),
    "real_lowest_loss": rules.number(integer=True, minimum=0),
    **{f"queue.{key}": rules.number(integer=True, minimum=1)
       for key in ("initial", "push_every", "max_size", "train_nets", "train_steps", "train_batch")},
    "queue.accuracy_reset_every": rules.number(integer=True, minimum=0),
    "queue.lr": rules.number(above=0),
}


def check_config(config: dict, real, ipc: int) -> None:
    """Refuse impossible settings with one line each: :data:`ENGINE_OPTIONS`, the terms' weights
    and constraints, and the rules that tie options to the data (partition, IPC)."""
    weights = config["weights"]
    for term, weight in weights.items():
        if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not math.isfinite(weight) or weight < 0:
            raise DDKitError(f"weight of term {term!r} must be a non-negative number, got {weight!r}")
    if not any(weights.values()):
        raise DDKitError("every loss term has weight 0; enable at least one with --terms or --weight")
    check_terms(config)
    rules.check_table(config, ENGINE_OPTIONS, "distillation")
    factor = config["partition"]
    _, height, width = real.image_shape
    if height % factor or width % factor:
        raise DDKitError(f"partition {factor} must be a positive divisor of the image size {height}x{width}")
    check_ipc(real, ipc * factor * factor if config["init"] == "real" else ipc)


def image_step(config: dict) -> str:
    """``per_iteration`` or ``per_class`` (``legacy_step_per_class: true`` is the old spelling of the latter)."""
    if config.get("legacy_step_per_class"):
        return "per_class"
    return config.get("image_step", "per_iteration")


def effective_batch_real(config: dict, real) -> int:
    """Real images per class per iteration: ``batch_real``, or all of the smallest class when it has
    fewer (the references draw ``min(batch_real, class size)``: IDM's IPC-1 setting asks 5000 of
    CIFAR-100's 500 per class)."""
    return min(int(config["batch_real"]), int(torch.bincount(real.train.labels).min()))


def initial_images(real, ipc: int, factor: int, init: str, generator: torch.Generator,
                   downscale: str = "bilinear") -> torch.Tensor:
    """Starting synthetic images in pixel space, class-major: float [K*ipc, C, H, W].

    ``init="real"``: random real images of each class; with ``factor > 1`` every cell of the
    factor x factor grid is a different real image downscaled by ``factor`` (IDM). ``downscale``:
    ``bilinear`` is the IDM reference's plain bilinear resize (for factor 2, the mean of each 2x2
    block); ``antialias`` low-pass filters first.
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
                          align_corners=False, antialias=downscale == "antialias")
    small = small.reshape(count, factor, factor, channels, height // factor, width // factor)
    return small.permute(0, 3, 1, 4, 2, 5).reshape(count, channels, height, width)


class RealSampler:
    """Real training images, drawn per class through the class index and normalised per batch.

    An in-memory dataset's images are kept on the device as uint8; a streaming one's
    (:mod:`ddkit.data.streaming`) stay on disk and only the drawn images are decoded (the
    evaluation transform), so memory is one batch, and the draws are the same either way.
    """

    def __init__(self, real, device, generator: torch.Generator):
        self.streaming = is_streaming(real)
        self.images = real.train.images if self.streaming else real.train.images.to(device)
        self.labels = real.train.labels.to(device)
        self.class_indices = [idx.to(device) for idx in real.class_indices("train")]
        self.mean, self.std, self.generator, self.device = real.mean, real.std, generator, device

    def _prepare(self, index: torch.Tensor) -> torch.Tensor:
        pixels = self.images[index.cpu()].to(self.device) if self.streaming else self.images[index]
        return normalize(pixels.float().div_(255.0), self.mean, self.std)

    def per_class(self, count: int, kept: list[int] | None = None) -> torch.Tensor:
        """``count`` distinct random images of every class, class-major, normalised: [K*count, C, H, W].

        ``kept``: only these classes' images are gathered (a class-split run), while the draws of
        every class are made as in an unsplit run, so each class gets the same images anywhere.
        """
        picks = [torch.randperm(idx.numel(), generator=self.generator)[:count] for idx in self.class_indices]
        classes = range(len(picks)) if kept is None else kept
        return self._prepare(torch.cat([self.class_indices[c][picks[c].to(self.device)] for c in classes]))

    def mixed(self, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``count`` distinct random images from all classes (no augmentation): (images, labels)."""
        index = torch.randperm(self.labels.numel(), generator=self.generator)[:count].to(self.device)
        return self._prepare(index), self.labels[index]


def block_taps(net) -> list[str]:
    """The per-block intermediate taps of a network (``block0``, ``block1``, ... for ConvNet)."""
    names = [t for t in net.tap_names if t.startswith("block") or t.startswith("layer")]
    if not names:
        raise DDKitError(f"{net.arch} exposes no block taps for style/gram matching; use convnet or resnet18")
    return names


# ---- the built-in terms (registered in computation order; the table is in ddkit.methods.terms) ----
def _blocks(inputs: TermInputs, side: dict) -> list:
    return [inputs.grouped(side[b]) for b in inputs.blocks]


@matching_term("mean", weight=1.0, taps=("embedding",), summary="DM mean-feature matching on the embedding")
def _mean(inputs: TermInputs):
    """DM (Zhao & Bilen 2023): the class means of the final embedding, real against synthetic."""
    return mean_feature_loss(inputs.grouped(inputs.real["embedding"]), inputs.grouped(inputs.syn["embedding"]))


@matching_term("cm", weight=0.01, taps=("features",), summary="IID local covariance matching on the feature map")
def _cm(inputs: TermInputs):
    """IID (Deng et al. 2024): local covariance of the final feature map, real against synthetic."""
    return local_covariance_loss(inputs.grouped(inputs.real["features"]), inputs.grouped(inputs.syn["features"]))


@matching_term("style", weight=1e4, taps=("blocks",), options=("style", "legacy_style_accumulator"),
               constraints={"style.unbiased": flag(), "legacy_style_accumulator": flag()},
               summary="DDM moment (mean/std) matching on every block", real_class_means=True)
def _style(inputs: TermInputs):
    """DDM (Malakshan et al. 2025): per-channel mean and std of every block's output."""
    config = inputs.config
    return moment_loss(_blocks(inputs, inputs.real), _blocks(inputs, inputs.syn),
                       unbiased=bool(config.get("style", {}).get("unbiased", True)),
                       legacy_accumulator=bool(config.get("legacy_style_accumulator", False)),
                       class_ids=inputs.class_ids, num_classes=inputs.num_classes)


@matching_term("gram", weight=1e4, taps=("blocks",), options=("legacy_style_accumulator",),
               summary="DDM correlation (Gram) matching on every block")
def _gram(inputs: TermInputs):
    """DDM (Malakshan et al. 2025): channel Gram matrices of every block's output."""
    return gram_loss(_blocks(inputs, inputs.real), _blocks(inputs, inputs.syn),
                     legacy_accumulator=bool(inputs.config.get("legacy_style_accumulator", False)),
                     class_ids=inputs.class_ids, num_classes=inputs.num_classes)


@matching_term("icd", weight=10.0, taps=("embedding",), options=("icd",),
               constraints={"icd.k": number(integer=True, minimum=1, allow=("auto",))},
               summary="DDM intra-class diversity (guarded -KL to k-NN means)")
def _icd(inputs: TermInputs):
    """DDM (Malakshan et al. 2025): -KL of each synthetic embedding to its k nearest same-class neighbours'
    mean, clipped at ``icd.max_kl``; nothing with fewer than two images per class."""
    if inputs.engine.icd_k < 1:
        return None
    return intra_class_kl_loss(inputs.grouped(inputs.syn["embedding"]), k=inputs.engine.icd_k,
                               max_kl=float(inputs.config["icd"]["max_kl"]))


@matching_term("ce", weight=0.5, syn_taps=("logits",), options=("ce_accuracy_scale",),
               requires={"model_source": "queue"}, requires_why="trained networks (as IDM does)",
               constraints={"ce_accuracy_scale": number(minimum=0)},
               summary="IDM class-aware cross-entropy (trained nets: model_source=queue)")
def _ce(inputs: TermInputs):
    """IDM (Zhao et al. 2023): cross-entropy of the synthetic logits, scaled by the net's accuracy."""
    labels = torch.tensor(inputs.class_ids, device=inputs.syn_images.device)
    return class_aware_ce_loss(inputs.grouped(inputs.syn["logits"]), labels,
                               inputs.accuracy * float(inputs.config["ce_accuracy_scale"]),
                               misclassified_only=inputs.engine.ipc1_branch)


@matching_term("cc", weight=0.05, options=("cc",), extractor=True,
               summary="IID class centralization on a pretrained net's embedding")
def _cc(inputs: TermInputs):
    """IID (Deng et al. 2024): pull each synthetic embedding of a pretrained extractor to its class centre."""
    cc_config = inputs.config["cc"]
    return class_centralization_loss(inputs.grouped(inputs.extractor.embed(inputs.syn_images)),
                                     form=cc_config["form"], beta=float(cc_config["beta"]),
                                     temperature=float(cc_config["temperature"]))


class MatchingEngine:
    """Runs the matching loop for one configuration (see the module docstring)."""

    def __init__(self, real, ipc: int, config: dict, seed: int, device, show_progress: bool = True,
                 compiled: bool = False):
        check_config(config, real, ipc)
        self.world = distributed.current()
        # this process's classes; every rank still makes every random draw (see docs/scaling.md)
        self.classes = self.world.share(real.num_classes)
        self.real, self.ipc, self.config, self.seed, self.device = real, ipc, config, seed, device
        self.show_progress = show_progress
        # the matching network's forward (real and synthetic side), compiled or not: an execution
        # detail like the device, so it is not part of ``config``
        self.taps_of = taps_forward(compiled)
        # the enabled terms in registration order: the order they are computed and summed in
        self.terms = [term for name, term in MATCHING_TERMS.items() if config["weights"].get(name)]
        self.weights = {term.name: float(config["weights"][term.name]) for term in self.terms}
        # the network passes' precision (ddkit.precision.using); losses stay in fp32
        self.amp = precision.current(device)
        self.factor = int(config["partition"])
        self.batch_real = effective_batch_real(config, real)
        self.per_class_steps = image_step(config) == "per_class"
        self.generator = make_generator(seed)
        strategy = dsa_strategy_for(real.name) if config["dsa_strategy"] == "auto" else config["dsa_strategy"]
        self.dsa = DSA(strategy if config["dsa"] else "none")
        self.sampler = RealSampler(real, device, self.generator)
        if config["model_source"] == "queue":
            self.source = ModelQueue(config["model"], config["queue"], real, device, self.generator, self.amp.name)
        else:
            self.source = RandomNets(config["model"], real, device, self.generator)
        self.real_side_channels_last = use_channels_last(config.get("channels_last", "auto"), device)
        self._twin: tuple = (None, None)  # (network, its channels-last twin) of the current iteration
        self.pool = (PretrainedPool(config["cc"], real, device, show_progress, compiled=compiled)
                     if any(term.extractor for term in self.terms) else None)
        pixels = initial_images(real, ipc, self.factor, config["init"], self.generator,
                                config.get("init_downscale", "bilinear"))
        start = normalize(pixels, real.mean, real.std).to(device)
        # One leaf tensor per class: per-class optimiser state comes for free (see module docstring).
        self.synthetic = [start[c * ipc:(c + 1) * ipc].clone().requires_grad_(True) for c in range(real.num_classes)]
        self.optimizer = torch.optim.SGD(self.synthetic, lr=float(config["lr_img"]),
                                         momentum=float(config["momentum_img"]))
        self.expanded_per_class = ipc * self.factor * self.factor
        icd_k = config.get("icd", {}).get("k", "auto")
        self.icd_k = icd_neighbours(self.expanded_per_class) if icd_k == "auto" else min(int(icd_k), self.expanded_per_class - 1)
        # IDM's branch for IPC 1 without the partition: CE only on misclassified classes, and the
        # real side keeps its ``real_lowest_loss`` lowest-loss images under the matching network
        self.ipc1_branch = config["model_source"] == "queue" and self.expanded_per_class == 1
        self.log: list[dict] = []

    # ---- one iteration ---------------------------------------------------------------------
    def _taps(self, net) -> tuple[list[str], list[str], list[str]]:
        """(block taps, real taps, synthetic taps) the enabled terms read from ``net``."""
        wants_blocks = any("blocks" in term.real_taps + term.syn_taps for term in self.terms)
        blocks = block_taps(net) if wants_blocks else []
        real_taps, syn_taps = enabled_taps(self.terms, blocks)
        if self.ipc1_branch and int(self.config.get("real_lowest_loss", 0)) and "logits" not in real_taps:
            real_taps.append("logits")
        return blocks, real_taps, syn_taps

    def _real_taps(self, net, real_aug: torch.Tensor, taps: list[str], classes: int,
                   means: set[str] = frozenset()) -> dict[str, torch.Tensor]:
        """Real features without gradient, in chunks of ``real_chunk`` images: ``[K*N, ...]`` per tap,
        or ``[K, ...]`` class means for the taps in ``means`` (summed per class as the chunks come).

        ``real_aug`` is class-major, ``classes`` classes of equally many images. Chunks keep the
        activations cache-sized (faster on CPUs, less memory on GPUs) and are exact for networks
        whose normalisation couples no samples; BatchNorm nets use forward=per_class.
        """
        chunk = int(self.config["real_chunk"]) or real_aug.shape[0]
        per_class = real_aug.shape[0] // classes
        net = self._real_side_net(net)
        averaged = frozenset(means & set(taps))
        class_of_row = torch.arange(real_aug.shape[0], device=real_aug.device) // per_class
        parts: dict[str, list] = {name: [] for name in taps if name not in averaged}
        sums: dict[str, torch.Tensor] = {}
        with torch.no_grad(), self.amp.autocast():
            for start in range(0, real_aug.shape[0], chunk):
                request = TapSums(averaged, class_of_row[start:start + chunk], classes) if averaged else None
                out = self.taps_of(net, real_aug[start:start + chunk], tuple(taps), request)
                for name in parts:
                    parts[name].append(out[name])
                for name in averaged:  # this chunk's class sums (float32)
                    sums[name] = out[name] if name not in sums else sums[name].add_(out[name])
        result = {name: torch.cat(values) for name, values in parts.items()}
        result.update({name: total / per_class for name, total in sums.items()})
        return self.amp.fp32(result)

    def _real_side_net(self, net):
        """``net`` for the real side: its channels-last twin where ``channels_last`` is on (made once
        per network; :func:`~ddkit.methods.sources.channels_last_twin`), else ``net``."""
        if not self.real_side_channels_last:
            return net
        if self._twin[0] is not net:
            self._twin = (net, channels_last_twin(net))
        return self._twin[1] or net

    def _lowest_loss_real(self, real_out: dict, class_ids: list[int]) -> dict:
        """IDM's IPC-1 branch: keep each class's ``real_lowest_loss`` real images of lowest CE."""
        keep = int(self.config.get("real_lowest_loss", 0))
        logits = real_out.pop("logits", None)
        if logits is None:
            return real_out
        k = len(class_ids)
        grouped_logits = logits.reshape(k, -1, logits.shape[-1])
        keep = min(keep, grouped_logits.shape[1])
        labels = torch.tensor(class_ids, device=logits.device).repeat_interleave(grouped_logits.shape[1])
        losses = F.cross_entropy(logits, labels, reduction="none").reshape(k, -1)
        index = losses.topk(keep, dim=1, largest=False).indices  # [k, keep]
        rows = (index + torch.arange(k, device=index.device).unsqueeze(1) * grouped_logits.shape[1]).reshape(-1)
        return {name: value[rows] for name, value in real_out.items()}

    def _class_losses(self, net, accuracy: float, real_aug, syn_aug, class_ids: list[int], extractor) -> dict:
        """Unweighted terms for the classes ``class_ids`` (global ids), already augmented and class-major."""
        blocks, real_taps, syn_taps = self._taps(net)
        # IDM's IPC-1 branch picks single real images, so it keeps every image's features
        means = set() if self.ipc1_branch else class_mean_taps(self.terms, blocks)
        real_out = self._real_taps(net, real_aug, real_taps, len(class_ids), means)
        if self.ipc1_branch:
            real_out = self._lowest_loss_real(real_out, class_ids)
        with self.amp.autocast():
            syn_out = self.amp.fp32(self.taps_of(net, syn_aug, tuple(syn_taps)))

        inputs = TermInputs(real=real_out, syn=syn_out, blocks=blocks, syn_images=syn_aug, class_ids=class_ids,
                            num_classes=self.real.num_classes, config=self.config, accuracy=accuracy, engine=self,
                            extractor=extractor)
        terms = {}
        for term in self.terms:
            value = term.fn(inputs)
            if value is not None:
                terms[term.name] = value
        return terms

    def _backward(self, terms: dict, iteration: int, values: dict) -> float:
        """Backpropagate the weighted sum of ``terms``, add each term's value to ``values``; the total."""
        total = sum(self.weights[name] * value for name, value in terms.items())
        if not torch.isfinite(total):
            bad = {name: float(value.detach()) for name, value in terms.items()}
            raise NonFiniteLoss(f"the loss became {float(total.detach())} at iteration {iteration} (terms {bad}); "
                                "lower the image learning rate (--set lr_img=...) or a term's weight")
        self.amp.backward(total)
        for name, value in terms.items():
            values[name] = values.get(name, 0.0) + float(value.detach())
        return float(total.detach())

    def _step_per_iteration(self, iteration: int, net, accuracy: float, real: torch.Tensor, extractor) -> dict:
        """All classes' terms (one batched forward, or class by class), then one optimiser step."""
        split = self.world.distributed
        k = len(self.classes)
        syn = partition_expand(torch.cat([self.synthetic[c] for c in self.classes]), self.factor)
        real_aug, syn_aug = siamese_per_class(self.dsa, real, syn, k, self.generator, self.real.num_classes,
                                              self.classes if split else None)
        self.optimizer.zero_grad(set_to_none=True)
        values: dict[str, float] = {"total": 0.0}
        if self.config["forward"] == "batched":
            terms = self._class_losses(net, accuracy, real_aug, syn_aug, list(self.classes), extractor)
            values["total"] += self._backward(terms, iteration, values)
        else:
            nr, ns = self.batch_real, self.expanded_per_class
            # Each class backpropagates into this leaf and frees its own graph at once; the summed
            # gradient then goes through the shared augmentation and expansion in one backward.
            syn_input = syn_aug.detach().requires_grad_(True)
            for i, c in enumerate(self.classes):
                terms = self._class_losses(net, accuracy, real_aug[i * nr:(i + 1) * nr],
                                           syn_input[i * ns:(i + 1) * ns], [c], extractor)
                values["total"] += self._backward(terms, iteration, values)
            syn_aug.backward(syn_input.grad)
        self.amp.step(self.optimizer)
        return values

    def _step_per_class(self, iteration: int, net, accuracy: float, real: torch.Tensor, extractor) -> dict:
        """IDM's reference step: class by class, each from the images the earlier classes' steps left,
        with ONE optimiser step after each class (zero gradients for every other class's images)."""
        draws = (draw_per_class(self.dsa, self.real.num_classes, tuple(real.shape[1:]), self.generator, real.device)
                 if self.dsa.enabled else None)
        nr = self.batch_real
        position = {c: i for i, c in enumerate(self.classes)}
        values: dict[str, float] = {"total": 0.0}
        for c in range(self.real.num_classes):
            for leaf in self.synthetic:
                leaf.grad = torch.zeros_like(leaf) if leaf.grad is None else leaf.grad.zero_()
            if c in position:
                i = position[c]
                real_c = real[i * nr:(i + 1) * nr]
                syn_c = partition_expand(self.synthetic[c], self.factor)
                if draws is not None:
                    params = class_params(draws, c)
                    real_c = self.dsa.apply(real_c, repeat_params(params, real_c.shape[0]))
                    syn_c = self.dsa.apply(syn_c, repeat_params(params, syn_c.shape[0]))
                terms = self._class_losses(net, accuracy, real_c, syn_c, [c], extractor)
                values["total"] += self._backward(terms, iteration, values)
            # a class of another process still steps here: its momentum moves this process's images
            self.amp.step(self.optimizer)
        return values

    def step(self, iteration: int) -> dict[str, float]:
        """One matching iteration; returns the unweighted value of each term and the total."""
        net, accuracy = self.source.next(iteration)
        self._twin = (None, None)  # a queued network may come back trained: never reuse an old twin
        split = self.world.distributed
        real = self.sampler.per_class(self.batch_real, kept=self.classes if split else None)
        # one extractor per iteration, drawn before any forward, whatever the forward mode or split
        extractor = self.pool.next(self.generator) if self.pool is not None else None
        run = self._step_per_class if self.per_class_steps else self._step_per_iteration
        values = run(iteration, net, accuracy, real, extractor)
        self.source.after_step(iteration, self.sampler.mixed)
        return values

    # ---- the whole run -----------------------------------------------------------------------
    def pixels(self) -> torch.Tensor:
        """Current synthetic images in pixel space: float [K*ipc, C, H, W] on the CPU."""
        with torch.no_grad():
            return denormalize(torch.cat(self.synthetic).detach(), self.real.mean, self.real.std).cpu()

    # ---- checkpoints -------------------------------------------------------------------------
    def state_part(self) -> tuple[dict[str, torch.Tensor], dict]:
        """This rank's share of the run state: its classes' images and momentum, the RNG and (rank 0)
        the model queue with its optimisers and meters. Every rank holds the same RNG and queue, so
        one copy is enough."""
        tensors = {"generator": generator_state(self.generator)}
        for c in self.classes:
            tensors[f"syn.{c}"] = self.synthetic[c].detach()
            buffer = self.optimizer.state.get(self.synthetic[c], {}).get("momentum_buffer")
            if buffer is not None:
                tensors[f"momentum.{c}"] = buffer
        state = {"classes": self.classes, "log": self.log}
        if isinstance(self.source, ModelQueue) and self.world.is_main:
            queue_tensors, queue_state = self.source.state()
            tensors.update(queue_tensors)
            state.update(queue_state)
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
            self.source.restore(main_tensors, main_state)

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
