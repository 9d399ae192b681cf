"""What leaves a hospital in a receipt cannot show one patient: the attacks of issue 14 on the
log (a single revocation read from the counts, revoked pseudonyms brute-forced from the
consent commitment, the same cohort linked across studies) must fail, while the hospital's own
key still lets an auditor it authorises check the commitment."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consent.gate import commitment
from consent.model import revoke, sign
from federated.client_app import train_hospital_round, within_capacity
from federated.dp import initial_state
from federated.receipts import verify_receipt
from federated.runtime.demo_sites import DemoSite, approve, demo_spec, provision_sites
from federated.runtime.site import Site, SiteConfigError
from federated.study_spec import StudySpec

NOW = datetime(2026, 6, 1, tzinfo=UTC)
PRIVACY: dict[str, Any] = {"epsilon": 3.0, "rounds": 3, "accountant": "rdp"}
PUBLIC = ("records_used", "delta", "spec_sha256", "study_id", "hospital")


def _spec(study_id: str) -> StudySpec:
    return demo_spec(study_id, **PRIVACY)


def _revoke_one(demo: DemoSite, pseudonym: str, at: datetime) -> None:
    path = demo.site.contracts_path
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    lines.append(json.dumps(sign(revoke(demo.contracts[pseudonym], at), demo.consent_issuer).to_json()))
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def demo(tmp_path: Path) -> DemoSite:
    return provision_sites(tmp_path / "sites", hospitals=("hospital-a",))["hospital-a"]


def _two_rounds(demo: DemoSite, study_id: str, revoked: str | None) -> list[Any]:
    spec = _spec(study_id)
    approve(demo.site, study_id)
    weights = initial_state(spec.template, len(spec.columns))
    first = train_hospital_round(demo.site, spec, 1, weights, NOW)
    if revoked is not None:
        _revoke_one(demo, revoked, NOW + timedelta(hours=1))
    second = train_hospital_round(demo.site, spec, 2, weights, NOW + timedelta(hours=2))
    assert first.status == second.status == "ok", (first.reason, second.reason)
    return [first, second]


def test_a_single_revocation_is_not_visible_between_two_rounds(demo: DemoSite) -> None:
    train = demo.site.records()[0].train()
    patient = next(p for p in train.pseudonyms if demo.contracts[p].reward_account is not None)
    outcomes = _two_rounds(demo, "s-one-revokes", patient)
    receipts = [verify_receipt(o.receipt.to_bytes(), demo.signer.public_key) for o in outcomes]
    # the hospital did leave the patient out of round 2 (its own gate says so)...
    gate_2 = demo.site.gate(_spec("s-one-revokes").request, train.pseudonyms, NOW + timedelta(hours=2))
    assert patient not in gate_2.eligible
    # ...but nothing that left it differs between the rounds except the round and fresh
    # commitments: the same weight, tree size, metrics and (empty) reason
    first, second = (r.entry.payload for r in receipts)
    assert {k: first[k] for k in PUBLIC} == {k: second[k] for k in PUBLIC}
    assert first["rewards"]["size"] == second["rewards"]["size"]
    assert first["rewards"]["root"] != second["rewards"]["root"]
    assert outcomes[0].metrics["num_examples"] == outcomes[1].metrics["num_examples"]
    assert set(outcomes[0].metrics) == set(outcomes[1].metrics) == {"num_examples", "steps", "epsilon"}
    assert outcomes[0].reason == outcomes[1].reason == ""
    # and none of the patient's identifiers is in either receipt
    for outcome in outcomes:
        text = outcome.receipt.to_bytes().decode()
        assert patient not in text and str(demo.contracts[patient].reward_account) not in text


def test_revoked_pseudonyms_cannot_be_brute_forced_from_the_commitments(demo: DemoSite) -> None:
    """The old attack: knowing round 1's (pseudonym, contract) pairs, try every pair removed and
    compare with round 2's commitment. With the hospital's per-round key the attacker cannot
    compute any candidate; only an auditor given that round's key can check the commitment."""
    train = demo.site.records()[0].train()
    patient = train.pseudonyms[3]
    outcomes = _two_rounds(demo, "s-brute", patient)
    pairs_1 = sorted((p, demo.contracts[p].content_hash) for p in set(train.pseudonyms))
    target = outcomes[1].receipt.commitment
    # every guess the attacker can compute (unkeyed, or keyed with round 1's revealed key) fails
    guesses = [[pair for pair in pairs_1 if pair != dropped] for dropped in pairs_1]
    round_1_key = demo.site.gate_key("s-brute", 1)
    for guess in guesses:
        assert commitment(guess) != target
        assert commitment(guess, round_1_key) != target
    # the authorised auditor, given round 2's key and the pairs the hospital shows, recomputes it
    right = [pair for pair in pairs_1 if pair[0] != patient]
    assert commitment(right, demo.site.gate_key("s-brute", 2)) == target
    # keys differ per round and study, and cannot be derived from one another
    assert len({demo.site.gate_key(s, r) for s in ("s-brute", "s-other") for r in (1, 2)}) == 4


