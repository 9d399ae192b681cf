"""The files the daemon hands its SuperNode are what federated's ClientApp can read."""

from __future__ import annotations

import json
import tomllib
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from audit.signing import Signer
from consent.model import sign
from consent.request import StudyRequest
from exchange.node.settings import NodeSettings, SitePolicy
from exchange.node.site_export import export_site, node_config
from exchange.node.store import NodeStore
from federated.runtime.site import Site
from tests.node.helpers import ISSUED, gru_contract, revoke, seed_consent, seed_records

PSEUDONYMS = [f"p{i}" for i in range(20)]


def test_clientapp_reads_the_exported_site(settings: NodeSettings, store: NodeStore, tmp_path: Path) -> None:
    seed_records(store, tmp_path, PSEUDONYMS)
    issuer = Signer.generate()
    signed = sign(gru_contract("p0", "hospital-a"), issuer)
    folder = tmp_path / "consent"
    folder.mkdir()
    (folder / "p0.json").write_text(json.dumps(signed.to_json()))  # arrives signed by its issuer
    signer = Signer.load(settings.signing_key_path)
    seed_consent(store, folder, [gru_contract(p, "hospital-a") for p in PSEUDONYMS[1:15]], "hospital-a",
                 signer)
    paths = export_site(store, settings, ["st-1"])
    site = Site.from_node_config(node_config(settings))
    assert site.approved_studies() == {"st-1"}
    data, label = site.records()
    # no label of the file's own: every numeric mapped column, and each study names its label
    assert label is None and len(data) == 20
    assert data.columns == ("label", "mean_radius", "mean_texture")
    assert data.categories == {"label": "outcomes", "mean_radius": "labs", "mean_texture": "labs"}
    relabelled = data.relabel("label")
    assert relabelled.columns == ("mean_radius", "mean_texture")
    assert relabelled.y.tolist() == [float(i % 2) for i in range(20)]
    assert 0 < int(data.is_test.sum()) < 20
    request = StudyRequest(purpose="DUO:0000042", organisation="acme", region="DE", data_categories=("labs",))
    now = datetime.now(UTC)
    outcome = site.gate(request, data.pseudonyms, now)
    assert outcome.eligible == frozenset(PSEUDONYMS[:15])
    lines = paths["contracts"].read_text().splitlines()
    assert json.loads(lines[0])["public_key"] == issuer.public_key_b64  # the issuer's signature kept
    assert {json.loads(line)["public_key"] for line in lines[1:]} == {signer.public_key_b64}
    assert site.ledger_url == settings.db_url  # SQLite URLs stay as they are

    # A revocation imported later is exported, and the ClientApp sees it at its next message.
    seed_consent(store, tmp_path / "revocations", [revoke(gru_contract("p3", "hospital-a"),
                                                          ISSUED + timedelta(days=1))], "hospital-a", signer)
    export_site(store, settings, [])
    assert site.approved_studies() == frozenset()
    assert "p3" not in site.gate(request, data.pseudonyms, now).eligible


def test_a_reward_capacity_set_later_reaches_the_clientapps_node_config(
        settings: NodeSettings, store: NodeStore, tmp_path: Path) -> None:
    """`policy.reward_capacity` (docs/privacy.md) travels in the node config file; a steward who
    sets it after the first export gets the file rewritten at the next export."""
    seed_records(store, tmp_path, PSEUDONYMS)
    paths = export_site(store, settings, [])
    assert "reward-capacity" not in paths["node_config"].read_text()
    assert Site.from_node_config(tomllib.loads(paths["node_config"].read_text())).reward_capacity is None
    policy = settings.policy.model_copy(update={"reward_capacity": 1024})
    capped = settings.model_copy(update={"policy": policy})
    export_site(store, capped, [])
    written = tomllib.loads(paths["node_config"].read_text())
    assert Site.from_node_config(written).reward_capacity == 1024
    assert written == node_config(capped)
    with pytest.raises(ValueError, match="reward_capacity: must be a power of two"):
        SitePolicy(reward_capacity=1000)


def test_the_approvals_carry_each_approved_studys_spec_as_its_run_will(
        settings: NodeSettings, store: NodeStore, tmp_path: Path) -> None:
    """The approvals file names each approved study's `StudySpec` (the coordinator's translation
    of the study this node decided on), from which the Flower process calibrates its DP plan
    before the run; a study whose document makes no spec is approved all the same."""
    from exchange.node.models import StudyRow
    from exchange.study.spec import AcceptedStudy, study_spec
    from tests.node.helpers import study_view

    seed_records(store, tmp_path, PSEUDONYMS)
    document = {"id": "st-1", "organisation_id": "acme", "organisation_region": "DE",
                "researcher_id": "alice", "status": "running", "spec": dict(study_view("st-1").raw["spec"])}
    now = datetime.now(UTC)
    with store.transaction() as session:
        session.add(StudyRow(study_id="st-1", document=document, status="approved", first_seen=now,
                             updated_at=now))
        session.add(StudyRow(study_id="st-bare", document={"id": "st-bare"}, status="approved",
                             first_seen=now, updated_at=now))
        session.add(StudyRow(study_id="st-refused", document=document | {"id": "st-refused"},
                             status="refused", first_seen=now, updated_at=now))
    paths = export_site(store, settings, ["st-1", "st-bare"])
    site = Site.from_node_config(node_config(settings))
    assert site.approved_studies() == {"st-1", "st-bare"}
    expected = study_spec(AcceptedStudy.from_hospital_view(document))
    assert site.approved_specs() == {"st-1": expected}
    assert expected.request.researcher == "alice" and expected.study_id == "st-1"
    assert set(json.loads(paths["approvals"].read_text())["specs"]) == {"st-1"}
    export_site(store, settings, ["st-bare"])  # st-1 finished: neither its id nor its spec stays
    assert site.approved_studies() == {"st-bare"}
    assert site.approved_specs() == {}
    assert "specs" not in json.loads(paths["approvals"].read_text())
