"""Start and stop the Flower processes: a SuperLink, and per hospital a SuperNode and its executor.

Used by the integration tests, the benchmark and the node daemon. Every process gets the
no-telemetry environment and its own FLWR_HOME, writes its output to a log file (named in every
error), and is stopped by `stop()` / the context manager, SIGTERM first, SIGKILL after a grace
period, even when a test fails half-way.

Security rule: TLS (and SuperNode authentication) may be off only when the SuperLink listens on a
loopback address; `SuperLinkProcess` refuses anything else.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from federated.runtime.flwr_internals import ControlApi
from federated.runtime.settings import RuntimeSettings, flower_env
from federated.runtime.tls import NodeKeys, TlsFiles, register_supernode

NodeConfigValue = str | int | float | bool
#: What the executor logs once it polls (federated.runtime.executor.main).
READY_LINE = "warm executor ready"
#: The environment variable naming a file the hosted SuperNode touches after each node heartbeat
#: the SuperLink accepted (`hosted_supernode`; the node daemon's supervisor watches it).
LIVENESS_FILE_ENV = "EXCHANGE_SUPERNODE_LIVENESS_FILE"
T = TypeVar("T")


class DeploymentError(RuntimeError):
    """A Flower process did not start or misbehaved; the message names its log file."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago (the kernel picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


@dataclass
class ManagedProcess:
    """A child process we started, with its log file."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def terminate(self, grace: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after `grace` seconds; returns the exit code."""
        if self.alive():
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)
        return self.popen.returncode

    def kill(self) -> None:
        """SIGKILL: what a crash looks like to the rest of the federation."""
        if self.alive():
            self.popen.kill()
            self.popen.wait(timeout=10)


def _die_with_parent_fn() -> Any:
    """Linux: a pre-exec hook that makes the child get SIGTERM when the thread that started it
    dies (even by SIGKILL), so a crashed test run or bench never leaves SuperLinks and SuperNodes
    holding ports. libc is loaded here, in the parent: the hook itself only makes one system call
    (no imports, no locks), which is what makes `preexec_fn` safe enough with threads around.

    Linux ties PR_SET_PDEATHSIG to the *thread* that forked the child, not the process: that is
    why every child is forked by `_Launcher`'s thread, which lives as long as the process."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    pr_set_pdeathsig, sigterm = 1, int(signal.SIGTERM)
    return lambda: prctl(pr_set_pdeathsig, sigterm)


class _Launcher:
    """One daemon thread per process that forks every child (`_spawn`).

    Why: the parent-death signal fires when the *forking thread* ends. Spawning from whatever
    thread called `start()` (a coordinator's worker thread, a test's helper thread) killed the
    SuperLink as soon as that thread returned. This thread never returns (daemon, blocked on its
    queue), so a child lives exactly as long as our process: it gets SIGTERM when the process
    exits or is killed, and not before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._pid = 0

    def _loop(self) -> None:
        while True:
            job, future = self._jobs.get()
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(job())
                except BaseException as exc:  # handed to the caller, which re-raises it
                    future.set_exception(exc)

    def call(self, job: Callable[[], T]) -> T:
        """Run `job` on the launcher thread and return its result (or raise its exception)."""
        with self._lock:
            # after os.fork() the child process has no launcher thread: start a new one
            if self._thread is None or not self._thread.is_alive() or self._pid != os.getpid():
                self._jobs = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._loop, name="flower-launcher", daemon=True)
                self._thread.start()
                self._pid = os.getpid()
        future: Future[T] = Future()
        self._jobs.put((job, future))
        return future.result()


_launcher = _Launcher()


def _spawn(name: str, args: list[str], log_path: Path, env: dict[str, str]) -> ManagedProcess:
    """Start a child from the process-long launcher thread (see `_Launcher`: the parent-death
    signal follows the forking thread), so any thread may call this."""
    log_path.parent.mkdir(parents=True, exist_ok=True)

    def fork() -> subprocess.Popen[bytes]:
        with log_path.open("ab") as log_file:
            return subprocess.Popen(args, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent_fn())  # noqa: PLW1509 (see above)

    return ManagedProcess(name, _launcher.call(fork), log_path)


