"""The soft-label evaluation protocol of the statistics-matching family (SRe2L, CDA, G-VBSM).

A fresh student is trained from scratch on the replayed views of a relabelled set
(:func:`ddkit.methods.relabel.relabel`) against the teacher logits recorded for exactly those
views, then tested on the real test split; the FINAL-epoch accuracy is reported.

Per student epoch ``t``: the order is ``torch.randperm(N, generator)``, cut into batches of
``batch_size``; each batch's inputs are :func:`ddkit.augment.replay.replay_inputs` of record epoch
``t % E``. When the student trains for more epochs than were recorded it cycles through the
records (epoch ``E`` replays record epoch 0 again, in a new order), as FKD reuses its soft labels.

How the student trains is a *recipe* (:data:`SOFT_RECIPES`), data chosen by (method, dataset):
each paper's published one (``sre2l-cifar100``, ``gvbsm-tiny``, ...; optimiser, weight decay and
whether 1-d parameters are exempt, learning-rate schedule and warm-up, epochs, batch, loss,
temperature, student) or ddkit's shared one (``ddkit``: AdamW 1e-3, weight decay 0.01, a per-step
cosine, batch 64, the set's loss), under which any two methods can be compared. ``recipe="auto"``
takes the one the set's relabel step named (:func:`recipe_for_set`). The tier (:data:`SOFT_PRESETS`)
makes a recipe smaller: ``quick`` trains at most 300 epochs, ``smoke`` 20 epochs of a width-32
student with BatchNorm, at most 16 images a step (:data:`SOFT_TIER_CAPS`).

Losses (``loss``):

* ``"kl"``: ``KL(softmax(t / T) || softmax(s / T))``, summed over classes and averaged over the
  batch, times ``T**2`` when ``t2`` (SRe2L: ImageNet plain with T = 20, CIFAR-100 plain with
  T = 30; Tiny-ImageNet ``T**2`` with T = 20).
* ``"mse_ce"``: ``MSE(s, t)`` (raw logits, mean over all ``B * K`` entries) ``+ gamma *``
  the cross-entropy with the label of each view's BASE image (``ce_label="base"``, G-VBSM's
  ``--loss-type mse_gt``: CutMix's partner and weight are not used), or ddkit's former mixed
  ``lam * CE(s, y_i) + (1 - lam) * CE(s, y_partner)`` (``ce_label="mixed"``).
* ``"auto"``: the set's ``meta["relabel"]["eval_loss"]`` when present, else ``"kl"``.

Top-k records (``relabel.topk_values`` / ``relabel.topk_indices``) keep only ``k`` of ``K`` teacher
logits. They are reconstructed as follows: KL compares against a teacher distribution that is the
softmax over the kept logits only, with probability 0 on every other class (the student's
log-softmax still spans all ``K`` classes, so mass it puts on dropped classes is penalised); MSE
is taken over the kept entries only (mean over ``B * k``).

Online-teacher mode (``evaluate(..., protocol="soft", teachers=[...])``): the targets are computed
on the fly by the teachers on the SAME replayed inputs, rounded to fp16 like stored records
(``online.fp16``). The inputs come from the set's records when it has them, else from a plan drawn
like :func:`~ddkit.methods.relabel.relabel` would with the ``online.*`` settings (``online.epochs``
None = the student's epochs), so online training sees exactly the inputs of the stored-record run.
``online.augment=false`` replays the images themselves instead (no crop, flip or mix; the
teachers label each image as it is): the soft protocol without augmentation, which DD-Ranking's
augmentation-robust score compares with (:mod:`ddkit.evaluate.scores`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ddkit.augment.crops import padding_for
from ddkit.augment.replay import RECORD_PREFIX, ReplayPlan, replay_inputs
from ddkit.errors import DDKitError
from ddkit.methods.relabel import _as_teacher_list, ensemble_logits, padding_fill, plan_for
from ddkit.methods.shards import sharded_sources
from ddkit.models.training import check_training_options
from ddkit.optim import check_schedule_options, train_scheduled
from ddkit.tiers import check_tier_table
from ddkit.utils import check_flag, check_number, check_option, normalize

__all__ = [
    "SOFT_PRESETS", "SOFT_TIER_CAPS", "SOFT_RECIPES", "SOFT_LOSSES", "SoftBatch", "ReplaySource", "SoftProtocol", "soft_loss",
    "train_soft", "resolve_soft_config", "recipe_for_set", "describe_recipe",
]

_ONLINE = {
    "epochs": None, "seed": 0, "crop": "resized", "crop_padding": "auto", "crop_scale": [0.08, 1.0],
    "flip_prob": None, "mix": "cutmix", "mix_beta": 1.0, "equalize_norm": False, "norm_scope": "sample", "fp16": True,
    "augment": True,
}
_PAPER = {
    "recipe": "ddkit", "epochs": 1000, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "exempt_1d": False,
    "momentum": 0.9, "schedule": "cosine", "warmup_epochs": 0, "warmup_start": 0.01, "batch_size": 64,
    "loss": "auto", "temperature": 20.0, "t2": False, "gamma": 0.15, "ce_label": "base", "arch": "convnet",
    "model": {}, "eval_batch_size": 1000, "online": _ONLINE, "sync_bn": False,
}
# A preset is data. Every key is overridable (``--set key=value`` / ``overrides=``); ``momentum`` is
# used by ``optimizer="sgd"`` only; ``online.*`` only by the online-teacher mode. A tier's ``epochs``
# caps the recipe's (paper: the recipe's own).
SOFT_PRESETS: dict[str, dict] = check_tier_table({
    "paper": {**_PAPER, "online": dict(_ONLINE)},
    "quick": {**_PAPER, "epochs": 300, "online": dict(_ONLINE)},
    "smoke": {**_PAPER, "epochs": 20, "model": {"width": 32, "norm": "batch"}, "online": dict(_ONLINE)},
}, "SOFT_PRESETS")
#: What a smaller tier caps over the recipe besides ``epochs`` (paper and quick: nothing). The smoke
#: tier trains at most 16 images a step: a set of 10 classes x IPC 10 then gets 7 steps an epoch
#: (140 in all) instead of the one of a recipe's batch of 128, and its BatchNorm student (above;
#: ConvNet's instance norm learns far more slowly on mixed, shifted views) lifts real images well
#: above chance in seconds. See docs/methods.md, "Soft-label evaluation".
SOFT_TIER_CAPS: dict[str, dict] = check_tier_table({"paper": {}, "quick": {}, "smoke": {"batch_size": 16}},
                                                   "SOFT_TIER_CAPS")
_SRE2L_IMAGENET = {  # SRe2L validate/train_FKD.py: AdamW, get_parameters, LambdaLR cosine per epoch
    "epochs": 300, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "exempt_1d": True,
    "schedule": "cosine_epoch", "batch_size": 1024, "loss": "kl", "temperature": 20.0, "t2": False,
    "arch": "imagenet_resnet18",  # torchvision's ResNet-18 (7x7 stem, max-pool), as the ImageNet student
}
_SRE2L_TINY = {  # zeyuanyin/tiny-imagenet train_kd.sh: SGD 0.2, LinearLR(0.01, 5) then CosineAnnealingLR, T^2 KL
    "epochs": 100, "optimizer": "sgd", "lr": 0.2, "momentum": 0.9, "weight_decay": 1e-4, "exempt_1d": False,
    "schedule": "cosine_epoch", "warmup_epochs": 5, "warmup_start": 0.01, "batch_size": 256, "loss": "kl",
    "temperature": 20.0, "t2": True, "arch": "resnet18",
}
#: The evaluation recipes, by name: ddkit's shared one and each paper's published one (the student
#: side; the views come from the set's relabel records, see ``ddkit relabel --like``). CDA evaluates
#: with SRe2L's recipes, as its code does.
SOFT_RECIPES: dict[str, dict] = {
    "ddkit": {},
    "sre2l-imagenet": _SRE2L_IMAGENET,
    # small_dataset/relabel_cifar.py: AdamW 1e-3 on every parameter, CosineAnnealingLR(400), T = 30
    "sre2l-cifar100": {"epochs": 400, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.01, "exempt_1d": False,
                       "schedule": "cosine_epoch", "batch_size": 128, "loss": "kl", "temperature": 30.0,
                       "t2": False, "arch": "resnet18"},
    "sre2l-tiny": _SRE2L_TINY,
    # G-VBSM Branch_*/train/train.sh + train_FKD.py: get_parameters, LambdaLR cosine per epoch, mse_gt
    "gvbsm-cifar100": {"epochs": 1000, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                       "exempt_1d": True, "schedule": "cosine_epoch", "batch_size": 64, "loss": "mse_ce",
                       "gamma": 0.15, "ce_label": "base", "arch": "convnet"},
    "gvbsm-cifar10": {"epochs": 1000, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.0, "exempt_1d": True,
                      "schedule": "cosine_epoch", "batch_size": 100, "loss": "mse_ce", "gamma": 0.15,
                      "ce_label": "base", "arch": "resnet18"},
    # G-VBSM Branch_full_ImageNet_1k/train/train.sh: train_FKD's AdamW 1e-3, wd 0.01, cosine, batch 1024, mse_gt 0.1
    "gvbsm-imagenet": {**_SRE2L_IMAGENET, "loss": "mse_ce", "gamma": 0.1, "ce_label": "base"},
    "gvbsm-tiny": {"epochs": 100, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
                   "exempt_1d": True, "schedule": "cosine_epoch", "batch_size": 100, "loss": "mse_ce",
                   "gamma": 0.1, "ce_label": "base", "arch": "resnet18"},
}
SOFT_LOSSES = ("auto", "kl", "mse_ce")
CE_LABELS = ("base", "mixed")


def resolve_soft_config(preset: str, recipe: str = "ddkit") -> dict:
    """The soft protocol's options: the tier ``preset`` (:data:`SOFT_PRESETS`) with the evaluation
    ``recipe`` (:data:`SOFT_RECIPES`) over it; a smaller tier caps the recipe's epochs at its own.

    Raises:
        DDKitError: an unknown recipe (the message lists them).
    """
    if recipe not in SOFT_RECIPES:
        raise DDKitError(f"unknown evaluation recipe {recipe!r}; choose one of: {', '.join(SOFT_RECIPES)} "
                         "(ddkit eval --recipe list)")
    base, options = SOFT_PRESETS[preset], SOFT_RECIPES[recipe]
    config = {**base, **{k: v for k, v in options.items() if k != "model"}, "recipe": recipe}
    config["model"] = {**options.get("model", {}), **base["model"]}
    config["online"] = dict(base["online"])
    if preset != "paper":
        config["epochs"] = min(int(options.get("epochs", SOFT_PRESETS["paper"]["epochs"])), int(base["epochs"]))
    for key, cap in SOFT_TIER_CAPS.get(preset, {}).items():
        config[key] = min(config[key], cap)
    return config


def recipe_for_set(distilled, recipe: str | None = "auto") -> str:
    """The recipe name ``recipe`` means for ``distilled``: itself, or for ``"auto"`` (or None) the
    one its relabel step named (``meta["relabel"]["eval_recipe"]``: the method's published
    recipe), else ``"ddkit"``."""
    if recipe in (None, "auto"):
        return (distilled.meta.get("relabel") or {}).get("eval_recipe") or "ddkit"
    return recipe


def describe_recipe(name: str) -> str:
    """One line of what recipe ``name`` trains (at the ``paper`` tier), for ``ddkit eval --recipe list``."""
    c = resolve_soft_config("paper", name)
    optimizer = f"{c['optimizer']} lr {c['lr']:g}" + (f" momentum {c['momentum']:g}" if c["optimizer"] == "sgd" else "")
    decay = f"wd {c['weight_decay']:g}" + (" (1-d exempt)" if c["exempt_1d"] else "")
    schedule = c["schedule"] + (f" after {c['warmup_epochs']} warm-up epochs" if c["warmup_epochs"] else "")
    if c["loss"] == "kl":
        loss = f"KL T {c['temperature']:g}" + (" x T^2" if c["t2"] else "")
    elif c["loss"] == "mse_ce":
        loss = f"MSE + {c['gamma']:g} CE ({c['ce_label']} label)"
    else:
        loss = "the set's loss (KL T 20, or MSE + 0.15 CE for G-VBSM)"
    return (f"{name:15s} {optimizer}, {decay}, {schedule}, {c['epochs']} epochs, batch {c['batch_size']}, {loss}, "
            f"student {c['arch']}")


def soft_loss(
    student: torch.Tensor,
    values: torch.Tensor,
    indices: torch.Tensor | None = None,
    *,
    loss: str = "kl",
    temperature: float = 1.0,
    t2: bool = False,
    gamma: float = 0.15,
    labels: torch.Tensor | None = None,
    partner_labels: torch.Tensor | None = None,
    lam: torch.Tensor | None = None,
    ce_label: str = "base",
) -> torch.Tensor:
    """The soft-label loss of a batch (see the module docstring for the formulas).

    Args:
        student: student logits float ``[B, K]``.
        values: teacher logits ``[B, K]``, or ``[B, k]`` kept logits with ``indices``; computed in
            the student's dtype.
        indices: int ``[B, k]`` classes of the kept logits (top-k records), or None.
        loss: ``"kl"`` or ``"mse_ce"``.
        temperature: ``T`` of the KL softmaxes (> 0).
        t2: multiply the KL by ``T**2``.
        gamma: weight of the hard-label CE in ``"mse_ce"``.
        labels, partner_labels: int64 ``[B]`` classes of the sample (its base image) and of its
            mixing partner (``"mse_ce"`` only; the partner counts with ``ce_label="mixed"``).
        lam: float ``[B]`` weight of ``labels`` in the mixed CE (default 1).
        ce_label: ``"base"`` (G-VBSM) or ``"mixed"``.

    Returns:
        a scalar tensor.
    """
    values = values.to(student.dtype)
    if loss == "kl":
        t = float(temperature)
        log_student = F.log_softmax(student / t, dim=1)
        if indices is not None:
            log_student = log_student.gather(1, indices.long())
        teacher = F.softmax(values / t, dim=1)
        kl = F.kl_div(log_student, teacher, reduction="batchmean")
        return kl * (t * t) if t2 else kl
    if loss == "mse_ce":
        if labels is None:
            raise DDKitError("the mse_ce soft loss needs the hard labels; pass labels=")
        picked = student if indices is None else student.gather(1, indices.long())
        mse = F.mse_loss(picked, values)
        ce_own = F.cross_entropy(student, labels, reduction="none")
        if ce_label == "base" or lam is None:
            ce = ce_own.mean()
        else:
            partner_labels = labels if partner_labels is None else partner_labels
            lam = lam.to(student.dtype)
            ce = (lam * ce_own + (1.0 - lam) * F.cross_entropy(student, partner_labels, reduction="none")).mean()
        return mse + float(gamma) * ce
    raise DDKitError(f"unknown soft loss {loss!r}; choose one of: kl, mse_ce (or auto)")


@dataclass
class SoftBatch:
    """One training batch of the soft protocol.

    Attributes:
        inputs: float ``[B, C, H, W]`` replayed (normalised) inputs.
        partner: int64 ``[B]`` sample mixed into each input.
        lam: float32 ``[B]`` hard-label weight of the sample itself.
        values: float32 ``[B, K]`` teacher logits, or ``[B, k]`` kept logits.
        indices: int64 ``[B, k]`` classes of the kept logits, or None for full logits.
    """

    inputs: torch.Tensor
    partner: torch.Tensor
    lam: torch.Tensor
    values: torch.Tensor
    indices: torch.Tensor | None = None


class ReplaySource:
    """Replayed inputs and their targets, from stored records or from online teachers.

    Args:
        images: normalised float ``[N, C, H, W]`` on the compute device.
        plan: the :class:`~ddkit.augment.replay.ReplayPlan` (kept where it is, e.g. the CPU).
        logits: float16 ``[E, N, K]`` stored logits, or None.
        topk_values, topk_indices: ``[E, N, k]`` stored top-k records, or None.
        teachers: modules (normalised images -> logits) for online targets, or None; they are put
            in eval mode and run without gradients. Online targets take precedence over records.
        equalize_norm, norm_scope: ensemble options (:func:`ddkit.methods.relabel.ensemble_logits`).
        fp16: round online targets to float16, as stored records are.
        fill: the padding of padded-crop views in normalised units (a number or one per channel).
    """

    def __init__(self, images, plan: ReplayPlan, logits=None, topk_values=None, topk_indices=None, teachers=None,
                 equalize_norm: bool = False, norm_scope: str = "sample", fp16: bool = True, fill=0.0):
        self.images, self.plan, self.fill = images, plan, fill
        self.logits, self.topk_values, self.topk_indices = logits, topk_values, topk_indices
        self.teachers = None if teachers is None else list(teachers)
        self.equalize_norm, self.norm_scope, self.fp16 = bool(equalize_norm), norm_scope, bool(fp16)
        if self.teachers is None and logits is None and topk_values is None:
            raise DDKitError("a replay source needs stored logits or teachers")
        for teacher in self.teachers or []:
            teacher.eval()

    @property
    def epochs(self) -> int:
        """Record epochs ``E`` of the plan."""
        return self.plan.epochs

    @property
    def num_samples(self) -> int:
        """Samples ``N`` per epoch."""
        return self.plan.num_samples

    def batch(self, epoch: int, index: torch.Tensor) -> SoftBatch:
        """The inputs and targets of samples ``index`` (int64 ``[B]``) at record epoch ``epoch``
        (in ``[0, E)``)."""
        inputs, partner, lam = replay_inputs(self.images, self.plan, epoch, index, self.fill)
        dev = inputs.device
        if self.teachers is not None:
            with torch.no_grad():
                values = ensemble_logits(self.teachers, inputs, self.equalize_norm, self.norm_scope)
            if self.fp16:
                values = values.half().float()
            return SoftBatch(inputs, partner, lam, values)
        rec = torch.as_tensor(index).to(self.plan.crop.device, torch.long).reshape(-1)
        if self.logits is not None:
            return SoftBatch(inputs, partner, lam, self.logits[epoch, rec.to(self.logits.device)].to(dev).float())
        rec = rec.to(self.topk_values.device)
        return SoftBatch(inputs, partner, lam, self.topk_values[epoch, rec].to(dev).float(),
                         self.topk_indices[epoch, rec].to(dev).long())


def _check_config(config: dict) -> None:
    for name, choices in (("loss", SOFT_LOSSES), ("ce_label", CE_LABELS)):
        check_option("evaluation", name, config[name], choices)
    check_schedule_options(config, "evaluation")
    if not isinstance(config["arch"], str):
        raise DDKitError(f"evaluation option arch={config['arch']!r} is not valid; give a model name, e.g. resnet18")
    check_training_options(config, "evaluation")
    check_number("evaluation", "temperature", config["temperature"], above=0)
    check_number("evaluation", "gamma", config["gamma"], minimum=0)
    check_flag("evaluation", "t2", config["t2"])
    check_flag("evaluation", "online.augment", (config.get("online") or {}).get("augment", True))


def train_soft(
    model: torch.nn.Module,
    source: ReplaySource,
    labels: torch.Tensor,
    config: dict,
    generator: torch.Generator,
    show_progress: bool = False,
    desc: str = "soft",
    checkpoint=None,
    compiled: bool = False,
) -> list[float]:
    """Train ``model`` on the replayed views of ``source`` against its soft targets.

    Args:
        model: the student, on the compute device.
        source: a :class:`ReplaySource` (inputs and targets by ``(record epoch, index)``).
        labels: int64 ``[N]`` hard labels on the compute device (used by ``"mse_ce"``).
        config: a resolved soft config (``loss`` already "kl" or "mse_ce", not "auto").
        generator: CPU generator; drives the batch order only (the views are in the records).
        checkpoint: a :class:`ddkit.models.training.RunCheckpoint` to continue from and to write
            at epoch ends (under torchrun rank 0 writes it and every rank restores it), or None.
            The last epoch's is always written and left for the caller to remove once the result
            is stored.
        compiled: run the training step through ``torch.compile``
            (:class:`ddkit.models.training.DataParallel`).

    Under torchrun the student trains with :class:`ddkit.models.training.DataParallel`: every
    rank draws the same order, replays its slice of each batch, and the averaged gradient is the
    whole batch's (``config["sync_bn"]`` for whole-batch BatchNorm statistics).

    Returns:
        The mean training loss of each epoch (this rank's slices).
    """
    loss_name = config["loss"]

    def batch_loss(module, epoch, index, mine):
        index = index[mine]  # each view and its mix partner come from the records, not the batch
        batch = source.batch(epoch % source.epochs, index)
        own = labels[index.to(labels.device)]
        mixed_in = labels[batch.partner.to(labels.device)]
        return soft_loss(module(batch.inputs), batch.values, batch.indices, loss=loss_name,
                         temperature=float(config["temperature"]), t2=bool(config["t2"]),
                         gamma=float(config["gamma"]), labels=own, partner_labels=mixed_in, lam=batch.lam,
                         ce_label=config["ce_label"])

    return train_scheduled(model, source.num_samples, config, generator, batch_loss, show_progress, desc, checkpoint,
                           compiled)


class SoftProtocol:
    """The soft protocol for one distilled set: validates early, then trains students.

    Construction checks everything that needs no real data (records or teachers present, config
    values, loss), so a bad request fails before the dataset is loaded. :attr:`config` is the
    config stored with the results: the resolved preset with ``loss`` resolved from ``"auto"``,
    plus ``targets`` (``"records"`` or ``"online"``); records mode drops the unused ``online``
    block, online mode adds ``online.plan`` (``"records"`` or ``"sampled"``) and
    ``teacher_info`` (what the caller said the teachers are; a reused result is matched on it).

    Args:
        distilled: the :class:`ddkit.DistilledSet`.
        config: from ``resolve_config("soft", preset, overrides, recipe)`` (the recipe already
            resolved for this set, :func:`recipe_for_set`).
        teachers: online teachers (module or list), or None to use the set's records.
        teacher_info: JSON-able description of the online teachers, stored in the config.
    """

    def __init__(self, distilled, config: dict, teachers=None, teacher_info=None):
        _check_config(config)
        self.distilled = distilled
        extras = distilled.extras
        self.has_records = any(k.startswith(RECORD_PREFIX) for k in extras)
        if teachers is not None:
            teachers = _as_teacher_list(teachers)
        self.teachers = teachers
        if teachers is None and not self.has_records:
            raise DDKitError(
                "this set has no relabel records for the soft protocol; relabel it first "
                "(ddkit relabel SET --like sre2l), or in Python pass teachers= to ddkit.evaluate for online "
                "soft labels"
            )
        relabel_meta = distilled.meta.get("relabel") or {}
        config = dict(config)
        if config["loss"] == "auto":
            config["loss"] = relabel_meta.get("eval_loss", "kl")
            if config["loss"] not in ("kl", "mse_ce"):
                raise DDKitError(
                    f"unknown soft loss {config['loss']!r} in the set's relabel metadata; pass loss=kl or mse_ce"
                )
        self.plan = None
        plain = teachers is not None and not (config.get("online") or {}).get("augment", True)
        if self.has_records and not plain:
            if distilled.decode_factor != 1:
                raise DDKitError("relabel records on a partition-decoded set are not supported; re-create the records")
            self.plan = ReplayPlan.from_extras(extras)
            if self.plan.num_samples != distilled.images.shape[0]:
                raise DDKitError(
                    f"the relabel records cover {self.plan.num_samples} images but the set has "
                    f"{distilled.images.shape[0]}; the set is damaged, relabel it again"
                )
            has_targets = (RECORD_PREFIX + "logits" in extras or RECORD_PREFIX + "topk_values" in extras
                           or bool(relabel_meta.get("shards")))
            if teachers is None and not has_targets:
                raise DDKitError("the set's relabel records have no logits; relabel it again (ddkit relabel SET "
                                 "--like M), or in Python pass teachers= to ddkit.evaluate")
        if teachers is None:
            config.pop("online", None)
            config["targets"] = "records"
        else:
            online = dict(config["online"])
            online["plan"] = "plain" if plain else "records" if self.has_records else "sampled"
            config["online"] = online
            config["targets"] = "online"
            config["teacher_info"] = teacher_info if teacher_info is not None else f"{len(teachers)} teacher(s)"
        self.config = config

    @property
    def num_images(self) -> int:
        """Training images per epoch ``N``."""
        return int(self.distilled.images.shape[0]) * self.distilled.decode_factor

    def source(self, device) -> tuple[ReplaySource, torch.Tensor]:
        """The :class:`ReplaySource` and int64 hard labels ``[N]`` on ``device``."""
        distilled, config = self.distilled, self.config
        fill = padding_fill(distilled).to(device)
        if self.has_records:
            images, labels = distilled.images.float(), distilled.labels
        else:
            images, labels = distilled.decoded()
        images = normalize(images, distilled.mean, distilled.std).to(device)
        labels = labels.to(device)
        if self.teachers is not None:
            online = config["online"]
            plan = self.plan
            if plan is None and not online.get("augment", True):
                plan = ReplayPlan.identity(int(images.shape[0]), int(images.shape[2]), int(images.shape[3]))
            elif plan is None:
                epochs = online["epochs"] if online["epochs"] is not None else config["epochs"]
                padding = 0
                if online["crop"] == "padded":
                    padding = padding_for(images.shape[2]) if online["crop_padding"] == "auto" else int(
                        online["crop_padding"])
                plan = plan_for(distilled.dataset, int(images.shape[0]), tuple(images.shape[2:]), int(epochs),
                                int(online["seed"]), online["crop_scale"], online["flip_prob"], online["mix"],
                                online["mix_beta"], padding)
            for teacher in self.teachers:
                teacher.to(device)
            src = ReplaySource(images, plan, teachers=self.teachers, equalize_norm=online["equalize_norm"],
                               norm_scope=online["norm_scope"], fp16=online["fp16"], fill=fill)
            return src, labels
        # records in the data file, or in shards beside it read one epoch at a time
        records = {**{k: v for k, v in sharded_sources(distilled).items()},
                   **{name: distilled.extras[RECORD_PREFIX + name] for name in ("logits", "topk_values", "topk_indices")
                      if RECORD_PREFIX + name in distilled.extras}}
        return ReplaySource(images, self.plan, logits=records.get("logits"), topk_values=records.get("topk_values"),
                            topk_indices=records.get("topk_indices"), fill=fill), labels
