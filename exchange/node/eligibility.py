"""How many of this node's records a study may use under their patients' consent.

Consent evaluation itself belongs to `consent/` (a pure function of contract, study and
time, the same at the hospital and at the auditor). This module only feeds it the node's
records and contracts: the contract in force for each pseudonym is its newest version
imported (a revocation is a version that permits nothing), each distinct contract is
evaluated once, and the result is joined back to the records.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from consent.model import Contract
from exchange.node.models import ConsentContractRow, Record
from exchange.node.policy import Eligibility, StudyView

if TYPE_CHECKING:  # consent.gate (pyarrow) is imported where records are gated: the daemon
    # does that in a forked child (exchange/node/isolated.py) and never imports it itself
    from consent.gate import GateResult


def current_contracts(session: Session) -> dict[str, dict[str, Any]]:
    """pseudonym -> document of its newest contract version."""
    newest = (select(ConsentContractRow.pseudonym, func.max(ConsentContractRow.version).label("v"))
              .group_by(ConsentContractRow.pseudonym).subquery())
    rows = session.execute(
        select(ConsentContractRow.pseudonym, ConsentContractRow.document)
        .join(newest, (newest.c.pseudonym == ConsentContractRow.pseudonym)
              & (newest.c.v == ConsentContractRow.version))).tuples().all()
    return dict(rows)


def current_contract_hashes(session: Session) -> dict[str, str]:
    """pseudonym -> content hash of its newest contract version."""
    newest = (select(ConsentContractRow.pseudonym, func.max(ConsentContractRow.version).label("v"))
              .group_by(ConsentContractRow.pseudonym).subquery())
    rows = session.execute(
        select(ConsentContractRow.pseudonym, ConsentContractRow.contract_hash)
        .join(newest, (newest.c.pseudonym == ConsentContractRow.pseudonym)
              & (newest.c.v == ConsentContractRow.version))).tuples().all()
    return dict(rows)


@dataclass
class ContractCache:
    """Parsed current contracts and the record pseudonyms of one database, kept between
    eligibility counts (the daemon counts for every new or changed study).

    Without it every count re-read every contract document and re-validated it with pydantic,
    which cost as much again as consent.gate itself (docs/benchmarks/node.md). Contract
    versions and records are append-only (never updated or deleted), so (row count, highest
    id) of each table says exactly whether something was added, also by another process (a
    `consent import` or `import-data` run while the daemon is up): then only the new rows are
    read and parsed. A parsed contract is keyed by its content hash, so it can never be stale.
    """

    contracts_marker: tuple[int, int] = (0, 0)
    records_marker: tuple[int, int] = (0, 0)
    by_hash: dict[str, Contract] = field(default_factory=dict)
    # pseudonym -> (version, content hash) of its newest contract version
    current: dict[str, tuple[int, str]] = field(default_factory=dict)
    pseudonyms: list[str] = field(default_factory=list)
    parsed: int = 0  # contracts validated so far (tests check that a warm count parses none)

    def refresh(self, session: Session) -> None:
        """Bring the cache up to what `session` sees (call it in a read-only session: rows it
        added but may still roll back would be cached)."""
        marker = _marker(session, ConsentContractRow.id)
        if marker != self.contracts_marker:
            rows = self._added_contracts(session, marker)
            if rows is None:  # not a plain append: start over
                self.by_hash.clear()
                self.current.clear()
                self.contracts_marker = (0, 0)
                rows = self._added_contracts(session, marker) or []
            for pseudonym, version, digest, document in rows:
                held = self.current.get(pseudonym)
                if held is None or version > held[0]:
                    if digest not in self.by_hash:
                        self.by_hash[digest] = Contract.model_validate(document)
                        self.parsed += 1
                    self.current[pseudonym] = (version, digest)
            live = {digest for _v, digest in self.current.values()}
            for digest in [d for d in self.by_hash if d not in live]:
                del self.by_hash[digest]  # superseded versions are never gated again
            self.contracts_marker = marker
        marker = _marker(session, Record.id)
        if marker != self.records_marker:
            added = self._added_pseudonyms(session, marker)
            if added is None:
                self.pseudonyms.clear()
                self.records_marker = (0, 0)
                added = self._added_pseudonyms(session, marker) or []
            self.pseudonyms.extend(added)
            self.records_marker = marker

    def _added_contracts(self, session: Session, marker: tuple[int, int]) -> list[Any] | None:
        """The rows after the last one read, or None when they do not account for the change
        (rows gone, or ids committed out of order on PostgreSQL): then everything is re-read."""
        if _shrank(marker, self.contracts_marker):
            return None
        rows = session.execute(
            select(ConsentContractRow.pseudonym, ConsentContractRow.version,
                   ConsentContractRow.contract_hash, ConsentContractRow.document)
            .where(ConsentContractRow.id > self.contracts_marker[1])).tuples().all()
        return list(rows) if len(rows) == marker[0] - self.contracts_marker[0] else None

    def _added_pseudonyms(self, session: Session, marker: tuple[int, int]) -> list[str] | None:
        if _shrank(marker, self.records_marker):
            return None
        added = list(session.execute(select(Record.pseudonym).where(Record.id > self.records_marker[1])
                                     .order_by(Record.id)).scalars())
        return added if len(added) == marker[0] - self.records_marker[0] else None


def _shrank(now: tuple[int, int], before: tuple[int, int]) -> bool:
    """Rows are only ever added: fewer, or a lower highest id, means the table was replaced."""
    return now[0] < before[0] or now[1] < before[1]


def _marker(session: Session, column: Any) -> tuple[int, int]:
    count, highest = session.execute(select(func.count(column), func.coalesce(func.max(column), 0))).one()
    return int(count), int(highest)


_CACHES: weakref.WeakKeyDictionary[Engine, ContractCache] = weakref.WeakKeyDictionary()
_CACHES_LOCK = threading.Lock()


def contract_cache(session: Session) -> ContractCache:
    """The cache of the database `session` is bound to, brought up to date."""
    engine = session.get_bind()
    key = engine if isinstance(engine, Engine) else engine.engine
    with _CACHES_LOCK:
        cache = _CACHES.get(key)
        if cache is None:
            cache = _CACHES[key] = ContractCache()
        cache.refresh(session)
        return cache


def gate_records(session: Session, study: StudyView, at: datetime) -> GateResult:
    """consent.gate over every record (pseudonym, hash of its current contract): each
    distinct contract evaluated once, joined back to the records. Contracts and pseudonyms
    come from the `ContractCache` (parsed once, re-read only when rows were added)."""
    from consent.gate import RecordColumns, gate
    from exchange.node.consent_store import study_request

    cache = contract_cache(session)
    current = cache.current
    hashes = [current[p][1] if p in current else "" for p in cache.pseudonyms]
    return gate(RecordColumns(cache.pseudonyms, hashes), cache.by_hash, study_request(study), at)


#: Given the eligible patients and their contracts' lifetime caps (None: none named), how many
#: the privacy ledger would admit and how many it would leave out (`exchange.node.patient_budget`).
LifetimeCheck = Callable[[Mapping[str, float | None]], tuple[int, int]]


def count_eligible(session: Session, study: StudyView, at: datetime,
                   lifetime: LifetimeCheck | None = None) -> Eligibility:
    """Records whose current contract permits `study` at `at`; the rest counted by reason; the
    distinct patients among them (after `lifetime`, when given, left out those over their cap)."""
    if not study.columns:
        total = session.execute(select(func.count()).select_from(Record)).scalar_one()
        return Eligibility(eligible=0, excluded={"study names no data category": total} if total else {},
                           patients=0)
    result = gate_records(session, study, at)
    patients, over = len(result.eligible_pseudonyms), 0
    if lifetime is not None:
        patients, over = lifetime({p: result.privacy_caps.get(p) for p in result.eligible_pseudonyms})
    return Eligibility(eligible=result.records_used, excluded=dict(result.excluded_by_reason),
                       patients=patients, over_lifetime_cap=over)
