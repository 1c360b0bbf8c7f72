"""A collection of teacher-ranked queries: reading it back (only queries whose image is still the one ranked), and
moving it between workspaces (`audit distill export` / `import`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from .. import diffusion, ingest
from ..errors import AuditError
from ..store import Store
from ..workspace import Workspace


def _ranked_bytes(path: str, sha256: str | None, limits: ingest.Limits) -> bytes:
    """A collected query's file as the teacher ranked it. Raises ingest.IngestError when the file is gone, unreadable,
    or holds other bytes than those ranked (`sha256`; None for queries collected before it was recorded)."""
    data = ingest.read_bytes(path, limits)
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ingest.IngestError("changed", "the file has changed since the teacher ranked it")
    return data


def read_query(path: str, sha256: str | None, limits: ingest.Limits) -> Image.Image:
    """A collected query's image as the teacher ranked it (the errors of _ranked_bytes, or one for bytes that are no
    image)."""
    return ingest.decode(_ranked_bytes(path, sha256, limits), limits)[0]


def current_queries(
    rows: list[tuple], limits: ingest.Limits, announce: Callable[[str], None] = lambda message: None
) -> tuple[list[tuple], list[Image.Image]]:
    """The rows (id, path, …, sha256 last) whose image is still the one ranked, and those images; the others are left
    out and announced: a ranking is only worth what the image beside it is."""
    kept, images = [], []
    for row in rows:
        try:
            images.append(read_query(row[1], row[-1], limits))
        except ingest.IngestError as exc:
            announce(
                f"left out query {row[0]} ({row[1]}): {exc.reason}; `audit distill collect` ranks a folder's new file again"
            )
            continue
        kept.append(row[:-1])
    return kept, images


def collected_queries(store: Store, split: str) -> list[tuple[int, str, str | None, list[int], str | None]]:
    """The current collected queries of a split: (id, image path, prompt, candidate training ids in backbone order,
    sha256 of the image ranked)."""
    return store.rows(
        "SELECT q.id, q.path, q.prompt, list(r.training_id ORDER BY r.backbone_rank), q.sha256 FROM distill_queries q"
        " JOIN distill_rankings r ON r.query_id = q.id WHERE q.split = ? AND q.collected_at IS NOT NULL AND q.replaced_at IS NULL"
        " GROUP BY q.id, q.path, q.prompt, q.sha256 ORDER BY q.id",
        [split],
    )


def load_rankings(
    store: Store,
    split: str,
    index_of: dict[int, int],
    limits: ingest.Limits,
    announce: Callable[[str], None] = lambda message: None,
) -> tuple[list[tuple[int, str, str, np.ndarray, np.ndarray]], list[Image.Image]]:
    """A split's rankings, (query id, path, prompt, candidate rows of the training matrix, teacher ranks), and the query
    images; a query whose image is gone or changed since it was ranked is left out (current_queries)."""
    rows = store.rows(
        "SELECT q.id, q.path, q.prompt, list(r.training_id ORDER BY r.teacher_rank), list(r.teacher_rank ORDER BY r.teacher_rank), q.sha256"
        " FROM distill_queries q JOIN distill_rankings r ON r.query_id = q.id WHERE q.split = ? AND q.collected_at IS NOT NULL"
        " AND q.replaced_at IS NULL GROUP BY q.id, q.path, q.prompt, q.sha256 ORDER BY q.id",
        [split],
    )
    rows, images = current_queries(rows, limits, announce)
    return [
        (qid, path, prompt, np.array([index_of[t] for t in tids]), np.array(ranks))
        for qid, path, prompt, tids, ranks in rows
    ], images


# ---------------------------------------------------------------------- sharing a collection
# A collection folder: queries.parquet (distill_queries rows, path relative to the folder), rankings.parquet
# (distill_rankings rows with the candidate named by its image's sha256, not by a workspace's id), replicates.parquet
# (distill_replicates rows, named the same way) and images/.
QUERIES_FILE, RANKINGS_FILE, REPLICATES_FILE = "queries.parquet", "rankings.parquet", "replicates.parquet"


def _by_content(store: Store, table: str, columns: str, order: str) -> pa.Table:
    """A per-candidate table's rows for the collected queries, each candidate named by its image's sha256."""
    return store.con.sql(
        f"SELECT r.query_id, t.sha256 AS training_sha256, {columns} FROM {table} r"
        " JOIN training_images t ON t.id = r.training_id JOIN distill_queries q ON q.id = r.query_id"
        f" WHERE q.collected_at IS NOT NULL AND q.replaced_at IS NULL ORDER BY {order}"
    ).to_arrow_table()


@dataclass
class ImportResult:
    queries: int = 0
    rankings: int = 0
    replicates: int = 0  # replicate scores (distill_replicates rows)
    skipped: int = 0  # queries of a collection (settings hash) the store already holds
    ids: dict[int, int] = field(default_factory=dict)  # the collection's query id → this workspace's


def export_collection(ws: Workspace, out: str | os.PathLike) -> int:
    """Write every collected query (its image, prompt, split and the teacher's ranking of its candidates) to a folder that
    `import_collection` reads into another workspace on the same model and training set: collect once where the
    teacher runs fast, train and evaluate anywhere. Returns the number of queries written."""
    out = Path(out)
    if (out / QUERIES_FILE).exists():
        raise AuditError(f"{out} already holds a collection; export into a new folder")
    with ws.reader() as store:
        queries = store.con.sql(
            "SELECT * EXCLUDE (replaced_at) FROM distill_queries WHERE collected_at IS NOT NULL AND replaced_at IS NULL"
            " ORDER BY id"
        ).to_arrow_table()
        rankings = _by_content(
            store,
            "distill_rankings",
            "r.influence, r.raw_influence, r.teacher_rank, r.backbone_rank",
            "r.query_id, r.backbone_rank",
        )
        replicates = _by_content(
            store, "distill_replicates", "r.settings_hash, r.influence", "r.settings_hash, r.query_id, r.training_id"
        )
    if queries.num_rows == 0:
        raise AuditError("no collected queries to export; run `audit distill collect` first")
    (out / "images").mkdir(parents=True, exist_ok=True)
    names = []
    for qid, path, sha in zip(*(queries.column(c).to_pylist() for c in ("id", "path", "sha256"))):
        try:
            data = _ranked_bytes(path, sha, ws.limits)
        except ingest.IngestError as exc:
            raise AuditError(
                f"query image {path} (query {qid}): {exc.reason}; the collection cannot be exported without the image it ranked"
            ) from None
        names.append(f"images/q{qid:06d}{Path(path).suffix.lower() or '.png'}")
        (out / names[-1]).write_bytes(data)
    pq.write_table(queries.set_column(queries.column_names.index("path"), "path", pa.array(names)), out / QUERIES_FILE)
    pq.write_table(rankings, out / RANKINGS_FILE)
    pq.write_table(replicates, out / REPLICATES_FILE)
    return queries.num_rows


def import_collection(
    ws: Workspace, folder: str | os.PathLike, *, model: str | os.PathLike | None = None
) -> ImportResult:
    """Add an exported collection to this workspace's store (new query ids; images copied into the workspace).
    Refuses one ranked with another diffusion model, or over training images this workspace has not registered;
    importing the same collection twice adds nothing."""
    folder = Path(folder)
    missing = [name for name in (QUERIES_FILE, RANKINGS_FILE, REPLICATES_FILE) if not (folder / name).is_file()]
    if missing:
        raise AuditError(
            f"{folder} is not a collection folder (no {', '.join(missing)}); make one with `audit distill export DIR`"
        )
    queries, rankings, replicates = (
        pq.read_table(folder / name) for name in (QUERIES_FILE, RANKINGS_FILE, REPLICATES_FILE)
    )
    ours = diffusion.model_hash(ws.model_source(model), ws.dir / "cache")
    theirs = sorted(set(queries.column("model_hash").to_pylist()))
    if theirs != [ours]:
        raise AuditError(
            f"the collection was ranked by the teacher on model {', '.join(theirs)}, this workspace's model is {ours}; "
            "rankings hold only for the model they were made with: import into a workspace on that model"
        )
    result = ImportResult()
    with ws.writing(), Store(ws.db_path) as store:
        id_of = {sha: tid for sha, tid in store.rows("SELECT sha256, min(id) FROM training_images GROUP BY 1")}
        unknown = {h for t in (rankings, replicates) for h in t.column("training_sha256").to_pylist()} - id_of.keys()
        if unknown:
            raise AuditError(
                f"{len(unknown)} training images the collection ranks are not registered in this workspace; "
                "`audit index` the training set it was collected on first"
            )
        held = {h for (h,) in store.rows("SELECT DISTINCT settings_hash FROM distill_queries")}
        new = queries.filter(pa.array([h not in held for h in queries.column("settings_hash").to_pylist()]))
        result.skipped = queries.num_rows - new.num_rows
        if new.num_rows == 0:
            return result
        next_id = store.next_id("distill_queries")
        result.ids = {qid: next_id + i for i, qid in enumerate(new.column("id").to_pylist())}
        paths, digests = [], []
        # Collections exported before query digests were recorded have none: the image as shipped is taken for the one ranked.
        recorded = new.column("sha256").to_pylist() if "sha256" in new.column_names else [None] * new.num_rows
        for qid, name, settings_hash, sha in zip(
            *(new.column(c).to_pylist() for c in ("id", "path", "settings_hash")), recorded
        ):
            data = (folder / name).read_bytes()
            digests.append(hashlib.sha256(data).hexdigest())
            if sha is not None and digests[-1] != sha:
                raise AuditError(
                    f"{folder / name} is not the image the teacher ranked for query {qid}; export the collection again"
                )
            target = ws.dir / "distill" / settings_hash / f"q{result.ids[qid]:06d}{Path(name).suffix}"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            paths.append(str(target))
        new = (
            new.drop_columns([c for c in ("id", "path", "sha256") if c in new.column_names])
            .append_column("id", pa.array(list(result.ids.values()), pa.int64()))
            .append_column("path", pa.array(paths))
            .append_column("sha256", pa.array(digests))
        )

        def by_id(table: pa.Table, rest: tuple[str, ...]) -> pa.Table:
            """The rows of the imported queries, with this workspace's query and training ids."""
            table = table.filter(pa.array([q in result.ids for q in table.column("query_id").to_pylist()], pa.bool_()))
            return pa.table(
                {
                    "query_id": pa.array([result.ids[q] for q in table.column("query_id").to_pylist()], pa.int64()),
                    "training_id": pa.array(
                        [id_of[h] for h in table.column("training_sha256").to_pylist()], pa.int64()
                    ),
                    **{c: table.column(c) for c in rest},
                }
            )

        ranked = by_id(rankings, ("influence", "raw_influence", "teacher_rank", "backbone_rank"))
        replicated = by_id(replicates, ("settings_hash", "influence"))
        with store.transaction():
            store.insert_arrow("distill_queries", new)
            store.insert_arrow("distill_rankings", ranked)
            store.insert_arrow("distill_replicates", replicated)
        result.queries, result.rankings, result.replicates = new.num_rows, ranked.num_rows, replicated.num_rows
    return result
