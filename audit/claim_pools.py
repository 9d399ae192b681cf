"""Where the ledger keeps its reward claim pools: in memory, or past a threshold in a temp SQLite file.

A paid receipt opens a claim pool (audit.ledger) that a claim or a sweep may name at any later
entry: a pool with no claim window stays open for the rest of the log, and even a closed one
must still be found, to refuse a claim or a second sweep naming the right reason. So a fold of
a long log holds one pool per paid receipt it has seen (~400 bytes each in Python objects;
docs/benchmarks/audit-verify.md, memory). The coordinator's fold keeps them in a dict; the
auditor's fold of an export of any length gives `spill_after`: past that many pools, they move
to a temporary SQLite file (stdlib `sqlite3`, page cache bounded, no journal: the file is
scratch, deleted when the store is closed or collected), so the verifier's memory no longer
grows with the log. Every check reads the same fields either way; only where they live differs.
"""

from __future__ import annotations

import os
import sqlite3
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

#: (study_id, hospital, round)
PoolKey = tuple[str, str, int]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
#: SQLite page cache for a spilled store, in KiB (negative `cache_size` is KiB)
_CACHE_KIB = 8_192


@dataclass(slots=True)
class ClaimPool:
    """What one receipt's reward commitment may still pay out (opened by the study's payout).

    `claims` counts the holders already paid (a leaf is paid once, so a replayed claim is
    refused; which holders: `ClaimPools.was_claimed`). `closes` (the payout's time plus the
    escrow's claim window) ends the claims; from then on the coordinator may sweep what is left
    to `sweep_to`, once (`swept`)."""

    root: str
    size: int
    pool: int
    paid: int = 0
    #: the holders paid, while the store is in memory (None until the first claim: an empty
    #: set costs 216 bytes); a spilled store keeps them in its file instead
    claimed: set[str] | None = None
    closes: datetime | None = None
    sweep_to: str | None = None
    swept: int = 0
    claims: int = 0

    @property
    def remaining(self) -> int:
        return self.pool - self.paid - self.swept


