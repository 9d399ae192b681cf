"""Throughput of the token ledger fold vs a plain dict-increment loop over the same movements.

    .venv/bin/python -m tests.bench.bench_ledger            # 200,000 entries
    .venv/bin/python -m tests.bench.bench_ledger --quick    # 20,000 entries

A realistic token history is generated once (not timed): mints, transfers, and studies
(escrow, 1-5 rounds of hospital receipts committing to reward accounts, payout of all or part of the
escrow, refund of the rest). Entries are built without signatures: the ledger does not check
them (the keyring does), so signing would only slow the set-up.

Timed, best of `--repeat` runs over the same entries:
- the fold: `Ledger(root).apply(entry, i)` for every entry (validation of every field, signer
  roles, receipt bookkeeping, the payout recomputed by largest-remainder apportionment and
  compared field by field, the conservation check);
- the baseline: a plain loop adding each entry's precomputed balance deltas into a dict, i.e.
  the bare arithmetic with no checks at all.
The ratio (fold / baseline) is the price of the checks per entry. The generated input is frozen
out of the cyclic GC's sight (`gc.freeze()`), as it would not be in memory in a streaming verifier.
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from collections import Counter
from typing import Any

from audit.entry import Entry
from audit.ledger import Ledger
from audit.rewards import payout_credits

TIME = "2026-01-01T00:00:00.000000Z"


def _entry(key_id: str, kind: str, payload: dict[str, Any]) -> Entry:
    return Entry(kind=kind, key_id=key_id, time=TIME, payload=payload, signature="unsigned")


def generate(count: int, seed: int = 1) -> tuple[str, list[Entry], list[list[tuple[str, int]]]]:
    """(root key id, entries, per-entry balance deltas) for a valid history of `count` entries."""
    rng = random.Random(seed)
    root = "root-operator"
    orgs = [f"org:r{i:03d}" for i in range(50)]
    hospitals = [f"hospital:h{i:02d}" for i in range(20)]
    entries: list[Entry] = []
    ledger = Ledger(root)

    def add(entry: Entry) -> None:
        ledger.apply(entry, len(entries))
        entries.append(entry)

    add(_entry(root, "key.register", {"key_id": "coord", "public_key": "-", "role": "coordinator",
                                      "owner": "operator:exchange"}))
    for owner in orgs + hospitals:
        role = "hospital" if owner.startswith("hospital:") else "researcher"
        add(_entry(root, "key.register", {"key_id": f"k-{owner}", "public_key": "-", "role": role,
                                          "owner": owner}))
    for org in orgs:
        add(_entry(root, "token.mint", {"account": org, "amount": 10_000_000}))
    study = 0
    while len(entries) < count:
        roll = rng.random()
        if roll < 0.5:
            source, target = rng.sample(orgs, 2)
            amount = rng.randint(1, 1000)
            if ledger.balance(source) < amount:
                add(_entry(root, "token.mint", {"account": source, "amount": 10_000_000}))
            add(_entry(f"k-{source}", "token.transfer", {"from": source, "to": target, "amount": amount}))
            continue
        study += 1
        sid = f"s-{study:07d}"
        org = rng.choice(orgs)
        amount = rng.randint(1_000, 100_000)
        if ledger.balance(org) < amount:
            add(_entry(root, "token.mint", {"account": org, "amount": 10_000_000}))
        add(_entry("coord", "study.escrow", {
            "study_id": sid, "account": org, "amount": amount,
            "royalty_account": "author:lr", "royalty_bps": 500, "forward_bps": 3000}))
        taking = rng.sample(hospitals, rng.randint(1, 6))
        for rnd in range(1, rng.randint(1, 5) + 1):
            for hospital in taking:
                used = rng.randint(1, 500)
                # the reward commitment's root (no claims here: bench_reward_claims times them)
                root_hex = rng.randbytes(32).hex()
                add(_entry(f"k-{hospital}", "round.receipt", {
                    "study_id": sid, "round": rnd, "hospital": hospital, "records_used": used,
                    "rewards": {"root": root_hex, "size": 256}, "commitment": "-",
                    "epsilon_spent": 0.1}))
        paid = amount if rng.random() < 0.8 else rng.randint(1, amount)
        add(_entry("coord", "study.payout", ledger.expected_payout(sid, paid)))
        if paid < amount:
            add(_entry("coord", "study.refund", {"study_id": sid, "account": org,
                                                 "amount": amount - paid}))
    deltas = [_deltas(entry) for entry in entries]
    return root, entries, deltas


def _deltas(entry: Entry) -> list[tuple[str, int]]:
    payload = entry.payload
    if entry.kind == "token.mint":
        return [(payload["account"], payload["amount"])]
    if entry.kind == "token.transfer":
        return [(payload["from"], -payload["amount"]), (payload["to"], payload["amount"])]
    if entry.kind == "study.escrow":
        return [(payload["account"], -payload["amount"])]
    if entry.kind == "study.payout":
        return list(payout_credits(payload).items())
    if entry.kind == "study.refund":
        return [(payload["account"], payload["amount"])]
    return []


def fold(root: str, entries: list[Entry]) -> Ledger:
    ledger = Ledger(root)
    apply = ledger.apply
    for index, entry in enumerate(entries):
        apply(entry, index)
    return ledger


def baseline(deltas: list[list[tuple[str, int]]]) -> dict[str, int]:
    balances: dict[str, int] = {}
    for movement in deltas:
        for account, delta in movement:
            balances[account] = balances.get(account, 0) + delta
    return balances


def best(repeat: int, run: Any) -> tuple[float, Any]:
    times = []
    result = None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="20,000 entries instead of 200,000")
    parser.add_argument("--entries", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    count = args.entries or (20_000 if args.quick else 200_000)

    start = time.perf_counter()
    root, entries, deltas = generate(count)
    made = time.perf_counter() - start
    # The input is built once and held for both runs; freeze it so that the cyclic GC does not
    # rescan it on every collection (a streaming verifier holds one entry at a time).
    gc.collect()
    gc.freeze()
    kinds = Counter(entry.kind for entry in entries)
    print(f"entries: {len(entries)} (generated in {made:.1f} s): "
          + ", ".join(f"{kind} {n}" for kind, n in sorted(kinds.items())))

    fold_s, ledger = best(args.repeat, lambda: fold(root, entries))
    base_s, balances = best(args.repeat, lambda: baseline(deltas))
    ledger.state.check_conservation()
    assert {a: v for a, v in ledger.state.balances.items()} == balances, "fold and baseline disagree"

    moves = sum(len(d) for d in deltas)
    print(f"fold:     {fold_s:8.3f} s  {len(entries) / fold_s:12,.0f} entries/s  "
          f"({1e6 * fold_s / len(entries):.2f} us/entry)")
    print(f"baseline: {base_s:8.3f} s  {len(entries) / base_s:12,.0f} entries/s  "
          f"(plain dict increments, {moves} balance movements)")
    print(f"ratio fold/baseline: {fold_s / base_s:.1f}x")
    print(f"final: minted {ledger.state.minted}, escrow {ledger.state.escrow}, "
          f"{len(ledger.state.balances)} accounts, {len(ledger.studies)} studies")


if __name__ == "__main__":
    main()
