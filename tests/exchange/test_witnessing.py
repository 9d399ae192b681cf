"""Hospitals witness the coordinator's log: cosigning, the served checkpoint, `audit fetch`
against the real coordinator, refusals of bad cosignatures and bad checkpoints, and each
hospital's check that its own entries are included."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from audit.checkpoint import parse_checkpoint, verify_checkpoint
from audit.cosignature import check_cosignatures
from audit.entry import Entry
from audit.fetch import fetch_api
from audit.signing import Signer
from audit.trust import Trust
from audit.verify import verify_export
from audit.witness import AddCheckpointRequest
from exchange.coordinator.client import CoordinatorError, HospitalClient, decision_entry
from exchange.node.keys import witness_signer
from exchange.node.models import DecisionRow, StudyRow
from exchange.node.status import collect_status
from exchange.node.store import open_store
from exchange.node.witnessing import InclusionMonitor, NodeWitness, inclusion_status, witness_status
from tests.exchange.witness_support import (
    HOSPITALS,
    Served,
    app_config,
    node_settings,
    populate,
    serve,
)


@pytest.fixture
def hospitals() -> dict[str, Signer]:
    return {name: Signer.generate() for name in (*HOSPITALS, "w-none")}


@pytest.fixture
def served(db_url: str, tmp_path: Path, hospitals: dict[str, Signer]) -> Iterator[Served]:
    """SQLite and PostgreSQL (the checkpoint thread writes next to the coordinator's writers)."""
    config = app_config(db_url, tmp_path / "keys")
    running = serve(config, hospitals)
    witness_keys = {name: tmp_path / name / "keys" / "witness.key" for name in hospitals}
    try:
        running.keys = populate(running.runtime, hospitals, witness_keys)
        yield running
    finally:
        running.stop()


def _witnesses(tmp_path: Path, served: Served, hospitals: dict[str, Signer],
               ) -> Iterator[dict[str, tuple[NodeWitness, HospitalClient]]]:
    clients = {name: HospitalClient(served.url, hospitals[name], name) for name in HOSPITALS}
    try:
        yield {name: (NodeWitness(node_settings(tmp_path, name, served.url), client), client)
               for name, client in clients.items()}
    finally:
        for client in clients.values():
            client.close()


@pytest.fixture
def witnesses(tmp_path: Path, served: Served, hospitals: dict[str, Signer],
              ) -> Iterator[dict[str, tuple[NodeWitness, HospitalClient]]]:
    yield from _witnesses(tmp_path, served, hospitals)


def _checkpoint(served: Served) -> dict[str, Any]:
    with served.api() as api:
        return dict(api.get("/v1/audit/checkpoint"))


def _cosign_all(witnesses: dict[str, tuple[NodeWitness, HospitalClient]], size: int) -> None:
    for name, (witness, _client) in witnesses.items():
        step = witness.step(wait_s=10)
        while step.size < size and step.outcome != "refused":
            step = witness.step(wait_s=10)
        assert step.outcome in ("cosigned", "unchanged"), (name, step)


def test_hospitals_cosign_and_the_coordinator_serves_the_cosigned_checkpoint(
        served: Served, witnesses: dict[str, tuple[NodeWitness, HospitalClient]], tmp_path: Path) -> None:
    with served.api() as api:
        trust = Trust.from_json(api.get("/v1/audit/trust"))
    assert sorted(w.name for w in trust.witnesses) == sorted(f"{h}.witness" for h in HOSPITALS)
    assert trust.default_quorum == 2  # a majority of the 3 registered witnesses
    size = served.runtime.audit_log.size()
    _cosign_all(witnesses, size)
    served_cp = _checkpoint(served)
    assert served_cp["size"] == size and served_cp["quorum"] == 2
    assert served_cp["cosigned_by"] == sorted(f"{h}.witness" for h in HOSPITALS)

    # the log grows: each witness gets a consistency proof from the size it holds
    served.submit()
    grown = served.runtime.audit_log.size()
    assert grown > size
    _cosign_all(witnesses, grown)
    assert all(w.held() is not None and w.held().size == grown  # type: ignore[union-attr]
               for w, _ in witnesses.values())
    assert served.runtime.checkpointing is not None
    assert served.runtime.checkpointing.wait_cosigned(grown, 10)

    # text/plain: the signed note itself, verifiable as is
    auth = {"Authorization": f"Bearer {served.keys['auditor']}"}
    response = httpx.get(served.url + "/v1/audit/checkpoint", headers={"Accept": "text/plain", **auth})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    checkpoint = verify_checkpoint(response.content, trust.log_public_key, trust.log_key_name, trust.origin)
    assert checkpoint.size == grown
    assert len(check_cosignatures(response.content, trust.witnesses).signed) == 3

    # `audit fetch` against the real coordinator: paged entries, the cosigned checkpoint, trust
    fetched = fetch_api(served.url, tmp_path / "export", api_key=served.keys["auditor"], pinned=trust,
                        page=7)
    assert fetched.entries == grown
    report = verify_export(tmp_path / "export", trust_path=tmp_path / "export" / "trust.json")
    assert report.ok, report.problem
    assert report.cosignatures is not None and len(report.cosignatures.signed) == 3


def test_export_pages_entries(served: Served) -> None:
    size = served.runtime.audit_log.size()
    headers = {"Authorization": f"Bearer {served.keys['auditor']}"}
    whole = httpx.get(served.url + "/v1/audit/export", headers=headers).content.splitlines()
    assert len(whole) == size
    page = httpx.get(served.url + "/v1/audit/export", params={"start": 3, "limit": 4},
                     headers=headers).content.splitlines()
    assert page == whole[3:7]
    tail = httpx.get(served.url + "/v1/audit/export", params={"start": size - 1, "limit": 50},
                     headers=headers).content.splitlines()
    assert tail == whole[-1:]
    bad = httpx.get(served.url + "/v1/audit/export", params={"limit": 0}, headers=headers)
    assert bad.status_code == 422 and "limit" in bad.text


def test_witness_long_polls_do_not_hold_the_api_s_worker_threads(
        served: Served, hospitals: dict[str, Signer]) -> None:
    """More witnesses long-polling than the server has worker threads for its blocking handlers:
    an ordinary request is still answered while they all wait, and the next checkpoint wakes
    them all (it used to wait behind them: tens of witnessing hospitals stalled the API)."""
    checkpointing = served.runtime.checkpointing
    assert checkpointing is not None
    size = served.runtime.audit_log.size()
    deadline = time.monotonic() + 30
    while checkpointing.status()["signed_size"] != size:  # level with the log: a poll waits
        assert time.monotonic() < deadline, checkpointing.status()
        time.sleep(0.05)
    # asyncio's default executor, which Litestar runs blocking handlers on, has this many threads
    workers = min(32, (os.cpu_count() or 1) + 4)
    clients = [HospitalClient(served.url, hospitals[name], name)
               for name in itertools.islice(itertools.cycle(HOSPITALS), workers + 2)]
    try:
        with ThreadPoolExecutor(len(clients)) as pool:
            polls = [pool.submit(client.witness_checkpoint, size, 20.0) for client in clients]
            time.sleep(1.0)  # every poll has reached the coordinator and waits there
            assert not any(poll.done() for poll in polls)
            with served.api() as api:  # a route whose handler runs on a worker thread
                assert api.get("/v1/audit/entries", start=0, limit=1)
            assert not any(poll.done() for poll in polls), "the request waited for the long polls"
            served.runtime.lifecycle.registry.mint("org:acme", 1)  # a new entry, a new checkpoint
            offers = [AddCheckpointRequest.parse(poll.result(timeout=15)[0]) for poll in polls]
    finally:
        for client in clients:
            client.close()
    assert all(offer.old_size == size and offer.proof for offer in offers)
    assert all(parse_checkpoint(offer.checkpoint).size > size for offer in offers)


# -- bad cosignatures: refused with the reason, nothing added -----------------------------------

def _post(client: HospitalClient, size: int, lines: str) -> CoordinatorError:
    with pytest.raises(CoordinatorError) as caught:
        client.post_cosignature(size, lines)
    assert caught.value.status == 422
    return caught.value


def test_bad_cosignatures_are_refused_with_a_reason(
        served: Served, witnesses: dict[str, tuple[NodeWitness, HospitalClient]],
        hospitals: dict[str, Signer], tmp_path: Path) -> None:
    checkpointing = served.runtime.checkpointing
    assert checkpointing is not None
    # the checkpoint thread may have signed a checkpoint while the hospitals were still being
    # registered (its witness set then holds only the first); wait for one of the whole log
    deadline = time.monotonic() + 30
    while int(str(checkpointing.status()["signed_size"])) < served.runtime.audit_log.size():
        assert time.monotonic() < deadline, "no checkpoint of the whole log"
        time.sleep(0.05)
    body, _ = witnesses["w-one"][1].witness_checkpoint(0)
    note = AddCheckpointRequest.parse(body).checkpoint
    size = parse_checkpoint(note).size
    parsed_body = note.decode().split("\n\n")[0] + "\n"
    own = witness_signer("w-one", tmp_path / "w-one" / "keys" / "witness.key")
    client = witnesses["w-one"][1]

    assert "malformed" in str(_post(client, size, "not a signature line\n"))
    # a key the log does not list for this hospital (same name, another key)
    stranger = witness_signer("w-one", tmp_path / "stranger.key")
    assert "not a witness" in str(_post(client, size, stranger.cosign(parsed_body).line))
    # another hospital's witness line, posted by w-one
    other = witness_signer("w-two", tmp_path / "w-two" / "keys" / "witness.key")
    assert "not by this hospital's witness" in str(_post(client, size, other.cosign(parsed_body).line))
    # dated an hour ahead
    ahead = own.cosign(parsed_body, int(time.time()) + 3600).line
    assert "future" in str(_post(client, size, ahead))
    # over another checkpoint body
    forged = parsed_body.replace(f"\n{size}\n", f"\n{size + 1}\n")
    assert "does not verify" in str(_post(client, size, own.cosign(forged).line))
    # a checkpoint the coordinator never signed (or no longer keeps)
    assert "no recent checkpoint" in str(_post(client, size + 1000, own.cosign(parsed_body).line))
    # a hospital that registered no witness key
    with HospitalClient(served.url, hospitals["w-none"], "w-none") as nobody:
        assert "no witness key" in str(_post(nobody, size, own.cosign(parsed_body).line))
    assert checkpointing.status()["cosigned_by"] == []
    # and the genuine one is accepted
    accepted = client.post_cosignature(size, own.cosign(parsed_body).line)
    assert accepted["cosigned_by"] == ["w-one.witness"] and not accepted["quorum_met"]


def test_a_bad_witness_key_is_refused_at_registration(served: Served) -> None:
    with served.api("operator") as api, pytest.raises(CoordinatorError) as caught:
        api.post("/v1/hospitals", {"id": "w-bad", "organisation_id": "clinics", "name": "Bad",
                                   "signing_public_key": Signer.generate().public_key_b64,
                                   "flower_public_key": "ssh-ed25519 AAAA",
                                   "witness_vkey": "w-bad.witness+00000000+AQ=="})
    assert caught.value.status in (400, 422) and "witness_vkey" in str(caught.value)


# -- the witness refuses bad checkpoints; the alarm is in `node status` -------------------------

class _Tampering:
    """The real coordinator link, with the offered add-checkpoint request rewritten."""

    def __init__(self, client: HospitalClient, rewrite: Any) -> None:
        self.client = client
        self.rewrite = rewrite

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def witness_checkpoint(self, old_size: int, wait_s: float = 0.0) -> tuple[bytes, bool]:
        body, cosigned = self.client.witness_checkpoint(old_size, wait_s)
        return self.rewrite(body), cosigned


def test_witness_refuses_a_bad_proof_and_an_older_checkpoint(
        served: Served, witnesses: dict[str, tuple[NodeWitness, HospitalClient]], tmp_path: Path) -> None:
    witness, client = witnesses["w-one"]
    first_body, _ = client.witness_checkpoint(0)
    assert witness.step().outcome == "cosigned"
    held = witness.held()
    assert held is not None
    served.submit()
    grown = served.runtime.audit_log.size()

    def flip(body: bytes) -> bytes:
        request = AddCheckpointRequest.parse(body)
        proof = (bytes([request.proof[0][0] ^ 1]) + request.proof[0][1:], *request.proof[1:])
        return AddCheckpointRequest(request.old_size, proof, request.checkpoint).encode()

    settings = node_settings(tmp_path, "w-one", served.url)
    deadline = time.monotonic() + 10
    while parse_checkpoint(AddCheckpointRequest.parse(client.witness_checkpoint(held.size)[0]).checkpoint
                           ).size < grown:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    bad = NodeWitness(settings, _Tampering(client, flip)).step()
    assert bad.outcome == "refused" and "inconsistent" in bad.reason
    status = witness_status(settings)
    assert status["alarm"] and status["state"] == "alarm"
    assert "not proven to extend" in status["alarms"][0]["reason"]
    assert witness.held().size == held.size  # type: ignore[union-attr]  # nothing cosigned

    # an older checkpoint than the held one (replayed): refused, not cosigned
    assert witness.step(wait_s=5).outcome == "cosigned"
    older = NodeWitness(settings, _Tampering(client, lambda _body: first_body)).step()
    assert older.outcome == "refused" and "older" in older.reason
    assert witness.held().size == grown  # type: ignore[union-attr]

    # `node status` reports the alarm with its reason
    store = open_store(settings.db_url)
    try:
        report = collect_status(store, settings)
    finally:
        store.dispose()
    assert report["witness"]["alarm"] and report["witness"]["cosigned_size"] == grown


def _approve_a_study(served: Served, client: HospitalClient, signer: Signer) -> tuple[dict[str, Any], Entry]:
    """A new study, and hospital w-two's approval of it posted to the log (its entry)."""
    study = served.submit()
    entry = decision_entry(signer, "w-two", study["id"], decision="approve",
                           reasons=["policy: ok"], eligible_records=10)
    client.submit_entry(entry, path=f"/v1/hospital/studies/{study['id']}/decision")
    return study, entry


def test_each_hospital_proves_its_own_entries_included_and_alarms_on_a_missing_one(
        served: Served, witnesses: dict[str, tuple[NodeWitness, HospitalClient]],
        hospitals: dict[str, Signer], tmp_path: Path) -> None:
    witness, client = witnesses["w-two"]
    settings = node_settings(tmp_path, "w-two", served.url)
    study, entry = _approve_a_study(served, client, hospitals["w-two"])
    store = open_store(settings.db_url)
    try:
        long_ago = datetime.now(UTC) - timedelta(minutes=5)
        with store.transaction() as session:
            session.add(StudyRow(study_id=study["id"], document={}, status="approved"))
            session.flush()
            session.add(DecisionRow(study_id=study["id"], decision="approve", decided_by="policy",
                                    reasons=[], eligible_records=10, envelope=entry.to_json(),
                                    posted_at=long_ago))
        size = served.runtime.audit_log.size()
        _cosign_all({"w-two": (witness, client)}, size)
        held = witness.held()
        assert held is not None
        monitor = InclusionMonitor(settings, store, client, hospitals["w-two"].key_id)
        state = monitor.step(held)
        assert state.proven_size == held.size and len(state.entries) == 1 and state.missing == []
        assert inclusion_status(store)["alarm"] is False

        # a decision this node signed and saw acknowledged, that the log does not hold
        hidden = decision_entry(hospitals["w-two"], "w-two", study["id"], decision="refuse",
                                reasons=["x"], eligible_records=0)
        with store.transaction() as session:
            session.add(DecisionRow(study_id=study["id"], decision="refuse", decided_by="policy",
                                    reasons=[], eligible_records=0, envelope=hidden.to_json(),
                                    posted_at=long_ago))
        state = monitor.step(held)
        assert [m["kind"] for m in state.missing] == ["study.decision"]
        status = collect_status(store, settings)["inclusion"]
        assert status["alarm"] and status["proven_size"] == held.size
    finally:
        store.dispose()


class _DepthGuard:
    """A stand-in for the daemon's FORK_GUARD that records how deep it is held."""

    def __init__(self) -> None:
        self.depth = 0

    def __enter__(self) -> None:
        self.depth += 1

    def __exit__(self, *exc: object) -> None:
        self.depth -= 1


def test_the_inclusion_check_holds_the_fork_guard_for_database_use_only(
        served: Served, witnesses: dict[str, tuple[NodeWitness, HospitalClient]],
        hospitals: dict[str, Signer], tmp_path: Path) -> None:
    """A forked daemon step waits for the guard: it must wait for a database call, never for
    a page of the log or an inclusion proof from a slow coordinator."""
    witness, client = witnesses["w-two"]
    settings = node_settings(tmp_path, "w-two", served.url)
    _approve_a_study(served, client, hospitals["w-two"])
    _cosign_all({"w-two": (witness, client)}, served.runtime.audit_log.size())
    held = witness.held()
    assert held is not None
    guard = _DepthGuard()
    calls: list[tuple[str, int]] = []

    class Link:
        def log_entries(self, start: int, count: int) -> dict[str, Any]:
            calls.append(("log_entries", guard.depth))
            return client.log_entries(start, count)

        def inclusion_proof(self, index: int, size: int) -> dict[str, Any]:
            calls.append(("inclusion_proof", guard.depth))
            return client.inclusion_proof(index, size)

    store = open_store(settings.db_url)
    get_state, set_state = store.get_state, store.set_state

    def recording_get(key: str, default: Any = None) -> Any:
        calls.append(("get_state", guard.depth))
        return get_state(key, default)

    def recording_set(key: str, value: Any) -> None:
        calls.append(("set_state", guard.depth))
        set_state(key, value)

    store.get_state = recording_get  # type: ignore[method-assign]
    store.set_state = recording_set  # type: ignore[method-assign]
    try:
        monitor = InclusionMonitor(settings, store, Link(), hospitals["w-two"].key_id,  # type: ignore[arg-type]
                                   db_guard=guard)
        state = monitor.step(held)
        assert len(state.entries) == 1
    finally:
        store.dispose()
    kinds = {kind for kind, _ in calls}
    assert {"log_entries", "inclusion_proof", "get_state", "set_state"} <= kinds
    assert all(depth == 0 for kind, depth in calls if kind in ("log_entries", "inclusion_proof")), calls
    assert all(depth == 1 for kind, depth in calls if kind in ("get_state", "set_state")), calls



def test_the_daemon_reports_the_witness_and_its_alarm_on_health(
        served: Served, hospitals: dict[str, Signer], tmp_path: Path) -> None:
    from exchange.node.daemon import NodeDaemon

    settings = node_settings(tmp_path, "w-three", served.url)
    settings = settings.model_copy(update={"health_port": 0})
    store = open_store(settings.db_url)
    client = HospitalClient(served.url, hospitals["w-three"], "w-three")
    try:
        daemon = NodeDaemon(settings, store, link=None, signer=hospitals["w-three"], witness_link=client)
        assert daemon.witnessing is not None
        daemon.witnessing.once(wait_s=5)
        server = daemon.serve_health()
        try:
            url = f"http://127.0.0.1:{server.server_address[1]}/health"
            health = httpx.get(url).json()
            assert health["witness"]["state"] == "ok" and health["witness"]["cosigned_size"] >= 1
            assert health["inclusion"]["alarm"] is False
            assert health.get("status") != "alarm"

            # the coordinator offers a checkpoint whose proof does not verify: refused, alarm
            served.submit()
            time.sleep(0.5)

            def flip(body: bytes) -> bytes:
                request = AddCheckpointRequest.parse(body)
                if not request.proof:
                    return body
                proof = (bytes([request.proof[0][0] ^ 1]) + request.proof[0][1:], *request.proof[1:])
                return AddCheckpointRequest(request.old_size, proof, request.checkpoint).encode()

            daemon.witnessing.witness.link = _Tampering(client, flip)
            daemon.witnessing.once(wait_s=5)
            health = httpx.get(url).json()
            assert health["status"] == "alarm" and health["witness"]["alarm"] is True
            assert "not proven to extend" in health["witness"]["alarms"][0]["reason"]
            assert "refused" in collect_status(store, settings)["errors"][0]["message"]
        finally:
            server.shutdown()
            server.server_close()
    finally:
        client.close()
        store.dispose()


def test_the_monitor_writes_its_progress_rarely_and_what_it_finds_at_once(
        served: Served, witnesses: dict[str, tuple[NodeWitness, HospitalClient]],
        hospitals: dict[str, Signer], tmp_path: Path) -> None:
    """Every checkpoint moved the scan on and the state was written: a commit (an fsync on
    SQLite) per hospital and checkpoint, and the daemon's next step re-read its database for it
    (docs/benchmarks/scale.md, branch nodecpu). Now the progress alone is written at most every
    INCLUSION_PROGRESS_S; an entry found, or one missing, at once."""
    from sqlalchemy import event

    import exchange.node.witnessing as witnessing

    witness, client = witnesses["w-two"]
    settings = node_settings(tmp_path, "w-two", served.url)
    now = [time.time()]
    store = open_store(settings.db_url)
    commits: list[int] = []
    event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    try:
        monitor = InclusionMonitor(settings, store, client, hospitals["w-two"].key_id, clock=lambda: now[0])
        study, entry = _approve_a_study(served, client, hospitals["w-two"])
        with store.transaction() as session:
            session.add(StudyRow(study_id=study["id"], document={}, status="approved"))
            session.flush()
            session.add(DecisionRow(study_id=study["id"], decision="approve", decided_by="policy",
                                    reasons=[], eligible_records=10, envelope=entry.to_json(),
                                    posted_at=datetime.now(UTC)))
        _cosign_all({"w-two": (witness, client)}, served.runtime.audit_log.size())
        first = witness.held()
        assert first is not None
        commits.clear()
        state = monitor.step(first)
        assert len(state.entries) == 1 and commits == [1]  # found: written at once

        for _ in range(2):  # the log grows by entries that are not this node's
            served.submit()
            _cosign_all({"w-two": (witness, client)}, served.runtime.audit_log.size())
            held = witness.held()
            assert held is not None and held.size > first.size
            commits.clear()
            state = monitor.step(held)
            assert state.proven_size == held.size and state.scanned == held.size
            assert commits == []  # before: one commit per checkpoint
        assert inclusion_status(store)["proven_size"] == first.size  # the written progress lags

        assert held is not None
        now[0] += witnessing.INCLUSION_PROGRESS_S
        monitor.step(held)
        assert commits == [1] and inclusion_status(store)["proven_size"] == held.size

        # a restart resumes from what was written
        again = InclusionMonitor(settings, store, client, hospitals["w-two"].key_id, clock=lambda: now[0])
        assert again.state().scanned == held.size and len(again.state().entries) == 1

        # a decision this node signed, that the log does not hold, past the grace period: at once
        hidden = decision_entry(hospitals["w-two"], "w-two", study["id"], decision="refuse",
                                reasons=["x"], eligible_records=0)
        with store.transaction() as session:
            session.add(DecisionRow(study_id=study["id"], decision="refuse", decided_by="policy",
                                    reasons=[], eligible_records=0, envelope=hidden.to_json(),
                                    posted_at=datetime.now(UTC) - timedelta(minutes=5)))
        commits.clear()
        state = monitor.step(held)
        assert [m["kind"] for m in state.missing] == ["study.decision"] and commits == [1]
        assert inclusion_status(store)["alarm"] is True
    finally:
        store.dispose()
