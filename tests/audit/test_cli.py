"""The `audit` command: every sub-command and every exit code (0 valid, 1 invalid, 2 unusable)."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from audit.cli import app
from audit.entry import sign_entry
from audit.export import read_trust, write_export
from audit.generate import generate_log
from audit.ledger import Ledger
from audit.merkle import leaf_hash, verify_consistency, verify_inclusion
from audit.signing import key_id
from tests.audit.store_support import LogKeys, migrated_engine, note_entry, register
from tests.conftest import REPO_ROOT

runner = CliRunner()


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "log"
    code, stdout, _ = run("generate", "--entries", "250", "--out", str(folder), "--seed", "4")
    assert code == 0, stdout
    assert "wrote 250 entries" in stdout
    return folder


def copy_export(source: Path, target: Path) -> Path:
    target.mkdir()
    for name in ("entries.jsonl", "checkpoint", "trust.json"):
        (target / name).write_bytes((source / name).read_bytes())
    return target


def test_generate_refuses_to_overwrite_unless_forced(export: Path, tmp_path: Path) -> None:
    folder = copy_export(export, tmp_path / "copy")
    code, _, stderr = run("generate", "--entries", "3", "--out", str(folder))
    assert code == 2 and "already exists" in stderr
    code, _, _ = run("generate", "--entries", "3", "--out", str(folder), "--force")
    assert code == 0
    assert len((folder / "entries.jsonl").read_bytes().splitlines()) == 3


def test_verify_valid_log(export: Path) -> None:
    code, stdout, _ = run("verify", str(export))
    assert code == 0, stdout
    assert "OK 250 entries" in stdout and "conservation holds" in stdout
    code, stdout, _ = run("verify", str(export), "--json", "--workers", "1")
    report = json.loads(stdout)
    assert code == 0 and report["ok"] and report["entries"] == 250 and report["problem"] is None


def test_verify_names_the_first_bad_entry(export: Path, tmp_path: Path) -> None:
    folder = copy_export(export, tmp_path / "bad")
    lines = (folder / "entries.jsonl").read_bytes().split(b"\n")
    lines[42] = lines[42].replace(b'"v":1}', b'"v":1 }')
    lines[77] = b"{not json"
    (folder / "entries.jsonl").write_bytes(b"\n".join(lines))
    code, stdout, _ = run("verify", str(folder))
    assert code == 1
    assert "INVALID entry 42: not in RFC 8785 canonical form" in stdout
    code, stdout, _ = run("verify", str(folder), "--json")
    assert code == 1 and json.loads(stdout)["problem"]["index"] == 42


def test_malformed_json_line_is_invalid_not_unusable(export: Path, tmp_path: Path) -> None:
    folder = copy_export(export, tmp_path / "json")
    lines = (folder / "entries.jsonl").read_bytes().split(b"\n")
    lines[3] = b'{"v":'
    (folder / "entries.jsonl").write_bytes(b"\n".join(lines))
    code, stdout, _ = run("verify", str(folder))
    assert code == 1 and "entry 3: not valid JSON" in stdout


def test_unusable_inputs_exit_2(export: Path, tmp_path: Path) -> None:
    code, _, stderr = run("verify", str(tmp_path / "missing"))
    assert code == 2 and "not a folder" in stderr
    folder = copy_export(export, tmp_path / "partial")
    (folder / "checkpoint").unlink()
    code, _, stderr = run("verify", str(folder))
    assert code == 2 and "cannot read checkpoint" in stderr
    (folder / "entries.jsonl").unlink()
    code, _, stderr = run("verify", str(folder))
    assert code == 2 and "entries.jsonl: missing" in stderr
    bad_trust = tmp_path / "trust.json"
    bad_trust.write_text("{")
    code, _, stderr = run("verify", str(export), "--trust", str(bad_trust))
    assert code == 2 and "not valid JSON" in stderr
    code, _, stderr = run("verify", str(export), "--trust", str(tmp_path / "nope.json"))
    assert code == 2 and "cannot read trust file" in stderr
    bad_state = tmp_path / "state.json"
    bad_state.write_text("[]")
    code, _, stderr = run("verify", str(export), "--state", str(bad_state))
    assert code == 2 and "state file" in stderr
    code, _, _ = run("verify")
    assert code == 2  # usage error


def test_checkpoint_not_signed_by_the_pinned_key_is_invalid(export: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    assert run("generate", "--entries", "5", "--out", str(other))[0] == 0
    code, stdout, _ = run("verify", str(export), "--trust", str(other / "trust.json"))
    assert code == 1 and "INVALID" in stdout


def test_state_file_detects_a_fork(export: Path, tmp_path: Path) -> None:
    state = tmp_path / "seen.json"
    code, stdout, _ = run("verify", str(export), "--state", str(state))
    assert code == 0 and "saved" in stdout and state.exists()
    code, stdout, _ = run("verify", str(export), "--state", str(state))
    assert code == 0 and "consistent with the saved checkpoint of size 250" in stdout
    # The operator rewrites history from entry 200 on and re-signs: the auditor's state says no.
    log = generate_log(250, seed=4)
    lines = log.lines()[:200] + [sign_entry(log.operator, "operator.notice", {"n": i}).leaf_bytes()
                                 for i in range(80)]
    fork = tmp_path / "fork"
    write_export(fork, lines, log.checkpoint(lines=lines), log.trust)
    code, stdout, _ = run("verify", str(fork))
    assert code == 0  # on its own the fork is a valid log
    before = state.read_bytes()
    code, stdout, _ = run("verify", str(fork), "--state", str(state))
    assert code == 1 and "entry 200: history forked" in stdout
    assert state.read_bytes() == before


def test_prove_prints_a_proof_that_checks(export: Path, tmp_path: Path) -> None:
    code, stdout, stderr = run("prove", str(export), "--index", "123")
    assert code == 0, stderr
    proof = json.loads(stdout)
    line = (export / "entries.jsonl").read_bytes().split(b"\n")[123]
    assert base64.b64decode(proof["leaf_hash"]) == leaf_hash(line)
    verify_inclusion(leaf_hash(line), 123, proof["tree_size"],
                     [base64.b64decode(p) for p in proof["proof"]], base64.b64decode(proof["root"]))
    assert proof["tree_size"] == 250 and len(proof["proof"]) == 8
    code, _, stderr = run("prove", str(export), "--index", "250")
    assert code == 2 and "not below the checkpoint size" in stderr
    folder = copy_export(export, tmp_path / "tampered")
    lines = (folder / "entries.jsonl").read_bytes().split(b"\n")
    lines[10] = lines[11]
    (folder / "entries.jsonl").write_bytes(b"\n".join(lines))
    assert run("prove", str(folder), "--index", "10")[0] == 1


def test_consistency_from_an_older_checkpoint(export: Path, tmp_path: Path) -> None:
    log = generate_log(250, seed=4)
    old = tmp_path / "old.checkpoint"
    old.write_text(log.checkpoint(size=97))
    code, stdout, stderr = run("consistency", str(export), "--from", str(old))
    assert code == 0, stderr
    proof = json.loads(stdout)
    assert (proof["old_size"], proof["new_size"]) == (97, 250)
    verify_consistency(97, 250, [base64.b64decode(p) for p in proof["proof"]],
                       base64.b64decode(proof["old_root"]), base64.b64decode(proof["new_root"]))
    forked = tmp_path / "forked.checkpoint"
    lines = [*log.lines()[:96], sign_entry(log.operator, "operator.notice", {}).leaf_bytes()]
    forked.write_text(log.checkpoint(lines=lines))
    code, stdout, _ = run("consistency", str(export), "--from", str(forked))
    assert code == 1 and "not consistent" in stdout
    garbage = tmp_path / "garbage"
    garbage.write_text("hello\n")
    assert run("consistency", str(export), "--from", str(garbage))[0] == 2
    state = tmp_path / "state.json"
    assert run("verify", str(export), "--state", str(state))[0] == 0
    assert run("consistency", str(export), "--from", str(state))[0] == 0


def test_rewards_prints_the_ledger_fold(export: Path, tmp_path: Path) -> None:
    code, stdout, _ = run("rewards", str(export))
    assert code == 0
    printed = json.loads(stdout)
    log = generate_log(250, seed=4)
    ledger = Ledger(root_key_id=key_id(log.operator.public_key))
    ledger.apply_all(log.entries)
    assert printed.pop("claim_pools", []) == ledger.claim_pools_json()
    assert printed == ledger.state.to_json()
    assert printed["minted"] == printed["escrow"] + printed["unclaimed"] + sum(printed["balances"].values())
    folder = copy_export(export, tmp_path / "bad")
    lines = (folder / "entries.jsonl").read_bytes().split(b"\n")
    del lines[5]
    (folder / "entries.jsonl").write_bytes(b"\n".join(lines))
    assert run("rewards", str(folder))[0] == 1


def test_export_from_a_database_verifies(db_url: str, tmp_path: Path) -> None:
    keys = LogKeys.generate()
    engine = migrated_engine(db_url)
    try:
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            log.append_many([note_entry(keys.writer, "cli", i) for i in range(30)])
            log.checkpoint()
            log.append(note_entry(keys.writer, "cli", 99))  # after the checkpoint: not exported
    finally:
        engine.dispose()
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps(keys.trust().to_json()))
    out = tmp_path / "exported"
    code, stdout, stderr = run("export", "--db", db_url, "--out", str(out), "--trust", str(trust))
    assert code == 0, stderr
    assert "exported 31 entries" in stdout
    assert read_trust(out / "trust.json") == keys.trust()
    code, stdout, _ = run("verify", str(out), "--trust", str(trust))
    assert code == 0 and "OK 31 entries" in stdout
    other = tmp_path / "other.json"
    other.write_text(json.dumps(LogKeys.generate().trust().to_json()))
    code, _, stderr = run("export", "--db", db_url, "--out", str(tmp_path / "x"), "--trust", str(other))
    assert code == 2 and "does not verify" in stderr


def test_export_from_a_database_without_the_log_is_unusable(sqlite_url: str, tmp_path: Path) -> None:
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps(LogKeys.generate().trust().to_json()))
    code, _, stderr = run("export", "--db", sqlite_url, "--out", str(tmp_path / "x"),
                          "--trust", str(trust))
    assert code == 2 and "do not exist" in stderr
    code, _, stderr = run("export", "--db", "nonsense://", "--out", str(tmp_path / "y"),
                          "--trust", str(trust))
    assert code == 2 and "unusable input" in stderr
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_console_script_exit_codes(export: Path, tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "audit"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "audit.cli"]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    ok = subprocess.run([*command, "verify", str(export)], capture_output=True, env=env,
                        timeout=120, check=False)
    assert ok.returncode == 0, ok.stderr
    missing = subprocess.run([*command, "verify", str(tmp_path / "none")], capture_output=True,
                             env=env, timeout=120, check=False)
    assert missing.returncode == 2 and b"unusable input" in missing.stderr
