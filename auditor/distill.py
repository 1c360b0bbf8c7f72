"""`audit distill`: teach the fast encoder to rank like the teacher (FastGDA, methods.md §2).

collect — generate query images from a prompt set with the workspace's model (or take a
          folder), rank each query's candidate set (its nearest training images by the
          untuned backbone) with the AbU teacher, store the rankings. Test queries are
          those whose *prompt* hashes into the test fraction, so no test prompt is ever
          seen in training.
train   — fit the shared MLP head on (query, candidate, normalised teacher rank) with
          binary cross-entropy, early-stopped on validation mAP@k; calibrate the share
          temperature; write a new encoder bundle (the old one is untouched).

Beyond FastGDA, both on by default: a learned influence strength per training image
(`strengths`) and a query map (`query_map`). The teacher's score is a loss change, to first
order the inner product of the query's update with the candidate's gradient, so a training
image whose loss moves a lot under any update ranks high for every query it is a candidate
of; a cosine cannot say that, a per-image factor on it can. And it is not symmetric (a
generated 'five' pulls in training 'sevens' far more often than the reverse), which one head
shared by both sides cannot say; a linear map on the query side can. On the example world,
held-out mAP@10 over the untuned ranking: +0.144 with both, +0.108 without strengths, +0.137
with one shared head (EVAL.md). Strengths are kept for the training images the teacher ranked.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from . import diffusion, embed, ingest, metrics
from .confirm import TeacherSession, training_set
from .errors import AuditError
from .progress import Progress, Silent
from .settings import AbuSettings, DistillSettings
from .store import Store, utcnow
from .workspace import Workspace


# ---------------------------------------------------------------------- embeddings
def embed_images(encoder: embed.Encoder, images, texts, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Untuned (image, text) embeddings, each L2-normalised, for PIL images and their prompts."""
    img, txt = [], []
    for start in range(0, len(images), batch_size):
        pixels = np.stack([encoder.preprocess(im) for im in images[start : start + batch_size]])
        img.append(encoder.embed_images(pixels).cpu().numpy())
        txt.append(encoder.embed_texts(list(texts[start : start + batch_size])).cpu().numpy())
    return np.concatenate(img), np.concatenate(txt)


def training_embeddings(
    ws: Workspace, store: Store, encoder: embed.Encoder
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, image embeddings, caption embeddings) of every training image, cached per encoder in the workspace."""
    rows = store.rows("SELECT id, path, caption FROM training_images ORDER BY id")
    ids = np.array([r[0] for r in rows], np.int64)
    cache = ws.dir / "cache" / f"embeddings-{encoder.id}.npz"
    if cache.is_file():
        saved = np.load(cache)
        if np.array_equal(saved["ids"], ids):
            return ids, saved["image"], saved["text"]
    limits = ingest.Limits(int(ws.config["scan"]["max_pixels"]), int(ws.config["scan"]["max_file_bytes"]))
    images = [ingest.decode(ingest.read_bytes(r[1], limits), limits)[0] for r in rows]
    img, txt = embed_images(encoder, images, [r[2] for r in rows])
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.savez(cache, ids=ids, image=img, text=txt)
    return ids, img, txt


def training_digests(store: Store) -> list[str]:
    """The sha256 of every training image, in the row order of training_embeddings: how bundles key strengths."""
    return [r[0] for r in store.rows("SELECT sha256 FROM training_images ORDER BY id")]


def _scores(
    head: embed.ProjectionHead, q_feat: np.ndarray, t_feat: np.ndarray, strength: np.ndarray | None
) -> np.ndarray:
    """Queries × training rows from untuned image ⊕ text features: the inner product the index searches."""
    with torch.no_grad():
        t_out = head(torch.as_tensor(t_feat, dtype=torch.float32)).numpy()
        q_out = head(torch.as_tensor(q_feat, dtype=torch.float32), query=True).numpy()
    return q_out @ (t_out if strength is None else t_out * strength[:, None]).T


def head_scores(encoder: embed.Encoder, q_feat: np.ndarray, t_feat: np.ndarray, digests: list[str]) -> np.ndarray:
    """A distilled bundle's scores (queries × training images), as its index ranks them."""
    return _scores(encoder.head, q_feat, t_feat, encoder.strength(digests))


def joint(img: np.ndarray, txt: np.ndarray) -> np.ndarray:
    x = np.concatenate([img, txt], axis=1)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ---------------------------------------------------------------------- collect
def is_test_prompt(prompt: str | None, fraction: float) -> bool:
    digest = int(hashlib.sha256((prompt or "").encode()).hexdigest()[:8], 16)
    return digest % 10_000 < fraction * 10_000


