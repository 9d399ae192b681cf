"""Start deadlines and cancellation (issue 21 item 3), through the HTTP API on SQLite and
PostgreSQL: a study not started by its `start_deadline` ends `expired`; a study cancelled
before its start ends `cancelled`. Either way its escrow is refunded and the approvals (the
privacy the hospitals reserved for it) are released, all in the log, and the auditor's
`audit rewards` over an export of that log agrees (every minted token accounted for)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from audit.cli import app as audit_app
from tests.exchange.conftest import World, make_world, study_body

MINTED_TO_ACME = 50_000


@pytest.fixture
def swept_world(db_url: str, tmp_path: Path) -> Iterator[World]:
    """A world whose deadline sweep runs often, so a test sees it act within seconds."""
    yield from make_world(db_url, tmp_path, deadline_sweep_every_s=0.2)


def instant(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def entries_of(world: World, study_id: str) -> list[Any]:
    return [e for e in world.runtime.audit_log.entries() if e.payload.get("study_id") == study_id]


def stored_status(world: World, study_id: str) -> str:
    """The study's status as stored, read without the API (whose reads expire on access)."""
    from exchange.study.models import Study

    with world.runtime.journal.read() as session:
        study = session.get(Study, study_id)
        assert study is not None
        return study.status.value


def audited_rewards(world: World, tmp_path: Path) -> dict[str, Any]:
    """`audit export` of the coordinator's database, then `audit rewards` on the export: the
    ledger as an auditor folds it from the signed log alone."""
    world.runtime.audit_log.checkpoint()  # one checkpoint covering every entry
    folder = tmp_path / "export"
    cli = CliRunner()
    exported = cli.invoke(audit_app, ["export", "--db", world.runtime.config.database_url,
                                      "--out", str(folder), "--force"])
    assert exported.exit_code == 0, exported.output
    shown = cli.invoke(audit_app, ["rewards", str(folder)])
    assert shown.exit_code == 0, shown.output
    ledger: dict[str, Any] = json.loads(shown.stdout)
    # Conservation: every minted token is in a balance, an escrow or an unclaimed pool.
    assert ledger["minted"] == ledger["escrow"] + ledger["unclaimed"] + sum(ledger["balances"].values())
    return ledger


def assert_refunded_and_released(world: World, tmp_path: Path, study_id: str, kind: str,
                                 approved: list[str]) -> None:
    """The study's end (`kind`, naming the approvals it releases) is followed by the refund of
    all of its escrow; the auditor's fold gives the organisation back every token."""
    entries = entries_of(world, study_id)
    kinds = [e.kind for e in entries]
    assert kinds.count(kind) == 1 and kinds.count("study.refund") == 1
    end = kinds.index(kind)
    assert kinds[end + 1] == "study.refund"  # in the same transaction
    assert entries[end].payload["released"] == sorted(f"hospital:{h}" for h in approved)
    escrow = next(e for e in entries if e.kind == "study.escrow")
    assert entries[end + 1].payload == {"study_id": study_id, "account": "org:acme",
                                        "amount": escrow.payload["amount"]}
    ledger = audited_rewards(world, tmp_path)
    assert ledger["escrow"] == 0
    assert ledger["balances"]["org:acme"] == MINTED_TO_ACME
    served = world.as_("auditor", "GET", "/v1/ledger/balances").json()
    assert served["balances"]["org:acme"] == MINTED_TO_ACME and served["escrow"] == 0


# ------------------------------------------------------------------ the field at submission
@pytest.mark.parametrize(("value", "reason"), [
    ("next tuesday", "not an RFC 3339 instant"),
    ("2027-01-31T12:00:00", "not an RFC 3339 instant"),  # no offset: no instant
    ("2027-01-31", "not an RFC 3339 instant"),
    ("2027-02-30T12:00:00Z", "not a valid date and time"),
    ("2020-01-01T00:00:00Z", "is in the past"),
    (12, "datetime"),
])
def test_a_bad_start_deadline_is_refused_by_field(sqlite_world: World, value: object, reason: str) -> None:
    world = sqlite_world
    size = world.runtime.audit_log.size()
    response = world.as_("alice", "POST", "/v1/studies", json=study_body(start_deadline=value))
    assert response.status_code == 422, response.text
    problems = [e for e in response.json()["errors"] if e["field"] == "start_deadline"]
    assert problems and reason in problems[0]["reason"], response.json()
    assert world.runtime.audit_log.size() == size  # nothing changed


