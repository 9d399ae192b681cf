"""Every use of flwr 1.42 internals, in one place, each guarded by a layout check.

Why this module exists: out of the box a Flower 1.42 round costs 20-30 s on our machines, mostly
in hard-coded sleeps (`time.sleep(3)` / `time.sleep(0.5)` in the SuperNode loop), a 1 s initial
back-off when a message's objects are not stored yet, and a new interpreter per ClientApp message.
Shortening those needs a few internals (see docs/flower.md). They are not public API, so each
patch first checks that flwr still looks the way it did when we measured it and raises
`FlowerLayoutError` (not an `assert`, which `python -O` would drop) if it does not: an upgrade
fails loudly at start-up instead of silently running slow or wrong. `RuntimeSettings.mode =
"plain"` runs without any of these patches.
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
import time as _time
import types
from collections.abc import Callable
from typing import Any

PINNED_FLWR_VERSION = "1.42.0"
_PATCHED_MARK = "_exchange_patched"


class FlowerLayoutError(RuntimeError):
    """flwr is not the version, or does not have the layout, these patches were written for."""


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


def _sleep_proxy(mapping: dict[float, float]) -> types.SimpleNamespace:
    """A stand-in for a module's global `time` whose `sleep` maps known literal values."""

    def sleep(seconds: float) -> None:
        _time.sleep(mapping.get(seconds, seconds))

    proxy = types.SimpleNamespace(**{k: getattr(_time, k) for k in dir(_time) if not k.startswith("__")})
    proxy.sleep = sleep
    setattr(proxy, _PATCHED_MARK, True)
    return proxy


def patch_supernode_sleeps(idle_sleep: float, reply_sleep: float) -> None:
    """Shorten the SuperNode's hard-coded sleeps (must run in the SuperNode's own process).

    flwr 1.42 `supernode/start_client_internal.py` calls `time.sleep(3)` when a poll of the
    SuperLink finds no message and `time.sleep(0.5)` twice while waiting for the ClientApp's reply
    and its objects. We swap that module's global `time` for a proxy; flwr's source is untouched.
    Idle 0.1-0.2 s is the sweet spot measured on 2 cores (lower burns CPU and gains nothing).
    """
    check_flwr_version()
    import flwr.supernode.start_client_internal as sci

    if getattr(sci.time, _PATCHED_MARK, False):
        return
    source = inspect.getsource(sci)
    _require(sci.time is _time, "start_client_internal no longer imports the `time` module")
    _require(source.count("time.sleep(3)") == 1, "start_client_internal: expected one time.sleep(3)")
    _require(source.count("time.sleep(0.5)") == 2, "start_client_internal: expected two time.sleep(0.5)")
    sci.time = _sleep_proxy({3: idle_sleep, 0.5: reply_sleep})  # type: ignore[assignment]


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


def is_patched(obj: object) -> bool:
    """Whether `obj` (a module's `time` or a pull function) carries one of our patches."""
    return bool(getattr(obj, _PATCHED_MARK, False))
