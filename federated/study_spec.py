"""The study spec a Flower run carries in its run config.

The coordinator validates a study when it is submitted; this is the part of it the ServerApp and
every hospital's ClientApp need, carried as two run-config keys: ``study-id`` and ``study-spec``
(RFC 8785 canonical JSON, so every hospital sees byte-identical terms and can hash them).
Flower's run config holds only scalars, hence one JSON string rather than nested keys.
Parsing is strict: an unknown or missing field, or a value out of range, is refused with an
error that names the field and the reason.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from audit.signing import canonical, sha256_hex
from consent.request import StudyRequest

RUN_CONFIG_STUDY_ID = "study-id"
#: Fewest hospitals per aggregate for secure aggregation (federated.secagg.params.MIN_HOSPITALS).
SECAGG_MIN_HOSPITALS = 3
RUN_CONFIG_STUDY_SPEC = "study-spec"


class StudySpecError(ValueError):
    """A study spec is malformed; the message names each bad field and why."""


class StudySpec(BaseModel):
    """What one study asks of every hospital, round after round."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    study_id: str = Field(min_length=1, max_length=200)
    #: Registered model template name (federated.templates); no researcher code runs at a hospital.
    template: str = Field(min_length=1, max_length=100)
    task: Literal["binary", "regression", "multiclass", "survival"]
    #: Feature columns the model needs, in model input order (the same at every hospital).
    columns: tuple[str, ...] = Field(min_length=1)
    #: The target column; for a survival study the time to event or censoring (>= 0).
    label: str = Field(min_length=1)
    #: Survival studies only (required there): the event column, 1 = event, 0 = censored.
    event: str | None = Field(default=None, min_length=1)
    #: Multi-class studies only (required there): the number of classes; labels are 0..classes-1.
    classes: int | None = Field(default=None, ge=2, le=1000)
    #: What each record's consent contract is evaluated against (purpose, organisation, data
    #: categories, ...). Every column's data category must be among `request.data_categories`.
    request: StudyRequest
    epsilon: float = Field(gt=0, le=100)
    delta: float = Field(gt=0, lt=1)
    rounds: int = Field(ge=1, le=1000)
    min_hospitals: int = Field(ge=1, le=1000)
    #: DP-SGD hyper-parameters; None takes the template's tuned default. None of them changes the
    #: privacy guarantee, which the hospital calibrates from (epsilon, delta, rounds).
    local_steps: int | None = Field(default=None, ge=1, le=10_000)
    batch_size: int | None = Field(default=None, ge=1, le=100_000)
    clip: float | None = Field(default=None, gt=0, le=1000)
    lr: float | None = Field(default=None, gt=0, le=100)
    momentum: float | None = Field(default=None, ge=0, lt=1)
    accountant: Literal["prv", "rdp"] = "prv"
    #: Seed of the initial global model (DP noise at hospitals is never seeded from the spec).
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    #: SecAgg+ (docs/secure-aggregation.md): the server sees only the sum of the hospitals'
    #: updates. Each hospital refuses to send its update in clear when this is set.
    secure_aggregation: bool = False
    #: Who adds the DP noise (docs/secure-aggregation.md, "Noise"): "local", each hospital the
    #: full DP-SGD noise; "distributed", each hospital a share of Skellam noise so that the
    #: aggregate carries the calibrated noise once (`federated.distributed_noise`; needs
    #: secure aggregation and at least `SECAGG_MIN_HOSPITALS` hospitals).
    noise: Literal["local", "distributed"] = "local"
    #: How long the ServerApp waits for replies in one phase before counting the rest as dropped.
    round_timeout_s: float = Field(default=120.0, gt=0, le=86_400)
    #: How long the ServerApp waits for `min_hospitals` SuperNodes to be connected.
    join_timeout_s: float = Field(default=60.0, gt=0, le=86_400)

    @model_validator(mode="after")
    def _consistent(self) -> StudySpec:
        if len(set(self.columns)) != len(self.columns):
            raise ValueError("columns: duplicate entries")
        if self.label in self.columns:
            raise ValueError("label: must not also be a feature column")
        if (self.task == "survival") != (self.event is not None):
            raise ValueError("event: required for a survival study (the event column), "
                             "and only there")
        if self.event is not None and (self.event in self.columns or self.event == self.label):
            raise ValueError("event: must differ from the label and every feature column")
        if (self.task == "multiclass") != (self.classes is not None):
            raise ValueError("classes: required for a multi-class study (number of classes), "
                             "and only there")
        if self.request.study_id is not None and self.request.study_id != self.study_id:
            raise ValueError(f"request.study_id: {self.request.study_id!r} differs from study_id")
        if self.request.epsilon is not None and self.request.epsilon != self.epsilon:
            raise ValueError(f"request.epsilon: {self.request.epsilon} differs from epsilon {self.epsilon}")
        if self.secure_aggregation and self.min_hospitals < SECAGG_MIN_HOSPITALS:
            raise ValueError(f"secure_aggregation: needs min_hospitals >= {SECAGG_MIN_HOSPITALS} (with "
                             "fewer, a hospital could learn another's update from the aggregate), got "
                             f"{self.min_hospitals}")
        if self.noise == "distributed":
            if not self.secure_aggregation:
                raise ValueError("noise: distributed noise needs secure aggregation (without it the "
                                 "coordinator sees each hospital's update with only its share of the noise)")
            if self.task == "survival":
                raise ValueError("noise: distributed noise supports binary, regression and multi-class "
                                 "studies (a Cox gradient needs the risk set of each round)")
        return self

    # -- encoding ---------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The spec as JSON. `event` and `classes` appear only when set and `noise` only when
        distributed, so the canonical bytes
        (and hash) of a binary or regression study are what they were before those fields."""
        out = self.model_dump(mode="json")
        for key in ("event", "classes"):
            if out.get(key) is None:
                out.pop(key, None)
        if out.get("noise") == "local":  # the default: the hash of a study from before the field
            out.pop("noise")
        return out

    def canonical_bytes(self) -> bytes:
        return canonical(self.to_json())

    def sha256(self) -> str:
        """Hash of the canonical spec: lets receipts and log entries pin the exact terms."""
        return sha256_hex(self.canonical_bytes())

    def to_run_config(self) -> dict[str, bool | float | int | str]:
        return {RUN_CONFIG_STUDY_ID: self.study_id, RUN_CONFIG_STUDY_SPEC: self.canonical_bytes().decode()}

    @classmethod
    def from_json(cls, obj: Any) -> StudySpec:
        try:
            return cls.model_validate(obj)
        except ValidationError as exc:
            raise StudySpecError(_describe(exc)) from None

    @classmethod
    def from_run_config(cls, run_config: Mapping[str, Any]) -> StudySpec:
        """Parse the run config of a Flower run; the two keys must agree on the study id."""
        raw = run_config.get(RUN_CONFIG_STUDY_SPEC)
        if not isinstance(raw, str) or not raw:
            raise StudySpecError(f"{RUN_CONFIG_STUDY_SPEC}: missing from the run config")
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise StudySpecError(f"{RUN_CONFIG_STUDY_SPEC}: not JSON ({exc.msg})") from None
        spec = cls.from_json(obj)
        run_id = run_config.get(RUN_CONFIG_STUDY_ID)
        if run_id != spec.study_id:
            raise StudySpecError(f"{RUN_CONFIG_STUDY_ID}: {run_id!r} does not match the spec's "
                                 f"study_id {spec.study_id!r}")
        return spec


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "spec"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)