def test_the_deadline_defaults_to_seven_days_and_is_logged(sqlite_world: World) -> None:
    world = sqlite_world
    study = world.submit()
    submitted = datetime.fromisoformat(study["submitted_at"])
    deadline = datetime.fromisoformat(study["start_deadline"])
    assert abs(deadline - submitted - timedelta(days=7)) < timedelta(seconds=5)
    submit = next(e for e in entries_of(world, study["id"]) if e.kind == "study.submit")
    assert datetime.fromisoformat(submit.payload["spec"]["start_deadline"]) == deadline
    given = world.submit(start_deadline="2099-03-01T09:30:00+02:00")
    assert datetime.fromisoformat(given["start_deadline"]) == datetime(2099, 3, 1, 7, 30, tzinfo=UTC)
    listed = world.as_("alice", "GET", "/v1/studies").json()["items"]
    assert {item["id"]: item["start_deadline"] for item in listed}[given["id"]] == given["start_deadline"]
    pending = world.as_("h-one", "GET", "/v1/hospital/studies").json()["items"]
    assert {s["id"]: s["start_deadline"] for s in pending}[given["id"]] == given["start_deadline"]


# ------------------------------------------------------------------ studies that never start
def test_the_sweep_expires_a_study_past_its_deadline(swept_world: World, tmp_path: Path) -> None:
    """Nobody looks at the study: the coordinator's background sweep expires it."""
    world = swept_world
    study_id = world.submit(min_hospitals=2, start_deadline=instant(2), token_budget=900)["id"]
    assert world.decide("h-one", study_id).status_code == 201
    ends = time.monotonic() + 30
    while stored_status(world, study_id) == "submitted" and time.monotonic() < ends:
        time.sleep(0.1)
    assert stored_status(world, study_id) == "expired"
    assert_refunded_and_released(world, tmp_path, study_id, "study.expire", ["h-one"])
    study = world.as_("alice", "GET", f"/v1/studies/{study_id}").json()
    assert study["status"] == "expired" and "start deadline" in study["outcome_reason"]
    # Decisions are closed: a late approval is refused (nothing logged), a refusal is kept late.
    size = world.runtime.audit_log.size()
    assert world.decide("h-two", study_id).status_code == 409
    assert world.runtime.audit_log.size() == size
    assert world.decide("h-three", study_id, "refuse", ["policy: too late"]).status_code == 201
    assert world.as_("alice", "GET", f"/v1/studies/{study_id}").json()["status"] == "expired"


def test_a_study_all_hospitals_refuse_expires(world: World, tmp_path: Path) -> None:
    study = world.submit(min_hospitals=2, start_deadline=instant(4))
    study_id = study["id"]
    for hospital in ("h-one", "h-two", "h-three"):
        assert world.decide(hospital, study_id, "refuse", ["policy: no"]).status_code == 201
    time.sleep(max(0.0, (datetime.fromisoformat(study["start_deadline"]) - datetime.now(UTC))
                   .total_seconds()) + 0.1)
    # The researcher's read finds it overdue and expires it on access.
    assert world.as_("alice", "GET", f"/v1/studies/{study_id}").json()["status"] == "expired"
    assert_refunded_and_released(world, tmp_path, study_id, "study.expire", [])


def test_a_study_asking_more_hospitals_than_exist_is_refused_and_one_missing_a_hospital_expires(
        world: World, tmp_path: Path) -> None:
    """Asking for five of three registered hospitals is refused at submission (feasibility,
    issue 21 item 2), nothing escrowed. A study asking for all three, of which one never
    decides (offline), can never start: at its (default) deadline it expires and releases the
    two approvals."""
    refused = world.as_("alice", "POST", "/v1/studies", json=study_body(min_hospitals=5))
    assert refused.status_code == 422 and "min_hospitals" in refused.text
    study = world.submit(min_hospitals=3)
    for hospital in ("h-one", "h-two"):
        assert world.decide(hospital, study["id"]).status_code == 201
    assert stored_status(world, study["id"]) == "submitted"
    deadline = datetime.fromisoformat(study["start_deadline"])
    lifecycle = world.runtime.lifecycle
    assert lifecycle.expire_due(at=deadline - timedelta(seconds=1)) == []
    assert lifecycle.expire_due(at=deadline) == [study["id"]]
    assert lifecycle.expire_due(at=deadline) == []  # once
    assert_refunded_and_released(world, tmp_path, study["id"], "study.expire", ["h-one", "h-two"])
    expire = next(e for e in entries_of(world, study["id"]) if e.kind == "study.expire")
    assert datetime.fromisoformat(expire.payload["start_deadline"]) == deadline


def test_a_study_cancelled_before_its_start(world: World, tmp_path: Path) -> None:
    study_id = world.submit(min_hospitals=3)["id"]
    assert world.decide("h-two", study_id).status_code == 201
    response = world.as_("alice", "POST", f"/v1/studies/{study_id}/cancel",
                         json={"reason": "the cohort changed"})
    assert response.status_code == 200 and response.json()["status"] == "cancelled"
    assert_refunded_and_released(world, tmp_path, study_id, "study.cancel", ["h-two"])
    assert world.decide("h-one", study_id).status_code == 409  # decisions closed
    # A cancelled study never expires (once ended, it stays ended).
    assert world.runtime.lifecycle.expire_due(at=datetime.now(UTC) + timedelta(days=30)) == []
