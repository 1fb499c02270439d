"""k-NN: chunked voting equals the direct computation; feature shards resume; provenance; errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from dino.config.schema import ConfigError
from dino.eval import encoders
from dino.eval import linear as linear_module
from dino.eval.config import compose_eval
from dino.eval.evaluated import resolve
from dino.eval.knn import evaluate_knn, knn_accuracy, knn_votes
from dino.eval.linear import run_linear
from dino.io import checkpoint
from dino.io.checkpoint import CheckpointError

KS = [1, 10, 20, 100, 200]


def direct_knn(bank, bank_labels, queries, k, temperature, num_classes):
    """The reference's formulation: the whole similarity matrix, top-k, one-hot votes weighted by
    exp(sim / T) summed over neighbours."""
    sim = queries @ bank.T
    dist, idx = sim.topk(min(k, len(bank)), dim=1, largest=True, sorted=True)
    one_hot = F.one_hot(bank_labels[idx], num_classes).float()
    return (one_hot * (dist / temperature).exp()[..., None]).sum(1)


@pytest.fixture(scope="module")
def random_features():
    gen = torch.Generator().manual_seed(0)
    bank = F.normalize(torch.randn(103, 16, generator=gen), dim=1)
    queries = F.normalize(torch.randn(37, 16, generator=gen), dim=1)
    bank_labels = torch.randint(0, 7, (103,), generator=gen)
    query_labels = torch.randint(0, 7, (37,), generator=gen)
    return bank, bank_labels, queries, query_labels


# (query_chunk, bank_chunk): uneven splits of queries (37) and bank (103), chunks smaller than k,
# a bank chunk of 1, and everything in one block.
CHUNKS = [(5, 7), (1, 1), (36, 102), (13, 50), (37, 103), (1000, 1000)]


@pytest.mark.parametrize("query_chunk, bank_chunk", CHUNKS)
def test_chunked_votes_match_the_direct_computation(random_features, query_chunk, bank_chunk):
    """Same neighbours, same predictions, same votes up to float rounding.

    The similarity of one (query, bank) pair is a dot product whose last bits depend on the shape of
    the matrix product that computes it (BLAS blocking), so the votes are compared to 1e-5 and the
    classifier's outputs (neighbours, predicted classes, accuracy) exactly.
    """
    bank, bank_labels, queries, _ = random_features
    votes = knn_votes(bank, bank_labels, queries, KS, 0.07, 7, query_chunk, bank_chunk)
    for k in KS:
        expected = direct_knn(bank, bank_labels, queries, k, 0.07, 7)
        torch.testing.assert_close(votes[k], expected, rtol=1e-5, atol=0)
        assert torch.equal(votes[k] > 0, expected > 0), k  # the same neighbours' labels voted
        assert torch.equal(votes[k].argmax(1), expected.argmax(1)), k


@pytest.mark.parametrize("query_chunk, bank_chunk", CHUNKS)
def test_chunked_accuracy_is_exactly_the_direct_one(random_features, query_chunk, bank_chunk):
    bank, bank_labels, queries, query_labels = random_features
    # Features that are not normalised yet: knn_accuracy normalises them itself.
    top1, top5 = knn_accuracy(
        3 * bank, bank_labels, 2 * queries, query_labels, KS, 0.07, 7, query_chunk, bank_chunk
    )
    for k in KS:
        expected = direct_knn(bank, bank_labels, queries, k, 0.07, 7)
        hit = expected.topk(5).indices == query_labels[:, None]
        assert top1[k] == 100.0 * int(hit[:, 0].sum()) / 37
        assert top5[k] == 100.0 * int(hit.sum()) / 37


def test_k_beyond_the_bank_is_clipped_and_temperature_matters(random_features):
    bank, bank_labels, queries, _ = random_features
    votes = knn_votes(bank, bank_labels, queries, [103, 500], 0.07, 7)
    assert torch.equal(votes[103], votes[500])
    hot = knn_votes(bank, bank_labels, queries, [20], 0.07, 7)[20]
    cold = knn_votes(bank, bank_labels, queries, [20], 10.0, 7)[20]
    assert not torch.allclose(hot / hot.sum(1, keepdim=True), cold / cold.sum(1, keepdim=True))


def test_a_perfectly_separable_toy_problem_is_classified_perfectly():
    centers = F.normalize(torch.eye(4, 8), dim=1)
    gen = torch.Generator().manual_seed(1)
    bank_labels = torch.arange(40) % 4
    bank = centers[bank_labels] + 0.01 * torch.randn(40, 8, generator=gen)
    query_labels = torch.arange(12) % 4
    queries = centers[query_labels] + 0.01 * torch.randn(12, 8, generator=gen)
    top1, top5 = knn_accuracy(bank, bank_labels, queries, query_labels, [5], 0.07, 4, 5, 7)
    assert top1 == {5: 100.0} and top5 == {5: 100.0}


# --------------------------------------------------------------------------------------------------
# On a trained tiny run: shards, resume, provenance, baselines
# --------------------------------------------------------------------------------------------------


def knn_args(run_dir, *extra):
    return [f"run.dir={run_dir}", "workers=0", "shard_size=16", "batch_size=8", *extra]


CLS_FEATURES = encoders.cls_features


class Killed(Exception):
    pass


class Counter:
    """Wraps cls_features: counts forward passes and can fail (a 'kill') after a number of them."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls, self.fail_after = 0, fail_after

    def __call__(self, backbone, images):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise Killed
        self.calls += 1
        return CLS_FEATURES(backbone, images)


