"""Signed checkpoints: the C2SP tlog-checkpoint body inside a C2SP signed note.

Why this format: it is what transparency logs (Go checksum database, Sigstore, witnesses) speak,
so the log's checkpoints can be cosigned by hospitals acting as witnesses (docs/architecture.md)
without changing what is signed.

A checkpoint note is UTF-8 text:

    <origin>\n
    <tree size, decimal, no leading zeros>\n
    <root hash, standard base64 of 32 bytes>\n
    [extension lines\n ...]
    \n
    — <key name> <base64(4-byte key hash || 64-byte Ed25519 signature)>\n
    [more signature lines]

The signature covers the body (every line before the blank line, each with its newline).
Key hash (C2SP signed-note, Ed25519): the first 4 bytes of
SHA-256(key name || 0x0A || 0x01 || 32-byte public key). The log signs with key name = origin.
A verifier ignores signature lines from keys it does not know, but requires one from the pinned
key, and rejects a note whose signature line for that key does not verify. The note rules
themselves (several signatures, limits, vkeys) are audit/note.py's; witnesses' cosignatures
are audit/cosignature.py's.
"""

from __future__ import annotations

import binascii
import re
from dataclasses import dataclass

from audit.note import (
    ED25519_SIGNATURE_BYTES,
    KEY_ID_BYTES,
    MAX_NOTE_BYTES,
    SIG_ED25519,
    SIGNATURE_DASH,
    Ed25519NoteSigner,
    Ed25519Verifier,
    Note,
    NoteError,
    NoteSignature,
    Vkey,
    open_note,
    parse_note,
    signature_for,
)
from audit.note import key_id as note_key_id
from audit.signing import Signer, b64decode, b64encode

__all__ = ["ED25519_SIGNATURE_BYTES", "HASH_BYTES", "KEY_HASH_BYTES", "MAX_NOTE_BYTES",
           "SIGNATURE_DASH", "Checkpoint", "CheckpointError", "Note", "NoteSignature",
           "check_origin", "key_hash", "parse_checkpoint", "parse_checkpoint_body", "parse_note",
           "sign_checkpoint", "sign_note", "verifier_key", "verify_checkpoint"]

ED25519_TYPE = bytes([SIG_ED25519])
KEY_HASH_BYTES = KEY_ID_BYTES
HASH_BYTES = 32

_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")

# One error type for notes and checkpoints: every caller that catches CheckpointError also
# catches a malformed note or signature line.
CheckpointError = NoteError


@dataclass(frozen=True)
class Checkpoint:
    """The signed statement "the log `origin` has `size` entries with root hash `root`"."""

    origin: str
    size: int
    root: bytes
    extensions: tuple[str, ...] = ()

    def body(self) -> str:
        """The exact text that is signed."""
        check_origin(self.origin)
        if self.size < 0:
            raise CheckpointError(f"size: must be >= 0, got {self.size}")
        if len(self.root) != HASH_BYTES:
            raise CheckpointError(f"root: must be {HASH_BYTES} bytes, got {len(self.root)}")
        for line in self.extensions:
            _check_line("extension", line)
        lines = [self.origin, str(self.size), b64encode(self.root), *self.extensions]
        return "".join(line + "\n" for line in lines)


def _check_line(what: str, line: str) -> None:
    if not line:
        raise CheckpointError(f"{what}: empty line")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
        raise CheckpointError(f"{what}: contains a control character")


def check_origin(origin: str) -> None:
    _check_line("origin", origin)
    if any(c.isspace() or c == "+" for c in origin):
        raise CheckpointError(f"origin: {origin!r} must not contain spaces or '+'")


def key_hash(name: str, public_key: bytes) -> bytes:
    """C2SP signed-note Ed25519 key hash: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    return note_key_id(name, SIG_ED25519, public_key)


def verifier_key(name: str, public_key: bytes) -> str:
    """The note verifier key string `<name>+<hex key hash>+<base64(0x01 || key)>`."""
    return str(Vkey(name, SIG_ED25519, public_key))


def sign_note(body: str, signer: Signer, name: str) -> str:
    """A note of `body` with one Ed25519 signature line by `signer` under key name `name`."""
    return Note(body, (signature_for(body, Ed25519NoteSigner(name, signer)),)).text()


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer, name: str | None = None) -> str:
    """The signed note text for `checkpoint`; the key name defaults to the origin."""
    return sign_note(checkpoint.body(), signer, name or checkpoint.origin)


def parse_checkpoint_body(body: str) -> Checkpoint:
    """Parse the tlog-checkpoint body (origin, size, root, extensions). Does not verify."""
    lines = body.split("\n")
    if lines[-1] != "":
        raise CheckpointError("checkpoint: body must end with a newline")
    lines = lines[:-1]
    if len(lines) < 3:
        raise CheckpointError(f"checkpoint: needs origin, size and root lines, got {len(lines)} line(s)")
    origin, size_text, root_text, *extensions = lines
    check_origin(origin)
    if not _SIZE_RE.fullmatch(size_text):
        raise CheckpointError(f"checkpoint size: {size_text!r} is not a decimal number without "
                              f"leading zeros")
    try:
        root = b64decode(root_text)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise CheckpointError(f"checkpoint root: {root_text!r} is not valid base64") from exc
    if len(root) != HASH_BYTES:
        raise CheckpointError(f"checkpoint root: must be {HASH_BYTES} bytes, got {len(root)}")
    for line in extensions:
        _check_line("checkpoint extension", line)
    return Checkpoint(origin=origin, size=int(size_text), root=root, extensions=tuple(extensions))


def parse_checkpoint(text: str | bytes) -> Checkpoint:
    """Parse a signed checkpoint note WITHOUT verifying any signature (use verify_checkpoint)."""
    return parse_checkpoint_body(parse_note(text).body)


def verify_checkpoint(text: str | bytes | Note, public_key: bytes, name: str,
                      origin: str | None = None) -> Checkpoint:
    """Parse `text` and require a valid signature by `public_key` under key name `name`.

    `origin`, if given, must equal the checkpoint's origin (a checkpoint of another log is
    refused even if the same key signed it). Unknown signers (witnesses this caller does not
    check) are ignored, as the spec says; a line of the pinned key that does not verify
    rejects the note.
    """
    verifier = Ed25519Verifier(name, public_key)
    note = text if isinstance(text, Note) else parse_note(text)
    for sig in note.signatures:
        if (sig.name, sig.key_hash) == (name, verifier.key_id) and \
                len(sig.signature) != ED25519_SIGNATURE_BYTES:
            raise CheckpointError(f"signature by {name}: must be {ED25519_SIGNATURE_BYTES} bytes")
    opened = open_note(note, [verifier], require_verified=False)
    if not opened.verified:
        raise CheckpointError(f"note: no signature by the pinned key {name} "
                              f"({verifier.key_id.hex()})")
    checkpoint = parse_checkpoint_body(note.body)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"checkpoint origin: {checkpoint.origin!r} is not the pinned "
                              f"origin {origin!r}")
    return checkpoint
