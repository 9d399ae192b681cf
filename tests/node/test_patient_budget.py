"""Decision time and `node status` for patients' lifetime budgets and delta (issue 14, items 6
and 7): a real node store (migrated SQLite, imported records and signed contracts) and the real
privacy ledger in it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from audit.signing import Signer
from consent.model import Contract
from exchange.cli import app
from exchange.node.decisions import evaluate_study
from exchange.node.policy import StudyView
from exchange.node.privacy import site_ledger
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore
from federated.accounting import DPPlan
from tests.node.helpers import gru_contract, seed_consent, seed_records

PSEUDONYMS = [f"p{i}" for i in range(12)]
CAPPED = PSEUDONYMS[:4]  # their contracts cap their lifetime epsilon at 3


@pytest.fixture
def seeded(settings: NodeSettings, store: NodeStore, tmp_path: Path) -> NodeStore:
    """12 records; 10 with general-research consent (4 of them capped at epsilon 3), 2 without."""
    seed_records(store, tmp_path, PSEUDONYMS)
    contracts = [Contract.model_validate({**gru_contract(p, "hospital-a").model_dump(),
                                          "max_epsilon": 3.0 if p in CAPPED else None})
                 for p in PSEUDONYMS[:10]]
    seed_consent(store, tmp_path / "consent", contracts, "hospital-a", Signer.load(settings.signing_key_path))
    return store


def _study(study_id: str, **spec: Any) -> StudyView:
    base: dict[str, Any] = {"purpose": "DUO:0000007", "disease": "C50", "commercial": False,
                            "columns": {"labs": ["mean_radius", "mean_texture"]}, "label": "label",
                            "epsilon": 2.0, "delta": 1e-5, "rounds": 2}
    base.update(spec)
    return StudyView.from_json({"id": study_id, "organisation_id": "acme", "organisation_region": "DE",
                                "status": "submitted", "spec": base})


class _Exact:
    """A noise source that adds nothing: these tests check what the count is compared with (the
    mechanism's noise is tested in tests/node/test_decision_count.py)."""

    def discrete_laplace(self, epsilon: float) -> int:
        return 0


def _plan(target: float) -> DPPlan:
    return DPPlan(target_epsilon=target, delta=1e-5, rounds=2, steps_per_round=4, sample_rate=0.5,
                  noise_multiplier=1.5, batch_size=5, n_patients=10)


def test_patients_without_lifetime_budget_left_are_not_counted_at_decision_time(
        seeded: NodeStore, settings: NodeSettings) -> None:
    policy = settings.policy.model_copy(update={"mode": "auto-approve", "min_eligible_records": 1})
    settings = settings.model_copy(update={"policy": policy})
    ledger = site_ledger(seeded.engine, settings.policy)
    # an earlier study (still open) holds epsilon 2 of every consented patient
    ledger.register_study("earlier", _plan(2.0))
    caps = {p: 3.0 if p in CAPPED else None for p in PSEUDONYMS[:10]}
    assert ledger.admit("earlier", "train", caps, 20.0).admitted == frozenset(PSEUDONYMS[:10])
    evaluation = evaluate_study(seeded, settings, _study("next", epsilon=2.0), noise=_Exact())
    assert evaluation.decision == "approve", evaluation.reasons  # 6 patients have room (2 + 2 <= 20)
    # the 6 with room (p0-p3 are capped at 3 and hold 2) were counted and charged the count's epsilon
    assert ledger.decision("next").noisy_count == 6  # type: ignore[union-attr]
    assert ledger.decision_patients("next") == frozenset(PSEUDONYMS[4:10])
    # a study that 6 patients are too few for: delta above 1/6
    loose = settings.model_copy(update={"policy": policy.model_copy(update={
        "max_delta": 0.5, "total_delta_budget": 0.9})})
    refused = evaluate_study(seeded, loose, _study("next-2", epsilon=2.0, delta=0.2), noise=_Exact())
    assert refused.decision == "refuse"
    assert "delta 0.2 exceeds 1/n for this hospital's n eligible patients" in refused.reasons
    # a second open study holds epsilon 1 of p4-p9, and the site default cap becomes 3
    ledger.register_study("earlier-2", _plan(1.0))
    ledger.admit("earlier-2", "train", {p: None for p in PSEUDONYMS[4:10]}, 3.0)
    tight = settings.model_copy(update={"policy": policy.model_copy(update={
        "total_privacy_budget": 3.0, "max_epsilon_per_study": 3.0})})
    # p0-p3 hold 2 of their 3, p4-p9 3 of the site default 3: none has 1.5 left
    refused = evaluate_study(seeded, tight, _study("next-3", epsilon=1.5), noise=_Exact())
    assert refused.decision == "refuse"
    # nobody has room: the count is 0 (plus noise), under the site minimum; nobody is charged
    assert len(refused.reasons) == 1
    assert refused.reasons[0].startswith("fewer eligible patients (a noised count) than the site minimum (1)")
    assert ledger.decision_patients("next-3") == frozenset()


def test_delta_above_the_site_maximum_is_refused_at_decision_time_and_nothing_is_spent(
        seeded: NodeStore, settings: NodeSettings) -> None:
    policy = settings.policy.model_copy(update={"mode": "auto-approve"})
    settings = settings.model_copy(update={"policy": policy})
    evaluation = evaluate_study(seeded, settings, _study("greedy", delta=5e-5))
    assert evaluation.decision == "refuse"
    assert evaluation.reasons == ["delta 5e-05 exceeds the site maximum per study (1e-05)"]
    ledger = site_ledger(seeded.engine, settings.policy)
    assert ledger.plan("greedy") is None and ledger.patient_spend() == {} and ledger.delta_spent() == 0.0


def test_status_counts_patients_near_and_at_their_cap_and_names_none(
        seeded: NodeStore, settings: NodeSettings, node_dir: Path) -> None:
    ledger = site_ledger(seeded.engine, settings.policy)
    ledger.register_study("s1", _plan(3.0))
    ledger.admit("s1", "train", {p: 3.0 if p in CAPPED else None for p in PSEUDONYMS[:10]}, 20.0)
    ledger.charge("s1", 1, 1.0, patients=set(PSEUDONYMS[:10]))
    out = CliRunner().invoke(app, ["node", "status", "--json", "--config", str(node_dir / "node.toml")])
    assert out.exit_code == 0, out.output
    status = json.loads(out.output)
    patients = status["privacy"]["patients"]
    # open study: each holds its target 3; the 4 capped at 3 are at their cap, the others far
    assert (patients["with_spend"], patients["at_cap"], patients["near_cap"]) == (10, 4, 0)
    # what was really spent: the 4 steps taken (not the reservation)
    assert status["privacy"]["patient_epsilon_sum"] == pytest.approx(_plan(3.0).epsilon_for_steps(4))
    assert status["privacy"]["delta_spent"] == pytest.approx(1e-5)
    assert not any(p in out.output for p in PSEUDONYMS)
