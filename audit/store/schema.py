"""The audit log's tables and the triggers that make them append-only.

Tables (on this package's own MetaData: `audit` imports nothing from `exchange`; the Alembic
migrations `0001_audit_log` and `0004_audit_log_meta` of the coordinator tree create them):

- `audit_entries`: one row per entry, `idx` 0, 1, 2, ... without gaps; `leaf` is the exact
  Merkle leaf input (RFC 8785 encoding of the whole envelope); `leaf_hash`, `kind`, `key_id`
  and `time` are copies for queries.
- `audit_tree_nodes`: the hash of every complete subtree, (level, idx) = leaves
  [idx * 2**level, (idx + 1) * 2**level) (see audit.store.nodes).
- `audit_checkpoints`: every checkpoint the log signed, by size; sizes only grow.
- `audit_log_meta`: the log's trust anchors, written once (see audit.store.trust).

Append-only is enforced by the database itself (triggers that refuse UPDATE, DELETE and
TRUNCATE; `append_only_trigger_ddl`), not by convention. What each database guarantees:
docs/audit-store.md.
"""

from __future__ import annotations

import hashlib

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Connection,
    DateTime,
    Engine,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    UniqueConstraint,
    inspect,
)
from sqlalchemy.exc import SQLAlchemyError

from audit.store.errors import AuditStoreError, SchemaMissingError

# The same naming convention as exchange/db/base.py, so Alembic batch migrations name and drop
# constraints identically on SQLite and PostgreSQL (audit may not import exchange).
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

AUDIT_METADATA = MetaData(naming_convention=NAMING_CONVENTION)

ENTRIES_TABLE = "audit_entries"
NODES_TABLE = "audit_tree_nodes"
CHECKPOINTS_TABLE = "audit_checkpoints"
APPEND_ONLY_TABLES = (ENTRIES_TABLE, NODES_TABLE, CHECKPOINTS_TABLE)

# SQLite: "INTEGER PRIMARY KEY" makes idx the rowid, so the table is clustered by index.
_BigIndex = BigInteger().with_variant(Integer(), "sqlite")

audit_entries = Table(
    ENTRIES_TABLE,
    AUDIT_METADATA,
    Column("idx", _BigIndex, primary_key=True, autoincrement=False,
           comment="0-based position in the log; contiguous, enforced by a trigger"),
    Column("leaf", LargeBinary(), nullable=False,
           comment="RFC 8785 encoding of the whole envelope: the Merkle leaf input"),
    Column("leaf_hash", LargeBinary(32), nullable=False, comment="SHA-256(0x00 || leaf)"),
    Column("kind", String(128), nullable=False),
    Column("key_id", String(64), nullable=False),
    Column("time", String(32), nullable=False, comment="the envelope's RFC 3339 UTC time"),
    CheckConstraint("idx >= 0", name="idx_nonnegative"),
    # A signed entry may appear once: the verifier rejects a byte-for-byte replay.
    UniqueConstraint("leaf_hash"),
    Index(None, "kind"),
    comment="The audit log's entries. Append-only: triggers refuse UPDATE, DELETE, TRUNCATE.",
)

audit_tree_nodes = Table(
    NODES_TABLE,
    AUDIT_METADATA,
    Column("level", SmallInteger(), nullable=False),
    Column("idx", _BigIndex, nullable=False, autoincrement=False),
    Column("hash", LargeBinary(32), nullable=False),
    PrimaryKeyConstraint("level", "idx"),
    CheckConstraint("level >= 0 AND level < 64 AND idx >= 0", name="position"),
    sqlite_with_rowid=False,
    comment="Hash of every complete subtree over leaves [idx*2^level, (idx+1)*2^level).",
)

