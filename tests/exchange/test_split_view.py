"""A split view is caught: the coordinator's database is forked, and the two histories are
served by two coordinators (same keys, same origin) to different witnesses and to an auditor.

The witnesses that saw history A refuse history B (and the other way round) and keep both
signed checkpoints as evidence; no quorum of cosignatures forms on both histories, so an
auditor who is shown the history without a quorum refuses it (`audit verify` exit 1)."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.cli import app as audit_cli
from audit.fetch import fetch_api
from audit.signing import Signer
from audit.trust import Trust
from audit.verify import verify_export
from exchange.coordinator.client import HospitalClient
from exchange.node.witnessing import NodeWitness, witness_status
from tests.exchange.witness_support import (
    HOSPITALS,
    Served,
    app_config,
    node_settings,
    populate,
    serve,
)


def _fork(source: Path, target: Path) -> None:
    """A consistent copy of a live SQLite database (the online backup API)."""
    with sqlite3.connect(source) as src, sqlite3.connect(target) as dst:
        src.backup(dst)


def b_of(a: Served, tmp_path: Path, hospitals: dict[str, Signer], keys: Path) -> Served:
    """Serve a fork of A's database (taken now) with the same keys: history B."""
    _fork(tmp_path / "a.db", tmp_path / "b.db")
    b = serve(app_config(f"sqlite:///{tmp_path / 'b.db'}", keys), hospitals)
    b.keys = dict(a.keys)
    _STARTED.append(b)
    return b


_STARTED: list[Served] = []


@pytest.fixture(autouse=True)
def _stop_forks() -> Iterator[None]:
    yield
    while _STARTED:
        _STARTED.pop().stop()


def test_a_forked_log_is_refused_reported_and_never_reaches_quorum_on_both_sides(
        tmp_path: Path) -> None:
    hospitals = {name: Signer.generate() for name in HOSPITALS}
    keys = tmp_path / "keys"
    a = serve(app_config(f"sqlite:///{tmp_path / 'a.db'}", keys), hospitals)
    _STARTED.append(a)
    a.keys = populate(a.runtime, hospitals, {n: tmp_path / n / "keys" / "witness.key" for n in hospitals})
    settings = {n: node_settings(tmp_path, n, a.url) for n in HOSPITALS}
    clients = {(n, "a"): HospitalClient(a.url, hospitals[n], n) for n in HOSPITALS}
    try:
        # the checkpoint thread may have signed a checkpoint while the hospitals were still being
        # registered (a witness registered after it is no witness of it); wait for one of the log
        checkpointing = a.runtime.checkpointing
        assert checkpointing is not None
        deadline = time.monotonic() + 30
        while int(str(checkpointing.status()["signed_size"])) < a.runtime.audit_log.size():
            assert time.monotonic() < deadline, "no checkpoint of the whole log"
            time.sleep(0.05)
        # every witness cosigns A's log before the fork
        for name in HOSPITALS:
            assert NodeWitness(settings[name], clients[name, "a"]).step(wait_s=5).outcome == "cosigned"
        forked_at = a.runtime.audit_log.size()

        b = b_of(a, tmp_path, hospitals, keys)
        for name in HOSPITALS:
            clients[name, "b"] = HospitalClient(b.url, hospitals[name], name)
        # the histories diverge: different studies after the fork
        a.submit()
        b.submit()
        assert a.runtime.audit_log.size() > forked_at and b.runtime.audit_log.size() > forked_at
        assert a.runtime.audit_log.root() != b.runtime.audit_log.root()

        # w-one and w-two are shown history A, w-three history B: each extends what they hold
        for name, side in (("w-one", "a"), ("w-two", "a"), ("w-three", "b")):
            step = NodeWitness(settings[name], clients[name, side]).step(wait_s=5)
            assert step.outcome == "cosigned" and step.size > forked_at, (name, step)

        # now the other history is shown to them: refused, with the evidence kept
        for name, side in (("w-two", "b"), ("w-three", "a")):
            step = NodeWitness(settings[name], clients[name, side]).step(wait_s=5)
            assert step.outcome == "refused", (name, step)
            status = witness_status(settings[name])
            assert status["alarm"] and status["state"] == "alarm"
            # same size, two roots: a proven fork; otherwise a failed consistency proof
            reason = status["alarms"][0]["reason"]
            assert reason.startswith("fork:") or "not proven to extend" in reason, reason
        assert not witness_status(settings["w-one"])["alarm"]

        # quorum (2 of 3) on A only; B has a single cosignature and never more
        assert a.runtime.checkpointing is not None and b.runtime.checkpointing is not None
        a_status, b_status = a.runtime.checkpointing.status(), b.runtime.checkpointing.status()
        assert a_status["cosigned_size"] == a.runtime.audit_log.size()
        assert b_status["cosigned_size"] is None and b_status["cosigned_by"] == ["w-three.witness"]

        # an auditor fetching from B: the checkpoint is below the quorum, `audit verify` exits 1
        with a.api() as api:
            trust = Trust.from_json(api.get("/v1/audit/trust"))
        fetch_api(b.url, tmp_path / "export-b", api_key=b.keys["auditor"], pinned=trust)
        trust_file = tmp_path / "trust.json"
        trust_file.write_text((tmp_path / "export-b" / "trust.json").read_text())
        report = verify_export(tmp_path / "export-b", trust_path=trust_file)
        assert not report.ok and report.problem is not None
        assert "below the quorum of 2" in report.problem.reason
        result = CliRunner().invoke(audit_cli, ["verify", str(tmp_path / "export-b"), "--trust",
                                                str(trust_file)])
        assert result.exit_code == 1, result.output
        assert "w-three.witness" in result.output

        # and from A: verified, with the quorum
        fetch_api(a.url, tmp_path / "export-a", api_key=a.keys["auditor"], pinned=trust)
        assert verify_export(tmp_path / "export-a", trust_path=trust_file).ok
    finally:
        for client in clients.values():
            client.close()


