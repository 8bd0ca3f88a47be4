"""The built wheel holds the library alone, and the library's namespace is complete."""

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import structngd

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", *isolation, "-w", str(out), str(ROOT)],
                   check=True, capture_output=True)
    (path,) = out.glob("structngd-*.whl")
    return path


def test_the_wheel_contains_only_the_structngd_package(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"structngd"}
    for package in ("groups", "families", "optim", "pyro", "kron", "es"):
        assert f"structngd/{package}/__init__.py" in names


def test_the_wheel_installs_no_console_script_for_the_studies(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert not [n for n in names if n.endswith("entry_points.txt")]


def test_subpackages_are_attributes_and_all_lists_them():
    for name in ("groups", "families", "optim", "pyro", "kron", "es"):
        assert name in structngd.__all__
        assert getattr(structngd, name).__name__ == f"structngd.{name}"
