"""`audit scan`: attribute every generated image in a folder to its nearest training images.

Before the first batch, the workspace's model identity is settled (model_identity.prepare: checkpoint files
hashed once, stored generations matched again if it changed). Per batch: decode (in a loader pool, overlapping the
model) and read everything the file declares about how it was made (prompts.read_generation; the negative prompt
is stored, never embedded), decide whether it declares the workspace's model, embed image ⊕ prompt,
search the training vectors, turn the top-k scores into shares, and commit the
generation rows, attribution rows and errors in one DuckDB transaction. A kill at
any moment loses at most the batch in flight; rerunning skips every image whose
sha256 is already attributed by this encoder, so no row is ever duplicated.

Every file holding attributed content gets a `generation_files` row with the prompt read from that file (two files
with the same bytes are one generation but keep both prompts); a file seen again only has its `last_scan_id` moved.
Files of a type the scan cannot read are counted and listed in `scan_errors` (code `unsupported`). A scan stopped by
Ctrl-C, SIGTERM or an error is marked `interrupted` on the way out; its committed batches stand.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
from threadpoolctl import threadpool_limits

from . import embed, ingest, model_identity, prompts
from .errors import AuditError
from .index import reconcile
from .model_identity import ModelIdentity
from .progress import Progress, Silent
from .search import VectorTable
from .store import Store, record_encoder, utcnow
from .workspace import Workspace

log = logging.getLogger("auditor")

METHOD = "fast"


@dataclass
class ScanResult:
    scan_id: int
    encoder_id: str
    seen: int = 0
    attributed: int = 0
    skipped: int = 0
    errors: int = 0
    unsupported: int = 0
    seconds: float = 0.0
    # Generations attributed in this scan, by the model they declare: (hash and/or name, model_match) -> count.
    models: Counter = field(default_factory=Counter)
    identity_known: bool = True  # False: the workspace's model identity is empty ([model], `audit model`)

    @property
    def images_per_second(self) -> float:
        return self.attributed / self.seconds if self.seconds > 0 else 0.0


def scan(
    ws: Workspace,
    outputs_dir: str | os.PathLike,
    *,
    top_k: int | None = None,
    device: str | None = None,
    batch_size: int | None = None,
    progress: Progress | None = None,
    engine: str = "local",
    announce: Callable[[str], None] = lambda message: None,
) -> ScanResult:
    progress = progress or Silent()
    top_k = top_k or ws.config.scan.top_k
    if top_k < 1:
        raise AuditError("--top-k must be at least 1")
    batch_size = batch_size or ws.config.encoder.batch_size
    limits = ws.limits
    root = os.path.abspath(os.fspath(outputs_dir))
    try:
        found = ingest.walk(root)
    except FileNotFoundError:
        raise AuditError(f"outputs folder {outputs_dir} does not exist") from None
    if engine == "ray":
        from . import engine_ray

        return engine_ray.scan(
            ws,
            root,
            found,
            top_k=top_k,
            device=device,
            batch_size=batch_size,
            limits=limits,
            progress=progress,
            announce=announce,
        )
    if engine != "local":
        raise AuditError(f"unknown engine {engine!r}; use local or ray")

    # numpy's BLAS (the exact search) single-threaded: its threads spin after each call and took the CPU the
    # model and the decoders need (docs/benchmarks.md: scan/bare 0.69 -> 0.89-0.98 in an A/B run on 2 cores).
    with ws.writing(), ScanLedger.store_for(ws) as store, threadpool_limits(1, user_api="blas"):
        encoder = embed.load(ws.encoder_dir(), ws.device(device), ws.config.encoder.precision)
        table = ws.vector_table(encoder)
        reconcile(store, table)  # vectors of an interrupted `audit index` must not be attributed
        searcher = table.searcher(device=encoder.device)
        identity = model_identity.prepare(ws, store, announce)
        ledger = ScanLedger(store, root, encoder, table, top_k, identity=identity)
        ledger.note_unreadable(found)
        paths = found.images
        k = ledger.k

        def load(path: str) -> ingest.Item:
            return ingest.load_item(path, limits, encoder.preprocess, ledger.is_done, recorded=ledger.is_recorded)

        progress.start("scanning", len(paths))
        batch: list[ingest.Item] = []

        def flush() -> None:
            ids, scores = np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
            if batch:
                features = encoder.features(np.stack([item.pixels for item in batch]), [item.text for item in batch])
                ids, scores = searcher.search(features, k)
            ledger.commit(batch, ids, scores)
            batch.clear()

        with ledger.running():
            # Read a whole batch ahead: the next batch decodes while this one is embedded.
            for item in ingest.load_all(paths, ws.config.scan.loader_threads, load, ahead=batch_size):
                progress.advance()
                if ledger.take(item):
                    batch.append(item)
                if len(batch) >= batch_size:
                    flush()
            flush()
            return ledger.finish()


class ScanLedger:
    """The audit-store side of a scan, shared by every engine: the scan row, which contents are already
    attributed, and one transaction per committed batch (generations, attributions, errors, counters)."""

    @staticmethod
    def store_for(ws: Workspace) -> Store:
        """The scan's store: it lets waiting readers in after each batch's commit and reopens at the next (the
        caches below stay valid: the workspace's writer lock keeps every other writer out meanwhile)."""
        return Store(ws.db_path, wait=ws.config.store.writer_timeout, yield_to_readers=True)

    def __init__(
        self,
        store: Store,
        root: str,
        encoder: embed.Encoder,
        table: VectorTable,
        top_k: int,
        device: str | None = None,
        *,
        identity: ModelIdentity | None = None,
    ):
        self.store = store
        self.identity = identity or ModelIdentity([])
        self.encoder_id = encoder.id
        self.temperature = encoder.temperature
        self.k = min(top_k, table.count())
        self.started = time.perf_counter()
        with store.transaction():
            record_encoder(store, encoder.id, encoder.name, str(encoder.directory), encoder.dim, encoder.config)
            # A scan still 'running' here was killed: its committed batches stand, the rest is redone now.
            store.con.execute("UPDATE scans SET status = 'interrupted' WHERE status = 'running'")
            self.scan_id = store.next_id("scans")
            store.con.execute(
                "INSERT INTO scans (id, started_at, root, encoder_id, index_version, top_k, device, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
                [
                    self.scan_id,
                    utcnow(),
                    ingest.display_path(root),
                    encoder.id,
                    table.version,
                    self.k,
                    device or str(encoder.device),
                ],
            )
        self.result = ScanResult(self.scan_id, encoder.id, identity_known=not self.identity.empty)
        self.known = dict(store.rows("SELECT sha256, id FROM generations"))
        self.done = {
            row[0]
            for row in store.rows(
                "SELECT DISTINCT g.sha256 FROM attributions a JOIN generations g ON g.id = a.generation_id"
                " WHERE a.method = ? AND a.encoder_id = ?",
                [METHOD, encoder.id],
            )
        }
        # Files already recorded, as (sha256, path): seeing one again reads nothing but its bytes (for the hash).
        self.recorded = set(
            store.rows("SELECT g.sha256, f.path FROM generation_files f JOIN generations g ON g.id = f.generation_id")
        )
        self.next_gen = store.next_id("generations")
        self.errors: list[ingest.Item] = []
        self.files: list[ingest.Item] = []
        self.pending: set[str] = set()

    def is_done(self, sha256: str) -> bool:
        return sha256 in self.done

    def is_recorded(self, sha256: str, path: str) -> bool:
        """This file (display path) with this content has its generation_files row already."""
        return (sha256, path) in self.recorded

    def note_unreadable(self, found: ingest.Discovery) -> None:
        """Files of a type the scan cannot read (code `unsupported`) and folders it cannot list (`unreadable`), for
        scan_errors with the first commit."""
        for path, reason in found.unsupported:
            self.errors.append(ingest.Item(ingest.display_path(path), error=ingest.IngestError("unsupported", reason)))
        for path, reason in found.unlisted:
            self.errors.append(ingest.Item(ingest.display_path(path), error=ingest.IngestError("unreadable", reason)))

    @contextlib.contextmanager
    def running(self) -> Iterator[None]:
        """Mark the scan `interrupted` (with finished_at) when anything, Ctrl-C and SIGTERM included, stops it."""
        try:
            yield
        except BaseException:
            self.interrupt()
            raise

    def interrupt(self, status: str = "interrupted") -> None:
        """Mark the scan stopped: `interrupted`, or `failed` (a Ray job failed: engine_ray)."""
        try:
            with contextlib.suppress(Exception):  # a batch's transaction the interrupt cut short
                self.store.con.execute("ROLLBACK")
            self.store.con.execute(
                "UPDATE scans SET status = ?, finished_at = ? WHERE id = ? AND status = 'running'",
                [status, utcnow(), self.scan_id],
            )
        except Exception as exc:  # the disk may be full: the next scan marks it instead
            log.warning("scan %d: could not mark it interrupted: %s", self.scan_id, exc)

    def take(self, item: ingest.Item) -> bool:
        """Count one loaded file; True when it is new content the caller should attribute in its next batch."""
        self.result.seen += 1
        if item.error:
            self.errors.append(item)
            return False
        if item.text_read or (item.sha256, item.path) in self.recorded:
            self.files.append(item)
        if item.skipped or item.sha256 in self.done or item.sha256 in self.pending:
            self.result.skipped += 1
            return False
        self.pending.add(item.sha256)
        return True

    def commit(self, batch: list[ingest.Item], ids: np.ndarray, scores: np.ndarray) -> None:
        """Commit a batch (its top-k training ids and cosine scores, (n, k)) and the errors taken since the last commit."""
        gen_ids, new_rows = [], []
        matches = {item.sha256: _model_match(item, self.identity) for item in batch}
        for item in batch:
            if item.sha256 not in self.known:
                self.known[item.sha256] = self.next_gen
                new_rows.append(item)
                self.next_gen += 1
            gen_ids.append(self.known[item.sha256])
        scores = np.asarray(scores).reshape(len(batch), self.k)
        ids = np.asarray(ids, np.int64).reshape(len(batch), self.k)
        shares = embed.softmax_shares(scores.astype(np.float64), self.temperature) if batch else np.zeros((0, self.k))
        errors, result, scan_id = self.errors, self.result, self.scan_id
        n_unsupported = sum(1 for item in errors if item.error.code == "unsupported")
        seen_again = [item for item in self.files if (item.sha256, item.path) in self.recorded]
        new_files = [item for item in self.files if (item.sha256, item.path) not in self.recorded]
        with self.store.transaction():
            self.store.insert_arrow("generations", _generation_rows(new_rows, self.known, scan_id, matches))
            self.store.insert_arrow(
                "attributions", _attribution_rows(gen_ids, ids, scores, shares, self.encoder_id, scan_id)
            )
            self.store.insert_arrow("generation_files", _file_rows(new_files, self.known, scan_id))
            self._seen_again(seen_again)
            self.store.insert_arrow("scan_errors", _error_rows(errors, scan_id))
            self.store.con.execute(
                "UPDATE scans SET n_seen = ?, n_attributed = n_attributed + ?, n_skipped = ?,"
                " n_errors = n_errors + ?, n_unsupported = n_unsupported + ? WHERE id = ?",
                [result.seen, len(batch), result.skipped, len(errors) - n_unsupported, n_unsupported, scan_id],
            )
        self.done.update(item.sha256 for item in batch)
        self.recorded.update((item.sha256, item.path) for item in new_files)
        self.pending.clear()
        result.attributed += len(batch)
        result.errors += len(errors) - n_unsupported
        result.unsupported += n_unsupported
        result.models.update((_declared(item), matches[item.sha256]) for item in batch)
        log.info("scan %d: committed batch of %d (%d attributed so far)", scan_id, len(batch), result.attributed)
        self.errors = []
        self.files = []

    def _seen_again(self, items: list[ingest.Item]) -> None:
        if not items:
            return
        seen = pa.table(
            {
                "generation_id": pa.array([self.known[item.sha256] for item in items], pa.int64()),
                "path": pa.array([item.path for item in items], pa.string()),
            }
        )
        self.store.con.register("_seen", seen)
        try:
            self.store.con.execute(
                "UPDATE generation_files SET last_scan_id = ? FROM _seen"
                " WHERE generation_files.generation_id = _seen.generation_id AND generation_files.path = _seen.path",
                [self.scan_id],
            )
        finally:
            self.store.con.unregister("_seen")

    def finish(self) -> ScanResult:
        self.result.seconds = time.perf_counter() - self.started
        self.store.con.execute(
            "UPDATE scans SET status = 'finished', finished_at = ? WHERE id = ?", [utcnow(), self.scan_id]
        )
        return self.result


def _model_match(item: ingest.Item, identity: ModelIdentity) -> str:
    md = item.metadata
    return identity.match(md.model_hash, md.model_name) if md else "none"


def _declared(item: ingest.Item) -> str:
    md = item.metadata
    return model_identity.model_label(md.model_hash, md.model_name) if md else model_identity.model_label(None, None)


MAX_SEED = 10**38  # HUGEINT holds any seed a generator writes (ComfyUI's go to 2**64 - 1); junk beyond is dropped


def _metadata_columns(items: list[ingest.Item]) -> dict:
    mds = [item.metadata or prompts.GenerationMetadata() for item in items]

    def column(name: str, kind: pa.DataType) -> pa.Array:
        return pa.array([getattr(md, name) for md in mds], kind)

    return {
        "negative_prompt": column("negative_prompt", pa.string()),
        "generator": column("generator", pa.string()),
        "metadata_source": pa.array([item.metadata.source if item.metadata else None for item in items], pa.string()),
        "model_name": column("model_name", pa.string()),
        "model_hash": column("model_hash", pa.string()),
        "seed": pa.array(
            [md.seed if md.seed is not None and abs(md.seed) < MAX_SEED else None for md in mds], pa.decimal128(38, 0)
        ),
        "steps": pa.array([_int32(md.steps) for md in mds], pa.int32()),
        "sampler": column("sampler", pa.string()),
        "cfg_scale": column("cfg_scale", pa.float64()),
        "declared_width": pa.array([_int32(md.width) for md in mds], pa.int32()),
        "declared_height": pa.array([_int32(md.height) for md in mds], pa.int32()),
        "metadata_raw": column("raw", pa.string()),
        "metadata_warnings": pa.array([md.warnings for md in mds], pa.list_(pa.string())),
        "digital_source_type": column("digital_source_type", pa.string()),
    }


def _int32(value: int | None) -> int | None:
    return value if value is not None and abs(value) < 2**31 else None


def _generation_rows(
    items: list[ingest.Item], known: dict[str, int], scan_id: int, matches: dict[str, str] | None = None
) -> pa.Table:
    matches = matches or {}
    return pa.table(
        {
            "id": pa.array([known[item.sha256] for item in items], pa.int64()),
            "sha256": [item.sha256 for item in items],
            "path": [item.path for item in items],
            "prompt": pa.array([item.text for item in items], pa.string()),
            "prompt_source": [item.text_source for item in items],
            "width": pa.array([item.width for item in items], pa.int32()),
            "height": pa.array([item.height for item in items], pa.int32()),
            "first_scan_id": pa.array([scan_id] * len(items), pa.int64()),
            **_metadata_columns(items),
            "model_match": pa.array([matches.get(item.sha256, "none") for item in items], pa.string()),
        }
    )


def _file_rows(items: list[ingest.Item], known: dict[str, int], scan_id: int) -> pa.Table:
    return pa.table(
        {
            "generation_id": pa.array([known[item.sha256] for item in items], pa.int64()),
            "path": pa.array([item.path for item in items], pa.string()),
            "prompt": pa.array([item.text for item in items], pa.string()),
            "prompt_source": pa.array([item.text_source for item in items], pa.string()),
            "first_scan_id": pa.array([scan_id] * len(items), pa.int64()),
            "last_scan_id": pa.array([scan_id] * len(items), pa.int64()),
        }
    )


def _attribution_rows(
    gen_ids, ids: np.ndarray, scores: np.ndarray, shares: np.ndarray, encoder_id: str, scan_id: int
) -> pa.Table:
    n, k = ids.shape
    valid = ids.ravel() >= 0  # an ANN probe can come back short of k
    return pa.table(
        {
            "generation_id": pa.array(np.repeat(np.asarray(gen_ids, np.int64), k)[valid]),
            "method": pa.array([METHOD] * int(valid.sum()), pa.string()),
            "encoder_id": pa.array([encoder_id] * int(valid.sum()), pa.string()),
            "rank": pa.array(np.tile(np.arange(1, k + 1, dtype=np.int32), n)[valid]),
            "training_id": pa.array(ids.ravel()[valid]),
            "score": pa.array(scores.ravel().astype(np.float64)[valid]),
            "share": pa.array(shares.ravel()[valid]),
            "scan_id": pa.array(np.full(int(valid.sum()), scan_id, np.int64)),
        }
    )


def _error_rows(items: list[ingest.Item], scan_id: int) -> pa.Table:
    return pa.table(
        {
            "scan_id": pa.array([scan_id] * len(items), pa.int64()),
            "path": [item.path for item in items],
            "code": [item.error.code for item in items],
            "reason": [item.error.reason for item in items],
        }
    )
