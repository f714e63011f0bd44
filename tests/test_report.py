"""The README's results table is the output of `zoo report`, so it can never drift from the registry."""

import re
from pathlib import Path

from zoo.report import table

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_fmnist_table_is_what_zoo_report_prints():
    text = README.read_text()
    block = re.search(r"<!-- zoo report fmnist --markdown -->\n(.*?)\n<!-- end zoo report -->", text, re.S)
    assert block, "README must hold the `zoo report fmnist --markdown` table between its markers"
    assert block.group(1).strip() == table("fmnist", markdown=True).strip(), \
        "README table is stale: paste the output of `zoo report fmnist --markdown`"


def test_report_lists_measured_baselines_after_the_models(monkeypatch, tmp_path):
    import json

    import zoo.report as report

    (tmp_path / "fmnist-pixels.json").write_text(json.dumps({"knn_k20": 85.0, "linear": 80.0}))
    monkeypatch.setattr(report, "BASELINES_DIR", tmp_path)
    rows = report.rows("fmnist")
    assert rows[-1]["name"].startswith("raw pixels") and rows[-1]["knn_k20"] == 85.0
    assert all(r["method"] != "baseline" for r in rows[:-1])
    assert "| raw pixels (standardised 784-d) | - | 85.00 | - | - | 80.00 |" in report.table("fmnist")
