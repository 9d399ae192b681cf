"""A message leaves the SuperLink only once its objects are there (issues 15 and 20).

flwr 1.42 stores a message (`PushMessages`: the message row, its object tree preregistered)
before the sender pushes the message's objects, one `PushObject` each, and hands it out at the
next `PullMessages` of its receiver: a SuperNode's poll (Fleet API, `get_message_ins`) or the
ServerApp's reply pull (Runtime API, `get_message_res`). A receiver that got the message before
its objects then pulls each object, is answered "found, not yet available" and retries with a
back-off (`pull_objects`): measured at ten hospitals with SecAgg+, 42 % of the SuperNodes'
object pulls. And a long poll woken at the message's commit always came before its objects.

Here, at flwr's LinkState (`SqlLinkState`, the SuperLink's own database; not the HTTP routes, so
every caller of flwr's handlers gets it):
- a pending message is handed out only when every object of its tree is available in flwr's
  ObjectStore (`objects.is_available`; one recursive query per poll that finds a message). An
  instruction held back stays undelivered (not claimed), a reply stays unclaimed: the next pull
  takes it. A message whose objects never come is left to flwr: its TTL ends it (flwr's claim
  skips an expired instruction; the ServerApp's pull gets flwr's own expiry error for a reply
  held back once its instruction expired, which this no longer holds back), and flwr deletes
  a push session's messages when the session expires. A message whose tree flwr cannot find
  (not preregistered) is handed out as before, to flwr's own handling. A message is held back at
  most `HOLD_MAX_S` after its store (then flwr's way: the receiver's object pulls back off), a
  bound should an object's arrival never be seen;
- `DeliveryWatch` knows, in memory, which stored messages still miss which objects (from their
  store, and from a poll that found one incomplete, e.g. after a SuperLink restart); when the
  last one is committed it calls `wake(key)` for the receiver ("node", id) or the run's
  ServerApp ("run", id). flwr_internals' idle-poll shortcut and long polls use it: a message
  stored with objects still to come is stored "quietly" (`flwr_internals.STORE_IS_QUIET`: its
  store does not end the receiver's known idleness), so the receiver's polls stay answered
  early (or held) until the message is deliverable, and are woken then, not at its commit.

This module, `superlink_routes` and `flwr_internals` touch flwr internals (the same layout-check
pattern: `FlowerLayoutError` on a flwr upgrade). `patch_superlink_delivery` is called from
`superlink_main` (with `flwr_internals.wake_receiver`), when `superlink_deliver_complete` is on.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
import threading
import time
from collections import deque
from collections.abc import Callable, Collection, Iterable
from typing import Any

from federated.runtime import flwr_internals

Key = tuple[str, int]

#: object ids committed, kept this long (by count) so that a poll's registration can replay the
#: commits it raced with; a registration older than the log counts as complete (a wasted full poll)
LOG_MAX = 8192
#: a waiting entry is dropped after this long (its message expired or was deleted meanwhile)
WAIT_MAX_S = 3600.0
#: at most this many of a node's pending instructions are looked at per poll
CANDIDATES_MAX = 64
#: a message is held back for its objects at most this long after it was stored; then it is
#: handed out as flwr does (its receiver's object pulls back off until they come): a bound, should
#: an object never be seen arriving, on how long this can delay a message
HOLD_MAX_S = 30.0
#: a receiver with a message held back for its objects is looked at in the database (one full poll,
#: `flwr_internals.set_recheck_due`) at the latest this long after the message's store, and after
#: each such look that still holds it back, again after as long as the message has waited (1, 2,
#: 4, ... s, the last at `HOLD_MAX_S`): its wake at the last object's commit is the fast path, this
#: the bound should that wake never come (an idle entry would otherwise vouch for the receiver up
#: to `superlink_idle_recheck`, up to 60 s, and a held poll up to its hold)
RECHECK_FIRST_S = 1.0

_PATCHED_MARK = "_exchange_delivery_patched"
_PUT_KEY = "exchange_objects_put"
_STORED_KEY = "exchange_delivery_stored"  # message ids registered in this session (undone on rollback)
_WAKE_KEY = "exchange_delivery_wake"  # receivers to wake at this session's commit
_DUE_KEY = "exchange_delivery_due"  # receivers to look at again after this session's commit
_SUPERLINK_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID, checked below


class DeliveryWatch:
    """Which stored messages still miss objects, and who to wake when they stop missing any.

    `register(message_id, key, missing, since)` records a message's missing object ids (read from
    the database); `since` is `seq()` read before that read, so the commits that raced with it
    are replayed from a log. `objects_committed(ids)` (after a commit that made objects
    available) removes them; a message left with none calls `wake(key)`.

    Apart from that, and not subject to it (an entry dropped, a log that does not reach back, a
    wake lost): by when each receiver with a message held back must be looked at in the database
    again (`schedule`, `checking`, `due`; `flwr_internals.set_recheck_due`), so that no message is
    held back longer than `RECHECK_FIRST_S` after its store, or after the last look, than it had
    waited before it, whatever becomes of its wake."""

    def __init__(self, wake: Callable[[Key], None]) -> None:
        self._wake = wake
        self._lock = threading.Lock()
        self._seq = 0
        self._log: deque[tuple[int, str]] = deque(maxlen=LOG_MAX)
        self._waiting: dict[str, tuple[Key, set[str], float]] = {}  # message -> (key, missing, since)
        self._by_object: dict[str, set[str]] = {}  # object -> messages that wait for it
        self._due: dict[Key, float] = {}  # receiver -> monotonic time of its next database look
        self.held_back = 0  # pulls that found a message and left it, objects missing
        self.woken = 0  # messages that became deliverable while watched

    def seq(self) -> int:
        with self._lock:
            return self._seq

    def register(self, message_id: str, key: Key, missing: Iterable[str], since: int | None = None) -> bool:
        """Watch `message_id` until `missing` are committed; whether it still misses any."""
        missing = set(missing)
        with self._lock:
            if since is not None and since < self._seq:
                if not self._log or self._log[0][0] > since + 1:
                    return False  # the log no longer reaches back: do not hold it back
                missing.difference_update(oid for seq, oid in self._log if seq > since)
            known = self._waiting.get(message_id)
            if known is not None:
                missing &= known[1]  # what the watch already saw committed stays committed
                self._unlink(message_id, known[1])
            if not missing:
                self._waiting.pop(message_id, None)
                return False
            self._waiting[message_id] = (key, missing, time.monotonic())
            for oid in missing:
                self._by_object.setdefault(oid, set()).add(message_id)
            if len(self._waiting) % 256 == 0:
                self._drop_old()
            return True

    def wake(self, key: Key) -> None:
        self._wake(key)

    def schedule(self, key: Key, after_s: float) -> None:
        """`key` has a message held back: look at it in the database again within `after_s`
        (the earliest of its schedules counts until `checking` is called)."""
        at = time.monotonic() + after_s
        with self._lock:
            current = self._due.get(key)
            self._due[key] = at if current is None else min(current, at)

    def checking(self, key: Key) -> None:
        """A pull for `key` is about to read the database (before its read: whatever is stored
        and committed after this is scheduled anew, at its commit or by this pull)."""
        with self._lock:
            self._due.pop(key, None)

    def due(self, key: Key) -> float:
        """By when (`time.monotonic()`) `key` must be looked at in the database; infinity: not
        due. Lock-free (the idle-poll shortcut calls it under its tracker's lock)."""
        return self._due.get(key, _NEVER)

    def waiting(self, message_id: str) -> bool:
        with self._lock:
            return message_id in self._waiting

    def discard(self, message_ids: Iterable[str]) -> None:
        """Stop watching (their store was rolled back)."""
        with self._lock:
            for message_id in message_ids:
                entry = self._waiting.pop(message_id, None)
                if entry is not None:
                    self._unlink(message_id, entry[1])

    def objects_committed(self, object_ids: Collection[str]) -> None:
        """`object_ids` are available now (their transaction committed): wake the receivers of
        the messages that miss nothing any more."""
        keys: list[Key] = []
        with self._lock:
            for oid in object_ids:
                self._seq += 1
                self._log.append((self._seq, oid))
                for message_id in self._by_object.pop(oid, ()):
                    entry = self._waiting.get(message_id)
                    if entry is None:
                        continue
                    entry[1].discard(oid)
                    if not entry[1]:
                        del self._waiting[message_id]
                        keys.append(entry[0])
            self.woken += len(keys)
        for key in dict.fromkeys(keys):
            self._wake(key)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waiting)

    def _unlink(self, message_id: str, missing: Iterable[str]) -> None:
        for oid in missing:
            waiters = self._by_object.get(oid)
            if waiters is not None:
                waiters.discard(message_id)
                if not waiters:
                    del self._by_object[oid]

    def _drop_old(self) -> None:
        cutoff = time.monotonic() - WAIT_MAX_S
        for message_id in [m for m, (_, _, since) in self._waiting.items() if since < cutoff]:
            self._unlink(message_id, self._waiting.pop(message_id)[1])


