"""The claim pool store: a store spilled to its temporary SQLite file reads back exactly what the
in-memory one holds (pools, claimed holders, claims and sweeps after the spill), and drops its
file when closed; the verifier's report lists pools up to a bound and totals them beyond."""

from __future__ import annotations

import io
import tempfile
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from audit import verify
from audit.claim_pools import ClaimPool, ClaimPools, PoolKey
from audit.generate import generate_log

CLOSES = datetime(2026, 3, 1, 12, 0, 0, 123456, tzinfo=UTC)


def pools(study: str) -> list[tuple[PoolKey, ClaimPool]]:
    return [((study, "hospital:é", 2), ClaimPool("ab" * 32, 1024, 300, closes=CLOSES, sweep_to="org:x")),
            ((study, "hospital:a", 10), ClaimPool("cd" * 32, 256, 7)),
            ((study, "hospital:a", 9), ClaimPool("ef" * 32, 8, 1))]


def fields(store: ClaimPools) -> list[tuple[PoolKey, tuple[object, ...]]]:
    return [(key, (p.root, p.size, p.pool, p.paid, p.closes, p.sweep_to, p.swept, p.claims,
                   p.remaining)) for key, p in store.items()]


def test_a_spilled_store_reads_back_what_memory_holds(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    memory, spilled = ClaimPools(), ClaimPools(spill_after=4)
    for store in (memory, spilled):
        store.add_many(pools("s-2"))
        key = ("s-2", "hospital:a", 10)
        store.record_claim(key, store[key], "h" * 64, 3)  # claimed before the spill
        assert not store.spilled
        store.add_many(pools("s-1"))  # 6 pools > 4: moved to the file, claims with them
    assert spilled.spilled and not memory.spilled
    assert len(spilled) == len(memory) == 6
    assert fields(spilled) == fields(memory)
    assert [key for key, _ in fields(memory)][:2] == [("s-1", "hospital:a", 9), ("s-1", "hospital:a", 10)]
    for store in (memory, spilled):
        key = ("s-2", "hospital:a", 10)
        assert store.was_claimed(key, store[key], "h" * 64)
        assert not store.was_claimed(key, store[key], "i" * 64)
        assert not store.was_claimed(("s-1", "hospital:a", 10), store[("s-1", "hospital:a", 10)], "h" * 64)
        swept = ("s-1", "hospital:é", 2)
        store.record_claim(swept, store[swept], "i" * 64, 100)
        store.record_sweep(swept, store[swept], 200)
        assert store.get(("s-1", "hospital:é", 3)) is None
        assert ("s-1", "hospital:é", 3) not in store and swept in store
    assert fields(spilled) == fields(memory)
    assert spilled[("s-1", "hospital:é", 2)].remaining == 0
    assert spilled[("s-1", "hospital:é", 2)].closes == CLOSES + timedelta(0)
    assert list(tmp_path.iterdir())  # the store's folder
    spilled.close()
    assert not list(tmp_path.iterdir())


def test_the_report_totals_the_pools_beyond_the_listed_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    log = generate_log(300, seed=11)
    raw = b"".join(line + b"\n" for line in log.lines())

    def run() -> verify.VerifyReport:
        report = verify.verify_lines(io.BytesIO(raw), log.checkpoint(), log.trust, workers=0)
        assert report.ok and report.ledger is not None, report.problem
        return report

    listed = run().ledger
    assert listed is not None
    pools_listed = listed.pop("claim_pools")
    assert len(pools_listed) > 3
    monkeypatch.setattr(verify, "POOLS_IN_MEMORY", 2)  # the verifier's fold spills to its file
    monkeypatch.setattr(verify, "MAX_LISTED_POOLS", 3)
    totalled = run().ledger
    assert totalled is not None
    total = totalled.pop("claim_pools_total")
    assert totalled == listed  # balances, escrow, unclaimed: the same fold
    assert total == {"count": len(pools_listed),
                     **{name: sum(p[name] for p in pools_listed)
                        for name in ("pool", "paid", "claims", "swept", "remaining")}}
    assert total["remaining"] == listed["unclaimed"]


def test_without_a_writable_temporary_folder_the_pools_stay_in_memory(
        monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(prefix: str) -> str:
        raise PermissionError(13, "Permission denied", "/tmp")

    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    store = ClaimPools(spill_after=1)
    store.add_many(pools("s-1"))
    store.add_many(pools("s-2"))
    assert not store.spilled and len(store) == 6
    key = ("s-2", "hospital:a", 9)
    store.record_claim(key, store[key], "h" * 64, 1)
    assert store.was_claimed(key, store[key], "h" * 64) and store[key].remaining == 0
