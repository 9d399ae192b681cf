"""Runs Alembic programmatically: migrations are the only way a schema changes.

Two migration trees: `coordinator` (the operator's database, including the audit log) and
`node` (each hospital's own database).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from alembic import command
from alembic.config import Config

from exchange.db.engine import normalize_url

Tree = Literal["coordinator", "node"]
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def alembic_config(url: str, tree: Tree = "coordinator") -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR / tree))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    config.attributes["tree"] = tree
    return config


def upgrade(url: str, tree: Tree = "coordinator", revision: str = "head") -> None:
    command.upgrade(alembic_config(url, tree), revision)


def downgrade(url: str, tree: Tree = "coordinator", revision: str = "base") -> None:
    command.downgrade(alembic_config(url, tree), revision)
