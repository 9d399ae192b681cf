"""The study's ServerApp: weighted FedAvg over one flat array, federated evaluation, receipts.

One study = one Flower run. Every node id first gets a signed hello (`NodeDirectory`) naming its
hospital; only nodes of the study's approved hospitals get anything else. Each round is one
exchange: every connected approved hospital gets the global model, evaluates it on its hold-out
records, trains on it and replies with its update, metrics and signed receipt; after the last
round one evaluate-only exchange scores the final model (see `run_study_rounds`). A hospital whose
node restarts mid-round is sent its message again at its new (or re-activated) node id within the
round (`exchange_with_retry`). What a hospital replies falls in one of four cases (docs/flower.md):

- ``ok``: an update trained on ``records_used`` > 0 records with its signed receipt: a contribution;
- ``no-data``: the hospital has no consented records for this study right now: not a contribution;
- ``refused``: the hospital did not train (study not approved there, privacy budget would be
  overspent, ...), with the reason: not a contribution;
- no reply before ``round_timeout_s`` or a Flower error reply (node gone): dropped.

The study goes on while at least ``min_hospitals`` contribute in a round; below that it stops
cleanly: the failed round's receipts (its contributors spent privacy) are reported through
`on_round` with metric ``round_failed`` = 1, then `StudyObserver.on_failed(reason)` is called and
`StudyFailedError` raised, so the run ends as failed. After the last round the model is saved as
safetensors and its SHA-256 reported through `on_complete`. The coordinator provides the observer
and appends audit entries from it.

Polling: the grid is polled every `server_poll` seconds (less often in a long exchange:
`poll_interval`) with the public `push_messages` / `pull_messages` API instead of
`Grid.send_and_receive` (which sleeps 3 s between polls).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from federated import packing
from federated.receipts import Receipt, ReceiptError, hospital_account, parse_receipt, verify_receipt
from federated.runtime import flwr_internals, timeline
from federated.study_spec import StudySpec

log = logging.getLogger("federated.server")

#: Reply statuses (ConfigRecord "status", key "status").
STATUS_OK = "ok"
STATUS_NO_DATA = "no-data"
STATUS_REFUSED = "refused"
#: Message layout, kept to the fewest Flower objects (each is one HTTP request per hop):
#: server -> hospital: ArrayRecord GLOBAL_KEY {WEIGHTS_KEY: flat float32 array}, round = group_id;
#: hospital -> server: ConfigRecord REPLY_KEY {status, reason, hospital, receipt (bytes),
#: METRIC_PREFIX + name: float, EVAL_PREFIX + name: float, EVAL_STATS_KEY: list of floats (the
#: noised evaluation statistics, `federated.eval_stats`)} and, for an ``ok`` train reply,
#: ArrayRecord UPDATE_KEY.
GLOBAL_KEY = "global"
UPDATE_KEY = "update"
REPLY_KEY = "reply"
WEIGHTS_KEY = "weights"
METRIC_PREFIX = "m."
EVAL_PREFIX = "e."
EVAL_STATS_KEY = "eval_stats"
#: The hello (a QUERY message) that maps a Flower node id to its hospital: server -> node:
#: ConfigRecord HELLO_KEY {nonce}; node -> server: ConfigRecord HELLO_KEY {hospital, signature}, the
#: signature by the hospital's Ed25519 key over `hello_bytes(...)`.
HELLO_KEY = "hello"
HELLO_KIND = "flower.hello"
#: Flower error codes that mean "this node id is gone": the hospital may be back under a new node
#: id, so its message is re-sent there within the round.
NODE_GONE_CODES = flwr_internals.NODE_GONE_ERROR_CODES
#: Seconds between re-reads of the node list while a phase waits for replies.
NODE_REFRESH_S = 1.0


class StudyFailedError(RuntimeError):
    """The study cannot go on (too few contributing hospitals, cancelled, bad spec)."""


class StudyObserver(Protocol):
    """What the coordinator is told about a study as it runs (it appends audit entries)."""

    def on_round(self, round: int, metrics: Mapping[str, float], receipts: Sequence[Receipt]) -> None:
        """A round finished: aggregated metrics and the verified receipts of its contributors."""

    def on_complete(self, model_path: Path, sha256: str) -> None:
        """The study finished; the final model is at `model_path` (safetensors)."""

    def on_failed(self, reason: str) -> None:
        """The study stopped without a model; `reason` says why."""


class LoggingObserver:
    """Observer used when the ServerApp is started by Flower itself (`flwr run`, the plain mode):
    appends one JSON line per event to `events.jsonl` in the output directory."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / "events.jsonl"

    def _write(self, event: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as handle:
            handle.write(json.dumps(event) + "\n")

    def on_round(self, round: int, metrics: Mapping[str, float], receipts: Sequence[Receipt]) -> None:
        self._write({"event": "round", "round": round, "metrics": dict(metrics),
                     "receipts": [r.entry.to_json() for r in receipts]})

    def on_complete(self, model_path: Path, sha256: str) -> None:
        self._write({"event": "complete", "model_path": str(model_path), "sha256": sha256})

    def on_failed(self, reason: str) -> None:
        self._write({"event": "failed", "reason": reason})


@dataclass
class ServerOptions:
    """How the ServerApp runs (not part of the study's terms)."""

    output_dir: Path
    #: Seconds between polls for replies.
    poll: float = 0.05
    #: hospital id (or account ``hospital:<id>``) -> Ed25519 public key; when given, every receipt
    #: must verify against its hospital's key, else the update is not aggregated.
    hospital_keys: Mapping[str, bytes] | None = None
    #: Set to stop the study cleanly at the next phase boundary.
    stop_event: threading.Event = field(default_factory=threading.Event)
    #: The ServerApp task's id (set by `run_study`), stamped on every message we send.
    task_id: int | None = None
    #: The hospitals that approved the study (the coordinator's approved set). When given, only
    #: nodes whose signed hello names one of them get study messages, and a receipt from any
    #: other hospital is ignored. None: every node that says hello takes part.
    approved_hospitals: frozenset[str] | None = None
    #: `time.perf_counter()` when the run was submitted (`run_study`); round 1 then reports the
    #: time from there to the ServerApp's start (`start_s`: FAB, run submission, task claim).
    submitted_at: float | None = None
    #: Train and evaluate messages (plain and SecAgg+) and their replies travel as one ConfigRecord
    #: each (`federated.packing`: three objects a message instead of four to seven, each object a
    #: request at both ends).
    pack_messages: bool = True


@dataclass
class PhaseResult:
    """The replies of one phase, by node id, and how long the phase took."""

    replies: dict[int, Message]
    missing: list[int]
    wall_s: float
    #: seconds spent in push_messages; wall-clock time when the push returned
    push_s: float = 0.0
    pushed_at: float = 0.0
    #: node id -> wall-clock time its reply was pulled
    arrivals: dict[int, float] = field(default_factory=dict)
    #: hospitals whose message got no reply (`exchange_with_retry`)
    missing_hospitals: list[str] = field(default_factory=list)
    #: node id -> the hospital its hello named (`exchange_with_retry`)
    hospital_of: dict[int, str] = field(default_factory=dict)
    #: the exchange ended before its timeout because the replies in sufficed (`exchange_many`'s
    #: `enough`), and `missing` were still out then
    ended_early: bool = False


@dataclass
class HospitalReply:
    node_id: int
    hospital: str
    status: str
    reason: str
    metrics: dict[str, float]
    weights: np.ndarray | None = None
    receipt: Receipt | None = None
    #: hold-out metrics of the global model the message carried (empty if none)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    #: the noised statistics of that evaluation (`federated.eval_stats`; empty if none)
    eval_stats: list[float] = field(default_factory=list)


#: an exchange polls `poll`, or this fraction of its time so far when that is longer ...
POLL_ELAPSED_FRACTION = 0.03
#: ... but never less often than this (seconds)
POLL_MAX_S = 0.25


def poll_interval(poll: float, elapsed: float) -> float:
    """The sleep between two pulls of an exchange `elapsed` seconds old. Every pull is a request
    the SuperLink pays for (docs/benchmarks/flower.md, "Polling"): a long exchange (ten hospitals
    training on a busy machine) is polled less often, adding at most `POLL_ELAPSED_FRACTION` of
    its duration (and at most `POLL_MAX_S`) to the time its last reply waits to be pulled. A
    poll slower than `POLL_MAX_S` (plain mode's 3 s) is kept as it is."""
    if poll >= POLL_MAX_S:
        return poll
    return min(max(poll, elapsed * POLL_ELAPSED_FRACTION), POLL_MAX_S)


def sleep_before_next_pull(poll: float, started: float, pulled_at: float) -> None:
    """Sleep until the next pull of an exchange that began at `started` (`time.perf_counter()`),
    counted from the start of the last pull (`pulled_at`), not from its end: a pull that took
    longer than the interval (its replies' objects pulled one reply after another, a busy
    SuperLink) is followed by the next one at once, so a reply stored meanwhile is not kept
    waiting another interval (docs/benchmarks/flower.md, "The latency of one exchange")."""
    now = time.perf_counter()
    left = poll_interval(poll, now - started) - (now - pulled_at)
    if left > 0:
        time.sleep(left)


def exchange(grid: Grid, messages: Sequence[Message], *, timeout: float, poll: float,
             stop_event: threading.Event | None = None) -> PhaseResult:
    """Push `messages`, then poll for their replies until all came back or `timeout` passed."""
    return exchange_many(grid, [messages], timeout=timeout, poll=poll, stop_event=stop_event)[0]


#: `exchange_many(enough=...)`: told of each reply as it is pulled (its batch, node and message),
#: it returns None while the replies so far are not enough, else how many seconds more the
#: exchange waits for the rest (SecAgg+'s unmask stage: every secret has its threshold of shares)
Enough = Callable[[int, int, Message], "float | None"]


def exchange_many(grid: Grid, batches: Sequence[Sequence[Message]], *, timeout: float, poll: float,
                  stop_event: threading.Event | None = None,
                  enough: Enough | None = None) -> list[PhaseResult]:
    """`exchange` for several batches at once (at most one message per node in each): one push,
    one polling loop, each batch's replies apart (SecAgg+ pipelining: two stages per exchange).
    `enough`: the exchange may end before `timeout` once the replies so far suffice (`Enough`);
    each batch that then still misses replies says so (`PhaseResult.ended_early`)."""
    started = time.perf_counter()
    flat = [(b, msg) for b, batch in enumerate(batches) for msg in batch]
    timeline.stamp("srv.exchange>", "many", flat[0][1].metadata.group_id if flat else "-", len(flat))
    ids = list(grid.push_messages([msg for _, msg in flat]))
    push_s, pushed_at = time.perf_counter() - started, time.time()
    timeline.stamp("srv.pushed", *(timeline.short(i) for i in ids))
    # flwr returns None for a message it could not push: that node is missing from the start
    unsent: list[list[int]] = [[] for _ in batches]
    pending: dict[str, tuple[int, int]] = {}
    for msg_id, (b, msg) in zip(ids, flat, strict=True):
        if msg_id:
            pending[msg_id] = (b, msg.metadata.dst_node_id)
        else:
            unsent[b].append(msg.metadata.dst_node_id)
    replies: list[dict[int, Message]] = [{} for _ in batches]
    arrivals: list[dict[int, float]] = [{} for _ in batches]
    done_at = [0.0 for _ in batches]
    deadline = timeout_at = time.monotonic() + timeout
    sufficed = False
    # At least one pull, however long the push took (as `exchange_with_retry`): a grid that
    # trains inside push_messages, or a slow push, must not turn replies already there into dropouts.
    while pending:
        pulled_at = time.perf_counter()
        for reply in grid.pull_messages(list(pending)):
            where = pending.pop(reply.metadata.reply_to_message_id, None)
            timeline.stamp("srv.reply", timeline.short(reply.metadata.reply_to_message_id))
            if where is not None:
                replies[where[0]][where[1]] = reply
                arrivals[where[0]][where[1]] = time.time()
                done_at[where[0]] = time.perf_counter() - started
                more = enough(where[0], where[1], reply) if enough is not None and not sufficed else None
                if more is not None:
                    sufficed = True
                    deadline = min(deadline, time.monotonic() + more)
        if not pending or time.monotonic() >= deadline:
            break
        if stop_event is not None and stop_event.is_set():
            break
        sleep_before_next_pull(poll, started, pulled_at)
    wall = time.perf_counter() - started
    timeline.stamp("srv.exchange<")
    left: list[list[int]] = [[] for _ in batches]
    for b, node in pending.values():
        left[b].append(node)
    early = sufficed and bool(pending) and time.monotonic() < timeout_at
    return [PhaseResult(replies[b], sorted([*left[b], *unsent[b]]), wall if left[b] else done_at[b] or wall,
                        push_s, pushed_at, arrivals[b], ended_early=early and bool(left[b]))
            for b in range(len(batches))]


def phase_breakdown(prefix: str, phase: PhaseResult, replies: Sequence[HospitalReply]) -> dict[str, float]:
    """Where a phase's time went: the push, getting each message to its ClientApp (dispatch), the
    slowest hospital's compute, and getting replies back (return). Uses the wall-clock stamps the
    ClientApp puts in its metrics (same clock on loopback; indicative across machines)."""
    dispatch = [r.metrics["t_start"] - phase.pushed_at for r in replies if "t_start" in r.metrics]
    back = [phase.arrivals[r.node_id] - r.metrics["t_end"] for r in replies
            if "t_end" in r.metrics and r.node_id in phase.arrivals]
    compute = [r.metrics.get("compute_s", 0.0) for r in replies]
    return {f"{prefix}_wall_s": phase.wall_s, f"{prefix}_push_s": phase.push_s,
            f"{prefix}_dispatch_max_s": max(dispatch, default=0.0),
            f"{prefix}_compute_max_s": max(compute, default=0.0),
            f"{prefix}_return_max_s": max(back, default=0.0)}


def _prefixed(record: Mapping[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix):]: float(v) for k, v in record.items()
            if k.startswith(prefix) and isinstance(v, int | float) and not isinstance(v, bool)}


