"""A study chooses its outcome (issue 21, item 1): the node exports every numeric mapped column,
checks the study's label when it DECIDES (the refusal names it), and the ClientApp trains each
study on the label it names, with the records that hold it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from audit.signing import Signer
from exchange.cli import app
from exchange.node.decisions import evaluate_study
from exchange.node.importer import import_records
from exchange.node.mapping import parse_mapping
from exchange.node.policy import StudyView
from exchange.node.privacy import site_ledger
from exchange.node.settings import NodeSettings
from exchange.node.site_export import export_site, node_config
from exchange.node.store import NodeStore
from exchange.study.spec import study_spec
from federated.client_app import train_hospital_round
from federated.dp import initial_state
from federated.runtime.site import Site
from tests.node.helpers import ExactNoise, gru_contract, seed_consent, study_view

N = 60
PSEUDONYMS = [f"p{i}" for i in range(N)]


def _seed(store: NodeStore, settings: NodeSettings, tmp_path: Path) -> None:
    """Two features and three outcomes: a binary `label`, a regression `hba1c` that a third of
    the patients lack, a three-class `stage`, and a `grade` that is not a class label."""
    rows = ["pid,mean_radius,mean_texture,label,hba1c,stage,grade"]
    for i, p in enumerate(PSEUDONYMS):
        hba1c = "" if i % 3 == 0 else f"{5 + (i % 7) * 0.3:.1f}"
        rows.append(f"{p},{(i % 7) / 7:.3f},{(i % 5) / 5:.3f},{i % 2},{hba1c},{i % 3},{0.5 + i % 2}")
    path = tmp_path / "records.csv"
    path.write_text("\n".join(rows) + "\n")
    mapping = parse_mapping({"pseudonym_column": "pid", "columns": {
        "mean_radius": "labs", "mean_texture": "labs",
        "label": {"category": "outcomes", "type": "integer"},
        "hba1c": {"category": "labs", "type": "number", "required": False},
        "stage": {"category": "outcomes", "type": "integer"},
        "grade": {"category": "outcomes", "type": "number"}}})
    with store.transaction() as session:
        import_records(session, path, "csv", mapping)
    seed_consent(store, tmp_path / "consent", [gru_contract(p, "hospital-a") for p in PSEUDONYMS],
                 "hospital-a",
                 Signer.load(settings.signing_key_path))


def _study(study_id: str, label: str, task: str = "regression", **extra: Any) -> StudyView:
    template = {"regression": "linear_regression", "binary": "logistic_regression"}.get(
        task, "softmax_regression")
    return study_view(study_id, **{"template": template, "task": task, "label": label, **extra})


def test_each_study_names_its_label_checked_at_decision(
        settings: NodeSettings, store: NodeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose label does not fit the study's task is not usable, like one missing a column:
    it is left out of the decision count (and of training), never refused on, since whether one
    record fits is one patient's fact and a reason is public (docs/privacy.md, "Counts"). A study
    that no record fits is refused by the noised count, with a reason saying what counts."""
    from exchange.node import decisions

    monkeypatch.setattr(decisions, "SecureRandom", ExactNoise)  # the counts below are exact
    settings.policy.mode = "auto-approve"
    settings.policy.min_eligible_records = 10
    _seed(store, settings, tmp_path)
    at = datetime.now(UTC)
    ledger = site_ledger(store.engine, settings.policy)
    assert evaluate_study(store, settings, _study("s-hba1c", "hba1c"), at).decision == "approve"
    assert ledger.decision("s-hba1c").noisy_count == 40  # type: ignore[union-attr]  # a third lack hba1c
    assert evaluate_study(store, settings, _study("s-bin", "label", "binary"), at).decision == "approve"
    assert evaluate_study(store, settings, _study("s-stage", "stage", "multiclass", classes=3),
                          at).decision == "approve"
    # a label the node does not hold is refused by name (a column rule: no record involved)
    unknown = evaluate_study(store, settings, _study("s-x", "weight"), at)
    assert unknown.decision == "refuse" and any("weight" in r for r in unknown.reasons), unknown.reasons
    # no record fits: refused by the noised count, and no reason speaks of a value
    for study in (_study("s-nb", "hba1c", "binary"), _study("s-grade", "grade", "multiclass", classes=3)):
        refused = evaluate_study(store, settings, study, at)
        assert refused.decision == "refuse", refused.reasons
        noised = "fewer eligible patients (a noised count)"
        assert [r for r in refused.reasons if not r.startswith(noised)] == []
        assert "a label the study's task can use" in refused.reasons[0]
    # some records fit (stage 0 and 1 for two classes): the others are left out of the count
    few = evaluate_study(store, settings, _study("s-few", "stage", "multiclass", classes=2), at)
    assert few.decision == "approve", few.reasons
    assert ledger.decision("s-few").noisy_count == 40  # type: ignore[union-attr]
    assert ledger.decision_patients("s-few") == frozenset(p for i, p in enumerate(PSEUDONYMS) if i % 3 != 2)


