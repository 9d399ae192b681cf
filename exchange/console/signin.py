"""Sign-in and sign-out: an API key in a form, a session cookie back."""

from __future__ import annotations

from typing import Any

import anyio.to_thread
from litestar import Controller, Request, Response, get, post
from litestar.response import Redirect, Template

from exchange.console.session import COOKIE, SessionStore, SignInRequired, is_loopback
from exchange.coordinator.models import Role
from exchange.coordinator.registry import Principal, Registry

#: Why the sign-in page was reached from a page (`?ended=`): the session's limits (session.py).
ENDED = {"idle": "Your session ended after a period without activity. Sign in again to continue.",
         "expired": "Your session reached its maximum length. Sign in again to continue."}
HOME = {Role.RESEARCHER: "/console/studies", Role.OPERATOR: "/console/operator", Role.AUDITOR: "/console/log"}


def _safe_next(target: str | None) -> str | None:
    """Only a console path (no open redirect to another site)."""
    if target and target.startswith("/console/") and not target.startswith("//") and "\\" not in target:
        return target
    return None


class SignInController(Controller):
    path = "/"

    @get("/")
    async def home(self, request: Request[Any, Any, Any], principal: Principal) -> Redirect:
        return Redirect(HOME.get(principal.role, "/console/log"))

    @get("/sign-in")
    async def sign_in_form(self, next: str | None = None, ended: str | None = None) -> Template:
        return Template(
            "sign_in.html",
            context={"next": _safe_next(next) or "", "error": None, "principal": None,
                     "ended": ENDED.get(ended or "")},
        )

    @post("/sign-in", status_code=303)
    async def sign_in(
        self, request: Request[Any, Any, Any], registry: Registry, sessions: SessionStore
    ) -> Response[Any]:
        form = await request.form()
        token = str(form.get("api_key") or "").strip()
        target = _safe_next(str(form.get("next") or ""))
        authenticate = registry.authenticate_api_key
        principal = await anyio.to_thread.run_sync(authenticate, token) if token else None
        if principal is None or principal.role not in HOME:
            error = (
                "api_key: enter your API key" if not token else "api_key: this API key is unknown or revoked"
            )
            return Template(
                "sign_in.html",
                status_code=401,
                context={"next": target or "", "error": error, "principal": None, "ended": None},
            )
        response: Response[Any] = Redirect(target or HOME[principal.role], status_code=303)
        response.set_cookie(
            COOKIE,
            sessions.create(token),
            path="/console",
            httponly=True,
            secure=not is_loopback(request),
            samesite="strict",
            max_age=int(sessions.max_age_seconds),
        )
        return response

    @post("/sign-out", status_code=303)
    async def sign_out(self, request: Request[Any, Any, Any], sessions: SessionStore) -> Response[Any]:
        sessions.drop(request.cookies.get(COOKIE))
        response: Response[Any] = Redirect("/console/sign-in", status_code=303)
        response.delete_cookie(COOKIE, path="/console")
        return response


__all__ = ["SignInController", "SignInRequired"]