def test_the_same_cohort_gives_unlinkable_commitments_across_studies(demo: DemoSite) -> None:
    spec_x, spec_y = _spec("s-x"), _spec("s-y")
    approve(demo.site, "s-x", "s-y")
    weights = initial_state(spec_x.template, len(spec_x.columns))
    x = train_hospital_round(demo.site, spec_x, 1, weights, NOW)
    y = train_hospital_round(demo.site, spec_y, 1, weights, NOW)
    assert x.receipt is not None and y.receipt is not None
    assert x.receipt.commitment != y.receipt.commitment
    assert x.receipt.rewards["root"] != y.receipt.rewards["root"]


def test_with_a_reward_capacity_the_tree_size_is_the_capacity_and_no_more_patients_train(
        demo: DemoSite) -> None:
    """The reward tree's size leak closed (docs/privacy.md): a site with a public reward capacity
    C commits every round to a tree of exactly C leaves and trains at most C patients, chosen
    the same way every round; a revocation of a chosen patient changes neither."""
    capacity = 8
    site = replace(demo.site, reward_capacity=capacity)
    assert Site.from_node_config(site.node_config()) == site
    spec = _spec("s-capacity")
    approve(site, spec.study_id)
    train = site.records()[0].train()
    assert len(set(train.pseudonyms)) > capacity
    weights = initial_state(spec.template, len(spec.columns))
    first = train_hospital_round(site, spec, 1, weights, NOW)
    assert first.status == "ok", first.reason
    charged = site.ledger().charges(spec.study_id)
    trained = {p for p, s in site.ledger().patient_spend().items() if s.studies}  # not the count alone
    assert 0 < len(trained) <= capacity
    eligible = site.gate(spec.request, train.pseudonyms, NOW).eligible
    chosen = within_capacity(site, spec.study_id, eligible)
    assert trained <= chosen and len(chosen) == capacity
    revoked = next(iter(sorted(trained)))
    _revoke_one(demo, revoked, NOW + timedelta(hours=1))
    second = train_hospital_round(site, spec, 2, weights, NOW + timedelta(hours=2))
    assert second.status == "ok", second.reason
    sizes = [verify_receipt(o.receipt.to_bytes(), demo.signer.public_key).entry.payload["rewards"]["size"]
             for o in (first, second)]
    assert sizes == [capacity, capacity]
    assert len(site.ledger().charges(spec.study_id)) == len(charged) + 1
    # the plan counts at most C patients (its sample rate is batch / C)
    plan = site.ledger().plan(spec.study_id)
    assert plan is not None and plan.n_patients == capacity
    # a bad capacity in the node config is refused, naming the key
    with pytest.raises(SiteConfigError, match="reward-capacity"):
        Site.from_node_config({**site.node_config(), "reward-capacity": "100"})


class _Shift:
    """A decision-count noise source that adds a fixed integer (the mechanism's noise is tested
    in tests/node/test_decision_count.py)."""

    def __init__(self, shift: int) -> None:
        self.shift = shift

    def discrete_laplace(self, epsilon: float) -> int:
        return self.shift


