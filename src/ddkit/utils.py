"""Small shared helpers: devices, seeded generators, config overrides, progress bars, memory."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import platform
import re
import resource
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
import yaml
from tqdm.auto import tqdm

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


#: The largest seed a user may give (``--seed``, ``seed=``): the int64 range, which JSON, safetensors
#: and ``torch.Generator.manual_seed`` (0 .. 2**64 - 1) all hold.
MAX_SEED = 2 ** 63 - 1
#: ``torch.Generator.manual_seed`` takes 0 .. 2**64 - 1; seeds derived from a user's seed (``seed + r``,
#: ``seed * 100003 + batch``) are folded into that range.
_SEED_RANGE = 2 ** 64


def check_seed(what: str, seed: object, count: int = 1) -> int:
    """``seed`` if it and the ``count - 1`` seeds after it (``seed + r`` of ``count`` runs) lie in
    0 .. :data:`MAX_SEED`; else DDKitError ``"<what> seed ... is not valid; give ..."``."""
    top = MAX_SEED - (int(count) - 1)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= top:
        extra = f" (its {count} runs use seeds up to seed + {count - 1})" if count > 1 else ""
        raise DDKitError(f"{what} option seed={seed!r} is not valid; give an integer from 0 to {top}{extra}")
    return seed


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A torch.Generator seeded with ``seed``; every random draw in ddkit goes through one.

    Seeds outside the generator's 0 .. 2**64 - 1 (derived ones, such as ``seed * 100003 + batch``
    for a large user seed) are taken modulo 2**64; seeds inside that range are used as they are."""
    generator = torch.Generator(device=device)
    generator.manual_seed(int(seed) % _SEED_RANGE)
    return generator


@contextlib.contextmanager
def seeded_global_rng(seed: int):
    """Run a block (e.g. ``nn.Module`` construction, which draws from torch's global RNG) with
    ``seed``, restoring the caller's global RNG state afterwards so nothing outside is reseeded."""
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(seed) % _SEED_RANGE)
        yield


def plain_data(value: Any) -> Any:
    """``value`` as JSON (or YAML) stores it: tuples become lists, keys strings, so a preset
    compares equal to a configuration read back from a manifest or a file."""
    return json.loads(json.dumps(value))


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


def split_names(text) -> list[str]:
    """The non-empty, stripped parts of a comma-separated string (``"dm, ddm,"`` -> ``["dm", "ddm"]``),
    the one reading of every comma-separated option (``--methods``, ``--terms``, ``--arch`` ...)."""
    return [part.strip() for part in str(text).split(",") if part.strip()]


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
        if isinstance(target.get(parts[-1]), dict) and not isinstance(value, dict):
            inner = ", ".join(sorted(target[parts[-1]])) or "none set yet"
            example = f"{key}.{sorted(target[parts[-1]])[0]}" if target[parts[-1]] else f"{key}.width"
            raise DDKitError(f"{what} {key}={value!r} is not valid; set {key} options one by one, e.g. --set "
                             f"{example}=... ({key} holds: {inner})")
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


@contextlib.contextmanager
def holding_lock(path: str | Path):
    """:func:`lock_file` for a ``with`` block: the exclusive lock on ``path`` is held until it ends."""
    fd = lock_file(path)
    try:
        yield
    finally:
        os.close(fd)


#: What to do about a file-system fault the user can fix by choosing another path, changing
#: permissions or freeing space (``ddkit`` exits 2 for these; any other OSError exits 1).
FILE_FAULT_ADVICE = {
    errno.EACCES: "write somewhere you have permission to, or change the permissions",
    errno.EPERM: "write somewhere else",
    errno.EROFS: "write somewhere else",
    errno.ENOSPC: "free some space or write somewhere else",
    errno.EDQUOT: "free some space or write somewhere else",
    errno.ENOTDIR: "a part of the path is a file, not a folder; choose another path",
    errno.EISDIR: "give a file path, not a folder",
    errno.EEXIST: "a file is in the way of a folder, or the reverse; choose another path or move what is there",
    errno.ENOENT: "check the path",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.ELOOP: "check the symbolic links in the path",
}
_SAFETENSORS_IO = re.compile(r"(?P<strerror>[^:]+?) \(os error (?P<errno>\d+)\)(?: at path \"(?P<path>[^\"]+)\")?")


