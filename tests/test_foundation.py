"""The foundation: settings, signing, envelopes, engines."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlalchemy import text

from audit.entry import Entry, MalformedEntryError, sign_entry
from audit.signing import SignatureInvalidError, Signer, canonical
from exchange.db.engine import make_engine
from exchange.settings import load_coordinator_settings


def test_canonical_encoding_is_rfc8785() -> None:
    assert canonical({"b": 1, "a": [True, None, "x"]}) == b'{"a":[true,null,"x"],"b":1}'


def test_key_file_is_private_and_round_trips(tmp_path: Path) -> None:
    signer = Signer.generate()
    path = tmp_path / "keys" / "node.key"
    signer.save(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert Signer.load(path).public_key == signer.public_key
    with pytest.raises(FileExistsError):
        signer.save(path)
    os.chmod(path, 0o644)
    with pytest.raises(PermissionError):
        Signer.load(path)


def test_entry_signature_covers_every_field() -> None:
    signer = Signer.generate()
    entry = sign_entry(signer, "token.mint", {"account": "a", "amount": 5})
    entry.verify_signature(signer.public_key)
    round_tripped = Entry.from_json(entry.to_json())
    assert round_tripped.leaf_bytes() == entry.leaf_bytes()
    tampered = Entry.from_json({**entry.to_json(), "payload": {"account": "a", "amount": 6}})
    with pytest.raises(SignatureInvalidError):
        tampered.verify_signature(signer.public_key)


def test_malformed_envelope_names_the_field() -> None:
    signer = Signer.generate()
    good = sign_entry(signer, "k", {}).to_json()
    with pytest.raises(MalformedEntryError, match="payload"):
        Entry.from_json({**good, "payload": []})
    with pytest.raises(MalformedEntryError, match="unknown field"):
        Entry.from_json({**good, "extra": 1})


def test_settings_from_toml_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "exchange.toml"
    config.write_text('port = 9000\nhost = "0.0.0.0"\n')
    monkeypatch.setenv("EXCHANGE_PORT", "9100")
    settings = load_coordinator_settings(config)
    assert settings.host == "0.0.0.0"
    assert settings.port == 9100  # the environment beats the file
    config.write_text("port = 0\n")
    monkeypatch.delenv("EXCHANGE_PORT")
    with pytest.raises(ValidationError, match="port"):
        load_coordinator_settings(config)


def test_engines_connect(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert conn.execute(text("select 1")).scalar_one() == 1
    engine.dispose()
