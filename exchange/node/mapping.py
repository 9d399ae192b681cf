"""The import vocabulary shared by every records reader (CSV, Parquet, FHIR Bundle): the
column -> data category mapping, a problem found in an input, and the rejection that lists them.

Kept apart from `importer` so that `fhir_import` and `importer` both read it and neither imports
the other.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from consent.codes import DATA_CATEGORIES

#: The categories a column may have: consent's vocabulary (what a contract permits or denies),
#: plus `outcomes`, the category of what a study predicts (a label or an event). docs/node.md
#: lists the same names (a test compares them).
COLUMN_CATEGORIES: tuple[str, ...] = tuple(sorted(DATA_CATEGORIES | {"outcomes"}))

ValueType = Literal["number", "integer", "string", "boolean"]
VALUE_TYPES: tuple[str, ...] = ("number", "integer", "string", "boolean")
MAX_PROBLEMS_SHOWN = 50


@dataclass(frozen=True)
class Problem:
    """One thing wrong with an input: `row` is None for a file-level problem."""

    row: int | None
    reason: str

    def __str__(self) -> str:
        return self.reason if self.row is None else f"row {self.row}: {self.reason}"


class ImportRejectedError(Exception):
    """The file was not imported; `problems` says every reason, each with its row."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = problems
        shown = "; ".join(str(p) for p in problems[:MAX_PROBLEMS_SHOWN])
        more = len(problems) - MAX_PROBLEMS_SHOWN
        super().__init__(
            f"{source}: nothing imported, {len(problems)} problem(s): {shown}"
            + (f"; and {more} more" if more > 0 else "")
        )


@dataclass(frozen=True)
class ColumnSpec:
    category: str
    type: ValueType = "number"
    required: bool = True


@dataclass(frozen=True)
class Mapping:
    pseudonym_column: str
    columns: dict[str, ColumnSpec]


def load_mapping(path: Path) -> Mapping:
    """Read a mapping file (TOML or JSON). Problems raise ImportRejectedError naming the key."""
    try:
        raw: Any = (
            json.loads(path.read_text())
            if path.suffix.lower() == ".json"
            else tomllib.loads(path.read_text())
        )
    except (OSError, ValueError) as exc:
        raise ImportRejectedError(str(path), [Problem(None, f"mapping: cannot read: {exc}")]) from exc
    return parse_mapping(raw, str(path))


def parse_mapping(raw: Any, source: str = "mapping") -> Mapping:
    problems: list[Problem] = []
    if not isinstance(raw, dict):
        raise ImportRejectedError(source, [Problem(None, "mapping: must be a table/object")])
    unknown = set(raw) - {"pseudonym_column", "columns"}
    if unknown:
        problems.append(Problem(None, f"mapping: unknown key(s) {sorted(unknown)}"))
    pseudonym = raw.get("pseudonym_column", "pseudonym")
    if not isinstance(pseudonym, str) or not pseudonym:
        problems.append(Problem(None, "mapping.pseudonym_column: must be a non-empty string"))
        pseudonym = "pseudonym"
    columns: dict[str, ColumnSpec] = {}
    raw_columns = raw.get("columns", {})
    if not isinstance(raw_columns, dict):
        problems.append(Problem(None, "mapping.columns: must be a table of column = category"))
        raw_columns = {}
    for name, raw_spec in raw_columns.items():
        where = f"mapping.columns.{name}"
        spec = {"category": raw_spec} if isinstance(raw_spec, str) else raw_spec
        if not isinstance(spec, dict):
            problems.append(Problem(None, f"{where}: must be a category string or a table"))
            continue
        extra = set(spec) - {"category", "type", "required"}
        category = spec.get("category")
        value_type = spec.get("type", "number")
        required = spec.get("required", True)
        if extra:
            problems.append(Problem(None, f"{where}: unknown key(s) {sorted(extra)}"))
        if not isinstance(category, str) or not category:
            problems.append(Problem(None, f"{where}.category: must be a non-empty string"))
            continue
        if category not in COLUMN_CATEGORIES:
            problems.append(Problem(None, f"{where}.category: {category!r} is not a data category (one of "
                                          f"{', '.join(COLUMN_CATEGORIES)})"))
            continue
        if value_type not in VALUE_TYPES:
            problems.append(
                Problem(None, f"{where}.type: must be one of {list(VALUE_TYPES)}, not {value_type!r}")
            )
            continue
        if not isinstance(required, bool):
            problems.append(Problem(None, f"{where}.required: must be true or false"))
            continue
        if name == pseudonym:
            problems.append(Problem(None, f"{where}: the pseudonym column cannot be a data column"))
            continue
        columns[name] = ColumnSpec(category=category, type=value_type, required=required)
    if problems:
        raise ImportRejectedError(source, problems)
    return Mapping(pseudonym_column=pseudonym, columns=columns)
