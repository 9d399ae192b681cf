"""The demo's studies (exchange.demo.studies): the survival study's request and its translation."""

from __future__ import annotations

from pathlib import Path

import pytest

from exchange.demo.consortium import DemoConfig, study_body
from exchange.demo.studies import get_study
from exchange.study.spec import AcceptedStudy, study_spec


def test_survival_study_body_and_spec() -> None:
    body = study_body(DemoConfig(out=Path("unused"), study="survival", rounds=3))
    assert (body["template"], body["task"], body["label"], body["event"]) == ("cox_ph", "survival", "time",
                                                                              "event")
    spec = study_spec(AcceptedStudy(study_id="st-s", spec=body, organisation_id="acme-research", region="DE"))
    assert spec.event == "event" and spec.label == "time" and "event" not in spec.columns
    assert set(spec.columns) == {"age", "sex", "kappa", "lambda", "creatinine", "mgus"}
    assert spec.request.purpose == "DUO:0000042" and spec.request.disease is None
    with pytest.raises(ValueError, match="unknown demo study 'asthma'"):
        get_study("asthma")


def test_unknown_demo_study_is_refused_before_anything_starts(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from exchange.cli import app

    result = CliRunner().invoke(app, ["demo", "--study", "asthma", "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert "unknown study 'asthma'" in result.output and "survival" in result.output
    assert not (tmp_path / "out").exists()


def test_the_survival_study_can_ask_for_fewer_features_so_smaller_sites_have_the_events() -> None:
    from exchange.node.outcomes import min_events
    from federated.clinical_data import public_survival_reference

    body = study_body(DemoConfig(out=Path("unused"), study="survival", features=2))
    assert body["columns"] == {"demographics": ["age", "sex"]} and body["data_categories"] == ["demographics"]
    accepted = AcceptedStudy(study_id="st-s2", spec=body, organisation_id="acme-research", region="DE")
    spec = study_spec(accepted)
    assert list(spec.columns) == ["age", "sex"]
    # the site rule is unchanged: what it asks of a two-coefficient study is the rule's floor
    assert min_events(len(spec.columns)) == 20 < min_events(6) == 60
    assert public_survival_reference(list(spec.columns), "pretrain") is not None  # its Cox subcohort
    every = study_body(DemoConfig(out=Path("unused"), study="survival"))["columns"]
    assert every == get_study("survival").columns()
    for bad in (0, 7):
        with pytest.raises(ValueError, match=r"features: between 1 and 6 for survival"):
            study_body(DemoConfig(out=Path("unused"), study="survival", features=bad))


def test_the_study_s_purpose_can_be_set_and_the_demo_s_consents_then_permit_more_patients() -> None:
    from consent.duo import HMB, covers

    body = study_body(DemoConfig(out=Path("unused"), study="survival", purpose=HMB))
    assert body["purpose"] == "DUO:0000006"
    assert study_body(DemoConfig(out=Path("unused"), study="survival"))["purpose"] == "DUO:0000042"
    # GRU consents cover HMB research, HMB consents do not cover GRU research
    assert covers("DUO:0000042", HMB)[0] and not covers(HMB, "DUO:0000042")[0]
