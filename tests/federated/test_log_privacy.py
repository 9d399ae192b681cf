"""What leaves a hospital in a receipt cannot show one patient: the attacks of issue 14 on the
log (a single revocation read from the counts, revoked pseudonyms brute-forced from the
consent commitment, the same cohort linked across studies) must fail, while the hospital's own
key still lets an auditor it authorises check the commitment."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from consent.gate import commitment
from consent.model import revoke, sign
from federated.client_app import train_hospital_round
from federated.dp import initial_state
from federated.receipts import verify_receipt
from federated.runtime.demo_sites import DemoSite, approve, demo_spec, provision_sites
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
