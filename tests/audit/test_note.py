"""C2SP signed notes with several signatures: the Go reference's vectors and rules (`note.Open`)."""

from __future__ import annotations

import pytest

from audit.note import (
    MAX_SIGNATURES,
    SIG_COSIGNATURE_V1,
    SIG_ED25519,
    Ed25519NoteSigner,
    Ed25519Verifier,
    NoteError,
    Vkey,
    add_signatures,
    open_note,
    parse_note,
    parse_signature_lines,
    sign_note,
)
from audit.signing import Signer, b64decode

# golang.org/x/mod/sumdb/note note_test.go: keys, text and signature lines.
PETER_SKEY_SEED = b64decode("AYEKFALVFGyNhPJEMzD1QIDr+Y7hfZx09iUvxdXHKDFz")[1:]
PETER_VKEY = "PeterNeumann+c74f20a3+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW"
ENOCH_VKEY = "EnochRoot+af0cfe78+ATtqJ7zOtqQtYqOo0CpvDXNlMhV3HeJDpjrASKGLWdop"
TEXT = ("If you think cryptography is the answer to your problem,\n"
        "then you don't know what your problem is.\n")
PETER_SIG = ("\u2014 PeterNeumann x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfqdn"
             "gotpRZb6KE6RyyBwJnAM=\n")
ENOCH_SIG = ("\u2014 EnochRoot rwz+eBzmZa0SO3NbfRGzPCpDckykFXSdeX+MNtCOXm2/5n2tiOHp+vAF1aGrQ5ovTG01oOTG"
             "wnWLox33WWd1RvMc+QQ=\n")
# C2SP signed-note's own example.
C2SP_VKEY = "example.com/foo+530d903a+AekyeRrm56hApGFkyQR4ZCbV54Id2LKaANYcrnKv3U2k"
C2SP_NOTE = ("This is an example message.\n\n\u2014 example.com/foo Uw2QOkn8srV1yJGh2VYRlL1Tnagv1YEq6Tf"
             "Xppzi2ONncAlTgK7Ztg1ERYNZXsYjOBH3mFXmRKuwHjG1Yu72IneyaQM=\n")


def verifier(vkey: str) -> Ed25519Verifier:
    return Ed25519Verifier.from_vkey(Vkey.parse(vkey))


def test_vkeys_of_the_references_parse_and_round_trip() -> None:
    for text in (PETER_VKEY, ENOCH_VKEY, C2SP_VKEY,
                 # transparency-dev/formats note_cosigv1_test.go: a base64 key containing '+',
                 # and a native cosignature/v1 (0x04) witness key.
                 "TEST+7997405c+AQcC+FTVKf0jlTdHDY3rbevmnKxxPjigCXlVtGe6RIr6",
                 "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"):
        assert str(Vkey.parse(text)) == text
    assert Vkey.parse(PETER_VKEY).sig_type == SIG_ED25519
    remora = Vkey.parse("remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2")
    assert remora.sig_type == SIG_COSIGNATURE_V1 and remora.key_id.hex() == "da77ade7"
    assert Vkey(name="PeterNeumann", sig_type=1,
                public_key=Signer.from_seed(PETER_SKEY_SEED).public_key) == Vkey.parse(PETER_VKEY)


def test_every_mangling_of_a_vkey_is_refused() -> None:
    # As Go's TestNewVerifier: every proper substring, and every byte incremented.
    for start in range(len(PETER_VKEY) + 1):
        for end in range(start + 1, len(PETER_VKEY) + 1):
            if (start, end) != (0, len(PETER_VKEY)):
                with pytest.raises(NoteError):
                    Vkey.parse(PETER_VKEY[start:end])
    for i in range(len(PETER_VKEY)):
        mangled = PETER_VKEY[:i] + chr(ord(PETER_VKEY[i]) + 1) + PETER_VKEY[i + 1:]
        with pytest.raises(NoteError):
            Vkey.parse(mangled)
    with pytest.raises(NoteError, match="32 bytes"):  # wrong length key, adjusted key hash
        Vkey.parse("PeterNeumann+cc469956+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TWBADKEY==")
    with pytest.raises(NoteError, match="unsupported signature type"):
        Vkey.parse("PeterNeumann+173116ae+ZRpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")
    with pytest.raises(NoteError, match="does not match"):
        Vkey.parse("rekor.sigstore.dev+00000000+ARpc2QcUPDhMQegwxbzhKqiBfsVkmqq/LDE4izWy10TW")


