"""`audit export --db URL --out DIR` without --trust: the trust anchors come from the database
(audit_log_meta); --trust, when given, must agree with them."""

from __future__ import annotations

import json
from pathlib import Path

from sqlalchemy import Engine
from typer.testing import CliRunner

from audit.cli import app
from audit.export import read_trust
from audit.store import record_trust
from exchange.db.engine import make_engine
from exchange.db.migrate import upgrade
from tests.audit.store_support import LogKeys, note_entry, register

runner = CliRunner()


def meta_engine(url: str) -> Engine:
    """The audit tables at the revision that adds audit_log_meta (0004; 0002/0003 come with it)."""
    upgrade(url, "coordinator", "0004_audit_log_meta")
    return make_engine(url)


def run(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, list(args))
    return result.exit_code, result.stdout, result.stderr


def _log(db_url: str, keys: LogKeys, *, anchors: bool) -> None:
    engine = meta_engine(db_url)
    try:
        if anchors:
            record_trust(engine, keys.trust())
        with keys.open(engine) as log:
            log.append(register(keys.operator, keys.writer))
            log.append_many([note_entry(keys.writer, "meta", i) for i in range(12)])
            log.checkpoint()
    finally:
        engine.dispose()


def test_export_without_trust_uses_the_stored_anchors(db_url: str, tmp_path: Path) -> None:
    keys = LogKeys.generate()
    _log(db_url, keys, anchors=True)
    out = tmp_path / "exported"
    code, stdout, stderr = run("export", "--db", db_url, "--out", str(out))
    assert code == 0, stderr
    assert "exported 13 entries" in stdout
    assert read_trust(out / "trust.json") == keys.trust()
    pinned = tmp_path / "pinned.json"
    pinned.write_text(json.dumps(keys.trust().to_json()))
    code, stdout, _ = run("verify", str(out), "--trust", str(pinned))
    assert code == 0 and "OK 13 entries" in stdout
    # --trust that agrees: the same export.
    code, _, stderr = run("export", "--db", db_url, "--out", str(tmp_path / "again"), "--trust", str(pinned))
    assert code == 0, stderr
    assert (tmp_path / "again" / "entries.jsonl").read_bytes() == (out / "entries.jsonl").read_bytes()


def test_trust_that_disagrees_with_the_database_is_refused(db_url: str, tmp_path: Path) -> None:
    keys = LogKeys.generate()
    _log(db_url, keys, anchors=True)
    other = tmp_path / "other.json"
    stranger = LogKeys.generate().trust()
    other.write_text(json.dumps({**keys.trust().to_json(),
                                 "log_key": stranger.to_json()["log_key"]}))
    code, _, stderr = run("export", "--db", db_url, "--out", str(tmp_path / "x"), "--trust", str(other))
    assert code == 2
    assert "disagrees with the trust anchors stored" in stderr and "log_public_key" in stderr
    assert "operator_public_key" not in stderr.split("(")[-1]
    assert not (tmp_path / "x").exists()


def test_a_database_without_anchors_needs_trust(db_url: str, tmp_path: Path) -> None:
    keys = LogKeys.generate()
    _log(db_url, keys, anchors=False)
    code, _, stderr = run("export", "--db", db_url, "--out", str(tmp_path / "x"))
    assert code == 2 and "no trust anchors" in stderr and "--trust" in stderr
    trust = tmp_path / "trust.json"
    trust.write_text(json.dumps(keys.trust().to_json()))
    code, _, stderr = run("export", "--db", db_url, "--out", str(tmp_path / "y"), "--trust", str(trust))
    assert code == 0, stderr