def _stats(value: Any) -> list[float]:
    """The reply's statistics list, or empty when absent or not a list of finite numbers."""
    if not isinstance(value, list) or not all(isinstance(v, int | float) and not isinstance(v, bool)
                                              for v in value):
        return []
    out = [float(v) for v in value]
    return out if all(math.isfinite(v) for v in out) else []


def _decode_reply(node_id: int, message: Message, spec: StudySpec, round_: int,
                  hospital_keys: Mapping[str, bytes] | None, *,
                  n_weights: int | None = None, expected_hospital: str | None = None,
                  approved: Callable[[str], bool] | None = None, masked: bool = False) -> HospitalReply:
    """Classify one reply; anything malformed becomes `dropped` with the reason, never a crash.

    `expected_hospital`: the hospital the node's hello named; a reply naming another is invalid.
    `approved`: a receipt from a hospital outside the study's approved set is ignored (invalid).
    `masked`: a SecAgg+ reply, whose update is a masked vector (`federated.secagg.server` reads
    it): no clear update is expected, and none is taken."""
    if message.has_error():
        error = message.error
        return HospitalReply(node_id, "", "dropped", f"flower error {error.code}: {error.reason}", {})
    content = message.content
    status_rec = content.config_records.get(REPLY_KEY)
    if status_rec is None:
        return HospitalReply(node_id, "", "dropped", "reply has no status record", {})
    hospital = str(status_rec.get("hospital", ""))
    status = str(status_rec.get("status", ""))
    reason = str(status_rec.get("reason", ""))
    reply = HospitalReply(node_id, hospital, status, reason, _prefixed(status_rec, METRIC_PREFIX),
                          eval_metrics=_prefixed(status_rec, EVAL_PREFIX),
                          eval_stats=_stats(status_rec.get(EVAL_STATS_KEY)))
    if status != STATUS_OK or message.metadata.message_type != MessageType.TRAIN:
        return reply
    try:
        if not masked:
            arrays = content.array_records[UPDATE_KEY]
            reply.weights = np.asarray(arrays[WEIGHTS_KEY].numpy(), dtype=np.float32)
        raw = status_rec["receipt"]
        if not isinstance(raw, bytes):
            raise ReceiptError("envelope: not bytes")
        if hospital_keys is not None:
            key = hospital_keys.get(hospital) or hospital_keys.get(hospital_account(hospital))
            if key is None:
                raise ReceiptError(f"hospital: {hospital!r} has no registered key")
            receipt = verify_receipt(raw, key, study_id=spec.study_id, round=round_, hospital_id=hospital)
        else:
            receipt = parse_receipt(raw, study_id=spec.study_id, round=round_, hospital_id=hospital)
        if expected_hospital is not None and _bare_id(expected_hospital) != _bare_id(hospital):
            raise ReceiptError(f"hospital: node {node_id} said hello as {expected_hospital!r}, "
                               f"its receipt names {hospital!r}")
        if approved is not None and not approved(hospital):
            raise ReceiptError(f"hospital: {hospital!r} is not one of the study's approved hospitals")
        if receipt.records_used < 1:
            raise ReceiptError("records_used: an 'ok' update must be trained on at least one record")
        if reply.weights is not None:
            if n_weights is not None and reply.weights.shape != (n_weights,):
                raise ValueError(f"update has shape {reply.weights.shape}, the model has {n_weights} weights")
            if not np.all(np.isfinite(reply.weights)):
                raise ValueError("update holds NaN or infinite values")
        reply.receipt = receipt
    except (KeyError, ValueError) as exc:
        reply.status, reply.reason, reply.weights = "invalid", f"{type(exc).__name__}: {exc}", None
    return reply


