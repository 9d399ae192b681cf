"""One study, one consent request: a hospital decides on a study with exactly the request its
ClientApp later gates records with (exchange/study/spec.py).

Decision time: what the node builds from the study the coordinator shows it
(`GET /v1/hospital/studies`, then `StudyView` -> `study_request`). Training time: what the
coordinator hands its runner when the study starts (`RunRequest`), turned into the `StudySpec`
every ClientApp receives through Flower's run config. Contracts restricted by DUO US (named
researchers), PS (named projects), IS (named institutions) and TS (a time limit) must count the
same way at both times; before the fix, the decision-time request had no researcher (so a US
contract naming the researcher was refused at decision and permitted in training) and took its
data categories from the columns rather than the study's `data_categories`.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from consent import duo
from consent.evaluate import evaluate
from consent.model import Contract, Period, Provision
from consent.request import StudyRequest
from exchange.node.consent_store import study_request
from exchange.node.policy import StudyView
from exchange.study.runners import RunHandle, RunObserver, RunRequest
from exchange.study.spec import AcceptedStudy, consent_request, feature_columns, study_spec
from federated.study_spec import StudySpec
from tests.exchange.conftest import World
from tests.exchange.scripted_runner import ScriptedRunner

AT = datetime(2026, 6, 1, tzinfo=UTC)
YEARS = Period(start=datetime(2026, 1, 1, tzinfo=UTC), end=datetime(2027, 12, 31, tzinfo=UTC))


class RecordingRunner(ScriptedRunner):
    """The scripted runner, keeping the `RunRequest` the coordinator started each study with."""

    requests: list[RunRequest]

    def start(self, request: RunRequest, observer: RunObserver) -> RunHandle:
        self.requests.append(request)
        return super().start(request, observer)


def _contract(provision: Provision) -> Contract:
    return Contract(
        contract_id="c",
        pseudonym="p",
        hospital="h-one",
        version=1,
        issued=datetime(2026, 1, 1, tzinfo=UTC),
        provision=provision,
    )


def _gru(*modifiers: str, **kw: Any) -> Contract:
    return _contract(Provision(type="permit", purposes=(duo.GRU,), modifiers=modifiers, **kw))


def _both_requests(world: World) -> tuple[StudyRequest, StudyRequest, str]:
    """(decision-time request at h-one, training-time request, study id) for one study that
    alice (of acme, DE) submits and two hospitals approve."""
    runner = RecordingRunner(hospital_keys=world.runner.hospital_keys)
    runner.requests = []
    world.runtime.lifecycle.runner = runner
    study_id = world.submit("alice", purpose="DUO:0000006", disease=None)["id"]  # HMB
    listed = world.signed("h-one", "GET", "/v1/hospital/studies", params={"status": "pending"})
    assert listed.status_code == 200, listed.text
    (shown,) = [s for s in listed.json()["items"] if s["id"] == study_id]
    decision_time = study_request(StudyView.from_json(shown))
    for hospital in ("h-one", "h-two"):
        assert world.decide(hospital, study_id).status_code in (200, 201)
    for handle in runner.handles:
        handle.wait(60)
    (started,) = [r for r in runner.requests if r.study_id == study_id]
    spec = study_spec(started.accepted())
    # What each ClientApp reads: the spec as it travels in Flower's run config.
    training_time = StudySpec.from_run_config(spec.to_run_config()).request
    return decision_time, training_time, study_id


def test_decision_and_training_use_one_request(sqlite_world: World) -> None:
    decision_time, training_time, study_id = _both_requests(sqlite_world)
    assert decision_time == training_time
    assert training_time.researcher == "alice" and training_time.study_id == study_id
    assert training_time.organisation == "acme" and training_time.region == "DE"
    # the study's data categories, not only those it lists columns for
    assert training_time.data_categories == ("diagnoses", "labs")


def test_eligibility_is_equal_for_us_ps_is_and_ts_contracts(sqlite_world: World) -> None:
    decision_time, training_time, study_id = _both_requests(sqlite_world)
    contracts = {
        "US alice": (_gru(duo.US, users=("alice",)), True),
        "US bob": (_gru(duo.US, users=("bob",)), False),
        "PS this study": (_gru(duo.PS, projects=(study_id,)), True),
        "PS another": (_gru(duo.PS, projects=("st-other",)), False),
        "IS acme": (_gru(duo.IS, organisations=("acme",)), True),
        "IS globex": (_gru(duo.IS, organisations=("globex",)), False),
        "TS": (_gru(duo.TS, period=YEARS), False),  # a study asks for no period: not within
    }
    for name, (contract, expected) in contracts.items():
        at_decision = evaluate(contract, decision_time, AT)
        in_training = evaluate(contract, training_time, AT)
        assert at_decision.permit is in_training.permit is expected, (name, at_decision.reasons)
        assert at_decision.exclusion == in_training.exclusion, name


def test_node_view_and_runner_agree_without_a_coordinator() -> None:
    """The node's StudyView of a HospitalStudy and the AcceptedStudy read from it are one."""
    spec = {
        "purpose": "DUO:0000042",
        "data_categories": ["vitals", "labs"],
        "epsilon": 2.0,
        "columns": {"labs": ["b", "a"], "vitals": ["hr"]},
        "template": "logistic_regression",
        "task": "binary",
        "label": "y",
        "delta": 1e-5,
        "rounds": 3,
        "min_hospitals": 2,
        "commercial": False,
        "ethics_approval": True,
    }
    shown = {
        "id": "st-1",
        "organisation_id": "acme",
        "organisation_region": "DE",
        "researcher_id": "alice",
        "status": "submitted",
        "spec": spec,
    }
    accepted = AcceptedStudy.from_hospital_view(shown)
    assert study_request(StudyView.from_json(shown)) == consent_request(accepted)
    # columns in data_categories order, then as listed: the model's input order everywhere
    assert feature_columns(spec) == ("hr", "b", "a") == study_spec(accepted).columns


def test_a_spec_federated_would_refuse_is_refused_with_the_field() -> None:
    spec = {
        "purpose": "DUO:0000042",
        "data_categories": ["labs"],
        "epsilon": 2.0,
        "columns": {"labs": ["y"]},
        "template": "logistic_regression",
        "task": "binary",
        "label": "y",
        "delta": 1e-5,
        "rounds": 3,
        "min_hospitals": 2,
    }
    with pytest.raises(ValueError, match="label"):
        study_spec(AcceptedStudy(study_id="st-1", spec=spec, organisation_id="acme", region="DE"))