def test_the_evidence_is_printed_and_cleared_by_the_operator(tmp_path: Path) -> None:
    """`exchange node witness-evidence` prints both signed checkpoints; `--clear` forgets them."""
    import json

    from audit.checkpoint import Checkpoint, sign_checkpoint
    from audit.merkle import leaf_hash
    from exchange.cli import app as exchange_cli

    log_key = Signer.generate()
    settings = node_settings(tmp_path, "w-one", "http://127.0.0.1:9")
    (settings.data_dir / "node.toml").write_text(
        'hospital_id = "w-one"\ndata_dir = "."\ncoordinator_url = "http://127.0.0.1:9"\n')
    origin = "split.example/log"
    (settings.data_dir / "witness-log.json").write_text(json.dumps(
        {"origin": origin, "log_key": str(Trust(origin, log_key.public_key, log_key.public_key).log_vkey)}))

    class Link:
        def __init__(self, note: str) -> None:
            self.note = note

        def witness_checkpoint(self, old_size: int, wait_s: float = 0.0) -> tuple[bytes, bool]:
            from audit.witness import AddCheckpointRequest
            return AddCheckpointRequest(old_size, (), self.note.encode()).encode(), False

        def post_cosignature(self, size: int, lines: str) -> dict[str, object]:
            return {}

    one = sign_checkpoint(Checkpoint(origin, 1, leaf_hash(b"a")), log_key)
    other = sign_checkpoint(Checkpoint(origin, 1, leaf_hash(b"b")), log_key)
    assert NodeWitness(settings, Link(one)).step().outcome == "cosigned"  # type: ignore[arg-type]
    assert NodeWitness(settings, Link(other)).step().outcome == "refused"  # type: ignore[arg-type]
    runner = CliRunner()
    config = str(settings.data_dir / "node.toml")
    shown = runner.invoke(exchange_cli, ["node", "witness-evidence", "--config", config])
    assert shown.exit_code == 0, shown.output
    (alarm,) = json.loads(shown.stdout)
    assert alarm["proven"] is True and other.split("\n\n")[0] in alarm["offered"]
    cleared = runner.invoke(exchange_cli, ["node", "witness-evidence", "--config", config, "--clear"])
    assert cleared.exit_code == 0 and len(json.loads(cleared.stdout)) == 1
    assert not witness_status(settings)["alarm"]
