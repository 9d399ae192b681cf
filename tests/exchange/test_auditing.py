"""Audit entries written inside the coordinator's own transactions (exchange.coordinator.auditing).

The point of the module: an entry and the state change it records commit together or not at
all, and such appends interleave safely with `audit.store.AuditLog`'s own appends."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, text

from audit.entry import sign_entry
from audit.keyring import Keyring
from audit.merkle import MemoryTree
from audit.signing import Signer
from audit.store import AuditLog
from exchange.coordinator.app import _write_engine
from exchange.coordinator.auditing import DuplicateEntryError, EntryRejectedError, TransactionalAppender
from exchange.db.engine import make_engine
from exchange.db.migrate import upgrade


@pytest.fixture
def setup(db_url: str) -> Iterator[tuple[Engine, Engine, AuditLog, TransactionalAppender, Signer, Signer]]:
    upgrade(db_url, "coordinator")
    operator, log_key = Signer.generate(), Signer.generate()
    read, write = make_engine(db_url), _write_engine(db_url)
    log = AuditLog(read, log_key, "test.example/log", operator.public_key)
    try:
        yield read, write, log, TransactionalAppender(operator.public_key), operator, log_key
    finally:
        log.close()
        read.dispose()
        write.dispose()


def _orgs(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(text("SELECT count(*) FROM organisations")).scalar_one())


def test_entry_and_state_commit_together_or_not_at_all(setup: tuple) -> None:
    read, write, log, appender, operator, _ = setup
    insert = text("INSERT INTO organisations (id, name, region, created_at) "
                  "VALUES (:id, :id, 'DE', CURRENT_TIMESTAMP)")
    with write.begin() as connection:
        connection.execute(insert, {"id": "org-a"})
        assert appender.append(connection, [sign_entry(operator, "org.register", {"id": "a"})]) == [0]
    assert log.size() == 1 and _orgs(read) == 1
    with pytest.raises(RuntimeError), write.begin() as connection:
        connection.execute(insert, {"id": "org-b"})
        appender.append(connection, [sign_entry(operator, "org.register", {"id": "b"})])
        raise RuntimeError("crash after the append, before the commit")
    assert log.size() == 1 and _orgs(read) == 1  # neither the entry nor the row


def test_interleaves_with_the_audit_store(setup: tuple) -> None:
    _read, write, log, appender, operator, _ = setup
    coordinator = Signer.generate()
    log.append(sign_entry(operator, "key.register", {"key_id": coordinator.key_id,
                                                     "public_key": coordinator.public_key_b64,
                                                     "role": "coordinator", "owner": "operator:c"}))
    for i in range(5):
        with write.begin() as connection:
            appender.append(connection, [sign_entry(coordinator, "study.round", {"i": i}),
                                         sign_entry(coordinator, "study.round", {"i": i, "b": 1})])
        log.append(sign_entry(operator, "org.register", {"i": i}))
    entries = list(log.entries())
    assert len(entries) == 1 + 5 * 3
    keyring = Keyring(operator.public_key)
    tree = MemoryTree()
    for index, entry in enumerate(entries):
        keyring.check(entry, index)
        keyring.apply(entry, index)
        tree.append_data(entry.leaf_bytes())
    assert log.root() == tree.root()
    assert log.consistency_proof(4, len(entries)) == tree.consistency_proof(4, len(entries))
    assert log.inclusion_proof(7, len(entries)) == tree.inclusion_proof(7, len(entries))


def test_refusals_name_the_reason_and_write_nothing(setup: tuple) -> None:
    _read, write, log, appender, operator, _ = setup
    stranger = Signer.generate()
    with pytest.raises(EntryRejectedError, match=r"not registered|unknown"), write.begin() as connection:
        appender.append(connection, [sign_entry(stranger, "study.round", {})])
    entry = sign_entry(operator, "org.register", {"x": 1})
    with write.begin() as connection:
        appender.append(connection, [entry])
    with pytest.raises(DuplicateEntryError), write.begin() as connection:
        appender.append(connection, [entry])
    forged = sign_entry(operator, "org.register", {"x": 2})
    forged = type(forged)(kind=forged.kind, key_id=forged.key_id, time=forged.time,
                          payload={"x": 3}, signature=forged.signature)
    with pytest.raises(EntryRejectedError, match="signature"), write.begin() as connection:
        appender.append(connection, [forged])
    with pytest.raises(EntryRejectedError, match="bytes"), write.begin() as connection:
        appender.append(connection, [sign_entry(operator, "org.register", {"blob": "x" * (1 << 20)})])
    assert log.size() == 1
