"""A run's whole configuration as one readable file: ``ddkit config`` writes it, ``ddkit distill
--config FILE`` runs it.

The file is YAML::

    method: dm
    dataset: fashion-mnist
    ipc: 10
    preset: quick
    seed: 0
    options:          # everything the run reads, merged: preset, term switches, overrides
      iterations: 200
      ...

Reading a file back turns it into overrides: the leaves of ``options`` that differ from what the
method's preset resolves to for the file's own (method, dataset, IPC, preset). So a file runs
exactly what it shows, an edited value is checked like ``--set`` (an unknown or misspelt key is
refused with the known ones), and a file written by an older ddkit keeps its choices without
pinning the defaults it did not touch. A command-line ``--set`` applies after the file.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import yaml

from ddkit.errors import DDKitError
from ddkit.methods.registry import get_spec
from ddkit.tiers import check_tier
from ddkit.utils import check_seed, plain_data

#: The fields of a configuration file, in the order they are written.
FIELDS = ("method", "dataset", "ipc", "preset", "seed", "options")
HEADER = ("# ddkit run configuration (ddkit config); run it with: ddkit distill --config {path} --out DIR\n"
          "# edit any value of options:, or override one on the command line with --set key=value\n")


def resolve_options(method: str, dataset: str, ipc: int, preset: str, overrides=None, **flags) -> dict:
    """The options a run of ``method`` would use: its preset for (``dataset``, ``ipc``) with the
    family's ``flags`` (``terms``, ``weights``) and ``overrides`` (dict or ``key=value`` strings).

    Raises:
        DDKitError: unknown method, tier or option; a method whose preset cannot be shown.
    """
    spec = get_spec(method)
    check_tier(preset)
    if spec.resolve is None:
        if overrides or flags:
            raise DDKitError(f"{method} has no options to set; drop --set")
        return {}
    if not (overrides or flags):
        return spec.resolve(dataset, ipc, preset)
    try:
        inspect.signature(spec.resolve).bind(dataset, ipc, preset, overrides, **flags)
    except TypeError:
        given = ", ".join(f"--{name}" for name in flags) or "--set"
        raise DDKitError(f"{method} ({spec.family} family) does not take {given}") from None
    return spec.resolve(dataset, ipc, preset, overrides, **flags)


def run_config(method: str, dataset: str, ipc: int, preset: str = "quick", seed: int = 0, overrides=None,
               **flags) -> dict:
    """The configuration document of one run: ``{method, dataset, ipc, preset, seed, options}``
    (``options`` from :func:`resolve_options`, as plain YAML types)."""
    check_seed("distillation", seed)
    options = resolve_options(method, dataset, ipc, preset, overrides, **flags)
    return {"method": method, "dataset": dataset, "ipc": int(ipc), "preset": preset, "seed": int(seed),
            "options": plain_data(options)}


def dump_run_config(document: dict, path: str = "FILE") -> str:
    """``document`` (from :func:`run_config`) as YAML text, the header naming ``path``."""
    body = yaml.safe_dump({key: document[key] for key in FIELDS}, sort_keys=False, default_flow_style=None,
                          width=100)
    return HEADER.format(path=path) + body


def read_run_config(path) -> dict:
    """Read a configuration file: ``{method, dataset, ipc, preset, seed, overrides}`` where
    ``overrides`` is ``{dotted key: value}`` for the options that differ from the preset (see the
    module's docstring), already checked against the method's options.

    Raises:
        DDKitError: a missing or unreadable file, bad YAML, a missing or invalid field, an option
            the method does not have.
    """
    path = Path(path)
    try:
        document = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise DDKitError(f"configuration file {path} not found; write one with: ddkit config METHOD --dataset D "
                         f"--ipc N --out {path}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DDKitError(f"cannot read configuration file {path}: {' '.join(str(exc).split())[:200]}") from None
    if not isinstance(document, dict):
        raise DDKitError(f"configuration file {path} must be a YAML mapping with {', '.join(FIELDS)}")
    unknown = sorted(set(document) - set(FIELDS))
    if unknown:
        raise DDKitError(f"configuration file {path}: unknown field(s) {', '.join(map(str, unknown))}; "
                         f"known: {', '.join(FIELDS)}")
    missing = [field for field in ("method", "dataset", "ipc") if document.get(field) is None]
    if missing:
        raise DDKitError(f"configuration file {path} lacks {', '.join(missing)}")
    ipc = document["ipc"]
    if isinstance(ipc, bool) or not isinstance(ipc, int) or ipc < 1:
        raise DDKitError(f"configuration file {path}: ipc must be an integer >= 1, got {ipc!r}")
    method, dataset = str(document["method"]), str(document["dataset"])
    preset = check_tier(document.get("preset") or "quick")
    seed = check_seed("distillation", document.get("seed") or 0)
    options = document.get("options") or {}
    if not isinstance(options, dict):
        raise DDKitError(f"configuration file {path}: options must be a mapping of option -> value")
    preset_options = plain_data(resolve_options(method, dataset, ipc, preset))
    overrides = dict(changed_leaves(options, preset_options))
    if overrides:  # refuse a misspelt or unknown option now, with the known ones, not when the run starts
        resolve_options(method, dataset, ipc, preset, overrides)
    return {"method": method, "dataset": dataset, "ipc": ipc, "preset": preset, "seed": seed,
            "overrides": overrides}


def changed_leaves(options: dict, base: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted key, value)`` for every leaf of ``options`` that is missing from ``base`` or differs
    from it; nested mappings are compared key by key, anything else (lists included) as a whole.

    >>> changed_leaves({"a": 1, "m": {"w": 2, "d": 3}}, {"a": 1, "m": {"w": 4, "d": 3}})
    [('m.w', 2)]
    """
    changes = []
    for key, value in options.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            changes += changed_leaves(value, base[key], f"{name}.")
        elif key not in base or base[key] != value:
            changes.append((name, value))
    return changes
