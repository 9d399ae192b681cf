"""`exchange node import-data`: records from CSV, Parquet or FHIR Bundle JSON.

The rule: validate everything first, then import all of it in one transaction, or nothing.
A bad file raises `ImportRejectedError` listing every problem with its row (1-based data
row; for FHIR, the Bundle entry index) and the reason; the database is not touched.

Every column must have a data category (the consent vocabulary: a study asks for columns,
consent permits categories). The mapping file is TOML or JSON:

    pseudonym_column = "patient_id"
    [columns]
    age = "demographics"                                   # a number, required
    diagnosis = { category = "diagnoses", type = "integer" }
    smoker = { category = "demographics", type = "boolean", required = false }

FHIR Bundles need no mapping: Patient.id is the pseudonym, Patient gives `sex` and
`birth_year` (demographics), Observations give one column per supported LOINC code (vitals
and labs, latest value per patient); a mapping may still rename categories.
"""

from __future__ import annotations

import csv
import hashlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from exchange.node.fhir_import import read_fhir_bundle
from exchange.node.mapping import ColumnSpec, ImportRejectedError, Mapping, Problem
from exchange.node.models import ColumnCategory, ImportBatch, Record
from exchange.text_safety import text_problem

INSERT_CHUNK = 5000
#: delimiters spreadsheets export instead of commas, named in the refusal
OTHER_DELIMITERS = {";": "semicolons (';')", "\t": "tabs", "|": "vertical bars ('|')"}


@dataclass
class ImportReport:
    batch_id: int
    source: str
    format: str
    records: int
    columns: dict[str, str] = field(default_factory=dict)
    # distinct pseudonyms in the file, and how many of them already had records here: a
    # pseudonym is one patient however many records it has (privacy is accounted per patient)
    patients: int = 0
    known_patients: int = 0


# --- value checks -----------------------------------------------------------------------------

#: A cell may hold tabs and line breaks (a quoted CSV field), no other control character.
_ALLOWED_IN_CELLS = frozenset("\t\n\r")
#: Integers are exact up to 2**53 - 1 in JSON and in float64; numbers must fit the float32 that
#: the ClientApp trains on (a larger one would become infinity there).
MAX_SAFE_INTEGER = 2**53 - 1
MAX_NUMBER = 3.4028234663852886e38
_TRUE = {"true", "1", "yes", "y", "t"}
_FALSE = {"false", "0", "no", "n", "f"}


def _convert(value: Any, spec: ColumnSpec) -> tuple[Any, str | None]:
    """(converted value, None) or (None, reason). Text from CSV is parsed; typed values from
    Parquet are checked. NaN and infinities are refused: they poison training silently."""
    if isinstance(value, str) and (problem := text_problem(value, _ALLOWED_IN_CELLS)) is not None:
        return None, problem
    if value is None or (isinstance(value, str) and value.strip() == ""):
        return None, ("missing value" if spec.required else None)
    if spec.type == "string":
        return (value, None) if isinstance(value, str) else (str(value), None)
    if spec.type == "boolean":
        if isinstance(value, bool):
            return value, None
        text = str(value).strip().lower()
        if text in _TRUE:
            return True, None
        if text in _FALSE:
            return False, None
        return None, f"not a boolean: {_quoted(value)}"
    if isinstance(value, bool):
        return None, f"not a {spec.type}: {_quoted(value)}"
    if spec.type == "integer":
        if isinstance(value, int):
            integer = value
        elif isinstance(value, float) and value.is_integer():
            integer = int(value)
        else:
            try:
                integer = int(str(value).strip())
            except ValueError:
                return None, f"not an integer: {_quoted(value)}"
        if abs(integer) > MAX_SAFE_INTEGER:
            return None, f"integer out of range (|n| <= 2**53 - 1): {_quoted(value)}"
        return integer, None
    try:
        number = float(value) if not isinstance(value, int | float) else value
    except (TypeError, ValueError):
        return None, f"not a number: {_quoted(value)}"
    if isinstance(number, float) and not math.isfinite(number):
        return None, f"not a finite number: {_quoted(value)}"
    if abs(number) > MAX_NUMBER:
        return None, f"number out of range (|x| <= {MAX_NUMBER:.4g}, what training's float32 holds): " \
                     f"{_quoted(value)}"
    return number, None


