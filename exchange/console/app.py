"""The console's router: its pages, static files, CSRF protection and error pages.

CSRF: Litestar's double-submit `CSRFMiddleware` on this router only (the JSON API takes no
cookies, so it needs none); every form carries `csrf_input`, and fetch() calls send the token
in the `x-csrftoken` header. A failed check is a 403 page and changes nothing.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any
from urllib.parse import quote

from litestar import Request, Response, Router
from litestar.config.csrf import CSRFConfig
from litestar.di import Provide
from litestar.exceptions import NotFoundException, PermissionDeniedException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.middleware.csrf import CSRFMiddleware
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.response import Redirect, Template
from litestar.static_files import create_static_files_router
from litestar.template.config import TemplateConfig

from exchange.console import log_pages, operate, research, signin
from exchange.console.session import COOKIE, IDLE_SECONDS, MAX_AGE_SECONDS, SessionStore, SignInRequired
from exchange.coordinator.controllers import SERVICES
from exchange.coordinator.problems import ProblemError
from exchange.coordinator.registry import Principal, Registry

HERE = Path(__file__).parent
PREFIX = "/console"


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(directory=HERE / "templates", engine=JinjaTemplateEngine)


def _principal_from_session(sessions: SessionStore) -> Any:
    async def principal(request: Request[Any, Any, Any], registry: Registry) -> Principal:
        """The signed-in caller: the session's API key, authenticated again on every request
        (revocation applies at once; the role is the key's)."""
        import anyio.to_thread

        token, ended = sessions.lookup(request.cookies.get(COOKIE))
        if token is None:
            raise SignInRequired(ended)
        found = registry.cached_principal(token) or await anyio.to_thread.run_sync(
            registry.authenticate_api_key, token
        )
        if found is None:
            sessions.drop(request.cookies.get(COOKIE))
            raise SignInRequired
        return found

    return principal


def _sign_in_redirect(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """To the sign-in page, back here afterwards; an ended session's cookie is cleared and the
    page says why (idle or expired)."""
    target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    reason = exc.reason if isinstance(exc, SignInRequired) else ""
    query = f"next={quote(target, safe='')}" + (f"&ended={reason}" if reason else "")
    response: Response[Any] = Redirect(f"{PREFIX}/sign-in?{query}")
    if request.cookies.get(COOKIE):
        response.delete_cookie(COOKIE, path=PREFIX)
    return response


def _error_page(
    request: Request[Any, Any, Any],
    status: int,
    title: str,
    detail: str,
    errors: list[dict[str, str]] | None = None,
) -> Response[Any]:
    return Template(
        "error.html",
        status_code=status,
        context={
            "status": status,
            "title": title,
            "detail": detail,
            "errors": errors or [],
            "principal": request.scope.get("state", {}).get("console_principal"),
        },
    )


def _problem_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    assert isinstance(exc, ProblemError)
    return _error_page(request, exc.status, exc.title, exc.detail, exc.errors)


def _csrf_page(request: Request[Any, Any, Any], _exc: Exception) -> Response[Any]:
    return _error_page(
        request,
        403,
        "Forbidden",
        "The form's security token did not match (CSRF check). Reload the page and "
        "try again; nothing was changed.",
    )


def _not_found_page(request: Request[Any, Any, Any], _exc: Exception) -> Response[Any]:
    return _error_page(request, 404, "Not Found", f"nothing at {request.url.path}")


def _bad_request_page(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    assert isinstance(exc, ValidationException)
    errors = [
        {"field": str(e.get("key") or e.get("source") or "request"), "reason": str(e.get("message"))}
        for e in (exc.extra if isinstance(exc.extra, list) else [])
    ]
    return _error_page(request, 400, "Bad Request", "the request's parameters are not valid", errors)


def console_router(idle_seconds: float = IDLE_SECONDS, max_age_seconds: float = MAX_AGE_SECONDS) -> Router:
    """All console routes under /console, with their own session store (sessions end after
    `idle_seconds` without a request, and `max_age_seconds` after sign-in) and CSRF secret."""
    sessions = SessionStore(idle_seconds, max_age_seconds)
    csrf = CSRFConfig(
        secret=secrets.token_hex(32),
        cookie_name="hx_csrf",
        cookie_path=PREFIX,
        cookie_samesite="strict",
        cookie_httponly=False,
        header_name="x-csrftoken",
    )
    static = create_static_files_router(
        path="/static",
        directories=[HERE / "static"],
        include_in_schema=False,
        send_as_attachment=False,
        opt={"exclude_from_csrf": True},
    )
    return Router(
        path=PREFIX,
        route_handlers=[
            signin.SignInController,
            research.ResearchController,
            operate.OperatorController,
            log_pages.LogController,
            static,
        ],
        dependencies={
            **SERVICES,
            "principal": Provide(_principal_from_session(sessions)),
            "sessions": Provide(lambda: sessions, sync_to_thread=False),
        },
        middleware=[DefineMiddleware(CSRFMiddleware, config=csrf)],
        exception_handlers={
            SignInRequired: _sign_in_redirect,
            ProblemError: _problem_page,
            PermissionDeniedException: _csrf_page,
            NotFoundException: _not_found_page,
            ValidationException: _bad_request_page,
        },
        include_in_schema=False,
    )