def aggregate_eval(replies: Sequence[HospitalReply], task: str = "binary", *, columns: Sequence[str] = (),
                   classes: int | None = None) -> dict[str, float]:
    """The hospitals' noised hold-out sums added up and divided (`federated.evaluation.aggregate`):
    `eval_accuracy` / `eval_mae` over all hold-out patients, `eval_examples` (a noised count),
    `eval_epsilon`; and from their noised statistics (`aggregate_statistics`) the study metrics
    per hospital (`eval_concordance@hospital-a`, ...) and pooled (`eval_concordance`, `eval_ibs`,
    `eval_macro_f1`). No exact statistic of a hospital's records reaches the server."""
    from federated.evaluation import aggregate, aggregate_statistics

    out = aggregate([r.eval_metrics for r in replies if r.eval_metrics], task)
    with_stats = {_bare_id(r.hospital): (r.eval_metrics["count"], r.eval_stats) for r in replies
                  if r.eval_stats and "count" in r.eval_metrics}
    if with_stats:
        out.update(aggregate_statistics(with_stats, task, columns=columns, classes=classes))
    return out


def _reply_weights_sum(contributors: Sequence[HospitalReply]) -> np.ndarray:
    from federated.weights import fedavg

    return fedavg([c.weights for c in contributors if c.weights is not None],
                  [c.receipt.records_used for c in contributors if c.receipt is not None])


