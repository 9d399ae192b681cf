"""The steward's functions (exchange/node/steward.py), called directly as the demo does: a node
created, records and consent imported with the ClientApp's files refreshed at once, and a bad
batch refused whole."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exchange.node.consent_store import ConsentImportRejectedError
from exchange.node.mapping import ImportRejectedError
from exchange.node.site_export import site_paths
from exchange.node.steward import NodeExistsError, import_consent, import_data, init_node
from tests.node.helpers import gru_contract


def _records(tmp_path: Path, pseudonyms: list[str]) -> tuple[Path, Path]:
    csv = tmp_path / "records.csv"
    csv.write_text(
        "pid,mean_radius,label\n" + "".join(f"{p},{10 + i},{i % 2}\n" for i, p in enumerate(pseudonyms))
    )
    mapping = tmp_path / "mapping.json"
    mapping.write_text(
        json.dumps(
            {
                "pseudonym_column": "pid",
                "columns": {"mean_radius": "labs", "label": {"category": "outcomes", "type": "integer"}},
            }
        )
    )
    return csv, mapping


def test_init_import_and_refresh(tmp_path: Path) -> None:
    node = init_node(tmp_path / "node", "hospital-a", "http://127.0.0.1:8080", "127.0.0.1:9093")
    assert node.identity.hospital_id == "hospital-a"
    assert node.settings.signing_key_path.exists() and node.config_path.exists()
    with pytest.raises(NodeExistsError, match="already exists"):
        init_node(tmp_path / "node", "hospital-a", "http://127.0.0.1:8080", "127.0.0.1:9093")

    pseudonyms = [f"p{i:03d}" for i in range(30)]
    csv, mapping = _records(tmp_path, pseudonyms)
    report = import_data(node.settings, csv, None, mapping)
    assert report.records == 30
    paths = site_paths(node.settings)
    assert paths["records"].exists()  # refreshed at once, not at the daemon's next poll

    folder = tmp_path / "consent"
    folder.mkdir()
    for p in pseudonyms[:10]:
        (folder / f"{p}.json").write_text(json.dumps(gru_contract(p, "hospital-a").to_json()))
    imported = import_consent(node.settings, folder)
    assert (imported.new_versions, imported.pseudonyms) == (10, 10)
    assert len(paths["contracts"].read_text().splitlines()) == 10


def test_a_bad_batch_imports_nothing(tmp_path: Path) -> None:
    node = init_node(tmp_path / "node", "hospital-a", "http://127.0.0.1:8080", "127.0.0.1:9093")
    folder = tmp_path / "consent"
    folder.mkdir()
    (folder / "good.json").write_text(json.dumps(gru_contract("p1", "hospital-a").to_json()))
    (folder / "other.json").write_text(json.dumps(gru_contract("p2", "hospital-b").to_json()))
    with pytest.raises(ConsentImportRejectedError, match=r"other\.json"):
        import_consent(node.settings, folder)
    csv = tmp_path / "bad.csv"
    csv.write_text("pid,mean_radius\np1,not-a-number\n")
    mapping = tmp_path / "mapping.json"
    mapping.write_text(json.dumps({"pseudonym_column": "pid", "columns": {"mean_radius": "labs"}}))
    with pytest.raises(ImportRejectedError, match="row 1"):
        import_data(node.settings, csv, None, mapping)
    again = import_consent(node.settings, _only_good(folder))
    assert again.new_versions == 1  # the refused batch left nothing behind


def _only_good(folder: Path) -> Path:
    (folder / "other.json").unlink()
    return folder