class _Process:
    """This process's patch state: its watch (None: not patched) and whether its SQLAlchemy
    listeners are installed (process-global, once)."""

    watch: DeliveryWatch | None = None
    listening = False


_process = _Process()
#: the message ids a claim may take (set by the `get_message_ins` wrapper for flwr's claim)
_allowed: contextvars.ContextVar[tuple[str, ...] | None] = contextvars.ContextVar("delivery_allowed",
                                                                                  default=None)


def watch() -> DeliveryWatch | None:
    return _process.watch


_NEVER = float("inf")


def _next_look(waited_s: float) -> float:
    """How long after a look that held a message back (it has waited `waited_s` since its store)
    the next look is due: as long as it has waited (at least `RECHECK_FIRST_S`), the last one at
    `HOLD_MAX_S`, when it is handed out whatever its objects."""
    return max(RECHECK_FIRST_S, min(waited_s, HOLD_MAX_S - waited_s))


def _require(condition: bool, what: str) -> None:
    if not condition:
        raise flwr_internals.FlowerLayoutError(
            f"flwr layout changed: {what} (see federated/runtime/superlink_delivery.py)")


def _tree_ids(tree: Any) -> list[str]:
    out, stack = [], [tree]
    while stack:
        node = stack.pop()
        out.append(node.object_id)
        stack.extend(node.children)
    return out


