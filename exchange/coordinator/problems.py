"""RFC 9457 problem details: every refusal the coordinator gives has this one shape.

`application/problem+json` with `type`, `title`, `status`, `detail`, `instance`, and for
validation failures `errors`: a list of {"field", "reason"}, one per problem found, so a
client can fix everything in one go. Exception handlers turn Litestar's own exceptions
(validation, 404, 405, 413, 429, ...) into the same shape.
"""

from __future__ import annotations

import secrets
from http import HTTPStatus
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from exchange.logging import get_logger

PROBLEM_JSON = "application/problem+json"
TYPE_BASE = "https://health-exchange.example/problems/"
_log = get_logger("exchange.problems")


class ProblemError(Exception):
    """A refusal with an HTTP status, a short title, a human detail and field errors."""

    def __init__(self, status: int, detail: str, *, title: str | None = None,
                 errors: list[dict[str, str]] | None = None, kind: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.title = title or HTTPStatus(status).phrase
        self.errors = errors or []
        self.kind = kind or self.title.lower().replace(" ", "-")
        self.headers = headers or {}


def not_found(what: str) -> ProblemError:
    return ProblemError(404, f"{what} not found", kind="not-found")


def forbidden(detail: str) -> ProblemError:
    return ProblemError(403, detail, kind="forbidden")


def conflict(detail: str, field: str | None = None) -> ProblemError:
    errors = [{"field": field, "reason": detail}] if field else None
    return ProblemError(409, detail, kind="conflict", errors=errors)


def unprocessable(errors: list[dict[str, str]], detail: str | None = None) -> ProblemError:
    return ProblemError(422, detail or f"{len(errors)} problem(s) with the request",
                        title="Request refused", kind="validation", errors=errors)


def problem_response(request: Request[Any, Any, Any], problem: ProblemError) -> Response[Any]:
    body: dict[str, Any] = {"type": TYPE_BASE + problem.kind, "title": problem.title,
                            "status": problem.status, "detail": problem.detail,
                            "instance": request.url.path}
    if problem.errors:
        body["errors"] = problem.errors
    return Response(content=body, status_code=problem.status, media_type=PROBLEM_JSON,
                    headers=problem.headers)


def _field_of(error: dict[str, Any]) -> str:
    key = error.get("key")
    if key:
        return str(key)
    source = error.get("source")
    return str(source) if source else "body"


def handle_problem(request: Request[Any, Any, Any], exc: ProblemError) -> Response[Any]:
    return problem_response(request, exc)


def handle_validation(request: Request[Any, Any, Any], exc: ValidationException) -> Response[Any]:
    errors: list[dict[str, str]] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict):
            errors.append({"field": _field_of(item), "reason": str(item.get("message", "invalid"))})
    if not errors:
        errors.append({"field": "body", "reason": str(exc.detail)})
    status = 422 if any(_field_of(e) != "body" for e in extra if isinstance(e, dict)) else 400
    detail = exc.detail if status == 400 else f"{len(errors)} problem(s) with the request"
    return problem_response(request, ProblemError(status, str(detail), title="Request refused"
                                                  if status == 422 else "Bad request",
                                                  kind="validation", errors=errors))


def handle_http(request: Request[Any, Any, Any], exc: HTTPException) -> Response[Any]:
    headers = dict(exc.headers or {})
    if exc.status_code == 400 and "json" in request.headers.get("content-type", ""):
        # Litestar's decoder error ("Input data was truncated", ...): say it is the body.
        reason = f"malformed JSON: {exc.detail}"
        return problem_response(request, ProblemError(400, reason, kind="malformed-json",
                                                      errors=[{"field": "body", "reason": reason}]))
    return problem_response(request, ProblemError(exc.status_code, str(exc.detail), headers=headers))


def handle_too_deep(request: Request[Any, Any, Any], exc: RecursionError) -> Response[Any]:
    """A body nested deeper than the JSON decoder recurses (it raises RecursionError, which
    would otherwise be a 500): refused as the body's problem. Logged as a warning, in case a
    RecursionError ever comes from somewhere else."""
    _log.warning("http.nested_too_deeply", method=request.method, path=request.url.path,
                 error=str(exc)[:200])
    reason = "JSON nested too deeply"
    return problem_response(request, ProblemError(400, reason, kind="malformed-json",
                                                  errors=[{"field": "body", "reason": reason}]))


def handle_unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """A failure nobody foresaw: no internals in the answer, the whole cause in the log.

    The answer carries an incident id, and the error log line the same id with the exception
    and its traceback, so an operator can find the cause of any 500 a caller reports."""
    incident = secrets.token_hex(8)
    _log.error("http.unhandled_exception", incident=incident, method=request.method,
               path=request.url.path, error=type(exc).__name__, exc_info=exc)
    return problem_response(request, ProblemError(500, f"internal error (incident {incident})",
                                                  kind="internal"))
