"""The trust policy an auditor pins: the log's origin and keys, the witnesses, the quorum.

Why: an auditor needs to know, out of band, which key signs the log's checkpoints, which key
is the root of the keyring (audit/keyring.py), and which witnesses must have cosigned a
checkpoint (and how many) before it is believed. `trust.json` says exactly that.

Version 2 (written by this code), every key a C2SP vkey (audit/note.py):

    {"version": 2,
     "origin": "exchange.example/log",
     "log_key": "<name>+<key ID>+<base64(0x01 || key)>",        signs checkpoints; name = origin
     "operator_key": "<origin>/operator+<key ID>+<base64(0x01 || key)>",   root of the keyring
     "witnesses": ["<name>+<key ID>+<base64(0x04 || key)>", ...],          cosignature/v1 keys
     "quorum": 2}                                                   optional; see below

`quorum` is how many distinct witnesses must have cosigned the checkpoint. Absent, it is the
default: a majority of the listed witnesses (n // 2 + 1, which is at least 2 whenever there
are 2 or more), 0 when none is listed. Present, it must be between 1 and the number of
witnesses (or 0 with none).

Version 1 (before witnesses) is still read: {"version": 1, "origin", "operator_public_key",
"log_public_key"} (base64 of raw 32-byte Ed25519 keys); it pins no witness, so its quorum is 0,
and asking for a quorum with it is refused with a message saying so (`witness_quorum`).
"""

from __future__ import annotations

import binascii
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from audit.checkpoint import CheckpointError, check_origin
from audit.cosignature import parse_witness_vkey
from audit.note import SIG_ED25519, NoteError, Vkey
from audit.signing import b64decode
from audit.untrusted import UntrustedJSONError, load_json

TRUST_VERSION = 2
LEGACY_TRUST_VERSION = 1
_V1_FIELDS = frozenset({"version", "origin", "operator_public_key", "log_public_key"})
_V2_REQUIRED = frozenset({"version", "origin", "log_key", "operator_key"})
_V2_FIELDS = _V2_REQUIRED | {"witnesses", "quorum"}
OPERATOR_KEY_SUFFIX = "/operator"


class ExportError(ValueError):
    """The export (or a trust file) is unusable: missing, unreadable or malformed as a whole."""


def default_quorum(witnesses: int) -> int:
    """A majority of `witnesses` (so at least 2 when there are 2 or more); 0 for none."""
    return witnesses // 2 + 1 if witnesses > 0 else 0


@dataclass(frozen=True)
class Trust:
    """The pinned roots: origin, operator key (keyring root), log key, witnesses and quorum.

    The first three fields are the log's trust anchors (what the coordinator's database
    records, audit/store/trust.py); `witnesses` and `quorum` are the cosigning policy on top.
    """

    origin: str
    operator_public_key: bytes
    log_public_key: bytes
    witnesses: tuple[Vkey, ...] = ()
    quorum: int | None = None  # None: default_quorum(len(witnesses))
    log_name: str = ""  # the log key's signed-note name; "" means the origin
    version: int = field(default=TRUST_VERSION, compare=False)

    def __post_init__(self) -> None:
        if not self.log_name:
            object.__setattr__(self, "log_name", self.origin)
        names = [w.name for w in self.witnesses]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ExportError(f"trust.witnesses: the name(s) {duplicates} appear more than once")
        if self.quorum is not None and not 0 <= self.quorum <= len(self.witnesses):
            raise ExportError(f"trust.quorum: {self.quorum} is not between "
                              f"{1 if self.witnesses else 0} and the {len(self.witnesses)} "
                              f"witness(es) listed")
        if self.quorum == 0 and self.witnesses:
            raise ExportError("trust.quorum: must be at least 1 when witnesses are listed "
                              "(leave it out for the default majority)")

    @property
    def log_key_name(self) -> str:
        """The signed-note key name of the log key (the origin, by this project's convention)."""
        return self.log_name

    @property
    def log_vkey(self) -> Vkey:
        return Vkey(self.log_name, SIG_ED25519, self.log_public_key)

    @property
    def operator_vkey(self) -> Vkey:
        return Vkey(self.origin + OPERATOR_KEY_SUFFIX, SIG_ED25519, self.operator_public_key)

    def anchors(self) -> tuple[str, bytes, bytes]:
        """(origin, operator key, log key): what the log's database records once."""
        return (self.origin, self.operator_public_key, self.log_public_key)

    @property
    def default_quorum(self) -> int:
        return self.quorum if self.quorum is not None else default_quorum(len(self.witnesses))

    def witness_quorum(self, override: int | None = None) -> int:
        """The number of witnesses that must cosign: `override` if given, else the policy's.

        ExportError when the policy cannot be met: more witnesses asked for than are pinned
        (a version-1 trust.json pins none).
        """
        needed = self.default_quorum if override is None else override
        if needed < 0:
            raise ExportError(f"witness quorum: must be >= 0, got {needed}")
        if needed > len(self.witnesses):
            if not self.witnesses:
                legacy = (" (a version-1 trust.json, from before witnesses)"
                          if self.version == LEGACY_TRUST_VERSION else "")
                raise ExportError(
                    f"witness quorum {needed}: the trust file pins no witnesses{legacy}; a quorum "
                    f"needs the witnesses' cosignature/v1 vkeys: pin a version-2 trust.json that "
                    f"lists them (\"witnesses\": [\"<name>+<key ID>+<base64>\", ...]), or pass "
                    f"--witness-quorum 0 to accept the log key alone")
            raise ExportError(f"witness quorum {needed}: only {len(self.witnesses)} witness(es) "
                              f"are pinned in the trust file")
        return needed

    def with_witnesses(self, witnesses: Iterable[Vkey], quorum: int | None = None) -> Trust:
        """This policy with `witnesses` (e.g. those registered in the log) and `quorum`."""
        return Trust(self.origin, self.operator_public_key, self.log_public_key,
                     tuple(witnesses), quorum, self.log_name)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"version": TRUST_VERSION, "origin": self.origin,
                               "log_key": str(self.log_vkey),
                               "operator_key": str(self.operator_vkey),
                               "witnesses": [str(w) for w in self.witnesses]}
        if self.quorum is not None:
            out["quorum"] = self.quorum
        return out

    @classmethod
    def from_json(cls, obj: Any) -> Trust:
        if not isinstance(obj, dict):
            raise ExportError("trust: not a JSON object")
        version = obj.get("version")
        if version == LEGACY_TRUST_VERSION:
            return _from_v1(obj)
        if version != TRUST_VERSION:
            raise ExportError(f"trust.version: unsupported {version!r} (expected "
                              f"{TRUST_VERSION}, or {LEGACY_TRUST_VERSION} from before witnesses)")
        _fields(obj, _V2_REQUIRED, _V2_FIELDS)
        origin = _origin(obj)
        log = _ed25519_vkey(obj, "log_key")
        operator = _ed25519_vkey(obj, "operator_key")
        raw_witnesses = obj.get("witnesses", [])
        if not isinstance(raw_witnesses, list):
            raise ExportError("trust.witnesses: must be a list of vkey strings")
        witnesses: list[Vkey] = []
        for position, text in enumerate(raw_witnesses):
            try:
                witnesses.append(parse_witness_vkey(text, f"trust.witnesses[{position}]"))
            except NoteError as exc:
                raise ExportError(str(exc)) from exc
        if any((w.name, w.key_id) == (log.name, log.key_id) for w in witnesses):
            raise ExportError("trust.witnesses: the log key cannot be one of its own witnesses")
        quorum = obj.get("quorum")
        if quorum is not None and (type(quorum) is not int):
            raise ExportError("trust.quorum: must be an integer")
        return cls(origin, operator.public_key, log.public_key, tuple(witnesses), quorum,
                   log.name, version=TRUST_VERSION)


