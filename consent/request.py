"""The study request a contract is evaluated against (imported by `federated` and `exchange`)."""

from __future__ import annotations

import math
from typing import Any

from pydantic import Field, StrictBool, field_validator, model_validator

from consent import duo
from consent.codes import normalize_category, normalize_icd10, normalize_region
from consent.model import Identifier, Period, _Model


class StudyRequest(_Model):
    """What a study asks of each record's consent.

    purpose: a DUO term (GRU, HMB, DS or POA; shorthands accepted), or MDS: methods development
    alone, the DUOS matcher's purpose that DUO has no term for; disease: ICD-10, required for DS
    and only for DS; organisation and its region (ISO 3166-1 alpha-2); commercial: commercial
    purpose *or* a for-profit organisation (DUOS asks one question for NPU and NCU);
    ethics_approval: IRB/ERB approval present; data_categories: what the study reads (at least
    one); epsilon: the per-study privacy target; period: when the study uses the data;
    methods_development: the study develops methods (for NMDS; implied by purpose MDS; with DS,
    methods development on a disease); accepted_obligations: DUO
    obligation modifiers the researcher agreed to (PUB, COL, MOR, RTN); study_id and researcher:
    for project- and user-specific (PS, US) permissions.
    """

    purpose: str
    disease: str | None = None
    organisation: Identifier
    region: str
    commercial: StrictBool = False
    ethics_approval: StrictBool = False
    data_categories: tuple[str, ...] = Field(min_length=1)
    epsilon: float | None = Field(default=None, gt=0)
    period: Period | None = None
    methods_development: StrictBool = False
    accepted_obligations: tuple[str, ...] = ()
    study_id: Identifier | None = None
    researcher: Identifier | None = None

    @field_validator("purpose", mode="after")
    @classmethod
    def _purpose(cls, value: str) -> str:
        term = duo.normalize(value)
        if term not in duo.REQUEST_PURPOSES:
            raise ValueError(
                f"{value!r} cannot be a study purpose; use one of "
                f"{', '.join(sorted(duo.label(t) for t in duo.REQUEST_PURPOSES))}"
            )
        return term

    @field_validator("disease", mode="after")
    @classmethod
    def _disease(cls, value: str | None) -> str | None:
        return None if value is None else normalize_icd10(value)

    @field_validator("region", mode="after")
    @classmethod
    def _region(cls, value: str) -> str:
        return normalize_region(value)

    @field_validator("data_categories", mode="after")
    @classmethod
    def _categories(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(sorted({normalize_category(v) for v in values}))

    @field_validator("accepted_obligations", mode="after")
    @classmethod
    def _obligations(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        out = set()
        for value in values:
            term = duo.normalize(value)
            if term not in duo.OBLIGATIONS:
                raise ValueError(
                    f"{value!r} is not an obligation a researcher can accept "
                    f"(one of {', '.join(sorted(duo.label(t) for t in duo.OBLIGATIONS))})"
                )
            out.add(term)
        return tuple(sorted(out))

    @field_validator("epsilon", mode="after")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("epsilon must be a finite number")
        return value

    @model_validator(mode="after")
    def _disease_iff_ds(self) -> StudyRequest:
        if self.purpose == duo.DS and self.disease is None:
            raise ValueError("disease: a DS (DUO:0000007) study must name its ICD-10 disease")
        if self.purpose != duo.DS and self.disease is not None:
            raise ValueError("disease: only a DS (DUO:0000007) study names a disease")
        return self

    def to_json(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=True)