@pytest.mark.slow
def test_killed_knn_computes_only_the_missing_shards_and_gives_the_same_accuracy(
    trained_run, tmp_path, monkeypatch
):
    # 64 train + 64 test images, 16 per shard, 8 per forward pass: 4 + 4 shards, 2 passes per shard.
    reference_dir = tmp_path / "reference"
    shutil.copytree(trained_run, reference_dir)
    run_dir = tmp_path / "killed"
    shutil.copytree(trained_run, run_dir)

    counter = Counter()
    monkeypatch.setattr(encoders, "cls_features", counter)
    reference = evaluate_knn(*resolve(knn_args(reference_dir)))
    assert counter.calls == 16

    killer = Counter(fail_after=5)  # dies in the 3rd train shard, after 2 complete ones
    monkeypatch.setattr(encoders, "cls_features", killer)
    with pytest.raises(Killed):
        evaluate_knn(*resolve(knn_args(run_dir)))
    shards = sorted((run_dir / "eval" / "features" / "000000016").rglob("shard_*"))
    assert [p.name for p in shards] == ["shard_00000.pt", "shard_00001.pt"]
    assert not list((run_dir / "eval" / "features").rglob("*.tmp-*"))

    again = Counter()
    monkeypatch.setattr(encoders, "cls_features", again)
    result = evaluate_knn(*resolve(knn_args(run_dir)))
    assert again.calls == 2 * 2 + 4 * 2  # the 2 missing train shards and the 4 test shards
    assert result.record["feature_shards"] == {
        "train": {"shards": 4, "computed_by_rank": [[2, 3]]},  # 0 and 1 read from the cache
        "test": {"shards": 4, "computed_by_rank": [[0, 1, 2, 3]]},
    }
    assert result.top1 == reference.top1 and result.top5 == reference.top5

    # A subset has shards of its own (40 evenly spaced train images: 3 shards, 20 test: 2), read
    # back on the next call; its result lies beside the whole split's, which it leaves alone.
    whole = Path(result.path).read_bytes()
    subset = Counter()
    monkeypatch.setattr(encoders, "cls_features", subset)
    first = evaluate_knn(*resolve(knn_args(run_dir, "knn.max_train=40", "knn.max_test=20")))
    assert subset.calls == (2 + 2 + 1) + (2 + 1)
    assert (first.record["num_train"], first.record["num_test"]) == (40, 20)
    assert first.path.endswith("-40x20.json") and Path(result.path).read_bytes() == whole
    cached = Counter()
    monkeypatch.setattr(encoders, "cls_features", cached)
    again = evaluate_knn(*resolve(knn_args(run_dir, "knn.max_train=40", "knn.max_test=20")))
    assert cached.calls == 0 and again.top1 == first.top1


def test_result_records_checkpoint_step_and_config_hash(trained_run):
    result = evaluate_knn(*resolve(knn_args(trained_run, "knn.k=[5,20]", "knn.max_test=30")))
    saved = json.loads(Path(result.path).read_text())
    marker = checkpoint.load_latest(str(trained_run)).marker
    assert saved["checkpoint"] == str(trained_run / "checkpoints" / "000000016")
    assert saved["step"] == 16 and saved["config_hash"] == marker["config_hash"]
    assert saved["num_train"] == 64 and saved["num_test"] == 30 and saved["k"] == [5, 20]
    assert set(saved["top1"]) == {"5", "20"} and result.path.startswith(str(trained_run / "eval" / "knn"))
    assert all(0 <= v <= 100 for v in saved["top1"].values())


def test_a_bank_missing_classes_is_reported(trained_run, caplog):
    """knn.max_train=3 on 10 classes: a bank too small for every class; the result says so and the
    log warns."""
    result = evaluate_knn(*resolve(knn_args(trained_run, "knn.max_train=3", "knn.max_test=20", "knn.k=[2]")))
    assert (result.record["bank_classes"], result.record["num_classes"]) == (3, 10)
    assert (
        "the k-NN bank holds 3 of the 10 classes (knn.max_train=3 evenly spaced images of 64)" in caplog.text
    )
    full = evaluate_knn(*resolve(knn_args(trained_run, "knn.max_test=20", "knn.k=[2]")))
    assert full.record["bank_classes"] == 10


