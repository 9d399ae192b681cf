"""The coordinator's Litestar application: wiring of database, audit log, keys, runner, routes.

`build_coordinator(config)` opens everything (migrating the database first), and
`create_app(runtime)` makes the ASGI app. Tests build a runtime with a `ScriptedRunner`; the
`exchange serve` command builds one with the real `FederatedRunner`.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import swagger_ui_bundle
from litestar import Litestar, get
from litestar.config.response_cache import ResponseCacheConfig
from litestar.exceptions import HTTPException, ValidationException
from litestar.middleware import DefineMiddleware
from litestar.openapi.config import OpenAPIConfig
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.openapi.spec import Components, SecurityScheme
from litestar.plugins.prometheus import PrometheusController
from litestar.plugins.pydantic import PydanticPlugin
from litestar.static_files import create_static_files_router
from litestar.types import Scope
from prometheus_client import Counter
from sqlalchemy import Connection, Engine, event
from sqlalchemy.engine import make_url

from audit.export import Trust
from audit.signing import Signer
from audit.store import AuditLog, record_trust
from exchange.console import console_router, template_config
from exchange.console.session import IDLE_SECONDS, MAX_AGE_SECONDS
from exchange.coordinator import controllers, problems, vocabulary
from exchange.coordinator.auditing import forget_transactions
from exchange.coordinator.checkpointing import Checkpointing
from exchange.coordinator.deadline_sweep import DeadlineSweep
from exchange.coordinator.journal import Journal
from exchange.coordinator.observability import ObservabilityMiddleware
from exchange.coordinator.rate_limit import FixedWindowRateLimitMiddleware
from exchange.coordinator.registry import Registry, api_key_prefix
from exchange.coordinator.request_text import RequestTextMiddleware
from exchange.db import migrate
from exchange.db.checkpoint import WalCheckpointer, writers_leave_checkpoints_to_a_thread
from exchange.db.engine import make_engine, normalize_url
from exchange.settings import CoordinatorSettings
from exchange.study.lifecycle import StudyLifecycle, Terms
from exchange.study.runners import StudyRunner

STUDY_EVENTS = Counter("exchange_study_events_total", "Study lifecycle events recorded", ["kind"])
API_VERSION = "1.0.0"


@dataclass
class AppConfig:
    """Everything the coordinator app needs; `exchange serve` fills it from CoordinatorSettings."""

    database_url: str
    operator_key_file: Path
    log_key_file: Path
    coordinator_key_file: Path
    log_origin: str = "exchange.local/log"
    max_body_bytes: int = 1_048_576
    rate_limit_per_minute: int = 600
    replay_window_s: int = 300
    forward_bps: int = 3000
    royalties: dict[str, tuple[str, int]] = field(default_factory=dict)
    claim_window_s: int = 365 * 86_400
    unclaimed_rewards_account: str | None = None
    migrate: bool = True
    access_log: bool = True
    # The coordinator signs a checkpoint after this many new entries (0: off) or this many
    # seconds with new entries, and collects the hospitals' cosignatures on it.
    checkpoint_every_entries: int = 1000
    checkpoint_every_s: float = 1.0
    # Console sessions end after this long without a request, and this long after sign-in.
    console_idle_timeout_s: float = IDLE_SECONDS
    console_session_max_s: float = MAX_AGE_SECONDS
    # Studies past their start deadline expire within this many seconds (0: only on access).
    deadline_sweep_every_s: float = 30.0


def app_config_from_settings(settings: CoordinatorSettings, **extra: Any) -> AppConfig:
    """The app's configuration from the operator's settings (TOML + EXCHANGE_* environment).
    Every value the coordinator uses comes from there; AppConfig's defaults serve tests."""
    values: dict[str, Any] = {
        "database_url": settings.database_url, "operator_key_file": settings.operator_key_path(),
        "log_key_file": settings.log_key_path(), "coordinator_key_file": settings.coordinator_key_path(),
        "log_origin": settings.log_origin, "max_body_bytes": settings.max_body_bytes,
        "rate_limit_per_minute": settings.rate_limit_per_minute, "forward_bps": settings.forward_bps,
        "royalties": settings.royalty_terms(),
        "claim_window_s": settings.claim_window_s,
        "unclaimed_rewards_account": settings.unclaimed_rewards_account,
        "checkpoint_every_entries": settings.checkpoint_every_entries,
        "checkpoint_every_s": settings.checkpoint_every_s,
        "console_idle_timeout_s": settings.console_idle_timeout_s,
        "console_session_max_s": settings.console_session_max_s,
        "deadline_sweep_every_s": settings.deadline_sweep_every_s}
    values.update(extra)
    return AppConfig(**values)


def runner_from_settings(settings: CoordinatorSettings) -> StudyRunner:
    """The real Flower runner, connected as the settings say. Raises ValueError naming the
    setting if the SuperLink connection is not allowed (plaintext to a non-loopback address)."""
    from exchange.study.runners import FederatedRunner

    return FederatedRunner(settings.superlink_address, settings.data_dir / "runs",
                           root_certificates=settings.superlink_tls())


