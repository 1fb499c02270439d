"""The real parts a test needs (SLURM, a tmpfs to fill, Fashion-MNIST, the S3 and MLflow servers):
one rule for what happens when one is missing.

Outside CI the test is skipped, naming the part and how to get it, and the session ends with one line
counting the skips by reason (tests/conftest.py). In CI (`CI=true`, or `DINOLAB_REQUIRE_SLURM=1`
for SLURM as before) it fails instead: a CI run that skipped its real parts would pass while testing
nothing of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("true", "1")


def missing(part: str, how: str, *, required: bool = False) -> None:
    """Skip the current test (outside CI) or fail it (in CI, or `required`): `part` is missing."""
    message = f"{part} missing: {how}"
    if required or in_ci():
        pytest.fail(f"{message} (CI=true: a missing real part fails instead of skipping)", pytrace=False)
    pytest.skip(message)


def need_fashion_mnist() -> Path:
    if not FASHION_MNIST_ROOT.exists():
        missing("Fashion-MNIST", f"no {FASHION_MNIST_ROOT}; apt-get install dataset-fashion-mnist")
    return FASHION_MNIST_ROOT


@pytest.fixture(scope="session")
def fashion_mnist() -> Path:
    """The Debian package's Fashion-MNIST folder (skip or fail without it, see `missing`)."""
    return need_fashion_mnist()