@dataclass
class CollectResult:
    planned: int = 0
    collected: int = 0
    train: int = 0
    test: int = 0
    seconds: float = 0.0
    estimate_seconds: float = 0.0
    skipped: list[tuple[str, str]] = field(
        default_factory=list
    )  # folder files that are no readable image: (path, reason)


def _plan(
    store: Store,
    ws: Workspace,
    session: TeacherSession,
    encoder: embed.Encoder,
    s: DistillSettings,
    settings_hash: str,
    prompts: list[str] | None,
    folder: Path | None,
) -> list[tuple[str, str]]:
    """Add the queries the collection lacks: generated ones up to `s.queries` (a larger count than before extends the
    collection, continuing its prompts and seeds), or the folder's images not planned yet, and a new query for each
    ranked folder image whose file has changed since (the old one is marked replaced). Returns the folder's files that
    are no readable image, (path, reason): they are left out, and looked at again by the next run."""
    planned = store.rows(
        "SELECT id, path, sha256 FROM distill_queries WHERE settings_hash = ? AND replaced_at IS NULL", [settings_hash]
    )
    rows, skipped, replaced = [], [], []
    next_id = store.next_id("distill_queries")
    if folder is not None:
        known = {path: (qid, sha) for qid, path, sha in planned}
        for path in ingest.discover(folder):
            if path in known and known[path][1] is None:
                continue  # not ranked yet: the loop ranks whatever the file holds then
            try:
                data = ingest.read_bytes(path, ingest.Limits())
                if path in known and hashlib.sha256(data).hexdigest() == known[path][1]:
                    continue
                _, info = ingest.decode(data, ingest.Limits())
            except ingest.IngestError as exc:
                skipped.append((path, exc.reason))
                continue
            if path in known:
                replaced.append(known[path][0])
            prompt, _ = prompts.read_prompt(path, info)
            rows.append((path, prompt, None, "folder"))
    elif len(planned) < s.queries:
        query_dir = ws.dir / "distill" / settings_hash
        kept = query_dir / "prompts.json"
        if not prompts and kept.is_file():
            # The captions as this collection first found them: ones indexed since must not shift the cycle it continues.
            prompts = json.loads(kept.read_text())
        if not prompts:
            prompts = [
                r[0]
                for r in store.rows("SELECT DISTINCT caption FROM training_images WHERE caption IS NOT NULL ORDER BY 1")
            ]
            if not prompts:
                raise AuditError("no prompts: pass --prompts FILE (one per line) or index captioned training images")
            query_dir.mkdir(parents=True, exist_ok=True)
            kept.write_text(json.dumps(prompts))
        for j, i in enumerate(range(len(planned), s.queries)):
            prompt = prompts[i % len(prompts)]
            rows.append((str(query_dir / f"q{next_id + j:06d}.png"), prompt, s.seed * 100_003 + i, "generated"))
    if not rows:
        return skipped
    table = pa.table(
        {
            "id": pa.array(range(next_id, next_id + len(rows)), pa.int64()),
            "split": ["test" if is_test_prompt(r[1], s.test_fraction) else "train" for r in rows],
            "source": [r[3] for r in rows],
            "path": [r[0] for r in rows],
            "prompt": pa.array([r[1] for r in rows], pa.string()),
            "seed": pa.array([r[2] for r in rows], pa.int64()),
            "model_hash": [session.model.hash] * len(rows),
            "backbone_id": [encoder.id] * len(rows),
            "settings_hash": [settings_hash] * len(rows),
        }
    )
    with store.transaction():
        for qid in replaced:
            store.con.execute("UPDATE distill_queries SET replaced_at = ? WHERE id = ?", [utcnow(), qid])
        store.insert_arrow("distill_queries", table)
    return skipped


