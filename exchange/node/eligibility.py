"""How many of this node's records a study may use under their patients' consent.

Consent evaluation itself belongs to `consent/` (a pure function of contract, study and
time, the same at the hospital and at the auditor). This module only feeds it the node's
records and contracts: the contract in force for each pseudonym is its newest version
imported (a revocation is a version that permits nothing), each distinct contract is
evaluated once, and the result is joined back to the records.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from exchange.node.models import ConsentContractRow, Record
from exchange.node.policy import Eligibility, StudyView

NO_CONTRACT = "no consent contract"


def current_contracts(session: Session) -> dict[str, dict[str, Any]]:
    """pseudonym -> document of its newest contract version."""
    newest = (select(ConsentContractRow.pseudonym, func.max(ConsentContractRow.version).label("v"))
              .group_by(ConsentContractRow.pseudonym).subquery())
    rows = session.execute(
        select(ConsentContractRow.pseudonym, ConsentContractRow.document)
        .join(newest, (newest.c.pseudonym == ConsentContractRow.pseudonym)
              & (newest.c.v == ConsentContractRow.version))).tuples().all()
    return dict(rows)


def count_eligible(session: Session, study: StudyView, at: datetime) -> Eligibility:
    """Records whose current contract permits `study` at `at`; the rest counted by reason."""
    from exchange.node.consent_store import evaluate_contract

    contracts = current_contracts(session)
    verdicts: dict[str, str | None] = {}  # pseudonym -> None (permitted) or the reason
    for pseudonym, document in contracts.items():
        verdicts[pseudonym] = evaluate_contract(document, study, at)
    counts = session.execute(select(Record.pseudonym, func.count()).group_by(Record.pseudonym)).tuples()
    eligible = 0
    excluded: Counter[str] = Counter()
    for pseudonym, count in counts:
        if pseudonym not in verdicts:
            excluded[NO_CONTRACT] += count
        elif verdicts[pseudonym] is None:
            eligible += count
        else:
            excluded[str(verdicts[pseudonym])] += count
    return Eligibility(eligible=eligible, excluded=dict(excluded))
