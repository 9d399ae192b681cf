"""Which keys may sign which log entries, replayed from the log itself.

Why: an entry is accepted only if its signer was registered by an earlier entry of the same log,
so anyone holding the log (and the pinned root operator key from `trust.json`) can replay key
registrations, rotations and revocations and decide, entry by entry, whether the signer was
allowed at that moment. The coordinator's store and the offline verifier run this same code.

Rules (docs/CONTRACTS.md):
- The root operator key (pinned in trust.json) is registered implicitly, role "operator".
- `key.register` {"key_id", "public_key" (base64), "role", "owner"} signed by a current operator
  key; `key_id` must equal `audit.signing.key_id(public_key)`; a key id is registered at most once.
  Optionally "witness_vkey": the owner's witness key, a C2SP cosignature/v1 vkey
  (`<name>+<key ID>+<base64(0x04 || key)>`, audit/cosignature.py), for roles hospital and
  auditor only; no other active registration may hold the same witness name or key. It stays
  with the owner across `key.rotate` and ends with `key.revoke`; `witnesses()` lists the
  active ones (what the trust policy's witnesses are built from).
- `key.revoke` {"key_id", "reason"} signed by a current operator key: the key signs nothing after.
- `key.rotate` {"old_key_id", "new_key_id", "new_public_key"} signed by the OLD key: the new key
  inherits role and owner; the old key signs nothing after it.
- Any other `key.*` kind is refused, so a typo cannot silently register nothing.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any

from audit.cosignature import parse_witness_vkey
from audit.entry import EntryFields, signed_part
from audit.note import NoteError, Vkey
from audit.signing import SignatureInvalidError, b64decode, canonical, key_id, verify

ROLES = frozenset({"operator", "coordinator", "hospital", "researcher", "auditor"})
KEY_KINDS = frozenset({"key.register", "key.revoke", "key.rotate"})
ROOT_INDEX = -1
PUBLIC_KEY_BYTES = 32

_REGISTER_FIELDS = frozenset({"key_id", "public_key", "role", "owner"})
WITNESS_FIELD = "witness_vkey"
WITNESS_ROLES = frozenset({"hospital", "auditor"})
_REVOKE_FIELDS = frozenset({"key_id", "reason"})
_ROTATE_FIELDS = frozenset({"old_key_id", "new_key_id", "new_public_key"})


class KeyringError(ValueError):
    """Entry `index` is not allowed by the key state; `reason` says why."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"entry {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass
class KeyRecord:
    """One key's history: registered at `registered_at` (-1: root), ended at `ended_at` if any."""

    key_id: str
    public_key: bytes
    role: str
    owner: str
    registered_at: int
    ended_at: int | None = None
    ended_how: str | None = None  # "revoked: <reason>" or "rotated to <key id>"
    witness: Vkey | None = None  # the owner's witness key (cosignature/v1), if registered

    @property
    def active(self) -> bool:
        return self.ended_at is None


def _fields(index: int, payload: dict[str, Any], kind: str, expected: frozenset[str],
            optional: frozenset[str] = frozenset()) -> None:
    missing = expected - payload.keys()
    extra = payload.keys() - expected - optional
    if missing:
        raise KeyringError(index, f"{kind} payload: missing field(s) {sorted(missing)}")
    if extra:
        raise KeyringError(index, f"{kind} payload: unknown field(s) {sorted(extra)}")
    for name in sorted(expected):
        if not isinstance(payload[name], str) or not payload[name]:
            raise KeyringError(index, f"{kind} payload.{name}: must be a non-empty string")


def _public_key(index: int, field_name: str, text: str, claimed_id: str, id_field: str) -> bytes:
    try:
        raw = b64decode(text)
    except (binascii.Error, ValueError, UnicodeEncodeError) as exc:
        raise KeyringError(index, f"payload.{field_name}: not valid base64") from exc
    if len(raw) != PUBLIC_KEY_BYTES:
        raise KeyringError(index, f"payload.{field_name}: must be {PUBLIC_KEY_BYTES} bytes, "
                                  f"got {len(raw)}")
    if key_id(raw) != claimed_id:
        raise KeyringError(index, f"payload.{id_field}: {claimed_id!r} is not the key id of "
                                  f"payload.{field_name} ({key_id(raw)!r})")
    return raw


class Keyring:
    """Key state replayed from the log, rooted in the pinned operator public key."""

    def __init__(self, root_operator_public_key: bytes, root_owner: str = "operator") -> None:
        if len(root_operator_public_key) != PUBLIC_KEY_BYTES:
            raise ValueError(f"root operator public key: must be {PUBLIC_KEY_BYTES} bytes")
        root_id = key_id(root_operator_public_key)
        self.root_key_id = root_id
        self._keys: dict[str, KeyRecord] = {
            root_id: KeyRecord(root_id, root_operator_public_key, "operator", root_owner,
                               ROOT_INDEX)}

    # -- queries -------------------------------------------------------------------------
    def get(self, kid: str) -> KeyRecord | None:
        return self._keys.get(kid)

    def public_key(self, kid: str) -> bytes:
        record = self._keys.get(kid)
        if record is None:
            raise KeyError(kid)
        return record.public_key

    def role(self, kid: str) -> str | None:
        record = self._keys.get(kid)
        return None if record is None else record.role

    def owner(self, kid: str) -> str | None:
        record = self._keys.get(kid)
        return None if record is None else record.owner

    def records(self) -> list[KeyRecord]:
        return list(self._keys.values())

    def witnesses(self) -> dict[str, Vkey]:
        """Owner -> witness vkey, for every active registration that carries one, in log order."""
        return {r.owner: r.witness for r in self._keys.values()
                if r.active and r.witness is not None}

    # -- the two operations of the contract ----------------------------------------------
    def signer_record(self, entry: EntryFields, index: int) -> KeyRecord:
        """The active record of the entry's signer, or KeyringError saying why there is none."""
        record = self._keys.get(entry.key_id)
        if record is None:
            raise KeyringError(index, f"key_id: {entry.key_id} is not registered")
        if record.ended_at is not None:
            raise KeyringError(index, f"key_id: {entry.key_id} was {record.ended_how} at entry "
                                      f"{record.ended_at} and may sign nothing after it")
        return record

    def check(self, entry: EntryFields, index: int, *, verify_signature: bool = True) -> None:
        """Raise KeyringError unless `entry` may stand at `index` given the state so far.

        Checks the signer is registered and active, the signature (unless the caller verified
        it already, e.g. the verifier does signatures in bulk), and for `key.*` entries the
        payload and the authority of the signer. Changes nothing.
        """
        record = self.signer_record(entry, index)
        if verify_signature:
            try:
                verify(record.public_key, canonical(signed_part(entry)), b64decode(entry.signature))
            except (SignatureInvalidError, binascii.Error, ValueError) as exc:
                raise KeyringError(index, f"signature: does not verify with key "
                                          f"{entry.key_id}") from exc
        if entry.kind.startswith("key."):
            self._validate_key_entry(entry, index, record)

    def apply(self, entry: EntryFields, index: int) -> None:
        """Update the key state with `entry` (which `check` accepted). Non-key kinds: no-op.

        The payload is validated again (cheap, no signature check) so that a caller that
        skipped `check` cannot corrupt the state.
        """
        if not entry.kind.startswith("key."):
            return
        record = self.signer_record(entry, index)
        self._validate_key_entry(entry, index, record)
        self._apply_key_entry(entry, index, record)

    def admit(self, entry: EntryFields, index: int) -> bytes:
        """`check` (without the signature) then `apply`, with one look-up of the signer: the
        public key the caller must verify the entry's signature with (the signer's key as it
        was before this entry, e.g. the old key of a `key.rotate`). The verifier's per-entry
        call; KeyringError (nothing changed) if the entry may not stand at `index`."""
        record = self.signer_record(entry, index)
        if entry.kind.startswith("key."):
            self._validate_key_entry(entry, index, record)
            self._apply_key_entry(entry, index, record)
        return record.public_key

    def _apply_key_entry(self, entry: EntryFields, index: int, record: KeyRecord) -> None:
        payload = entry.payload
        if entry.kind == "key.register":
            kid = payload["key_id"]
            witness = payload.get(WITNESS_FIELD)
            self._keys[kid] = KeyRecord(kid, b64decode(payload["public_key"]), payload["role"],
                                        payload["owner"], index,
                                        witness=None if witness is None
                                        else parse_witness_vkey(witness))
        elif entry.kind == "key.revoke":
            target = self._keys[payload["key_id"]]
            target.ended_at = index
            target.ended_how = f"revoked ({payload['reason']})"
        else:  # key.rotate
            new_id = payload["new_key_id"]
            self._keys[new_id] = KeyRecord(new_id, b64decode(payload["new_public_key"]),
                                           record.role, record.owner, index,
                                           witness=record.witness)
            record.ended_at = index
            record.ended_how = f"rotated to {new_id}"

    # -- internals -------------------------------------------------------------------------
    def _validate_witness(self, index: int, payload: dict[str, Any]) -> None:
        where = f"key.register payload.{WITNESS_FIELD}"
        if payload["role"] not in WITNESS_ROLES:
            raise KeyringError(index, f"{where}: only roles {sorted(WITNESS_ROLES)} may register "
                                      f"a witness key, not {payload['role']!r}")
        text = payload[WITNESS_FIELD]
        if not isinstance(text, str):
            raise KeyringError(index, f"{where}: must be a vkey string")
        try:
            vkey = parse_witness_vkey(text, where)
        except NoteError as exc:
            raise KeyringError(index, str(exc)) from exc
        for other in self._keys.values():
            if other.active and other.witness is not None and (
                    other.witness.name == vkey.name
                    or other.witness.public_key == vkey.public_key):
                raise KeyringError(index, f"{where}: witness {vkey.name} conflicts with the witness "
                                          f"{other.witness.name} of {other.owner} (registered at "
                                          f"entry {other.registered_at}): names and keys are "
                                          f"unique among active witnesses")

    def _validate_key_entry(self, entry: EntryFields, index: int, signer: KeyRecord) -> None:
        kind, payload = entry.kind, entry.payload
        if kind not in KEY_KINDS:
            raise KeyringError(index, f"kind: unknown key kind {kind!r} "
                                      f"(expected one of {sorted(KEY_KINDS)})")
        if kind == "key.register":
            _fields(index, payload, kind, _REGISTER_FIELDS, frozenset({WITNESS_FIELD}))
            if signer.role != "operator":
                raise KeyringError(index, f"key.register: signer {signer.key_id} has role "
                                          f"{signer.role!r}, only an operator key may register")
            if payload["role"] not in ROLES:
                raise KeyringError(index, f"key.register payload.role: {payload['role']!r} is "
                                          f"not one of {sorted(ROLES)}")
            _public_key(index, "public_key", payload["public_key"], payload["key_id"], "key_id")
            if payload["key_id"] in self._keys:
                raise KeyringError(index, f"key.register payload.key_id: {payload['key_id']} is "
                                          f"already registered")
            if WITNESS_FIELD in payload:
                self._validate_witness(index, payload)
        elif kind == "key.revoke":
            _fields(index, payload, kind, _REVOKE_FIELDS)
            if signer.role != "operator":
                raise KeyringError(index, f"key.revoke: signer {signer.key_id} has role "
                                          f"{signer.role!r}, only an operator key may revoke")
            target = self._keys.get(payload["key_id"])
            if target is None:
                raise KeyringError(index, f"key.revoke payload.key_id: {payload['key_id']} is "
                                          f"not registered")
            if target.ended_at is not None:
                raise KeyringError(index, f"key.revoke payload.key_id: {payload['key_id']} was "
                                          f"already {target.ended_how} at entry {target.ended_at}")
        else:
            _fields(index, payload, kind, _ROTATE_FIELDS)
            if payload["old_key_id"] != entry.key_id:
                raise KeyringError(index, f"key.rotate payload.old_key_id: "
                                          f"{payload['old_key_id']} is not the signer "
                                          f"{entry.key_id}; a rotation is signed by the old key")
            _public_key(index, "new_public_key", payload["new_public_key"],
                        payload["new_key_id"], "new_key_id")
            if payload["new_key_id"] in self._keys:
                raise KeyringError(index, f"key.rotate payload.new_key_id: "
                                          f"{payload['new_key_id']} is already registered")
