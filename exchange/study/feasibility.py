"""Whether a hospital could serve a study, from the catalog it publishes: checked at submission.

A hospital decides on a study with its site policy and its patients' consent (exchange/node/
policy.py). Most of what it checks is not private: which columns it holds (with their data
categories and value types) and its policy's public limits (purposes, organisations, regions,
commercial use, the largest epsilon and delta per study). Each node publishes these as a signed
`hospital.catalog` log entry (exchange/node/catalog.py), and the coordinator refuses at once a
study that no set of `min_hospitals` hospitals can serve, with every reason of every hospital,
instead of escrowing its budget for a study that would wait for ever.

No count leaves a hospital in a catalog (docs/privacy.md, "Counts"): whether enough patients
consent is still decided by each hospital, when it decides. A hospital that has published no
catalog yet is counted as one that might serve the study (the check never refuses on what it
does not know).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from consent import duo

#: The log entry a node signs and posts (POST /v1/hospital/catalog).
CATALOG_KIND = "hospital.catalog"
#: Policy lists' wildcard (exchange.node.settings.WILDCARD).
WILDCARD = "*"
#: Value types a mapped column has (exchange.node.mapping.VALUE_TYPES).
ValueType = Literal["number", "integer", "string", "boolean"]
NUMERIC: frozenset[str] = frozenset({"number", "integer", "boolean"})


class CatalogColumn(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(min_length=1, max_length=256)]
    category: Annotated[str, Field(min_length=1, max_length=128)]
    type: ValueType


class Catalog(BaseModel):
    """A hospital's public catalog: the payload of its signed `hospital.catalog` entry."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hospital: Annotated[str, Field(pattern=r"^hospital:[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=140)]
    columns: Annotated[list[CatalogColumn], Field(max_length=5000)]
    purposes: Annotated[list[Annotated[str, Field(max_length=100)]], Field(max_length=100)]
    organisations: Annotated[list[Annotated[str, Field(max_length=200)]], Field(max_length=1000)]
    regions: Annotated[list[Annotated[str, Field(max_length=10)]], Field(max_length=300)]
    allow_commercial: bool
    max_epsilon_per_study: Annotated[float, Field(gt=0, allow_inf_nan=False)]
    max_delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False)]
    #: False when the site policy refuses every study (mode auto-refuse)
    accepts_studies: bool

    @field_validator("columns")
    @classmethod
    def _unique(cls, columns: list[CatalogColumn]) -> list[CatalogColumn]:
        names = [c.name for c in columns]
        if len(set(names)) != len(names):
            raise ValueError("a column is listed twice")
        return columns

    def hospital_id(self) -> str:
        return self.hospital.removeprefix("hospital:")


def _allowed(value: str, allowed: list[str]) -> bool:
    return WILDCARD in allowed or value in allowed


def purpose_allowed(purpose: str, allowed: list[str]) -> bool:
    """An allowed purpose allows what it covers under the DUO matching rules (allowing GRU allows
    HMB, DS and POA), as the node's site policy reads it (exchange/node/policy.py, rule 1)."""
    if _allowed(purpose, allowed):
        return True
    try:
        wanted = duo.normalize(purpose)
    except ValueError:
        return False
    for term in allowed:
        try:
            if duo.covers(duo.normalize(term), wanted)[0]:
                return True
        except (ValueError, KeyError):  # an allowed entry that is no DUO permission
            continue
    return False


def catalog_reasons(catalog: Catalog, spec: Mapping[str, Any], organisation: str, region: str) -> list[str]:
    """Every reason this hospital's public catalog gives for not serving the study (`spec`: the
    StudyCreate body); empty: it might serve it (its patients' consent decides the rest)."""
    reasons: list[str] = []
    if not catalog.accepts_studies:
        reasons.append("site policy refuses studies automatically")
    purpose = str(spec.get("purpose") or "")
    if not purpose_allowed(purpose, catalog.purposes):
        allowed = ", ".join(catalog.purposes) or "none"
        reasons.append(f"purpose {purpose!r} is not allowed (allowed: {allowed})")
    if not _allowed(organisation, catalog.organisations):
        reasons.append(f"organisation {organisation!r} is not allowed")
    if not _allowed(region, catalog.regions):
        reasons.append(f"region {region!r} is not allowed")
    if spec.get("commercial") and not catalog.allow_commercial:
        reasons.append("commercial use is not allowed")
    epsilon, delta = spec.get("epsilon"), spec.get("delta")
    if isinstance(epsilon, int | float) and epsilon > catalog.max_epsilon_per_study:
        reasons.append(f"epsilon {epsilon:g} exceeds the site maximum per study "
                       f"({catalog.max_epsilon_per_study:g})")
    if isinstance(delta, int | float) and delta > catalog.max_delta:
        reasons.append(f"delta {delta:g} exceeds the site maximum per study ({catalog.max_delta:g})")
    held = {c.name: c for c in catalog.columns}
    columns: Mapping[str, Any] = spec.get("columns") or {}
    wanted = [(str(category), str(name)) for category, names in columns.items() for name in names or ()]
    missing = sorted({name for _c, name in wanted if name not in held})
    if missing:
        reasons.append(f"column(s) not held: {', '.join(missing)}")
    wrong = [f"{name} is {held[name].category}, not {category}" for category, name in wanted
             if name in held and held[name].category != category]
    if wrong:
        reasons.append("column category mismatch: " + "; ".join(wrong))
    not_numeric = [name for _c, name in wanted if name in held and held[name].type not in NUMERIC]
    if not_numeric:
        reasons.append(f"column(s) not numeric: {', '.join(not_numeric)}")
    for role, name in (("label", spec.get("label") or "label"), ("event", spec.get("event"))):
        if name is None:
            continue
        column = held.get(str(name))
        if column is None:
            reasons.append(f"{role} {name!r} is not a column held here")
        elif column.type not in NUMERIC:
            reasons.append(f"{role} {name!r} is a {column.type} column, not a number")
    return reasons


def feasible(spec: Mapping[str, Any], organisation: str, region: str, catalogs: Mapping[str, Catalog],
             registered: list[str]) -> tuple[int, dict[str, list[str]]]:
    """(how many registered hospitals might serve the study, each other hospital's reasons). A
    hospital without a catalog might serve it."""
    reasons: dict[str, list[str]] = {}
    possible = 0
    for hospital_id in registered:
        catalog = catalogs.get(hospital_id)
        found = [] if catalog is None else catalog_reasons(catalog, spec, organisation, region)
        if found:
            reasons[hospital_id] = found
        else:
            possible += 1
    return possible, reasons