def _unavailable(session: Any, roots: Collection[str]) -> dict[str, set[str]]:
    """For each root object id whose tree (flwr's ObjectStore: `objects`, `object_children`)
    has objects not yet available: those object ids. A root absent from the store is not listed
    (flwr's handler deals with it as before)."""
    from flwr.supercore.state.schema.objectstore_models import ObjectChild, StoredObject
    from sqlalchemy import select

    if not roots:
        return {}
    tree = (select(StoredObject.object_id.label("root"), StoredObject.object_id.label("oid"))
            .where(StoredObject.object_id.in_(list(roots))).cte("tree", recursive=True))
    tree = tree.union(select(tree.c.root, ObjectChild.child_id)
                      .join(ObjectChild, ObjectChild.parent_id == tree.c.oid))
    rows = session.execute(select(tree.c.root, tree.c.oid)
                           .join(StoredObject, StoredObject.object_id == tree.c.oid)
                           .where(StoredObject.is_available == 0))
    out: dict[str, set[str]] = {}
    for root, oid in rows:
        out.setdefault(root, set()).add(oid)
    return out


def _same_database(state: Any) -> bool:
    """Whether flwr's ObjectStore shares the LinkState's SQL database (and so its transactions)."""
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore

    store = getattr(state, "object_store", None)
    return isinstance(store, SqlObjectStore) and getattr(store, "database_url", None) == getattr(
        state, "database_url", object())


