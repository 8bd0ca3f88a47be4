"""The documentation site builds with ``mkdocs build --strict``: every page, link and API entry resolves."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("mkdocstrings") is None,
                    reason='needs the docs extra: pip install -e ".[docs]"')
def test_the_site_builds_strictly(tmp_path):
    result = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path)],
                            cwd=ROOT, capture_output=True, text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "api" / "kron" / "index.html").read_text().count("KFAC") > 5


def test_every_page_of_the_site_is_in_its_navigation():
    docs = ROOT / "docs"
    config = (ROOT / "mkdocs.yml").read_text()
    pages = [p.relative_to(docs).as_posix() for p in docs.rglob("*.md")]
    missing = [p for p in pages if p not in config and not p.startswith("results/")]
    assert not missing, f"pages outside the navigation: {missing}"
