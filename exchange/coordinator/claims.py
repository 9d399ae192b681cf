"""Reward claims: a hospital (acting for a patient) claims one leaf of a receipt's reward
commitment; the coordinator signs a `reward.claim` entry and appends it, and the ledger fold
(the auditor's) checks the inclusion proof, the amount and that the leaf was not paid before.

Why a module of its own: the claim is the only way tokens reach a patient now that receipts
name no reward account, and it touches nothing else of the coordinator. The request carries the
leaf's holder (a salted hash), never the reward account or the salt (docs/rewards.md).
Rewards nobody claims within the study's claim window are swept, once per pool, to the account
its escrow named (`sweep_unclaimed`), so no pool holds tokens for ever.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

from audit.ledger import CLAIM_KIND, SWEEP_KIND
from exchange.coordinator.journal import Journal, now

Hex64 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class RewardClaim(BaseModel):
    """POST /v1/hospital/rewards/claims: one leaf of the calling hospital's commitment of
    `round` of `study_id`, with its RFC 6962 inclusion proof, and the amount it pays."""

    model_config = ConfigDict(extra="forbid")

    study_id: Annotated[str, Field(min_length=1, max_length=200)]
    round: Annotated[int, Field(ge=1, le=2**31 - 1)]
    holder: Hex64
    units: Annotated[int, Field(ge=1, le=2**20)]
    index: Annotated[int, Field(ge=0, le=2**32)]
    proof: Annotated[list[Hex64], Field(max_length=64)]
    amount: Annotated[int, Field(ge=0, le=2**53 - 1)]


def claim_payload(hospital_account: str, claim: RewardClaim) -> dict[str, Any]:
    return {"study_id": claim.study_id, "hospital": hospital_account, "round": claim.round,
            "holder": claim.holder, "units": claim.units, "index": claim.index,
            "proof": list(claim.proof), "amount": claim.amount}


def claim_reward(journal: Journal, hospital_id: str, claim: RewardClaim) -> int:
    """Append the signed claim; the ledger fold refuses a wrong amount, a proof that does not
    verify, a leaf already paid or a study not paid out (422 naming the field), and then
    nothing is appended."""
    entry = journal.sign(CLAIM_KIND, claim_payload(f"hospital:{hospital_id}", claim))
    with journal.write() as session:
        (index,) = journal.append(session, entry)
    journal.on_change(CLAIM_KIND)
    return index


def sweep_unclaimed(journal: Journal) -> list[dict[str, Any]]:
    """Sweep every claim pool whose claim window has closed and that still holds tokens: one
    signed `reward.sweep` entry each, all in one transaction (the ledger fold checks the window,
    the amount and the account again). Returns the sweeps appended (none: nothing was due).
    Run it from time to time (`exchange admin sweep-rewards`); a pool swept late is swept whole."""
    with journal.write() as session:
        due = journal.ledger_in(session).sweepable(now())
        if due:
            journal.append(session, *(journal.sign(SWEEP_KIND, payload) for payload in due))
    if due:
        journal.on_change(SWEEP_KIND)
    return due
