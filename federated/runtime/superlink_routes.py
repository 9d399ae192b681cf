"""The SuperLink's hot routes answered outside FastAPI's layers (issues 15 and 20: SuperLink CPU).

Part of the flwr-internals boundary (like `flwr_internals`, whose guards it uses: a layout check
that fails loudly on a flwr upgrade): it imports flwr's routers, dependencies and middleware.

Every Fleet and Runtime request of flwr 1.42 crosses two `BaseHTTPMiddleware` layers (the error
translator and the protobuf translation: a task group, memory streams and a Request object each),
FastAPI's routing and dependency injection (every sync dependency, the LinkState look-up and the
version check included, a thread-pool hop of its own) and the handler's own hop. A profile of the
SuperLink at ten hospitals put 40 % of its busy samples under those layers (docs/benchmarks/
flower.md, "The SuperLink's object routes"). `HotRoutes`, a pure-ASGI layer, answers the routes a
round is made of (`ROUTES`: a message's object pushes, pulls and receipt confirmations, the
SuperNodes' polls, reply pushes and heartbeats, the ServerApp's message pushes, reply pulls,
node lists and task heartbeats) with flwr's own route functions, dependencies resolved as FastAPI
resolves them, in one thread-pool hop. The route functions call flwr's handlers through their
module attributes (`fleet_handlers.pull_messages`, `app.state.runtime_handlers`), so a patch of a
handler or of the LinkState applies here as on flwr's full path.
"""

from __future__ import annotations

import importlib
import inspect
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from federated.runtime import flwr_internals
from federated.runtime.flwr_internals import _PATCHED_MARK, _SCOPED_MARK, _read_body, _replay, _require

#: path -> (API, the name of flwr's route function answering it in that API's router module)
ROUTES: dict[str, tuple[str, str]] = {
    "/v1/fleet/push-object": ("fleet", "fleet_push_object"),
    "/v1/fleet/pull-object": ("fleet", "fleet_pull_object"),
    "/v1/fleet/confirm-message-received": ("fleet", "fleet_confirm_message_received"),
    "/v1/fleet/pull-messages": ("fleet", "fleet_pull_messages"),
    "/v1/fleet/push-messages": ("fleet", "fleet_push_messages"),
    "/v1/fleet/send-node-heartbeat": ("fleet", "fleet_send_node_heartbeat"),
    "/v1/runtime/push-object": ("runtime", "push_object"),
    "/v1/runtime/pull-object": ("runtime", "pull_object"),
    "/v1/runtime/confirm-message-received": ("runtime", "confirm_message_received"),
    "/v1/runtime/pull-messages": ("runtime", "pull_messages"),
    "/v1/runtime/push-messages": ("runtime", "push_messages"),
    "/v1/runtime/get-nodes": ("runtime", "get_nodes"),
    "/v1/runtime/send-task-heartbeat": ("runtime", "send_task_heartbeat"),
}
_ROUTER_MODULES = {"fleet": "flwr.superlink.routers.fleet.router",
                   "runtime": "flwr.supercore.routers.runtime.router"}
_MARK = "_exchange_hot_routes"


@dataclass(frozen=True)
class Route:
    """One route: its protobuf request type and how to answer it with flwr's own route function,
    dependencies resolved as FastAPI resolves them (`call`, run in the thread pool)."""

    request_type: Any
    call: Callable[[Any, Any], Any]  # (starlette Request, protobuf request) -> protobuf response
    api: str