def test_one_patients_unfit_label_does_not_change_what_the_decision_releases(
        settings: NodeSettings, store: NodeStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Before: a single record with a label outside the task's values made the node refuse with
    "label ... is not binary", a public reason that one patient's value flipped. Now the study is
    decided as if that record were missing: the same reasons, the count one lower (noised)."""
    from exchange.node import decisions

    monkeypatch.setattr(decisions, "SecureRandom", ExactNoise)
    settings.policy.mode = "auto-approve"
    _seed(store, settings, tmp_path)
    rows = "pid,mean_radius,mean_texture,label\nodd,0.1,0.2,7\n"
    (tmp_path / "odd.csv").write_text(rows)
    mapping = parse_mapping({"pseudonym_column": "pid", "columns": {
        "mean_radius": "labs", "mean_texture": "labs", "label": {"category": "outcomes", "type": "integer"}}})
    with store.transaction() as session:
        import_records(session, tmp_path / "odd.csv", "csv", mapping)
    seed_consent(store, tmp_path / "consent-odd", [gru_contract("odd", "hospital-a")], "hospital-a",
                 Signer.load(settings.signing_key_path))
    evaluation = evaluate_study(store, settings, _study("s-odd", "label", "binary"), datetime.now(UTC))
    assert evaluation.decision == "approve", evaluation.reasons
    assert evaluation.reasons == ["meets site policy; approved automatically"]
    ledger = site_ledger(store.engine, settings.policy)
    assert "odd" not in ledger.decision_patients("s-odd") and ledger.decision("s-odd").noisy_count == N  # type: ignore[union-attr]


def test_clientapp_trains_each_study_on_its_own_label(settings: NodeSettings, store: NodeStore,
                                                      tmp_path: Path, node_dir: Path) -> None:
    _seed(store, settings, tmp_path)
    site_ledger(store.engine, settings.policy)  # the daemon sets the site's budgets at start
    export_site(store, settings, ["s-hba1c", "s-bin", "s-weight"])
    site = Site.from_node_config(node_config(settings))
    data, label = site.records()
    assert label is None and {"label", "hba1c", "stage"} <= set(data.columns)
    assert int(np.isnan(data.x[:, data.columns.index("hba1c")]).sum()) == N // 3  # missing stays missing
    at = datetime.now(UTC)
    hba1c = study_spec(_study("s-hba1c", "hba1c").accepted())
    out = train_hospital_round(site, hba1c, 1, initial_state(hba1c.template, len(hba1c.columns)), at)
    assert out.status == "ok", out.reason
    # the regression study used only patients who hold hba1c (the others have no spend here)
    spent = set(site.ledger().patient_spend())
    assert spent and all(int(p[1:]) % 3 != 0 for p in spent)
    binary = study_spec(_study("s-bin", "label", "binary").accepted())
    out = train_hospital_round(site, binary, 1, initial_state(binary.template, len(binary.columns)), at)
    assert out.status == "ok", out.reason
    assert any(int(p[1:]) % 3 == 0 for p in site.ledger().patient_spend())  # every patient holds `label`
    # the steward's own privacy report shows what the coordinator's cannot (issue 21, item 4)
    report = CliRunner().invoke(app, ["node", "report", "s-hba1c", "--config", str(node_dir / "node.toml")])
    assert report.exit_code == 0, report.output
    body = json.loads(report.stdout)
    assert body["noise_multiplier"] > 0 and 0 < body["sample_rate"] <= 1 and body["accountant"] == "prv"
    assert [r["round"] for r in body["rounds_trained"]] == [1] and body["epsilon_spent"] > 0
    unknown = CliRunner().invoke(app, ["node", "report", "s-nope", "--config", str(node_dir / "node.toml")])
    assert unknown.exit_code == 1 and "no privacy plan" in unknown.output
    spec = study_spec(_study("s-weight", "weight").accepted())
    refused = train_hospital_round(site, spec, 1, initial_state(spec.template, len(spec.columns)), at)
    assert refused.status == "refused" and "'weight'" in refused.reason
