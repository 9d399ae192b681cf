"""Witness cosignatures on checkpoints: C2SP tlog-cosignature, Ed25519 `cosignature/v1`.

Why: a checkpoint signed by the log alone lets a dishonest operator show one history to an
auditor and another to a hospital. A witness (a hospital) cosigns a checkpoint only after
checking it is consistent with every checkpoint it cosigned before (audit/witness.py), so a
quorum of cosignatures means no split view went unnoticed by that many independent parties.

A cosignature is a note signature line (audit/note.py) whose
- key ID is SHA-256(<name> || "\\n" || 0x04 || 32-byte Ed25519 public key)[:4], and
- signature is timestamp (u64, big endian, POSIX seconds, at most 2^63 - 1) || Ed25519
  signature over "cosignature/v1\\ntime <timestamp>\\n" followed by the whole checkpoint body.

Witness public keys travel as vkeys with signature type 0x04:
`<name>+<hex key ID>+<base64(0x04 || key)>`. The format matches transparency-dev/formats
(`note.NewSignerForCosignatureV1`) and filippo.io/torchwood byte for byte (tested against
their published vectors in tests/audit/test_cosignature.py).

Verification policy (`check_cosignatures`): lines from unknown keys are ignored; the first
line of a known witness must be well formed and verify, otherwise the whole note is refused
(signed-note: "clients SHOULD reject the whole note"); a cosignature dated more than
`max_future_s` after `now` is not counted and is reported ("verifiers MAY reject cosignatures
with timestamps in the future").
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from nacl.exceptions import BadSignatureError
from nacl.signing import VerifyKey

from audit.note import (
    ED25519_SIGNATURE_BYTES,
    SIG_COSIGNATURE_V1,
    Note,
    NoteError,
    NoteSignature,
    Vkey,
    check_key_name,
    key_id,
    parse_note,
)
from audit.signing import Signer

COSIGNATURE_HEADER = "cosignature/v1"
TIMESTAMP_BYTES = 8
COSIGNATURE_BYTES = TIMESTAMP_BYTES + ED25519_SIGNATURE_BYTES
MAX_TIMESTAMP = 2**63 - 1
DEFAULT_MAX_FUTURE_S = 300  # clock skew tolerated between a witness and whoever checks it


class CosignatureError(NoteError):
    """A cosignature is malformed, from an unknown key, does not verify, or is dated ahead."""


def cosigned_message(body: bytes, timestamp: int) -> bytes:
    """The bytes a cosignature/v1 signs: header line, time line, the checkpoint body."""
    if not 0 <= timestamp <= MAX_TIMESTAMP:
        raise CosignatureError(f"timestamp: {timestamp} is outside 0..2^63-1")
    if body.count(b"\n") < 2:  # as Go's formatEd25519CosignatureV1: at least three lines
        raise CosignatureError("cosigned note: the body has fewer than three lines")
    return f"{COSIGNATURE_HEADER}\ntime {timestamp}\n".encode() + body


def witness_vkey(name: str, public_key: bytes) -> Vkey:
    """The type-0x04 vkey of a witness."""
    return Vkey(name, SIG_COSIGNATURE_V1, public_key)


def parse_witness_vkey(text: str, what: str = "witness vkey") -> Vkey:
    """Parse a witness vkey; it must be a cosignature/v1 (type 0x04) Ed25519 key."""
    vkey = Vkey.parse(text, what)
    if vkey.sig_type != SIG_COSIGNATURE_V1:
        raise CosignatureError(f"{what}: {vkey.name} has signature type 0x{vkey.sig_type:02x}; "
                               f"a witness key must be a cosignature/v1 key (type 0x04)")
    return vkey


def split_cosignature(signature: bytes) -> tuple[int, bytes]:
    """(timestamp, Ed25519 signature) of a cosignature's bytes after the key ID."""
    if len(signature) != COSIGNATURE_BYTES:
        raise CosignatureError(f"cosignature: {len(signature)} bytes, expected "
                               f"{COSIGNATURE_BYTES} (8-byte timestamp and 64-byte signature)")
    timestamp = int.from_bytes(signature[:TIMESTAMP_BYTES], "big")
    if timestamp > MAX_TIMESTAMP:
        raise CosignatureError(f"cosignature: timestamp {timestamp} exceeds 2^63-1")
    return timestamp, signature[TIMESTAMP_BYTES:]