@dataclass
class Runtime:
    """The opened parts of a running coordinator (closed by `close`)."""

    config: AppConfig
    read_engine: Engine
    write_engine: Engine
    audit_log: AuditLog
    journal: Journal
    registry: Registry
    lifecycle: StudyLifecycle
    trust: Trust
    checkpointer: WalCheckpointer | None = None  # SQLite: WAL checkpoints off the commit path
    checkpointing: Checkpointing | None = None  # log checkpoints and witness cosignatures
    deadlines: DeadlineSweep | None = None  # studies past their start deadline expire

    def close(self) -> None:
        if self.deadlines is not None:
            self.deadlines.close()
        if self.checkpointing is not None:
            self.checkpointing.close()
        self.journal.close()
        if self.checkpointer is not None:
            self.checkpointer.close()
        self.audit_log.close()
        self.read_engine.dispose()
        self.write_engine.dispose()

    def start_background(self) -> None:
        """The threads a serving coordinator runs: checkpoints and the deadline sweep."""
        if self.checkpointing is not None:
            self.checkpointing.start()
        if self.deadlines is not None:
            self.deadlines.start()


def load_or_create_key(path: Path) -> Signer:
    """Load a 0600 key file, creating it on first start (never overwritten)."""
    if path.exists():
        return Signer.load(path)
    signer = Signer.generate()
    signer.save(path)
    return signer


def _write_engine(url: str) -> Engine:
    """Write transactions take SQLite's write lock up front (BEGIN IMMEDIATE), so two writers
    queue on busy_timeout instead of failing on a lock upgrade (SQLAlchemy's documented
    recipe). `AuditLog.append_in` requires exactly this on SQLite (docs/audit-store.md): a
    transaction that appends must hold the write lock from its start. On PostgreSQL append_in
    takes the audit advisory lock itself (READ COMMITTED), and row locks serialize the rest."""
    engine = make_engine(url)
    forget_transactions(engine)
    if engine.dialect.name == "sqlite":
        @event.listens_for(engine, "connect")
        def _connect(dbapi_connection: Any, _record: Any) -> None:
            dbapi_connection.isolation_level = None

        @event.listens_for(engine, "begin")
        def _begin(connection: Connection) -> None:
            connection.exec_driver_sql("BEGIN IMMEDIATE")
    else:
        engine = engine.execution_options(isolation_level="READ COMMITTED")
    return engine


# Read connections kept open on SQLite: sync handlers run on up to 40 worker threads (anyio's
# default), and with SQLAlchemy's default pool (5 kept + 10 overflow) every overflow connection
# was opened, given its four PRAGMAs, and closed again per request under load (visible in
# py-spy profiles of the API benchmark). SQLite connections are in-process file handles, so
# keeping more is cheap; PostgreSQL keeps SQLAlchemy's defaults (server connection slots).
SQLITE_READ_POOL: dict[str, int] = {"pool_size": 16, "max_overflow": 24}


def _read_engine(url: str) -> Engine:
    sqlite = make_url(normalize_url(url)).get_backend_name() == "sqlite"
    return make_engine(url, **SQLITE_READ_POOL) if sqlite else make_engine(url)


def build_runtime(config: AppConfig, runner: StudyRunner) -> Runtime:
    if config.migrate:
        migrate.upgrade(config.database_url, "coordinator")
    operator = load_or_create_key(config.operator_key_file)
    log_signer = load_or_create_key(config.log_key_file)
    coordinator_key = load_or_create_key(config.coordinator_key_file)
    read_engine = _read_engine(config.database_url)
    trust = Trust(origin=config.log_origin, operator_public_key=operator.public_key,
                  log_public_key=log_signer.public_key)
    # The log's trust anchors are written once, when the log is first opened; a start with
    # other keys or another origin is refused here (TrustMismatchError names the field).
    try:
        record_trust(read_engine, trust)
    except BaseException:
        read_engine.dispose()
        raise
    write_engine = _write_engine(config.database_url)
    checkpointer = None
    if write_engine.dialect.name == "sqlite":
        writers_leave_checkpoints_to_a_thread(write_engine)
        checkpointer = WalCheckpointer(write_engine)
    audit_log = AuditLog(read_engine, log_signer, config.log_origin, operator.public_key)
    journal = Journal(read_engine, write_engine, audit_log, operator=operator,
                      coordinator=coordinator_key)
    journal.on_change = lambda kind: STUDY_EVENTS.labels(kind=kind).inc()
    registry = Registry(journal, replay_window=timedelta(seconds=config.replay_window_s))
    lifecycle = StudyLifecycle(journal, registry, runner,
                               terms=Terms(forward_bps=config.forward_bps, royalties=config.royalties,
                                           claim_window_s=config.claim_window_s,
                                           unclaimed_to=config.unclaimed_rewards_account))
    journal.bootstrap()
    checkpointing = Checkpointing(audit_log, trust, read_engine,
                                  every_entries=config.checkpoint_every_entries,
                                  every_seconds=config.checkpoint_every_s)
    deadlines = DeadlineSweep(lifecycle.expire_due, every_s=config.deadline_sweep_every_s)
    return Runtime(config, read_engine, write_engine, audit_log, journal, registry, lifecycle, trust,
                   checkpointer, checkpointing, deadlines)


