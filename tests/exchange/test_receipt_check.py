"""The one receipt check (exchange/study/receipts.py) both receipt paths use: the run's
`GuardedObserver` and the hospital's own `POST /v1/hospital/entries`."""

from __future__ import annotations

import pytest

from audit.entry import Entry
from audit.signing import Signer
from exchange.study.receipts import check_receipt, named_hospital
from federated.receipts import ReceiptError, make_receipt


def _receipt(signer: Signer, hospital: str, *, study_id: str = "st-1", round_number: int = 1) -> Entry:
    return make_receipt(
        signer,
        study_id=study_id,
        round=round_number,
        hospital_id=hospital,
        records_used=10,
        commitment="ab" * 32,
        epsilon_spent=0.2,
        epsilon_total=0.2,
        delta=1e-5,
        spec_sha256="cd" * 32,
        rewards={"root": "ef" * 32, "size": 8},
    ).entry


def test_a_receipt_from_an_allowed_hospital_for_this_study_and_round_passes() -> None:
    a = Signer.generate()
    receipt = check_receipt(_receipt(a, "h-a"), {"h-a": a.public_key}, study_id="st-1", round=1)
    assert (receipt.study_id, receipt.round) == ("st-1", 1)
    assert named_hospital(receipt.entry) == "h-a"
    assert named_hospital(object()) is None


@pytest.mark.parametrize(
    ("keys", "kwargs", "reason"),
    [
        ({}, {}, "hospital: not approved"),  # hospital outside the keys
        ({"h-a": "other"}, {}, "key_id"),  # another key registered
        ({"h-a": "own"}, {"study_id": "st-2"}, "study_id"),  # another study
        ({"h-a": "own"}, {"round": 2}, "round"),  # another round
        ({"h-a": "own", "h-b": "own"}, {"hospital_id": "h-b"}, "hospital: receipt is from"),  # not the caller
    ],
)
def test_a_receipt_that_does_not_belong_is_refused_naming_why(
    keys: dict[str, str], kwargs: dict[str, object], reason: str
) -> None:
    a, other = Signer.generate(), Signer.generate()
    resolved = {h: (a if k == "own" else other).public_key for h, k in keys.items()}
    with pytest.raises(ReceiptError, match=f"^{reason}"):
        check_receipt(_receipt(a, "h-a"), resolved, **kwargs)  # type: ignore[arg-type]
