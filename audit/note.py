"""C2SP signed notes (c2sp.org/signed-note): text signed by any number of keys, and vkeys.

Why a module of its own: a checkpoint carries the log's signature and, since witnesses cosign
it, several more (c2sp.org/tlog-cosignature); the log key, the witnesses and an auditor must
agree byte for byte on how a note is split, which lines count and which keys are known. The
rules follow the spec and the Go reference (golang.org/x/mod/sumdb/note, `Open`):

    <text, every line ending in \\n>\\n
    — <key name> <base64(4-byte key ID || signature)>\\n      (one or more lines; — is U+2014)

- a note is valid UTF-8 with no ASCII control character but the newline; the text ends with a
  newline and is separated from the signatures by the LAST blank line; the text may contain
  blank lines itself;
- a key name is non-empty, without Unicode spaces or '+';
- a signature line decodes to at least 5 bytes (key ID and one signature byte);
- at most MAX_SIGNATURES lines (the spec asks verifiers to accept at least 16; Go's limit is
  100) and MAX_NOTE_BYTES in all;
- a signature whose (name, key ID) is unknown is ignored; the first line of a known key is
  verified and a failure rejects the whole note; repeated lines of one key are ignored
  (as Go does); a note with no verified signature is rejected when one is required.

Key IDs: SHA-256(key name || 0x0A || signature type || public key)[:4], big endian. Vkeys:
`<name>+<8 lowercase hex digits of the key ID>+<base64(signature type || public key)>`.
Signature types used here: 0x01 (Ed25519 over the text) and 0x04 (timestamped Ed25519
cosignature/v1, audit/cosignature.py).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from audit.signing import Signer, b64encode

SIGNATURE_DASH = "\u2014"  # EM DASH
SIGNATURE_PREFIX = SIGNATURE_DASH + " "
SIG_ED25519 = 0x01
SIG_COSIGNATURE_V1 = 0x04
KEY_ID_BYTES = 4
ED25519_KEY_BYTES = 32
ED25519_SIGNATURE_BYTES = 64
MAX_NOTE_BYTES = 1 << 20
MAX_SIGNATURES = 100

# The key types this package can verify, with their public key length.
KEY_TYPES: dict[int, tuple[str, int]] = {SIG_ED25519: ("Ed25519", ED25519_KEY_BYTES),
                                         SIG_COSIGNATURE_V1: ("cosignature/v1 Ed25519",
                                                              ED25519_KEY_BYTES)}

_HEX8 = re.compile(r"[0-9a-f]{8}")
_CONTROL = re.compile(r"[\x00-\x09\x0b-\x1f]")


class NoteError(ValueError):
    """A note, signature line or vkey is malformed or does not verify; the message says why."""


def check_key_name(name: str, what: str = "key name") -> None:
    """Raise NoteError unless `name` is a valid key name (non-empty, no spaces, no '+')."""
    if not name:
        raise NoteError(f"{what}: must not be empty")
    if any(c.isspace() for c in name) or "+" in name:
        raise NoteError(f"{what}: {name!r} must not contain spaces or '+'")
    if _CONTROL.search(name):
        raise NoteError(f"{what}: {name!r} contains a control character")


def key_id(name: str, sig_type: int, public_key: bytes) -> bytes:
    """The 4-byte key ID: SHA-256(name || 0x0A || type || public key)[:4]."""
    check_key_name(name)
    digest = hashlib.sha256(name.encode() + b"\n" + bytes([sig_type]) + public_key).digest()
    return digest[:KEY_ID_BYTES]


@dataclass(frozen=True)
class Vkey:
    """A verifier key: name, signature type and public key (the key ID is derived)."""

    name: str
    sig_type: int
    public_key: bytes

    def __post_init__(self) -> None:
        check_key_name(self.name)
        kind = KEY_TYPES.get(self.sig_type)
        if kind is None:
            raise NoteError(f"vkey {self.name}: unsupported signature type 0x{self.sig_type:02x} "
                            f"(supported: {', '.join(f'0x{t:02x}' for t in sorted(KEY_TYPES))})")
        if len(self.public_key) != kind[1]:
            raise NoteError(f"vkey {self.name}: a {kind[0]} public key has {kind[1]} bytes, "
                            f"got {len(self.public_key)}")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, self.sig_type, self.public_key)

    def __str__(self) -> str:
        return (f"{self.name}+{self.key_id.hex()}+"
                f"{b64encode(bytes([self.sig_type]) + self.public_key)}")

    @classmethod
    def parse(cls, text: str, what: str = "vkey") -> Vkey:
        """Parse `<name>+<hex key ID>+<base64(type || key)>`; the key ID must match."""
        if not isinstance(text, str):
            raise NoteError(f"{what}: must be a string")
        parts = text.split("+", 2)  # the base64 key may itself contain '+'
        if len(parts) != 3:
            raise NoteError(f"{what}: {text!r} is not <name>+<key ID>+<base64 key>")
        name, hex_id, key_text = parts
        try:
            check_key_name(name)
        except NoteError as exc:
            raise NoteError(f"{what}: {exc}") from exc
        if not _HEX8.fullmatch(hex_id):
            raise NoteError(f"{what}: key ID {hex_id!r} is not 8 lowercase hex digits")
        try:  # as Go's decoder: padding required, unused bits not checked
            raw = base64.b64decode(key_text.encode("ascii"), validate=True)
        except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
            raise NoteError(f"{what}: public key is not valid base64") from exc
        if not raw:
            raise NoteError(f"{what}: empty public key")
        try:
            vkey = cls(name, raw[0], raw[1:])
        except NoteError as exc:
            raise NoteError(f"{what}: {exc}") from exc
        if vkey.key_id.hex() != hex_id:
            raise NoteError(f"{what}: key ID {hex_id} does not match the name and key "
                            f"(expected {vkey.key_id.hex()})")
        return vkey


def ed25519_vkey(name: str, public_key: bytes) -> Vkey:
    return Vkey(name, SIG_ED25519, public_key)


@dataclass(frozen=True)
class NoteSignature:
    """One signature line: key name, 4-byte key ID, signature bytes (after the key ID)."""

    name: str
    key_hash: bytes
    signature: bytes

    @property
    def line(self) -> str:
        """The signature line, with its newline."""
        return f"{SIGNATURE_PREFIX}{self.name} {b64encode(self.key_hash + self.signature)}\n"


@dataclass(frozen=True)
class Note:
    """A parsed note: the signed text (`body`, with its final newline) and its signatures."""

    body: str
    signatures: tuple[NoteSignature, ...]

    def text(self) -> str:
        """The note as text: body, blank line, signature lines."""
        return self.body + "\n" + "".join(sig.line for sig in self.signatures)


def _decode(text: str | bytes) -> str:
    if isinstance(text, bytes):
        if len(text) > MAX_NOTE_BYTES:
            raise NoteError(f"note: larger than {MAX_NOTE_BYTES} bytes")
        try:
            return text.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise NoteError("note: not valid UTF-8") from exc
    if len(text) > MAX_NOTE_BYTES:
        raise NoteError(f"note: larger than {MAX_NOTE_BYTES} bytes")
    return text


def parse_signature_line(line: str, number: int = 1) -> NoteSignature:
    """Parse one signature line (without its newline)."""
    where = f"signature line {number}"
    if not line.startswith(SIGNATURE_PREFIX):
        raise NoteError(f"{where}: must start with '{SIGNATURE_DASH} ' (EM DASH, space)")
    parts = line[len(SIGNATURE_PREFIX):].split(" ")
    if len(parts) != 2:
        raise NoteError(f"{where}: expected '<name> <base64>'")
    name, blob_text = parts
    try:
        check_key_name(name)
    except NoteError as exc:
        raise NoteError(f"{where}: {exc}") from exc
    try:
        blob = base64.b64decode(blob_text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise NoteError(f"{where}: signature is not valid base64") from exc
    if len(blob) <= KEY_ID_BYTES:
        raise NoteError(f"{where}: signature too short ({len(blob)} bytes; a key ID and a "
                        f"signature are needed)")
    return NoteSignature(name, blob[:KEY_ID_BYTES], blob[KEY_ID_BYTES:])


def parse_signature_lines(text: str) -> list[NoteSignature]:
    """Parse a block of signature lines, each ending in a newline (a witness's response)."""
    if not text.endswith("\n"):
        raise NoteError("signatures: must end with a newline")
    lines = text[:-1].split("\n")
    if len(lines) > MAX_SIGNATURES:
        raise NoteError(f"signatures: more than {MAX_SIGNATURES} lines")
    return [parse_signature_line(line, number) for number, line in enumerate(lines, start=1)]


def parse_note(text: str | bytes) -> Note:
    """Split a signed note into its text and signature lines, rejecting anything malformed.

    Verifies nothing (see `open_note`).
    """
    text = _decode(text)
    control = _CONTROL.search(text)
    if control is not None:
        what = "a carriage return" if control.group() == "\r" else "a control character"
        raise NoteError(f"note: contains {what} at offset {control.start()} (only \\n is "
                        f"allowed)")
    if not text.endswith("\n"):
        raise NoteError("note: must end with a newline")
    split = text.rfind("\n\n")
    if split < 0:
        raise NoteError("note: no blank line between the body and the signatures")
    body = text[:split + 1]
    block = text[split + 2:]
    if not block:
        raise NoteError("note: no signature lines")
    if body == "\n" or not body:
        raise NoteError("note: empty body")
    return Note(body=body, signatures=tuple(parse_signature_lines(block)))


class NoteVerifier(Protocol):
    """A known key: its name, key ID and how it checks a signature over a note's text."""

    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def verify(self, body: bytes, signature: bytes) -> bool: ...


class NoteSigner(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def key_id(self) -> bytes: ...

    def sign(self, body: bytes) -> bytes: ...


@dataclass(frozen=True)
class Ed25519Verifier:
    """Signature type 0x01: a plain Ed25519 signature over the note text."""

    name: str
    public_key: bytes
    _key: VerifyKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        Vkey(self.name, SIG_ED25519, self.public_key)  # validates name and key length
        object.__setattr__(self, "_key", VerifyKey(self.public_key))

    @classmethod
    def from_vkey(cls, vkey: Vkey) -> Ed25519Verifier:
        if vkey.sig_type != SIG_ED25519:
            raise NoteError(f"vkey {vkey.name}: type 0x{vkey.sig_type:02x}, expected 0x01 "
                            f"(Ed25519)")
        return cls(vkey.name, vkey.public_key)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, SIG_ED25519, self.public_key)

    @property
    def vkey(self) -> Vkey:
        return Vkey(self.name, SIG_ED25519, self.public_key)

    def verify(self, body: bytes, signature: bytes) -> bool:
        if len(signature) != ED25519_SIGNATURE_BYTES:
            return False
        try:
            self._key.verify(body, signature)
        except BadSignatureError:
            return False
        return True


@dataclass(frozen=True)
class Ed25519NoteSigner:
    """Signs note texts with signature type 0x01 under key name `name`."""

    name: str
    signer: Signer

    def __post_init__(self) -> None:
        check_key_name(self.name)

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, SIG_ED25519, self.signer.public_key)

    @property
    def vkey(self) -> Vkey:
        return Vkey(self.name, SIG_ED25519, self.signer.public_key)

    def sign(self, body: bytes) -> bytes:
        return self.signer.sign(body)