def collect(
    ws: Workspace,
    *,
    prompts_file: str | os.PathLike | None = None,
    folder: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] = lambda message: None,
    seed: int | None = None,
    **overrides,
) -> CollectResult:
    """Plan the queries (once), then rank every uncollected one with the teacher; resumable per query. `overrides` are
    [distill] settings; the teacher is the one `audit confirm` runs ([confirm]). `seed` draws the generated query images
    ([distill] seed by default) and nothing of the teacher, so a collection with a new seed adds new images of the same
    prompts, ranked by the same teacher as the queries already collected."""
    progress = progress or Silent()
    unknown = sorted(set(overrides) - set(DistillSettings.__dataclass_fields__))
    if unknown:
        raise AuditError(
            f"{', '.join(unknown)}: no [distill] setting; the teacher's settings are the workspace's [confirm] section (audit.toml)"
        )
    s = DistillSettings.from_config(ws.config["distill"], seed=seed, **overrides)
    teacher = AbuSettings.from_config(ws.config["confirm"])
    model_path = ws.model_dir(model)
    prompts = None
    if prompts_file:
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    started = time.perf_counter()
    torch_device = embed.resolve_device(device or ws.config["encoder"]["device"])
    flip = str(ws.config["confirm"].get("flip", "auto"))
    with ws.writing(), Store(ws.db_path) as store:
        training = training_set(ws, store, model_path, torch_device, flip)
        session = TeacherSession(training, teacher, ws.dir / "cache")
        encoder = embed.load(ws.encoder_dir(), torch_device)
        # Not the query count: a later run with a larger one extends this collection instead of starting another.
        settings_hash = teacher.scoring_hash(
            session.model.hash,
            encoder.id,
            flip,
            str(s.candidates),
            str(s.test_fraction),
            str(folder or ""),
            json.dumps(prompts or []),
            str(s.seed),
        )
        result = CollectResult(
            skipped=_plan(store, ws, session, encoder, s, settings_hash, prompts, Path(folder) if folder else None)
        )
        for path, reason in result.skipped:
            announce(f"skipped {path}: {reason}")
        todo = store.rows(
            "SELECT id, path, prompt, seed, source FROM distill_queries WHERE settings_hash = ? AND collected_at IS NULL"
            " AND replaced_at IS NULL ORDER BY id",
            [settings_hash],
        )
        result.planned = store.value(
            "SELECT count(*) FROM distill_queries WHERE settings_hash = ? AND replaced_at IS NULL", [settings_hash]
        )
        ids, img, txt = training_embeddings(ws, store, encoder)
        backbone = joint(img, txt)
        n_cand = min(s.candidates, len(ids))
        result.estimate_seconds = session.estimate(len(todo), n_cand)
        announce(
            f"{len(todo)} of {result.planned} queries to rank, {n_cand} candidates each; estimated {result.estimate_seconds:.0f} s"
        )
        pipe = None
        progress.start("collecting", len(todo))
        for qid, path, prompt, seed, source in todo:
            t0 = time.perf_counter()
            if source == "generated" and not os.path.isfile(path):
                pipe = pipe or diffusion.pipeline(session.model)
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                diffusion.generate(pipe, prompt, seed, s.sample_steps, s.guidance).save(path)
            try:
                data = ingest.read_bytes(path, ingest.Limits())
                image = ingest.decode(data, ingest.Limits())[0]
            except ingest.IngestError as exc:
                result.skipped.append((path, exc.reason))
                announce(f"skipped {path}: {exc.reason}")
                progress.advance()
                continue
            q_img, q_txt = embed_images(encoder, [image], [prompt])
            sims = backbone @ joint(q_img, q_txt)[0]
            order = np.argsort(-sims, kind="stable")[:n_cand]
            cand = ids[order]
            raw, infl = session.score(image, prompt, cand, qid)
            teacher_rank = metrics.ranks(infl)
            with store.transaction():
                store.insert_arrow(
                    "distill_rankings",
                    pa.table(
                        {
                            "query_id": pa.array([qid] * len(cand), pa.int64()),
                            "training_id": pa.array(cand),
                            "influence": pa.array(infl),
                            "raw_influence": pa.array(raw),
                            "teacher_rank": pa.array(teacher_rank),
                            "backbone_rank": pa.array(np.arange(1, len(cand) + 1, dtype=np.int32)),
                        }
                    ),
                )
                store.con.execute(
                    "UPDATE distill_queries SET n_candidates = ?, seconds = ?, collected_at = ?, sha256 = ? WHERE id = ?",
                    [len(cand), time.perf_counter() - t0, utcnow(), hashlib.sha256(data).hexdigest(), qid],
                )
            result.collected += 1
            progress.advance()
        counts = dict(
            store.rows(
                "SELECT split, count(*) FROM distill_queries WHERE settings_hash = ? AND collected_at IS NOT NULL AND replaced_at IS NULL"
                " GROUP BY 1",
                [settings_hash],
            )
        )
        result.train, result.test = counts.get("train", 0), counts.get("test", 0)
    result.seconds = time.perf_counter() - started
    return result


