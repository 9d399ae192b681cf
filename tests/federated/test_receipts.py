"""Contribution receipts: signed by the hospital's key, verifiable, strict about every field."""

from __future__ import annotations

import json
from typing import Any

import pytest

from audit.entry import Entry
from audit.signing import Signer
from federated.receipts import (
    RECEIPT_KIND,
    ReceiptError,
    hospital_account,
    make_receipt,
    parse_payload,
    parse_receipt,
    verify_receipt,
)

SPEC_SHA = "ab" * 32
ROOT = {"root": "cd" * 32, "size": 1024}


def _receipt(signer: Signer, **overrides: Any) -> Any:
    args: dict[str, Any] = {"study_id": "s-1", "round": 2, "hospital_id": "hospital-a", "records_used": 120,
                            "commitment": "c" * 64, "epsilon_spent": 0.7, "epsilon_total": 1.9, "delta": 1e-5,
                            "spec_sha256": SPEC_SHA, "rewards": ROOT}
    args.update(overrides)
    return make_receipt(signer, **args)


def test_receipt_is_a_log_envelope_signed_by_the_hospital() -> None:
    signer = Signer.generate()
    receipt = _receipt(signer)
    assert receipt.entry.kind == RECEIPT_KIND == "round.receipt"
    assert receipt.entry.key_id == signer.key_id
    assert receipt.hospital == "hospital:hospital-a"
    # transport bytes are exactly the log's leaf input, and parse back to the same envelope
    again = Entry.from_json(json.loads(receipt.to_bytes()))
    assert again.leaf_bytes() == receipt.entry.leaf_bytes()
    verified = verify_receipt(receipt.to_bytes(), signer.public_key, study_id="s-1", round=2,
                              hospital_id="hospital-a")
    assert verified.records_used == 120
    assert verified.rewards == ROOT
    assert verified.epsilon_spent == pytest.approx(0.7)


def test_receipt_payload_has_the_fields_the_ledger_reads() -> None:
    payload = _receipt(Signer.generate()).entry.payload
    # docs/rewards.md: round.receipt payload
    for name in ("study_id", "round", "hospital", "records_used", "rewards", "commitment",
                 "epsilon_spent"):
        assert name in payload


def test_tampered_receipt_does_not_verify() -> None:
    signer = Signer.generate()
    obj = json.loads(_receipt(signer).to_bytes())
    obj["payload"]["records_used"] = 10_000
    with pytest.raises(ReceiptError, match="signature"):
        verify_receipt(json.dumps(obj).encode(), signer.public_key)


def test_receipt_signed_by_another_key_is_refused() -> None:
    receipt = _receipt(Signer.generate())
    with pytest.raises(ReceiptError, match="key_id"):
        verify_receipt(receipt.to_bytes(), Signer.generate().public_key)


@pytest.mark.parametrize(("expect", "value", "field"), [
    ("study_id", "s-2", "study_id"), ("round", 3, "round"), ("hospital_id", "hospital-b", "hospital")])
def test_receipt_for_another_study_round_or_hospital_is_refused(expect: str, value: Any, field: str) -> None:
    signer = Signer.generate()
    receipt = _receipt(signer)
    with pytest.raises(ReceiptError, match=f"^{field}:"):
        verify_receipt(receipt.to_bytes(), signer.public_key, **{expect: value})
    with pytest.raises(ReceiptError, match=f"^{field}:"):
        parse_receipt(receipt.to_bytes(), **{expect: value})


@pytest.mark.parametrize(("field", "value", "message"), [
    ("records_used", -1, "records_used"),
    ("records_used", True, "records_used"),
    ("round", 0, "round"),
    ("epsilon_spent", float("nan"), "epsilon_spent"),
    ("epsilon_spent", -0.1, "epsilon_spent"),
    ("epsilon_total", 0.1, "epsilon_total"),  # below this round's spend
    ("delta", 1.0, "delta"),
    ("spec_sha256", "xyz", "spec_sha256"),
    ("commitment", "", "commitment"),
    ("rewards", {"reward:p1": 3}, "rewards"),  # accounts in clear: not a commitment
    ("rewards", {"root": "AB" * 32, "size": 1024}, "rewards.root"),
    ("rewards", {"root": "ab" * 32, "size": 1000}, "rewards.size"),
    ("rewards", {"root": "ab" * 32, "size": 4}, "rewards.size"),
])
def test_bad_payload_field_is_refused_by_name(field: str, value: Any, message: str) -> None:
    payload = dict(_receipt(Signer.generate()).entry.payload)
    payload[field] = value
    with pytest.raises(ReceiptError, match=f"^{message}"):
        parse_payload(payload)


def test_make_receipt_refuses_bad_values_before_signing() -> None:
    with pytest.raises(ReceiptError, match=r"^hospital"):
        _receipt(Signer.generate(), hospital_id="has space")
    with pytest.raises(ReceiptError, match=r"^records_used"):
        _receipt(Signer.generate(), records_used=-3)


def test_unknown_and_missing_fields_are_named() -> None:
    payload = dict(_receipt(Signer.generate()).entry.payload)
    with pytest.raises(ReceiptError, match="unknown field"):
        parse_payload({**payload, "patient": "x"})
    del payload["commitment"]
    with pytest.raises(ReceiptError, match=r"missing field\(s\) \['commitment'\]"):
        parse_payload(payload)


def test_other_entry_kinds_and_garbage_are_not_receipts() -> None:
    with pytest.raises(ReceiptError, match="envelope"):
        parse_receipt(b"not json")
    signer = Signer.generate()
    obj = json.loads(_receipt(signer).to_bytes())
    obj["kind"] = "token.mint"
    with pytest.raises(ReceiptError, match="kind"):
        parse_receipt(json.dumps(obj).encode())


def test_hospital_account_form() -> None:
    assert hospital_account("hospital-a") == "hospital:hospital-a"
    assert hospital_account("hospital:hospital-a") == "hospital:hospital-a"
    with pytest.raises(ReceiptError):
        hospital_account("")


ACCOUNTING = {"decision_epsilon": 0.1, "training_epsilon": 1.8, "noise_multiplier": 1.3, "sample_rate": 0.25,
              "steps_per_round": 10, "accountant": "prv"}


def test_a_receipts_accounting_composes_its_total_and_is_checked() -> None:
    """The optional `accounting` says how epsilon_total composes (the decision count's epsilon +
    DP-SGD's) and carries the plan's noise multiplier and sample rate; a sum that does not make
    the total, a field missing or unknown, or a sample rate outside (0, 1] is refused."""
    signer = Signer.generate()
    receipt = _receipt(signer, accounting=ACCOUNTING)
    assert verify_receipt(receipt.to_bytes(), signer.public_key).accounting == ACCOUNTING
    assert _receipt(signer).accounting is None  # receipts without it stay valid
    for bad, match in (({**ACCOUNTING, "training_epsilon": 1.7}, "must be epsilon_total"),
                       ({k: v for k, v in ACCOUNTING.items() if k != "sample_rate"}, "missing"),
                       ({**ACCOUNTING, "patients": 3}, "unknown"),
                       ({**ACCOUNTING, "sample_rate": 0.0}, "sample_rate"),
                       ({**ACCOUNTING, "noise_multiplier": -1.0}, "noise_multiplier")):
        with pytest.raises(ReceiptError, match=match):
            _receipt(signer, accounting=bad)
