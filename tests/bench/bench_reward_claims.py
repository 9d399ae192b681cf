"""Cost of hiding reward accounts: salted Merkle commitments and claims vs naming accounts.

    .venv/bin/python -m tests.bench.bench_reward_claims            # 200 receipts of 200 patients
    .venv/bin/python -m tests.bench.bench_reward_claims --quick    # 20 receipts

Per receipt (a hospital's round), with 200 patients naming 150 reward accounts and a tree of 256:
- commit: `audit.reward_commitment.commit` (fresh salts, holders, RFC 6962 tree, proofs);
- baseline: what a receipt cost before: the canonical JSON of `{account: records}` in clear.
Per claim (the ledger fold of `reward.claim` entries, each with its inclusion proof checked):
- claim fold: `Ledger.apply` of every leaf's claim after the payout;
- baseline: the old payout's credit of the same accounts (one dict increment each).
Ratios are measured in the same run; best of `--repeat`.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from audit.entry import Entry
from audit.ledger import Ledger
from audit.reward_commitment import Commitment, claim_amount, commit
from audit.signing import canonical

TIME = "2026-01-01T00:00:00.000000Z"
PATIENTS, ACCOUNTS, SIZE = 200, 150, 256


def _entry(key_id: str, kind: str, payload: dict[str, Any]) -> Entry:
    return Entry(kind=kind, key_id=key_id, time=TIME, payload=payload, signature="unsigned")


def weights(i: int) -> dict[str, int]:
    named = {f"reward:h{i}-{j:03d}": 1 for j in range(ACCOUNTS)}
    for j in range(PATIENTS - ACCOUNTS):  # some accounts named by two patients
        named[f"reward:h{i}-{j:03d}"] += 1
    return named


def best(repeat: int, run: Callable[[], Any]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = run()
        times.append(time.perf_counter() - start)
    return min(times), result


def paid_ledger(commitments: list[Commitment]) -> tuple[Ledger, dict[int, int]]:
    ledger = Ledger("root")
    for entry in [
        _entry("root", "key.register", {"key_id": "coord", "public_key": "-", "role": "coordinator",
                                        "owner": "operator:exchange"}),
        _entry("root", "key.register", {"key_id": "h", "public_key": "-", "role": "hospital",
                                        "owner": "hospital:h"}),
        _entry("root", "token.mint", {"account": "org:a", "amount": 10_000_000}),
        _entry("coord", "study.escrow", {"study_id": "s", "account": "org:a", "amount": 10_000_000,
                                         "royalty_account": None, "royalty_bps": 0, "forward_bps": 10_000}),
    ]:
        ledger.apply(entry, 0)
    for rnd, c in enumerate(commitments, start=1):
        ledger.apply(_entry("h", "round.receipt", {"study_id": "s", "round": rnd, "hospital": "hospital:h",
                                                   "records_used": 640, "rewards": c.public()}), 0)
    ledger.apply(_entry("coord", "study.payout", ledger.expected_payout("s", 10_000_000)), 0)
    pools = {rnd: ledger.claim_pools[("s", "hospital:h", rnd)].pool for rnd in range(1, len(commitments) + 1)}
    return ledger, pools


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    receipts = 20 if args.quick else 200
    named = [weights(i) for i in range(receipts)]

    commit_s, commitments = best(args.repeat, lambda: [commit(w, minimum_size=SIZE) for w in named])
    clear_s, _ = best(args.repeat, lambda: [canonical(w) for w in named])
    print(f"commit:   {commit_s:8.3f} s  {1e3 * commit_s / receipts:8.2f} ms/receipt "
          f"({ACCOUNTS} accounts, tree of {SIZE})")
    print(f"baseline: {clear_s:8.3f} s  {1e3 * clear_s / receipts:8.2f} ms/receipt (accounts in clear)")
    print(f"ratio commit/baseline: {commit_s / clear_s:.1f}x")

    claims = [(rnd, o) for rnd, c in enumerate(commitments, start=1) for o in c.openings]

    def fold_claims() -> Ledger:
        ledger, pools = paid_ledger(commitments)
        for rnd, o in claims:
            ledger.apply(_entry("coord", "reward.claim", {
                "study_id": "s", "hospital": "hospital:h", "round": rnd, "holder": o.holder,
                "units": o.units, "index": o.index, "proof": list(o.proof),
                "amount": claim_amount(pools[rnd], o.units)}), 0)
        return ledger

    def credit_in_clear() -> dict[str, int]:
        balances: dict[str, int] = {}
        for rnd, o in claims:
            balances[o.account] = balances.get(o.account, 0) + rnd
        return balances

    setup_s, _ = best(args.repeat, lambda: paid_ledger(commitments))
    fold_s, ledger = best(args.repeat, fold_claims)
    base_s, _ = best(args.repeat, credit_in_clear)
    ledger.state.check_conservation()
    claim_s = max(fold_s - setup_s, 1e-9)
    print(f"claims:   {claim_s:8.3f} s  {len(claims) / claim_s:12,.0f} claims/s "
          f"({1e6 * claim_s / len(claims):.1f} us/claim, proof of {len(claims[0][1].proof)} hashes)")
    print(f"baseline: {base_s:8.3f} s  {len(claims) / base_s:12,.0f} credits/s (accounts in clear)")
    print(f"ratio claim/baseline: {claim_s / base_s:.0f}x; unclaimed left {ledger.state.unclaimed}")


if __name__ == "__main__":
    main()