def _quoted(value: Any) -> str:
    """A cell quoted in a problem: its repr, cut (a hostile cell can be megabytes)."""
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:80]}... ({len(text)} characters)"


def validate_rows(rows: Iterable[tuple[int, dict[str, Any]]], mapping: Mapping,
                  header: list[str]) -> tuple[list[dict[str, Any]], list[Problem]]:
    """Check the header, then every row; return the clean rows and every problem."""
    problems: list[Problem] = []
    if mapping.pseudonym_column not in header:
        problems.append(Problem(None, f"column {mapping.pseudonym_column!r} (the pseudonym) is missing"))
    for name in header:
        if name != mapping.pseudonym_column and name not in mapping.columns:
            problems.append(Problem(None, f"column {name!r} has no data category in the mapping"))
    for name in mapping.columns:
        if name not in header:
            problems.append(Problem(None, f"column {name!r} is in the mapping but not in the file"))
    if header and len(set(header)) != len(header):
        dupes = sorted({h for h in header if header.count(h) > 1})
        problems.append(Problem(None, f"duplicate column name(s) {dupes}"))
    if problems:
        return [], problems
    clean: list[dict[str, Any]] = []
    for row_number, row in rows:
        reasons: list[str] = []
        pseudonym = row.get(mapping.pseudonym_column)
        if pseudonym is None or not str(pseudonym).strip():
            reasons.append(f"{mapping.pseudonym_column}: missing pseudonym")
        elif (problem := text_problem(str(pseudonym))) is not None:
            reasons.append(f"{mapping.pseudonym_column}: {problem}")
        values: dict[str, Any] = {}
        for name, spec in mapping.columns.items():
            value, reason = _convert(row.get(name), spec)
            if reason:
                reasons.append(f"{name}: {reason}")
            elif value is not None:  # an optional value that is absent is simply not stored
                values[name] = value
        if reasons:
            problems.append(Problem(row_number, "; ".join(reasons)))
        else:
            clean.append({"pseudonym": str(pseudonym).strip(), "source_row": row_number,
                          "values": values})
    return clean, problems


# --- readers ----------------------------------------------------------------------------------

def _csv_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]], list[Problem]]:
    """The header and the rows of a CSV file. A line the csv module or the UTF-8 decoder
    refuses (invalid UTF-8, a field over the size limit, a giant single line) ends the reading
    with a problem naming the row and the file line; header problems are named too."""
    handle = path.open(newline="", encoding="utf-8-sig")
    reader = csv.reader(handle)
    try:
        header = next(reader, None)
    except (csv.Error, UnicodeDecodeError) as exc:
        handle.close()
        return [], iter(()), [Problem(None, f"header (line 1): {_reason(exc)}")]
    if header is None:
        handle.close()
        return [], iter(()), [Problem(None, "empty file: no header row")]
    header = [h.strip() for h in header]
    unreadable = [f"header: column {index + 1} {problem}" for index, name in enumerate(header)
                  if (problem := text_problem(name)) is not None]
    if unreadable:
        handle.close()
        return [], iter(()), [Problem(None, "; ".join(unreadable))]
    if len(header) == 1:
        other = next((d for d in OTHER_DELIMITERS if d in header[0]), None)
        if other is not None:
            # one column whose name holds ';' (a spreadsheet's export in many locales): say so
            # rather than listing every column as missing
            handle.close()
            return [], iter(()), [Problem(None, f"the header is separated by {OTHER_DELIMITERS[other]}, "
                                                "not by commas: save the file as comma-separated CSV "
                                                "(a decimal comma must become a point too)")]
    width_problems: list[Problem] = []

    def rows() -> Iterator[tuple[int, dict[str, Any]]]:
        with handle:
            number = 0
            while True:
                try:
                    cells = next(reader)
                except StopIteration:
                    return
                except (csv.Error, UnicodeDecodeError) as exc:
                    width_problems.append(Problem(number + 1, f"(file line {reader.line_num}) "
                                                  f"{_reason(exc)}; the rest of the file was not read"))
                    return
                number += 1
                if not cells:
                    continue
                if len(cells) != len(header):
                    width_problems.append(Problem(number, f"has {len(cells)} fields, the header has "
                                                          f"{len(header)}"))
                    continue
                yield number, dict(zip(header, cells, strict=True))

    return header, rows(), width_problems


