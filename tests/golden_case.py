"""Loading the golden reference cases (numbers from running the published code; see golden/README.md).

Each case is a safetensors file in ``tests/golden/`` whose metadata names its inputs, outputs,
learnable tensors and tolerance. The ``golden`` fixture (tests/conftest.py) is :func:`load_case`:
``golden(name)`` returns a :class:`GoldenCase`, and ``case.check(name, value)`` compares one of
ddkit's tensors with the reference elementwise under the case's own tolerance.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

GOLDEN_DIR = Path(__file__).parent / "golden"


@dataclass
class GoldenCase:
    """One reference case: its tensors (float64 where floating) and metadata."""

    name: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, str]
    rtol: float = field(init=False)
    atol: float = field(init=False)

    def __post_init__(self):
        self.rtol = float(self.meta["rtol"])
        self.atol = float(self.meta["atol"])

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def names(self, role: str) -> list[str]:
        """The tensor names the metadata lists under ``role`` (inputs, outputs or learnable)."""
        return json.loads(self.meta.get(role, "[]"))

    def prefixed(self, prefix: str) -> dict[str, torch.Tensor]:
        """Tensors whose names start with ``prefix``, with the prefix removed (e.g. ``sd.`` weights)."""
        return {k[len(prefix):]: v for k, v in self.tensors.items() if k.startswith(prefix)}

    def check(self, key: str, value: torch.Tensor, rtol: float | None = None, atol: float | None = None) -> None:
        """Assert ``value`` equals the reference tensor ``key`` within the case's tolerance."""
        expected = self.tensors[key]
        value = value.detach().to(torch.float64).cpu()
        assert value.shape == expected.shape, f"{self.name}:{key} shape {tuple(value.shape)} != {tuple(expected.shape)}"
        torch.testing.assert_close(value, expected.to(torch.float64), rtol=self.rtol if rtol is None else rtol,
                                   atol=self.atol if atol is None else atol, msg=lambda m: f"{self.name}:{key}: {m}")


def load_case(name: str) -> GoldenCase:
    """The case stored in ``tests/golden/<name>.safetensors``."""
    path = GOLDEN_DIR / f"{name}.safetensors"
    with safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata() or {}
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    return GoldenCase(name, tensors, meta)
