"""The study harness: command lines generated from the settings dataclasses, the shared helpers
the studies call (rank, nan padding) and the verdict sentences."""

import argparse
import dataclasses
import math
from typing import Optional, Tuple

import pytest

from experiments import bnn_scale, cli, common, dl, es, gaussian, harness, uci, vi, wishart
from experiments.common import Curve

from helpers import study_settings

STUDY_MODULES = {"gaussian": gaussian, "vi": vi, "dl": dl, "es": es, "wishart": wishart, "uci": uci, "bnn_scale": bnn_scale}


def _parser(module) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    module.add_arguments(parser)
    return parser


@pytest.mark.parametrize("name", sorted(STUDY_MODULES))
def test_every_settings_field_is_an_option_with_help(name):
    """One ``--kebab-case`` option per settings field (a group's fields under its prefix), each
    with help; the preset flags and ``--out`` besides."""
    module = STUDY_MODULES[name]
    actions = {a.dest: a for a in _parser(module)._actions}
    assert {"tiny", "quick", "full", "out"} <= set(actions)
    preset = module.PRESETS["quick"]
    for f in dataclasses.fields(preset):
        if not f.metadata.get("cli", True):
            assert f.name not in actions, f.name
            continue
        value = getattr(preset, f.name)
        dests = [f"{f.name}_{g.name}" for g in dataclasses.fields(value)] if dataclasses.is_dataclass(value) else [f.name]
        for dest in dests:
            assert dest in actions, dest
            assert actions[dest].option_strings == ["--" + dest.replace("_", "-")]
            assert actions[dest].help and "[default:" in actions[dest].help, dest


@pytest.mark.parametrize("name", sorted(STUDY_MODULES))
def test_no_option_keeps_the_preset(name):
    module = STUDY_MODULES[name]
    for preset in cli.PRESET_NAMES:
        assert study_settings(module, [f"--{preset}"]) == module.PRESETS[preset]
    assert study_settings(module, []) == module.PRESETS["quick"]


def test_values_follow_the_field_types():
    settings = study_settings(gaussian, ["--tiny", "--dims", "3", "4", "--conds", "10", "--ngd-max-steps", "none", "2",
                                         "--structures", "dense", "--threads", "none", "--tol", "0.5"])
    assert settings.dims == (3, 4) and settings.conds == (10.0,) and settings.structures == ("dense",)
    assert settings.ngd_max_steps == (None, 2.0) and settings.threads is None and settings.tol == 0.5


@dataclasses.dataclass(frozen=True)
class _Kinds:
    flag: bool = cli.option(False, "a switch")
    name: Optional[str] = cli.option(None, "a name")
    scales: Tuple[float, ...] = cli.option((1.0,), "scales")
    mode: str = cli.option("a", "a mode", choices=("a", "b"))


def test_every_field_type_becomes_an_option():
    parser = argparse.ArgumentParser()
    cli.add_settings_arguments(parser, _Kinds, _Kinds())
    assert cli.resolve(_Kinds(), parser.parse_args([])) == _Kinds()
    given = cli.resolve(_Kinds(), parser.parse_args(["--flag", "--name", "x", "--scales", "2", "0.5", "--mode", "b"]))
    assert given == _Kinds(True, "x", (2.0, 0.5), "b")
    assert cli.resolve(_Kinds(True, "x"), parser.parse_args(["--no-flag", "--name", "none"])) == _Kinds()
    assert "a mode; one of a, b [default: a]" in " ".join(parser.format_help().split())


def test_an_explicit_none_is_not_mistaken_for_an_absent_option():
    """``--ngd-max-step none`` turns the trust region off (the preset's is 1), inside the ``ngd`` group."""
    assert vi.PRESETS["tiny"].ngd.max_step == 1.0
    settings = study_settings(vi, ["--tiny", "--ngd-max-step", "none", "--ngd-price-lrs", "0.5", "--uci-root", "none"])
    assert settings.ngd.max_step is None and settings.ngd.price_lrs == (0.5,) and settings.uci_root is None
    assert settings.ngd.reparam_lrs == vi.PRESETS["tiny"].ngd.reparam_lrs
    assert study_settings(dl, ["--tiny", "--kl-clip", "none"]).kl_clip is None


def test_an_empty_list_option_clears_the_field():
    """``--large-dims`` with no value skips the ES study's large-scale part."""
    assert es.PRESETS["quick"].large_dims
    assert study_settings(es, ["--large-dims"]).large_dims == ()


@pytest.mark.parametrize("argv", [["--structures", "nonsense"], ["--gradients", "exact", "bad"],
                                  ["--estimator", "wrong"], ["--dims", "two"]])
def test_a_bad_value_is_an_argparse_error(argv, capsys):
    with pytest.raises(SystemExit):
        _parser(gaussian).parse_args(argv)
    assert "invalid" in capsys.readouterr().err


def test_field_checks_run_on_the_resolved_settings():
    with pytest.raises(SystemExit, match="--jobs must be a positive integer"):
        study_settings(es, ["--tiny", "--jobs", "0"])
    with pytest.raises(SystemExit, match="--device"):
        study_settings(wishart, ["--tiny", "--device", "no-such-device"])


def test_one_rank_formula_with_each_study_s_cap():
    """``clamp(round(sqrt(d) / 2), 2, 10)``, lowered to the cap a study's structures need."""
    for dim in (2, 3, 4, 5, 6, 10, 26, 31, 100, 402, 2000):
        base = min(10, max(2, round(math.sqrt(dim) / 2)))
        assert common.low_rank(dim) == base
        assert common.low_rank(dim, most=dim - 1) == max(1, min(dim - 1, base))
        assert vi.guide_rank(dim) == max(1, min(base, dim // 2 - 1))


def test_a_diverged_curve_is_padded_with_nan():
    curve = Curve([0, 1], [0.0, 0.5], [3.0, 2.0])
    curve.pad_to([0, 1, 2, 4])
    assert curve.iterations == [0, 1, 2, 4]
    assert curve.values[:2] == [3.0, 2.0] and all(math.isnan(v) for v in curve.values[2:] + curve.seconds[2:])
    assert curve.total_seconds == 0.5


def test_head_to_head_counts_each_outcome_and_the_median_speed_up():
    pairs = [(10, 40), (20, 20), (None, 5), (3, None), (None, None)]
    text = harness.head_to_head(pairs, "NGD", "Adam", "the target", "cells", "iterations", finals=[(0, 0)] * 4 + [(1, 2)])
    assert text.startswith("NGD reached the target first in 2 of 5 cells, Adam in 1, tied in 1, neither in 1 "
                           "(NGD ended lower in 1)")
    assert "NGD was 2.5x faster in iterations (median)" in text  # median of 4 and 1
    assert harness.times_text(0.5) == "2x slower"


def test_the_report_opens_with_the_verdict(tmp_path):
    lines = ["First.", "Second."]
    report = harness.compose_report("Title", lines, "body\n")
    assert report == "# Title\n\n**Verdict.** First. Second.\n\nbody\n"
    harness.write_report(tmp_path, "wishart", report, lines)
    assert (tmp_path / "table.md").read_text() == report
    assert '"study": "wishart"' in (tmp_path / "verdict.json").read_text()