def _check_layout() -> None:
    from flwr.common.constant import SUPERLINK_NODE_ID
    from flwr.server.superlink.linkstate import sql_linkstate
    from flwr.supercore.corestate.sql_corestate import SqlCoreState
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore
    from flwr.supercore.state.schema import objectstore_models
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    linkstate = sql_linkstate.SqlLinkState
    from flwr.supercore import sql_mixin

    _require("self.database_url = " in inspect.getsource(sql_mixin.SqlMixin.__init__)
             and "self._session_scope = self if self._is_in_memory_sqlite else self.database_url"
             in inspect.getsource(sql_mixin.SqlMixin.__init__),
             "SqlMixin no longer shares one session per database URL")
    _require(SUPERLINK_NODE_ID == _SUPERLINK_NODE_ID, "SUPERLINK_NODE_ID is no longer 1")
    for name in ("get_message_ins", "get_message_res", "_claim_message_ins_rows",
                 "store_message_and_object_tree", "session", "object_store"):
        _require(hasattr(linkstate, name), f"SqlLinkState.{name} is gone")
    _require(list(inspect.signature(linkstate.get_message_ins).parameters)
             == ["self", "node_id", "limit", "run_id"],
             "SqlLinkState.get_message_ins changed its parameters")
    _require(list(inspect.signature(linkstate.get_message_res).parameters)
             == ["self", "message_ids", "run_id"],
             "SqlLinkState.get_message_res changed its parameters")
    _require(list(inspect.signature(linkstate._claim_message_ins_rows).parameters)
             == ["self", "node_id", "limit", "run_id"],
             "SqlLinkState._claim_message_ins_rows changed its parameters")
    _require("self._claim_message_ins_rows(node_id, limit, run_id)"
             in inspect.getsource(linkstate.get_message_ins),
             "SqlLinkState.get_message_ins no longer claims through _claim_message_ins_rows")
    claim = inspect.getsource(linkstate._claim_message_ins_rows)
    _require("MessageInsModel.delivered_at == \"\"" in claim and "MessageInsModel.ttl" in claim
             and "_message_model_to_dict(model)" in claim, "SqlLinkState._claim_message_ins_rows changed")
    _require(callable(getattr(sql_linkstate, "_message_model_to_dict", None)),
             "sql_linkstate._message_model_to_dict is gone")
    for model, columns in ((sql_linkstate.MessageInsModel,
                            ("message_id", "dst_node_id", "run_id", "delivered_at", "created_at", "ttl")),
                           (sql_linkstate.MessageResModel,
                            ("message_id", "reply_to_message_id", "delivered_at", "created_at")),
                           (objectstore_models.StoredObject, ("object_id", "is_available")),
                           (objectstore_models.ObjectChild, ("parent_id", "child_id"))):
        for column in columns:
            _require(hasattr(model, column), f"{model.__name__}.{column} is gone")
    _require("is_available=1" in inspect.getsource(SqlObjectStore.put),
             "SqlObjectStore.put no longer sets is_available")
    _require(list(inspect.signature(SqlObjectStore.put).parameters)
             == ["self", "object_id", "object_content"],
             "SqlObjectStore.put changed its parameters")
    _require("self.object_store.put(" in inspect.getsource(SqlCoreState.store_object),
             "SqlCoreState.store_object no longer puts through the ObjectStore")
    _require("state.get_message_ins(node_id=node_id, limit=1)"
             in inspect.getsource(fleet_handlers.pull_messages),
             "the Fleet PullMessages handler no longer claims through get_message_ins")
    _require("state.get_message_res(" in inspect.getsource(runtime_handlers.pull_messages),
             "the Runtime PullMessages handler no longer claims through get_message_res")


