"""Looking at a database before using it, so that commands can say what is wrong in words.

`exchange admin` must work on an existing exchange only: run in the wrong directory without
`--config`, it would otherwise create a new, empty exchange (database and keys) there and
register hospitals into it. And a PostgreSQL URL naming a database that does not exist, a
server that does not answer or a password that is refused should read as that, not as a
driver traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from sqlalchemy import inspect
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, OperationalError, SQLAlchemyError

from exchange.db.engine import make_engine

State = Literal["missing", "empty", "ready"]


class DatabaseUnavailableError(RuntimeError):
    """The database cannot be used; the message says why and what to do."""


def describe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except ArgumentError:
        return "(an invalid database URL)"


def database_state(url: str) -> State:
    """`missing` (a SQLite file that does not exist), `empty` (no exchange schema: no
    alembic_version table) or `ready`. Never creates anything. Raises DatabaseUnavailableError
    with the reason when the database cannot be reached."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise DatabaseUnavailableError(f"database URL {url!r} is not valid: {exc}") from exc
    if parsed.get_backend_name() == "sqlite":
        database = parsed.database
        if not database or database == ":memory:":
            return "empty"
        if not Path(database).is_file():
            return "missing"
    engine = make_engine(url)
    try:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names())
    except OperationalError as exc:
        raise DatabaseUnavailableError(unreachable_reason(url, exc)) from exc
    except SQLAlchemyError as exc:
        raise DatabaseUnavailableError(f"database {describe(url)}: {exc.__class__.__name__}: "
                                       f"{str(exc).splitlines()[0]}") from exc
    finally:
        engine.dispose()
    return "ready" if "alembic_version" in tables else "empty"


def unreachable_reason(url: str, exc: BaseException) -> str:
    """A driver's connection error in words: which database, what happened, what to do."""
    message = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0] if str(exc).strip() else ""
    where = describe(url)
    name = make_url(url).database
    if "does not exist" in message and name:
        return (f"database {name!r} does not exist on the server ({where}); create it first "
                f"(for example `createdb {name}`), then run the command again")
    if "password authentication failed" in message or "no password supplied" in message:
        return f"database {where}: the server refused the user's password ({message})"
    if "Connection refused" in message or "could not connect" in message or "timeout" in message.lower():
        return f"database {where}: the server does not answer ({message}); is PostgreSQL running there?"
    return f"database {where}: cannot connect ({message})"
