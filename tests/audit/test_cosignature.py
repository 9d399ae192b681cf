"""cosignature/v1 (C2SP tlog-cosignature): published vectors, the Go layout, and every refusal."""

from __future__ import annotations

import hashlib

import pytest

from audit.checkpoint import Checkpoint, parse_note, sign_checkpoint, verify_checkpoint
from audit.cosignature import (
    CosignatureError,
    CosignatureV1Signer,
    CosignatureV1Verifier,
    check_cosignatures,
    cosigned_message,
    parse_witness_vkey,
    split_cosignature,
)
from audit.note import SIG_COSIGNATURE_V1, Note, NoteError, NoteSignature, Vkey, parse_signature_line
from audit.signing import Signer, b64decode

# A checkpoint of Google's arche2025h1 staging CT log as published, with the log's RFC 6962
# (0x05) and Ed25519 (0x01) signatures and five witness cosignatures; the vkeys are those of
# transparency-dev/formats' tests. Cosignatures of remora.n621.de carry the timestamp below.
ARCHE = "".join(line + "\n" for line in (
    'arche2025h1.staging.ct.transparency.dev',
    '1432088532',
    'U7WM79jrzyhGZ5/GUBTpM7NzwdyfFx61t3RovgcC4Ro=',
    '',
    '— arche2025h1.staging.ct.transparency.dev zTM8sQAAAZ5W0WdjBAMARjBEAiBjW5IQf9pvsYLfQFX6hoGR'
    'EPMHbdQ3urbllzalApkptQIgIpwtEroeW2BXaHAI4kJXFbon5Ch9MNL5zRNZ55lvGt0=',
    '— arche2025h1.staging.ct.transparency.dev ui8GwCF1+kWqZrxGdhj4aX3gcw7XUlXQQabg/27lefwhUkzb'
    'C3NygNI75MdhL1bfTW9g8Ei59RA23oHP7Ry1k3ZFWwQ=',
    '— transparency.dev/DEV:witness-little-garden 2AQqhwAAAABqEiEgzgFIqqhbUoDwjMWE6UP8nd8/KYTzw'
    'Z2rhIgcqoXHAwVkjZr4AscylP3v7sEodkRAErumC2q44vdgJY096st5BQ==',
    '— witness1.smartit.nu/witness1 pIyCDwAAAABqEiEghIp82KWebrw7/oHQwlTAm3g2RKS4+eebl8eO0WH+/iE'
    'cxZ75W3u5hNI7TOQtmJbqmNWVuE0tgh0XwzdZsDsUAQ==',
    '— remora.n621.de 2net5wAAAABqEiEgPlfF3V06o0Y+fHM+J5J9s27wgxxcOVSpZ/2g/KSiXCg9DEZI+aVCIobWX'
    '9sXTynk5XeU/zZ0WBxtqB0DrAWfBw==',
    '— witness.stagemole.eu Z/euoAAAAABqEiEgw0i+7g2ENfDAWHmtRzCfKTHSDwYDJA2NmKeGi9Y8FtEyOUvVr+A'
    'JmIY/2TUFucgKi7lI7cUiOvKFYe/TmN9DAg==',
))
ARCHE_LOG_VKEY = ("arche2025h1.staging.ct.transparency.dev+ba2f06c0+AU0vHmlGCS/PdN8b2OaGmKprLI8HKM+dJ47"
                  "2xgFYh15f")
REMORA_VKEY = "remora.n621.de+da77ade7+BOvN63jn/bLvkieywe8R6UYAtVtNbZpXh34x7onlmtw2"
REMORA_TIME = 0x6A122120
# C2SP tlog-cosignature's example cosignature line (its message's time line is 1679315147).
SPEC_LINE = ("— witness.example.com/w1 jWbPPwAAAABkGFDLEZMHwSRaJNiIDoe9DYn/zXcrtPHeolMI5OWXEhZCB9dl"
             "rDJsX3b2oyin1nPZqhf5nNo0xUe+mbIUBkBIfZ+qnA==")
ORIGIN = "exchange.example/log"


def test_a_published_cosigned_checkpoint_verifies() -> None:
    log = Vkey.parse(ARCHE_LOG_VKEY)
    checkpoint = verify_checkpoint(ARCHE, log.public_key, log.name, log.name)
    assert checkpoint.size == 1432088532
    remora = parse_witness_vkey(REMORA_VKEY)
    report = check_cosignatures(ARCHE, [remora], now=REMORA_TIME)
    assert report.signed == {"remora.n621.de": REMORA_TIME} and not report.missing
    # The other four witnesses' lines are from keys not given: ignored, not failed.
    assert len(parse_note(ARCHE).signatures) == 6
    tampered = ARCHE.replace("\n1432088532\n", "\n1432088533\n")
    with pytest.raises(CosignatureError, match=r"remora\.n621\.de: does not verify"):
        check_cosignatures(tampered, [remora], now=REMORA_TIME)


