"""A signed snapshot of the coordinator's ledger fold, so that start-up does not refold the log.

Why: balances are the audit package's `Ledger` fold of the log (one implementation, the
auditor's). The coordinator rebuilt that fold at every start by reading every ledger entry
(receipts, rounds, token movements: most of a real log), so its start-up grew with the log
(minutes at 10M entries; docs/benchmarks/log-scale.md). A snapshot is the fold's state after
the first `size` entries, kept in the coordinator's database (table `ledger_snapshots`, one
row); start-up takes it and folds only the entries after it.

The snapshot is a cache of a fold anybody can redo, never a source of truth, and it is not
trusted blindly. It is used only if all of these hold; otherwise start-up logs why and folds
the whole log, as before:

1. its signature verifies under the coordinator's own key (Ed25519 over the size, the root,
   the format and the SHA-256 of the state bytes): a row written or changed by anyone without
   that key is refused, and the state bytes are unpickled only after this check;
2. its `root_hash` is the log's Merkle root at `size` as the log stores it now, and the log
   holds at least `size` entries: a snapshot of another log, or of a log that was replaced, is
   refused (the root is O(log n) stored subtree hashes, one query);
3. its `fold_format` equals this code's: a fingerprint of the fold's source files and the
   Python version, so after an upgrade of the fold (or of the classes pickled) the first start
   refolds instead of reading state in an old shape.

Pickle, not JSON: the Ledger's state is a graph of dataclasses (escrows, receipts, claim
pools, key roles); pickle captures every field, including any added later, where a
hand-written encoding could silently drop one, and check 3 ties the bytes to the code that
wrote them. The risk of unpickling is covered by check 1 (only bytes the coordinator itself
signed are unpickled; whoever holds its key can already sign log entries).
"""

from __future__ import annotations

import hashlib
import logging
import pickle
import struct
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, Row, Table, delete, select

from audit import apportion, claim_pools, finished_studies, ledger, reward_commitment, rewards
from audit.ledger import Ledger
from audit.signing import SignatureInvalidError, Signer, b64decode, b64encode, verify
from audit.store import AuditLog
from exchange.coordinator import auditing
from exchange.coordinator.models import LedgerSnapshot

log = logging.getLogger(__name__)

#: the fold's code: a change to any of these files changes `fold_format`
FOLD_MODULES = (ledger, claim_pools, finished_studies, rewards, apportion, reward_commitment, auditing)
_CONTEXT = b"exchange/ledger-snapshot/v1\n"
_TABLE: Table = LedgerSnapshot.__table__  # type: ignore[assignment]


def fold_format() -> str:
    """The fingerprint of the code that folds and pickles the ledger (see the module doc, 3)."""
    digest = hashlib.sha256(f"python {sys.version_info[0]}.{sys.version_info[1]}\n".encode())
    for module in FOLD_MODULES:
        assert module.__file__ is not None
        digest.update(Path(module.__file__).read_bytes())
    return digest.hexdigest()


def _message(size: int, root: bytes, fmt: str, state: bytes) -> bytes:
    return (_CONTEXT + struct.pack(">Q", size) + root + fmt.encode("ascii")
            + hashlib.sha256(state).digest())


@dataclass(frozen=True)
class Loaded:
    """A snapshot that passed every check: the fold after the first `size` entries."""

    ledger: Ledger
    size: int


def save(engine: Engine, audit_log: AuditLog, signer: Signer, fold: Ledger, size: int) -> None:
    """Store `fold` (the ledger folded over the first `size` entries) as the snapshot,
    replacing any older one. The caller must not change `fold` meanwhile."""
    state = pickle.dumps(fold, protocol=pickle.HIGHEST_PROTOCOL)
    root = audit_log.root(size)
    fmt = fold_format()
    signature = b64encode(signer.sign(_message(size, root, fmt, state)))
    with engine.begin() as connection:
        connection.execute(delete(_TABLE))
        connection.execute(_TABLE.insert().values(
            size=size, root_hash=root, fold_format=fmt, state=state, key_id=signer.key_id,
            signature=signature, created_at=datetime.now(UTC)))


def latest_size(connection: Connection) -> int | None:
    """The size of the stored snapshot (unchecked), or None."""
    size = connection.execute(select(_TABLE.c.size).order_by(_TABLE.c.size.desc())
                              .limit(1)).scalar_one_or_none()
    return None if size is None else int(size)


def load(engine: Engine, audit_log: AuditLog, public_key: bytes) -> Loaded | None:
    """The stored snapshot if it passes the checks of the module doc, else None (logged)."""
    with engine.connect() as connection:
        snapshot = connection.execute(select(_TABLE).order_by(_TABLE.c.size.desc())
                                      .limit(1)).first()
    if snapshot is None:
        return None
    reason = refusal(snapshot, audit_log, public_key)
    if reason is not None:
        log.warning("ledger snapshot at size %s not used (%s): folding the whole log",
                    snapshot.size, reason)
        return None
    fold = pickle.loads(bytes(snapshot.state))  # signed by our own key: module doc
    if not isinstance(fold, Ledger):
        log.warning("ledger snapshot at size %s not used (not a Ledger)", snapshot.size)
        return None
    return Loaded(fold, int(snapshot.size))


def refusal(snapshot: Row[Any], audit_log: AuditLog, public_key: bytes) -> str | None:
    """Why `snapshot` must not be used, or None if it passes every check."""
    size, state, root = int(snapshot.size), bytes(snapshot.state), bytes(snapshot.root_hash)
    if snapshot.fold_format != fold_format():
        return "written by another version of the fold"
    try:
        verify(public_key, _message(size, root, snapshot.fold_format, state),
               b64decode(snapshot.signature))
    except (SignatureInvalidError, ValueError):
        return "its signature does not verify under the coordinator key"
    try:
        current = audit_log.root(size)
    except ValueError:
        return "the log is shorter than the snapshot"
    if current != root:
        return "the log's root at its size differs"
    return None