def _fields(obj: dict[str, Any], required: frozenset[str], allowed: frozenset[str]) -> None:
    missing = required - obj.keys()
    extra = obj.keys() - allowed
    if missing:
        raise ExportError(f"trust: missing field(s) {sorted(missing)}")
    if extra:
        raise ExportError(f"trust: unknown field(s) {sorted(extra)}")


def _origin(obj: dict[str, Any]) -> str:
    if not isinstance(obj["origin"], str):
        raise ExportError("trust.origin: must be a string")
    try:
        check_origin(obj["origin"])
    except CheckpointError as exc:
        raise ExportError(f"trust.{exc}") from exc
    origin: str = obj["origin"]
    return origin


def _ed25519_vkey(obj: dict[str, Any], name: str) -> Vkey:
    try:
        vkey = Vkey.parse(obj[name], f"trust.{name}")
    except NoteError as exc:
        raise ExportError(str(exc)) from exc
    if vkey.sig_type != SIG_ED25519:
        raise ExportError(f"trust.{name}: signature type 0x{vkey.sig_type:02x}, expected 0x01 "
                          f"(Ed25519)")
    return vkey


def _from_v1(obj: dict[str, Any]) -> Trust:
    _fields(obj, _V1_FIELDS, _V1_FIELDS)
    origin = _origin(obj)
    keys: dict[str, bytes] = {}
    for name in ("operator_public_key", "log_public_key"):
        value = obj[name]
        try:
            if not isinstance(value, str):
                raise ValueError
            raw = b64decode(value)
        except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
            raise ExportError(f"trust.{name}: not a base64 string") from exc
        if len(raw) != 32:
            raise ExportError(f"trust.{name}: must be a 32-byte Ed25519 key, got {len(raw)} bytes")
        keys[name] = raw
    return Trust(origin, keys["operator_public_key"], keys["log_public_key"],
                 version=LEGACY_TRUST_VERSION)


def read_trust(path: Path) -> Trust:
    """Load a trust file; ExportError (unusable input) if missing, unreadable or malformed."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExportError(f"{path}: cannot read trust file ({exc.strerror})") from exc
    try:
        obj = load_json(raw)
    except UntrustedJSONError as exc:
        raise ExportError(f"{path}: trust file: {exc}") from exc
    try:
        return Trust.from_json(obj)
    except ExportError as exc:
        raise ExportError(f"{path}: {exc}") from exc


def trust_json_bytes(trust: Trust) -> bytes:
    """The trust file's bytes as this package writes them."""
    return (json.dumps(trust.to_json(), indent=2, sort_keys=True) + "\n").encode()
