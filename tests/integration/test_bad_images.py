"""Unreadable images in a real image folder (issue 20, item 5), met by `dinolab train`, `eval` and
`data pack`: a JPEG cut short and a text file named .jpg are skipped (replaced by the next readable
image, warned by name, counted as `skipped_images`) or, with `data.on_bad_image=fail`, stop the command
with one line naming the file; CMYK, greyscale and PNG-bytes-in-a-.JPEG files are not bad at all.
Loader workers are real processes here (train.workers=2), so the count crosses process boundaries."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from dino.data.bad_images import UnreadableImageError
from dino.data.datasets import ImageFolder, SyntheticDataset
from dino.io import checkpoint
from tests.integration.cli import TINY, dinolab

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def write_folder(root: Path, per_class: int = 24, size: int = 40) -> dict[str, Path]:
    """<root>/<class>/<image>.jpg of two synthetic classes, with the files a real folder has:
    {"truncated", "not_an_image"} (bad) and {"cmyk", "grey", "png_as_jpeg"} (odd but readable)."""
    images = SyntheticDataset(2 * per_class, size, 2, seed=5)
    for i in range(len(images)):
        image, label = images[i]
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"img{i:03d}.jpg", quality=90)
    special = {
        "truncated": root / "class0" / "img002.jpg",
        "not_an_image": root / "class1" / "img007.jpg",
        "cmyk": root / "class0" / "img010.jpg",
        "grey": root / "class1" / "img011.jpg",
        "png_as_jpeg": root / "class0" / "img012.JPEG",
    }
    data = special["truncated"].read_bytes()
    special["truncated"].write_bytes(data[: len(data) // 2])  # a copy cut short
    special["not_an_image"].write_text("<html>403 Forbidden</html>")  # a failed download
    Image.open(special["cmyk"]).convert("CMYK").save(special["cmyk"], quality=90)
    Image.open(special["grey"]).convert("L").save(special["grey"], quality=90)
    buffer = io.BytesIO()
    Image.open(root / "class0" / "img012.jpg").save(buffer, format="PNG")
    (root / "class0" / "img012.jpg").unlink()
    special["png_as_jpeg"].write_bytes(buffer.getvalue())
    return special


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad_images") / "images"
    return root, write_folder(root)


def test_odd_files_decode_and_bad_ones_are_replaced_by_the_next_image(folder, caplog):
    root, special = folder
    dataset = ImageFolder(str(root))
    index = {path: i for i, (path, _) in enumerate(dataset.samples)}
    for kind in ("cmyk", "grey", "png_as_jpeg"):
        image, _ = dataset[index[str(special[kind])]]
        assert image.shape == (3, 40, 40) and image.dtype == torch.uint8, kind
    with caplog.at_level("WARNING", logger="dino.data"):
        for kind in ("truncated", "not_an_image"):
            i = index[str(special[kind])]
            assert torch.equal(dataset[i][0], dataset[i + 1][0])  # the next image, every time
    assert dataset.bad_images.count == 2
    truncated, not_an_image = (str(special[k]) for k in ("truncated", "not_an_image"))
    after = {
        path: dataset.samples[i + 1][0] for path, i in index.items() if path in (truncated, not_an_image)
    }
    assert f"unreadable image {truncated} skipped (OSError: " in caplog.text  # PIL's words vary by version
    assert (
        f"; the next image, {after[truncated]}, is used in its place (data.on_bad_image=skip)" in caplog.text
    )
    assert (
        f"unreadable image {not_an_image} skipped (UnidentifiedImageError: not an image format PIL can "
        f"read); the next image, {after[not_an_image]}, is used in its place" in caplog.text
    )

    strict = ImageFolder(str(root), on_bad_image="fail")
    with pytest.raises(UnreadableImageError, match=f"cannot decode image {special['truncated']} "):
        strict[index[str(special["truncated"])]]


def _train(root: Path, run_dir: Path, *extra: str):
    return dinolab(
        "train", *TINY, "data=imagefolder", f"data.root={root}", "train.workers=2", "train.progress=false",
        "train.log_every=2", "optim.epochs=3", f"run.dir={run_dir}", *extra, timeout=600,
    )  # fmt: skip


def test_training_skips_counts_and_names_bad_images_and_resumes_exactly(folder, tmp_path):
    root, special = folder
    whole = _train(root, tmp_path / "whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    for kind in ("truncated", "not_an_image"):
        assert f"unreadable image {special[kind]} skipped" in whole.stderr
    rows = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    # 48 images, batch 8, 3 epochs: each bad file is met once an epoch by one of the two worker processes.
    assert rows[-1]["skipped_images"] == 6
    assert "6 unreadable image(s) were skipped" in whole.stderr
    assert (
        f"unreadable image {special['truncated']} skipped" in (tmp_path / "whole" / "train.log").read_text()
    )

    # Stopped after 7 of 18 steps and resumed: the same batches, so bitwise the same weights.
    first = _train(root, tmp_path / "resumed", "train.max_steps=7", "train.checkpoint_every_steps=7")
    assert first.returncode == 0, first.stderr[-3000:]
    second = _train(root, tmp_path / "resumed")
    assert second.returncode == 0, second.stderr[-3000:]
    a = checkpoint.load_latest(str(tmp_path / "whole"))
    b = checkpoint.load_latest(str(tmp_path / "resumed"))
    assert a.step == b.step == 18
    for key, value in a.state["teacher"].items():
        assert torch.equal(value, b.state["teacher"][key]), key


def test_fail_names_the_file_in_one_line_for_train_eval_and_pack(folder, tmp_path):
    root, special = folder
    proc = _train(root, tmp_path / "strict", "data.on_bad_image=fail")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dinolab train: error: cannot decode image ") and "data.on_bad_image=skip" in last
    assert str(special["truncated"]) in last or str(special["not_an_image"]) in last, last

    # The same run continues with skip: on_bad_image is not part of the run's identity.
    proc = _train(root, tmp_path / "strict", "train.max_steps=4")
    assert proc.returncode == 0, proc.stderr[-3000:]

    for on_bad, expect in (("fail", 2), ("skip", 0)):
        proc = dinolab(
            "eval", "knn", f"run.dir={tmp_path / 'strict'}", "workers=0", f"data.val_root={root}",
            f"data.on_bad_image={on_bad}",
        )  # fmt: skip
        assert proc.returncode == expect, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        if on_bad == "fail":
            last = proc.stderr.strip().splitlines()[-1]
            assert last.startswith(f"dinolab eval: error: cannot decode image {special['truncated']} "), last

    proc = dinolab("data", "pack", str(root), str(tmp_path / "strict-shards"), "--on-bad-image", "fail")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("dinolab data: error: cannot decode image ") and "--on-bad-image=skip" in last, (
        last
    )
    proc = dinolab("data", "pack", str(root), str(tmp_path / "shards"), "--shard-size", "16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "packed 46 images of 2 classes" in proc.stdout and "left out 2 unreadable image(s)" in proc.stdout
    index = json.loads((tmp_path / "shards" / "index.json").read_text())
    assert sorted(index["skipped"]) == sorted(str(special[k]) for k in ("truncated", "not_an_image"))
    assert sum(s["count"] for s in index["shards"]) == index["num_samples"] == 46


def test_a_bad_image_inside_a_shard_is_replaced_by_the_next_one_in_pack_order(folder, tmp_path, caplog):
    """Shards written by another tool (or before `pack` checked images) can hold a bad image too."""
    import webdataset as wds

    from dino.data import shards

    root, special = folder
    members = [special["truncated"], root / "class0" / "img004.jpg", root / "class1" / "img005.jpg"]
    with wds.TarWriter(str(tmp_path / shards.shard_name(0)), encoder=False, mtime=0) as writer:
        for key, path in enumerate(members):
            writer.write({"__key__": f"{key:09d}", "jpg": path.read_bytes(), "cls": b"0"})
    index = {"format": shards.FORMAT, "num_samples": 3, "seed": 0, "source": "", "classes": ["0"],
             "shards": [{"name": shards.shard_name(0), "count": 3, "bytes": 0}]}  # fmt: skip
    (tmp_path / shards.INDEX).write_text(json.dumps(index))
    dataset = shards.ShardedDataset(str(tmp_path))
    with caplog.at_level("WARNING", logger="dino.data"):
        assert torch.equal(dataset[0][0], dataset[1][0])
    assert dataset.bad_images.count == 1
    assert (
        f"unreadable image {tmp_path / shards.shard_name(0)}:000000000.jpg skipped (OSError: " in caplog.text
    )
    with pytest.raises(UnreadableImageError, match="000000000.jpg"):
        shards.ShardedDataset(str(tmp_path), on_bad_image="fail")[0]