class HotRoutes:
    """Pure ASGI, inside our own outermost layers (the request counter and the idle-poll
    shortcuts, which must see every poll) and outside flwr's: answer `routes` with flwr's own
    route functions in one thread-pool hop, without the two `BaseHTTPMiddleware` layers and
    FastAPI's routing around them. What is checked stays flwr's: the media type and the protobuf
    parse (anything flwr would refuse takes flwr's full path, which answers it), the node's
    signature (`authenticate_node`) or the task's token (`authenticate_task`) and the Runtime
    API's version check, then the route function with its handler's checks; an exception becomes
    flwr's own error reply (`http_error_translator`, with the busy-database 503). With a Fleet
    event-log plugin configured, Fleet requests take the full path (that middleware logs them)."""

    def __init__(self, app: Any, *, routes: dict[str, Route], translator: Callable[..., Any],
                 media_type: str) -> None:
        self.app, self.routes, self.translator, self.media_type = app, routes, translator, media_type
        self.answered: dict[str, int] = {}  # by path (tests and benchmarks read them)
        self.full_path = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        route = (self.routes.get(scope["path"])
                 if scope["type"] == "http" and scope.get("method") == "POST" else None)
        if route is None:
            await self.app(scope, receive, send)
            return
        if not self._ours(scope, route):
            self.full_path += 1
            await self.app(scope, receive, send)
            return
        body, event = await _read_body(receive)
        message = None if event is not None else self._parse(route, body)
        if message is None:  # flwr's full path answers what it refuses, as always
            self.full_path += 1
            await self.app(scope, _replay(body, event, receive), send)
            return
        from starlette.concurrency import run_in_threadpool
        from starlette.requests import Request
        from starlette.responses import Response

        scope.setdefault("state", {})["protobuf_request"] = message  # as flwr's translation sets it
        request = Request(scope, _replay(body, None, receive))
        self.answered[scope["path"]] = self.answered.get(scope["path"], 0) + 1
        try:
            reply = await run_in_threadpool(route.call, request, message)
            response = Response(content=reply.SerializeToString(), media_type=self.media_type)
        except Exception as exc:  # flwr's translator makes the reply (and logs), as on its full path
            response = await self.translator(request, _raising(exc))
        await response(scope, receive, send)

    def _ours(self, scope: Any, route: Route) -> bool:
        if route.api == "fleet" and getattr(scope["app"].state, "fleet_event_log_plugin", None) is not None:
            return False
        content_type = ""
        for name, value in scope.get("headers", ()):
            if name.lower() == b"content-type":
                content_type = value.decode("latin-1")
                break
        return content_type.partition(";")[0].strip().lower() == self.media_type

    @staticmethod
    def _parse(route: Route, body: bytes) -> Any:
        try:
            return route.request_type.FromString(body)
        except Exception:
            return None


def _raising(exc: Exception) -> Callable[[Any], Any]:
    """A `call_next` for flwr's error translator that raises what the route function raised."""
    async def call_next(_request: Any) -> Any:
        raise exc

    return call_next


def _dependencies() -> dict[str, dict[str, tuple[Any, Callable[[Any, dict[str, Any]], Any]]]]:
    """Per API: each parameter name flwr's route functions take -> (the dependency FastAPI
    resolves for it, how we resolve it: (starlette Request, what was resolved before) -> value).
    A route function with any other parameter, or another dependency under one of these names,
    is refused by `routes()` (it would be skipped here)."""
    from flwr.supercore.constant import TASK_TOKEN_HEADER
    from flwr.supercore.dependencies import runtime as runtime_deps
    from flwr.supercore.dependencies import task as task_deps
    from flwr.supercore.protobuf.translation import get_protobuf_request
    from flwr.superlink.dependencies.linkstate import get_linkstate

    token_scheme = task_deps._task_token_scheme
    _require(token_scheme.model.name == TASK_TOKEN_HEADER and token_scheme.auto_error is False
             and "authenticate_task(request, token, state)" in inspect.getsource(runtime_deps.get_task),
             "the Runtime API's task-token dependency changed")
    _require(list(inspect.signature(runtime_deps.get_task).parameters) == ["request", "token", "state"],
             "runtime get_task's dependencies changed")

    def task(http: Any, resolved: dict[str, Any]) -> Any:
        # get_task's own `state` is FastAPI's cached get_runtime_state (resolved before it here too)
        state = resolved["state"] if "state" in resolved else runtime_deps.get_runtime_state(http)
        token = http.headers.get(TASK_TOKEN_HEADER) or None  # APIKeyHeader(auto_error=False)
        return task_deps.authenticate_task(http, token, state)

    def plain(dependency: Callable[[Any], Any]) -> tuple[Any, Callable[[Any, dict[str, Any]], Any]]:
        return dependency, lambda http, _resolved: dependency(http)

    return {"fleet": {"request": plain(get_protobuf_request), "state": plain(get_linkstate)},
            "runtime": {"request": plain(get_protobuf_request),
                        "state": plain(runtime_deps.get_runtime_state),
                        "handlers": plain(runtime_deps.get_runtime_handlers),
                        "task": (runtime_deps.get_task, task)}}


def _declared_dependency(hint: Any) -> Any:
    """The callable FastAPI resolves for a parameter annotated `Annotated[T, Depends(f)]`."""
    metadata: tuple[Any, ...] = getattr(hint, "__metadata__", ())
    _require(len(metadata) == 1 and hasattr(metadata[0], "dependency"), f"not a dependency: {hint!r}")
    return metadata[0].dependency


