"""Search: the training vectors in a LanceDB table, and nearest-neighbour lookup over them.

One table per encoder (`training_<encoder id>`), so switching encoders never mixes
vector spaces and earlier tables stay readable. The encoder also sets the metric: cosine,
or the inner product for a bundle with influence strengths (embed.py). Below `index.ann_threshold` rows the
search is exact (a matrix product over all vectors, the highest precision); from it on
LanceDB's ANN index (IVF_PQ by default) is built and used with a refine step that
re-ranks by exact distance. On a CUDA device the search is exact at any size while the training
vectors fit in a fraction of the GPU's free memory: one matrix product per batch of queries there
(`MatrixSearcher`) is faster than the ANN probe and loses nothing.

Appended rows: LanceDB searches rows the index does not cover exactly, so appends are
found at once. We measured (lancedb 0.40 / lance 14) that `optimize()`'s incremental
merge of new rows into an IVF_PQ index dropped recall@50 from 0.996 to 0.70 on
clustered data, while a rebuilt index kept 0.993; so appended rows stay in the exact
delta (files compacted) until they exceed `index.rebuild_fraction` of the indexed
rows, and then the index is rebuilt.
"""

from __future__ import annotations

import math

import lancedb
import numpy as np
import pyarrow as pa

from .config import IndexSettings
from .errors import AuditError

# Lance dataset config keys naming the workspace that owns a table (schemas/README.md, `workspace`).
OWNER_ID = "auditor.workspace_id"
OWNER_DIR = "auditor.workspace_dir"


def table_name(encoder_id: str) -> str:
    return f"training_{encoder_id}"


def vector_schema(dim: int) -> pa.Schema:
    return pa.schema([("id", pa.int64()), ("contributor_id", pa.string()), ("vector", pa.list_(pa.float32(), dim))])


def _divisor_near(dim: int, target: int) -> int:
    return max(d for d in range(1, dim + 1) if dim % d == 0 and d <= max(1, target))


