"""The log's trust anchors (origin, root operator key, log key), recorded once in the database.

Why: an export of the database then needs no separate trust file, and a coordinator started
with other keys than the log was created with is stopped before it appends entries or
checkpoints no auditor pinning the original keys would accept.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import Connection, Engine, select
from sqlalchemy.exc import DBAPIError

from audit.export import Trust
from audit.store.errors import AuditStoreError
from audit.store.schema import META_TABLE, audit_log_meta, check_schema


class TrustMismatchError(AuditStoreError):
    """The trust anchors given differ from those the log recorded when it was created."""


def _trust_differences(stored: Trust, given: Trust) -> list[str]:
    return [name for name in ("origin", "operator_public_key", "log_public_key")
            if getattr(stored, name) != getattr(given, name)]


def stored_trust(connection: Connection) -> Trust | None:
    """The recorded anchors, or None if none were recorded yet."""
    row = connection.execute(select(audit_log_meta)).first()
    if row is None:
        return None
    return Trust(str(row.origin), bytes(row.operator_public_key), bytes(row.log_public_key))


def record_trust(engine: Engine, trust: Trust) -> Trust:
    """Write the log's trust anchors once (origin, root operator key, log key); return them.

    Raises TrustMismatchError naming the fields that differ from the stored ones.
    """
    check_schema(engine, meta=True)
    for attempt in range(2):
        try:
            with engine.begin() as connection:
                stored = stored_trust(connection)
                if stored is None:
                    connection.execute(audit_log_meta.insert().values(
                        id=1, origin=trust.origin, operator_public_key=trust.operator_public_key,
                        log_public_key=trust.log_public_key, created_at=datetime.now(UTC)))
                    return trust
        except DBAPIError:  # another process recorded them first (or the trigger refused)
            if attempt == 0:
                continue
            raise
        differ = _trust_differences(stored, trust)
        if differ:
            raise TrustMismatchError(f"{', '.join(differ)}: differ from the trust anchors this log "
                                     f"was created with (origin {stored.origin!r})")
        return stored
    raise AuditStoreError(f"{META_TABLE}: could neither write nor read the trust anchors")
