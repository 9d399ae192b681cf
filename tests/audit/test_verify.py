"""The offline verifier: valid logs pass, every kind of tampering is caught at the right entry."""

from __future__ import annotations

import io
import json
import random
import re
from dataclasses import replace
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit import compact
from audit.checkpoint import Checkpoint, sign_checkpoint
from audit.entry import sign_entry
from audit.export import ExportError, Trust, write_export
from audit.generate import GeneratedLog, generate_log
from audit.merkle import MemoryTree, leaf_hash
from audit.note import Vkey
from audit.signing import Signer, b64decode
from audit.verify import Problem, VerifyReport, load_state, verify_export, verify_lines


@pytest.fixture(scope="module")
def log() -> GeneratedLog:
    return generate_log(300, seed=11)


@pytest.fixture(scope="module")
def small() -> GeneratedLog:
    return generate_log(40, seed=5)


def check(log: GeneratedLog, lines: list[bytes] | None = None, *, raw: bytes | None = None,
          checkpoint: str | None = None, state: Path | None = None, workers: int | None = 0,
          trust: Trust | None = None, batch_size: int = 512) -> VerifyReport:
    """Verify `lines` (or raw file bytes) against `checkpoint` (default: the original's)."""
    if raw is None:
        raw = b"".join(line + b"\n" for line in (log.lines() if lines is None else lines))
    note = log.checkpoint() if checkpoint is None else checkpoint
    pinned = trust or log.trust
    saved = load_state(state, pinned) if state is not None else None
    return verify_lines(io.BytesIO(raw), note, pinned, state=saved, state_path=state,
                        workers=workers, batch_size=batch_size)


def problem_index(report: VerifyReport) -> int | None:
    assert report.problem is not None, "expected the log to be rejected"
    return report.problem.index


def operator_notice(log: GeneratedLog, text: str) -> bytes:
    """A validly signed entry the root operator could append (ignored by the ledger)."""
    return sign_entry(log.operator, "operator.notice", {"text": text}).leaf_bytes()


# -- valid logs ---------------------------------------------------------------------------------


def test_a_generated_log_verifies_with_ledger(log: GeneratedLog) -> None:
    report = check(log, workers=2, batch_size=32)
    assert report.ok, report.problem
    assert report.entries == 300
    assert report.root == MemoryTree(leaf_hash(line) for line in log.lines()).root()
    assert report.ledger_checked and report.ledger is not None
    ledger = report.ledger
    assert ledger["minted"] == ledger["escrow"] + ledger["unclaimed"] + sum(ledger["balances"].values())
    assert sum(pool["remaining"] for pool in ledger.get("claim_pools", [])) == ledger["unclaimed"]
    expected = {"key.register", "token.mint", "study.escrow", "round.receipt", "study.payout"}
    assert expected <= set(report.kinds)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(size=st.integers(0, 150), seed=st.integers(0, 2**32), hospitals=st.integers(1, 4),
       researchers=st.integers(2, 4), workers=st.integers(0, 2))
def test_a_valid_log_is_never_rejected(size: int, seed: int, hospitals: int, researchers: int,
                                       workers: int) -> None:
    generated = generate_log(size, seed=seed, hospitals=hospitals, researchers=researchers)
    report = check(generated, workers=workers, batch_size=7)
    assert report.ok, report.problem
    assert report.entries == size


def test_fresh_keys_unless_seeded() -> None:
    assert generate_log(3).operator.key_id != generate_log(3).operator.key_id
    assert generate_log(30, seed=1).lines() == generate_log(30, seed=1).lines()


# -- entry-level tampering ------------------------------------------------------------------------


def _flip(raw: bytes, position: int, bit: int) -> bytes:
    data = bytearray(raw)
    data[position] ^= 1 << bit
    return bytes(data)


