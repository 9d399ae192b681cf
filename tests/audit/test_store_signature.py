"""Signatures in the store.

- It refuses, at append, every signature the verifier refuses (audit.verify.decode_signature):
  non-canonical base64 (non-zero padding bits: the same 64 bytes, so it still VERIFIES, but it
  is a different leaf) and anything that is not 64 bytes. Otherwise the store would acknowledge
  an entry an auditor's verification of the export then rejects.
- The signature memo: the store skips verifying exactly what a Signer of this process signed,
  and verifies everything else (another key, other bytes, another signature, a foreign signer).
"""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator

import pytest
from nacl.signing import SigningKey, VerifyKey
from sqlalchemy import Engine

import audit.store.admission
from audit.entry import Entry, MalformedEntryError
from audit.signing import Signer, _SignatureMemo, b64encode, canonical, signed_in_this_process
from audit.store import EntryRefusedError
from audit.verify import decode_signature
from tests.audit.store_support import LogKeys, immediate_engine, migrated_engine, note_entry, register


@pytest.fixture
def engine(db_url: str) -> Iterator[Engine]:
    migrated_engine(db_url).dispose()
    engine = immediate_engine(db_url)
    yield engine
    engine.dispose()


def _padding_variant(signature: str) -> str:
    """The same 64 bytes in base64 with a non-zero padding bit (88 chars, "==": the last data
    character carries 4 padding bits)."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    last = signature[-3]
    variant = signature[:-3] + alphabet[alphabet.index(last) ^ 1] + "=="
    assert base64.b64decode(variant, validate=True) == base64.b64decode(signature)
    return variant


def _bad_signatures(entry: Entry) -> dict[str, str]:
    raw = base64.b64decode(entry.signature)
    return {"canonical": _padding_variant(entry.signature),
            "64 bytes": base64.b64encode(raw[:63]).decode(),
            "base64": entry.signature[:-3] + "!=="}


def test_append_refuses_what_the_verifier_refuses(engine: Engine) -> None:
    keys = LogKeys.generate()
    with keys.open(engine) as log:
        log.append(register(keys.operator, keys.writer))
        good = note_entry(keys.writer, "sig", 1)
        for reason, signature in _bad_signatures(good).items():
            bad = dataclasses.replace(good, signature=signature)
            with pytest.raises(MalformedEntryError, match=reason):
                decode_signature(bad.signature)  # the auditor's refusal ...
            with pytest.raises(EntryRefusedError, match=f"signature: .*{reason}"):
                log.append(bad)  # ... is the store's, through the group commit
            with pytest.raises(EntryRefusedError, match=f"signature: .*{reason}"), \
                    engine.begin() as connection:
                # ... and in a caller's transaction, though this process signed it
                log.append_in(connection, [bad])
        assert log.size() == 1
        assert log.append(good) == 1  # the canonical one is accepted


def test_the_padding_variant_would_verify(engine: Engine) -> None:
    """Why the check is needed: the variant's bytes are a valid signature of the entry."""
    keys = LogKeys.generate()
    good = note_entry(keys.writer, "sig", 2)
    variant = _padding_variant(good.signature)
    signed = canonical({k: v for k, v in good.to_json().items() if k != "signature"})
    VerifyKey(keys.writer.public_key).verify(signed, base64.b64decode(variant))
    assert variant != good.signature


@pytest.fixture
def verifications(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """The public keys the store really verified a signature with, in order."""
    seen: list[bytes] = []

    def counting(public_key: bytes) -> VerifyKey:
        seen.append(public_key)
        return VerifyKey(public_key)

    monkeypatch.setattr(audit.store.admission, "verify_key", counting)
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


@pytest.mark.parametrize("seed", range(4))
def test_the_padding_test_is_the_re_encoding_test(seed: int) -> None:
    """decode_signature's check of the last data character accepts exactly the base64 texts
    that are the encoding of their own bytes, whatever that character is."""
    import binascii
    import random

    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
    text = base64.b64encode(random.Random(seed).randbytes(64)).decode()
    for char in alphabet:
        variant = text[:85] + char + "=="
        raw = base64.b64decode(variant, validate=True)
        if binascii.b2a_base64(raw, newline=False).decode() == variant:
            assert decode_signature(variant) == raw
        else:
            with pytest.raises(MalformedEntryError, match="canonical"):
                decode_signature(variant)
