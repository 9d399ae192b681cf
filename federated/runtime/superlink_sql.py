"""Fewer SQL transactions at the SuperLink per round (issue 20: the SuperLink's CPU is SQL now).

Part of the flwr-internals boundary (like `flwr_internals`, whose guards it uses: a layout check
that fails loudly on a flwr upgrade). Counted at ten hospitals (a plain round of `bench_scale`, an
SQLAlchemy listener on the SuperLink's engine; docs/benchmarks/flower.md, "SQL per round at the
SuperLink"): about 1,080 statements in 390 transactions a round, of which

- 98 transactions were flwr's node-key look-up (`get_node_id_by_public_key`, every Fleet request's
  node check), read again after nearly every request although `patch_superlink_node_key_cache`
  keeps it: that cache ends at every write to the node table, and every SuperNode's heartbeat
  (33 a round) is one. A heartbeat cannot change which node a key belongs to
  (`patch_superlink_heartbeat_keeps_node_keys`);
- 17 were flwr's sweep of lapsed task claims (two `UPDATE`s, throttled to every 0.5 s by
  `flwr_internals.patch_superlink_task_sweep`), each a write transaction that takes SQLite's
  write lock (and waits for it behind the round's other writes) to update nothing: every task
  keeps its claim while the study runs. A read first now says whether any claim has lapsed
  (`patch_superlink_task_sweep_reads_first`);
- 10 were flwr's addition of each reply's ClientApp runtime to its run's row
  (`add_clientapp_runtime`, a write transaction per reply pushed), which only `flwr ls` reads: summed
  in memory now, as the traffic counters of the same row already are
  (`patch_superlink_runtime_batching`).

Each patch keeps flwr's results: the same rows are written, the same answers given.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any

from federated.runtime import flwr_internals
from federated.runtime.flwr_internals import _PATCHED_MARK, _require

#: this module's marks (not `_PATCHED_MARK`: the task-sweep throttle, applied after, checks that one)
_HEARTBEAT_MARK = "_exchange_heartbeat_keeps_node_keys"
_SWEEP_MARK = "_exchange_sweep_reads_first"


def patch_superlink_heartbeat_keeps_node_keys() -> None:
    """A SuperNode's heartbeat no longer ends the node-key cache (`flwr_internals.NodeKeyCache`;
    SuperLink process only). flwr's `acknowledge_node_heartbeat` is one `UPDATE` of the node's row
    where its status is not UNREGISTERED, setting it ONLINE, its `online_until`, heartbeat interval
    and activation time: the row's public key stays and its status is not UNREGISTERED before
    nor after, so `get_node_id_by_public_key` (the key's node among the not-unregistered ones)
    answers the same. Every other write to the node table (a registration, a deletion, an
    unregistration, an activation, a node tagged offline) still ends the cache at once. Idempotent."""
    flwr_internals.check_flwr_version()
    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    beat = SqlLinkState.acknowledge_node_heartbeat
    if getattr(beat, _HEARTBEAT_MARK, False):
        return
    _require(list(inspect.signature(beat).parameters) == ["self", "node_id", "heartbeat_interval"],
             "SqlLinkState.acknowledge_node_heartbeat changed its parameters")
    source = inspect.getsource(beat)
    _require(source.count("update(NodeModel)") == 1 and source.count(".values(") == 1
             and "NodeModel.status != NodeStatus.UNREGISTERED," in source
             and "status=NodeStatus.ONLINE," in source and "public_key" not in source
             and "session.scalar(stmt)" in source and source.count("session") == 3,
             "SqlLinkState.acknowledge_node_heartbeat changed (what "
             "patch_superlink_heartbeat_keeps_node_keys relies on: one UPDATE that neither sets a key "
             "nor touches an UNREGISTERED node)")
    key_lookup = inspect.getsource(getattr(SqlLinkState.get_node_id_by_public_key, "__wrapped__",
                                           SqlLinkState.get_node_id_by_public_key))
    _require("NodeModel.public_key == public_key" in key_lookup
             and "NodeModel.status != NodeStatus.UNREGISTERED" in key_lookup,
             "SqlLinkState.get_node_id_by_public_key no longer reads the key's not-unregistered node")

    @functools.wraps(beat)
    def acknowledge_node_heartbeat(self: Any, node_id: int, heartbeat_interval: float) -> bool:
        with flwr_internals.writes_leave(flwr_internals.NodeKeyCache):
            return bool(beat(self, node_id, heartbeat_interval))

    setattr(acknowledge_node_heartbeat, _HEARTBEAT_MARK, True)
    setattr(SqlLinkState, "acknowledge_node_heartbeat", acknowledge_node_heartbeat)  # noqa: B010


def patch_superlink_task_sweep_reads_first() -> None:
    """flwr's sweep of lapsed task claims (`SqlCoreState._cleanup_expired_task_tokens`: two
    `UPDATE`s of the tasks whose claim has a token and an `active_until` in the past) runs only when
    a read finds such a task (SuperLink process only). Each `UPDATE` takes SQLite's write lock,
    waiting behind the round's other writes, and updates nothing while every task keeps its claim;
    the read (`SELECT task_id ... LIMIT 1` on the same two conditions) takes no lock. When it finds
    one, flwr's own sweep runs, with its own clock. Apply before `patch_superlink_task_sweep`
    (whose throttle then wraps this). Idempotent."""
    flwr_internals.check_flwr_version()
    from flwr.supercore.corestate import sql_corestate

    cls = sql_corestate.SqlCoreState
    sweep = cls._cleanup_expired_task_tokens
    if getattr(sweep, _SWEEP_MARK, False):
        return
    _require(not getattr(sweep, _PATCHED_MARK, False),
             "patch_superlink_task_sweep_reads_first must be applied before the task-sweep throttle")
    _require(list(inspect.signature(sweep).parameters) == ["self"],
             "SqlCoreState._cleanup_expired_task_tokens changed its parameters")
    source = inspect.getsource(sweep)
    _require("expired_at = now()" in source and source.count("update(TaskModel)") == 2
             and source.count("TaskModel.token.is_not(None),") == 2
             and source.count("TaskModel.active_until < expired_at,") == 2
             and source.count("session.") == 2 and "delete(" not in source and "insert(" not in source,
             "SqlCoreState._cleanup_expired_task_tokens changed (what patch_superlink_task_sweep_reads_first "
             "checks first: both UPDATEs need a token and an active_until in the past)")
    task_model, select = sql_corestate.TaskModel, sql_corestate.select

    @functools.wraps(sweep)
    def cleanup_expired_task_tokens(self: Any) -> None:
        with self.session() as session:
            lapsed = session.scalar(
                select(task_model.task_id)
                .where(task_model.token.is_not(None), task_model.active_until < sql_corestate.now())
                .limit(1))
        if lapsed is not None:
            sweep(self)

    setattr(cleanup_expired_task_tokens, _SWEEP_MARK, True)
    setattr(cls, "_cleanup_expired_task_tokens", cleanup_expired_task_tokens)  # noqa: B010


class RuntimeBatcher:
    """flwr's per-run ClientApp runtime total (`SqlLinkState.add_clientapp_runtime`: an UPDATE
    transaction per reply a SuperNode pushes) summed in memory and written at most once per
    `interval_s` per run, before any read of it (`get_run_info`, its only reader), and at process
    exit: as `flwr_internals.TrafficBatcher` does for the traffic counters of the same row."""

    def __init__(self, interval_s: float, write: Callable[[Any, int, float], None]) -> None:
        if not interval_s > 0:
            raise ValueError(f"interval_s: must be > 0, got {interval_s!r}")
        self.interval_s = interval_s
        self._write = write
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._pending: dict[int, tuple[Any, dict[int, float]]] = {}  # id(state) -> (state, run -> s)
        self._last_flush = time.monotonic()
        self.writes = 0

    def add(self, state: Any, run_id: int, runtime: float) -> None:
        with self._lock:
            runs = self._pending.setdefault(id(state), (state, {}))[1]
            runs[run_id] = runs.get(run_id, 0.0) + runtime
            due = time.monotonic() - self._last_flush >= self.interval_s
        if due:
            self.flush()

    def flush(self) -> None:
        """Write every pending total (a run deleted meanwhile: dropped, as flwr's own
        `add_clientapp_runtime` would have refused it)."""
        with self._flush_lock:
            with self._lock:
                pending, self._pending = self._pending, {}
                self._last_flush = time.monotonic()
            for state, runs in pending.values():
                for run_id, runtime in runs.items():
                    try:
                        self._write(state, run_id, runtime)
                        self.writes += 1
                    except ValueError:  # "Run ... not found"
                        pass


_runtime_batchers: list[RuntimeBatcher] = []


def patch_superlink_runtime_batching(interval_s: float) -> RuntimeBatcher:
    """Sum flwr's ClientApp runtime accounting in memory (`RuntimeBatcher`; SuperLink process
    only): flwr 1.42 adds each reply's ClientApp runtime to its run's row with an UPDATE
    transaction of its own (`add_clientapp_runtime`, in the Fleet `PushMessages` handler after
    the reply is stored: a write transaction per reply, ten a round at ten hospitals), read only
    by `get_run_info` (`flwr ls`), which now writes the pending totals first. Returns the batcher
    (tests read it). Idempotent."""
    flwr_internals.check_flwr_version()
    import atexit

    from flwr.server.superlink.linkstate.sql_linkstate import SqlLinkState

    if _runtime_batchers:
        return _runtime_batchers[0]
    add, read = SqlLinkState.add_clientapp_runtime, SqlLinkState.get_run_info
    _require(list(inspect.signature(add).parameters) == ["self", "run_id", "runtime"],
             "SqlLinkState.add_clientapp_runtime changed its parameters")
    module_source = inspect.getsource(importlib.import_module(SqlLinkState.__module__))
    _require(module_source.count("RunModel.clientapp_runtime") == 1
             and module_source.count("run.clientapp_runtime") == 1
             and module_source.count("_run_from_models(") == 2
             and "_run_from_models(" in inspect.getsource(getattr(read, "__wrapped__", read)),
             "SqlLinkState reads the ClientApp runtime somewhere else than get_run_info")
    batcher = RuntimeBatcher(interval_s, add)

    @functools.wraps(add)
    def add_clientapp_runtime(self: Any, run_id: int, runtime: float) -> None:
        batcher.add(self, run_id, runtime)

    @functools.wraps(read)
    def get_run_info(self: Any, *args: Any, **kwargs: Any) -> Any:
        batcher.flush()
        return read(self, *args, **kwargs)

    setattr(SqlLinkState, "add_clientapp_runtime", add_clientapp_runtime)  # noqa: B010 (methods of flwr's)
    setattr(SqlLinkState, "get_run_info", get_run_info)  # noqa: B010
    atexit.register(batcher.flush)
    _runtime_batchers.append(batcher)
    return batcher