def test_a_flipped_bit_anywhere_names_its_entry(small: GeneratedLog) -> None:
    raw = b"".join(line + b"\n" for line in small.lines())
    note = small.checkpoint()
    starts = [0]
    for line in small.lines():
        starts.append(starts[-1] + len(line) + 1)
    rng = random.Random(3)
    positions = set(range(starts[0], starts[1]))              # every byte of entry 0
    positions |= set(range(starts[39], starts[40]))           # ... of the last entry
    positions |= set(rng.sample(range(len(raw)), 60))         # and anywhere else
    for position in sorted(positions):
        bit = rng.randrange(8)
        report = check(small, raw=_flip(raw, position, bit), checkpoint=note)
        expected = raw.count(b"\n", 0, position)
        assert problem_index(report) == expected, (position, bit, report.problem)


def test_non_canonical_base64_signature_is_caught(small: GeneratedLog) -> None:
    lines = small.lines()
    entry = small.entries[7]
    sig = entry.signature  # 64 bytes: 86 base64 chars + "==", the last char has 4 spare bits
    twin = sig[:85] + "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"[
        ("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".index(sig[85]) | 1)] + "=="
    assert twin != sig and b64decode(twin) == b64decode(sig)
    lines[7] = lines[7].replace(sig.encode(), twin.encode())
    report = check(small, lines)
    assert problem_index(report) == 7
    assert "canonical base64" in report.problem.reason  # type: ignore[union-attr]


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda line: line + b" ", "not in RFC 8785 canonical form"),
    (lambda line: line.replace(b'{"key_id"', b'{ "key_id"', 1), "not in RFC 8785 canonical form"),
    (lambda line: b"{" + line[1:].split(b",", 1)[1][:-1] + b',' + line[1:].split(b",", 1)[0] + b"}",
     "not in RFC 8785 canonical form"),
    (lambda line: line[:-5], "not valid JSON"),
    (lambda line: b"", "not valid JSON"),
    (lambda line: b"[1,2]", "envelope: not a JSON object"),
    (lambda line: line.replace(b'"v":1}', b'"v":2}'), "unsupported envelope version"),
    (lambda line: line.replace(b'"v":1}', b'"v":true}'), "unsupported envelope version"),
    (lambda line: line.replace(b'"time":"', b'"time":"x'), "time"),
    (lambda line: line.replace(b'"v":1}', b'"v":1,"w":2}'), r"unknown field\(s\) \['w'\]"),
])
def test_malformed_lines_name_their_entry(small: GeneratedLog, mutate: object, reason: str) -> None:
    lines = small.lines()
    lines[12] = mutate(lines[12])  # type: ignore[operator]
    report = check(small, lines)
    assert problem_index(report) == 12
    assert report.problem is not None and re.search(reason, report.problem.reason)


def test_missing_final_newline_is_a_bad_last_entry(small: GeneratedLog) -> None:
    raw = b"".join(line + b"\n" for line in small.lines())[:-1]
    report = check(small, raw=raw)
    assert problem_index(report) == 39
    assert "newline" in report.problem.reason  # type: ignore[union-attr]


def test_duplicated_entry_is_named(log: GeneratedLog) -> None:
    lines = log.lines()
    lines.insert(150, lines[90])
    report = check(log, lines)
    assert problem_index(report) == 150
    assert "same entry as entry 90" in report.problem.reason  # type: ignore[union-attr]


def test_signature_by_an_unregistered_key_is_named(log: GeneratedLog) -> None:
    stranger = Signer.generate()
    lines = log.lines()
    lines[200] = sign_entry(stranger, "study.decision", {"study_id": "s-000001"}).leaf_bytes()
    report = check(log, lines)
    assert problem_index(report) == 200
    assert f"{stranger.key_id} is not registered" in report.problem.reason  # type: ignore[union-attr]


def test_signature_by_a_revoked_key_is_named(log: GeneratedLog) -> None:
    researcher = log.signers["org:r01"]
    revoke = sign_entry(log.operator, "key.revoke", {"key_id": researcher.key_id, "reason": "stolen"})
    after = sign_entry(researcher, "token.transfer", {"from": "org:r01", "to": "org:r02", "amount": 1})
    lines = [*log.lines(), revoke.leaf_bytes(), after.leaf_bytes()]
    report = check(log, lines, checkpoint=log.checkpoint(lines=lines))
    assert problem_index(report) == 301
    assert "was revoked (stolen) at entry 300" in report.problem.reason  # type: ignore[union-attr]


