"""Request and response bodies of the coordinator API (pydantic v2; they make the OpenAPI 3.1).

Requests are strict and closed: wrong JSON types are not coerced ("3" is not 3) and unknown
fields are refused, so a typo never silently falls back to a default. `StudyCreate` reports
every problem in one answer: field rules and cross-field rules are collected together by a
wrap validator instead of stopping at the first failure.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from exchange.coordinator import vocabulary
from exchange.coordinator.models import Role
from exchange.study.models import DecisionKind, StudyStatus
from exchange.text_safety import PlainText, payload_problems, text_problem
from federated.study_spec import SECAGG_MIN_HOSPITALS

#: The hospitals' default site maximum of a study's delta (federated.privacy_ledger.DEFAULT_MAX_DELTA).
SITE_MAX_DELTA = 1e-5

MAX_AMOUNT = 2**53 - 1
Slug = Annotated[str, Field(pattern=r"^[a-z0-9][a-z0-9-]{1,62}$",
                            description="lower-case letters, digits and '-', 2-63 characters")]
Account = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]*:\S+$", max_length=200,
                               description="ledger account `<prefix>:<id>`, e.g. `org:acme`")]
Amount = Annotated[int, Field(ge=1, le=MAX_AMOUNT, description="integer token units")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Out(BaseModel):
    model_config = ConfigDict(from_attributes=True)


# ---------------------------------------------------------------- operator requests
class OrganisationCreate(Strict):
    id: Slug
    name: Annotated[PlainText, Field(min_length=1, max_length=200)]
    region: Annotated[str, Field(pattern=r"^[A-Z]{2}$", description="ISO 3166-1 alpha-2")]


class ResearcherCreate(Strict):
    id: Slug
    name: Annotated[PlainText, Field(min_length=1, max_length=200)]


class ApiKeyCreate(Strict):
    role: Literal["operator", "researcher", "auditor"]
    organisation_id: Slug | None = None
    researcher_id: Slug | None = None
    label: Annotated[PlainText, Field(max_length=200)] = ""


def _ed25519_public_key(value: str) -> str:
    try:
        raw = base64.b64decode(value.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError) as exc:
        raise ValueError("not valid base64") from exc
    if len(raw) != 32:
        raise ValueError(f"an Ed25519 public key is 32 bytes, this is {len(raw)}")
    return value


def _flower_public_key(value: str) -> str:
    """A SuperNode authentication key: ECDSA (NIST curve) in OpenSSH format, as Flower's
    `flwr supernode register` takes it (or PEM SubjectPublicKeyInfo)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    text = value.strip()
    try:
        key = (serialization.load_pem_public_key(text.encode()) if text.startswith("-----BEGIN")
               else serialization.load_ssh_public_key(text.encode()))
    except (ValueError, TypeError) as exc:
        raise ValueError("not an OpenSSH or PEM public key") from exc
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError(f"Flower node keys are ECDSA (NIST curve), this is {type(key).__name__}")
    return text


