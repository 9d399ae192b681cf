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
key, and rejects a note whose signature line for that key does not verify.
"""

from __future__ import annotations

import binascii
import hashlib
import re
from dataclasses import dataclass

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from audit.signing import Signer, b64decode, b64encode

SIGNATURE_DASH = "\u2014"  # EM DASH, as the signed-note spec requires
ED25519_TYPE = b"\x01"
KEY_HASH_BYTES = 4
ED25519_SIGNATURE_BYTES = 64
HASH_BYTES = 32
MAX_NOTE_BYTES = 1 << 20

_SIZE_RE = re.compile(r"0|[1-9][0-9]{0,19}")


class CheckpointError(ValueError):
    """A note or checkpoint is malformed or does not verify; the message names what and why."""


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


@dataclass(frozen=True)
class NoteSignature:
    name: str
    key_hash: bytes
    signature: bytes


@dataclass(frozen=True)
class Note:
    body: str
    signatures: tuple[NoteSignature, ...]


def _check_line(what: str, line: str) -> None:
    if not line:
        raise CheckpointError(f"{what}: empty line")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in line):
        raise CheckpointError(f"{what}: contains a control character")


def check_origin(origin: str) -> None:
    _check_line("origin", origin)
    if any(c.isspace() or c == "+" for c in origin):
        raise CheckpointError(f"origin: {origin!r} must not contain spaces or '+'")


def _check_key_name(name: str) -> None:
    if not name or any(c.isspace() or c == "+" for c in name):
        raise CheckpointError(f"key name: {name!r} must be non-empty, without spaces or '+'")


def key_hash(name: str, public_key: bytes) -> bytes:
    """C2SP signed-note Ed25519 key hash: SHA-256(name || 0x0A || 0x01 || key)[:4]."""
    _check_key_name(name)
    digest = hashlib.sha256(name.encode() + b"\n" + ED25519_TYPE + public_key).digest()
    return digest[:KEY_HASH_BYTES]


def verifier_key(name: str, public_key: bytes) -> str:
    """The note verifier key string `<name>+<hex key hash>+<base64(0x01 || key)>`."""
    return f"{name}+{key_hash(name, public_key).hex()}+{b64encode(ED25519_TYPE + public_key)}"


def sign_note(body: str, signer: Signer, name: str) -> str:
    """Append one Ed25519 signature line by `signer` under key name `name` to `body`."""
    if not body.endswith("\n"):
        raise CheckpointError("body: must end with a newline")
    signature = signer.sign(body.encode())
    blob = key_hash(name, signer.public_key) + signature
    return f"{body}\n{SIGNATURE_DASH} {name} {b64encode(blob)}\n"


def sign_checkpoint(checkpoint: Checkpoint, signer: Signer, name: str | None = None) -> str:
    """The signed note text for `checkpoint`; the key name defaults to the origin."""
    return sign_note(checkpoint.body(), signer, name or checkpoint.origin)


def parse_note(text: str | bytes) -> Note:
    """Split a signed note into its body and signature lines, rejecting anything malformed."""
    if isinstance(text, bytes):
        if len(text) > MAX_NOTE_BYTES:
            raise CheckpointError(f"note: larger than {MAX_NOTE_BYTES} bytes")
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CheckpointError("note: not valid UTF-8") from exc
    if len(text) > MAX_NOTE_BYTES:
        raise CheckpointError(f"note: larger than {MAX_NOTE_BYTES} bytes")
    if "\r" in text:
        raise CheckpointError("note: contains a carriage return (lines end with \\n only)")
    if not text.endswith("\n"):
        raise CheckpointError("note: must end with a newline")
    split = text.rfind("\n\n")
    if split < 0:
        raise CheckpointError("note: no blank line between the body and the signatures")
    body = text[:split + 1]
    signature_lines = text[split + 2:-1].split("\n")
    if not body.strip("\n") or body.startswith("\n"):
        raise CheckpointError("note: empty body")
    signatures: list[NoteSignature] = []
    for number, line in enumerate(signature_lines, start=1):
        prefix = SIGNATURE_DASH + " "
        if not line.startswith(prefix):
            raise CheckpointError(f"signature line {number}: must start with "
                                  f"'{SIGNATURE_DASH} ' (EM DASH, space)")
        parts = line[len(prefix):].split(" ")
        if len(parts) != 2:
            raise CheckpointError(f"signature line {number}: expected '<name> <base64>'")
        name, blob_text = parts
        _check_key_name(name)
        try:
            blob = b64decode(blob_text)
        except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
            raise CheckpointError(f"signature line {number}: signature is not valid base64") from exc
        if len(blob) <= KEY_HASH_BYTES:
            raise CheckpointError(f"signature line {number}: signature too short")
        signatures.append(NoteSignature(name, blob[:KEY_HASH_BYTES], blob[KEY_HASH_BYTES:]))
    if not signatures:
        raise CheckpointError("note: no signature lines")
    return Note(body=body, signatures=tuple(signatures))


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


def verify_checkpoint(text: str | bytes, public_key: bytes, name: str,
                      origin: str | None = None) -> Checkpoint:
    """Parse `text` and require a valid signature by `public_key` under key name `name`.

    `origin`, if given, must equal the checkpoint's origin (a checkpoint of another log is
    refused even if the same key signed it). Unknown signers are ignored, as the spec says.
    """
    note = parse_note(text)
    expected_hash = key_hash(name, public_key)
    verifier = VerifyKey(public_key)
    found = False
    for sig in note.signatures:
        if sig.name != name or sig.key_hash != expected_hash:
            continue
        if len(sig.signature) != ED25519_SIGNATURE_BYTES:
            raise CheckpointError(f"signature by {name}: must be {ED25519_SIGNATURE_BYTES} bytes")
        try:
            verifier.verify(note.body.encode(), sig.signature)
        except BadSignatureError as exc:
            raise CheckpointError(f"signature by {name}: does not verify") from exc
        found = True
    if not found:
        raise CheckpointError(f"note: no signature by the pinned key {name} "
                              f"({expected_hash.hex()})")
    checkpoint = parse_checkpoint_body(note.body)
    if origin is not None and checkpoint.origin != origin:
        raise CheckpointError(f"checkpoint origin: {checkpoint.origin!r} is not the pinned "
                              f"origin {origin!r}")
    return checkpoint
