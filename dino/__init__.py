"""dinolab's DINO library: backbones, head, loss, multi-crop, train loop, checkpoints, evaluation."""

from __future__ import annotations

import functools
import importlib
import subprocess
from collections.abc import Callable
from pathlib import Path

__version__ = "0.1.0"


@functools.cache
def code_version() -> str:
    """Package version plus the git commit of the source tree when there is one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{__version__}+{commit}" if commit else __version__


def entry_points(
    package: str, names: dict[str, str]
) -> tuple[list[str], Callable[[str], object], Callable[[], list[str]]]:
    """`__all__`, `__getattr__` and `__dir__` for a layer package whose `__init__` names its entry
    points ({name: the module that defines it}) without importing them up front: `from dino.eval import
    run_knn` loads dino/eval/knn.py on first use, while `from dino.io import storage` (what `sweep
    status` needs) still loads neither torch nor MLflow (tests/unit/test_layers.py)."""

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(names[name]), name)

    def __dir__() -> list[str]:
        return sorted(names)

    return list(names), __getattr__, __dir__
