"""FHIR Bundle JSON -> node records (Patient, Observation for common vitals and labs,
Condition for diagnoses).

Each entry is validated with `fhir.resources` (R4/R4B first, as most hospital exports are
R4, then R5). One record per Patient: `sex`, `birth_year` (demographics); for each
supported LOINC code, the latest Observation value (by effective time) in the expected UCUM
unit; for each ICD-10 category (three characters, e.g. E11) that any Condition in the Bundle
codes, a column `icd10_<category>` (diagnoses, integer): 1 when the patient has such a
Condition, 0 when not — the Bundle is the patient's record, so absence is a no. That is what a
disease-specific study reads (as a feature or as its label). A Condition whose
verificationStatus is `refuted` or `entered-in-error` states no diagnosis and counts as 0.
What cannot be mapped (another resource type, an unknown LOINC code, a wrong unit, a Condition
without a valid ICD-10 code, an Observation or Condition about a patient not in the Bundle) is
a problem naming the entry, never silently dropped: "row" N means Bundle entry N (1-based).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from audit.untrusted import UntrustedJSONError, load_json
from consent.codes import CodeError, normalize_icd10
from exchange.node.mapping import ColumnSpec, Mapping, Problem

LOINC = "http://loinc.org"
#: ICD-10 code systems read from Condition.code: WHO's, and the US clinical modification (whose
#: codes refine WHO's; only their three-character category is used).
ICD10_SYSTEMS = ("http://hl7.org/fhir/sid/icd-10", "http://hl7.org/fhir/sid/icd-10-cm")
#: Condition.verificationStatus codes that state no diagnosis.
NOT_A_DIAGNOSIS = {"refuted", "entered-in-error"}
DIAGNOSIS_PREFIX = "icd10_"


@dataclass(frozen=True)
class LoincColumn:
    column: str
    category: str
    units: tuple[str, ...]


# Common vitals and labs. Units are UCUM codes (Quantity.code), with the usual display
# spelling (Quantity.unit) accepted too.
LOINC_COLUMNS: dict[str, LoincColumn] = {
    "8867-4": LoincColumn("heart_rate", "vitals", ("/min", "beats/min", "{beats}/min")),
    "8480-6": LoincColumn("systolic_bp", "vitals", ("mm[Hg]", "mmHg")),
    "8462-4": LoincColumn("diastolic_bp", "vitals", ("mm[Hg]", "mmHg")),
    "8310-5": LoincColumn("body_temperature", "vitals", ("Cel", "°C")),
    "9279-1": LoincColumn("respiratory_rate", "vitals", ("/min", "breaths/min", "{breaths}/min")),
    "59408-5": LoincColumn("oxygen_saturation", "vitals", ("%",)),
    "2708-6": LoincColumn("oxygen_saturation", "vitals", ("%",)),
    "29463-7": LoincColumn("body_weight", "vitals", ("kg",)),
    "8302-2": LoincColumn("body_height", "vitals", ("cm",)),
    "39156-5": LoincColumn("bmi", "vitals", ("kg/m2", "kg/m^2")),
    "2339-0": LoincColumn("glucose", "labs", ("mg/dL",)),
    "2345-7": LoincColumn("glucose", "labs", ("mg/dL",)),
    "4548-4": LoincColumn("hba1c", "labs", ("%",)),
    "2093-3": LoincColumn("cholesterol_total", "labs", ("mg/dL",)),
    "2085-9": LoincColumn("cholesterol_hdl", "labs", ("mg/dL",)),
    "18262-6": LoincColumn("cholesterol_ldl", "labs", ("mg/dL",)),
    "13457-7": LoincColumn("cholesterol_ldl", "labs", ("mg/dL",)),
    "2571-8": LoincColumn("triglycerides", "labs", ("mg/dL",)),
    "2160-0": LoincColumn("creatinine", "labs", ("mg/dL",)),
    "718-7": LoincColumn("hemoglobin", "labs", ("g/dL",)),
    "6690-2": LoincColumn("leukocytes", "labs", ("10*3/uL", "10^3/uL")),
    "777-3": LoincColumn("platelets", "labs", ("10*3/uL", "10^3/uL")),
    "2951-2": LoincColumn("sodium", "labs", ("mmol/L",)),
    "2823-3": LoincColumn("potassium", "labs", ("mmol/L",)),
}
PATIENT_COLUMNS = {"sex": ColumnSpec("demographics", "string", required=False),
                   "birth_year": ColumnSpec("demographics", "integer", required=False)}
PSEUDONYM = "pseudonym"
#: FHIR resources nest a few levels (a Bundle, an entry, a resource, a coding); far deeper is
#: hostile, and the FHIR models validate recursively.
MAX_JSON_DEPTH = 64
#: FHIR R4/R5 Bundle.type codes (http://hl7.org/fhir/bundle-type).
BUNDLE_TYPES = frozenset({"document", "message", "transaction", "transaction-response", "batch",
                          "batch-response", "history", "searchset", "collection",
                          "subscription-notification"})


def _model(resource_type: str, resource: dict[str, Any]) -> Any:
    """Validate with R4B, then R5; raise the R4B error when neither accepts it."""
    from fhir.resources import get_fhir_model_class as r5_class
    from fhir.resources.R4B import get_fhir_model_class as r4_class

    try:
        return r4_class(resource_type).model_validate(resource)
    except ValidationError as first:
        try:
            return r5_class(resource_type).model_validate(resource)
        except ValidationError:
            raise first from None


def _short(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}" for err in exc.errors()[:3]]
    return "invalid FHIR: " + "; ".join(parts)


def _instant(observation: Any) -> datetime:
    value = getattr(observation, "effectiveDateTime", None) or getattr(observation, "issued", None)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    return datetime.min.replace(tzinfo=UTC)


def read_fhir_bundle(path: Path, mapping: Mapping | None
                     ) -> tuple[list[str], Iterator[tuple[int, dict[str, Any]]], list[Problem], Mapping]:
    """Parse and check a Bundle; return (header, rows, problems, mapping) for the importer."""
    problems: list[Problem] = []
    try:
        bundle = load_json(path.read_bytes(), max_depth=MAX_JSON_DEPTH)
    except OSError as exc:
        return [], iter(()), [Problem(None, f"not readable: {exc.strerror}")], _mapping({}, mapping)
    except UntrustedJSONError as exc:
        return [], iter(()), [Problem(None, f"not readable JSON: {exc}")], _mapping({}, mapping)
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        return [], iter(()), [Problem(None, "not a FHIR Bundle (resourceType must be 'Bundle')")], \
            _mapping({}, mapping)
    if not isinstance(bundle.get("type"), str) or bundle["type"] not in BUNDLE_TYPES:
        reason = f"Bundle.type: must be one of {', '.join(sorted(BUNDLE_TYPES))}"
        return [], iter(()), [Problem(None, reason)], _mapping({}, mapping)
    entries = bundle.get("entry") or []
    if not isinstance(entries, list):
        return [], iter(()), [Problem(None, "Bundle.entry: must be a list")], _mapping({}, mapping)
    patients: dict[str, tuple[int, dict[str, Any]]] = {}
    observations: list[tuple[int, Any]] = []
    conditions: list[tuple[int, Any]] = []
    for number, entry in enumerate(entries, start=1):
        resource = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(resource, dict):
            problems.append(Problem(number, "entry has no resource"))
            continue
        kind = resource.get("resourceType")
        label = f"{kind}/{resource.get('id', '?')}"
        if kind not in ("Patient", "Observation", "Condition"):
            problems.append(Problem(number, f"{label}: resource type {kind!r} is not imported "
                                            "(only Patient, Observation and Condition)"))
            continue
        try:
            model = _model(kind, resource)
        except ValidationError as exc:
            problems.append(Problem(number, f"{label}: {_short(exc)}"))
            continue
        except (KeyError, ValueError) as exc:
            problems.append(Problem(number, f"{label}: {exc}"))
            continue
        if kind == "Patient":
            if not model.id:
                problems.append(Problem(number, "Patient without id (the id is the pseudonym)"))
            elif model.id in patients:
                problems.append(Problem(number, f"{label}: duplicate Patient id"))
            else:
                birth = model.birthDate
                patients[model.id] = (number, {
                    PSEUDONYM: model.id, "sex": model.gender,
                    "birth_year": birth.year if isinstance(birth, date) else None})
        elif kind == "Condition":
            conditions.append((number, model))
        else:
            observations.append((number, model))
    columns: dict[str, ColumnSpec] = dict(PATIENT_COLUMNS)
    latest: dict[tuple[str, str], datetime] = {}
    for number, obs in observations:
        label = f"Observation/{obs.id or '?'}"
        codes = [c.code for c in (obs.code.coding or []) if c.system == LOINC and c.code]
        known = [code for code in codes if code in LOINC_COLUMNS]
        if not known:
            problems.append(Problem(number, f"{label}: no supported LOINC code (found {codes or 'none'})"))
            continue
        spec = LOINC_COLUMNS[known[0]]
        reference = obs.subject.reference if obs.subject is not None else None
        patient_id = reference.split("/", 1)[1] if reference and reference.startswith("Patient/") else None
        if patient_id is None or patient_id not in patients:
            problems.append(Problem(number, f"{label}: subject {reference!r} is not a Patient "
                                            "in this Bundle"))
            continue
        quantity = obs.valueQuantity
        if quantity is None or quantity.value is None:
            problems.append(Problem(number, f"{label}: no valueQuantity"))
            continue
        unit = quantity.code or quantity.unit
        if unit not in spec.units:
            problems.append(Problem(number, f"{label}: unit {unit!r} for LOINC {known[0]} "
                                            f"({spec.column}); expected {spec.units[0]!r}"))
            continue
        columns.setdefault(spec.column, ColumnSpec(spec.category, "number", required=False))
        when = _instant(obs)
        key = (patient_id, spec.column)
        if key not in latest or when >= latest[key]:
            latest[key] = when
            value = quantity.value
            patients[patient_id][1][spec.column] = float(value) if isinstance(value, Decimal) else value
    diagnoses = _diagnoses(conditions, patients, problems)
    for column in sorted({c for found in diagnoses.values() for c in found}):
        columns[column] = ColumnSpec("diagnoses", "integer", required=False)
        for patient_id, (_number, values) in patients.items():
            values[column] = int(column in diagnoses.get(patient_id, set()))
    final_mapping = _mapping(columns, mapping)
    header = [PSEUDONYM, *final_mapping.columns]
    rows = iter(sorted(patients.values(), key=lambda item: item[0]))
    return header, rows, problems, final_mapping


def _subject(model: Any) -> str | None:
    """The Patient id a resource is about (`subject`), or None."""
    reference = model.subject.reference if getattr(model, "subject", None) is not None else None
    return reference.split("/", 1)[1] if reference and reference.startswith("Patient/") else None


def _icd10_category(code: str) -> str:
    """The three-character ICD-10 category of a code (`E11.9` -> `E11`); CodeError if invalid."""
    category = code.strip().upper().replace(".", "")[:3]
    if len(category) != 3:
        raise CodeError(f"{code!r} is not an ICD-10 code")
    return normalize_icd10(category)


def _diagnoses(conditions: list[tuple[int, Any]], patients: dict[str, tuple[int, dict[str, Any]]],
               problems: list[Problem]) -> dict[str, set[str]]:
    """Patient id -> the `icd10_<category>` columns its Conditions give."""
    found: dict[str, set[str]] = {}
    for number, condition in conditions:
        label = f"Condition/{condition.id or '?'}"
        patient_id = _subject(condition)
        if patient_id is None or patient_id not in patients:
            problems.append(Problem(number, f"{label}: subject is not a Patient in this Bundle"))
            continue
        concept = condition.code
        codes = [(c.system, c.code) for c in ((concept.coding or []) if concept is not None else [])
                 if c.code]
        icd = [code for system, code in codes if system in ICD10_SYSTEMS]
        if not icd:
            problems.append(Problem(number, f"{label}: no ICD-10 code (Condition.code.coding with system "
                                            f"{ICD10_SYSTEMS[0]}; found {codes or 'none'})"))
            continue
        try:
            category = _icd10_category(icd[0])
        except CodeError as exc:
            problems.append(Problem(number, f"{label}: {exc}"))
            continue
        status = condition.verificationStatus
        status_codes = {c.code for c in ((status.coding or []) if status is not None else [])}
        if status_codes & NOT_A_DIAGNOSIS:
            continue
        found.setdefault(patient_id, set()).add(DIAGNOSIS_PREFIX + category)
    return found


def _mapping(columns: dict[str, ColumnSpec], override: Mapping | None) -> Mapping:
    """Built-in categories, with the steward's mapping (if any) renaming them."""
    if override is not None:
        columns = {name: ColumnSpec(override.columns[name].category, spec.type, spec.required)
                   if name in override.columns else spec for name, spec in columns.items()}
    return Mapping(pseudonym_column=PSEUDONYM, columns=columns)
