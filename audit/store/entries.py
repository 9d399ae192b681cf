"""Entry rows over the database: reading leaves back, the log's size, and the one INSERT per
table that appends a group of entries with the tree nodes they complete.

Statements are built once (module level, or cached per list length), not per call: building
and cache-keying a SQLAlchemy construct costs more than executing it on these small look-ups,
several times per append_in (docs/audit-store.md).
"""

from __future__ import annotations

import copy
import ctypes
import functools
import json
import re
import select as io_select
from collections.abc import Iterator, Sequence
from typing import Any

from sqlalchemy import Connection, Dialect, TextClause, bindparam, func, null, select, text, union_all
from sqlalchemy.exc import DBAPIError

from audit import merkle
from audit.entry import Entry, MalformedEntryError
from audit.keyring import KEY_KINDS, Keyring, KeyringError
from audit.store.errors import AuditStoreError, StoreCorruptError
from audit.store.nodes import LOOKUP_CHUNK
from audit.store.schema import ENTRIES_TABLE, NODES_TABLE, audit_entries
from audit.verify import envelope_from_json

READ_PAGE = 1000
_e = audit_entries.c
_SIZE = select(func.max(_e.idx))
_LEAVES_PAGE = (select(_e.idx, _e.leaf).where(_e.idx >= bindparam("start"), _e.idx < bindparam("stop"))
                .order_by(_e.idx).limit(READ_PAGE))
_KEY_LEAVES_PAGE = (select(_e.idx, _e.leaf)
                    .where(_e.idx >= bindparam("start"), _e.idx < bindparam("stop"),
                           _e.kind.in_(sorted(KEY_KINDS)))
                    .order_by(_e.idx).limit(READ_PAGE))


def entry_from_leaf(leaf: bytes) -> Entry:
    """Parse stored leaf bytes back into an Entry whose leaf_bytes() are exactly `leaf`."""
    try:
        obj = json.loads(leaf)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedEntryError(f"leaf: not JSON ({exc})") from exc
    return envelope_from_json(obj).with_leaf(bytes(leaf))


def log_size(connection: Connection) -> int:
    """The number of entries `connection` sees (the indexes are contiguous from 0)."""
    top = connection.execute(_SIZE).scalar_one()
    return 0 if top is None else int(top) + 1


