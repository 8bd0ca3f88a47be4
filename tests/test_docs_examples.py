"""Every ``python`` block of the documentation runs as printed, each in a fresh interpreter started
in an empty folder on one thread. The generated results pages and the API reference are left out:
they hold no examples of their own."""

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import run_example

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: folders of docs/ whose pages are generated or hold API listings only
LEFT_OUT = {"results", "api"}
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
#: the languages a guide may fence: python (run here), shell commands and plain text
LANGUAGES = {"python", "bash", "text"}
#: blocks run at once, each in its own single-threaded process
WORKERS = 2
SECONDS_PER_BLOCK = 300


def pages():
    """The documentation's pages that hold examples."""
    return sorted(p for p in DOCS.rglob("*.md") if p.relative_to(DOCS).parts[0] not in LEFT_OUT)


def fenced_blocks(page: Path):
    """``(language, "page:line", code)`` of every fenced block of ``page``, ``line`` its first line of code."""
    text = page.read_text()
    name = page.relative_to(DOCS).as_posix()
    return [(m.group(1), f"{name}:{text.count(chr(10), 0, m.start(2)) + 1}", m.group(2)) for m in FENCE.finditer(text)]


BLOCKS = {where: code for page in pages() for language, where, code in fenced_blocks(page) if language == "python"}


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every block's finished process, ``WORKERS`` blocks at a time, each in its own empty folder."""
    folders = {where: tmp_path_factory.mktemp("block") for where in BLOCKS}
    with ThreadPoolExecutor(WORKERS) as pool:
        futures = {where: pool.submit(run_example, code, folders[where], SECONDS_PER_BLOCK) for where, code in BLOCKS.items()}
        return {where: future.result() for where, future in futures.items()}


def test_every_guide_has_a_runnable_example():
    guides = {p.relative_to(DOCS).as_posix() for p in (DOCS / "guide").glob("*.md")}
    with_examples = {where.split(":")[0] for where in BLOCKS}
    assert guides - with_examples <= {"guide/conventions.md"}, sorted(guides - with_examples)


def test_every_fenced_block_names_a_known_language():
    """A block fenced otherwise (``py``, none) would silently go untested or unhighlighted."""
    odd = [where for page in pages() for language, where, _ in fenced_blocks(page) if language not in LANGUAGES]
    assert not odd, f"fence these as python (run), bash or text: {odd}"


@pytest.mark.parametrize("where", BLOCKS)
def test_a_documented_block_runs(where, outcomes):
    result = outcomes[where]
    assert result.returncode == 0, f"the block at docs/{where} failed:\n{result.stderr[-3000:]}"
    assert result.stdout.strip(), f"the block at docs/{where} printed nothing"
