"""``python -m experiments quick --tiny`` end to end: every study's files, a report linking
them, and finite headline numbers for every method."""

import csv
import math
import re

from experiments.__main__ import STUDIES, main

#: study -> the summary.csv columns that must be finite on every row
HEADLINES = {
    "gaussian": ("ngd_final_kl", "adam_final_kl"),
    "vi": ("final_elbo", "test_loglik"),
    "dl": ("final_train_loss", "test_loss"),
    "es": ("median_final_gap", "evaluations"),
    "wishart": ("final_objective", "seconds"),
}


def test_quick_tiny_writes_every_study_and_the_report(tmp_path):
    assert set(HEADLINES) == set(STUDIES)
    main(["quick", "--tiny", "--out", str(tmp_path)])
    report = (tmp_path / "REPORT.md").read_text()
    for study, columns in HEADLINES.items():
        folder = tmp_path / study
        assert (folder / "table.md").stat().st_size > 0
        pngs = list(folder.glob("*.png"))
        assert pngs, study
        for target in re.findall(rf"\]\(({study}/[^)]+)\)", report):
            assert (tmp_path / target).is_file(), target  # every link resolves
        assert f"## {study}:" in report and all(f"{study}/{p.name}" in report for p in pngs)
        with open(folder / "summary.csv") as f:
            rows = list(csv.DictReader(f))
        assert rows, study
        for row in rows:
            if row.get("status", "ok") != "ok":  # a baseline that diverged: reported, not hidden
                assert "NGD" not in row["method"], row  # ours must not
                continue
            for column in columns:
                assert math.isfinite(float(row[column])), (study, row.get("method"), column, row[column])
