"""Canonical encoding, hashing and Ed25519 signing shared by `audit` and `consent`.

One module so that the hospital, the coordinator and the auditor agree byte for byte on what
was signed: RFC 8785 (JCS) canonical JSON, SHA-256, Ed25519 (PyNaCl). Key files hold the raw
32-byte seed, base64-encoded, and are written with 0600 permissions.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import rfc8785
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

KEY_ID_BYTES = 16
# How many of this process's most recent signatures `signed_in_this_process` remembers.
SIGNATURE_MEMO_SIZE = 8192


class SignatureInvalidError(Exception):
    """A signature did not verify against the expected key."""


_C_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                             allow_nan=False).encode
_MAX_SAFE_INTEGER = 2**53 - 1
# A float's placeholder in the C encoder's output: a string that starts with NUL (encoded as
# \u0000), which no input string may start with on this path (such input takes rfc8785's).
_FLOAT_SLOT = re.compile(r'"\\u0000(\d+)"')


class _NotPlainError(Exception):
    """Internal: the value needs the rfc8785 package (non-finite float, odd type, NUL text)."""


def ecmascript_number(value: float) -> str:
    """A finite float as ECMAScript's Number::toString writes it (ECMA-262 7.1.12.1), which
    RFC 8785 prescribes: the shortest round-tripping digits (those of Python's repr), placed
    as plain digits for exponents in (-7, 21], else as d.ddde+/-x; "-0" is "0"."""
    if value == 0:
        return "0"
    if value < 0:
        return "-" + ecmascript_number(-value)
    mantissa, _, exponent = repr(value).partition("e")
    whole, _, fraction = mantissa.partition(".")
    shift = int(exponent) if exponent else 0
    if whole == "0":  # 0.000ddd: the digits start after the leading zeros of the fraction
        digits = fraction.lstrip("0")
        point = shift - (len(fraction) - len(digits))
    else:
        digits = whole + fraction
        point = len(whole) + shift  # value = 0.digits * 10**point
    digits = digits.rstrip("0") or "0"
    if len(digits) <= point <= 21:
        return digits + "0" * (point - len(digits))
    if 0 < point <= 21:
        return digits[:point] + "." + digits[point:]
    if -6 < point <= 0:
        return "0." + "0" * -point + digits
    power = point - 1
    head = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{head}e{'+' if power >= 0 else '-'}{abs(power)}"


def _c_encodable(value: Any, floats: list[str]) -> Any:
    """`value` for the C encoder: floats replaced by numbered placeholders (their ECMAScript
    text collected in `floats`). Raises _NotPlainError for anything the C encoder cannot write
    exactly as RFC 8785 does: integers beyond 2**53, non-finite floats, non-str keys, other
    types, text starting with NUL (the placeholder's mark)."""
    kind = type(value)
    if kind is str:
        if value.startswith("\x00"):
            raise _NotPlainError
        return value
    if kind is bool or value is None:
        return value
    if kind is int:
        if -_MAX_SAFE_INTEGER <= value <= _MAX_SAFE_INTEGER:
            return value
        raise _NotPlainError
    if kind is float:
        if not math.isfinite(value):
            raise _NotPlainError
        floats.append(ecmascript_number(value))
        return f"\x00{len(floats) - 1}"
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str or key.startswith("\x00"):
                raise _NotPlainError
            out[key] = _c_encodable(item, floats)
        return out
    if kind is list:
        return [_c_encodable(item, floats) for item in value]
    raise _NotPlainError  # tuples, subclasses, other types: let rfc8785 decide


def canonical(value: Any) -> bytes:
    r"""RFC 8785 canonical JSON. Integers must stay within +-2**53 (I-JSON).

    Through the C JSON encoder when that is provably the same bytes, else the rfc8785 package
    (pure Python, several times slower: a visible share of a study submission's cost). For ASCII text,
    RFC 8785 equals `json.dumps(sort_keys=True, separators=(",", ":"), ensure_ascii=False)`:
    the same escapes (\b \t \n \f \r, other controls as lowercase \u00xx, only '"' and '\\'
    besides), and sorting ASCII keys by code point equals sorting by UTF-16 code unit. Floats
    are the exception (Python writes 1e-05 and 3.0, ECMAScript 0.00001 and 3): each is encoded
    as a placeholder string, then replaced by `ecmascript_number`'s text. tests/audit checks
    the result against `rfc8785.dumps` (hypothesis), refusals included.
    """
    floats: list[str] = []
    try:
        prepared = _c_encodable(value, floats)
    except _NotPlainError:
        return rfc8785.dumps(value)
    text = _C_ENCODE(prepared)
    if not text.isascii():
        return rfc8785.dumps(value)
    if floats:
        text = _FLOAT_SLOT.sub(lambda slot: floats[int(slot.group(1))], text)
    return text.encode("ascii")


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def b64decode(text: str) -> bytes:
    return base64.b64decode(text.encode("ascii"), validate=True)


def key_id(public_key: bytes) -> str:
    """Stable identifier of a public key: hex of the first 16 bytes of its SHA-256."""
    return hashlib.sha256(public_key).hexdigest()[: 2 * KEY_ID_BYTES]


@dataclass(frozen=True)
class Signer:
    """An Ed25519 private key and its derived identifiers."""

    signing_key: SigningKey

    @classmethod
    def generate(cls) -> Signer:
        return cls(SigningKey.generate())

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        return cls(SigningKey(seed))

    @property
    def public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def public_key_b64(self) -> str:
        return b64encode(self.public_key)

    @property
    def key_id(self) -> str:
        return key_id(self.public_key)

    @property
    def seed(self) -> bytes:
        return bytes(self.signing_key)

    def sign(self, message: bytes) -> bytes:
        signature = self.signing_key.sign(message).signature
        _SIGNATURE_MEMO.remember(self.public_key, message, signature)
        return signature

    def save(self, path: Path) -> None:
        """Write the seed to `path` with 0600 permissions, atomically; never overwrite."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(b64encode(self.seed) + "\n")

    @classmethod
    def load(cls, path: Path) -> Signer:
        mode = path.stat().st_mode & 0o777
        if mode & 0o077:
            raise PermissionError(f"{path}: key file must not be readable by others (mode {mode:o})")
        return cls.from_seed(b64decode(path.read_text().strip()))


class _SignatureMemo:
    """The most recent signatures made by this process's Signers, bounded (oldest forgotten).

    Why: the coordinator appends mostly entries it has just signed itself, and the audit store
    must accept an entry only if its signature verifies; an Ed25519 verification costs several
    times a signing, the largest single cost of an append. A
    signature this process produced with a private key is valid for that key and message by
    construction, so the store may skip verifying exactly that (public key, message, signature)
    triple. The memo holds only public data (signatures and digests), keyed by the signature,
    and matches the SHA-256 of public key and message: any other key, message or signature
    byte is verified the ordinary way.
    """

    def __init__(self, size: int) -> None:
        self._size = size
        self._digests: OrderedDict[bytes, bytes] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _digest(public_key: bytes, message: bytes) -> bytes:
        return hashlib.sha256(len(public_key).to_bytes(2, "big") + public_key + message).digest()

    def remember(self, public_key: bytes, message: bytes, signature: bytes) -> None:
        digest = self._digest(public_key, message)
        with self._lock:
            self._digests[signature] = digest
            if len(self._digests) > self._size:
                self._digests.popitem(last=False)

    def holds(self, public_key: bytes, message: bytes, signature: bytes) -> bool:
        remembered = self._digests.get(signature)
        return remembered is not None and remembered == self._digest(public_key, message)


_SIGNATURE_MEMO = _SignatureMemo(SIGNATURE_MEMO_SIZE)


def signed_in_this_process(public_key: bytes, message: bytes, signature: bytes) -> bool:
    """True if a Signer of this process recently signed `message` with `public_key`'s key and
    produced exactly `signature` (so it verifies; see _SignatureMemo). False means "unknown",
    never "invalid": verify it."""
    return _SIGNATURE_MEMO.holds(public_key, message, signature)


def verify(public_key: bytes, message: bytes, signature: bytes) -> None:
    """Raise SignatureInvalidError unless `signature` is a valid Ed25519 signature of `message`."""
    try:
        VerifyKey(public_key).verify(message, signature)
    except (BadSignatureError, ValueError) as exc:
        raise SignatureInvalidError("signature does not verify") from exc
