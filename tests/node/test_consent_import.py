"""`exchange node consent import`: consent validates, every version is kept, a bad batch
imports nothing and names each bad document."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from audit.signing import Signer
from consent.model import revoke
from exchange.cli import app
from exchange.node.consent_store import ConsentImportRejectedError, import_consent_folder
from exchange.node.eligibility import current_contract_hashes
from exchange.node.models import ConsentContractRow
from exchange.node.store import NodeStore
from tests.node.helpers import ISSUED, gru_contract

SIGNER = Signer.generate()
FHIR_R4_CONSENT = {
    "resourceType": "Consent", "id": "c-p3", "status": "active",
    "scope": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/consentscope",
                          "code": "research"}]},
    "category": [{"coding": [{"system": "http://loinc.org", "code": "57016-8"}]}],
    "patient": {"reference": "Patient/p3"}, "dateTime": "2025-01-01T00:00:00Z",
    "organization": [{"reference": "Organization/hospital-a"}],
    "policyRule": {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                               "code": "OPTIN"}]},
    "provision": {"type": "permit", "purpose": [
        {"system": "http://purl.obolibrary.org/obo/duo", "code": "DUO:0000042"}]},
}


def _count(store: NodeStore) -> int:
    with store.sessions() as session:
        return int(session.execute(select(func.count()).select_from(ConsentContractRow)).scalar_one())


def _write(folder: Path, name: str, data: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(data))


def test_versions_are_kept_and_reimport_is_idempotent(store: NodeStore, tmp_path: Path) -> None:
    v1 = gru_contract("p1", "hospital-a")
    _write(tmp_path / "b1", "p1.json", v1.to_json())
    _write(tmp_path / "b1", "p2.json", [gru_contract("p2", "hospital-a").to_json()])
    with store.transaction() as session:
        report = import_consent_folder(session, tmp_path / "b1", "hospital-a", SIGNER)
    assert (report.new_versions, report.unchanged, report.pseudonyms) == (2, 0, 2)
    v2 = revoke(v1, ISSUED + timedelta(days=10))
    _write(tmp_path / "b2", "p1.json", v1.to_json())
    _write(tmp_path / "b2", "p1-v2.json", v2.to_json())
    with store.transaction() as session:
        report = import_consent_folder(session, tmp_path / "b2", "hospital-a", SIGNER)
    assert (report.new_versions, report.unchanged) == (1, 1)
    assert _count(store) == 3
    with store.sessions() as session:
        current = current_contract_hashes(session)["p1"]
        rows = session.execute(select(ConsentContractRow).where(
            ConsentContractRow.pseudonym == "p1").order_by(ConsentContractRow.version)).scalars().all()
    assert [r.version for r in rows] == [1, 2]
    assert [r.source_hash for r in rows] == [v1.content_hash, v2.content_hash]
    # stored signed by the node: the chain points at the stored (signed) version 1
    assert current == rows[1].contract_hash and rows[1].document["supersedes"] == rows[0].contract_hash
    assert rows[1].signed["contract"]["issuer_key"] == SIGNER.key_id


def test_bad_batch_imports_nothing_and_names_each_bad_file(store: NodeStore, tmp_path: Path,
                                                           node_dir: Path, runner: CliRunner) -> None:
    folder = tmp_path / "batch"
    good = gru_contract("p1", "hospital-a")
    _write(folder, "a-good.json", good.to_json())
    _write(folder, "b-other-hospital.json", gru_contract("p2", "hospital-z").to_json())
    broken = good.to_json() | {"contract_id": "x", "pseudonym": "p4", "version": 2, "supersedes": "0" * 64}
    _write(folder, "c-broken-chain.json", broken)
    _write(folder, "d-fhir.json", FHIR_R4_CONSENT | {"provision": {"type": "permit", "purpose": [
        {"system": "http://example.org/not-duo", "code": "X"}]}})
    _write(folder, "e-typo.json", good.to_json() | {"pseudonim": "p9"})
    result = runner.invoke(app, ["node", "consent", "import", str(folder), "--config",
                                 str(node_dir / "node.toml")])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "nothing imported; 4 problem(s)" in out
    assert "b-other-hospital.json: hospital" in out
    assert "c-broken-chain.json: supersedes: version 1 of pseudonym 'p4' is neither held" in out
    assert "d-fhir.json:" in out
    assert "e-typo.json: pseudonim" in out
    assert "a-good.json" not in out
    assert _count(store) == 0


def test_conflicting_version_is_refused(store: NodeStore, tmp_path: Path) -> None:
    _write(tmp_path / "b1", "p1.json", gru_contract("p1", "hospital-a").to_json())
    with store.transaction() as session:
        import_consent_folder(session, tmp_path / "b1", "hospital-a", SIGNER)
    other = gru_contract("p1", "hospital-a").model_copy(update={"contract_id": "hospital-a:other"})
    _write(tmp_path / "b2", "p1.json", other.to_json())
    with store.transaction() as session, pytest.raises(ConsentImportRejectedError, match="immutable"):
        import_consent_folder(session, tmp_path / "b2", "hospital-a", SIGNER)
    assert _count(store) == 1


def test_fhir_consent_imports(store: NodeStore, tmp_path: Path) -> None:
    _write(tmp_path / "fhir", "c.json", FHIR_R4_CONSENT)
    with store.transaction() as session:
        report = import_consent_folder(session, tmp_path / "fhir", "hospital-a", SIGNER)
    assert report.new_versions == 1
    with store.sessions() as session:
        assert set(current_contract_hashes(session)) == {"p3"}


def _fhir_update(**changes: object) -> dict[str, object]:
    return {**FHIR_R4_CONSENT, **changes}


def _current(store: NodeStore) -> dict[str, dict[str, object]]:
    with store.sessions() as session:
        hashes = current_contract_hashes(session)
        rows = session.execute(select(ConsentContractRow)).scalars().all()
    return {r.pseudonym: r.document for r in rows if r.contract_hash == hashes[r.pseudonym]}


def test_fhir_consent_update_by_id_becomes_the_next_version(store: NodeStore, tmp_path: Path) -> None:
    """Issue 21 item 8: an inactive (or rejected) re-export of a held Consent revokes it; an old
    export imported again changes nothing and never re-activates it."""
    v1 = _fhir_update(meta={"versionId": "1", "lastUpdated": "2025-01-01T00:00:00Z"})
    _write(tmp_path / "b1", "c.json", v1)
    with store.transaction() as session:
        import_consent_folder(session, tmp_path / "b1", "hospital-a", SIGNER)
    inactive = _fhir_update(status="inactive", meta={"versionId": "2", "lastUpdated": "2025-03-01T00:00:00Z"})
    _write(tmp_path / "b2", "c.json", inactive)
    with store.transaction() as session:
        report = import_consent_folder(session, tmp_path / "b2", "hospital-a", SIGNER)
    assert report.new_versions == 1
    current = _current(store)["p3"]
    assert (current["version"], current["status"]) == (2, "inactive")
    # the old export again: unchanged, still revoked
    with store.transaction() as session:
        report = import_consent_folder(session, tmp_path / "b1", "hospital-a", SIGNER)
    assert (report.new_versions, report.unchanged) == (0, 1)
    assert _current(store)["p3"]["status"] == "inactive"
    # a later re-activation with a new versionId is the third version
    _write(tmp_path / "b3", "c.json", _fhir_update(meta={"versionId": "3",
                                                         "lastUpdated": "2025-05-01T00:00:00Z"}))
    _write(tmp_path / "b3", "d.json", _fhir_update(id="c-p4", patient={"reference": "Patient/p4"},
                                                   status="rejected"))
    with store.transaction() as session:
        report = import_consent_folder(session, tmp_path / "b3", "hospital-a", SIGNER)
    assert report.new_versions == 2
    current_all = _current(store)
    assert (current_all["p3"]["version"], current_all["p3"]["status"]) == (3, "active")
    assert current_all["p4"]["status"] == "rejected"
    # the same versionId with other content is refused, nothing changes
    _write(tmp_path / "b4", "c.json", _fhir_update(status="inactive", meta={"versionId": "3"}))
    with store.transaction() as session, pytest.raises(ConsentImportRejectedError, match="versionId 3"):
        import_consent_folder(session, tmp_path / "b4", "hospital-a", SIGNER)
    assert _count(store) == 4


def test_fhir_consent_for_another_hospital_is_refused(store: NodeStore, tmp_path: Path) -> None:
    """Issue 21 item 9: the node's id never overrides the Consent's Organization."""
    _write(tmp_path / "x", "c.json", FHIR_R4_CONSENT)
    with store.transaction() as session, pytest.raises(ConsentImportRejectedError,
                                                       match="names Organization/hospital-a"):
        import_consent_folder(session, tmp_path / "x", "hospital-x", SIGNER)
    assert _count(store) == 0


def test_consent_list_and_revoke_commands(node_dir: Path, runner: CliRunner, tmp_path: Path,
                                          store: NodeStore) -> None:
    config = str(node_dir / "node.toml")
    _write(tmp_path / "c", "c.json", FHIR_R4_CONSENT)
    assert runner.invoke(app, ["node", "consent", "import", str(tmp_path / "c"), "-c", config]).exit_code == 0
    listed = runner.invoke(app, ["node", "consent", "list", "-c", config, "--json"])
    assert listed.exit_code == 0, listed.output
    [row] = json.loads(listed.output)
    assert (row["pseudonym"], row["version"], row["permits"]) == ("p3", 1, True)
    revoked = runner.invoke(app, ["node", "consent", "revoke", "p3", "-c", config])
    assert revoked.exit_code == 0, revoked.output
    [row] = json.loads(runner.invoke(app, ["node", "consent", "list", "-c", config, "--json"]).output)
    assert (row["version"], row["versions"], row["permits"]) == (2, 2, False)
    table = runner.invoke(app, ["node", "consent", "list", "-c", config])
    assert "2 of 2" in table.output and "p3" in table.output
    missing = runner.invoke(app, ["node", "consent", "revoke", "nobody", "-c", config])
    assert missing.exit_code == 1 and "no consent contract is held for pseudonym 'nobody'" in missing.output
    assert _count(store) == 2