def _describe_non_contributors(replies: Sequence[HospitalReply], missing: Sequence[str]) -> str:
    parts = [f"{r.hospital or f'node {r.node_id}'}: {r.status} ({r.reason})"
             for r in replies if r.status != STATUS_OK]
    parts += [f"{h}: no reply (timed out or disconnected)" for h in missing]
    return "; ".join(parts) or "none"


def hello_bytes(study_id: str, hospital: str, node_id: int, nonce: str) -> bytes:
    """What a hospital signs in its hello: binds its id to this study, this node id and the
    server's nonce, so a hello cannot be replayed for another node or study."""
    from audit.signing import canonical

    return canonical({"kind": HELLO_KIND, "study_id": study_id, "hospital": hospital,
                      "node_id": str(node_id), "nonce": nonce})


def _bare_id(hospital: str) -> str:
    return hospital.removeprefix("hospital:")


class NodeDirectory:
    """Flower node id -> hospital id, learned from one signed hello per new node id.

    Why: the SuperLink knows nodes only by number, and a restarted SuperNode comes back under a NEW
    number while the old one stays listed for ~40 s. The ServerApp sends a hello (QUERY message) to
    each node id it has not met; the reply names the hospital, signed with its key (checked against
    `hospital_keys` when given). Each hospital maps to the node id that said hello last. Hellos are
    never re-sent: an unanswered one stays pending and is pulled again later (a slow node still
    joins), so a dead node id costs no waiting."""

    def __init__(self, grid: Grid, spec: StudySpec, context: Context, options: ServerOptions) -> None:
        self.grid, self.spec, self.context, self.options = grid, spec, context, options
        self.hospital_of: dict[int, str] = {}
        self.node_of: dict[str, int] = {}
        self.asked: set[int] = set()
        self._pending: dict[str, tuple[int, str]] = {}  # hello message id -> (node, nonce)
        self.rejected: dict[int, str] = {}  # node -> why its hello was not accepted

    def approved(self, hospital: str) -> bool:
        allowed = self.options.approved_hospitals
        return allowed is None or _bare_id(hospital) in {_bare_id(h) for h in allowed}

    def refresh(self) -> list[int]:
        """Re-read the node list, say hello to new node ids, collect hello replies; returns the
        node ids listed now."""
        listed = sorted(self.grid.get_node_ids())
        new = [n for n in listed if n not in self.asked]
        if new:
            nonces = {n: os.urandom(16).hex() for n in new}
            messages = []
            for node in new:
                content = RecordDict({HELLO_KEY: ConfigRecord({"nonce": nonces[node]})})
                messages.append(Message(content, dst_node_id=node, message_type=MessageType.QUERY,
                                        group_id="0", ttl=max(self.spec.join_timeout_s * 2, 60.0)))
            _stamp(messages, self.context, self.options)
            for node, msg_id in zip(new, self.grid.push_messages(messages), strict=True):
                self.asked.add(node)
                if msg_id:
                    self._pending[msg_id] = (node, nonces[node])
        if self._pending:
            for reply in self.grid.pull_messages(list(self._pending)):
                entry = self._pending.pop(reply.metadata.reply_to_message_id, None)
                if entry is not None:
                    self._accept(entry[0], entry[1], reply)
        return listed

    def hellos_pending(self, nodes: Iterable[int]) -> bool:
        waiting = {node for node, _ in self._pending.values()}
        return any(n in waiting for n in nodes)

    def _accept(self, node: int, nonce: str, reply: Message) -> None:
        if reply.has_error():
            self.rejected[node] = f"hello: flower error {reply.error.code}"
            return
        record = reply.content.config_records.get(HELLO_KEY)
        hospital = str(record.get("hospital", "")) if record is not None else ""
        signature = record.get("signature") if record is not None else None
        if not hospital or not isinstance(signature, bytes):
            self.rejected[node] = "hello: no hospital or signature"
            return
        keys = self.options.hospital_keys
        if keys is not None:
            from nacl.exceptions import BadSignatureError
            from nacl.signing import VerifyKey

            key = (keys.get(hospital) or keys.get(f"hospital:{_bare_id(hospital)}")
                   or keys.get(_bare_id(hospital)))
            if key is None and not self.approved(hospital):
                # Keys come with the study's approved hospitals: a hospital that approved after
                # the run started (or never did) is not part of this run, which is no fault.
                self.rejected[node] = (f"hello from {hospital!r}: not one of the hospitals the run "
                                       f"was started for (not approved when it started)")
                log.info("study %s: node %d %s", self.spec.study_id, node, self.rejected[node])
                return
            try:
                if key is None:
                    raise BadSignatureError("no registered key")
                VerifyKey(key).verify(hello_bytes(self.spec.study_id, hospital, node, nonce), signature)
            except (BadSignatureError, ValueError) as exc:
                self.rejected[node] = f"hello from {hospital!r}: signature does not verify ({exc})"
                log.warning("study %s: node %d %s", self.spec.study_id, node, self.rejected[node])
                return
        old = self.node_of.get(hospital)
        if old is not None and old != node:
            self.hospital_of.pop(old, None)  # the hospital came back under a new node id
        self.hospital_of[node] = hospital
        self.node_of[hospital] = node

    def targets(self, listed: Iterable[int]) -> dict[int, str]:
        """Listed nodes of approved hospitals (one node per hospital, its latest)."""
        listed = set(listed)
        return {node: h for node, h in self.hospital_of.items() if node in listed and self.approved(h)}

    def forget(self, node: int) -> None:
        """The node id is gone (Flower said so). With SuperNode authentication a restarted node
        comes back under the SAME id once the old session is offline, without it under a new
        one: either way the id gets a fresh hello when it is listed again."""
        hospital = self.hospital_of.pop(node, None)
        if hospital is not None and self.node_of.get(hospital) == node:
            del self.node_of[hospital]
        self.asked.discard(node)