def test_a_subset_of_a_folder_sorted_by_class_holds_every_class(trained_run, tmp_path, monkeypatch):
    """knn.max_train on an image folder (listed class by class, as ImageNet is): evenly spaced
    images, so the bank has every class; the first 8 of 4 x 6 images would hold 2."""
    from PIL import Image

    for split in ("train", "val"):
        for c in range(4):
            folder = tmp_path / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(6):
                Image.new("RGB", (40, 40), (60 * c, 40 * i, 100)).save(folder / f"{i}.png")
    data = ["data=imagefolder", f"data.root={tmp_path / 'train'}", f"data.val_root={tmp_path / 'val'}"]
    result = evaluate_knn(
        *resolve(knn_args(trained_run, *data, "knn.max_train=8", "knn.max_test=12", "knn.k=[1]"))
    )
    assert (result.record["num_train"], result.record["num_test"]) == (8, 12)
    assert (result.record["bank_classes"], result.record["num_classes"]) == (4, 4)
    probe_images = []
    views = linear_module.MultiCropDataset
    monkeypatch.setattr(
        linear_module, "MultiCropDataset", lambda base, *a: probe_images.append(base) or views(base, *a)
    )
    linear = run_linear(
        [*knn_args(trained_run, *data), "linear.epochs=1", "linear.max_train=8", "linear.max_test=12",
         "linear.n_last_blocks=1", "linear.batch_size=4"]
    )  # fmt: skip
    assert (linear.record["num_train"], linear.record["num_test"]) == (8, 12)
    assert sorted({label for _, label in probe_images[0]}) == [0, 1, 2, 3]


def test_baselines_use_the_same_code_and_their_own_cache(trained_run):
    trained = evaluate_knn(*resolve(knn_args(trained_run)))
    random_cfg, random_target = resolve(knn_args(trained_run, "baseline=random", "baseline_seed=3"))
    assert random_target.key == "random-seed3" and random_target.provenance["step"] is None
    random_result = evaluate_knn(random_cfg, random_target)
    pixels = evaluate_knn(*resolve(knn_args(trained_run, "baseline=pixels")))
    # The synthetic classes are stripe orientations: raw pixels separate them well.
    assert pixels.top1[10] > 50
    folders = {r.record["features"]["train"] for r in (trained, random_result, pixels)}
    assert len(folders) == 3
    # Pixel features are the flattened eval images: 3 x 32 x 32 values.
    shard = torch.load(sorted((trained_run / "eval" / "features" / "pixels").rglob("shard_*"))[0])
    assert shard["features"].shape == (16, 3 * 32 * 32)


def test_the_random_baseline_is_the_runs_own_initial_backbone(tiny_cfg, tmp_path):
    """Without baseline_seed the random baseline uses the run's train.seed: the very backbone the run
    started from, so "pretraining vs random init" compares a run with its own starting point."""
    from dino.run.build import build_state
    from dino.run.train import run

    run(tiny_cfg("train.seed=2", "train.max_steps=1", run_dir=tmp_path / "seed2"))
    _, target = resolve(knn_args(tmp_path / "seed2", "baseline=random"))
    run_cfg = target.run_cfg
    assert run_cfg.train.seed == 2 and target.key == "random-seed2"
    initial = build_state(run_cfg, torch.device("cpu")).student.backbone.state_dict()
    for key, value in target.backbone.state_dict().items():
        assert torch.equal(value, initial[key]), key


def test_an_incomplete_checkpoint_is_refused(trained_run, tmp_path):
    run_dir = tmp_path / "partial"
    shutil.copytree(trained_run, run_dir)
    ckpt = run_dir / "checkpoints" / "000000016"
    (ckpt / checkpoint.MARKER_FILE).unlink()
    with pytest.raises(CheckpointError, match="partial"):
        resolve([f"checkpoint={ckpt}"])
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve([f"run.dir={run_dir}"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("knn.kk=[5]", "unknown config key 'knn.kk'; did you mean knn.k?"),
        ("linear.epoch=3", "did you mean linear.epochs?"),
        ("baseline=randm", "baseline='randm' is not allowed (did you mean random?)"),
        ("knn.k=[0]", "knn.k=[0] must be a non-empty list of positive integers"),
        (
            "knn.temperature=abc",
            "knn.temperature='abc' is not a number; expected float, e.g. knn.temperature=0.07",
        ),
        (
            "data=fashion_mnst",
            "data='fashion_mnst' is not allowed (did you mean fashion_mnist?); choose one of: ",
        ),
        ("data=imagefolder", "data.val_root"),
    ],
)
def test_config_errors_name_the_key(trained_run, override, message):
    with pytest.raises(ConfigError, match=None) as err:
        resolve([f"run.dir={trained_run}", override, "data.root=/x"] if "imagefolder" in override
                else [f"run.dir={trained_run}", override])  # fmt: skip
    assert message in str(err.value)


def test_data_defaults_to_the_runs_and_a_preset_replaces_it(trained_run):
    cfg, _ = resolve([f"run.dir={trained_run}"])
    assert cfg.data.name == "synthetic" and cfg.data.num_samples == 64 and cfg.data.image_size == 32
    cfg = compose_eval(
        [f"run.dir={trained_run}", "data=fashion_mnist", "data.root=/elsewhere"], {"name": "synthetic"}
    )
    assert cfg.data.name == "fashion_mnist" and cfg.data.root == "/elsewhere"