def _plan_released(demo: DemoSite, study_id: str, shift: int, revoked: str | None) -> tuple[Any, Any]:
    """Draw the study's decision count with a fixed noise `shift` (after revoking `revoked`),
    train round 1, and return (the stored plan, the receipt's accounting)."""
    from federated.client_app import draw_decision

    spec = _spec(study_id)
    approve(demo.site, study_id)
    if revoked is not None:
        _revoke_one(demo, revoked, NOW - timedelta(hours=1))
    drawn = draw_decision(demo.site, spec, NOW, noise=_Shift(shift))
    assert not hasattr(drawn, "status"), drawn
    out = train_hospital_round(demo.site, spec, 1, initial_state(spec.template, len(spec.columns)), NOW)
    assert out.status == "ok" and out.receipt is not None, out.reason
    return demo.site.ledger().plan(study_id), out.receipt.accounting


def test_the_dp_plan_is_post_processing_of_the_noised_decision_count(tmp_path: Path) -> None:
    """Two cohorts that differ by one patient, whose decision counts came out equal (the exact
    count 1 lower, the noise 1 higher): the plans, and the noise multiplier and sample rate
    every receipt carries, are identical, so they reveal nothing beyond the charged noised count.
    (Sized from the exact count, as before, they differed.)"""
    sites = provision_sites(tmp_path / "sites", hospitals=("hospital-a", "hospital-b"))
    whole, less = sites["hospital-a"], sites["hospital-b"]
    train = less.site.records()[0].train()
    plan_a, released_a = _plan_released(whole, "s-plan", 0, None)
    decision_a = whole.site.ledger().decision("s-plan")
    # hospital-b has different records: give it the same cohort size as hospital-a, minus one
    sizes = {name: len(set(s.site.records()[0].pseudonyms)) for name, s in sites.items()}
    shift = sizes["hospital-a"] - (sizes["hospital-b"] - 1)
    plan_b, released_b = _plan_released(less, "s-plan", shift, train.pseudonyms[0])
    decision_b = less.site.ledger().decision("s-plan")
    assert decision_a is not None and decision_b is not None
    assert decision_b.patients == sizes["hospital-b"] - 1 != decision_a.patients
    assert decision_a.noisy_count == decision_b.noisy_count
    assert plan_a == plan_b and released_a == released_b
    assert released_a["noise_multiplier"] == plan_a.noise_multiplier
    assert released_a["sample_rate"] == plan_a.sample_rate


def test_a_revocation_of_every_patient_between_rounds_is_not_visible(demo: DemoSite) -> None:
    """Round 2 after every training patient revoked (the last revocation included): the round
    still answers ok, with the same public fields, tree size, metric names and no reason, and an
    update of the same scale (noise alone, scaled by the plan's expected batch): before, the
    status turned to "no-data" as soon as nobody was left."""
    spec = _spec("s-all-revoke")
    approve(demo.site, spec.study_id)
    weights = initial_state(spec.template, len(spec.columns))
    first = train_hospital_round(demo.site, spec, 1, weights, NOW)
    train = demo.site.records()[0].train()
    path = demo.site.contracts_path
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    at = NOW + timedelta(hours=1)
    lines += [json.dumps(sign(revoke(demo.contracts[p], at), demo.consent_issuer).to_json())
              for p in sorted(set(train.pseudonyms))]
    path.write_text("\n".join(lines) + "\n")
    assert not demo.site.gate(spec.request, train.pseudonyms, NOW + timedelta(hours=2)).eligible
    second = train_hospital_round(demo.site, spec, 2, weights, NOW + timedelta(hours=2))
    assert first.status == second.status == "ok", (first.reason, second.reason)
    assert first.reason == second.reason == ""
    a, b = (verify_receipt(o.receipt.to_bytes(), demo.signer.public_key).entry.payload
            for o in (first, second))
    assert {k: a[k] for k in PUBLIC} == {k: b[k] for k in PUBLIC}
    assert a["rewards"]["size"] == b["rewards"]["size"]
    assert set(first.metrics) == set(second.metrics)
    assert second.weights is not None and float(abs(second.weights - weights).max()) > 0  # noise moved it
    # nobody was charged for round 2: no training patient took part
    with demo.site.ledger().engine.connect() as conn:
        units = {u for (u,) in conn.exec_driver_sql(
            "SELECT units FROM privacy_patient_spend WHERE study_id = 's-all-revoke'").all()}
    plan = demo.site.ledger().plan(spec.study_id)
    assert plan is not None and units == {plan.steps_per_round}
