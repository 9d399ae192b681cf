"""The witness state machine (C2SP tlog-witness): cosigning, every refusal, alarms, persistence."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

from audit.checkpoint import Checkpoint, parse_note, sign_checkpoint
from audit.cosignature import CosignatureV1Signer, CosignatureV1Verifier
from audit.merkle import EMPTY_ROOT
from audit.note import Vkey
from audit.signing import Signer, b64encode
from audit.witness import (
    AddCheckpointRequest,
    FileWitnessStore,
    MemoryWitnessStore,
    Witness,
    WitnessedLog,
    WitnessRefusalError,
    WitnessStateError,
    origin_hash,
)

from .witness_support import Clock, TinyLog, make_witness

# filippo.io/torchwood cmd/litewitness/testdata/litewitness.txt: a Sigsum log's add-checkpoint
# requests, in order, with the status litewitness answers (and the spec requires).
SIGSUM_KEY = bytes.fromhex("ffdc2d4d98e4124d3feaf788c0c2f9abfd796083d1f0495437f302ec79cf100f")
SIGSUM_ORIGIN = "sigsum.org/v1/tree/4d6d8825a6bb689d459628312889dfbb0bcd41b5211d9e1ce768b0ff0309e562"
_S1 = ("UgIom7fPZTqpxWWhyjWduBvTvGVqsokMbqTArsQilegKoFBJQjUFAmQ0+YeSPM3wfUQMFSzVnnNuWRTYrajXpNUbIQY=")
_S3 = ("UgIom2VbtIcdFbwFAy1n7s6IkAxIY6J/GQOTuZF2ORV39d75cbAj2aQYwyJre36kezNobZs4SUUdrcawfAB8WVrx6go=")
_S5 = ("UgIomw/EOJmWi0i1FQsOj+etB7F8IccFam/jgd6wzRns4QPVmyEZtdvl1U2KEmLOZ/ASRcWJi0tW90dJWAShei7sDww=")
_C1 = f"{SIGSUM_ORIGIN}\n1\nKgAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n— {SIGSUM_ORIGIN} {_S1}\n"
_C3 = f"{SIGSUM_ORIGIN}\n3\nRcCI1Nk56ZcSmIEfIn0SleqtV7uvrlXNccFx595Iwl0=\n\n— {SIGSUM_ORIGIN} {_S3}\n"
_C5 = f"{SIGSUM_ORIGIN}\n5\nQrtXrQZCCvpIgsSmOsah7HdICzMLLyDfxToMql9WTjY=\n\n— {SIGSUM_ORIGIN} {_S5}\n"
_P13 = "KgEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\nKgIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
LITEWITNESS = [
    (f"old 0\n\n{_C1}", 200),
    (f"old 1\n{_P13}\n{_C3[:-3]}x=\n", 403),  # a log signature that does not verify
    (f"old 1\n{_P13}\n{_C3.replace('e562', 'e563')}", 404),  # an origin it does not follow
    (f"old 1\n\n{_C3}", 422),  # no proof
    (f"old 1\n{_P13[:-4]}BA=\n\n{_C3}", 422),  # a wrong proof hash
    (f"old 1\n{_P13}\n{_C3}", 200),
    ("old 1\nKgEAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n+fUDV+k970B4I3uKrqJM4aP1lloPZP8mvr2Z4wR"
     f"w2LI=\nKgQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n{_C5}", 409),  # it holds size 3
    ("old 3\nKgIAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\nKgMAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
     "wgiIFdZfYNv6WU1OllBKsWnLYIS/DBMqt8Uh/S4OukE=\nKgQAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n"
     f"\n{_C5}", 200),
    (f"old 0\n\n{_C5}", 409),
]


def test_replays_the_litewitness_conversation_with_a_real_log() -> None:
    clock = Clock()
    witness = Witness(CosignatureV1Signer("example.com/witness", Signer.generate()),
                      [WitnessedLog(SIGSUM_ORIGIN, Vkey(SIGSUM_ORIGIN, 0x01, SIGSUM_KEY))],
                      MemoryWitnessStore(), clock=clock)
    statuses = []
    for body, _expected in LITEWITNESS:
        response = witness.handle_add_checkpoint(body.encode())
        statuses.append(response.status)
        clock.now += 1
        if response.status == 200:
            assert response.body.decode().startswith("— example.com/witness ")
        if response.status == 409:
            assert response.content_type == "text/x.tlog.size"
    assert statuses == [expected for _body, expected in LITEWITNESS]
    assert witness.handle_add_checkpoint(LITEWITNESS[6][0].encode()).body == b"5\n"
    assert witness.held(SIGSUM_ORIGIN).size == 5  # type: ignore[union-attr]
    # The bad proofs for the log-signed size-3 checkpoint are on record once (same held and
    # offered checkpoints), as a suspicion: unproven.
    assert [a.proven for a in witness.alarms()] == [False]


def test_cosigns_a_growing_log_and_its_cosignature_verifies() -> None:
    log = TinyLog().grow(5)
    clock = Clock()
    witness = make_witness(log, "h01.witness.example", clock=clock)
    first = witness.add_checkpoint(0, [], log.checkpoint())
    assert first.timestamp == int(clock.now) and first.lines.startswith("— h01.witness.example ")
    body = parse_note(log.checkpoint()).body.encode()
    verifier = CosignatureV1Verifier(witness.vkey)
    assert verifier.timestamp(body, first.signature.signature) == int(clock.now)
    log.grow(6)
    clock.now += 5
    second = witness.add_checkpoint(5, log.proof(5), log.checkpoint())
    assert second.checkpoint.size == 11 and witness.held(log.origin).size == 11  # type: ignore[union-attr]
    # The same checkpoint again is cosigned again (a fresher timestamp), with an empty proof.
    clock.now += 5
    assert witness.add_checkpoint(11, [], log.checkpoint()).timestamp == int(clock.now)
    held = witness.held(log.origin)
    assert held is not None and held.note.count("\n— ") == 2  # the log's line and the witness's
    status = witness.status()
    assert status["alarm"] is False and status["logs"][log.origin]["size"] == 11


def refused(witness: Witness, old: int, proof: list[bytes], note: str | bytes) -> WitnessRefusalError:
    before = witness.held(TinyLog().origin)
    with pytest.raises(WitnessRefusalError) as caught:
        witness.add_checkpoint(old, proof, note)
    assert witness.held(TinyLog().origin) == before  # nothing cosigned, nothing moved
    return caught.value


def test_every_refusal_has_its_status_and_reason_and_cosigns_nothing() -> None:
    log = TinyLog().grow(8)
    clock = Clock()
    witness = make_witness(log, "w", clock=clock)
    witness.add_checkpoint(0, [], log.checkpoint(4))
    stranger = Signer.generate()
    cases = [
        (4, log.proof(4, 8), "no blank line\n", 400, "checkpoint: note: no blank line"),
        (4, log.proof(4, 8), sign_checkpoint(Checkpoint("other.example/log", 8, log.tree.root()),
                                             log.log), 404, "not a log this witness follows"),
        (4, log.proof(4, 8), sign_checkpoint(Checkpoint(log.origin, 8, log.tree.root()), stranger),
         403, "no signature by a known key"),
        (4, log.proof(4, 8), log.checkpoint().replace("\n8\n", "\n9\n"), 403, "does not verify"),
        (9, [], log.checkpoint(), 400, "old size 9 is larger than the checkpoint's size 8"),
        (0, [], log.checkpoint(), 409, "not the size of the checkpoint this witness holds (4)"),
        (2, log.proof(2, 3), log.checkpoint(3), 409, "older than the one this witness holds"),
        (4, [bytes(32)], log.checkpoint(4), 422, "must be empty when the sizes are equal"),
        (4, [bytes(32)] * 64, log.checkpoint(), 400, "at most 63"),
    ]
    for old, proof, note, status, reason in cases:
        refusal = refused(witness, old, proof, note)
        assert (refusal.status, reason in refusal.reason) == (status, True), refusal.reason
    assert witness.alarms() == []
    clock.now -= 10
    refusal = refused(witness, 4, log.proof(4, 8), log.checkpoint())
    assert refusal.status == 503 and "clock" in refusal.reason


def test_an_empty_log_needs_the_empty_root_and_no_proof() -> None:
    log = TinyLog()
    witness = make_witness(log, "w")
    bad = sign_checkpoint(Checkpoint(log.origin, 0, bytes(32)), log.log)
    assert refused(witness, 0, [], bad).status == 422
    assert witness.add_checkpoint(0, [], log.checkpoint()).checkpoint.root == EMPTY_ROOT
    log.grow(3)
    refusal = refused(witness, 0, [bytes(32)], log.checkpoint())
    assert refusal.status == 422 and "must be empty when the old size is 0" in refusal.reason


def test_a_fork_is_refused_and_both_checkpoints_kept_as_evidence(tmp_path: Path) -> None:
    honest = TinyLog().grow(10)
    store = FileWitnessStore(tmp_path / "witness.json")
    witness = make_witness(honest, "w", store=store)
    witness.add_checkpoint(0, [], honest.checkpoint())
    forked = honest.fork(6).grow(4)  # same first 6 entries, then another history, 14 in all
    refusal = refused(witness, 10, forked.proof(10), forked.checkpoint())
    assert refusal.status == 422 and refusal.reason.startswith("inconsistent:")
    assert refusal.alarm is not None and not refusal.alarm.proven
    same_size = honest.fork(6)
    refusal = refused(witness, 10, [], same_size.checkpoint())
    assert refusal.reason.startswith("fork: the log signed two checkpoints of size 10")
    assert refusal.alarm is not None and refusal.alarm.proven
    # Persisted with the evidence, visible in status, and kept across a restart.
    reloaded = make_witness(honest, "w", store=FileWitnessStore(tmp_path / "witness.json"))
    alarms = reloaded.alarms()
    assert [a.proven for a in alarms] == [False, True]
    assert alarms[1].held.startswith(honest.checkpoint().split("\n\n")[0])
    assert alarms[1].offered == same_size.checkpoint()
    assert reloaded.status()["alarm"] is True
    # The honest log can still be followed: consistent checkpoints are cosigned.
    honest.grow(2)
    assert reloaded.add_checkpoint(10, honest.proof(10), honest.checkpoint()).checkpoint.size == 12
    assert len(reloaded.clear_alarms()) == 2 and reloaded.alarms() == []


def test_state_file_survives_restarts_and_a_damaged_one_stops_the_witness(tmp_path: Path) -> None:
    log = TinyLog().grow(3)
    path = tmp_path / "state" / "witness.json"
    witness = make_witness(log, "w", store=FileWitnessStore(path))
    witness.add_checkpoint(0, [], log.checkpoint())
    saved = json.loads(path.read_text())
    assert saved["version"] == 1 and saved["logs"][log.origin]["checkpoint"].startswith(log.origin)
    again = make_witness(log, "w", store=FileWitnessStore(path))
    assert refused(again, 0, [], log.checkpoint()).status == 409  # not rolled back to nothing
    path.write_text("{not json")
    with pytest.raises(WitnessStateError, match="not valid JSON"):
        again.add_checkpoint(3, [], log.checkpoint())
    path.write_text(json.dumps({"version": 1, "logs": {log.origin: {"checkpoint": "x"}}}))
    with pytest.raises(WitnessStateError, match="witness state"):
        again.held(log.origin)


def test_two_writers_on_one_state_file_cannot_roll_each_other_back(tmp_path: Path) -> None:
    log = TinyLog().grow(20)
    path = tmp_path / "witness.json"
    signer = Signer.generate()
    first = make_witness(log, "w", store=FileWitnessStore(path), signer=signer)
    first.add_checkpoint(0, [], log.checkpoint(5))
    barrier = threading.Barrier(2)
    outcomes: dict[int, int] = {}

    def submit(size: int) -> None:
        witness = make_witness(log, "w", store=FileWitnessStore(path), signer=signer)
        barrier.wait()
        try:
            witness.add_checkpoint(5, log.proof(5, size), log.checkpoint(size))
            outcomes[size] = 200
        except WitnessRefusalError as refusal:
            outcomes[size] = refusal.status

    threads = [threading.Thread(target=submit, args=(size,)) for size in (12, 20)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes.values()) == [200, 409]
    winner = next(size for size, status in outcomes.items() if status == 200)
    assert first.held(log.origin).size == winner  # type: ignore[union-attr]


@pytest.mark.parametrize(("body", "reason"), [
    (b"old 1\n", "no blank line"),
    (b"old 01\n\nx", "expected 'old <size>'"),
    (b"new 1\n\nx", "expected 'old <size>'"),
    (b"old 1\n!!\n\nx", "not valid base64"),
    (b"old 1\nAAAA\n\nx", "3 bytes, expected 32"),
    (b"old 1\n" + b"".join(b64encode(bytes(32)).encode() + b"\n" for _ in range(64)) + b"\nx",
     "64 proof lines"),
    (b"old \xff\n\nx", "ASCII"),
])
def test_malformed_requests_are_400(body: bytes, reason: str) -> None:
    witness = make_witness(TinyLog(), "w")
    response = witness.handle_add_checkpoint(body)
    assert response.status == 400 and reason in response.body.decode()


def test_request_encoding_round_trips_and_the_monitoring_view_serves_the_note() -> None:
    log = TinyLog().grow(4)
    request = AddCheckpointRequest(2, tuple(log.proof(2, 4)), log.checkpoint().encode())
    assert AddCheckpointRequest.parse(request.encode()) == request
    witness = make_witness(log, "w")
    assert witness.monitoring_checkpoint(origin_hash(log.origin)).status == 404
    witness.add_checkpoint(0, [], log.checkpoint())
    served = witness.monitoring_checkpoint(origin_hash(log.origin))
    assert served.status == 200 and served.body.decode().endswith(
        witness.held(log.origin).note.split("\n")[-2] + "\n")  # type: ignore[union-attr]