def test_a_forged_signature_by_a_registered_key_is_named(log: GeneratedLog) -> None:
    entry = log.entries[123]
    forged = replace(entry, payload={**entry.payload, "forged": True})
    lines = log.lines()
    lines[123] = forged.leaf_bytes()
    for workers in (0, 1, 2):
        report = check(log, lines, workers=workers, batch_size=16)
        assert problem_index(report) == 123
        assert "signature: does not verify" in report.problem.reason  # type: ignore[union-attr]


def test_first_of_several_bad_signatures_is_reported_whatever_the_threads(log: GeneratedLog) -> None:
    lines = log.lines()
    for index in (250, 61, 140):
        entry = log.entries[index]
        lines[index] = replace(entry, payload={**entry.payload, "tampered": index}).leaf_bytes()
    for workers, batch in ((0, 512), (1, 1), (2, 5), (3, 3)):
        assert problem_index(check(log, lines, workers=workers, batch_size=batch)) == 61


def test_ledger_violation_is_named(log: GeneratedLog) -> None:
    org = "org:r01"
    signer = log.signers[org]
    lines = log.lines()
    # A validly signed transfer of more than the organisation holds, placed at entry 20.
    lines.insert(20, sign_entry(signer, "token.transfer",
                                {"from": org, "to": "org:r02", "amount": 2**52}).leaf_bytes())
    report = check(log, lines)
    assert problem_index(report) == 20
    assert report.problem.reason.startswith("ledger:")  # type: ignore[union-attr]


# -- whole-log tampering against the checkpoint --------------------------------------------------


def test_truncated_log_with_stale_checkpoint_names_the_first_missing_entry(log: GeneratedLog) -> None:
    report = check(log, log.lines()[:250])
    assert problem_index(report) == 250
    assert "missing" in report.problem.reason  # type: ignore[union-attr]


def test_checkpoint_resigned_by_another_key_is_rejected(log: GeneratedLog) -> None:
    lines = log.lines()[:250]
    tree = MemoryTree(leaf_hash(line) for line in lines)
    forged = sign_checkpoint(Checkpoint(log.origin, 250, tree.root()), Signer.generate())
    report = check(log, lines, checkpoint=forged)
    assert report.problem is not None and report.problem.index is None
    assert "no signature by the pinned key" in report.problem.reason


def test_entries_beyond_the_checkpoint_are_named(log: GeneratedLog) -> None:
    report = check(log, [*log.lines(), operator_notice(log, "late")])
    assert problem_index(report) == 300
    assert "not covered by the checkpoint" in report.problem.reason  # type: ignore[union-attr]


@pytest.mark.parametrize("tamper", ["delete", "reorder", "insert"])
def test_structural_tampering_is_rejected_and_with_state_named(
        log: GeneratedLog, tmp_path: Path, tamper: str) -> None:
    state = tmp_path / "state.json"
    assert check(log, state=state).ok  # the auditor saw the honest log before
    lines = log.lines()
    if tamper == "delete":
        del lines[100]
    elif tamper == "reorder":
        lines[100], lines[101] = lines[101], lines[100]
    else:
        lines.insert(100, operator_notice(log, "inserted"))
    # With the stale checkpoint: rejected even without state.
    assert not check(log, lines).ok
    # Re-signed by the (misbehaving) log key: the saved history names entry 100.
    resigned = log.checkpoint(lines=lines)
    before = state.read_bytes()
    for note in (log.checkpoint(), resigned):
        report = check(log, lines, checkpoint=note, state=state)
        assert problem_index(report) == 100, (tamper, report.problem)
    assert state.read_bytes() == before  # a rejected log never overwrites the state


