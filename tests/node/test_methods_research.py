"""Methods-development research at a hospital (issue 21, item 5): the study's
`methods_development` (or purpose MDS, methods research alone) reaches the consent request the
node decides with and the ClientApp gates with, and an NMDS consent refuses it as the DUOS
matcher does."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from audit.signing import Signer
from consent import duo
from consent.model import Contract, Provision
from exchange.node import decisions
from exchange.node.decisions import evaluate_study
from exchange.node.policy import StudyView
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore
from exchange.study.spec import consent_request, study_spec
from tests.node.helpers import ISSUED, ExactNoise, seed_consent, seed_records, study_view

PSEUDONYMS = [f"p{i}" for i in range(40)]


def _contract(pseudonym: str, nmds: bool) -> Contract:
    return Contract(contract_id=f"hospital-a:{pseudonym}", pseudonym=pseudonym, hospital="hospital-a",
                    version=1,
                    issued=ISSUED, provision=Provision(type="permit", purposes=(duo.GRU,),
                                                       modifiers=(duo.NMDS,) if nmds else ()))


def _study(study_id: str, **spec: Any) -> StudyView:
    return study_view(study_id, **{"purpose": "HMB", **spec})


def test_nmds_consents_refuse_methods_research(settings: NodeSettings, store: NodeStore,
                                               tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(decisions, "SecureRandom", ExactNoise)  # the decisions below are on exact counts
    settings.policy.mode = "auto-approve"
    settings.policy.min_eligible_records = 5
    seed_records(store, tmp_path, PSEUDONYMS)
    # every fourth patient's consent carries NMDS
    seed_consent(store, tmp_path / "consent", [_contract(p, i % 4 == 0) for i, p in enumerate(PSEUDONYMS)],
                 "hospital-a", Signer.load(settings.signing_key_path))
    at = datetime.now(UTC)
    finding = evaluate_study(store, settings, _study("s-finding"), at)
    methods = evaluate_study(store, settings, _study("s-methods", methods_development=True), at)
    alone = evaluate_study(store, settings, _study("s-mds", purpose="MDS"), at)
    assert finding.eligible_records == 40
    assert methods.eligible_records == alone.eligible_records == 30
    assert methods.decision == alone.decision == "approve"
    # the very request training gates with carries it
    for view in (_study("s-methods", methods_development=True), _study("s-mds", purpose="MDS")):
        request = study_spec(view.accepted()).request
        assert request == consent_request(view.accepted())
        assert request.methods_development or request.purpose == duo.MDS
