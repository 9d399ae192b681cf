"""`exchange node import-data`: a bad file changes nothing and names its bad rows (CSV,
Parquet, FHIR); a good file is imported whole with its column categories."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sqlalchemy import func, select
from typer.testing import CliRunner

from exchange.cli import app
from exchange.node.importer import import_records
from exchange.node.mapping import ImportRejectedError, parse_mapping
from exchange.node.models import ColumnCategory, ImportBatch, Record
from exchange.node.store import NodeStore

MAPPING = """
pseudonym_column = "patient_id"
[columns]
age = "demographics"
radius = "labs"
label = { category = "outcomes", type = "integer" }
"""


def _counts(store: NodeStore) -> tuple[int, int, int]:
    with store.sessions() as session:
        return tuple(session.execute(select(func.count()).select_from(table)).scalar_one()  # type: ignore[return-value]
                     for table in (Record, ImportBatch, ColumnCategory))


def _stored(store: NodeStore) -> tuple[dict[str, Any], dict[str, str]]:
    """(pseudonym -> values, column -> category) as stored."""
    with store.sessions() as session:
        rows: dict[str, Any] = dict(session.execute(select(Record.pseudonym, Record.values)).tuples().all())
        categories = dict(session.execute(select(ColumnCategory.column, ColumnCategory.category))
                          .tuples().all())
    return rows, categories


def _import(runner: CliRunner, node_dir: Path, file: Path, *extra: str) -> Any:
    return runner.invoke(app, ["node", "import-data", str(file), "--config", str(node_dir / "node.toml"),
                               *extra])


def test_good_csv_is_imported_with_categories(node_dir: Path, runner: CliRunner, store: NodeStore,
                                              tmp_path: Path) -> None:
    (tmp_path / "map.toml").write_text(MAPPING)
    (tmp_path / "good.csv").write_text("patient_id,age,radius,label\np1,54,12.5,1\np2,61,9.75,0\n")
    result = _import(runner, node_dir, tmp_path / "good.csv", "--mapping", str(tmp_path / "map.toml"))
    assert result.exit_code == 0, result.output
    assert "imported 2 records" in result.output
    with store.sessions() as session:
        rows = session.execute(select(Record.pseudonym, Record.values).order_by(Record.id)).all()
        categories = dict(session.execute(select(ColumnCategory.column, ColumnCategory.category))
                          .tuples().all())
    assert [(p, v) for p, v in rows] == [("p1", {"age": 54, "radius": 12.5, "label": 1}),
                                         ("p2", {"age": 61, "radius": 9.75, "label": 0})]
    assert categories == {"age": "demographics", "radius": "labs", "label": "outcomes"}
    again = _import(runner, node_dir, tmp_path / "good.csv", "--mapping", str(tmp_path / "map.toml"))
    assert again.exit_code == 1 and "already imported" in again.output
    assert _counts(store) == (2, 1, 3)


def test_bad_csv_changes_nothing_and_names_rows(node_dir: Path, runner: CliRunner, store: NodeStore,
                                                tmp_path: Path) -> None:
    (tmp_path / "map.toml").write_text(MAPPING)
    (tmp_path / "bad.csv").write_text(
        "patient_id,age,radius,label\n"
        "p1,54,12.5,1\n"        # row 1 fine
        "p2,sixty,9.7,0\n"      # row 2: age not a number
        ",40,1.0,1\n"           # row 3: no pseudonym
        "p4,40,nan,1\n"         # row 4: NaN
        "p5,40,1.0\n"           # row 5: too few fields
        "p6,40,2.0,0.5\n")      # row 6: label not an integer
    result = _import(runner, node_dir, tmp_path / "bad.csv", "--mapping", str(tmp_path / "map.toml"))
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "nothing imported" in out
    assert "row 2: age: not a number: 'sixty'" in out
    assert "row 3: patient_id: missing pseudonym" in out
    assert "row 4: radius: not a finite number" in out
    assert "row 5: has 3 fields, the header has 4" in out
    assert "row 6: label: not an integer" in out
    assert "row 1:" not in out
    assert _counts(store) == (0, 0, 0)


def test_unmapped_or_missing_columns_refuse_the_file(store: NodeStore, tmp_path: Path) -> None:
    mapping = parse_mapping({"pseudonym_column": "id", "columns": {"age": "demographics", "bmi": "vitals"}})
    (tmp_path / "f.csv").write_text("id,age,secret_note\np1,3,x\n")
    with store.transaction() as session, pytest.raises(ImportRejectedError) as info:
        import_records(session, tmp_path / "f.csv", "csv", mapping)
    reasons = [p.reason for p in info.value.problems]
    assert "column 'secret_note' has no data category in the mapping" in reasons
    assert "column 'bmi' is in the mapping but not in the file" in reasons
    assert _counts(store) == (0, 0, 0)


def test_bad_mapping_names_the_key() -> None:
    with pytest.raises(ImportRejectedError, match=r"mapping.columns.age.type: must be one of"):
        parse_mapping({"columns": {"age": {"category": "demographics", "type": "float128"}}})


def test_bad_parquet_changes_nothing_and_names_rows(node_dir: Path, runner: CliRunner, store: NodeStore,
                                                    tmp_path: Path) -> None:
    (tmp_path / "map.toml").write_text(MAPPING)
    table = pa.table({"patient_id": ["p1", "p2", None, "p4"], "age": [50.0, None, 40.0, float("inf")],
                      "radius": [1.0, 2.0, 3.0, 4.0], "label": [1, 0, 1, 0]})
    pq.write_table(table, tmp_path / "bad.parquet")
    result = _import(runner, node_dir, tmp_path / "bad.parquet", "--mapping", str(tmp_path / "map.toml"))
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "row 2: age: missing value" in out
    assert "row 3: patient_id: missing pseudonym" in out
    assert "row 4: age: not a finite number" in out
    assert _counts(store) == (0, 0, 0)
    good = pa.table({"patient_id": ["p1", "p2"], "age": [50, 60], "radius": [1.5, 2.5], "label": [1, 0]})
    pq.write_table(good, tmp_path / "good.parquet")
    ok = _import(runner, node_dir, tmp_path / "good.parquet", "--mapping", str(tmp_path / "map.toml"))
    assert ok.exit_code == 0, ok.output
    assert _counts(store) == (2, 1, 3)


def _patient(pid: str, gender: str = "female", birth: str = "1970-05-01") -> dict[str, Any]:
    return {"resource": {"resourceType": "Patient", "id": pid, "gender": gender, "birthDate": birth}}


def _obs(oid: str, pid: str, loinc: str, value: float, unit: str, when: str = "2024-01-01T10:00:00Z",
         ) -> dict[str, Any]:
    return {"resource": {"resourceType": "Observation", "id": oid, "status": "final",
                         "code": {"coding": [{"system": "http://loinc.org", "code": loinc}]},
                         "subject": {"reference": f"Patient/{pid}"}, "effectiveDateTime": when,
                         "valueQuantity": {"value": value, "unit": unit, "system": "http://unitsofmeasure.org",
                                           "code": unit}}}


def test_fhir_bundle_good_and_bad(node_dir: Path, runner: CliRunner, store: NodeStore,
                                  tmp_path: Path) -> None:
    bad = {"resourceType": "Bundle", "type": "collection", "entry": [
        _patient("p1"),
        _obs("o1", "p1", "8867-4", 72, "/min"),
        _obs("o2", "p1", "8480-6", 120, "kg"),             # entry 3: wrong unit
        _obs("o3", "p9", "8867-4", 80, "/min"),            # entry 4: unknown patient
        _obs("o4", "p1", "99999-9", 1, "/min"),            # entry 5: unsupported code
        {"resource": {"resourceType": "Observation", "id": "o5"}},  # entry 6: invalid FHIR
        {"resource": {"resourceType": "Condition", "id": "c1"}},    # entry 7: not imported
    ]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = _import(runner, node_dir, tmp_path / "bad.json", "--format", "fhir")
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "row 3: Observation/o2: unit 'kg'" in out
    assert "row 4: Observation/o3: subject 'Patient/p9' is not a Patient in this Bundle" in out
    assert "row 5: Observation/o4: no supported LOINC code" in out
    assert "row 6: Observation/o5: invalid FHIR" in out
    assert "row 7: Condition/c1" in out
    assert "row 1:" not in out and "row 2:" not in out
    assert _counts(store) == (0, 0, 0)

    good = {"resourceType": "Bundle", "type": "collection", "entry": [
        _patient("p1"), _patient("p2", "male", "1980-02-02"),
        _obs("o1", "p1", "8867-4", 72, "/min", "2024-01-01T10:00:00Z"),
        _obs("o2", "p1", "8867-4", 90, "/min", "2024-03-01T10:00:00Z"),   # later: wins
        _obs("o3", "p2", "2339-0", 101.5, "mg/dL"),
    ]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    ok = _import(runner, node_dir, tmp_path / "good.json")
    assert ok.exit_code == 0, ok.output
    rows, categories = _stored(store)
    assert rows["p1"] == {"sex": "female", "birth_year": 1970, "heart_rate": 90}
    assert rows["p2"] == {"sex": "male", "birth_year": 1980, "glucose": 101.5}
    assert categories["heart_rate"] == "vitals" and categories["glucose"] == "labs"


def test_unknown_category_is_refused_and_docs_list_the_same_categories() -> None:
    """Issue 21 item 11: a typo such as `labz` is refused; docs/node.md lists exactly the code's set."""
    import re

    from exchange.node.mapping import COLUMN_CATEGORIES

    with pytest.raises(ImportRejectedError, match=r"mapping.columns.hba1c.category: 'labz' is not a data"):
        parse_mapping({"columns": {"hba1c": "labz"}})
    docs = (Path(__file__).resolve().parents[2] / "docs" / "node.md").read_text()
    listed = re.search(r"<!-- categories -->(.*?)<!-- /categories -->", docs, re.S)
    assert listed is not None
    assert tuple(c.strip() for c in listed.group(1).split(",")) == COLUMN_CATEGORIES