def signature_for(body: str, signer: NoteSigner) -> NoteSignature:
    """`signer`'s signature line over the note text `body` (which must end with a newline)."""
    if not body.endswith("\n"):
        raise NoteError("body: must end with a newline")
    return NoteSignature(signer.name, signer.key_id, signer.sign(body.encode()))


def sign_note(body: str, *signers: NoteSigner) -> str:
    """A note of `body` signed by each of `signers`, in order."""
    if not signers:
        raise NoteError("sign_note: at least one signer is needed")
    return Note(body, tuple(signature_for(body, s) for s in signers)).text()


def add_signatures(note: Note, signatures: Iterable[NoteSignature]) -> Note:
    """`note` with `signatures` appended; a line already present (same bytes) is not repeated."""
    seen = {sig.line for sig in note.signatures}
    merged = list(note.signatures)
    for sig in signatures:
        if sig.line not in seen:
            seen.add(sig.line)
            merged.append(sig)
    if len(merged) > MAX_SIGNATURES:
        raise NoteError(f"note: more than {MAX_SIGNATURES} signatures")
    return Note(note.body, tuple(merged))


@dataclass(frozen=True)
class OpenedNote:
    """A note whose known signatures all verified."""

    body: str
    verified: tuple[tuple[NoteSignature, NoteVerifier], ...]
    unverified: tuple[NoteSignature, ...]

    def verified_by(self, name: str, key: bytes) -> NoteSignature | None:
        for sig, _verifier in self.verified:
            if sig.name == name and sig.key_hash == key:
                return sig
        return None


