"""C2SP signed notes and tlog checkpoints: the Go reference example, round trips, rejections."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from audit.checkpoint import (
    Checkpoint,
    CheckpointError,
    key_hash,
    parse_checkpoint,
    parse_note,
    sign_checkpoint,
    sign_note,
    verifier_key,
    verify_checkpoint,
)
from audit.signing import Signer, b64decode, b64encode

# golang.org/x/mod/sumdb/note documentation example (PeterNeumann key and signed note).
GO_SKEY_SEED = b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
GO_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
GO_TEXT = ("If you think cryptography is the answer to your problem,\n"
           "then you don't know what your problem is.\n")
GO_NOTE = (GO_TEXT + "\n\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1F"
           "FYC2pZSNXgKvqfqdngotpRZb6KE6RyyBwJnAM=\n")
ORIGIN = "exchange.example/log"


def test_matches_the_go_note_package_example() -> None:
    signer = Signer.from_seed(GO_SKEY_SEED)
    assert verifier_key("PeterNeumann", signer.public_key) == GO_VKEY
    assert key_hash("PeterNeumann", signer.public_key).hex() == "c74f20a3"
    assert sign_note(GO_TEXT, signer, "PeterNeumann") == GO_NOTE
    note = parse_note(GO_NOTE)
    assert note.body == GO_TEXT
    assert [s.name for s in note.signatures] == ["PeterNeumann"]


def test_round_trip_and_layout() -> None:
    log = Signer.generate()
    checkpoint = Checkpoint(ORIGIN, 12345, bytes(range(32)))
    text = sign_checkpoint(checkpoint, log)
    lines = text.split("\n")
    assert lines[:4] == [ORIGIN, "12345", b64encode(bytes(range(32))), ""]
    assert lines[4].startswith(f"\u2014 {ORIGIN} ")
    blob = b64decode(lines[4].split(" ")[2])
    assert blob[:4] == key_hash(ORIGIN, log.public_key) and len(blob) == 68
    assert verify_checkpoint(text, log.public_key, ORIGIN, ORIGIN) == checkpoint
    assert parse_checkpoint(text) == checkpoint


def test_extension_lines_and_cosignatures_from_unknown_keys_are_kept_apart() -> None:
    log, witness = Signer.generate(), Signer.generate()
    checkpoint = Checkpoint(ORIGIN, 7, b"\x07" * 32, extensions=("ext-line",))
    text = sign_checkpoint(checkpoint, log)
    body = parse_note(text).body
    cosigned = sign_note(body, witness, "witness.example").rstrip("\n").split("\n")[-1]
    text2 = text + cosigned + "\n"
    assert verify_checkpoint(text2, log.public_key, ORIGIN).extensions == ("ext-line",)
    assert len(parse_note(text2).signatures) == 2


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda t: t.replace("\n\n", "\n"), "no blank line"),
    (lambda t: t[:-1], "must end with a newline"),
    (lambda t: t.replace("\u2014", "-"), "EM DASH"),
    (lambda t: t.replace("\n", "\r\n"), "carriage return"),
    (lambda t: t.rsplit(" ", 1)[0] + " AAAA\n", "too short"),
    (lambda t: t.rsplit(" ", 1)[0] + " AAAAAAAA\n", "no signature by"),
    (lambda t: t.rsplit(" ", 1)[0] + " not*base64\n", "not valid base64"),
    (lambda t: t.replace(f"\u2014 {ORIGIN} ", "\u2014 x y "), "expected '<name> <base64>'"),
])
def test_malformed_notes_are_rejected_clearly(mutate: Callable[[str], str], message: str) -> None:
    log = Signer.generate()
    text = sign_checkpoint(Checkpoint(ORIGIN, 12, b"\x01" * 32), log)
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(mutate(text), log.public_key, ORIGIN, ORIGIN)


@pytest.mark.parametrize(("body", "message"), [
    (f"{ORIGIN}\n012\n{b64encode(bytes(32))}\n", "leading zeros"),
    (f"{ORIGIN}\n-1\n{b64encode(bytes(32))}\n", "decimal"),
    (f"{ORIGIN}\n12\nAQEB\n", "32 bytes"),
    (f"{ORIGIN}\n12\n!!\n", "base64"),
    (f"{ORIGIN}\n12\n", "needs origin, size and root"),
    (f"has space\n12\n{b64encode(bytes(32))}\n", "origin"),
    (f"{ORIGIN}\n12\n{b64encode(bytes(32))}\nbad\x01ext\n", "control character"),
])
def test_signed_but_malformed_checkpoint_bodies_are_rejected(body: str, message: str) -> None:
    # Signed correctly, so only the body's format can be what is wrong.
    log = Signer.generate()
    with pytest.raises(CheckpointError, match=message):
        verify_checkpoint(sign_note(body, log, ORIGIN), log.public_key, ORIGIN)


def test_wrong_key_tampered_body_and_other_origin_are_rejected() -> None:
    log, other = Signer.generate(), Signer.generate()
    text = sign_checkpoint(Checkpoint(ORIGIN, 12, b"\x01" * 32), log)
    with pytest.raises(CheckpointError, match="no signature by the pinned key"):
        verify_checkpoint(text, other.public_key, ORIGIN)
    with pytest.raises(CheckpointError, match="does not verify"):
        verify_checkpoint(text.replace("\n12\n", "\n13\n"), log.public_key, ORIGIN)
    foreign = sign_checkpoint(Checkpoint("other.example/log", 1, b"\x01" * 32), log, name=ORIGIN)
    with pytest.raises(CheckpointError, match="not the pinned origin"):
        verify_checkpoint(foreign, log.public_key, ORIGIN, ORIGIN)


def test_bad_origins_and_sizes_are_refused_when_signing() -> None:
    log = Signer.generate()
    for origin in ("", "has space", "a+b"):
        with pytest.raises(CheckpointError, match="origin"):
            sign_checkpoint(Checkpoint(origin, 1, b"\x01" * 32), log)
    with pytest.raises(CheckpointError, match="size"):
        sign_checkpoint(Checkpoint(ORIGIN, -1, b"\x01" * 32), log)
    with pytest.raises(CheckpointError, match="root"):
        sign_checkpoint(Checkpoint(ORIGIN, 1, b"\x01" * 31), log)
    with pytest.raises(CheckpointError, match="not valid UTF-8"):
        parse_note(b"\xff\xfe\n\n")
