"""`exchange db ...`: schema migrations."""

from __future__ import annotations

from typing import Annotated

import typer

from exchange.db import migrate

app = typer.Typer(help="Database schema migrations (Alembic).", no_args_is_help=True)


@app.command("upgrade")
def upgrade(
    db: Annotated[str, typer.Option(help="Database URL (SQLite file or PostgreSQL).")] = "sqlite:///exchange.db",
    tree: Annotated[str, typer.Option(help="Which schema: coordinator or node.")] = "coordinator",
    revision: Annotated[str, typer.Option(help="Target revision.")] = "head",
) -> None:
    """Upgrade the database schema to the latest (or given) revision."""
    if tree not in ("coordinator", "node"):
        raise typer.BadParameter("must be 'coordinator' or 'node'", param_hint="--tree")
    migrate.upgrade(db, tree, revision)  # type: ignore[arg-type]
    typer.echo(f"{tree} schema at {revision}")