def _rate_limit_identifier(scope: Scope) -> str:
    """The caller a rate-limit window belongs to: the API key's public prefix, else the client
    address (hospitals sign their requests and are few; researchers' keys are per person)."""
    headers = dict(scope.get("headers", ()))
    token = (headers.get(b"x-api-key") or headers.get(b"authorization") or b"").decode("latin-1")
    prefix = api_key_prefix(token.removeprefix("Bearer ").strip())
    if prefix is not None:
        return f"key:{prefix}"
    client = scope.get("client")
    return f"ip:{client[0] if client else 'unknown'}"


def _freeze_startup_objects() -> None:
    """Move everything allocated by start-up (torch, the templates, the app) out of the cyclic
    garbage collector's generations: a full collection otherwise walks those millions of
    long-lived objects again and again, one of the API's tail-latency stalls (CPython's
    `gc.freeze`, meant for exactly this)."""
    gc.collect()
    gc.freeze()


class MetricsController(PrometheusController):
    path = "/metrics"
    include_in_schema = False


def create_app(runtime: Runtime, *, debug: bool = False,
               on_shutdown: list[Callable[[], Any]] | None = None) -> Litestar:
    config = runtime.config
    openapi = OpenAPIConfig(
        title="Health data exchange: coordinator API", version=API_VERSION,
        description="Study submission, hospital decisions, results, and the verifiable audit log. "
                    "Refusals are RFC 9457 problem details.",
        path="/schema",
        render_plugins=[SwaggerRenderPlugin(
            path="/docs", js_url="/static/swagger/swagger-ui-bundle.js",
            css_url="/static/swagger/swagger-ui.css",
            standalone_preset_js_url="/static/swagger/swagger-ui-standalone-preset.js",
            favicon="<link rel='icon' type='image/png' href='/static/swagger/favicon-32x32.png'>")],
        components=Components(security_schemes={
            "BearerApiKey": SecurityScheme(type="http", scheme="bearer",
                                           description="API key: Authorization: Bearer hx_..."),
            "HeaderApiKey": SecurityScheme(type="apiKey", name="X-API-Key", security_scheme_in="header"),
            "HttpMessageSignature": SecurityScheme(
                type="apiKey", name="Signature", security_scheme_in="header",
                description="RFC 9421 Ed25519 signature by the hospital's registered key; profile in "
                            "exchange.http_signing (covers @method @path @query content-digest; "
                            "created, keyid, nonce, tag=health-exchange)"),
        }),
    )
    static = create_static_files_router(path="/static/swagger",
                                        directories=[Path(str(swagger_ui_bundle.swagger_ui_path))],
                                        include_in_schema=False, send_as_attachment=False)
    middleware: list[Any] = [
        DefineMiddleware(ObservabilityMiddleware, access_log_enabled=config.access_log),
        RequestTextMiddleware,
        DefineMiddleware(FixedWindowRateLimitMiddleware, limit=config.rate_limit_per_minute,
                         window_s=60, identify=_rate_limit_identifier)]
    app = Litestar(
        route_handlers=[controllers.RegistryController, controllers.StudyController,
                        controllers.HospitalController, controllers.AuditController,
                        controllers.health, MetricsController, static, _docs_redirect,
                        console_router(config.console_idle_timeout_s, config.console_session_max_s)],
        template_config=template_config(),
        openapi_config=openapi,
        middleware=middleware,
        exception_handlers={
            problems.ProblemError: problems.handle_problem,
            ValidationException: problems.handle_validation,
            HTTPException: problems.handle_http,
            RecursionError: problems.handle_too_deep,
            Exception: problems.handle_unexpected,
        },
        request_max_body_size=config.max_body_bytes,
        # Litestar passes strict=False to model_validate unless told: keep the models strict.
        plugins=[PydanticPlugin(validate_strict=True)],
        response_cache_config=ResponseCacheConfig(),
        # The template registry imports torch (seconds): load it before serving, not inside the
        # first POST /v1/studies, where it would stall the event loop.
        on_startup=[vocabulary.templates, _freeze_startup_objects, runtime.start_background],
        on_shutdown=[runtime.close, *(on_shutdown or [])],
        debug=debug,
    )
    app.state.journal = runtime.journal
    app.state.registry = runtime.registry
    app.state.lifecycle = runtime.lifecycle
    app.state.audit_log = runtime.audit_log
    app.state.trust = runtime.trust
    app.state.checkpointing = runtime.checkpointing
    return app


@get("/docs", include_in_schema=False, sync_to_thread=False)
def _docs_redirect() -> Any:
    from litestar.response import Redirect

    return Redirect("/schema/docs")
