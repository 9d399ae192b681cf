"""Declarative bases with naming conventions, so that Alembic batch migrations can name
and drop constraints identically on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import MetaData
from sqlalchemy.orm import DeclarativeBase

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class CoordinatorBase(DeclarativeBase):
    """Tables of the operator's coordinator database."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class NodeBase(DeclarativeBase):
    """Tables of a hospital node's own database."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)