def _stamp(messages: Sequence[Message], context: Context, options: ServerOptions) -> None:
    # `Message()` stamps the run and task from the process-global TaskIdentity; with several studies
    # running in one coordinator process that may be another study's: stamp this one's.
    for message in messages:
        flwr_internals.stamp_metadata(message.metadata, run_id=context.run_id)
        if options.task_id is not None:
            message.metadata.src_task_id = options.task_id


def _wait_for_nodes(directory: NodeDirectory, spec: StudySpec, options: ServerOptions,
                    round_: int) -> dict[int, str]:
    """The nodes of approved hospitals (node -> hospital), once at least `min_hospitals` said hello
    (a hospital restarting mid-study gets `join_timeout_s` to come back). Returns as soon as every
    approved hospital is there or no listed node still owes a hello; else after a grace: short in
    later rounds, `join_timeout_s` in round 1. A listed node owes its hello only while it is
    alive (a dead one is delisted after two heartbeat intervals), and on a busy machine ten
    first hellos (each the run's first message at its node) can take longer than the short
    grace: round 1 would start without those hospitals and, under SecAgg+, round 2 would need
    its own key exchange for them (docs/secure-aggregation.md, "Pipelining")."""
    started = time.monotonic()
    deadline = started + spec.join_timeout_s
    grace = spec.join_timeout_s if round_ == 1 else min(spec.round_timeout_s, 10.0)
    allowed = options.approved_hospitals
    while True:
        listed = directory.refresh()
        targets = directory.targets(listed)
        everyone = (allowed is not None
                    and {_bare_id(h) for h in targets.values()} >= {_bare_id(h) for h in allowed})
        if len(targets) >= hospitals_needed(spec) and (
                everyone or not directory.hellos_pending(listed) or time.monotonic() - started >= grace):
            return targets
        if time.monotonic() >= deadline or options.stop_event.is_set():
            raise StudyFailedError(f"round {round_}: only {len(targets)} hospital node(s) connected "
                                   f"after {spec.join_timeout_s:.0f} s; the study needs "
                                   f"{hospitals_needed(spec)}")
        time.sleep(max(options.poll, 0.05))


def exchange_with_retry(directory: NodeDirectory, targets: Mapping[int, str], kind: str,
                        weights: np.ndarray, *, round_: int, timeout: float) -> PhaseResult:
    """One message per target hospital; replies until all came back or `timeout` passed.

    A hospital whose node id is gone (Flower error NODE_UNAVAILABLE / MESSAGE_UNAVAILABLE, a
    message flwr could not push) or that shows up under a new node id while we wait (a restarted
    SuperNode) gets its message again at its new node, within the same deadline, instead of
    being counted dropped at once. Its first real reply counts (the ClientApp refuses to train a
    round twice, so a late reply from the old node spends nothing more)."""
    grid, options = directory.grid, directory.options
    started = time.perf_counter()
    deadline = time.monotonic() + timeout
    pending: dict[str, int] = {}  # message id -> node
    hospital_by_node: dict[int, str] = dict(targets)
    sent_to: dict[str, set[int]] = {h: set() for h in targets.values()}
    replies: dict[int, Message] = {}
    arrivals: dict[int, float] = {}
    answered: dict[str, int] = {}  # hospital -> node whose reply counts
    gone_reply: dict[str, tuple[int, Message]] = {}  # hospital -> last "node gone" error reply
    push_s = pushed_at = 0.0

    def send(nodes: dict[int, str]) -> None:
        nonlocal push_s, pushed_at
        if not nodes:
            return
        t0 = time.perf_counter()
        messages = _messages(list(nodes), kind, weights, round_=round_, spec=directory.spec,
                             context=directory.context, options=options)
        timeline.stamp("srv.resend" if push_s else "srv.exchange>", kind, round_, len(messages))
        ids = list(grid.push_messages(messages))
        timeline.stamp("srv.pushed", *(timeline.short(i) for i in ids))
        if not push_s:
            push_s, pushed_at = time.perf_counter() - t0, time.time()
        for node, msg_id in zip(nodes, ids, strict=True):
            hospital_by_node[node] = nodes[node]
            if msg_id:
                sent_to[nodes[node]].add(node)
                pending[msg_id] = node
            else:  # flwr could not push: the node is not (or no longer) registered
                directory.forget(node)

    send(dict(targets))
    next_refresh = time.monotonic() + NODE_REFRESH_S
    # At least one pull, however long the push took: a grid that trains inside push_messages
    # (the in-process one) or a slow push must not turn replies already there into dropouts.
    while True:
        retry = False
        pulled_at = time.perf_counter()
        for reply in grid.pull_messages(list(pending)) if pending else []:
            node = pending.pop(reply.metadata.reply_to_message_id, None)
            timeline.stamp("srv.reply", timeline.short(reply.metadata.reply_to_message_id))
            if node is None:
                continue
            hospital = hospital_by_node[node]
            if hospital in answered:
                continue
            _unpack_reply(node, reply)  # a packed message's reply is packed (`federated.packing`)
            if reply.has_error() and reply.error.code in NODE_GONE_CODES:
                directory.forget(node)
                sent_to[hospital].discard(node)  # may be sent again if the id comes back
                gone_reply[hospital] = (node, reply)
                retry = True
                continue
            answered[hospital] = node
            replies[node] = reply
            arrivals[node] = time.time()
            pending = {m: n for m, n in pending.items() if n not in sent_to[hospital]}
        waiting = [h for h in sent_to if h not in answered]
        if not waiting or (options.stop_event.is_set()):
            break
        if retry or time.monotonic() >= next_refresh:
            listed = directory.refresh()
            next_refresh = time.monotonic() + NODE_REFRESH_S
            fresh = {n: h for n, h in directory.targets(listed).items()
                     if h in waiting and n not in sent_to[h]}
            send(fresh)
        if time.monotonic() >= deadline:
            break
        sleep_before_next_pull(options.poll, started, pulled_at)
    timeline.stamp("srv.exchange<")
    missing: list[int] = []
    missing_hospitals: list[str] = []
    for hospital, nodes in sent_to.items():
        if hospital in answered:
            continue
        if hospital in gone_reply:  # no other node answered for it: the error reply stands
            node, reply = gone_reply[hospital]
            replies[node] = reply
        else:
            missing.append(max(nodes, default=directory.node_of.get(hospital, 0)))
            missing_hospitals.append(hospital)
    return PhaseResult(replies, sorted(missing), time.perf_counter() - started, push_s, pushed_at, arrivals,
                       missing_hospitals=sorted(missing_hospitals), hospital_of=hospital_by_node)


