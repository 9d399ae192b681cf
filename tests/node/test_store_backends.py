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
from tests.node.helpers import ISSUED, ExactNoise, gru_contract, revoke, seed_consent, seed_records

STUDY = {"id": "st-b", "organisation_id": "acme", "organisation_region": "DE", "status": "submitted",
         "spec": {"purpose": "DUO:0000042", "columns": {"labs": ["mean_radius", "mean_texture"]},
                  "label": "label", "epsilon": 2.0, "delta": 1e-5, "rounds": 2}}


def test_store_on_both_databases(db_url: str, settings: NodeSettings, tmp_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from exchange.node import decisions

    # the decision count without noise: 5 patients against the site minimum, deterministically
    monkeypatch.setattr(decisions, "SecureRandom", ExactNoise)
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
            "policy": settings.policy.model_copy(update={"mode": "auto-approve", "decision_epsilon": 1.0})}),
        signer=signer)
        observe_study(store, ctx, STUDY)
        observe_study(store, ctx, STUDY)  # seen again: never decided twice
        with store.sessions() as session:
            rows = session.execute(select(DecisionRow)).scalars().all()
        assert [(r.decision, r.eligible_records) for r in rows] == [("approve", 5)]
    finally:
        store.dispose()
    migrate.downgrade(db_url, "node", "base")
    migrate.upgrade(db_url, "node")


@pytest.mark.parametrize("path", ["policy", "steward"])
def test_two_approvals_at_once_cannot_both_reserve_the_budget(db_url: str, settings: NodeSettings,
                                                              tmp_path: Path, path: str,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Issue 19, finding 7: two studies, each fitting the budget alone but not together, are
    evaluated at the same moment (a barrier holds both evaluations until each has seen the same
    budget); storing an approval re-checks under a lock, so exactly one is approved."""
    import threading

    from exchange.node import decisions

    store = open_store(db_url)
    signer = Signer.load(settings.signing_key_path)
    policy = settings.policy.model_copy(update={"mode": "auto-approve" if path == "policy" else "ask",
                                                "decision_epsilon": 1.0,
                                                "total_privacy_budget": 5.0, "max_epsilon_per_study": 3.0})
    ctx = Context(settings=settings.model_copy(update={"policy": policy}), signer=signer)
    # the decision count without noise (6 patients against the site minimum): only the budget race
    # decides which study is refused
    monkeypatch.setattr(decisions, "SecureRandom", ExactNoise)
    studies = [{**STUDY, "id": f"st-{name}", "spec": {**STUDY["spec"], "epsilon": 3.0}} for name in "xy"]
    evaluate = decisions.evaluate_study
    both_evaluated = threading.Barrier(2, timeout=60)

    def evaluate_then_wait(*args: object, **kwargs: object) -> object:
        result = evaluate(*args, **kwargs)  # type: ignore[arg-type]
        both_evaluated.wait()
        return result

    try:
        seed_records(store, tmp_path, [f"q{i}" for i in range(6)])
        seed_consent(store, tmp_path / "c1", [gru_contract(f"q{i}", "hospital-a") for i in range(6)],
                     "hospital-a", signer)
        if path == "steward":
            for study in studies:
                observe_study(store, ctx, study)  # recorded, left to the steward ("ask")
        monkeypatch.setattr(decisions, "evaluate_study", evaluate_then_wait)
        errors: list[BaseException] = []

        def decide(study: dict[str, object]) -> None:
            try:
                if path == "policy":
                    observe_study(store, ctx, study)  # first seen: decided by the policy
                else:
                    decisions.steward_decide(store, ctx.settings, str(study["id"]), "approve", None)
            except decisions.StewardDecisionError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=decide, args=(study,)) for study in studies]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
        with store.sessions() as session:
            rows = session.execute(select(DecisionRow)).scalars()
            stored = {r.study_id: (r.decision, r.reasons) for r in rows}
        approved = [s for s, (d, _) in stored.items() if d == "approve"]
        assert len(approved) == 1, stored
        if path == "policy":
            (refused,) = [reasons for d, reasons in stored.values() if d == "refuse"]
            assert "exceeds the privacy budget left" in refused[0]
        else:
            (error,) = errors
            assert "exceeds the privacy budget left" in str(error)
    finally:
        store.dispose()
