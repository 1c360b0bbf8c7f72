"""The audit store: DuckDB, with the schema applied from the numbered migrations in schemas/.

Concurrent readers. DuckDB lets one process open a file read-write or many open it read-only, never both. A
long writer that yields (`Store(..., yield_to_readers=True)`, the scan) lets readers in between its batches:
two flock files beside the database say who waits. A reader holds `<db>.readers` shared while it waits to
open; a writer holds `<db>.writer` exclusive while it opens or holds the database. After each committed
transaction a yielding writer checks `<db>.readers`: when a reader waits it closes its connection (DuckDB
checkpoints the WAL on close) and reopens at its next statement, first giving the waiting readers a moment
to get in, then waiting for the reads under way to finish; readers that arrive meanwhile see `<db>.writer`
and queue behind it, so neither side starves. A reader therefore sees whole committed batches only and waits
at most one batch; with no reader the writer keeps its connection and pays nothing. Opens on either side
retry a lock conflict with a short backoff for a bounded time (`[store] busy_timeout` for readers,
`[store] writer_timeout` for writers) and then fail with the one-line "workspace is busy".
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.resources
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa

from .config import StoreSettings
from .errors import AuditError, WorkspaceBusy

log = logging.getLogger("auditor")

# Backoff between tries to open a database another process holds: readers poll quickly (a scan lets go for a
# moment only), writers a little slower; both log nothing until they give up (writers: every WARN_EVERY s).
READER_POLL = (0.005, 0.05)
WRITER_POLL = (0.01, 0.1)
WARN_EVERY = 30.0
# How long a writer that let readers in waits for the waiting ones to open before it takes the store back.
READERS_GRACE = 5.0


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


def _holder(exc: Exception) -> str:
    """'PID n' of the process DuckDB names as holding the lock, or 'another process'."""
    match = re.search(r"\(PID (\d+)\)", str(exc))
    return f"process {match[1]}" if match else "another process"


class _Turnstile:
    """The two flock files that order a yielding writer and its readers (module docstring), one per database file
    and process: Stores of one process share it, so a process never waits on itself (DuckDB shares one instance
    among a process's connections and judges those itself). Where a file cannot be created (a read-only folder)
    its side is skipped: the opens still retry on DuckDB's own lock."""

    _open_ones: dict[str, _Turnstile] = {}

    def __init__(self, key: str):
        self.key = key
        self.users = 0
        self.writers = 0  # Stores of this process holding (or taking) the writer flag
        self.waiting = 0  # readers of this process waiting to open
        self.files = {name: self._open(Path(f"{key}.{name}")) for name in ("readers", "writer")}

    @classmethod
    def of(cls, path: Path) -> _Turnstile:
        key = os.path.realpath(path)
        turnstile = cls._open_ones.get(key) or cls._open_ones.setdefault(key, cls(key))
        turnstile.users += 1
        return turnstile

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self._open_ones.pop(self.key, None)
            for fh in self.files.values():
                if fh is not None:
                    fh.close()  # drops its flock too

    @staticmethod
    def _open(path: Path):
        try:
            return open(path, "a+")  # noqa: SIM115 (closed in release())
        except OSError:
            return None

    def _flock(self, name: str, flags: int) -> bool:
        fh = self.files[name]
        if fh is None:
            return True
        try:
            fcntl.flock(fh, flags)
        except BlockingIOError:
            return False
        return True

    def _busy(self, name: str, probe: int) -> bool:
        if not self._flock(name, probe | fcntl.LOCK_NB):
            return True
        self._flock(name, fcntl.LOCK_UN)
        return False

    def readers_waiting(self) -> bool:
        """A reader of another process waits to open."""
        return not self.waiting and self._busy("readers", fcntl.LOCK_EX)

    def writer_present(self) -> bool:
        """A writer of another process holds the store or waits to open it."""
        return not self.writers and self._busy("writer", fcntl.LOCK_SH)

    def take_writer(self) -> bool:
        if self.writers or self._flock("writer", fcntl.LOCK_EX | fcntl.LOCK_NB):
            self.writers += 1
            return True
        return False

    def drop_writer(self) -> None:
        self.writers -= 1
        if self.writers == 0:
            self._flock("writer", fcntl.LOCK_UN)

    @contextlib.contextmanager
    def reader_waits(self) -> Iterator[None]:
        if self.waiting == 0:
            self._flock("readers", fcntl.LOCK_SH)
        self.waiting += 1
        try:
            yield
        finally:
            self.waiting -= 1
            if self.waiting == 0:
                self._flock("readers", fcntl.LOCK_UN)


class Store:
    """A connection to the workspace's DuckDB file; read-write connections migrate on open.

    `wait`: seconds an open waits for another process to let go of the file (default: [store] busy_timeout for
    a reader, [store] writer_timeout for a writer). `yield_to_readers` (writers): let waiting readers in after
    each committed transaction; `con` reopens on demand (module docstring)."""

    def __init__(
        self,
        path: str | Path,
        *,
        read_only: bool = False,
        wait: float | None = None,
        yield_to_readers: bool = False,
    ):
        self.path = Path(path)
        if read_only and not self.path.exists():
            raise AuditError(f"no audit store at {self.path}; run `audit init` first")
        defaults = StoreSettings()
        self.read_only = read_only
        self.wait = float(wait if wait is not None else defaults.busy_timeout if read_only else defaults.writer_timeout)
        self.yield_to_readers = yield_to_readers and not read_only
        self._turnstile: _Turnstile | None = _Turnstile.of(self.path)
        self._writer = False  # holds the turnstile's writer flag
        self._con: duckdb.DuckDBPyConnection | None = None
        self._yielded = False
        self.waited = 0.0  # seconds in opens, waits for other processes included
        self.yields = 0  # times a yielding writer let readers in
        try:
            self._con = self._connect(read_only)
            if not read_only:
                self.migrate()
                if self.yield_to_readers:
                    # Open again at the first statement: a scan loads its model first, and readers may read meanwhile.
                    self._con.close()
                    self._con = None
                    self._drop_writer()
            elif self.pending():
                # A store an older version made: a reader must see every table, so bring it up to date first.
                self._con.close()
                self._con = None
                Store(self.path, wait=self.wait).close()
                self._con = self._connect(read_only)
        except BaseException:
            self.close()
            raise

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The open connection; a yielding writer that let readers in opens it again here."""
        if self._con is None:
            if self._turnstile is None:
                raise AuditError(f"the audit store {self.path} is closed")
            self._con = self._connect(self.read_only)
        return self._con

    def _connect(self, read_only: bool) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying while another process holds a conflicting lock, up to `self.wait` seconds."""
        turnstile = self._turnstile
        started = time.monotonic()
        deadline = started + self.wait
        if not read_only and self._yielded:
            # We let readers in: give the ones waiting a moment to open before taking the store back.
            grace = min(deadline, started + READERS_GRACE)
            while turnstile.readers_waiting() and time.monotonic() < grace:
                time.sleep(WRITER_POLL[0])
        self._yielded = False
        delay, cap = READER_POLL if read_only else WRITER_POLL
        warned = started
        holder, tries = "another process", 0
        # A reader says it waits (a yielding writer lets go after its commit) and queues behind a writer that
        # holds or wants the store; a writer announces itself, then waits for the reads under way.
        with turnstile.reader_waits() if read_only else contextlib.nullcontext():
            while True:
                if read_only:
                    # The last try goes ahead regardless: it may get in, or learn who holds the file.
                    ready = not turnstile.writer_present() or time.monotonic() >= deadline
                else:
                    ready = self._writer or turnstile.take_writer()
                    self._writer = ready
                if ready:
                    try:
                        con = duckdb.connect(str(self.path), read_only=read_only)
                    except duckdb.IOException as exc:
                        if not _is_lock_conflict(exc):
                            raise AuditError(f"cannot open the audit store {self.path}: {exc}") from None
                        holder = _holder(exc)
                    else:
                        waited = time.monotonic() - started
                        self.waited += waited
                        if tries:
                            log.info("opened %s after waiting %.3f s", self.path, waited)
                        return con
                tries += 1
                now = time.monotonic()
                if now >= deadline:
                    break
                if not read_only and now - warned >= WARN_EVERY:
                    log.warning("waited %.0f s for %s to let go of %s", now - started, holder, self.path)
                    warned = now
                time.sleep(min(delay, deadline - now))
                delay = min(delay * 2, cap)
        self._drop_writer()
        setting = "busy_timeout" if read_only else "writer_timeout"
        raise WorkspaceBusy(
            f"workspace is busy: {holder} holds {self.path} (waited {self.wait:g} s, [store] {setting}); "
            "wait for it to finish and run the command again"
        )

    def _drop_writer(self) -> None:
        if self._writer:
            self._writer = False
            self._turnstile.drop_writer()

    def let_readers_in(self) -> bool:
        """A yielding writer between transactions: when a reader waits, close (the next `con` reopens)."""
        if not self.yield_to_readers or self._con is None or not self._turnstile.readers_waiting():
            return False
        self._con.close()
        self._con = None
        self._yielded = True
        self.yields += 1
        self._drop_writer()
        return True

    def pending(self) -> list[int]:
        """Versions of the migrations this store has not had yet."""
        done = {row[0] for row in self.rows("SELECT version FROM schema_migrations")}
        return [version for version, _, _ in migrations() if version not in done]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
        if self._turnstile is not None:
            self._drop_writer()
            self._turnstile.release()
            self._turnstile = None

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

    @contextlib.contextmanager
    def transaction(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """One transaction; a yielding writer lets waiting readers in after it commits."""
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            yield con
        except BaseException:
            con.execute("ROLLBACK")
            raise
        con.execute("COMMIT")
        self.let_readers_in()


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
