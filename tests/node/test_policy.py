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
    assert "fewer records eligible under patients' consent than the site minimum (10)" in text
    assert not any(c.isdigit() for c in text.replace("(10)", "").split("site minimum")[-1])
    assert len(result.reasons) == 9


def test_a_study_must_leave_room_beside_the_decision_counts_epsilon() -> None:
    """The decision count's epsilon is part of every study's spend (docs/privacy.md, "Counts"): a
    study whose epsilon does not exceed it could train on nothing, and is refused by rule 5
    before any count is drawn."""
    policy = SitePolicy(mode="auto-approve", decision_epsilon=0.5)
    refused = evaluate(policy, study(epsilon=0.5), MANY, FULL, HELD)
    assert refused.decision == "refuse"
    assert refused.reasons == ["epsilon 0.5 does not exceed the decision count's epsilon (0.5), which is "
                               "part of every study's spend"]
    assert evaluate(policy, study(epsilon=0.6), MANY, FULL, HELD).decision == "approve"


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


def test_delta_above_the_site_maximum_is_refused_with_its_reason() -> None:
    policy = SitePolicy(mode="auto-approve")  # max_delta 1e-5
    refused = evaluate(policy, study(delta=1e-4), MANY, FULL, HELD)
    assert refused.decision == "refuse"
    assert refused.reasons == ["delta 0.0001 exceeds the site maximum per study (1e-05)"]
    assert evaluate(policy, study(delta=1e-5), MANY, FULL, HELD).decision == "approve"


def test_delta_above_one_over_the_eligible_patients_is_refused() -> None:
    policy = SitePolicy(mode="auto-approve", max_delta=0.5, total_delta_budget=0.9)
    few = Eligibility(eligible=40, patients=20)  # 40 records of 20 patients: 1/n = 0.05
    roomy = Budget(spent=0.0, reserved=0.0, total=20.0, delta_total=0.9)
    refused = evaluate(policy, study(delta=0.1), few, roomy, HELD)
    assert refused.reasons == ["delta 0.1 exceeds 1/n for this hospital's n eligible patients"]
    assert evaluate(policy, study(delta=0.05), few, roomy, HELD).decision == "approve"


def test_the_delta_budget_counts_spent_and_reserved_deltas() -> None:
    policy = SitePolicy(mode="auto-approve")
    budget = Budget(spent=0.0, reserved=0.0, total=20.0, delta_spent=8e-5, delta_reserved=1.5e-5,
                    delta_total=1e-4)
    refused = evaluate(policy, study(delta=1e-5), MANY, budget, HELD)
    assert refused.reasons == ["delta 1e-05 exceeds the delta budget left (5e-06 of 0.0001: 8e-05 spent, "
                               "1.5e-05 reserved)"]


def test_a_study_no_patient_has_lifetime_budget_for_is_refused() -> None:
    policy = SitePolicy(mode="auto-approve")
    capped = Eligibility(eligible=12, patients=0, over_lifetime_cap=12)
    refused = evaluate(policy, study(epsilon=3.0), capped, FULL, HELD)
    assert refused.reasons == ["no eligible patient has privacy budget left for epsilon 3 (each would "
                               "exceed their lifetime cap)"]


def test_delta_settings_validate() -> None:
    with pytest.raises(ValueError, match="max_delta"):
        SitePolicy(max_delta=1e-3, total_delta_budget=1e-4)
    with pytest.raises(ValueError, match="max_delta"):
        SitePolicy(max_delta=1.5)


def test_the_decision_depends_on_the_patient_count_only_at_its_documented_thresholds() -> None:
    """The known leak of a decision (docs/privacy.md, "Known limits"), stated as a bound: what a
    hospital posts (decision and reasons) is the same for every count of consented patients
    except at two public thresholds, the site minimum and 1/delta, where one patient more or
    fewer flips one reason. No count appears in any reason."""
    policy = SitePolicy(mode="auto-approve", min_eligible_records=20, max_delta=0.05,
                        total_delta_budget=0.9)
    roomy = Budget(spent=0.0, reserved=0.0, total=20.0, delta_total=0.9)
    posted = {}
    for n in range(1, 80):
        result = evaluate(policy, study(delta=0.03), Eligibility(eligible=n, patients=n), roomy, HELD)
        posted[n] = (result.decision, tuple(result.reasons))
    flips = [n for n in range(1, 79) if posted[n] != posted[n + 1]]
    assert flips == [19, 33]  # 19 -> 20 crosses the minimum; 33 -> 34 crosses 1/delta (33.3): delta > 1/n
    assert {posted[n][0] for n in range(20, 34)} == {"approve"}
    assert len(set(posted.values())) == 3  # 79 counts, three possible answers: no count is posted


def test_a_distributed_noise_study_counts_the_decision_epsilon_on_top() -> None:
    """A distributed-noise study's aggregate noise is calibrated from the whole study epsilon, so
    the decision count's epsilon comes on top: the site maximum, the budget left and the
    patients' lifetime room are checked against epsilon + the count's."""
    policy = SitePolicy(mode="auto-approve", max_epsilon_per_study=3.0, decision_epsilon=0.1)
    local, distributed = study(epsilon=3.0), study(epsilon=3.0, noise="distributed")
    assert local.spend(0.1) == 3.0 and local.training_target(0.1) == pytest.approx(2.9)
    assert distributed.spend(0.1) == pytest.approx(3.1) and distributed.training_target(0.1) == 3.0
    assert evaluate(policy, local, MANY, FULL, HELD).decision == "approve"
    refused = evaluate(policy, distributed, MANY, FULL, HELD)
    assert refused.decision == "refuse"
    assert any("epsilon 3.1 exceeds the site maximum per study (3) with the decision count's" in r
               for r in refused.reasons), refused.reasons
    tight = Budget(spent=0.0, reserved=0.0, total=3.05)
    fits = evaluate(policy, study(epsilon=3.0), MANY, tight, HELD)
    assert not any("budget left" in r for r in fits.reasons)
    assert any("epsilon 3.1 exceeds the privacy budget left" in r
               for r in evaluate(SitePolicy(mode="auto-approve", max_epsilon_per_study=5.0), distributed,
                                 MANY, tight, HELD).reasons)
