"""The import rules of the layers (docs/architecture.md), checked on the code itself."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# The DINO method: tensors in, tensors out. No files, no tracking, no configuration machinery.
METHOD = ["dino.method.loss", "dino.method.schedules", "dino.method.step", "dino.method.augment", "dino.method.batch_augment",
          "dino.method.models", "dino.method.collapse", "dino.method.rng"]  # fmt: skip
EDGES = ["hydra", "omegaconf", "mlflow", "fsspec", "s3fs", "submitit", "dino.io.storage", "dino.io.tracking"]


def _imported(path: Path) -> set[str]:
    """Every module named by an import statement anywhere in the file (function-level included);
    `from dino import run` names both `dino` and `dino.run`. Relative imports are refused: they
    would hide a module's folder from these rules."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert not node.level, (
                f"{path.relative_to(REPO)}:{node.lineno}: a relative import; write dino.<folder>..."
            )
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
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
    ours -= {"dino", "dino.entry_points"}  # the package's lazy entry points (dino/__init__.py)
    bad = sorted(m for m in ours if not m.startswith(("dino.method", "dino.config.schema")))
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


# The folders of dino/, lowest first: a module imports only from its own folder or one below it.
LAYERS = ["config", "method", "io", "data", "eval", "run", "tools"]


@pytest.mark.parametrize(
    "path", sorted(p for p in (REPO / "dino").rglob("*.py") if p.parent != REPO / "dino"),
    ids=lambda p: str(p.relative_to(REPO)),
)  # fmt: skip
def test_each_folder_imports_only_its_own_and_lower_folders(path):
    """config < method < io < data < eval < run < tools (docs/architecture.md, "Layers")."""
    own = path.relative_to(REPO / "dino").parts[0]
    if own not in LAYERS:  # dino/conf: the Hydra presets' package, which must hold no code
        body = [n for n in ast.parse(path.read_text()).body if not isinstance(n, ast.Expr)]
        assert not body, f"{path.relative_to(REPO)} holds code outside the layers {LAYERS}"
        return
    above = [
        m for m in _imported(path)
        if m.startswith("dino.") and m.split(".")[1] in LAYERS and LAYERS.index(m.split(".")[1]) > LAYERS.index(own)
    ]  # fmt: skip
    assert not above, f"{path.relative_to(REPO)} ({own}) imports {sorted(above)} from a folder above it"


def _calls(path: Path) -> set[str]:
    """The names of the functions and classes the file calls (`x.f(...)` and `f(...)` both give f)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Call):
            func = node.func
            names.add(func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", ""))
    return names


SOURCES = sorted(p for folder in ("dino", "launcher", "reports") for p in (REPO / folder).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_only_mlflow_store_opens_mlflow(path):
    """One module makes MLflow clients and sets the global tracking URI (dino/io/mlflow_store.py): the
    SQLite store's lock and the schema creation live there, and a second opener would bypass them."""
    if path == REPO / "dino" / "io" / "mlflow_store.py":
        return
    text = path.read_text()
    opened = {"MlflowClient", "set_tracking_uri"} & _calls(path)
    if "mlflow.search_runs(" in text:
        opened.add("mlflow.search_runs")
    assert not opened, f"{path.relative_to(REPO)} calls {sorted(opened)}: use dino.io.mlflow_store"


@pytest.mark.parametrize(
    "path", [p for p in SOURCES if "timm" in p.read_text()], ids=lambda p: str(p.relative_to(REPO))
)
def test_timm_is_used_through_its_public_api(path):
    """No `_private` attribute of anything but our own objects (self, cls) in a file that uses timm:
    timm's private methods (`_pos_embed`, `_intermediate_layers`) change between releases."""
    private = sorted(
        f"line {node.lineno}: {node.attr}"
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls", "argparse"))
    )  # fmt: skip
    assert not private, f"{path.relative_to(REPO)} reaches into private attributes: {private}"


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _import_graph() -> dict[str, set[str]]:
    """{module: the modules of ours it imports}, every import statement counted (function-level
    included). `from dino.io import storage` is an edge to `dino.io.storage` alone (the package's
    `__init__` is not what the importer needs); `from dino.io.storage import join` to the module."""
    modules = {_module_name(p): p for p in SOURCES}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module in modules:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
                edges.update(submodules)
                if len(submodules) < len(node.names):  # some names are the module's own
                    edges.add(node.module)
        graph[name] = edges - {name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle_not_even_inside_a_function():
    """A module that imports another lazily (inside a function) to dodge a cycle hides a seam in the
    wrong place; every import statement of dino/, launcher/ and reports/ counts."""
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_finds_a_function_level_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("layer", LAYERS)
def test_each_layer_names_its_entry_points(layer):
    """`from dino.<layer> import <entry point>` works for every name the package's `__init__` lists,
    and each is defined in that layer (the `__init__` is the layer's public face, as submitit's is)."""
    code = (
        f"import dino.{layer} as p\n"
        "assert p.__all__, 'no entry points named'\n"
        "for name in p.__all__:\n"
        "    obj = getattr(p, name)\n"
        f"    assert obj.__module__.startswith('dino.{layer}.'), (name, obj.__module__)\n"
        "print(len(p.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and int(out.stdout) >= 1, out.stderr
