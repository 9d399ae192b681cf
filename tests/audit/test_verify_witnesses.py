"""`audit verify` and the witness quorum: the cosigned checkpoint of an export, exit codes, names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.checkpoint import parse_note
from audit.cli import app
from audit.cosignature import CosignatureV1Signer
from audit.export import ExportError
from audit.generate import GeneratedLog, generate_log
from audit.note import Note, NoteSignature
from audit.signing import Signer, b64encode
from audit.verify import verify_export

runner = CliRunner()
W1, W2, W3 = (f"h0{i}.witness.exchange.example" for i in (1, 2, 3))


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def cosigned() -> GeneratedLog:
    return generate_log(120, seed=8, witnesses=3)


def write(log: GeneratedLog, folder: Path, note: str) -> Path:
    log.write(folder)
    (folder / "checkpoint").write_text(note)
    return folder


def test_an_export_cosigned_by_every_witness_verifies_and_reports_them(
        cosigned: GeneratedLog, tmp_path: Path) -> None:
    folder = tmp_path / "log"
    cosigned.write(folder)
    assert len(parse_note((folder / "checkpoint").read_text()).signatures) == 4
    code, stdout, _ = run("verify", str(folder))
    assert code == 0, stdout
    assert f"witnesses: 3 cosigned (quorum 2): {W1}, {W2}, {W3}" in stdout
    code, stdout, _ = run("verify", str(folder), "--json")
    report = json.loads(stdout)
    assert report["witnesses"]["quorum"] == 2 and sorted(report["witnesses"]["signed"]) == [W1, W2, W3]


def test_below_the_quorum_is_invalid_and_names_who_signed(cosigned: GeneratedLog,
                                                          tmp_path: Path) -> None:
    note = cosigned.checkpoint(cosigners=["hospital:h02"])
    folder = write(cosigned, tmp_path / "log", note)
    code, stdout, _ = run("verify", str(folder))
    assert code == 1
    assert (f"INVALID checkpoint: cosigned by 1 of the 3 pinned witnesses, below the quorum of 2: "
            f"signed by {W2}; not signed by {W1}, {W3}") in " ".join(stdout.split())
    assert run("verify", str(folder), "--witness-quorum", "1")[0] == 0
    assert run("verify", str(folder), "--witness-quorum", "0")[0] == 0
    code, _, stderr = run("verify", str(folder), "--witness-quorum", "4")
    assert code == 2 and "only 3 witness(es) are pinned" in stderr
    code, stdout, _ = run("verify", str(folder), "--json")
    report = json.loads(stdout)
    assert report["ok"] is False and report["witnesses"]["missing"] == [W1, W3]


def test_a_bad_cosignature_of_a_pinned_witness_rejects_the_checkpoint(
        cosigned: GeneratedLog, tmp_path: Path) -> None:
    note = parse_note(cosigned.checkpoint())
    forged = [NoteSignature(s.name, s.key_hash, s.signature[:8] + bytes(64)) if s.name == W3 else s
              for s in note.signatures]
    folder = write(cosigned, tmp_path / "log", Note(note.body, tuple(forged)).text())
    code, stdout, _ = run("verify", str(folder))
    assert code == 1 and f"checkpoint: cosignature by {W3}: does not verify" in stdout


def test_future_and_unknown_cosignatures_do_not_count(cosigned: GeneratedLog, tmp_path: Path) -> None:
    note = parse_note(cosigned.checkpoint(cosigners=["hospital:h01"]))
    future = cosigned.witnesses["hospital:h02"].cosign(note.body, 2**40)
    stranger = CosignatureV1Signer(W3, Signer.generate()).cosign(note.body, 1)
    folder = write(cosigned, tmp_path / "log",
                   Note(note.body, (*note.signatures, future, stranger)).text())
    report = verify_export(folder)
    assert report.cosignatures is not None and report.cosignatures.future == {W2: 2**40}
    assert report.problem is not None and (
        f"{W2}'s cosignature is dated in the future ({2**40}) and not counted" in report.problem.reason)
    assert list(report.cosignatures.signed) == [W1]


def test_old_trust_files_still_verify_and_a_quorum_asked_of_them_is_explained(
        tmp_path: Path) -> None:
    plain = generate_log(60, seed=2)
    folder = tmp_path / "log"
    plain.write(folder)
    trust = plain.trust
    (folder / "trust.json").write_text(json.dumps({
        "version": 1, "origin": trust.origin,
        "operator_public_key": b64encode(trust.operator_public_key),
        "log_public_key": b64encode(trust.log_public_key)}))
    code, stdout, _ = run("verify", str(folder))
    assert code == 0 and "witnesses: none pinned; the checkpoint is trusted on the log key alone" \
        in stdout
    code, _, stderr = run("verify", str(folder), "--witness-quorum", "2")
    assert code == 2 and "version-1 trust.json" in " ".join(stderr.split())
    with pytest.raises(ExportError, match="pins no witnesses"):
        verify_export(folder, witness_quorum=1)


def test_a_root_mismatch_is_reported_even_when_the_quorum_is_short(cosigned: GeneratedLog,
                                                                   tmp_path: Path) -> None:
    note = cosigned.checkpoint(size=100, cosigners=[])
    folder = write(cosigned, tmp_path / "log", note)
    report = verify_export(folder)
    assert report.problem is not None and report.problem.index == 100
    assert "not covered by the checkpoint" in report.problem.reason