def test_signing_reproduces_the_go_note_byte_for_byte() -> None:
    peter = Ed25519NoteSigner("PeterNeumann", Signer.from_seed(PETER_SKEY_SEED))
    assert str(peter.vkey) == PETER_VKEY
    assert sign_note(TEXT, peter) == TEXT + "\n" + PETER_SIG
    assert parse_note(C2SP_NOTE).body == "This is an example message.\n"
    assert open_note(C2SP_NOTE, [verifier(C2SP_VKEY)]).verified


def test_open_with_one_two_and_no_known_keys() -> None:
    note = TEXT + "\n" + PETER_SIG + ENOCH_SIG
    opened = open_note(note, [verifier(PETER_VKEY)])
    assert opened.body == TEXT
    assert [s.name for s, _v in opened.verified] == ["PeterNeumann"]
    assert [s.name for s in opened.unverified] == ["EnochRoot"]
    both = open_note(note, [verifier(PETER_VKEY), verifier(ENOCH_VKEY)])
    assert [s.name for s, _v in both.verified] == ["PeterNeumann", "EnochRoot"]
    assert not both.unverified
    with pytest.raises(NoteError, match="no signature by a known key"):
        open_note(note, [])
    assert len(open_note(note, [], require_verified=False).unverified) == 2


def test_duplicates_ambiguity_and_invalid_signatures_follow_go() -> None:
    enoch_bad = ENOCH_SIG[:60] + "ABCD" + ENOCH_SIG[60:]
    # Repeated lines of one key: the first is verified, the rest ignored; identical unknown
    # lines are reported once.
    opened = open_note(TEXT + "\n" + PETER_SIG + PETER_SIG + ENOCH_SIG + ENOCH_SIG + enoch_bad,
                       [verifier(PETER_VKEY)])
    assert len(opened.verified) == 1 and len(opened.unverified) == 2
    with pytest.raises(NoteError, match="ambiguous key EnochRoot"):
        open_note(TEXT + "\n" + ENOCH_SIG,
                  [verifier(ENOCH_VKEY), verifier(PETER_VKEY), verifier(ENOCH_VKEY)])
    open_note(TEXT + "\n" + PETER_SIG, [verifier(ENOCH_VKEY), verifier(PETER_VKEY),
                                        verifier(ENOCH_VKEY)])
    peter_bad = PETER_SIG[:60] + "ABCD" + PETER_SIG[60:]
    with pytest.raises(NoteError, match="PeterNeumann\\+c74f20a3: does not verify"):
        open_note(TEXT + "\n" + peter_bad, [verifier(PETER_VKEY)])


@pytest.mark.parametrize(("text", "message"), [
    (TEXT, "no blank line"),
    (TEXT + "\n", "no signature lines"),
    (TEXT + "\n" + PETER_SIG[:-1], "must end with a newline"),
    ("\x01" + TEXT + "\n" + PETER_SIG, "control character"),
    (b"\xff" + (TEXT + "\n" + PETER_SIG).encode(), "UTF-8"),
    (TEXT + "\n\u2014 Bad Name x08go/ZJkuBS9UG/SffcvIAQxVBtiFupLLr8pAcElZInNIuGUgYN1FFYC2pZSNXgKvqfq"
            "dngotpRZb6KE6RyyBwJnAM=\n", "expected '<name> <base64>'"),
    (TEXT + "\n" + PETER_SIG + "Unexpected line.\n", "EM DASH"),
    (TEXT + "\n" + PETER_SIG * (MAX_SIGNATURES + 1), f"more than {MAX_SIGNATURES}"),
    (TEXT + "\n\u2014 a+b AAAAAAAA\n", "must not contain spaces or '\\+'"),
])
def test_malformed_notes_are_refused_with_the_reason(text: str | bytes, message: str) -> None:
    # The malformed messages of Go's TestOpen, each refused before any key is consulted.
    with pytest.raises(NoteError, match=message):
        open_note(text, [verifier(PETER_VKEY)])


def test_a_hundred_signatures_are_accepted_and_add_signatures_deduplicates() -> None:
    opened = open_note(TEXT + "\n" + PETER_SIG * MAX_SIGNATURES, [verifier(PETER_VKEY)])
    assert len(opened.verified) == 1
    note = parse_note(TEXT + "\n" + PETER_SIG)
    merged = add_signatures(note, parse_signature_lines(ENOCH_SIG + PETER_SIG + ENOCH_SIG))
    assert merged.text() == TEXT + "\n" + PETER_SIG + ENOCH_SIG
