"""The VI study end to end at its ``--tiny`` size: every file written, every number finite."""

import json
import math

from experiments.__main__ import main


def test_vi_study_tiny_writes_finite_results(tmp_path):
    main(["vi", "--tiny", "--out", str(tmp_path)])
    for name in ("table.md", "summary.csv", "results.json", "elbo_vs_steps.png", "elbo_vs_seconds.png", "gap1d_bands.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    results = json.loads((tmp_path / "results.json").read_text())
    methods = {row["method"] for row in results["summary"]}
    assert {"NGD dense", "Adam AutoMVN", "Adam AutoNormal"} <= methods
    for row in results["summary"]:
        assert row["status"] == "ok", row
        for key in ("final_elbo", "test_loglik", "ms_per_step"):
            assert math.isfinite(row[key]), (row["method"], key)
    # the structured dense guide (Price gradients, 20 steps) ends above Adam's full-covariance guide (40 steps)
    for name in results["problems"]:
        rows = {r["method"]: r for r in results["summary"] if r["problem"] == name}
        assert rows["NGD dense"]["final_elbo"] > rows["Adam AutoMVN"]["final_elbo"]
