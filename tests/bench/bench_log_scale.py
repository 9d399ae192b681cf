"""The audit log on PostgreSQL as it grows to 10,000,000 entries (issue "Scale", item 3).

    .venv/bin/python -m tests.bench.bench_log_scale                          # 10k, 100k, 1M
    .venv/bin/python -m tests.bench.bench_log_scale --entries 10000000       # ... and 10M
    .venv/bin/python -m tests.bench.bench_log_scale --quick                  # 10k only

One temporary PostgreSQL database (created through `EXCHANGE_TEST_PG`, default
postgresql://postgres@127.0.0.1:5432/postgres, and dropped at the end) holds a real
coordinator's log: the coordinator is built on it once (migrations, trust anchors, its key
registered by the operator key, an auditor API key), then the log is grown to each size in turn
and measured there.

Growing (set-up, timed and printed but not a target): entries `round.completed`, each with its
own study and round (no two leaves alike), signed with the coordinator's key in a pool of
worker processes (raw Ed25519 over the RFC 8785 signing input, as `audit.entry.sign_entry`
does: every entry is validly signed, `audit verify` checks each one), their leaves, leaf hashes
and every complete subtree they close computed here, then written with COPY into
`audit_entries` and `audit_tree_nodes` in one transaction per chunk. The append-only triggers
stay on (the next-index trigger checks every COPY row). A bulk load, not the append path: the
append path is measured on its own below. Nothing else may write to the database while the log
grows (the COPY starts at the size read before it; the next-index trigger refuses it otherwise).

Measured at each size n (load average printed with each):
- checkpoint: `AuditLog.checkpoint()` (root from the stored subtrees, sign, store);
- coordinator start-up: `build_runtime` + uvicorn until /health answers (its ledger fold reads
  only ledger kinds, its keyring only key kinds, through the kind index);
- inclusion and consistency proofs from the running coordinator over HTTP
  (`GET /v1/audit/proofs/inclusion?index=i&size=n`, `.../consistency?old_size=m&new_size=n`,
  an auditor's API key, one keep-alive connection, random i and m): p50 and p99 (target:
  inclusion p99 <= 20 ms at 10M);
- `audit export --db URL` of the log (time, peak RSS, size on disk), then `audit verify` of it
  in a fresh process with the default signature workers (time, peak RSS);
- append throughput at that size: `--appends` entries appended the coordinator's way (group
  commit, `AuditLog.append_in`, 8 threads, as `bench_audit_append`) against the same number
  signed and group-fsynced to a plain file (the baseline), ratio in the same run (target >= 0.5).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import multiprocessing
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from audit.entry import Entry
from audit.merkle import leaf_hash, node_hash
from audit.signing import Signer, b64encode
from tests.bench.bench_audit_append import PG_ADMIN_DSN, GroupFsyncFile, _database, _run_threads
from tests.bench.bench_audit_verify import _peak_rss_mb, _run_child

KIND = "round.completed"
START = datetime(2026, 1, 5, 8, 0, 0, tzinfo=UTC)
CHUNK = 1 << 14  # entries per worker task and per COPY transaction (a power of two)
RESULT_TAG = "RESULT "


# ------------------------------------------------------------------ signing (worker processes)
_WORKER_KEY: Signer | None = None


def _init_worker(seed: bytes) -> None:
    global _WORKER_KEY  # noqa: PLW0603 (one key per worker process, set by the pool)
    _WORKER_KEY = Signer.from_seed(seed)


def _payload(index: int) -> dict[str, Any]:
    return {"study_id": f"s-{index // 8:08d}", "round": index % 8 + 1, "hospitals": 3 + index % 7,
            "loss": round(0.2 + (index % 1000) / 2000, 6)}


def _sign_range(bounds: tuple[int, int]) -> list[tuple[bytes, bytes, str]]:
    """(leaf bytes, leaf hash, time) of entries [start, stop), each signed with the
    coordinator's key through `Entry` and `canonical` (the reference the fast path is checked
    against)."""
    start, stop = bounds
    signer = _WORKER_KEY
    assert signer is not None
    leaves = []
    for index in range(start, stop):
        instant = START + timedelta(milliseconds=index)
        entry = Entry(kind=KIND, key_id=signer.key_id, time=_time(instant), payload=_payload(index),
                      signature="")
        message = entry.signing_input()
        signature = b64encode(signer.signing_key.sign(message).signature)
        signed = Entry(kind=entry.kind, key_id=entry.key_id, time=entry.time, payload=entry.payload,
                       signature=signature)
        leaf = signed.leaf_bytes()
        leaves.append((leaf, leaf_hash(leaf), entry.time))
    return leaves


def _templated(signer: Signer, index: int) -> tuple[bytes, bytes, str]:
    """(signing input, leaf bytes, time) of entry `index`, by string template.

    The entries all have one shape, so their RFC 8785 text is a template: `canonical` over the
    same dicts costs more than the signature itself. `_fast_chunk` checks the template against
    `_sign_range` (the Entry/canonical path) on the first entry of every chunk, and `audit
    verify` re-encodes every exported entry, so a template that drifted would fail loudly.
    """
    payload = _payload(index)
    instant = _time(START + timedelta(milliseconds=index))
    head = (f'{{"key_id":"{signer.key_id}","kind":"{KIND}","payload":{{"hospitals":'
            f'{payload["hospitals"]},"loss":{_LOSS_TEXT[index % 1000]},"round":{payload["round"]},'
            f'"study_id":"{payload["study_id"]}"}},')
    tail = f'"time":"{instant}","v":1}}'
    message = (head + tail).encode("ascii")
    signature = b64encode(signer.signing_key.sign(message).signature)
    leaf = (head + f'"signature":"{signature}",' + tail).encode("ascii")
    return message, leaf, instant


def _loss_texts() -> list[str]:
    from audit.signing import canonical

    return [canonical(_payload(i)["loss"]).decode("ascii") for i in range(1000)]


_LOSS_TEXT: list[str] = []


def _fast_chunk(bounds: tuple[int, int]) -> tuple[bytes, bytes, list[tuple[int, int, bytes]]]:
    """Entries [start, stop) ready for the database: (COPY text of their `audit_entries` rows,
    COPY text of every `audit_tree_nodes` row of a complete subtree inside the range, the
    range's maximal complete subtrees in order as (level, idx, hash)).

    All per-entry work happens here, in a worker: the parent only joins the ranges' edges
    into the tree's right edge (`Frontier.push`) and streams these bytes to COPY.
    """
    start, stop = bounds
    signer = _WORKER_KEY
    assert signer is not None
    if not _LOSS_TEXT:
        _LOSS_TEXT.extend(_loss_texts())
    reference = _sign_range((start, start + 1))[0]
    if _templated(signer, start)[1] != reference[0]:
        raise RuntimeError(f"the entry template differs from the RFC 8785 encoding at {start}")
    key_id = signer.key_id
    entry_rows: list[str] = []
    node_rows: list[str] = []
    stack: list[tuple[int, int, bytes]] = []
    for index in range(start, stop):
        _message, leaf, instant = _templated(signer, index)
        digest = leaf_hash(leaf)
        entry_rows.append(f"{index}\t\\\\x{leaf.hex()}\t\\\\x{digest.hex()}\t{KIND}\t{key_id}\t"
                          f"{instant}\n")
        node = (0, index, digest)
        while True:
            node_rows.append(f"{node[0]}\t{node[1]}\t\\\\x{node[2].hex()}\n")
            # A node closes its parent when it is a right child and its left sibling (the
            # same level, the index before) is on the stack, i.e. inside this range.
            if node[1] & 1 and stack and stack[-1][0] == node[0] and stack[-1][1] == node[1] - 1:
                left = stack.pop()
                node = (node[0] + 1, node[1] >> 1, node_hash(left[2], node[2]))
                continue
            stack.append(node)
            break
    return "".join(entry_rows).encode("ascii"), "".join(node_rows).encode("ascii"), stack


def _time(instant: datetime) -> str:
    from audit.entry import format_time

    return format_time(instant)


# ------------------------------------------------------------------ the tree's right edge
class Frontier:
    """The complete subtrees on the tree's right edge, largest first, as (level, idx, hash):
    everything needed to compute the nodes that new leaves close."""

    def __init__(self, stack: list[tuple[int, int, bytes]], size: int) -> None:
        self.stack = stack
        self.size = size

    @classmethod
    def read(cls, connection: Any) -> Frontier:
        from audit.store.entries import log_size
        from audit.store.nodes import fetch_nodes, frontier_coordinates

        size = log_size(connection)
        coordinates = frontier_coordinates(size)
        found = fetch_nodes(connection, coordinates)
        return cls([(level, idx, found[(level, idx)]) for level, idx in coordinates], size)

    def add(self, digest: bytes, nodes: list[tuple[int, int, bytes]]) -> None:
        """Add one leaf hash; append to `nodes` the leaf node and every parent it completes."""
        entry = (0, self.size, digest)
        nodes.append(entry)
        self.stack.append(entry)
        self._close(nodes)
        self.size += 1

    def push(self, node: tuple[int, int, bytes], nodes: list[tuple[int, int, bytes]]) -> None:
        """Add a complete subtree (level, idx, hash) that starts at the current size (its
        own nodes are already stored); append to `nodes` every parent it completes."""
        level, idx, _digest = node
        if idx << level != self.size:
            raise ValueError(f"subtree ({level}, {idx}) does not start at size {self.size}")
        self.stack.append(node)
        self._close(nodes)
        self.size += 1 << level

    def _close(self, nodes: list[tuple[int, int, bytes]]) -> None:
        stack = self.stack
        while len(stack) >= 2 and stack[-1][0] == stack[-2][0]:
            right = stack.pop()
            left = stack.pop()
            parent = (left[0] + 1, left[1] >> 1, node_hash(left[2], right[2]))
            nodes.append(parent)
            stack.append(parent)


def _copy_chunk(connection: Any, frontier: Frontier, chunk: tuple[bytes, bytes,
                list[tuple[int, int, bytes]]]) -> None:
    """One worker's range into the database: its rows as prepared, then the parents that its
    edge closes with the tree's right edge."""
    entry_rows, node_rows, edge = chunk
    closed: list[tuple[int, int, bytes]] = []
    for node in edge:
        frontier.push(node, closed)
    with connection.cursor() as cursor:
        with cursor.copy("COPY audit_entries (idx, leaf, leaf_hash, kind, key_id, time) "
                         "FROM STDIN") as copy:
            copy.write(entry_rows)
        with cursor.copy("COPY audit_tree_nodes (level, idx, hash) FROM STDIN") as copy:
            copy.write(node_rows)
            for node in closed:
                copy.write_row(node)


def grow(url: str, signer: Signer, target: int, workers: int) -> tuple[int, float]:
    """Append signed entries until the log holds `target`; (entries added, seconds)."""
    import psycopg

    started = time.perf_counter()
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        from sqlalchemy import create_engine

        engine = create_engine(_sqlalchemy_url(url))
        with engine.connect() as sa_connection:
            frontier = Frontier.read(sa_connection)
        engine.dispose()
        first = frontier.size
        if first >= target:
            return 0, 0.0
        # Ranges end on multiples of CHUNK (a power of two), so each range after the first is
        # one complete subtree the worker computes whole.
        bounds = [first, *range((first // CHUNK + 1) * CHUNK, target, CHUNK), target]
        ranges = list(itertools.pairwise(bounds))
        context = multiprocessing.get_context("spawn")
        with context.Pool(workers, initializer=_init_worker,
                          initargs=(signer.seed,)) as pool:
            for (_start, stop), chunk in zip(ranges, pool.imap(_fast_chunk, ranges), strict=True):
                with connection.transaction():
                    _copy_chunk(connection, frontier, chunk)
                if (stop - first) // CHUNK % 25 == 0:
                    print(f"    grown to {stop:,} "
                          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return target - first, time.perf_counter() - started


def _sqlalchemy_url(url: str) -> str:
    return url.replace("postgresql://", "postgresql+psycopg://", 1)


# ------------------------------------------------------------------ the coordinator
def _app_config(folder: Path, url: str) -> Any:
    from exchange.coordinator.app import AppConfig
    from tests.audit.store_support import ORIGIN

    return AppConfig(database_url=_sqlalchemy_url(url), operator_key_file=folder / "operator.key",
                     log_key_file=folder / "log.key", coordinator_key_file=folder / "coordinator.key",
                     log_origin=ORIGIN, rate_limit_per_minute=10_000_000, access_log=False)


def prepare(folder: Path, url: str) -> str:
    """Build the coordinator on the empty database once; an auditor's API key."""
    from exchange.coordinator.app import build_runtime
    from exchange.coordinator.schemas import ApiKeyCreate
    from tests.exchange.scripted_runner import ScriptedRunner

    runtime = build_runtime(_app_config(folder, url), ScriptedRunner(hospital_keys={}))
    try:
        _key, token = runtime.registry.issue_api_key(ApiKeyCreate(role="auditor"))
    finally:
        runtime.close()
    return token


def _serve(folder: Path, url: str, port: int) -> None:
    import uvicorn

    from exchange.coordinator.app import build_runtime, create_app
    from exchange.logging import configure_logging
    from tests.exchange.scripted_runner import ScriptedRunner

    configure_logging("WARNING", json_format=True)
    config = _app_config(folder, url)
    config.migrate = False
    runtime = build_runtime(config, ScriptedRunner(hospital_keys={}))
    uvicorn.run(create_app(runtime), host="127.0.0.1", port=port, log_level="error",
                access_log=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _percentiles(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"p50_ms": round(statistics.median(ordered) * 1000, 2),
            "p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))] * 1000, 2)}


def proofs(folder: Path, url: str, token: str, size: int, count: int) -> dict[str, Any]:
    """Start the coordinator, time its start, ask it for `count` proofs of each kind at `size`."""
    port = _free_port()
    started = time.perf_counter()
    server = subprocess.Popen([sys.executable, "-m", "tests.bench.bench_log_scale", "--serve",
                               str(folder), url, str(port)], stdout=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    headers = {"Authorization": f"Bearer {token}"}
    rng = random.Random(size)
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=60) as client:
            while True:
                try:
                    if client.get("/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if server.poll() is not None:
                    raise SystemExit(f"the coordinator exited ({server.returncode})")
                time.sleep(0.05)
            startup = time.perf_counter() - started
            results: dict[str, Any] = {"startup_s": round(startup, 2)}
            queries = {
                "inclusion": lambda: f"/v1/audit/proofs/inclusion?index={rng.randrange(size)}&size={size}",
                "consistency": lambda: (f"/v1/audit/proofs/consistency?old_size="
                                        f"{rng.randrange(1, size + 1)}&new_size={size}")}
            for query in queries.values():  # warm-up: connection, first-use imports, caches
                for _ in range(20):
                    client.get(query()).raise_for_status()
            samples: dict[str, list[float]] = {name: [] for name in queries}
            cpu_before, xacts_before = _cpu_seconds(server.pid), _transactions(url)
            for _ in range(count):  # the two kinds alternate: both see the same background load
                for name, query in queries.items():
                    path = query()
                    t0 = time.perf_counter()
                    response = client.get(path)
                    samples[name].append(time.perf_counter() - t0)
                    response.raise_for_status()
            # What a request costs, robust under load: the coordinator's CPU time and the
            # database transactions (each statement in autocommit is one) per request.
            requests = 2 * count
            results["server_cpu_ms_per_request"] = round(
                (_cpu_seconds(server.pid) - cpu_before) * 1000 / requests, 3)
            results["db_transactions_per_request"] = round(
                (_transactions(url) - xacts_before - 1) / requests, 2)
            for name, values in samples.items():
                results[name] = _percentiles(values)
            # One proof checked against the checkpoint, so a fast wrong answer cannot pass.
            _check_one_proof(client, size, rng)
    finally:
        server.terminate()
        server.wait(30)
    return results


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of process `pid` (Linux /proc), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _transactions(url: str) -> int:
    """Committed + rolled-back transactions of the benchmark's database so far (the
    statistics collector's count; the reading itself is one)."""
    import psycopg

    with psycopg.connect(url, autocommit=True) as connection:
        connection.execute("SELECT pg_stat_clear_snapshot()")
        row = connection.execute("SELECT xact_commit + xact_rollback FROM pg_stat_database "
                                 "WHERE datname = current_database()").fetchone()
    assert row is not None
    return int(row[0])


def _check_one_proof(client: httpx.Client, size: int, rng: random.Random) -> None:
    from audit.merkle import verify_inclusion
    from audit.signing import b64decode
    from audit.store import read_latest_checkpoint  # noqa: F401 (same module family)

    note = client.get("/v1/audit/checkpoint", headers={"Accept": "text/plain"}).text
    root_line = note.splitlines()[2]
    index = rng.randrange(size)
    body = client.get(f"/v1/audit/proofs/inclusion?index={index}&size={size}").json()
    if int(note.splitlines()[1]) == size:
        verify_inclusion(b64decode(body["leaf_hash"]), index, size,
                         [b64decode(p) for p in body["proof"]], b64decode(root_line))


# ------------------------------------------------------------------ export, verify, append
def _child_export(url: str, out: Path) -> None:
    from audit.cli import app

    wall = time.perf_counter()
    app(["export", "--db", _sqlalchemy_url(url), "--out", str(out)], standalone_mode=False)
    print(RESULT_TAG + json.dumps({"wall": time.perf_counter() - wall, "rss_mb": _peak_rss_mb()}))


def export_and_verify(url: str, out: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, "-m", "tests.bench.bench_log_scale", "--child-export",
                           url, str(out)], capture_output=True, text=True, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_TAG)]
    if not lines:
        raise SystemExit(f"export failed ({done.returncode}): {done.stderr[-2000:]}")
    exported = json.loads(lines[0][len(RESULT_TAG):])
    size_bytes = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    from audit.verify import default_workers

    verified = _run_child(out, default_workers())
    return {"export_s": round(exported["wall"], 2), "export_rss_mb": round(exported["rss_mb"]),
            "export_mb": round(size_bytes / 1e6, 1), "verify_s": round(verified["wall"], 2),
            "verify_rss_mb": round(verified["rss_mb"]), "verified_entries": verified["entries"]}


def appends(url: str, folder: Path, keys: Any, total: int, threads: int, run: int) -> dict[str, Any]:
    """`total` entries through the coordinator's group commit vs sign + group fsync."""
    from audit.entry import sign_entry
    from audit.signing import canonical
    from exchange.db.engine import make_engine

    engine = make_engine(_sqlalchemy_url(url))
    tag = f"append-{run}"

    def payload(t: int, seq: int) -> dict[str, Any]:
        return {"study_id": f"{tag}-{t}", "round": seq + 1, "hospitals": 3, "loss": 0.5}

    with keys.open(engine) as log:
        store_s = _run_threads(threads, total, lambda t, seq: log.append(
            sign_entry(keys.writer, KIND, payload(t, seq))))
    engine.dispose()
    baseline = GroupFsyncFile(folder / f"baseline-{run}.log")
    baseline_s = _run_threads(threads, total, lambda t, seq: baseline.append(
        canonical(sign_entry(keys.writer, KIND, payload(t, seq)).to_json())))
    baseline.close()
    return {"append_per_s": round(total / store_s), "baseline_per_s": round(total / baseline_s),
            "append_ratio": round(baseline_s / store_s, 2)}


# ------------------------------------------------------------------ main
def _sizes(text: str, largest: int | None) -> list[int]:
    sizes = [int(s) for s in text.split(",")]
    if largest is not None:
        sizes = [s for s in sizes if s < largest] + [largest]
    return sorted(set(sizes))


def measure(sizes: list[int], args: argparse.Namespace) -> Iterator[dict[str, Any]]:
    from audit.signing import Signer
    from audit.store import AuditLog
    from exchange.db.engine import make_engine
    from tests.audit.store_support import ORIGIN, LogKeys

    with contextlib.ExitStack() as stack:
        if args.database is not None:
            # A database and key folder left by an earlier run (stopped by SIGKILL, so not
            # dropped): grow it on from its size instead of from nothing. A new auditor key.
            url, folder = args.database, args.database_keys
        else:
            folder = Path(stack.enter_context(
                tempfile.TemporaryDirectory(prefix="bench-log-scale-", dir=args.dir)))
            url = stack.enter_context(_database(True, folder))
        token = prepare(folder, url)
        keys = LogKeys(Signer.load(folder / "operator.key"), Signer.load(folder / "log.key"),
                       Signer.load(folder / "coordinator.key"))
        for run, size in enumerate(sizes):
            added, grow_s = grow(url, keys.writer, size, args.workers)
            result: dict[str, Any] = {"entries": size, "grown": added,
                                      "grow_per_s": round(added / grow_s) if grow_s else None,
                                      "load_start": round(os.getloadavg()[0], 1)}
            engine = make_engine(_sqlalchemy_url(url))
            log = AuditLog(engine, keys.log, ORIGIN, keys.operator.public_key)
            t0 = time.perf_counter()
            log.checkpoint()
            result["checkpoint_ms"] = round((time.perf_counter() - t0) * 1000, 1)
            engine.dispose()
            result.update(proofs(folder, url, token, size, args.proofs))
            result.update(appends(url, folder, keys, args.appends, args.threads, run))
            with __import__("psycopg").connect(url) as connection:
                result["database_mb"] = round(connection.execute(
                    "SELECT pg_database_size(current_database())").fetchone()[0] / 1e6)
            verify_here = not args.no_verify and (args.verify_sizes is None
                                                  or size in _sizes(args.verify_sizes, None))
            if verify_here:
                # Export and verify last (linear in the log: the longest part at 10M), the
                # rest printed first so that a run stopped during them still has its figures.
                print("partial " + json.dumps(result), flush=True)
                result.update(export_and_verify(url, folder / f"export-{size}"))
                for leftover in sorted((folder / f"export-{size}").rglob("*"), reverse=True):
                    leftover.unlink() if leftover.is_file() else leftover.rmdir()
                (folder / f"export-{size}").rmdir()
            result["load_end"] = round(os.getloadavg()[0], 1)
            yield result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="10,000 entries, fewer proofs")
    parser.add_argument("--sizes", default="10000,100000,1000000")
    parser.add_argument("--entries", type=int, default=None,
                        help="the largest size (added to --sizes): 10000000 for the whole table")
    parser.add_argument("--proofs", type=int, default=2000, help="proofs of each kind per size")
    parser.add_argument("--appends", type=int, default=2000, help="appends per size (and baseline)")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--workers", type=int, default=max(1, os.cpu_count() or 1),
                        help="signing processes while growing the log")
    parser.add_argument("--no-verify", action="store_true", help="skip export and verify")
    parser.add_argument("--verify-sizes", default=None,
                        help="export and verify only at these sizes (comma-separated; default all)")
    parser.add_argument("--json", type=Path, default=None, help="append each result here")
    parser.add_argument("--dir", type=Path, default=None, help="folder for exports and keys")
    parser.add_argument("--database", default=None,
                        help="grow on an existing benchmark database (kept by a killed run)")
    parser.add_argument("--database-keys", type=Path, default=None,
                        help="with --database: the folder holding its keys")
    parser.add_argument("--serve", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--child-export", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        _serve(Path(args.serve[0]), args.serve[1], int(args.serve[2]))
        return
    if args.child_export:
        _child_export(args.child_export[0], Path(args.child_export[1]))
        return
    if args.quick:
        args.sizes, args.proofs, args.appends = "10000", 300, 500
    sizes = _sizes(args.sizes, args.entries)
    print(f"audit log on PostgreSQL ({PG_ADMIN_DSN.rsplit('/', 1)[0]}), sizes {sizes}; "
          f"cpus {os.cpu_count()}; load average {os.getloadavg()[0]:.1f}", flush=True)
    for result in measure(sizes, args):
        print(json.dumps(result), flush=True)
        if args.json is not None:
            with args.json.open("a") as handle:
                handle.write(json.dumps(result) + "\n")


if __name__ == "__main__":
    main()
