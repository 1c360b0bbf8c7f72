"""`--engine ray`: embed (and, for scans, search) on a Ray cluster (a pool of actors); the audit store stays DuckDB.

    paths, in batches ─ _Pool: the run's actors (_Embedder), one encoder per CPU slot or GPU, loaded once
                        and kept for every chunk of the run, killed at its end
      index: metadata to the driver, vectors left in the object store, one chunk at a time
             → ids assigned on the driver (training.IndexLedger)
             → vectors appended to the LanceDB table: a fragment per actor, written next to its batches
               (lance_ray.fragment.write_fragment), one Lance commit
             → the chunk's DuckDB rows committed (IndexLedger.commit)
      scan:  metadata + top-k training ids and scores per generation, streamed back in order
             → one DuckDB transaction per batch (scan.ScanLedger.commit)

One pool per run, not one Ray Data actor pool per chunk: starting actors and loading their encoders took
most of a small run's time, and would again for every 50,000 images of a large one.

The driver holds the workspace lock and the only DuckDB connection; the DuckDB rows, crash
guarantees and idempotency are the local engine's, because both engines go through the same
ledgers. A chunk's vectors are committed to Lance before its DuckDB rows, and the next run drops
vectors whose rows never committed, exactly as the local path does.

Ray is joined at RAY_ADDRESS when set (`ray start --head` / a cluster; README, Beyond one machine),
else a local instance is started; a caller that already ran `ray.init(...)` keeps its instance. A
failure to join is one line with its fix (token authentication, nothing listening), not Ray's
retry log. Workers need the `auditor` package, the encoder bundle and the inputs at the same path
(a shared file system or a baked image): a worker that cannot see the inputs fails the run naming
its node and the path, rather than recording every image as unreadable. The LanceDB URI must be
reachable from them; the workspace's storage options ([storage]: endpoint, region, keys) travel
with the work, so workers need no object-storage settings of their own.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import socket
import tempfile
import time
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa

from . import embed, ingest, model_identity, prompts
from .errors import AuditError
from .progress import Progress, Silent
from .search import IndexSettings, VectorTable, vector_schema
from .store import Store
from .workspace import Workspace

log = logging.getLogger("auditor")

# Index chunk: embedded, written to Lance and committed to DuckDB together (a kill loses at most one).
INDEX_CHUNK = 50_000


def _ray():
    import ray

    if not ray.is_initialized():
        options = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
        address = os.environ.get("RAY_ADDRESS")
        if address:
            _join(ray, address, options)
        else:
            ray.init(**options)
    return ray


def _join(ray, address: str, options: dict) -> None:
    """Join the cluster at RAY_ADDRESS. Ray retries a refused or missing head for 20 s to minutes, writing a
    line to stderr per try from its C++ client; those lines are kept (to name the cause) instead of shown."""
    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "://" not in address:
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
        except OSError as exc:
            raise AuditError(
                f"nothing answers at RAY_ADDRESS={address} ({exc.strerror or exc}); start the head node there"
                " (`ray start --head`, README: Beyond one machine) or correct RAY_ADDRESS"
            ) from None
    with tempfile.TemporaryFile() as said:
        stderr = os.dup(2)
        os.dup2(said.fileno(), 2)
        try:
            ray.init(address=address, **options)
            return
        except Exception as exc:
            failure = exc
        finally:
            os.dup2(stderr, 2)
            os.close(stderr)
        said.seek(0)
        text = said.read().decode(errors="replace")
    if "InvalidAuthToken" in text or isinstance(failure, ray.exceptions.AuthenticationError):
        if os.environ.get("RAY_AUTH_MODE", "").lower() != "token":
            fix = (
                "it uses token authentication: set RAY_AUTH_MODE=token here, with the head node's token in"
                " ~/.ray/auth_token or RAY_AUTH_TOKEN (README: Beyond one machine)"
            )
        else:
            fix = "this process's token (RAY_AUTH_TOKEN, else ~/.ray/auth_token) is not the cluster's; use the head node's"
        raise AuditError(f"the Ray cluster at RAY_ADDRESS={address} refused this process: {fix}")
    raise AuditError(f"cannot join the Ray cluster at RAY_ADDRESS={address}: {_first_line(failure)}")


class InputsNotVisible(RuntimeError):
    """A worker node cannot see the files the driver found (not on a shared file system)."""


def _unseen(paths: list[str]) -> str | None:
    """A path of the batch that this node cannot see, when that means the inputs are not here: every file of
    the batch is missing, or a missing file's folder is (one deleted file is only an unreadable image)."""
    missing = [path for path in paths if not os.path.lexists(path)]
    if missing and (len(missing) == len(paths) or not os.path.isdir(os.path.dirname(missing[0]))):
        return missing[0]
    return None


