"""Numeric precision of the engines' network passes: ``fp32`` (default), ``bf16`` or ``fp16``.

The precision is chosen for a whole command (``--precision``) or block of code::

    with ddkit.precision.using("bf16", device="cpu"):
        ds = ddkit.distill("dm", dataset="fashion-mnist", ipc=10, preset="quick")

and each engine takes an :class:`Amp` for its device when it starts (``precision.current(device)``),
then wraps its network forwards in :meth:`Amp.autocast`, takes the outputs back to fp32 with
:meth:`Amp.fp32` before any loss, and backpropagates and steps through :meth:`Amp.backward` and
:meth:`Amp.step`. So under ``bf16`` / ``fp16`` the convolutions and matrix products run in the lower
precision (``torch.autocast``: on CPUs with AVX-512 BF16 or AMX, and on GPUs, about twice the fp32
rate), while every loss and statistic (mean embeddings, covariances, eigenvalues, BatchNorm
statistics, cross-entropy) is computed in fp32 from fp32 copies of the features. ``fp16`` has a
narrow exponent range, so its gradients are scaled (``torch.amp.GradScaler``); it is for GPUs only.
Under ``fp32`` every call here is the plain operation: results are bit for bit those of code
without this module.
"""

from __future__ import annotations

import contextlib
import contextvars

import torch

from ddkit.errors import DDKitError

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

_ACTIVE: contextvars.ContextVar[str] = contextvars.ContextVar("ddkit_precision", default="fp32")


def check_precision(name: object, device="cpu") -> str:
    """``name`` if it is a precision ``device`` can run, else a one-line DDKitError."""
    if not isinstance(name, str) or name not in PRECISIONS:
        raise DDKitError(f"precision {name!r} is not valid; choose one of: {', '.join(PRECISIONS)}")
    if name == "fp16" and torch.device(device).type != "cuda":
        raise DDKitError("precision fp16 needs a CUDA GPU (it scales gradients for a GPU's fp16 units); "
                         "use --precision bf16 or fp32 on the CPU")
    return name


@contextlib.contextmanager
def using(name: str, device="cpu"):
    """Run the enclosed code's engines in precision ``name`` (checked for ``device``)."""
    token = _ACTIVE.set(check_precision(name, device))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> str:
    """The precision of the innermost :func:`using` block, ``"fp32"`` outside any."""
    return _ACTIVE.get()


def current(device) -> "Amp":
    """An :class:`Amp` for ``device`` in the active precision (one per engine run: it holds the
    fp16 gradient scaler's state)."""
    return Amp(active(), device)


class Amp:
    """What an engine needs to run in one precision on one device.

    Attributes:
        name: ``fp32``, ``bf16`` or ``fp16``.
        dtype: the torch dtype of the network passes.
    """

    def __init__(self, name: str, device):
        self.device_type = torch.device(device).type
        self.name = check_precision(name, device)
        self.dtype = DTYPES[self.name]
        self.scaler = torch.amp.GradScaler(self.device_type) if self.name == "fp16" else None

    @property
    def enabled(self) -> bool:
        """Whether passes run below fp32."""
        return self.name != "fp32"

    def autocast(self):
        """Context for network forwards: ``torch.autocast`` in the lower precision, or nothing."""
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def fp32(self, value):
        """``value`` (a tensor, or a dict / list / tuple of them) with floating tensors in fp32,
        for losses and statistics; the same objects under fp32."""
        if not self.enabled:
            return value
        if isinstance(value, torch.Tensor):
            return value.float() if value.is_floating_point() else value
        if isinstance(value, dict):
            return {key: self.fp32(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return type(value)(self.fp32(item) for item in value)
        return value

    def wrap(self, module):
        """``module`` (a callable) made to run under :meth:`autocast` and return fp32 outputs;
        ``module`` itself under fp32."""
        if not self.enabled:
            return module

        def run(*args, **kwargs):
            with self.autocast():
                return self.fp32(module(*args, **kwargs))

        return run

    def backward(self, loss: torch.Tensor) -> None:
        """``loss.backward()``, with the loss scaled under fp16."""
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        """``optimizer.step()``; under fp16 the scaler unscales the gradients, skips a step with
        non-finite ones and adapts its scale."""
        if self.scaler is None:
            optimizer.step()
            return
        self.scaler.step(optimizer)
        self.scaler.update()
