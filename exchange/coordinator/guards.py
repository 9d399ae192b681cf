"""Who may call what: Litestar guards, one per set of roles, instead of a role check written
at the top of each handler.

A guard runs before the handler's parameters and body are read: it authenticates the caller
(`exchange.coordinator.auth.authenticate`, which caches the principal on the request, so the
handler's `principal` dependency costs nothing more) and refuses a role the endpoint is not for
with a 403 problem naming the roles it is for.

The route decorators here (`get`, `post`, `delete`) are Litestar's, except that they hand each
guard the route handler itself: Litestar's own `authorize_connection` gives every guard a
shallow copy of the handler (so that a guard may change it), and copying a handler's dozens of
slots was the largest cost the guards added to a GET (docs/benchmarks/api.md). The guards here
only read the connection, so they need no copy. Every guarded controller uses these.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import litestar
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
        principal = await authenticate(request, connection.app.state.registry)
        allow(principal, *allowed)

    guard.__name__ = "roles_" + "_".join(role.value for role in allowed)
    return guard


OPERATOR = roles(Role.OPERATOR)
OPERATOR_OR_AUDITOR = roles(Role.OPERATOR, Role.AUDITOR)
RESEARCHER = roles(Role.RESEARCHER)
RESEARCHER_OPERATOR_AUDITOR = roles(Role.RESEARCHER, Role.OPERATOR, Role.AUDITOR)
RESEARCHER_OR_OPERATOR = roles(Role.RESEARCHER, Role.OPERATOR)
HOSPITAL = roles(Role.HOSPITAL)


class _GuardsWithoutCopy:
    """Runs the handler's guards, in order, with the handler itself (see the module doc)."""

    __slots__ = ()

    async def authorize_connection(self, connection: ASGIConnection[Any, Any, Any, Any]) -> None:
        handler = cast(BaseRouteHandler, self)
        for guard in handler.resolve_guards():
            await guard(connection, handler)  # type: ignore[misc]


class get(_GuardsWithoutCopy, litestar.get):  # noqa: N801 (Litestar's decorator names)
    __slots__ = ()


class post(_GuardsWithoutCopy, litestar.post):  # noqa: N801
    __slots__ = ()


class delete(_GuardsWithoutCopy, litestar.delete):  # noqa: N801
    __slots__ = ()