def iter_leaves(connection: Connection, start: int, stop: int, *,
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
        if len(rows) < READ_PAGE:
            return
        position = int(rows[-1].idx) + 1


def replay_keys(connection: Connection, keyring: Keyring, start: int,
                stop: int) -> tuple[Keyring, bool]:
    """`keyring` moved forward over the key entries at [start, stop); (keyring, copied): a copy
    is made before the first change, so the one passed in is never changed."""
    copied = False
    for index, leaf in iter_leaves(connection, start, stop, key_entries_only=True):
        if not copied:
            keyring, copied = copy.deepcopy(keyring), True
        try:
            keyring.apply(entry_from_leaf(leaf), index)
        except (KeyringError, MalformedEntryError) as exc:
            raise StoreCorruptError(f"entry {index}: stored key entry does not apply: "
                                    f"{exc}") from exc
    return keyring, copied


# -- which leaf hashes are stored ---------------------------------------------------------------


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


def stored_indexes(connection: Connection, hashes: Sequence[bytes]) -> dict[bytes, int]:
    """Which of these leaf hashes are already in the log, and at which index."""
    found: dict[bytes, int] = {}
    for start in range(0, len(hashes), LOOKUP_CHUNK):
        chunk = hashes[start:start + LOOKUP_CHUNK]
        parameters = {f"h{i}": leaf_hash for i, leaf_hash in enumerate(chunk)}
        for row in connection.execute(_indexes_of(len(chunk)), parameters):
            found[bytes(row.leaf_hash)] = int(row.idx)
    return found


def size_and_stored_indexes(connection: Connection,
                            hashes: Sequence[bytes]) -> tuple[int, dict[bytes, int]]:
    """(log size, {leaf hash: index} for those of `hashes` already in the log)."""
    if not hashes or len(hashes) > LOOKUP_CHUNK:
        return log_size(connection), stored_indexes(connection, hashes)
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


# -- appending rows -----------------------------------------------------------------------------

# PostgreSQL: a group's rows as six scalar parameters, not nine arrays. psycopg dumps an array
# element by element in Python (and inspects each list to pick its type), in the writer thread
# every appender waits for; a bytes or text value is dumped in one C call. So:
#   :first        the first entry's index (the others follow it);
#   :data, :lens  each entry's leaf, kind, key_id and time (UTF-8), concatenated, and their
#                 lengths in bytes as 'n,n,...' (4 pieces an entry);
#   :hashes       the leaf hashes, concatenated (32 bytes each);
#   :node_pos, :node_hashes  the new tree nodes: 'level,index,...' and their hashes (32 bytes).
# `entry_rows` and `node_rows` cut them back into rows, in order (`n`).
_PG_ROWS = (
    "pieces AS (SELECT n, substring(CAST(:data AS bytea) "
    "FROM CAST(sum(len) OVER (ORDER BY n) - len + 1 AS integer) FOR len) AS piece "
    "FROM unnest(CAST(string_to_array(CAST(:lens AS text), ',') AS integer[])) "
    "WITH ORDINALITY AS u(len, n)), "
    "fields AS (SELECT array_agg(piece ORDER BY n) AS v FROM pieces), "
    "entry_rows AS (SELECT CAST(:first AS bigint) + i - 1 AS idx, v[4 * i - 3] AS leaf, "
    "substring(CAST(:hashes AS bytea) FROM 32 * i - 31 FOR 32) AS leaf_hash, "
    "convert_from(v[4 * i - 2], 'UTF8') AS kind, convert_from(v[4 * i - 1], 'UTF8') AS key_id, "
    "convert_from(v[4 * i], 'UTF8') AS time, i AS n "
    "FROM fields, generate_series(1, cardinality(v) / 4) AS i), "
    "node_rows AS (SELECT CAST(p[2 * i - 1] AS smallint) AS level, p[2 * i] AS idx, "
    "substring(CAST(:node_hashes AS bytea) FROM 32 * i - 31 FOR 32) AS hash "
    "FROM (SELECT CAST(string_to_array(CAST(:node_pos AS text), ',') AS bigint[]) AS p) AS s, "
    "generate_series(1, cardinality(p) / 2) AS i)")

# PostgreSQL: entries and nodes in ONE statement (one round trip, whatever the group size),
# inserted in order; the entries' row trigger sees the rows inserted before it in the same
# statement, so the next-index check holds row by row.
_PG_INSERT = text(
    f"WITH {_PG_ROWS}, "
    f"new_entries AS (INSERT INTO {ENTRIES_TABLE} (idx, leaf, leaf_hash, kind, key_id, time) "
    "SELECT idx, leaf, leaf_hash, kind, key_id, time FROM entry_rows ORDER BY n) "
    f"INSERT INTO {NODES_TABLE} (level, idx, hash) SELECT level, idx, hash FROM node_rows")

# PostgreSQL, when the appender knows the log's size (it appended last): the size check, the
# duplicate look-up and the INSERT of entries and nodes in ONE statement. Both INSERTs happen
# only if the log is exactly `expected_top + 1` entries long and holds none of the leaf hashes;
# either way the statement returns the log's last index (the row with a NULL hash) and the
# index of each given leaf hash already stored, as `size_and_stored_indexes` does, so that the
# caller sees whether it appended. The data-modifying CTEs share the statement's snapshot, taken
# after append_in's advisory lock, so the check and the insert see the same log.
_PG_CHECKED_INSERT = text(
    f"WITH {_PG_ROWS}, "
    f"top AS (SELECT max(idx) AS idx FROM {ENTRIES_TABLE}), "
    f"dup AS (SELECT leaf_hash, idx FROM {ENTRIES_TABLE} "
    "WHERE leaf_hash = ANY(ARRAY(SELECT leaf_hash FROM entry_rows))), "
    "go AS (SELECT 1 AS ok FROM top WHERE coalesce(top.idx, -1) = :expected_top "
    "AND NOT EXISTS (SELECT 1 FROM dup)), "
    f"new_entries AS (INSERT INTO {ENTRIES_TABLE} (idx, leaf, leaf_hash, kind, key_id, time) "
    "SELECT idx, leaf, leaf_hash, kind, key_id, time FROM entry_rows "
    "WHERE EXISTS (SELECT 1 FROM go) ORDER BY n), "
    f"new_nodes AS (INSERT INTO {NODES_TABLE} (level, idx, hash) "
    "SELECT level, idx, hash FROM node_rows WHERE EXISTS (SELECT 1 FROM go)) "
    "SELECT CAST(NULL AS bytea) AS leaf_hash, (SELECT idx FROM top) AS idx "
    "UNION ALL SELECT leaf_hash, idx FROM dup")

ENTRY_COLUMNS = ("idx", "leaf", "leaf_hash", "kind", "key_id", "time")
_SQLITE_ROWS_PER_INSERT = 500  # 500 rows x 6 columns stays far below SQLite's 32766 variables


def _pg_insert_parameters(rows: list[dict[str, Any]], nodes: list[merkle.Node]) -> dict[str, Any]:
    """`_PG_ROWS`'s parameters for `rows` (consecutive indexes, as `AuditLog` makes them)."""
    if any(row["idx"] != rows[0]["idx"] + n for n, row in enumerate(rows)):
        raise AuditStoreError("insert: the rows' indexes are not consecutive")
    pieces: list[bytes] = []
    for row in rows:
        pieces += (row["leaf"], row["kind"].encode(), row["key_id"].encode(), row["time"].encode())
    return {"first": rows[0]["idx"], "data": b"".join(pieces),
            "lens": ",".join([str(len(piece)) for piece in pieces]),
            "hashes": b"".join([row["leaf_hash"] for row in rows]),
            "node_pos": ",".join([f"{node.level},{node.index}" for node in nodes]),
            "node_hashes": b"".join([node.hash for node in nodes])}


@functools.lru_cache(maxsize=256)
def _sqlite_insert_sql(table: str, columns: tuple[str, ...], count: int) -> str:
    row = "(" + ", ".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES " + ", ".join([row] * count)


def sqlite_insert_statements(rows: list[dict[str, Any]],
                             nodes: list[merkle.Node]) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """SQLite: one multi-row INSERT per table (per 500 rows), as SQL text for the driver:
    pysqlite's executemany steps (and gives up the GIL) once per row, a multi-row VALUES once
    per statement."""
    for start in range(0, len(rows), _SQLITE_ROWS_PER_INSERT):
        chunk = rows[start:start + _SQLITE_ROWS_PER_INSERT]
        yield (_sqlite_insert_sql(ENTRIES_TABLE, ENTRY_COLUMNS, len(chunk)),
               tuple(r[c] for r in chunk for c in ENTRY_COLUMNS))
    for start in range(0, len(nodes), _SQLITE_ROWS_PER_INSERT):
        part = nodes[start:start + _SQLITE_ROWS_PER_INSERT]
        yield (_sqlite_insert_sql(NODES_TABLE, ("level", "idx", "hash"), len(part)),
               tuple(v for n in part for v in (n.level, n.index, n.hash)))


# PostgreSQL, in one round trip: the log's write lock (held to COMMIT/ROLLBACK) and a durable
# COMMIT (the WAL flushed before it returns) whatever the server or role default.
PG_LOCK = text("SELECT pg_advisory_xact_lock(:key), set_config('synchronous_commit', 'on', true)")


@functools.lru_cache(maxsize=4)
def _driver_sql(dialect: Dialect, statement: TextClause) -> str:
    """`statement` as the driver's own SQL (psycopg: `%(name)s` placeholders)."""
    return str(statement.compile(dialect=dialect))


def checked_insert(connection: Connection, expected_size: int, rows: list[dict[str, Any]],
                   nodes: list[merkle.Node], *,
                   lock_key: int | None = None) -> tuple[int, dict[bytes, int]]:
    """PostgreSQL: insert a group's entries and nodes if the log is `expected_size` entries
    long and holds none of them, in one round trip; (log size, {leaf hash: index} of those
    already stored) as found before the insert. It inserted iff the size is `expected_size`
    and nothing was found.

    `lock_key`: take the log's write lock first (`PG_LOCK`), in the SAME round trip: both
    statements (and the transaction's BEGIN, if psycopg has not sent it yet) go out as one
    psycopg pipeline and are answered together. They are still two statements, so the
    insert's snapshot is taken after the lock is granted (READ COMMITTED) and sees every
    append committed before it; an error in either aborts the rest of the pipeline and is
    raised as SQLAlchemy's DBAPIError, as `connection.execute` would."""
    parameters = _pg_insert_parameters(rows, nodes)
    parameters["expected_top"] = expected_size - 1
    result = _on_driver(connection, lock_key, parameters)
    size = 0
    found: dict[bytes, int] = {}
    for leaf_hash, idx in result:
        if leaf_hash is None:
            size = 0 if idx is None else int(idx) + 1
        else:
            found[bytes(leaf_hash)] = int(idx)
    return size, found


@functools.lru_cache(maxsize=4)
def _binary_sql(dialect: Dialect, statement: TextClause) -> str:
    """`_driver_sql` with every parameter passed in binary (`%(name)b`): psycopg's text format
    checks or escapes each element of an array with a regular expression (bytea, text) in the
    writer thread that every appender waits for; the binary format packs them. (A list of
    ints is then sent as int2[], int4[] or int8[] by its largest value; the statement's
    CASTs make the types the columns'.)"""
    return re.sub(r"%\((\w+)\)s", r"%(\1)b", _driver_sql(dialect, statement))


def _deferred_begin(driver: Any) -> bytes | None:
    """The BEGIN psycopg would send before the next statement of this (not yet begun)
    transaction, or None if it has begun already or psycopg does not work the way
    `_on_driver` relies on (then psycopg sends BEGIN itself, one more wait)."""
    from psycopg import pq

    if getattr(driver, "_autocommit", None) is not False or \
            driver.pgconn.transaction_status != pq.TransactionStatus.IDLE:
        return None
    start = getattr(driver, "_get_tx_start_command", None)
    return start() if callable(start) else None


# PostgreSQL: `_PG_INSERT` as a statement prepared once per connection (`PREPARE`), so that
# the one-string append below names it with its six values instead of sending (and having the
# server parse and plan) the whole statement each time. Planned once only with
# `_PG_GENERIC_PLAN` (see there).
_PG_PREPARED_NAME = "audit_append_rows"
_PG_PREPARE = (f"PREPARE {_PG_PREPARED_NAME} (bigint, bytea, text, bytea, text, bytea) AS "
               + re.sub(r":(first|data|lens|hashes|node_pos|node_hashes)\b",
                        lambda m: "$" + str(("first", "data", "lens", "hashes", "node_pos",
                                             "node_hashes").index(m.group(1)) + 1),
                        _PG_INSERT.text))
# connection.connection.info key (lives as long as the driver connection): `_PG_PREPARE` ran.
_PREPARED_KEY = "audit.store.prepared_insert"
_DIGITS_AND_COMMAS = re.compile(r"[0-9,]*")

# PostgreSQL: the rest of the transaction (the EXECUTE of `_PG_PREPARE`, the caller's `tail`,
# the COMMIT) runs the prepared statement's one generic plan instead of a new custom plan.
# Why: in its default mode (`plan_cache_mode = auto`) the server compares the generic plan's
# estimated cost with the custom plans' and, for this statement, never picks it (without the
# values it takes `generate_series` for 1000 rows, with them for the few it makes), so every
# EXECUTE planned the whole statement again, server CPU on the same two cores as the
# appenders: `pg_prepared_statements` counted one custom plan per append. The plan is the same
# either way (only INSERTs from the given values, no table is read;
# `test_the_one_string_insert_is_planned_once`). Transaction-local (`set_config(..., true)`),
# set in the one string's last statements only: nothing else of the caller's transaction
# runs under it.
_PG_GENERIC_PLAN = "set_config('plan_cache_mode', 'force_generic_plan', true)"


def _bytea_literal(value: bytes) -> str:
    """`value` as an SQL expression: hex digits only, so no byte of it can end the literal
    (and no backslash: the same whatever `standard_conforming_strings` says)."""
    return f"decode('{value.hex()}', 'hex')"


def _list_literal(value: str) -> str:
    """A packed list ('1,2,...', made here from ints) as an SQL literal; refused unless it is
    digits and commas only, so it can never hold a quote."""
    if _DIGITS_AND_COMMAS.fullmatch(value) is None:
        raise AuditStoreError("insert: a packed list holds more than digits and commas")
    return f"'{value}'"


def _pg_execute_literal(parameters: dict[str, Any]) -> str:
    """`EXECUTE` of the prepared `_PG_INSERT` with `_pg_insert_parameters`' values written as
    literals: an int, hex for the bytes, digits and commas for the lists. Every text field of
    an entry (kind, key_id, time) travels inside the `data` bytes, so no free text is ever
    written into the SQL."""
    return (f"EXECUTE {_PG_PREPARED_NAME}({int(parameters['first'])}, "
            f"{_bytea_literal(parameters['data'])}, {_list_literal(parameters['lens'])}, "
            f"{_bytea_literal(parameters['hashes'])}, {_list_literal(parameters['node_pos'])}, "
            f"{_bytea_literal(parameters['node_hashes'])})")


def has_nothing_unasked(connection: Connection) -> bool:
    """PostgreSQL: whether the server has sent nothing on this (idle) connection since its
    last answer. A server that drops a connection (restart, `pg_terminate_backend`) says so
    before it closes it (or just closes it): either makes the socket readable.

    Why: an append that sends its COMMIT in the same string as everything else cannot tell a
    connection that was already gone from one lost after the COMMIT went out (the outcome is
    then unknown, and nothing may be made again). Asking the socket first (no round trip)
    keeps the first case, a connection dropped while the writer was idle, on the path that
    fails before any COMMIT and is made again on a fresh connection."""
    try:
        socket = connection.connection.driver_connection.pgconn.socket  # type: ignore[union-attr]
        return not _readable_now(socket)
    except Exception:  # no usable socket: certainly not a connection to commit on
        return False


class _PollFd(ctypes.Structure):
    _fields_ = (("fd", ctypes.c_int), ("events", ctypes.c_short), ("revents", ctypes.c_short))


@functools.cache
def _poll_holding_the_gil() -> Any:
    """libc's poll(2) called through `ctypes.PyDLL`, which keeps the GIL for the call; None
    where there is none (then `select.select`)."""
    try:
        poll = ctypes.PyDLL(None, use_errno=True).poll
    except (OSError, AttributeError):
        return None
    poll.argtypes = (ctypes.POINTER(_PollFd), ctypes.c_ulong, ctypes.c_int)
    poll.restype = ctypes.c_int
    return poll


def _readable_now(fd: int) -> bool:
    """Whether `fd` has something to read (or is closed, or in error) right now: poll(2)
    without a wait, WITHOUT giving up the GIL.

    Why not `select.select(..., 0)`: every Python socket call gives the GIL up around its
    system call, and taking it back waits behind whatever threads got it meanwhile; this runs
    in the group commit's writer, right before the string every waiting append depends on,
    while the appenders' threads are busy (measured with 8 appenders: 80-240 us on average
    for a zero-timeout select, 17-21 us with one; docs/benchmarks/audit-append.md)."""
    poll = _poll_holding_the_gil()
    if poll is None:
        readable, _writable, _failed = io_select.select([fd], [], [], 0)
        return bool(readable)
    entry = _PollFd(fd, io_select.POLLIN, 0)
    found = poll(ctypes.byref(entry), 1, 0)
    if found < 0:
        raise OSError(ctypes.get_errno(), "poll failed")
    return found > 0  # POLLIN, or POLLHUP / POLLERR / POLLNVAL: not a connection to use


def insert_and_commit(connection: Connection, rows: list[dict[str, Any]],
                      nodes: list[merkle.Node], *, lock_key: int | None = None,
                      tail: str | None = None) -> None:
    """PostgreSQL: insert a group's entries and nodes and COMMIT the transaction, in ONE
    round trip: ONE simple-protocol query string; with `lock_key`, the log's write lock (and
    `synchronous_commit`) first, and, if the transaction has not begun on the server yet, its
    BEGIN before that, so that a whole transaction is one string and one wait; the INSERT
    runs its prepared generic plan (`_PG_GENERIC_PLAN`). `tail`: the
    caller's own SQL, after the INSERT and before the COMMIT (its values must be literals
    that cannot hold a quote: exchange.db.literal); if it fails, the COMMIT is skipped too.

    Why one string and not a psycopg pipeline with the same statements: a pipeline costs
    several socket operations per group (each a hand-over of the GIL to the appender threads
    in the writer every appender waits for), a simple query one write and one read; the
    values are written as literals that cannot hold a quote (`_pg_execute_literal`).

    The plain INSERT (`_PG_INSERT`, prepared once per connection), not the checked one: if
    the log is not as long as the rows say (the next-index trigger) or already holds one of
    them (the UNIQUE leaf hash), the INSERT fails, the server skips the rest of the string
    (the COMMIT), and the transaction is left failed for the caller to roll back: nothing of
    it was committed. So the COMMIT happens only if every row went in where it was meant to.
    Raises SQLAlchemy's DBAPIError (with `connection_invalidated` if the connection is gone,
    when whether the COMMIT happened is unknown)."""
    parameters = _pg_insert_parameters(rows, nodes)
    driver = connection.connection.driver_connection
    dialect = connection.dialect
    info = connection.connection.info
    statements = [_pg_execute_literal(parameters), *([tail] if tail else []), "COMMIT"]
    if lock_key is not None:
        statements.insert(0, f"SELECT pg_advisory_xact_lock({int(lock_key)}), "
                             f"set_config('synchronous_commit', 'on', true), {_PG_GENERIC_PLAN}")
    else:  # (the transaction holds the lock already)
        statements.insert(0, f"SELECT {_PG_GENERIC_PLAN}")
    begin = _deferred_begin(driver) if lock_key is not None else None
    if begin is not None:
        statements.insert(0, begin.decode())
    try:
        if begin is not None:
            # psycopg would send its own BEGIN, alone, before the string (_start_query); the
            # string carries it instead. `_autocommit` only decides that (commit and rollback
            # follow the server's transaction status) and is set back at once.
            driver._autocommit = True  # type: ignore[union-attr]
        try:
            if not info.get(_PREPARED_KEY):
                driver.execute(_PG_PREPARE)  # type: ignore[union-attr]
                info[_PREPARED_KEY] = True
            _exec_string(driver, "; ".join(statements), begun=begin is not None)
        finally:
            if begin is not None:
                driver._autocommit = False  # type: ignore[union-attr]
    except dialect.loaded_dbapi.Error as exc:
        state = getattr(exc, "sqlstate", None)
        if state == "26000":  # the prepared statement is gone (DEALLOCATE): prepare again
            info.pop(_PREPARED_KEY, None)
        elif state == "42P05":  # it is there already: use it
            info[_PREPARED_KEY] = True
        broken = bool(getattr(driver, "broken", False) or getattr(driver, "closed", False))
        if broken:
            connection.invalidate(exc)
        raise DBAPIError.instance(_PG_PREPARED_NAME, parameters, exc, dialect.loaded_dbapi.Error,
                                  connection_invalidated=broken, dialect=dialect) from exc


def _exec_string(driver: Any, query: str, *, begun: bool) -> None:
    """Run the one string on psycopg connection `driver` as ONE libpq call (`PQexec`), which
    waits for the whole answer without the GIL; raise psycopg's error for a failed statement
    (the server skipped the rest of the string, the COMMIT with it).

    Why not `driver.execute`: psycopg's execute sends, flushes and reads through a Python
    generator that takes the GIL back at every socket event, and the writer every appender
    waits for then queues for the GIL behind the appender threads each time; its Python also
    costs about 30 us of CPU per round trip (docs/benchmarks/audit-append.md). PQexec returns
    the last statement's result, or the first failure's (the rest of the string is not run).

    Only when the string carries the transaction's BEGIN or the transaction has begun on the
    server (psycopg sends nothing of its own here: without either, the string would run
    outside the transaction block psycopg tracks), else through `driver.execute`."""
    from psycopg import errors, pq

    pgconn = driver.pgconn
    if not begun and pgconn.transaction_status != pq.TransactionStatus.INTRANS:
        driver.execute(query)
        return
    with driver.lock:
        result = pgconn.exec_(query.encode(driver.info.encoding))
    if result.status not in (pq.ExecStatus.COMMAND_OK, pq.ExecStatus.TUPLES_OK):
        raise errors.error_from_result(result, encoding=driver.info.encoding)


def _on_driver(connection: Connection, lock_key: int | None,
               parameters: dict[str, Any]) -> Sequence[Any]:
    """`_PG_CHECKED_INSERT` on the connection's driver connection, its parameters in binary;
    with `lock_key`, `PG_LOCK` first, all (and the transaction's BEGIN if psycopg has not sent
    it yet) as one psycopg pipeline (SQLAlchemy has no pipeline of its own): the insert's
    rows."""
    driver = connection.connection.driver_connection
    dialect = connection.dialect
    lock_sql = _driver_sql(dialect, PG_LOCK)
    insert_sql = _binary_sql(dialect, _PG_CHECKED_INSERT)
    begin = _deferred_begin(driver) if lock_key is not None else None
    try:
        if lock_key is None:  # the transaction holds the lock: it has begun
            rows = driver.execute(insert_sql, parameters).fetchall()  # type: ignore[union-attr]
            return rows
        with driver.pipeline():  # type: ignore[union-attr]
            if begin is not None:
                # psycopg would send its BEGIN with a Sync of its own and wait for it before
                # the lock (_start_query); sent here, in the pipeline, it shares the one Sync.
                # While the statements are queued psycopg must not start a transaction itself:
                # `_autocommit` only decides that (commit and rollback follow the server's
                # transaction status), and it is set back before anything else runs here.
                driver._autocommit = True  # type: ignore[union-attr]
            try:
                if begin is not None:
                    driver.execute(begin)  # type: ignore[union-attr]
                if lock_key is not None:
                    driver.execute(lock_sql, {"key": lock_key})  # type: ignore[union-attr]
                cursor = driver.execute(insert_sql, parameters)  # type: ignore[union-attr]
            finally:
                if begin is not None:
                    driver._autocommit = False  # type: ignore[union-attr]
        # Read after the block: its end sends the one Sync and reads every result; fetching
        # inside would flush and wait once more.
        rows = cursor.fetchall()
    except dialect.loaded_dbapi.Error as exc:
        broken = bool(getattr(driver, "broken", False) or getattr(driver, "closed", False))
        if broken:
            connection.invalidate(exc)
        raise DBAPIError.instance(insert_sql, parameters, exc, dialect.loaded_dbapi.Error,
                                  connection_invalidated=broken, dialect=dialect) from exc
    return rows


def insert(connection: Connection, rows: list[dict[str, Any]], nodes: list[merkle.Node]) -> None:
    """Insert a group's entries and tree nodes in `connection`'s transaction (SQLite: one
    INSERT per table; PostgreSQL: one in all)."""
    if connection.dialect.name == "postgresql":
        connection.execute(_PG_INSERT, _pg_insert_parameters(rows, nodes))
        return
    for statement, parameters in sqlite_insert_statements(rows, nodes):
        connection.exec_driver_sql(statement, parameters)
