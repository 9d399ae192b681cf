"""The audit log in a database: append-only tables, group commit, proofs from O(log n) rows.

Why a database and not a file: the coordinator already runs one (SQLite embedded, PostgreSQL in
production), so the log gets the database's durability (an acknowledged append survives kill -9)
and its locking (several processes may append to one log) for free, and append-only is enforced
by the database itself (triggers that refuse UPDATE, DELETE and TRUNCATE; see
`append_only_trigger_ddl`), not by convention.

Tables (on this package's own MetaData: `audit` imports nothing from `exchange`; the Alembic
migration `0001_audit_log` of the coordinator tree creates them):

- `audit_entries`: one row per entry, `idx` 0, 1, 2, ... without gaps; `leaf` is the exact
  Merkle leaf input (RFC 8785 encoding of the whole envelope); `leaf_hash`, `kind`, `key_id`
  and `time` are copies for queries.
- `audit_tree_nodes`: the hash of every complete subtree, (level, idx) = leaves
  [idx * 2**level, (idx + 1) * 2**level). An append writes the leaf node and each parent it
  completes (`audit.merkle.append_nodes`: amortized 2 rows, at most log2(n) + 1), so roots and
  proofs for any size read O(log n) rows, in one query.
- `audit_checkpoints`: every checkpoint the log signed, by size; sizes only grow.

Writes: one writer thread per `AuditLog` drains a queue of pending appends and commits as many
as are waiting in ONE transaction (group commit: one fsync for many entries), then acknowledges
each caller. Across processes, each write transaction first takes the database's write lock:
`BEGIN IMMEDIATE` on SQLite, a transaction-level advisory lock on PostgreSQL. Inside it the
writer checks every pending entry (signer registered and active at that index, key entries
allowed, no replay) and inserts the accepted ones with their indexes and tree nodes at the size
it knows; if another process appended meanwhile, the primary key refuses that insert and the
group is redone after reading the size and replaying the new key entries (see `_commit`).
The design and what each database guarantees: docs/audit-store.md.
"""

from __future__ import annotations

import asyncio
import binascii
import copy
import functools
import hashlib
import json
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey
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
    and_,
    bindparam,
    create_engine,
    event,
    func,
    inspect,
    null,
    or_,
    select,
    text,
    union_all,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, IntegrityError, SQLAlchemyError

from audit import merkle
from audit.checkpoint import Checkpoint, sign_checkpoint
from audit.entry import Entry, MalformedEntryError
from audit.export import Trust
from audit.keyring import KEY_KINDS, Keyring, KeyringError
from audit.signing import Signer, canonical, signed_in_this_process
from audit.verify import decode_signature, envelope_from_json, signing_input_from_line

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

DEFAULT_MAX_BATCH = 1024
MAX_ENTRY_BYTES = 1 << 20  # an entry is a statement with commitments, never bulk data
_KIND_CHARS = 128  # the column sizes of audit_entries.kind and .key_id
_KEY_ID_CHARS = 64
_READ_PAGE = 1000
# connection.info key: (the transaction that called append_in, the log size before its first
# append). Rows from that size on are this transaction's own, not committed.
_APPEND_IN_MARK = "audit.store.append_in"
# connection.info key: (transaction, log size, key ring, right edge of the tree) after that
# transaction's latest append_in (see append_in).
_APPEND_IN_STATE = "audit.store.append_in_state"
SQLITE_BUSY_TIMEOUT_S = 30.0

T = TypeVar("T")


# -- errors ------------------------------------------------------------------------------------


class AuditStoreError(Exception):
    """Base class of the store's errors."""


class EntryRefusedError(AuditStoreError, ValueError):
    """An entry was refused; nothing of its append call was written.

    `position` is the entry's position in the `append_many` call, `index` the log index it
    would have had (None if refused before an index was known), `reason` what is wrong.
    """

    def __init__(self, position: int, index: int | None, reason: str) -> None:
        where = f"entry {position} of the append" if index is None else \
            f"entry {position} of the append (would be log index {index})"
        super().__init__(f"{where} refused: {reason}")
        self.position = position
        self.index = index
        self.reason = reason


class DuplicateEntryError(EntryRefusedError):
    """The entry is byte for byte one already in the log (the verifier rejects replays)."""


class AppendNotCommittedError(AuditStoreError):
    """The database refused or failed the write transaction; the append is not acknowledged.

    If the failure happened during COMMIT itself (e.g. the connection dropped), the entries
    may or may not be in the log: read it to find out.
    """


class StoreCorruptError(AuditStoreError):
    """The stored log is inconsistent (missing rows, wrong hashes); the message says where."""


class LogClosedError(AuditStoreError):
    """The AuditLog was closed; it accepts no more appends."""


class SchemaMissingError(AuditStoreError):
    """The audit tables do not exist: run the coordinator migrations first."""


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


# -- engines -------------------------------------------------------------------------------------


def normalize_url(url: str) -> str:
    """Map plain PostgreSQL URLs to the psycopg 3 driver (as exchange.db.engine does)."""
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _sqlite_durability(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=FULL")
    cursor.execute(f"PRAGMA busy_timeout={int(SQLITE_BUSY_TIMEOUT_S * 1000)}")
    cursor.close()


def make_audit_engine(url: str) -> Engine:
    """An engine for reading or exporting a log by URL (`audit export --db URL`).

    Reading only: no PRAGMA that writes (the journal mode is whatever the coordinator set),
    so a read-only copy of a SQLite file can be exported too.
    """
    url = normalize_url(url)
    if make_url(url).get_backend_name() == "sqlite":
        return create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S,
                                                "check_same_thread": False})
    return create_engine(url, pool_pre_ping=True)


