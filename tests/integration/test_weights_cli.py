"""Weights in and out through the real commands: `dinolab eval knn weights=` on the reference's own
backbone file and Fashion-MNIST, and `dinolab export` of a tiny run read back by plain timm and by our
loader."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from dino.config.schema import from_dict
from dino.eval.evaluated import teacher_backbone
from dino.io import checkpoint, weights
from tests.integration.cli import TINY, dinolab, results
from tests.unit.test_weights import FIXTURES

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


@pytest.mark.usefixtures("fashion_mnist")
def test_eval_knn_of_the_reference_backbone_file_on_fashion_mnist(tmp_path):
    path = FIXTURES / "backbone_pretrain.pth"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["eval", "knn", f"weights={path}", "data=fashion_mnist", "knn.max_train=2000", "knn.max_test=500",
            "workers=0", f"run.dir={tmp_path / 'w'}", f"tracking_uri={uri}"]  # fmt: skip
    proc = dinolab(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sha = weights.read(str(path)).sha256
    assert f"k-NN (weights-{sha[:12]})" in proc.stdout
    assert f"weights {path} (backbone state dict, teacher, sha256 {sha[:12]})" in proc.stdout
    (record,) = results(tmp_path / "w", "knn").values()
    assert record["weights_sha256"] == sha and record["weights_format"] == "backbone state dict"
    assert (record["num_train"], record["num_test"], record["image_size"]) == (2000, 500, 32)
    assert 20 < record["top1"]["20"] <= 100  # a trained backbone's features, far above chance (10 %)

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (tracked,) = client.search_runs([client.get_experiment_by_name("weights").experiment_id])
    assert tracked.info.status == "FINISHED" and tracked.data.tags["dinolab.kind"] == "weights"
    assert tracked.data.tags["dinolab.weights_sha256"] == sha and tracked.data.params["weights"] == str(path)
    assert tracked.data.metrics["knn_top1_k20"] == record["top1"]["20"]

    again = dinolab(*args)  # the cached features are found by the file's hash
    assert again.returncode == 0 and "shards to compute" not in again.stderr, again.stderr[-2000:]
    assert len(client.search_runs([tracked.info.experiment_id])) == 1  # the same MLflow run again

    no_data = dinolab("eval", "knn", f"weights={path}")
    assert no_data.returncode == 2 and no_data.stderr.strip().splitlines()[-1].startswith(
        "dinolab eval: error: weights= needs the evaluation data: data=fashion_mnist"
    )
    wrong = dinolab("eval", "knn", f"weights={path}", "data=fashion_mnist", "model=vit_small")
    assert wrong.returncode == 2 and "Traceback" not in wrong.stderr
    assert "does not fit model=vit_small model.patch_size=8" in wrong.stderr


def test_export_loads_into_plain_timm_and_back_into_dinolab(tmp_path):
    run_dir = tmp_path / "run"
    proc = dinolab("train", *TINY, "model.patch_size=8", "train.workers=0", f"run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = dinolab("eval", "knn", f"run.dir={run_dir}", "workers=0")
    assert proc.returncode == 0, proc.stderr[-3000:]

    proc = dinolab("export", str(run_dir), "-o", str(tmp_path / "tiny"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "tiny.safetensors"
    sidecar = json.loads((tmp_path / "tiny.safetensors.json").read_text())
    assert sidecar["step"] == 16 and sidecar["architecture"]["model"] == "vit_test"
    assert sidecar["results"]["knn"][0]["num_test"] == 64  # the run's own k-NN of that step
    assert f'pretrained_cfg_overlay={{"file": "{out}"}}' in proc.stdout

    latest = checkpoint.load_latest(str(run_dir))
    ours = teacher_backbone(latest.state, from_dict(latest.state["config"]))
    arch = sidecar["architecture"]
    plain = timm.create_model(
        arch["timm_name"], pretrained=True, pretrained_cfg_overlay={"file": str(out)}, **arch["timm_kwargs"]
    ).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(plain(x), ours(x))

    proc = dinolab("export", str(run_dir), "-o", str(tmp_path / "tiny"), "--format", "reference")
    assert proc.returncode == 0, proc.stderr[-3000:]
    back = weights.backbone_for(weights.read(str(tmp_path / "tiny.pth")))
    with torch.no_grad():
        assert torch.equal(back(x), ours(x))

    before = out.read_bytes()
    again = dinolab("export", str(run_dir), "-o", str(out))
    assert again.returncode == 2 and again.stderr.strip().endswith(
        f"{out} exists; nothing was written (dinolab never overwrites an export)"
    )
    assert out.read_bytes() == before


def test_export_names_a_sweep_run_by_its_name(tmp_path):
    from launcher.grid import expand
    from launcher.sweep_file import load_sweep

    sweep = tmp_path / "s.yaml"
    sweep.write_text(
        f"name: s\nroot: {tmp_path / 'runs'}\nbase: [{', '.join(TINY)}]\ngrid: {{teacher.momentum: [0.996, 0.9]}}\n"
    )
    runs = {r.name: r.run_dir for r in expand(load_sweep(sweep))}
    proc = dinolab("export", str(sweep), "-o", str(tmp_path / "x"))
    assert proc.returncode == 2 and "name one run with --run (the sweep has 2:" in proc.stderr
    name = sorted(runs)[0]
    proc = dinolab("export", str(sweep), "--run", name, "-o", str(tmp_path / "x"))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().endswith(
        f"no complete checkpoint in {runs[name]}/checkpoints: nothing to export"
    )
