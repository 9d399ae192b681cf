"""Hospitals' catalogs at the coordinator: published, read, and checked against submissions.

The log is the store: a catalog is the hospital's signed `hospital.catalog` entry, appended
unchanged (like a decision), and a hospital's catalog is its newest such entry. No table of
its own, so a coordinator replica (or an auditor with an export) reads the very same catalogs.
`CatalogIndex` keeps the parsed catalogs (and the registered hospitals' ids) in memory and
re-reads them only when a newer catalog or hospital registration is in the log (one indexed
query per submission).

The feasibility rule itself is `exchange.study.feasibility` (pure, shared with the docs' example).
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from sqlalchemy import Connection, func, or_, select

from audit.entry import Entry
from audit.store import audit_entries, entry_from_leaf
from exchange.coordinator import problems
from exchange.coordinator.journal import Journal
from exchange.coordinator.models import Hospital
from exchange.coordinator.registry import Registry
from exchange.logging import get_logger
from exchange.study.feasibility import CATALOG_KIND, Catalog, feasible

log = get_logger("exchange.coordinator")

# A hospital is registered (its row and its `hospital.register` entry in one transaction) and
# never removed or renamed, and a catalog is its entry: so the newest index and the number of
# entries of these two kinds change exactly when the catalogs or the hospital ids can have.
HOSPITAL_REGISTER_KIND = "hospital.register"
# (Two equalities, not `in_([...])`: an IN list is an "expanding" parameter, whose SQL
# SQLAlchemy rewrites on every execution; both databases read `kind = a OR kind = b` from the
# index on `kind`.)
_LATEST = (select(func.max(audit_entries.c.idx), func.count())
           .where(or_(audit_entries.c.kind == CATALOG_KIND,
                      audit_entries.c.kind == HOSPITAL_REGISTER_KIND)))
_ROWS = (select(audit_entries.c.idx, audit_entries.c.leaf).where(audit_entries.c.kind == CATALOG_KIND)
         .order_by(audit_entries.c.idx))
_HOSPITALS = select(Hospital.id).order_by(Hospital.id)


def catalog_problems(entry: Entry, hospital: Hospital) -> list[dict[str, str]]:
    """Every problem with a `hospital.catalog` payload, by field (the signature is checked by the
    registry)."""
    try:
        catalog = Catalog.model_validate(entry.payload)
    except ValidationError as exc:
        return [{"field": "payload." + ".".join(str(p) for p in error["loc"]), "reason": error["msg"]}
                for error in exc.errors()]
    if catalog.hospital != f"hospital:{hospital.id}":
        return [{"field": "payload.hospital", "reason": f"must be 'hospital:{hospital.id}'"}]
    return []


def publish(journal: Journal, registry: Registry, hospital: Hospital, entry: Entry) -> int:
    """Log a hospital's signed catalog; its index in the log."""
    found = registry.entry_problems(entry, CATALOG_KIND, hospital)
    if not found:
        found = catalog_problems(entry, hospital)
    if found:
        raise problems.unprocessable(found)
    with journal.write() as session:
        (index,) = journal.append(session, entry)
    log.info("hospital.catalog", hospital=hospital.id, index=index, columns=len(entry.payload["columns"]))
    return index


class CatalogIndex:
    """The newest catalog of each hospital and the registered hospitals' ids, re-read when the
    log has a newer catalog or hospital registration: one indexed query per submission (the
    log is read, not this process's memory, so another coordinator process's changes count)."""

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None
        self._catalogs: dict[str, Catalog] = {}
        self._hospitals: list[str] = []

    def _read(self, connection: Connection) -> tuple[dict[str, Catalog], list[str]]:
        top, count = connection.execute(_LATEST).one()
        key = (top, count)
        with self._lock:
            if key == self._key:
                return self._catalogs, self._hospitals
        # Read in the same transaction as the key: on SQLite a read connection holds one
        # snapshot per transaction; on PostgreSQL (READ COMMITTED) a registration committed
        # between the statements is read too, and only makes the next call read again.
        hospitals = list(connection.execute(_HOSPITALS).scalars())
        catalogs: dict[str, Catalog] = {}
        for row in connection.execute(_ROWS):
            try:
                catalog = Catalog.model_validate(entry_from_leaf(bytes(row.leaf)).payload)
            except (ValidationError, ValueError):
                continue  # checked when appended; an entry older than today's schema is skipped
            catalogs[catalog.hospital_id()] = catalog
        with self._lock:
            self._key, self._catalogs, self._hospitals = key, catalogs, hospitals
        return catalogs, hospitals

    def catalogs(self) -> tuple[dict[str, Catalog], list[str]]:
        """(hospital id -> newest catalog, every registered hospital id)."""
        with self.journal.read_engine.connect() as connection:
            return self._read(connection)

    def check(self, spec: Mapping[str, Any], organisation: str, region: str) -> None:
        """Refuse (422, every reason by hospital) a study no set of `min_hospitals` registered
        hospitals can serve; return when some set might."""
        catalogs, registered = self.catalogs()
        needed = int(spec.get("min_hospitals") or 1)
        possible, reasons = feasible(spec, organisation, region, catalogs, registered)
        if possible >= needed:
            return
        errors = [{"field": "min_hospitals", "reason": f"the study needs {needed} hospital(s); "
                   f"{possible} of the {len(registered)} registered might serve it"}]
        errors.extend({"field": f"hospitals.{hospital_id}", "reason": reason}
                      for hospital_id in sorted(reasons) for reason in reasons[hospital_id])
        raise problems.unprocessable(errors, detail=(
            "no set of hospitals can serve this study (their published catalogs: GET /v1/catalogs)"))
