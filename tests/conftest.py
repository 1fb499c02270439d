"""Shared fixtures: tiny configs on the 2-block, 64-wide test ViT with 32/16 px crops."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dino.config.compose import compose
from dino.config.schema import DinoConfig
from tests.parts import FASHION_MNIST_ROOT, fashion_mnist  # noqa: F401 (the fixture, for every test)

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


@pytest.fixture(autouse=True)
def _dino_logs_reach_caplog():
    """A run trained in this process (dino/run/progress.py:setup_logging) stops the `dino` logger
    from propagating; caplog listens on the root logger, so a later test would see no log."""
    import logging

    logging.getLogger("dino").propagate = True
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


def _is_xdist_worker(config) -> bool:
    return hasattr(config, "workerinput")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which reads the xdist_group marks
def pytest_collection_modifyitems(config, items):
    """The tests on the Fashion-MNIST acceptance run go last, so that the rest of the session runs
    while the run trains in the background (tests/integration/fashion_mnist_run.py).

    Under pytest-xdist (`--dist loadgroup`, scripts/test.sh) a test module is one unit of work, so
    that its module-scoped fixtures (a trained run, a fake sweep) are built once, on one worker;
    tests marked `xdist_group` keep their group, and the other SLURM tests share the group `slurm`
    (node `localhost`: they share its CPUs and queue and must not run side by side; the two-node
    tests are the group `slurm-multi`, on nodes n1 and n2)."""
    needs_run = [item for item in items if _needs_fm_run(item)]
    items[:] = [item for item in items if item not in needs_run] + needs_run
    if _is_xdist_worker(config):
        for item in items:
            if item.get_closest_marker("xdist_group") is not None:
                continue
            group = "slurm" if item.get_closest_marker("slurm") else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))


def _start_fm_run(config) -> None:
    from tests.integration.fashion_mnist_run import BackgroundRun

    if FASHION_MNIST_ROOT.exists() and config.stash.get(FM_RUN, None) is None:
        config.stash[FM_RUN] = BackgroundRun(Path(os.environ[FM_FOLDER_ENV]) / "fm").start()


# Under xdist the controller starts the run (once, however many workers) into this folder, which the
# workers inherit through the environment; the worker that gets the acceptance tests waits for it.
FM_FOLDER_ENV = "DINOLAB_TEST_FM_FOLDER"
FM_TEST_FILE = "test_fashion_mnist_acceptance.py"


# The terminal width the session was started with: xdist workers get COLUMNS=80 and LINES=24 in
# their environment, which the `dinolab` subprocesses would take for a terminal's width.
OUTER_COLUMNS_ENV = "DINOLAB_TEST_OUTER_COLUMNS"


def pytest_configure(config):
    import tempfile

    if not _is_xdist_worker(config):
        os.environ[FM_FOLDER_ENV] = tempfile.mkdtemp(prefix="dinolab-fm-")
        os.environ[OUTER_COLUMNS_ENV] = os.environ.get("COLUMNS", "")
    elif os.environ.get(OUTER_COLUMNS_ENV):
        os.environ["COLUMNS"] = os.environ[OUTER_COLUMNS_ENV]
    else:
        os.environ.pop("COLUMNS", None)
        os.environ.pop("LINES", None)


def pytest_xdist_node_collection_finished(node, ids):
    """In the xdist controller: start the run as soon as a worker's collection shows that an
    acceptance test was selected (workers collect the same tests; only the first call counts)."""
    if not node.config.option.collectonly and any(FM_TEST_FILE in nodeid for nodeid in ids):
        _start_fm_run(node.config)


def pytest_collection_finish(session):
    """Without xdist: start the Fashion-MNIST run now if any selected test needs it (after -k/-m)."""
    config = session.config
    if _is_xdist_worker(config) or config.option.collectonly:
        return
    if any(_needs_fm_run(item) for item in session.items):
        _start_fm_run(config)


def pytest_sessionfinish(session, exitstatus):
    """Stop the run if the session ended before it did; keep its folder only if something failed."""
    import shutil

    run = session.config.stash.get(FM_RUN, None)
    if run is not None:
        run.stop()
    folder = os.environ.get(FM_FOLDER_ENV)
    if folder and not _is_xdist_worker(session.config) and (run is None or exitstatus == 0):
        shutil.rmtree(folder, ignore_errors=True)


def pytest_terminal_summary(terminalreporter):
    """One line counting the skips by reason: a skipped real part is visible at the end of a run."""
    from collections import Counter

    reasons = Counter()
    for report in terminalreporter.stats.get("skipped", []):
        longrepr = report.longrepr
        reason = longrepr[2] if isinstance(longrepr, tuple) else str(longrepr)
        reasons[reason.removeprefix("Skipped: ")] += 1
    if reasons:
        counted = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common())
        terminalreporter.write_line(f"skipped {sum(reasons.values())}: {counted}", yellow=True)
