"""The log's entry envelope: what is signed, and what is hashed into the Merkle tree.

An envelope is a JSON object
    {"v": 1, "kind": str, "key_id": str, "time": RFC 3339 UTC str, "payload": object,
     "signature": base64 Ed25519 signature}
The signature covers the RFC 8785 encoding of the envelope without "signature"; the Merkle
leaf input is the RFC 8785 encoding of the whole envelope, signature included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from audit.signing import Signer, b64decode, b64encode, canonical, verify

ENVELOPE_VERSION = 1
ENVELOPE_FIELDS = frozenset({"v", "kind", "key_id", "time", "payload", "signature"})
#: The form every time of the log has (`format_time`): fixed widths, ASCII digits.
_TIME_RE = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{6}Z")


class MalformedEntryError(ValueError):
    """The bytes or object are not a well-formed envelope."""


def format_time(instant: datetime) -> str:
    if instant.tzinfo is None:
        raise ValueError("time must be timezone-aware")
    # isoformat, not strftime: the same text (four-digit year, microseconds) far cheaper,
    # on every signed entry.
    return instant.astimezone(UTC).isoformat(timespec="microseconds")[:-6] + "Z"


def parse_time(text: str) -> datetime:
    """The instant of an envelope's `time`: "%Y-%m-%dT%H:%M:%S.%fZ" (UTC), as strptime reads it.

    A time in `format_time`'s fixed-width form is read by `datetime.fromisoformat` (several
    times faster than strptime, which the verifier and the ledger's fold would call per entry);
    the same text gives strptime the same instant, and a date or time fromisoformat refuses
    (month 13, second 60) strptime refuses too. Anything else is strptime's to decide."""
    if _TIME_RE.fullmatch(text):
        try:
            return datetime.fromisoformat(text)
        except ValueError:
            pass
    try:
        parsed = datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError as exc:
        raise MalformedEntryError(f"time: not RFC 3339 UTC with microseconds: {text!r}") from exc
    return parsed.replace(tzinfo=UTC)


class EntryFields(Protocol):
    """What the keyring and the ledger read of an envelope: an `Entry`, or the lighter record
    the verifier decodes a log line into (audit.verify), so that folding a long log does not
    build an `Entry` per line."""

    @property
    def kind(self) -> str: ...
    @property
    def key_id(self) -> str: ...
    @property
    def time(self) -> str: ...
    @property
    def payload(self) -> dict[str, Any]: ...
    @property
    def signature(self) -> str: ...
    @property
    def v(self) -> int: ...


def signed_part(entry: EntryFields) -> dict[str, Any]:
    """The envelope without "signature": what its signature covers (RFC 8785-encoded)."""
    return {"v": entry.v, "kind": entry.kind, "key_id": entry.key_id, "time": entry.time,
            "payload": entry.payload}


@dataclass(frozen=True)
class Entry:
    kind: str
    key_id: str
    time: str
    payload: dict[str, Any]
    signature: str
    v: int = ENVELOPE_VERSION
    # The leaf bytes, when known from where the Entry was made (signed here, or read from the
    # log). Not an __init__ field, so `dataclasses.replace` (any changed field) never carries
    # a stale one over: set it only through `with_leaf`.
    _leaf: bytes = field(default=b"", init=False, compare=False, repr=False)

    def with_leaf(self, leaf: bytes) -> Entry:
        """This Entry, knowing that `leaf` is its RFC 8785 encoding (the caller vouches)."""
        object.__setattr__(self, "_leaf", leaf)
        return self

    def signed_part(self) -> dict[str, Any]:
        return signed_part(self)

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
    """Sign an envelope; the Entry knows its leaf bytes, so the store does not encode it again.

    The leaf is the signed bytes with the signature member put in (RFC 8785 orders the top
    level key_id, kind, payload, signature, time, v): the inverse of
    `audit.verify.signing_input_from_line`; the signature is base64 and the time a fixed
    format, so neither needs escaping. (The payload is encoded once, not twice.)
    """
    entry = Entry(kind=kind, key_id=signer.key_id, time=format_time(instant or datetime.now(UTC)),
                  payload=payload, signature="")
    message = entry.signing_input()
    signature = b64encode(signer.sign(message))
    signed = Entry(kind=entry.kind, key_id=entry.key_id, time=entry.time, payload=payload,
                   signature=signature)
    suffix = b',"time":"' + entry.time.encode() + b'","v":' + str(entry.v).encode() + b"}"
    if message.endswith(suffix):
        signed.with_leaf(message[:-len(suffix)] + b',"signature":"' + signature.encode() + b'"'
                         + suffix)
    return signed
