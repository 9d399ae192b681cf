"""`exchange db ...`: schema migrations."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)


def _default_url(tree: str, config: Path | None) -> str:
    """The database the other commands would use: the coordinator's settings (--config,
    EXCHANGE_CONFIG, EXCHANGE_DATABASE_URL) or the node's (--config, EXCHANGE_NODE_CONFIG,
    ./node.toml)."""
    if tree == "node":
        from exchange.commands.node import _settings

        return _settings(config).db_url
    from exchange.commands.serve import load_settings

    return load_settings(config).database_url


@app.command("upgrade")
def upgrade(
    db: Annotated[str | None, typer.Option(
        help="Database URL (SQLite file or PostgreSQL); default: $EXCHANGE_DATABASE_URL, else the "
             "settings' database_url (sqlite:///exchange.db for the coordinator).",
        envvar="EXCHANGE_DATABASE_URL", show_envvar=True)] = None,
    tree: Annotated[str, typer.Option(help="Which schema: coordinator or node.")] = "coordinator",
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
    config: Annotated[Path | None, typer.Option(
        help="Settings file to read the database from (coordinator TOML, or node.toml with --tree node).")
    ] = None,
) -> None:
    """Upgrade the database schema to the latest (or given) revision. Holds the migration lock
    while it runs, so a coordinator starting at the same time waits for it."""
    # imported here, not with the module: every `exchange ...` process (the node daemon is
    # `exchange node run`) loads this module, and Alembic with Mako stays out of those that do
    # not migrate (docs/benchmarks/scale.md, "Memory per hospital")
    from exchange.db import migrate
    from exchange.db.probe import DatabaseUnavailableError, database_state, describe

    if tree not in ("coordinator", "node"):
        raise typer.BadParameter("must be 'coordinator' or 'node'", param_hint="--tree")
    url = db or _default_url(tree, config)
    try:
        database_state(url)
    except DatabaseUnavailableError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from exc
    migrate.upgrade(url, tree, revision)  # type: ignore[arg-type]
    typer.echo(f"{tree} schema of {describe(url)} at {revision}")