def routes() -> dict[str, Route]:
    """Each route of `ROUTES`: its request type and call, after checking that flwr's routers still
    declare it at that path, with exactly the dependencies resolved here, and a unary reply."""
    from flwr.supercore.dependencies.version import VersionDependency
    from flwr.supercore.protobuf.translation import PROTOBUF_REQUEST_TYPES
    from flwr.superlink.routers.fleet.node_auth import authenticate_node

    modules = {api: importlib.import_module(name) for api, name in _ROUTER_MODULES.items()}
    fleet_deps = modules["fleet"].router.dependencies
    _require(len(fleet_deps) == 1 and isinstance(fleet_deps[0].dependency, VersionDependency)
             and fleet_deps[0].dependency._reject_incompatible is False,
             "the Fleet router's dependencies changed (its version check used to only look)")
    runtime_router = modules["runtime"]
    _require(not runtime_router.router.dependencies
             and "VersionDependency(" in inspect.getsource(runtime_router.create_runtime_router)
             and "connection_name=f\"Caller <-> {component_name} Runtime API\""
             in inspect.getsource(runtime_router.create_runtime_router),
             "create_runtime_router's dependencies changed")
    runtime_version = VersionDependency(component_name="SuperLink",
                                        connection_name="Caller <-> SuperLink Runtime API")
    dependencies = _dependencies()
    out: dict[str, Route] = {}
    for path, (api, name) in ROUTES.items():
        module = modules[api]
        endpoint: Callable[..., Any] = getattr(module, name, None)  # type: ignore[assignment]
        _require(callable(endpoint), f"flwr's {api} route function {name} is gone")
        hints = typing.get_type_hints(endpoint, include_extras=True)
        parameters = list(inspect.signature(endpoint).parameters)
        known = dependencies[api]
        _require(parameters[:1] == ["request"] and all(p in known for p in parameters)
                 and all(_declared_dependency(hints[p]) is known[p][0] for p in parameters),
                 f"flwr's {api} route function {name} changed its dependencies")
        _require(typing.get_origin(hints.get("return")) is not Iterator, f"flwr's {name} streams its reply")
        declared = [r for r in module.router.routes  # ProtobufRoute wraps the endpoint
                    if getattr(getattr(r, "endpoint", None), "__wrapped__", None) is endpoint]
        _require(len(declared) == 1 and declared[0].path == path and declared[0].methods == {"POST"}
                 and not declared[0].dependencies[len(fleet_deps) if api == "fleet" else 0:],
                 f"flwr's {api} route for {name} moved or has dependencies of its own")
        request_type = PROTOBUF_REQUEST_TYPES.get(("POST", path))
        _require(request_type is not None, f"no protobuf request type for {path}")
        resolvers = [(p, known[p][1]) for p in parameters]

        def call(http: Any, message: Any, *, endpoint: Callable[..., Any] = endpoint, api: str = api,
                 resolvers: list[tuple[str, Callable[[Any, dict[str, Any]], Any]]] = resolvers) -> Any:
            if api == "fleet":
                authenticate_node(http)  # NodeAuthMiddleware's check (a 401 HTTPException)
            else:
                runtime_version(http)  # what the Runtime router checks first
            resolved: dict[str, Any] = {}
            for parameter, resolve in resolvers:  # in declaration order, as FastAPI solves them
                resolved[parameter] = resolve(http, resolved)
            return endpoint(**resolved)

        out[path] = Route(request_type, call, api)
    return out


def _inside_our_outer_layers(current: Callable[[], list[Any]], *middleware: Any) -> list[Any]:
    """flwr's SuperLink middleware list (`current()`) with `middleware` added after an installed
    extension's own and after our outermost layers (the request counter, the idle-poll
    shortcuts: they must see every request, and judge a poll by the reply it gets), before all
    of flwr's own, whichever of our patches was applied first."""
    from flwr.superlink import extensions

    outer = (flwr_internals.RequestCounter, flwr_internals._IdlePullShortcut,
             flwr_internals._IdleReplyPullShortcut)
    out = list(current())
    position = len(extensions.get_middleware())
    while position < len(out) and out[position].cls in outer:
        position += 1
    return [*out[:position], *middleware, *out[position:]]