def wrapped_os_error(exc: BaseException) -> OSError | None:
    """The ``OSError`` a ``SafetensorError`` reports in its text (``... No space left on device (os
    error 28) at path "..."``), or None when it reports none."""
    found = _SAFETENSORS_IO.search(str(exc))
    if found is None:
        return None
    return OSError(int(found["errno"]), found["strerror"].strip(), found["path"])


def describe_file_error(exc: BaseException, where: str | Path | None = None) -> tuple[str, int]:
    """One line for an ``OSError`` (or a ``SafetensorError`` that wraps one) and its exit code: 2 for
    a fault the user can fix (:data:`FILE_FAULT_ADVICE`: a path, permissions, space), 1 for any other
    (an I/O error of the machine or its file system). ``where`` names the path (default: the
    error's own)."""
    if not isinstance(exc, OSError):
        wrapped = wrapped_os_error(exc)
        if wrapped is None:
            detail = " ".join(str(exc).split())[:200]
            return (f"a safetensors file could not be read or written ({detail}); if it is a damaged checkpoint "
                    f"or cache, delete it and run again", 2)
        exc = wrapped
    if where is None:
        where = exc.filename if exc.filename is not None else "a file"
        if exc.filename2 is not None:
            where = f"{exc.filename} -> {exc.filename2}"
    strerror = exc.strerror or (os.strerror(exc.errno) if exc.errno else str(exc))
    advice = FILE_FAULT_ADVICE.get(exc.errno)
    if advice is not None:
        return f"{where}: {strerror}; {advice}", 2
    return (f"{where}: {strerror}; a fault of the machine or its file system, not of your input: check the disk "
            f"and try again", 1)


def check_writable(path: str | Path, option: str = "--out", file: bool = False) -> Path:
    """Refuse, with one line and before any work, an output path that cannot be written: a file where
    a folder is meant (or a folder where a file is, with ``file``), a path under a file, a place where
    a file cannot be created (permissions, a read-only file system) or a full disk.

    Creates nothing but a probe file, removed at once, in the nearest existing folder. Returns ``path``.
    """
    path = Path(path).expanduser()
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if existing == path and path.exists():
        if not file and not path.is_dir():
            raise DDKitError(f"{option} {path} is a file, not a folder; choose a folder path")
        if file and path.is_dir():
            raise DDKitError(f"{option} {path} is a folder; give a file path")
        folder = path if path.is_dir() else path.parent
    elif not existing.is_dir():
        raise DDKitError(f"{option} {path} lies under {existing}, which is a file, not a folder; choose another path")
    else:
        folder = existing
    try:
        fd, probe = tempfile.mkstemp(prefix=".ddkit-write-test-", dir=folder)
        os.close(fd)
        os.unlink(probe)
        stats = os.statvfs(folder)
    except OSError as exc:
        line, _ = describe_file_error(exc, where=folder)
        raise DDKitError(f"{option} {path} cannot be written: {line}") from None
    if stats.f_bavail * stats.f_frsize < MIN_FREE_BYTES:
        raise DDKitError(f"{option} {path} cannot be written: the disk holding {folder} is full; free some space "
                         f"or choose another {option}")
    return path


#: Less free space than this where an output goes counts as a full disk (:func:`check_writable`).
MIN_FREE_BYTES = 1 << 20


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


def canonical_json(payload) -> str:
    """``payload`` as canonical JSON text: what :func:`write_json_atomic` would store, read back, with
    sorted keys and no spaces, so that two equal manifests give equal text whatever their layout."""
    stored = json.loads(json.dumps(payload, default=_json_default))
    return json.dumps(stored, sort_keys=True, separators=(",", ":"), ensure_ascii=True)


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
