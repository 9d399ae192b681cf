"""The hospital's store of reward-commitment openings, and the claims built from them.

Why here: the openings (which reward account and salt stand behind each leaf) are as private as
the patient list, so they live in the node database beside the privacy ledger and leave only as
one claim, to the patient it belongs to (or to the hospital's own claim tool acting for them).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, insert, select

from audit.reward_commitment import Opening, open_claim
from federated.privacy_ledger import reward_openings


def store(engine: Engine, study_id: str, round_number: int, openings: Iterable[Opening]) -> None:
    """Keep a receipt's openings; a round stored again (a retried message) replaces nothing."""
    rows = [{"study_id": study_id, "round": round_number, "leaf_index": o.index, "account": o.account,
             "opening": json.dumps(o.to_json(), sort_keys=True), "created_at": datetime.now(UTC)}
            for o in openings]
    if not rows:
        return
    with engine.begin() as conn:
        known = conn.execute(select(reward_openings.c.leaf_index).where(
            reward_openings.c.study_id == study_id, reward_openings.c.round == round_number)).first()
        if known is None:
            conn.execute(insert(reward_openings), rows)


def openings(engine: Engine, study_id: str, account: str | None = None) -> list[tuple[int, Opening]]:
    """(round, opening) of a study, for one account or all, in round and leaf order."""
    query = select(reward_openings.c.round, reward_openings.c.opening).where(
        reward_openings.c.study_id == study_id)
    if account is not None:
        query = query.where(reward_openings.c.account == account)
    query = query.order_by(reward_openings.c.round, reward_openings.c.leaf_index)
    with engine.connect() as conn:
        return [(int(r), Opening.from_json(json.loads(o))) for r, o in conn.execute(query)]


def claim_request(study_id: str, hospital: str, round_number: int, opening: Opening, *, amount: int,
                  account: str | None = None) -> dict[str, Any]:
    """The body of a claim (POST /v1/rewards/claims). It carries the leaf's holder, units, index
    and proof, never the account or salt; `account`, if given, is checked against the opening
    first (a claim for the wrong account is refused here, before anything is sent)."""
    if account is not None:
        open_claim(opening.salt, account, opening.holder)
    return {"study_id": study_id, "hospital": hospital, "round": round_number, "holder": opening.holder,
            "units": opening.units, "index": opening.index, "proof": list(opening.proof), "amount": amount}
