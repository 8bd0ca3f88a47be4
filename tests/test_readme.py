"""Every Python block of the README runs as printed and prints what its ``# prints:`` line says."""

import re
from pathlib import Path

import pytest
from helpers import run_example

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?")


def python_blocks(text: str):
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def printed(block: str) -> str:
    lines = [line[len("# prints: "):] for line in block.splitlines() if line.startswith("# prints: ")]
    assert len(lines) == 1, "each README block ends with one '# prints:' line"
    return lines[0]


def same_output(expected: str, actual: str) -> bool:
    """The same words, and numbers within 20% (within a factor of 10 for values below 0.01, which are
    round-off-sized: a loss or an error near zero)."""
    if NUMBER.sub("#", expected) != NUMBER.sub("#", actual):
        return False
    for want, got in zip(map(float, NUMBER.findall(expected)), map(float, NUMBER.findall(actual))):
        if abs(want) < 1e-2:
            if not (want == got or (want * got > 0 and 0.1 < got / want < 10)):
                return False
        elif abs(got - want) > 0.2 * abs(want):
            return False
    return True


BLOCKS = python_blocks(README.read_text())


def test_the_readme_has_one_example_per_use():
    text = "\n".join(BLOCKS)
    for name in ("structngd.pyro", "structngd.kron", "structngd.es", "Wishart"):
        assert name in text


def test_same_output_tells_numbers_apart():
    assert same_output("loss 2.4e-04, f = 9.3e-09 after 3480 evaluations", "loss 3.1e-04, f = 8.0e-09 after 3600 evaluations")
    assert not same_output("loss 2.4e-04 after 3480", "loss 2.4e-02 after 3480")
    assert not same_output("ELBO -56.1", "ELBO -86.1")
    assert not same_output("ELBO -56.1", "ELBO nan")


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_a_readme_block_runs_as_printed(index, tmp_path):
    block = BLOCKS[index]
    result = run_example(block, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.strip()]
    assert lines, "the block printed nothing"
    assert same_output(printed(block), lines[-1]), f"printed {lines[-1]!r}, the README says {printed(block)!r}"
