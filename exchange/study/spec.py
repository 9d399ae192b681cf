"""One translation of an accepted study into what consent and Flower read.

A study changes hands three times after the coordinator accepts it: a hospital decides on it
(counting the records its patients' consent lets it use), the coordinator starts its run, and
every hospital's ClientApp gates its records again in each round. If these three saw different
consent requests, a contract limited to named researchers (DUO US), projects (PS), institutions
(IS) or a time span (TS) could count one way at approval and another in training. So there is
one `AcceptedStudy` and one function from it to the consent `StudyRequest` (`consent_request`)
and to the federated `StudySpec` (`study_spec`); the coordinator, the node and the demo all
call these, and nothing else builds either.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from consent.request import StudyRequest
from federated.study_spec import SECAGG_MIN_HOSPITALS, StudySpec


@dataclass(frozen=True)
class AcceptedStudy:
    """A study as the coordinator accepted it: its id, its spec (the `StudyCreate` body, the
    token budget aside), the submitting organisation and its region, and the researcher who
    submitted it (the one a US contract names)."""

    study_id: str
    spec: Mapping[str, Any] = field(hash=False)
    organisation_id: str
    region: str
    researcher_id: str | None = None

    @classmethod
    def from_hospital_view(cls, study: Mapping[str, Any]) -> AcceptedStudy:
        """From what a hospital is shown (`HospitalStudy`: `{"id", "organisation_id",
        "organisation_region", "researcher_id", "spec", ...}`)."""
        spec = study.get("spec")
        return cls(
            study_id=str(study.get("id") or ""),
            spec=dict(spec) if isinstance(spec, Mapping) else {},
            organisation_id=str(study.get("organisation_id") or ""),
            region=str(study.get("organisation_region") or ""),
            researcher_id=study.get("researcher_id") or None,
        )


def feature_columns(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The model's input columns: category by category in the order of `data_categories`, then
    in the order listed (the same order at every hospital)."""
    columns: Mapping[str, Any] = spec.get("columns") or {}
    return tuple(
        str(column) for category in spec.get("data_categories") or () for column in columns.get(category, ())
    )


def data_categories(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The categories the study reads: its `data_categories` (required at submission); a spec
    without them (a hand-written one) reads the categories it lists columns for."""
    return tuple(spec.get("data_categories") or spec.get("columns") or ())


def consent_request(study: AcceptedStudy) -> StudyRequest:
    """What each record's consent contract is evaluated against, at decision and in training.

    Raises pydantic's ValidationError (a ValueError) naming the field when the study cannot be
    a consent request (e.g. a purpose that is no study purpose)."""
    spec = study.spec
    epsilon = spec.get("epsilon")
    return StudyRequest(
        purpose=spec.get("purpose", ""),
        disease=spec.get("disease"),
        organisation=study.organisation_id,
        region=study.region,
        commercial=bool(spec.get("commercial", False)),
        ethics_approval=bool(spec.get("ethics_approval", False)),
        methods_development=bool(spec.get("methods_development", False)),
        data_categories=data_categories(spec),
        epsilon=float(epsilon) if epsilon else None,
        study_id=study.study_id,
        researcher=study.researcher_id,
    )


def study_spec(
    study: AcceptedStudy, *, round_timeout_s: float | None = None, join_timeout_s: float | None = None
) -> StudySpec:
    """The `StudySpec` the ServerApp and every ClientApp receive; its `request` is
    `consent_request(study)`. Timeouts left None take `StudySpec`'s defaults."""
    spec = study.spec
    timeouts: dict[str, Any] = {
        name: value
        for name, value in (("round_timeout_s", round_timeout_s), ("join_timeout_s", join_timeout_s))
        if value is not None
    }
    return StudySpec(
        study_id=study.study_id,
        template=spec["template"],
        task=spec["task"],
        columns=feature_columns(spec),
        label=spec.get("label", "label"),
        event=spec.get("event"),
        classes=spec.get("classes"),
        request=consent_request(study),
        epsilon=float(spec["epsilon"]),
        delta=float(spec["delta"]),
        rounds=int(spec["rounds"]),
        min_hospitals=int(spec["min_hospitals"]),
        secure_aggregation=secure_aggregation(spec),
        noise=spec.get("noise", "local"),
        **timeouts,
    )


def secure_aggregation(spec: Mapping[str, Any]) -> bool:
    """SecAgg+ (docs/secure-aggregation.md): as asked, else on when every aggregate has at least
    3 hospitals (`min_hospitals >= 3`)."""
    asked = spec.get("secure_aggregation")
    if asked is None:
        return int(spec["min_hospitals"]) >= SECAGG_MIN_HOSPITALS
    return bool(asked)
