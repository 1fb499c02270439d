"""The code's identity (dino/config/identity.py:code_hash): the same bytes give the same hash wherever
the tree lies, one byte changes it, compiled files do not."""

from __future__ import annotations

import shutil
from pathlib import Path

from dino.config.identity import CODE_PACKAGES, code_hash, code_hash_of

REPO = Path(__file__).resolve().parents[2]


def copy_tree(to: Path) -> Path:
    for name in CODE_PACKAGES:
        shutil.copytree(REPO / name, to / name, ignore=shutil.ignore_patterns("__pycache__"))
    return to


def test_a_copied_tree_has_the_hash_of_the_code_this_process_imported(tmp_path):
    copy = copy_tree(tmp_path / "copy")
    # Uncached (`__wrapped__`): this process may have hashed the tree before someone edited it.
    assert code_hash.__wrapped__() == code_hash_of(REPO) == code_hash_of(copy)
    assert len(code_hash()) == 12 and int(code_hash(), 16) >= 0


def test_one_byte_changes_the_hash_and_compiled_or_hidden_files_do_not(tmp_path):
    copy = copy_tree(tmp_path / "copy")
    before = code_hash_of(copy)
    cache = copy / "dino" / "__pycache__"
    cache.mkdir(exist_ok=True)
    (cache / "extra.cpython-311.pyc").write_bytes(b"\0compiled")
    (copy / "launcher" / "stale.pyc").write_bytes(b"\0compiled")
    (copy / "dino" / ".#loop.py").symlink_to("nowhere")  # an editor's lock file: a dangling link
    assert code_hash_of(copy) == before

    module = copy / "dino" / "run" / "state.py"
    module.write_bytes(module.read_bytes() + b"#")
    assert code_hash_of(copy) != before
    module.write_bytes(module.read_bytes()[:-1])
    assert code_hash_of(copy) == before

    (copy / "dino" / "conf" / "model" / "vit_test.yaml").write_text("changed: 1\n")  # package data counts
    assert code_hash_of(copy) != before


def test_a_moved_file_changes_the_hash(tmp_path):
    copy = copy_tree(tmp_path / "copy")
    before = code_hash_of(copy)
    (copy / "reports" / "stats.py").rename(copy / "reports" / "stats2.py")
    assert code_hash_of(copy) != before