def patch_superlink_delivery(wake: Callable[[Key], None]) -> DeliveryWatch:
    """Hand a message out only when its objects are all there (module docstring); `wake(key)`
    is called (from any thread, after the commit) when a watched message becomes deliverable.
    SuperLink process only; once per process (later calls return the same watch)."""
    from flwr.server.superlink.linkstate import sql_linkstate
    from flwr.supercore.object_store.sql_object_store import SqlObjectStore
    from flwr.supercore.state.schema.linkstate_models import MessageIns, MessageRes
    from flwr.supercore.state.schema.objectstore_models import StoredObject
    from sqlalchemy import event, false, select, update
    from sqlalchemy.orm import Session

    flwr_internals.check_flwr_version()
    linkstate = sql_linkstate.SqlLinkState
    if getattr(linkstate.get_message_ins, _PATCHED_MARK, False) and _process.watch is not None:
        return _process.watch
    _check_layout()
    watch_ = DeliveryWatch(wake)
    get_ins, get_res = linkstate.get_message_ins, linkstate.get_message_res
    claim, store_tree = linkstate._claim_message_ins_rows, linkstate.store_message_and_object_tree
    put = SqlObjectStore.put
    to_dict = sql_linkstate._message_model_to_dict

    def now_ts() -> float:
        from flwr.supercore.date import now

        return now().timestamp()

    @functools.wraps(get_ins)
    def get_message_ins(self: Any, node_id: int, limit: int | None, *, run_id: int | None = None) -> Any:
        if int(node_id) == _SUPERLINK_NODE_ID or not _same_database(self):
            return get_ins(self, node_id, limit, run_id=run_id)
        from flwr.supercore.utils import uint64_to_int64

        key: Key = ("node", int(node_id))
        watch_.checking(key)
        since = watch_.seq()
        conditions = [MessageIns.dst_node_id == uint64_to_int64(node_id), MessageIns.delivered_at == "",
                      MessageIns.created_at + MessageIns.ttl > now_ts()]
        if run_id is not None:
            conditions.append(MessageIns.run_id == uint64_to_int64(run_id))
        with self.session() as session:
            rows = session.execute(
                select(MessageIns.message_id, MessageIns.created_at).where(*conditions)
                .order_by(MessageIns.created_at.asc(), MessageIns.message_id.asc())
                .limit(CANDIDATES_MAX)).all()
            candidates = [m for m, _ in rows]
            created = {m: float(c or 0.0) for m, c in rows}
            current = now_ts()
            missing = _unavailable(session, [m for m in candidates if created[m] > current - HOLD_MAX_S])
        if not candidates:
            return []
        held = {m for m, ids in missing.items() if watch_.register(m, key, ids, since)}
        if held:
            watch_.schedule(key, _next_look(current - min(created[m] for m in held)))
        allowed = tuple(m for m in candidates if m not in held)
        if not allowed:
            watch_.held_back += 1
            return []
        token = _allowed.set(allowed)
        try:
            return get_ins(self, node_id, limit, run_id=run_id)
        finally:
            _allowed.reset(token)

    @functools.wraps(claim)
    def _claim_message_ins_rows(self: Any, node_id: int, limit: int | None, run_id: int | None = None) -> Any:
        allowed = _allowed.get()
        if allowed is None:
            return claim(self, node_id, limit, run_id)
        from flwr.supercore.date import now
        from flwr.supercore.utils import uint64_to_int64

        current = now()
        ids = list(allowed if limit is None else allowed[:limit])
        conditions = [MessageIns.message_id.in_(ids), MessageIns.dst_node_id == uint64_to_int64(node_id),
                      MessageIns.delivered_at == "",
                      MessageIns.created_at + MessageIns.ttl > current.timestamp()]
        if run_id is not None:
            conditions.append(MessageIns.run_id == uint64_to_int64(run_id))
        stmt = (update(MessageIns).where(*conditions).values(delivered_at=current.isoformat())
                .returning(MessageIns))
        with self.session() as session:
            return [to_dict(model) for model in session.scalars(stmt)]

    @functools.wraps(get_res)
    def get_message_res(self: Any, message_ids: set[str], run_id: int) -> Any:
        if not message_ids or not _same_database(self):
            return get_res(self, message_ids, run_id)
        key: Key = ("run", int(run_id))
        watch_.checking(key)
        since = watch_.seq()
        with self.session() as session:
            # SQLite's write lock first (an UPDATE of no row takes it): no reply is committed
            # between this check and flwr's claim below, in the same transaction
            session.execute(update(MessageRes).where(false()).values(delivered_at=MessageRes.delivered_at))
            current = now_ts()
            rows = session.execute(
                select(MessageRes.message_id, MessageRes.reply_to_message_id, MessageRes.created_at)
                .join(MessageIns, MessageIns.message_id == MessageRes.reply_to_message_id)
                .where(MessageRes.reply_to_message_id.in_(list(message_ids)), MessageRes.delivered_at == "",
                       MessageIns.created_at + MessageIns.ttl > current,
                       MessageRes.created_at > current - HOLD_MAX_S)).all()
            replies = {m: (to, float(c or 0.0)) for m, to, c in rows}
            missing = _unavailable(session, list(replies))
            held_replies = [m for m, ids in missing.items() if watch_.register(m, key, ids, since)]
            held = {replies[m][0] for m in held_replies}
            if held:
                watch_.held_back += 1
                watch_.schedule(key, _next_look(current - min(replies[m][1] for m in held_replies)))
            return get_res(self, set(message_ids) - held, run_id)

    @functools.wraps(store_tree)
    def store_message_and_object_tree(self: Any, message: Any, object_tree: Any, session_id: str) -> Any:
        if not _same_database(self):
            return store_tree(self, message, object_tree, session_id)
        metadata = message.metadata
        if metadata.reply_to_message_id:
            key: Key = ("run", int(metadata.run_id))
        elif int(metadata.dst_node_id) != _SUPERLINK_NODE_ID:
            key = ("node", int(metadata.dst_node_id))
        else:  # an instruction to the SuperLink's own node: flwr's way (not held back, see above)
            return store_tree(self, message, object_tree, session_id)
        with self.session() as session:  # re-entrant: joins the caller's transaction, if any
            ids = _tree_ids(object_tree)
            available = set(session.scalars(select(StoredObject.object_id).where(
                StoredObject.object_id.in_(ids), StoredObject.is_available == 1)))
            quiet = not available.issuperset(ids)
            token = flwr_internals.STORE_IS_QUIET.set(quiet)
            try:
                stored, to_push = store_tree(self, message, object_tree, session_id)
            finally:
                flwr_internals.STORE_IS_QUIET.reset(token)
            if stored:
                message_id = str(metadata.message_id)
                # the write lock is held from the store on: no commit of another can race this read
                missing = _unavailable(session, [message_id]).get(message_id, set())
                if watch_.register(message_id, key, missing):
                    session.info.setdefault(_STORED_KEY, []).append(message_id)
                elif quiet:  # stored quietly, yet complete by now: wake its receiver at the commit
                    session.info.setdefault(_WAKE_KEY, []).append(key)
                if quiet:  # its receiver stays idle: a look at the database is due, wake or not
                    session.info.setdefault(_DUE_KEY, []).append(key)
            return stored, to_push

    @functools.wraps(put)
    def put_object(self: Any, object_id: str, object_content: bytes) -> None:
        with self.session() as session:
            put(self, object_id, object_content)
            session.info.setdefault(_PUT_KEY, []).append(object_id)

    def after_commit(session: Any) -> None:
        put_ids = session.info.pop(_PUT_KEY, None)
        wake = session.info.pop(_WAKE_KEY, ())
        due = session.info.pop(_DUE_KEY, ())
        session.info.pop(_STORED_KEY, None)
        if _process.watch is None:
            return
        for key in dict.fromkeys(due):  # at the commit: a pull that reads before it sees nothing yet
            _process.watch.schedule(key, RECHECK_FIRST_S)
        for key in dict.fromkeys(wake):
            _process.watch.wake(key)
        if put_ids:
            _process.watch.objects_committed(put_ids)

    def after_rollback(session: Any) -> None:
        session.info.pop(_PUT_KEY, None)
        session.info.pop(_WAKE_KEY, None)
        session.info.pop(_DUE_KEY, None)
        stored = session.info.pop(_STORED_KEY, None)
        if stored and _process.watch is not None:
            _process.watch.discard(stored)

    if not _process.listening:  # process-global, once (a test may restore flwr's methods and patch again)
        event.listen(Session, "after_commit", after_commit)
        event.listen(Session, "after_soft_rollback", lambda session, _previous: after_rollback(session))
        _process.listening = True
    if not getattr(linkstate.get_message_ins, _PATCHED_MARK, False):
        for name, wrapped in (("get_message_ins", get_message_ins), ("get_message_res", get_message_res),
                              ("_claim_message_ins_rows", _claim_message_ins_rows),
                              ("store_message_and_object_tree", store_message_and_object_tree)):
            setattr(wrapped, _PATCHED_MARK, True)
            setattr(linkstate, name, wrapped)
        setattr(put_object, _PATCHED_MARK, True)
        setattr(SqlObjectStore, "put", put_object)  # noqa: B010 (a method of flwr's)
    _process.watch = watch_
    flwr_internals.set_recheck_due(watch_.due)
    return watch_


