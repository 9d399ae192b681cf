"""Shared builders for the ledger tests: real Ed25519 keys and signed envelopes (no tests here).

Kept in a `test_ledger*` module because the rewards area owns only those test files; pytest
collects it and finds nothing to run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from audit import ledger as ledger_module
from audit.claim_pools import ClaimPools
from audit.entry import Entry, sign_entry
from audit.ledger import Ledger
from audit.reward_commitment import Opening, claim_amount, commit
from audit.signing import Signer

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture(params=["memory", "spilled"])
def pool_store(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a claims test twice: pools in memory (the coordinator's fold), and spilled to the
    temporary SQLite file from the first pool on (the auditor's fold of a long export)."""
    if request.param == "spilled":
        monkeypatch.setattr(ledger_module, "ClaimPools", lambda spill_after=None: ClaimPools(0))
    return str(request.param)


@dataclass
class World:
    """A root operator plus registered keys, and the entries signed so far (in log order)."""

    operator: Signer = field(default_factory=Signer.generate)
    coordinator: Signer = field(default_factory=Signer.generate)
    keys: dict[str, Signer] = field(default_factory=dict)
    entries: list[Entry] = field(default_factory=list)
    fed: int = 0
    openings: dict[tuple[str, str, int], dict[str, Opening]] = field(default_factory=dict)
    #: added to every later entry's time (a test moves the clock past a claim window with it)
    later: timedelta = timedelta(0)

    def __post_init__(self) -> None:
        self.register(self.coordinator, "coordinator", "operator:exchange")

    def feed(self, ledger: Ledger, stop: int | None = None) -> None:
        """Apply to `ledger` the entries it has not seen yet, up to `stop` (default: all)."""
        stop = len(self.entries) if stop is None else stop
        for index in range(self.fed, stop):
            ledger.apply(self.entries[index], index)
        self.fed = max(self.fed, stop)

    def drop_last(self) -> None:
        """Forget the last entry (a refused one never stands in the log)."""
        self.entries.pop()
        self.fed = min(self.fed, len(self.entries))

    def sign(self, signer: Signer, kind: str, payload: dict[str, Any]) -> Entry:
        entry = sign_entry(signer, kind, payload, T0 + self.later + timedelta(seconds=len(self.entries)))
        self.entries.append(entry)
        return entry

    def register(self, signer: Signer, role: str, owner: str) -> Entry:
        self.keys[owner] = signer
        return self.sign(self.operator, "key.register",
                         {"key_id": signer.key_id, "public_key": signer.public_key_b64,
                          "role": role, "owner": owner})

    def key(self, owner: str, role: str) -> Signer:
        """The key of `owner`, registering one with `role` on first use."""
        if owner not in self.keys:
            self.register(Signer.generate(), role, owner)
        return self.keys[owner]

    def mint(self, account: str, amount: int) -> Entry:
        return self.sign(self.operator, "token.mint", {"account": account, "amount": amount})

    def transfer(self, source: str, target: str, amount: int) -> Entry:
        return self.sign(self.key(source, "researcher"), "token.transfer",
                         {"from": source, "to": target, "amount": amount})

    def escrow(self, study_id: str, account: str, amount: int, royalty_account: str | None = None,
               royalty_bps: int = 0, forward_bps: int = 0,
               unclaimed: dict[str, Any] | None = None) -> Entry:
        """A `study.escrow`; `unclaimed` ({"after_s", "to"}) sets its claim window (None: none)."""
        payload: dict[str, Any] = {"study_id": study_id, "account": account, "amount": amount,
                                   "royalty_account": royalty_account, "royalty_bps": royalty_bps,
                                   "forward_bps": forward_bps}
        if unclaimed is not None:
            payload["unclaimed"] = unclaimed
        return self.sign(self.coordinator, "study.escrow", payload)

    def receipt(self, study_id: str, round_number: int, hospital: str, records_used: int,
                reward_accounts: dict[str, int] | None = None, size: int = 8) -> Entry:
        """A receipt committing to `reward_accounts` ({account: patients}); the openings are kept
        in `self.openings[(study_id, hospital, round)]` as the hospital would."""
        commitment = commit(reward_accounts or {}, minimum_size=size)
        self.openings[(study_id, hospital, round_number)] = {o.account: o for o in commitment.openings}
        return self.sign(self.key(hospital, "hospital"), "round.receipt",
                         {"study_id": study_id, "round": round_number, "hospital": hospital,
                          "records_used": records_used, "rewards": commitment.public(),
                          "commitment": "sha256:" + "0" * 64, "epsilon_spent": 0.25})

    def claim(self, study_id: str, hospital: str, round_number: int, account: str,
              amount: int | None = None, pool: int | None = None, **override: Any) -> Entry:
        """The coordinator's `reward.claim` for `account`'s leaf (amount: what `pool` pays it)."""
        opening = self.openings[(study_id, hospital, round_number)][account]
        if amount is None:
            assert pool is not None
            amount = claim_amount(pool, opening.units)
        payload = {"study_id": study_id, "hospital": hospital, "round": round_number,
                   "holder": opening.holder, "units": opening.units, "index": opening.index,
                   "proof": list(opening.proof), "amount": amount}
        payload.update(override)
        return self.sign(self.coordinator, "reward.claim", payload)

    def sweep(self, study_id: str, hospital: str, round_number: int, amount: int, to: str) -> Entry:
        return self.sign(self.coordinator, "reward.sweep",
                         {"study_id": study_id, "hospital": hospital, "round": round_number,
                          "amount": amount, "to": to})

    def payout(self, payload: dict[str, Any]) -> Entry:
        return self.sign(self.coordinator, "study.payout", payload)

    def refund(self, study_id: str, account: str, amount: int) -> Entry:
        return self.sign(self.coordinator, "study.refund",
                         {"study_id": study_id, "account": account, "amount": amount})


def paid_world(round_two: dict[str, int], unclaimed: dict[str, Any] | None = None) -> tuple[World, Ledger]:
    """One study paid out, the set-up the claims and sweep tests share: 1,000 tokens minted to
    org:acme, 800 escrowed for s-1 (`unclaimed`: its claim window, None: none), hospital:a's
    receipts for round 1 (reward:p1 1, p2 2, p3 1) and round 2 (`round_two`), then the payout."""
    world = World()
    world.mint("org:acme", 1000)
    world.escrow("s-1", "org:acme", 800, None, 0, 5000, unclaimed=unclaimed)
    world.receipt("s-1", 1, "hospital:a", 40, {"reward:p1": 1, "reward:p2": 2, "reward:p3": 1})
    world.receipt("s-1", 2, "hospital:a", 40, round_two)
    ledger = Ledger(world.operator.key_id)
    world.feed(ledger)
    world.payout(ledger.expected_payout("s-1", 800))
    world.feed(ledger)
    return world, ledger