def test_duplicate_pseudonyms_are_one_patient_with_several_records(
        node_dir: Path, runner: CliRunner, store: NodeStore, tmp_path: Path) -> None:
    """Issue 21 item 11: repeated pseudonyms, within a file and across imports, are one patient."""
    from datetime import UTC, datetime

    from exchange.node.eligibility import count_eligible
    from exchange.node.policy import StudyView
    from tests.node.helpers import gru_contract

    (tmp_path / "map.toml").write_text(MAPPING)
    (tmp_path / "a.csv").write_text("patient_id,age,radius,label\np1,54,12.5,1\np1,55,12.9,1\np2,61,9.75,0\n")
    (tmp_path / "b.csv").write_text("patient_id,age,radius,label\np2,62,9.5,0\np3,40,8.0,0\n")
    first = _import(runner, node_dir, tmp_path / "a.csv", "--mapping", str(tmp_path / "map.toml"))
    assert "imported 3 records for 2 patients from" in first.output, first.output
    second = _import(runner, node_dir, tmp_path / "b.csv", "--mapping", str(tmp_path / "map.toml"))
    assert "imported 2 records for 2 patients, 1 of them with records here already" in second.output
    folder = tmp_path / "consent"
    folder.mkdir()
    for p in ("p1", "p2", "p3"):
        (folder / f"{p}.json").write_text(json.dumps(gru_contract(p, "hospital-a").to_json()))
    assert runner.invoke(app, ["node", "consent", "import", str(folder), "-c",
                               str(node_dir / "node.toml")]).exit_code == 0
    study = StudyView.from_json({"id": "s1", "organisation_id": "org", "organisation_region": "DE",
                                 "spec": {"purpose": "DUO:0000042", "data_categories": ["labs"],
                                          "columns": {"labs": ["radius"]}, "epsilon": 1.0}})
    with store.sessions() as session:
        eligibility = count_eligible(session, study, datetime.now(UTC))
    assert (eligibility.eligible, eligibility.patients) == (5, 3)


