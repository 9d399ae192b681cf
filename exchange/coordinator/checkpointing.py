"""The coordinator checkpoints its log by itself and gathers the hospitals' cosignatures.

Why: an export used to lag until someone asked for a checkpoint, and every checkpoint was
signed by the operator alone, so a split view (one history to an auditor, another to a
hospital) went unnoticed. Here a thread signs a checkpoint every N entries or T seconds
(`CheckpointSchedule`, audit/collector.py); each hospital's witness (exchange/node/witnessing.py)
pulls it with a consistency proof from the size it holds, checks it and cosigns it (C2SP
tlog-witness add-checkpoint semantics), and posts the cosignature back; the coordinator checks
it (`CheckpointCosigning`: a registered witness key, a valid cosignature/v1, not dated in the
future) and serves the note with every cosignature it got.

Which witnesses count: those registered in the log itself (`witness_vkey` in a hospital's
`key.register`, audit/keyring.py), replayed incrementally from the log's key entries, so the
trust policy the coordinator serves is exactly what an auditor can rebuild from the log. The
quorum is the trust policy's default: a majority of the registered witnesses.

What is served (`served_note`): the newest checkpoint that reached the quorum; until one has,
the newest signed one with the cosignatures it has (an auditor's `audit verify` then says
which are missing). With no witness registered the quorum is 0 and a fresh checkpoint of the
whole log is signed on request, as before witnesses existed.

Cosignatures are kept in memory for the last `KEEP` checkpoints: after a restart the latest
stored checkpoint is offered again and the witnesses cosign it again on their next pull.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from litestar.concurrency import sync_to_thread
from sqlalchemy import Engine, select

from audit.collector import CheckpointCosigning, CheckpointSchedule
from audit.cosignature import CosignatureError
from audit.keyring import KEY_KINDS, Keyring, KeyringError
from audit.note import NoteError, Vkey, parse_signature_lines
from audit.store import AuditLog, audit_entries, entry_from_leaf
from audit.trust import Trust
from audit.witness import AddCheckpointRequest
from exchange.logging import get_logger

log = get_logger("exchange.checkpointing")
KEEP = 16  # checkpoints whose cosignatures are still accepted
TICK_S = 0.1  # how often the thread looks at the log's size
MAX_WAIT_S = 25.0  # longest long poll of a witness


@dataclass(frozen=True)
class WitnessOffer:
    """What a witness is offered: the add-checkpoint request body, and whether it cosigned it."""

    body: bytes
    size: int
    cosigned: bool


@dataclass(frozen=True)
class WitnessState:
    """What the coordinator saw of one registered witness (for the operator's console page).

    `state`: "cosigned" (it cosigned the newest signed checkpoint), "behind" (its newest
    cosignature, if any, is on an older checkpoint), or "alarm": its last pull said it holds a
    checkpoint LARGER than the log (it has seen a history this log no longer extends: a rollback
    or a fork), or its last cosignature was refused. The witness's own alarms (a bad consistency
    proof) stay at the hospital (`exchange node status`); from here such a witness is "behind",
    since it stops cosigning."""

    name: str
    state: str
    cosigned_size: int | None
    newest_size: int
    held_size: int | None
    last_contact: float | None
    reason: str = ""


class CosignatureRefusedError(ValueError):
    """A posted cosignature is not accepted; `field` and `reason` say why (a 422)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


class _Witnesses:
    """The witness keys registered in the log, replayed incrementally from its key entries."""

    def __init__(self, engine: Engine, operator_key: bytes) -> None:
        self._engine = engine
        self._keyring = Keyring(operator_key)
        self._next = 0
        self._lock = threading.Lock()

    def current(self) -> dict[str, Vkey]:
        e = audit_entries.c
        with self._lock, self._engine.connect() as connection:
            rows = connection.execute(select(e.idx, e.leaf).where(
                e.idx >= self._next, e.kind.in_(sorted(KEY_KINDS))).order_by(e.idx)).all()
            for row in rows:
                try:
                    self._keyring.apply(entry_from_leaf(bytes(row.leaf)), int(row.idx))
                except KeyringError:  # the store refused such entries; never stop checkpointing
                    log.warning("keyring_replay_failed", index=int(row.idx))
                self._next = int(row.idx) + 1
            return self._keyring.witnesses()


