"""Several studies at once across one consortium, against the same studies one after another
(issue "Scale", item 2).

    .venv/bin/python -m tests.bench.bench_studies                          # 5 studies, 10 hospitals
    .venv/bin/python -m tests.bench.bench_studies --hospitals 5            # on a smaller machine
    .venv/bin/python -m tests.bench.bench_studies --quick      # 2 studies, 3 hospitals, 2 rounds

Each mode runs on a consortium of its own, built like the demo's (`exchange.demo.consortium`,
imported as `bench_scale` does: coordinator, TLS SuperLink with SuperNode authentication, one
`exchange node run` per hospital with its SuperNode and warm executor; the survival study on
flchain split non-IID; auto-approve, total privacy budget 20 per hospital, no revocations):
- at once: the `--studies` studies submitted together over the API, then followed until each
  has ended;
- one after another: the same studies, each submitted when the previous one ended.
Both consortia have the same configuration and the same data, so each study's work is the same.

Checked (reported, and the run exits 1 if one fails):
- every study completed;
- budgets: at every hospital, for every study, the privacy ledger's charges plus the study's
  decision count epsilon are exactly the cumulative epsilons its receipts in the coordinator's
  log state, round by round (nothing charged to another study, nothing twice), and the
  hospital's total spend is the sum of its studies' spends (`study_spent`: the decision count
  plus the larger of training and evaluation);
- reservations: sampled every second at every hospital while the studies run (the node's own
  `active_reservations` and budget, read from its database): only approved, unfinished studies
  of ours hold a reservation, spent + reserved never exceeds the total budget, and every
  reservation is released once the studies ended;
- rounds interleave (at once): from the `study.round` entries' times in the log, the rounds
  of different studies alternate (number of switches between studies in time order, and
  whether each study's rounds overlap another's span).
Timed: the wall time of each mode (first submission to the last study's end), its ratio, the
mean time per study, and the peak RSS per hospital (as bench_scale). Load average printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from exchange.demo.consortium import Consortium, DemoConfig, DemoError, Progress, study_body
from tests.bench.bench_scale import MemorySampler

ENDED = ("completed", "failed", "cancelled", "expired")
TOTAL_BUDGET = 20.0  # the demo's site policy (Consortium._write_node_config)


class StudiesConsortium(Consortium):
    """The demo's consortium, driven to run several studies instead of one."""

    def start(self) -> None:
        cfg = self.config
        cfg.work.mkdir(parents=True, exist_ok=True)
        self._started = time.monotonic()
        with self.phase("coordinator"):
            superlink_started = self._start_superlink()
            self.start_coordinator()
        with self.phase("hospitals join"):
            self.init_hospitals()
            self.start_daemons()
        with self.phase("data import"):
            self.import_hospital_data()
        superlink_started.wait()
        if self._superlink_error is not None:
            raise DemoError(f"the SuperLink did not start: {self._superlink_error}")
        self.register_flower_keys()
        assert self.runner is not None
        self.runner.superlink_address = self.superlink_address
        self.runner.root_certificates = self.tls.root_certificates() if self.tls is not None else None
        self.wait_for_daemons()

    def submit(self, number: int) -> str:
        body = study_body(self.config)
        body["title"] = f"{body['title']} ({number})"
        with self.researcher() as api:
            return str(api.post("/v1/studies", body)["id"])

    def trained(self, ids: list[str]) -> dict[str, int]:
        """How many hospitals approved each study (the rest refused it by a site rule)."""
        with self.researcher() as api:
            return {study_id: sum(1 for d in api.get(f"/v1/studies/{study_id}")["decisions"]
                                  if d["decision"] == "approve") for study_id in ids}

    def statuses(self, ids: list[str]) -> dict[str, str]:
        with self.researcher() as api:
            return {study_id: str(api.get(f"/v1/studies/{study_id}")["status"]) for study_id in ids}

    def wait_ended(self, ids: list[str], checker: ReservationChecker) -> dict[str, str]:
        deadline = time.monotonic() + self.config.timeout_s
        while True:
            for h in self.hospitals.values():
                self._check_daemon(h)
            checker.sample(set(ids))
            statuses = self.statuses(ids)
            if all(s in ENDED for s in statuses.values()):
                return statuses
            if time.monotonic() > deadline:
                raise DemoError(f"studies not ended after {self.config.timeout_s:.0f} s: {statuses}")
            time.sleep(1.0)