def _wait_port(proc: ManagedProcess, host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode} before listening "
                                  f"on {host}:{port}; log {proc.log_path}:\n{proc.log_tail()}")
        if _port_open(host, port):
            return
        time.sleep(0.1)
    raise DeploymentError(f"{proc.name} did not listen on {host}:{port} within {timeout:.0f} s; "
                          f"log {proc.log_path}:\n{proc.log_tail()}")


def write_node_config(path: Path, config: Mapping[str, NodeConfigValue]) -> Path:
    """Write a SuperNode `--node-config` TOML file (flat keys; strings JSON-escaped, which TOML
    basic strings accept)."""
    lines = []
    for key, value in config.items():
        if not key or any(c in key for c in " .=\"'"):
            raise ValueError(f"node config key {key!r}: must be non-empty, no spaces, dots, quotes or '='")
        if isinstance(value, bool):
            rendered = "true" if value else "false"
        elif isinstance(value, int | float):
            rendered = repr(value)
        elif isinstance(value, str):
            rendered = json.dumps(value)
        else:
            raise ValueError(f"node config {key}: must be str, int, float or bool, "
                             f"got {type(value).__name__}")
        lines.append(f"{key} = {rendered}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


class SuperLinkProcess:
    """`flower-superlink --isolation process` (the coordinator runs ServerApps itself)."""

    def __init__(self, workdir: Path, *, host: str = "127.0.0.1", port: int | None = None,
                 tls: TlsFiles | None = None, supernode_auth: bool = False,
                 settings: RuntimeSettings | None = None) -> None:
        if tls is None and not is_loopback(host):
            raise ValueError(f"tls: required when the SuperLink listens on {host!r} (not loopback)")
        if supernode_auth and tls is None:
            raise ValueError("supernode_auth: needs TLS (node signatures over plain HTTP protect nothing)")
        self.workdir = workdir
        self.host = host
        self.port = port or free_port(host if host not in ("", "::") else "0.0.0.0")
        self.tls = tls
        self.supernode_auth = supernode_auth
        self.settings = settings or RuntimeSettings()
        self.proc: ManagedProcess | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def insecure(self) -> bool:
        return self.tls is None

    def root_certificates(self) -> bytes | None:
        return None if self.tls is None else self.tls.root_certificates()

    def start(self, timeout: float = 60.0) -> None:
        args = [sys.executable, "-m", "federated.runtime.superlink_main", "--isolation", "process",
                "--host", self.host, "--port", str(self.port),
                "--database", str(self.workdir / "superlink.db"),
                "--disable-runtime-dependency-installation"]
        if self.tls is None:
            args.append("--insecure")
        else:
            args += ["--ssl-ca-certfile", str(self.tls.ca_cert), "--ssl-certfile", str(self.tls.server_cert),
                     "--ssl-keyfile", str(self.tls.server_key)]
        if self.supernode_auth:
            args.append("--enable-supernode-auth")
        env = flower_env(self.workdir / "flwr-home-superlink")
        env.update({"EXCHANGE_FLOWER_MODE": self.settings.mode,
                    "EXCHANGE_SUPERLINK_IDLE_RECHECK": str(self.settings.superlink_idle_recheck),
                    "EXCHANGE_SUPERLINK_LONG_POLL": str(self.settings.superlink_long_poll),
                    "EXCHANGE_SUPERLINK_LONG_POLL_MAX": str(self.settings.superlink_long_poll_max),
                    "EXCHANGE_SUPERLINK_DELIVER_COMPLETE":
                        "1" if self.settings.superlink_deliver_complete else "0",
                    "EXCHANGE_SUPERLINK_PATCHES": "1" if self.settings.superlink_patches else "0"})
        self.proc = _spawn("superlink", args, self.workdir / "superlink.log", env)
        wildcard = self.host in ("0.0.0.0", "::", "")
        _wait_port(self.proc, "127.0.0.1" if wildcard else self.host, self.port, timeout)

    def control_client(self) -> ControlApi:
        return ControlApi(self.address, insecure=self.insecure, root_certificates=self.root_certificates())

    def online_node_ids(self) -> list[int]:
        """Node ids the SuperLink currently counts as online."""
        with self.control_client() as client:
            return client.online_node_ids()

    def wait_for_nodes(self, count: int, timeout: float = 90.0,
                       watch: Sequence[ManagedProcess] = ()) -> list[int]:
        """Wait until `count` SuperNodes are online; fail at once if one of `watch` exits."""
        deadline = time.monotonic() + timeout
        online: list[int] = []
        while time.monotonic() < deadline:
            for proc in [p for p in (self.proc, *watch) if p is not None]:
                if not proc.alive():
                    raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode}; "
                                          f"log {proc.log_path}:\n{proc.log_tail()}")
            with contextlib.suppress(Exception):
                online = self.online_node_ids()
                if len(online) >= count:
                    return online
            time.sleep(0.25)
        raise DeploymentError(f"only {len(online)} of {count} SuperNodes online after {timeout:.0f} s")

    def register_node(self, keys: NodeKeys, name: str | None = None) -> int:
        with self.control_client() as client:
            return register_supernode(client, keys.public_key, name=name)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()


