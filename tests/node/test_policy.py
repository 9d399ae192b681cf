"""Site policy: every refusal comes with its reasons; the mode decides what passes."""

from __future__ import annotations

from typing import Any

import pytest

from exchange.node.policy import Budget, Eligibility, StudyView, evaluate
from exchange.node.settings import SitePolicy

HELD = {"mean_radius": "labs", "mean_texture": "labs", "label": "outcomes"}


def study(**spec: Any) -> StudyView:
    base: dict[str, Any] = {"purpose": "DUO:0000007", "disease": "C50", "commercial": False,
                            "columns": {"labs": ["mean_radius", "mean_texture"]}, "label": "label",
                            "epsilon": 3.0, "delta": 1e-5, "rounds": 2}
    base.update(spec)
    return StudyView.from_json({"id": "st-1", "organisation_id": "acme", "organisation_region": "DE",
                                "status": "submitted", "spec": base})


FULL = Budget(spent=0.0, reserved=0.0, total=20.0)
MANY = Eligibility(eligible=100)


@pytest.mark.parametrize("mode,decision", [("auto-approve", "approve"), ("auto-refuse", "refuse"),
                                           ("ask", None)])
def test_mode_decides_what_passes_policy(mode: str, decision: str | None) -> None:
    result = evaluate(SitePolicy(mode=mode), study(), MANY, FULL, HELD)  # type: ignore[arg-type]
    assert result.decision == decision
    assert result.eligible_records == 100
    assert result.reasons


def test_every_failing_rule_gives_its_reason() -> None:
    policy = SitePolicy(mode="auto-approve", allowed_purposes=["DUO:0000011"],
                        allowed_organisations=["globex"],
                        allowed_regions=["FR"], max_epsilon_per_study=2.0, total_privacy_budget=10.0,
                        min_eligible_records=10)
    result = evaluate(policy, study(commercial=True, columns={"labs": ["mean_radius", "genome"],
                                                              "vitals": ["mean_texture"]}),
                      Eligibility(eligible=3, excluded={"denied": 5, "no-contract": 2}),
                      Budget(spent=8.5, reserved=0.0, total=10.0), HELD)
    assert result.decision == "refuse"
    text = "\n".join(result.reasons)
    assert "purpose 'DUO:0000007' is not allowed" in text
    assert "organisation 'acme' is not allowed" in text
    assert "region 'DE' is not allowed" in text
    assert "commercial use is not allowed" in text
    assert "epsilon 3 exceeds the site maximum per study (2)" in text
    assert "exceeds the privacy budget left (1.5 of 10" in text
    assert "column(s) not held at this hospital: genome" in text
    assert "mean_texture is labs, not vitals" in text
    assert "only 3 record(s) eligible under patients' consent (site minimum 10); excluded: 5 denied, " \
           "2 no-contract" in text
    assert len(result.reasons) == 9


def test_allowed_purpose_covers_narrower_ones() -> None:
    policy = SitePolicy(mode="auto-approve", allowed_purposes=["GRU"])
    assert evaluate(policy, study(), MANY, FULL, HELD).decision == "approve"  # DS is within GRU
    narrow = SitePolicy(mode="auto-approve", allowed_purposes=["DUO:0000007"])
    refused = evaluate(narrow, study(purpose="DUO:0000042", disease=None), MANY, FULL, HELD)
    assert refused.decision == "refuse"
    assert "purpose 'DUO:0000042' is not allowed" in refused.reasons[0]


def test_reserved_budget_counts_against_new_studies() -> None:
    policy = SitePolicy(mode="auto-approve", total_privacy_budget=10.0)
    assert evaluate(policy, study(epsilon=3.0), MANY, Budget(4.0, 3.0, 10.0), HELD).decision == "approve"
    refused = evaluate(policy, study(epsilon=3.5), MANY, Budget(4.0, 3.0, 10.0), HELD)
    assert refused.decision == "refuse"
    assert "4 spent, 3 reserved" in refused.reasons[0]


def test_policy_settings_validate() -> None:
    with pytest.raises(ValueError, match="max_epsilon_per_study"):
        SitePolicy(max_epsilon_per_study=30.0, total_privacy_budget=20.0)
