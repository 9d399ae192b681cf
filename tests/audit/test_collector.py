"""The log's side: the checkpoint schedule and gathering witnesses' cosignatures into the note."""

from __future__ import annotations

import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.collector import (
    CheckpointCosigning,
    CheckpointSchedule,
    add_checkpoint_request,
    request_cosignature,
)
from audit.cosignature import CosignatureError, CosignatureV1Signer, check_cosignatures
from audit.export import write_export
from audit.generate import generate_log
from audit.merkle import leaf_hash
from audit.note import NoteError, parse_note
from audit.witness import AddCheckpointRequest, Witness, WitnessRefusalError, WitnessResponse

from .witness_support import Clock, TinyLog, make_witness


def test_schedule_by_entries_and_by_time() -> None:
    schedule = CheckpointSchedule(every_entries=100, every_seconds=5.0)
    assert schedule.due(1, 0.0)  # never checkpointed
    schedule.mark(1, 0.0)
    assert not schedule.due(1, 100.0)  # the log has not grown
    assert not schedule.due(50, 1.0)
    assert schedule.due(101, 1.0)  # 100 new entries
    assert schedule.due(2, 5.0)  # 5 seconds with new entries
    entries_only = CheckpointSchedule(every_entries=10, every_seconds=0)
    entries_only.mark(0, 0.0)
    assert not entries_only.due(9, 1e9) and entries_only.due(10, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        CheckpointSchedule(every_entries=0, every_seconds=0)


def test_gathers_witness_responses_into_one_cosigned_note() -> None:
    log = TinyLog().grow(7)
    clock = Clock()
    witnesses = [make_witness(log, f"h{i}.witness.example", clock=clock) for i in range(3)]
    trust = log.trust([w.vkey for w in witnesses])
    assert trust.witness_quorum() == 2
    note = log.checkpoint()
    cosigning = CheckpointCosigning(note, trust, clock=clock)
    assert not cosigning.quorum_met and cosigning.missing == [w.name for w in witnesses]
    for witness in witnesses[:2]:
        response = witness.handle_add_checkpoint(add_checkpoint_request(0, [], note))
        assert cosigning.add_response(response.body) == [witness.name]
    assert cosigning.quorum_met and cosigning.missing == [witnesses[2].name]
    text = cosigning.note()
    assert text.startswith(note.rstrip("\n"))  # the log's own line stays first
    report = check_cosignatures(text, trust.witnesses, now=clock.now)
    assert set(report.signed) == {witnesses[0].name, witnesses[1].name}
    # A second answer of the same witness replaces its line rather than adding one.
    clock.now += 3
    again = witnesses[0].handle_add_checkpoint(add_checkpoint_request(7, [], note))
    cosigning.add_response(again.body)
    assert len(parse_note(cosigning.note()).signatures) == 3
    assert cosigning.signed[witnesses[0].name] == int(clock.now)


def test_bad_responses_are_refused_and_add_nothing() -> None:
    log = TinyLog().grow(3)
    clock = Clock()
    member = make_witness(log, "member", clock=clock)
    outsider = make_witness(log, "outsider", clock=clock)
    trust = log.trust([member.vkey])
    note = log.checkpoint()
    cosigning = CheckpointCosigning(note, trust, clock=clock)
    body = parse_note(note).body
    other_body = parse_note(log.grow(1).checkpoint()).body
    future = CosignatureV1Signer("member", member.signer.signer).cosign(body, int(clock.now) + 3600)
    cases: list[tuple[str | bytes, str]] = [
        (b"\xff", "malformed"),
        ("not a signature line\n", "malformed"),
        (outsider.add_checkpoint(0, [], note).lines, "not a witness of this log's trust policy"),
        (member.signer.cosign(other_body, int(clock.now)).line, "member: does not verify"),
        (future.line, "in the future"),
        # One good line and one bad: the whole response is refused.
        (member.signer.cosign(body, int(clock.now)).line + future.line, "in the future"),
    ]
    for response, reason in cases:
        with pytest.raises(CosignatureError, match=reason):
            cosigning.add_response(response)
        assert cosigning.signed == {} and cosigning.note() == note


def test_a_witness_registered_after_the_offer_is_adopted_and_earlier_cosignatures_kept() -> None:
    log = TinyLog().grow(5)
    clock = Clock()
    first, late = (make_witness(log, name, clock=clock) for name in ("first", "late"))
    note = log.checkpoint()
    cosigning = CheckpointCosigning(note, log.trust([first.vkey]), clock=clock)
    cosigning.add_response(first.add_checkpoint(0, [], note).lines)
    late_response = late.add_checkpoint(0, [], note).lines
    assert not cosigning.knows("late")
    with pytest.raises(CosignatureError, match="not a witness"):
        cosigning.add_response(late_response)
    # The same log's newer policy (the late hospital registered) is adopted; the first
    # witness's cosignature stays, and the late one is now checked and accepted.
    assert cosigning.adopt(log.trust([first.vkey, late.vkey]))
    assert cosigning.knows("late") and cosigning.signed.keys() == {"first"}
    assert cosigning.add_response(late_response) == ["late"]
    assert cosigning.quorum_met and cosigning.missing == []
    assert set(check_cosignatures(cosigning.note(), cosigning.trust.witnesses,
                                  now=clock.now).signed) == {"first", "late"}
    # Nothing new to adopt: no change.
    assert not cosigning.adopt(log.trust([first.vkey, late.vkey]))


def test_another_logs_policy_is_never_adopted() -> None:
    log = TinyLog().grow(3)
    other = TinyLog().grow(3)
    clock = Clock()
    stranger = make_witness(other, "stranger", clock=clock)
    cosigning = CheckpointCosigning(log.checkpoint(), log.trust(), clock=clock)
    assert not cosigning.adopt(other.trust([stranger.vkey]))  # another log key
    moved = TinyLog(log.log, log.operator, "elsewhere.example/log")
    assert not cosigning.adopt(moved.trust([stranger.vkey]))  # the same key, another origin
    assert not cosigning.knows("stranger") and cosigning.trust.witnesses == ()


def test_the_log_key_and_origin_are_checked_first() -> None:
    log = TinyLog().grow(2)
    with pytest.raises(NoteError, match="no signature by the pinned key"):
        CheckpointCosigning(log.checkpoint(), TinyLog().trust())


def test_no_quorum_forms_on_both_sides_of_a_split_view() -> None:
    """The log shows history A to two witnesses and history B to the third."""
    view_a = TinyLog().grow(10)
    clock = Clock()
    witnesses = [make_witness(view_a, f"h{i}", clock=clock) for i in range(3)]
    trust = view_a.trust([w.vkey for w in witnesses])
    for witness in witnesses:  # everyone cosigned size 10 of the one history so far
        witness.add_checkpoint(0, [], view_a.checkpoint())
    view_a.grow(5)  # A: 15 entries
    view_b = view_a.fork(12, "b").grow(3)  # B: the same first 12, then 6 others (18)
    a_note, b_note = view_a.checkpoint(), view_b.checkpoint()
    side_a = CheckpointCosigning(a_note, trust, clock=clock)
    side_b = CheckpointCosigning(b_note, trust, clock=clock)
    for witness in witnesses[:2]:
        side_a.add_response(witness.add_checkpoint(10, view_a.proof(10), a_note).lines)
    # The witnesses that saw A refuse B: it is not proven to extend what they cosigned; B's
    # checkpoint at A's size is a plain fork.
    for witness in witnesses[:2]:
        with pytest.raises(WitnessRefusalError, match="inconsistent"):
            witness.add_checkpoint(15, view_b.proof(15), b_note)
        with pytest.raises(WitnessRefusalError, match="fork: the log signed two checkpoints"):
            witness.add_checkpoint(15, [], view_b.checkpoint(15))
        assert witness.status()["alarm"] is True
    side_b.add_response(witnesses[2].add_checkpoint(10, view_b.proof(10), b_note).lines)
    assert side_a.quorum_met and not side_b.quorum_met
    assert side_b.missing == ["h0", "h1"]
    # The third witness, having cosigned B, refuses A's next checkpoint in turn.
    view_a.grow(5)
    with pytest.raises(WitnessRefusalError, match="inconsistent"):
        witnesses[2].add_checkpoint(18, view_a.proof(18), view_a.checkpoint())


def test_collector_and_witness_agree_on_the_wire_format() -> None:
    log = TinyLog().grow(5)
    body = add_checkpoint_request(3, log.proof(3), log.checkpoint())
    assert body.startswith(b"old 3\n") and body.endswith(b"\n\n" + log.checkpoint().encode())
    parsed = AddCheckpointRequest.parse(body)
    assert (parsed.old_size, list(parsed.proof)) == (3, log.proof(3))


def test_witnesses_over_http_cosign_and_the_export_verifies_with_the_quorum(tmp_path: Path) -> None:
    """tlog-witness over real HTTP: three witness servers, the log pushes, the auditor checks."""
    log = generate_log(90, seed=21)
    clock = Clock(time.time())
    tiny = TinyLog(log=log.log_signer, operator=log.operator)
    tiny.tree.extend(leaf_hash(line) for line in log.lines())
    witnesses = [make_witness(tiny, f"h{i}.witness.example", clock=clock) for i in range(3)]
    trust = tiny.trust([w.vkey for w in witnesses])
    servers = [_serve(w) for w in witnesses]
    try:
        with httpx.Client() as http:
            held = {}
            for size in (40, 90):  # a first checkpoint, then a later one with a proof
                note = tiny.checkpoint(size)
                cosigning = CheckpointCosigning(note, trust, clock=clock)

                def proof_for(old: int, size: int = size) -> list[bytes]:
                    return tiny.proof(old, size)

                for witness, (url, _server) in zip(witnesses[:2], servers, strict=False):
                    # The log thinks every witness is new (old size 0): 409 tells it otherwise.
                    held[witness.name], body = request_cosignature(http, url, note, 0, proof_for)
                    cosigning.add_response(body)
                assert cosigning.quorum_met and cosigning.missing == ["h2.witness.example"]
            stranger = TinyLog().grow(1)  # the same origin, another log key
            with pytest.raises(CosignatureError, match="HTTP 403: checkpoint signature"):
                request_cosignature(http, servers[2][0], stranger.checkpoint(), 0, stranger.proof)
    finally:
        for _url, server in servers:
            server.shutdown()
            server.server_close()
    assert held == {"h0.witness.example": 90, "h1.witness.example": 90}
    folder = tmp_path / "export"
    write_export(folder, log.lines(), cosigning.note(), trust)
    result = CliRunner().invoke(app, ["verify", str(folder)])
    assert result.exit_code == 0 and "witnesses: 2 cosigned (quorum 2)" in result.stdout
    result = CliRunner().invoke(app, ["verify", str(folder), "--witness-quorum", "3"])
    assert result.exit_code == 1 and "not signed by h2.witness.example" in result.stdout


def _serve(witness: Witness) -> tuple[str, ThreadingHTTPServer]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            answer = witness.handle_add_checkpoint(body) if self.path == "/add-checkpoint" \
                else WitnessResponse(404, "text/plain", b"no such path\n")
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.end_headers()
            self.wfile.write(answer.body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server
