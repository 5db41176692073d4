"""The documentation site builds without warnings (broken links, pages missing from the nav)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mkdocs_build_strict(tmp_path):
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-q", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env={"NO_MKDOCS_2_WARNING": "1",
                                                                         **__import__("os").environ})
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "site" / "studies" / "index.html").is_file()


def test_readme_is_a_manual():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) < 250
    assert "../shared" not in readme.replace("../shared/data", "")
