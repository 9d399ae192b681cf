"""Every use of flwr 1.42 internals, in one place: a Flower upgrade is this one file to read.

Public Flower API, used directly elsewhere: `flwr.app` (Message, Context, records, Error,
Metadata's read-only properties), `flwr.serverapp` (ServerApp, Grid), `flwr.clientapp`
(ClientApp) and the `flower-superlink` / `flower-supernode` command lines. Everything else the
runtime needs is wrapped here, behind small typed functions and classes:

- the Control API (submit a run, list nodes, register a SuperNode key) and the Runtime API (claim
  a ServerApp or ClientApp task, pull its input, push its output, keep its heartbeat), which is
  how the coordinator runs a study's ServerApp in its own process and how a hospital's warm
  executor runs ClientApp tasks (`server_runner`, `executor`);
- FAB building and reading, the process-global task identity, message metadata that has no
  public setter, Flower's error codes, the SuperLink/SuperNode entry points and log format;
- the speed patches: out of the box most of a Flower 1.42 round is spent in hard-coded sleeps
  (`time.sleep(3)` / `time.sleep(0.5)` in the SuperNode loop), a 1 s initial back-off when a
  message's objects are not stored yet, and a new interpreter per ClientApp message (see
  docs/flower.md; the numbers are in docs/benchmarks/flower.md).
  `RuntimeSettings.mode = "plain"` runs without the patches.

Two guards, both raising `FlowerLayoutError` (not `assert`, which `python -O` would drop):
`check_flwr_version()` refuses any flwr but the pinned one before a patch is applied (patches
are written against exact source lines), and `check_layout()` verifies that every module,
name, signature, constant and private attribute used here is still what it was; each wrapper
runs the part of it that it needs once, before it first touches flwr. An upgrade therefore
fails at start-up, naming what moved, instead of running slow or wrong.
tests/federated/test_flwr_internals.py runs every check and also fails if any other module of
the project imports a non-public flwr module.

flwr is imported lazily, inside functions: callers switch telemetry off before the first import
(`settings.disable_phone_home`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import functools
import importlib
import importlib.metadata
import inspect
import threading
import time as _time
import types
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from federated.runtime import timeline

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ec import EllipticCurvePublicKey
    from flwr.app import Context, Message, Metadata
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid
    from flwr.supernode.nodestate import NodeState

PINNED_FLWR_VERSION = "1.42.0"
_PATCHED_MARK = "_exchange_patched"

#: flwr.common.constant.ErrorCode values we act on (checked by `check_layout`).
ERROR_CLIENT_APP_RAISED_EXCEPTION = 2
ERROR_MESSAGE_UNAVAILABLE = 3
ERROR_NODE_UNAVAILABLE = 5
#: Error codes that mean "this node id is gone": the hospital may be back under a new node id.
NODE_GONE_ERROR_CODES = frozenset({ERROR_MESSAGE_UNAVAILABLE, ERROR_NODE_UNAVAILABLE})

TaskKind = Literal["serverapp", "clientapp"]
RunConfigValue = str | int | float | bool


class FlowerLayoutError(RuntimeError):
    """flwr is not the version, or does not have the layout, this module was written for."""


# -- version and layout checks -----------------------------------------------------------------


def check_flwr_version() -> None:
    """Refuse to patch anything but the exact flwr version the patches were measured on."""
    found = importlib.metadata.version("flwr")
    if found != PINNED_FLWR_VERSION:
        raise FlowerLayoutError(
            f"flwr {found} is installed, the runtime patches were written for flwr=={PINNED_FLWR_VERSION};"
            " re-check federated/runtime/flwr_internals.py against the new source, or use mode='plain'"
        )


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise FlowerLayoutError(f"flwr layout changed: {what} (see federated/runtime/flwr_internals.py)")


#: Per part of the runtime: (module, name, parameters the name must accept, attributes it must have).
_LAYOUT: dict[str, tuple[tuple[str, str, tuple[str, ...], tuple[str, ...]], ...]] = {
    "control": (
        ("flwr.supercore.control", "ControlHttpClient", (),
         ("from_server_address", "StartRun", "ListNodes", "RegisterNode", "close")),
        ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", ("component_name",), ()),
        ("flwr.proto.control_pb2", "StartRunRequest", (), ()),
        ("flwr.proto.control_pb2", "ListNodesRequest", (), ()),
        ("flwr.proto.control_pb2", "RegisterNodeRequest", (), ()),
        ("flwr.common.serde", "fab_to_proto", ("fab",), ()),
        ("flwr.common.serde", "user_config_to_proto", ("user_config",), ()),
        ("flwr.supercore.fab", "Fab", ("hash_str", "content", "verifications"), ()),
        ("flwr.cli.build", "build_fab_from_disk", ("app",), ()),
        ("flwr.supercore.primitives.asymmetric", "public_key_to_bytes", ("public_key",), ()),
    ),
    "runtime": (
        ("flwr.supercore.runtime", "RuntimeHttpClient", (),
         ("from_server_address", "AcquireTask", "PullTaskInput", "PushTaskOutput", "close")),
        ("flwr.supercore.interceptors", "RuntimeVersionHttpInterceptor", ("component_name",), ()),
        ("flwr.supercore.interceptors", "RuntimeTokenHttpInterceptor", ("token",), ()),
        ("flwr.supercore.retry", "make_simple_http_retry_invoker", (), ()),
        ("flwr.supercore.heartbeat", "HeartbeatSender", ("heartbeat_fn",), ("start", "stop", "is_running")),
        ("flwr.supercore.heartbeat", "make_task_heartbeat_fn_http", ("client",), ()),
        ("flwr.proto.runtime_pb2", "AcquireTaskRequest", (), ()),
        ("flwr.proto.runtime_pb2", "PushTaskOutputRequest", (), ()),
        ("flwr.supercore.constant", "TaskType", (), ("SERVER_APP", "CLIENT_APP")),
        ("flwr.common.constant", "SubStatus", (), ("COMPLETED", "FAILED")),
        ("flwr.common.serde", "context_to_proto", ("context",), ()),
        ("flwr.supercore.task_identity", "TaskIdentity", (), ("task_id", "run_id", "node_id")),
    ),
    "serverapp": (
        ("flwr.superlink.grid", "HttpGrid", ("runtime_api_address", "insecure", "root_certificates", "token"),
         ("set_run", "close", "_runtime_client")),
        ("flwr.proto.runtime_pb2", "PullTaskInputRequest", (), ()),
        ("flwr.common.serde", "context_from_proto", ("context_proto",), ()),
        ("flwr.common.serde", "run_from_proto", ("run_proto",), ()),
        ("flwr.common.config", "get_fused_config_from_fab", ("fab_file", "run"), ()),
    ),
    "clientapp": (
        ("flwr.supernode.runtime.run_clientapp", "pull_task_input", ("client",), ()),
        ("flwr.supernode.runtime.run_clientapp", "push_message", ("client", "message", "context"), ()),
        ("flwr.supernode.runtime.run_clientapp", "push_task_output",
         ("client", "context", "sub_status", "details"), ()),
        ("flwr.supercore.object_ref", "load_app", ("module_attribute_str", "error_type"), ()),
        ("flwr.clientapp.client_app", "LoadClientAppError", (), ()),
        ("flwr.common.config", "get_fab_config", ("fab_file",), ()),
    ),
    "inprocess_runtime": (
        ("flwr.supernode.cli.flower_supernode", "NodeStateFactory", ("objectstore_factory",), ("state",)),
        ("flwr.supernode.nodestate", "NodeState", (), ("get_task_by_token",)),
        ("flwr.supernode.servicer.runtime.runtime_handlers", "acquire_task", ("request", "state"), ()),
        *(("flwr.supernode.servicer.runtime.runtime_handlers", name, ("request", "state", "task"), ())
          for name in ("pull_task_input", "push_task_output", "pull_messages", "push_messages",
                       "pull_object", "push_object", "confirm_message_received")),
        ("flwr.supercore.servicer.runtime.runtime_handlers", "send_task_heartbeat",
         ("request", "state", "task"), ()),
        ("flwr.supercore.error", "FlowerError", (), ()),
        ("flwr.supercore.error", "ApiErrorCode", (), ("RUNTIME_AUTHENTICATION_FAILED",)),
    ),
    "message": (
        ("flwr.common.constant", "ErrorCode", (),
         ("CLIENT_APP_RAISED_EXCEPTION", "MESSAGE_UNAVAILABLE", "NODE_UNAVAILABLE")),
        ("flwr.supercore.task_identity", "TaskIdentity", (), ("task_id", "run_id", "node_id")),
    ),
    "superlink": (
        ("flwr.superlink.cli", "flower_superlink", (), ()),
    ),
    "supernode": (
        ("flwr.supernode.cli", "flower_supernode", (), ()),
        ("flwr.supercore.logger", "update_console_handler", ("timestamps", "colored"), ()),
        ("flwr.supercore.exit.signal_handler", "register_signal_handlers", ("event_type",), ()),
    ),
    "secagg": (
        ("flwr.client.mod.secure_aggregation.secaggplus_mod", "secaggplus_mod",
         ("msg", "ctxt", "call_next"), ()),
        ("flwr.client.mod.secure_aggregation.secaggplus_mod", "pseudo_rand_gen", ("seed", "num_range"), ()),
        ("flwr.common.secure_aggregation.secaggplus_constants", "Key", (),
         ("STAGE", "SAMPLE_NUMBER", "SHARE_NUMBER", "THRESHOLD", "CLIPPING_RANGE", "TARGET_RANGE",
          "MOD_RANGE", "MAX_WEIGHT", "PUBLIC_KEY_1", "PUBLIC_KEY_2", "DESTINATION_LIST", "CIPHERTEXT_LIST",
          "SOURCE_LIST", "MASKED_PARAMETERS", "ACTIVE_NODE_ID_LIST", "DEAD_NODE_ID_LIST", "NODE_ID_LIST",
          "SHARE_LIST")),
        ("flwr.common.secure_aggregation.secaggplus_constants", "Stage", (),
         ("SETUP", "SHARE_KEYS", "COLLECT_MASKED_VECTORS", "UNMASK")),
        ("flwr.common.secure_aggregation.secaggplus_constants", "RECORD_KEY_CONFIGS", (), ()),
        ("flwr.common.secure_aggregation.crypto.shamir", "combine_shares", ("share_list",), ()),
        ("flwr.common.secure_aggregation.crypto.symmetric_encryption", "generate_shared_key",
         ("private_key", "public_key"), ()),
        ("flwr.common.secure_aggregation.quantization", "dequantize",
         ("quantized_parameters", "clipping_range", "target_range"), ()),
        ("flwr.supercore.primitives.asymmetric", "bytes_to_private_key", ("private_key_bytes",), ()),
        ("flwr.supercore.primitives.asymmetric", "bytes_to_public_key", ("public_key_bytes",), ()),
        ("flwr.supercore.primitives.asymmetric", "public_key_to_bytes", ("public_key",), ()),
        ("flwr.common", "bytes_to_ndarray", ("tensor",), ()),
        ("flwr.common", "ndarrays_to_parameters", ("ndarrays",), ()),
        ("flwr.common", "FitRes", (), ()),
        ("flwr.common", "Status", (), ()),
        ("flwr.common", "Code", (), ("OK",)),
        ("flwr.compat.common.recorddict_compat", "fitres_to_recorddict", ("fitres", "keep_input"), ()),
    ),
    "patches": (
        ("flwr.supernode.start_client_internal", "pull_objects", ("initial_backoff", "backoff_cap"), ()),
        ("flwr.supernode.start_client_internal", "_pull_and_store_message",
         ("state", "object_store", "receive"), ()),
        ("flwr.supernode.start_client_internal", "_push_messages", ("state", "object_store", "send"), ()),
        ("flwr.supernode.runtime.run_clientapp", "pull_and_inflate_object_from_tree",
         ("initial_backoff", "backoff_cap"), ()),
        ("flwr.superlink.grid.http_grid", "pull_objects", ("initial_backoff", "backoff_cap"), ()),
        ("flwr.supernode.fleet_http_connection", "HEARTBEAT_DEFAULT_INTERVAL", (), ()),
        ("flwr.supercore.heartbeat", "HEARTBEAT_DEFAULT_INTERVAL", (), ()),
        ("flwr.common.constant", "HEARTBEAT_MIN_INTERVAL", (), ()),
        ("flwr.common.constant", "HEARTBEAT_MAX_INTERVAL", (), ()),
    ),
}
LAYOUT_PARTS = tuple(_LAYOUT)
_MISSING = object()


def _check_name(module_name: str, name: str, params: tuple[str, ...], attributes: tuple[str, ...]) -> Any:
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise FlowerLayoutError(f"flwr layout changed: module {module_name} is gone ({exc}) "
                                "(see federated/runtime/flwr_internals.py)") from exc
    _require(hasattr(module, name), f"{module_name}.{name} is gone")
    obj = getattr(module, name)
    if params:
        func = obj.func if isinstance(obj, functools.partial) else obj  # one of our own patches
        try:
            accepted = inspect.signature(func).parameters
        except (TypeError, ValueError) as exc:
            raise FlowerLayoutError(f"flwr layout changed: {module_name}.{name} is not callable "
                                    "(see federated/runtime/flwr_internals.py)") from exc
        missing = [p for p in params if p not in accepted]
        _require(not missing, f"{module_name}.{name} no longer takes {', '.join(missing)}")
    for attribute in attributes:
        # looked up statically: reading a property (TaskIdentity's ids live on its metaclass) may
        # raise; an attribute may also sit on the class's metaclass
        found = any(inspect.getattr_static(holder, attribute, _MISSING) is not _MISSING
                    for holder in (obj, type(obj)))
        _require(found, f"{module_name}.{name} has no {attribute}")
    return obj


def _check_semantics(part: str) -> None:
    """What a name's presence does not prove: values we hard-code and private attributes we use."""
    if part == "message":
        from flwr.app import Metadata
        from flwr.common.constant import ErrorCode
        from flwr.supercore.task_identity import TaskIdentity

        for name, ours in (("CLIENT_APP_RAISED_EXCEPTION", ERROR_CLIENT_APP_RAISED_EXCEPTION),
                           ("MESSAGE_UNAVAILABLE", ERROR_MESSAGE_UNAVAILABLE),
                           ("NODE_UNAVAILABLE", ERROR_NODE_UNAVAILABLE)):
            _require(getattr(ErrorCode, name) == ours, f"ErrorCode.{name} is no longer {ours}")
        for name in ("task_id", "run_id", "node_id"):
            prop = inspect.getattr_static(type(TaskIdentity), name, None)
            _require(isinstance(prop, property) and prop.fset is not None,
                     f"TaskIdentity.{name} is no longer a settable class property")
        try:
            metadata = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=0,
                                reply_to_message_id="", group_id="", created_at=0.0, ttl=1.0,
                                message_type="query")
            _set_metadata(metadata, message_id="probe", run_id=7)
            same = metadata.message_id == "probe" and metadata.run_id == 7
        except Exception as exc:
            raise FlowerLayoutError(f"flwr layout changed: Metadata ({type(exc).__name__}: {exc}) "
                                    "(see federated/runtime/flwr_internals.py)") from exc
        _require(same, "Metadata no longer keeps message_id/run_id in __dict__['_message_id'/'_run_id']")
    elif part == "serverapp":
        from flwr.supercore.retry import RetryInvoker
        from flwr.superlink.grid import HttpGrid

        _require(isinstance(inspect.getattr_static(HttpGrid, "_runtime_client", None), property),
                 "HttpGrid._runtime_client is no longer a property")
        # bound_retries: the grid's invoker, set in __init__ and used at the first connection
        invoker = HttpGrid(token="layout-probe")._retry_invoker
        _require(isinstance(invoker, RetryInvoker) and hasattr(invoker, "max_time")
                 and hasattr(invoker, "should_giveup"),
                 "HttpGrid._retry_invoker is no longer a RetryInvoker with max_time and should_giveup")
    elif part == "supernode":
        from flwr.supercore.exit import signal_handler

        # flower_supernode_main: a second signal reaches the handler installed before flwr's
        _require("signal.signal(sig, default_handlers[sig])" in inspect.getsource(signal_handler)
                 and "default_handler = signal.signal(sig, graceful_exit_handler)"
                 in inspect.getsource(signal_handler),
                 "register_signal_handlers no longer puts back the handlers it found on the first signal")
    elif part == "runtime":
        from flwr.common.constant import SubStatus
        from flwr.supercore.constant import TaskType

        task_types = (TaskType.SERVER_APP.value, TaskType.CLIENT_APP.value)
        _require(task_types == ("flwr-serverapp", "flwr-clientapp"), "TaskType values changed")
        _require((SubStatus.COMPLETED, SubStatus.FAILED) == ("completed", "failed"),
                 "SubStatus values changed")


_checked: set[str] = set()


def check_layout(*parts: str) -> None:
    """Verify the flwr layout the named parts of this module rely on (all parts if none given).

    Each part is checked once per process; raises `FlowerLayoutError` naming what changed."""
    for part in parts or LAYOUT_PARTS:
        if part in _checked:
            continue
        if part not in _LAYOUT:
            raise ValueError(f"part: unknown layout part {part!r}, one of {', '.join(LAYOUT_PARTS)}")
        for module_name, name, params, attributes in _LAYOUT[part]:
            _check_name(module_name, name, params, attributes)
        _check_semantics(part)
        _checked.add(part)


# -- the Control API (what `flwr run` and `flwr supernode register` talk to) --------------------