def _ranked_bytes(path: str, sha256: str | None) -> bytes:
    """A collected query's file as the teacher ranked it. Raises ingest.IngestError when the file is gone, unreadable,
    or holds other bytes than those ranked (`sha256`; None for queries collected before it was recorded)."""
    data = ingest.read_bytes(path, ingest.Limits())
    if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
        raise ingest.IngestError("changed", "the file has changed since the teacher ranked it")
    return data


def read_query(path: str, sha256: str | None) -> Image.Image:
    """A collected query's image as the teacher ranked it (the errors of _ranked_bytes, or one for bytes that are no
    image)."""
    return ingest.decode(_ranked_bytes(path, sha256), ingest.Limits())[0]


def current_queries(rows: list[tuple], announce: Callable[[str], None]) -> tuple[list[tuple], list[Image.Image]]:
    """The rows (id, path, …, sha256 last) whose image is still the one ranked, and those images; the others are left
    out and announced: a ranking is only worth what the image beside it is."""
    kept, images = [], []
    for row in rows:
        try:
            images.append(read_query(row[1], row[-1]))
        except ingest.IngestError as exc:
            announce(
                f"left out query {row[0]} ({row[1]}): {exc.reason}; `audit distill collect` ranks a folder's new file again"
            )
            continue
        kept.append(row[:-1])
    return kept, images


REPLICATE_SEED = (
    1_000_003  # added to the teacher's seed: new unlearning draws and new scoring noise, overlapping no query's
)


def collected_queries(store: Store, split: str) -> list[tuple[int, str, str | None, list[int], str | None]]:
    """The current collected queries of a split: (id, image path, prompt, candidate training ids in backbone order,
    sha256 of the image ranked)."""
    return store.rows(
        "SELECT q.id, q.path, q.prompt, list(r.training_id ORDER BY r.backbone_rank), q.sha256 FROM distill_queries q"
        " JOIN distill_rankings r ON r.query_id = q.id WHERE q.split = ? AND q.collected_at IS NOT NULL AND q.replaced_at IS NULL"
        " GROUP BY q.id, q.path, q.prompt, q.sha256 ORDER BY q.id",
        [split],
    )


def replicate(
    ws: Workspace,
    *,
    split: str = "test",
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] = lambda message: None,
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """The teacher again on the collected queries of a split, with independent noise: query id → (candidate training ids,
    influence). How well the teacher agrees with itself bounds what any student can reach against it (`audit eval
    --replicate`). Uses the workspace's [confirm] settings, which should be those the rankings were collected with.
    Stored in distill_replicates per query as it goes: a rerun (or an interrupted one) only scores what is missing."""
    progress = progress or Silent()
    base = AbuSettings.from_config(ws.config["confirm"])
    settings = replace(base, seed=base.seed + REPLICATE_SEED)
    model_path = diffusion.checked_folder(ws.model_dir(model))
    # Keyed by what the scores depend on, like a collection: another candidate count or k for `audit confirm` keeps it.
    key = settings.scoring_hash("replicate", diffusion.model_hash(model_path, ws.dir / "cache"))
    with Store(ws.db_path, read_only=True) as store:
        rows = collected_queries(store, split)
        stored = {
            int(q): dict(zip(t, v))
            for q, t, v in store.rows(
                "SELECT query_id, list(training_id), list(influence) FROM distill_replicates WHERE settings_hash = ? GROUP BY 1",
                [key],
            )
        }
    if not rows:
        raise AuditError(f"no collected {split} queries; run `audit distill collect` first")
    # Only the queries still to score are read: evaluation checks every query's image itself.
    todo = list(zip(*current_queries([r for r in rows if int(r[0]) not in stored], announce)))
    if todo:
        torch_device = embed.resolve_device(device or ws.config["encoder"]["device"])
        with ws.writing(), Store(ws.db_path) as store:
            training = training_set(ws, store, model_path, torch_device, str(ws.config["confirm"].get("flip", "auto")))
            session = TeacherSession(training, settings, ws.dir / "cache")
            announce(
                f"replicating the teacher on {len(todo)} of {len(rows)} {split} queries with independent noise; "
                f"estimated {session.estimate(len(todo), len(todo[0][0][3])):.0f} s"
            )
            progress.start("replicating", len(todo))
            for (qid, _path, prompt, candidates), image in todo:
                _, influence = session.score(image, prompt, np.array(candidates, np.int64), qid)
                with store.transaction():
                    store.insert_arrow(
                        "distill_replicates",
                        pa.table(
                            {
                                "query_id": pa.array([qid] * len(candidates), pa.int64()),
                                "training_id": pa.array(candidates, pa.int64()),
                                "settings_hash": [key] * len(candidates),
                                "influence": pa.array(influence, pa.float64()),
                            }
                        ),
                    )
                stored[int(qid)] = dict(zip(candidates, influence.tolist()))
                progress.advance()
    return {
        int(q): (np.array(c, np.int64), np.array([stored[int(q)][t] for t in c]))
        for q, _, _, c, _ in rows
        if int(q) in stored
    }


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
    with Store(ws.db_path, read_only=True) as store:
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
            data = _ranked_bytes(path, sha)
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
    ours = diffusion.model_hash(diffusion.checked_folder(ws.model_dir(model)), ws.dir / "cache")
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


