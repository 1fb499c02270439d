"""The import rules of the layers (docs/architecture.md), checked on the code itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The DINO method: tensors in, tensors out. No files, no tracking, no configuration machinery.
METHOD = ["dino.method.loss", "dino.method.heads", "dino.method.schedules", "dino.method.step", "dino.method.augment", "dino.method.batch_augment",
          "dino.method.models", "dino.method.collapse", "dino.method.rng"]  # fmt: skip
EDGES = ["hydra", "omegaconf", "mlflow", "fsspec", "s3fs", "submitit", "dino.io.storage", "dino.io.tracking"]


def _imported(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (function-level included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _loaded_after(imports: list[str], watched: list[str]) -> list[str]:
    """The watched modules a fresh interpreter holds after importing `imports`."""
    code = f"import sys\nfor m in {imports!r}: __import__(m)\nprint(' '.join(m for m in {watched!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, check=True)
    return out.stdout.split()


@pytest.mark.parametrize(
    "path", sorted((REPO / "dino").rglob("*.py")), ids=lambda p: str(p.relative_to(REPO))
)
def test_the_library_imports_nothing_of_the_launcher_or_the_reports(path):
    bad = sorted(m for m in _imported(path) if m.split(".")[0] in ("launcher", "reports"))
    assert not bad, (
        f"{path.relative_to(REPO)} imports {bad}: dino/ is used by launcher/ and reports/, not the reverse"
    )


@pytest.mark.parametrize(
    "path", sorted((REPO / "dino" / "method").glob("*.py")), ids=lambda p: str(p.relative_to(REPO))
)
def test_the_method_imports_only_the_method_and_the_plain_schema(path):
    """dino/method/ is the DINO math: nothing of the run, data, storage, tracking, tools or evaluation."""
    ours = {m for m in _imported(path) if m.split(".")[0] == "dino"}
    bad = sorted(m for m in ours if not (m.startswith("dino.method") or m == "dino.config.schema"))
    assert not bad, (
        f"{path.relative_to(REPO)} imports {bad}: the method imports only dino.method and the schema"
    )


def test_the_method_loads_no_storage_tracking_or_config_machinery():
    assert _loaded_after(METHOD, EDGES) == []


def test_sweep_status_and_plan_load_neither_torch_nor_hydra_nor_mlflow():
    """What keeps `sweep status` of 1,000 runs under 2 s: torch alone takes 3 s to import here."""
    commands = [
        "launcher.cli",
        "launcher.commands.sweep",
        "launcher.status",
        "launcher.plan",
        "launcher.scheduler",
        "launcher.manifest",
    ]
    assert _loaded_after(commands, ["torch", "hydra", "mlflow", "pandas", "timm"]) == []