#: a request count's key for object pulls answered "found, not yet available" (not a path: the
#: benchmark's totals leave out keys that start with "#")
UNAVAILABLE_PREFIX = "#unavailable "


def count_unavailable_object_pulls(counts: dict[str, int]) -> None:
    """Count, into `counts` (the request counter's, `superlink_main.COUNTS_ENV`), the object pulls
    of each API that flwr answered "found, not yet available" (the receiver retries them with a
    back-off): keys `UNAVAILABLE_PREFIX + path`. A measurement aid (benchmarks); wraps flwr's
    handler functions, which its routes call through their modules."""
    from flwr.superlink.servicer.fleet import fleet_handlers
    from flwr.superlink.servicer.runtime import runtime_handlers

    flwr_internals.check_flwr_version()
    lock = threading.Lock()
    for module, path in ((fleet_handlers, "/v1/fleet/pull-object"),
                         (runtime_handlers, "/v1/runtime/pull-object")):
        original = module.pull_object
        _require(callable(original) and "object_available=" in inspect.getsource(original),
                 f"{module.__name__}.pull_object changed")
        key = UNAVAILABLE_PREFIX + path

        def pull_object(*args: Any, _original: Callable[..., Any] = original, _key: str = key,
                        **kwargs: Any) -> Any:
            response = _original(*args, **kwargs)
            if response.object_found and not response.object_available:
                with lock:
                    counts[_key] = counts.get(_key, 0) + 1
            return response

        functools.update_wrapper(pull_object, original)
        setattr(module, "pull_object", pull_object)  # noqa: B010 (a function of flwr's)
