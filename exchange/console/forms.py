"""The study form: HTML form fields -> the API's StudyCreate body, and its problems.

Why a translation and not a second set of rules: the form is turned into the same JSON body
a client would POST and validated by the same `StudyCreate` model, so the console refuses
exactly what the API refuses, naming the same fields.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from exchange.coordinator.schemas import StudyCreate

INTEGER_FIELDS = ("rounds", "min_hospitals", "token_budget")
FLOAT_FIELDS = ("epsilon", "delta")
TEXT_FIELDS = ("title", "purpose", "disease", "template", "task", "label")
DEFAULTS: dict[str, str] = {
    "title": "",
    "purpose": "DUO:0000007",
    "disease": "C50",
    "data_categories": "labs, diagnoses",
    "columns": "labs: mean_radius, mean_texture",
    "template": "logistic_regression",
    "task": "binary",
    "label": "label",
    "epsilon": "3.0",
    "delta": "1e-5",
    "rounds": "3",
    "min_hospitals": "2",
    "token_budget": "1000",
    "ethics_approval": "on",
    "commercial": "",
}


def _number(text: str, kind: type) -> Any:
    """The number in `text`, or the text itself (the model then names the field and why)."""
    try:
        return kind(text)
    except ValueError:
        return text


def _columns(text: str) -> Any:
    """`category: col1, col2` per line -> {category: [col1, col2]}; a line without ':' is kept
    as a string so that validation names it."""
    columns: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        category, colon, names = line.partition(":")
        if not colon:
            return text
        columns[category.strip()] = [n.strip() for n in names.split(",") if n.strip()]
    return columns


def study_body(form: dict[str, str]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name in TEXT_FIELDS:
        value = form.get(name, "").strip()
        if name == "disease" and not value:
            continue
        body[name] = value
    for name in INTEGER_FIELDS:
        body[name] = _number(form.get(name, "").strip(), int)
    for name in FLOAT_FIELDS:
        body[name] = _number(form.get(name, "").strip(), float)
    body["commercial"] = form.get("commercial") == "on"
    body["ethics_approval"] = form.get("ethics_approval") == "on"
    body["data_categories"] = [c.strip() for c in form.get("data_categories", "").split(",") if c.strip()]
    body["columns"] = _columns(form.get("columns", ""))
    return body


def validate(body: dict[str, Any]) -> tuple[StudyCreate | None, list[dict[str, str]]]:
    """The model, or every problem as {field, reason} (the API's problem format)."""
    try:
        return StudyCreate.model_validate(body, strict=True), []
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            location = [str(p) for p in error.get("loc", ()) if p != "__root__"]
            field = ".".join(location) or str(error.get("ctx", {}).get("field", "body"))
            problems.append({"field": field, "reason": str(error.get("msg", "invalid"))})
        return None, problems