def _reason(exc: Exception) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid UTF-8 ({exc.reason})"
    return f"unreadable CSV ({exc})"


def _parquet_rows(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]], list[Problem]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        return [], iter(()), [Problem(None, f"not a readable Parquet file: {exc}")]
    header = list(table.column_names)
    return header, enumerate(table.to_pylist(), start=1), []


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- import -----------------------------------------------------------------------------------

def wider_type(stored: str | None, declared: str) -> str:
    """The type a column has after a mapping declares `declared` for it: the same, number for
    integer and number, string for any other mix. A store imported before the types were kept
    (`stored` None) takes the declared one."""
    if stored is None or stored == declared:
        return declared
    if {stored, declared} == {"integer", "number"}:
        return "number"
    return "string"


def _check_categories(session: Session, mapping: Mapping) -> list[Problem]:
    existing = dict(session.execute(select(ColumnCategory.column, ColumnCategory.category)).tuples().all())
    return [Problem(None, f"column {name!r}: mapped to {spec.category!r} but already stored as "
                          f"{existing[name]!r}")
            for name, spec in mapping.columns.items()
            if name in existing and existing[name] != spec.category]


def import_records(session: Session, path: Path, fmt: str | None = None,
                   mapping: Mapping | None = None) -> ImportReport:
    """Validate `path` completely, then import it in the caller's transaction (the caller
    commits). Raises ImportRejectedError with every problem; on error nothing was written."""
    source = str(path)
    if not path.is_file():
        raise ImportRejectedError(source, [Problem(None, "file not found")])
    fmt = fmt or {".csv": "csv", ".parquet": "parquet", ".json": "fhir"}.get(path.suffix.lower())
    if fmt not in ("csv", "parquet", "fhir"):
        raise ImportRejectedError(source, [Problem(None, "format: give --format csv|parquet|fhir "
                                                         "(not guessable from the file name)")])
    sha = _file_sha256(path)
    previous = session.execute(select(ImportBatch.id).where(ImportBatch.sha256 == sha)).scalar()
    if previous is not None:
        raise ImportRejectedError(source, [Problem(None, f"this file was already imported "
                                                         f"(batch {previous})")])
    if fmt == "fhir":

        header, row_iter, read_problems, fhir_mapping = read_fhir_bundle(path, mapping)
        mapping = fhir_mapping
    else:
        if mapping is None:
            raise ImportRejectedError(source, [Problem(None, "mapping: --mapping FILE is required for "
                                                             f"{fmt} (each column needs a data category)")])
        header, row_iter, read_problems = (_csv_rows(path) if fmt == "csv" else _parquet_rows(path))
    if any(problem.row is None for problem in read_problems):  # the file itself is unreadable:
        raise ImportRejectedError(source, read_problems)   # its (absent) columns are no problem
    clean, problems = validate_rows(row_iter, mapping, header)
    problems = read_problems + problems + _check_categories(session, mapping)
    if not clean and not problems:
        problems.append(Problem(None, "no records in the file"))
    if problems:
        problems.sort(key=lambda p: (p.row is not None, p.row or 0))
        raise ImportRejectedError(source, problems)
    pseudonyms = {row["pseudonym"] for row in clean}
    known = {p for p in session.execute(select(Record.pseudonym).distinct()).scalars() if p in pseudonyms}
    batch = ImportBatch(source=path.name, format=fmt, sha256=sha, record_count=len(clean),
                        imported_at=datetime.now().astimezone())
    session.add(batch)
    session.flush()
    existing = {row.column: row for row in session.execute(select(ColumnCategory)).scalars()}
    for name, spec in mapping.columns.items():
        if name not in existing:
            session.add(ColumnCategory(column=name, category=spec.category, value_type=spec.type))
        else:
            row = existing[name]
            row.value_type = wider_type(row.value_type, spec.type)
    for start in range(0, len(clean), INSERT_CHUNK):
        chunk = clean[start:start + INSERT_CHUNK]
        session.execute(insert(Record), [{**row, "batch_id": batch.id} for row in chunk])
    session.flush()
    return ImportReport(batch_id=batch.id, source=source, format=fmt, records=len(clean),
                        columns={name: spec.category for name, spec in mapping.columns.items()},
                        patients=len(pseudonyms), known_patients=len(known))
