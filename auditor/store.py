"""The audit store: DuckDB, with the schema applied from the numbered migrations in schemas/."""

from __future__ import annotations

import importlib.resources
import json
import re
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from .errors import AuditError, WorkspaceBusy


def utcnow() -> datetime:
    """Store timestamps are naive UTC (DuckDB TIMESTAMP)."""
    return datetime.now(UTC).replace(tzinfo=None)


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every `NNN_name.sql` in schemas/, in order."""
    found = []
    for entry in (importlib.resources.files("auditor") / "schemas").iterdir():
        match = re.fullmatch(r"(\d+)_(.+)\.sql", entry.name)
        if match:
            found.append((int(match[1]), match[2], entry.read_text()))
    return sorted(found)


def _is_lock_conflict(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


class Store:
    """A connection to the workspace's DuckDB file; read-write connections migrate on open."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path)
        if read_only and not self.path.exists():
            raise AuditError(f"no audit store at {self.path}; run `audit init` first")
        self.con = self._connect(read_only)
        if not read_only:
            self.migrate()
        elif self.pending():
            # A store an older version made: a reader must see every table, so bring it up to date first.
            self.con.close()
            Store(self.path).close()
            self.con = self._connect(read_only)

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        try:
            return duckdb.connect(str(self.path), read_only=read_only)
        except duckdb.IOException as exc:
            if _is_lock_conflict(exc):
                raise WorkspaceBusy(
                    f"workspace is busy: another process holds {self.path}; "
                    "wait for it to finish and run the command again"
                ) from None
            raise AuditError(f"cannot open the audit store {self.path}: {exc}") from None

    def pending(self) -> list[int]:
        """Versions of the migrations this store has not had yet."""
        done = {row[0] for row in self.rows("SELECT version FROM schema_migrations")}
        return [version for version, _, _ in migrations() if version not in done]

    def close(self) -> None:
        self.con.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def migrate(self) -> list[int]:
        """Apply every migration not yet recorded in schema_migrations; return the versions applied."""
        self.con.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name VARCHAR NOT NULL,"
            " applied_at TIMESTAMP NOT NULL DEFAULT current_timestamp)"
        )
        todo = set(self.pending())
        applied = []
        for version, name, sql in migrations():
            if version not in todo:
                continue
            with self.transaction():
                self.con.execute(sql)
                self.con.execute("INSERT INTO schema_migrations (version, name) VALUES (?, ?)", [version, name])
            applied.append(version)
        return applied

    def rows(self, sql: str, params: list | None = None) -> list[tuple]:
        # Fetch fully: a half-read result blocks the connection's next statement.
        return self.con.execute(sql, params or []).fetchall()

    def value(self, sql: str, params: list | None = None):
        rows = self.rows(sql, params)
        return rows[0][0] if rows else None

    def next_id(self, table: str) -> int:
        return int(self.value(f"SELECT coalesce(max(id), 0) + 1 FROM {table}"))

    def insert_arrow(self, table: str, data: pa.Table) -> None:
        """Bulk insert by column name (never row by row)."""
        if data.num_rows == 0:
            return
        columns = ", ".join(data.column_names)
        self.con.register("_incoming", data)
        try:
            self.con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM _incoming")
        finally:
            self.con.unregister("_incoming")

    def transaction(self):
        return _Transaction(self.con)


class _Transaction:
    def __init__(self, con):
        self.con = con

    def __enter__(self):
        self.con.execute("BEGIN TRANSACTION")
        return self.con

    def __exit__(self, exc_type, *rest):
        self.con.execute("COMMIT" if exc_type is None else "ROLLBACK")
        return False


def record_encoder(store: Store, encoder_id: str, name: str, path: str, dim: int, config: dict) -> None:

    store.con.execute(
        "INSERT INTO encoders (id, name, path, dim, config) VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO NOTHING",
        [encoder_id, name, path, dim, json.dumps(config)],
    )


def record_vector_table(
    store: Store, encoder_id: str, uri: str, table_name: str, rows: int, version: int, ann_index: str | None
) -> None:
    store.con.execute(
        "INSERT INTO vector_tables (encoder_id, uri, table_name, rows, lance_version, ann_index, updated_at)"
        " VALUES (?, ?, ?, ?, ?, ?, current_timestamp)"
        " ON CONFLICT (encoder_id) DO UPDATE SET uri = excluded.uri, table_name = excluded.table_name,"
        " rows = excluded.rows, lance_version = excluded.lance_version, ann_index = excluded.ann_index,"
        " updated_at = excluded.updated_at",
        [encoder_id, uri, table_name, rows, version, ann_index],
    )
