"""HTTP routes (Litestar controllers). Thin: authenticate, authorize (guards), call the
registry (`exchange.coordinator.registry`) or the study lifecycle (`exchange.study.lifecycle`).

Sync handlers run in Litestar's thread pool (`sync_to_thread=True`, what `read` and `write`
declare with the problem responses every route shares): the database work is blocking
SQLAlchemy, and the event loop stays free for other requests.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable
from typing import Annotated, Any, Literal, TypeVar

from litestar import Controller, Request, Response
from litestar.concurrency import sync_to_thread
from litestar.datastructures import State
from litestar.di import Provide
from litestar.exceptions import ValidationException
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.response import Stream
from pydantic import BaseModel

from audit.entry import Entry, MalformedEntryError
from audit.signing import b64encode
from exchange.coordinator import guards, problems, witness_routes
from exchange.coordinator.auth import authenticate, authenticated_hospital
from exchange.coordinator.catalogs import publish as publish_catalog
from exchange.coordinator.claims import RewardClaim, claim_reward
from exchange.coordinator.guards import delete, get, post
from exchange.coordinator.journal import Journal
from exchange.coordinator.models import Hospital, Role
from exchange.coordinator.problems import PROBLEM_JSON
from exchange.coordinator.registry import Principal, Registry
from exchange.coordinator.schemas import (
    ApiKeyCreate,
    ApiKeyIssued,
    ApiKeyOut,
    AuditEntryOut,
    AuditEntryPage,
    BalancesOut,
    CancelRequest,
    ConsistencyProofOut,
    EntryAccepted,
    HealthOut,
    HospitalCreate,
    HospitalOut,
    HospitalStudy,
    HospitalStudyPage,
    InclusionProofOut,
    MintRequest,
    OrganisationCreate,
    OrganisationOut,
    ProblemDetail,
    ResearcherCreate,
    ResearcherOut,
    SignedEntry,
    StudyCreate,
    StudyOut,
    StudyPage,
    StudyResults,
    StudySummary,
)
from exchange.study.feasibility import CATALOG_KIND
from exchange.study.lifecycle import StudyLifecycle
from exchange.study.models import StudyStatus
from exchange.study.reports import study_report

API_KEY_AUTH: list[dict[str, list[str]]] = [{"BearerApiKey": []}, {"HeaderApiKey": []}]
SIGNED_AUTH: list[dict[str, list[str]]] = [{"HttpMessageSignature": []}]
ANY_AUTH = API_KEY_AUTH + SIGNED_AUTH
Offset = Annotated[int, Parameter(ge=0, le=2**31 - 1, description="items to skip")]
Limit = Annotated[int, Parameter(ge=1, le=200, description="page size (max 200)")]
MAX_LIMIT = 200


def _problem(description: str) -> ResponseSpec:
    return ResponseSpec(data_container=ProblemDetail, media_type=PROBLEM_JSON, description=description,
                        generate_examples=False)


PROBLEMS: dict[int, ResponseSpec] = {
    400: _problem("Malformed request (RFC 9457 problem details)"),
    401: _problem("Not authenticated: missing, unknown or revoked API key; bad, stale or replayed "
                  "signature"),
    403: _problem("Authenticated, but this role may not use this endpoint"),
    404: _problem("Not found (or not visible to the caller's organisation)"),
    409: _problem("Conflicts with the current state (e.g. already decided, already cancelled)"),
    413: _problem("Request body too large"),
    422: _problem("Refused: every problem listed in `errors` with its field"),
    429: _problem("Rate limit exceeded"),
}


#: A route that reads (GET) or writes (POST, DELETE): blocking database work on a worker
#: thread, answering the problem responses every route shares.
read = functools.partial(get, sync_to_thread=True, responses=PROBLEMS)
write = functools.partial(post, sync_to_thread=True, responses=PROBLEMS)
remove = functools.partial(delete, sync_to_thread=True, responses=PROBLEMS)
Out = TypeVar("Out", bound=BaseModel)


def _all(model: type[Out], rows: Iterable[Any]) -> list[Out]:
    return [model.model_validate(r) for r in rows]


def _lifecycle(state: State) -> StudyLifecycle:
    lifecycle: StudyLifecycle = state.lifecycle
    return lifecycle


# The registry and the journal are the lifecycle's own (the app's state holds the same objects).
# Taken from it, the services are a chain (lifecycle -> registry -> principal), which Litestar
# resolves one after the other, directly; independent dependencies of one handler it resolves
# concurrently in an anyio task group, a task per dependency on every request, which was a
# tenth of a GET's CPU time (docs/benchmarks/api.md).
def _registry(lifecycle: StudyLifecycle) -> Registry:
    return lifecycle.registry


def _journal(lifecycle: StudyLifecycle) -> Journal:
    return lifecycle.journal


def _next(offset: int, count: int, total: int) -> int | None:
    return offset + count if offset + count < total else None


def _entry(body: SignedEntry) -> Entry:
    try:
        return Entry.from_json(body.model_dump())
    except MalformedEntryError as exc:
        raise problems.unprocessable([{"field": "body", "reason": str(exc)}]) from exc


async def _hospital(request: Request[Any, Any, Any], principal: Principal, registry: Registry) -> Hospital:
    """The calling hospital's registration (HospitalController's guard: a hospital): the row its
    signature was just verified with (`auth.authenticated_hospital`), without another read."""
    assert principal.hospital_id is not None
    row: Hospital | None = authenticated_hospital(request, principal)
    if row is not None:
        return row
    return await sync_to_thread(registry.get_hospital, principal.hospital_id)


#: The coordinator's parts from the app's state, for the API's and the console's handlers.
SERVICES = {"lifecycle": Provide(_lifecycle, sync_to_thread=False),
            "registry": Provide(_registry, sync_to_thread=False),
            "journal": Provide(_journal, sync_to_thread=False)}
DEPENDENCIES = {"principal": Provide(authenticate), **SERVICES}


class RegistryController(Controller):
    """Operator tasks: organisations, researchers, API keys, hospitals, minting."""

    path = "/v1"
    tags = ["operator"]  # noqa: RUF012
    dependencies = DEPENDENCIES
    security = API_KEY_AUTH

    @write("/organisations", guards=[guards.OPERATOR], summary="Register an organisation")
    def create_organisation(self, registry: Registry, data: OrganisationCreate) -> OrganisationOut:
        return OrganisationOut.model_validate(registry.create_organisation(data))

    @read("/organisations", guards=[guards.OPERATOR_OR_AUDITOR], summary="List organisations")
    def list_organisations(self, registry: Registry, offset: Offset = 0,
                           limit: Limit = 50) -> list[OrganisationOut]:
        return _all(OrganisationOut, registry.list_organisations(offset, limit)[0])

    @write("/organisations/{organisation_id:str}/researchers", guards=[guards.OPERATOR],
           summary="Register a researcher")
    def create_researcher(self, registry: Registry, organisation_id: str,
                          data: ResearcherCreate) -> ResearcherOut:
        return ResearcherOut.model_validate(registry.create_researcher(organisation_id, data))

    @write("/api-keys", guards=[guards.OPERATOR], opt={"rate_limited": True},
           summary="Issue an API key (the secret is shown once)")
    def issue_api_key(self, registry: Registry, data: ApiKeyCreate) -> ApiKeyIssued:
        key, token = registry.issue_api_key(data)
        return ApiKeyIssued.model_validate({**ApiKeyOut.model_validate(key).model_dump(), "key": token})

    @read("/api-keys", guards=[guards.OPERATOR], summary="List API keys (never their secrets)")
    def list_api_keys(self, registry: Registry, offset: Offset = 0,
                      limit: Limit = 50) -> list[ApiKeyOut]:
        return _all(ApiKeyOut, registry.list_api_keys(offset, limit)[0])

    @remove("/api-keys/{prefix:str}", guards=[guards.OPERATOR], status_code=200,
            summary="Revoke an API key")
    def revoke_api_key(self, registry: Registry, prefix: str) -> ApiKeyOut:
        return ApiKeyOut.model_validate(registry.revoke_api_key(prefix))

    @read("/catalogs", guards=[guards.RESEARCHER_OPERATOR_AUDITOR],
          summary="Every hospital's newest published catalog (what a submission is checked against)")
    def catalogs(self, lifecycle: StudyLifecycle) -> dict[str, Any]:
        catalogs, registered = lifecycle.catalogs.catalogs()
        return {"hospitals": [{"hospital_id": h, "catalog": catalogs[h].model_dump(mode="json")
                               if h in catalogs else None} for h in registered]}

    @write("/hospitals", guards=[guards.OPERATOR], summary="Register a hospital and its keys")
    def register_hospital(self, registry: Registry, data: HospitalCreate) -> HospitalOut:
        return HospitalOut.model_validate(registry.register_hospital(data))

    @read("/hospitals", guards=[guards.OPERATOR_OR_AUDITOR], summary="List hospitals")
    def list_hospitals(self, registry: Registry, offset: Offset = 0,
                       limit: Limit = 50) -> list[HospitalOut]:
        return _all(HospitalOut, registry.list_hospitals(offset, limit)[0])

    @write("/ledger/mint", guards=[guards.OPERATOR], summary="Mint tokens into an account")
    def mint(self, registry: Registry, data: MintRequest) -> EntryAccepted:
        return EntryAccepted(index=registry.mint(data.account, data.amount), kind="token.mint")


def _study_problem_handler(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """Validation failed for POST /v1/studies: add the budget-vs-balance check, so that the
    answer lists every problem, also when other fields are wrong."""
    assert isinstance(exc, ValidationException)
    response = problems.handle_validation(request, exc)
    principal = request.scope.get("state", {}).get("principal")
    body = getattr(request, "_connection_state", None)
    raw = getattr(body, "body", None) if body is not None else None
    if not isinstance(principal, Principal) or principal.role != Role.RESEARCHER \
            or not isinstance(raw, bytes):
        return response
    try:
        budget = json.loads(raw).get("token_budget")
    except (ValueError, AttributeError):
        return response
    if isinstance(budget, int) and not isinstance(budget, bool) and budget > 0:
        problem = request.app.state.lifecycle.budget_problem(principal, budget)
        if problem and isinstance(response.content, dict):
            response.content.setdefault("errors", []).append({"field": "token_budget", "reason": problem})
            response.content["detail"] = f"{len(response.content['errors'])} problem(s) with the request"
    return response


class StudyController(Controller):
    """Researchers: submit studies, follow them, fetch results."""

    path = "/v1/studies"
    tags = ["studies"]  # noqa: RUF012
    dependencies = DEPENDENCIES
    security = API_KEY_AUTH

    @post("/", guards=[guards.RESEARCHER], responses=PROBLEMS, status_code=201,
          summary="Submit a study (escrows its budget)", opt={"rate_limited": True},
          exception_handlers={ValidationException: _study_problem_handler})
    async def submit(self, principal: Principal, lifecycle: StudyLifecycle,
                     data: StudyCreate) -> StudyOut:
        # async: the write is awaited on the group commit, so a submission in flight holds no
        # worker thread (see exchange.coordinator.group_commit).
        study = await lifecycle.submit_study_async(principal, data)
        return StudyOut.model_validate(lifecycle.submitted_view(study))

    @read("/", guards=[guards.RESEARCHER_OPERATOR_AUDITOR],
          summary="List studies (researchers: their organisation's only)")
    def list_studies(self, principal: Principal, lifecycle: StudyLifecycle, offset: Offset = 0,
                     limit: Limit = 50, status: StudyStatus | None = None) -> StudyPage:
        rows, total = lifecycle.list_studies(principal, status, offset, limit)
        return StudyPage(items=_all(StudySummary, rows), total=total,
                         next_offset=_next(offset, len(rows), total))

    @get("/{study_id:str}", guards=[guards.RESEARCHER_OPERATOR_AUDITOR], responses=PROBLEMS,
         summary="A study, its decisions and progress")
    async def get_study(self, principal: Principal, lifecycle: StudyLifecycle,
                        study_id: str) -> StudyOut:
        return StudyOut.model_validate(
            await lifecycle.read_async(lifecycle.get_study, principal, study_id))

    @write("/{study_id:str}/cancel", guards=[guards.RESEARCHER_OR_OPERATOR], status_code=200,
           summary="Cancel a study (refunds its escrow)")
    def cancel(self, principal: Principal, lifecycle: StudyLifecycle, study_id: str,
               data: CancelRequest) -> StudyOut:
        return StudyOut.model_validate(lifecycle.cancel_study(principal, study_id, data.reason))

    @read("/{study_id:str}/results", guards=[guards.RESEARCHER],
          summary="Per-round metrics, per-hospital records used and epsilon spent")
    def results(self, principal: Principal, lifecycle: StudyLifecycle, study_id: str) -> StudyResults:
        return StudyResults.model_validate(lifecycle.results(principal, study_id))

    @read("/{study_id:str}/report", guards=[guards.RESEARCHER_OPERATOR_AUDITOR],
          summary="The privacy report: per hospital epsilon and delta spent, steps, accountant, "
                  "count-free exclusions, metrics per round (exchange/study/reports.py)")
    def report(self, principal: Principal, journal: Journal, study_id: str) -> dict[str, Any]:
        return study_report(journal, principal, study_id)

    @read("/{study_id:str}/model", guards=[guards.RESEARCHER], media_type="application/octet-stream",
          summary="The trained model (safetensors)")
    def model(self, principal: Principal, lifecycle: StudyLifecycle, study_id: str) -> Response[bytes]:
        data, digest = lifecycle.model(principal, study_id)
        return Response(content=data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{study_id}.safetensors"',
                                 "Digest-SHA256": digest})


class HospitalController(Controller):
    """Hospitals (signed requests): studies to decide on, decisions, receipts, key rotation.
    Every route gets the calling hospital's registration as its `hospital` dependency."""

    path = "/v1/hospital"
    tags = ["hospitals"]  # noqa: RUF012
    dependencies = {**DEPENDENCIES, "hospital": Provide(_hospital)}  # noqa: RUF012
    security = SIGNED_AUTH
    guards = [guards.HOSPITAL]  # noqa: RUF012

    @read("/me", summary="The calling hospital's registration")
    def me(self, hospital: Hospital) -> HospitalOut:
        return HospitalOut.model_validate(hospital)

    @read("/studies", summary="Studies to decide on (pending) or open or all")
    def studies(self, hospital: Hospital, lifecycle: StudyLifecycle,
                status: Literal["pending", "open", "all"] = "pending", offset: Offset = 0,
                limit: Limit = 50) -> HospitalStudyPage:
        items, total = lifecycle.hospital_studies(hospital, status, offset, limit)
        return HospitalStudyPage(items=_all(HospitalStudy, items), total=total,
                                 next_offset=_next(offset, len(items), total))

    @write("/studies/{study_id:str}/decision", status_code=201,
           summary="Approve or refuse a study (a signed study.decision entry)")
    def decide(self, hospital: Hospital, lifecycle: StudyLifecycle, study_id: str,
               data: SignedEntry) -> EntryAccepted:
        return EntryAccepted(index=lifecycle.decide(hospital, study_id, _entry(data)),
                             kind="study.decision")

    @write("/catalog", status_code=201,
           summary="Publish this hospital's catalog (a signed hospital.catalog entry: columns with "
                   "their data categories and types, the site policy's public limits; no counts)")
    def catalog(self, hospital: Hospital, journal: Journal, registry: Registry,
                data: SignedEntry) -> EntryAccepted:
        index = publish_catalog(journal, registry, hospital, _entry(data))
        journal.on_change(CATALOG_KIND)
        return EntryAccepted(index=index, kind=CATALOG_KIND)

    @write("/rewards/claims", status_code=201,
           summary="Claim one leaf of a receipt's reward commitment (for a patient), with its proof")
    def claim(self, hospital: Hospital, journal: Journal, data: RewardClaim) -> EntryAccepted:
        return EntryAccepted(index=claim_reward(journal, hospital.id, data), kind="reward.claim")

    # async: the long poll waits on the event loop, not on one of the few worker threads
    @get("/witness/checkpoint", media_type=witness_routes.WITNESS_REQUEST_TYPE, responses=PROBLEMS,
         summary="The newest checkpoint as a tlog-witness add-checkpoint request (long poll)")
    async def witness_checkpoint(self, hospital: Hospital, state: State,
                                 old_size: Annotated[int, Parameter(ge=0, le=2**53)] = 0,
                                 wait_s: Annotated[float, Parameter(ge=0, le=25)] = 0.0) -> Response[bytes]:
        return await witness_routes.witness_offer(state, hospital.id, old_size, wait_s)

    @write("/witness/cosignature", status_code=201,
           summary="The hospital witness's cosignature on a checkpoint (C2SP cosignature/v1)")
    def witness_cosignature(self, hospital: Hospital, state: State,
                            data: witness_routes.CosignatureIn) -> witness_routes.CosignatureAccepted:
        return witness_routes.add_cosignature(state, hospital.id, data)

    @write("/entries", status_code=201,
           summary="Submit an entry the hospital signed: study.decision, round.receipt or key.rotate")
    def entries(self, hospital: Hospital, registry: Registry, lifecycle: StudyLifecycle,
                data: SignedEntry) -> EntryAccepted:
        entry = _entry(data)
        if entry.kind == "study.decision":
            index = lifecycle.decide(hospital, str(entry.payload.get("study_id")), entry)
        elif entry.kind == "round.receipt":
            index = lifecycle.record_receipt(hospital, entry)
        elif entry.kind == "key.rotate":
            index = registry.rotate_hospital_key(hospital, entry)
        else:
            raise problems.unprocessable([{"field": "kind", "reason": "must be study.decision, "
                                           "round.receipt or key.rotate"}])
        return EntryAccepted(index=index, kind=entry.kind)