def _messages(nodes: Sequence[int], kind: str, weights: np.ndarray, *, round_: int,
              spec: StudySpec, context: Context, options: ServerOptions) -> list[Message]:
    # The round travels as the message's group_id: one object less per message (each object is
    # an HTTP request; see docs/flower.md). The content is shared: its objects are pushed once.
    content = RecordDict({GLOBAL_KEY: ArrayRecord({WEIGHTS_KEY: Array(np.ascontiguousarray(weights))})})
    # packed (the hospital's mod unpacks it, and packs its reply): 3 objects, not 5 or more; a model
    # too large to inline would stay an ArrayRecord of its own, and the packed record add one
    if options.pack_messages and weights.nbytes <= packing.DEFAULT_INLINE_LIMIT:
        content = packing.pack(content)
    ttl = max(spec.round_timeout_s * 2, 60.0)
    messages = [Message(content, dst_node_id=node, message_type=kind, group_id=str(round_), ttl=ttl)
                for node in nodes]
    _stamp(messages, context, options)
    return messages


def run_study_rounds(grid: Grid, context: Context, observer: StudyObserver,
                     options: ServerOptions) -> tuple[Path, str]:
    """The ServerApp's main: every round, then the final model. Returns (model path, sha256).

    Federated evaluation is folded into the train exchange: a hospital first evaluates the global
    model a train message carries on its hold-out records, then trains on it, and replies with
    both. So round r's evaluation (of the model it produced) arrives with round r+1's replies,
    and `on_round(r)` is called then; after the last round one evaluate-only exchange remains.
    One exchange per round instead of two halves Flower's per-round overhead.
    """
    from federated.data import public_reference
    from federated.dp import public_initial_state
    from federated.evaluation import reference_metrics, survival_reference_metrics
    from federated.templates import get_template
    from federated.weights import save_safetensors, unpack

    t_app = time.perf_counter()
    try:
        spec = StudySpec.from_run_config(context.run_config)
        template = get_template(spec.template)
        if template.task != spec.task:
            raise ValueError(f"task: template {spec.template} is for {template.task}, "
                             f"the study says {spec.task}")
    except ValueError as exc:
        observer.on_failed(f"bad study spec: {exc}")
        raise StudyFailedError(f"bad study spec: {exc}") from exc
    directory = NodeDirectory(grid, spec, context, options)
    # Hello to the nodes listed now, before the set-up below: their replies come back while it
    # runs (the public pre-training can take seconds when the coordinator did not prepare it),
    # and round 1 collects them (`_wait_for_nodes`). A hello carries no model.
    directory.refresh()
    model = template.build(len(spec.columns), seed=spec.seed, n_classes=spec.classes)
    # the initial model is pre-trained on the public reference sample's first half when there is
    # one (no privacy cost); each round's model is scored exactly on the other half
    weights = public_initial_state(template, spec.columns, spec.task, seed=spec.seed,
                                   n_classes=spec.classes)
    reference = (public_reference(spec.columns, spec.task, "eval")
                 if spec.task in ("binary", "regression") else None)

    def scored(metrics: dict[str, float]) -> dict[str, float]:
        """Add the round model's exact metrics on the PUBLIC reference sample (no privacy cost):
        survival studies get Harrell's concordance and the integrated Brier score."""
        if spec.task == "survival":
            metrics.update(survival_reference_metrics(template, unpack(model, weights), spec.columns))
        elif reference is not None:
            metrics.update(reference_metrics(template, unpack(model, weights), reference))
        return metrics

    pending: _PendingRound | None = None
    prepared: Any = None  # SecAgg+: the next round's key exchange, run during this round
    failed_round: _PendingRound | None = None
    seen: set[str] = set()  # hospitals that took part in an earlier round
    silent: set[str] = set()  # hospitals that did not answer the last train exchange

    def decode(phase: PhaseResult, round_: int, n_weights: int | None,
               masked: bool = False) -> list[HospitalReply]:
        return [_decode_reply(n, m, spec, round_, options.hospital_keys, n_weights=n_weights,
                              expected_hospital=phase.hospital_of.get(n), approved=directory.approved,
                              masked=masked)
                for n, m in phase.replies.items()]

    try:
        for round_ in range(1, spec.rounds + 1):
            if options.stop_event.is_set():
                raise StudyFailedError(f"cancelled before round {round_}")
            t_join = time.perf_counter()
            targets = _wait_for_nodes(directory, spec, options, round_)
            # where time goes before the exchange (docs/benchmarks/scale.md, "First round"):
            # round 1 also reports the ServerApp's own set-up (spec, template, public pre-training)
            waits = {"join_wait_s": time.perf_counter() - t_join}
            if round_ == 1:
                waits["setup_s"] = t_join - t_app
                if options.submitted_at is not None:
                    waits["start_s"] = t_app - options.submitted_at
            gone = sorted(seen - set(targets.values()))  # took part before, no longer connected
            seen.update(targets.values())
            t_round = time.perf_counter()
            secure = None
            if spec.secure_aggregation:
                # SecAgg+ (federated.secagg): the same train step, inside the protocol's four stages
                n_weights = weights.shape[0]
                masked = functools.partial(decode, round_=round_, n_weights=n_weights, masked=True)
                secure = _secure_round(directory, targets, weights, round_, spec=spec, decode=masked,
                                       prepared=prepared)
                prepared = secure.next
                train, decoded, contributors = secure.phase, secure.decoded, list(secure.members)
                silent = set(train.missing_hospitals) | set(secure.lost)
            else:
                train = exchange_with_retry(directory, targets, MessageType.TRAIN, weights, round_=round_,
                                            timeout=spec.round_timeout_s)
                decoded = decode(train, round_, weights.shape[0])
                silent = set(train.missing_hospitals)
                contributors = [r for r in decoded if r.status == STATUS_OK and r.receipt is not None]
            if pending is not None:  # these replies carry the evaluation of the previous round's model
                pending.report(observer, decoded)
                pending = None
            short = len(contributors) < spec.min_hospitals
            # a SecAgg+ failure (below its threshold, a share that does not unmask) names its reason
            failure = secure.failure if secure is not None else None
            if options.stop_event.is_set() or short or failure:
                # Contributors trained and spent privacy: their receipts are reported even though
                # the round produced no model (on_round with round_failed = 1, then on_failed).
                metrics = _round_metrics(decoded, contributors, train=train, aggregate_s=0.0,
                                         round_s=time.perf_counter() - t_round, gone=len(gone), secure=secure)
                metrics["round_failed"] = 1.0
                failed_round = _PendingRound(round_, metrics, [c.receipt for c in contributors if c.receipt],
                                             spec)
            if options.stop_event.is_set():
                raise StudyFailedError(f"cancelled during round {round_}")
            if failure:
                raise StudyFailedError(failure)
            if short:
                raise StudyFailedError(
                    f"round {round_}: {len(contributors)} hospital(s) contributed, the study needs "
                    f"{spec.min_hospitals}; "
                    f"{_describe_non_contributors(decoded, [*silent, *gone])}")
            t_agg = time.perf_counter()
            if secure is not None and secure.weights is not None:
                weights = secure.weights
            else:
                weights = _reply_weights_sum(contributors)
            aggregate_s = time.perf_counter() - t_agg
            metrics = scored(_round_metrics(decoded, contributors, train=train, aggregate_s=aggregate_s,
                                            round_s=time.perf_counter() - t_round, gone=len(gone),
                                            secure=secure))
            metrics.update(waits)
            if spec.noise == "distributed":
                # both guarantees after this round (docs/secure-aggregation.md, "Noise")
                from federated.distributed_noise import for_study

                noise = for_study(spec, weights.shape[0])
                metrics.update({"noise_distributed": 1.0, **noise.guarantees(round_)})
            log.info("study %s round %d: %s", spec.study_id, round_, metrics)
            pending = _PendingRound(round_, metrics, [c.receipt for c in contributors if c.receipt], spec)
        # A hospital that just let a train exchange time out is not waited for a second time.
        final = {n: h for n, h in directory.targets(directory.refresh()).items() if h not in silent}
        evaluation = exchange_with_retry(directory, final, MessageType.EVALUATE, weights, round_=spec.rounds,
                                         timeout=spec.round_timeout_s)
        eval_replies = decode(evaluation, spec.rounds, None)
        if pending is not None:
            pending.metrics.update(phase_breakdown("final_eval", evaluation, eval_replies))
            pending.report(observer, eval_replies)
            pending = None
    except StudyFailedError as exc:
        if pending is not None:  # the last completed round is reported (without its evaluation)
            pending.report(observer, [])
        if failed_round is not None:
            observer.on_round(failed_round.round, failed_round.metrics, failed_round.receipts)
        observer.on_failed(str(exc))
        raise
    options.output_dir.mkdir(parents=True, exist_ok=True)
    model_path = options.output_dir / f"{_safe_name(spec.study_id)}.safetensors"
    sha256 = save_safetensors(unpack(model, weights), model_path, metadata={
        "study_id": spec.study_id, "template": spec.template, "columns": json.dumps(list(spec.columns)),
        "spec_sha256": spec.sha256(), "rounds": str(spec.rounds)})
    observer.on_complete(model_path, sha256)
    return model_path, sha256