class ControlApi:
    """A client of the SuperLink's Control API: submit runs, list nodes, register SuperNode keys."""

    def __init__(self, address: str, *, insecure: bool, root_certificates: bytes | None) -> None:
        check_layout("control")
        from flwr.supercore.control import ControlHttpClient
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor

        self._client = ControlHttpClient.from_server_address(
            server_address=address, insecure=insecure, root_certificates=root_certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr CLI")])

    def start_run(self, fab: bytes, fab_hash: str, run_config: Mapping[str, RunConfigValue]) -> int:
        """Submit a run of `fab` with `run_config` overriding its defaults; returns the run id."""
        from flwr.common.serde import fab_to_proto, user_config_to_proto
        from flwr.proto.control_pb2 import StartRunRequest
        from flwr.supercore.fab import Fab

        response = self._client.StartRun(StartRunRequest(
            fab=fab_to_proto(Fab(fab_hash, fab, {})), override_config=user_config_to_proto(dict(run_config))))
        return int(response.run_id)

    def online_node_ids(self) -> list[int]:
        """Node ids the SuperLink currently counts as online."""
        from flwr.proto.control_pb2 import ListNodesRequest

        response = self._client.ListNodes(ListNodesRequest())
        return [int(info.node_id) for info in response.nodes_info if info.status == "online"]

    def register_node(self, public_key: bytes, name: str | None = None) -> int:
        """Register a SuperNode's public key (`node_public_key_bytes`); returns the node id the
        SuperLink assigned, 0 if it assigned none."""
        from flwr.proto.control_pb2 import RegisterNodeRequest

        return int(self._client.RegisterNode(RegisterNodeRequest(public_key=public_key, name=name)).node_id)

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ControlApi:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def node_public_key_bytes(public_key: EllipticCurvePublicKey) -> bytes:
    """A SuperNode public key as the Control API's RegisterNode expects it (what `flwr supernode
    register` sends)."""
    check_layout("control")
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    return bytes(public_key_to_bytes(public_key))


def build_fab(app_dir: Path) -> bytes:
    """A FAB built from the app directory on disk (what `flwr build` writes)."""
    check_layout("control")
    from flwr.cli.build import build_fab_from_disk

    return bytes(build_fab_from_disk(app_dir))


#: What submitting a run and claiming its ServerApp task import on first use (`build_fab`,
#: `ControlApi`, `TaskQueue`, `ServerAppTask`): `flwr.cli.build` (the CLI's dependencies) and
#: `flwr.superlink.grid` alone take a second or more of a coordinator's first study start.
SERVER_RUN_MODULES = ("flwr.cli.build", "flwr.superlink.grid", "flwr.supercore.control",
                      "flwr.supercore.interceptors", "flwr.supercore.fab", "flwr.supercore.heartbeat",
                      "flwr.supercore.retry", "flwr.supercore.runtime", "flwr.common.config",
                      "flwr.common.serde", "flwr.proto.control_pb2", "flwr.proto.runtime_pb2")


def import_server_run_modules() -> None:
    """Import `SERVER_RUN_MODULES` now (a coordinator's warm-up), so that its first study's
    submission does not wait for them."""
    import importlib

    check_layout("control")
    for name in SERVER_RUN_MODULES:
        importlib.import_module(name)


# -- the Runtime API (tasks: the SuperLink's for ServerApps, a SuperNode's for ClientApps) --------


def _runtime_http_client(address: str, *, insecure: bool, root_certificates: bytes | None,
                         component: str, token: str | None) -> Any:
    from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
    from flwr.supercore.retry import make_simple_http_retry_invoker
    from flwr.supercore.runtime import RuntimeHttpClient

    interceptors: list[Any] = [RuntimeVersionHttpInterceptor(component_name=component)]
    if token:
        interceptors.append(RuntimeTokenHttpInterceptor(token))
    invoker = make_simple_http_retry_invoker()
    give_up_on_401(invoker)
    return RuntimeHttpClient.from_server_address(
        server_address=address, insecure=insecure, root_certificates=root_certificates,
        interceptors=interceptors, retry_invoker=invoker)


def give_up_on_401(invoker: Any) -> None:
    """Make a Flower HTTP retry invoker (`make_simple_http_retry_invoker`) give up on a 401, the
    error reaching its caller, instead of sending SIGINT to its own process.

    Flower does that for `flwr-clientapp` and `flwr-serverapp`, processes of one task each. Ours
    share their process: the warm executor's task client lives in the hospital's Flower process
    with its SuperNode (`hosted_supernode`), the ServerApp's in the coordinator. A task heartbeat
    that raced the task's end (its token spent by the pushed output) got a 401 and ended the
    hospital's whole Flower process right after its reply left, before the reply's objects all
    reached the SuperLink: at 25 hospitals a round lost a hospital to "Reply message objects
    are unavailable", another to its message sent again to the restarted node and refused as
    already trained (docs/benchmarks/scale.md). The task's own calls report a spent token."""
    import httpx

    flower_giveup = invoker.should_giveup
    if getattr(flower_giveup, _PATCHED_MARK, False):
        return

    def should_giveup(exc: Exception) -> bool:
        if isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == httpx.codes.UNAUTHORIZED:
            return True
        return bool(flower_giveup(exc)) if flower_giveup is not None else False

    setattr(should_giveup, _PATCHED_MARK, True)
    invoker.should_giveup = should_giveup


@dataclass(frozen=True)
class TaskClaim:
    """A task handed out by `AcquireTask`: the token its runtime calls must carry, and its run."""

    token: str
    run_id: int


class TaskQueue:
    """Claims pending tasks over a Runtime API, as Flower's SuperExec does (`AcquireTask`)."""

    def __init__(self, address: str, kind: TaskKind, *, insecure: bool = True,
                 root_certificates: bytes | None = None, state: NodeState | None = None) -> None:
        """`state`: the SuperNode's own state, when it runs in this process (`supernode_state`):
        claims go to its Runtime API handlers directly (`InProcessRuntimeClient`), not over HTTP."""
        check_layout("runtime")
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType

        task_type = TaskType.SERVER_APP if kind == "serverapp" else TaskType.CLIENT_APP
        self._request = AcquireTaskRequest(supported_task_types=[task_type.value])
        self._client: Any
        if state is not None:
            self._client = InProcessRuntimeClient(state, token=None)
        else:
            self._client = _runtime_http_client(address, insecure=insecure,
                                                root_certificates=root_certificates,
                                                component="SuperExec", token=None)

    def acquire(self) -> TaskClaim | None:
        """One pending task, or None if there is none now."""
        response = self._client.AcquireTask(self._request)
        if response.HasField("task") and response.token:
            return TaskClaim(str(response.token), int(response.task.run_id))
        return None

    def close(self) -> None:
        self._client.close()


def _sub_status(completed: bool) -> str:
    from flwr.common.constant import SubStatus

    return str(SubStatus.COMPLETED if completed else SubStatus.FAILED)


def task_heartbeat_fn(client: Any) -> Callable[[], bool]:
    """A claimed task's heartbeat over the Runtime API, as flwr's `make_task_heartbeat_fn_http`
    sends it, without its `signal.raise_signal(SIGINT)` when the answer is "no such task".

    flwr-clientapp and flwr-serverapp are processes of their own, so flwr ends the process on
    that answer. Here the task runs in a process that hosts more: the warm executor shares its
    process with the hospital's SuperNode (`hosted_supernode`), the ServerApp with the
    coordinator. A heartbeat that raced the task's end (the reply and the output pushed, the
    token gone) SIGINTed the hospital's whole Flower process right after its reply left: its
    objects never all reached the SuperLink, and the SuperNode came back under a new node id
    (25 hospitals, docs/benchmarks/scale.md: a round lost a hospital to "Reply message objects
    are unavailable", another to a round-1 message sent again and refused). A task the other
    end no longer knows ends by its own calls (they fail and report it); the heartbeat only
    says so (False: flwr's sender retries until the task closes), as for an HTTP error."""
    import httpx
    from flwr.proto.runtime_pb2 import SendTaskHeartbeatRequest
    from flwr.supercore.error import FlowerError

    request = SendTaskHeartbeatRequest()

    def heartbeat() -> bool:
        try:
            response = client.SendTaskHeartbeat(request)
        except (httpx.TransportError, httpx.HTTPStatusError, FlowerError):  # e.g. the 401 that
            return False  # `bound_retries` gives up on, or a spent token in process: the task's
            # own calls report it
        return bool(response.success)

    return heartbeat


class _HeartbeatTask:
    """A claimed task's heartbeat, started with the task; Flower reclaims a silent task."""

    def _start_heartbeat(self, client: Any) -> None:
        from flwr.supercore.heartbeat import HeartbeatSender

        self._heartbeat = HeartbeatSender(task_heartbeat_fn(client))
        self._heartbeat.start()

    def _stop_heartbeat(self) -> None:
        if self._heartbeat.is_running:
            self._heartbeat.stop()


def bound_retries(invoker: Any, max_time_s: float) -> None:
    """Make a Flower HTTP retry invoker (`make_simple_http_retry_invoker`) fit to run inside the
    coordinator's process, where one ServerApp per study shares the process with the API.

    Flower's invoker retries a lost SuperLink forever (`max_time=None`), so a SuperLink that does
    not come back would keep a study "running" for good; here the call gives up after
    `max_time_s` and the ServerApp fails the study with the error. And on a 401 (a SuperLink
    restarted without its state no longer knows the task's token) Flower sends SIGINT to its own
    process, which in `flwr-serverapp` is one study but here would stop the coordinator and every
    study in it: a 401 gives up instead (the study fails, the process stays up).
    (docs/flower.md, "A SuperLink restart mid-study")"""
    invoker.max_time = max_time_s
    give_up_on_401(invoker)


class ServerAppTask(_HeartbeatTask):
    """A claimed ServerApp task run in this process (the steps of flwr-serverapp): the grid the
    ServerApp talks through, the task's input, its heartbeat (started here) and its output."""

    def __init__(self, address: str, claim: TaskClaim, *, insecure: bool,
                 root_certificates: bytes | None, reconnect_s: float) -> None:
        check_layout("runtime", "serverapp", "message")
        from flwr.superlink.grid import HttpGrid

        self._http_grid = HttpGrid(runtime_api_address=address, insecure=insecure,
                                   root_certificates=root_certificates, token=claim.token)
        bound_retries(self._http_grid._retry_invoker, reconnect_s)  # before the first connection
        self._start_heartbeat(self._http_grid._runtime_client)
        if timeline.enabled():
            _trace_runtime_calls(self._http_grid._runtime_client)

    @property
    def grid(self) -> Grid:
        return self._http_grid

    def pull_input(self, fab: bytes) -> tuple[int, Context]:
        """The task id and the ServerApp's Context, its run config fused from `fab`'s defaults and
        the run's overrides. Sets this process's task identity (process-global: another study in
        this process may overwrite it, so the ServerApp stamps its messages itself)."""
        from flwr.common.config import get_fused_config_from_fab
        from flwr.common.serde import context_from_proto, run_from_proto
        from flwr.proto.runtime_pb2 import PullTaskInputRequest

        task_input = self._http_grid._runtime_client.PullTaskInput(PullTaskInputRequest())
        set_task_identity(task_input.task_id, task_input.run.run_id, task_input.context.node_id)
        context = context_from_proto(task_input.context)
        run = run_from_proto(task_input.run)
        self._http_grid.set_run(run)
        context.run_config = get_fused_config_from_fab(fab, run)
        return int(task_input.task_id), context

    def push_output(self, context: Context | None, *, completed: bool, details: str) -> None:
        """Report the task's end (and its final context) to the SuperLink."""
        from flwr.common.serde import context_to_proto
        from flwr.proto.runtime_pb2 import PushTaskOutputRequest

        self._http_grid._runtime_client.PushTaskOutput(PushTaskOutputRequest(
            context=context_to_proto(context) if context is not None else None,
            sub_status=_sub_status(completed), details=details))

    def close(self) -> None:
        try:
            self._stop_heartbeat()
        finally:
            self._http_grid.close()


def _replies(response: Any) -> str:
    return ",".join(timeline.short(m.metadata.reply_to_message_id) for m in response.messages_list) or "-"


def _trace_runtime_calls(client: Any) -> None:
    """Stamp the ServerApp's Runtime API calls on the `timeline` (only while it is on): the
    push of a stage's messages and of their objects, each reply pull (with the replies it got),
    each reply object pull and receipt. Instance attributes over the client's methods."""
    for name, describe in (("PushMessages", lambda r: len(r.message_ids)), ("PushObject", None),
                           ("PullMessages", _replies), ("PullObject", lambda r: int(r.object_available)),
                           ("ConfirmMessageReceived", None)):
        setattr(client, name, timeline.traced(getattr(client, name), f"srv.{name}", describe))


class ClientAppTask(_HeartbeatTask):
    """A claimed ClientApp task on a SuperNode's (loopback) Runtime API, as flwr-clientapp runs it
    (`run_clientapp`'s helpers), minus the process exit. The heartbeat starts here."""

    def __init__(self, address: str, token: str, *, state: NodeState | None = None) -> None:
        """`state`: the SuperNode's own state when it runs in this process (`supernode_state`):
        the task's calls go to its Runtime API handlers directly (`InProcessRuntimeClient`)."""
        check_layout("runtime", "clientapp")
        self._client: Any
        if state is not None:
            self._client = InProcessRuntimeClient(state, token=token)
        else:
            self._client = _runtime_http_client(address, insecure=True, root_certificates=None,
                                                component="flwr-clientapp", token=token)
        self._start_heartbeat(self._client)

    def pull_input(self) -> tuple[Message, Context, bytes]:
        """The message to answer, the node's Context, and the run's FAB."""
        from flwr.supernode.runtime import run_clientapp

        message, context, _run, fab = run_clientapp.pull_task_input(self._client)
        return message, context, bytes(fab.content)

    def push_reply(self, reply: Message, context: Context) -> None:
        from flwr.supernode.runtime import run_clientapp

        run_clientapp.push_message(self._client, reply, context)

    def push_output(self, context: Context | None, *, completed: bool, details: str) -> None:
        from flwr.supernode.runtime import run_clientapp

        run_clientapp.push_task_output(self._client, context, _sub_status(completed), details)

    def close(self) -> None:
        try:
            self._stop_heartbeat()
        finally:
            self._client.close()


class InProcessRuntimeClient:
    """The SuperNode Runtime API calls a ClientApp task makes (those of `RuntimeHttpClient` that
    `run_clientapp`'s helpers, `TaskQueue` and the task heartbeat use), answered by the
    SuperNode's own Runtime API handlers on its `NodeState`, in this process: no loopback HTTP.

    For the warm executor in the hospital's Flower process (`hosted_supernode`), where it is a
    thread beside the SuperNode: the loopback HTTP between them crossed no process, so no
    security boundary, yet each task's ~12 requests and the idle claims each went through httpx,
    uvicorn, FastAPI's dependencies and protobuf (de)serialisation twice (docs/flower.md, "The
    warm executor's Runtime API calls"). The same checks as the HTTP route: a task call needs the
    token of a claimed task (`get_task_by_token`, else `RUNTIME_AUTHENTICATION_FAILED`, as the
    route's 401), then the same handler with the same state. Handlers raise `FlowerError` where
    the HTTP route answered an error status. The version check of the HTTP route is moot in one
    interpreter. Requests and responses are protobuf messages built per call, as over HTTP."""

    def __init__(self, state: NodeState, *, token: str | None) -> None:
        check_layout("inprocess_runtime")
        from flwr.supercore.servicer.runtime import runtime_handlers as core
        from flwr.supernode.servicer.runtime import runtime_handlers as handlers

        self._state = state
        self._token = token
        self._handlers = handlers
        self._core = core

    def _task(self) -> Any:
        from flwr.supercore.error import ApiErrorCode, FlowerError

        task = self._state.get_task_by_token(self._token) if self._token else None
        if task is None:
            raise FlowerError(ApiErrorCode.RUNTIME_AUTHENTICATION_FAILED,
                              "Runtime task-token authentication failed.")
        return task

    def AcquireTask(self, request: Any) -> Any:  # noqa: N802 (RuntimeHttpClient's names)
        return self._handlers.acquire_task(request, self._state)

    def SendTaskHeartbeat(self, request: Any) -> Any:  # noqa: N802
        return self._core.send_task_heartbeat(request, self._state, self._task())

    def PullTaskInput(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.pull_task_input(request, self._state, self._task())

    def PushTaskOutput(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.push_task_output(request, self._state, self._task())

    def PullMessages(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.pull_messages(request, self._state, self._task())

    def PushMessages(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.push_messages(request, self._state, self._task())

    def PullObject(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.pull_object(request, self._state, self._task())

    def PushObject(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.push_object(request, self._state, self._task())

    def ConfirmMessageReceived(self, request: Any) -> Any:  # noqa: N802
        return self._handlers.confirm_message_received(request, self._state, self._task())

    def close(self) -> None:
        """Nothing to close (no connection); as `RuntimeHttpClient.close`."""


_supernode_state: list[NodeState] = []
_supernode_state_ready = threading.Event()


def capture_supernode_state() -> None:
    """Make the `NodeState` of the SuperNode that `flower_supernode_main` will start in this
    process available to `supernode_state` (the factory flwr's `flower_supernode` builds is a
    local of that function; its `state()` is one instance per factory, shared by the SuperNode's
    loop and its Runtime API). Call before `flower_supernode_main`."""
    check_layout("inprocess_runtime")
    # the module, not the function `flwr.supernode.cli` exports under the same name
    module = importlib.import_module("flwr.supernode.cli.flower_supernode")
    factory_class = getattr(module, "NodeStateFactory")  # noqa: B009 (a module typed as ModuleType)
    if getattr(factory_class, _PATCHED_MARK, False):
        return

    class CapturingNodeStateFactory(factory_class):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            _supernode_state[:] = [self.state()]
            _supernode_state_ready.set()

    setattr(CapturingNodeStateFactory, _PATCHED_MARK, True)
    setattr(module, "NodeStateFactory", CapturingNodeStateFactory)  # noqa: B010


def supernode_state(timeout: float | None = None) -> NodeState | None:
    """The `NodeState` of the SuperNode in this process (`capture_supernode_state`), waiting up
    to `timeout` seconds for it to be created; None if it was not by then."""
    if not _supernode_state_ready.wait(timeout):
        return None
    return _supernode_state[0]


def fab_clientapp_ref(fab: bytes) -> str:
    """The `module:attribute` a FAB declares as its ClientApp (`[tool.flwr.app.components]`)."""
    check_layout("clientapp")
    from flwr.common.config import get_fab_config

    return str(get_fab_config(fab)["tool"]["flwr"]["app"]["components"].get("clientapp", ""))


def load_client_app(ref: str) -> ClientApp:
    """Import the ClientApp `ref` (`module:attribute`) the way flwr-clientapp does."""
    check_layout("clientapp")
    from flwr.clientapp.client_app import LoadClientAppError
    from flwr.supercore.object_ref import load_app

    app: ClientApp = load_app(ref, LoadClientAppError)
    return app


# -- messages and the process's task identity ---------------------------------------------------


def set_task_identity(task_id: int, run_id: int, node_id: int) -> None:
    """Set the process-global identity `Message()` stamps new messages with."""
    check_layout("message")
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = task_id, run_id, node_id


def _set_metadata(metadata: Metadata, *, message_id: str | None, run_id: int | None) -> None:
    # flwr keeps these in private fields without public setters; flwr's own runtime writes them so
    if message_id is not None:
        metadata.__dict__["_message_id"] = message_id
    if run_id is not None:
        metadata.__dict__["_run_id"] = run_id


def stamp_metadata(metadata: Metadata, *, message_id: str | None = None, run_id: int | None = None) -> None:
    """Set a message's id and/or run id, which `Metadata` exposes read-only."""
    check_layout("message")
    _set_metadata(metadata, message_id=message_id, run_id=run_id)


# -- the SuperLink's and SuperNode's entry points -------------------------------------------------


def flower_superlink_main() -> None:
    """What the `flower-superlink` command runs (reads sys.argv)."""
    check_layout("superlink")
    from flwr.superlink.cli import flower_superlink

    flower_superlink()


def flower_supernode_main() -> None:
    """What the `flower-supernode` command runs (reads sys.argv), its log lines time-stamped:
    Flower's console lines carry no time by default and log files are more useful with it.

    And the process ends when the SuperNode's loop does, so that whoever supervises it restarts
    it (it registers again). flwr 1.42 serves the SuperNode's Runtime API on a thread that is not
    a daemon and that only `flwr_exit`'s exit handlers stop; a loop that ends any other way left
    the process alive, not connected and not online, for good (docs/flower.md, "A SuperNode
    alive but offline"). Two ways it did, both seen with real processes:
    - a second SIGINT during flwr's graceful exit: flwr's handler puts back the handler that was
      there before it (Python's, which raises KeyboardInterrupt) before `flwr_exit` has started
      its force-exit timer. flwr itself sends SIGINT from two threads when a SuperLink restarted
      without its state answers 401 (the node heartbeat's thread and the Fleet retry invoker), so
      both may come within milliseconds. The handler put back now does nothing
      (`_second_interrupt`): the graceful exit goes on, and its timer ends the process;
    - an error that the Fleet connection's context manager logs and swallows (e.g. a SuperLink,
      or a proxy in front of it, answering a pull with a status flwr does not retry, such as
      500): `start_client_internal` returns as if done. The process now logs why and exits."""
    check_layout("supernode")
    import signal

    from flwr.supercore.logger import update_console_handler
    from flwr.supernode.cli import flower_supernode

    update_console_handler(timestamps=True, colored=False)
    signal.signal(signal.SIGINT, _second_interrupt)  # what flwr's handler puts back (docstring)
    try:
        flower_supernode()
    except SystemExit:
        raise  # flwr_exit: its exit handlers ran and its force-exit timer is running
    except BaseException as exc:  # whatever ended the loop, the process must end
        _end_supernode_process(f"{type(exc).__name__}: {exc}")
    _end_supernode_process("flwr's SuperNode loop returned (the error it logged above ended it)")


def _second_interrupt(_signum: int, _frame: object) -> None:
    """SIGINT once flwr's graceful exit is under way: nothing to do, its force-exit timer ends the
    process. A Python handler, not SIG_IGN: processes flwr starts (plain mode's
    `flower-superexec`, `flwr-clientapp`) must not inherit an ignored SIGINT across exec."""


def _end_supernode_process(why: str) -> None:
    """End this process now, status 1: its SuperNode's loop is over, and the Runtime API thread
    that flwr did not stop would keep it alive without a connection."""
    import os
    import sys

    sys.stderr.write(f"SuperNode loop ended without Flower's exit ({why}): exiting so that the "
                     "node's supervisor restarts it\n")
    sys.stderr.flush()
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    os._exit(1)


# -- speed patches (exact flwr version only) -------------------------------------------------------


class IdlePacer:
    """How long a poller sleeps after a poll that found nothing: `fast` for `hot_s` seconds after
    the last activity (a message arrived or a reply went out: a study's next message is likely
    soon), then each sleep `growth` times the last, up to `slow`. So an idle poller costs a
    fraction of the CPU (its own and the server's, per request) and the latency it adds to a
    message is at most `slow`, and `fast` while a study's messages keep coming.
    With `poll_started` called as each poll begins, a poll the server held (a long poll,
    `_PollHold`) for at least the sleep is followed by the next one at once; a poll answered
    sooner by the whole sleep, as before.
    Thread-safe: the SuperNode's loop sleeps, its hook and executor thread mark activity."""

    def __init__(self, fast: float, slow: float | None = None, hot_s: float = 2.0,
                 growth: float = 1.5, clock: Callable[[], float] = _time.monotonic, *,
                 follow_up: float = 0.0, follow_up_s: float = 0.0) -> None:
        """`follow_up`, `follow_up_s`: after an activity that `expect_follow_up` announced (the
        reply to a SecAgg+ stage the server follows at once with the next stage), sleep
        `follow_up` instead of `fast` for at most `follow_up_s` or until the next activity (the
        message came); 0: no such window."""
        slow = fast if slow is None else slow
        if not (0 < fast <= slow) or hot_s < 0 or growth < 1:
            raise ValueError(f"pacer: need 0 < fast <= slow, hot_s >= 0, growth >= 1; got fast={fast!r}, "
                             f"slow={slow!r}, hot_s={hot_s!r}, growth={growth!r}")
        if not (0 <= follow_up <= fast) or follow_up_s < 0:
            raise ValueError(f"pacer: need 0 <= follow_up <= fast, follow_up_s >= 0; got "
                             f"follow_up={follow_up!r}, follow_up_s={follow_up_s!r}")
        self.fast, self.slow, self.hot_s, self.growth = fast, slow, hot_s, growth
        self.follow_up, self.follow_up_s = follow_up, follow_up_s
        self._clock = clock
        self._lock = threading.Lock()
        self._active_at = clock()
        self._last = fast
        self._poll_at: float | None = None
        #: a follow-up was announced: the next activity (the reply going out) opens the window
        self._follow_up_pending = False
        self._follow_up_until = 0.0

    def active(self) -> None:
        """Something happened: poll fast again (and, if `expect_follow_up` announced it, faster
        still for a while; any other activity, such as the awaited message, ends that window)."""
        with self._lock:
            self._active_at, self._last = self._clock(), self.fast
            opens = self._follow_up_pending and self.follow_up > 0
            self._follow_up_until = self._active_at + self.follow_up_s if opens else 0.0
            self._follow_up_pending = False

    def expect_follow_up(self) -> None:
        """The reply being prepared is one the server answers at once with another message (a
        SecAgg+ stage that is not the round's last): once it is out (the next `active`), poll
        every `follow_up` until that message comes or `follow_up_s` passed."""
        with self._lock:
            self._follow_up_pending = True

    def poll_started(self) -> None:
        """A poll begins now: the next sleep counts from here."""
        with self._lock:
            self._poll_at = self._clock()

    def next_sleep(self) -> float:
        with self._lock:
            now = self._clock()
            if now < self._follow_up_until:
                self._last = self.follow_up
            elif now - self._active_at < self.hot_s:
                self._last = self.fast
            else:
                self._last = min(self.slow, self._last * self.growth)
            if self._poll_at is None:
                return self._last
            waited, self._poll_at = now - self._poll_at, None
            return 0.0 if waited >= self._last else self._last


class ReplySignal:
    """The SuperNode loop's wait for its ClientApp's reply, ended by the executor when the reply
    is stored. flwr's `_push_messages` checks the node's state for a reply, and each reply object's
    content, then sleeps (0.5 s, ours `supernode_reply_sleep`) and checks again: a reply stored
    just after a check waited out the sleep. When the executor is a thread of the SuperNode's
    process (`hosted_supernode`), it says so (`supernode_reply_stored`) once the reply and its
    objects are in the state, and the wait ends then; the sleep stays its bound (a reply stored
    some other way is still found by the next check)."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def stored(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> float:
        """Wait up to `timeout` for a reply stored since the last wait; returns the sleep left
        (none: the caller checks again at once)."""
        self._event.wait(timeout)
        self._event.clear()
        return 0.0


#: callbacks run in the SuperNode's loop each time it stored a message for its ClientApp
_message_hooks: list[Callable[[], None]] = []
#: the SuperNode's idle pacing (`patch_supernode_sleeps`), marked active by the loop's wrappers
_supernode_pacers: list[IdlePacer] = []
#: the SuperNode loop's reply wait (`patch_supernode_sleeps`), ended by `supernode_reply_stored`
_reply_signals: list[ReplySignal] = []


def _sleep_proxy(mapping: dict[float, float | Callable[[], float]]) -> types.SimpleNamespace:
    """A stand-in for a module's global `time` whose `sleep` maps known literal values (to a
    number, or to a function giving the next sleep)."""

    def sleep(seconds: float) -> None:
        timeline.stamp("sn.sleep", seconds)
        value = mapping.get(seconds, seconds)
        _time.sleep(value() if callable(value) else value)

    proxy = types.SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    proxy.sleep = sleep
    setattr(proxy, _PATCHED_MARK, True)
    return proxy


def patch_supernode_sleeps(idle_sleep: float, reply_sleep: float, *, idle_sleep_max: float | None = None,
                           hot_s: float = 2.0, follow_up_sleep: float = 0.0,
                           follow_up_s: float = 0.0) -> None:
    """Shorten the SuperNode's hard-coded sleeps (must run in the SuperNode's own process).

    flwr 1.42 `supernode/start_client_internal.py` calls `time.sleep(3)` when a poll of the
    SuperLink finds no message and `time.sleep(0.5)` twice while waiting for the ClientApp's reply
    and its objects. We swap that module's global `time` for a proxy; flwr's source is untouched.
    The idle sleep is paced (`IdlePacer`): `idle_sleep` for `hot_s` after the node's last message
    or reply, then growing to `idle_sleep_max` (None: always `idle_sleep`), and `follow_up_sleep`
    for up to `follow_up_s` after a reply whose answer comes at once (`supernode_expects_follow_up`,
    a SecAgg+ stage that is not the round's last; 0: off). Every poll costs the
    SuperLink a request (a database transaction, its middleware): an idle consortium no longer
    keeps it busy (defaults and numbers: `RuntimeSettings`, docs/benchmarks/flower.md).
    """
    check_flwr_version()
    import flwr.supernode.start_client_internal as sci

    if getattr(sci.time, _PATCHED_MARK, False):
        return
    source = inspect.getsource(sci)
    _require(sci.time is _time, "start_client_internal no longer imports the `time` module")
    _require(source.count("time.sleep(3)") == 1, "start_client_internal: expected one time.sleep(3)")
    _require(source.count("time.sleep(0.5)") == 2, "start_client_internal: expected two time.sleep(0.5)")
    pacer = IdlePacer(idle_sleep, idle_sleep_max, hot_s, follow_up=follow_up_sleep, follow_up_s=follow_up_s)
    _supernode_pacers[:] = [pacer]
    signal = ReplySignal()
    _reply_signals[:] = [signal]
    _patch_supernode_loop(sci)
    sci.time = _sleep_proxy({3: pacer.next_sleep,  # type: ignore[assignment]
                             0.5: functools.partial(signal.wait, reply_sleep)})


def _patch_supernode_loop(sci: types.ModuleType) -> None:
    """Wrap the SuperNode loop's two steps (module globals its `start_client_internal` calls by
    name): after a message was stored for the ClientApp (its task created, its objects pulled)
    run `_message_hooks`; after either step mark the pacer active."""
    if getattr(sci._pull_and_store_message, _PATCHED_MARK, False):
        return
    _require("run_id = _pull_and_store_message(" in inspect.getsource(sci.start_client_internal)
             and "_push_messages(" in inspect.getsource(sci.start_client_internal),
             "start_client_internal no longer calls _pull_and_store_message and _push_messages")
    pull, push = sci._pull_and_store_message, sci._push_messages

    @functools.wraps(pull)
    def pull_and_store(*args: Any, **kwargs: Any) -> Any:
        for pacer in _supernode_pacers:  # a long poll's hold counts against the next sleep
            pacer.poll_started()
        if timeline.enabled():
            kwargs = _traced_fleet_calls(kwargs)
        run_id = pull(*args, **kwargs)
        if run_id is not None:
            timeline.stamp("sn.stored")
            for pacer in _supernode_pacers:
                pacer.active()
            for hook in list(_message_hooks):
                hook()
        return run_id

    @functools.wraps(push)
    def push_messages(*args: Any, **kwargs: Any) -> Any:
        if timeline.enabled():
            kwargs = _traced_fleet_calls(kwargs)
            timeline.stamp("sn.await_reply")
        try:
            return push(*args, **kwargs)
        finally:
            timeline.stamp("sn.pushed")
            for pacer in _supernode_pacers:  # the reply is out: the next message may come soon
                pacer.active()

    for wrapped in (pull_and_store, push_messages):
        setattr(wrapped, _PATCHED_MARK, True)
    setattr(sci, "_pull_and_store_message", pull_and_store)  # noqa: B010 (module globals of flwr's)
    setattr(sci, "_push_messages", push_messages)  # noqa: B010


def _received(got: Any) -> str:
    return "-" if got is None else timeline.short(got[0].metadata.message_id)


def _traced_fleet_calls(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The SuperNode loop's Fleet calls (keyword arguments of its two steps), stamping the
    `timeline` (only while it is on): the poll with the message it got, each object pull (``!``
    with ObjectUnavailableError: retried after a back-off), the receipt, the reply's push."""
    traced = dict(kwargs)
    if "receive" in kwargs:
        traced["receive"] = timeline.traced(kwargs["receive"], "sn.poll", _received)
    for name, event in (("pull_object", "sn.pull_obj"), ("confirm_message_received", "sn.confirm"),
                        ("push_object", "sn.push_obj")):
        if name in kwargs:
            traced[name] = timeline.traced(kwargs[name], event)
    if "send" in kwargs:
        send = kwargs["send"]

        def traced_send(message: Any, *args: Any, **kw: Any) -> Any:
            timeline.stamp("sn.send>", timeline.short(message.metadata.reply_to_message_id))
            result = send(message, *args, **kw)
            timeline.stamp("sn.send<")
            return result

        traced["send"] = traced_send
    return traced


def supernode_expects_message() -> None:
    """A message for this process's SuperNode is expected soon (a study approved here is about to
    start its run): its next polls are fast (`IdlePacer.active`), as after a message. No-op
    when the SuperNode's sleeps are not patched (plain mode, or no SuperNode in this process)."""
    for pacer in _supernode_pacers:
        pacer.active()


def supernode_expects_follow_up() -> None:
    """The ClientApp is answering a message the server follows at once with another (a SecAgg+
    stage that is not the round's last: `federated.secagg.client`): once the reply is out, this
    process's SuperNode polls every `follow_up_sleep` for a while (`IdlePacer.expect_follow_up`),
    so the next stage does not wait for the idle sleep. No-op without a patched SuperNode in this
    process (plain mode, an executor process of its own, in-process grids)."""
    for pacer in _supernode_pacers:
        pacer.expect_follow_up()


def supernode_reply_stored() -> None:
    """The executor thread has stored its reply (and its objects) in this process's SuperNode
    state: the SuperNode's loop, waiting for it, pushes it now instead of after its reply sleep
    (`ReplySignal`). No-op without a patched SuperNode in this process (plain mode, an executor
    process of its own)."""
    for signal in _reply_signals:
        signal.stored()


def on_supernode_message(callback: Callable[[], None]) -> None:
    """Call `callback` (in the SuperNode's loop, so it must be quick: set an Event) whenever this
    process's SuperNode has stored a message for its ClientApp: its task is ready to claim.
    `hosted_supernode` wakes its executor thread with it instead of the executor polling the
    runtime API. Must run in the SuperNode's own process, before its loop starts."""
    check_flwr_version()
    check_layout("patches")
    import flwr.supernode.start_client_internal as sci

    _patch_supernode_loop(sci)
    _message_hooks.append(callback)


#: callbacks run in the SuperNode's heartbeat thread after each heartbeat the SuperLink accepted
_heartbeat_hooks: list[Callable[[], None]] = []


def on_supernode_heartbeat(callback: Callable[[], None]) -> None:
    """Call `callback` (in the SuperNode's heartbeat thread; quick: touch a file) after each node
    heartbeat the SuperLink accepted: the node is online. `hosted_supernode` touches a file with
    it that the node daemon's supervisor watches (`ChildSpec.liveness_file`): a SuperNode alive but
    not online for too long is restarted. Must run in the SuperNode's own process, before its
    loop starts.

    Also keeps flwr's heartbeat thread alive on an answer flwr does not expect: flwr 1.42's
    `send_node_heartbeat` raises on any HTTP status but 401 and 502-504 (e.g. a 500 from a busy
    SuperLink) and on `success=False`; the exception ended the thread, and the node, still
    pulling, went offline for good. Such a heartbeat now counts as failed (flwr's sender retries
    it with its back-off); a 401 still ends the thread after flwr's own SIGINT."""
    check_flwr_version()
    import flwr.supernode.fleet_http_connection as fhc

    _heartbeat_hooks.append(callback)
    if getattr(fhc.HeartbeatSender, _PATCHED_MARK, False):
        return
    _require("heartbeat_sender = HeartbeatSender(send_node_heartbeat)" in inspect.getsource(fhc),
             "fleet_http_connection no longer builds its HeartbeatSender from send_node_heartbeat")
    original = fhc.HeartbeatSender

    def heartbeat_sender(heartbeat_fn: Callable[[], bool]) -> Any:
        return original(functools.partial(_reported_heartbeat, heartbeat_fn))

    setattr(heartbeat_sender, _PATCHED_MARK, True)
    setattr(fhc, "HeartbeatSender", heartbeat_sender)  # noqa: B010 (a module global of flwr's)


def _reported_heartbeat(heartbeat_fn: Callable[[], bool]) -> bool:
    """One node heartbeat (`on_supernode_heartbeat`): hooks on success; an unexpected error is a
    failed heartbeat (retried), a 401 goes on to end flwr's thread as before."""
    import logging

    import httpx

    try:
        ok = heartbeat_fn()
    except httpx.HTTPStatusError as exc:
        if exc.response.status_code == httpx.codes.UNAUTHORIZED:
            raise  # flwr has sent SIGINT: the SuperLink does not know this node
        logging.getLogger("federated.executor").warning("node heartbeat failed, retried: %s", exc)
        return False
    except Exception as exc:  # flwr's thread would end on it
        logging.getLogger("federated.executor").warning("node heartbeat failed, retried: %s: %s",
                                                        type(exc).__name__, exc)
        return False
    if ok:
        for hook in list(_heartbeat_hooks):
            hook()
    return ok


def patch_supernode_heartbeat(interval: float) -> None:
    """Make the SuperNode declare (and keep) a shorter heartbeat interval (SuperNode process only).

    flwr 1.42 hard-codes HEARTBEAT_DEFAULT_INTERVAL = 30 s in `supernode/fleet_http_connection.py`
    (the interval the node declares on ActivateNode / SendNodeHeartbeat) and in
    `supercore/heartbeat.py` (how often HeartbeatSender beats: (interval - 5) * ~0.8). The
    SuperLink marks a node offline after HEARTBEAT_PATIENCE (2) x the declared interval, so a
    killed SuperNode stays listed for up to 60 s, and a restarted one with SuperNode
    authentication cannot activate (Flower exit 305) until then. With 10 s (the SuperLink's
    minimum) that is 20 s, for one small request every ~4 s per node."""
    check_flwr_version()
    import flwr.common.constant as const
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fhc

    _require(const.HEARTBEAT_MIN_INTERVAL <= interval <= const.HEARTBEAT_MAX_INTERVAL,
             f"heartbeat interval {interval} outside the SuperLink's accepted range")
    for module in (fhc, hb):
        _require(hasattr(module, "HEARTBEAT_DEFAULT_INTERVAL"),
                 f"{module.__name__} no longer reads HEARTBEAT_DEFAULT_INTERVAL as a module global")
    _require(inspect.getsource(fhc).count("heartbeat_interval=HEARTBEAT_DEFAULT_INTERVAL") == 2,
             "fleet_http_connection: expected HEARTBEAT_DEFAULT_INTERVAL on activate and heartbeat")
    _require("next_interval: float = HEARTBEAT_DEFAULT_INTERVAL - HEARTBEAT_CALL_TIMEOUT"
             in inspect.getsource(hb.HeartbeatSender._run), "HeartbeatSender._run changed")
    setattr(fhc, "HEARTBEAT_DEFAULT_INTERVAL", interval)  # noqa: B010 (a module global of flwr's)
    setattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", interval)  # noqa: B010


def _partial_backoff(func: Callable[..., Any], initial_backoff: float, backoff_cap: float) -> Any:
    params = inspect.signature(func).parameters
    _require("initial_backoff" in params and "backoff_cap" in params,
             f"{func.__module__}.{func.__qualname__} lost its initial_backoff/backoff_cap arguments")
    patched = functools.partial(func, initial_backoff=initial_backoff, backoff_cap=backoff_cap)
    setattr(patched, _PATCHED_MARK, True)
    return patched


def _patch_attr(module: types.ModuleType, name: str, initial_backoff: float, backoff_cap: float) -> None:
    """Bind shorter back-off defaults into `module.name` (a pull function imported by name).

    Default arguments are bound when the function is defined, so changing
    `flwr.supercore.constant.PULL_INITIAL_BACKOFF` has no effect: wrap the function instead.
    """
    _require(hasattr(module, name), f"{module.__name__}.{name} is gone")
    current = getattr(module, name)
    if getattr(current, _PATCHED_MARK, False):
        return
    setattr(module, name, _partial_backoff(current, initial_backoff, backoff_cap))


def patch_supernode_pull_backoff(initial_backoff: float, backoff_cap: float = 0.5) -> None:
    """The SuperNode pulls a message's objects from the SuperLink with a 1 s initial back-off;
    the ServerApp often pushes the message a moment before its objects, so that 1 s is paid on
    nearly every message."""
    check_flwr_version()
    import flwr.supernode.start_client_internal as sci

    _patch_attr(sci, "pull_objects", initial_backoff, backoff_cap)


def patch_clientapp_pull_backoff(initial_backoff: float, backoff_cap: float = 0.5) -> None:
    """The SuperNode creates the ClientApp task before it holds the message's objects, so a fast
    executor asks too early and flwr backs off 1 s (`run_clientapp.pull_task_input`)."""
    check_flwr_version()
    from flwr.supernode.runtime import run_clientapp

    _patch_attr(run_clientapp, "pull_and_inflate_object_from_tree", initial_backoff, backoff_cap)


def patch_grid_pull_backoff(initial_backoff: float, backoff_cap: float = 0.5) -> None:
    """`HttpGrid.pull_messages` pulls reply objects with the same 1 s initial back-off."""
    check_flwr_version()
    from flwr.superlink.grid import http_grid

    _patch_attr(http_grid, "pull_objects", initial_backoff, backoff_cap)


#: `patch_grid_reply_pulls`: how many replies of one pull the ServerApp fetches at once (1: one
#: after another, as flwr does); set by each call of the patch
_reply_pulls = {"at_once": 1}


def patch_grid_reply_pulls(at_once: int) -> None:
    """The ServerApp's reply pull fetches the replies it got concurrently, up to `at_once` at a time.

    flwr 1.42's `HttpGrid.pull_messages` gets the replies that are in with one `PullMessages`,
    then for each reply, one after another, pulls its objects (two at a time) and confirms it:
    three replies of one pull were about nine requests in a row, 90 ms of a 360 ms unmask
    exchange at 3 hospitals under load (docs/benchmarks/flower.md, "The latency of one
    exchange"). Now each reply is fetched exactly as flwr does it (its objects with flwr's
    `pull_objects` as this module binds it, a reply whose objects cannot be pulled becomes flwr's
    `MESSAGE_UNAVAILABLE` error reply, the receipt confirmed once its objects are in), up to
    `at_once` replies at a time; the replies come back in the order the SuperLink gave them.
    1: one after another (flwr's order). ServerApp process only (the grid class is global)."""
    check_flwr_version()
    from flwr.superlink.grid import http_grid as hg

    if not (isinstance(at_once, int) and not isinstance(at_once, bool) and 1 <= at_once <= 64):
        raise ValueError(f"at_once: must be an integer in [1, 64], got {at_once!r}")
    _reply_pulls["at_once"] = at_once
    if getattr(hg.HttpGrid.pull_messages, _PATCHED_MARK, False) or at_once == 1:
        return  # 1 and not patched: flwr's own function stays
    source = inspect.getsource(hg.HttpGrid.pull_messages)
    for needle in ("self._runtime_client.PullMessages(", "all_object_contents = pull_objects(",
                   "make_pull_object_fn_protobuf(", "except ObjectPullError as e:",
                   "self._runtime_client.ConfirmMessageReceived(",
                   "inflate_object_from_contents(msg_id, all_object_contents)",
                   "code=ErrorCode.MESSAGE_UNAVAILABLE", "REQUEST_ENTITY_TOO_LARGE"):
        _require(needle in source, f"HttpGrid.pull_messages changed: no longer {needle!r}")
    for name in ("PullAppMessagesRequest", "ConfirmMessageReceivedRequest", "iterate_object_tree",
                 "make_message", "Metadata", "Error", "ErrorCode", "SYSTEM_MESSAGE_TYPE", "now",
                 "ObjectPullError", "inflate_object_from_contents", "Run", "log", "ERROR",
                 "ERROR_MESSAGE_PULL_MESSAGES_PAYLOAD_TOO_LARGE", "httpx"):
        _require(hasattr(hg, name), f"flwr.superlink.grid.http_grid no longer has {name}")
    original = hg.HttpGrid.pull_messages

    def fetch(grid: Any, run_id: int, msg_proto: Any, msg_tree: Any) -> Any:
        """One reply, as flwr's loop body: its objects, then its receipt, then the Message."""
        msg_id = msg_proto.metadata.message_id
        try:
            contents = hg.pull_objects(
                object_ids=[tree.object_id for tree in hg.iterate_object_tree(msg_tree)],
                pull_object_fn=hg.make_pull_object_fn_protobuf(
                    pull_object_protobuf=grid._runtime_client.PullObject, node=grid.node, run_id=run_id),
            )
        except hg.ObjectPullError as e:
            return hg.make_message(
                metadata=hg.Metadata(run_id=run_id, message_id="", src_node_id=grid.node.node_id,
                                     dst_node_id=grid.node.node_id, message_type=hg.SYSTEM_MESSAGE_TYPE,
                                     group_id="", ttl=0,
                                     reply_to_message_id=msg_proto.metadata.reply_to_message_id,
                                     created_at=hg.now().timestamp()),
                error=hg.Error(code=hg.ErrorCode.MESSAGE_UNAVAILABLE,
                               reason=("Reply message objects are unavailable. The sender may not have "
                                       "completed the upload before the object-push session expired. "
                                       f"{e}")),
            )
        grid._runtime_client.ConfirmMessageReceived(
            hg.ConfirmMessageReceivedRequest(node=grid.node, run_id=run_id, message_object_id=msg_id))
        message: Any = hg.inflate_object_from_contents(msg_id, contents)  # a Message (flwr casts)
        message.metadata.__dict__["_message_id"] = msg_id
        return message

    @functools.wraps(original)
    def pull_messages(self: Any, message_ids: Any) -> Any:
        at_once = _reply_pulls["at_once"]
        run_id = self._run.run_id
        try:
            res = self._runtime_client.PullMessages(hg.PullAppMessagesRequest(message_ids=message_ids))
            pairs = list(zip(res.messages_list, res.message_object_trees, strict=True))
            if at_once <= 1 or len(pairs) <= 1:
                return [fetch(self, run_id, proto, tree) for proto, tree in pairs]
            with concurrent.futures.ThreadPoolExecutor(max_workers=min(at_once, len(pairs)),
                                                       thread_name_prefix="reply-pull") as pool:
                return list(pool.map(lambda pair: fetch(self, run_id, *pair), pairs))
        except hg.httpx.HTTPStatusError as e:
            if e.response.status_code == hg.httpx.codes.REQUEST_ENTITY_TOO_LARGE:
                hg.log(hg.ERROR, hg.ERROR_MESSAGE_PULL_MESSAGES_PAYLOAD_TOO_LARGE)
                return []
            raise

    setattr(pull_messages, _PATCHED_MARK, True)
    hg.HttpGrid.pull_messages = pull_messages  # type: ignore[method-assign]


def is_patched(obj: object) -> bool:
    """Whether `obj` (a module's `time` or a pull function) carries one of our patches."""
    return bool(getattr(obj, _PATCHED_MARK, False))


# -- SecAgg+ (Flower's secaggplus_mod at the hospital, its primitives at the server) -------------

#: flwr.common.secure_aggregation.secaggplus_constants values the server side speaks (checked by
#: `check_layout("secagg")`): the ConfigRecord every SecAgg+ message carries, its stage names and keys.
SECAGG_CONFIGS_KEY = "secaggplus_configs"
SECAGG_STAGES = ("setup", "share_keys", "collect_masked_vectors", "unmask")
SECAGG_KEYS = {"STAGE": "stage", "SAMPLE_NUMBER": "sample_num", "SHARE_NUMBER": "share_num",
               "THRESHOLD": "threshold", "CLIPPING_RANGE": "clipping_range", "TARGET_RANGE": "target_range",
               "MOD_RANGE": "mod_range", "MAX_WEIGHT": "max_weight", "PUBLIC_KEY_1": "pk1",
               "PUBLIC_KEY_2": "pk2", "DESTINATION_LIST": "dsts", "CIPHERTEXT_LIST": "ctxts",
               "SOURCE_LIST": "srcs", "MASKED_PARAMETERS": "masked_params",
               "ACTIVE_NODE_ID_LIST": "active_nids",
               "DEAD_NODE_ID_LIST": "dead_nids", "NODE_ID_LIST": "nids", "SHARE_LIST": "shares"}
_SECAGG_MOD_MODULE = "flwr.client.mod.secure_aggregation.secaggplus_mod"


def _check_secagg_semantics() -> None:
    from flwr.common.secure_aggregation import secaggplus_constants as c

    _require(c.RECORD_KEY_CONFIGS == SECAGG_CONFIGS_KEY, "RECORD_KEY_CONFIGS changed")
    _require(tuple(c.Stage.all()) == SECAGG_STAGES, "the SecAgg+ stages changed")
    for name, value in SECAGG_KEYS.items():
        _require(getattr(c.Key, name) == value, f"secaggplus Key.{name} is no longer {value!r}")


def secaggplus_mod() -> Callable[..., Message]:
    """Flower's own SecAgg+ client mod (`flwr.client.mod.secaggplus_mod`), unmodified.

    Its constants are checked once per process (the mod runs for every stage message)."""
    check_layout("secagg")
    if "secagg-semantics" not in _checked:
        _check_secagg_semantics()
        _checked.add("secagg-semantics")
    module = importlib.import_module(_SECAGG_MOD_MODULE)
    mod: Callable[..., Message] = module.secaggplus_mod
    return mod


def _chacha_prg(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[Any]:
    """Mask expansion from the WHOLE seed: ChaCha20 keyed with SHA-256(seed), uniform in
    [0, num_range) for a power-of-two `num_range` (SecAgg+ requires one)."""
    import hashlib

    import numpy as np
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    if num_range <= 0 or num_range & (num_range - 1):
        raise ValueError(f"mod_range: must be a power of two, got {num_range}")
    key = hashlib.sha256(b"exchange-secagg-prg-v1" + seed).digest()
    stream = Cipher(algorithms.ChaCha20(key, b"\0" * 16), mode=None).encryptor()
    out = []
    for shape in dimensions_list:
        count = int(np.prod(shape, dtype=np.int64)) if shape else 1
        raw = np.frombuffer(stream.update(b"\0" * (8 * count)), dtype=np.uint64)
        values = (raw & np.uint64(num_range - 1)).astype(np.int64)
        out.append(values.reshape(shape) if shape else np.array(values[0], dtype=np.int64))
    return out


def patch_secagg_prg() -> None:
    """Make Flower's SecAgg+ masks cryptographically strong.

    flwr 1.42's `pseudo_rand_gen` XOR-folds the 32-byte seed into a 32-bit numpy RandomState
    seed, so every mask has at most 2**32 candidates: an offline search could strip a hospital's
    private mask. The patch replaces the name the client mod calls with `_chacha_prg`; the
    server side (`federated.secagg.server`) calls `secagg_prg`, the same function, so both sides
    agree. A hospital without the patch produces masks the server cannot remove: the aggregate's
    integrity check fails and the round fails cleanly (never a wrong model)."""
    module = importlib.import_module(_SECAGG_MOD_MODULE)
    if is_patched(module.pseudo_rand_gen):  # first: this runs for every stage message
        return
    check_flwr_version()
    check_layout("secagg")
    setattr(_chacha_prg, _PATCHED_MARK, True)
    setattr(module, "pseudo_rand_gen", _chacha_prg)  # noqa: B010 (mypy: no such attribute in its stubs)


def patch_secagg_shamir() -> None:
    """Make `secaggplus_mod` share its secrets with `federated.secagg.shamir.create_shares`.

    Same scheme, field and share layout as flwr's `create_shares` (its shares combine with flwr's
    `combine_shares` and the other way round; tests/federated/test_secagg_shamir.py), without a
    thread pool per call and with integer arithmetic instead of pycryptodome's per-bit string
    operations: ~10x less CPU per secret, and no threads waiting for a core on a busy node."""
    from federated.secagg import shamir

    module = importlib.import_module(_SECAGG_MOD_MODULE)
    if module.create_shares is shamir.create_shares:
        return
    check_flwr_version()
    check_layout("secagg")
    from flwr.common.secure_aggregation.crypto import shamir as flwr_shamir

    _require(module.create_shares is flwr_shamir.create_shares,
             "secaggplus_mod no longer calls flwr's create_shares")
    setattr(module, "create_shares", shamir.create_shares)  # noqa: B010


#: at most this many private keys `patch_secagg_key_parsing` keeps (a round's two, for the current
#: round and the pipelined next one, with room to spare); the oldest goes first
PRIVATE_KEYS_KEPT = 8


class _PrivateKeyCache:
    """The key objects of the private keys `secaggplus_mod` serialised in its setup stage, by
    their PEM bytes: its later stages parse the same PEM once per neighbour (`bytes_to_private_key`
    inside a loop: 2 (n - 1) parses per hospital and round, ~1 ms each), and get the object back."""

    def __init__(self, to_bytes: Callable[[Any], bytes], parse: Callable[[bytes], Any]) -> None:
        self._to_bytes, self._parse = to_bytes, parse
        self._keys: OrderedDict[bytes, Any] = OrderedDict()
        self._lock = threading.Lock()

    def _keep(self, data: bytes, key: Any) -> None:
        with self._lock:
            self._keys[data] = key
            self._keys.move_to_end(data)
            while len(self._keys) > PRIVATE_KEYS_KEPT:
                self._keys.popitem(last=False)

    def private_key_to_bytes(self, key: Any) -> bytes:
        data = self._to_bytes(key)
        self._keep(data, key)
        return data

    def bytes_to_private_key(self, data: bytes) -> Any:
        with self._lock:
            key = self._keys.get(data)
        if key is None:
            key = self._parse(data)
            self._keep(data, key)
        return key


def patch_secagg_key_parsing() -> None:
    """Let `secaggplus_mod` parse each of its private keys once (`_PrivateKeyCache`): the same
    keys and the same results, without re-reading the PEM for every neighbour. The keys it keeps
    are the ones its state already holds, in the same process (the last `PRIVATE_KEYS_KEPT`)."""
    module = importlib.import_module(_SECAGG_MOD_MODULE)
    if is_patched(module.bytes_to_private_key):  # first: this runs for every stage message
        return
    check_flwr_version()
    check_layout("secagg")
    from flwr.supercore.primitives import asymmetric

    _require(module.bytes_to_private_key is asymmetric.bytes_to_private_key
             and module.private_key_to_bytes is asymmetric.private_key_to_bytes,
             "secaggplus_mod no longer calls flwr's bytes_to_private_key / private_key_to_bytes")
    cache = _PrivateKeyCache(asymmetric.private_key_to_bytes, asymmetric.bytes_to_private_key)
    for name in ("bytes_to_private_key", "private_key_to_bytes"):
        function = getattr(cache, name)

        @functools.wraps(getattr(asymmetric, name))
        def wrapper(arg: Any, _function: Callable[[Any], Any] = function) -> Any:
            return _function(arg)

        setattr(wrapper, _PATCHED_MARK, True)
        setattr(module, name, wrapper)


def secagg_prg(seed: bytes, num_range: int, dimensions_list: Sequence[tuple[int, ...]]) -> list[Any]:
    """The mask generator both sides use once `patch_secagg_prg` ran."""
    return _chacha_prg(seed, num_range, dimensions_list)


@dataclass(frozen=True)
class SecAggPrimitives:
    """The pieces of flwr's SecAgg+ implementation the server side of the protocol uses."""

    combine_shares: Callable[[list[bytes]], bytes]
    generate_shared_key: Callable[[Any, Any], bytes]
    bytes_to_private_key: Callable[[bytes], Any]
    bytes_to_public_key: Callable[[bytes], Any]
    public_key_to_bytes: Callable[[Any], bytes]
    dequantize: Callable[..., list[Any]]
    bytes_to_ndarray: Callable[[bytes], Any]


def secagg_primitives() -> SecAggPrimitives:
    check_layout("secagg")
    _check_secagg_semantics()
    from flwr.common import bytes_to_ndarray
    from flwr.common.secure_aggregation.crypto.symmetric_encryption import generate_shared_key
    from flwr.common.secure_aggregation.quantization import dequantize
    from flwr.supercore.primitives.asymmetric import (
        bytes_to_private_key,
        bytes_to_public_key,
        public_key_to_bytes,
    )

    from federated.secagg.shamir import combine_shares  # flwr's, without its costs (its docstring)

    return SecAggPrimitives(combine_shares, generate_shared_key, bytes_to_private_key, bytes_to_public_key,
                            public_key_to_bytes, dequantize, bytes_to_ndarray)


def fitres_content(update: Any, num_examples: int) -> Any:
    """A reply's RecordDict in the legacy FitRes layout `secaggplus_mod` reads the update from."""
    check_layout("secagg")
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.compat.common.recorddict_compat import fitres_to_recorddict

    fitres = FitRes(status=Status(code=Code.OK, message=""), parameters=ndarrays_to_parameters([update]),
                    num_examples=num_examples, metrics={})
    return fitres_to_recorddict(fitres, keep_input=True)


# -- the SuperLink's HTTP API (our `superlink_main` process only) -----------------------------------
#
# flwr 1.42 serves the Fleet, Runtime and Control APIs from one FastAPI app whose stack has eight
# Starlette `BaseHTTPMiddleware` layers, four of them for the Control API and two for the Fleet
# API only; each layer costs every request a task group, memory streams and a Request object,
# whether it acts or not. Every SuperNode poll (`PullMessages`) pays all of them, the node's
# signature check and an SQLAlchemy UPDATE claim, even when nothing is pending (docs/benchmarks/
# flower.md, "SuperLink CPU per request"). Two patches, both applied before the app is built:
# `patch_superlink_middleware` lets each API's middleware see only its own API's paths, and
# `patch_superlink_idle_pulls` answers a poll early when the node is known to have nothing pending.

_CONTROL_PREFIX = "/v1/control/"
_FLEET_PREFIX = "/v1/fleet/"
_PULL_MESSAGES_PATH = "/v1/fleet/pull-messages"
_SCOPED_MARK = "_exchange_scoped"
#: Flower's middleware classes that act only on one API's paths (checked against their source
#: by `_superlink_middleware_scopes`), by the prefix of that API
_CONTROL_ONLY = ("ControlSensitiveResponseMiddleware", "ControlAuthenticationMiddleware",
                 "ControlLicenseMiddleware", "ControlEventLogMiddleware")
_FLEET_ONLY = ("NodeAuthMiddleware", "FleetEventLogMiddleware")
#: event-log middlewares -> the app state attribute holding their plugin (they act only with one)
_EVENT_LOG_PLUGINS = {"FleetEventLogMiddleware": "fleet_event_log_plugin",
                      "ControlEventLogMiddleware": "control_event_log_plugin"}


class _PathScoped:
    """Pure ASGI: run `inner` (a Starlette middleware) only for HTTP requests under `prefix` (and,
    with `plugin`, only while the app state's `plugin` is set: an event-log middleware does
    nothing without its plugin); every other request goes straight to the next app. Flower's own
    checks inside the middleware stay: this only skips a layer that would have passed the request
    on untouched."""

    def __init__(self, app: Any, *, inner: Any, prefix: str, plugin: str | None = None) -> None:
        cls, args, kwargs = inner
        self.app = app
        self.inner = cls(app, *args, **kwargs)
        self.prefix = prefix
        self.plugin = plugin

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["path"].startswith(self.prefix)
                and (self.plugin is None or getattr(scope["app"].state, self.plugin, None) is not None)):
            await self.inner(scope, receive, send)
        else:
            await self.app(scope, receive, send)


class _NodeAuth:
    """Pure ASGI in place of flwr's `NodeAuthMiddleware` (a `BaseHTTPMiddleware`): the same check
    (flwr's own `authenticate_node`, in the thread pool) on the same requests (Fleet paths whose
    protobuf request the translation layer parsed), before the handler; its `HTTPException`
    (401) reaches flwr's error translator outside as before."""

    def __init__(self, app: Any) -> None:
        from flwr.superlink.routers.fleet.node_auth import authenticate_node
        from google.protobuf.message import Message as ProtobufMessage

        self.app = app
        self._authenticate, self._protobuf = authenticate_node, ProtobufMessage

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and scope["path"].startswith(_FLEET_PREFIX)
                and isinstance(scope.get("state", {}).get("protobuf_request"), self._protobuf)):
            from starlette.concurrency import run_in_threadpool
            from starlette.requests import Request

            await run_in_threadpool(self._authenticate, Request(scope, receive))
        await self.app(scope, receive, send)


def _superlink_middleware_scopes() -> dict[Any, str]:
    """Flower's path-specific middleware classes -> the path prefix each acts on, after checking
    (in their source) that each passes every other path on unchanged."""
    from flwr.superlink.routers.control import middlewares as control
    from flwr.superlink.routers.fleet import middlewares as fleet
    from flwr.superlink.routers.fleet import node_auth

    scopes: dict[Any, str] = {}
    for module, names, prefix in ((control, _CONTROL_ONLY, _CONTROL_PREFIX),
                                  (fleet, ("FleetEventLogMiddleware",), _FLEET_PREFIX),
                                  (node_auth, ("NodeAuthMiddleware",), _FLEET_PREFIX)):
        for name in names:
            _require(hasattr(module, name), f"{module.__name__}.{name} is gone")
            cls = getattr(module, name)
            source = inspect.getsource(cls)
            acts_on_prefix = (f'startswith("{prefix}")' in source or "_is_control_path(" in source
                              or "_is_control_sensitive_route(" in source)
            _require(acts_on_prefix, f"{module.__name__}.{name} no longer checks its path")
            scopes[cls] = prefix
    _require('path.startswith("/v1/control/")' in inspect.getsource(control._is_control_path),
             "routers.control.middlewares._is_control_path changed")
    _require(all(path.startswith(_CONTROL_PREFIX) for _method, path in control.CONTROL_SENSITIVE_ROUTE_KEYS),
             "a sensitive Control route outside /v1/control/")
    return scopes


#: what SQLite says when a transaction could not get its lock within the busy timeout
_BUSY_DATABASE_ERRORS = ("database is locked", "database table is locked")


def _busy_database_retryable(translator: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's `http_error_translator` (exceptions -> JSON errors), except that SQLite's "database
    is locked" becomes 503 instead of 500. Flower's HTTP clients (SuperNode, ServerApp grid)
    retry a 503 and give up on a 500: under load a SuperNode's reply push then failed outright and
    its round waited out its timeout. Retrying is safe: the failed transaction was rolled back."""
    import logging

    from sqlalchemy.exc import OperationalError
    from starlette.responses import JSONResponse

    log = logging.getLogger("federated.superlink")

    async def dispatch(request: Any, call_next: Any) -> Any:
        async def call_next_busy_retryable(inner_request: Any) -> Any:
            try:
                return await call_next(inner_request)
            except OperationalError as exc:
                if not any(text in str(exc.orig) for text in _BUSY_DATABASE_ERRORS):
                    raise
                log.warning("%s: the SuperLink's database stayed locked (%s); answered 503 so the "
                            "client retries", request.url.path, exc.orig)
                return JSONResponse({"detail": "The SuperLink's database is busy; retry."}, status_code=503,
                                    headers={"Retry-After": "1"})

        return await translator(request, call_next_busy_retryable)

    return dispatch


def patch_superlink_middleware() -> None:
    """Make flwr's SuperLink app run each path-specific middleware only for its own API's paths
    (this process must be the SuperLink's, before its app is built). The Fleet API then crosses
    four layers instead of eight, the Runtime API two; the Control API all of them, as before."""
    check_flwr_version()
    import flwr.superlink.main as superlink_main

    current = superlink_main._get_middleware
    if getattr(current, _SCOPED_MARK, False):
        return
    scopes = _superlink_middleware_scopes()
    from flwr.superlink.routers.fleet import node_auth

    dispatch_source = inspect.getsource(node_auth.NodeAuthMiddleware.dispatch)
    _require('request.url.path.startswith("/v1/fleet/")' in dispatch_source
             and 'getattr(request.state, "protobuf_request", None), Message' in dispatch_source
             and "await run_in_threadpool(authenticate_node, request)" in dispatch_source
             and "return await call_next(request)" in dispatch_source,
             "fleet NodeAuthMiddleware.dispatch changed (what _NodeAuth does instead)")
    for name, attribute in _EVENT_LOG_PLUGINS.items():
        api = "control" if name.startswith("Control") else "fleet"
        module = importlib.import_module(f"flwr.superlink.routers.{api}.middlewares")
        _require(f'"{attribute}", None' in inspect.getsource(getattr(module, name).dispatch)
                 and "is None" in inspect.getsource(getattr(module, name).dispatch),
                 f"{name} no longer passes requests on without its plugin")
    from flwr.supercore.error import http_error_translator
    from starlette.middleware import Middleware
    from starlette.middleware.base import BaseHTTPMiddleware

    translator = _busy_database_retryable(http_error_translator)

    def get_middleware() -> list[Any]:
        out = []
        for middleware in current():
            dispatch = middleware.kwargs.get("dispatch")
            if middleware.cls is BaseHTTPMiddleware and dispatch is http_error_translator:
                out.append(Middleware(BaseHTTPMiddleware, dispatch=translator))
                continue
            if middleware.cls is node_auth.NodeAuthMiddleware:
                out.append(Middleware(_NodeAuth))
                continue
            prefix = scopes.get(middleware.cls)
            plugin = _EVENT_LOG_PLUGINS.get(getattr(middleware.cls, "__name__", ""))
            out.append(middleware if prefix is None
                       else Middleware(_PathScoped, inner=middleware, prefix=prefix, plugin=plugin))
        _require(sum(m.cls in (_PathScoped, _NodeAuth) for m in out) == len(scopes),
                 "superlink.main._get_middleware no longer lists every Control and Fleet middleware")
        _require(any(m.kwargs.get("dispatch") is translator for m in out),
                 "superlink.main._get_middleware no longer lists http_error_translator")
        return out

    setattr(get_middleware, _PATCHED_MARK, True)
    setattr(get_middleware, _SCOPED_MARK, True)
    setattr(superlink_main, "_get_middleware", get_middleware)  # noqa: B010 (a module global of flwr's)


class PendingTracker:
    """Which SuperNodes are known to have no message waiting at the SuperLink.

    A node is known idle only after a full `PullMessages` (authenticated and answered by Flower's
    own handler) found nothing for it, and only until: a message for it is stored and committed
    (`bump`, from the LinkState hook), or `recheck_s` passed (then the next poll takes the full
    path again, which re-authenticates the node against the database and re-reads its queue).
    A fresh SuperLink process knows nothing: after a restart every first poll takes the full
    path. The entry also records the public key that poll authenticated with: an early answer
    needs the same key and a valid signature of the request's own time stamp.

    `kind` ("node": SuperNodes by node id, "run": ServerApps' reply pulls by run id) names the
    tracker's keys for the recheck hook (`set_recheck_due`): a key whose due time has passed is
    not vouched for any more, whatever `recheck_s` says (a message held back for its objects is
    checked against the database by then, even should its wake never come)."""

    def __init__(self, recheck_s: float, kind: Literal["node", "run"] = "node") -> None:
        if not recheck_s > 0:
            raise ValueError(f"recheck_s: must be > 0, got {recheck_s!r}")
        if kind not in ("node", "run"):
            raise ValueError(f"kind: must be 'node' or 'run', got {kind!r}")
        self.recheck_s = recheck_s
        self.kind = kind
        self._lock = threading.Lock()
        self._generation: dict[int, int] = {}
        self._idle: dict[int, tuple[int, bytes, float]] = {}  # node -> (generation, public key, until)
        #: held polls (`wait_idle`): node -> the (event loop, future) each waits on
        self._waiters: dict[int, list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]] = {}
        self._released = False

    def generation(self, node_id: int) -> int:
        with self._lock:
            return self._generation.get(node_id, 0)

    def bump(self, node_id: int, *, wake: bool = True) -> None:
        """A message for `node_id` was stored (or is about to be visible): not idle any more.
        `wake`: end its held polls too (not while the store's transaction is still open: a
        poll answered then would find nothing yet; the bump at its commit wakes them)."""
        with self._lock:
            self._generation[node_id] = self._generation.get(node_id, 0) + 1
            self._idle.pop(node_id, None)
            waiters = self._waiters.pop(node_id, []) if wake else []
        _wake(waiters)

    def release_all(self) -> None:
        """End every held poll now and hold none from now on (the SuperLink is shutting down):
        each answers as if its hold had run out, so no request keeps the server from stopping."""
        with self._lock:
            self._released = True
            waiters = [w for ws in self._waiters.values() for w in ws]
            self._waiters.clear()
        _wake(waiters)

    async def wait_idle(self, node_id: int, public_key: bytes, hold_s: float) -> bool:
        """Hold a poll (no thread: an asyncio future) while the node stays known idle with this
        public key: until a message for it is stored (`bump`, from any thread), its idle entry
        expires, `hold_s` passed, or `release_all`. The caller then reads `idle_key` again:
        still idle means nothing came (answer empty), else Flower's full path answers. Returns
        whether it held the poll at all."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        waiter = (loop, future)
        with self._lock:
            entry = self._idle.get(node_id)
            if (self._released or entry is None or entry[1] != public_key
                    or entry[0] != self._generation.get(node_id, 0)):
                return False
            self._waiters.setdefault(node_id, []).append(waiter)
            until = min(entry[2], self._due(node_id))
        try:
            await asyncio.wait({future}, timeout=max(0.0, min(hold_s, until - _time.monotonic())))
        finally:
            with self._lock:
                waiting = self._waiters.get(node_id, [])
                if waiter in waiting:
                    waiting.remove(waiter)
                if not waiting:
                    self._waiters.pop(node_id, None)
        return True

    def held(self) -> int:
        """How many polls are held now (all nodes)."""
        with self._lock:
            return sum(len(ws) for ws in self._waiters.values())

    def mark_idle(self, node_id: int, generation: int, public_key: bytes) -> None:
        """A full poll that started at `generation` found nothing: idle, unless a message was
        stored meanwhile (the generation moved)."""
        with self._lock:
            if self._generation.get(node_id, 0) == generation:
                self._idle[node_id] = (generation, public_key, _time.monotonic() + self.recheck_s)

    def forget(self, node_id: int) -> None:
        with self._lock:
            self._idle.pop(node_id, None)

    def idle_key(self, node_id: int) -> bytes | None:
        """The public key of the node's last empty full poll, if the node is still known idle."""
        with self._lock:
            entry = self._idle.get(node_id)
            if entry is None:
                return None
            generation, public_key, until = entry
            if (generation != self._generation.get(node_id, 0)
                    or _time.monotonic() >= min(until, self._due(node_id))):
                self._idle.pop(node_id, None)
                return None
            return public_key

    def _due(self, ident: int) -> float:
        """When `ident` must next be checked against the database (`set_recheck_due`'s hook;
        lock-free, called under this tracker's lock); infinity: only `recheck_s` applies."""
        due = _recheck_due[0]
        return float("inf") if due is None else due((self.kind, ident))


#: the recheck hook (`set_recheck_due`): (kind, id) -> monotonic time of its next database check
_recheck_due: list[Callable[[tuple[str, int]], float] | None] = [None]


def set_recheck_due(due: Callable[[tuple[str, int]], float] | None) -> None:
    """Install (None: remove) the SuperLink's recheck hook: `due(("node", id))` / `due(("run",
    id))` answers by when (`time.monotonic()`) that receiver must be checked against the database
    by a full poll; until then an idle entry may vouch for it, after it none does
    (`superlink_delivery`: a message held back for its objects is looked at again within a bound,
    whatever happens to its wake). Must be lock-free and cheap: every early answer calls it."""
    _recheck_due[0] = due


def _wake(waiters: Sequence[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]) -> None:
    """Resolve held polls' futures from any thread (the LinkState hook runs in a worker thread):
    each on its own event loop, thread-safely; a loop already closed has no poll left to wake."""
    for loop, future in waiters:
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve, future)


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


#: the SuperLink process's trackers (`patch_superlink_idle_pulls`): SuperNodes by node id, the
#: ServerApps' reply pulls by run id
_pending: list[PendingTracker] = []
_pending_runs: list[PendingTracker] = []
_SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID, checked by patch_superlink_idle_pulls
_RUNTIME_PULL_PATH = "/v1/runtime/pull-messages"
#: how long an empty reply pull vouches for a run at most: Flower makes error replies itself when a
#: node went offline or a message expired, which no store announces
_REPLY_RECHECK_S = 1.0
_STORED_NODES_KEY = "exchange_stored_for_nodes"
#: a held Fleet poll goes on to Flower's full path only while its signed time stamp stays inside
#: Flower's window at least this long (else it is answered empty and the next poll, freshly signed,
#: fetches the message)
_HOLD_WINDOW_MARGIN_S = 2.0


def _bump_key(key: tuple[str, int], *, wake: bool = True) -> None:
    """A message was stored: for a node ("node", id: its SuperNode's polls) or for a run's
    ServerApp ("run", id: a reply, or an instruction to the SuperLink's own node)."""
    kind, ident = key
    for tracker in _pending if kind == "node" else _pending_runs:
        tracker.bump(ident, wake=wake)


#: Set (by `superlink_delivery`) while a message with objects still to come is stored: the store
#: hook (`_patch_linkstate_store_hook`) then neither ends its receiver's known idleness nor wakes
#: its held polls; the delivery watch wakes them once the message is deliverable. Here, not in
#: `superlink_delivery`, so that this module needs nothing of the modules built on it.
STORE_IS_QUIET: contextvars.ContextVar[bool] = contextvars.ContextVar("store_is_quiet", default=False)


def wake_receiver(key: tuple[str, int]) -> None:
    """A message for `key` ("node", id / "run", id) became deliverable (its objects are all there:
    `superlink_delivery`): end the receiver's idleness and wake its held polls."""
    _bump_key(key)


def _patch_linkstate_store_hook() -> None:
    """Bump the trackers for a message's destination node whenever flwr's SQL LinkState stores a
    message for a node: once when stored, and again when the transaction holding the insert
    commits (a poll that ran between the two saw nothing yet; the second bump voids its result).
    Held polls (`_PollHold`) wake at the commit only, when the message is there to be read."""
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from sqlalchemy import event
    from sqlalchemy.orm import Session

    store = SqlLinkState.store_message_ins
    if getattr(store, _PATCHED_MARK, False):
        return
    _require("def session(" in inspect.getsource(importlib.import_module("flwr.supercore.sql_mixin")),
             "flwr.supercore.sql_mixin no longer has session()")

    store_res = SqlLinkState.store_message_res
    _require("run_id" in inspect.getsource(store_res), "SqlLinkState.store_message_res changed")

    def _stored(self: Any, keys: list[tuple[str, int]], original: Callable[..., Any], message: Any) -> Any:
        if STORE_IS_QUIET.get():  # objects still to come: the receiver stays idle, woken once they are in
            return original(self, message)
        with self.session() as session:  # re-entrant: joins the caller's transaction if any
            for key in keys:
                _bump_key(key, wake=False)  # held polls wake at the commit (`after_commit`)
            session.info.setdefault(_STORED_NODES_KEY, set()).update(keys)
            return original(self, message)

    @functools.wraps(store)
    def store_message_ins(self: Any, message: Any) -> Any:
        keys = [("node", int(message.metadata.dst_node_id))]
        if int(message.metadata.dst_node_id) == _SUPERLINK_NODE_ID:  # pulled by the ServerApp's grid
            keys.append(("run", int(message.metadata.run_id)))
        return _stored(self, keys, store, message)

    @functools.wraps(store_res)
    def store_message_res(self: Any, message: Any) -> Any:
        return _stored(self, [("run", int(message.metadata.run_id))], store_res, message)

    def after_commit(session: Any) -> None:
        for key in session.info.pop(_STORED_NODES_KEY, ()):
            _bump_key(key)

    def after_rollback(session: Any) -> None:
        session.info.pop(_STORED_NODES_KEY, None)

    event.listen(Session, "after_commit", after_commit)
    event.listen(Session, "after_soft_rollback", lambda session, _previous: after_rollback(session))
    for wrapped in (store_message_ins, store_message_res):
        setattr(wrapped, _PATCHED_MARK, True)
    setattr(SqlLinkState, "store_message_ins", store_message_ins)  # noqa: B010 (a method of flwr's)
    setattr(SqlLinkState, "store_message_res", store_message_res)  # noqa: B010


class _PollHold:
    """Long polls for a shortcut: a poll the shortcut may answer empty is held first (no thread:
    `PendingTracker.wait_idle`) for up to `hold_s`, so an idle poller asks once per hold instead
    of once per its own sleep, and a message stored meanwhile is answered at once by Flower's full
    path. At most `max_held` polls are held at a time (more are answered empty at once, as
    without holds); `hold_s` 0 holds none. One instance per shortcut, used on its event loop only."""

    def __init__(self, tracker: PendingTracker, hold_s: float, max_held: int) -> None:
        if hold_s < 0 or max_held < 0:
            raise ValueError(f"long polls: need hold_s >= 0 and max_held >= 0, got {hold_s!r}, {max_held!r}")
        self.tracker, self.hold_s, self.max_held = tracker, hold_s, max_held
        self.holding = 0  # held now
        self.held = 0  # held in all
        self.woken = 0  # held, then answered by the full path (a message came, or the entry lapsed)

    async def still_idle(self, key: int, credential: bytes) -> bool:
        """Hold the poll if allowed; then whether it may still be answered empty (else Flower's
        full path must answer: a message was stored for `key`, or its idle entry lapsed)."""
        if self.hold_s <= 0 or self.holding >= self.max_held:
            return True
        self.holding += 1
        try:
            self.held += await self.tracker.wait_idle(key, credential, self.hold_s)
        finally:
            self.holding -= 1
        if self.tracker.idle_key(key) == credential:
            return True
        self.woken += 1
        return False


class _IdlePullShortcut:
    """Pure ASGI, outermost: answer a SuperNode's `PullMessages` with Flower's own empty reply when
    the node is known to have nothing pending (`PendingTracker`) and the request authenticates as
    Flower's `authenticate_node` would: a valid signature, by the public key that node's last full
    poll authenticated with, over a time stamp inside Flower's window. Anything else (a parse error,
    another key, a bad signature, an unknown node, a node with a message) takes Flower's full path,
    which also decides every refusal: this never answers 401 itself. Each full poll's outcome
    teaches the tracker: an empty 200 marks the node idle from the generation read before it ran.
    With `hold_s` > 0 the early answer is a long poll (`_PollHold`): held until a message for the
    node is stored (then Flower's full path answers, if the request's time stamp is still inside
    Flower's window with a margin; else the empty reply, and the node's next poll fetches it)."""

    def __init__(self, app: Any, *, tracker: PendingTracker, hold_s: float = 0.0, max_held: int = 0) -> None:
        from flwr.common.constant import SYSTEM_TIME_TOLERANCE, TIMESTAMP_HEADER, TIMESTAMP_TOLERANCE
        from flwr.proto.fleet_pb2 import PullMessagesRequest, PullMessagesResponse
        from flwr.supercore.constant import FLEET_HTTP_PUBLIC_KEY_HEADER, FLEET_HTTP_SIGNATURE_HEADER
        from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

        self.app = app
        self.tracker = tracker
        self._request_type, self._response_type = PullMessagesRequest, PullMessagesResponse
        self._media_type = PROTOBUF_MEDIA_TYPE.encode("latin-1")
        self._key_header = FLEET_HTTP_PUBLIC_KEY_HEADER.lower().encode("latin-1")
        self._sig_header = FLEET_HTTP_SIGNATURE_HEADER.lower().encode("latin-1")
        self._ts_header = TIMESTAMP_HEADER.lower().encode("latin-1")
        self._window = (-SYSTEM_TIME_TOLERANCE, TIMESTAMP_TOLERANCE + SYSTEM_TIME_TOLERANCE)
        self._keys: dict[bytes, Any] = {}  # public key bytes -> parsed key (a handful of nodes)
        self._empty_headers: list[tuple[bytes, bytes]] | None = None  # Flower's, from a full poll
        self.hold = _PollHold(tracker, hold_s, max_held)
        self.answered_early = 0
        self.full_path = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != _PULL_MESSAGES_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, more = b"", True
        while more:
            event = await receive()
            if event["type"] != "http.request":  # disconnected: let Flower's stack see it
                await self.app(scope, _replay(body, event, receive), send)
                return
            body += event.get("body", b"")
            more = event.get("more_body", False)
        headers = dict(reversed(scope["headers"]))  # the first of repeated headers, as Starlette reads them
        node_id, public_key = self._parse(headers, body)
        if (node_id is not None and self._empty_headers is not None
                and self._may_answer(node_id, public_key, headers)
                and (await self.hold.still_idle(node_id, public_key)
                     or not self._in_window(headers, margin_s=_HOLD_WINDOW_MARGIN_S))):
            self.answered_early += 1
            await _send_empty(send, self._empty_headers)
            return
        self.full_path += 1
        await self._full_path(scope, _replay(body, None, receive), send, node_id, public_key)

    def _parse(self, headers: dict[bytes, bytes], body: bytes) -> tuple[int | None, bytes]:
        import base64
        import binascii

        from google.protobuf.message import DecodeError

        try:
            if headers.get(b"content-type", b"").split(b";")[0].strip().lower() != self._media_type:
                return None, b""
            request = self._request_type.FromString(body)
            public_key = base64.b64decode(headers[self._key_header], validate=True)
        except (KeyError, DecodeError, binascii.Error, ValueError):
            return None, b""
        return int(request.node.node_id), public_key

    def _may_answer(self, node_id: int, public_key: bytes, headers: dict[bytes, bytes]) -> bool:
        import base64

        from flwr.supercore.primitives.asymmetric import bytes_to_public_key, verify_signature

        if self.tracker.idle_key(node_id) != public_key or not self._in_window(headers):
            return False
        try:
            signature = base64.b64decode(headers[self._sig_header], validate=True)
            timestamp = headers[self._ts_header].decode("ascii")
            key = self._keys.get(public_key)
            if key is None:
                key = self._keys[public_key] = bytes_to_public_key(public_key)
            return bool(verify_signature(key, timestamp.encode("ascii"), signature))
        except Exception:  # anything odd: Flower's full path decides (and refuses)
            return False

    def _in_window(self, headers: dict[bytes, bytes], margin_s: float = 0.0) -> bool:
        """Whether the request's time stamp is inside Flower's window (`authenticate_node`'s), and
        still will be `margin_s` from now (a held poll must not reach Flower's check stale)."""
        import datetime

        from flwr.supercore.date import now

        try:
            timestamp = headers[self._ts_header].decode("ascii")
            age = (now() - datetime.datetime.fromisoformat(timestamp)).total_seconds()
        except Exception:  # anything odd: Flower's full path decides (and refuses)
            return False
        return bool(self._window[0] < age and age + margin_s < self._window[1])

    async def _full_path(self, scope: Any, receive: Any, send: Any, node_id: int | None,
                         public_key: bytes) -> None:
        generation = self.tracker.generation(node_id) if node_id is not None else 0
        status, headers, chunks = 0, [], []

        async def capture(message: Any) -> None:
            nonlocal status, headers
            if message["type"] == "http.response.start":
                status, headers = message["status"], list(message.get("headers", []))
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
            await send(message)

        await self.app(scope, receive, capture)
        if node_id is None:
            return
        if status != 200:
            self.tracker.forget(node_id)
            return
        try:
            empty = not self._response_type.FromString(b"".join(chunks)).messages_list
        except Exception:
            empty = False
        if empty:
            if self._empty_headers is None:
                self._empty_headers = [(k, v) for k, v in headers if k.lower() != b"date"]
            self.tracker.mark_idle(node_id, generation, public_key)
        else:
            self.tracker.forget(node_id)


class _IdleReplyPullShortcut:
    """Pure ASGI, outermost: answer a ServerApp's `PullMessages` (Runtime API: its replies) with
    Flower's own empty reply when no reply (nor instruction to the SuperLink's node) was stored for
    its run since a full pull with the same task token and the same message ids found nothing
    (`PendingTracker` by run id; the token's run is looked up once, after its first full pull).
    Flower also answers a pull with error replies it makes itself (a node gone offline, a message
    expired); those wait for the next full pull, at most `recheck_s` later. Anything else takes
    Flower's full path, which alone authenticates the token and refuses. With `hold_s` > 0 the
    early answer is a long poll (`_PollHold`), held at most until that entry lapses: a reply
    stored meanwhile is answered at once by Flower's full path."""

    def __init__(self, app: Any, *, tracker: PendingTracker, hold_s: float = 0.0, max_held: int = 0) -> None:
        from flwr.proto.runtime_pb2 import PullAppMessagesRequest, PullAppMessagesResponse
        from flwr.supercore.constant import TASK_TOKEN_HEADER
        from flwr.supercore.protobuf.constants import PROTOBUF_MEDIA_TYPE

        self.app = app
        self.tracker = tracker
        self._request_type, self._response_type = PullAppMessagesRequest, PullAppMessagesResponse
        self._media_type = PROTOBUF_MEDIA_TYPE.encode("latin-1")
        self._token_header = TASK_TOKEN_HEADER.lower().encode("latin-1")
        self._runs: dict[bytes, int] = {}  # task token -> its run (a token belongs to one task)
        self._empty_headers: list[tuple[bytes, bytes]] | None = None
        self.hold = _PollHold(tracker, hold_s, max_held)
        self.answered_early = 0
        self.full_path = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] != _RUNTIME_PULL_PATH or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        body, event = await _read_body(receive)
        if event is not None:
            await self.app(scope, _replay(body, event, receive), send)
            return
        credential = self._credential(scope["headers"], body)
        run_id = self._runs.get(credential[0]) if credential is not None else None
        if (credential is not None and run_id is not None and self._empty_headers is not None
                and self.tracker.idle_key(run_id) == credential[1]
                and await self.hold.still_idle(run_id, credential[1])):
            self.answered_early += 1
            await _send_empty(send, self._empty_headers)
            return
        self.full_path += 1
        generation = self.tracker.generation(run_id) if run_id is not None else 0
        status, headers, reply = await _capture(self.app, scope, _replay(body, None, receive), send)
        if credential is None:
            return
        if run_id is None and status == 200:
            await self._run_of(scope, credential[0])
            return  # this pull's generation was not read before it ran: the next one may vouch
        if run_id is None:
            return
        if status == 200 and _is_empty(self._response_type, reply):
            if self._empty_headers is None:
                self._empty_headers = [(k, v) for k, v in headers if k.lower() != b"date"]
            self.tracker.mark_idle(run_id, generation, credential[1])
        else:
            self.tracker.forget(run_id)

    def _credential(self, raw_headers: list[tuple[bytes, bytes]], body: bytes) -> tuple[bytes, bytes] | None:
        """(token, what an idle entry must match: the token and the message ids asked for)."""
        import hashlib

        from google.protobuf.message import DecodeError

        tokens = [v for k, v in raw_headers if k.lower() == self._token_header]
        content_type = [v for k, v in raw_headers if k.lower() == b"content-type"]
        if len(tokens) != 1 or not tokens[0] or len(content_type) != 1 \
                or content_type[0].split(b";")[0].strip().lower() != self._media_type:
            return None
        try:
            request = self._request_type.FromString(body)
        except DecodeError:
            return None
        ids = b"\0".join(sorted(str(i).encode() for i in request.message_ids))
        return tokens[0], hashlib.sha256(tokens[0] + b"\1" + ids).digest()

    async def _run_of(self, scope: Any, token: bytes) -> int | None:
        from starlette.concurrency import run_in_threadpool

        try:
            state = scope["app"].state.linkstate_factory.state()
            task = await run_in_threadpool(state.get_task_by_token, token.decode("latin-1"))
        except Exception:
            return None
        if task is None:
            return None
        self._runs[token] = int(task.run_id)
        return int(task.run_id)


async def _read_body(receive: Any) -> tuple[bytes, Any]:
    """The whole request body, or what came before a disconnect and that event."""
    body, more = b"", True
    while more:
        event = await receive()
        if event["type"] != "http.request":
            return body, event
        body += event.get("body", b"")
        more = event.get("more_body", False)
    return body, None


async def _send_empty(send: Any, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def _capture(app: Any, scope: Any, receive: Any, send: Any) -> tuple[int, list[Any], bytes]:
    """Run `app`, passing its response on, and return its status, headers and body."""
    status, headers, chunks = 0, [], []

    async def capture(message: Any) -> None:
        nonlocal status, headers
        if message["type"] == "http.response.start":
            status, headers = message["status"], list(message.get("headers", []))
        elif message["type"] == "http.response.body":
            chunks.append(message.get("body", b""))
        await send(message)

    await app(scope, receive, capture)
    return status, headers, b"".join(chunks)


def _is_empty(response_type: Any, body: bytes) -> bool:
    try:
        return not response_type.FromString(body).messages_list
    except Exception:
        return False


def _replay(body: bytes, event: Any, receive: Any) -> Callable[[], Any]:
    """An ASGI `receive` that first hands out the request body already read (and the event that
    interrupted reading it, if any), then the connection's own events."""
    pending = [event if event is not None else {"type": "http.request", "body": body, "more_body": False}]
    if event is not None and body:
        pending.insert(0, {"type": "http.request", "body": body, "more_body": True})

    async def replayed() -> Any:
        if pending:
            return pending.pop(0)
        return await receive()

    return replayed


def patch_superlink_task_sweep(interval_s: float) -> None:
    """Run flwr's sweep of expired task claims (`SqlCoreState._cleanup_expired_task_tokens`: two
    `UPDATE ... RETURNING` statements) at most once per `interval_s` per LinkState (SuperLink
    process only). flwr 1.42 runs it at the start of `get_run_status`, which every Fleet object
    pull and push calls through `check_abort`, and of most task look-ups: a write transaction per
    request. It only moves claims whose heartbeat lapsed (to pending, or to failed); token checks
    compare `active_until` themselves, so a later sweep lets no expired token in, it only records
    a lapsed task up to `interval_s` later."""
    check_flwr_version()
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    sweep = SqlCoreState._cleanup_expired_task_tokens
    if getattr(sweep, _PATCHED_MARK, False):
        return
    _require(list(inspect.signature(sweep).parameters) == ["self"],
             "SqlCoreState._cleanup_expired_task_tokens changed its parameters")
    by_token = inspect.getsource(SqlCoreState.get_task_by_token)
    _require("active_until < current" in by_token and "return None" in by_token,
             "SqlCoreState.get_task_by_token no longer refuses an expired claim itself")
    last: dict[int, float] = {}
    lock = threading.Lock()

    @functools.wraps(sweep)
    def cleanup_expired_task_tokens(self: Any) -> None:
        now = _time.monotonic()
        with lock:
            if now - last.get(id(self), -interval_s) < interval_s:
                return
            last[id(self)] = now
        sweep(self)

    setattr(cleanup_expired_task_tokens, _PATCHED_MARK, True)
    setattr(SqlCoreState, "_cleanup_expired_task_tokens", cleanup_expired_task_tokens)  # noqa: B010


def patch_superlink_push_one_transaction() -> None:
    """Store all the messages of one Runtime API `PushMessages` (the ServerApp's messages of a
    round, one per hospital) in one SQLite transaction (SuperLink process only).

    flwr 1.42's handler opens the push session in a transaction of its own, then stores each
    message and preregisters its object tree in another (`store_message_and_object_tree`: the
    run row locked with an UPDATE, the destination node read, the message inserted, the tree's
    objects registered): N + 1 write transactions, each taking SQLite's write lock anew while
    every SuperNode's heartbeats and object pushes queue for the same lock. flwr's `session()`
    is re-entrant, so the handler run inside one outer session stores everything in one
    transaction, taking the lock once. All or nothing as well: a message refused halfway (the
    handler raises) leaves none of the earlier ones stored for hospitals whose ids the ServerApp
    never got back. The messages still are stored one by one, with flwr's own checks.

    Inside that transaction an object subtree is preregistered once: the round's messages share
    their content (the global model), and flwr walked that subtree again for every message (an
    insert-or-ignore, two reads and a run mapping per object: about 30 statements a message,
    most of a push's SuperLink CPU). A later message's walk skips a subtree already walked in
    the same transaction, whose rows, availability and pending entries (per push session, not
    per message) that walk already wrote; the message's own object and its link to the shared
    content are stored as before."""
    check_flwr_version()
    from flwr.supercore.object_store import sql_object_store
    from flwr.superlink.servicer.runtime import runtime_handlers

    push = runtime_handlers.push_messages
    if getattr(push, _PATCHED_MARK, False):
        return
    _require(list(inspect.signature(push).parameters) == ["request", "state", "task"],
             "flwr's Runtime push_messages handler changed its parameters")
    source = inspect.getsource(push)
    _require("state.start_session(run_id)" in source and "state.store_message_and_object_tree(" in source,
             "flwr's Runtime push_messages no longer stores the messages one by one")
    _require("nested calls" in inspect.getsource(importlib.import_module("flwr.supercore.sql_mixin")),
             "flwr.supercore.sql_mixin's session() is no longer re-entrant")
    iterate = sql_object_store.iterate_object_tree
    preregister = inspect.getsource(sql_object_store.SqlObjectStore.preregister)
    _require("tree_nodes = list(iterate_object_tree(object_tree))" in preregister
             and "on_conflict_do_nothing" in preregister and "if is_new:" in preregister,
             "SqlObjectStore.preregister changed")

    def iterate_object_tree(tree: Any) -> Iterator[Any]:
        walked = _walked_in_push.get()
        if walked is None:
            yield from iterate(tree)
            return
        yield from _iterate_unwalked(tree, walked)

    @functools.wraps(push)
    def push_messages(request: Any, state: Any, task: Any) -> Any:
        session = getattr(state, "session", None)
        if session is None:  # another LinkState (in memory): flwr's own
            return push(request, state, task)
        token = _walked_in_push.set(set())
        try:
            with session():
                return push(request, state, task)
        finally:
            _walked_in_push.reset(token)

    setattr(push_messages, _PATCHED_MARK, True)
    setattr(runtime_handlers, "push_messages", push_messages)  # noqa: B010 (a function of flwr's)
    setattr(sql_object_store, "iterate_object_tree", iterate_object_tree)  # noqa: B010


#: object ids whose subtree was preregistered in the running push's transaction (None: not in one)
_walked_in_push: contextvars.ContextVar[set[str] | None] = contextvars.ContextVar("walked_in_push",
                                                                                   default=None)


def _iterate_unwalked(tree: Any, walked: set[str]) -> Iterator[Any]:
    """flwr's post-order walk of an object tree, leaving out the subtrees below the root that
    were walked before in this push's transaction."""
    for child in tree.children:
        if child.object_id not in walked:
            yield from _iterate_unwalked(child, walked)
    walked.add(tree.object_id)
    yield tree


class _BusyInStoreObject(BaseException):
    """SQLite's "database is locked", carried out of flwr's `store_object` past its
    `except Exception` (`patch_superlink_store_object_busy`)."""

    def __init__(self, error: Exception) -> None:
        super().__init__(str(error))
        self.error = error


_storing_object = threading.local()


def patch_superlink_store_object_busy() -> None:
    """Let a busy database fail an object push loudly (SuperLink process only), so the sender
    retries it, instead of losing the object.

    flwr 1.42's `SqlCoreState.store_object` catches every exception, logs "Failed to store
    object" and returns False, which the Fleet handler answers as `stored=False`: the SuperNode
    takes that as done ("Sent successfully") and the object is never stored, so the ServerApp's
    pull of that reply fails ("Reply message objects are unavailable") and the hospital counts as
    dropped. Under load SQLite's write lock can stay taken past the busy timeout (5 s): at 25
    hospitals, 20 training, on this 2-core machine a round lost a hospital that way and the study
    failed (docs/benchmarks/scale.md). Here a "database is locked" inside `store_object` leaves
    it as the OperationalError it is; the Fleet API's error translator answers 503
    (`_busy_database_retryable`) and flwr's client retries the push, on a transaction that was
    rolled back. Every other failure keeps flwr's behaviour."""
    check_flwr_version()
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from sqlalchemy.exc import OperationalError

    store = SqlCoreState.store_object
    if getattr(store, _PATCHED_MARK, False):
        return
    _require(list(inspect.signature(store).parameters) == ["self", "run_id", "session_id", "object_id",
                                                          "object_content"],
             "SqlCoreState.store_object changed its parameters")
    source = inspect.getsource(store)
    _require("with self.session() as session:" in source and "except Exception" in source
             and "return False" in source, "SqlCoreState.store_object no longer swallows its errors")
    session = SqlCoreState.session

    @contextlib.contextmanager
    def busy_aware_session(self: Any) -> Any:
        try:
            with session(self) as inner:
                yield inner
        except OperationalError as exc:
            if getattr(_storing_object, "active", False) and any(
                    text in str(exc.orig) for text in _BUSY_DATABASE_ERRORS):
                raise _BusyInStoreObject(exc) from exc
            raise

    @functools.wraps(store)
    def store_object(self: Any, run_id: int, session_id: str, object_id: str, object_content: bytes) -> bool:
        _storing_object.active = True
        try:
            return bool(store(self, run_id, session_id, object_id, object_content))
        except _BusyInStoreObject as busy:
            raise busy.error from None
        finally:
            _storing_object.active = False

    setattr(busy_aware_session, _PATCHED_MARK, True)
    setattr(store_object, _PATCHED_MARK, True)
    setattr(SqlCoreState, "session", busy_aware_session)  # noqa: B010
    setattr(SqlCoreState, "store_object", store_object)  # noqa: B010


class WriteInvalidatedCache:
    """Values read from flwr's SQL state, each valid until a write to the tables it derives from.

    Every INSERT/UPDATE/DELETE run through a SQLAlchemy Session of this process on a watched table
    (`_write_watchers`; an UPDATE only if it matched a row) moves `generation`: when it executes,
    and again when its transaction commits or rolls back (a read between the two saw the old row,
    or a row that never commits). An entry counts only while the generation it was read at is
    current, and at most `max_age_s` (a bound for a write that bypasses the ORM session)."""

    def __init__(self, max_age_s: float) -> None:
        if not max_age_s > 0:
            raise ValueError(f"max_age_s: must be > 0, got {max_age_s!r}")
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._generation = 0
        self._entries: dict[Any, tuple[Any, int, float]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def generation(self) -> int:
        with self._lock:
            return self._generation

    def bump(self) -> None:
        with self._lock:
            self._generation += 1
            self._entries.clear()

    def get_many(self, keys: Sequence[Any]) -> list[Any] | None:
        """Every key's cached value, or None (then all are read again)."""
        now = _time.monotonic()
        with self._lock:
            out = []
            for key in keys:
                entry = self._entries.get(key)
                if entry is None or entry[1] != self._generation or now >= entry[2]:
                    self.misses += 1
                    return None
                out.append(entry[0])
            self.hits += 1
            return out

    def put_many(self, items: Sequence[tuple[Any, Any]], generation: int) -> None:
        """Values read by a query that started at `generation` (ignored if a write came since)."""
        until = _time.monotonic() + self.max_age_s
        with self._lock:
            if generation != self._generation:
                return
            for key, value in items:
                self._entries[key] = (value, generation, until)


class RunStatusCache(WriteInvalidatedCache):
    """Run statuses (`patch_superlink_run_status_cache`): a run's status is its primary task's row
    (`_run_status_from_task_model`), so it changes only with a write to the task table (a claim, a
    start, a finish, a stop, the sweep of lapsed claims) or the run's deletion."""


class NodeKeyCache(WriteInvalidatedCache):
    """Which node a SuperNode public key belongs to (`patch_superlink_node_key_cache`): changes
    only with a write to the node table (a registration, an activation, a heartbeat, a
    deletion; every one ends every entry)."""


#: per cache of this process: (watched table -> "any" write or only a "delete", the cache)
_write_watchers: list[tuple[Mapping[str, str], WriteInvalidatedCache]] = []
_TASK_TABLE, _RUN_TABLE, _NODE_TABLE = "task", "run", "node"
_RUN_STATUS_TABLES = {_TASK_TABLE: "any", _RUN_TABLE: "delete"}
_NODE_KEY_TABLES = {_NODE_TABLE: "any"}
_WROTE_KEY = "exchange_wrote_watched"
_write_listeners: list[bool] = []


_Cache = TypeVar("_Cache", bound=WriteInvalidatedCache)


def _installed_cache(kind: type[_Cache]) -> _Cache | None:
    """The cache of `kind` this process installed already (each patch installs one: it is
    idempotent), or None."""
    for _tables, cache in _write_watchers:
        if isinstance(cache, kind):
            return cache
    return None


#: the kinds of cache the writes of the current context leave valid (`writes_leave`)
_unaffected: contextvars.ContextVar[tuple[type[WriteInvalidatedCache], ...]] = contextvars.ContextVar(
    "exchange_unaffected_caches", default=())


@contextlib.contextmanager
def writes_leave(*kinds: type[WriteInvalidatedCache]) -> Iterator[None]:
    """Within this block, writes do not end caches of `kinds`: only for a write proven not to change
    what they hold (a node's heartbeat leaves which node each key belongs to as it was)."""
    token = _unaffected.set((*_unaffected.get(), *kinds))
    try:
        yield
    finally:
        _unaffected.reset(token)


def _watching(table: str | None, *, is_delete: bool) -> list[WriteInvalidatedCache]:
    """The caches a write to `table` ends (but those `writes_leave` names)."""
    skip = _unaffected.get()
    return [cache for tables, cache in _write_watchers if not isinstance(cache, skip)
            and (tables.get(table or "") == "any" or (is_delete and tables.get(table or "") == "delete"))]


def _listen_for_watched_writes() -> None:
    """SQLAlchemy Session events (all sessions of this process, registered once) that bump the
    caches watching a table when a statement writes it, and again when its transaction ends."""
    from sqlalchemy import CursorResult, event
    from sqlalchemy.orm import Session

    if _write_listeners:
        return

    def wrote(session: Any, caches: list[WriteInvalidatedCache]) -> None:
        session.info.setdefault(_WROTE_KEY, set()).update(caches)
        for cache in caches:
            cache.bump()

    def do_orm_execute(state: Any) -> Any:
        if not (state.is_update or state.is_delete or state.is_insert):
            return None
        table = getattr(getattr(state.statement, "table", None), "name", None)
        caches = _watching(table, is_delete=state.is_delete)
        if not caches:
            return None
        if not state.is_update:
            wrote(state.session, caches)
            return None
        # an UPDATE counts only if it matched a row: flwr's sweep of lapsed claims runs two
        # UPDATEs on nearly every status read, which match nothing while every task beats
        result = state.invoke_statement()
        if isinstance(result, CursorResult) and not result.returns_rows:
            changed = result.rowcount != 0
        else:  # UPDATE ... RETURNING: read the rows, hand on a copy
            frozen = result.freeze()
            changed, result = bool(frozen.data), frozen()
        if changed:
            wrote(state.session, caches)
        return result

    def after_flush(session: Any, _context: Any) -> None:  # ORM unit of work (session.add and co)
        for objects, is_delete in ((session.new, False), (session.dirty, False), (session.deleted, True)):
            for obj in objects:
                table = getattr(getattr(type(obj), "__table__", None), "name", None)
                if caches := _watching(table, is_delete=is_delete):
                    wrote(session, caches)

    def transaction_ended(session: Any) -> None:
        for cache in session.info.pop(_WROTE_KEY, ()):
            cache.bump()

    event.listen(Session, "do_orm_execute", do_orm_execute)
    event.listen(Session, "after_flush", after_flush)
    event.listen(Session, "after_commit", transaction_ended)
    event.listen(Session, "after_rollback", transaction_ended)
    _write_listeners.append(True)


def _check_table(module: str, model: str, table: str) -> None:
    models = importlib.import_module(f"flwr.supercore.state.schema.{module}")
    _require(getattr(getattr(models, model, None), "__tablename__", None) == table,
             f"flwr's {table} table was renamed")


def patch_superlink_run_status_cache(max_age_s: float) -> RunStatusCache:
    """Serve flwr's `SqlLinkState.get_run_status` from a cache invalidated by every write that may
    change a run's status (`RunStatusCache`; SuperLink process only). flwr 1.42 checks the run's
    status (`check_abort`: a database read) on every Fleet object pull and push, message push and
    receipt confirmation, and the Runtime API's: one request per object of every message, while a
    status changes a handful of times per run. A stop, a finish or a lapsed claim is a write to the
    task table, which ends every entry at once: the next check reads the database again. The
    sweep of lapsed claims still runs on every call, as flwr's does (`patch_superlink_task_sweep`
    throttles it). Returns the cache (tests read it)."""
    check_flwr_version()
    from flwr.server.superlink import utils as superlink_utils
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    if (installed := _installed_cache(RunStatusCache)) is not None:
        return installed
    original = SqlLinkState.get_run_status
    _require(list(inspect.signature(original).parameters) == ["self", "run_ids"],
             "SqlLinkState.get_run_status changed its parameters")
    source = inspect.getsource(original)
    _require("self._cleanup_expired_task_tokens()" in source and "_run_status_from_task_model(" in source
             and "TaskModel.task_id == RunModel.primary_task_id" in source,
             "SqlLinkState.get_run_status no longer derives a status from the run's primary task")
    _require("state.get_run_status({run_id})[run_id]" in inspect.getsource(superlink_utils.check_abort),
             "check_abort no longer reads the run's status with get_run_status")
    _check_table("corestate_models", "Task", _TASK_TABLE)
    _check_table("linkstate_models", "Run", _RUN_TABLE)
    cache = RunStatusCache(max_age_s)
    _listen_for_watched_writes()

    @functools.wraps(original)
    def get_run_status(self: Any, run_ids: set[int]) -> dict[int, Any]:
        ordered = sorted(run_ids)
        cached = cache.get_many([(id(self), r) for r in ordered]) if ordered else None
        if cached is not None:
            generation = cache.generation
            self._cleanup_expired_task_tokens()  # as flwr does first (throttled); its writes bump
            if cache.generation == generation:
                return dict(zip(ordered, cached, strict=True))
        generation = cache.generation
        statuses = original(self, run_ids)
        cache.put_many([((id(self), r), status) for r, status in statuses.items()], generation)
        return statuses

    setattr(get_run_status, _PATCHED_MARK, True)
    setattr(SqlLinkState, "get_run_status", get_run_status)  # noqa: B010 (a method of flwr's)
    _write_watchers.append((_RUN_STATUS_TABLES, cache))
    return cache


def patch_superlink_node_key_cache(max_age_s: float) -> NodeKeyCache:
    """Serve flwr's `SqlLinkState.get_node_id_by_public_key` from a cache that every write to the
    node table ends (`NodeKeyCache`), and parse each SuperNode public key once (SuperLink process
    only). flwr 1.42's `authenticate_node` runs on every Fleet request: it parses the PEM key
    from the request's header, verifies the request's signature (kept: that is the
    authentication) and reads the key's node from the database. A node deleted, unregistered or
    re-registered is a write to the node table: the next request reads the database again.
    Returns the cache (tests read it)."""
    check_flwr_version()
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState
    from flwr.superlink.routers.fleet import node_auth

    if (installed := _installed_cache(NodeKeyCache)) is not None:
        return installed
    original = SqlLinkState.get_node_id_by_public_key
    _require(list(inspect.signature(original).parameters) == ["self", "public_key"],
             "SqlLinkState.get_node_id_by_public_key changed its parameters")
    _require("NodeModel.public_key == public_key" in inspect.getsource(original),
             "SqlLinkState.get_node_id_by_public_key no longer reads the node table")
    auth_source = inspect.getsource(node_auth.authenticate_node)
    _require("bytes_to_public_key(public_key)" in auth_source
             and "get_linkstate(request).get_node_id_by_public_key(public_key) != node_id" in auth_source,
             "fleet node_auth.authenticate_node no longer parses the key and looks its node up by name")
    _check_table("linkstate_models", "Node", _NODE_TABLE)
    cache = NodeKeyCache(max_age_s)
    _listen_for_watched_writes()

    @functools.wraps(original)
    def get_node_id_by_public_key(self: Any, public_key: bytes) -> int | None:
        key = (id(self), bytes(public_key))
        cached = cache.get_many([key])
        if cached is not None:
            return cached[0]
        generation = cache.generation
        node_id = original(self, public_key)
        cache.put_many([(key, node_id)], generation)
        return node_id

    parse = node_auth.bytes_to_public_key
    if not is_patched(parse):
        parse_cached = functools.lru_cache(maxsize=1024)(parse)  # a pure function of the key's bytes
        setattr(parse_cached, _PATCHED_MARK, True)
        setattr(node_auth, "bytes_to_public_key", parse_cached)  # noqa: B010 (a module global of flwr's)
    setattr(get_node_id_by_public_key, _PATCHED_MARK, True)
    setattr(SqlLinkState, "get_node_id_by_public_key", get_node_id_by_public_key)  # noqa: B010
    _write_watchers.append((_NODE_KEY_TABLES, cache))
    return cache


class TaskTokenCache(WriteInvalidatedCache):
    """Which task a Runtime API token belongs to (`patch_superlink_task_token_cache`): a task's row
    changes only with a write to the task table (a claim, a heartbeat, a finish, a sweep); its
    expiry (`active_until`) is checked against the clock on every use, as flwr does."""


def patch_superlink_task_token_cache(max_age_s: float) -> TaskTokenCache:
    """Serve flwr's `SqlCoreState.get_task_by_token` (every Runtime API request of a ServerApp or
    executor: the token's check) from a cache that every write to the task table ends
    (`TaskTokenCache`; SuperLink process only). An entry keeps the task and its `active_until`; a
    hit still refuses an expired claim, as flwr's query does. Returns the cache (tests read it)."""
    check_flwr_version()
    from flwr.supercore import date as flwr_date
    from flwr.supercore.corestate.sql_corestate import SqlCoreState

    if (installed := _installed_cache(TaskTokenCache)) is not None:
        return installed
    original = SqlCoreState.get_task_by_token
    _require(list(inspect.signature(original).parameters) == ["self", "token"],
             "SqlCoreState.get_task_by_token changed its parameters")
    source = inspect.getsource(original)
    _require("TaskModel.token == token" in source and "TaskModel.finished_at.is_(None)" in source
             and "row.active_until is None or row.active_until < current" in source
             and "return task_from_model(row)" in source,
             "SqlCoreState.get_task_by_token no longer checks a token as the cache does")
    module = importlib.import_module(SqlCoreState.__module__)
    task_from_model, select = module.task_from_model, module.select
    task_model = module.TaskModel
    _check_table("corestate_models", "Task", _TASK_TABLE)
    cache = TaskTokenCache(max_age_s)
    _listen_for_watched_writes()

    def read(self: Any, token: str) -> tuple[Any, Any] | None:
        """flwr's query, keeping the row's expiry: (task, active_until) or None."""
        with self.session() as session:
            row = session.scalars(
                select(task_model).where(task_model.token == token, task_model.finished_at.is_(None))
                .execution_options(populate_existing=True)).first()
            if row is None or row.active_until is None:
                return None
            return task_from_model(row), row.active_until

    @functools.wraps(original)
    def get_task_by_token(self: Any, token: str) -> Any:
        key = (id(self), token)
        cached = cache.get_many([key])
        if cached is not None:
            entry = cached[0]
        else:
            generation = cache.generation
            entry = read(self, token)
            cache.put_many([(key, entry)], generation)
        if entry is None or entry[1] < flwr_date.now():
            return None
        task = type(entry[0])()
        task.CopyFrom(entry[0])  # callers get their own message, as from flwr's query
        return task

    setattr(get_task_by_token, _PATCHED_MARK, True)
    setattr(SqlCoreState, "get_task_by_token", get_task_by_token)  # noqa: B010 (a method of flwr's)
    _write_watchers.append((_RUN_STATUS_TABLES, cache))
    return cache


class TrafficBatcher:
    """flwr's per-run traffic counters (`SqlLinkState.store_traffic`: an UPDATE transaction per
    request) summed in memory and written at most once per `interval_s` per run, before any read
    of them (`get_run_info`), and at process exit. Only these counters wait: what a run shows
    (`flwr ls`) lags by at most `interval_s`; a crash loses at most that much of the count."""

    def __init__(self, interval_s: float, write: Callable[..., None]) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s!r}")
        self.interval_s = interval_s
        self._write = write
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[int, tuple[Any, dict[int, list[int]]]] = {}  # id(state) -> (state, runs)
        self._last_flush = _time.monotonic()
        self.writes = 0

    def add(self, state: Any, run_id: int, bytes_sent: int, bytes_recv: int) -> None:
        with self._lock:
            runs = self._pending.setdefault(id(state), (state, {}))[1]
            totals = runs.setdefault(run_id, [0, 0])
            totals[0] += bytes_sent
            totals[1] += bytes_recv
            due = _time.monotonic() - self._last_flush >= self.interval_s
        if due:
            self.flush()

    def flush(self) -> None:
        """Write every pending count (a run deleted meanwhile: its count is dropped, as flwr's
        own `store_traffic` would have refused it)."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
                self._last_flush = _time.monotonic()
            for state, runs in pending.values():
                for run_id, (sent, recv) in runs.items():
                    try:
                        self._write(state, run_id, bytes_sent=sent, bytes_recv=recv)
                        self.writes += 1
                    except ValueError:  # "Run ... not found"
                        pass


_traffic_batchers: list[TrafficBatcher] = []


def patch_superlink_traffic_batching(interval_s: float) -> TrafficBatcher:
    """Sum flwr's traffic accounting in memory (`TrafficBatcher`; SuperLink process only): flwr
    1.42 records the bytes of every object pulled or pushed and every message with its own UPDATE
    transaction (`store_traffic`), a database write per request that nothing reads during the run.
    Arguments are checked as flwr checks them, at once. Returns the batcher (tests read it)."""
    check_flwr_version()
    import atexit

    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    if _traffic_batchers:
        return _traffic_batchers[0]
    store, read = SqlLinkState.store_traffic, SqlLinkState.get_run_info
    _require(list(inspect.signature(store).parameters) == ["self", "run_id", "bytes_sent", "bytes_recv"],
             "SqlLinkState.store_traffic changed its parameters")
    module_source = inspect.getsource(importlib.import_module(SqlLinkState.__module__))
    _require(module_source.count("RunModel.bytes_sent") == 1 and module_source.count("run.bytes_sent") == 1
             and module_source.count("_run_from_models(") == 2
             and "_run_from_models(" in inspect.getsource(read),
             "SqlLinkState reads the traffic counters somewhere else than get_run_info")
    batcher = TrafficBatcher(interval_s, store)

    @functools.wraps(store)
    def store_traffic(self: Any, run_id: int, *, bytes_sent: int, bytes_recv: int) -> None:
        if bytes_sent < 0 or bytes_recv < 0:  # flwr's own checks and messages
            raise ValueError(f"Negative traffic values for run {run_id}: "
                             f"bytes_sent={bytes_sent}, bytes_recv={bytes_recv}")
        if bytes_sent == 0 and bytes_recv == 0:
            raise ValueError(f"Both bytes_sent and bytes_recv cannot be zero for run {run_id}")
        batcher.add(self, run_id, bytes_sent, bytes_recv)

    @functools.wraps(read)
    def get_run_info(self: Any, *args: Any, **kwargs: Any) -> Any:
        batcher.flush()
        return read(self, *args, **kwargs)

    for wrapped in (store_traffic, get_run_info):
        setattr(wrapped, _PATCHED_MARK, True)
    setattr(SqlLinkState, "store_traffic", store_traffic)  # noqa: B010 (methods of flwr's)
    setattr(SqlLinkState, "get_run_info", get_run_info)  # noqa: B010
    atexit.register(batcher.flush)
    _traffic_batchers.append(batcher)
    return batcher


class RequestCounter:
    """Pure ASGI, outermost: counts the SuperLink's HTTP requests by path (a measurement aid for
    benchmarks: requests per round; `patch_superlink_request_counter`)."""

    def __init__(self, app: Any, *, counts: dict[str, int]) -> None:
        self.app, self.counts = app, counts

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            path = scope["path"]
            self.counts[path] = self.counts.get(path, 0) + 1  # one event loop: no lock needed
        await self.app(scope, receive, send)


def patch_superlink_request_counter() -> dict[str, int]:
    """Count every HTTP request the SuperLink serves, by path, before any other middleware (this
    process must be the SuperLink's, before its app is built). Returns the live counts."""
    check_flwr_version()
    import flwr.superlink.main as superlink_main
    from starlette.middleware import Middleware

    current = superlink_main._get_middleware
    counts: dict[str, int] = {}

    def get_middleware() -> list[Any]:
        return [Middleware(RequestCounter, counts=counts), *current()]

    for mark in (_PATCHED_MARK, _SCOPED_MARK):
        setattr(get_middleware, mark, getattr(current, mark, False))
    setattr(superlink_main, "_get_middleware", get_middleware)  # noqa: B010 (a module global of flwr's)
    return counts


def _outermost(current: Callable[[], list[Any]], *middleware: Any) -> list[Any]:
    """flwr's SuperLink middleware list (`current()`) with `middleware` added outermost, after
    only an installed extension's own (which come first in flwr's list and must stay first)."""
    from flwr.superlink import extensions

    out = list(current())
    first = len(extensions.get_middleware())
    return [*out[:first], *middleware, *out[first:]]


def patch_superlink_idle_pulls(recheck_s: float, *, hold_s: float = 0.0, max_held: int = 0) -> PendingTracker:
    """Answer a known-idle SuperNode's poll before Flower's middleware, handler and database
    (`_IdlePullShortcut`, `PendingTracker`); this process must be the SuperLink's, before its app
    is built. `recheck_s`: how long one empty full poll vouches for a node (then a full poll
    again). `hold_s` > 0: such polls, and a ServerApp's idle reply pulls, are long polls
    (`_PollHold`), at most `max_held` at a time; a shutdown signal ends every hold at once
    (`_release_holds_on_exit`). Returns the tracker (tests read it)."""
    check_flwr_version()
    import flwr.superlink.main as superlink_main

    if _pending:
        return _pending[0]
    for module_name, name in (("flwr.common.constant", "TIMESTAMP_HEADER"),
                              ("flwr.common.constant", "TIMESTAMP_TOLERANCE"),
                              ("flwr.common.constant", "SYSTEM_TIME_TOLERANCE"),
                              ("flwr.supercore.constant", "FLEET_HTTP_PUBLIC_KEY_HEADER"),
                              ("flwr.supercore.constant", "FLEET_HTTP_SIGNATURE_HEADER"),
                              ("flwr.supercore.protobuf.constants", "PROTOBUF_MEDIA_TYPE"),
                              ("flwr.supercore.date", "now"),
                              ("flwr.supercore.primitives.asymmetric", "verify_signature"),
                              ("flwr.supercore.primitives.asymmetric", "bytes_to_public_key")):
        _check_name(module_name, name, (), ())
    from flwr.superlink.routers.fleet import node_auth
    from flwr.superlink.servicer.fleet import fleet_handlers

    auth_source = inspect.getsource(node_auth.authenticate_node)
    _require(all(part in auth_source for part in (
        "FLEET_HTTP_PUBLIC_KEY_HEADER", "FLEET_HTTP_SIGNATURE_HEADER", "TIMESTAMP_HEADER",
        "verify_signature(", 'encode("ascii")', "get_node_id_by_public_key(public_key) != node_id")),
        "fleet node_auth.authenticate_node changed (what the idle-poll shortcut re-checks)")
    _require("state.get_message_ins(node_id=node_id, limit=1)"
             in inspect.getsource(fleet_handlers.pull_messages),
             "fleet_handlers.pull_messages no longer reads the node's messages with get_message_ins")
    _require(("POST", _PULL_MESSAGES_PATH) in importlib.import_module(
        "flwr.supercore.protobuf.translation").PROTOBUF_REQUEST_TYPES, "the Fleet pull-messages route moved")
    from flwr.common.constant import SUPERLINK_NODE_ID

    _require(SUPERLINK_NODE_ID == _SUPERLINK_NODE_ID, "SUPERLINK_NODE_ID changed")
    from flwr.superlink.servicer.runtime import runtime_handlers

    pull_source = inspect.getsource(runtime_handlers.pull_messages)
    _require("state.get_message_res(" in pull_source and "node_id=SUPERLINK_NODE_ID" in pull_source,
             "runtime_handlers.pull_messages no longer reads replies and the SuperLink node's messages")
    _require(("POST", _RUNTIME_PULL_PATH) in importlib.import_module(
        "flwr.supercore.protobuf.translation").PROTOBUF_REQUEST_TYPES,
        "the Runtime pull-messages route moved")
    tracker = PendingTracker(recheck_s)
    runs = PendingTracker(min(recheck_s, _REPLY_RECHECK_S), kind="run")
    _patch_linkstate_store_hook()
    if hold_s > 0:
        _release_holds_on_exit()
    current = superlink_main._get_middleware
    from starlette.middleware import Middleware

    def get_middleware() -> list[Any]:
        holds: dict[str, Any] = {"hold_s": hold_s, "max_held": max_held}
        return _outermost(current, Middleware(_IdlePullShortcut, tracker=tracker, **holds),
                          Middleware(_IdleReplyPullShortcut, tracker=runs, **holds))

    setattr(get_middleware, _PATCHED_MARK, True)
    setattr(get_middleware, _SCOPED_MARK, getattr(current, _SCOPED_MARK, False))
    setattr(superlink_main, "_get_middleware", get_middleware)  # noqa: B010 (a module global of flwr's)
    _pending.append(tracker)
    _pending_runs.append(runs)
    return tracker


def _release_holds_on_exit() -> None:
    """End every held poll (`PendingTracker.release_all`) when uvicorn, which serves Flower's
    SuperLink, is told to exit (SIGINT/SIGTERM: `uvicorn.Server.handle_exit`). uvicorn's graceful
    shutdown waits for in-flight requests; a held poll is one, so without this a stop or restart
    would wait out the holds."""
    import uvicorn

    current = uvicorn.Server.handle_exit
    if getattr(current, _PATCHED_MARK, False):
        return
    _require(list(inspect.signature(current).parameters) == ["self", "sig", "frame"]
             and "self.handle_exit" in inspect.getsource(uvicorn.Server),
             "uvicorn.Server no longer installs handle_exit(sig, frame) as its signal handler")

    @functools.wraps(current)
    def handle_exit(self: Any, sig: int, frame: Any) -> None:
        for tracker in (*_pending, *_pending_runs):
            tracker.release_all()
        current(self, sig, frame)

    setattr(handle_exit, _PATCHED_MARK, True)
    setattr(uvicorn.Server, "handle_exit", handle_exit)  # noqa: B010 (a method of uvicorn's)
