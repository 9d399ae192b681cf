"""The demo report: shape checks and a self-contained HTML page."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from exchange.demo.report import ReportError, render_html, write_report


def _report() -> dict[str, Any]:
    return {
        "study": {"id": "st-1", "purpose": "DUO:0000042", "epsilon": 3.0, "delta": 1e-5,
                  "status": "completed", "template": "logreg"},
        "rounds": [{"round": 1, "accuracy": 0.91}, {"round": 2, "accuracy": 0.95}],
        "hospitals": [
            {"id": "h1", "records_used": 150, "records_excluded": {"revoked": 3, "purpose": 7},
             "epsilon_spent": 2.9, "delta": 1e-5, "noise_multiplier": 1.1, "sample_rate": 0.1,
             "steps": 30, "tokens_paid": 400},
            {"id": "h2<script>", "records_used": 90, "records_excluded": {},
             "epsilon_spent": 2.8, "delta": 1e-5, "noise_multiplier": 1.2, "sample_rate": 0.12,
             "steps": 30, "tokens_paid": 250},
        ],
        "payouts": {"hospital:h1": 400, "hospital:h2": 250},
        "audit": {"entries": 42, "verified": True, "root": "ab" * 32},
    }


def test_report_html_is_self_contained_and_escaped(tmp_path: Path) -> None:
    json_path, html_path = write_report(_report(), tmp_path)
    html = html_path.read_text()
    assert html.count("<svg") == 4  # accuracy, epsilon, records, payouts
    # nothing is fetched from the network: no external src/href (XML namespaces are names only)
    assert not re.search(r'(src|href)\s*=\s*"(https?:)?//', html)
    assert "h2&lt;script&gt;" in html  # hospital names are escaped
    assert "revoked: 3" in html
    assert json.loads(json_path.read_text())["hospitals"][0]["tokens_paid"] == 400


def test_report_missing_fields_are_named(tmp_path: Path) -> None:
    report = _report()
    del report["hospitals"][1]["epsilon_spent"]
    with pytest.raises(ReportError, match=r"hospitals\[1\].*epsilon_spent"):
        render_html(report)
    assert not (tmp_path / "report.html").exists()


def test_payout_plot_groups_reward_accounts() -> None:
    from exchange.demo.report import _payout_groups

    labels, values = _payout_groups({"hospital:h1": 400, "reward:a": 3, "reward:b": 4,
                                     "author:x": 20})
    assert labels == ["author:x", "hospital:h1", "2 reward accounts"]
    assert values == [20, 400, 7]


def test_survival_report_leads_with_concordance_and_ibs(tmp_path: Path) -> None:
    report = _report()
    report["study"].update(task="survival", metric="concordance", template="cox_ph")
    report["rounds"] = [{"round": 1, "concordance": 0.79, "ibs": 0.09},
                        {"round": 2, "concordance": 0.80, "ibs": 0.085}]
    html = write_report(report, tmp_path)[1].read_text()
    assert "Concordance per round" in html and "<th>concordance</th>" in html
    assert "integrated Brier score" in html and "0.0850" in html
    assert "hold-out metrics per round" not in html  # none released: no empty table
    report["rounds"][1]["holdout_by_hospital"] = {"h1<b>": {"concordance": 0.7712, "ibs": 0.1034}}
    html = write_report(report, tmp_path)[1].read_text()
    assert "Each hospital's hold-out metrics per round" in html
    assert "h1&lt;b&gt;" in html and "concordance 0.7712, ibs 0.1034" in html
    report["rounds"][1] = {"round": 2, "accuracy": 0.9}  # the survival metric is missing
    with pytest.raises(ReportError, match=r"rounds\[1\]: needs integer 'round' and float 'concordance'"):
        render_html(report)
