"""The node store on both databases (SQLite, the default, and PostgreSQL by URL): migrations,
an all-or-nothing import, consent versions, gating and the decision records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select

from audit.signing import Signer
from exchange.db import migrate
from exchange.node.decisions import Context, observe_study
from exchange.node.eligibility import count_eligible
from exchange.node.importer import import_records
from exchange.node.mapping import ImportRejectedError, parse_mapping
from exchange.node.models import DecisionRow, Record
from exchange.node.policy import StudyView
from exchange.node.settings import NodeSettings
from exchange.node.store import open_store
from tests.node.helpers import ISSUED, gru_contract, revoke, seed_consent, seed_records

STUDY = {"id": "st-b", "organisation_id": "acme", "organisation_region": "DE", "status": "submitted",
         "spec": {"purpose": "DUO:0000042", "columns": {"labs": ["mean_radius", "mean_texture"]},
                  "label": "label", "epsilon": 2.0, "delta": 1e-5, "rounds": 2}}


def test_store_on_both_databases(db_url: str, settings: NodeSettings, tmp_path: Path) -> None:
    store = open_store(db_url)
    signer = Signer.load(settings.signing_key_path)
    try:
        pseudonyms = [f"q{i}" for i in range(8)]
        seed_records(store, tmp_path, pseudonyms)
        bad = tmp_path / "bad.csv"
        bad.write_text("pid,mean_radius,mean_texture,label\nz1,1,2,0\nz2,x,2,0\n")
        mapping = parse_mapping({"pseudonym_column": "pid", "columns": {
            "mean_radius": "labs", "mean_texture": "labs",
            "label": {"category": "outcomes", "type": "integer"}}})
        with pytest.raises(ImportRejectedError, match="row 2: mean_radius"), store.transaction() as session:
            import_records(session, bad, "csv", mapping)
        with store.sessions() as session:
            assert session.execute(select(func.count()).select_from(Record)).scalar_one() == 8
        contracts = [gru_contract(p, "hospital-a") for p in pseudonyms[:6]]
        seed_consent(store, tmp_path / "c1", contracts, "hospital-a", signer)
        seed_consent(store, tmp_path / "c2", [revoke(contracts[0], ISSUED + timedelta(days=1))], "hospital-a",
                     signer)
        with store.sessions() as session:
            result = count_eligible(session, StudyView.from_json(STUDY), datetime.now(UTC))
        assert result.eligible == 5
        assert result.excluded == {"no-contract": 2, "denied": 1}  # the revocation is a deny rule
        ctx = Context(settings=settings.model_copy(update={
            "policy": settings.policy.model_copy(update={"mode": "auto-approve"})}), signer=signer)
        observe_study(store, ctx, STUDY)
        observe_study(store, ctx, STUDY)  # seen again: never decided twice
        with store.sessions() as session:
            rows = session.execute(select(DecisionRow)).scalars().all()
        assert [(r.decision, r.eligible_records) for r in rows] == [("approve", 5)]
    finally:
        store.dispose()
    migrate.downgrade(db_url, "node", "base")
    migrate.upgrade(db_url, "node")
