"""The coordinator's side of the audit log: appends in its own transactions, key look-ups.

Appending is the audit store's job (`audit.store.AuditLog.append_in`): the entry and the state
change it records commit in the same transaction, with the store's own form, size, signer and
uniqueness rules and its write lock. Nothing of those rules is repeated here.
"""

from __future__ import annotations

from sqlalchemy import Connection, select

from audit.keyring import KEY_KINDS, Keyring
from audit.store import audit_entries, entry_from_leaf


def active_key(connection: Connection, trusted_operator_key: bytes, kid: str) -> bytes | None:
    """The public key of key id `kid` if it is registered and active in the log as `connection`
    sees it, else None. Replays the key entries (a handful) with the audit package's Keyring;
    used once at start-up, to register the coordinator key only if it is not yet."""
    keyring = Keyring(trusted_operator_key)
    e = audit_entries.c
    for row in connection.execute(select(e.idx, e.leaf).where(e.kind.in_(sorted(KEY_KINDS)))
                                  .order_by(e.idx)):
        keyring.apply(entry_from_leaf(bytes(row.leaf)), int(row.idx))
    record = keyring.get(kid)
    return record.public_key if record is not None and record.active else None
