"""`audit sql`: ad-hoc SQL over the audit store, read-only unless asked otherwise."""

from __future__ import annotations

import io
import json
from pathlib import Path

import duckdb
import polars as pl

from .errors import AuditError
from .store import Store
from .workspace import Workspace

FORMATS = ("table", "csv", "json", "parquet")


def query(ws: Workspace, sql: str, *, write: bool = False) -> pl.DataFrame | None:
    """Run one SQL statement; returns its result (None for a statement that returns nothing)."""
    with Store(ws.db_path, read_only=not write) as store:
        try:
            if write:
                # Writers take the workspace lock like every other writing command.
                with ws.writing():
                    relation = store.con.sql(sql)
                    return relation.pl() if relation is not None else None
            relation = store.con.sql(sql)
            return relation.pl() if relation is not None else None
        except duckdb.Error as exc:
            message = str(exc).strip().splitlines()[0]
            if "read-only" in message:
                raise AuditError(
                    "this statement writes, and `audit sql` opens the store read-only; add --write to change the store"
                ) from None
            raise AuditError(f"SQL error: {message}") from None


def render(frame: pl.DataFrame, fmt: str, out: str | Path | None = None) -> str | None:
    """Serialise a result as csv / json / parquet (to `out`, or returned as text); 'table' is the CLI's job."""
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
        buffer = io.StringIO()
        with pl.Config(tbl_rows=-1, tbl_cols=-1, fmt_str_lengths=80):
            buffer.write(str(frame) + "\n")
        text = buffer.getvalue()
    if out is not None:
        Path(out).write_text(text)
        return None
    return text
