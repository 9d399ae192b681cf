"""The coordinator's group-commit writes on PostgreSQL: one round trip, every guarantee kept.

A write whose append is the last thing it makes (`Journal.append(..., last=True)`, with the
rows it inserts after the append given as `then`) goes to PostgreSQL as ONE simple-protocol
string: BEGIN, the log's lock, the audit INSERT, the write's own rows, COMMIT. The ledger fold
runs before that string is sent (a refusal sends nothing); a statement of the string that fails
makes the server skip the COMMIT, and the write is made again the careful way, refused alone.
What the server is asked is read from libpq's own trace of the writer's connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Connection, insert, select

from audit.signing import Signer
from audit.store import AuditLog
from exchange.coordinator.app import _read_engine, _write_engine
from exchange.coordinator.journal import Journal
from exchange.coordinator.problems import ProblemError
from exchange.db import migrate
from exchange.study.models import Study
from tests.audit.store_support import libpq_trace
from tests.exchange.conftest import World, make_world

pytestmark = pytest.mark.postgres

ORIGIN = "exchange.test/journal-one-string"


@pytest.fixture
def journal(postgres_url: str) -> Iterator[Journal]:
    migrate.upgrade(postgres_url, "coordinator")
    read, write = _read_engine(postgres_url), _write_engine(postgres_url)
    operator, log_key, coordinator = Signer.generate(), Signer.generate(), Signer.generate()
    log = AuditLog(read, log_key, ORIGIN, operator.public_key)
    journal = Journal(read, write, log, operator=operator, coordinator=coordinator)
    journal.bootstrap()
    for _ in range(2):  # the writer's connection open, its edge known, its INSERT prepared
        entry = journal.sign("token.mint", {"account": "org:warm", "amount": 1}, operator=True)
        journal.batcher.run(lambda c, entry=entry: journal.append(c, entry, last=True))
    try:
        yield journal
    finally:
        journal.close()
        log.close()
        read.dispose()
        write.dispose()


def _mint(journal: Journal, amount: int, *, last: bool = True) -> list[int]:
    entry = journal.sign("token.mint", {"account": "org:acme", "amount": amount}, operator=True)
    indexes: list[int] = journal.batcher.run(lambda c: journal.append(c, entry, last=last))
    return indexes


def _escrow(journal: Journal, study_id: str, amount: int) -> Any:
    entry = journal.sign("study.escrow", {"study_id": study_id, "account": "org:acme",
                                          "amount": amount, "royalty_account": None,
                                          "royalty_bps": 0, "forward_bps": 0})
    return lambda connection: journal.append(connection, entry, last=True)


def _balance(journal: Journal) -> int:
    with journal.read_engine.connect() as connection:
        return journal.ledger.balance(connection, "org:acme")


def _trace(path: Path) -> tuple[list[str], int]:
    """(queries the client sent, times it waited for the server) in a libpq trace."""
    lines = path.read_text().splitlines()
    sent = [line for line in lines if line.startswith("F")]
    waits = sum(1 for line in lines if line.startswith("B") and "ReadyForQuery" in line)
    return sent, waits


def test_a_journal_append_that_ends_its_write_is_one_round_trip(journal: Journal,
                                                                 tmp_path: Path) -> None:
    """Ledger entries (folded by the Journal) appended with `last=True`: each transaction is
    ONE query string, BEGIN to COMMIT, and one wait; the fold holds every mint. The same
    append without `last` needs more than one wait (the COMMIT on its own)."""
    trace = tmp_path / "last.trace"
    with libpq_trace(journal.batcher, trace):
        for amount in (10, 20, 30):
            _mint(journal, amount)
    sent, waits = _trace(trace)
    assert waits == 3 and len(sent) == 3, sent
    for line in sent:
        assert "\tQuery\t" in line and line.index("BEGIN") < line.index("pg_advisory_xact_lock") \
            < line.index("EXECUTE audit_append_rows") < line.index("; COMMIT"), line
    assert _balance(journal) == 60

    trace = tmp_path / "not-last.trace"
    with libpq_trace(journal.batcher, trace):
        _mint(journal, 5, last=False)
    _sent, waits = _trace(trace)
    assert waits >= 2
    assert _balance(journal) == 65


def test_a_fold_that_refuses_commits_nothing_and_the_next_write_goes_on(journal: Journal,
                                                                        tmp_path: Path) -> None:
    """An escrow the ledger refuses (more than the balance) is refused by the fold BEFORE the
    one string is sent; as the size it assumed was a guess, the write is made again the
    careful way (the checked INSERT at the real size, the fold after it), refused there, and
    rolled back: no COMMIT is sent, the log and the balance are unchanged, and the next escrow
    is made in one round trip from the right ledger state."""
    _mint(journal, 50)
    size = journal.audit_log.size()
    trace = tmp_path / "refused.trace"
    with libpq_trace(journal.batcher, trace), pytest.raises(ProblemError) as refused:
        journal.batcher.run(_escrow(journal, "st-too-big", 51))
    assert refused.value.status == 422 and refused.value.kind == "ledger-refused"
    sent, _waits = _trace(trace)
    assert not any("audit_append_rows" in line or '"COMMIT"' in line or "; COMMIT" in line
                   for line in sent), sent
    assert any("ROLLBACK" in line for line in sent), sent
    assert journal.audit_log.size() == size and _balance(journal) == 50

    trace = tmp_path / "next.trace"
    with libpq_trace(journal.batcher, trace):
        journal.batcher.run(_escrow(journal, "st-fits", 50))
    sent, waits = _trace(trace)
    assert waits == 1 and len(sent) == 1, sent
    assert journal.audit_log.size() == size + 1 and _balance(journal) == 0


def test_a_failing_row_in_the_string_skips_the_commit_and_refuses_that_write_alone(
        journal: Journal, tmp_path: Path) -> None:
    """The write's own row (`then`) fails in the one string (a study of an organisation that
    does not exist: foreign key): the server skips the COMMIT, the write is made again the
    careful way and refused with the database's error; its entry is not in the log and its
    mint is not in the ledger fold. The next write is unaffected."""
    _mint(journal, 7)
    size = journal.audit_log.size()
    entry = journal.sign("token.mint", {"account": "org:acme", "amount": 1000}, operator=True)
    now = datetime.now(UTC)

    def orphan_row(first_index: int) -> tuple[Any, list[dict[str, Any]]]:
        return insert(Study), [{"id": "st-orphan", "organisation_id": "no-such-org",
                                "researcher_id": None, "title": "orphan", "status": "submitted",
                                "spec": {}, "token_budget": 1, "min_hospitals": 1,
                                "rounds_planned": 1, "submitted_at": now, "start_deadline": now,
                                "submit_entry_index": first_index}]

    def write(connection: Connection) -> list[int]:
        return journal.append(connection, entry, last=True, then=orphan_row)

    trace = tmp_path / "orphan.trace"
    with libpq_trace(journal.batcher, trace), pytest.raises(Exception) as failed:
        journal.batcher.run(write)
    assert "foreign key" in str(failed.value).lower()
    sent, _waits = _trace(trace)
    assert any("; COMMIT" in line and "no-such-org" not in line for line in sent)  # hex only
    assert journal.audit_log.size() == size and _balance(journal) == 7
    assert _mint(journal, 3) == [size]
    assert _balance(journal) == 10


@pytest.fixture
def pg_world(postgres_url: str, tmp_path: Path) -> Iterator[World]:
    yield from make_world(postgres_url, tmp_path)


def test_a_study_submission_is_one_round_trip_and_stores_its_row_as_sent(
        pg_world: World, tmp_path: Path) -> None:
    """`POST /v1/studies` on PostgreSQL: the balance check, the two entries, their fold and the
    study row in ONE query string and one wait per submission; the row read back is the one
    answered (a title with quotes, a backslash and SQL in it included), and records the index
    of its `study.submit` entry."""
    pg_world.submit()  # the writer's connection open, the log's edge known,
    pg_world.submit()  # its INSERT prepared
    title = "O'Brien \\ \"risk\"'); DROP TABLE studies; -- ünïcode"
    trace = tmp_path / "submit.trace"
    with libpq_trace(pg_world.runtime.journal.batcher, trace):
        answers = [pg_world.submit(title=title), pg_world.submit(token_budget=7)]
    sent, waits = _trace(trace)
    assert waits == 2 and len(sent) == 2, sent
    assert all("INSERT INTO studies" in line and "; COMMIT" in line for line in sent), sent
    assert not any("DROP TABLE" in line or "O'Brien" in line for line in sent)
    journal = pg_world.runtime.journal
    with journal.read() as session:
        for answer in answers:
            study = session.execute(select(Study).where(Study.id == answer["id"])).scalar_one()
            assert study.title == answer["title"]
            assert study.token_budget == answer["token_budget"]
            entry = journal.audit_log.get(study.submit_entry_index)
            assert entry.kind == "study.submit" and entry.payload["study_id"] == study.id
            assert study.spec["start_deadline"] == entry.payload["spec"]["start_deadline"]
    assert answers[0]["title"] == title


def test_a_balance_another_process_raised_is_seen_before_a_submission_is_refused(
        pg_world: World, tmp_path: Path) -> None:
    """The submission's balance check reads nothing when the fold this process holds has
    enough; when it has not, the log is read before refusing: tokens minted by another
    coordinator process (its own Journal on the same database) count at once."""
    runtime = pg_world.runtime
    keys = tmp_path / "keys"
    other = Journal(runtime.read_engine, runtime.write_engine, runtime.audit_log,
                    operator=Signer.load(keys / "operator.key"),
                    coordinator=Signer.load(keys / "coordinator.key"))
    other.ledger = type(runtime.journal.ledger)(other.operator.key_id)  # a process of its own
    balance = runtime.lifecycle.registry.balance("org:globex")
    with other.write() as session:
        other.append(session, other.sign("token.mint", {"account": "org:globex",
                                                        "amount": 10_000}, operator=True))
    answer = pg_world.submit("bob", token_budget=balance + 5_000)
    assert answer["token_budget"] == balance + 5_000
    response = pg_world.as_("bob", "POST", "/v1/studies",
                            json={**_body(), "token_budget": balance + 10_000})
    assert response.status_code == 422 and "token_budget" in response.text
    other.batcher.close()


def _body() -> dict[str, Any]:
    from tests.exchange.conftest import study_body

    return study_body()


def test_a_fold_refused_at_a_stale_size_is_decided_again_at_the_real_one(
        journal: Journal) -> None:
    """Another coordinator process (its own Journal and AuditLog on the same database) minted
    since this one last committed: this process's fold does not know those tokens, and its
    writer assumes the size it last committed. The escrow's fold refuses at that guess; the
    write is made again the careful way, folded at the real size, and accepted."""
    _mint(journal, 50)
    other_log = AuditLog(journal.read_engine, Signer.generate(), ORIGIN,
                         journal.operator.public_key)
    other = Journal(journal.read_engine, journal.write_engine, other_log,
                    operator=journal.operator, coordinator=journal.coordinator)
    with other.write() as session:
        other.append(session, other.sign("token.mint", {"account": "org:acme", "amount": 100},
                                         operator=True))
    size = journal.audit_log.size()
    assert journal.batcher.run(_escrow(journal, "st-needs-both-mints", 120)) == [size]
    assert _balance(journal) == 30
    other.close()
    other_log.close()


def test_after_a_write_in_a_session_the_next_append_is_still_one_round_trip(
        journal: Journal, tmp_path: Path) -> None:
    """A write made in a `Journal.write()` session (the registry's, a decision's) tells the
    log its committed edge, so the group commit's next append assumes the right size: its
    one string commits (no failed string, no ROLLBACK and careful way). (The fold reads the
    session's new ledger rows first: BEGIN and that read go out before the string.)"""
    with journal.write() as session:
        journal.append(session, journal.sign("token.mint", {"account": "org:acme", "amount": 4},
                                             operator=True))
    trace = tmp_path / "after-session.trace"
    with libpq_trace(journal.batcher, trace):
        _mint(journal, 6)
    sent, _waits = _trace(trace)
    strings = [line for line in sent if "EXECUTE audit_append_rows" in line]
    assert len(strings) == 1 and "; COMMIT" in strings[0], sent
    assert not any("ROLLBACK" in line or "pg_advisory_xact_lock($1)" in line for line in sent)
    assert _balance(journal) == 10
