"""`audit index`: register the training set and its contributors, and embed it into the vector table.

Crash safety: vectors are written to LanceDB before their DuckDB rows commit, and
every run first drops vectors whose ids DuckDB never committed, so a kill at any
moment leaves both stores agreeing after the next run.
"""

from __future__ import annotations

import csv
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa

from . import embed, ingest, prompts
from .errors import AuditError
from .progress import Progress, Silent
from .search import VectorTable
from .store import Store, record_encoder, record_vector_table, utcnow
from .workspace import Workspace

log = logging.getLogger("auditor")

MANIFEST_NAME = "contributors.csv"


@dataclass
class Entry:
    path: str
    contributor_id: str | None
    contributor_name: str | None = None
    caption: str | None = None
    license: str | None = None
    known_id: int | None = None  # set when re-embedding an already registered image


def read_manifest(manifest: str | os.PathLike) -> list[Entry]:
    """Rows of a contributors manifest: path, contributor_id [, contributor_name, caption, license]; paths relative to the file."""
    manifest = Path(manifest).resolve()
    try:
        with open(manifest, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            missing = {"path", "contributor_id"} - set(reader.fieldnames or [])
            if missing:
                raise AuditError(
                    f"{manifest}: missing column(s) {', '.join(sorted(missing))}; the manifest needs at least path,contributor_id"
                )
            rows = list(reader)
    except FileNotFoundError:
        raise AuditError(f"manifest {manifest} does not exist") from None
    except UnicodeDecodeError:
        raise AuditError(f"manifest {manifest} is not UTF-8 text; save it as UTF-8 CSV") from None
    base = manifest.parent
    return [
        Entry(
            path=str(base / row["path"]),
            contributor_id=(row.get("contributor_id") or "").strip() or None,
            contributor_name=(row.get("contributor_name") or "").strip() or None,
            caption=(row.get("caption") or "").strip() or None,
            license=(row.get("license") or "").strip() or None,
        )
        for row in rows
        if row.get("path")
    ]


def discover_entries(root: str | os.PathLike) -> list[Entry]:
    """Without a manifest: every image under root; the contributor is its top-level folder's name."""
    root = Path(root)
    entries = []
    for path in ingest.discover(root):
        parts = Path(path).relative_to(root).parts
        entries.append(Entry(path=path, contributor_id=parts[0] if len(parts) > 1 else None))
    return entries


def upsert_contributors(store: Store, entries: list[Entry]) -> int:
    people: dict[str, Entry] = {}
    for entry in entries:
        if entry.contributor_id:
            seen = people.setdefault(entry.contributor_id, entry)
            if not seen.contributor_name and entry.contributor_name:
                people[entry.contributor_id] = entry
    if not people:
        return 0
    data = pa.table(
        {
            "id": list(people),
            "name": [e.contributor_name for e in people.values()],
            "license": [e.license for e in people.values()],
        }
    )
    store.con.register("_people", data)
    try:
        store.con.execute(
            "INSERT INTO contributors (id, name, license) SELECT id, name, license FROM _people"
            " ON CONFLICT (id) DO UPDATE SET name = coalesce(excluded.name, contributors.name),"
            " license = coalesce(excluded.license, contributors.license)"
        )
    finally:
        store.con.unregister("_people")
    return len(people)


@dataclass
class IndexResult:
    encoder_id: str
    added: int = 0
    re_embedded: int = 0
    unchanged: int = 0
    errors: int = 0
    rows: int = 0
    ann_index: str | None = None
    seconds: float = 0.0
    error_samples: list[tuple[str, str]] = field(default_factory=list)


def index_training(
    ws: Workspace,
    training_dir: str | os.PathLike | None,
    manifest: str | os.PathLike | None = None,
    *,
    device: str | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    engine: str = "local",
) -> IndexResult:
    """Register and embed a training set (None: only embed registered images this encoder lacks).
    Re-running adds only images whose sha256 is new."""
    started = time.perf_counter()
    progress = progress or Silent()
    entries = read_entries(training_dir, manifest)
    batch_size = batch_size or ws.config.encoder.batch_size
    limits = ws.limits
    if engine == "ray":
        from . import engine_ray

        return engine_ray.index_training(
            ws, entries, device=device, batch_size=batch_size, limits=limits, progress=progress
        )
    if engine != "local":
        raise AuditError(f"unknown engine {engine!r}; use local or ray")

    with ws.writing(), Store(ws.db_path) as store:
        encoder = embed.load(ws.encoder_dir(), ws.device(device))
        table = VectorTable.for_encoder(ws.lancedb_uri, encoder, ws.config.index)
        ledger = IndexLedger(store, encoder, table, entries, ws.lancedb_uri)
        by_path = ledger.by_path

        def load(path: str) -> ingest.Item:
            return ingest.load_item(path, limits, encoder.preprocess, ledger.is_embedded, ledger.caption_of)

        progress.start("indexing", len(by_path))
        batch: list[tuple[Entry, ingest.Item]] = []

        def flush() -> None:
            if not batch:
                return
            ids, new_rows = ledger.assign(batch)
            vectors = encoder.index_features(
                np.stack([item.pixels for _, item in batch]),
                [item.text for _, item in batch],
                [item.sha256 for _, item in batch],
            )
            table.add(ids, [entry.contributor_id for entry, _ in batch], vectors)
            ledger.commit(ids, new_rows, len(batch))
            batch.clear()

        for entry_path, item in zip(by_path, ingest.load_all(by_path, ws.config.scan.loader_threads, load)):
            progress.advance()
            if ledger.take(item):
                batch.append((by_path[entry_path], item))
            if len(batch) >= batch_size:
                flush()
        flush()
        ledger.finish()
    ledger.result.seconds = time.perf_counter() - started
    return ledger.result


def read_entries(training_dir: str | os.PathLike | None, manifest: str | os.PathLike | None = None) -> list[Entry]:
    """The training entries of a folder: from its manifest (given, or TRAINING_DIR/contributors.csv), else one per image."""
    if training_dir is None:
        return []
    training_dir = Path(training_dir).resolve()
    if not training_dir.is_dir():
        raise AuditError(f"training folder {training_dir} does not exist")
    if manifest is None and (training_dir / MANIFEST_NAME).is_file():
        manifest = training_dir / MANIFEST_NAME
    return read_manifest(manifest) if manifest else discover_entries(training_dir)


class IndexLedger:
    """The audit-store side of `audit index`, shared by every engine: contributors, which contents are
    registered and embedded, id assignment, and the commit of each batch after its vectors are written.

    Opening it drops vectors whose DuckDB rows never committed (a crash between the two writes)."""

    def __init__(
        self, store: Store, encoder: embed.Encoder, table: VectorTable, entries: list[Entry], lancedb_uri: str
    ):
        self.store = store
        self.table = table
        self.encoder_id = encoder.id
        self.lancedb_uri = lancedb_uri
        self.result = IndexResult(encoder.id)
        with store.transaction():
            record_encoder(store, encoder.id, encoder.name, str(encoder.directory), encoder.dim, encoder.config)
            upsert_contributors(store, entries)
        table.delete_ids_above(store.value("SELECT coalesce(max(id), 0) FROM training_images"))

        self.embedded = set(table.ids().tolist())
        self.registered = {sha: i for sha, i in store.rows("SELECT sha256, id FROM training_images")}
        entries = list(entries)
        # Registered images this encoder has not embedded yet (e.g. after switching encoders).
        for i, path, contributor, caption in store.rows(
            "SELECT id, path, contributor_id, caption FROM training_images ORDER BY id"
        ):
            if i not in self.embedded:
                entries.append(Entry(path=path, contributor_id=contributor, caption=caption, known_id=i))
        self.by_path = {e.path: e for e in entries}
        self.next_id = store.next_id("training_images")
        self.seen: set[str] = set()
        self.errors: list[tuple[str, str, str]] = []

    def is_embedded(self, sha256: str) -> bool:
        return sha256 in self.registered and self.registered[sha256] in self.embedded

    def caption_of(self, path: str, info: dict) -> tuple[str | None, str]:
        entry = self.by_path[path]
        if entry.caption:
            return entry.caption, "manifest"
        return prompts.read_sidecar(path)

    def take(self, item: ingest.Item) -> bool:
        """Count one loaded file; True when its content should be embedded in the caller's next batch."""
        if item.error:
            self.errors.append((item.path, item.error.code, item.error.reason))
            return False
        if item.skipped or item.sha256 in self.seen:
            self.result.unchanged += 1
            return False
        self.seen.add(item.sha256)
        return True

    def assign(self, batch: list[tuple[Entry, ingest.Item]]) -> tuple[np.ndarray, list[tuple[int, Entry, ingest.Item]]]:
        """The vector id of each item (its registered id, or the next new one) and the rows to register."""
        ids, new_rows = [], []
        for entry, item in batch:
            if item.sha256 in self.registered:
                ids.append(self.registered[item.sha256])
                self.result.re_embedded += 1
            else:
                ids.append(self.next_id)
                new_rows.append((self.next_id, entry, item))
                self.next_id += 1
        return np.asarray(ids, np.int64), new_rows

    def commit(self, ids: np.ndarray, new_rows: list[tuple[int, Entry, ingest.Item]], n: int) -> None:
        """Register the batch's new images; call after its vectors are in the table."""
        with self.store.transaction():
            self.store.insert_arrow("training_images", _training_rows(new_rows))
        for i, _entry, item in new_rows:
            self.registered[item.sha256] = i
        self.embedded.update(np.asarray(ids).tolist())
        self.result.added += len(new_rows)
        log.info("indexed batch of %d (%d new)", n, len(new_rows))

    def finish(self) -> IndexResult:
        """Record the errors, build or maintain the ANN index, and record the vector table."""
        result, errors, table = self.result, self.errors, self.table
        result.errors = len(errors)
        result.error_samples = [(p, r) for p, _, r in errors[:5]]
        with self.store.transaction():
            self.store.insert_arrow(
                "index_errors",
                pa.table(
                    {"path": [e[0] for e in errors], "code": [e[1] for e in errors], "reason": [e[2] for e in errors]}
                ),
            )
            result.ann_index = table.maintain()
            result.rows = table.count()
            record_vector_table(
                self.store, self.encoder_id, self.lancedb_uri, table.name, result.rows, table.version, result.ann_index
            )
        return result


def _training_rows(rows: list[tuple[int, Entry, ingest.Item]]) -> pa.Table:
    now = utcnow()
    return pa.table(
        {
            "id": pa.array([i for i, _, _ in rows], pa.int64()),
            "path": [item.path for _, _, item in rows],
            "sha256": [item.sha256 for _, _, item in rows],
            "contributor_id": [entry.contributor_id for _, entry, _ in rows],
            "caption": [item.text for _, _, item in rows],
            "caption_source": [item.text_source for _, _, item in rows],
            "width": pa.array([item.width for _, _, item in rows], pa.int32()),
            "height": pa.array([item.height for _, _, item in rows], pa.int32()),
            "indexed_at": pa.array([now] * len(rows), pa.timestamp("us")),
        }
    )


def reindex(
    ws: Workspace, bundle: str | os.PathLike, *, device: str | None = None, progress: Progress | None = None
) -> IndexResult:
    """Point the workspace at another encoder and embed every registered training image into its own table.
    Attributions made by the previous encoder keep its id and stay queryable."""
    embed.read_config(bundle)  # fail before changing anything
    previous = ws.config.encoder.path
    ws.config.encoder.path = str(Path(bundle).expanduser().resolve())
    try:
        return index_training(ws, None, device=device, progress=progress)
    except Exception:
        ws.config.encoder.path = previous
        raise
    finally:
        ws.save()
