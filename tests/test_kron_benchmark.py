"""The Kronecker step-time benchmark runs at a tiny size (no timing assertions)."""

import json
import math

import torch

from benchmarks import kron_step


def test_floor_flops_hand_count_two_layer_mlp():
    model = kron_step.make_mlp([20, 16, 10])
    shapes = kron_step.layer_shapes(model, torch.zeros(8, 20))
    flops = kron_step.floor_flops(shapes)
    # forward 2 N sum d_in d_out; backward twice; products 2 (d_out^2 d_in + d_out d_in^2), d_in with bias
    forward = 2 * 8 * (20 * 16 + 16 * 10)
    products = 2 * (16 ** 2 * 21 + 16 * 21 ** 2) + 2 * (10 ** 2 * 17 + 10 * 17 ** 2)
    assert forward == 7680 and products == 34044
    assert flops == {"forward": forward, "backward": 2 * forward, "products": products, "total": 3 * forward + products}


def test_conv_rows_count_output_locations():
    model = kron_step.make_cnn((4, 8), side=8)
    shapes = kron_step.layer_shapes(model, torch.zeros(4, 1, 8, 8))
    assert [(s.d_in, s.d_out, s.rows) for s in shapes] == [(9, 4, 4 * 64), (36, 8, 4 * 16), (72, 8, 4 * 4), (32, 10, 4)]


def test_tiny_benchmark_every_method_times(tmp_path):
    out = tmp_path / "kron.json"
    threads = torch.get_num_threads()
    try:
        result = kron_step.main(["--tiny", "--no-progress", "--threads", "1", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    assert json.loads(out.read_text())["environment"]["update_every"] == 10
    assert out.with_suffix(".md").read_text().startswith("# Kronecker preconditioners")
    expected = {"SGD", "Adam", "floor", "KFAC", "EKFAC"} | {f"LocalKFAC({s})" for s in kron_step.STRUCTURES}
    if kron_step.SINGD is not None:
        expected |= {f"singd({s})" for s in kron_step.SINGD_STRUCTURES.values() if s}
    assert len(result["results"]) == 2  # the MLP and the CNN
    for res in result["results"]:
        methods = {m["method"]: m for m in res["methods"]}
        assert set(methods) == expected
        for name, m in methods.items():
            assert m["error"] is None, (res["model"], name, m["error"])
            assert m["samples_ms"] and all(math.isfinite(t) and t > 0 for t in m["samples_ms"]), name
            assert math.isfinite(m["ms"]) and m["ms"] > 0 and m["x_adam"] > 0 and m["x_floor"] > 0
            assert m["parameters_finite"], name
            assert m["state_bytes"] >= 0
            assert m["steps_run"] % 10 == 0  # whole update windows only
        assert methods["SGD"]["state_bytes"] == 0
        adam_extra = methods["Adam"]["state_bytes"] - 2 * res["parameter_bytes"]  # exp_avg, exp_avg_sq
        assert 0 <= adam_extra <= 8 * len(res["layers"]) * 2  # plus a scalar `step` per parameter
        assert methods["KFAC"]["state_bytes"] > 0


def test_kfac_optimizer_step_benchmark_reports_consistent_ratios(tmp_path):
    """A tiny run of ``benchmarks.kfac_optimizer_step``: every method's ratio to Adam is its time over Adam's,
    and the extra passes are ``(KFACOptimizer - KFAC + SGD) / (forward + backward)``."""
    import re

    from benchmarks import kfac_optimizer_step

    out = tmp_path / "report.md"
    report = kfac_optimizer_step.main(["--threads", "1", "--sizes", "8", "6", "3", "--batch", "16", "--windows", "1",
                                       "--steps", "5", "--out", str(out)])
    assert out.read_text() == report
    rows = {m[0]: (float(m[1]), float(m[2]), float(m[3]))
            for m in re.findall(r"^\| ([^|]+?) \| ([\d.]+) \| ([\d.]+)x \| ([\d.]+) \|$", report, re.M)}
    assert set(rows) == {"Adam", "KFAC + SGD", "KFACOptimizer", "forward + backward"}
    for ms, to_adam, passes in rows.values():
        assert math.isclose(to_adam, ms / rows["Adam"][0], rel_tol=0.02, abs_tol=0.01)
        assert math.isclose(passes, ms / rows["forward + backward"][0], rel_tol=0.02, abs_tol=0.01)
    extra = float(re.search(r"beyond KFAC \+ SGD: (-?[\d.]+) forward", report).group(1))
    expected = (rows["KFACOptimizer"][0] - rows["KFAC + SGD"][0]) / rows["forward + backward"][0]
    assert math.isclose(extra, expected, rel_tol=0.05, abs_tol=0.02)
