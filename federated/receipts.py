"""Signed contribution receipts: what a hospital did in one round of one study.

A receipt is an audit-log envelope of kind ``round.receipt`` signed by the hospital's own Ed25519
key (`audit.entry.sign_entry`); the coordinator appends it to the log unchanged, so the receipt's
signature is the log entry's signature and rewards can be recomputed from the log alone
(docs/rewards.md). Payload fields:

- ``study_id``, ``round`` (>= 1), ``hospital`` (the account ``hospital:<id>``, the key's owner);
- ``records_used``: the round's contribution weight (FedAvg and payout). A hospital sets it from
  the study's public terms only (expected batch x local steps), never from a count of its
  records, so that no count of patients leaves the hospital (docs/privacy.md, "Counts");
- ``rewards``: ``{"root", "size"}``, a salted Merkle commitment to the reward accounts of the
  patients used (audit.reward_commitment); no reward account appears in clear;
- ``commitment``: the consent engine's commitment to the (pseudonym, contract hash) pairs used,
  keyed with a secret of the hospital per study and round; no pseudonym appears in clear;
- ``epsilon_spent`` (this round) and ``epsilon_total`` (this study at this hospital so far, per
  patient: the decision count's epsilon plus the DP-SGD rounds'), ``delta``, and ``spec_sha256``:
  the hash of the exact study terms the hospital trained under;
- optional ``accounting``: ``{"decision_epsilon", "training_epsilon", "noise_multiplier",
  "sample_rate", "steps_per_round", "accountant"}``, how ``epsilon_total`` composes
  (decision + training) and the plan's parameters; the noise multiplier and sample rate are
  post-processing of the hospital's noised decision count, never of an exact count
  (docs/privacy.md, "Counts"). Receipts written before it have none.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from audit.entry import Entry, MalformedEntryError, sign_entry
from audit.reward_commitment import check_public
from audit.signing import SignatureInvalidError, Signer, canonical, key_id

RECEIPT_KIND = "round.receipt"
_ACCOUNT = re.compile(r"^[a-z][a-z0-9_-]*:\S{1,190}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
PAYLOAD_FIELDS = frozenset({"study_id", "round", "hospital", "records_used", "rewards", "commitment",
                            "epsilon_spent", "epsilon_total", "delta", "spec_sha256"})
#: Fields a receipt may carry beside PAYLOAD_FIELDS.
OPTIONAL_FIELDS = frozenset({"accounting"})
ACCOUNTING_FIELDS = frozenset({"decision_epsilon", "training_epsilon", "noise_multiplier", "sample_rate",
                               "steps_per_round", "accountant"})


class ReceiptError(ValueError):
    """A receipt is malformed, not signed by the expected key, or not for the expected round."""


@dataclass(frozen=True)
class Receipt:
    """A verified (or freshly made) receipt: the envelope and its parsed payload."""

    entry: Entry
    study_id: str
    round: int
    hospital: str
    records_used: int
    rewards: dict[str, Any]
    commitment: str
    epsilon_spent: float
    epsilon_total: float
    delta: float
    spec_sha256: str
    accounting: dict[str, Any] | None = None

    def to_bytes(self) -> bytes:
        """Transport form (the envelope's canonical JSON, exactly the log's leaf input)."""
        return self.entry.leaf_bytes()


def hospital_account(hospital_id: str) -> str:
    """The ledger account of a hospital: ``hospital:<id>``."""
    account = hospital_id if hospital_id.startswith("hospital:") else f"hospital:{hospital_id}"
    if not _ACCOUNT.match(account):
        raise ReceiptError(f"hospital: {hospital_id!r} is not a valid hospital id")
    return account


def _int(payload: Mapping[str, Any], name: str, minimum: int) -> int:
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ReceiptError(f"{name}: must be an integer >= {minimum}, got {value!r}")
    return value


def _float(payload: Mapping[str, Any], name: str, *, upper: float = math.inf) -> float:
    value = payload[name]
    if isinstance(value, bool) or not isinstance(value, int | float) or not (0 <= value < upper) \
            or not math.isfinite(value):
        raise ReceiptError(f"{name}: must be a finite number in [0, {upper}), got {value!r}")
    return float(value)


def parse_payload(payload: Any) -> dict[str, Any]:
    """Check a receipt payload field by field; returns the typed values."""
    if not isinstance(payload, dict):
        raise ReceiptError("payload: must be a JSON object")
    missing = PAYLOAD_FIELDS - payload.keys()
    if missing:
        raise ReceiptError(f"payload: missing field(s) {sorted(missing)}")
    extra = payload.keys() - PAYLOAD_FIELDS - OPTIONAL_FIELDS
    if extra:
        raise ReceiptError(f"payload: unknown field(s) {sorted(extra)}")
    study_id = payload["study_id"]
    if not isinstance(study_id, str) or not 0 < len(study_id) <= 200:
        raise ReceiptError("study_id: must be a non-empty string of at most 200 characters")
    hospital = payload["hospital"]
    if not isinstance(hospital, str) or not hospital.startswith("hospital:") or not _ACCOUNT.match(hospital):
        raise ReceiptError(f"hospital: must be an account 'hospital:<id>', got {hospital!r}")
    records = _int(payload, "records_used", 0)
    try:
        rewards = check_public(payload["rewards"])
    except ValueError as exc:
        raise ReceiptError(str(exc)) from None
    commitment = payload["commitment"]
    if not isinstance(commitment, str) or not commitment:
        raise ReceiptError("commitment: must be a non-empty string")
    spec_sha = payload["spec_sha256"]
    if not isinstance(spec_sha, str) or not _HEX64.match(spec_sha):
        raise ReceiptError("spec_sha256: must be 64 lowercase hex digits")
    spent = _float(payload, "epsilon_spent")
    total = _float(payload, "epsilon_total")
    if total + 1e-12 < spent:
        raise ReceiptError(f"epsilon_total: {total} is less than this round's epsilon_spent {spent}")
    accounting = _accounting(payload["accounting"], total) if "accounting" in payload else None
    return {"study_id": study_id, "round": _int(payload, "round", 1), "hospital": hospital,
            "records_used": records, "rewards": rewards, "commitment": commitment,
            "epsilon_spent": spent, "epsilon_total": total, "delta": _float(payload, "delta", upper=1.0),
            "spec_sha256": spec_sha, "accounting": accounting}


def _accounting(value: Any, total: float) -> dict[str, Any]:
    """Check a receipt's `accounting` (module docstring): every field, of its type and range,
    and decision_epsilon + training_epsilon = epsilon_total."""
    if not isinstance(value, dict):
        raise ReceiptError("accounting: must be a JSON object")
    missing, extra = ACCOUNTING_FIELDS - value.keys(), value.keys() - ACCOUNTING_FIELDS
    if missing or extra:
        raise ReceiptError(f"accounting: missing {sorted(missing)}, unknown {sorted(extra)}")
    out: dict[str, Any] = {name: _float(value, name) for name in
                           ("decision_epsilon", "training_epsilon", "noise_multiplier")}
    out["sample_rate"] = _float(value, "sample_rate", upper=1.0 + 1e-12)
    if out["sample_rate"] <= 0:
        raise ReceiptError("sample_rate: must be above 0")
    out["steps_per_round"] = _int(value, "steps_per_round", 1)
    if not isinstance(value["accountant"], str) or not 0 < len(value["accountant"]) <= 16:
        raise ReceiptError("accountant: must be a short name")
    out["accountant"] = value["accountant"]
    if abs(out["decision_epsilon"] + out["training_epsilon"] - total) > 1e-9 * max(1.0, total):
        raise ReceiptError(f"accounting: decision_epsilon + training_epsilon must be epsilon_total {total}")
    return out


def make_receipt(signer: Signer, *, study_id: str, round: int, hospital_id: str, records_used: int,
                 commitment: str, epsilon_spent: float, epsilon_total: float, delta: float,
                 spec_sha256: str, rewards: Mapping[str, Any],
                 instant: datetime | None = None,
                 accounting: Mapping[str, Any] | None = None) -> Receipt:
    """Sign a receipt with the hospital's key (the payload is validated first)."""
    payload: dict[str, Any] = {
        "study_id": study_id, "round": round, "hospital": hospital_account(hospital_id),
        "records_used": records_used, "rewards": dict(rewards),
        "commitment": commitment, "epsilon_spent": float(epsilon_spent),
        "epsilon_total": float(epsilon_total), "delta": float(delta), "spec_sha256": spec_sha256}
    if accounting is not None:
        payload["accounting"] = dict(accounting)
    fields = parse_payload(payload)
    canonical(payload)  # fail here, not in the log, if a value cannot be encoded
    entry = sign_entry(signer, RECEIPT_KIND, payload, instant)
    return Receipt(entry=entry, **fields)