class ReservationChecker:
    """Reads each hospital's node database: reservations and budget, as the node computes them."""

    def __init__(self, consortium: StudiesConsortium) -> None:
        self.consortium = consortium
        self.problems: list[str] = []
        self.samples = 0
        self.max_reserved: dict[str, float] = {}

    def _read(self, hospital: Any) -> tuple[list[tuple[str, float]], Any]:
        from sqlalchemy import create_engine

        from exchange.node.decisions import active_reservations
        from exchange.node.privacy import budget
        from exchange.node.store import open_store
        from federated.privacy_ledger import PrivacyLedger

        url = self.consortium._settings(hospital).db_url
        store = open_store(url, upgrade=False)
        engine = create_engine(url)
        try:
            with store.sessions() as session:
                active = active_reservations(session)
            return active, budget(PrivacyLedger(engine), TOTAL_BUDGET, active)
        finally:
            engine.dispose()
            store.dispose()

    def sample(self, ours: set[str]) -> None:
        self.samples += 1
        for h in self.consortium.hospitals.values():
            active, budget = self._read(h)
            ids = [study_id for study_id, _ in active]
            if len(ids) != len(set(ids)):
                self.problems.append(f"{h.id}: a study reserved twice: {ids}")
            if not set(ids) <= ours:
                self.problems.append(f"{h.id}: reservations for unknown studies {set(ids) - ours}")
            if budget.spent + budget.reserved > budget.total + 1e-9:
                self.problems.append(f"{h.id}: spent {budget.spent:.4f} + reserved "
                                     f"{budget.reserved:.4f} > total {budget.total}")
            self.max_reserved[h.id] = max(self.max_reserved.get(h.id, 0.0), budget.reserved)

    def released(self, timeout: float = 60.0) -> None:
        """Every reservation gone once the studies ended (a node learns of the end when it next
        polls the coordinator)."""
        deadline = time.monotonic() + timeout
        while True:
            left = {h.id: self._read(h)[0] for h in self.consortium.hospitals.values()}
            left = {k: v for k, v in left.items() if v}
            if not left:
                return
            if time.monotonic() > deadline:
                self.problems.append(f"reservations still held after the studies ended: {left}")
                return
            time.sleep(1.0)


