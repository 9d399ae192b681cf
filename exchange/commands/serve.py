"""`exchange serve`: run the coordinator (migrates the database first)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from exchange.settings import CoordinatorSettings, load_coordinator_settings


def app_config_from(settings: CoordinatorSettings, **extra: Any) -> Any:
    """The coordinator app's configuration from the shared settings."""
    from exchange.coordinator.app import app_config_from_settings

    return app_config_from_settings(settings, **extra)


def load_settings(config: Path | None, **overrides: Any) -> CoordinatorSettings:
    try:
        return load_coordinator_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except FileNotFoundError as exc:
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    except ValueError as exc:  # pydantic ValidationError names the field
        raise typer.BadParameter(str(exc)) from exc


def serve(
    db: Annotated[str | None,
                  typer.Option("--db", help="Database URL (default sqlite:///exchange.db).")] = None,
    host: Annotated[str | None, typer.Option(help="Interface to listen on (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="TCP port (default 8080).")] = None,
    config: Annotated[Path | None, typer.Option(help="TOML settings file.")] = None,
) -> None:
    """Run the coordinator API (migrates the database, creates missing keys with 0600)."""
    import uvicorn

    from exchange.coordinator.app import build_runtime, create_app, runner_from_settings
    from exchange.db.probe import DatabaseUnavailableError, database_state
    from exchange.logging import configure_logging

    settings = load_settings(config, database_url=db, host=host, port=port)
    configure_logging(settings.logging.level, settings.logging.json_format)
    try:
        database_state(settings.database_url)
    except DatabaseUnavailableError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    try:
        runner = runner_from_settings(settings)
        https = settings.https()
    except ValueError as exc:  # names the setting (e.g. plaintext to a remote SuperLink)
        raise typer.BadParameter(str(exc), param_hint="--config") from exc
    runtime = build_runtime(app_config_from(settings), runner)
    app = create_app(runtime)
    scheme = "https" if https is not None else "http"
    typer.echo(f"coordinator on {scheme}://{settings.host}:{settings.port} (docs: /schema/docs)", err=True)
    tls: dict[str, Any] = ({"ssl_certfile": str(https[0]), "ssl_keyfile": str(https[1])}
                           if https is not None else {})
    uvicorn.run(app, host=settings.host, port=settings.port, access_log=False, log_level="warning", **tls)
