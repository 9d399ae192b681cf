"""The store refuses, at append, every signature the verifier refuses (audit.verify.decode_signature):
non-canonical base64 (non-zero padding bits: the same 64 bytes, so it still VERIFIES, but it is a
different leaf) and anything that is not 64 bytes. Otherwise the store would acknowledge an
entry an auditor's verification of the export then rejects."""

from __future__ import annotations

import base64
import dataclasses
from collections.abc import Iterator

import pytest
from nacl.signing import VerifyKey
from sqlalchemy import Engine

from audit.entry import Entry, MalformedEntryError
from audit.signing import canonical
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
                log.append(bad)  # ... is the store's, through the writer thread
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
