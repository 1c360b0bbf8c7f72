"""`audit sql`: ad-hoc SQL over the audit store, read-only unless asked otherwise.

The statement runs in a sandbox that DuckDB enforces, not a keyword filter: once the store
is open, external access is switched off (no file reads or writes through table functions,
COPY or EXPORT, no ATTACH, no extension install or load), extensions are neither installed
nor loaded automatically, and the configuration is locked so the statement cannot switch
any of it back. The store itself was opened before the lock, so its tables and views stay
readable, and writable with --write. Results leave through Python (`render`), never DuckDB.

The sandbox is a setting of the DuckDB instance. DuckDB shares one instance among the
connections a process opens to the same file with the same settings, so a caller holding a
read-only Store on this file while calling `query` is sandboxed too until both close.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import duckdb
import polars as pl

from .errors import AuditError
from .store import Store
from .workspace import Workspace

FORMATS = ("table", "csv", "json", "parquet")

# Applied in this order; lock_configuration last, so the statement cannot undo the others.
SANDBOX = (
    ("enable_external_access", False),
    ("autoinstall_known_extensions", False),
    ("autoload_known_extensions", False),
    ("allow_community_extensions", False),
    ("lock_configuration", True),
)

_FILES = (
    "this statement reads or writes files outside the audit store, which `audit sql` does not allow; "
    "export query results with --format csv/json/parquet --out FILE"
)
_ATTACH = (
    "this statement attaches another database, which `audit sql` does not allow; "
    "it works on the audit store only (export results with --format csv/json/parquet --out FILE)"
)
_EXTENSION = (
    "this statement installs or loads a DuckDB extension, which `audit sql` does not allow; "
    "use the functions DuckDB has built in"
)
_SETTINGS = (
    "this statement changes DuckDB settings, which `audit sql` does not allow (its sandbox is locked); "
    "run the query without SET, RESET or PRAGMA"
)


def statement(sql: str) -> duckdb.Statement:
    """The one statement in `sql`; no statement, several, or one DuckDB cannot parse is refused."""
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise AuditError(f"SQL error: {_first_line(exc)}") from None
    if not statements:
        raise AuditError('no SQL statement given; pass one statement, e.g. `audit sql "select * from scans"`')
    if len(statements) > 1:
        raise AuditError(
            f"{len(statements)} SQL statements given; `audit sql` runs one statement at a time, so run them one by one"
        )
    return statements[0]


def sandbox(con: duckdb.DuckDBPyConnection) -> None:
    """Switch off DuckDB's access to anything but the open store, and lock the configuration."""
    current = dict(
        con.execute(
            "SELECT name, value FROM duckdb_settings() WHERE list_contains(?, name)", [[name for name, _ in SANDBOX]]
        ).fetchall()
    )
    if _truthy(current.get("lock_configuration")):
        # A connection sharing this DuckDB instance (same process, same file) already locked it.
        if all(_truthy(current.get(name)) == value for name, value in SANDBOX):
            return
        raise AuditError("the audit store is open in this process with locked DuckDB settings; close it and retry")
    for name, value in SANDBOX:
        con.execute(f"SET {name} = {str(value).lower()}")


def query(ws: Workspace, sql: str, *, write: bool = False) -> pl.DataFrame | None:
    """Run one SQL statement in the sandbox; returns its result (None for a statement that returns nothing)."""
    kind = statement(sql).type
    if write:
        # Writers take the workspace lock like every other writing command.
        with ws.writing(), Store(ws.db_path) as store:
            return _run(store, sql, kind)
    with ws.reader() as store:
        return _run(store, sql, kind)


def _run(store: Store, sql: str, kind: duckdb.StatementType) -> pl.DataFrame | None:
    sandbox(store.con)
    try:
        relation = store.con.sql(sql)
        return relation.pl() if relation is not None else None
    except duckdb.Error as exc:
        raise AuditError(_explain(exc, kind)) from None


def _explain(exc: duckdb.Error, kind: duckdb.StatementType) -> str:
    """One line saying what DuckDB refused and what to do instead."""
    message = _first_line(exc)
    if isinstance(exc, duckdb.PermissionException):
        if kind == duckdb.StatementType.LOAD or "extension" in message.lower():
            return _EXTENSION
        if kind == duckdb.StatementType.ATTACH:
            return _ATTACH
        if "Cannot access" in message:
            return _FILES
        return f"`audit sql` does not allow this statement ({message})"
    if "configuration has been locked" in message:
        return _SETTINGS
    if "read-only" in message:
        return "this statement writes, and `audit sql` opens the store read-only; add --write to change the store"
    return f"SQL error: {message}"


def _first_line(exc: Exception) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _truthy(value) -> bool:
    return str(value).lower() == "true"


def render(frame: pl.DataFrame, fmt: str, out: str | Path | None = None) -> str | None:
    """Serialise a result as a plain-text table / csv / json / parquet (to `out`, or returned as text)."""
    if fmt not in FORMATS:
        raise AuditError(f"unknown --format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "parquet":
        if out is None:
            raise AuditError("--format parquet needs --out FILE (Parquet is binary)")
        frame.write_parquet(out)
        return None
    if fmt == "csv":
        text = frame.write_csv()
    elif fmt == "json":
        text = json.dumps(frame.to_dicts(), default=str, indent=2) + "\n"
    else:
        text = table(frame)
    if out is not None:
        Path(out).write_text(text)
        return None
    return text


# C0 and C1 controls, DEL, and the bidi embedding, override and isolate marks: shown escaped in a table,
# so a cell can neither move the terminal's cursor nor reorder the text around it.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u061c\u200e\u200f\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _cell(value) -> str:
    """A value as table text: plain, on one line; NULL is empty."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else str(value)
    return _UNPRINTABLE.sub(lambda m: _NAMED.get(m[0]) or f"\\u{ord(m[0]):04x}", text)


def _width(text: str) -> int:
    """Terminal columns: wide East Asian characters take two, combining and zero-width ones none."""
    return sum(
        0
        if unicodedata.combining(ch) or unicodedata.category(ch) in ("Mn", "Me", "Cf")
        else 2
        if unicodedata.east_asian_width(ch) in ("W", "F")
        else 1
        for ch in text
    )


def table(frame: pl.DataFrame) -> str:
    """The result as a plain-text table: user text is printed as it is, never read as markup."""
    header = [_cell(name) for name in frame.columns]
    rows = [[_cell(value) for value in row] for row in frame.iter_rows()]
    widths = [max([_width(text) for text in column], default=0) for column in zip(header, *rows)]
    numeric = [dtype.is_numeric() for dtype in frame.dtypes]

    def line(cells: list[str]) -> str:
        padded = []
        for text, width, right in zip(cells, widths, numeric):
            pad = " " * (width - _width(text))
            padded.append(pad + text if right else text + pad)
        return "  ".join(padded).rstrip()

    lines = [line(header), "  ".join("-" * width for width in widths), *(line(row) for row in rows)]
    lines.append(f"({len(rows)} row{'' if len(rows) == 1 else 's'})")
    return "\n".join(lines) + "\n"