@dataclass
class HospitalNodeProcess:
    """One hospital's SuperNode and (fast mode) its warm executor.

    `hosted` (fast mode, the default): ONE process, `federated.runtime.hosted_supernode`, the
    layout the node daemon runs (the executor a thread of the SuperNode's process, woken when a
    task is stored instead of polling). Otherwise two processes: `supernode_main` and a separate
    `executor` polling the SuperNode's runtime API (`hosted=False`)."""

    name: str
    superlink: SuperLinkProcess
    node_config: Mapping[str, NodeConfigValue]
    workdir: Path
    settings: RuntimeSettings = field(default_factory=RuntimeSettings)
    auth_keys: NodeKeys | None = None
    supernode: ManagedProcess | None = None
    executor: ManagedProcess | None = None
    runtime_port: int = 0
    hosted: bool = True
    #: where this start's lines begin in the (appended) log that carries the ready line
    _ready_offset: int = field(default=0, init=False, repr=False)

    @property
    def is_hosted(self) -> bool:
        return self.hosted and self.settings.mode == "fast"

    def start(self, timeout: float = 60.0) -> None:
        """Start the processes. Split layout: waits for the SuperNode's runtime API (`timeout`)
        before starting the executor. Hosted: returns at once (its ready line comes after the
        ClientApp's imports, before the SuperNode starts: `wait_ready`)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.runtime_port = free_port()
        config_path = write_node_config(self.workdir / "node-config.toml", self.node_config)
        fast = self.settings.mode == "fast"
        module = f"federated.runtime.{'hosted_supernode' if self.is_hosted else 'supernode_main'}"
        args = [sys.executable, "-m", module,
                "--superlink", self.superlink.address,
                "--host", "127.0.0.1", "--port", str(self.runtime_port),
                "--node-config", str(config_path), "--isolation", "process" if fast else "subprocess"]
        if self.superlink.tls is None:
            args.append("--insecure")
        else:
            args += ["--root-certificates", str(self.superlink.tls.ca_cert)]
        if self.auth_keys is not None:
            args += ["--auth-supernode-private-key", str(self.auth_keys.private_key)]
        env = flower_env(self.workdir / "flwr-home")
        env.update({
            "EXCHANGE_FLOWER_MODE": self.settings.mode,
            "EXCHANGE_SUPERNODE_IDLE_SLEEP": str(self.settings.supernode_idle_sleep),
            "EXCHANGE_SUPERNODE_IDLE_SLEEP_MAX": str(self.settings.supernode_idle_sleep_max),
            "EXCHANGE_SUPERNODE_HOT_S": str(self.settings.supernode_hot_s),
            "EXCHANGE_SUPERNODE_FOLLOW_UP_SLEEP": str(self.settings.supernode_follow_up_sleep),
            "EXCHANGE_SUPERNODE_FOLLOW_UP_S": str(self.settings.supernode_follow_up_s),
            "EXCHANGE_SUPERNODE_REPLY_SLEEP": str(self.settings.supernode_reply_sleep),
            "EXCHANGE_PULL_BACKOFF": str(self.settings.pull_backoff),
            "EXCHANGE_SUPERNODE_HEARTBEAT": str(self.settings.supernode_heartbeat),
            "EXCHANGE_EXECUTOR_POLL": str(self.settings.executor_poll),
            "EXCHANGE_EXECUTOR_POLL_MAX": str(self.settings.executor_poll_max),
            "EXCHANGE_EXECUTOR_IN_PROCESS": "1" if self.settings.executor_in_process else "0",
        })
        log_path = self.workdir / ("supernode.log" if self.is_hosted else "executor.log")
        self._ready_offset = log_path.stat().st_size if log_path.exists() else 0
        self.supernode = _spawn(f"supernode-{self.name}", args, self.workdir / "supernode.log", env)
        if self.is_hosted:
            return
        _wait_port(self.supernode, "127.0.0.1", self.runtime_port, timeout)
        if fast:
            exec_args = [sys.executable, "-m", "federated.runtime.executor", "--runtime-api-address",
                         f"127.0.0.1:{self.runtime_port}", "--poll", str(self.settings.executor_poll),
                         "--poll-max", str(self.settings.executor_poll_max),
                         "--pull-backoff", str(self.settings.pull_backoff)]
            self.executor = _spawn(f"executor-{self.name}", exec_args, self.workdir / "executor.log", env)

    def processes(self) -> list[ManagedProcess]:
        return [p for p in (self.executor, self.supernode) if p is not None]

    def wait_ready(self, timeout: float = 120.0) -> None:
        """Wait until the executor has imported everything (torch, our ClientApp) and takes tasks
        (its ready line, written by this start: the log is appended to across restarts), and, when
        hosted, until the SuperNode's runtime API listens: a message that arrives earlier waits for
        the import, which would count against round 1."""
        proc = self.supernode if self.is_hosted else self.executor
        if proc is None:
            return
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise DeploymentError(f"{proc.name} exited with code {proc.popen.returncode}; "
                                      f"log {proc.log_path}:\n{proc.log_tail()}")
            try:
                with proc.log_path.open("rb") as log_file:
                    log_file.seek(self._ready_offset)
                    ready = READY_LINE.encode() in log_file.read()
            except OSError:
                ready = False
            if ready:
                if self.is_hosted:
                    _wait_port(proc, "127.0.0.1", self.runtime_port, max(1.0, deadline - time.monotonic()))
                return
            time.sleep(0.1)
        raise DeploymentError(f"{proc.name} not ready after {timeout:.0f} s; log "
                              f"{proc.log_path}:\n{proc.log_tail()}")

    def kill(self) -> None:
        """SIGKILL the SuperNode and the executor: a crashed hospital."""
        for proc in self.processes():
            proc.kill()

    def stop(self) -> None:
        for proc in self.processes():
            proc.terminate()


class LocalFederation:
    """A SuperLink and N hospital nodes on this machine; a context manager that always cleans up."""

    def __init__(self, workdir: Path, node_configs: Mapping[str, Mapping[str, NodeConfigValue]], *,
                 settings: RuntimeSettings | None = None, tls: TlsFiles | None = None,
                 supernode_auth: bool = False, node_keys: Mapping[str, NodeKeys] | None = None,
                 hosted: bool = True) -> None:
        """`hosted`: each hospital one process as the node daemon runs it (`HospitalNodeProcess`);
        False: a SuperNode and a separate executor process per hospital."""
        self.workdir = workdir
        self.settings = settings or RuntimeSettings()
        self.superlink = SuperLinkProcess(workdir / "superlink", tls=tls, supernode_auth=supernode_auth,
                                          settings=self.settings)
        self.nodes: dict[str, HospitalNodeProcess] = {
            name: HospitalNodeProcess(name, self.superlink, config, workdir / f"node-{name}", self.settings,
                                      (node_keys or {}).get(name), hosted=hosted)
            for name, config in node_configs.items()
        }

    def start(self, timeout: float = 90.0) -> None:
        try:
            self.superlink.workdir.mkdir(parents=True, exist_ok=True)
            self.superlink.start()
            for name, node in self.nodes.items():
                if node.auth_keys is not None:
                    self.superlink.register_node(node.auth_keys, name=name)
                node.start()
            for node in self.nodes.values():
                node.wait_ready(timeout)
            self.superlink.wait_for_nodes(len(self.nodes), timeout=timeout,
                                          watch=[p for node in self.nodes.values() for p in node.processes()])
        except BaseException:
            self.stop()
            raise

    def processes(self) -> Iterator[ManagedProcess]:
        for node in self.nodes.values():
            yield from node.processes()
        if self.superlink.proc is not None:
            yield self.superlink.proc

    def stop(self) -> None:
        for node in self.nodes.values():
            with contextlib.suppress(Exception):
                node.stop()
        with contextlib.suppress(Exception):
            self.superlink.stop()

    def __enter__(self) -> LocalFederation:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
