"""Node store: import throughput and the cost of counting eligible records, each against a
baseline measured in the same run.

    .venv/bin/python -m tests.bench.bench_node [--quick] [--records N]

1. `import-data` of an N-row CSV (pseudonym + 10 numeric columns + label): parse, validate
   every cell, insert in one transaction; baseline: pyarrow.csv reading the same file (parsing
   only, no validation, no storage). Printed: rows/s and the ratio import / baseline.
2. `consent import` of N contracts (validation by consent, chain checks, Ed25519 signing of
   each unsigned contract, storage); printed: contracts/s.
3. eligibility for one study over N records and N contracts (what the daemon computes for each
   new study): cold (the first count: reading records and current contracts from SQLite and
   parsing every contract into the node's ContractCache, then consent.gate) and warm (a count
   for another study: the cache only checks that nothing was added, then consent.gate);
   baseline: consent.gate alone over the same (pseudonym, hash) pairs and contracts already in
   memory.
Times are CPU seconds of the benchmark process (time.process_time): on a shared machine wall
time mostly measures the neighbours.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from pyarrow import csv as pacsv

from audit.signing import Signer
from consent import duo
from consent.gate import RecordColumns, gate
from consent.model import Contract, Provision
from exchange.node.consent_store import import_consent_folder, study_request
from exchange.node.eligibility import (
    contract_cache,
    count_eligible,
    current_contract_hashes,
    current_contracts,
)
from exchange.node.importer import import_records
from exchange.node.mapping import parse_mapping
from exchange.node.policy import StudyView
from exchange.node.store import open_store

COLUMNS = [f"c{i}" for i in range(10)]
ISSUED = datetime(2025, 1, 1, tzinfo=UTC)
STUDY = {"id": "st-bench", "organisation_id": "acme", "organisation_region": "DE", "status": "submitted",
         "spec": {"purpose": "DUO:0000042", "columns": {"labs": COLUMNS}, "label": "label", "epsilon": 2.0,
                  "delta": 1e-5, "rounds": 2}}


def _timed(fn: object) -> tuple[float, object]:
    """CPU seconds of this process (the machine is shared: wall time measures the neighbours)."""
    start = time.process_time()
    result = fn()  # type: ignore[operator]
    return time.process_time() - start, result


def run(n: int, root: Path) -> dict[str, float]:
    csv_path = root / "records.csv"
    with csv_path.open("w") as handle:
        handle.write("pid," + ",".join(COLUMNS) + ",label\n")
        for i in range(n):
            handle.write(f"p{i}," + ",".join(f"{(i * 7 + j) % 97 / 48.5 - 1:.4f}" for j in range(10))
                         + f",{i % 2}\n")
    mapping = parse_mapping({"pseudonym_column": "pid", "columns": {
        **dict.fromkeys(COLUMNS, "labs"), "label": {"category": "outcomes", "type": "integer"}}})
    store = open_store(f"sqlite:///{root / 'node.db'}")
    parse_s, _ = _timed(lambda: pacsv.read_csv(csv_path))

    def do_import() -> None:
        with store.transaction() as session:
            import_records(session, csv_path, "csv", mapping)

    import_s, _ = _timed(do_import)

    folder = root / "consent"
    folder.mkdir()
    contracts = [Contract(contract_id=f"h:{i}", pseudonym=f"p{i}", hospital="hospital-a", version=1,
                          issued=ISSUED,
                          provision=Provision(type="permit" if i % 10 else "deny", purposes=(duo.GRU,)))
                 for i in range(n)]
    (folder / "batch.json").write_text(json.dumps([c.to_json() for c in contracts]))
    signer = Signer.generate()

    def do_consent() -> None:
        with store.transaction() as session:
            import_consent_folder(session, folder, "hospital-a", signer)

    consent_s, _ = _timed(do_consent)

    view = StudyView.from_json(STUDY)
    now = datetime.now(UTC)
    others = [StudyView.from_json({**STUDY, "id": f"st-bench-{i}",
                                   "spec": {**STUDY["spec"], "epsilon": 0.5 + i}}) for i in range(6)]
    with store.sessions() as session:
        eligible_s, result = _timed(lambda: count_eligible(session, view, now))
    # A count for another study with the cache warm, interleaved with its baseline: consent.gate
    # alone over the very contract objects the cache holds, for a study not gated before. Best
    # of 3 each: garbage collection over the many live contract objects makes single runs vary
    # by up to 2x.
    warm_times, gate_warm_times = [], []
    for other, fresh in zip(others[:3], others[3:], strict=True):
        with store.sessions() as session:
            warm_s, warm = _timed(lambda: count_eligible(session, other, now))  # noqa: B023
            cache = contract_cache(session)
        assert warm.eligible == result.eligible  # type: ignore[attr-defined]
        warm_times.append(warm_s)
        columns = RecordColumns(cache.pseudonyms, [cache.current[p][1] if p in cache.current else ""
                                                   for p in cache.pseudonyms])
        request = study_request(fresh)
        gate_warm_times.append(_timed(lambda: gate(columns, cache.by_hash, request, now))[0])  # noqa: B023
    with store.sessions() as session:
        hashes = current_contract_hashes(session)
        by_hash = {hashes[p]: Contract.model_validate(d) for p, d in current_contracts(session).items()}
    pairs = [(f"p{i}", hashes[f"p{i}"]) for i in range(n)]
    request = study_request(view)
    gate_s, gated = _timed(lambda: gate(pairs, by_hash, request, now))
    assert result.eligible == gated.records_used  # type: ignore[attr-defined]
    warm_s, gate_warm_s = min(warm_times), min(gate_warm_times)
    store.dispose()
    return {"import_s": import_s, "parse_s": parse_s, "consent_s": consent_s, "eligible_s": eligible_s,
            "warm_s": warm_s, "gate_s": gate_s, "gate_warm_s": gate_warm_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="10,000 records")
    parser.add_argument("--records", type=int, default=None)
    args = parser.parse_args()
    n = args.records or (10_000 if args.quick else 100_000)
    with tempfile.TemporaryDirectory() as tmp:
        r = run(n, Path(tmp))
    print(f"records: {n}")
    print(f"import-data CSV: {r['import_s']:.2f} s = {n / r['import_s']:,.0f} rows/s; "
          f"pyarrow parse only {r['parse_s']:.3f} s; ratio {r['import_s'] / r['parse_s']:.0f}x")
    print(f"consent import: {r['consent_s']:.2f} s = {n / r['consent_s']:,.0f} contracts/s (incl. signing)")
    print(f"eligibility, first study (DB read + parse + gate): {r['eligible_s']:.3f} s; "
          f"gate alone on fresh contracts {r['gate_s']:.3f} s; ratio {r['eligible_s'] / r['gate_s']:.2f}x")
    print(f"eligibility, next study (cached contracts + gate, best of 3): {r['warm_s']:.3f} s; "
          f"gate alone on the cache's contracts, new study, best of 3: {r['gate_warm_s']:.3f} s; "
          f"ratio {r['warm_s'] / r['gate_warm_s']:.2f}x")


if __name__ == "__main__":
    main()
