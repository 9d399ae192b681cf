"""The registry's tables (SQLAlchemy 2, on `CoordinatorBase`): organisations, researchers, API
keys, hospitals and the replay cache of signed requests. The study tables are the study
lifecycle's (`exchange.study.models`), on the same metadata and database.

Why these shapes:
- API keys are never stored: only a public lookup `prefix` and the SHA-256 of the whole
  high-entropy token, so a stolen database does not yield working keys. Revocation is a
  timestamp, never a delete, so the audit trail of who held which key stays intact.
- Hospitals carry two keys: their Ed25519 signing key (requests, decisions, receipts; its
  key id is what the audit log knows) and their Flower SuperNode public key (ECDSA, for
  SuperLink node authentication).
- No balance table: balances are the audit package's Ledger fold of the log
  (exchange.coordinator.auditing.LedgerView), the same code the auditor runs; an escrow the
  fold would refuse (overdraft) is refused before its transaction commits.
- `request_nonces` is the replay cache of signed hospital requests: the primary key makes a
  second use of the same (key, nonce) fail atomically.
"""

from __future__ import annotations

import enum
from datetime import datetime

from sqlalchemy import BigInteger, ForeignKey, Integer, LargeBinary, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from exchange.db.base import CoordinatorBase
from exchange.db.types import UTCDateTime, enum_column


class Role(enum.StrEnum):
    """Who a caller is; decides what it may see and do."""

    OPERATOR = "operator"
    RESEARCHER = "researcher"
    HOSPITAL = "hospital"
    AUDITOR = "auditor"


class Organisation(CoordinatorBase):
    __tablename__ = "organisations"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    region: Mapped[str] = mapped_column(String(2))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class Researcher(CoordinatorBase):
    __tablename__ = "researchers"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())


class ApiKey(CoordinatorBase):
    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    prefix: Mapped[str] = mapped_column(String(32), unique=True)
    secret_sha256: Mapped[str] = mapped_column(String(64))
    role: Mapped[Role] = mapped_column(enum_column(Role, "api_key_role"))
    organisation_id: Mapped[str | None] = mapped_column(ForeignKey("organisations.id"), index=True)
    researcher_id: Mapped[str | None] = mapped_column(ForeignKey("researchers.id"))
    label: Mapped[str] = mapped_column(String(200), default="")
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    revoked_at: Mapped[datetime | None] = mapped_column(UTCDateTime())


class Hospital(CoordinatorBase):
    __tablename__ = "hospitals"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    organisation_id: Mapped[str] = mapped_column(ForeignKey("organisations.id"), index=True)
    name: Mapped[str] = mapped_column(String(200))
    signing_public_key: Mapped[str] = mapped_column(String(64))
    signing_key_id: Mapped[str] = mapped_column(String(32), unique=True)
    flower_public_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
    # the hospital's last signed request (registry.use_nonce_async); None before the first
    last_contact_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)


class RequestNonce(CoordinatorBase):
    __tablename__ = "request_nonces"

    key_id: Mapped[str] = mapped_column(String(32), primary_key=True)
    nonce: Mapped[str] = mapped_column(String(128), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), index=True)


class LedgerSnapshot(CoordinatorBase):
    """The coordinator's ledger fold after the first `size` log entries, signed by its key: a
    start-up cache, checked before use (exchange/coordinator/ledger_snapshot.py)."""

    __tablename__ = "ledger_snapshots"

    size: Mapped[int] = mapped_column(BigInteger(), primary_key=True, autoincrement=False)
    root_hash: Mapped[bytes] = mapped_column(LargeBinary(32))
    fold_format: Mapped[str] = mapped_column(String(64))
    state: Mapped[bytes] = mapped_column(LargeBinary())
    key_id: Mapped[str] = mapped_column(String(64))
    signature: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[datetime] = mapped_column(UTCDateTime())