class VectorTable:
    """The training vectors of one encoder."""

    def __init__(
        self,
        uri: str,
        encoder_id: str,
        dim: int,
        settings: IndexSettings,
        metric: str = "cosine",
        storage_options: dict[str, str] | None = None,
    ):
        if metric not in ("cosine", "dot"):
            raise AuditError(f"unknown vector metric {metric!r}; use cosine or dot")
        self.uri = uri
        self.name = table_name(encoder_id)
        self.dim = dim
        self.settings = settings
        self.metric = metric
        self.storage_options = storage_options or {}
        try:
            self.db = lancedb.connect(uri, storage_options=self.storage_options or None)
        except Exception as exc:
            raise AuditError(f"cannot open LanceDB at {uri}: {exc}") from None
        try:
            self.table = self.db.open_table(self.name)
        except (ValueError, FileNotFoundError):
            self.table = self.db.create_table(self.name, schema=vector_schema(dim))
        stored = self.table.schema.field("vector").type.list_size
        if stored != dim:
            raise AuditError(
                f"LanceDB table {self.name} holds {stored}-d vectors but the encoder makes {dim}-d; the bundle changed without a new id"
            )

    @classmethod
    def for_encoder(
        cls, uri: str, encoder, settings: IndexSettings, storage_options: dict[str, str] | None = None
    ) -> VectorTable:
        """The table of an encoder (embed.Encoder): its id, width and metric."""
        return cls(uri, encoder.id, encoder.dim, settings, encoder.metric, storage_options)

    def count(self) -> int:
        return self.table.count_rows()

    @property
    def version(self) -> int:
        return int(self.table.version)

    def ids(self) -> np.ndarray:
        if self.count() == 0:
            return np.zeros(0, np.int64)
        return self.table.to_lance().to_table(columns=["id"])["id"].to_numpy()

    def vectors(self, ids: np.ndarray) -> np.ndarray:
        """The stored vectors of the given ids, in that order."""
        if len(ids) == 0:
            return np.zeros((0, self.dim), np.float32)
        data = self.table.to_lance().to_table(
            columns=["id", "vector"], filter=f"id IN ({','.join(str(int(i)) for i in ids)})"
        )
        found = dict(
            zip(
                data["id"].to_numpy().tolist(),
                data["vector"].combine_chunks().flatten().to_numpy().reshape(-1, self.dim),
            )
        )
        return np.stack([found[int(i)] for i in ids])

    def add(self, ids: np.ndarray, contributor_ids: list[str | None], vectors: np.ndarray) -> None:
        data = pa.table(
            {
                "id": pa.array(ids, pa.int64()),
                "contributor_id": pa.array(contributor_ids, pa.string()),
                "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.astype(np.float32).ravel()), self.dim),
            },
            schema=vector_schema(self.dim),
        )
        self.table.add(data)

    def delete_ids(self, ids) -> None:
        """Drop the vectors of these ids (index.reconcile: those whose DuckDB row never committed)."""
        ids = sorted({int(i) for i in ids})
        for start in range(0, len(ids), 10_000):
            self.table.delete(f"id IN ({','.join(map(str, ids[start : start + 10_000]))})")

    def owner(self) -> tuple[str | None, str | None]:
        """(workspace id, its .audit folder) recorded in the table by the workspace that writes it (index.reconcile)."""
        config = self.table.to_lance().config()
        return config.get(OWNER_ID), config.get(OWNER_DIR)

    def claim(self, workspace_id: str, workspace_dir: str) -> None:
        """Record the workspace that writes this table (a Lance dataset config entry, kept by every later commit)."""
        self.table.to_lance().update_config({OWNER_ID: workspace_id, OWNER_DIR: workspace_dir})
        self.table.checkout_latest()

    def ann_index(self) -> str | None:
        for index in self.table.list_indices():
            if "vector" in index.columns:
                return index.index_type
        return None

    def maintain(self) -> str | None:
        """Build the ANN index once the table is big enough; rebuild it when appended rows outgrow the exact delta."""
        rows = self.count()
        current = self.ann_index()
        if rows < self.settings.ann_threshold:
            return current
        if current is not None:
            stats = self.table.index_stats(self._index_name())
            if stats.num_unindexed_rows <= self.settings.rebuild_fraction * stats.num_indexed_rows:
                self.table.to_lance().optimize.compact_files()
                return current
        self._build_index(rows)
        return self.ann_index()

    def _index_name(self) -> str:
        return next(index.name for index in self.table.list_indices() if "vector" in index.columns)

    def _build_index(self, rows: int) -> None:
        from lancedb.index import IvfPq

        # Lance trains at most rows/256 partitions; asking for more only warns.
        partitions = self.settings.num_partitions or max(1, min(int(math.sqrt(rows)), rows // 256))
        sub_vectors = self.settings.num_sub_vectors or _divisor_near(self.dim, self.dim // 4)
        self.table.create_index(
            "vector",
            config=IvfPq(distance_type=self.metric, num_partitions=partitions, num_sub_vectors=sub_vectors),
            replace=True,
        )

    def searcher(self, exact: bool | None = None, device=None) -> Searcher:
        """The search a scan uses: on a CUDA `device` (a torch device or its name) exact, as one matrix product
        on the GPU, whenever the vectors fit there (`exact=False` still forces the ANN index); else exact below
        `index.ann_threshold` rows (numpy) and the ANN index from it on."""
        rows = self.count()
        if rows == 0:
            raise AuditError("the training index is empty for this encoder; run `audit index TRAINING_DIR` first")
        if (
            device is not None
            and exact is not False
            and str(device).startswith("cuda")
            and _fits_gpu(rows, self.dim, device)
        ):
            return MatrixSearcher(self, device)
        use_ann = (self.ann_index() is not None) if exact is None else not exact
        return AnnSearcher(self) if use_ann else ExactSearcher(self)


GPU_SHARE = 0.25  # of the device's free memory the training vectors and one batch's scores may take
QUERY_CHUNK = 1024  # queries per matrix product (their scores are QUERY_CHUNK x rows floats)


def _fits_gpu(rows: int, dim: int, device) -> bool:
    import torch

    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return 4 * rows * (dim + QUERY_CHUNK) <= GPU_SHARE * free


class Searcher:
    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, scores), both (n, k), best first: cosine or inner product, by the table's metric."""
        raise NotImplementedError


class ExactSearcher(Searcher):
    def __init__(self, table: VectorTable):
        data = table.table.to_lance().to_table(columns=["id", "vector"])
        self.ids = data["id"].to_numpy()
        self.vectors = data["vector"].combine_chunks().flatten().to_numpy().reshape(-1, table.dim)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, len(self.ids))
        scores = queries.astype(np.float32) @ self.vectors.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        order = np.argsort(-top_scores, axis=1, kind="stable")
        return self.ids[np.take_along_axis(top, order, axis=1)], np.take_along_axis(top_scores, order, axis=1)


class MatrixSearcher(Searcher):
    """Exact search as one torch matrix product on any device: the scan's on a GPU (fp32, like ExactSearcher;
    tests compare the two on the CPU). `vectors`/`ids` given directly, or read from the table."""

    def __init__(self, table: VectorTable | None, device="cpu", *, ids=None, vectors=None):
        import torch

        if table is not None:
            data = table.table.to_lance().to_table(columns=["id", "vector"])
            ids = data["id"].to_numpy()
            vectors = data["vector"].combine_chunks().flatten().to_numpy().reshape(-1, table.dim)
        self.device = torch.device(device)
        self.ids = np.asarray(ids, np.int64)
        self.vectors = torch.from_numpy(np.array(vectors, np.float32)).to(self.device)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        import torch

        k = min(k, len(self.ids))
        all_ids, all_scores = [], []
        with torch.inference_mode():
            for start in range(0, max(1, len(queries)), QUERY_CHUNK):
                q = torch.as_tensor(np.ascontiguousarray(queries[start : start + QUERY_CHUNK], np.float32))
                scores, top = torch.topk(q.to(self.device) @ self.vectors.T, k, dim=1, sorted=True)
                all_ids.append(top.cpu().numpy())
                all_scores.append(scores.cpu().numpy())
        top = np.concatenate(all_ids) if all_ids else np.zeros((0, k), np.int64)
        return self.ids[top], np.concatenate(all_scores).astype(np.float32, copy=False)


class AnnSearcher(Searcher):
    def __init__(self, table: VectorTable):
        self.table = table
        self.rows = table.count()

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        k = min(k, self.rows)
        settings = self.table.settings
        result = (
            self.table.table.search(queries.astype(np.float32))
            .distance_type(self.table.metric)
            .nprobes(settings.nprobes)
            .refine_factor(settings.refine_factor)
            .limit(k)
            .select(["id", "_distance"])
            .to_arrow()
        )
        n = len(queries)
        ids = np.full((n, k), -1, np.int64)
        scores = np.full((n, k), -np.inf, np.float32)
        qi = (
            result["query_index"].to_numpy()
            if n > 1 or "query_index" in result.column_names
            else np.zeros(result.num_rows, int)
        )
        found_ids = result["id"].to_numpy()
        found_scores = 1.0 - result["_distance"].to_numpy()  # LanceDB's distance is 1 − cosine, or 1 − dot
        fill = np.zeros(n, int)
        for q, i, s in zip(qi, found_ids, found_scores):
            if fill[q] < k:
                ids[q, fill[q]], scores[q, fill[q]] = i, s
                fill[q] += 1
        order = np.argsort(-scores, axis=1, kind="stable")
        return np.take_along_axis(ids, order, axis=1), np.take_along_axis(scores, order, axis=1)
