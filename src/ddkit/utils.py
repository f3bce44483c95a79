"""Small shared helpers: devices, seeded generators, config overrides, progress bars, memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml

from ddkit.errors import DDKitError


def resolve_device(name: str | torch.device | None) -> torch.device:
    """'auto' / None -> CUDA when present else CPU; 'cuda' without a GPU -> DDKitError."""
    if name is None or str(name) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DDKitError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DDKitError("--device cuda was asked for but this torch sees no CUDA GPU; use --device cpu")
    return device


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded with ``seed``; every random draw in ddkit goes through one."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


@contextlib.contextmanager
def seeded_global_rng(seed: int):
    """Run a block (e.g. ``nn.Module`` construction, which draws from torch's global RNG) with
    ``seed``, restoring the caller's global RNG state afterwards so nothing outside is reseeded."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed))
        yield


def parse_value(text: str) -> Any:
    """Parse a command-line value: int, then float (YAML 1.1 reads ``1e-3`` as a string), then YAML
    (true, null, [1, 2], {a: 1}), else the text itself."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def override_items(overrides: dict | Iterable[str], what: str = "option") -> list[tuple[str, Any]]:
    """``(key, value)`` pairs of a dict, or of ``key=value`` strings (values parsed by
    :func:`parse_value`); anything else is refused with one line."""
    if isinstance(overrides, dict):
        return list(overrides.items())
    if isinstance(overrides, str) or not isinstance(overrides, (list, tuple)):
        raise DDKitError(f"{what} overrides must be a dict or a list of 'key=value' strings, got {overrides!r}")
    return [_split_pair(str(text)) for text in overrides]


def apply_overrides(config: dict, overrides: dict | Iterable[str] | None, what: str = "option") -> dict:
    """Return a copy of ``config`` with overrides applied.

    Args:
        config: the preset's resolved options.
        overrides: a dict, or strings ``key=value`` (value parsed as YAML); dotted keys reach into
            nested dicts (``model.width=64``); inside a ``model`` dict new keys are allowed (they are
            the architecture's factory options, checked when the model is built).

    Raises:
        DDKitError: for an unknown key (listing the known ones) or a string without '='.
    """
    result = _deep_copy(config)
    if not overrides:
        return result
    for key, value in override_items(overrides, what):
        target = result
        parts = str(key).replace("-", "_").split(".")
        for part in parts[:-1]:
            if not isinstance(target.get(part), dict):
                raise DDKitError(f"unknown {what} {key!r}; known: {', '.join(sorted(result))}")
            target = target[part]
        # a "model" dict holds free-form factory options (model.norm=batch adds one)
        if parts[-1] not in target and not (len(parts) > 1 and parts[-2] == "model"):
            raise DDKitError(f"unknown {what} {key!r}; known: {', '.join(sorted(target))}")
        target[parts[-1]] = value
    return result


def check_option(what: str, name: str, value: object, choices) -> str:
    """``value`` if it is one of ``choices``; else DDKitError ``"<what> option name=value is not valid; choose one of: ..."``."""
    if not isinstance(value, str) or value not in choices:
        raise DDKitError(f"{what} option {name}={value!r} is not valid; choose one of: {', '.join(choices)}")
    return value


def check_number(what: str, name: str, value: object, integer: bool = False, minimum: float | None = None,
                 above: float | None = None, maximum: float | None = None) -> float:
    """``value`` if it is a number (an integer when ``integer``) with ``value >= minimum``,
    ``value > above`` and ``value <= maximum`` (each bound optional); else DDKitError
    ``"<what> option name=value is not valid; give <the rule>"``."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (minimum is None or value >= minimum) and (above is None or value > above) \
        and (maximum is None or value <= maximum)
    if not ok:
        rule = [f">= {minimum:g}"] if minimum is not None else []
        rule += [f"> {above:g}"] if above is not None else []
        rule += [f"<= {maximum:g}"] if maximum is not None else []
        kind = "an integer" if integer else "a number"
        raise DDKitError(f"{what} option {name}={value!r} is not valid; give {kind}{' ' if rule else ''}"
                         f"{' and '.join(rule)}")
    return value


def check_flag(what: str, name: str, value: object) -> bool:
    """``value`` if it is true or false; else DDKitError (a string such as "maybe" is not a flag)."""
    if not isinstance(value, bool):
        raise DDKitError(f"{what} option {name}={value!r} is not valid; give true or false")
    return value


def _split_pair(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise DDKitError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip(), parse_value(value)


def _deep_copy(config: dict) -> dict:
    return {k: _deep_copy(v) if isinstance(v, dict) else (list(v) if isinstance(v, list) else v) for k, v in config.items()}


def progress(iterable=None, total=None, desc: str = "", enabled: bool = True, **kwargs):
    """A tqdm progress bar on stderr, or a silent pass-through when ``enabled`` is False."""
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True, **kwargs)


def peak_memory_bytes(device: torch.device | None = None) -> int:
    """Peak memory so far: CUDA max allocated on a GPU, else this process's max resident set."""
    if device is not None and torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _cpu_fields(cpuinfo: str) -> dict[str, str]:
    """The first processor's ``key: value`` fields of a ``/proc/cpuinfo`` text."""
    fields: dict[str, str] = {}
    for text in cpuinfo.split("\n\n", 1)[0].splitlines():
        key, _, value = text.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def describe_cpu(cpuinfo: str | None = None, cores: int | None = None) -> str:
    """The CPU in words, enough to tell two machines' timings apart, e.g.
    ``"AMD EPYC (family 26, model 2), AVX-512, 2 cores"``.

    ``cpuinfo``: the text of ``/proc/cpuinfo`` (read when None; where there is none, the platform's
    processor name is used); ``cores``: usable cores (default: those this process may run on).
    """
    import platform

    if cores is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            cpuinfo = ""
    fields = _cpu_fields(cpuinfo)
    name = fields.get("model name") or platform.processor() or platform.machine() or "unknown CPU"
    if "cpu family" in fields and "model" in fields:
        name += f" (family {fields['cpu family']}, model {fields['model']})"
    flags = set(fields.get("flags", "").split())
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else None
    return ", ".join(part for part in (name, vector, f"{cores} cores") if part)


def describe_device(device: torch.device | str) -> str:
    """The device in words for result records: the GPU's name (``"NVIDIA H100 80GB HBM3"``) for
    CUDA, :func:`describe_cpu` for the CPU, else the device's type."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        return describe_cpu()
    return device.type


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """(images - mean) / std per channel; images float [N, C, H, W] in pixel space [0, 1]."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return (images - mean_t) / std_t


def denormalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """Inverse of :func:`normalize`: back to pixel space [N, C, H, W]."""
    mean_t = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images * std_t + mean_t


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def lock_file(path: str | Path, wait: bool = True) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing): the open file descriptor that holds
    it until closed, or until the process ends, crash included. With ``wait`` False, None at once
    when another open file holds the lock. Never delete such a file while it may be in use: two
    processes could then lock two different files of the same name."""
    import fcntl

    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def default_mode(directory: bool = False) -> int:
    """The permissions a plain ``open``/``mkdir`` would give under the current umask:
    ``0666 & ~umask`` for files, ``0777 & ~umask`` for directories (temporary-file helpers and
    safetensors make 0600/0700, which would hide a user's sets from the rest of their group)."""
    mask = os.umask(0)
    os.umask(mask)
    return (0o777 if directory else 0o666) & ~mask


def atomic_write(path: str | Path, write) -> Path:
    """Call ``write(tmp_path)`` for a temporary file beside ``path``, flush it to disk, give it the
    usual ``0666 & ~umask`` permissions (mkstemp makes 0600) and rename it over ``path``. The file is
    whole or absent, and processes writing the same path at once each use a temporary of their own."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json_atomic(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` as indented JSON to ``path`` through :func:`atomic_write`."""
    return write_text_atomic(path, json.dumps(payload, indent=2, default=_json_default) + "\n")


def _json_default(value):
    if isinstance(value, (Path,)):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a manifest")
