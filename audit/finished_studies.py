"""The ledger's studies, with the finished ones past a threshold in a temporary SQLite file.

A fold keeps one escrow record per study ever escrowed: a later entry naming a finished study
must still be refused with the right reason (paid out once, closed, escrowed twice), and a
study paid in part may still be refunded. A long export has hundreds of thousands of studies,
so the auditor's fold (`audit verify`) gives a threshold: past that many finished studies (paid
out or refunded) in memory, they move to a scratch SQLite file (stdlib `sqlite3`, page cache
bounded, no journal, deleted when the store is closed or collected), as the claim pools do
(audit.claim_pools). Open studies always stay in memory: their receipts change with every round.

`FinishedStudies` is a dict, so the ledger's look-ups (`get`, `in`, `[]`) read the file only for
a study that is not in memory. `get` of a spilled study returns a detached copy: the ledger
writes a changed one back through `finished`. The coordinator's fold never spills (its studies
stay a plain dict, which its copy-on-write forks rely on).
"""

from __future__ import annotations

import sqlite3
import weakref
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from audit.claim_pools import open_scratch

#: SQLite page cache for a spilled store, in KiB (negative `cache_size` is KiB)
_CACHE_KIB = 4_096

#: a study's record as the ledger keeps it (audit.ledger.Escrow)
Study = TypeVar("Study")
#: the columns a finished study is stored as, after its id
Row = tuple[object, ...]


class FinishedStudies(dict[str, Study], Generic[Study]):
    """Studies by id; the finished ones past `spill_after` live in a temporary SQLite file.

    `to_row(study)` gives the study's columns (without its id) and `from_row(study_id, row)` builds
    the record back; the ledger calls `finished(study)` whenever a study stops taking receipts or
    changes after that (a refund of what a payout left)."""

    def __init__(self, spill_after: int, to_row: Callable[[Study], Row],
                 from_row: Callable[[str, Row], Study], columns: int) -> None:
        super().__init__()
        self._spill_after: int | None = spill_after
        self._to_row = to_row
        self._from_row = from_row
        self._columns = columns
        self._finished_in_memory: set[str] = set()
        self._db: sqlite3.Connection | None = None
        self._spilled = 0
        self._finalizer: weakref.finalize | None = None

    @property
    def spilled(self) -> bool:
        return self._db is not None

    def __len__(self) -> int:
        return super().__len__() + self._spilled

    def __contains__(self, study_id: object) -> bool:
        return super().__contains__(study_id) or (
            isinstance(study_id, str) and self._read(study_id) is not None)

    def __getitem__(self, study_id: str) -> Study:
        study = self.get(study_id)
        if study is None:
            raise KeyError(study_id)
        return study

    def get(self, study_id: str, default: Study | None = None) -> Study | None:  # type: ignore[override]
        study = super().get(study_id)
        if study is None:
            study = self._read(study_id)
        return default if study is None else study

    def items(self) -> Iterator[tuple[str, Study]]:  # type: ignore[override]
        """Every (study id, study): those in memory, then the spilled ones."""
        yield from super().items()
        if self._db is not None:
            for study_id, *row in self._db.execute("SELECT * FROM studies"):
                yield str(study_id), self._from_row(str(study_id), tuple(row))

    def values(self) -> Iterator[Study]:  # type: ignore[override]
        """Every study: those in memory, then the spilled ones."""
        for _, study in self.items():
            yield study

    def finished(self, study_id: str, study: Study) -> None:
        """`study` takes no more receipts (or changed since): once spilling, it goes to the file."""
        if self._db is not None:
            self._db.execute(f"INSERT OR REPLACE INTO studies VALUES "
                             f"({','.join('?' * (self._columns + 1))})",
                             (study_id, *self._to_row(study)))
            if super().pop(study_id, None) is not None:
                self._spilled += 1  # else it was in the file already (a refund after a payout)
            return
        if self._spill_after is None:
            return
        self._finished_in_memory.add(study_id)
        if len(self._finished_in_memory) > self._spill_after:
            try:
                self._spill()
            except (OSError, sqlite3.Error):
                # No writable temporary folder: keep them in memory (the coordinator's way)
                # rather than fail an export that is fine; only the memory bound is lost.
                self._spill_after = None
                self._finished_in_memory = set()

    def close(self) -> None:
        """Drop a spilled store's file (also done when the store is collected)."""
        if self._finalizer is not None:
            self._finalizer()

    def _read(self, study_id: str) -> Study | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT * FROM studies WHERE study_id = ?", (study_id,)).fetchone()
        return None if row is None else self._from_row(study_id, tuple(row[1:]))

    def _spill(self) -> None:
        db, finalizer = open_scratch(self, "audit-studies-", _CACHE_KIB)
        try:
            columns = ", ".join(f"c{i}" for i in range(self._columns))
            db.execute(f"CREATE TABLE studies (study_id TEXT PRIMARY KEY, {columns}) WITHOUT ROWID")
            # One transaction for the store's life: nothing here needs to survive a crash.
            db.execute("BEGIN")
            db.executemany(f"INSERT INTO studies VALUES ({','.join('?' * (self._columns + 1))})",
                           ((study_id, *self._to_row(super(FinishedStudies, self).__getitem__(study_id)))
                            for study_id in sorted(self._finished_in_memory)))
        except (OSError, sqlite3.Error):
            finalizer()
            raise
        for study_id in self._finished_in_memory:
            super().pop(study_id)
        self._spilled = len(self._finished_in_memory)
        self._finished_in_memory = set()
        self._finalizer = finalizer
        self._db = db