class Checkpointing:
    """Signs checkpoints on a schedule, offers them to witnesses, collects cosignatures."""

    def __init__(self, audit_log: AuditLog, trust: Trust, engine: Engine, *,
                 every_entries: int = 0, every_seconds: float = 1.0,
                 clock: Callable[[], float] = time.time) -> None:
        self._log = audit_log
        self._trust = trust
        self._witnesses = _Witnesses(engine, trust.operator_public_key)
        self._schedule = CheckpointSchedule(every_entries=every_entries, every_seconds=every_seconds)
        self._clock = clock
        self._changed = threading.Condition()
        # long polls waiting on an event loop (`offer_waiting`): woken with the Condition's threads
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self._pending: OrderedDict[int, CheckpointCosigning] = OrderedDict()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # the newest checkpoint that reached the quorum, kept even once out of `_pending`
        self._complete: CheckpointCosigning | None = None
        # per witness name: (time, size it says it holds) of its last pull, the largest size it
        # cosigned, and why its last cosignature was refused (cleared by an accepted one)
        self._pulled: dict[str, tuple[float, int]] = {}
        self._cosigned: dict[str, int] = {}
        self._refused: dict[str, str] = {}

    # -- the policy ----------------------------------------------------------------------------
    def trust(self) -> Trust:
        """The trust policy now: the log's anchors and the witnesses registered in the log."""
        return self._trust.with_witnesses(self._witnesses.current().values())

    # -- signing -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="checkpointing", daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        with self._changed:
            self._notify()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _notify(self) -> None:
        """Wake every waiter: threads on the Condition and the event loops' long polls (the
        caller holds the Condition)."""
        self._changed.notify_all()
        for loop, future in self._async_waiters:
            with contextlib.suppress(RuntimeError):  # a loop that has closed meanwhile
                loop.call_soon_threadsafe(_resolve, future)
        self._async_waiters.clear()

    def _run(self) -> None:
        while not self._stop.wait(TICK_S):
            try:
                self.tick()
            except Exception as exc:  # a failed tick is retried at the next one
                log.warning("checkpoint_failed", error=f"{type(exc).__name__}: {exc}")

    def tick(self) -> bool:
        """Sign a checkpoint if one is due; whether one was signed."""
        size = self._log.size()
        now = self._clock()
        if not self._schedule.due(size, now):
            return False
        self._adopt(self._log.checkpoint())
        self._schedule.mark(size, now)
        return True

    def _adopt(self, note: str) -> CheckpointCosigning:
        cosigning = CheckpointCosigning(note, self.trust(), clock=self._clock)
        with self._changed:
            size = cosigning.checkpoint.size
            held = self._pending.get(size)
            if held is not None and held.checkpoint.root == cosigning.checkpoint.root:
                return held
            self._pending[size] = cosigning
            self._pending.move_to_end(size)
            if cosigning.quorum_met and (self._complete is None  # quorum 0: no witness
                                         or self._complete.checkpoint.size <= size):
                self._complete = cosigning
            while len(self._pending) > KEEP:
                self._pending.popitem(last=False)
            self._notify()
        return cosigning

    def _newest(self) -> CheckpointCosigning:
        with self._changed:
            if self._pending:
                return self._pending[max(self._pending)]
        stored = self._log.latest_checkpoint()
        return self._adopt(stored if stored is not None else self._log.checkpoint())

    # -- serving ------------------------------------------------------------------------------
    def served_note(self) -> str:
        """The checkpoint to serve: the newest with a quorum of cosignatures (see module doc)."""
        if not self.trust().witnesses:
            return self._adopt(self._log.checkpoint()).note()
        newest = self._newest()
        with self._changed:
            if self._complete is not None:
                return self._complete.note()
        return newest.note()

    def status(self) -> dict[str, object]:
        """For /health and operators: newest signed size, newest cosigned size, quorum."""
        newest = self._newest()
        with self._changed:
            complete = self._complete
        return {"signed_size": newest.checkpoint.size,
                "cosigned_size": None if complete is None else complete.checkpoint.size,
                "quorum": newest.required, "cosigned_by": sorted(newest.signed)}

    # -- witnesses ----------------------------------------------------------------------------
    def offer(self, old_size: int, witness: str | None, wait_s: float = 0.0) -> WitnessOffer:
        """The newest checkpoint as an add-checkpoint request from `old_size` (the size the
        witness holds), waiting up to `wait_s` for one newer than that size.

        A witness that holds more than the log has (a rolled-back or forked log) is offered
        the checkpoint with its own size as the old size, at once: it refuses it as older than
        the one it holds, which is what it is.
        """
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        newest = self._newest()
        with self._changed:
            if witness is not None:
                self._pulled[witness] = (self._clock(), old_size)
            # only a witness level with the log waits; one ahead of it (a rolled-back log) is
            # answered at once
            while newest.checkpoint.size == old_size and not self._stop.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
                newest = self._pending[max(self._pending)]
        size = newest.checkpoint.size
        note = newest.note().encode()
        if 0 < old_size < size:
            proof = tuple(self._log.consistency_proof(old_size, size))
            request = AddCheckpointRequest(old_size, proof, note)
        else:
            request = AddCheckpointRequest(size if old_size > size else old_size, (), note)
        return WitnessOffer(request.encode(), size, witness is not None and witness in newest.signed)

    async def offer_waiting(self, old_size: int, witness: str | None, wait_s: float = 0.0) -> WitnessOffer:
        """`offer` for the HTTP route: the long poll waits on the event loop, not on a worker
        thread.

        Why: the server runs its blocking handlers on a small thread pool (the event loop's
        default executor: a few threads on a small machine); a witness's long poll holding one
        for up to `MAX_WAIT_S` let a handful of witnessing hospitals stall every other request
        of the API. Here each look at the log is a short `offer(..., wait_s=0)` on a worker
        thread, and the wait between looks is a future that the next checkpoint (or a
        cosignature, or closing) resolves.
        """
        deadline = time.monotonic() + min(max(wait_s, 0.0), MAX_WAIT_S)
        loop = asyncio.get_running_loop()
        while True:
            changed: asyncio.Future[None] = loop.create_future()
            with self._changed:  # registered before looking, so no change in between is missed
                self._async_waiters.append((loop, changed))
            offer = await sync_to_thread(self.offer, old_size, witness, 0.0)
            left = deadline - time.monotonic()
            if offer.size != old_size or left <= 0 or self._stop.is_set():
                with self._changed:
                    if (loop, changed) in self._async_waiters:
                        self._async_waiters.remove((loop, changed))
                return offer
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed, left)

    def add_cosignature(self, size: int, lines: str, witness: str | None) -> CheckpointCosigning:
        """Add a witness's cosignature line(s) on the checkpoint of `size`.

        `witness`: the witness name registered for the posting hospital; a line of another
        witness is refused (a hospital speaks for its own witness only).
        """
        with self._changed:
            cosigning = self._pending.get(size)
        if witness is None:
            raise CosignatureRefusedError("cosignature", "this hospital registered no witness key")
        try:
            if cosigning is None:
                raise CosignatureRefusedError("size", f"no recent checkpoint of size {size} (the "
                                              f"coordinator keeps the last {KEEP})")
            try:
                signatures = parse_signature_lines(lines)
            except NoteError as exc:
                raise CosignatureRefusedError("cosignature", f"malformed ({exc})") from exc
            for signature in signatures:
                if signature.name != witness:
                    raise CosignatureRefusedError("cosignature", f"a line signed by "
                                                  f"{signature.name[:100]!r}, not by this hospital's "
                                                  f"witness {witness!r}")
        except CosignatureRefusedError as exc:
            if exc.field != "size":  # a checkpoint no longer kept is late, not alarming
                with self._changed:
                    self._refused[witness] = exc.reason
            raise
        with self._changed:
            had_quorum = cosigning.quorum_met
            try:
                if not cosigning.knows(witness):  # registered after this checkpoint was offered
                    cosigning.adopt(self.trust())
                cosigning.add_response(lines)
            except CosignatureError as exc:
                self._refused[witness] = str(exc)
                raise CosignatureRefusedError("cosignature", str(exc)) from exc
            self._refused.pop(witness, None)
            self._cosigned[witness] = max(size, self._cosigned.get(witness, 0))
            reached = cosigning.quorum_met and not had_quorum
            if cosigning.quorum_met and (self._complete is None
                                         or self._complete.checkpoint.size <= size):
                self._complete = cosigning
            # Only the threads waiting for a quorum (`wait_cosigned`) are woken: a witness's
            # long poll waits for a checkpoint of another size, which a cosignature never makes.
            # Waking them all too cost each waiting witness a look at the log on a worker thread
            # per cosignature of every other witness: n * (n - 1) looks per checkpoint, about
            # 600 at 25 hospitals (docs/benchmarks/scale.md, "The coordinator's CPU per round").
            self._changed.notify_all()
        if reached:
            log.info("checkpoint_cosigned", size=size, witnesses=sorted(cosigning.signed))
        return cosigning

    def wait_cosigned(self, size: int, timeout_s: float) -> bool:
        """Wait until a checkpoint of at least `size` entries has its quorum (tests, demo)."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                if self._complete is not None and self._complete.checkpoint.size >= size:
                    return True
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)

    def witness_states(self) -> dict[str, WitnessState]:
        """Witness name -> what the coordinator saw of it (`WitnessState`), for every witness
        registered in the log now."""
        newest = self._newest()
        size = newest.checkpoint.size
        log_size = self._log.size()
        names = sorted(v.name for v in self._witnesses.current().values())
        out: dict[str, WitnessState] = {}
        with self._changed:
            for name in names:
                pulled = self._pulled.get(name)
                held = pulled[1] if pulled else None
                cosigned = self._cosigned.get(name)
                if name in newest.signed:
                    cosigned = max(cosigned or 0, size)
                state, reason = "behind", ""
                if held is not None and held > log_size:
                    state, reason = "alarm", (f"its last pull holds a checkpoint of {held} entries; "
                                              f"the log has {log_size}")
                elif name in self._refused:
                    state, reason = "alarm", f"its last cosignature was refused: {self._refused[name]}"
                elif name in newest.signed:
                    state = "cosigned"
                out[name] = WitnessState(name, state, cosigned, size, held, pulled[0] if pulled else None,
                                         reason)
        return out

    def witness_of(self, hospital_id: str) -> str | None:
        """The witness name the hospital registered in the log, if any."""
        vkey = self._witnesses.current().get(f"hospital:{hospital_id}")
        return None if vkey is None else vkey.name


def _resolve(future: asyncio.Future[None]) -> None:
    """Resolve a long poll's future on its own loop (it may have timed out and been cancelled)."""
    if not future.done():
        future.set_result(None)
