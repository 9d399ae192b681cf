"""The signature memo: the store skips verifying exactly what a Signer of this process signed,
and verifies everything else (another key, other bytes, another signature, a foreign signer)."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator

import pytest
from nacl.signing import SigningKey, VerifyKey
from sqlalchemy import Engine

import audit.store
from audit.entry import Entry
from audit.signing import Signer, _SignatureMemo, b64encode, signed_in_this_process
from audit.store import EntryRefusedError
from tests.audit.store_support import LogKeys, immediate_engine, migrated_engine, note_entry, register


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    migrated_engine(db_url).dispose()
    engine = immediate_engine(db_url)
    yield engine
    engine.dispose()


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The public keys the store really verified a signature with, in order."""
    seen: list[bytes] = []

    def counting(public_key: bytes) -> VerifyKey:
        seen.append(public_key)
        return VerifyKey(public_key)

    monkeypatch.setattr(audit.store, "_verify_key", counting)
    return seen


def _foreign_entry(signer: Signer, tag: str, seq: int) -> Entry:
    """An entry signed with `signer`'s private key outside any Signer (as another process
    would): a valid signature this process's memo never saw."""
    unsigned = dataclasses.replace(note_entry(Signer.generate(), tag, seq), key_id=signer.key_id,
                                   signature="")
    raw = SigningKey(signer.seed).sign(unsigned.signing_input()).signature
    return dataclasses.replace(unsigned, signature=b64encode(raw))


def test_the_memo_matches_only_the_exact_triple() -> None:
    signer, other = Signer.generate(), Signer.generate()
    message = b"study.submitted 42"
    signature = signer.sign(message)
    assert signed_in_this_process(signer.public_key, message, signature)
    assert not signed_in_this_process(other.public_key, message, signature)
    assert not signed_in_this_process(signer.public_key, message + b" ", signature)
    flipped = bytes([signature[0] ^ 1]) + signature[1:]
    assert not signed_in_this_process(signer.public_key, message, flipped)
    foreign = SigningKey(signer.seed).sign(b"made elsewhere").signature
    assert not signed_in_this_process(signer.public_key, b"made elsewhere", foreign)


def test_the_memo_forgets_the_oldest_beyond_its_size() -> None:
    memo = _SignatureMemo(2)
    key = Signer.generate()
    triples = [(key.public_key, f"m{i}".encode(), bytes([i]) * 64) for i in range(3)]
    for triple in triples:
        memo.remember(*triple)
    assert not memo.holds(*triples[0])
    assert memo.holds(*triples[1]) and memo.holds(*triples[2])


def test_the_store_verifies_only_what_this_process_did_not_sign(
        engine: Engine, verifications: list[bytes]) -> None:
    keys = LogKeys.generate()
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        verifications.clear()
        log.append(note_entry(keys.writer, "memo", 1))  # signed here: no verification
        assert verifications == []
        foreign = _foreign_entry(keys.writer, "memo", 2)
        log.append(foreign)  # signed "elsewhere": verified
        assert verifications == [keys.writer.public_key]
        with engine.begin() as connection:  # the coordinator's path, in its transaction
            log.append_in(connection, [note_entry(keys.writer, "memo", 3),
                                       _foreign_entry(keys.writer, "memo", 4)])
        assert verifications == [keys.writer.public_key] * 2
        assert log.size() == 5


def test_a_remembered_signature_on_other_bytes_is_refused(engine: Engine) -> None:
    """A real signature of this process, moved onto another payload, is verified and refused."""
    keys = LogKeys.generate()
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        genuine = note_entry(keys.writer, "memo", 1)
        forged = dataclasses.replace(note_entry(keys.writer, "memo", 2),
                                     signature=genuine.signature)
        with pytest.raises(EntryRefusedError, match="signature: does not verify"):
            log.append(forged)
        with pytest.raises(EntryRefusedError, match="signature: does not verify"), \
                engine.begin() as connection:
            log.append_in(connection, [forged])
        # Another registered key claiming the entry (same bytes otherwise) is refused too.
        stranger = Signer.generate()
        log.append(register(keys.operator, stranger, owner="coordinator:other"))
        claimed = dataclasses.replace(genuine, key_id=stranger.key_id)
        with pytest.raises(EntryRefusedError, match="signature: does not verify"):
            log.append(claimed)
        assert log.append(genuine) == 2
        assert base64.b64decode(genuine.signature)  # a real signature, accepted once