def _entry(data: bytes | Entry) -> Entry:
    if isinstance(data, Entry):
        entry = data
    else:
        try:
            entry = Entry.from_json(json.loads(data))
        except (ValueError, MalformedEntryError) as exc:
            raise ReceiptError(f"envelope: {exc}") from None
    if entry.kind != RECEIPT_KIND:
        raise ReceiptError(f"kind: expected {RECEIPT_KIND!r}, got {entry.kind!r}")
    return entry


def parse_receipt(data: bytes | Entry, *, study_id: str | None = None, round: int | None = None,
                  hospital_id: str | None = None) -> Receipt:
    """Parse a receipt and check it is for the expected study/round/hospital WITHOUT checking its
    signature (for a ServerApp that was given no hospital keys; the audit log checks signatures
    against its keyring when the coordinator appends the receipt)."""
    entry = _entry(data)
    return _expect(entry, parse_payload(entry.payload), study_id, round, hospital_id)


def verify_receipt(data: bytes | Entry, public_key: bytes, *, study_id: str | None = None,
                   round: int | None = None, hospital_id: str | None = None) -> Receipt:
    """Parse and verify a receipt against the hospital's public key and, if given, the expected
    study, round and hospital. Raises ReceiptError naming what is wrong."""
    entry = _entry(data)
    if entry.key_id != key_id(public_key):
        raise ReceiptError(f"key_id: receipt signed by key {entry.key_id}, expected {key_id(public_key)}")
    try:
        entry.verify_signature(public_key)
    except SignatureInvalidError:
        raise ReceiptError("signature: does not verify against the hospital's key") from None
    return _expect(entry, parse_payload(entry.payload), study_id, round, hospital_id)


def _expect(entry: Entry, fields: dict[str, Any], study_id: str | None, round: int | None,
            hospital_id: str | None) -> Receipt:
    if study_id is not None and fields["study_id"] != study_id:
        raise ReceiptError(f"study_id: receipt is for {fields['study_id']!r}, expected {study_id!r}")
    if round is not None and fields["round"] != round:
        raise ReceiptError(f"round: receipt is for round {fields['round']}, expected {round}")
    if hospital_id is not None and fields["hospital"] != hospital_account(hospital_id):
        raise ReceiptError(f"hospital: receipt is from {fields['hospital']!r}, expected "
                           f"{hospital_account(hospital_id)!r}")
    return Receipt(entry=entry, **fields)