def test_the_spec_example_line_and_the_go_timestamp_vector_decode() -> None:
    spec = parse_signature_line(SPEC_LINE)
    assert split_cosignature(spec.signature)[0] == 1679315147
    # transparency-dev/formats TestCoSigV1Timestamp.
    raw = b64decode("ZGhGuQAAAABm/qTPeyKXD+R2rzyQsxPiP8mXum7qq/iF0u4vanlqJyocWODBt97w9uL+8qT7S5gxEHWWOw"
                    "orDcFiEBYJXORmnFBOBA==")
    assert split_cosignature(raw[4:])[0] == 1727964367
    # "wrong type of signature": a plain Ed25519 line (64 bytes after the key ID).
    plain = b64decode("eQjRQm6eSKzFoiYalgwCPXu2y3ijtg68is9M46JKxuZB+dRfTmeQeDBoXnvxZx2ugnkyV+MUMLXpWs1h"
                      "Pb/W/4xkNQY=")
    with pytest.raises(CosignatureError, match="expected 72"):
        split_cosignature(plain[4:])


def test_key_id_message_and_line_layout_match_the_spec() -> None:
    seed = bytes(range(32))
    witness = CosignatureV1Signer("witness.example/w1", Signer.from_seed(seed))
    public = witness.signer.public_key
    assert witness.key_id == hashlib.sha256(b"witness.example/w1\n\x04" + public).digest()[:4]
    assert str(witness.vkey).startswith(f"witness.example/w1+{witness.key_id.hex()}+B")
    assert parse_witness_vkey(str(witness.vkey)) == Vkey("witness.example/w1", SIG_COSIGNATURE_V1,
                                                         public)
    body = "example.com/behind-the-sofa\n20852163\nCsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n"
    assert cosigned_message(body.encode(), 1679315147) == (
        b"cosignature/v1\ntime 1679315147\nexample.com/behind-the-sofa\n20852163\n"
        b"CsUYapGGPo4dkMgIAUqom/Xajj7h2fB2MPA3j2jxq2I=\n")
    line = witness.cosign(body, 1679315147)
    blob = line.key_hash + line.signature
    assert blob[:4] == witness.key_id and blob[4:12] == (1679315147).to_bytes(8, "big")
    # The Ed25519 signature is over exactly the message above (deterministic, RFC 8032).
    assert blob[12:] == witness.signer.sign(cosigned_message(body.encode(), 1679315147))
    assert CosignatureV1Verifier(witness.vkey).timestamp(body.encode(), line.signature) == 1679315147


def test_a_log_key_is_not_a_witness_key_and_vice_versa() -> None:
    key = Signer.generate()
    plain_vkey = Vkey("w", 0x01, key.public_key)
    with pytest.raises(CosignatureError, match="type 0x01"):
        parse_witness_vkey(str(plain_vkey))
    body = sign_checkpoint(Checkpoint(ORIGIN, 3, bytes(32)), key)
    cosigner = CosignatureV1Signer("w", key)
    # The same key bytes under type 0x04 have another key ID: the log's line is not taken as a
    # cosignature, and a cosignature is not taken as the log's signature.
    assert cosigner.key_id != plain_vkey.key_id
    report = check_cosignatures(body, [cosigner.vkey], now=0)
    assert report.missing == ("w",) and not report.signed


def cosigned(note: str, *lines: NoteSignature) -> str:
    parsed = parse_note(note)
    return Note(parsed.body, (*parsed.signatures, *lines)).text()


def test_future_bad_and_unknown_cosignatures() -> None:
    log = Signer.generate()
    note = sign_checkpoint(Checkpoint(ORIGIN, 5, bytes(32)), log)
    body = parse_note(note).body
    a, b, stranger = (CosignatureV1Signer(name, Signer.generate()) for name in ("a", "b", "a"))
    now = 1_800_000_000
    text = cosigned(note, a.cosign(body, now - 10), b.cosign(body, now + 3600),
                    stranger.cosign(body, now))
    report = check_cosignatures(text, [a.vkey, b.vkey], now=now)
    # The stranger shares a's name but not its key ID: ignored (signed-note rule).
    assert report.signed == {"a": now - 10} and report.future == {"b": now + 3600}
    assert report.missing == ()
    assert check_cosignatures(text, [a.vkey, b.vkey], now=now + 3600).signed.keys() == {"a", "b"}
    forged = NoteSignature("a", a.key_id, a.cosign(body, now).signature[:8] + bytes(64))
    with pytest.raises(CosignatureError, match="by a: does not verify"):
        check_cosignatures(cosigned(note, forged), [a.vkey], now=now)
    short = NoteSignature("a", a.key_id, bytes(70))
    with pytest.raises(CosignatureError, match="70 bytes, expected 72"):
        check_cosignatures(cosigned(note, short), [a.vkey], now=now)
    too_late = NoteSignature("a", a.key_id, (2**63).to_bytes(8, "big") + bytes(64))
    with pytest.raises(CosignatureError, match="exceeds 2\\^63-1"):
        check_cosignatures(cosigned(note, too_late), [a.vkey], now=now)
    with pytest.raises(NoteError):
        cosigned_message(b"one line\n", 1)