def _sqlite_writer_engine(engine: Engine) -> Engine:
    """A private engine whose transactions start with BEGIN IMMEDIATE.

    Why: pysqlite's legacy transaction control only BEGINs before the first INSERT, so the
    writer's "read the size, then insert" would run its read outside any lock. Following the
    SQLAlchemy docs (sqlite_enabling_transactions), pysqlite's own BEGIN is switched off and
    the engine emits BEGIN IMMEDIATE, which takes SQLite's write lock up front; other writers
    (threads or processes) wait on busy_timeout. synchronous=FULL is set here, whatever the
    caller's engine does, because an acknowledged append must survive a crash.
    """
    url = engine.url
    database = url.database or ""
    if database in ("", ":memory:") or database.startswith("file::memory:") or \
            "mode=memory" in str(url.query):
        raise AuditStoreError("engine: an in-memory SQLite database cannot hold a durable "
                              "audit log; use a file (sqlite:///path/to/exchange.db)")
    writer = create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_S,
                                              "check_same_thread": False},
                           pool_size=1, max_overflow=0)

    @event.listens_for(writer, "connect")
    def _connect(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None
        _sqlite_durability(dbapi_connection, record)

    @event.listens_for(writer, "begin")
    def _begin(connection: Connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    return writer


# -- reading nodes -----------------------------------------------------------------------------

_ZERO_HASH = bytes(merkle.HASH_SIZE)


class _Recorder:
    """A NodeSource that records which nodes an algorithm asks for (its values are dummies).

    RFC 6962's root and proof algorithms choose which nodes to read from the sizes alone, never
    from the hash values, so one dry run lists every node they need; one query then fetches them.
    """

    def __init__(self) -> None:
        self.wanted: list[tuple[int, int]] = []

    def node(self, level: int, index: int) -> bytes:
        self.wanted.append((level, index))
        return _ZERO_HASH


class _DictSource:
    def __init__(self, nodes: Mapping[tuple[int, int], bytes]) -> None:
        self._nodes = nodes

    def node(self, level: int, index: int) -> bytes:
        try:
            return self._nodes[(level, index)]
        except KeyError:
            raise StoreCorruptError(f"{NODES_TABLE}: node (level {level}, index {index}) "
                                    f"is missing") from None


# Statements built once, not per call: building and cache-keying a SQLAlchemy construct costs
# more than executing it on these small lookups, several times per append_in
# (docs/benchmarks/api.md). Lists are fixed-length sets of bind parameters, cached per length
# (up to _LOOKUP_CHUNK), not `expanding` ones: those rewrite the SQL string on every execution.
_LOOKUP_CHUNK = 64
_n, _e = audit_tree_nodes.c, audit_entries.c
_SIZE = select(func.max(_e.idx))
_LEAVES_PAGE = (select(_e.idx, _e.leaf).where(_e.idx >= bindparam("start"), _e.idx < bindparam("stop"))
                .order_by(_e.idx).limit(_READ_PAGE))
_KEY_LEAVES_PAGE = (select(_e.idx, _e.leaf)
                    .where(_e.idx >= bindparam("start"), _e.idx < bindparam("stop"),
                           _e.kind.in_(sorted(KEY_KINDS)))
                    .order_by(_e.idx).limit(_READ_PAGE))


@functools.lru_cache(maxsize=64)
def _indexes_of(count: int) -> Any:
    """SELECT the index of each of `count` leaf hashes (:h0 ... :hN) that is in the log."""
    return select(_e.leaf_hash, _e.idx).where(
        _e.leaf_hash.in_([bindparam(f"h{i}") for i in range(count)]))


@functools.lru_cache(maxsize=64)
def _size_and_indexes_of(count: int) -> Any:
    """The log's last index (the row with a NULL hash) and, in the same statement, the index of
    each of `count` leaf hashes already in the log: one round trip instead of two per
    append_in."""
    return union_all(select(null().label("leaf_hash"), func.max(_e.idx).label("idx")),
                     _indexes_of(count))


def _size_and_stored_indexes(connection: Connection,
                             hashes: Sequence[bytes]) -> tuple[int, dict[bytes, int]]:
    """(log size, {leaf hash: index} for those of `hashes` already in the log)."""
    if not hashes or len(hashes) > _LOOKUP_CHUNK:
        return _size(connection), _stored_indexes(connection, hashes)
    size = 0
    found: dict[bytes, int] = {}
    rows = connection.execute(_size_and_indexes_of(len(hashes)),
                              {f"h{i}": leaf_hash for i, leaf_hash in enumerate(hashes)})
    for row in rows:
        if row.leaf_hash is None:
            size = 0 if row.idx is None else int(row.idx) + 1
        else:
            found[bytes(row.leaf_hash)] = int(row.idx)
    return size, found


@functools.lru_cache(maxsize=128)
def _nodes_at(count: int) -> Any:
    """SELECT the nodes at `count` (level, idx) pairs: `(level = :l0 AND idx = :i0) OR ...`, an
    index look-up per pair on both databases. (A row-value `(level, idx) IN (VALUES ...)` made
    SQLite scan the whole table: ~1 ms at 10k nodes instead of ~25 us.)"""
    return select(_n.level, _n.idx, _n.hash).where(or_(*(
        and_(_n.level == bindparam(f"l{i}"), _n.idx == bindparam(f"i{i}")) for i in range(count))))


def _fetch_nodes(connection: Connection, wanted: Iterable[tuple[int, int]]) -> dict[tuple[int, int], bytes]:
    coordinates = sorted(set(wanted))
    if not coordinates:
        return {}
    found: dict[tuple[int, int], bytes] = {}
    for start in range(0, len(coordinates), _LOOKUP_CHUNK):  # a proof wants ~2 log2(n)
        chunk = coordinates[start:start + _LOOKUP_CHUNK]
        parameters: dict[str, int] = {}
        for i, (level, index) in enumerate(chunk):
            parameters[f"l{i}"], parameters[f"i{i}"] = level, index
        for row in connection.execute(_nodes_at(len(chunk)), parameters):
            found[(row.level, row.idx)] = bytes(row.hash)
    return found


def _with_nodes(connection: Connection, algorithm: Callable[[merkle.NodeSource], T]) -> T:
    """Run a root/proof algorithm over the stored nodes, reading them in one query."""
    recorder = _Recorder()
    algorithm(recorder)
    return algorithm(_DictSource(_fetch_nodes(connection, recorder.wanted)))


class _WriterSource:
    """Node source for the writer: the cached right edge of the tree, else the database."""

    def __init__(self, connection: Connection, frontier: Mapping[tuple[int, int], bytes]) -> None:
        self._connection = connection
        self._frontier = frontier

    def node(self, level: int, index: int) -> bytes:
        cached = self._frontier.get((level, index))
        if cached is not None:
            return cached
        found = _fetch_nodes(self._connection, [(level, index)])
        if (level, index) not in found:
            raise StoreCorruptError(f"{NODES_TABLE}: node (level {level}, index {index}) "
                                    f"is missing")
        return found[(level, index)]


def _frontier_coordinates(size: int) -> list[tuple[int, int]]:
    """The complete subtrees that make up a tree of `size` leaves, largest first."""
    out: list[tuple[int, int]] = []
    position = 0
    for level in range(size.bit_length() - 1, -1, -1):
        if size >> level & 1:
            out.append((level, position >> level))
            position += 1 << level
    return out


# -- reading entries -----------------------------------------------------------------------------


def _advance_frontier(frontier: Mapping[tuple[int, int], bytes], created: Iterable[merkle.Node],
                      size: int) -> dict[tuple[int, int], bytes]:
    """The right edge of the tree of `size` leaves, from the edge before an append and the
    nodes the append created; coordinates known to neither are left out (read when needed)."""
    known = {(n.level, n.index): n.hash for n in created}
    edge: dict[tuple[int, int], bytes] = {}
    for coordinate in _frontier_coordinates(size):
        node = known.get(coordinate, frontier.get(coordinate))
        if node is not None:
            edge[coordinate] = node
    return edge


def _replay_keys(connection: Connection, keyring: Keyring, start: int,
                 stop: int) -> tuple[Keyring, bool]:
    """`keyring` moved forward over the key entries at [start, stop); (keyring, copied): a copy
    is made before the first change, so the one passed in is never changed."""
    copied = False
    for index, leaf in _iter_leaves(connection, start, stop, key_entries_only=True):
        if not copied:
            keyring, copied = copy.deepcopy(keyring), True
        try:
            keyring.apply(entry_from_leaf(leaf), index)
        except (KeyringError, MalformedEntryError) as exc:
            raise StoreCorruptError(f"entry {index}: stored key entry does not apply: "
                                    f"{exc}") from exc
    return keyring, copied


def entry_from_leaf(leaf: bytes) -> Entry:
    """Parse stored leaf bytes back into an Entry whose leaf_bytes() are exactly `leaf`."""
    try:
        obj = json.loads(leaf)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEntryError(f"leaf: not JSON ({exc})") from exc
    return envelope_from_json(obj).with_leaf(bytes(leaf))


def _size(connection: Connection) -> int:
    top = connection.execute(_SIZE).scalar_one()
    return 0 if top is None else int(top) + 1


def _iter_leaves(connection: Connection, start: int, stop: int, *,
                 key_entries_only: bool = False) -> Iterator[tuple[int, bytes]]:
    """(index, leaf) for start <= index < stop, in order; only the KEY_KINDS entries if asked
    (uses the kind index: opening a long log reads its few key entries, not all of it).
    Keyset pages."""
    statement = _KEY_LEAVES_PAGE if key_entries_only else _LEAVES_PAGE
    position = start
    while position < stop:
        rows = connection.execute(statement, {"start": position, "stop": stop}).all()
        for row in rows:
            yield int(row.idx), bytes(row.leaf)
        if len(rows) < _READ_PAGE:
            return
        position = int(rows[-1].idx) + 1


def _check_schema(engine: Engine) -> None:
    try:
        names = set(inspect(engine).get_table_names())
    except SQLAlchemyError as exc:
        raise AuditStoreError(f"engine: cannot connect to the database ({exc})") from exc
    missing = [name for name in APPEND_ONLY_TABLES if name not in names]
    if missing:
        raise SchemaMissingError(f"database: audit table(s) {missing} do not exist; run the "
                                 f"coordinator migrations (exchange db upgrade --db URL)")


def read_entries(url: str, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
    """Every entry of the log at `url` in log order, from `start` to `stop` (default: all).

    For `audit export --db URL`. The size is read first, so entries appended while exporting
    are not included; the log is append-only, so what is read is a consistent prefix.
    """
    engine = make_audit_engine(url)
    try:
        _check_schema(engine)
        with engine.connect() as connection:
            end = _size(connection) if stop is None else stop
            for _index, leaf in _iter_leaves(connection, start, end):
                yield entry_from_leaf(leaf)
    finally:
        engine.dispose()


def read_latest_checkpoint(url: str) -> str | None:
    """The latest checkpoint note the log at `url` signed, or None if it never signed one.

    An export should hold the entries [0, size) of this checkpoint, so that it verifies.
    """
    engine = make_audit_engine(url)
    try:
        _check_schema(engine)
        with engine.connect() as connection:
            c = audit_checkpoints.c
            note = connection.execute(
                select(c.note).order_by(c.size.desc()).limit(1)).scalar_one_or_none()
            return None if note is None else str(note)
    finally:
        engine.dispose()


# -- trust anchors ---------------------------------------------------------------------------


class TrustMismatchError(AuditStoreError):
    """The trust anchors given differ from those the log recorded when it was created."""


def _trust_differences(stored: Trust, given: Trust) -> list[str]:
    return [name for name in ("origin", "operator_public_key", "log_public_key")
            if getattr(stored, name) != getattr(given, name)]


def _stored_trust(connection: Connection) -> Trust | None:
    row = connection.execute(select(audit_log_meta)).first()
    if row is None:
        return None
    return Trust(str(row.origin), bytes(row.operator_public_key), bytes(row.log_public_key))


def record_trust(engine: Engine, trust: Trust) -> Trust:
    """Write the log's trust anchors once (origin, root operator key, log key); return them.

    Why: an export of the database then needs no separate trust file, and a coordinator
    started with other keys than the log was created with is stopped here, before it appends
    entries or checkpoints no auditor pinning the original keys would accept. Raises
    TrustMismatchError naming the fields that differ from the stored ones.
    """
    _check_meta_schema(engine)
    for attempt in range(2):
        try:
            with engine.begin() as connection:
                stored = _stored_trust(connection)
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


def _check_meta_schema(engine: Engine) -> None:
    _check_schema(engine)
    if META_TABLE not in set(inspect(engine).get_table_names()):
        raise SchemaMissingError(f"database: table {META_TABLE!r} does not exist; run the "
                                 f"coordinator migrations (exchange db upgrade --db URL)")


def read_stored_trust(url: str) -> Trust | None:
    """The trust anchors recorded in the database at `url`, or None if it holds none (a log
    from before migration 0004 that no coordinator has opened since)."""
    engine = make_audit_engine(url)
    try:
        _check_schema(engine)
        if META_TABLE not in set(inspect(engine).get_table_names()):
            return None
        with engine.connect() as connection:
            return _stored_trust(connection)
    finally:
        engine.dispose()


# -- verification of a stored log -------------------------------------------------------------


def verify_storage(engine: Engine, trusted_operator_key: bytes) -> bytes:
    """Check the whole stored log and return its root; raise StoreCorruptError naming the spot.

    Re-verifies every signature against the key state replayed from the log, recomputes every
    leaf hash, rebuilds the tree in memory (audit.merkle.MemoryTree) and compares every stored
    node with it. O(n): for start-up checks, tests and operators, not for the append path.
    """
    keyring = Keyring(trusted_operator_key)
    tree = merkle.MemoryTree()
    e = audit_entries.c
    with engine.connect() as connection:
        size = _size(connection)
        position = 0
        while position < size:
            rows = connection.execute(
                select(e.idx, e.leaf, e.leaf_hash, e.kind, e.key_id, e.time)
                .where(e.idx >= position, e.idx < position + _READ_PAGE).order_by(e.idx)).all()
            for row in rows:
                index = int(row.idx)
                if index != tree.size:
                    raise StoreCorruptError(f"entry {tree.size}: missing (next stored is {index})")
                leaf = bytes(row.leaf)
                try:
                    entry = entry_from_leaf(leaf)
                except MalformedEntryError as exc:
                    raise StoreCorruptError(f"entry {index}: {exc}") from exc
                if canonical(entry.to_json()) != leaf:
                    raise StoreCorruptError(f"entry {index}: leaf is not the canonical encoding")
                if bytes(row.leaf_hash) != merkle.leaf_hash(leaf):
                    raise StoreCorruptError(f"entry {index}: leaf_hash does not match the leaf")
                if (row.kind, row.key_id, row.time) != (entry.kind, entry.key_id, entry.time):
                    raise StoreCorruptError(f"entry {index}: kind/key_id/time columns do not "
                                            f"match the envelope")
                try:
                    keyring.check(entry, index)
                    keyring.apply(entry, index)
                except KeyringError as exc:
                    raise StoreCorruptError(str(exc)) from exc
                tree.append(bytes(row.leaf_hash))
            position += _READ_PAGE
        n = audit_tree_nodes.c
        stored = 0
        for node_row in connection.execute(select(n.level, n.idx, n.hash)):
            level, index = int(node_row.level), int(node_row.idx)
            if (index + 1) << level > size:
                raise StoreCorruptError(f"{NODES_TABLE}: node (level {level}, index {index}) "
                                        f"lies beyond the log size {size}")
            if bytes(node_row.hash) != tree.node(level, index):
                raise StoreCorruptError(f"{NODES_TABLE}: node (level {level}, index {index}) "
                                        f"has the wrong hash")
            stored += 1
        expected = sum(size >> level for level in range(size.bit_length()))
        if stored != expected:
            raise StoreCorruptError(f"{NODES_TABLE}: {stored} nodes stored, a tree of {size} "
                                    f"leaves has {expected}")
    return tree.root()


_PG_BEGIN_LOCKED = (f"BEGIN ISOLATION LEVEL READ COMMITTED; "
                    f"SELECT pg_advisory_xact_lock({ADVISORY_LOCK_KEY}); "
                    f"SET LOCAL synchronous_commit TO on")

# PostgreSQL: entries and nodes in ONE statement (one round trip, whatever the group size):
# arrays unnested in order; the entries' row trigger sees the rows inserted before it in the
# same statement, so the next-index check holds row by row.
_PG_INSERT_TEMPLATE = (
    "WITH new_entries AS (INSERT INTO audit_entries (idx, leaf, leaf_hash, kind, key_id, time) "
    "SELECT idx, leaf, leaf_hash, kind, key_id, time "
    "FROM unnest(CAST({idx} AS bigint[]), CAST({leaf} AS bytea[]), "
    "CAST({leaf_hash} AS bytea[]), CAST({kind} AS varchar[]), CAST({key_id} AS varchar[]), "
    "CAST({time} AS varchar[])) WITH ORDINALITY AS t(idx, leaf, leaf_hash, kind, key_id, time, n) "
    "ORDER BY n) "
    "INSERT INTO audit_tree_nodes (level, idx, hash) "
    "SELECT level, idx, hash FROM unnest(CAST({node_level} AS smallint[]), "
    "CAST({node_idx} AS bigint[]), CAST({node_hash} AS bytea[])) AS u(level, idx, hash)")
_PG_PARAMETERS = ("idx", "leaf", "leaf_hash", "kind", "key_id", "time", "node_level", "node_idx",
                  "node_hash")
_PG_INSERT = text(_PG_INSERT_TEMPLATE.format(**{name: f":{name}" for name in _PG_PARAMETERS}))
_PG_PREPARED_NAME = "audit_group_insert"
_PG_PREPARE = (f"PREPARE {_PG_PREPARED_NAME} AS "
               + _PG_INSERT_TEMPLATE.format(**{name: f"${number}" for number, name
                                               in enumerate(_PG_PARAMETERS, start=1)}))
_PG_WRITE_IN_ONE = (_PG_BEGIN_LOCKED + f"; EXECUTE {_PG_PREPARED_NAME}("
                    + ", ".join(f"%({name})s" for name in _PG_PARAMETERS) + "); COMMIT")


def _pg_insert_parameters(rows: list[dict[str, Any]], nodes: list[merkle.Node]) -> dict[str, list[Any]]:
    return {"idx": [r["idx"] for r in rows], "leaf": [r["leaf"] for r in rows],
            "leaf_hash": [r["leaf_hash"] for r in rows], "kind": [r["kind"] for r in rows],
            "key_id": [r["key_id"] for r in rows], "time": [r["time"] for r in rows],
            "node_level": [n.level for n in nodes], "node_idx": [n.index for n in nodes],
            "node_hash": [n.hash for n in nodes]}


def _insert(connection: Connection, rows: list[dict[str, Any]], nodes: list[merkle.Node]) -> None:
    """Insert a group's entries and tree nodes (SQLite: one INSERT per table; PostgreSQL: one in all)."""
    if connection.dialect.name == "postgresql":
        connection.execute(_PG_INSERT, _pg_insert_parameters(rows, nodes))
        return
    for statement, parameters in _sqlite_insert_statements(rows, nodes):
        connection.exec_driver_sql(statement, parameters)


def _sqlite_insert_statements(rows: list[dict[str, Any]],
                              nodes: list[merkle.Node]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """SQLite: one multi-row INSERT per table (per 500 rows), so the writer gives up the GIL
    twice per group (executemany steps, and releases the GIL, once per row; under load each
    hand-back costs)."""
    for start in range(0, len(rows), _SQLITE_ROWS_PER_INSERT):
        chunk = rows[start:start + _SQLITE_ROWS_PER_INSERT]
        yield (_sqlite_insert_sql(ENTRIES_TABLE, _ENTRY_COLUMNS, len(chunk)),
               tuple(r[c] for r in chunk for c in _ENTRY_COLUMNS))
    for start in range(0, len(nodes), _SQLITE_ROWS_PER_INSERT):
        part = nodes[start:start + _SQLITE_ROWS_PER_INSERT]
        yield (_sqlite_insert_sql(NODES_TABLE, ("level", "idx", "hash"), len(part)),
               tuple(v for n in part for v in (n.level, n.index, n.hash)))


_ENTRY_COLUMNS = ("idx", "leaf", "leaf_hash", "kind", "key_id", "time")
_SQLITE_ROWS_PER_INSERT = 500  # 500 rows x 6 columns stays far below SQLite's 32766 variables


@functools.lru_cache(maxsize=256)
def _sqlite_insert_sql(table: str, columns: tuple[str, ...], count: int) -> str:
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * count)


def _stored_indexes(connection: Connection, hashes: Sequence[bytes]) -> dict[bytes, int]:
    """Which of these leaf hashes are already in the log, and at which index."""
    found: dict[bytes, int] = {}
    for start in range(0, len(hashes), _LOOKUP_CHUNK):
        chunk = hashes[start:start + _LOOKUP_CHUNK]
        parameters = {f"h{i}": leaf_hash for i, leaf_hash in enumerate(chunk)}
        for row in connection.execute(_indexes_of(len(chunk)), parameters):
            found[bytes(row.leaf_hash)] = int(row.idx)
    return found


def _check_unique(request: _Request, start: int, seen: Mapping[bytes, int]) -> None:
    """Refuse an entry that is byte for byte one already in the log (or earlier in the call)."""
    first: dict[bytes, int] = {}
    for position, item in enumerate(request.entries):
        earlier = seen.get(item.leaf_hash)
        if earlier is None and item.leaf_hash in first:
            earlier = start + first[item.leaf_hash]
        if earlier is not None:
            raise DuplicateEntryError(position, start + position,
                                      f"entry: identical to log entry {earlier}; a signed entry "
                                      f"may appear once (the verifier rejects replays)")
        first[item.leaf_hash] = position


# -- the log -----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=4096)
def _verify_key(public_key: bytes) -> VerifyKey:
    return VerifyKey(public_key)


@dataclass(frozen=True)
class _Prepared:
    """An entry checked for form in the caller's thread: its leaf bytes, hash, signature."""

    entry: Entry
    leaf: bytes
    leaf_hash: bytes
    verified_with: bytes | None  # the public key the signature already verified against


@dataclass
class _Request:
    entries: list[_Prepared]
    future: Future[list[int]]


class _RetryCarefullyError(Exception):
    """Internal: the optimistic write cannot decide; redo it with the size read under the lock."""


@dataclass
class _Outcome:
    """What one write transaction did: who was accepted (with indexes), who was refused."""

    keyring: Keyring
    size: int
    accepted: list[tuple[_Request, list[int]]] = field(default_factory=list)
    refused: list[tuple[_Request, BaseException]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    nodes: list[merkle.Node] = field(default_factory=list)


class AuditLog:
    """The coordinator's audit log: append signed entries, read them, prove things about them.

    Thread-safe; several AuditLog objects (in one or several processes) may append to the same
    database. `append` returns only after the entry is committed (durable). Call `close()` (or
    use it as a context manager) to stop the writer thread.
    """

    def __init__(self, engine: Engine, log_signer: Signer, origin: str,
                 trusted_operator_key: bytes, *, max_batch: int = DEFAULT_MAX_BATCH) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch: must be >= 1, got {max_batch}")
        Checkpoint(origin, 0, merkle.EMPTY_ROOT).body()  # validates the origin line
        self.engine = engine
        self.origin = origin
        self._log_signer = log_signer
        self._trusted_operator_key = trusted_operator_key
        self._max_batch = max_batch
        self._dialect = engine.dialect.name
        if self._dialect not in ("sqlite", "postgresql"):
            raise AuditStoreError(f"engine: dialect {self._dialect!r} is not supported")
        _check_schema(engine)
        if self._dialect == "sqlite":
            self._writer_engine = _sqlite_writer_engine(engine)
        else:
            # The writer sends BEGIN itself (see _transaction), so the driver must not.
            self._writer_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._writer_connection: Connection | None = None  # owned by the writer thread
        # Writer state, valid for the log prefix of length self._size. Only the writer thread
        # changes it after __init__.
        self._keyring = Keyring(trusted_operator_key)
        self._size = 0
        self._frontier: dict[tuple[int, int], bytes] = {}
        # The newest (size, keyring) known to be committed, shared by the writer thread and
        # append_in callers. Published keyrings are never changed in place (changes happen on
        # copies), so a reader may use one without a lock.
        self._state_lock = threading.Lock()
        self._published: tuple[int, Keyring] = (0, self._keyring)
        # (size, keyring, right edge of the tree) after an append_in transaction its caller
        # saw commit (`after_commit`): the next append_in transaction that finds the log that
        # long starts from it instead of reading the key entries and the edge nodes again.
        self._committed_edge: tuple[int, Keyring, dict[tuple[int, int], bytes]] | None = None
        with engine.connect() as connection:
            self._catch_up(connection, _size(connection))
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._writer: threading.Thread | None = None

    # -- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Finish the appends already queued, then stop the writer thread."""
        with self._lock:
            already = self._closed  # by an earlier close(), or by a writer that stopped
            self._closed = True
            writer = self._writer
            if writer is not None and not already:
                self._queue.put(None)
        if writer is not None:
            writer.join()
        if self._dialect == "sqlite":
            self._writer_engine.dispose()  # idempotent

    # -- appending ----------------------------------------------------------------------------
    def submit(self, entries: Sequence[Entry | Mapping[str, Any]]) -> Future[list[int]]:
        """Queue `entries` to be appended together (all or none); the future gives their indexes.

        Form checks and signature verification run here, in the caller's thread (they need no
        lock, and several callers then verify in parallel); whether the signer may sign at
        that index is decided by the writer under the database lock. A malformed entry raises
        EntryRefusedError at once.
        """
        prepared = [self._prepare(position, entry) for position, entry in enumerate(entries)]
        future: Future[list[int]] = Future()
        if not prepared:
            future.set_result([])
            return future
        with self._lock:
            if self._closed:
                raise LogClosedError("audit log: closed, no more appends")
            if self._writer is None:
                self._writer = threading.Thread(target=self._write_loop, name="audit-log-writer",
                                                daemon=True)
                self._writer.start()
            self._queue.put(_Request(prepared, future))
        return future

    def append(self, entry: Entry | Mapping[str, Any]) -> int:
        """Append one entry; return its index once it is committed. Raises EntryRefusedError."""
        return self.submit([entry]).result()[0]

    def append_many(self, entries: Sequence[Entry | Mapping[str, Any]]) -> list[int]:
        """Append entries atomically, in order (consecutive indexes); all or none."""
        return self.submit(entries).result()

    async def append_async(self, entry: Entry | Mapping[str, Any]) -> int:
        """`append` for asyncio code (the Litestar coordinator): awaits the commit."""
        indexes = await asyncio.wrap_future(self.submit([entry]))
        return indexes[0]

    async def append_many_async(self, entries: Sequence[Entry | Mapping[str, Any]]) -> list[int]:
        return await asyncio.wrap_future(self.submit(entries))

    def append_in(self, connection: Connection,
                  entries: Sequence[Entry | Mapping[str, Any]]) -> list[int]:
        """Append `entries` inside the caller's open transaction on `connection`; their indexes.

        Why: a state change and the entry recording it must commit together (or neither), so
        the coordinator appends in its own transaction instead of through the writer thread.
        Same checks, rows and lock as `append`, but nothing is durable or acknowledged until
        the CALLER commits; if it rolls back, the entries vanish with its other changes.
        Raises EntryRefusedError (DuplicateEntryError for a replay); the caller must then roll
        back (nothing of this call was written, but earlier statements of the transaction
        were).

        The write lock: PostgreSQL, the transaction-level advisory lock is taken here (held to
        the caller's COMMIT/ROLLBACK; the transaction must be READ COMMITTED). SQLite, the
        caller's transaction must hold the database write lock from its start (BEGIN
        IMMEDIATE); otherwise a concurrent append makes this one fail (primary key or
        next-index trigger), never corrupt the log. Several calls in one transaction see each
        other's entries (a key registered by the first may sign in the second).
        """
        if not connection.in_transaction() or \
                connection.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            # Entries and their tree nodes must commit together, with the caller's change.
            raise AuditStoreError("connection: append_in needs an open transaction (call it "
                                  "inside `with engine.begin() as connection:`)")
        prepared = [self._prepare(position, entry) for position, entry in enumerate(entries)]
        if not prepared:
            return []
        if connection.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": ADVISORY_LOCK_KEY})
        hashes = [p.leaf_hash for p in prepared]
        size, seen = _size_and_stored_indexes(connection, hashes)
        transaction = connection.get_transaction()
        # The key state and the tree's right edge after this transaction's previous append_in,
        # if the log is still exactly that long: every append of the transaction goes through
        # here (and refreshes this), and a rolled-back savepoint only shortens the log, so an
        # equal size means the same rows. Saves reading the key entries and the nodes again
        # for each of a group commit's submissions.
        state = connection.info.get(_APPEND_IN_STATE)
        edge = self._committed_edge
        if state is not None and state[0] is transaction and state[1] == size:
            keyring, frontier = state[2], state[3]
        elif edge is not None and edge[0] == size:
            # A committed prefix of exactly this length: the same rows (the log is append-only).
            keyring, frontier = edge[1], edge[2]
        else:
            keyring = self._keyring_in(connection, size)
            frontier = _fetch_nodes(connection, _frontier_coordinates(size))
        request = _Request(prepared, Future())
        _check_unique(request, size, seen)
        keyring = self._check_request(keyring, request, size)
        nodes = merkle.append_nodes(_DictSource(frontier), size, hashes)
        indexes = list(range(size, size + len(prepared)))
        rows = [{"idx": index, "leaf": p.leaf, "leaf_hash": p.leaf_hash, "kind": p.entry.kind,
                 "key_id": p.entry.key_id, "time": p.entry.time}
                for index, p in zip(indexes, prepared, strict=True)]
        _insert(connection, rows, nodes)
        marker = connection.info.get(_APPEND_IN_MARK)
        if marker is None or marker[0] is not transaction:
            connection.info[_APPEND_IN_MARK] = (transaction, size)
        new_size = size + len(prepared)
        connection.info[_APPEND_IN_STATE] = (transaction, new_size, keyring,
                                             _advance_frontier(frontier, nodes, new_size))
        return indexes

    def after_commit(self, connection: Connection, transaction: object) -> None:
        """Tell the store that `transaction` (on `connection`), in which append_in ran,
        COMMITTED: its final key state and tree edge then describe the committed log, and the
        next append_in transaction may start from them. Call it only after seeing the commit
        succeed (a rolled-back transaction's rows may be replaced by others of the same count)."""
        state = connection.info.get(_APPEND_IN_STATE)
        if state is None or state[0] is not transaction:
            return  # no append_in in that transaction
        _transaction, size, keyring, frontier = state
        self._publish(size, keyring)
        with self._state_lock:
            if self._committed_edge is None or size >= self._committed_edge[0]:
                self._committed_edge = (size, keyring, frontier)

    def _keyring_in(self, connection: Connection, size: int) -> Keyring:
        """The key state after the first `size` entries as `connection` sees them.

        Starts from the published committed state and replays the key entries after it. What
        this transaction itself appended (earlier append_in calls) is not committed, so only
        the prefix before its first append is published for others.
        """
        published_size, keyring = self._published
        if published_size > size:  # cannot happen on one database; be safe: replay it all
            published_size, keyring = 0, Keyring(self._trusted_operator_key)
        keyring, copied = _replay_keys(connection, keyring, published_size, size)
        marker = connection.info.get(_APPEND_IN_MARK)
        if marker is None or marker[0] is not connection.get_transaction():
            # Nothing appended by this transaction yet: every row it sees is committed.
            # (A published keyring is never changed later: copy it if it is the working one.)
            self._publish(size, copy.deepcopy(keyring) if copied else keyring)
        return keyring

    def _prepare(self, position: int, entry: Entry | Mapping[str, Any]) -> _Prepared:
        try:
            if isinstance(entry, Entry):
                # Re-check so that an Entry built by hand gets the same form checks as JSON
                # (the verifier's envelope rules: Entry.from_json's, with a faster time check).
                parsed = envelope_from_json(entry.to_json())
            elif isinstance(entry, Mapping):
                parsed = envelope_from_json(dict(entry))
            else:
                raise MalformedEntryError(f"entry: expected audit.entry.Entry or a JSON object, "
                                          f"got {type(entry).__name__}")
            # An Entry that knows its leaf (signed in this process: audit.entry.sign_entry, or
            # read from a log) is not encoded a second time; `_leaf` cannot outlive a change of
            # any field (it is not carried by dataclasses.replace).
            known = entry._leaf if isinstance(entry, Entry) else b""
            leaf = known or canonical(parsed.to_json())
            # Refused here, one entry at a time, rather than by the database for a whole group.
            for name, limit in (("kind", _KIND_CHARS), ("key_id", _KEY_ID_CHARS)):
                value = getattr(parsed, name)
                if len(value) > limit:
                    raise MalformedEntryError(f"{name}: longer than {limit} characters")
                if "\x00" in value:  # PostgreSQL text cannot hold it: refuse it on both
                    raise MalformedEntryError(f"{name}: contains a NUL character")
            if len(leaf) > MAX_ENTRY_BYTES:
                raise MalformedEntryError(f"entry: {len(leaf)} bytes encoded, more than the "
                                          f"{MAX_ENTRY_BYTES} a log entry may have")
            # The verifier's own rule (canonical base64, 64 bytes), so the store never
            # acknowledges an entry an auditor then rejects.
            signature = decode_signature(parsed.signature)
        except MalformedEntryError as exc:
            raise EntryRefusedError(position, None, str(exc)) from exc
        except (TypeError, ValueError, RecursionError) as exc:  # out-of-range numbers, nesting
            raise EntryRefusedError(position, None, f"payload: cannot be canonically encoded "
                                                    f"({exc})") from exc
        verified_with: bytes | None = None
        record = self._published[1].get(parsed.key_id)  # a published keyring: never changed
        if record is not None:
            # The signed bytes are cut out of the leaf (no second canonical encoding); a key id
            # names one public key forever (it is its hash), so this check stays valid even if
            # the key is revoked before the writer gets to it (the writer checks that). An
            # exact (key, bytes, signature) triple a Signer of this process just produced
            # verifies by construction (audit.signing._SignatureMemo): not verified again.
            signed = signing_input_from_line(leaf, parsed)
            if not signed_in_this_process(record.public_key, signed, signature):
                try:
                    _verify_key(record.public_key).verify(signed, signature)
                except (BadSignatureError, binascii.Error, ValueError) as exc:
                    raise EntryRefusedError(position, None, f"signature: does not verify with "
                                                            f"key {parsed.key_id}") from exc
            verified_with = record.public_key
        return _Prepared(parsed, leaf, merkle.leaf_hash(leaf), verified_with)

    # -- the writer thread ------------------------------------------------------------------
    def _write_loop(self) -> None:
        try:
            stop = False
            while not stop:
                first = self._queue.get()
                if first is None:
                    break
                batch = [first]
                count = len(first.entries)
                while count < self._max_batch:
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is None:
                        stop = True
                        break
                    batch.append(more)
                    count += len(more.entries)
                self._commit(batch)
        finally:
            # Whatever ended the loop, no caller may wait forever: refuse what is still queued
            # and anything submitted later.
            with self._lock:
                self._closed = True
            while True:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None and not item.future.done():
                    item.future.set_exception(LogClosedError("audit log: writer stopped"))
            self._drop_writer_connection()

    def _drop_writer_connection(self, *, invalidate: bool = False) -> None:
        connection, self._writer_connection = self._writer_connection, None
        if connection is None:
            return
        if invalidate:
            connection.invalidate()
        connection.close()

    @contextmanager
    def _transaction(self) -> Iterator[Connection]:
        """One write transaction, holding the database's write lock, on the writer's connection.

        The writer keeps one connection (no pool checkout or pre-ping per commit). SQLite: the
        private engine begins with BEGIN IMMEDIATE. PostgreSQL: the connection is in driver
        autocommit and the writer sends, in ONE round trip (simple query protocol, no
        parameters), BEGIN READ COMMITTED (each later statement sees every commit made before
        the lock was granted), the transaction-level advisory lock, and synchronous_commit=on
        (durable on commit whatever the server or role default). A commit then costs three
        round trips: that, the insert, COMMIT.
        """
        if self._writer_connection is None:
            self._writer_connection = self._writer_engine.connect()
        connection = self._writer_connection
        if self._dialect == "sqlite":
            try:
                with connection.begin():
                    yield connection
            except (SQLAlchemyError, DBAPIError):
                if connection.invalidated:
                    self._drop_writer_connection()
                raise
            return
        try:
            connection.exec_driver_sql(_PG_BEGIN_LOCKED)
        except (SQLAlchemyError, DBAPIError):
            self._drop_writer_connection(invalidate=True)  # broken: start afresh next time
            raise
        try:
            yield connection
            connection.exec_driver_sql("COMMIT")
        except BaseException:
            try:
                connection.exec_driver_sql("ROLLBACK")
            except (SQLAlchemyError, DBAPIError):
                self._drop_writer_connection(invalidate=True)
            raise

    def _catch_up(self, connection: Connection, db_size: int) -> None:
        """Bring the writer state (keyring, size, frontier) from self._size to db_size.

        Only key entries change the keyring, and only those are read; the frontier is
        dropped (its nodes are read from the database when next needed).
        """
        if db_size < self._size:
            raise StoreCorruptError(f"{ENTRIES_TABLE}: the log shrank from {self._size} to "
                                    f"{db_size} entries")
        if db_size == self._size:
            return
        keyring, _copied = _replay_keys(connection, self._keyring, self._size, db_size)
        self._keyring = keyring
        self._size = db_size
        self._frontier = {}
        self._publish(db_size, keyring)

    def _publish(self, size: int, keyring: Keyring) -> None:
        """Record a committed (size, keyring) if it is newer than the one known."""
        with self._state_lock:
            if size > self._published[0]:
                self._published = (size, keyring)

    def _check_request(self, keyring: Keyring, request: _Request, start: int) -> Keyring:
        """Check every entry of `request` at indexes start, start+1, ...; return the new keyring.

        Raises EntryRefusedError for the first refused entry; `keyring` is never changed (a
        request with key entries works on a copy, so a refusal leaves nothing behind).
        """
        has_keys = any(p.entry.kind.startswith("key.") for p in request.entries)
        state = copy.deepcopy(keyring) if has_keys else keyring
        for position, item in enumerate(request.entries):
            index = start + position
            try:
                record = state.signer_record(item.entry, index)
                state.check(item.entry, index,
                            verify_signature=item.verified_with != record.public_key)
                if has_keys:
                    state.apply(item.entry, index)
            except KeyringError as exc:
                raise EntryRefusedError(position, index, exc.reason) from exc
        return state

    def _commit(self, batch: list[_Request]) -> None:
        """Write one group of requests in one transaction, then acknowledge each caller.

        Optimistic first: under the write lock, the cached size is a lower bound of the real
        one (the log only grows), so inserting at it either succeeds (nobody else appended) or
        violates the primary key / next-index trigger (someone did), as does a replayed entry
        (unique leaf hash). Only then is the group redone carefully: read the size, replay new
        key entries, look the leaf hashes up. The common case saves two queries per commit.
        """
        try:
            try:
                outcome = self._write(batch, careful=False)
            except (IntegrityError, _RetryCarefullyError):
                outcome = self._write(batch, careful=True)
        except Exception as exc:
            # Nothing is acknowledged. The writer state was not advanced, and it can only lag
            # behind the database (never lead), which the next optimistic write detects.
            if not isinstance(exc, SQLAlchemyError | DBAPIError | StoreCorruptError):
                self._drop_writer_connection(invalidate=True)  # unknown state: start afresh
            error = AppendNotCommittedError(f"append not committed: {exc}")
            error.__cause__ = exc
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(error)
            return
        except BaseException as exc:  # never leave a caller waiting forever
            for request in batch:
                if not request.future.done():
                    request.future.set_exception(exc)
            raise
        # Committed: only now does the writer state move forward.
        self._keyring = outcome.keyring
        self._frontier = _advance_frontier(self._frontier, outcome.nodes, outcome.size)
        self._size = outcome.size
        self._publish(outcome.size, outcome.keyring)
        for request, refusal in outcome.refused:
            request.future.set_exception(refusal)
        for request, indexes in outcome.accepted:
            request.future.set_result(indexes)

    def _write(self, batch: list[_Request], *, careful: bool) -> _Outcome:
        """One write transaction for `batch`; changes no writer state (the caller does)."""
        published_size, published_keyring = self._published
        if published_size > self._size:  # committed by append_in callers meanwhile
            self._size, self._keyring, self._frontier = published_size, published_keyring, {}
        if not careful:
            outcome = self._plan(batch, self._keyring, self._size, {}, careful=False)
            if outcome.rows:
                try:
                    outcome.nodes = merkle.append_nodes(_DictSource(self._frontier), self._size,
                                                        [row["leaf_hash"] for row in outcome.rows])
                except StoreCorruptError:
                    pass  # the right edge is not cached (first write, or after a catch-up)
                else:
                    if self._dialect == "postgresql":
                        self._pg_write_in_one_round_trip(outcome.rows, outcome.nodes)
                    else:
                        self._sqlite_write_raw(outcome.rows, outcome.nodes)
                    return outcome
        with self._transaction() as connection:
            seen: dict[bytes, int] = {}
            if careful:
                self._catch_up(connection, _size(connection))
                seen = _stored_indexes(connection, [p.leaf_hash for r in batch for p in r.entries])
            start = self._size
            outcome = self._plan(batch, self._keyring, start, seen, careful=careful)
            if outcome.rows:
                source = _WriterSource(connection, self._frontier)
                outcome.nodes = merkle.append_nodes(source, start,
                                                    [row["leaf_hash"] for row in outcome.rows])
                _insert(connection, outcome.rows, outcome.nodes)
        return outcome

    def _plan(self, batch: list[_Request], keyring: Keyring, start: int,
              seen: dict[bytes, int], *, careful: bool) -> _Outcome:
        """Decide each request of `batch` at indexes from `start` on; the rows to insert.

        Optimistic (not careful): a refusal may come from a stale key state (another process
        may have registered the key), so it raises _RetryCarefullyError to be decided on the
        current log; careful: refused requests are recorded and the others go on.
        """
        outcome = _Outcome(keyring=keyring, size=start)
        size = start
        for request in batch:
            try:
                _check_unique(request, size, seen)
                keyring = self._check_request(keyring, request, size)
            except EntryRefusedError as exc:
                if not careful:
                    raise _RetryCarefullyError from exc
                outcome.refused.append((request, exc))
                continue
            indexes = list(range(size, size + len(request.entries)))
            for index, item in zip(indexes, request.entries, strict=True):
                seen[item.leaf_hash] = index
                outcome.rows.append({"idx": index, "leaf": item.leaf, "leaf_hash": item.leaf_hash,
                                     "kind": item.entry.kind, "key_id": item.entry.key_id,
                                     "time": item.entry.time})
            outcome.accepted.append((request, indexes))
            size += len(request.entries)
        outcome.keyring, outcome.size = keyring, size
        return outcome

    def _sqlite_write_raw(self, rows: list[dict[str, Any]], nodes: list[merkle.Node]) -> None:
        """The optimistic SQLite write on the driver's connection: BEGIN IMMEDIATE, the two
        multi-row INSERTs, COMMIT (fsync'ed: synchronous=FULL).

        Why not through SQLAlchemy: its execution context, events and transaction bookkeeping
        cost about as much CPU per group as SQLite's own statements, in the one thread every
        append waits for. The careful path (reads, catch-up) stays on SQLAlchemy.
        """
        import sqlite3

        if self._writer_connection is None:
            self._writer_connection = self._writer_engine.connect()
        raw = self._writer_connection.connection.dbapi_connection
        assert raw is not None
        try:
            raw.execute("BEGIN IMMEDIATE")
            try:
                for statement, parameters in _sqlite_insert_statements(rows, nodes):
                    raw.execute(statement, parameters)
                raw.execute("COMMIT")
            except BaseException:
                if raw.in_transaction:
                    raw.execute("ROLLBACK")
                raise
        except sqlite3.IntegrityError as exc:
            raise _RetryCarefullyError from exc
        except BaseException:
            # Unknown state (busy past the timeout, disk full, I/O error): nothing is
            # acknowledged and the next write starts on a fresh connection.
            self._drop_writer_connection(invalidate=True)
            raise

    def _pg_write_in_one_round_trip(self, rows: list[dict[str, Any]], nodes: list[merkle.Node]) -> None:
        """The optimistic PostgreSQL write in ONE round trip: one simple-protocol query string.

        Why: a write is BEGIN + advisory lock + synchronous_commit, the insert, COMMIT. As three
        round trips, each one waits for the server to be scheduled and then for this thread to
        get the GIL back from the appender threads: the writer was busy 99% of the time at
        ~1.5 ms per group. Nothing in between needs an answer (the size and the right edge of
        the tree are cached; a stale size fails the primary key or the next-index trigger), so
        the statements go out as one query string, with the values bound on the client by
        psycopg's ClientCursor (quoted literals; `test_quotes_and_escapes_are_stored_exactly`)
        and the insert a statement PREPAREd once per connection (planned once). psycopg's
        pipeline mode was measured too: one round trip as well, but ~7 socket waits per group
        (each a GIL hand-off), 25% slower with 8 appender threads. On an integrity error the
        server skips the rest of the string; the transaction is rolled back and the group is
        redone carefully.
        """
        import psycopg  # only PostgreSQL logs get here; the auditor's CLI never needs it

        if self._writer_connection is None:
            self._writer_connection = self._writer_engine.connect()
        raw = self._writer_connection.connection.dbapi_connection
        assert isinstance(raw, psycopg.Connection)
        try:
            info = self._writer_connection.connection.info  # lives as long as the connection
            if not info.get(_PG_PREPARED_NAME):
                raw.execute(_PG_PREPARE)
                info[_PG_PREPARED_NAME] = True
            with psycopg.ClientCursor(raw) as cursor:
                cursor.execute(_PG_WRITE_IN_ONE, _pg_insert_parameters(rows, nodes))
        except psycopg.errors.IntegrityError as exc:
            try:
                raw.execute("ROLLBACK")
            except psycopg.Error:
                self._drop_writer_connection(invalidate=True)
            raise _RetryCarefullyError from exc
        except BaseException:
            # Unknown outcome (a failed COMMIT, a lost connection): nothing is acknowledged,
            # the connection is started afresh, and the next write finds the real size.
            self._drop_writer_connection(invalidate=True)
            raise

    # -- reading ------------------------------------------------------------------------------
    def size(self) -> int:
        """The number of committed entries (read from the database: other writers count)."""
        with self.engine.connect() as connection:
            return _size(connection)

    def get(self, index: int) -> Entry:
        """The entry at `index`; IndexError if there is none."""
        with self.engine.connect() as connection:
            leaf = connection.execute(select(audit_entries.c.leaf)
                                      .where(audit_entries.c.idx == index)).scalar_one_or_none()
        if leaf is None:
            raise IndexError(f"index: no entry {index} in the log")
        return entry_from_leaf(bytes(leaf))

    def entries(self, start: int = 0, stop: int | None = None) -> Iterator[Entry]:
        """Entries start <= index < stop (default: to the current size), in log order."""
        if start < 0:
            raise ValueError(f"start: must be >= 0, got {start}")
        with self.engine.connect() as connection:
            end = _size(connection) if stop is None else stop
            for _index, leaf in _iter_leaves(connection, start, end):
                yield entry_from_leaf(leaf)

    def leaf_hash(self, index: int) -> bytes:
        with self.engine.connect() as connection:
            value = connection.execute(select(audit_entries.c.leaf_hash)
                                       .where(audit_entries.c.idx == index)).scalar_one_or_none()
        if value is None:
            raise IndexError(f"index: no entry {index} in the log")
        return bytes(value)

    def _read(self, size: int | None, algorithm: Callable[[merkle.NodeSource, int], T]) -> T:
        with self.engine.connect() as connection:
            current = _size(connection)
            if size is None:
                size = current
            if not 0 <= size <= current:
                raise ValueError(f"size: {size} is not between 0 and the log size {current}")
            tree_size = size
            return _with_nodes(connection, lambda source: algorithm(source, tree_size))

    def root(self, size: int | None = None) -> bytes:
        """The RFC 6962 root of the first `size` entries (default: all)."""
        return self._read(size, merkle.root)

    def inclusion_proof(self, index: int, size: int | None = None) -> list[bytes]:
        """RFC 9162 inclusion proof of entry `index` in the tree of `size` entries."""
        return self._read(size, lambda source, n: merkle.inclusion_proof(source, index, n))

    def consistency_proof(self, old_size: int, new_size: int | None = None) -> list[bytes]:
        """RFC 9162 consistency proof from `old_size` to `new_size` entries."""
        return self._read(new_size, lambda source, n: merkle.consistency_proof(source, old_size, n))

    def checkpoint(self) -> str:
        """Sign a C2SP checkpoint of the current log and store it; return the signed note."""
        with self.engine.connect() as connection:
            size = _size(connection)
            root = _with_nodes(connection, lambda source: merkle.root(source, size))
        note = sign_checkpoint(Checkpoint(self.origin, size, root), self._log_signer)
        c = audit_checkpoints.c
        try:
            with self.engine.begin() as connection:
                latest = connection.execute(select(func.max(c.size))).scalar_one()
                if latest is None or latest < size:
                    connection.execute(audit_checkpoints.insert().values(
                        size=size, root_hash=root, note=note, created_at=datetime.now(UTC)))
        except (SQLAlchemyError, DBAPIError):
            # Another process stored a checkpoint of this size (or a larger one) first; the
            # note is still a valid signed statement about this size.
            with self.engine.connect() as connection:
                latest = connection.execute(select(func.max(c.size))).scalar_one()
            if latest is None or latest < size:
                raise
        return note

    def latest_checkpoint(self) -> str | None:
        """The latest stored checkpoint note, or None."""
        c = audit_checkpoints.c
        with self.engine.connect() as connection:
            note = connection.execute(
                select(c.note).order_by(c.size.desc()).limit(1)).scalar_one_or_none()
        return None if note is None else str(note)
