"""`audit distill collect`: query images ranked by the teacher, stored query by query (resumable).

Also the teacher's replicate on collected queries (`audit eval teacher --replicate`): the same teacher with
independent noise, the ceiling any student can reach against it.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import pyarrow as pa

from .. import diffusion, embed, ingest, metrics
from ..abu import AbuTeacher
from ..config import DistillSettings
from ..errors import AuditError
from ..features import embed_images, joint, training_embeddings
from ..index import reconcile
from ..progress import Progress, Silent
from ..prompts import read_prompt
from ..store import Store, utcnow
from ..teacher import training_set
from ..workspace import Workspace
from .collection import collected_queries, current_queries


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
    session: AbuTeacher,
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
                data = ingest.read_bytes(path, ws.limits)
                if path in known and hashlib.sha256(data).hexdigest() == known[path][1]:
                    continue
                _, info = ingest.decode(data, ws.limits)
            except ingest.IngestError as exc:
                skipped.append((path, exc.reason))
                continue
            if path in known:
                replaced.append(known[path][0])
            prompt, _ = read_prompt(path, info)
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
    unknown = sorted(set(overrides) - {f.name for f in fields(DistillSettings)})
    if unknown:
        raise AuditError(
            f"{', '.join(unknown)}: no [distill] setting; the teacher's settings are the workspace's [confirm] section (audit.toml)"
        )
    s = ws.config.distill.override(seed=seed, **overrides)
    teacher = ws.config.confirm
    model_path = ws.model_source(model)
    prompts = None
    if prompts_file:
        prompts = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
    started = time.perf_counter()
    torch_device = ws.device(device)
    flip = teacher.flip
    with ws.writing(), Store(ws.db_path) as store:
        training = training_set(ws, store, model_path, torch_device, flip)
        session = AbuTeacher(training, teacher, ws.dir / "cache")
        encoder = embed.load(ws.encoder_dir(), torch_device)
        reconcile(store, ws.vector_table(encoder))
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
        estimate = session.estimate(len(todo), n_cand)
        to_generate = sum(1 for r in todo if r[4] == "generated" and not os.path.isfile(r[1]))
        if to_generate and estimate.phases:
            # Sampling: two UNet rows (guidance) per step, then a VAE decode (about an encode).
            t = session.timings
            estimate.phases = {
                f"generating {to_generate} query image(s)": to_generate * (2 * s.sample_steps * t.forward + t.vae),
                **estimate.phases,
            }
        result.estimate_seconds = estimate.total
        announce(f"{len(todo)} of {result.planned} queries to rank, {n_cand} candidates each; {estimate}")
        if todo:
            session.prepare(progress, announce)
        pipe = None
        progress.start("collecting", len(todo))
        for qid, path, prompt, seed, source in todo:
            t0 = time.perf_counter()
            if source == "generated" and not os.path.isfile(path):
                pipe = pipe or diffusion.pipeline(session.model)
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                diffusion.generate(pipe, prompt, seed, s.sample_steps, s.guidance).save(path)
            try:
                data = ingest.read_bytes(path, ws.limits)
                image = ingest.decode(data, ws.limits)[0]
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


# Added to the teacher's seed: new unlearning draws and new scoring noise, overlapping no query's.
REPLICATE_SEED = 1_000_003


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
    teacher --replicate`). Uses the workspace's [confirm] settings, which should be those the rankings were collected with.
    Stored in distill_replicates per query as it goes: a rerun (or an interrupted one) only scores what is missing."""
    progress = progress or Silent()
    base = ws.config.confirm
    settings = replace(base, seed=base.seed + REPLICATE_SEED)
    model_path = ws.model_source(model)
    # Keyed by what the scores depend on, like a collection: another candidate count or k for `audit confirm` keeps it.
    key = settings.scoring_hash("replicate", diffusion.model_hash(model_path, ws.dir / "cache"))
    with ws.reader() as store:
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
    todo = list(zip(*current_queries([r for r in rows if int(r[0]) not in stored], ws.limits, announce)))
    if todo:
        with ws.writing(), Store(ws.db_path) as store:
            training = training_set(ws, store, model_path, ws.device(device), base.flip)
            session = AbuTeacher(training, settings, ws.dir / "cache")
            announce(
                f"replicating the teacher on {len(todo)} of {len(rows)} {split} queries with independent noise; "
                f"{session.estimate(len(todo), len(todo[0][0][3]))}"
            )
            session.prepare(progress, announce)
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
