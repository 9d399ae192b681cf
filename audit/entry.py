"""The log's entry envelope: what is signed, and what is hashed into the Merkle tree.

An envelope is a JSON object
    {"v": 1, "kind": str, "key_id": str, "time": RFC 3339 UTC str, "payload": object,
     "signature": base64 Ed25519 signature}
The signature covers the RFC 8785 encoding of the envelope without "signature"; the Merkle
leaf input is the RFC 8785 encoding of the whole envelope, signature included.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from audit.signing import Signer, b64decode, b64encode, canonical, verify

ENVELOPE_VERSION = 1
ENVELOPE_FIELDS = frozenset({"v", "kind", "key_id", "time", "payload", "signature"})


class MalformedEntryError(ValueError):
    """The bytes or object are not a well-formed envelope."""


def format_time(instant: datetime) -> str:
    if instant.tzinfo is None:
        raise ValueError("time must be timezone-aware")
    return instant.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> datetime:
    try:
        parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError as exc:
        raise MalformedEntryError(f"time: not RFC 3339 UTC with microseconds: {text!r}") from exc
    return parsed.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Entry:
    kind: str
    key_id: str
    time: str
    payload: dict[str, Any]
    signature: str
    v: int = ENVELOPE_VERSION
    _leaf: bytes = field(default=b"", compare=False, repr=False)

    def signed_part(self) -> dict[str, Any]:
        return {"v": self.v, "kind": self.kind, "key_id": self.key_id, "time": self.time,
                "payload": self.payload}

    def to_json(self) -> dict[str, Any]:
        return {**self.signed_part(), "signature": self.signature}

    def leaf_bytes(self) -> bytes:
        """The exact bytes hashed into the Merkle tree (RFC 8785 of the whole envelope)."""
        return self._leaf or canonical(self.to_json())

    def signing_input(self) -> bytes:
        return canonical(self.signed_part())

    def verify_signature(self, public_key: bytes) -> None:
        """Raise audit.signing.SignatureInvalidError if the signature is not by `public_key`."""
        verify(public_key, self.signing_input(), b64decode(self.signature))

    @classmethod
    def from_json(cls, obj: Any) -> Entry:
        if not isinstance(obj, dict):
            raise MalformedEntryError("envelope: not a JSON object")
        missing = ENVELOPE_FIELDS - obj.keys()
        extra = obj.keys() - ENVELOPE_FIELDS
        if missing:
            raise MalformedEntryError(f"envelope: missing field(s) {sorted(missing)}")
        if extra:
            raise MalformedEntryError(f"envelope: unknown field(s) {sorted(extra)}")
        if obj["v"] != ENVELOPE_VERSION:
            raise MalformedEntryError(f"v: unsupported envelope version {obj['v']!r}")
        for name in ("kind", "key_id", "time", "signature"):
            if not isinstance(obj[name], str) or not obj[name]:
                raise MalformedEntryError(f"{name}: must be a non-empty string")
        if not isinstance(obj["payload"], dict):
            raise MalformedEntryError("payload: must be a JSON object")
        parse_time(obj["time"])
        return cls(kind=obj["kind"], key_id=obj["key_id"], time=obj["time"],
                   payload=obj["payload"], signature=obj["signature"])


def sign_entry(signer: Signer, kind: str, payload: dict[str, Any],
               instant: datetime | None = None) -> Entry:
    unsigned = Entry(kind=kind, key_id=signer.key_id,
                     time=format_time(instant or datetime.now(UTC)), payload=payload,
                     signature="")
    return Entry(kind=unsigned.kind, key_id=unsigned.key_id, time=unsigned.time,
                 payload=unsigned.payload,
                 signature=b64encode(signer.sign(unsigned.signing_input())))