def test_truncated_and_resigned_log_is_a_rollback_against_state(log: GeneratedLog, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    assert check(log, state=state).ok
    lines = log.lines()[:260]
    resigned = log.checkpoint(lines=lines)
    assert check(log, lines, checkpoint=resigned).ok  # on its own, a valid shorter log
    report = check(log, lines, checkpoint=resigned, state=state)
    assert problem_index(report) == 260
    assert "rolled back" in report.problem.reason  # type: ignore[union-attr]


def test_forked_history_against_saved_state_names_the_fork_point(log: GeneratedLog, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    honest = log.lines()[:200]
    assert check(log, honest, checkpoint=log.checkpoint(lines=honest), state=state).ok
    fork = log.lines()[:170] + [operator_notice(log, f"fork {i}") for i in range(60)]
    report = check(log, fork, checkpoint=log.checkpoint(lines=fork), state=state)
    assert problem_index(report) == 170
    assert "forked" in report.problem.reason  # type: ignore[union-attr]
    # Without the saved leaf hashes the fork is still caught by the consistency proof.
    saved = json.loads(state.read_text())
    del saved["leaf_hashes"]
    state.write_text(json.dumps(saved))
    report = check(log, fork, checkpoint=log.checkpoint(lines=fork), state=state)
    assert report.problem is not None and "not consistent with the saved checkpoint" in report.problem.reason


def test_state_grows_with_consistent_logs(log: GeneratedLog, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    first = log.lines()[:120]
    report = check(log, first, checkpoint=log.checkpoint(lines=first), state=state)
    assert report.ok and report.state_saved and report.consistent_with is None
    report = check(log, state=state)
    assert report.ok and report.consistent_with == 120
    saved = load_state(state, log.trust)
    assert saved is not None and saved.checkpoint.size == 300
    assert saved.leaf_hashes == b"".join(leaf_hash(line) for line in log.lines())
    assert not list(tmp_path.glob(".state.json.*"))  # no temporary file left behind


def test_state_signed_by_another_log_key_is_unusable(log: GeneratedLog, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    note = sign_checkpoint(Checkpoint(log.origin, 1, leaf_hash(log.lines()[0])), Signer.generate())
    state.write_text(json.dumps({"version": 1, "checkpoint": note}))
    with pytest.raises(ExportError, match="does not verify with the pinned log key"):
        load_state(state, log.trust)
    state.write_text("{not json")
    with pytest.raises(ExportError, match="malformed"):
        load_state(state, log.trust)
    state.write_text(json.dumps({"version": 1, "checkpoint": 7}))
    with pytest.raises(ExportError, match="must be strings"):
        load_state(state, log.trust)
    state.write_text(json.dumps({"version": 2, "checkpoint": note}))
    with pytest.raises(ExportError, match="version"):
        load_state(state, log.trust)
    assert load_state(tmp_path / "absent.json", log.trust) is None


# -- export folders -------------------------------------------------------------------------------


def test_export_folder_round_trip_and_unusable_inputs(small: GeneratedLog, tmp_path: Path) -> None:
    out = tmp_path / "export"
    assert small.write(out) == 40
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint", "entries.jsonl", "trust.json"]
    assert verify_export(out).ok
    written = json.loads((out / "trust.json").read_text())
    assert written["version"] == 2 and written["witnesses"] == []
    assert Vkey.parse(written["operator_key"]).public_key == small.operator.public_key
    assert Vkey.parse(written["log_key"]) == Vkey(small.origin, 1, small.log_signer.public_key)
    with pytest.raises(ExportError, match="already exists"):
        small.write(out)
    with pytest.raises(ExportError, match="not a folder"):
        verify_export(tmp_path / "nope")
    other = generate_log(5, seed=99)
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(other.trust.to_json()))
    report = verify_export(out, trust_path=pinned)  # the export's own trust is not pinned
    assert problem_index(report) == 0
    (out / "trust.json").write_text('{"version": 1}')
    with pytest.raises(ExportError, match="missing field"):
        verify_export(out)
    (out / "entries.jsonl").unlink()
    with pytest.raises(ExportError, match=r"entries\.jsonl: missing"):
        verify_export(out)


def test_write_export_refuses_lines_with_newlines(small: GeneratedLog, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match="newline"):
        write_export(tmp_path / "x", [b"a\nb"], small.checkpoint(), small.trust)
    assert not (tmp_path / "x").exists()


def test_generated_logs_exercise_every_kind_of_entry() -> None:
    generated = generate_log(1500, seed=3)
    kinds = {entry.kind for entry in generated.entries}
    assert {"key.register", "key.rotate", "key.revoke", "token.mint", "token.transfer",
            "study.escrow", "study.submitted", "study.decision", "round.receipt",
            "round.completed", "model.stored", "study.payout", "study.refund"} <= kinds
    assert generated.entries[0].key_id == generated.operator.key_id
    report = check(generated, workers=1, batch_size=128)
    assert report.ok, report.problem


# -- past the leaves kept in memory -------------------------------------------------------------


@pytest.fixture
def spilling(monkeypatch: pytest.MonkeyPatch) -> None:
    """The verifier's tree keeps only 16 leaves in memory (the rest go to its temporary file)
    and `first_repeat` sorts at most 64 prefixes at once (the rest are partitioned through
    temporary files): what a long log does, on a short one."""
    monkeypatch.setattr(compact, "LEAVES_IN_MEMORY", 16)
    monkeypatch.setattr(compact, "REPEATS_SORTED_IN_MEMORY", 64)


@pytest.mark.usefixtures("spilling")
def test_checks_past_the_leaves_kept_in_memory(log: GeneratedLog) -> None:
    assert check(log).ok
    lines = log.lines()
    lines.insert(250, lines[40])  # a replay from far back, both on disk
    report = check(log, lines)
    assert report.problem == Problem(250, "duplicate: byte-for-byte the same entry as entry 40 "
                                          "(a replayed entry)")
    lines = log.lines()
    entry = log.entries[270]
    lines[270] = replace(entry, payload={**entry.payload, "tampered": 1}).leaf_bytes()
    assert problem_index(check(log, lines)) == 270
    later = log.lines()  # a replay, then a bad signature: the replay comes first
    later.insert(200, later[20])
    stranger = sign_entry(Signer.generate(), "study.decision", {"study_id": "s-000001"})
    later[260] = stranger.leaf_bytes()
    report = check(log, later)
    assert report.problem is not None and report.problem.index == 200
    assert report.problem.reason.startswith("duplicate")


@pytest.mark.usefixtures("spilling")
def test_a_replay_refused_for_another_reason_too_is_named_a_replay(log: GeneratedLog) -> None:
    """A replayed key registration is also refused by the keyring: the replay is named, as
    when replays were looked up before the keyring."""
    register = next(i for i, entry in enumerate(log.entries) if entry.kind.startswith("key."))
    lines = log.lines()
    lines.insert(260, lines[register])
    report = check(log, lines)
    assert report.problem == Problem(260, f"duplicate: byte-for-byte the same entry as entry "
                                          f"{register} (a replayed entry)")


@pytest.mark.usefixtures("spilling")
def test_state_and_fork_past_the_leaves_kept_in_memory(log: GeneratedLog, tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    honest = log.lines()[:200]
    assert check(log, honest, checkpoint=log.checkpoint(lines=honest), state=state).ok
    saved = load_state(state, log.trust)
    assert saved is not None and saved.leaf_hashes == b"".join(leaf_hash(line) for line in honest)
    report = check(log, state=state)
    assert report.ok and report.consistent_with == 200
    fork = log.lines()[:170] + [operator_notice(log, f"fork {i}") for i in range(60)]
    report = check(log, fork, checkpoint=log.checkpoint(lines=fork), state=state)
    assert problem_index(report) == 170
    assert "forked" in report.problem.reason  # type: ignore[union-attr]