class AuditController(Controller):
    """The verifiable log and the ledger, for every authenticated party (no personal data)."""

    path = "/v1"
    tags = ["audit"]  # noqa: RUF012
    dependencies = DEPENDENCIES
    security = ANY_AUTH

    @read("/audit/entries", summary="Log entries, paged by index")
    def entries(self, principal: Principal, state: State, start: Offset = 0,
                limit: Limit = 100) -> AuditEntryPage:
        log = state.audit_log
        size = log.size()
        stop = min(size, start + limit)
        items = [AuditEntryOut(index=start + i, entry=e.to_json())
                 for i, e in enumerate(log.entries(start, stop))] if start < size else []
        return AuditEntryPage(items=items, size=size, next_start=stop if stop < size else None)

    @read("/audit/checkpoint",
          summary="The latest cosigned checkpoint (Accept: text/plain for the signed note itself)")
    def checkpoint(self, principal: Principal, state: State,
                   request: Request[Any, Any, Any]) -> Response[Any]:
        return witness_routes.served_checkpoint(state, request)

    @read("/audit/proofs/inclusion", summary="RFC 9162 inclusion proof")
    def inclusion(self, principal: Principal, state: State,
                  index: Annotated[int, Parameter(ge=0, le=2**53)],
                  size: Annotated[int, Parameter(ge=1, le=2**53)]) -> InclusionProofOut:
        # One query (AuditLog.inclusion); the log's size is looked up only on a refusal, for
        # its message, or for a size beyond the largest one seen.
        log = state.audit_log
        try:
            if index >= size:
                raise ValueError("index")
            leaf, proof = log.inclusion(index, size)
        except ValueError as exc:
            current = log.size()
            field = "size" if size > current else "index"
            raise problems.unprocessable([{"field": field,
                                           "reason": f"need index < size <= {current}"}]) from exc
        return InclusionProofOut(index=index, size=size, leaf_hash=b64encode(leaf),
                                 proof=[b64encode(p) for p in proof])

    @read("/audit/proofs/consistency", summary="RFC 9162 consistency proof")
    def consistency(self, principal: Principal, state: State,
                    old_size: Annotated[int, Parameter(ge=1, le=2**53)],
                    new_size: Annotated[int, Parameter(ge=1, le=2**53)]) -> ConsistencyProofOut:
        log = state.audit_log
        try:
            proof = log.consistency(old_size, new_size)
        except ValueError as exc:
            raise problems.unprocessable([{"field": "new_size", "reason":
                                           f"need old_size <= new_size <= {log.size()}"}]) from exc
        return ConsistencyProofOut(old_size=old_size, new_size=new_size, proof=[b64encode(p) for p in proof])

    @read("/audit/export", media_type="application/x-ndjson",
         summary="Entries as JSON lines (RFC 8785 envelopes, line i = entry start+i), paged")
    def export(self, principal: Principal, state: State, start: witness_routes.ExportStart = 0,
               limit: witness_routes.ExportLimit = None) -> Stream:
        return witness_routes.export_page(state, start, limit)

    @get("/audit/trust", sync_to_thread=False, responses=PROBLEMS,
         summary="The roots to pin: operator key, log key, origin, witnesses (audit trust.json)")
    def trust(self, principal: Principal, state: State) -> dict[str, Any]:
        trust: dict[str, Any] = witness_routes.checkpointing(state).trust().to_json()
        return trust

    @read("/ledger/balances", summary="Token balances (researchers and hospitals: their own account)")
    def balances(self, principal: Principal, registry: Registry) -> BalancesOut:
        if principal.role in (Role.OPERATOR, Role.AUDITOR):
            return BalancesOut.model_validate(registry.balances())
        own = (f"hospital:{principal.hospital_id}" if principal.role == Role.HOSPITAL
               else f"org:{principal.organisation_id}")
        own_balance = registry.balances([own])["balances"].get(own, 0)
        return BalancesOut(balances={own: own_balance})


@read("/health", tags=["service"], summary="Liveness and database check")
def health(state: State) -> HealthOut:
    return HealthOut(status="ok", database="ok", log_size=state.audit_log.size())


def example_study() -> dict[str, Any]:
    return {"title": "Breast cancer risk model", "purpose": "DUO:0000007", "disease": "C50",
            "commercial": False, "ethics_approval": True, "data_categories": ["labs", "diagnoses"],
            "columns": {"labs": ["mean_radius", "mean_texture"]}, "template": "logistic_regression",
            "task": "binary", "label": "label", "epsilon": 3.0, "delta": 1e-5, "rounds": 3,
            "min_hospitals": 2, "token_budget": 10000}

