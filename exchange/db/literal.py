"""An INSERT written out as one SQL string whose values can hold no quote (PostgreSQL).

Why: the coordinator's study submission goes to PostgreSQL as ONE simple-protocol string
(BEGIN, the log's lock, the audit INSERT, the study row, COMMIT: `AuditLog.append_in`'s
`tail`), and such a string carries its values as literals, not as bound parameters. Here every
value travels inside ONE hex literal of the rows as JSON, which the server turns back into
rows of the table's own type (`json_populate_recordset`): hex digits cannot end a literal,
whatever the values hold, and the table and column names come from the code's own `Table`.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Dialect, TableClause, TypeDecorator


def _json_value(table: TableClause, name: str, value: Any, dialect: Dialect) -> Any:
    """`value` of column `name` as the JSON value PostgreSQL reads into that column's type."""
    column = table.c[name]
    if isinstance(column.type, TypeDecorator):
        try:
            value = column.type.process_bind_param(value, dialect)
        except ValueError as exc:
            raise ValueError(f"{table.name}.{name}: {exc}") from exc
    if value is None or isinstance(value, bool | int | str | dict | list):
        return value.value if isinstance(value, enum.Enum) else value
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, datetime):
        if value.tzinfo is None:
            raise ValueError(f"{table.name}.{name}: a naive datetime has no literal here")
        return value.isoformat()
    raise ValueError(f"{table.name}.{name}: no literal for a {type(value).__name__} value")


def insert_rows_sql(table: TableClause, rows: Sequence[Mapping[str, Any]], dialect: Dialect) -> str:
    """`INSERT INTO table (columns) ...` of `rows` (all with the same keys) as one SQL string:
    the rows as JSON in a hex literal, read back by `json_populate_recordset` into the table's
    row type (so each value is converted to its column's type by the server, as a bound
    parameter would be). ValueError for a value it cannot write (a naive datetime, a float,
    bytes), naming the column."""
    if dialect.name != "postgresql":
        raise ValueError(f"dialect: {dialect.name!r} has no literal insert here (PostgreSQL only)")
    if not rows:
        raise ValueError("rows: nothing to insert")
    names = list(rows[0])
    for row in rows:
        if list(row) != names:
            raise ValueError("rows: every row must have the same columns, in the same order")
    document = json.dumps([{name: _json_value(table, name, row[name], dialect) for name in names}
                           for row in rows], separators=(",", ":"), ensure_ascii=False)
    quote = dialect.identifier_preparer.quote
    columns = ", ".join(quote(name) for name in names)
    table_name = dialect.identifier_preparer.format_table(table)
    return (f"INSERT INTO {table_name} ({columns}) SELECT {columns} FROM json_populate_recordset("
            f"NULL::{table_name}, CAST(convert_from(decode('{document.encode().hex()}', 'hex'), "
            "'UTF8') AS json))")