audit_checkpoints = Table(
    CHECKPOINTS_TABLE,
    AUDIT_METADATA,
    Column("size", _BigIndex, primary_key=True, autoincrement=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("note", Text(), nullable=False, comment="C2SP signed note, as served"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("size >= 0", name="size_nonnegative"),
    comment="Checkpoints the log signed; sizes only grow (trigger).",
)

META_TABLE = "audit_log_meta"

audit_log_meta = Table(
    META_TABLE,
    AUDIT_METADATA,
    Column("id", SmallInteger(), primary_key=True, autoincrement=False),
    Column("origin", Text(), nullable=False, comment="the checkpoint origin line"),
    Column("operator_public_key", LargeBinary(32), nullable=False,
           comment="the root operator key: root of the keyring"),
    Column("log_public_key", LargeBinary(32), nullable=False, comment="signs the checkpoints"),
    Column("created_at", DateTime(timezone=True), nullable=False),
    CheckConstraint("id = 1", name="single_row"),
    comment="The log's trust anchors, written once when the log is created (triggers refuse "
            "UPDATE, DELETE, TRUNCATE and a second row).",
)

# PostgreSQL advisory lock key for the writers of this log: the first 8 bytes of
# SHA-256("audit_entries"), as a signed 64-bit integer. Advisory locks are per database.
ADVISORY_LOCK_KEY = int.from_bytes(hashlib.sha256(ENTRIES_TABLE.encode()).digest()[:8], "big",
                                   signed=True)


# -- trigger DDL (called by the migration, and by tests that build tables by hand) ------------


def _sqlite_trigger_ddl() -> list[str]:
    statements: list[str] = []
    for table in APPEND_ONLY_TABLES:
        for op in ("UPDATE", "DELETE"):
            statements.append(
                f"CREATE TRIGGER trg_{table}_no_{op.lower()} BEFORE {op} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only: {op} refused'); END")
    # INSERT OR REPLACE deletes the old row without firing DELETE triggers (unless
    # recursive_triggers is on), so each table also refuses an insert over an existing row.
    statements.append(
        f"CREATE TRIGGER trg_{ENTRIES_TABLE}_next_index BEFORE INSERT ON {ENTRIES_TABLE} "
        f"WHEN NEW.idx IS NOT (SELECT COALESCE(MAX(idx) + 1, 0) FROM {ENTRIES_TABLE}) "
        f"BEGIN SELECT RAISE(ABORT, '{ENTRIES_TABLE}: idx must be the next index "
        f"(no gaps, no overwrite)'); END")
    statements.append(
        f"CREATE TRIGGER trg_{NODES_TABLE}_no_overwrite BEFORE INSERT ON {NODES_TABLE} "
        f"WHEN EXISTS (SELECT 1 FROM {NODES_TABLE} WHERE level = NEW.level AND idx = NEW.idx) "
        f"BEGIN SELECT RAISE(ABORT, '{NODES_TABLE} is append-only: node exists'); END")
    statements.append(
        f"CREATE TRIGGER trg_{CHECKPOINTS_TABLE}_grows BEFORE INSERT ON {CHECKPOINTS_TABLE} "
        f"WHEN NEW.size <= (SELECT COALESCE(MAX(size), -1) FROM {CHECKPOINTS_TABLE}) "
        f"BEGIN SELECT RAISE(ABORT, '{CHECKPOINTS_TABLE}: size must grow'); END")
    return statements


def _postgresql_trigger_ddl() -> list[str]:
    statements = [
        """CREATE OR REPLACE FUNCTION audit_refuse_change() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END
$$""",
        f"""CREATE OR REPLACE FUNCTION audit_entries_next_index() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.idx IS DISTINCT FROM (SELECT COALESCE(MAX(idx) + 1, 0) FROM {ENTRIES_TABLE}) THEN
        RAISE EXCEPTION '{ENTRIES_TABLE}: idx % is not the next index (no gaps, no overwrite)',
            NEW.idx USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$""",
        f"""CREATE OR REPLACE FUNCTION audit_checkpoints_grow() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF NEW.size <= (SELECT COALESCE(MAX(size), -1) FROM {CHECKPOINTS_TABLE}) THEN
        RAISE EXCEPTION '{CHECKPOINTS_TABLE}: size % must grow', NEW.size
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$""",
    ]
    for table in APPEND_ONLY_TABLES:
        # FOR EACH STATEMENT: fires even when no row matches, and is the only level TRUNCATE has.
        statements.append(
            f"CREATE TRIGGER trg_{table}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
            f"ON {table} FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()")
    statements.append(
        f"CREATE TRIGGER trg_{ENTRIES_TABLE}_next_index BEFORE INSERT ON {ENTRIES_TABLE} "
        f"FOR EACH ROW EXECUTE FUNCTION audit_entries_next_index()")
    statements.append(
        f"CREATE TRIGGER trg_{CHECKPOINTS_TABLE}_grows BEFORE INSERT ON {CHECKPOINTS_TABLE} "
        f"FOR EACH ROW EXECUTE FUNCTION audit_checkpoints_grow()")
    return statements


def meta_trigger_ddl(dialect_name: str) -> list[str]:
    """The statements that make `audit_log_meta` write-once on `dialect_name` (the same pattern
    as `append_only_trigger_ddl`, which migration 0001 froze for the other tables)."""
    if dialect_name == "sqlite":
        statements = [
            f"CREATE TRIGGER trg_{META_TABLE}_no_{op.lower()} BEFORE {op} ON {META_TABLE} "
            f"BEGIN SELECT RAISE(ABORT, '{META_TABLE} is append-only: {op} refused'); END"
            for op in ("UPDATE", "DELETE")]
        # Also stops INSERT OR REPLACE, which deletes without firing the DELETE trigger.
        statements.append(
            f"CREATE TRIGGER trg_{META_TABLE}_once BEFORE INSERT ON {META_TABLE} "
            f"WHEN EXISTS (SELECT 1 FROM {META_TABLE}) "
            f"BEGIN SELECT RAISE(ABORT, '{META_TABLE} is append-only: written once'); END")
        return statements
    if dialect_name == "postgresql":
        # audit_refuse_change() is migration 0001's function; the CHECK (id = 1) and the
        # primary key refuse a second row; an upsert fires the UPDATE trigger.
        return [f"CREATE TRIGGER trg_{META_TABLE}_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
                f"ON {META_TABLE} FOR EACH STATEMENT EXECUTE FUNCTION audit_refuse_change()"]
    raise ValueError(f"dialect: {dialect_name!r} is not supported (sqlite or postgresql)")


def drop_meta_trigger_ddl(dialect_name: str) -> list[str]:
    if dialect_name == "sqlite":
        return [f"DROP TRIGGER IF EXISTS trg_{META_TABLE}_{name}"
                for name in ("no_update", "no_delete", "once")]
    if dialect_name == "postgresql":
        return [f"DROP TRIGGER IF EXISTS trg_{META_TABLE}_append_only ON {META_TABLE}"]
    raise ValueError(f"dialect: {dialect_name!r} is not supported (sqlite or postgresql)")


def append_only_trigger_ddl(dialect_name: str) -> list[str]:
    """The statements that make the audit tables append-only on `dialect_name`.

    SQLite: BEFORE UPDATE/DELETE triggers that RAISE(ABORT), plus BEFORE INSERT guards (the
    next index only; no node or checkpoint written twice), because INSERT OR REPLACE would
    otherwise delete a row without firing a DELETE trigger.
    PostgreSQL: one plpgsql function raising an exception, fired BEFORE UPDATE OR DELETE OR
    TRUNCATE for each statement; plus the next-index and growing-checkpoint guards.
    """
    if dialect_name == "sqlite":
        return _sqlite_trigger_ddl()
    if dialect_name == "postgresql":
        return _postgresql_trigger_ddl()
    raise ValueError(f"dialect: {dialect_name!r} is not supported (sqlite or postgresql)")


def drop_append_only_trigger_ddl(dialect_name: str) -> list[str]:
    """The statements that remove what `append_only_trigger_ddl` installed (for downgrade)."""
    if dialect_name == "sqlite":
        names = [f"trg_{t}_no_{op}" for t in APPEND_ONLY_TABLES for op in ("update", "delete")]
        names += [f"trg_{ENTRIES_TABLE}_next_index", f"trg_{NODES_TABLE}_no_overwrite",
                  f"trg_{CHECKPOINTS_TABLE}_grows"]
        return [f"DROP TRIGGER IF EXISTS {name}" for name in names]
    if dialect_name == "postgresql":
        statements = [f"DROP TRIGGER IF EXISTS trg_{t}_append_only ON {t}"
                      for t in APPEND_ONLY_TABLES]
        statements += [
            f"DROP TRIGGER IF EXISTS trg_{ENTRIES_TABLE}_next_index ON {ENTRIES_TABLE}",
            f"DROP TRIGGER IF EXISTS trg_{CHECKPOINTS_TABLE}_grows ON {CHECKPOINTS_TABLE}",
            "DROP FUNCTION IF EXISTS audit_refuse_change()",
            "DROP FUNCTION IF EXISTS audit_entries_next_index()",
            "DROP FUNCTION IF EXISTS audit_checkpoints_grow()",
        ]
        return statements
    raise ValueError(f"dialect: {dialect_name!r} is not supported (sqlite or postgresql)")


def postgresql_grant_ddl(role: str) -> list[str]:
    """Privileges for the coordinator's application role: read and append, nothing else.

    The role must not own the tables (an owner can ALTER TABLE ... DISABLE TRIGGER or DROP
    them) and must not be a superuser (which can also SET session_replication_role = replica,
    under which ordinary triggers do not fire). See docs/audit-store.md.
    """
    if not role.replace("_", "").isalnum():
        raise ValueError(f"role: {role!r} must be letters, digits and underscores")
    tables = ", ".join((*APPEND_ONLY_TABLES, META_TABLE))
    return [f"REVOKE ALL ON {tables} FROM {role}",
            f"GRANT SELECT, INSERT ON {tables} TO {role}"]


def install_append_only_triggers(connection: Connection) -> None:
    """Install the triggers on the connection's database (inside its current transaction)."""
    for statement in append_only_trigger_ddl(connection.dialect.name):
        connection.exec_driver_sql(statement)


def create_schema(engine: Engine) -> None:
    """Create the audit tables and their triggers directly, for embedded use and tests.

    The coordinator's schema is made by its Alembic migrations (`0001_audit_log`), which
    create the same tables and call the same trigger DDL.
    """
    with engine.begin() as connection:
        AUDIT_METADATA.create_all(connection)
        install_append_only_triggers(connection)
        for statement in meta_trigger_ddl(connection.dialect.name):
            connection.exec_driver_sql(statement)



def check_schema(engine: Engine, *, meta: bool = False) -> None:
    """Raise SchemaMissingError unless the audit tables (and `audit_log_meta` if `meta`) exist."""
    try:
        names = set(inspect(engine).get_table_names())
    except SQLAlchemyError as exc:
        raise AuditStoreError(f"engine: cannot connect to the database ({exc})") from exc
    missing = [name for name in APPEND_ONLY_TABLES if name not in names]
    if missing:
        raise SchemaMissingError(f"database: audit table(s) {missing} do not exist; run the "
                                 f"coordinator migrations (exchange db upgrade --db URL)")
    if meta and META_TABLE not in names:
        raise SchemaMissingError(f"database: table {META_TABLE!r} does not exist; run the "
                                 f"coordinator migrations (exchange db upgrade --db URL)")