def open_note(text: str | bytes | Note, verifiers: Sequence[NoteVerifier], *,
              require_verified: bool = True) -> OpenedNote:
    """Verify a note against known keys (Go's `note.Open`).

    A line whose (name, key ID) matches no verifier is kept as unverified; the first line of a
    known key must verify (NoteError names the key otherwise), later lines of the same key are
    ignored; with `require_verified`, a note that no known key signed is refused. Two
    verifiers with the same name and key ID are ambiguous (NoteError if a line uses them).
    """
    note = text if isinstance(text, Note) else parse_note(text)
    known: dict[tuple[str, bytes], list[NoteVerifier]] = {}
    for verifier in verifiers:
        known.setdefault((verifier.name, verifier.key_id), []).append(verifier)
    body = note.body.encode()
    verified: list[tuple[NoteSignature, NoteVerifier]] = []
    unverified: list[NoteSignature] = []
    seen: set[tuple[str, bytes]] = set()
    seen_unknown: set[str] = set()
    for sig in note.signatures:
        ident = (sig.name, sig.key_hash)
        candidates = known.get(ident)
        if candidates is None:
            if sig.line not in seen_unknown:
                seen_unknown.add(sig.line)
                unverified.append(sig)
            continue
        if len(candidates) > 1:
            raise NoteError(f"ambiguous key {sig.name}+{sig.key_hash.hex()}")
        if ident in seen:
            continue
        seen.add(ident)
        if not candidates[0].verify(body, sig.signature):
            raise NoteError(f"signature by {sig.name}+{sig.key_hash.hex()}: does not verify")
        verified.append((sig, candidates[0]))
    if require_verified and not verified:
        names = ", ".join(f"{name}+{kid.hex()}" for name, kid in known) or "none"
        raise NoteError(f"note: no signature by a known key (known: {names})")
    return OpenedNote(note.body, tuple(verified), tuple(unverified))