def patch_superlink_routes() -> None:
    """Answer the SuperLink's hot routes (`ROUTES`) with flwr's own route functions outside
    FastAPI's layers (`HotRoutes`; this process must be the SuperLink's, before its app is
    built). Idempotent."""
    flwr_internals.check_flwr_version()
    import flwr.superlink.main as superlink_main

    current = superlink_main._get_middleware
    if getattr(current, _MARK, False):
        return
    table = routes()
    from flwr.supercore.error import http_error_translator
    from flwr.supercore.protobuf import translation
    from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE
    from starlette.middleware import Middleware

    dispatch = inspect.getsource(translation.ProtobufTranslationMiddleware.dispatch)
    _require("self._check_request_media_type(request)" in dispatch
             and "request.state.protobuf_request = self._parse_request(" in dispatch
             and "content=result.SerializeToString(), media_type=PROTOBUF_MEDIA_TYPE"
             in inspect.getsource(translation.ProtobufTranslationMiddleware._response_for),
             "flwr's ProtobufTranslationMiddleware changed (what HotRoutes does instead)")
    translator = flwr_internals._busy_database_retryable(http_error_translator)

    def get_middleware() -> list[Any]:
        return _inside_our_outer_layers(current, Middleware(HotRoutes, routes=table, translator=translator,
                                                            media_type=PROTOBUF_MEDIA_TYPE))

    for mark in (_PATCHED_MARK, _SCOPED_MARK):
        setattr(get_middleware, mark, getattr(current, mark, False))
    setattr(get_middleware, _MARK, True)
    setattr(superlink_main, "_get_middleware", get_middleware)  # noqa: B010 (a module global of flwr's)


# -- the object push's SQL ---------------------------------------------------------------------------


def patch_superlink_object_claim() -> None:
    """flwr's object push (`SqlCoreState.store_object`) in three SQL statements instead of four
    (SuperLink process only): its claim of the pending object (`_claim_pending_object`: a
    `DELETE ... RETURNING` of the pending row, guarded by an `EXISTS` on the push session of that
    run, then a `SELECT` of the session's expiry, re-read because another push may have refreshed
    it meanwhile) becomes one `DELETE ... RETURNING` that returns the session's expiry itself (a
    subquery, evaluated by the same statement under the same write lock, after any refresh
    committed before it). Same transaction, same rows, same result: the expiry, or None when
    nothing was claimed."""
    flwr_internals.check_flwr_version()
    from flwr.supercore.corestate import sql_corestate
    from sqlalchemy import delete, select

    cls = sql_corestate.SqlCoreState
    claim = cls._claim_pending_object
    if getattr(claim, _PATCHED_MARK, False):
        return
    _require(list(inspect.signature(claim).parameters) == ["self", "run_id", "session_id", "object_id"],
             "SqlCoreState._claim_pending_object changed its parameters")
    source = inspect.getsource(claim)
    _require(all(part in source for part in (
        "delete(ObjectPushSessionPendingModel)",
        "ObjectPushSessionPendingModel.session_id == session_id",
        "ObjectPushSessionPendingModel.object_id == object_id",
        "ObjectPushSessionModel.session_id == session_id",
        "ObjectPushSessionModel.run_id == uint64_to_int64(run_id)", ".exists(),",
        ".returning(ObjectPushSessionPendingModel.session_id)", "if claimed_session_id is None:",
        "select(ObjectPushSessionModel.expires_at)",
        ".where(ObjectPushSessionModel.session_id == claimed_session_id)", "return expires_at")),
        "SqlCoreState._claim_pending_object changed (what patch_superlink_object_claim does in one "
        "statement)")
    pending, push_session = sql_corestate.ObjectPushSessionPendingModel, sql_corestate.ObjectPushSessionModel
    to_int64 = sql_corestate.uint64_to_int64
    expiry = (select(push_session.expires_at).where(push_session.session_id == pending.session_id)
              .scalar_subquery())

    def _claim_pending_object(self: Any, run_id: int, session_id: str, object_id: str) -> Any:
        with self.session() as session:
            return session.scalar(
                delete(pending)
                .where(pending.session_id == session_id, pending.object_id == object_id,
                       select(push_session.session_id)
                       .where(push_session.session_id == session_id, push_session.run_id == to_int64(run_id))
                       .exists())
                .returning(expiry))

    _claim_pending_object.__doc__ = claim.__doc__
    setattr(_claim_pending_object, _PATCHED_MARK, True)
    setattr(cls, "_claim_pending_object", _claim_pending_object)  # noqa: B010 (a method of flwr's)
