"""Hypothesis properties: gating == naive per-record evaluation; deny wins; order independence;
revoked or inactive contracts never permit."""

from __future__ import annotations

import json
import random
from datetime import datetime

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consent.evaluate import evaluate
from consent.gate import RecordColumns, commitment, gate, gate_naive
from consent.model import Contract, Provision, revoke
from consent.request import StudyRequest
from tests.consent.strategies import contracts, instants, provisions, requests

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def record_sets(draw: st.DrawFn) -> tuple[list[tuple[str, str]], dict[str, Contract]]:
    pool = draw(st.lists(contracts(), min_size=1, max_size=6))
    by_hash = {c.content_hash: c for c in pool}
    hashes = [*by_hash, "f" * 64]  # one hash without a contract
    records = []
    for _ in range(draw(st.integers(0, 40))):
        key = draw(st.sampled_from(hashes))
        owner = by_hash[key].pseudonym if key in by_hash else "p9"
        # mostly the contract's own pseudonym, sometimes another one (must be excluded)
        pseudonym = owner if draw(st.integers(0, 5)) else draw(st.sampled_from(("p1", "p2", "p9")))
        records.append((pseudonym, key))
    return records, by_hash


@SETTINGS
@given(record_sets(), requests(), instants)
def test_gate_equals_naive(
    data: tuple[list[tuple[str, str]], dict[str, Contract]], request: StudyRequest, instant: datetime
) -> None:
    records, by_hash = data
    fast = gate(records, by_hash, request, instant)
    naive = gate_naive(records, by_hash, request, instant)
    assert fast.eligible.tolist() == naive.eligible.tolist()
    assert fast.eligible_pseudonyms == naive.eligible_pseudonyms
    assert fast.excluded_by_reason == naive.excluded_by_reason
    assert fast.commitment == naive.commitment
    assert fast.reward_accounts == naive.reward_accounts
    assert fast.records_used + sum(fast.excluded_by_reason.values()) == len(records)
    # the column form gives the same answer
    columns = RecordColumns([p for p, _ in records], [h for _, h in records])
    assert gate(columns, by_hash, request, instant).commitment == fast.commitment


@SETTINGS
@given(record_sets(), requests(), instants, st.randoms(use_true_random=False))
def test_order_independent(
    data: tuple[list[tuple[str, str]], dict[str, Contract]],
    request: StudyRequest,
    instant: datetime,
    rnd: random.Random,
) -> None:
    records, by_hash = data
    shuffled = list(records)
    rnd.shuffle(shuffled)
    a = gate(records, by_hash, request, instant)
    b = gate(shuffled, by_hash, request, instant)
    assert a.commitment == b.commitment
    assert a.excluded_by_reason == b.excluded_by_reason
    assert a.eligible_pseudonyms == b.eligible_pseudonyms


@SETTINGS
@given(contracts(), requests(), instants)
def test_an_applicable_deny_always_wins(contract: Contract, request: StudyRequest, instant: datetime) -> None:
    root = contract.provision
    with_deny = contract.model_copy(
        update={
            "provision": root.model_copy(update={"provisions": (*root.provisions, Provision(type="deny"))})
        }
    )
    with_deny = Contract.model_validate(with_deny.model_dump())
    assert not evaluate(with_deny, request, instant).permit
    # a deny leaf under any applicable permit path also wins: wrap the whole tree in a permit root
    wrapped = Contract.model_validate(
        {
            **contract.model_dump(),
            "provision": Provision(
                type="permit",
                provisions=(root, Provision(type="deny", data_categories=request.data_categories[:1])),
            ),
        }
    )
    assert not evaluate(wrapped, request, instant).permit


@SETTINGS
@given(contracts(), requests(), instants)
def test_revoked_or_inactive_never_permits(
    contract: Contract, request: StudyRequest, instant: datetime
) -> None:
    revoked = revoke(contract, contract.issued)
    assert revoked.permits_nothing()
    assert not evaluate(revoked, request, instant).permit
    for status in ("inactive", "draft", "rejected", "entered-in-error"):
        inactive = Contract.model_validate({**contract.model_dump(), "status": status})
        decision = evaluate(inactive, request, instant)
        assert not decision.permit and decision.exclusion == "inactive"


@SETTINGS
@given(provisions(), requests(), instants)
def test_sibling_order_does_not_matter(root: Provision, request: StudyRequest, instant: datetime) -> None:
    def reverse(node: Provision) -> Provision:
        return node.model_copy(update={"provisions": tuple(reverse(c) for c in reversed(node.provisions))})

    base = {"contract_id": "c", "pseudonym": "p", "hospital": "h", "version": 1, "issued": instant}
    a = Contract.model_validate({**base, "provision": root})
    b = Contract.model_validate({**base, "provision": reverse(root)})
    assert evaluate(a, request, instant).permit == evaluate(b, request, instant).permit


def test_commitment_reference_definition() -> None:
    import hashlib

    pairs = [("p2", "b" * 64), ("p1", "a" * 64), ("p2", "b" * 64)]
    expected = hashlib.sha256(b"consent-gate/1\n" + f"p1\t{'a' * 64}\np2\t{'b' * 64}\n".encode()).hexdigest()
    assert commitment(pairs) == expected
    assert commitment([]) == hashlib.sha256(b"consent-gate/1\n").hexdigest()


@SETTINGS
@given(contracts(), requests(), instants)
def test_json_round_trip_keeps_hash_and_decision(
    contract: Contract, request: StudyRequest, instant: datetime
) -> None:
    again = Contract.from_json(json.dumps(contract.to_json()))
    assert again.content_hash == contract.content_hash
    assert evaluate(again, request, instant) == evaluate(contract, request, instant)
    request_again = StudyRequest.model_validate_json(json.dumps(request.to_json()))
    assert evaluate(contract, request_again, instant) == evaluate(contract, request, instant)