# ---------------------------------------------------------------------- head training
@dataclass
class Rankings:
    """Per query: its feature index, candidate training indices (rows of the training matrix) and teacher ranks."""

    query_features: np.ndarray
    candidates: list[np.ndarray]
    ranks: list[np.ndarray]


def _targets(ranks: np.ndarray) -> np.ndarray:
    # Rank 1 → 1.0, last rank → 1/n: the teacher's ordering as a soft label (FastGDA's j/n, top = most influential).
    n = len(ranks)
    return 1.0 - (ranks - 1) / n


def _val_map(
    head: embed.ProjectionHead,
    data: Rankings,
    train_features: torch.Tensor,
    k: int,
    log_strength: torch.Tensor | None = None,
) -> float:
    head.eval()
    with torch.no_grad():
        t = head(train_features)
        if log_strength is not None:
            t = t * log_strength.exp()[:, None]
        q = head(torch.as_tensor(data.query_features), query=True)
        sims = (q @ t.T).numpy()
    head.train()
    all_idx = np.arange(len(train_features))
    return float(
        np.mean(
            [
                metrics.average_precision(
                    all_idx[np.argsort(-sims[i], kind="stable")], set(c[np.argsort(r)[:k]].tolist())
                )
                for i, (c, r) in enumerate(zip(data.candidates, data.ranks))
            ]
        )
    )


@dataclass
class FitResult:
    head: embed.ProjectionHead
    best_val_map: float
    epochs: int
    history: list[dict] = field(default_factory=list)
    # Per training row, centred on the rows some training pair reached and 0 (strength 1) for the others: the bundle's
    # convention, in which an image without a strength counts as a typical one.
    log_strength: np.ndarray | None = None
    touched: np.ndarray | None = None  # the training rows some training pair (candidate or negative) reached

    def scores(self, q_feat: np.ndarray, t_feat: np.ndarray) -> np.ndarray:
        """Queries × training rows, as the bundle made from this fit ranks them."""
        return _scores(self.head, q_feat, t_feat, None if self.log_strength is None else np.exp(self.log_strength))