class HospitalCreate(Strict):
    id: Slug
    organisation_id: Slug
    name: Annotated[PlainText, Field(min_length=1, max_length=200)]
    signing_public_key: Annotated[str, Field(description="Ed25519 public key, base64 (32 bytes)")]
    flower_public_key: Annotated[str, Field(min_length=1, max_length=4000,
                                            description="the SuperNode's public key (OpenSSH/PEM)")]
    witness_vkey: Annotated[str | None, Field(
        default=None, max_length=400,
        description="the node's witness key, a C2SP cosignature/v1 vkey (registered in the log)")] = None

    @field_validator("signing_public_key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        return _ed25519_public_key(value)

    @field_validator("witness_vkey")
    @classmethod
    def _check_witness(cls, value: str | None) -> str | None:
        if value is None:
            return None
        from audit.cosignature import parse_witness_vkey
        from audit.note import NoteError

        try:
            return str(parse_witness_vkey(value))
        except NoteError as exc:
            raise ValueError(str(exc)) from exc

    @field_validator("flower_public_key")
    @classmethod
    def _check_flower_key(cls, value: str) -> str:
        return _flower_public_key(value)


class MintRequest(Strict):
    account: Account
    amount: Amount


class CancelRequest(Strict):
    reason: Annotated[PlainText, Field(min_length=1, max_length=500)] = "cancelled by the researcher"


class SignedEntry(Strict):
    """An audit-log envelope signed by the caller (see docs/CONTRACTS.md)."""

    v: Literal[1]
    kind: Annotated[str, Field(min_length=1, max_length=64)]
    key_id: Annotated[str, Field(pattern=r"^[0-9a-f]{32}$")]
    time: Annotated[str, Field(min_length=1, max_length=40)]
    payload: dict[str, Any]
    signature: Annotated[str, Field(min_length=1, max_length=200)]

    @field_validator("payload")
    @classmethod
    def _payload_text(cls, value: dict[str, Any]) -> dict[str, Any]:
        found = payload_problems(value)
        if found:
            raise ValueError(f"{found[0]['field']}: {found[0]['reason']}")
        return value


# ---------------------------------------------------------------- hospitals' signed entries
def decision_payload_problems(payload: dict[str, Any], study_id: str,
                              hospital_id: str) -> list[dict[str, str]]:
    """Every problem with a `study.decision` entry's payload, each with its field: exactly the
    fields study_id (the study in the URL), hospital (the caller), decision (approve or
    refuse), reasons (up to 50 strings of 1-500 characters; a refusal gives at least one) and
    eligible_records (null or an integer >= 0)."""
    found: list[dict[str, str]] = []
    expected = {"study_id", "hospital", "decision", "reasons", "eligible_records"}
    if set(payload) != expected:
        found.append({"field": "payload", "reason": f"fields must be exactly {sorted(expected)}"})
    if payload.get("study_id") != study_id:
        found.append({"field": "payload.study_id", "reason": "does not match the study in the URL"})
    if payload.get("hospital") != f"hospital:{hospital_id}":
        found.append({"field": "payload.hospital", "reason": f"must be 'hospital:{hospital_id}'"})
    if payload.get("decision") not in ("approve", "refuse"):
        found.append({"field": "payload.decision", "reason": "must be 'approve' or 'refuse'"})
    reasons = payload.get("reasons")
    if not isinstance(reasons, list) or not all(isinstance(r, str) and 0 < len(r) <= 500
                                                for r in reasons) or len(reasons) > 50:
        found.append({"field": "payload.reasons", "reason": "must be a list of up to 50 strings"})
    elif any(text_problem(r) for r in reasons):
        found.append({"field": "payload.reasons", "reason": "printable text only: "
                      + next(p for r in reasons if (p := text_problem(r)))})
    elif payload.get("decision") == "refuse" and not reasons:
        found.append({"field": "payload.reasons", "reason": "a refusal needs at least one reason"})
    eligible = payload.get("eligible_records")
    if eligible is not None and (not isinstance(eligible, int) or isinstance(eligible, bool)
                                 or eligible < 0):
        found.append({"field": "payload.eligible_records", "reason": "must be null or an integer >= 0"})
    return found


# ---------------------------------------------------------------- studies
#: RFC 3339 section 5.6 `date-time`: a full date and time with seconds and an offset.
RFC3339 = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def rfc3339_instant(value: object) -> object:
    """An RFC 3339 date-time string as an aware datetime (anything else is left to the type
    check, which names it). A time without an offset is refused: it is no instant."""
    if not isinstance(value, str):
        return value
    if RFC3339.fullmatch(value) is None:
        raise ValueError(f"{value[:40]!r} is not an RFC 3339 instant (a date, a time with seconds "
                         "and an offset, e.g. 2027-01-31T12:00:00Z)")
    try:
        return datetime.fromisoformat(value.replace("z", "Z").replace("t", "T"))
    except ValueError as exc:
        raise ValueError(f"{value[:40]!r} is not a valid date and time: {exc}") from exc


def _in_the_future(value: datetime | None) -> datetime | None:
    if value is not None and value <= datetime.now(UTC):
        raise ValueError(f"{value.isoformat()} is in the past: the study could never start")
    return value


Deadline = Annotated[datetime | None, BeforeValidator(rfc3339_instant), AfterValidator(_in_the_future),
                     Field(description=(
                         "RFC 3339 instant by which the study must have started; not started by "
                         "then, it expires: its escrow is refunded and the hospitals' approvals "
                         "released. Default: seven days after submission"),
                         examples=["2027-01-31T12:00:00Z"])]

class StudyCreate(Strict):
    """A study request. Every problem is reported at once (field and cross-field rules)."""

    model_config = ConfigDict(extra="forbid", strict=True, title="StudyCreate")

    title: Annotated[PlainText, Field(min_length=1, max_length=200)]
    purpose: Annotated[str, Field(description="GA4GH DUO term of the study's primary purpose",
                                  examples=["DUO:0000007"])]
    disease: Annotated[str | None, Field(description="ICD-10 code; required for DS (DUO:0000007)",
                                         examples=["C50"])] = None
    commercial: bool = False
    ethics_approval: bool = False
    methods_development: Annotated[bool, Field(description=(
        "the study develops methods (a new model or algorithm) rather than a finding: DUOS's MDS, "
        "alone (purpose GRU or HMB) or on a disease (purpose DS). A consent with NMDS "
        "(DUO:0000015) permits it only within its consented disease"))] = False
    data_categories: Annotated[list[str], Field(min_length=1, max_length=20)]
    columns: Annotated[dict[str, list[str]], Field(
        description="data category -> column names used from it", min_length=1)]
    template: Annotated[str, Field(examples=["logistic_regression"])]
    task: Literal["binary", "regression", "multiclass", "survival"]
    label: Annotated[str, Field(pattern=vocabulary.COLUMN_PATTERN,
                                description="the target column (survival: the time to event or "
                                            "censoring)")] = "label"
    event: Annotated[str | None, Field(pattern=vocabulary.COLUMN_PATTERN, description=(
        "survival studies only (required there): the event column, 1 event, 0 censored"))] = None
    classes: Annotated[int | None, Field(ge=2, le=1000, description=(
        "multi-class studies only (required there): the number of classes, labels 0..classes-1"))] = None
    epsilon: Annotated[float, Field(gt=0, le=100, allow_inf_nan=False, description=(
        "DP epsilon PER PATIENT at each hospital, for the whole study; it counts against each "
        "patient's lifetime cap there"))]
    delta: Annotated[float, Field(gt=0, lt=1, allow_inf_nan=False, description=(
        "DP delta per patient; each hospital refuses a delta above its site maximum (default "
        "1e-5) or above 1/n for its n eligible patients"))]
    rounds: Annotated[int, Field(ge=1, le=1000)]
    min_hospitals: Annotated[int, Field(ge=1, le=1000)]
    secure_aggregation: Annotated[bool | None, Field(description=(
        "SecAgg+: the coordinator sees only the sum of the hospitals' updates "
        "(docs/secure-aggregation.md). Default (null): on when min_hospitals >= 3; true with "
        "min_hospitals < 3 is refused"))] = None
    noise: Annotated[Literal["local", "distributed"], Field(description=(
        "who adds the DP noise (docs/secure-aggregation.md): local (default), each hospital the full "
        "noise; distributed, each hospital a share of Skellam noise so that the secure aggregate "
        "carries it once (needs secure aggregation, min_hospitals >= 3, not survival)"))] = "local"
    token_budget: Amount
    start_deadline: Deadline = None

    @field_validator("delta")
    @classmethod
    def _delta(cls, value: float) -> float:
        # Refused here, at submission, rather than by every hospital at decision time: a delta
        # above the site maximum allows a mechanism that publishes one patient outright with
        # probability delta (docs/privacy.md, "Delta").
        if value > SITE_MAX_DELTA:
            raise ValueError(f"delta {value!r} exceeds the site maximum per study ({SITE_MAX_DELTA:g}); "
                             "a study's delta must be at most that")
        return value

    @field_validator("purpose")
    @classmethod
    def _purpose(cls, value: str) -> str:
        return vocabulary.normalize_purpose(value)

    @field_validator("disease")
    @classmethod
    def _disease(cls, value: str | None) -> str | None:
        return value if value is None else vocabulary.normalize_disease(value)

    @field_validator("template")
    @classmethod
    def _template(cls, value: str) -> str:
        return _rule(vocabulary.template_problem(value), value)

    @model_validator(mode="wrap")
    @classmethod
    def _everything_at_once(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        errors: list[InitErrorDetails] = []
        result = None
        try:
            result = handler(data)
        except ValidationError as exc:
            errors.extend(_as_init_errors(exc))
        if isinstance(data, dict):
            errors.extend(_cross_field_problems(data))
        if errors:
            raise ValidationError.from_exception_data(cls.__name__, errors)
        return result


def _rule(problem: str | None, value: Any) -> Any:
    if problem is not None:
        raise PydanticCustomError("study_rule", problem)
    return value


def _as_init_errors(exc: ValidationError) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    for error in exc.errors():
        if error["type"] in ("study_rule", "value_error", "assertion_error"):
            message = error["msg"].removeprefix("Value error, ")
            safe = message.replace("{", "(").replace("}", ")")
            out.append({"type": PydanticCustomError("study_rule", safe),
                        "loc": error["loc"], "input": error.get("input")})
        else:
            detail: InitErrorDetails = {"type": error["type"], "loc": error["loc"],
                                        "input": error.get("input")}
            if "ctx" in error:
                detail["ctx"] = error["ctx"]
            out.append(detail)
    return out


def _problem(loc: tuple[str | int, ...], message: str, value: Any) -> InitErrorDetails:
    return {"type": PydanticCustomError("study_rule", message.replace("{", "(").replace("}", ")")),
            "loc": loc, "input": value}


def _cross_field_problems(data: dict[str, Any]) -> list[InitErrorDetails]:
    """Rules between fields, checked on the raw input wherever the fields involved have the
    right types, so they are reported even when other fields are wrong."""
    problems: list[InitErrorDetails] = []
    purpose, disease = data.get("purpose"), data.get("disease")
    if isinstance(purpose, str):
        try:
            purpose = vocabulary.normalize_purpose(purpose)
        except ValueError:
            purpose = None
    if purpose == vocabulary.DISEASE_SPECIFIC and disease is None:
        problems.append(_problem(("disease",), "a disease-specific study (DUO:0000007) needs an ICD-10 "
                                 "disease code", None))
    if isinstance(purpose, str) and purpose != vocabulary.DISEASE_SPECIFIC and disease is not None:
        problems.append(_problem(("disease",), "a disease code is only allowed with purpose DS "
                                 "(DUO:0000007)", disease))
    template, task = data.get("template"), data.get("task")
    if isinstance(template, str) and isinstance(task, str):
        problem = vocabulary.template_task_problem(template, task)
        if problem:
            problems.append(_problem(("task",), problem, task))
    secure, minimum = data.get("secure_aggregation"), data.get("min_hospitals")
    if secure is True and isinstance(minimum, int) and minimum < SECAGG_MIN_HOSPITALS:
        problems.append(_problem(("secure_aggregation",), f"secure aggregation needs min_hospitals >= "
                                 f"{SECAGG_MIN_HOSPITALS} (with fewer, a hospital could learn another's "
                                 "update from the aggregate)", secure))
    if data.get("noise") == "distributed":
        if isinstance(minimum, int) and minimum < SECAGG_MIN_HOSPITALS:
            problems.append(_problem(("noise",), f"distributed noise needs secure aggregation, which needs "
                                     f"min_hospitals >= {SECAGG_MIN_HOSPITALS}", "distributed"))
        elif secure is False:
            problems.append(_problem(("noise",), "distributed noise needs secure aggregation (without it the "
                                     "coordinator sees each update with only its share of the noise)",
                                     "distributed"))
        if task == "survival":
            problems.append(_problem(("noise",), "distributed noise supports binary, regression and "
                                     "multi-class studies", "distributed"))
    if isinstance(task, str):
        if (task == "survival") != (data.get("event") is not None):
            problems.append(_problem(("event",), "a survival study needs its event column, and only "
                                     "a survival study has one", data.get("event")))
        if (task == "multiclass") != (data.get("classes") is not None):
            problems.append(_problem(("classes",), "a multi-class study needs its number of classes, "
                                     "and only a multi-class study has one", data.get("classes")))
        if data.get("event") is not None and data.get("event") == data.get("label", "label"):
            problems.append(_problem(("event",), "the event column must differ from the label",
                                     data.get("event")))
    categories = data.get("data_categories")
    category_list = ([c for c in categories if isinstance(c, str)]
                     if isinstance(categories, list) else None)
    if category_list is not None:
        seen: set[str] = set()
        for i, category in enumerate(category_list):
            problem = vocabulary.category_problem(category)
            if problem:
                problems.append(_problem(("data_categories", i), problem, category))
            if category in seen:
                problems.append(_problem(("data_categories", i), f"{category!r} is listed twice",
                                         category))
            seen.add(category)
    columns = data.get("columns")
    if isinstance(columns, dict):
        names_seen: set[str] = set()
        for category, names in columns.items():
            if category_list is not None and category not in category_list:
                problems.append(_problem(("columns", category),
                                         f"category {category!r} is not in data_categories", category))
            if not isinstance(names, list):
                continue
            if not names:
                problems.append(_problem(("columns", category), "lists no column", names))
            for j, name in enumerate(names):
                if not isinstance(name, str):
                    continue
                if not vocabulary.COLUMN_NAME.match(name):
                    problems.append(_problem(("columns", category, j),
                                             f"{name!r} is not a column name (letters, digits, space, "
                                             "_ . ( ) / % + -; no space at either end)",
                                             name))
                elif name in names_seen:
                    problems.append(_problem(("columns", category, j), f"column {name!r} is listed "
                                             "twice", name))
                names_seen.add(name)
        label = data.get("label", "label")
        if isinstance(label, str) and label in names_seen:
            problems.append(_problem(("label",), f"the target column {label!r} must not be a feature "
                                     "column", label))
    return problems


class DecisionOut(Out):
    hospital_id: str
    decision: DecisionKind
    reasons: list[str]
    eligible_records: int | None
    decided_at: datetime
    late: bool = False  # arrived after the study left `submitted`: shown, changed nothing


class StudyOut(Out):
    id: str
    title: str
    organisation_id: str
    status: StudyStatus
    spec: dict[str, Any]
    token_budget: int
    min_hospitals: int
    rounds_planned: int
    rounds_completed: int
    approvals: int
    refusals: int
    decisions: list[DecisionOut]
    submitted_at: datetime
    start_deadline: datetime
    started_at: datetime | None
    finished_at: datetime | None
    outcome_reason: str | None
    model_sha256: str | None


class StudySummary(Out):
    id: str
    title: str
    organisation_id: str
    status: StudyStatus
    token_budget: int
    submitted_at: datetime
    start_deadline: datetime


class StudyPage(BaseModel):
    items: list[StudySummary]
    total: int
    next_offset: int | None


class HospitalStudy(BaseModel):
    """What a hospital sees of a study to decide on it: the request (who asks, from where, for
    what). `researcher_id` is there because a patient's consent may name the researchers allowed
    to use the data (DUO US); the hospital checks it exactly as training will
    (`exchange.study.spec.consent_request`)."""

    id: str
    organisation_id: str
    organisation_region: str
    researcher_id: str | None = None
    status: StudyStatus
    spec: dict[str, Any]
    min_hospitals: int
    rounds_planned: int
    submitted_at: datetime
    start_deadline: datetime
    my_decision: DecisionKind | None


class HospitalStudyPage(BaseModel):
    items: list[HospitalStudy]
    total: int
    next_offset: int | None


class RoundOut(Out):
    round: int
    metrics: dict[str, Any]
    finished_at: datetime


class ContributionOut(BaseModel):
    hospital_id: str
    rounds: int
    records_used: int
    epsilon_spent: float | None = Field(description="the hospital's spend on this study, per patient")


class StudyResults(BaseModel):
    study_id: str
    status: StudyStatus
    model_sha256: str | None
    rounds: list[RoundOut]
    failed_rounds: list[RoundOut] = []  # reported with round_failed: receipts logged, not completed
    contributions: list[ContributionOut]


# ---------------------------------------------------------------- registry responses
class OrganisationOut(Out):
    id: str
    name: str
    region: str
    created_at: datetime


class ResearcherOut(Out):
    id: str
    organisation_id: str
    name: str
    created_at: datetime


class ApiKeyOut(Out):
    prefix: str
    role: Role
    organisation_id: str | None
    researcher_id: str | None
    label: str
    created_at: datetime
    revoked_at: datetime | None


class ApiKeyIssued(ApiKeyOut):
    key: Annotated[str, Field(description="the secret; shown once, never stored")]


class HospitalOut(Out):
    id: str
    organisation_id: str
    name: str
    signing_public_key: str
    signing_key_id: str
    flower_public_key: str
    created_at: datetime
    last_contact_at: datetime | None = Field(
        default=None, description="the hospital's last signed request (null: never contacted)")


class EntryAccepted(BaseModel):
    index: int
    kind: str


# ---------------------------------------------------------------- audit and ledger
class AuditEntryOut(BaseModel):
    index: int
    entry: dict[str, Any]


class AuditEntryPage(BaseModel):
    items: list[AuditEntryOut]
    size: int
    next_start: int | None


class CheckpointOut(BaseModel):
    size: int
    root_hash: str
    checkpoint: Annotated[str, Field(description="C2SP tlog-checkpoint signed note")]


class InclusionProofOut(BaseModel):
    index: int
    size: int
    leaf_hash: str
    proof: list[str]


class ConsistencyProofOut(BaseModel):
    old_size: int
    new_size: int
    proof: list[str]


class BalancesOut(BaseModel):
    """The ledger as the caller may see it. The system totals (minted, escrow, unclaimed) are
    for the operator and the auditor; a researcher or a hospital gets its own account only."""

    minted: int | None = None
    escrow: int | None = None
    # in reward claim pools, not yet claimed (minted = escrow + unclaimed + balances)
    unclaimed: int | None = None
    balances: dict[str, int]


class HealthOut(BaseModel):
    status: Literal["ok"]
    database: Literal["ok"]
    log_size: int


class ProblemDetail(BaseModel):
    """RFC 9457 problem details (media type application/problem+json)."""

    type: str
    title: str
    status: int
    detail: str
    instance: str | None = None
    errors: list[FieldError] = []


class FieldError(BaseModel):
    field: str
    reason: str


ProblemDetail.model_rebuild()
