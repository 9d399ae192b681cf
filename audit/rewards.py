"""The payout rules as one pure function, shared by the coordinator and the auditor.

The coordinator calls `compute_payout` to build a `study.payout` entry; the ledger's fold calls
the same function with the receipts it has seen in the log and compares the entry field by field
(`first_difference`). One implementation means the two sides cannot disagree by construction,
only by tampering. Rules and a worked example: docs/rewards.md.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgspec

from audit.apportion import apportion

_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), allow_nan=False).encode
_FAST_ENCODE = msgspec.json.Encoder(order="sorted").encode

BPS = 10_000
MAX_AMOUNT = 2**53 - 1


class PayoutError(ValueError):
    """The inputs admit no payout (bad terms, no records to pay for, a receipt of another study)."""


@dataclass(frozen=True, slots=True)
class StudyTerms:
    """What a study's `study.escrow` entry fixes for its payout (snapshotted at submission)."""

    royalty_account: str | None
    royalty_bps: int
    forward_bps: int

    def __post_init__(self) -> None:
        for name in ("royalty_bps", "forward_bps"):
            value = getattr(self, name)
            if type(value) is not int or not 0 <= value <= BPS:
                raise PayoutError(f"{name}: must be an integer in [0, {BPS}], got {value!r}")
        if self.royalty_account is None and self.royalty_bps != 0:
            raise PayoutError("royalty_bps: must be 0 when royalty_account is null")


class Receipt(NamedTuple):
    """The part of a hospital's signed `round.receipt` that the payout depends on.

    `rewards` is the receipt's public reward commitment {"root", "size"} (audit.reward_commitment):
    the reward accounts themselves never leave the hospital. A named tuple, not a dataclass:
    the ledger's fold keeps one per receipt of every open study, and a tuple is built in a
    fraction of a frozen dataclass's time."""

    study_id: str
    round: int
    hospital: str
    records_used: int
    rewards: Mapping[str, Any] | None = None


def compute_payout(study_id: str, amount: int, terms: StudyTerms,
                   receipts: Iterable[Receipt]) -> dict[str, Any]:
    """The exact `study.payout` payload for paying `amount` out of `study_id`'s escrow.

    1. royalty = floor(amount * royalty_bps / 10000); rest = amount - royalty.
    2. Each hospital with records > 0 (summed over its receipts) gets apportion(rest, records).
    3. pool = floor(share * forward_bps / 10000) of a hospital's share goes to its reward
       claims, apportioned over its receipts by records_used (one claim pool per round, paid out
       against that receipt's reward commitment); `kept = share - pool` goes to the hospital.
    Lists are sorted by account and round; the result does not depend on the order of `receipts`.
    """
    if type(amount) is not int or not 1 <= amount <= MAX_AMOUNT:
        raise PayoutError(f"amount: must be an integer in [1, {MAX_AMOUNT}], got {amount!r}")
    records: dict[str, int] = {}
    rounds: dict[str, dict[int, int]] = {}
    for position, (receipt_study, round_number, hospital, used, _) in enumerate(receipts):
        if receipt_study != study_id:
            raise PayoutError(f"receipts[{position}].study_id: {receipt_study!r} is not {study_id!r}")
        records[hospital] = records.get(hospital, 0) + used
        if used > 0:
            # keyed by round number: apportion breaks ties by id, so in round order (the
            # ledger accepts one receipt per hospital and round; summed here regardless)
            by_round = rounds.get(hospital)
            if by_round is None:
                by_round = rounds[hospital] = {}
            by_round[round_number] = by_round.get(round_number, 0) + used
    contributors = {hospital: count for hospital, count in records.items() if count > 0}
    if not contributors:
        raise PayoutError(f"hospitals: no receipt with records_used > 0 for study {study_id!r}; "
                          "nothing to pay for (refund instead)")
    royalty = amount * terms.royalty_bps // BPS
    shares = apportion(amount - royalty, contributors)
    hospitals: list[dict[str, Any]] = []
    for hospital in sorted(contributors):
        share = shares[hospital]
        pool = share * terms.forward_bps // BPS
        by_round = rounds[hospital]
        parts = apportion(pool, by_round)
        pools = [{"round": key, "records": by_round[key], "pool": parts[key]}
                 for key in sorted(parts)]
        hospitals.append({"hospital": hospital, "records": contributors[hospital], "amount": share,
                          "kept": share - pool, "pool": pool, "pools": pools})
    royalty_part = (None if terms.royalty_account is None
                    else {"account": terms.royalty_account, "amount": royalty})
    return {"study_id": study_id, "amount": amount, "royalty": royalty_part, "hospitals": hospitals}


