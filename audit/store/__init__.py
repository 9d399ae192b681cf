"""The audit log in the coordinator's database, one concern a module:

- `schema`: the tables and the triggers that make them append-only;
- `nodes`: the Merkle tree's complete-subtree hashes over the database (O(log n) reads);
- `entries`: entry rows: reading leaves back, the size, the one INSERT per table of an append;
- `admission`: whether an entry may join the log (form, signature, signer, uniqueness);
- `log`: `AuditLog`, the one write path (`append_in` in the caller's transaction) and reads;
- `trust`: the trust anchors recorded once; `readers`: reading a log by URL (`audit export`);
- `check`: `verify_storage`, the full O(n) check of a stored log.

The design and what each database guarantees: docs/audit-store.md.
"""

from audit.store.admission import MAX_ENTRY_BYTES
from audit.store.check import verify_storage
from audit.store.entries import entry_from_leaf
from audit.store.errors import (
    AuditStoreError,
    CommitOutcomeUnknownError,
    DuplicateEntryError,
    EntryRefusedError,
    SchemaMissingError,
    StoreCorruptError,
)
from audit.store.log import AuditLog
from audit.store.readers import make_audit_engine, read_entries, read_latest_checkpoint, read_stored_trust
from audit.store.schema import (
    ADVISORY_LOCK_KEY,
    APPEND_ONLY_TABLES,
    AUDIT_METADATA,
    CHECKPOINTS_TABLE,
    ENTRIES_TABLE,
    META_TABLE,
    NODES_TABLE,
    append_only_trigger_ddl,
    audit_checkpoints,
    audit_entries,
    audit_log_meta,
    audit_tree_nodes,
    create_schema,
    drop_append_only_trigger_ddl,
    drop_meta_trigger_ddl,
    install_append_only_triggers,
    meta_trigger_ddl,
    postgresql_grant_ddl,
)
from audit.store.trust import TrustMismatchError, record_trust

__all__ = [
    "ADVISORY_LOCK_KEY",
    "APPEND_ONLY_TABLES",
    "AUDIT_METADATA",
    "CHECKPOINTS_TABLE",
    "ENTRIES_TABLE",
    "MAX_ENTRY_BYTES",
    "META_TABLE",
    "NODES_TABLE",
    "AuditLog",
    "AuditStoreError",
    "CommitOutcomeUnknownError",
    "DuplicateEntryError",
    "EntryRefusedError",
    "SchemaMissingError",
    "StoreCorruptError",
    "TrustMismatchError",
    "append_only_trigger_ddl",
    "audit_checkpoints",
    "audit_entries",
    "audit_log_meta",
    "audit_tree_nodes",
    "create_schema",
    "drop_append_only_trigger_ddl",
    "drop_meta_trigger_ddl",
    "entry_from_leaf",
    "install_append_only_triggers",
    "make_audit_engine",
    "meta_trigger_ddl",
    "postgresql_grant_ddl",
    "read_entries",
    "read_latest_checkpoint",
    "read_stored_trust",
    "record_trust",
    "verify_storage",
]
