"""`audit scan`: attribute every generated image in a folder to its nearest training images.

Per batch: decode (in a loader pool, overlapping the model), embed image ⊕ prompt,
search the training vectors, turn the top-k scores into shares, and commit the
generation rows, attribution rows and errors in one DuckDB transaction. A kill at
any moment loses at most the batch in flight; rerunning skips every image whose
sha256 is already attributed by this encoder, so no row is ever duplicated.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from . import embed, ingest
from .errors import AuditError
from .progress import Progress, Silent
from .search import IndexSettings, VectorTable
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
    seconds: float = 0.0

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
) -> ScanResult:
    progress = progress or Silent()
    top_k = top_k or int(ws.config["scan"]["top_k"])
    if top_k < 1:
        raise AuditError("--top-k must be at least 1")
    batch_size = batch_size or int(ws.config["encoder"]["batch_size"])
    limits = ingest.Limits(int(ws.config["scan"]["max_pixels"]), int(ws.config["scan"]["max_file_bytes"]))
    root = os.path.abspath(os.fspath(outputs_dir))
    try:
        paths = ingest.discover(root)
    except FileNotFoundError:
        raise AuditError(f"outputs folder {outputs_dir} does not exist") from None

    with ws.writing(), Store(ws.db_path) as store:
        encoder = embed.load(ws.encoder_dir(), device or ws.config["encoder"]["device"])
        table = VectorTable(ws.lancedb_uri, encoder.id, encoder.dim, IndexSettings.from_config(ws.config["index"]))
        searcher = table.searcher()
        k = min(top_k, table.count())

        with store.transaction():
            record_encoder(store, encoder.id, encoder.name, str(encoder.directory), encoder.dim, encoder.config)
            # A scan still 'running' here was killed: its committed batches stand, the rest is redone now.
            store.con.execute("UPDATE scans SET status = 'interrupted' WHERE status = 'running'")
            scan_id = store.next_id("scans")
            store.con.execute(
                "INSERT INTO scans (id, started_at, root, encoder_id, index_version, top_k, device, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, 'running')",
                [scan_id, utcnow(), ingest.display_path(root), encoder.id, table.version, k, str(encoder.device)],
            )
        result = ScanResult(scan_id, encoder.id)
        known = dict(store.rows("SELECT sha256, id FROM generations"))
        done = {
            row[0]
            for row in store.rows(
                "SELECT DISTINCT g.sha256 FROM attributions a JOIN generations g ON g.id = a.generation_id"
                " WHERE a.method = ? AND a.encoder_id = ?",
                [METHOD, encoder.id],
            )
        }
        next_gen = store.next_id("generations")

        def load(path: str) -> ingest.Item:
            return ingest.load_item(path, limits, encoder.preprocess, lambda sha: sha in done)

        started = time.perf_counter()
        progress.start("scanning", len(paths))
        batch: list[ingest.Item] = []
        errors: list[ingest.Item] = []

        def flush() -> None:
            nonlocal next_gen
            gen_ids, new_rows = [], []
            for item in batch:
                if item.sha256 not in known:
                    known[item.sha256] = next_gen
                    new_rows.append(item)
                    next_gen += 1
                gen_ids.append(known[item.sha256])
            ids, scores, shares = np.zeros((0, k), np.int64), np.zeros((0, k)), np.zeros((0, k))
            if batch:
                features = encoder.features(np.stack([item.pixels for item in batch]), [item.text for item in batch])
                ids, scores = searcher.search(features, k)
                shares = embed.softmax_shares(scores.astype(np.float64), encoder.temperature)
            with store.transaction():
                store.insert_arrow("generations", _generation_rows(new_rows, known, scan_id))
                store.insert_arrow("attributions", _attribution_rows(gen_ids, ids, scores, shares, encoder.id, scan_id))
                store.insert_arrow("scan_errors", _error_rows(errors, scan_id))
                store.con.execute(
                    "UPDATE scans SET n_seen = ?, n_attributed = n_attributed + ?, n_skipped = ?, n_errors = n_errors + ? WHERE id = ?",
                    [result.seen, len(batch), result.skipped, len(errors), scan_id],
                )
            done.update(item.sha256 for item in batch)
            result.attributed += len(batch)
            result.errors += len(errors)
            log.info("scan %d: committed batch of %d (%d attributed so far)", scan_id, len(batch), result.attributed)
            batch.clear()
            errors.clear()

        for item in ingest.load_all(paths, int(ws.config["scan"]["loader_threads"]), load):
            result.seen += 1
            progress.advance()
            if item.error:
                errors.append(item)
            elif item.skipped or item.sha256 in done or any(item.sha256 == b.sha256 for b in batch):
                result.skipped += 1
            else:
                batch.append(item)
            if len(batch) >= batch_size:
                flush()
        flush()
        result.seconds = time.perf_counter() - started
        store.con.execute("UPDATE scans SET status = 'finished', finished_at = ? WHERE id = ?", [utcnow(), scan_id])
    return result


def _generation_rows(items: list[ingest.Item], known: dict[str, int], scan_id: int) -> pa.Table:
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
        }
    )


def _attribution_rows(gen_ids, ids: np.ndarray, scores: np.ndarray, shares: np.ndarray, encoder_id: str, scan_id: int) -> pa.Table:
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
