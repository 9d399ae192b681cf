"""The demo's StudyRunner adapter: the federated StudySpec it builds from a coordinator study,
and how it forwards a run's events to the coordinator's observer."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from audit.signing import Signer
from exchange.demo.consortium import DemoConfig, breast_cancer_columns, study_body
from exchange.demo.runner import StudyOwner, _Bridge, study_spec
from exchange.node.consent_store import study_request
from exchange.node.policy import StudyView


def test_spec_carries_the_study_as_the_hospitals_decided_on_it() -> None:
    body = study_body(DemoConfig(out=Path("unused"), rounds=4, epsilon=2.5))
    spec = study_spec("st-1", body, StudyOwner("acme-research", "DE"))
    columns = breast_cancer_columns()
    assert spec.columns == tuple(c for cat in body["columns"] for c in columns[cat])
    assert (spec.rounds, spec.epsilon, spec.delta, spec.min_hospitals) == (4, 2.5, 1e-5, 2)
    assert spec.label == "malignant" and spec.template == "logistic_regression"
    # the consent request is exactly the node's (what it counted when it decided)
    hospital_view = {"id": "st-1", "organisation_id": "acme-research", "organisation_region": "DE",
                     "status": "submitted", "spec": {k: v for k, v in body.items() if k != "token_budget"}}
    assert spec.request == study_request(StudyView.from_json(hospital_view))
    assert spec.request.purpose == "DUO:0000007" and spec.request.disease == "C50"
    assert spec.request.ethics_approval is True and spec.request.commercial is False
    assert set(spec.request.data_categories) == {"labs", "imaging"}


def test_a_spec_federated_would_refuse_is_refused_with_the_field() -> None:
    body = study_body(DemoConfig(out=Path("unused")))
    body["columns"] = {"labs": ["malignant"]}  # the label as a feature
    with pytest.raises(ValueError, match="label"):
        study_spec("st-1", body, StudyOwner("acme-research", "DE"))


class _Recorder:
    """The coordinator's observer interface, recording calls (the boundary of this unit)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def on_round(self, study_id: str, round_number: int, metrics: Mapping[str, Any],
                 receipts: list[Any]) -> None:
        self.calls.append(("round", (study_id, round_number, dict(metrics), receipts)))

    def on_complete(self, study_id: str, model: bytes, metrics: Mapping[str, Any]) -> None:
        self.calls.append(("complete", (study_id, model, dict(metrics))))

    def on_failed(self, study_id: str, reason: str) -> None:
        self.calls.append(("failed", (study_id, reason)))


def test_bridge_forwards_signed_receipts_and_the_model_bytes(tmp_path: Path) -> None:
    from federated.receipts import make_receipt

    signer = Signer.generate()
    receipt = make_receipt(signer, study_id="st-1", round=1, hospital_id="hospital-a", records_used=5,
                           commitment="ab" * 32, epsilon_spent=0.5, epsilon_total=0.5, delta=1e-5,
                           spec_sha256="cd" * 32)
    recorder = _Recorder()
    bridge = _Bridge("st-1", recorder)
    bridge.on_round(1, {"eval_accuracy": 0.9}, [receipt])
    model = tmp_path / "m.safetensors"
    model.write_bytes(b"model-bytes")
    bridge.on_complete(model, "ef" * 32)
    assert bridge.ended.is_set()
    (kind, (study_id, number, metrics, entries)), (kind2, (_sid, data, info)) = recorder.calls
    assert (kind, study_id, number, metrics) == ("round", "st-1", 1, {"eval_accuracy": 0.9})
    assert entries == [receipt.entry]
    entries[0].verify_signature(signer.public_key)
    assert (kind2, data, info) == ("complete", b"model-bytes", {"model_sha256": "ef" * 32})
