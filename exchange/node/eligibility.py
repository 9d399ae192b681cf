"""How many of this node's records a study may use under their patients' consent.

Consent evaluation itself belongs to `consent/` (a pure function of contract, study and
time, the same at the hospital and at the auditor). This module only feeds it the node's
records and contracts: the contract in force for each pseudonym is its newest version
imported (a revocation is a version that permits nothing), each distinct contract is
evaluated once, and the result is joined back to the records.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from consent.gate import GateResult, gate
from consent.model import Contract
from exchange.node.models import ConsentContractRow, Record
from exchange.node.policy import Eligibility, StudyView


def current_contracts(session: Session) -> dict[str, dict[str, Any]]:
    """pseudonym -> document of its newest contract version."""
    newest = (select(ConsentContractRow.pseudonym, func.max(ConsentContractRow.version).label("v"))
              .group_by(ConsentContractRow.pseudonym).subquery())
    rows = session.execute(
        select(ConsentContractRow.pseudonym, ConsentContractRow.document)
        .join(newest, (newest.c.pseudonym == ConsentContractRow.pseudonym)
              & (newest.c.v == ConsentContractRow.version))).tuples().all()
    return dict(rows)


def current_contract_hashes(session: Session) -> dict[str, str]:
    """pseudonym -> content hash of its newest contract version."""
    newest = (select(ConsentContractRow.pseudonym, func.max(ConsentContractRow.version).label("v"))
              .group_by(ConsentContractRow.pseudonym).subquery())
    rows = session.execute(
        select(ConsentContractRow.pseudonym, ConsentContractRow.contract_hash)
        .join(newest, (newest.c.pseudonym == ConsentContractRow.pseudonym)
              & (newest.c.v == ConsentContractRow.version))).tuples().all()
    return dict(rows)


def gate_records(session: Session, study: StudyView, at: datetime) -> GateResult:
    """consent.gate over every record (pseudonym, hash of its current contract): each
    distinct contract evaluated once, joined back to the records."""
    from exchange.node.consent_store import study_request

    hashes = current_contract_hashes(session)
    documents = current_contracts(session)
    contracts = {hashes[p]: Contract.model_validate(doc) for p, doc in documents.items()}
    pseudonyms = list(session.execute(select(Record.pseudonym).order_by(Record.id)).scalars())
    pairs = [(p, hashes.get(p, "")) for p in pseudonyms]
    return gate(pairs, contracts, study_request(study), at)


def count_eligible(session: Session, study: StudyView, at: datetime) -> Eligibility:
    """Records whose current contract permits `study` at `at`; the rest counted by reason."""
    if not study.columns:
        total = session.execute(select(func.count()).select_from(Record)).scalar_one()
        return Eligibility(eligible=0, excluded={"study names no data category": total} if total else {})
    result = gate_records(session, study, at)
    return Eligibility(eligible=result.records_used, excluded=dict(result.excluded_by_reason))