def payout_credits(payout: Mapping[str, Any]) -> dict[str, int]:
    """Per-account credits of a payout payload produced by `compute_payout` (accounts summed);
    the claim pools (`payout_pools`) are credited to no account until claimed."""
    credits: dict[str, int] = {}
    royalty = payout["royalty"]
    if royalty is not None:
        credits[royalty["account"]] = credits.get(royalty["account"], 0) + royalty["amount"]
    for part in payout["hospitals"]:
        credits[part["hospital"]] = credits.get(part["hospital"], 0) + part["kept"]
    return credits


def payout_pools(payout: Mapping[str, Any]) -> dict[tuple[str, int], int]:
    """(hospital, round) -> the claim pool a payout payload opens for that receipt."""
    return {(part["hospital"], item["round"]): item["pool"]
            for part in payout["hospitals"] for item in part["pools"]}


def _describe(value: Any) -> str:
    if isinstance(value, list):
        return f"a list of {len(value)}"
    if isinstance(value, dict):
        return "an object"
    return repr(value)


def differences(expected: Any, given: Any, path: str = "") -> list[str]:
    """Every field where `given` differs from `expected`, in the expected order, named by path.

    Types are compared strictly (1 != 1.0 != True here), since a float or boolean amount is a
    malformed entry even where Python would call it equal. A list of a different length is one
    difference (its items are not compared further).
    """
    where = path or "payload"
    if isinstance(expected, dict):
        if not isinstance(given, dict):
            return [f"{where}: entry has {_describe(given)}, the fold computes an object"]
        found = [f"{_join(path, key)}: missing" for key in expected if key not in given]
        found += [f"{_join(path, key)}: unknown field" for key in sorted(given) if key not in expected]
        for key in expected:
            if key in given:
                found += differences(expected[key], given[key], _join(path, key))
        return found
    if isinstance(expected, list):
        if not isinstance(given, list):
            return [f"{where}: entry has {_describe(given)}, the fold computes a list"]
        if len(given) != len(expected):
            return [f"{where}: entry lists {len(given)}, the fold computes {len(expected)}"]
        found = []
        for position, (want, got) in enumerate(zip(expected, given, strict=True)):
            found += differences(want, got, f"{where}[{position}]")
        return found
    if type(given) is not type(expected) or given != expected:
        return [f"{where}: entry says {_describe(given)}, the fold computes {_describe(expected)}"]
    return []


def first_difference(expected: Any, given: Any, limit: int = 3) -> str | None:
    """The differing fields (at most `limit` named, then a count) as one message, or None.

    Fast path: equal compact JSON encodings (the encoders tell 1, 1.0 and true apart) mean
    no difference; only a mismatch pays for the field-by-field walk. msgspec's encoder (several
    times faster than the json module's with sorted keys) is trusted only together with Python
    equality: it writes NaN and infinity as null, and bytes, dates, sets and the like as strings
    or lists, none of which equals what the fold computes (JSON types only), so a value that
    passes both is one the json module's encoding also finds equal. Anything else is decided
    as before.
    """
    try:
        if expected == given and _FAST_ENCODE(expected) == _FAST_ENCODE(given):
            return None
    except (TypeError, ValueError, OverflowError, msgspec.EncodeError):
        pass
    try:
        if _ENCODE(expected) == _ENCODE(given):
            return None
    except (TypeError, ValueError):
        pass
    found = differences(expected, given)
    if not found:
        return None
    message = "; ".join(found[:limit])
    if len(found) > limit:
        message += f"; and {len(found) - limit} more"
    return message


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
