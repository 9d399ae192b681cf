"""The published catalog's column types come from the import mappings, never from the records:
one patient's value (a decimal among whole numbers, or no value at all) must not change what
leaves the hospital (issue 14, "Counts"; docs/privacy.md)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from sqlalchemy import select, update

from exchange.node.catalog import build_catalog
from exchange.node.importer import import_records, wider_type
from exchange.node.mapping import parse_mapping
from exchange.node.models import ColumnCategory
from exchange.node.settings import NodeSettings
from exchange.node.store import NodeStore

MAPPING = """
pseudonym_column = "patient_id"
[columns]
radius = { category = "labs", type = "number" }
label = { category = "outcomes", type = "integer" }
"""


def _import(store: NodeStore, tmp_path: Path, name: str, rows: str, mapping: str = MAPPING) -> None:
    (tmp_path / f"{name}.csv").write_text("patient_id,radius,label\n" + rows)
    with store.sessions() as session:
        import_records(session, tmp_path / f"{name}.csv", mapping=parse_mapping(tomllib.loads(mapping)))
        session.commit()


def _types(store: NodeStore, settings: NodeSettings) -> dict[str, str]:
    return {c.name: c.type for c in build_catalog(store, settings).columns}


def test_one_records_value_does_not_change_the_published_type(
        store: NodeStore, settings: NodeSettings, tmp_path: Path) -> None:
    _import(store, tmp_path, "whole", "p1,12,1\np2,9,0\n")
    assert _types(store, settings) == {"radius": "number", "label": "integer"}
    # one more patient whose radius is a decimal: before, the type went integer -> number
    _import(store, tmp_path, "decimal", "p3,9.75,0\n")
    assert _types(store, settings) == {"radius": "number", "label": "integer"}


def test_a_store_imported_before_types_were_kept_falls_back_to_its_values(
        store: NodeStore, settings: NodeSettings, tmp_path: Path) -> None:
    _import(store, tmp_path, "whole", "p1,12,1\np2,9,0\n")
    with store.sessions() as session:
        session.execute(update(ColumnCategory).values(value_type=None))
        session.commit()
    # the values' own types (the importer stored radius as floats, label as integers)
    assert _types(store, settings) == {"radius": "number", "label": "integer"}
    _import(store, tmp_path, "more", "p3,10,1\n",  # the next import records the declared type
            MAPPING.replace('type = "integer"', 'type = "number"'))
    assert _types(store, settings) == {"radius": "number", "label": "number"}
    with store.sessions() as session:
        assert dict(session.execute(select(ColumnCategory.column, ColumnCategory.value_type))
                    .tuples().all()) == {"radius": "number", "label": "number"}


def test_two_mappings_that_disagree_widen_the_type(
        store: NodeStore, settings: NodeSettings, tmp_path: Path) -> None:
    _import(store, tmp_path, "first", "p1,12,1\n", MAPPING.replace('type = "number"', 'type = "integer"'))
    assert _types(store, settings)["radius"] == "integer"
    _import(store, tmp_path, "second", "p2,9.5,0\n")
    assert _types(store, settings)["radius"] == "number"
    _import(store, tmp_path, "third", "p3,x,0\n", MAPPING.replace('type = "number"', 'type = "string"'))
    assert _types(store, settings)["radius"] == "string"


def test_wider_type() -> None:
    assert wider_type(None, "boolean") == "boolean"
    assert wider_type("integer", "integer") == "integer"
    assert wider_type("integer", "number") == wider_type("number", "integer") == "number"
    assert wider_type("boolean", "integer") == "string"
    assert wider_type("string", "number") == "string"
