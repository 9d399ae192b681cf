"""The database-backed audit log: appends, reads, proofs, checkpoints, refusals (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import rfc8785
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Connection, Engine, func, select, text
from sqlalchemy.exc import OperationalError, SQLAlchemyError

from audit import merkle
from audit.checkpoint import CheckpointError, verify_checkpoint
from audit.entry import sign_entry
from audit.signing import Signer, canonical
from audit.store import (
    AuditLog,
    AuditStoreError,
    EntryRefusedError,
    SchemaMissingError,
    StoreCorruptError,
    audit_checkpoints,
    audit_entries,
    audit_tree_nodes,
    drop_append_only_trigger_ddl,
    read_entries,
    read_latest_checkpoint,
    verify_storage,
)
from exchange.db.engine import make_engine
from tests.audit.store_support import (
    ORIGIN,
    GroupLog,
    LogKeys,
    memory_tree,
    migrated_engine,
    note_entry,
    register,
    stored_leaves,
    verify_with_auditor,
)


@pytest.fixture
def keys() -> LogKeys:
    return LogKeys.generate()


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    engine = migrated_engine(db_url)
    yield engine
    engine.dispose()


def _nested(depth: int) -> dict[str, object]:
    value: dict[str, object] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


def _snapshot(engine: Engine) -> tuple[int, int, int, list[bytes]]:
    """Row counts of the three tables and every leaf: what 'nothing changed' compares."""
    with engine.connect() as connection:
        counts = [connection.execute(select(func.count()).select_from(t)).scalar_one()
                  for t in (audit_entries, audit_tree_nodes, audit_checkpoints)]
    return counts[0], counts[1], counts[2], stored_leaves(engine)


def test_append_read_and_proofs_equal_memory_tree(engine: Engine, keys: LogKeys) -> None:
    with keys.open(engine) as log:
        assert log.size() == 0
        assert log.root() == merkle.EMPTY_ROOT
        entries = [register(keys.operator, keys.writer)]
        entries += [note_entry(keys.writer, "a", seq) for seq in range(44)]
        indexes: list[int] = []
        position = 0
        for chunk in (1, 1, 2, 3, 5, 8, 13, 12):  # single appends and groups, 45 in all
            indexes += log.append_many(entries[position:position + chunk])
            position += chunk
        assert indexes == list(range(45))
        assert log.size() == 45

        tree = memory_tree(e.leaf_bytes() for e in entries)
        assert stored_leaves(engine) == [e.leaf_bytes() for e in entries]
        assert log.get(7).leaf_bytes() == entries[7].leaf_bytes()
        assert log.get(7) == entries[7]
        assert [e.leaf_bytes() for e in log.entries(10, 20)] == \
            [e.leaf_bytes() for e in entries[10:20]]
        with pytest.raises(IndexError, match="45"):
            log.get(45)
        for size in range(0, 46):
            assert log.root(size) == tree.root(size), size
        for size in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 31, 32, 33, 44, 45):  # around 2^k
            root = tree.root(size)
            for index in range(size):
                proof = log.inclusion_proof(index, size)
                assert proof == tree.inclusion_proof(index, size), (index, size)
                merkle.verify_inclusion(tree.leaf(index), index, size, proof, root)
            for old in range(1, size + 1):
                proof = log.consistency_proof(old, size)
                assert proof == tree.consistency_proof(old, size), (old, size)
                merkle.verify_consistency(old, size, proof, tree.root(old), root)
                # the API's one-query form: the same proof
                assert log.consistency(old, size) == proof, (old, size)
            for index in range(size):  # the API's one-query form: leaf hash and proof together
                leaf, proof = log.inclusion(index, size)
                assert leaf == log.leaf_hash(index) == tree.leaf(index)
                assert proof == tree.inclusion_proof(index, size), (index, size)
        for bad in ((45, 45), (0, 46), (-1, 3)):
            with pytest.raises(ValueError, match=r"size|index"):
                log.inclusion(*bad)
        with pytest.raises(ValueError, match="size"):
            log.consistency(3, 46)
        with pytest.raises(ValueError, match="old_size"):
            log.consistency(5, 4)
        with pytest.raises(ValueError, match="size"):
            log.root(46)
        assert verify_storage(engine, keys.operator.public_key) == tree.root()


def test_checkpoint_export_and_auditor_verify(engine: Engine, keys: LogKeys, db_url: str) -> None:
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        log.append_many([note_entry(keys.writer, "b", seq) for seq in range(20)])
        note = log.checkpoint()
        checkpoint = verify_checkpoint(note, keys.log.public_key, ORIGIN, ORIGIN)
        assert (checkpoint.size, checkpoint.root) == (21, log.root())
        assert log.checkpoint() == note  # same size: the same (deterministic) note, stored once
        assert log.latest_checkpoint() == note
        log.append(note_entry(keys.writer, "b", 20))
        newer = log.checkpoint()
        assert verify_checkpoint(newer, keys.log.public_key, ORIGIN).size == 22
        report = verify_with_auditor(log, keys)
        assert report.ok, report.problem
        assert report.entries == 22
    assert read_latest_checkpoint(db_url) == newer
    exported = [e.leaf_bytes() for e in read_entries(db_url)]
    assert exported == stored_leaves(engine)
    assert [e.leaf_bytes() for e in read_entries(db_url, 3, 5)] == exported[3:5]


def test_refused_entries_change_nothing(engine: Engine, keys: LogKeys) -> None:
    other, revoked = Signer.generate(), Signer.generate()
    with keys.open(engine) as log:
        log.append_many([register(keys.operator, keys.writer), register(keys.operator, revoked),
                         note_entry(revoked, "r", 0),
                         sign_entry(keys.operator, "key.revoke",
                                    {"key_id": revoked.key_id, "reason": "lost laptop"})])
        stored = [note_entry(keys.writer, "c", seq) for seq in range(5)]
        log.append_many(stored)
        log.checkpoint()
        before = _snapshot(engine)
        root = log.root()

        good = note_entry(keys.writer, "c", 100)
        tampered = note_entry(keys.writer, "c", 101).to_json()
        tampered["payload"]["round"] = 999
        cases: list[tuple[list[object], str]] = [
            ([note_entry(other, "c", 0)], f"key_id: {other.key_id} is not registered"),
            ([note_entry(revoked, "r", 1)], "revoked (lost laptop) at entry 3"),
            ([tampered], "signature: does not verify"),
            ([register(keys.writer, other)], "only an operator key may register"),
            ([stored[2]], "identical to log entry 6"),
            ([good, good], "identical to log entry 9"),
            ([{"v": 1, "kind": "x", "key_id": keys.writer.key_id, "time": "yesterday",
               "payload": {}, "signature": "AA=="}], "time"),
            ([{**good.to_json(), "payload": []}], "payload"),
            ([sign_entry(keys.writer, "k" * 129, {})], "kind: longer than 128 characters"),
            ([sign_entry(keys.writer, "nul\x00kind", {})], "kind: contains a NUL character"),
            ([sign_entry(keys.writer, "big", {"blob": "x" * (1 << 20)})],
             "more than the 1048576 a log entry may have"),
            ([good, {**good.to_json(), "payload": {"x": 1.5e400}}], "payload"),
            ([{**good.to_json(), "payload": {"x": 2**60}}], "payload: cannot be canonically"),
            ([{**good.to_json(), "payload": _nested(5000)}], "payload: cannot be canonically"),
            ([good, note_entry(other, "c", 1)], "not registered"),  # all or nothing
            ([register(keys.operator, other), note_entry(other, "c", 1),
              note_entry(revoked, "r", 2)], "revoked"),  # the registration is undone too
        ]
        for entries, reason in cases:
            with pytest.raises(EntryRefusedError, match=re.escape(reason)):
                log.append_many(entries)  # type: ignore[arg-type]
            assert _snapshot(engine) == before
            assert log.root() == root
        with pytest.raises(EntryRefusedError, match=r"expected audit\.entry\.Entry"):
            log.append("not an entry")  # type: ignore[arg-type]
        # The refused registration left no trace: `other` is still unknown, and the log still
        # accepts good entries at the next index.
        with pytest.raises(EntryRefusedError, match="not registered"):
            log.append(note_entry(other, "c", 3))
        assert log.append(good) == before[0]
        assert verify_storage(engine, keys.operator.public_key) == log.root()


def test_quotes_and_escapes_are_stored_exactly(engine: Engine, keys: LogKeys) -> None:
    """Hostile text must arrive byte for byte, as data, on both databases (PostgreSQL: packed
    into the one INSERT's bytes and cut back into rows by the server, `entries._PG_ROWS`)."""
    hostile = ["x'); DROP TABLE audit_entries; --", "back\\slash \\x00 '' \"q\" {a,b} $1 %s",
               "ünïcødé \u2028 \U0001f600", "E'\\\\x41'", "line\nbreak,4,comma\t"]
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        entries = [sign_entry(keys.writer, kind, {"note": kind, "bytes": "\x01\x7f"})
                   for kind in hostile]
        futures = [log.submit([entry]) for entry in entries]  # one group: one append_in
        indexes = [future.result()[0] for future in futures]
        assert sorted(indexes) == [1, 2, 3, 4, 5]
        stored = {index: log.get(index) for index in indexes}
        assert sorted(e.kind for e in stored.values()) == sorted(hostile)
        for index, entry in zip(indexes, entries, strict=True):
            assert stored[index] == entry
        with engine.connect() as connection:
            kinds = connection.execute(select(audit_entries.c.kind).where(
                audit_entries.c.idx >= 1)).scalars().all()
        assert sorted(kinds) == sorted(hostile)
        verify_storage(engine, keys.operator.public_key)


def test_refusal_in_a_group_commit_does_not_affect_the_others(engine: Engine, keys: LogKeys) -> None:
    stranger = Signer.generate()
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        futures = []
        for seq in range(60):
            signer = stranger if seq % 3 == 0 else keys.writer
            futures.append(log.submit([note_entry(signer, "g", seq)]))
        accepted: list[int] = []
        for seq, future in enumerate(futures):
            if seq % 3 == 0:
                with pytest.raises(EntryRefusedError, match="not registered"):
                    future.result()
            else:
                accepted += future.result()
        assert sorted(accepted) == list(range(1, 41))
        assert log.size() == 41
        verify_storage(engine, keys.operator.public_key)


def test_key_registered_and_used_in_one_call(engine: Engine, keys: LogKeys) -> None:
    newcomer = Signer.generate()
    with keys.open(engine) as log:
        indexes = log.append_many([register(keys.operator, newcomer, "hospital", "hospital:h1"),
                                   note_entry(newcomer, "n", 0)])
        assert indexes == [0, 1]
        rotated = Signer.generate()
        log.append(sign_entry(newcomer, "key.rotate", {
            "old_key_id": newcomer.key_id, "new_key_id": rotated.key_id,
            "new_public_key": rotated.public_key_b64}))
        assert log.append(note_entry(rotated, "n", 1)) == 3
        with pytest.raises(EntryRefusedError, match="rotated to"):
            log.append(note_entry(newcomer, "n", 2))


def test_reopen_replays_keys_and_sees_other_writers(engine: Engine, keys: LogKeys) -> None:
    late = Signer.generate()
    with keys.open(engine) as first:
        first.append_many([register(keys.operator, keys.writer),
                           sign_entry(keys.operator, "key.revoke",
                                      {"key_id": keys.writer.key_id, "reason": "test"})])
        second = keys.open(engine)  # opened now: knows the revocation, not `late`
        first.append(register(keys.operator, late))
        # `second` learns about `late` from the database under its write lock.
        assert second.append(note_entry(late, "l", 0)) == 3
        with pytest.raises(EntryRefusedError, match="revoked"):
            second.append(note_entry(keys.writer, "l", 1))
        assert first.append(note_entry(late, "l", 2)) == 4
        second.close()
    with keys.open(engine) as reopened:
        with pytest.raises(EntryRefusedError, match="revoked"):
            reopened.append(note_entry(keys.writer, "l", 3))
        assert reopened.append(note_entry(late, "l", 3)) == 5
        assert reopened.size() == 6


def test_append_async(engine: Engine, keys: LogKeys) -> None:
    async def scenario(log: GroupLog) -> list[int]:
        await log.append_async(register(keys.operator, keys.writer))
        return list(await asyncio.gather(*(log.append_async(note_entry(keys.writer, "x", seq))
                                           for seq in range(20))))

    with keys.open(engine) as log:
        indexes = asyncio.run(scenario(log))
        assert sorted(indexes) == list(range(1, 21))
        assert [log.get(i).payload["round"] for i in indexes] == list(range(20))


def test_unusable_databases_are_refused(tmp_path: Path, keys: LogKeys) -> None:
    empty = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(SchemaMissingError, match="exchange db upgrade"):
        keys.open(empty)
    memory = make_engine("sqlite://")
    from audit.store import create_schema

    create_schema(memory)
    with pytest.raises(AuditStoreError, match="in-memory SQLite"):
        keys.open(memory)
    with pytest.raises(CheckpointError, match="origin"):
        AuditLog(empty, keys.log, "has space", keys.operator.public_key)


def test_verify_storage_names_the_damage(tmp_path: Path, keys: LogKeys) -> None:
    """With the triggers dropped (only an owner can), tampering is still found by a full check."""
    url = f"sqlite:///{tmp_path / 'tamper.db'}"
    engine = migrated_engine(url)
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        log.append_many([note_entry(keys.writer, "t", seq) for seq in range(9)])
    assert verify_storage(engine, keys.operator.public_key)
    with engine.begin() as connection:
        for statement in drop_append_only_trigger_ddl("sqlite"):
            connection.exec_driver_sql(statement)
        leaf = connection.execute(select(audit_entries.c.leaf)
                                  .where(audit_entries.c.idx == 6)).scalar_one()
        forged = bytes(leaf).replace(b'"participants":3', b'"participants":4')
        connection.execute(audit_entries.update().where(audit_entries.c.idx == 6)
                           .values(leaf=forged))
    with pytest.raises(StoreCorruptError, match="entry 6: leaf_hash does not match"):
        verify_storage(engine, keys.operator.public_key)
    with engine.begin() as connection:
        connection.execute(audit_entries.update().where(audit_entries.c.idx == 6)
                           .values(leaf=leaf))
        connection.execute(audit_tree_nodes.delete().where(audit_tree_nodes.c.level == 2))
    with pytest.raises(StoreCorruptError, match="nodes stored"):
        verify_storage(engine, keys.operator.public_key)
    engine.dispose()


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**60), 2**60)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=6), children, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(_json_values)
def test_canonical_is_rfc8785(value: object) -> None:
    """audit.signing.canonical's C-encoder fast path gives exactly the rfc8785 bytes, or the
    same refusal."""
    try:
        expected = rfc8785.dumps(value)  # type: ignore[arg-type]  # any JSON-like value
    except Exception as exc:
        with pytest.raises(type(exc)):
            canonical(value)
        return
    assert canonical(value) == expected


