"""A hospital's Flower side in ONE process: `flower-supernode` with the warm executor in a thread.

``python -m federated.runtime.hosted_supernode ARGS`` takes exactly `flower-supernode`'s
arguments (with ``--isolation process --host H --port P``: the executor polls that runtime API)
and the environment of `supernode_main` (Flower mode and sleeps).

Why one process (issue "Scale": memory per hospital): the SuperNode and the executor were two
interpreters that each imported flwr, gRPC, protobuf, numpy and cryptography; the SuperNode alone
took ~145 MB RSS for that (docs/benchmarks/scale.md). Here the SuperNode's loop runs on the main
thread (flwr registers its SIGTERM/SIGINT handlers there, and `flwr_exit` ends the process,
executor and all, so the node's supervisor restarts both together and still reads Flower's exit
code from the log) and the executor (`federated.runtime.executor.WarmExecutor`) takes ClientApp
tasks from the SuperNode's runtime API, on a daemon thread (in fast mode through its handlers in
the process, below; else over loopback HTTP).

Order: the ClientApp (our training code: NumPy's DP-SGD engine, `federated.numpy_dp`; torch is
not imported here unless a round asks for the "opacus" engine) is imported, the rest of a first round's
warm-up done (`executor.prewarm`: the privacy accountants, this site's records and verified
consent contracts) and the executor thread started BEFORE the SuperNode connects to the
SuperLink, so a run's first message waits for none of it; the ready line
(`deployment.READY_LINE`) is logged then.

In fast mode the executor does not poll the runtime API: the SuperNode's loop sets an Event
when it has stored a message and its task (`flwr_internals.on_supernode_message`), and the
executor thread claims the task at once (a poll every `executor_poll_max` stays as a safety
net). Polling cost the SuperNode and the executor a request every 0.05 s each, idle or not
(docs/benchmarks/flower.md, "Polling"). And in fast mode (`RuntimeSettings.executor_in_process`)
the executor's claims and task calls go to the SuperNode's Runtime API handlers in this process
(`flwr_internals.InProcessRuntimeClient`), not over loopback HTTP: the two share one process, so
that HTTP was no boundary, only cost (docs/flower.md, "The warm executor's Runtime API calls").
The SuperNode's Runtime API still listens (flwr serves it), unused by this executor.

Liveness: with `EXCHANGE_SUPERNODE_LIVENESS_FILE` set, each node heartbeat the SuperLink accepted
touches that file (`flwr_internals.on_supernode_heartbeat`); the node daemon's supervisor restarts
this process when the file has not been touched for `supernode.restart_offline_s`: alive but not
online (docs/flower.md, "A SuperNode alive but offline").

The allocator and thread-pool settings every hospital process gets are in `process_limits`, as
is the one library this process refuses to import (`refuse_imports`: pyarrow's optional pandas).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import sys
import threading
from pathlib import Path

from federated.runtime import flwr_internals
from federated.runtime.deployment import LIVENESS_FILE_ENV
from federated.runtime.executor import WarmExecutor, prewarm
from federated.runtime.process_limits import limit_threads, refuse_imports
from federated.runtime.settings import disable_phone_home
from federated.runtime.supernode_main import apply_supernode_patches, settings_from_env

log = logging.getLogger("federated.executor")


def touch(path: Path) -> None:
    """Set `path`'s modification time to now (creating it): "online a moment ago"."""
    try:
        path.touch()
    except OSError as exc:  # a full or read-only disk must not end the heartbeat thread
        log.warning("liveness file %s: %s", path, exc)


def parse_args(argv: list[str]) -> tuple[str, Path | None]:
    """From `flower-supernode`'s own arguments: the runtime API it will serve (`--host`, `--port`)
    and its `--node-config` file (this hospital's site, if it is a file)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--isolation", default="subprocess")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9094)
    parser.add_argument("--node-config", default=None)
    known, _rest = parser.parse_known_args(argv)
    if known.isolation != "process":
        raise SystemExit("--isolation: must be 'process' (the executor in this process takes the "
                         f"ClientApp tasks), got {known.isolation!r}")
    host = f"[{known.host}]" if ":" in known.host else known.host
    config = Path(known.node_config) if known.node_config and Path(known.node_config).is_file() else None
    return f"{host}:{known.port}", config


def _configure_logging() -> None:
    """The executor's lines (INFO) on stderr, next to flwr's. Configured before anything else can:
    Opacus calls `logging.basicConfig` at import, which would print every flwr DEBUG line a
    second time through the root logger; flwr keeps its own console handler, so its records do
    not also go up to ours."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per poll otherwise
    logging.getLogger("flwr").propagate = False


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    address, node_config = parse_args(args)
    disable_phone_home()
    limit_threads()
    refuse_imports()
    _configure_logging()
    settings = settings_from_env()
    pull_backoff = float(os.environ.get("EXCHANGE_PULL_BACKOFF", settings.pull_backoff))
    wake = threading.Event() if settings.mode == "fast" else None
    in_process = settings.mode == "fast" and settings.executor_in_process
    if in_process:  # before flwr builds the SuperNode's state (flower_supernode_main)
        flwr_internals.capture_supernode_state()
    executor = WarmExecutor(address, poll=settings.executor_poll, pull_backoff=pull_backoff,
                            node_config_file=node_config, poll_max=settings.executor_poll_max, wake=wake,
                            in_process=in_process)
    for problem in prewarm(node_config):
        log.warning("prewarm: %s (the first round loads it instead)", problem)
    threading.Thread(target=executor.serve, name="warm-executor", daemon=True).start()
    log.info("warm executor ready for %s", address)  # deployment.READY_LINE
    if wake is not None:
        apply_supernode_patches(settings)
        flwr_internals.on_supernode_message(wake.set)
    liveness = os.environ.get(LIVENESS_FILE_ENV)
    if liveness:
        flwr_internals.on_supernode_heartbeat(functools.partial(touch, Path(liveness)))
    sys.argv = ["flower-supernode", *args]
    flwr_internals.flower_supernode_main()


if __name__ == "__main__":
    main()
