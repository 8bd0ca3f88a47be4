"""The repository speaks only of itself: no absolute paths of a machine, no account of the runs
that built it."""

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = {".py", ".md", ".toml", ".cfg", ".txt", ".yml", ".yaml", ".json", ""}
#: written in pieces so that this file does not match itself
MACHINE_ROOTS = ["wo" + "rk", "ro" + "ot", "ho" + "me", "ch" + "eck"]
RUN_WORDS = ["sess" + "ions?", "this mach" + "ine", "the bri" + "ef", "tick" + "ets?", "re-meas" + "ured",
             "earlier ru" + "ns?", "previous com" + "mit", "iss" + "ue #?\\d+"]
PATTERNS = {
    "an absolute machine path": re.compile("(?<![\\w.])/(" + "|".join(MACHINE_ROOTS) + ")/"),
    "a word about the runs that built it": re.compile("(?i)\\b(" + "|".join(RUN_WORDS) + ")\\b"),
}


def tracked_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in names.splitlines() if Path(name).suffix in TEXT]


@pytest.mark.parametrize("what", PATTERNS)
def test_no_text_file_holds(what):
    found = []
    for path in tracked_files():
        if not path.is_file() or path.stat().st_size > 2_000_000:
            continue
        text = path.read_text(errors="ignore")
        for number, line in enumerate(text.splitlines(), 1):
            if PATTERNS[what].search(line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:100]}")
    assert not found, f"{what}:\n" + "\n".join(found[:20])
