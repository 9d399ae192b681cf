"""Who is calling: API keys (researchers, operators, auditors) and signed requests (hospitals).

- API keys: `Authorization: Bearer hx_<prefix>_<secret>` or `X-API-Key: hx_<prefix>_<secret>`.
  The prefix finds the row; the SHA-256 of the whole token is compared in constant time.
- Hospitals: RFC 9421 signatures under `exchange.http_signing`'s profile, by the hospital's
  registered key, within the created-time window, with a nonce never seen before (the
  `request_nonces` table; a second use is a replay and is refused).

Failures are 401 problem details that say what is wrong, never which part of a secret was.
"""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from litestar import Request

from audit.signing import b64decode
from exchange.coordinator import problems
from exchange.coordinator.models import Role
from exchange.coordinator.registry import Principal, Registry
from exchange.http_signing import RequestSignatureError, verify_request

#: where `_hospital` keeps the registration it verified the signature with (request scope state)
HOSPITAL_ROW = "hospital_row"
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="exchange", Signature realm="exchange"'}


def unauthorized(detail: str) -> problems.ProblemError:
    return problems.ProblemError(401, detail, kind="unauthorized", headers=CHALLENGE)


def _api_key(request: Request[Any, Any, Any]) -> str | None:
    header = request.headers.get("authorization")
    if header:
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise unauthorized("Authorization header must be 'Bearer <api key>'")
        return token.strip()
    alternative = request.headers.get("x-api-key")
    return alternative.strip() if alternative is not None else None


async def authenticate(request: Request[Any, Any, Any], registry: Registry) -> Principal:
    """The Litestar dependency behind every protected route (cached on the request).

    It takes the `registry` dependency although the app state has it too: Litestar resolves
    independent dependencies of one handler concurrently in an anyio task group (a task per
    dependency, on every request), dependent ones one after the other, directly.
    """
    cached = request.scope.get("state", {}).get("principal")
    if isinstance(cached, Principal):
        return cached
    if "signature-input" in request.headers or "signature" in request.headers:
        principal = await _hospital(request, registry)
    else:
        token = _api_key(request)
        if token is None:
            raise unauthorized("authentication required: an API key (Authorization: Bearer ... "
                               "or X-API-Key) or a signed request")
        found = registry.cached_principal(token) or \
            await anyio.to_thread.run_sync(registry.authenticate_api_key, token)
        if found is None:
            raise unauthorized("API key unknown or revoked")
        principal = found
    request.scope.setdefault("state", {})["principal"] = principal
    return principal


async def _hospital(request: Request[Any, Any, Any], registry: Registry) -> Principal:
    body = await request.body()
    hospitals: dict[str, Any] = {}

    def public_key_for(kid: str) -> bytes | None:
        hospital = registry.hospital_by_key(kid)
        if hospital is None:
            return None
        hospitals[kid] = hospital
        return b64decode(hospital.signing_public_key)

    def verify() -> Any:
        return verify_request(request.method, str(request.url), request.headers.multi_items(), body,
                              public_key_for, window=registry.replay_window)

    try:
        verified = await anyio.to_thread.run_sync(verify)
    except RequestSignatureError as exc:
        raise unauthorized(str(exc)) from exc
    fresh = await registry.use_nonce_async(verified.key_id, verified.nonce)
    if not fresh:
        raise unauthorized("replayed request: this signature nonce was already used")
    hospital = hospitals[verified.key_id]
    # the registration the signature verified with, for the route's `hospital` dependency
    request.scope.setdefault("state", {})[HOSPITAL_ROW] = hospital
    return Principal(role=Role.HOSPITAL, ref=f"hospital:{hospital.id}",
                     organisation_id=hospital.organisation_id, hospital_id=hospital.id)


def authenticated_hospital(request: Request[Any, Any, Any], principal: Principal) -> Any:
    """The calling hospital's registration as read to verify this request's signature (None
    when the request was not signed by a hospital). Why: a hospital route used to read the
    registration again on a worker thread for its `hospital` dependency, a second database
    read and thread hand-over on every signed request (docs/benchmarks/scale.md, "The
    coordinator's CPU per round")."""
    row = request.scope.get("state", {}).get(HOSPITAL_ROW)
    if row is None or principal.hospital_id is None or row.id != principal.hospital_id:
        return None
    return row


def allow(principal: Principal, *roles: Role) -> None:
    if principal.role not in roles:
        allowed = ", ".join(r.value for r in roles)
        raise problems.forbidden(f"this endpoint is for: {allowed} (you are {principal.role.value})")