def _condition(cid: str, patient: str, code: str, system: str = "http://hl7.org/fhir/sid/icd-10",
               verification: str | None = None) -> dict[str, Any]:
    resource: dict[str, Any] = {"resourceType": "Condition", "id": cid,
                                "subject": {"reference": f"Patient/{patient}"},
                                "code": {"coding": [{"system": system, "code": code}]}}
    if verification:
        resource["verificationStatus"] = {"coding": [{
            "system": "http://terminology.hl7.org/CodeSystem/condition-ver-status", "code": verification}]}
    return {"resource": resource}


def test_fhir_conditions_become_diagnosis_columns(node_dir: Path, runner: CliRunner, store: NodeStore,
                                                  tmp_path: Path) -> None:
    """Issue 21 item 10: ICD-10 Conditions give one 0/1 column per three-character category, in the
    diagnoses category, for every patient of the Bundle; bad Conditions are named by entry."""
    bad = {"resourceType": "Bundle", "type": "collection", "entry": [
        _patient("p1"),
        _condition("c1", "p1", "44054006", system="http://snomed.info/sct"),  # entry 2: not ICD-10
        _condition("c2", "p1", "XYZ.1"),                                    # entry 3: not a code
        _condition("c3", "p7", "E11.9"),                                    # entry 4: unknown patient
    ]}
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    result = _import(runner, node_dir, tmp_path / "bad.json")
    out = " ".join(result.output.split())
    assert result.exit_code == 1
    assert "row 2: Condition/c1: no ICD-10 code" in out
    assert "row 3: Condition/c2:" in out and "not an ICD-10" in out
    assert "row 4: Condition/c3: subject is not a Patient in this Bundle" in out
    assert _counts(store) == (0, 0, 0)
    good = {"resourceType": "Bundle", "type": "collection", "entry": [
        _patient("p1"), _patient("p2", "male", "1980-02-02"), _patient("p3"),
        _condition("c1", "p1", "E11.9"), _condition("c2", "p1", "I10"),
        _condition("c3", "p2", "E11.65", system="http://hl7.org/fhir/sid/icd-10-cm"),
        _condition("c4", "p3", "I10", verification="refuted"),
    ]}
    (tmp_path / "good.json").write_text(json.dumps(good))
    ok = _import(runner, node_dir, tmp_path / "good.json")
    assert ok.exit_code == 0, ok.output
    rows, categories = _stored(store)
    assert {p: (v["icd10_E11"], v["icd10_I10"]) for p, v in rows.items()} == {
        "p1": (1, 1), "p2": (1, 0), "p3": (0, 0)}
    assert categories["icd10_E11"] == categories["icd10_I10"] == "diagnoses"


def test_a_semicolon_separated_csv_is_named(node_dir: Path, runner: CliRunner, store: NodeStore,
                                            tmp_path: Path) -> None:
    """Issue 21 item 14: the delimiter is named, not one 'missing column' per mapped column."""
    (tmp_path / "map.toml").write_text(MAPPING)
    (tmp_path / "semi.csv").write_text("patient_id;age;radius;label\np1;54;12,5;1\n")
    result = _import(runner, node_dir, tmp_path / "semi.csv", "--mapping", str(tmp_path / "map.toml"))
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "separated by semicolons (';'), not by commas" in out
    assert "Traceback" not in out and "is in the mapping but not in the file" not in out
    assert _counts(store) == (0, 0, 0)
