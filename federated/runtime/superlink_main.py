"""`flower-superlink` as we always run it: ``python -m federated.runtime.superlink_main ARGS``.

Adds `--disable-runtime-dependency-installation` when missing (the default runs `uv sync` on an
app's dependencies, which could pull packages from the internet, e.g. a CUDA torch) and turns
telemetry and update checks off before flwr is imported.

Unless ``EXCHANGE_FLOWER_MODE=plain``, it also applies the SuperLink's CPU patches of
`flwr_internals` before flwr builds its app (docs/flower.md, "Where Flower's time goes"): each
API's middleware runs only for its own paths (`patch_superlink_middleware`), and a SuperNode's
poll is answered before Flower's middleware, handler and database when that node is known to
have nothing pending (`patch_superlink_idle_pulls`; still authenticated by its signature; one
full poll every ``EXCHANGE_SUPERLINK_IDLE_RECHECK`` seconds per node re-checks it against the
database; held as a long poll up to ``EXCHANGE_SUPERLINK_LONG_POLL`` seconds, at most
``EXCHANGE_SUPERLINK_LONG_POLL_MAX`` at a time, and answered as soon as a message for the node
is stored), and flwr's sweep of lapsed task claims, a write on nearly every request, runs at most
every `TASK_SWEEP_S` (`patch_superlink_task_sweep`); a run's status, which flwr reads from the
database on nearly every request, is cached until a write that may change it
(`patch_superlink_run_status_cache`), so is the node a SuperNode key belongs to, which flwr's node
check reads on every Fleet request (`patch_superlink_node_key_cache`), and the task a Runtime API
token belongs to (`patch_superlink_task_token_cache`), and the per-run traffic
counters are summed in memory and written every `TRAFFIC_FLUSH_S`
(`patch_superlink_traffic_batching`). An object push that finds the database locked past its
busy timeout is answered 503 and retried by its sender, not silently dropped
(`patch_superlink_store_object_busy`). The ServerApp's messages of one push are stored in one
transaction, not one each (`patch_superlink_push_one_transaction`). The requests a round is made
of (a message's object pushes, pulls and receipt confirmations, a request per object; the
SuperNodes' polls, reply pushes and heartbeats; the ServerApp's pushes, reply pulls and task
heartbeats) are answered by flwr's own route functions outside FastAPI's middleware and routing
(`superlink_routes.patch_superlink_routes`), and an object push claims its pending object in one
SQL statement instead of two (`superlink_routes.patch_superlink_object_claim`). A SuperNode's
heartbeat no longer ends the node-key cache, the sweep of lapsed task claims writes only when a
read finds one, and each reply's ClientApp runtime is summed in memory like the traffic counters
(`superlink_sql`). Every SuperNode
polls, idle or not, so on a small machine the SuperLink's CPU per request was what a round with
ten hospitals waited for (docs/benchmarks/flower.md).
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from federated.runtime import flwr_internals, superlink_delivery, superlink_routes, superlink_sql
from federated.runtime.settings import RuntimeSettings, disable_phone_home

NO_INSTALL_FLAG = "--disable-runtime-dependency-installation"
#: flwr's sweep of lapsed task claims runs on nearly every request; once per this many seconds
#: is enough (it records a lapsed task; token checks do not depend on it)
TASK_SWEEP_S = 0.5
#: how long a cached run status or node-key lookup may be served at most (every write that may
#: change it ends it at once; this bounds what bypasses the ORM session)
CACHE_MAX_AGE_S = 1.0
#: flwr's per-run traffic counters are written at most this often (and before any read of them)
TRAFFIC_FLUSH_S = 1.0
#: how often the SuperLink's log gets a line of the caches' counts (when they changed)
REPORT_EVERY_S = 30.0
#: a benchmark's file for the requests served so far, by path (JSON, rewritten when they change)
COUNTS_ENV = "EXCHANGE_SUPERLINK_REQUEST_COUNTS"
COUNTS_EVERY_S = 0.2


def write_request_counts(path: Path) -> None:
    """Count the SuperLink's requests by path into `path` (a measurement aid: `bench_secagg`
    reads it at every round to report requests per round)."""
    counts = flwr_internals.patch_superlink_request_counter()
    superlink_delivery.count_unavailable_object_pulls(counts)

    def write() -> None:
        last: dict[str, int] = {}
        while True:
            time.sleep(COUNTS_EVERY_S)
            now = dict(counts)
            if now != last:
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(now))
                tmp.replace(path)  # atomic: a reader never sees half a file
                last = now

    threading.Thread(target=write, name="exchange-request-counts", daemon=True).start()


def apply_superlink_patches(settings: RuntimeSettings) -> None:
    """The fast mode's SuperLink patches (this process must be the SuperLink's, before its app)."""
    flwr_internals.patch_superlink_middleware()
    flwr_internals.patch_superlink_idle_pulls(settings.superlink_idle_recheck,
                                              hold_s=settings.superlink_long_poll,
                                              max_held=settings.superlink_long_poll_max)
    if settings.superlink_deliver_complete:
        superlink_delivery.patch_superlink_delivery(flwr_internals.wake_receiver)
    superlink_sql.patch_superlink_task_sweep_reads_first()  # before the throttle, which wraps it
    flwr_internals.patch_superlink_task_sweep(TASK_SWEEP_S)
    flwr_internals.patch_superlink_store_object_busy()
    flwr_internals.patch_superlink_push_one_transaction()
    superlink_routes.patch_superlink_routes()
    superlink_routes.patch_superlink_object_claim()
    statuses = flwr_internals.patch_superlink_run_status_cache(CACHE_MAX_AGE_S)
    nodes = flwr_internals.patch_superlink_node_key_cache(CACHE_MAX_AGE_S)
    superlink_sql.patch_superlink_heartbeat_keeps_node_keys()
    tokens = flwr_internals.patch_superlink_task_token_cache(CACHE_MAX_AGE_S)
    traffic = flwr_internals.patch_superlink_traffic_batching(TRAFFIC_FLUSH_S)
    superlink_sql.patch_superlink_runtime_batching(TRAFFIC_FLUSH_S)  # the same row's other counter

    def report() -> None:  # what the caches saved, in the SuperLink's log while it is busy
        last = None
        while True:
            time.sleep(REPORT_EVERY_S)
            now = (statuses.hits, statuses.misses, nodes.hits, nodes.misses, tokens.hits, tokens.misses,
                   traffic.writes)
            if now != last:
                print(f"[exchange] superlink caches: run status {now[0]} hits / {now[1]} reads, node keys "
                      f"{now[2]} / {now[3]}, task tokens {now[4]} / {now[5]}, traffic counters written "
                      f"{now[6]} times", file=sys.stderr, flush=True)
                last = now

    threading.Thread(target=report, name="exchange-cache-report", daemon=True).start()


def main() -> None:
    disable_phone_home()
    if "--allow-runtime-dependency-installation" in sys.argv[1:]:
        raise SystemExit("superlink: runtime dependency installation is never allowed here")
    if NO_INSTALL_FLAG not in sys.argv[1:]:
        sys.argv.append(NO_INSTALL_FLAG)
    default = RuntimeSettings()
    settings = RuntimeSettings(
        mode=os.environ.get("EXCHANGE_FLOWER_MODE", default.mode),  # type: ignore[arg-type]
        superlink_idle_recheck=float(os.environ.get("EXCHANGE_SUPERLINK_IDLE_RECHECK",
                                                    default.superlink_idle_recheck)),
        superlink_long_poll=float(os.environ.get("EXCHANGE_SUPERLINK_LONG_POLL",
                                                 default.superlink_long_poll)),
        superlink_long_poll_max=int(os.environ.get("EXCHANGE_SUPERLINK_LONG_POLL_MAX",
                                                   default.superlink_long_poll_max)),
        superlink_deliver_complete=os.environ.get(
            "EXCHANGE_SUPERLINK_DELIVER_COMPLETE", "1" if default.superlink_deliver_complete else "0") != "0",
        superlink_patches=os.environ.get("EXCHANGE_SUPERLINK_PATCHES", "1") != "0")
    if settings.mode == "fast" and settings.superlink_patches:
        apply_superlink_patches(settings)
        print(f"[exchange] superlink patches: path-scoped middleware, idle polls answered early "
              f"(full poll per node every {settings.superlink_idle_recheck} s; held up to "
              f"{settings.superlink_long_poll} s, {settings.superlink_long_poll_max} at most), "
              f"task sweep throttled, "
              f"run statuses, node keys and task tokens cached, traffic counters batched, object pushes "
              f"on a busy database retried, a push's messages stored in one transaction, hot routes "
              f"answered outside FastAPI's layers, an object push's claim in one statement, node keys kept "
              f"across heartbeats, the task sweep read first, ClientApp runtimes batched; a message "
              f"handed out once its objects are all pushed: {settings.superlink_deliver_complete}",
              file=sys.stderr, flush=True)
    if os.environ.get(COUNTS_ENV):
        write_request_counts(Path(os.environ[COUNTS_ENV]))
    sys.argv[0] = "flower-superlink"
    flwr_internals.flower_superlink_main()


if __name__ == "__main__":
    main()