def _calibrate(head: embed.ProjectionHead, q_feat: torch.Tensor, t_feat: torch.Tensor, q_idx, t_idx, target) -> None:
    """Fit the score's scale and bias to the untrained head's cosines (a logistic regression) before training: from the
    default calibration the first epochs spend themselves on it and scramble the ranking the head starts from."""
    head.eval()
    with torch.no_grad():
        cosines = (head(q_feat[q_idx], query=True) * head(t_feat[t_idx])).sum(-1)
    head.train()
    y = torch.as_tensor(target)
    params = torch.tensor([float(head.scale.detach().log()), float(head.bias.detach())], requires_grad=True)
    opt = torch.optim.LBFGS([params], max_iter=100, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(params[0].exp() * cosines + params[1], y)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        head.scale.fill_(float(params[0].exp()))
        head.bias.fill_(float(params[1]))


def fit_head(
    train: Rankings,
    val: Rankings | None,
    train_features: np.ndarray,
    s: DistillSettings,
    progress: Callable[[dict], None] = lambda row: None,
) -> FitResult:
    """FastGDA's head: BCE between scale·cos(h(q), h(t))·strength(t) + bias and the normalised teacher rank; AdamW; early
    stopping on val mAP@k of the weights' moving average. strength(t) = exp(a_t), one free a_t per training row (L2 toward 0), when `s.strengths`.
    Without `val`: exactly `s.epochs` epochs, keeping the last moving average (`fit`'s refit)."""
    torch.manual_seed(s.seed)
    rng = np.random.default_rng(s.seed)
    in_dim = train_features.shape[1]
    head = embed.ProjectionHead(in_dim, list(s.hidden_dims), s.out_dim, s.layernorm, s.dropout, s.residual, s.query_map)
    t_feat = torch.as_tensor(train_features, dtype=torch.float32)
    q_feat = torch.as_tensor(train.query_features, dtype=torch.float32)
    log_strength = torch.nn.Parameter(torch.zeros(len(t_feat))) if s.strengths else None
    groups = [{"params": list(head.parameters()), "weight_decay": s.weight_decay}]
    if log_strength is not None:
        groups.append({"params": [log_strength], "weight_decay": 0.0})  # its own L2 term below
    opt = torch.optim.AdamW(groups, lr=s.lr)
    q_idx = np.concatenate([np.full(len(c), i) for i, c in enumerate(train.candidates)])
    t_idx = np.concatenate(train.candidates)
    target = np.concatenate([_targets(r) for r in train.ranks]).astype(np.float32)
    in_candidates = [set(c.tolist()) for c in train.candidates]
    touched = np.zeros(len(t_feat), bool)
    touched[t_idx] = True
    _calibrate(head, q_feat, t_feat, q_idx, t_idx, target)

    # Validation and the bundle see a moving average of the weights over the optimiser's steps (`s.ema` per step; 0
    # = the weights themselves): from step to step the ranking the validation mAP scores jitters, and early stopping
    # would pick a lucky epoch of that jitter.
    trained = torch.nn.Module()
    trained.head, trained.log_strength = head, log_strength
    average = torch.optim.swa_utils.AveragedModel(
        trained, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(s.ema)
    )

    def validate() -> float:
        if val is None:
            return float("nan")
        return _val_map(average.module.head, val, t_feat, s.k, average.module.log_strength)

    def state():
        kept = average.module
        return (
            {k: v.detach().clone() for k, v in kept.head.state_dict().items()},
            None if kept.log_strength is None else kept.log_strength.detach().clone(),
        )

    # Epoch 0 is the untrained head: with `residual` that is the untuned ranking, the bar training must clear.
    best = (validate(), state(), 0)
    history = [{"epoch": 0, "loss": float("nan"), "val_map": best[0]}]
    for epoch in range(1, s.epochs + 1):
        order = rng.permutation(len(t_idx))
        qi, ti, y = q_idx[order].copy(), t_idx[order].copy(), target[order].copy()
        # A fraction of pairs become out-of-candidate negatives with the last rank's target (0).
        for j in np.flatnonzero(rng.random(len(ti)) < s.negatives):
            outside = len(t_feat) - len(in_candidates[qi[j]])
            if outside == 0:
                continue  # every training image is a candidate of this query: no negative to draw
            while True:
                candidate = int(rng.integers(len(t_feat)))
                if candidate not in in_candidates[qi[j]]:
                    break
            ti[j], y[j] = candidate, 0.0
        touched[ti] = True
        total = 0.0
        for start in range(0, len(ti), s.batch_size):
            sl = slice(start, start + s.batch_size)
            q = head(q_feat[qi[sl]], query=True)
            t = head(t_feat[ti[sl]])
            cosine = (q * t).sum(-1)
            if log_strength is not None:
                cosine = cosine * log_strength[ti[sl]].exp()
            logits = head.scale * cosine + head.bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.as_tensor(y[sl]))
            if log_strength is not None:
                loss = loss + s.strength_decay * (log_strength**2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            average.update_parameters(trained)
            total += loss.item() * len(y[sl])
        val_map = validate()
        row = {"epoch": epoch, "loss": total / len(ti), "val_map": val_map}
        history.append(row)
        progress(row)
        if val is None or val_map > best[0]:
            best = (val_map, state(), epoch)
        elif epoch - best[2] >= s.patience:
            break
    head.load_state_dict(best[1][0])
    head.eval()
    log_strength = None
    if best[1][1] is not None:
        learned = best[1][1].numpy()
        log_strength = np.where(touched, learned - learned[touched].mean(), 0.0)
    return FitResult(head, best[0], best[2], history, log_strength, touched)


def fit(
    fit_set: Rankings,
    val: Rankings,
    train_features: np.ndarray,
    s: DistillSettings,
    progress: Callable[[dict], None] = lambda row: None,
) -> tuple[FitResult, FitResult]:
    """(the validation run, the head to ship). Early stopping on the validation queries picks the number of epochs; with
    `s.refit` the head is then trained again, from the same seed, on fit + validation queries for that many epochs, so
    the validation prompts are fitted too: on the example world the held-out gain follows the number of training prompts
    far more than the queries per prompt (half the prompts: +0.137 → +0.058; half of every prompt's queries: +0.133;
    examples/digits_world/PROMPT_CURVE.md).
    Without refit, or when no epoch beat the untrained head, both are the validation run."""
    selected = fit_head(fit_set, val, train_features, s, progress)
    if not s.refit or selected.epochs == 0:
        return selected, selected
    both = Rankings(
        np.concatenate([fit_set.query_features, val.query_features]),
        fit_set.candidates + val.candidates,
        fit_set.ranks + val.ranks,
    )
    final = fit_head(
        both, None, train_features, replace(s, epochs=selected.epochs), lambda row: progress({**row, "refit": True})
    )
    return selected, final


def fit_temperature(scores: list[np.ndarray], positives: list[np.ndarray]) -> tuple[float, float]:
    """AbC's soft attribution: the τ maximising the likelihood of the true set under p ∝ exp((s − s_max)/τ).
    scores[i]: one query's candidate scores; positives[i]: boolean mask of its true influencers (uniform target).
    Returns (τ, mean negative log-likelihood at τ)."""
    from scipy.optimize import minimize_scalar

    pairs = [(s, p) for s, p in zip(scores, positives) if p.any()]
    if not pairs:
        raise AuditError("no query has a teacher-positive among its top candidates; cannot calibrate the temperature")

    def nll(log_tau: float) -> float:
        total = 0.0
        for s, p in pairs:
            z = (s - s.max()) / np.exp(log_tau)
            log_p = z - np.log(np.exp(z).sum())
            total -= log_p[p].mean()
        return total / len(pairs)

    best = minimize_scalar(nll, bounds=(np.log(1e-4), np.log(10.0)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(best.x)), float(best.fun)


def calibration_error(scores: list[np.ndarray], positives: list[np.ndarray], tau: float, bins: int = 10) -> float:
    """Expected calibration error of shares against the teacher's top set as a uniform distribution."""
    shares, truth = [], []
    for s, p in zip(scores, positives):
        if not p.any():
            continue
        shares.append(embed.softmax_shares(s[None], tau)[0])
        truth.append(p / p.sum())
    shares, truth = np.concatenate(shares), np.concatenate(truth)
    edges = np.quantile(shares, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, shares, side="right") - 1, 0, bins - 1)
    # Σ_b (n_b / N)·|mean share − mean truth| over equal-count bins of the predicted share.
    return float(sum(abs(shares[which == b].sum() - truth[which == b].sum()) for b in range(bins)) / len(shares))


@dataclass
class TrainResult:
    encoder_id: str
    path: Path
    best_val_map: float
    epochs: int
    temperature: float
    calibration_nll: float
    calibration_ece: float
    seconds: float
    train_queries: int
    val_queries: int
    fitted_queries: int  # the queries the shipped head was fitted on: train, or train + validation after a refit
    history: list[dict]  # per epoch, the validation run's then the refit's (rows with "refit": True)


def load_rankings(
    store: Store, split: str, index_of: dict[int, int], announce: Callable[[str], None] = lambda message: None
) -> tuple[list[tuple[int, str, str, np.ndarray, np.ndarray]], list[Image.Image]]:
    """A split's rankings, (query id, path, prompt, candidate rows of the training matrix, teacher ranks), and the query
    images; a query whose image is gone or changed since it was ranked is left out (current_queries)."""
    rows = store.rows(
        "SELECT q.id, q.path, q.prompt, list(r.training_id ORDER BY r.teacher_rank), list(r.teacher_rank ORDER BY r.teacher_rank), q.sha256"
        " FROM distill_queries q JOIN distill_rankings r ON r.query_id = q.id WHERE q.split = ? AND q.collected_at IS NOT NULL"
        " AND q.replaced_at IS NULL GROUP BY q.id, q.path, q.prompt, q.sha256 ORDER BY q.id",
        [split],
    )
    rows, images = current_queries(rows, announce)
    return [
        (qid, path, prompt, np.array([index_of[t] for t in tids]), np.array(ranks))
        for qid, path, prompt, tids, ranks in rows
    ], images


def split_validation(queries, q_feat: np.ndarray, s: DistillSettings) -> tuple[Rankings, Rankings, np.ndarray]:
    """(fit, validation, is_val) of load_rankings rows: validation by prompt, like the test split, so validation prompts
    are never fitted."""
    prompts = sorted({q[2] or "" for q in queries})
    val_prompts = set(
        np.random.default_rng(s.seed).permutation(prompts)[: max(1, int(round(len(prompts) * s.val_fraction)))].tolist()
    )
    is_val = np.array([(q[2] or "") in val_prompts for q in queries])

    def subset(mask):
        return Rankings(
            q_feat[mask], [q[3] for q, m in zip(queries, mask) if m], [q[4] for q, m in zip(queries, mask) if m]
        )

    return subset(~is_val), subset(is_val), is_val


def query_embeddings(encoder: embed.Encoder, queries, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
    """Image and prompt features of load_rankings' queries and images."""
    return embed_images(encoder, images, [q[2] for q in queries])


def train(
    ws: Workspace,
    *,
    out: str | os.PathLike | None = None,
    progress_row: Callable[[dict], None] = lambda row: None,
    announce: Callable[[str], None] = lambda message: None,
    **overrides,
) -> TrainResult:
    """Train the head on the collected train-split rankings and write a new encoder bundle with it."""
    s = DistillSettings.from_config(ws.config["distill"], **overrides)
    started = time.perf_counter()
    encoder = embed.load(ws.encoder_dir(), "cpu")
    with Store(ws.db_path, read_only=True) as store:
        ids, img, txt = training_embeddings(ws, store, encoder)
        digests = training_digests(store)
        index_of = {int(i): j for j, i in enumerate(ids)}
        queries, images = load_rankings(store, "train", index_of, announce)
    if len(queries) < 4:
        raise AuditError(f"only {len(queries)} collected training queries; run `audit distill collect` first")
    q_img, q_txt = query_embeddings(encoder, queries, images)
    q_feat = np.concatenate([q_img, q_txt], axis=1)
    t_feat = np.concatenate([img, txt], axis=1)
    fit_set, val, is_val = split_validation(queries, q_feat, s)
    selected, shipped = fit(fit_set, val, t_feat, s, progress_row)
    refitted = shipped is not selected
    n_train, n_val = int((~is_val).sum()), int(is_val.sum())
    fitted = n_train + (n_val if refitted else 0)
    strengths = {}
    if shipped.log_strength is not None:
        strengths = {digests[j]: float(np.exp(shipped.log_strength[j])) for j in np.flatnonzero(shipped.touched)}
    # Calibrate shares over the scan's top-k on the validation queries, by the run that did not fit them: a refit head
    # scores its own training queries more sharply than new ones.
    top_k = int(ws.config["scan"]["top_k"])
    scores, positives = [], []
    for sims, cand, ranks in zip(selected.scores(val.query_features, t_feat), val.candidates, val.ranks):
        top = np.argsort(-sims, kind="stable")[:top_k]
        true = set(cand[np.argsort(ranks)[: s.calibration_k]].tolist())
        scores.append(sims[top])
        positives.append(np.array([i in true for i in top.tolist()]))
    tau, nll = fit_temperature(scores, positives)
    ece = calibration_error(scores, positives, tau)

    config = json.loads((encoder.directory / embed.CONFIG_NAME).read_text())
    config.pop("format")
    head_cfg = {
        "in_dim": t_feat.shape[1],
        "hidden_dims": list(s.hidden_dims),
        "out_dim": s.out_dim,
        "layernorm": s.layernorm,
        "dropout": s.dropout,
        "residual": s.residual,
        "query_map": s.query_map,
        "weights": "head.safetensors",
    }
    weights = {"head.safetensors": shipped.head.state_dict()}
    if strengths:
        config["strengths"] = {"weights": "strengths.safetensors", "images": len(strengths)}
        weights["strengths.safetensors"] = embed.strengths_state(strengths)
    variant = ("" if strengths else "-no-strengths") + ("" if s.query_map else "-shared-head")
    config.update(
        name=f"{encoder.name}-distilled{variant}",
        head=head_cfg,
        temperature=tau,
        distilled={
            "from_encoder": encoder.id,
            "val_map_at_k": selected.best_val_map,
            "k": s.k,
            "epochs": selected.epochs,
            "train_queries": n_train,
            "val_queries": n_val,
            "fitted_queries": fitted,
            "calibration_nll": nll,
            "calibration_ece": ece,
            "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(s).items()},
        },
    )
    target = Path(out) if out else ws.dir / "encoders" / f"{encoder.name}-distilled-{int(time.time())}"
    if target.exists() and any(target.iterdir()):
        raise AuditError(f"{target} already exists and is not empty; choose another --out")
    target.mkdir(parents=True, exist_ok=True)
    for name in {
        config["image_tower"]["weights"],
        *([config["text_tower"]["weights"]] if config.get("text_tower") else []),
    }:
        shutil.copy2(encoder.directory / name, target / name)
    new_id = embed.save(target, config, weights)
    return TrainResult(
        new_id,
        target,
        selected.best_val_map,
        selected.epochs,
        tau,
        nll,
        ece,
        time.perf_counter() - started,
        n_train,
        n_val,
        fitted,
        selected.history + (shipped.history[1:] if refitted else []),
    )