@dataclass(frozen=True)
class CosignatureV1Signer:
    """A witness's signing key under its name: produces cosignature/v1 signature lines."""

    name: str
    signer: Signer

    def __post_init__(self) -> None:
        check_key_name(self.name, "witness name")

    @property
    def key_id(self) -> bytes:
        return key_id(self.name, SIG_COSIGNATURE_V1, self.signer.public_key)

    @property
    def vkey(self) -> Vkey:
        return witness_vkey(self.name, self.signer.public_key)

    def cosign(self, body: str | bytes, timestamp: int | None = None) -> NoteSignature:
        """The cosignature line over the checkpoint body at `timestamp` (default: now)."""
        raw = body.encode() if isinstance(body, str) else body
        when = int(time.time()) if timestamp is None else timestamp
        signature = self.signer.sign(cosigned_message(raw, when))
        return NoteSignature(self.name, self.key_id,
                             when.to_bytes(TIMESTAMP_BYTES, "big") + signature)

    def sign(self, body: bytes) -> bytes:
        """The note-signer interface (audit.note.NoteSigner): timestamp now."""
        return self.cosign(body).signature


@dataclass(frozen=True)
class CosignatureV1Verifier:
    """Checks cosignature/v1 lines of one witness (audit.note.NoteVerifier)."""

    vkey: Vkey
    _key: VerifyKey = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.vkey.sig_type != SIG_COSIGNATURE_V1:
            raise CosignatureError(f"vkey {self.vkey.name}: not a cosignature/v1 key (type 0x04)")
        object.__setattr__(self, "_key", VerifyKey(self.vkey.public_key))

    @property
    def name(self) -> str:
        return self.vkey.name

    @property
    def key_id(self) -> bytes:
        return self.vkey.key_id

    def timestamp(self, body: bytes, signature: bytes) -> int:
        """The verified timestamp of `signature` over `body`; CosignatureError if it fails."""
        timestamp, raw = split_cosignature(signature)
        try:
            self._key.verify(cosigned_message(body, timestamp), raw)
        except BadSignatureError as exc:
            raise CosignatureError(f"cosignature by {self.name}: does not verify") from exc
        return timestamp

    def verify(self, body: bytes, signature: bytes) -> bool:
        try:
            self.timestamp(body, signature)
        except CosignatureError:
            return False
        return True


@dataclass(frozen=True)
class CosignatureReport:
    """Which of the given witnesses cosigned a note, and how."""

    signed: dict[str, int]  # witness name -> timestamp of its (valid) cosignature
    future: dict[str, int]  # valid but dated more than max_future_s ahead: not counted
    missing: tuple[str, ...]  # witnesses with no cosignature line on the note

    @property
    def counted(self) -> tuple[str, ...]:
        return tuple(self.signed)


def check_cosignatures(note: str | bytes | Note, witnesses: Sequence[Vkey], *,
                       now: float | None = None,
                       max_future_s: int = DEFAULT_MAX_FUTURE_S) -> CosignatureReport:
    """Verify the cosignatures of `witnesses` on `note` (the log signature is not checked here).

    Raises CosignatureError if a known witness's first line is malformed or does not verify
    (the note is then not to be trusted at all). Lines of other keys are ignored.
    """
    parsed = note if isinstance(note, Note) else parse_note(note)
    body = parsed.body.encode()
    limit = (time.time() if now is None else now) + max_future_s
    by_id = {(w.name, w.key_id): CosignatureV1Verifier(w) for w in witnesses}
    signed: dict[str, int] = {}
    future: dict[str, int] = {}
    seen: set[tuple[str, bytes]] = set()
    for sig in parsed.signatures:
        ident = (sig.name, sig.key_hash)
        verifier = by_id.get(ident)
        if verifier is None or ident in seen:
            continue
        seen.add(ident)
        timestamp = verifier.timestamp(body, sig.signature)
        if timestamp > limit:
            future[sig.name] = timestamp
        else:
            signed[sig.name] = timestamp
    missing = tuple(w.name for w in witnesses if w.name not in signed and w.name not in future)
    return CosignatureReport(signed=signed, future=future, missing=missing)
