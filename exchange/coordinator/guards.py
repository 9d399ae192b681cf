"""Who may call what: Litestar guards, one per set of roles, instead of a role check written
at the top of each handler.

A guard runs before the handler's parameters and body are read: it authenticates the caller
(`exchange.coordinator.auth.authenticate`, which caches the principal on the request, so the
handler's `principal` dependency costs nothing more) and refuses a role the endpoint is not for
with a 403 problem naming the roles it is for.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.handlers.base import BaseRouteHandler

from exchange.coordinator.auth import allow, authenticate
from exchange.coordinator.models import Role

Guard = Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], Awaitable[None]]


def roles(*allowed: Role) -> Guard:
    """A guard that lets through only callers with one of `allowed` roles."""

    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _handler: BaseRouteHandler) -> None:
        request = cast(Request[Any, Any, Any], connection)
        principal = await authenticate(request, connection.app.state.coordinator)
        allow(principal, *allowed)

    guard.__name__ = "roles_" + "_".join(role.value for role in allowed)
    return guard


OPERATOR = roles(Role.OPERATOR)
OPERATOR_OR_AUDITOR = roles(Role.OPERATOR, Role.AUDITOR)
RESEARCHER = roles(Role.RESEARCHER)
RESEARCHER_OPERATOR_AUDITOR = roles(Role.RESEARCHER, Role.OPERATOR, Role.AUDITOR)
RESEARCHER_OR_OPERATOR = roles(Role.RESEARCHER, Role.OPERATOR)
HOSPITAL = roles(Role.HOSPITAL)
