"""Property tests over random event sequences, folded through the real ledger with signed entries.

A plain mirror model (dicts and ints, no apportionment) predicts for every generated event
whether the ledger must accept it and what the balances become; the ledger must agree exactly,
keep `minted == sum(balances) + escrow` with no negative balance after every entry, leave its
state untouched when it refuses, and refund exactly what was not paid out.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from hypothesis import event as event_note
from hypothesis import given, settings
from hypothesis import strategies as st

from audit.entry import Entry
from audit.ledger import Ledger, LedgerError
from audit.rewards import payout_credits, payout_pools
from tests.audit.test_ledger_support import World

ACCOUNTS = ["org:a", "org:b", "org:c"]
HOSPITALS = ["hospital:x", "hospital:y", "hospital:z"]
REWARDS = ["reward:p1", "reward:p2", "reward:p3", "reward:p4"]
STUDIES = ["s-1", "s-2", "s-3"]

amounts = st.integers(1, 5000)
escrows = st.tuples(st.just("escrow"), st.sampled_from(STUDIES), st.sampled_from(ACCOUNTS), amounts,
                    st.integers(0, 10000), st.integers(0, 10000), st.booleans())
receipts = st.tuples(st.just("receipt"), st.sampled_from(STUDIES), st.integers(1, 3),
                     st.sampled_from(HOSPITALS), st.integers(0, 300),
                     st.dictionaries(st.sampled_from(REWARDS), st.integers(1, 100), max_size=3))
events = st.one_of(
    st.tuples(st.just("mint"), st.sampled_from(ACCOUNTS), amounts),
    st.tuples(st.just("transfer"), st.sampled_from(ACCOUNTS), st.sampled_from(ACCOUNTS), amounts),
    escrows,
    receipts,
    st.tuples(st.just("payout"), st.sampled_from(STUDIES), st.integers(1, 8)),
    st.tuples(st.just("tampered_payout"), st.sampled_from(STUDIES), st.integers(0, 1000)),
    st.tuples(st.just("refund"), st.sampled_from(STUDIES), st.sampled_from([0, 0, 0, -1, 1])),
)
# Funding and studies first, so that the random part reaches payouts and refunds often.
sequences = st.builds(
    lambda opening, studies, work, rest: opening + studies + work + rest,
    st.lists(st.tuples(st.just("mint"), st.sampled_from(ACCOUNTS), st.integers(1000, 20000)),
             min_size=1, max_size=3),
    st.lists(escrows, min_size=1, max_size=3),
    st.lists(receipts, min_size=0, max_size=8),
    st.lists(events, min_size=5, max_size=40))


@dataclass
class MirrorStudy:
    account: str
    escrowed: int
    paid: int = 0
    refunded: int = 0
    payouts: int = 0
    closed: bool = False
    records: int = 0
    seen: set[tuple[int, str]] = field(default_factory=set)

    @property
    def held(self) -> int:
        return self.escrowed - self.paid - self.refunded


@dataclass
class Mirror:
    minted: int = 0
    unclaimed: int = 0
    balances: dict[str, int] = field(default_factory=dict)
    studies: dict[str, MirrorStudy] = field(default_factory=dict)

    def credit(self, account: str, amount: int) -> None:
        self.balances[account] = self.balances.get(account, 0) + amount

    def json(self) -> dict[str, Any]:
        escrow = sum(study.held for study in self.studies.values())
        return {"minted": self.minted, "escrow": escrow, "unclaimed": self.unclaimed,
                "balances": dict(sorted(self.balances.items()))}


def _tamper(payload: dict[str, Any], pick: int) -> dict[str, Any]:
    """A copy of a correct payout with one amount changed by one unit (chosen by `pick`)."""
    tampered = copy.deepcopy(payload)
    spots: list[tuple[dict[str, Any], str]] = []
    if tampered["royalty"] is not None:
        spots.append((tampered["royalty"], "amount"))
    for part in tampered["hospitals"]:
        spots.extend([(part, "amount"), (part, "kept")])
        spots.extend((item, "pool") for item in part["pools"])
    parent, key = spots[pick % len(spots)]
    parent[key] += 1 if pick % 2 else -1
    return tampered


@settings(max_examples=400, deadline=None)
@given(sequence=sequences)
def test_random_sequences_fold_like_the_mirror(sequence: list[tuple[Any, ...]]) -> None:
    world = World()
    for account in ACCOUNTS:
        world.key(account, "researcher")
    for hospital in HOSPITALS:
        world.key(hospital, "hospital")
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    mirror = Mirror()
    accepted = refused = 0

    for event in sequence:
        kind = event[0]
        expect_ok: bool
        entry: Entry | None = None
        on_accept: Any = None
        if kind == "mint":
            _, account, amount = event
            entry = world.mint(account, amount)
            expect_ok = True

            def on_accept(account: str = account, amount: int = amount) -> None:
                mirror.minted += amount
                mirror.credit(account, amount)
        elif kind == "transfer":
            _, source, target, amount = event
            entry = world.transfer(source, target, amount)
            expect_ok = source != target and mirror.balances.get(source, 0) >= amount

            def on_accept(source: str = source, target: str = target, amount: int = amount) -> None:
                mirror.credit(source, -amount)
                mirror.credit(target, amount)
        elif kind == "escrow":
            _, sid, account, amount, royalty_bps, forward_bps, has_royalty = event
            entry = world.escrow(sid, account, amount, "author:t" if has_royalty else None,
                                 royalty_bps if has_royalty else 0, forward_bps)
            expect_ok = sid not in mirror.studies and mirror.balances.get(account, 0) >= amount

            def on_accept(sid: str = sid, account: str = account, amount: int = amount) -> None:
                mirror.credit(account, -amount)
                mirror.studies[sid] = MirrorStudy(account, amount)
        elif kind == "receipt":
            _, sid, rnd, hospital, used, named = event
            used = max(used, sum(named.values()))
            entry = world.receipt(sid, rnd, hospital, used, named)
            study = mirror.studies.get(sid)
            expect_ok = (study is not None and not study.closed and study.payouts == 0
                         and (rnd, hospital) not in study.seen)

            def on_accept(sid: str = sid, rnd: int = rnd, hospital: str = hospital,
                          used: int = used) -> None:
                mirror.studies[sid].seen.add((rnd, hospital))
                mirror.studies[sid].records += used
        elif kind in ("payout", "tampered_payout"):
            sid = event[1]
            study = mirror.studies.get(sid)
            if study is None or study.closed or study.payouts or study.records == 0:
                # nothing payable: the ledger must refuse any payout attempt
                entry = world.payout({"study_id": sid, "amount": 1, "royalty": None, "hospitals": []})
                expect_ok = False
            else:
                amount = max(1, study.held * event[2] // 8) if kind == "payout" else study.held
                payload = ledger.expected_payout(sid, amount)
                assert sum(payout_credits(payload).values()) + sum(payout_pools(payload).values()) == amount
                if kind == "tampered_payout":
                    payload = _tamper(payload, event[2])
                entry = world.payout(payload)
                expect_ok = kind == "payout"

                def on_accept(sid: str = sid, payload: dict[str, Any] = payload) -> None:
                    for account, credit in payout_credits(payload).items():
                        mirror.credit(account, credit)
                    mirror.unclaimed += sum(payout_pools(payload).values())
                    study = mirror.studies[sid]
                    study.paid += payload["amount"]
                    study.payouts += 1
                    study.closed = study.held == 0
        else:  # refund
            _, sid, delta = event
            study = mirror.studies.get(sid)
            account = study.account if study else "org:a"
            amount = (study.held if study else 1) + delta
            entry = world.refund(sid, account, amount)
            expect_ok = study is not None and not study.closed and delta == 0 and amount > 0

            def on_accept(sid: str = sid, amount: int = amount) -> None:
                study = mirror.studies[sid]
                assert amount == study.escrowed - study.paid  # exactly what was not paid out
                study.refunded += amount
                study.closed = True
                mirror.credit(study.account, amount)

        world.feed(ledger, len(world.entries) - 1)  # any key registrations the helper added
        index = len(world.entries) - 1
        before = copy.deepcopy(ledger.state.to_json())
        try:
            ledger.apply(entry, index)
        except LedgerError as exc:
            assert not expect_ok, f"{event}: refused but the mirror accepts it: {exc.reason}"
            assert exc.index == index
            assert ledger.state.to_json() == before
            world.drop_last()
            refused += 1
        else:
            assert expect_ok, f"{event}: accepted but the mirror refuses it"
            on_accept()
            event_note(f"accepted {kind}")
            world.fed = len(world.entries)
            accepted += 1
        ledger.state.check_conservation()
        assert ledger.state.to_json() == mirror.json()
        for sid, study in mirror.studies.items():
            assert ledger.studies[sid].held == study.held

    assert accepted + refused == len(sequence)


@settings(max_examples=40, deadline=None)
@given(sequence=sequences)
def test_refolding_the_accepted_log_gives_the_same_state(sequence: list[tuple[Any, ...]]) -> None:
    """Determinism: the log that was accepted folds to the same state from scratch, twice."""
    world = World()
    for hospital in HOSPITALS:
        world.key(hospital, "hospital")
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    for event in sequence:
        if event[0] == "mint":
            world.mint(event[1], event[2])
        elif event[0] == "transfer":
            world.transfer(event[1], event[2], event[3])
        elif event[0] == "escrow":
            world.escrow(event[1], event[2], event[3], None, 0, event[5])
        elif event[0] == "receipt":
            world.receipt(event[1], event[2], event[3], max(event[4], sum(event[5].values())), event[5])
        elif event[0] == "payout":
            try:
                study = ledger.studies[event[1]]
                world.payout(ledger.expected_payout(event[1], study.held))
            except (KeyError, ValueError):
                continue
        else:
            study_state = ledger.studies.get(event[1])
            if study_state is None:
                continue
            world.refund(event[1], study_state.account, study_state.held)
        world.feed(ledger, len(world.entries) - 1)
        try:
            ledger.apply(world.entries[-1], len(world.entries) - 1)
            world.fed = len(world.entries)
        except LedgerError:
            world.drop_last()
    first = Ledger(world.operator.key_id).apply_all(world.entries).to_json()
    second = Ledger().apply_all(world.entries).to_json()
    assert first == second == ledger.state.to_json()
