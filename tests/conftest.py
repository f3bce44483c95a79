"""Shared fixtures: the bundled digits set (no fetch), an isolated $DDKIT_DATA, the golden cases."""

import pytest
import torch

from ddkit.data import load_dataset
from golden_case import load_case


@pytest.fixture(scope="session")
def digits():
    """scikit-learn's 8x8 digits: 1442 train / 355 test images, 10 classes."""
    return load_dataset("digits")


@pytest.fixture
def isolated_data(tmp_path, monkeypatch):
    """A private $DDKIT_DATA so caches written by a test never touch the user's."""
    monkeypatch.setenv("DDKIT_DATA", str(tmp_path / "ddkit-data"))
    return tmp_path / "ddkit-data"


@pytest.fixture
def tiny_set():
    """A 3-class, 2-per-class DistilledSet of 1x8x8 images with a known pattern."""
    from ddkit.store import DistilledSet

    images = torch.linspace(0, 1, 6 * 64).reshape(6, 1, 8, 8)
    return DistilledSet(images=images, labels=torch.tensor([0, 0, 1, 1, 2, 2]), class_names=["a", "b", "c"],
                        dataset="digits", mean=(0.5,), std=(0.25,), method="test", meta={"config": {"x": 1}})


def compiler_missing() -> bool:
    """True where torch.compile cannot build CPU kernels here (no C++ compiler): its tests skip."""
    from ddkit.errors import DDKitError
    from ddkit.models.training import check_compile_available

    try:
        check_compile_available("cpu")
    except DDKitError:
        return True
    return False


@pytest.fixture
def golden():
    """``golden(name)`` -> the reference case ``tests/golden/<name>.safetensors`` (see golden_case.py)."""
    return load_case
