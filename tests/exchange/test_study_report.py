"""The privacy report through the API (issue 21, item 4): per hospital epsilon and delta spent
(the decision count's share and DP-SGD's), noise multiplier and sample rate (from its signed
receipts: post-processing of its noised decision count), steps, the accountant, count-free
exclusions, metrics per round; no exact count of a hospital's patients (docs/privacy.md,
"Counts")."""

from __future__ import annotations

import json

import pytest

from federated.templates import get_template
from tests.exchange.conftest import World


def test_report_per_hospital_and_round_from_the_receipts(world: World) -> None:
    sid = world.submit(rounds=2, min_hospitals=2, token_budget=2_000)["id"]
    assert world.decide("h-three", sid, "refuse", ["purpose 'DUO:0000007' is not allowed by site policy"]
                        ).status_code == 201
    for hospital in ("h-one", "h-two"):
        assert world.decide(hospital, sid).status_code == 201
    world.wait_runs()
    response = world.as_("alice", "GET", f"/v1/studies/{sid}/report")
    assert response.status_code == 200, response.text
    report = response.json()
    assert report["study_id"] == sid and report["status"] == "completed" and report["unit"] == "patient"
    defaults = get_template("logistic_regression").defaults
    steps = defaults.local_steps
    assert report["terms"] == {"accountant": "prv", "steps_per_round": steps, "epsilon": 3.0, "delta": 1e-5,
                               "rounds": 2, "batch_size": defaults.batch_size, "clip": defaults.clip}
    by_id = {h["hospital_id"]: h for h in report["hospitals"]}
    assert set(by_id) == {"h-one", "h-two", "h-three"}
    one = by_id["h-one"]
    # epsilon: the latest epsilon_total (the scripted hospital composes 0.1 per round)
    assert one["decision"] == "approve" and one["rounds_trained"] == 2 and one["epsilon_spent"] == 0.2
    assert one["delta"] == 1e-5 and one["steps"] == 2 * steps and one["accountant"] == "prv"
    # from the hospital's signed receipts: sized from its noised decision count (issue 14, item 2),
    # and how its epsilon composes (the decision count's epsilon + the DP-SGD rounds')
    assert one["noise_multiplier"] == 1.25 and one["sample_rate"] == 0.125
    assert one["decision_epsilon"] == 0.05 and one["training_epsilon"] == pytest.approx(0.15)
    assert one["decision_epsilon"] + one["training_epsilon"] == pytest.approx(one["epsilon_spent"])
    assert by_id["h-three"]["noise_multiplier"] is None and by_id["h-three"]["decision_epsilon"] is None
    assert "exact patient or record count" in report["withheld"]
    assert by_id["h-three"]["rounds_trained"] == 0 and by_id["h-three"]["epsilon_spent"] == 0.0
    assert report["exclusions"]["refused_by"] == {
        "h-three": ["purpose 'DUO:0000007' is not allowed by site policy"]}
    assert [r["round"] for r in report["rounds"]] == [1, 2]
    assert report["rounds"][1]["metrics"]["accuracy"] == 0.6
    assert report["rounds"][0]["hospitals_excluded"] == {"no_data": 0, "refused": 0, "dropped": 0}
    # no count of records leaves through the report (the receipts' public weight included)
    assert "records_used" not in json.dumps(report["hospitals"])
    # auditors may read it; another organisation's researcher sees no such study
    assert world.as_("auditor", "GET", f"/v1/studies/{sid}/report").status_code == 200
    assert world.as_("bob", "GET", f"/v1/studies/{sid}/report").status_code == 404
    assert world.as_("alice", "GET", "/v1/studies/nope/report").status_code == 404


def test_report_of_a_study_that_has_not_started(world: World) -> None:
    sid = world.submit()["id"]
    report = world.as_("alice", "GET", f"/v1/studies/{sid}/report").json()
    assert report["status"] == "submitted" and report["hospitals"] == [] and report["rounds"] == []