@dataclass
class _PendingRound:
    """A finished round waiting for the evaluation of the model it produced."""

    round: int
    metrics: dict[str, float]
    receipts: list[Receipt]
    spec: StudySpec

    def report(self, observer: StudyObserver, eval_replies: Sequence[HospitalReply]) -> None:
        self.metrics.update(aggregate_eval(eval_replies, self.spec.task, columns=self.spec.columns,
                                           classes=self.spec.classes))
        observer.on_round(self.round, self.metrics, self.receipts)


@dataclass
class SecAggTransport:
    """What the SecAgg+ driver (`federated.secagg.server`) needs from the ServerApp: TRAIN
    messages over this study's grid with its polling (`exchange`), and our message layout."""

    directory: NodeDirectory
    ok: str = STATUS_OK

    def send_many(self, batches: Sequence[tuple[Mapping[int, RecordDict], int]],
                  timeout: float, enough: Callable[[int, Message], float | None] | None = None,
                  ) -> list[PhaseResult]:
        ttl = max(timeout * 2, 60.0)
        options = self.directory.options
        pack = packing.pack if options.pack_messages else (lambda content: content)
        out = []
        for contents, round_ in batches:
            messages = [Message(pack(content), dst_node_id=node, message_type=MessageType.TRAIN,
                                group_id=str(round_), ttl=ttl) for node, content in contents.items()]
            _stamp(messages, self.directory.context, options)
            out.append(messages)
        told = None
        unpacked: set[tuple[int, int]] = set()  # (batch, node): unpacked (or tried) on arrival
        if enough is not None:
            def told(batch: int, node: int, reply: Message) -> float | None:
                # the driver reads each reply as the hospital built it: unpacked here, once
                _unpack_reply(node, reply)
                unpacked.add((batch, node))
                return enough(node, reply)
        phases = exchange_many(self.directory.grid, out, timeout=timeout, poll=options.poll,
                               stop_event=options.stop_event, enough=told)
        for b, phase in enumerate(phases):
            for node, reply in phase.replies.items():
                if (b, node) not in unpacked:
                    _unpack_reply(node, reply)
        return phases

    def model(self, weights: np.ndarray) -> RecordDict:
        return RecordDict({GLOBAL_KEY: ArrayRecord({WEIGHTS_KEY: Array(np.ascontiguousarray(weights))})})


