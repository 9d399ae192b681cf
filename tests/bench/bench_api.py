"""Coordinator API throughput and latency vs a bare Litestar endpoint of the same shape.

    .venv/bin/python -m tests.bench.bench_api [--quick] [--seconds S] [--connections 32]

Three uvicorn servers (one process each, loopback) under a raw asyncio-stream load client with
`--connections` concurrent requests; bare and coordinator runs alternate in short slices so that
the machine's load drift affects all alike:
- bare GET  /v1/studies/{id}: a Litestar app whose handler reads the same study JSON from a row
  in the same kind of SQLite database (one SELECT), no auth, no validation, no middleware; a
  plain sync handler (`sync_to_thread=True`: on a worker thread). The target's baseline.
- bare-loop GET: the same read from an async handler, on the event loop, as the coordinator's
  GET does on SQLite since session 3. Reported for reference (the stricter comparison);
- coordinator GET /v1/studies/{id}: the real app (API-key auth, role and organisation checks,
  decisions and round counts, rate-limit/metrics/access-log middleware, response model);
- bare POST /v1/studies: parses the body and INSERTs one row in a durable write transaction
  (BEGIN IMMEDIATE, synchronous=FULL), answers 201 with the same shape;
- coordinator POST /v1/studies: the real submission (every validation rule, budget check, study
  row, escrow, two signed audit entries with Merkle nodes in the same transaction).
The load generator is a raw asyncio-stream HTTP/1.1 client (see `_load`).
Printed: requests/s, p50 and p99 latency, and the coordinator's ratio to the bare endpoint in
the same run. Targets: >= 0.7x the bare throughput, p99 < 100 ms at 32 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from litestar import Litestar, Response, get, post

STUDY = {"title": "Benchmark study", "purpose": "DUO:0000042", "commercial": False,
         "ethics_approval": True, "data_categories": ["labs"], "columns": {"labs": ["a", "b", "c"]},
         "template": "logistic_regression", "task": "binary", "label": "label", "epsilon": 3.0,
         "delta": 1e-5, "rounds": 3, "min_hospitals": 2, "token_budget": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---------------------------------------------------------------- servers (child processes)
def serve_coordinator(directory: Path, port: int) -> None:
    import uvicorn

    from exchange.coordinator.app import build_runtime, create_app
    from exchange.logging import configure_logging
    from tests.exchange.scripted_runner import ScriptedRunner

    # As `exchange serve` does: JSON log lines (structlog's unconfigured default is the
    # console renderer, several times dearer per access-log line).
    configure_logging("INFO", json_format=True)
    runtime = build_runtime(_config(directory), ScriptedRunner(hospital_keys={}))
    uvicorn.run(create_app(runtime), host="127.0.0.1", port=port, log_level="error", access_log=False)


def _config(directory: Path) -> Any:
    from exchange.coordinator.app import AppConfig

    return AppConfig(database_url=f"sqlite:///{directory / 'coordinator.db'}",
                     operator_key_file=directory / "operator.key", log_key_file=directory / "log.key",
                     coordinator_key_file=directory / "coordinator.key",
                     rate_limit_per_minute=10_000_000, access_log=True)


def serve_bare(directory: Path, port: int, on_loop: bool = False) -> None:
    """The baseline: same framework, same database kind and durability, nothing else.

    `on_loop`: GET as an async handler reading on the event loop (as the coordinator's GET
    does on SQLite since session 3) instead of a sync handler on a worker thread."""
    import uvicorn
    from sqlalchemy import JSON, Column, MetaData, String, Table, insert, select

    from exchange.coordinator.app import SQLITE_READ_POOL, _write_engine
    from exchange.db.engine import make_engine

    url = f"sqlite:///{directory / ('bare-loop.db' if on_loop else 'bare.db')}"
    metadata = MetaData()
    table = Table("bare_studies", metadata, Column("id", String(64), primary_key=True), Column("body", JSON))
    read, write = make_engine(url, **SQLITE_READ_POOL), _write_engine(url)  # same pools as the app
    metadata.create_all(read)
    template = json.loads((directory / "study.json").read_text())
    with write.begin() as connection:
        connection.execute(insert(table).values(id=template["id"], body=template))
    counter = iter(range(10**12))

    def read_study(study_id: str) -> Response[Any]:
        with read.connect() as connection:
            body = connection.execute(select(table.c.body).where(table.c.id == study_id)).scalar_one()
        return Response(body)

    @get("/v1/studies/{study_id:str}", sync_to_thread=True)
    def get_study(study_id: str) -> Response[Any]:
        return read_study(study_id)

    @get("/v1/studies/{study_id:str}")
    async def get_study_on_loop(study_id: str) -> Response[Any]:
        return read_study(study_id)

    @post("/v1/studies", sync_to_thread=True, status_code=201)
    def post_study(data: dict[str, Any]) -> dict[str, Any]:
        body = {**template, "id": f"bare-{next(counter)}", "spec": data}
        with write.begin() as connection:
            connection.execute(insert(table).values(id=body["id"], body=body))
        return body

    uvicorn.run(Litestar([get_study_on_loop if on_loop else get_study, post_study]), host="127.0.0.1",
                port=port, log_level="error", access_log=False)


# ---------------------------------------------------------------- load
def _request_bytes(base: str, path: str, method: str, headers: dict[str, str],
                   body: dict[str, Any] | None) -> bytes:
    """One HTTP/1.1 keep-alive request, encoded once and sent unchanged on every iteration."""
    host = base.removeprefix("http://")
    payload = b"" if body is None else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1", f"host: {host}", "accept: */*"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if body is not None:
        lines += ["content-type: application/json", f"content-length: {len(payload)}"]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + payload


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> int:
    """Send `request`, read one Content-Length response; its status code."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
        elif name.strip().lower() == b"transfer-encoding":
            raise RuntimeError("chunked responses are not expected here")
    await reader.readexactly(length)
    return status


