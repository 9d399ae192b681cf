"""The modules that touch flwr internals (`federated/runtime/flwr_internals.py`, and the SuperLink
patches that use its guards: `INTERNALS_MODULES`): its layout checks pass on the pinned flwr and
fail loudly, naming what moved, when any name, signature, constant or private attribute it relies
on changes; its speed patches; its small wrappers; and that no other module of the project
imports a non-public flwr module."""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.metadata
import inspect
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from federated.runtime import flwr_internals

ROOT = Path(__file__).resolve().parents[2]
#: Flower's documented public Python API (flwr.app, flwr.serverapp, flwr.clientapp).
PUBLIC_FLWR_MODULES = ("flwr.app", "flwr.serverapp", "flwr.clientapp")
PRODUCT_DIRS = ("consent", "audit", "federated", "exchange", "deploy")
#: the flwr-internals boundary: `flwr_internals` and the SuperLink patch modules built on its
#: guards (`_require`, `check_flwr_version`)
INTERNALS_MODULES = tuple(ROOT / "federated" / "runtime" / name
                          for name in ("flwr_internals.py", "superlink_routes.py", "superlink_delivery.py",
                                       "superlink_sql.py"))

# -- layout checks --------------------------------------------------------------------------------


@pytest.fixture
def fresh_checks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Forget which parts were checked already in this process (each is checked once)."""
    monkeypatch.setattr(flwr_internals, "_checked", set())


def test_the_pinned_flwr_has_the_layout_every_wrapper_relies_on(fresh_checks: None) -> None:
    flwr_internals.check_flwr_version()
    flwr_internals.check_layout()
    assert flwr_internals._checked == set(flwr_internals.LAYOUT_PARTS)


LAYOUT_ENTRIES = [(part, module, name) for part, entries in flwr_internals._LAYOUT.items()
                  for module, name, _params, _attrs in entries]


@pytest.mark.parametrize(("part", "module_name", "name"), LAYOUT_ENTRIES,
                         ids=[f"{p}:{m}.{n}" for p, m, n in LAYOUT_ENTRIES])
def test_every_moved_name_fails_loudly(fresh_checks: None, monkeypatch: pytest.MonkeyPatch, part: str,
                                       module_name: str, name: str) -> None:
    monkeypatch.delattr(importlib.import_module(module_name), name)
    with pytest.raises(flwr_internals.FlowerLayoutError, match=rf"{module_name}\.{name} is gone"):
        flwr_internals.check_layout(part)
    assert part not in flwr_internals._checked


def test_a_vanished_module_fails_loudly(fresh_checks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module

    def without_grid(name: str, package: str | None = None) -> Any:
        if name == "flwr.superlink.grid":
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, package)

    monkeypatch.setattr(flwr_internals.importlib, "import_module", without_grid)
    with pytest.raises(flwr_internals.FlowerLayoutError, match=r"module flwr\.superlink\.grid is gone"):
        flwr_internals.check_layout("serverapp")


def test_a_lost_parameter_fails_loudly(fresh_checks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.common.config as config

    monkeypatch.setattr(config, "get_fab_config", lambda path: {})
    with pytest.raises(flwr_internals.FlowerLayoutError, match=r"get_fab_config no longer takes fab_file"):
        flwr_internals.check_layout("clientapp")


def test_a_lost_method_fails_loudly(fresh_checks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.supercore.runtime import RuntimeHttpClient

    monkeypatch.delattr(RuntimeHttpClient, "AcquireTask")
    with pytest.raises(flwr_internals.FlowerLayoutError, match=r"RuntimeHttpClient has no AcquireTask"):
        flwr_internals.check_layout("runtime")


def test_a_renumbered_error_code_fails_loudly(fresh_checks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.common.constant import ErrorCode

    monkeypatch.setattr(ErrorCode, "NODE_UNAVAILABLE", 9)
    with pytest.raises(flwr_internals.FlowerLayoutError, match=r"ErrorCode.NODE_UNAVAILABLE is no longer 5"):
        flwr_internals.check_layout("message")


def test_moved_private_metadata_fields_fail_loudly(fresh_checks: None,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.app import Metadata

    monkeypatch.setattr(Metadata, "message_id", property(lambda self: self.__dict__.get("_id", "")))
    with pytest.raises(flwr_internals.FlowerLayoutError, match=r"Metadata no longer keeps message_id"):
        flwr_internals.check_layout("message")


def test_a_grid_without_its_runtime_client_property_fails_loudly(
        fresh_checks: None, monkeypatch: pytest.MonkeyPatch) -> None:
    from flwr.superlink.grid import HttpGrid

    monkeypatch.setattr(HttpGrid, "_runtime_client", None)
    with pytest.raises(flwr_internals.FlowerLayoutError, match=r"_runtime_client is no longer a property"):
        flwr_internals.check_layout("serverapp")


def test_an_unknown_part_is_refused() -> None:
    with pytest.raises(ValueError, match=r"^part: unknown layout part 'grid'"):
        flwr_internals.check_layout("grid")


def test_wrappers_check_the_layout_before_touching_flwr(fresh_checks: None,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supercore.control as control

    monkeypatch.delattr(control, "ControlHttpClient")
    with pytest.raises(flwr_internals.FlowerLayoutError, match="ControlHttpClient is gone"):
        flwr_internals.ControlApi("127.0.0.1:9", insecure=True, root_certificates=None)


# -- wrappers that need no running process ------------------------------------------------------------


def test_task_identity_and_metadata_stamps_reach_messages(task_identity: Any) -> None:
    from flwr.app import Message, RecordDict

    flwr_internals.set_task_identity(task_id=11, run_id=22, node_id=0)
    message = Message(RecordDict(), dst_node_id=3, message_type="query")
    assert (message.metadata.run_id, message.metadata.src_task_id) == (22, 11)
    flwr_internals.stamp_metadata(message.metadata, message_id="m-1", run_id=33)
    assert (message.metadata.message_id, message.metadata.run_id) == ("m-1", 33)
    flwr_internals.stamp_metadata(message.metadata, run_id=34)
    assert (message.metadata.message_id, message.metadata.run_id) == ("m-1", 34)


def test_node_gone_codes_are_flowers() -> None:
    from flwr.common.constant import ErrorCode

    assert {ErrorCode.MESSAGE_UNAVAILABLE, ErrorCode.NODE_UNAVAILABLE} == flwr_internals.NODE_GONE_ERROR_CODES


# -- nobody else touches flwr internals ----------------------------------------------------------------


def _flwr_internals_used(path: Path, root: Path = ROOT) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        modules: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            modules = [node.module]
        elif isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        for module in modules:
            if (module == "flwr" or module.startswith("flwr.")) and not any(
                    module == public or module.startswith(public + ".") for public in PUBLIC_FLWR_MODULES):
                found.append(f"{path.relative_to(root)}:{node.lineno} imports {module}")
        if isinstance(node, ast.Attribute) and node.attr in ("_runtime_client", "__dict__"):
            found.append(f"{path.relative_to(root)}:{node.lineno} uses .{node.attr}")
    return found


def test_no_other_module_uses_flwr_internals() -> None:
    offenders = [hit for directory in PRODUCT_DIRS for path in sorted((ROOT / directory).rglob("*.py"))
                 if path not in INTERNALS_MODULES for hit in _flwr_internals_used(path)]
    assert offenders == []


def test_the_boundary_check_sees_internal_imports_and_private_attributes(tmp_path: Path) -> None:
    probe = tmp_path / "probe.py"
    probe.write_text("from flwr.supercore.constant import TaskType\nfrom flwr.app import Message\n"
                     "import flwr.serverapp\ngrid._runtime_client\n"
                     "message.metadata.__dict__['_run_id'] = 1\n")
    assert sorted(_flwr_internals_used(probe, tmp_path)) == [
        "probe.py:1 imports flwr.supercore.constant", "probe.py:4 uses ._runtime_client",
        "probe.py:5 uses .__dict__"]


# -- speed patches (exact flwr version only) ---------------------------------------------------


@pytest.fixture
def restore_flwr_modules() -> Any:
    """Start from flwr's own functions and undo our patches after the test (they are process-global:
    `run_study` in another test of this process may already have patched the grid module)."""
    import time

    import flwr.superlink.grid.http_grid as hg
    import flwr.supernode.start_client_internal as sci
    from flwr.supercore.inflatable import inflatable_utils
    from flwr.supernode.runtime import run_clientapp as rc

    saved = [(sci, "time", sci.time), (sci, "pull_objects", sci.pull_objects),
             (hg, "pull_objects", hg.pull_objects),
             (rc, "pull_and_inflate_object_from_tree", rc.pull_and_inflate_object_from_tree),
             (sci, "_pull_and_store_message", sci._pull_and_store_message),
             (sci, "_push_messages", sci._push_messages)]
    hooks, pacers = list(flwr_internals._message_hooks), list(flwr_internals._supernode_pacers)
    signals = list(flwr_internals._reply_signals)
    sci.time = time
    sci.pull_objects = hg.pull_objects = inflatable_utils.pull_objects
    rc.pull_and_inflate_object_from_tree = inflatable_utils.pull_and_inflate_object_from_tree
    yield sci
    for module, name, value in saved:
        setattr(module, name, value)
    flwr_internals._message_hooks[:], flwr_internals._supernode_pacers[:] = hooks, pacers
    flwr_internals._reply_signals[:] = signals


def test_supernode_sleeps_are_mapped(restore_flwr_modules: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sci = restore_flwr_modules
    slept: list[float] = []
    monkeypatch.setattr(flwr_internals._time, "sleep", slept.append)
    flwr_internals.patch_supernode_sleeps(idle_sleep=0.15, reply_sleep=0.03)
    assert flwr_internals.is_patched(sci.time)
    sci.time.sleep(3)
    started = time.monotonic()
    sci.time.sleep(0.5)  # the reply wait: no reply stored, so it lasts the reply sleep (real time)
    waited = time.monotonic() - started
    sci.time.sleep(7)
    assert slept == [0.15, 0.0, 7] and 0.03 <= waited < 1.0
    # the rest of the time module is still there
    assert sci.time.time() > 0
    # idempotent: a second call keeps the first proxy
    proxy = sci.time
    flwr_internals.patch_supernode_sleeps(idle_sleep=1.0, reply_sleep=1.0)
    assert sci.time is proxy


def test_the_supernode_stops_waiting_for_a_reply_once_the_executor_stored_it(
        restore_flwr_modules: Any) -> None:
    """flwr's `_push_messages` sleeps 0.5 s (ours `supernode_reply_sleep`) between checks for the
    ClientApp's reply; the hosted executor ends that wait when it stored the reply
    (`supernode_reply_stored`), so the reply goes out at once, not after the sleep."""
    sci = restore_flwr_modules
    flwr_internals.patch_supernode_sleeps(idle_sleep=0.1, reply_sleep=10.0)
    timer = threading.Timer(0.05, flwr_internals.supernode_reply_stored)
    started = time.monotonic()
    timer.start()
    sci.time.sleep(0.5)  # flwr waiting for the reply
    assert time.monotonic() - started < 5.0
    flwr_internals.supernode_reply_stored()  # a reply stored between two checks: the next wait is short
    started = time.monotonic()
    sci.time.sleep(0.5)
    assert time.monotonic() - started < 5.0
    timer.join()


def test_idle_pacer_polls_fast_while_hot_then_backs_off_to_its_cap() -> None:
    hot = flwr_internals.IdlePacer(0.1, 0.5, hot_s=60.0)
    assert [hot.next_sleep() for _ in range(5)] == [0.1] * 5  # a study's messages keep coming
    cold = flwr_internals.IdlePacer(0.1, 0.5, hot_s=0.0, growth=2.0)
    assert [round(cold.next_sleep(), 6) for _ in range(5)] == [0.2, 0.4, 0.5, 0.5, 0.5]
    cold.active()  # a message: fast again (and, hot_s being 0, growing again from there)
    assert round(cold.next_sleep(), 6) == 0.2
    assert flwr_internals.IdlePacer(0.1).next_sleep() == 0.1  # no cap given: never slower
    with pytest.raises(ValueError, match="fast <= slow"):
        flwr_internals.IdlePacer(0.5, 0.1)


def test_idle_pacer_counts_a_held_poll_against_its_sleep() -> None:
    """With `poll_started`: after a poll the SuperLink held (a long poll) for at least the sleep
    the next one starts at once; after a quicker one the whole sleep, as before."""
    now = [0.0]
    pacer = flwr_internals.IdlePacer(0.1, 0.5, hot_s=60.0, clock=lambda: now[0])
    pacer.poll_started()
    now[0] = 2.0  # the SuperLink held this poll for 2 s
    assert pacer.next_sleep() == 0.0
    pacer.poll_started()
    now[0] = 2.025  # answered at once
    assert pacer.next_sleep() == 0.1
    assert pacer.next_sleep() == 0.1  # no poll started since: the whole sleep


def test_idle_pacer_polls_faster_after_a_reply_whose_answer_comes_at_once() -> None:
    """`expect_follow_up` (a SecAgg+ stage that is not the round's last): once the reply is out
    (the next activity) the pacer sleeps `follow_up` until the message came (the activity after)
    or `follow_up_s` passed; a reply without the announcement opens no window."""
    now = [0.0]
    pacer = flwr_internals.IdlePacer(0.1, 0.5, hot_s=60.0, clock=lambda: now[0], follow_up=0.02,
                                     follow_up_s=0.5)
    pacer.expect_follow_up()  # the ClientApp is answering a collect stage
    assert pacer.next_sleep() == 0.1  # the reply is not out yet
    pacer.active()  # the reply is pushed
    assert [pacer.next_sleep() for _ in range(3)] == [0.02] * 3
    now[0] = 0.3
    pacer.active()  # the unmask message came: the window ends
    assert pacer.next_sleep() == 0.1
    pacer.active()  # its reply (no announcement): no window
    assert pacer.next_sleep() == 0.1
    pacer.expect_follow_up()
    pacer.active()
    now[0] = 0.79
    assert pacer.next_sleep() == 0.02
    now[0] = 0.81  # no message within follow_up_s: back to the hot sleep
    assert pacer.next_sleep() == 0.1
    off = flwr_internals.IdlePacer(0.1, 0.5, hot_s=60.0)  # follow_up 0: the announcement changes nothing
    off.expect_follow_up()
    off.active()
    assert off.next_sleep() == 0.1
    with pytest.raises(ValueError, match="follow_up <= fast"):
        flwr_internals.IdlePacer(0.1, 0.5, follow_up=0.2, follow_up_s=1.0)


def test_supernode_loop_wakes_the_hooks_after_a_stored_message_and_paces_idle_polls(
        restore_flwr_modules: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The SuperNode's idle sleep backs off when no message came for `hot_s`; a stored message
    (its task ready) runs the hooks (`hosted_supernode` wakes its executor) and makes the
    polls fast again, as does a reply pushed."""
    sci = restore_flwr_modules
    found: list[int | None] = [None]
    pushed: list[int] = []

    def pull_and_store(state: Any, object_store: Any, receive: Any, **kwargs: Any) -> int | None:
        return found[0]

    def push(state: Any, object_store: Any, send: Any, **kwargs: Any) -> None:
        pushed.append(1)

    monkeypatch.setattr(sci, "_pull_and_store_message", pull_and_store)  # flwr's, minus its work
    monkeypatch.setattr(sci, "_push_messages", push)
    slept: list[float] = []
    monkeypatch.setattr(flwr_internals._time, "sleep", slept.append)
    flwr_internals.patch_supernode_sleeps(idle_sleep=0.1, reply_sleep=0.02, idle_sleep_max=0.4, hot_s=0.0)
    woken: list[int] = []
    flwr_internals.on_supernode_message(lambda: woken.append(1))
    assert sci._pull_and_store_message(None, None, None) is None and woken == []
    for _ in range(4):
        sci.time.sleep(3)
    assert [round(s, 6) for s in slept] == [0.15, 0.225, 0.3375, 0.4]
    found[0] = 7
    assert sci._pull_and_store_message(None, None, None) == 7 and woken == [1]
    slept.clear()
    sci.time.sleep(3)
    assert [round(s, 6) for s in slept] == [0.15]  # after the message: from the fast end again
    sci.time.sleep(3)
    sci._push_messages(None, None, None)
    slept.clear()
    sci.time.sleep(3)
    assert pushed == [1] and [round(s, 6) for s in slept] == [0.15]


def test_supernode_heartbeat_is_shortened_within_the_superlinks_range(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import flwr.supercore.heartbeat as hb
    import flwr.supernode.fleet_http_connection as fhc

    # monkeypatch restores flwr's 30 s after the test (the patch is process-global)
    monkeypatch.setattr(fhc, "HEARTBEAT_DEFAULT_INTERVAL", fhc.HEARTBEAT_DEFAULT_INTERVAL)
    monkeypatch.setattr(hb, "HEARTBEAT_DEFAULT_INTERVAL", hb.HEARTBEAT_DEFAULT_INTERVAL)
    assert fhc.HEARTBEAT_DEFAULT_INTERVAL == 30
    flwr_internals.patch_supernode_heartbeat(10.0)
    assert fhc.HEARTBEAT_DEFAULT_INTERVAL == hb.HEARTBEAT_DEFAULT_INTERVAL == 10.0
    with pytest.raises(flwr_internals.FlowerLayoutError, match="range"):
        flwr_internals.patch_supernode_heartbeat(5.0)  # the SuperLink would refuse the node


def test_pull_backoff_patches_bind_arguments(restore_flwr_modules: Any) -> None:
    import flwr.superlink.grid.http_grid as hg
    from flwr.supernode.runtime import run_clientapp as rc

    sci = restore_flwr_modules
    flwr_internals.patch_supernode_pull_backoff(0.02)
    flwr_internals.patch_grid_pull_backoff(0.03)
    flwr_internals.patch_clientapp_pull_backoff(0.04)
    for func, initial in ((sci.pull_objects, 0.02), (hg.pull_objects, 0.03),
                          (rc.pull_and_inflate_object_from_tree, 0.04)):
        assert isinstance(func, functools.partial)
        assert func.keywords == {"initial_backoff": initial, "backoff_cap": 0.5}
    first = hg.pull_objects
    flwr_internals.patch_grid_pull_backoff(0.9)
    assert hg.pull_objects is first  # not wrapped twice


def test_changed_flwr_layout_fails_loudly(restore_flwr_modules: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    real = inspect.getsource

    def edited(obj: Any) -> str:
        return real(obj).replace("time.sleep(3)", "time.sleep(2)")

    monkeypatch.setattr(flwr_internals.inspect, "getsource", edited)
    with pytest.raises(flwr_internals.FlowerLayoutError, match=r"time.sleep\(3\)"):
        flwr_internals.patch_supernode_sleeps(0.1, 0.02)
    assert not flwr_internals.is_patched(restore_flwr_modules.time)


def test_missing_backoff_argument_fails_loudly(restore_flwr_modules: Any) -> None:
    sci = restore_flwr_modules
    sci.pull_objects = lambda object_ids, pull_object_fn: {}
    with pytest.raises(flwr_internals.FlowerLayoutError, match="initial_backoff"):
        flwr_internals.patch_supernode_pull_backoff(0.02)


def test_other_flwr_version_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.metadata.version
    monkeypatch.setattr(flwr_internals.importlib.metadata, "version",
                        lambda name: "1.43.0" if name == "flwr" else real(name))
    with pytest.raises(flwr_internals.FlowerLayoutError, match=r"1.43.0"):
        flwr_internals.patch_grid_pull_backoff(0.02)


def test_pinned_version_is_installed() -> None:
    assert importlib.metadata.version("flwr") == flwr_internals.PINNED_FLWR_VERSION


def test_bound_retries_gives_up_on_a_lost_superlink_and_on_401_without_signalling() -> None:
    """The coordinator's ServerApp grid: Flower retries a lost SuperLink forever and answers a 401
    with SIGINT to its own process (the coordinator's); bounded, it raises instead."""
    import signal

    import httpx
    from flwr.superlink.grid import HttpGrid

    invoker = HttpGrid(token="probe")._retry_invoker
    flwr_internals.bound_retries(invoker, 0.5)
    signals: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, _frame: signals.append(signum))
    try:
        def unauthorized() -> None:
            request = httpx.Request("POST", "http://127.0.0.1:9/v1/runtime/get-nodes")
            raise httpx.HTTPStatusError("401", request=request, response=httpx.Response(401, request=request))

        with pytest.raises(httpx.HTTPStatusError):
            invoker.invoke(unauthorized)
        assert signals == []
        # a lost SuperLink: given up after the bound (Flower's own invoker never returns here)
        with pytest.raises(httpx.ConnectError):
            invoker.invoke(lambda: (_ for _ in ()).throw(httpx.ConnectError("refused")))
    finally:
        signal.signal(signal.SIGINT, previous)


def test_node_heartbeat_runs_the_hooks_and_survives_answers_flwr_does_not_expect(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """`on_supernode_heartbeat`: the hooks run after an accepted heartbeat (`hosted_supernode`
    touches its liveness file); flwr's `send_node_heartbeat` raising on `success=False` or on an
    HTTP status other than 401 and 502-504 ended its heartbeat thread (a polling node offline for
    good): now a failed heartbeat, retried. A 401 still reaches flwr's thread (flwr has SIGINTed)."""
    import flwr.supernode.fleet_http_connection as fhc
    import httpx
    from flwr.supercore.heartbeat import HeartbeatSender

    monkeypatch.setattr(fhc, "HeartbeatSender", fhc.HeartbeatSender)  # undone after the test
    monkeypatch.setattr(flwr_internals, "_heartbeat_hooks", [])
    beats: list[int] = []
    flwr_internals.on_supernode_heartbeat(lambda: beats.append(1))
    flwr_internals.on_supernode_heartbeat(lambda: beats.append(2))

    def answer(status: int) -> httpx.HTTPStatusError:
        request = httpx.Request("POST", "http://127.0.0.1/v1/fleet/send-node-heartbeat")
        return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status, request=request))

    def raising(exc: Exception) -> Any:
        def beat() -> bool:
            raise exc
        return beat

    def sender(fn: Any) -> Any:
        built = fhc.HeartbeatSender(fn)
        assert isinstance(built, HeartbeatSender)
        return built.heartbeat_fn

    assert sender(lambda: True)() is True and beats == [1, 2]
    assert sender(lambda: False)() is False and beats == [1, 2]
    assert sender(raising(RuntimeError("Heartbeat failed unexpectedly")))() is False
    assert sender(raising(answer(500)))() is False
    with pytest.raises(httpx.HTTPStatusError):
        sender(raising(answer(401)))()
    assert beats == [1, 2]


class _SlowRuntimeClient:
    """The ServerApp's Runtime API, replies in memory; each object pull takes `pull_s`. Records
    how many object pulls were in flight at once and the receipts confirmed."""

    def __init__(self, replies: list[Any], pull_s: float) -> None:
        from flwr.app.message import remove_content_from_message
        from flwr.common.serde import message_to_proto
        from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects, get_object_tree

        self.protos = [message_to_proto(remove_content_from_message(m)) for m in replies]
        self.trees = [get_object_tree(m) for m in replies]
        self.objects = {k: v.deflate() for m in replies for k, v in get_all_nested_objects(m).items()}
        self.pull_s, self.in_flight, self.most_in_flight = pull_s, 0, 0
        self.confirmed: list[str] = []
        self.lock = threading.Lock()

    def PullMessages(self, request: Any) -> Any:
        from flwr.proto.runtime_pb2 import PullAppMessagesResponse

        return PullAppMessagesResponse(messages_list=self.protos, message_object_trees=self.trees)

    def PullObject(self, request: Any) -> Any:
        from flwr.proto.message_pb2 import PullObjectResponse

        with self.lock:
            self.in_flight += 1
            self.most_in_flight = max(self.most_in_flight, self.in_flight)
        threading.Event().wait(self.pull_s)
        with self.lock:
            self.in_flight -= 1
        content = self.objects.get(request.object_id)
        return PullObjectResponse(object_found=content is not None, object_available=True,
                                  object_content=content or b"")

    def ConfirmMessageReceived(self, request: Any) -> Any:
        with self.lock:
            self.confirmed.append(request.message_object_id)


def _replies(n: int) -> list[Any]:
    from flwr.app import ConfigRecord, Message, RecordDict

    out = []
    for i in range(n):
        reply = Message(RecordDict({"r": ConfigRecord({"hospital": f"h{i}", "i": i})}), dst_node_id=1,
                        message_type="train")
        reply.metadata.__dict__["_reply_to_message_id"] = f"{i:064x}"
        reply.metadata.__dict__["_message_id"] = reply.object_id
        out.append(reply)
    return out


def test_the_servers_reply_pull_fetches_the_replies_it_got_at_once(
        restore_flwr_modules: Any, task_identity: Any) -> None:
    """`patch_grid_reply_pulls`: the replies of one `PullMessages` are fetched concurrently (flwr:
    one reply after another, each its objects two at a time and its receipt), each as flwr
    does; they come back whole, confirmed, in the SuperLink's order; 1: one after another."""
    from flwr.supercore.run import Run
    from flwr.superlink.grid import http_grid as hg

    saved = hg.HttpGrid.pull_messages
    flwr_internals.set_task_identity(1, 5, 0)
    try:
        flwr_internals.patch_grid_reply_pulls(1)  # the default: flwr's own function stays
        assert hg.HttpGrid.pull_messages is saved
        for at_once, most in ((4, 3), (1, 2)):
            flwr_internals.patch_grid_reply_pulls(at_once)
            grid = hg.HttpGrid(insecure=True, token="t")
            grid._run = Run.create_empty(run_id=5)
            replies = _replies(3)
            client = _SlowRuntimeClient(replies, pull_s=0.05)
            grid._client = client
            got = list(grid.pull_messages([r.metadata.reply_to_message_id for r in replies]))
            assert [g.content["r"]["hospital"] for g in got] == ["h0", "h1", "h2"]
            assert [g.metadata.message_id for g in got] == [r.object_id for r in replies]
            assert sorted(client.confirmed) == sorted(r.object_id for r in replies)
            # flwr pulls a reply's objects two at a time: three replies at once, more in flight
            assert client.most_in_flight > most if at_once > 1 else client.most_in_flight <= most
        with pytest.raises(ValueError, match="at_once"):
            flwr_internals.patch_grid_reply_pulls(0)
    finally:
        hg.HttpGrid.pull_messages = saved
        flwr_internals._reply_pulls["at_once"] = 1
