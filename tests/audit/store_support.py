"""Shared helpers for the audit store tests, the crash worker and the benchmark.

A test log needs: the pinned operator key (root of the keyring), the log key (signs
checkpoints), and a writer key registered by the operator in the log itself.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine

from audit import merkle
from audit.entry import Entry, sign_entry
from audit.export import Trust
from audit.signing import Signer
from audit.store import AuditLog, audit_entries
from audit.verify import VerifyReport, verify_lines
from exchange.db.engine import make_engine
from exchange.db.migrate import upgrade

ORIGIN = "exchange.test/audit-log"


def migrated_engine(url: str) -> Engine:
    """An engine on `url` after the audit migration (and only it: later ones are not ours)."""
    upgrade(url, "coordinator", "0001_audit_log")
    return make_engine(url)


def register(operator: Signer, signer: Signer, role: str = "coordinator",
             owner: str = "coordinator:test") -> Entry:
    return sign_entry(operator, "key.register", {"key_id": signer.key_id,
                                                 "public_key": signer.public_key_b64,
                                                 "role": role, "owner": owner})


def note_entry(signer: Signer, tag: str, seq: int) -> Entry:
    """A realistic non-token entry, unique per (tag, seq)."""
    digest = hashlib.sha256(f"{tag}/{seq}".encode()).hexdigest()
    return sign_entry(signer, "study.round", {"study_id": f"study-{tag}", "round": seq,
                                              "model_sha256": digest, "participants": 3})


@dataclass
class LogKeys:
    operator: Signer
    log: Signer
    writer: Signer

    @classmethod
    def generate(cls) -> LogKeys:
        return cls(Signer.generate(), Signer.generate(), Signer.generate())

    def trust(self) -> Trust:
        return Trust(ORIGIN, self.operator.public_key, self.log.public_key)

    def open(self, engine: Engine, **kwargs: int) -> AuditLog:
        return AuditLog(engine, self.log, ORIGIN, self.operator.public_key, **kwargs)

    def save(self, folder: Path) -> None:
        for name in ("operator", "log", "writer"):
            getattr(self, name).save(folder / f"{name}.key")

    @classmethod
    def load(cls, folder: Path) -> LogKeys:
        return cls(*(Signer.load(folder / f"{name}.key") for name in ("operator", "log", "writer")))


def stored_leaves(engine: Engine) -> list[bytes]:
    """Every stored leaf, in index order, checking the indexes are 0, 1, 2, ... (no gaps)."""
    from sqlalchemy import select

    with engine.connect() as connection:
        rows = connection.execute(select(audit_entries.c.idx, audit_entries.c.leaf)
                                  .order_by(audit_entries.c.idx)).all()
    assert [row.idx for row in rows] == list(range(len(rows))), "indexes are not contiguous"
    return [bytes(row.leaf) for row in rows]


def memory_tree(leaves: Iterable[bytes]) -> merkle.MemoryTree:
    return merkle.MemoryTree(merkle.leaf_hash(leaf) for leaf in leaves)


def verify_with_auditor(log: AuditLog, keys: LogKeys) -> VerifyReport:
    """Run the auditor's verifier (audit.verify) over the stored log and a fresh checkpoint."""
    note = log.checkpoint()
    leaves = stored_leaves(log.engine)
    return verify_lines((leaf + b"\n" for leaf in leaves), note, keys.trust())
