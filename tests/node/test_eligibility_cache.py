"""Eligibility counts reuse parsed contracts (`ContractCache`): a second count parses nothing,
and a consent import or record import, also through another connection (another process: the
CLI while the daemon runs), is seen by the next count. Every count equals the per-record
reference (`consent.gate.gate_naive` over contracts read and parsed afresh)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from audit.signing import Signer
from consent.gate import gate_naive
from consent.model import Contract
from exchange.node.consent_store import study_request
from exchange.node.eligibility import (
    contract_cache,
    count_eligible,
    current_contract_hashes,
    current_contracts,
)
from exchange.node.policy import Eligibility, StudyView
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore, open_store
from tests.node.helpers import ISSUED, gru_contract, revoke, seed_consent, seed_records

STUDY: dict[str, Any] = {
    "id": "st-c", "organisation_id": "acme", "organisation_region": "DE", "status": "submitted",
    "spec": {"purpose": "DUO:0000042", "columns": {"labs": ["mean_radius", "mean_texture"]},
             "label": "label", "epsilon": 2.0, "delta": 1e-5, "rounds": 2}}
OTHER = {**STUDY, "id": "st-d", "spec": {**STUDY["spec"], "purpose": "DUO:0000006", "epsilon": 1.0}}


def _count(store: NodeStore, study: dict[str, Any]) -> Eligibility:
    with store.sessions() as session:
        return count_eligible(session, StudyView.from_json(study), datetime.now(UTC))


def _reference(store: NodeStore, study: dict[str, Any]) -> tuple[int, dict[str, int]]:
    from sqlalchemy import select

    from exchange.node.models import Record

    with store.sessions() as session:
        hashes = current_contract_hashes(session)
        contracts = {hashes[p]: Contract.model_validate(d) for p, d in current_contracts(session).items()}
        pseudonyms = list(session.execute(select(Record.pseudonym).order_by(Record.id)).scalars())
    result = gate_naive([(p, hashes.get(p, "")) for p in pseudonyms], contracts,
                        study_request(StudyView.from_json(study)), datetime.now(UTC))
    return result.records_used, dict(result.excluded_by_reason)


def _parsed(store: NodeStore) -> int:
    with store.sessions() as session:
        return contract_cache(session).parsed


def test_counts_reuse_parsed_contracts_and_see_every_import(db_url: str, settings: NodeSettings,
                                                           tmp_path: Path) -> None:
    daemon_store, cli_store = open_store(db_url), open_store(db_url)  # two engines, as two processes
    signer = Signer.load(settings.signing_key_path)
    try:
        pseudonyms = [f"e{i}" for i in range(8)]
        seed_records(cli_store, tmp_path, pseudonyms)
        contracts = [gru_contract(p, "hospital-a") for p in pseudonyms[:6]]
        seed_consent(cli_store, tmp_path / "c1", contracts, "hospital-a", signer)

        first = _count(daemon_store, STUDY)
        assert (first.eligible, first.excluded) == _reference(daemon_store, STUDY) == (6, {"no-contract": 2})
        assert _parsed(daemon_store) == 6
        other = _count(daemon_store, OTHER)  # another study: no contract parsed again
        assert (other.eligible, other.excluded) == _reference(daemon_store, OTHER)
        assert _parsed(daemon_store) == 6

        # a revocation imported by "the CLI": only the new version is parsed, and it counts
        seed_consent(cli_store, tmp_path / "c2", [revoke(contracts[0], ISSUED + timedelta(days=1))],
                     "hospital-a", signer)
        revoked = _count(daemon_store, STUDY)
        assert (revoked.eligible, revoked.excluded) == _reference(daemon_store, STUDY)
        assert (revoked.eligible, revoked.excluded) == (5, {"no-contract": 2, "denied": 1})
        assert _parsed(daemon_store) == 7

        # new records (no contract yet) are seen too
        seed_records(cli_store, tmp_path, ["e8", "e9"])
        more = _count(daemon_store, STUDY)
        assert (more.eligible, more.excluded) == (5, {"no-contract": 4, "denied": 1})
        assert (more.eligible, more.excluded) == _reference(daemon_store, STUDY)
        assert _parsed(daemon_store) == 7
    finally:
        daemon_store.dispose()
        cli_store.dispose()