def test_canonical_escapes_like_rfc8785() -> None:
    text = "".join(chr(c) for c in range(0x80)) + "\\\"/"
    value = {text: [text, 2**53 - 1, -(2**53 - 1), True, None], "b": {"a": 1}, "\x01": 0}
    assert canonical(value) == rfc8785.dumps(value)  # type: ignore[arg-type]


def test_database_failure_is_not_acknowledged_and_the_log_recovers(
        tmp_path: Path, keys: LogKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite: another connection holds the write lock past the busy timeout."""
    import exchange.db.engine

    monkeypatch.setattr(exchange.db.engine, "SQLITE_BUSY_TIMEOUT_MS", 200)
    url = f"sqlite:///{tmp_path / 'busy.db'}"
    engine = migrated_engine(url)
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        blocker = sqlite3.connect(tmp_path / "busy.db", isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        with pytest.raises(OperationalError, match="database is locked"):
            log.append(note_entry(keys.writer, "busy", 0))
        blocker.execute("ROLLBACK")
        blocker.close()
        assert log.size() == 1
        assert log.append(note_entry(keys.writer, "busy", 1)) == 1
        verify_storage(engine, keys.operator.public_key)
    engine.dispose()


@pytest.mark.postgres
def test_postgres_connection_loss_is_not_acknowledged_and_the_log_recovers(
        postgres_url: str, keys: LogKeys) -> None:
    """The writer's connection dies inside the transaction, after the entry was inserted: the
    append is refused, nothing of it is stored, and the next transaction starts afresh."""
    engine = migrated_engine(postgres_url)
    lost = note_entry(keys.writer, "lost", 0)

    def append_then_lose_the_connection(connection: Connection) -> None:
        log.append_in(connection, [lost])
        connection.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))

    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        with pytest.raises(SQLAlchemyError):
            log.group.run(append_then_lose_the_connection)
        assert log.size() == 1
        assert log.append(lost) == 1  # never stored, so not a replay
        assert log.append(note_entry(keys.writer, "lost", 1)) == 2
        assert log.size() == 3
        verify_storage(engine, keys.operator.public_key)
    engine.dispose()


@settings(max_examples=3000, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_floats_are_written_as_ecmascript_numbers(value: float) -> None:
    assert canonical({"x": [value]}) == rfc8785.dumps({"x": [value]})


@pytest.mark.parametrize("value", [0.0, -0.0, 3.0, 1e-5, 1e-6, 1e-7, 1.5e-7, 0.1, 123.456, 1e16,
                                   1e20, 1e21, 1e22, 2**53 + 0.0, 5e-324, 1.7976931348623157e308,
                                   -2.5e-9, 100.0, 0.000123])
def test_float_edges(value: float) -> None:
    assert canonical([value, {"k": value}]) == rfc8785.dumps([value, {"k": value}])


def test_text_that_looks_like_a_placeholder_is_kept() -> None:
    for value in ({"a": "\x000", "b": 1.5}, {"\x000": 1.5}, ["x\x000", 2.5], ["\x00", 0.5]):
        assert canonical(value) == rfc8785.dumps(value)  # type: ignore[arg-type]


def test_one_query_proofs_see_entries_another_writer_appended(engine: Engine, keys: LogKeys) -> None:
    """`inclusion`/`consistency` skip the size look-up for sizes already seen; a size beyond
    them (another process appended since) is looked up, not refused."""
    with keys.open(engine) as reader, keys.open(engine) as writer:
        writer.append(register(keys.operator, keys.writer))
        writer.append_many([note_entry(keys.writer, "w", seq) for seq in range(6)])
        assert reader.inclusion(0, 7)[0] == reader.leaf_hash(0)  # 7 > the 1 it saw at opening
        writer.append_many([note_entry(keys.writer, "x", seq) for seq in range(5)])
        tree = memory_tree(stored_leaves(engine))
        assert reader.inclusion(11, 12)[1] == tree.inclusion_proof(11, 12)
        assert reader.consistency(7, 12) == tree.consistency_proof(7, 12)
        with pytest.raises(ValueError, match="log size 12"):
            reader.inclusion(0, 13)
