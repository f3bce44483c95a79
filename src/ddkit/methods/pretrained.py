"""Teachers from outside ddkit: torchvision / timm pretrained networks and user checkpoints.

``--teacher`` (and a preset teacher's ``pretrained`` entry) accepts, besides a ddkit teacher folder:

* ``torchvision:NAME`` - ``torchvision.models.get_model(NAME, weights="DEFAULT")`` (torchvision's
  own weights cache, ``$TORCH_HOME``). Where NAME has a ddkit twin (:data:`ddkit.models.imagenet.
  TORCHVISION_NAMES`: resnet18, resnet50, mobilenet_v2, shufflenet_v2_x0_5, efficientnet_b0) the weights are
  loaded into the ddkit network, key for key; other names run as torchvision built them.
* ``timm:NAME`` - ``timm.create_model(NAME, pretrained=True)`` (timm's cache).
* ``ARCH:FILE`` - a ddkit model name (``imagenet_resnet18``, ``convnet(width=16)`` with options in
  parentheses...) and a ``.pth`` / ``.pt``
  (read with ``torch.load(weights_only=True)``, so no code runs; a ``state_dict`` / ``model`` entry
  and a DistributedDataParallel ``module.`` prefix are accepted) or ``.safetensors`` checkpoint
  whose keys are that network's (for the ImageNet networks: torchvision's).

Before such a teacher recovers or relabels anything, :func:`check_class_order` measures its
accuracy on a small labelled sample of the dataset and refuses it when that is not far above
chance: a teacher trained with another class order silently ruins every synthetic image.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ddkit.data import data_root
from ddkit.errors import DDKitError
from ddkit.methods.squeeze import Teacher, build_net, frozen, load_teacher
from ddkit.models import available
from ddkit.models.imagenet import TORCHVISION_NAMES
from ddkit.utils import normalize

SOURCES = ("torchvision", "timm")
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".safetensors")


def is_external(spec) -> bool:
    """Whether ``spec`` (a ``--teacher`` value) names a torchvision/timm network or ``ARCH:FILE``
    rather than a ddkit teacher folder."""
    if not isinstance(spec, str) or ":" not in spec:
        return False
    head, _, tail = spec.partition(":")
    return head.lower() in SOURCES or Path(tail).suffix.lower() in CHECKPOINT_SUFFIXES


def _cache_dir(spec: str, real) -> Path:
    """A writable folder for what ddkit derives from this teacher (G-VBSM's conv targets)."""
    key = hashlib.sha256(f"{spec}|{real.name}|{list(real.image_shape)}".encode()).hexdigest()[:16]
    head = spec.split(":", 1)[0].replace("/", "_")
    return data_root() / "pretrained-teachers" / f"{head}-{key}"


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` or ``.pth``/``.pt`` file (``weights_only=True``), unwrapped
    from a ``state_dict``/``model`` entry and a ``module.`` prefix. One-line error if unreadable."""
    if not path.is_file():
        raise DDKitError(f"teacher checkpoint {path} does not exist; give the path of a .pth or .safetensors file")
    try:
        if path.suffix.lower() == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the user's to replace
        raise DDKitError(f"cannot read teacher checkpoint {path} ({' '.join(str(exc).split())[:160]}); give a "
                         f"state dict saved with torch.save or safetensors") from None
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise DDKitError(f"{path} does not hold a state dict of tensors; save model.state_dict()")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def parse_arch(text: str) -> tuple[str, dict]:
    """``"convnet(width=16,depth=2)"`` -> ``("convnet", {"width": 16, "depth": 2})``; numbers become
    int or float, ``true``/``false`` booleans, anything else stays a string."""
    match = re.fullmatch(r"\s*([\w.-]+)\s*(?:\((.*)\))?\s*", text)
    if match is None:
        raise DDKitError(f"{text!r} is not ARCH or ARCH(key=value,...); e.g. convnet(width=16)")
    options = {}
    for item in filter(None, (part.strip() for part in (match.group(2) or "").split(","))):
        key, sep, value = item.partition("=")
        if not sep:
            raise DDKitError(f"model option {item!r} in {text!r} is not key=value")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        if isinstance(value, str) and value.lower() in ("true", "false"):
            value = value.lower() == "true"
        options[key.strip()] = value
    return match.group(1).lower(), options


def _ddkit_net(arch: str, options: dict, real) -> torch.nn.Module:
    return build_net({"arch": arch, **options}, real, seed=0, device="cpu")


def _load_into(net: torch.nn.Module, state: dict, what: str) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:200]
        raise DDKitError(f"{what} does not fit this network ({first}); give the checkpoint of that architecture, "
                         f"trained for this dataset's classes") from None


def _torchvision(name: str, real):
    try:
        import torchvision  # optional dependency: torchvision (the "gpu" extra)
    except Exception as exc:  # noqa: BLE001 - ImportError, or a build that does not import with this torch
        raise DDKitError(f"--teacher torchvision:{name} needs torchvision, which does not import here "
                         f"({' '.join(str(exc).split())[:100]}); install it, or save its weights and pass "
                         f"--teacher imagenet_resnet18:FILE.pth (a ddkit network with torchvision's keys)") from None
    try:
        source = torchvision.models.get_model(name, weights="DEFAULT")
    except (ValueError, KeyError) as exc:
        raise DDKitError(f"torchvision has no pretrained model {name!r} ({' '.join(str(exc).split())[:120]})") from None
    if name in TORCHVISION_NAMES:
        arch, options = TORCHVISION_NAMES[name]
        net = _ddkit_net(arch, options, real)
        _load_into(net, source.state_dict(), f"torchvision's {name}")
        return net, {"arch": arch, **options}
    return source, {"arch": f"torchvision:{name}"}


def _timm(name: str):
    try:
        import timm  # optional dependency: timm (the "gpu" extra)
    except Exception as exc:  # noqa: BLE001
        raise DDKitError(f"--teacher timm:{name} needs timm, which does not import here "
                         f"({' '.join(str(exc).split())[:100]}); install timm or give ARCH:FILE") from None
    try:
        return timm.create_model(name, pretrained=True), {"arch": f"timm:{name}"}
    except Exception as exc:  # noqa: BLE001 - unknown names, failed downloads
        raise DDKitError(f"timm cannot build pretrained {name!r} ({' '.join(str(exc).split())[:120]})") from None


def load_external_teacher(spec: str, real, device="cpu"):
    """A frozen, eval-mode :class:`ddkit.methods.squeeze.Teacher` for ``spec`` (see the module
    docstring); its logits must have ``real.num_classes`` entries. ``test_accuracy`` is NaN
    (not measured); ``path`` is a cache folder for what ddkit derives from it."""
    head, _, tail = spec.partition(":")
    if head.lower() == "torchvision":
        net, config = _torchvision(tail, real)
    elif head.lower() == "timm":
        net, config = _timm(tail)
    else:
        arch, options = parse_arch(head)
        if arch not in available():
            raise DDKitError(f"--teacher {spec}: {arch!r} is not a ddkit model; write ARCH:FILE with ARCH one of "
                             f"{', '.join(available())}, or torchvision:NAME / timm:NAME")
        net, config = _ddkit_net(arch, options, real), {"arch": arch, **options}
        _load_into(net, read_checkpoint(Path(tail).expanduser()), tail)
    net = frozen(net.to(device)).eval()
    with torch.no_grad():
        width = int(net(torch.zeros(1, *real.image_shape, device=device)).shape[1])
    if width != real.num_classes:
        raise DDKitError(f"--teacher {spec} gives {width} logits but {real.name} has {real.num_classes} classes; use a "
                         f"teacher trained on this dataset's classes")
    folder = _cache_dir(spec, real)
    folder.mkdir(parents=True, exist_ok=True)
    config["source"] = spec
    return Teacher(net, config, {"source": spec}, float("nan"), folder)


def resolve_teacher(spec, real, device="cpu"):
    """``--teacher`` value -> Teacher: an external one (:func:`load_external_teacher`) or a ddkit
    teacher folder (:func:`ddkit.methods.squeeze.load_teacher`)."""
    if is_external(spec):
        return load_external_teacher(spec, real, device)
    return load_teacher(spec, real, device)


def class_check_threshold(num_classes: int) -> float:
    """The least accuracy (in [0, 1]) that counts as far above chance ``1/K``: three times chance
    and a tenth of the way from chance to perfect, whichever is higher."""
    chance = 1.0 / num_classes
    return max(3 * chance, chance + 0.1 * (1 - chance))


@torch.no_grad()
def check_class_order(teacher, real, device="cpu", sample: int = 0, seed: int = 0) -> float:
    """Refuse ``teacher`` with one line unless its top-1 accuracy on a random labelled sample of
    ``real``'s training split reaches :func:`class_check_threshold`.

    ``sample``: images to look at (0: ``min(2048, max(256, 2 K))``, all when the split is smaller);
    a streaming dataset decodes only these. Returns the accuracy in [0, 1].
    """
    count = len(real.train)
    size = min(count, sample or min(2048, max(256, 2 * real.num_classes)))
    generator = torch.Generator().manual_seed(seed)
    index = torch.randperm(count, generator=generator)[:size]
    model = teacher.model if hasattr(teacher, "model") else teacher
    was_training = model.training
    model.eval()
    correct = 0
    try:
        for start in range(0, size, 256):
            pick = index[start:start + 256]
            images = normalize(real.train.images[pick].float().div(255.0), real.mean, real.std).to(device)
            correct += int((model(images).argmax(1).cpu() == real.train.labels[pick]).sum())
    finally:
        model.train(was_training)
    accuracy = correct / max(1, size)
    needed = class_check_threshold(real.num_classes)
    if accuracy < needed:
        name = getattr(teacher, "name", type(model).__name__)
        raise DDKitError(
            f"teacher {name} is right on {100 * accuracy:.1f} % of {size} labelled training images of {real.name} "
            f"(chance {100 / real.num_classes:.2g} %, needed {100 * needed:.2g} %): its classes are in another order "
            f"than the dataset's sorted folder names, or it was trained on other data; fix the class order, or pass "
            f"--no-class-check to use it anyway")
    return accuracy
