"""What SecAgg+ costs per round, against the same round without it, measured in one run.

    .venv/bin/python -m tests.bench.bench_secagg            # deployment: 4 rounds each; table: 3 reps
    .venv/bin/python -m tests.bench.bench_secagg --quick    # deployment: 3 rounds each; table: 1 rep
    .venv/bin/python -m tests.bench.bench_secagg --no-deployment   # the table only
    .venv/bin/python -m tests.bench.bench_secagg --objects   # object requests per round, packed or not

1. Deployment (target: SecAgg+ round <= 2x the plain round at 3 hospitals): a SuperLink and three
   SuperNodes with warm executors on loopback (fast settings), breast cancer over 3 hospitals,
   logistic regression with DP-SGD; the same study with and without secure aggregation, steady
   state = mean of rounds 2+ (SecAgg+: pipelined, two exchanges per round). Reports wall time per
   round and overhead = wall - the slowest hospital's compute. `--hospitals 10`: the same at 10
   hospitals (target: SecAgg+ overhead <= 3 s per round beyond local training; breast cancer
   split 10 ways, ~51 records each). Also the CPU seconds per round of every process (server,
   SuperLink, each hospital's executor + SuperNode), which the machine's load does not inflate
   as it does wall time, and from them a DERIVED bound on the round's time beyond training with
   a core per process (server + SuperLink + busiest hospital CPU + the poll sleeps), and the
   SuperLink's requests per round (its own count, `superlink_main.COUNTS_ENV`). `--no-packing`:
   SecAgg+ records travel as built instead of packed into one (`federated.packing`).
   `--follow-up-sleep 0.02`: a hospital's SuperNode polls every 0.02 s after its reply to a stage
   the server answers at once (`RuntimeSettings.supernode_follow_up_sleep`, off by default).
   `--long-poll S` / `--deliver-complete on|off`: the SuperLink's long polls and its delivery of
   a message only once its objects are pushed (`RuntimeSettings.superlink_long_poll`,
   `superlink_deliver_complete`), for an A/B; the request counts then also show the object
   pulls answered "found, not yet available" (`#unavailable ...`, not requests of their own).
2. Table (target: <= 3 s per round beyond local training at 10 hospitals): model size (1k, 10k,
   100k weights) x hospitals (3, 5, 10), with and without SecAgg+, in process (`InProcessGrid`)
   with synthetic hospitals that return a random update and a signed receipt instead of training,
   so the time is the aggregation path alone: message handling, key agreement, Shamir sharing,
   masking, unmasking. In process every hospital runs on this one thread, so the time is the
   sum of all hospitals' protocol work plus the server's (an upper bound on the wall time of a
   deployment whose hospitals work in parallel).
Timing only: nothing is asserted.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

SIZES = (1_000, 10_000, 100_000)
HOSPITALS = (3, 5, 10)


class Recorder:
    def __init__(self, cpu: CpuMeter | None = None, requests: RequestMeter | None = None) -> None:
        self.rounds: list[dict[str, float]] = []
        self.cpu = cpu
        self.cpu_rounds: list[dict[str, float]] = []
        self.requests = requests
        self.request_rounds: list[dict[str, float]] = []

    def on_round(self, round: int, metrics: Any, receipts: Any) -> None:
        self.rounds.append({"round": float(round), **{k: float(v) for k, v in metrics.items()}})
        if self.cpu is not None:
            self.cpu_rounds.append(self.cpu.lap())
        if self.requests is not None:
            self.request_rounds.append(self.requests.lap())

    def on_complete(self, model_path: Path, sha256: str) -> None:
        pass

    def on_failed(self, reason: str) -> None:
        raise SystemExit(f"study failed: {reason}")


#: a lap's key for the requests of one path (`RequestMeter.lap`), e.g. "path:/v1/fleet/pull-object"
PATH_PREFIX = "path:"


class RequestMeter:
    """The SuperLink's requests since the last lap, from the counts file its process keeps
    (`superlink_main.COUNTS_ENV`, rewritten within 0.2 s of a change): in all, the object
    pushes and pulls (a request per object of a message's tree, at both ends), and the rest."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.last = self._now()

    def _now(self) -> dict[str, int]:
        import json

        try:
            return {k: int(v) for k, v in json.loads(self.path.read_text()).items()}
        except (OSError, ValueError):
            return {}

    def lap(self) -> dict[str, float]:
        now = self._now()
        delta = {k: now.get(k, 0) - self.last.get(k, 0) for k in now}
        self.last = now
        by_path = {f"{PATH_PREFIX}{k}": float(v) for k, v in delta.items()}  # "#unavailable ..." too
        delta = {k: v for k, v in delta.items() if not k.startswith("#")}  # counts, not requests
        objects = sum(v for k, v in delta.items() if k.endswith(("/push-object", "/pull-object")))
        return {"requests": float(sum(delta.values())), "requests_object": float(objects),
                "requests_fleet": float(sum(v for k, v in delta.items() if k.startswith("/v1/fleet/"))),
                "requests_runtime": float(sum(v for k, v in delta.items() if k.startswith("/v1/runtime/"))),
                **by_path}


def _proc_cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process so far (Linux /proc; threads included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds each process of the deployment spent since the last lap: every hospital's
    executor and SuperNode, the SuperLink, and this process (the ServerApp runs in it). CPU time
    does not grow with the machine's load the way wall time does, so it says what the protocol
    costs when every process has a core of its own."""

    def __init__(self, pids: dict[str, int], idle: dict[str, float] | None = None) -> None:
        """`idle`: CPU seconds per second each process spends with no study running (SuperNodes
        and executors poll, heartbeats); subtracted from every lap, pro rata of its length."""
        self.pids = pids
        self.idle = idle or {}
        self.last = self._now()

    def _now(self) -> dict[str, float]:
        out = {name: _proc_cpu_s(pid) for name, pid in self.pids.items()}
        out["server"] = time.process_time()
        out["_wall"] = time.perf_counter()
        return out

    def lap(self) -> dict[str, float]:
        now = self._now()
        elapsed = now["_wall"] - self.last["_wall"]
        delta = {
            k: max(0.0, now[k] - self.last[k] - self.idle.get(k, 0.0) * elapsed) for k in now if k != "_wall"
        }
        # and with nothing subtracted: what the round really cost the machine, polling included
        # (idle polling is paced since issue 15: it is not what the round's polling costs)
        delta["_raw_total"] = sum(now[k] - self.last[k] for k in now if k != "_wall")
        self.last = now
        return delta

    @classmethod
    def idle_rates(cls, pids: dict[str, int], seconds: float) -> dict[str, float]:
        meter = cls(pids)
        time.sleep(seconds)
        return {k: v / seconds for k, v in meter.lap().items() if k != "_raw_total"}


# -- 1. the real deployment -------------------------------------------------------------------------


def deployment(rounds: int, root: Path, hospitals: int = 3, stock_superlink: bool = False,
               packing: bool = True, follow_up_sleep: float | None = None, long_poll: float | None = None,
               deliver_complete: bool | None = None,
               reply_pulls: int | None = None) -> dict[str, dict[str, float]]:
    """Mean per-round numbers of rounds 2+ for "plain" and "secagg" (two studies each,
    interleaved), with the CPU seconds per round of each kind of process (`CpuMeter`):
    `cpu_server_s`, `cpu_superlink_s`, and over the hospitals (executor + SuperNode) the mean
    `cpu_hospital_mean_s` and the largest `cpu_hospital_max_s`."""
    from federated.runtime.demo_sites import approve, demo_spec, provision_sites
    from federated.runtime.deployment import LocalFederation
    from federated.runtime.server_runner import run_study
    from federated.runtime.settings import RuntimeSettings
    from federated.runtime.superlink_main import COUNTS_ENV

    extra = {} if follow_up_sleep is None else {"supernode_follow_up_sleep": follow_up_sleep}
    settings = RuntimeSettings(superlink_patches=not stock_superlink, message_packing=packing, **extra)
    if long_poll is not None:  # the SuperLink's long polls (`superlink_long_poll`), for an A/B
        settings = dataclasses.replace(settings, superlink_long_poll=long_poll)
    if deliver_complete is not None:  # `superlink_deliver_complete`, for an A/B
        settings = dataclasses.replace(settings, superlink_deliver_complete=deliver_complete)
    if reply_pulls is not None:  # `server_reply_pulls`, for an A/B
        settings = dataclasses.replace(settings, server_reply_pulls=reply_pulls)
    counts = root / "superlink-requests.json"
    os.environ[COUNTS_ENV] = str(counts)  # the SuperLink (started below) inherits it
    names = tuple(f"hospital-{chr(ord('a') + i)}" for i in range(hospitals))
    # breast cancer's 569 records give 10 hospitals ~51 each (the default floor is 100)
    sites = provision_sites(root / "sites", hospitals=names, min_records=min(100, 400 // hospitals))
    out: dict[str, dict[str, float]] = {}
    configs = {h: d.site.node_config() for h, d in sites.items()}
    fed = LocalFederation(root / "fed", configs, settings=settings)
    try:
        # ten executors importing torch at once on a loaded machine: more than the 90 s default
        fed.start(timeout=90.0 + 30.0 * hospitals)
        pids = {"superlink": fed.superlink.proc.pid} if fed.superlink.proc is not None else {}
        for h, node in fed.nodes.items():
            for proc in node.processes():
                pids[f"{h}/{'executor' if proc is node.executor else 'supernode'}"] = proc.pid
        idle = CpuMeter.idle_rates(pids, 20.0)
        out["idle"] = {"cpu_idle_total_per_s": sum(idle.values())}
        for secure in (False, True, False, True):  # interleaved: machine load hits both alike
            name = "secagg" if secure else "plain"
            spec = demo_spec(
                f"bench-{name}-{len(out)}-{time.time_ns()}",
                rounds=rounds,
                min_hospitals=3,
                accountant="rdp",
                secure_aggregation=secure,
                round_timeout_s=180,
                join_timeout_s=600,
            )
            for demo in sites.values():
                approve(demo.site, spec.study_id)
            recorder = Recorder(CpuMeter(pids, idle), RequestMeter(counts))
            # every round waits for all hospitals (else, on a loaded machine, round 1 starts with
            # those whose hello came back within the 10 s grace and later rounds grow)
            result = run_study(
                fed.superlink.address,
                spec,
                recorder,
                root / "out",
                settings=settings,
                approved_hospitals=names,
            )
            if result.status != "completed":
                raise SystemExit(f"{name}: {result.reason}")
            steady = recorder.rounds[1:]
            cpu = [_cpu_summary(lap, names) for lap in recorder.cpu_rounds[1:]]
            keys = ["round_wall_s", "overhead_s", "train_compute_max_s", "contributors"]
            if secure:
                keys += ["secagg_collect_s", "secagg_unmask_s", "secagg_pipelined"]
            for key in keys:
                out.setdefault(name, {}).setdefault(key, 0.0)
                out[name][key] += statistics.fmean(r.get(key, 0.0) for r in steady) / 2
            for key in cpu[0]:
                out[name].setdefault(key, 0.0)
                out[name][key] += statistics.fmean(c[key] for c in cpu) / 2
            for key in {k for r in recorder.request_rounds[1:] for k in r}:  # a path may be new later
                out[name].setdefault(key, 0.0)
                out[name][key] += statistics.fmean(r.get(key, 0.0) for r in recorder.request_rounds[1:]) / 2
            out[name]["ref_accuracy"] = recorder.rounds[-1].get("ref_accuracy", float("nan"))
    finally:
        fed.stop()
    return out


def _cpu_summary(lap: dict[str, float], hospitals: tuple[str, ...]) -> dict[str, float]:
    per_hospital = [lap.get(f"{h}/executor", 0.0) + lap.get(f"{h}/supernode", 0.0) for h in hospitals]
    return {
        "cpu_server_s": lap["server"],
        "cpu_superlink_s": lap.get("superlink", 0.0),
        "cpu_hospital_mean_s": statistics.fmean(per_hospital),
        "cpu_hospital_max_s": max(per_hospital),
        "cpu_total_s": sum(v for k, v in lap.items() if k != "_raw_total"),
        "cpu_raw_total_s": lap.get("_raw_total", 0.0),
    }


def _load() -> str:
    one, five, _ = os.getloadavg()
    return f"load {one:.1f} (5 min {five:.1f}) on {os.cpu_count()} cores"


# -- 2. the table (in process, synthetic hospitals) -------------------------------------------------


def _synthetic_app(signers: dict[int, Any], spec: Any, size: int) -> Any:
    from datetime import UTC, datetime

    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict
    from flwr.clientapp import ClientApp

    from audit.reward_commitment import DEFAULT_SIZE, commit
    from federated.receipts import make_receipt
    from federated.secagg.client import secagg_mod
    from federated.server_app import GLOBAL_KEY, METRIC_PREFIX, REPLY_KEY, UPDATE_KEY, WEIGHTS_KEY

    app = ClientApp(mods=[secagg_mod])
    rng = np.random.default_rng(0)
    rewards = commit({}, minimum_size=DEFAULT_SIZE).public()

    @app.train()
    def train(message: Message, context: Any) -> Message:
        weights = message.content.array_records[GLOBAL_KEY][WEIGHTS_KEY].numpy()
        update = (weights + rng.normal(0, 0.05, size)).astype(np.float32)
        hospital = f"h{context.node_id}"
        receipt = make_receipt(
            signers[context.node_id],
            study_id=spec.study_id,
            round=int(message.metadata.group_id),
            hospital_id=hospital,
            records_used=100,
            commitment="0" * 64,
            epsilon_spent=0.1,
            epsilon_total=0.1,
            delta=1e-5,
            spec_sha256=spec.sha256(),
            rewards=rewards,
            instant=datetime.now(UTC),
        )
        record = ConfigRecord(
            {
                "status": "ok",
                "reason": "",
                "hospital": hospital,
                "receipt": receipt.to_bytes(),
                METRIC_PREFIX + "num_examples": 100.0,
            }
        )
        content = RecordDict({REPLY_KEY: record, UPDATE_KEY: ArrayRecord({WEIGHTS_KEY: Array(update)})})
        return Message(content, reply_to=message)

    return app


def table_cell(hospitals: int, size: int, secure: bool, reps: int) -> float:
    """Median seconds of one aggregation round (synthetic hospitals) over `reps` rounds."""
    import threading

    from flwr.app import Array, ArrayRecord, Context, Message, MessageType, RecordDict

    from audit.signing import Signer
    from federated.runtime.demo_sites import demo_spec
    from federated.runtime.inprocess import InProcessGrid
    from federated.secagg.server import SecAggDriver
    from federated.server_app import (
        GLOBAL_KEY,
        WEIGHTS_KEY,
        NodeDirectory,
        SecAggTransport,
        ServerOptions,
        _decode_reply,
        _reply_weights_sum,
        _stamp,
        exchange,
    )

    spec = demo_spec("bench-table", min_hospitals=3, secure_aggregation=secure)
    signers = {n: Signer.generate() for n in range(1, hospitals + 1)}
    app = _synthetic_app(signers, spec, size)
    grid = InProcessGrid({n: {} for n in signers}, spec.to_run_config(), client_app=app)
    context = Context(
        run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=spec.to_run_config()
    )
    options = ServerOptions(output_dir=Path("."), poll=0.0, stop_event=threading.Event())
    directory = NodeDirectory(grid, spec, context, options)
    targets = {n: f"h{n}" for n in signers}
    weights = np.zeros(size, dtype=np.float32)
    times = []
    for round_ in range(1, reps + 1):

        def decode(phase: Any, masked: bool, r: int = round_) -> list[Any]:
            return [
                _decode_reply(n, m, spec, r, None, n_weights=size, masked=masked)
                for n, m in phase.replies.items()
            ]

        t0 = time.perf_counter()
        if secure:
            result = SecAggDriver(SecAggTransport(directory), timeout=600, min_members=3).run(
                targets, weights, round_, lambda phase: decode(phase, True)
            )
            if result.weights is None:
                raise SystemExit(f"secagg round failed: {result.failure}")
            weights = result.weights
        else:
            content = RecordDict({GLOBAL_KEY: ArrayRecord({WEIGHTS_KEY: Array(weights)})})
            messages = [
                Message(content, dst_node_id=n, message_type=MessageType.TRAIN, group_id=str(round_), ttl=600)
                for n in targets
            ]
            _stamp(messages, context, options)
            phase = exchange(grid, messages, timeout=600, poll=0.0)
            weights = _reply_weights_sum([r for r in decode(phase, False) if r.receipt is not None])
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _tree(obj: Any) -> list[str]:
    """The object ids of a message's tree (Flower moves each with its own request)."""
    ids = [obj.object_id]
    for child in (obj.children or {}).values():
        ids += _tree(child)
    return ids


class _CountingGrid:
    """An `InProcessGrid` that counts the object pushes and pulls of the messages it moves."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from federated.runtime.inprocess import InProcessGrid

        class CountingGrid(InProcessGrid):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                self.counts = {"push": 0, "pull": 0, "messages": 0}

            def push_messages(self, messages: Any) -> Any:
                messages = list(messages)
                trees = [_tree(m) for m in messages]
                self.counts["push"] += len({i for t in trees for i in t})  # shared objects: pushed once
                self.counts["pull"] += sum(len(t) for t in trees)
                self.counts["messages"] += len(messages)
                return super().push_messages(messages)

            def pull_messages(self, message_ids: Any) -> Any:
                replies = list(super().pull_messages(message_ids))
                for reply in replies:
                    n = len(_tree(reply))
                    self.counts["push"] += n
                    self.counts["pull"] += n
                    self.counts["messages"] += 1
                return replies

        return CountingGrid(*args, **kwargs)


def object_requests(hospitals: int, size: int, packing: bool, secure: bool = True) -> dict[str, float]:
    """The object pushes and pulls of one steady-state round (SecAgg+: round 2, its key exchange
    pipelined into round 1; plain: one train exchange), counted from the message trees the
    in-process round exchanges (synthetic hospitals, as the table): the sender pushes each
    distinct object of an exchange once, each receiver pulls every object of its message.
    Deterministic, unlike the requests a deployment counts (retries of objects not yet pushed,
    polls: those grow with the load)."""
    import threading

    from flwr.app import Context, MessageType, RecordDict

    from audit.signing import Signer
    from federated.runtime.demo_sites import demo_spec
    from federated.secagg.server import SecAggDriver
    from federated.server_app import (
        NodeDirectory,
        SecAggTransport,
        ServerOptions,
        _decode_reply,
        exchange_with_retry,
    )

    spec = demo_spec("bench-objects", min_hospitals=3, secure_aggregation=secure)
    signers = {n: Signer.generate() for n in range(1, hospitals + 1)}
    grid = _CountingGrid({n: {} for n in signers}, spec.to_run_config(),
                         client_app=_synthetic_app(signers, spec, size))
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                      run_config=spec.to_run_config())
    options = ServerOptions(output_dir=Path("."), poll=0.0, stop_event=threading.Event(),
                            pack_messages=packing)
    directory = NodeDirectory(grid, spec, context, options)
    targets = {n: f"h{n}" for n in signers}
    weights = np.zeros(size, dtype=np.float32)
    if not secure:
        phase = exchange_with_retry(directory, targets, MessageType.TRAIN, weights, round_=1, timeout=600)
        replies = [_decode_reply(n, m, spec, 1, None, n_weights=size) for n, m in phase.replies.items()]
        if len(replies) != hospitals or any(r.weights is None for r in replies):
            raise SystemExit("plain round: an update did not decode")
        return {k: float(v) for k, v in grid.counts.items()}
    transport = SecAggTransport(directory)
    prepared = None
    for round_ in (1, 2):
        grid.counts = dict.fromkeys(grid.counts, 0)

        def decode(phase: Any, r: int = round_) -> list[Any]:
            return [_decode_reply(n, m, spec, r, None, n_weights=size, masked=True)
                    for n, m in phase.replies.items()]

        result = SecAggDriver(transport, timeout=600, min_members=3).run(
            targets, weights, round_, decode, prepared=prepared, pipeline=True)
        if result.weights is None or result.next is None:
            raise SystemExit(f"secagg round failed: {result.failure}")
        weights, prepared = result.weights, result.next
    return {k: float(v) for k, v in grid.counts.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-deployment", action="store_true")
    parser.add_argument("--no-table", action="store_true")
    parser.add_argument("--hospitals", type=int, default=3, help="hospitals in the deployment part")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per study in the deployment part")
    parser.add_argument("--long-poll", type=float, default=None,
                        help="the SuperLink's long polls in seconds (RuntimeSettings.superlink_long_poll)")
    parser.add_argument("--deliver-complete", choices=("on", "off"), default=None,
                        help="hand a message out only once its objects are pushed "
                             "(superlink_deliver_complete)")
    parser.add_argument("--stock-superlink", action="store_true",
                        help="Flower's SuperLink without our CPU patches (settings.superlink_patches)")
    parser.add_argument("--no-packing", action="store_true",
                        help="SecAgg+ records travel as built, not packed (settings.message_packing)")
    parser.add_argument("--follow-up-sleep", type=float, default=None,
                        help="settings.supernode_follow_up_sleep for the deployment part (0.02: a "
                             "hospital's SuperNode polls every 0.02 s after a stage the server "
                             "answers at once; default: the setting's default)")
    parser.add_argument("--reply-pulls", type=int, default=None,
                        help="replies of one reply pull the ServerApp fetches at once (server_reply_pulls; "
                             "1: flwr's one after another)")
    parser.add_argument("--objects", action="store_true",
                        help="only the object requests of a steady-state round, packed and not (in process)")
    args = parser.parse_args()
    if args.objects:
        for secure in (True, False):
            print(f"== object pushes + pulls per steady-state {'SecAgg+' if secure else 'plain'} round "
                  "(in process, synthetic hospitals; messages = messages and replies)")
            for hospitals in HOSPITALS:
                for size in SIZES:
                    as_built = object_requests(hospitals, size, packing=False, secure=secure)
                    packed = object_requests(hospitals, size, packing=True, secure=secure)
                    print(f"{hospitals:>3} hospitals, {size:>7} weights: as built {as_built['push']:.0f} + "
                          f"{as_built['pull']:.0f} = {as_built['push'] + as_built['pull']:.0f}, packed "
                          f"{packed['push']:.0f} + {packed['pull']:.0f} = "
                          f"{packed['push'] + packed['pull']:.0f} ({as_built['messages']:.0f} messages)")
        return
    reps = 1 if args.quick else 3
    if not args.no_table:
        print(
            "== table: seconds per aggregation round (in process, synthetic hospitals, median of "
            f"{reps}); ratio = secagg / plain"
        )
        table_cell(3, 1_000, False, 1)  # warm-up: imports and first-use costs stay out of the table
        table_cell(3, 1_000, True, 1)
        print(f"{'weights':>8} {'hospitals':>9} {'plain':>8} {'secagg':>8} {'ratio':>6}")
        for size in SIZES:
            for hospitals in HOSPITALS:
                plain = table_cell(hospitals, size, False, reps)
                secure = table_cell(hospitals, size, True, reps)
                print(f"{size:>8} {hospitals:>9} {plain:>8.3f} {secure:>8.3f} {secure / plain:>6.1f}")
    if args.no_deployment:
        return
    rounds = args.rounds or (3 if args.quick else 4)
    load_before = _load()
    with tempfile.TemporaryDirectory(prefix="bench-secagg-") as tmp:
        numbers = deployment(rounds, Path(tmp), args.hospitals, stock_superlink=args.stock_superlink,
                             packing=not args.no_packing, follow_up_sleep=args.follow_up_sleep,
                             long_poll=args.long_poll,
                             deliver_complete=None if args.deliver_complete is None
                             else args.deliver_complete == "on", reply_pulls=args.reply_pulls)
    load_after = _load()
    idle = numbers.pop("idle")["cpu_idle_total_per_s"]
    p, s = numbers["plain"], numbers["secagg"]
    print(
        f"== deployment ({'stock' if args.stock_superlink else 'patched'} SuperLink, SecAgg+ records "
        f"{'as built' if args.no_packing else 'packed'}): "
        f"{args.hospitals} hospitals, breast cancer, logistic regression, DP-SGD; "
        f"mean of rounds 2-{rounds} (SecAgg+ pipelined), "
        f"two studies each, interleaved; {load_before} before, {load_after} after"
    )
    for name, n in numbers.items():
        print(
            f"{name:>7}: wall {n['round_wall_s']:.2f} s/round, overhead {n['overhead_s']:.2f} s, "
            f"slowest compute {n['train_compute_max_s']:.2f} s, contributors {n['contributors']:.1f}, "
            f"final ref. accuracy {n['ref_accuracy']:.3f}"
        )
    print(
        "secagg stages (s/round): "
        + ", ".join(
            f"{k.removeprefix('secagg_').removesuffix('_s')} {s[k]:.2f}" for k in s if k.startswith("secagg_")
        )
    )
    print(
        f"ratio secagg/plain: wall {s['round_wall_s'] / p['round_wall_s']:.2f}x "
        "(target <= 2x at 3 hospitals), "
        f"overhead {s['overhead_s'] / p['overhead_s']:.2f}x"
    )
    print(
        "CPU seconds per round (process CPU time; hospital = executor + SuperNode; each process's "
        f"idle polling, {idle:.2f} CPU s/s for all together, measured before the studies and "
        "subtracted pro rata of the round's length):"
    )
    for name, n in numbers.items():
        print(
            f"{name:>7}: server {n['cpu_server_s']:.3f}, SuperLink {n['cpu_superlink_s']:.3f}, "
            f"hospital mean {n['cpu_hospital_mean_s']:.3f} / max {n['cpu_hospital_max_s']:.3f}, "
            f"all processes {n['cpu_total_s']:.3f}; nothing subtracted: {n['cpu_raw_total_s']:.3f}"
        )
    print("SuperLink requests per round (all / object push+pull / Fleet / Runtime):")
    for name, n in numbers.items():
        print(f"{name:>7}: {n['requests']:.0f} / {n['requests_object']:.0f} / {n['requests_fleet']:.0f} / "
              f"{n['requests_runtime']:.0f}")
    print("SuperLink requests per round by path (plain / secagg):")
    for key in sorted({k for n in numbers.values() for k in n if k.startswith(PATH_PREFIX)}):
        print(f"  {key.removeprefix(PATH_PREFIX):42s} {p.get(key, 0.0):7.1f} / {s.get(key, 0.0):7.1f}")
    extra = s["cpu_hospital_mean_s"] - p["cpu_hospital_mean_s"]
    print(
        f"SecAgg+ protocol work per hospital (secagg - plain, mean): {extra:.3f} CPU s/round; "
        f"server {s['cpu_server_s'] - p['cpu_server_s']:.3f} CPU s/round"
    )
    overhead = s["overhead_s"]
    verdict = "met" if overhead <= 3.0 else "NOT met"
    print(
        f"SecAgg+ overhead beyond local training at {args.hospitals} hospitals: {overhead:.2f} s/round "
        f"measured (round wall - slowest hospital's compute; {load_after}); target <= 3 s at 10 "
        f"hospitals: {verdict}"
    )
    # Derived, not measured: with a core per process nothing waits for a CPU, so the round's
    # time beyond training is at most the serial CPU on its path (the server, the SuperLink and
    # the busiest hospital, training included, hence an upper bound) plus the poll sleeps of its
    # exchanges (2 per SecAgg+ round: collect and unmask). With long polls the SuperLink answers
    # a SuperNode's held poll when its message is stored: its idle sleep is off that path.
    # The unmask exchange follows the collect replies at once: the SuperNodes poll it with their
    # follow-up sleep (docs/secure-aggregation.md, "Between the stages"), not the idle sleep.
    settings = _settings(args.follow_up_sleep)

    def floor(node_sleep: float) -> float:
        return (settings.server_poll + (0.0 if settings.superlink_long_poll > 0 else node_sleep)
                + settings.executor_poll + settings.supernode_reply_sleep)

    first = floor(settings.supernode_idle_sleep)
    follow_up = floor(settings.supernode_follow_up_sleep or settings.supernode_idle_sleep)
    for name, n, sleeps in (("plain", p, first), ("secagg", s, first + follow_up)):
        bound = n["cpu_server_s"] + n["cpu_superlink_s"] + n["cpu_hospital_max_s"] + sleeps
        print(
            f"DERIVED (not measured) {name} round time beyond training with one core per process: "
            f"<= {bound:.2f} s (server + SuperLink + busiest hospital CPU + {sleeps:.2f} s of poll "
            "sleeps)"
            + ("; target <= 3 s: " + ("met" if bound <= 3.0 else "NOT met") if name == "secagg" else "")
        )


def _settings(follow_up_sleep: float | None = None) -> Any:
    from federated.runtime.settings import RuntimeSettings

    if follow_up_sleep is None:
        return RuntimeSettings()
    return RuntimeSettings(supernode_follow_up_sleep=follow_up_sleep)


if __name__ == "__main__":
    main()
