"""Shared fixtures: tiny configs on the 2-block, 64-wide test ViT with 32/16 px crops."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dino.config.compose import compose
from dino.config.schema import DinoConfig

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")

# The Fashion-MNIST acceptance run, started in the background at collection (see the hooks below).
FM_RUN = pytest.StashKey["BackgroundRun"]()


# vit_test on 64 synthetic images, batch 8: 8 steps per epoch, a fraction of a second each.
TINY_OVERRIDES = [
    "model=vit_test",
    "data=synthetic",
    "data.num_samples=64",
    "data.image_size=32",
    "optim.batch_size=8",
    "optim.epochs=2",
    "train.checkpoint_every_minutes=0",
    "train.device=cpu",
]


def tiny_config(run_dir: Path | str, *overrides: str) -> DinoConfig:
    return compose([*TINY_OVERRIDES, "train.progress=false", f"run.dir={run_dir}", *overrides])


@pytest.fixture
def tiny_cfg(tmp_path):
    return lambda *overrides, run_dir=None: tiny_config(run_dir or tmp_path / "run", *overrides)


@pytest.fixture(autouse=True)
def _few_threads():
    # Two cores in CI: keep intra-op threads predictable so runs are comparable.
    torch.set_num_threads(2)
    yield


def weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def load_final(run_dir: Path) -> dict:
    from dino.io import checkpoint

    latest = checkpoint.load_latest(str(run_dir))
    assert latest is not None, f"no complete checkpoint in {run_dir}"
    return latest.state


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A finished tiny run (16 steps), trained once per test module that asks for it."""
    from dino.run.train import run

    run_dir = tmp_path_factory.mktemp("trained") / "run"
    torch.set_num_threads(2)
    run(tiny_config(run_dir))
    return run_dir


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One real `mlflow server` (SQLite backend, local artifacts) shared by the tests of a session."""
    from tests.mlflow_server import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-server")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """One real S3-compatible server (moto_server behind a killable proxy) with the bucket `dinolab-test`."""
    from tests.s3_server import S3Server

    server = S3Server(tmp_path_factory.mktemp("s3-server")).start()
    server.make_bucket(S3_BUCKET)
    yield server
    server.stop()


S3_BUCKET = "dinolab-test"


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """This process (and the `dinolab` processes it starts) talks to the test S3 server."""
    for key, value in s3_server.env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return s3_server


@pytest.fixture(params=["local", "s3"])
def store_root(request, tmp_path):
    """The same test on a local folder and under s3:// on the real S3-compatible server."""
    import uuid

    if request.param == "local":
        return str(tmp_path / "store")
    request.getfixturevalue("s3_env")
    return f"s3://{S3_BUCKET}/{request.node.name.split('[')[0]}-{uuid.uuid4().hex[:8]}"


def _needs_fm_run(item: pytest.Item) -> bool:
    return "fashion_mnist_run" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(config, items):
    """The tests on the Fashion-MNIST acceptance run go last, so that the rest of the session runs
    while the run trains in the background (tests/integration/fashion_mnist_run.py)."""
    needs_run = [item for item in items if _needs_fm_run(item)]
    items[:] = [item for item in items if item not in needs_run] + needs_run


def pytest_collection_finish(session):
    """Start the Fashion-MNIST run now if any selected test needs it (after -k/-m deselection)."""
    import tempfile

    from tests.integration.fashion_mnist_run import BackgroundRun

    if (
        any(_needs_fm_run(item) for item in session.items)
        and FASHION_MNIST_ROOT.exists()
        and not session.config.option.collectonly
    ):
        folder = Path(tempfile.mkdtemp(prefix="dinolab-fm-"))
        session.config.stash[FM_RUN] = BackgroundRun(folder / "fm").start()


def pytest_sessionfinish(session, exitstatus):
    """Stop the run if the session ended before it did; keep its folder only if something failed."""
    import shutil

    run = session.config.stash.get(FM_RUN, None)
    if run is not None:
        run.stop()
        if exitstatus == 0:
            shutil.rmtree(run.run_dir.parent, ignore_errors=True)