def _pool(ray, device: str) -> tuple[str, dict, int]:
    """(actor device, per-actor resources, pool size): one actor per GPU, else one per CPU slot."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if device.startswith("cuda") or (device == "auto" and gpus > 0):
        if gpus == 0:
            raise AuditError("--device cuda: the Ray cluster has no GPU; use --device cpu or auto")
        return "cuda", {"num_gpus": 1}, gpus
    if device not in ("auto", "cpu"):
        raise AuditError(f"unknown device {device!r}; use auto, cpu or cuda")
    return "cpu", {"num_cpus": 1}, cpus


class _Embedder:
    """A Ray actor holding one encoder: it reads and decodes its batch of files (a thread pool), embeds
    image ⊕ text, and for scans searches the training vectors; returns (metadata, vectors) or metadata + top-k."""

    def __init__(
        self,
        encoder_dir: str,
        device: str,
        limits: ingest.Limits,
        loader_threads: int,
        skip: frozenset,
        search: dict | None = None,
        recorded: frozenset | None = None,
        precision: str = "fp32",
    ):
        self.encoder = embed.load(encoder_dir, device, precision)
        self.limits = limits
        self.loader_threads = loader_threads
        self.skip = skip
        # Scans: (sha256, path) of the files recorded in generation_files; a skipped file not among them is read for
        # its prompt. Indexing never needs a skipped file's caption.
        self.recorded = recorded
        self.searcher = None
        if search is not None:
            table = VectorTable.for_encoder(
                search["uri"], self.encoder, IndexSettings(**search["settings"]), search["storage_options"]
            )
            self.searcher = table.searcher(device=self.encoder.device)
            self.k = search["k"]

    def __call__(self, rows: list[dict]) -> pa.Table | tuple[pa.Table, pa.Table]:
        captions = {row["i"]: row.get("caption") for row in rows}
        paths = {os.fsdecode(row["path"]): row["i"] for row in rows}

        def text_of(path: str, info: dict, max_chars: int) -> tuple[str | None, str] | prompts.GenerationMetadata:
            caption = captions[paths[path]]
            if self.searcher is None:  # training image: manifest caption, else sidecar
                return (caption[:max_chars], "manifest") if caption else prompts.read_sidecar(path, max_chars)
            return prompts.read_generation(path, info, max_chars)

        def is_recorded(sha: str, path: str) -> bool:
            return self.recorded is None or (sha, path) in self.recorded

        def load(path: str) -> ingest.Item:
            return ingest.load_item(
                path, self.limits, self.encoder.preprocess, lambda sha: sha in self.skip, text_of, is_recorded
            )

        import ray

        node = ray.get_runtime_context().get_node_id()
        unseen = _unseen(list(paths))
        if unseen:
            raise InputsNotVisible(
                f"Ray node {ray.util.get_node_ip_address()} (id {node[:12]}) cannot see {ingest.display_path(unseen)} (no such file or folder there); every"
                " node needs the inputs at the same path (a shared file system)"
            )
        items = list(ingest.load_all(list(paths), self.loader_threads, load))
        good = [n for n, item in enumerate(items) if not item.error and not item.skipped]
        meta = pa.table(
            {
                "i": pa.array([row["i"] for row in rows], pa.int64()),
                "path": [item.path for item in items],
                "sha256": pa.array([item.sha256 for item in items], pa.string()),
                "skipped": pa.array([item.skipped for item in items], pa.bool_()),
                "error_code": pa.array([item.error.code if item.error else None for item in items], pa.string()),
                "error_reason": pa.array([item.error.reason if item.error else None for item in items], pa.string()),
                "width": pa.array([item.width for item in items], pa.int32()),
                "height": pa.array([item.height for item in items], pa.int32()),
                "text": pa.array([item.text for item in items], pa.string()),
                "text_source": pa.array([item.text_source for item in items], pa.string()),
                "metadata": pa.array(
                    [json.dumps(dataclasses.asdict(item.metadata)) if item.metadata else None for item in items],
                    pa.string(),
                ),
                "text_read": pa.array([item.text_read for item in items], pa.bool_()),
                "node": pa.array([node] * len(items), pa.string()),
            }
        )
        features = np.zeros((len(items), self.encoder.dim), np.float32)
        if good:
            pixels, texts = np.stack([items[n].pixels for n in good]), [items[n].text for n in good]
            features[good] = (
                self.encoder.features(pixels, texts)
                if self.searcher is not None
                else self.encoder.index_features(pixels, texts, [items[n].sha256 for n in good])
            )
        if self.searcher is None:
            return meta, pa.table({"i": meta["i"], "vector": _fixed(features)})
        ids = np.full((len(items), self.k), -1, np.int64)
        scores = np.full((len(items), self.k), -np.inf, np.float32)
        if good:
            ids[good], scores[good] = self.searcher.search(features[good], self.k)
        return meta.append_column("ids", _fixed(ids)).append_column("scores", _fixed(scores))


def _fixed(matrix: np.ndarray) -> pa.FixedSizeListArray:
    return pa.FixedSizeListArray.from_arrays(pa.array(np.ascontiguousarray(matrix).ravel()), matrix.shape[1])


def _attach_ids(batch: pa.Table, id_of: np.ndarray, contributors: list, offset: int) -> pa.Table:
    """Keep the rows the driver assigned an id to, as rows of the vector table."""
    local = batch["i"].to_numpy() - offset
    ids = id_of[local]
    keep = ids >= 0
    return pa.table(
        {
            "id": pa.array(ids[keep], pa.int64()),
            "contributor_id": pa.array([contributors[n] for n in local[keep]], pa.string()),
            "vector": batch["vector"].filter(pa.array(keep)),
        }
    )


def _item(row: dict) -> ingest.Item:
    error = ingest.IngestError(row["error_code"], row["error_reason"]) if row["error_code"] else None
    return ingest.Item(
        row["path"],
        row["sha256"],
        None,
        row["width"] or 0,
        row["height"] or 0,
        row["text"],
        row["text_source"] or "none",
        bool(row["skipped"]),
        error,
        metadata=prompts.GenerationMetadata(**json.loads(row["metadata"])) if row.get("metadata") else None,
        text_read=bool(row.get("text_read")),
    )


class _Pool:
    """The run's actors, one _Embedder per CPU slot (or GPU), each loading the encoder once; every chunk of the run
    goes through them and they are killed when the run ends. A batch goes to the actor with the fewest queued (two
    at most each, so none waits on the driver); results come back in the order the batches were given."""

    QUEUED = 2

    def __init__(self, ray, batch_size: int, **actor):
        device, resources, self.size = _pool(ray, actor.pop("device"))
        self.ray = ray
        self.batch_size = batch_size
        # A crashed actor (a node lost, memory) is restarted and its batch retried, as Ray Data's pools do.
        remote = ray.remote(_Embedder).options(**resources, max_restarts=3, max_task_retries=3)
        self.actors = [remote.remote(device=device, **actor) for _ in range(self.size)]

    def __enter__(self) -> _Pool:
        return self

    def __exit__(self, *exc) -> None:
        for actor in self.actors:
            self.ray.kill(actor)

    def map(self, rows: list[dict], returns: int = 1) -> Iterator:
        """(actor number, ref(s) of the result) of each batch, in order, each yielded once its batch is done."""
        ray, queued = self.ray, [0] * self.size
        actor_of: dict = {}  # a batch not seen done (its first ref) -> its actor
        given: collections.deque = collections.deque()

        def first(refs):
            return refs[0] if returns > 1 else refs

        for start in range(0, len(rows), self.batch_size):
            while min(queued) >= self.QUEUED:
                done, _ = ray.wait(list(actor_of), num_returns=1)
                queued[actor_of.pop(done[0])] -= 1
            n = queued.index(min(queued))
            refs = self.actors[n].__call__.options(num_returns=returns).remote(rows[start : start + self.batch_size])
            actor_of[first(refs)] = n
            queued[n] += 1
            given.append((n, refs))
            while given and first(given[0][1]) not in actor_of:
                yield given.popleft()
        for n, refs in given:
            ray.wait([first(refs)])
            yield n, refs


def _write_vectors(ray, table: VectorTable, parts: list[list], id_of: np.ndarray, contributors: list, offset: int):
    """Append a chunk's vectors to the LanceDB table, one Lance commit: each actor's batches (left in the object store
    of its node) are written as a fragment by a task placed where they are (lance_ray.fragment.write_fragment), run
    without a CPU slot, as the pool's actors hold them all for the run. A LanceDB Cloud table (db://) is not a Lance
    dataset URI; its rows are added from the driver instead."""
    uri = getattr(table.table, "uri", None)
    kwargs = {"id_of": id_of, "contributors": contributors, "offset": offset}
    if not uri or uri.startswith("db://"):
        for refs in parts:
            table.table.add(_attach_ids(pa.concat_tables(ray.get(refs)), **kwargs).cast(vector_schema(table.dim)))
        table.table.checkout_latest()
        return
    import lance

    schema, options = vector_schema(table.dim), table.storage_options or None
    write = ray.remote(_write_fragment).options(num_cpus=0)
    written = ray.get([write.remote(uri, schema, options, kwargs, *refs) for refs in parts])
    fragments = [fragment for fragments in written for fragment in fragments]
    if fragments:
        operation = lance.LanceOperation.Append(fragments)
        lance.LanceDataset.commit(uri, operation, read_version=table.version, storage_options=options)
    table.table.checkout_latest()


def _write_fragment(uri: str, schema: pa.Schema, storage_options: dict | None, kwargs: dict, *parts: pa.Table):
    from lance_ray.fragment import write_fragment

    rows = _attach_ids(pa.concat_tables(parts), **kwargs).cast(schema)
    if not rows.num_rows:
        return []
    return [fragment for fragment, _ in write_fragment([rows], uri, schema=schema, storage_options=storage_options)]


def index_training(
    ws: Workspace,
    entries,
    *,
    device: str | None,
    batch_size: int,
    limits: ingest.Limits,
    progress: Progress | None = None,
    chunk: int | None = None,
):
    from .index import IndexLedger

    started = time.perf_counter()
    progress = progress or Silent()
    chunk = chunk or INDEX_CHUNK
    ray = _ray()
    device = device or ws.config.encoder.device
    with ws.writing(), Store(ws.db_path) as store:
        encoder = embed.load(ws.encoder_dir(), "cpu")  # id, dim and the store's records; the actors embed
        table = ws.vector_table(encoder)
        ledger = IndexLedger(store, encoder, table, entries, ws.lancedb_uri)
        skip = frozenset(sha for sha, i in ledger.registered.items() if i in ledger.embedded)
        entries = list(ledger.by_path.values())
        progress.start("indexing", len(entries))
        with _Pool(
            ray,
            batch_size,
            device=device,
            encoder_dir=str(encoder.directory),
            limits=limits,
            loader_threads=ws.config.scan.loader_threads,
            skip=skip,
            precision=ws.config.encoder.precision,
        ) as pool:
            for start in range(0, len(entries), chunk):
                part = entries[start : start + chunk]
                rows = [{"i": start + n, "path": os.fsencode(e.path), "caption": e.caption} for n, e in enumerate(part)]
                try:
                    done = list(pool.map(rows, returns=2))
                    meta = pa.concat_tables(ray.get([refs[0] for _, refs in done]))
                except ray.exceptions.RayError as exc:
                    raise AuditError(f"the Ray job failed: {_first_line(exc)}") from None
                _note_nodes(meta)
                batch, positions = [], []
                for row in meta.to_pylist():
                    progress.advance()
                    item = _item(row)
                    if ledger.take(item, entries[row["i"]]):
                        batch.append((entries[row["i"]], item))
                        positions.append(row["i"] - start)
                if not batch:
                    continue
                ids, new_rows = ledger.assign(batch)
                id_of = np.full(len(part), -1, np.int64)
                id_of[positions] = ids
                by_actor = collections.defaultdict(list)
                for n, refs in done:
                    by_actor[n].append(refs[1])
                contributors = [e.contributor_id for e in part]
                _write_vectors(ray, table, list(by_actor.values()), id_of, contributors, start)
                ledger.commit(ids, new_rows, len(batch))
        ledger.finish()
    ledger.result.seconds = time.perf_counter() - started
    return ledger.result


def scan(
    ws: Workspace,
    root: str,
    found: ingest.Discovery,
    *,
    top_k: int,
    device: str | None,
    batch_size: int,
    limits: ingest.Limits,
    progress: Progress | None = None,
    announce: Callable[[str], None] = lambda message: None,
):
    from .index import reconcile
    from .scan import ScanLedger

    progress = progress or Silent()
    ray = _ray()
    device = device or ws.config.encoder.device
    with ws.writing(), ScanLedger.store_for(ws) as store:
        encoder = embed.load(ws.encoder_dir(), "cpu")
        settings = ws.config.index
        table = ws.vector_table(encoder)
        reconcile(store, table)
        table.searcher()  # fails here, with the local engine's message, when the table is empty
        actor_device, _, _ = _pool(ray, device)
        identity = model_identity.prepare(ws, store, announce)
        ledger = ScanLedger(store, root, encoder, table, top_k, device=actor_device, identity=identity)
        ledger.note_unreadable(found)
        paths = found.images
        k = ledger.k
        progress.start("scanning", len(paths))
        rows = [{"i": n, "path": os.fsencode(p), "caption": None} for n, p in enumerate(paths)]
        batch: list[ingest.Item] = []
        found_ids: list[np.ndarray] = []
        found_scores: list[np.ndarray] = []

        def flush() -> None:
            ids = np.stack(found_ids) if batch else np.zeros((0, k), np.int64)
            scores = np.stack(found_scores) if batch else np.zeros((0, k), np.float32)
            ledger.commit(batch, ids, scores)
            batch.clear()
            found_ids.clear()
            found_scores.clear()

        search = {"uri": ws.lancedb_uri, "settings": settings.__dict__.copy(), "k": k}
        search["storage_options"] = ws.storage_options
        nodes: set[str] = set()
        with ledger.running():
            try:
                with _Pool(
                    ray,
                    batch_size,
                    device=device,
                    encoder_dir=str(encoder.directory),
                    limits=limits,
                    loader_threads=ws.config.scan.loader_threads,
                    skip=frozenset(ledger.done),
                    search=search,
                    recorded=frozenset(ledger.recorded),
                    precision=ws.config.encoder.precision,
                ) as pool:
                    for _, ref in pool.map(rows):
                        part = ray.get(ref)
                        nodes.update(part["node"].to_pylist())
                        ids = part["ids"].combine_chunks().flatten().to_numpy().reshape(-1, k)
                        scores = part["scores"].combine_chunks().flatten().to_numpy().reshape(-1, k)
                        for n, row in enumerate(part.drop_columns(["ids", "scores"]).to_pylist()):
                            progress.advance()
                            item = _item(row)
                            if ledger.take(item):
                                batch.append(item)
                                found_ids.append(ids[n])
                                found_scores.append(scores[n])
                            if len(batch) >= batch_size:
                                flush()
            except ray.exceptions.RayError as exc:
                ledger.interrupt("failed")
                raise AuditError(f"the Ray job failed: {_first_line(exc)}") from None
            log.info("ray: scanned on %d node(s): %s", len(nodes), ", ".join(node[:12] for node in sorted(nodes)))
            flush()
            return ledger.finish()


def _note_nodes(meta: pa.Table) -> None:
    nodes = sorted(set(meta["node"].to_pylist()))
    log.info("ray: embedded on %d node(s): %s", len(nodes), ", ".join(node[:12] for node in nodes))


def _first_line(exc: Exception) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    ours = [line for line in lines if f"{InputsNotVisible.__name__}: " in line]
    if ours:
        return ours[-1].split(f"{InputsNotVisible.__name__}: ", 1)[1][:300]
    errors = [line for line in lines if "Error" in line]
    return (errors[-1] if errors else lines[0] if lines else type(exc).__name__)[:300]
