"""Apportionment and the payout function: exact sums, order independence, the bounds of fairness."""

from __future__ import annotations

import random
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.apportion import apportion
from audit.rewards import PayoutError, Receipt, StudyTerms, compute_payout, payout_credits, payout_pools

ids = st.text(alphabet="abcdefgh", min_size=1, max_size=3)
weight_maps = st.dictionaries(ids, st.integers(0, 10**6), min_size=1, max_size=12).filter(
    lambda weights: sum(weights.values()) > 0)


@settings(max_examples=300, deadline=None)
@given(total=st.integers(0, 10**12), weights=weight_maps, seed=st.integers(0, 2**32))
def test_apportion_sums_exactly_order_independent_and_within_one(
        total: int, weights: dict[str, int], seed: int) -> None:
    shares = apportion(total, weights)
    assert sum(shares.values()) == total
    assert shares.keys() == weights.keys()
    whole = sum(weights.values())
    for name, weight in weights.items():
        quota = Fraction(total * weight, whole)
        assert quota - 1 < shares[name] < quota + 1  # never more than one unit off its exact quota
        if weight == 0:
            assert shares[name] == 0
    shuffled = list(weights.items())
    random.Random(seed).shuffle(shuffled)
    assert apportion(total, dict(shuffled)) == shares


@settings(max_examples=200, deadline=None)
@given(total=st.integers(0, 10**9), weights=weight_maps)
def test_apportion_left_over_units_go_to_largest_remainders(total: int, weights: dict[str, int]) -> None:
    shares = apportion(total, weights)
    whole = sum(weights.values())
    bumped = {name for name in weights if shares[name] > total * weights[name] // whole}
    kept = set(weights) - bumped
    for up in bumped:
        for down in kept:
            r_up = total * weights[up] % whole
            r_down = total * weights[down] % whole
            assert (r_up, down) > (r_down, up)  # larger remainder, or equal and smaller id


def test_apportion_ties_by_id_and_examples() -> None:
    assert apportion(1, {"b": 1, "a": 1}) == {"b": 0, "a": 1}
    assert apportion(2, {"c": 1, "b": 1, "a": 1}) == {"c": 0, "b": 1, "a": 1}
    assert apportion(9500, {"hospital:a": 220, "hospital:b": 170, "hospital:c": 13}) == {
        "hospital:a": 5186, "hospital:b": 4007, "hospital:c": 307}
    assert apportion(0, {"a": 0}) == {"a": 0}


@pytest.mark.parametrize(("total", "weights", "message"), [
    (-1, {"a": 1}, "total:"),
    (1.5, {"a": 1}, "total:"),
    (True, {"a": 1}, "total:"),
    (3, {"a": -1, "b": 2}, "weights['a']:"),
    (3, {"a": 1.0}, "weights['a']:"),
    (3, {"a": 0}, "weights: sum to 0"),
])
def test_apportion_refuses_bad_input(total: object, weights: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        apportion(total, weights)  # type: ignore[arg-type]


receipt_lists = st.lists(
    st.builds(lambda rnd, hospital, used, named: (rnd, hospital, used, named),
              st.integers(1, 5), st.sampled_from(["hospital:a", "hospital:b", "hospital:c"]),
              st.integers(0, 500),
              st.dictionaries(st.sampled_from(["reward:p1", "reward:p2", "reward:p3"]),
                              st.integers(1, 100), max_size=3)),
    min_size=1, max_size=12)


@settings(max_examples=200, deadline=None)
@given(amount=st.integers(1, 10**12), royalty_bps=st.integers(0, 10000),
       forward_bps=st.integers(0, 10000), raw=receipt_lists, seed=st.integers(0, 2**32))
def test_payout_conserves_and_ignores_receipt_order(
        amount: int, royalty_bps: int, forward_bps: int,
        raw: list[tuple[int, str, int, dict[str, int]]], seed: int) -> None:
    receipts = []
    for rnd, hospital, used, named in raw:
        receipts.append(Receipt("s", rnd, hospital, max(used, sum(named.values()))))
    terms = StudyTerms("author:x", royalty_bps, forward_bps)
    if sum(r.records_used for r in receipts) == 0:
        with pytest.raises(PayoutError, match="hospitals: no receipt"):
            compute_payout("s", amount, terms, receipts)
        return
    payout = compute_payout("s", amount, terms, receipts)
    assert payout["royalty"]["amount"] == amount * royalty_bps // 10000
    assert sum(part["amount"] for part in payout["hospitals"]) == amount - payout["royalty"]["amount"]
    assert sum(payout_credits(payout).values()) + sum(payout_pools(payout).values()) == amount
    for part in payout["hospitals"]:
        assert part["pool"] + part["kept"] == part["amount"]
        assert part["pool"] == part["amount"] * forward_bps // 10000
        assert sum(item["pool"] for item in part["pools"]) == part["pool"]
        assert all(item["pool"] >= 0 for item in part["pools"])
    shuffled = list(receipts)
    random.Random(seed).shuffle(shuffled)
    assert compute_payout("s", amount, terms, shuffled) == payout


def test_payout_without_forwarding_stays_with_hospital() -> None:
    payout = compute_payout("s", 1000, StudyTerms(None, 0, 0), [Receipt("s", 1, "hospital:a", 10)])
    assert payout == {"study_id": "s", "amount": 1000, "royalty": None,
                      "hospitals": [{"hospital": "hospital:a", "records": 10, "amount": 1000,
                                     "kept": 1000, "pool": 0,
                                     "pools": [{"round": 1, "records": 10, "pool": 0}]}]}


def test_full_forwarding_goes_entirely_to_the_claim_pools_by_round() -> None:
    payout = compute_payout("s", 1001, StudyTerms(None, 0, 10000),
                            [Receipt("s", 1, "hospital:a", 2), Receipt("s", 2, "hospital:a", 2),
                             Receipt("s", 3, "hospital:a", 0)])
    assert payout["hospitals"][0]["kept"] == 0
    assert payout["hospitals"][0]["pools"] == [{"round": 1, "records": 2, "pool": 501},
                                               {"round": 2, "records": 2, "pool": 500}]
    assert payout_credits(payout) == {"hospital:a": 0}


def test_payout_refuses_bad_inputs() -> None:
    with pytest.raises(PayoutError, match="royalty_bps: must be 0"):
        StudyTerms(None, 5, 0)
    with pytest.raises(PayoutError, match="forward_bps: must be an integer in"):
        StudyTerms(None, 0, 10001)
    with pytest.raises(PayoutError, match="amount: must be an integer"):
        compute_payout("s", 0, StudyTerms(None, 0, 0), [Receipt("s", 1, "hospital:a", 1)])
    with pytest.raises(PayoutError, match=r"receipts\[0\].study_id"):
        compute_payout("s", 5, StudyTerms(None, 0, 0), [Receipt("t", 1, "hospital:a", 1)])