async def _load(base: str, path: str, method: str, headers: dict[str, str], body: dict[str, Any] | None,
                seconds: float, connections: int) -> dict[str, Any]:
    """`connections` keep-alive connections sending back-to-back requests for `seconds`.

    A raw asyncio-stream client (one pre-encoded request, a minimal response parser) rather
    than httpx: on a 2-core machine the load generator shares the CPU with the server under
    test, and httpx spent about as much CPU per request as the bare server did, so it capped
    both servers alike (GET measured 0.99x only because both hit the client's ceiling)."""
    latencies: list[float] = []
    errors = 0
    request = _request_bytes(base, path, method, headers, body)
    host, port = base.removeprefix("http://").split(":")
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            while time.perf_counter() < deadline:
                start = time.perf_counter()
                status = await _exchange(reader, writer, request)
                latencies.append(time.perf_counter() - start)
                if status >= 300:
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(connections)))
    elapsed = time.perf_counter() - started
    return {"latencies": latencies, "errors": errors, "elapsed": elapsed}


def _summary(slices: list[dict[str, Any]]) -> dict[str, float]:
    latencies = sorted(x for s in slices for x in s["latencies"])
    n = len(latencies)
    elapsed = sum(s["elapsed"] for s in slices)
    return {"requests": n, "errors": sum(s["errors"] for s in slices), "rps": n / elapsed,
            "p50_ms": 1000 * latencies[n // 2], "p99_ms": 1000 * latencies[min(n - 1, int(n * 0.99))]}


def _start(kind: str, directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.bench.bench_api", f"--serve-{kind}",
                             str(directory), str(port)],
                            env={**os.environ, "EXCHANGE_LOGGING__LEVEL": "WARNING"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            httpx.get(base + "/v1/studies/none", timeout=1)
            return proc, base
        except httpx.TransportError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{kind} server did not start")


def _prepare(directory: Path) -> tuple[str, str]:
    """A coordinator database with a researcher, a funded organisation and one study."""
    from audit.signing import Signer
    from exchange.coordinator.app import build_runtime
    from exchange.coordinator.registry import Principal
    from exchange.coordinator.schemas import (
        ApiKeyCreate,
        HospitalCreate,
        OrganisationCreate,
        ResearcherCreate,
        StudyCreate,
        StudyOut,
    )
    from tests.exchange.conftest import flower_key
    from tests.exchange.scripted_runner import ScriptedRunner

    runtime = build_runtime(_config(directory), ScriptedRunner(hospital_keys={}))
    c = runtime.lifecycle
    c.registry.create_organisation(OrganisationCreate(id="acme", name="Acme", region="DE"))
    # Submission checks feasibility: the study's min_hospitals must be registered (hospitals
    # without a published catalog might serve it).
    c.registry.create_organisation(OrganisationCreate(id="clinics", name="Clinics", region="DE"))
    for name in ("h-one", "h-two"):
        c.registry.register_hospital(HospitalCreate(
            id=name, organisation_id="clinics", name=name.upper(),
            signing_public_key=Signer.generate().public_key_b64, flower_public_key=flower_key()))
    c.registry.create_researcher("acme", ResearcherCreate(id="alice", name="Alice"))
    _key, token = c.registry.issue_api_key(ApiKeyCreate(role="researcher", organisation_id="acme",
                                               researcher_id="alice"))
    c.registry.mint("org:acme", 2**50)
    principal = c.registry.authenticate_api_key(token)
    assert isinstance(principal, Principal)
    study = c.submit_study(principal, StudyCreate.model_validate(STUDY))
    body = c.get_study(principal, study.id)
    # POST answers from the row it wrote (StudyLifecycle.submitted_view) instead of reading it back:
    # it must be exactly what a read answers.
    if (StudyOut.model_validate(c.submitted_view(study)).model_dump_json()
            != StudyOut.model_validate(body).model_dump_json()):
        raise RuntimeError("submitted_view differs from get_study for a new study")
    runtime.close()
    (directory / "study.json").write_text(json.dumps(body, default=str))
    return token, study.id


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 s per run instead of 10")
    parser.add_argument("--seconds", type=float, default=None)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--serve-coordinator", nargs=2, metavar=("DIR", "PORT"))
    parser.add_argument("--serve-bare", nargs=2, metavar=("DIR", "PORT"))
    parser.add_argument("--serve-bare-loop", nargs=2, metavar=("DIR", "PORT"))
    args = parser.parse_args()
    if args.serve_coordinator:
        serve_coordinator(Path(args.serve_coordinator[0]), int(args.serve_coordinator[1]))
        return
    if args.serve_bare:
        serve_bare(Path(args.serve_bare[0]), int(args.serve_bare[1]))
        return
    if args.serve_bare_loop:
        serve_bare(Path(args.serve_bare_loop[0]), int(args.serve_bare_loop[1]), on_loop=True)
        return
    seconds = args.seconds or (3.0 if args.quick else 10.0)
    results: dict[str, dict[str, float]] = {}
    slices = 4  # bare and coordinator alternate in short slices: load drift hits both alike
    raw: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        token, study_id = _prepare(directory)
        servers = {kind: _start(kind, directory) for kind in ("bare", "bare-loop", "coordinator")}
        headers = {"bare": {}, "bare-loop": {}, "coordinator": {"Authorization": f"Bearer {token}"}}
        try:
            for kind, (_proc, base) in servers.items():  # warm up both paths of every server
                asyncio.run(_load(base, f"/v1/studies/{study_id}", "GET", headers[kind], None, 1.0, 4))
                asyncio.run(_load(base, "/v1/studies", "POST", headers[kind], STUDY, 1.0, 4))
            for method in ("GET", "POST"):
                for _ in range(slices):
                    for kind, (_proc, base) in servers.items():
                        if kind == "bare-loop" and method == "POST":
                            continue  # the same POST as "bare": only its GET differs
                        path = f"/v1/studies/{study_id}" if method == "GET" else "/v1/studies"
                        raw.setdefault(f"{kind} {method}", []).append(asyncio.run(_load(
                            base, path, method, headers[kind], STUDY if method == "POST" else None,
                            seconds / slices, args.connections)))
        finally:
            for proc, _base in servers.values():
                proc.terminate()
                proc.wait(30)
    results = {name: _summary(parts) for name, parts in sorted(raw.items())}
    print(f"{args.connections} connections, {seconds:.0f} s per run in {slices} alternating slices, "
          f"uvicorn (1 process each) on loopback")
    print(f"{'run':<18}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}")
    for name, r in results.items():
        print(f"{name:<18}{r['rps']:>9.1f}{r['p50_ms']:>9.1f}{r['p99_ms']:>9.1f}{r['errors']:>8.0f}")
    for method in ("GET", "POST"):
        ours, bare = results[f"coordinator {method}"], results[f"bare {method}"]
        ratio = ours["rps"] / bare["rps"]
        print(f"{method}: coordinator/bare throughput {ratio:.2f}x (target >= 0.70: "
              f"{'met' if ratio >= 0.7 else 'NOT met'}); p99 {ours['p99_ms']:.1f} ms "
              f"(target < 100: {'met' if ours['p99_ms'] < 100 else 'NOT met'})")
    strict = results["coordinator GET"]["rps"] / results["bare-loop GET"]["rps"]
    print(f"GET vs a bare endpoint reading on the event loop (as the coordinator now does): "
          f"{strict:.2f}x (reported, not the target's baseline)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