def _unpack_reply(node: int, reply: Message) -> None:
    """Give the reader a reply's records as the hospital built them (`federated.packing`). A
    reply that does not unpack stays as it came: it has no stage record (or reply record), so
    its hospital is left out, and the warning here says why. One unpacked already is left."""
    if reply.has_error() or not reply.has_content() or not packing.is_packed(reply.content):
        return
    try:
        reply.content = packing.unpack(reply.content)
    except packing.PackingError as exc:
        log.warning("node %d: its reply does not unpack: %s", node, exc)


def _secure_round(directory: NodeDirectory, targets: Mapping[int, str], weights: np.ndarray, round_: int, *,
                  spec: StudySpec, decode: Callable[[PhaseResult], list[HospitalReply]],
                  prepared: Any = None) -> Any:
    """One round under SecAgg+ (`federated.secagg.server`): the study fails cleanly, with the
    reason, if the protocol cannot run (too few hospitals for its threshold)."""
    from federated.secagg.params import SecAggParamsError
    from federated.secagg.server import SecAggDriver

    integer_step = None
    if spec.noise == "distributed":
        from federated.distributed_noise import server_step

        integer_step = server_step(spec, weights)
    driver = SecAggDriver(SecAggTransport(directory), timeout=spec.round_timeout_s,
                          min_members=spec.min_hospitals, integer_step=integer_step)
    try:
        return driver.run(targets, weights, round_, decode, prepared=prepared, pipeline=round_ < spec.rounds)
    except SecAggParamsError as exc:
        raise StudyFailedError(f"round {round_}: {exc}") from exc


def hospitals_needed(spec: StudySpec) -> int:
    """Connected hospitals a round waits for: the study's minimum, and SecAgg+'s if it is on."""
    if spec.secure_aggregation:
        from federated.secagg.params import MIN_HOSPITALS

        return max(spec.min_hospitals, MIN_HOSPITALS)
    return spec.min_hospitals


def _round_metrics(decoded: Sequence[HospitalReply], contributors: Sequence[HospitalReply], *,
                   train: PhaseResult, aggregate_s: float, round_s: float, gone: int,
                   secure: Any = None) -> dict[str, float]:
    by_status = {s: sum(1 for r in decoded if r.status == s) for s in (STATUS_NO_DATA, STATUS_REFUSED)}
    metrics: dict[str, float] = {
        "contributors": float(len(contributors)),
        "records_used": float(sum(c.receipt.records_used for c in contributors if c.receipt)),
        "no_data": float(by_status[STATUS_NO_DATA]),
        "refused": float(by_status[STATUS_REFUSED]),
        # no reply in time, a Flower error reply, a malformed reply, or disconnected since an earlier round
        "dropped": float(len(train.missing) + gone
                         + sum(1 for r in decoded if r.status in ("dropped", "invalid"))),
        "epsilon_max": max((c.receipt.epsilon_total for c in contributors if c.receipt), default=0.0),
        # Per-round time breakdown (docs/benchmarks/flower.md): the exchange's wall time vs the
        # slowest hospital's own compute (evaluate + train); the difference is Flower's overhead.
        "aggregate_s": aggregate_s,
        "round_wall_s": round_s,
        **phase_breakdown("train", train, decoded),
    }
    metrics["overhead_s"] = round_s - metrics["train_compute_max_s"]
    if secure is not None:
        from federated.secagg.server import clipped_total

        metrics.update(secure.metrics)
        metrics.update({"secure_aggregation": 1.0, "aggregate_members": float(len(contributors)),
                        "secagg_sampled": float(secure.params.sample_num),
                        "secagg_threshold": float(secure.params.threshold),
                        "secagg_clipped": clipped_total(contributors)})
        metrics["dropped"] += float(len(secure.lost))
    return metrics


def _safe_name(study_id: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in study_id) or "study"


def make_server_app(observer_factory: Callable[[Context], StudyObserver],
                    options_factory: Callable[[Context], ServerOptions]) -> ServerApp:
    """A ServerApp bound to a coordinator's observer (used by `federated.runtime.run_study`)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_study_rounds(grid, context, observer_factory(context), options_factory(context))

    return app


def _default_output_dir(context: Context) -> Path:
    base = Path(os.environ.get("EXCHANGE_STUDY_OUTPUT_DIR", "study-output"))
    return base / _safe_name(str(context.run_config.get("study-id", "study")))


#: The ServerApp Flower loads from the FAB when it runs the study itself (plain mode, `flwr run`):
#: events go to `$EXCHANGE_STUDY_OUTPUT_DIR/<study>/events.jsonl`.
app = make_server_app(lambda ctx: LoggingObserver(_default_output_dir(ctx)),
                      lambda ctx: ServerOptions(output_dir=_default_output_dir(ctx), poll=3.0))