def check_budgets(consortium: StudiesConsortium, ids: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Each hospital's ledger against the receipts of the coordinator's log."""
    from sqlalchemy import create_engine

    from federated.privacy_ledger import PrivacyLedger

    log = consortium.runtime.audit_log
    entries = list(log.entries(0, log.size()))
    said: dict[tuple[str, str], dict[int, float]] = {}
    for entry in entries:
        if entry.kind == "round.receipt" and entry.payload.get("study_id") in ids:
            hospital = str(entry.payload["hospital"]).removeprefix("hospital:")
            said.setdefault((hospital, entry.payload["study_id"]), {})[
                int(entry.payload["round"])] = float(entry.payload["epsilon_total"])
    problems: list[str] = []
    spent: dict[str, float] = {}
    for h in consortium.hospitals.values():
        engine = create_engine(consortium._settings(h).db_url)
        try:
            ledger = PrivacyLedger(engine)
            total = 0.0
            for study_id in ids:
                # a receipt's epsilon_total is the study's spend: its decision count's epsilon
                # plus the cumulative DP-SGD epsilon the ledger's charge holds
                decision = ledger.decision(study_id)
                counted = decision.epsilon if decision is not None else 0.0
                charged = {c.round: counted + c.epsilon for c in ledger.charges(study_id)}
                receipts = said.get((h.id, study_id), {})
                if set(charged) != set(receipts) or any(
                        abs(charged[r] - receipts[r]) > 1e-9 for r in charged):
                    problems.append(f"{h.id} {study_id}: ledger charges {charged} != receipts {receipts}")
                total += ledger.study_spent(study_id)
            if abs(ledger.total_spent() - total) > 1e-9:
                problems.append(f"{h.id}: total spend {ledger.total_spent()} != sum over studies {total}")
            spent[h.id] = round(ledger.total_spent(), 4)
        finally:
            engine.dispose()
    return problems, {"receipts": sum(len(v) for v in said.values()), "spent_per_hospital": spent}


def interleaving(consortium: StudiesConsortium, ids: list[str]) -> dict[str, Any]:
    """From the log's `study.round` entries (the coordinator's, one per round): in time order,
    how often the study changes, and for each study whether another study completed a round
    inside its span."""
    log = consortium.runtime.audit_log
    rounds = sorted((entry.time, str(entry.payload["study_id"]), int(entry.payload["round"]))
                    for entry in log.entries(0, log.size())
                    if entry.kind == "study.round" and entry.payload.get("study_id") in ids)
    order = [study for _, study, _ in rounds]
    switches = sum(1 for a, b in itertools.pairwise(order) if a != b)
    spans = {s: (min(t for t, x, _ in rounds if x == s), max(t for t, x, _ in rounds if x == s))
             for s in set(order)}
    overlapped = sum(1 for s, (first, last) in spans.items()
                     if any(first < t < last for t, x, _ in rounds if x != s))
    return {"rounds": len(rounds), "switches": switches, "studies_overlapped": overlapped,
            "order": "".join(chr(ord("A") + ids.index(s)) for s in order)}


def run_mode(mode: str, args: argparse.Namespace, root: Path) -> dict[str, Any]:
    config = DemoConfig(out=root / mode, rounds=args.rounds, study="survival", hospitals=args.hospitals,
                        min_hospitals=args.min_hospitals or max(2, args.hospitals // 2),
                        secure_aggregation=False,
                        strict_hospital=None, revoke={}, min_eligible_records=5, witnesses=False,
                        epsilon=args.epsilon, token_budget=10_000, timeout_s=3600)
    consortium = StudiesConsortium(config, Progress())
    sampler = MemorySampler(consortium)
    sampler.thread.start()
    try:
        consortium.start()
        checker = ReservationChecker(consortium)
        consortium.progress.phase = "training"  # the sampler's cue
        ids: list[str] = []
        per_study: list[float] = []
        statuses: dict[str, str] = {}
        started = time.monotonic()
        if mode == "at-once":
            ids = [consortium.submit(n) for n in range(args.studies)]
            statuses = consortium.wait_ended(ids, checker)
        else:
            for n in range(args.studies):
                begun = time.monotonic()
                ids.append(consortium.submit(n))
                statuses.update(consortium.wait_ended(ids[-1:], checker))
                per_study.append(time.monotonic() - begun)
        wall = time.monotonic() - started
        consortium.progress.phase = "checks"
        checker.released()
        problems, budgets = check_budgets(consortium, ids)
        problems += checker.problems
        problems += [f"{s}: {status}" for s, status in statuses.items() if status != "completed"]
        return {"mode": mode, "studies": args.studies, "hospitals": args.hospitals, "rounds": args.rounds,
                "wall_s": round(wall, 1),
                "per_study_s": round(statistics.fmean(per_study), 1) if per_study else None,
                "startup_online_s": consortium.milestones.get("online"),
                "completed": sum(1 for s in statuses.values() if s == "completed"),
                "approved_by": list(consortium.trained(ids).values()),
                "interleaving": interleaving(consortium, ids), "budgets": budgets,
                "max_reserved": {k: round(v, 3) for k, v in checker.max_reserved.items()},
                "reservation_samples": checker.samples,
                "rss_per_hospital_mb": (round(statistics.fmean(sampler.peak.values()))
                                        if sampler.peak else None),
                "problems": problems, "load": round(os.getloadavg()[0], 1)}
    finally:
        sampler.stop.set()
        consortium.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 studies, 3 hospitals, 2 rounds")
    parser.add_argument("--studies", type=int, default=5)
    parser.add_argument("--hospitals", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--min-hospitals", type=int, default=None,
                        help="a study starts once this many approved (default: half, at least 2; "
                             "flchain's non-IID split leaves some hospitals too few events)")
    parser.add_argument("--epsilon", type=float, default=3.0,
                        help="per study: 5 x (3 + the decision's 0.1) of the budget of 20")
    parser.add_argument("--modes", default="at-once,one-after-another")
    parser.add_argument("--json", type=Path, default=None, help="append each result here")
    args = parser.parse_args(argv)
    if args.quick:
        args.studies, args.hospitals, args.rounds = 2, 3, 2
    print(f"{args.studies} studies, {args.hospitals} hospitals, {args.rounds} rounds each; cpus "
          f"{os.cpu_count()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-studies-") as tmp:
        for mode in args.modes.split(","):
            result = run_mode(mode, args, Path(tmp))
            results.append(result)
            print(json.dumps(result), flush=True)
            if args.json is not None:
                with args.json.open("a") as handle:
                    handle.write(json.dumps(result) + "\n")
    by_mode = {r["mode"]: r for r in results}
    if len(by_mode) == 2:
        together, apart = by_mode["at-once"], by_mode["one-after-another"]
        print(f"at once {together['wall_s']} s, one after another {apart['wall_s']} s: "
              f"ratio {together['wall_s'] / apart['wall_s']:.2f}")
    failed = [p for r in results for p in r["problems"]]
    for problem in failed:
        print(f"PROBLEM: {problem}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
