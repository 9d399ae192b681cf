"""The one check a hospital's signed `round.receipt` passes before the coordinator records it.

A receipt reaches the coordinator two ways: from the run (`GuardedObserver.on_round`, for the
hospitals the run was started for) and from the hospital itself (`POST /v1/hospital/entries`,
when the run could not deliver it). Both ask the same question, so both call `check_receipt`:
is it signed by a hospital allowed to sign here, with that hospital's registered key, for this
study and round? What is specific to each path (one receipt per hospital and round, in memory
for a run and in the database for the coordinator) stays with its caller.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from audit.entry import Entry
from federated.receipts import Receipt, ReceiptError, verify_receipt


def named_hospital(entry: Any) -> str | None:
    """The bare hospital id a receipt's payload names (`hospital:<id>`), or None if it names none."""
    payload = getattr(entry, "payload", None)
    value = payload.get("hospital") if isinstance(payload, Mapping) else None
    return value.removeprefix("hospital:") if isinstance(value, str) else None


def check_receipt(
    entry: Entry,
    keys: Mapping[str, bytes],
    *,
    study_id: str | None = None,
    round: int | None = None,
    hospital_id: str | None = None,
) -> Receipt:
    """Parse and verify `entry` as a receipt from one of the hospitals in `keys` (hospital id to
    its Ed25519 public key: the hospitals allowed to sign here), and, where given, for `study_id`,
    `round` and `hospital_id`. Raises ReceiptError naming what is wrong; a receipt from a
    hospital outside `keys` is refused before any signature work."""
    hospital = hospital_id if hospital_id is not None else named_hospital(entry)
    key = keys.get(hospital) if hospital is not None else None
    if key is None:
        raise ReceiptError("hospital: not approved for this study")
    return verify_receipt(entry, key, study_id=study_id, round=round, hospital_id=hospital)