class ClaimPools:
    """The claim pools by (study_id, hospital, round); see the module docstring.

    `get` of a spilled store returns a detached copy: change a pool only through `add`,
    `record_claim` and `record_sweep`, which write it back."""

    def __init__(self, spill_after: int | None = None) -> None:
        self._memory: dict[PoolKey, ClaimPool] = {}
        self._spill_after = spill_after
        self._db: sqlite3.Connection | None = None
        self._count = 0
        self._finalizer: weakref.finalize | None = None

    @property
    def spilled(self) -> bool:
        return self._db is not None

    def __len__(self) -> int:
        return self._count

    def __contains__(self, key: object) -> bool:
        return isinstance(key, tuple) and self.get(key) is not None

    def __getitem__(self, key: PoolKey) -> ClaimPool:
        pool = self.get(key)
        if pool is None:
            raise KeyError(key)
        return pool

    def get(self, key: PoolKey) -> ClaimPool | None:
        if self._db is None:
            return self._memory.get(key)
        row = self._db.execute("SELECT root, size, pool, paid, closes, sweep_to, swept, claims "
                               "FROM pools WHERE study_id = ? AND hospital = ? AND round = ?",
                               key).fetchone()
        return None if row is None else _pool(row)

    def add_many(self, pools: list[tuple[PoolKey, ClaimPool]]) -> None:
        """Open the pools of one payout. Their keys are new: a receipt is paid at most once
        (one receipt per hospital and round of a study, one payout per study)."""
        if self._db is None:
            self._memory.update(pools)
            self._count = len(self._memory)
            if self._spill_after is not None and self._count > self._spill_after:
                try:
                    self._spill()
                except (OSError, sqlite3.Error):
                    # No writable temporary folder: verify in memory (as the coordinator does)
                    # rather than fail an export that is fine; only the memory bound is lost.
                    self._spill_after = None
            return
        self._db.executemany("INSERT INTO pools VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                             [(*key, *_row(pool)) for key, pool in pools])
        self._count += len(pools)

    def was_claimed(self, key: PoolKey, pool: ClaimPool, holder: str) -> bool:
        if self._db is None:
            return pool.claimed is not None and holder in pool.claimed
        return self._db.execute("SELECT 1 FROM claimed WHERE study_id = ? AND hospital = ? "
                                "AND round = ? AND holder = ?", (*key, holder)).fetchone() is not None

    def record_claim(self, key: PoolKey, pool: ClaimPool, holder: str, due: int) -> None:
        """`holder`'s leaf of `key` was paid `due`."""
        pool.paid += due
        pool.claims += 1
        if self._db is None:
            if pool.claimed is None:
                pool.claimed = set()
            pool.claimed.add(holder)
            return
        self._db.execute("INSERT INTO claimed VALUES (?,?,?,?)", (*key, holder))
        self._db.execute("UPDATE pools SET paid = ?, claims = ? WHERE study_id = ? AND hospital = ? "
                         "AND round = ?", (pool.paid, pool.claims, *key))

    def record_sweep(self, key: PoolKey, pool: ClaimPool, amount: int) -> None:
        pool.swept = amount
        if self._db is not None:
            self._db.execute("UPDATE pools SET swept = ? WHERE study_id = ? AND hospital = ? "
                             "AND round = ?", (amount, *key))

    def items(self) -> Iterator[tuple[PoolKey, ClaimPool]]:
        """Every pool, in key order (SQLite's binary order of UTF-8 text is Python's str order)."""
        if self._db is None:
            yield from sorted(self._memory.items())
            return
        cursor = self._db.execute("SELECT study_id, hospital, round, root, size, pool, paid, closes, "
                                  "sweep_to, swept, claims FROM pools "
                                  "ORDER BY study_id, hospital, round")
        for row in cursor:
            yield (row[0], row[1], row[2]), _pool(row[3:])

    def totals(self) -> dict[str, int]:
        """The number of pools and the sums of their pool, paid, claims, swept and remaining
        amounts (in SQLite's aggregates when spilled: no pool object is built)."""
        if self._db is None:
            pools = self._memory.values()
            total = {"count": len(pools), "pool": sum(p.pool for p in pools),
                     "paid": sum(p.paid for p in pools), "claims": sum(p.claims for p in pools),
                     "swept": sum(p.swept for p in pools)}
        else:
            row = self._db.execute("SELECT count(*), coalesce(sum(pool), 0), coalesce(sum(paid), 0), "
                                   "coalesce(sum(claims), 0), coalesce(sum(swept), 0) FROM pools"
                                   ).fetchone()
            total = dict(zip(("count", "pool", "paid", "claims", "swept"), map(int, row),
                             strict=True))
        total["remaining"] = total["pool"] - total["paid"] - total["swept"]
        return total

    def close(self) -> None:
        """Drop a spilled store's file (also done when the store is collected)."""
        if self._finalizer is not None:
            self._finalizer()

    def _spill(self) -> None:
        db, finalizer = open_scratch(self, "audit-claim-pools-", _CACHE_KIB)
        try:
            self._create(db)
        except (OSError, sqlite3.Error):
            finalizer()
            raise
        self._finalizer = finalizer
        self._memory = {}
        self._db = db

    def _create(self, db: sqlite3.Connection) -> None:
        db.execute("CREATE TABLE pools (study_id TEXT, hospital TEXT, round INTEGER, root TEXT, "
                   "size INTEGER, pool INTEGER, paid INTEGER, closes INTEGER, sweep_to TEXT, "
                   "swept INTEGER, claims INTEGER, PRIMARY KEY (study_id, hospital, round)) "
                   "WITHOUT ROWID")
        db.execute("CREATE TABLE claimed (study_id TEXT, hospital TEXT, round INTEGER, holder TEXT, "
                   "PRIMARY KEY (study_id, hospital, round, holder)) WITHOUT ROWID")
        # One transaction for the store's life: nothing here needs to survive a crash, and a
        # statement's own commit would cost far more than its work.
        db.execute("BEGIN")
        db.executemany("INSERT INTO pools VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       ((*key, *_row(pool)) for key, pool in self._memory.items()))
        db.executemany("INSERT INTO claimed VALUES (?,?,?,?)",
                       ((*key, holder) for key, pool in self._memory.items()
                        for holder in pool.claimed or ()))


def _row(pool: ClaimPool) -> tuple[object, ...]:
    closes = None if pool.closes is None else (pool.closes - _EPOCH) // timedelta(microseconds=1)
    return (pool.root, pool.size, pool.pool, pool.paid, closes, pool.sweep_to, pool.swept,
            pool.claims)


def _pool(row: tuple[object, ...]) -> ClaimPool:
    root, size, amount, paid, closes, sweep_to, swept, claims = row
    assert isinstance(root, str) and isinstance(size, int) and isinstance(amount, int)
    assert isinstance(paid, int) and isinstance(swept, int) and isinstance(claims, int)
    instant = None if closes is None else _EPOCH + timedelta(microseconds=int(str(closes)))
    return ClaimPool(root, size, amount, paid, None, instant,
                     None if sweep_to is None else str(sweep_to), swept, claims)


def open_scratch(owner: object, prefix: str, cache_kib: int) -> tuple[sqlite3.Connection, weakref.finalize]:
    """A scratch SQLite file in a new temporary folder, set up for speed (no journal, no sync,
    one connection, bounded page cache), and the finalizer that closes and deletes it (run at
    the latest when `owner` is collected). Raises OSError or sqlite3.Error without leaving a
    folder behind."""
    folder = tempfile.mkdtemp(prefix=prefix)
    try:
        db = sqlite3.connect(os.path.join(folder, "scratch.sqlite"), isolation_level=None,
                             check_same_thread=False)
    except sqlite3.Error:
        os.rmdir(folder)
        raise
    finalizer = weakref.finalize(owner, _drop, db, folder)
    try:
        for pragma in ("journal_mode = OFF", "synchronous = OFF", "locking_mode = EXCLUSIVE",
                       "temp_store = FILE", f"cache_size = -{cache_kib}"):
            db.execute(f"PRAGMA {pragma}")
    except sqlite3.Error:
        finalizer()
        raise
    return db, finalizer


def _drop(db: sqlite3.Connection, folder: str) -> None:
    db.close()
    for name in os.listdir(folder):
        os.unlink(os.path.join(folder, name))
    os.rmdir(folder)
