"""`audit confirm`: run the slow, faithful teacher on the generations that matter most and store its verdict
beside the fast attribution, with how far the two agree.

Selection (`--top N`): generations attributed by the workspace's encoder, not yet
confirmed under the same model + teacher settings, highest top-1 share first — the
attributions where most money rides on a single training image. `--where SQL`
filters with a condition over `generations g`; `--generation ID` names one.
Each generation's scores and agreement commit together, so a killed run resumes
where it stopped.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from . import diffusion, embed, ingest, metrics
from .errors import AuditError
from .progress import Progress, Silent
from .scan import METHOD as FAST
from .search import IndexSettings, VectorTable
from .settings import AbuSettings
from .store import Store, utcnow
from .teacher import Unlearner, estimate_fisher
from .workspace import Workspace


@dataclass
class ConfirmResult:
    run_id: int | None
    generations: int = 0
    confirmed: int = 0
    failed: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    noise_floor: float | None = None
    signal_to_noise: float | None = None
    estimate_seconds: float = 0.0


class _Cache:
    """Per-training-image arrays keyed by id, persisted in the workspace (e.g. 'before' losses per model)."""

    def __init__(self, path: Path, columns: tuple[str, ...]):
        self.path = path
        self.columns = columns
        self.data: dict[int, tuple[float, ...]] = {}
        if path.is_file():
            saved = np.load(path)
            self.data = {int(i): tuple(row) for i, row in zip(saved["ids"], saved["values"])}

    def missing(self, ids) -> list[int]:
        return [int(i) for i in ids if int(i) not in self.data]

    def put(self, ids, values: np.ndarray) -> None:
        self.data.update({int(i): tuple(row) for i, row in zip(ids, values)})

    def get(self, ids) -> np.ndarray:
        return np.array([self.data[int(i)] for i in ids], np.float64)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp.npz")
        ids = np.fromiter(self.data, np.int64, len(self.data))
        np.savez(tmp, ids=ids, values=np.array([self.data[i] for i in ids.tolist()], np.float64).reshape(len(ids), len(self.columns)))
        os.replace(tmp, self.path)


def _read_image(path: str, limits: ingest.Limits):
    image, _ = ingest.decode(ingest.read_bytes(path, limits), limits)
    return image


class TeacherSession:
    """Everything one confirm run loads once: models, Fisher, caches, training metadata."""

    def __init__(self, ws: Workspace, store: Store, model_path: Path, device: torch.device, settings: AbuSettings, flip: str):
        self.ws = ws
        self.store = store
        self.settings = settings
        self.limits = ingest.Limits(int(ws.config["scan"]["max_pixels"]), int(ws.config["scan"]["max_file_bytes"]))
        self.cache_dir = ws.dir / "cache"
        self.model = diffusion.load(model_path, device, self.cache_dir, flip)
        self.encoder = embed.load(ws.encoder_dir(), device)
        self.table = VectorTable(ws.lancedb_uri, self.encoder.id, self.encoder.dim, IndexSettings.from_config(ws.config["index"]))
        self.searcher = self.table.searcher()
        rows = store.rows("SELECT id, path, caption FROM training_images ORDER BY id")
        if not rows:
            raise AuditError("the workspace has no training images; run `audit index TRAINING_DIR` first")
        self.train_ids = np.array([r[0] for r in rows], np.int64)
        self.train_meta = {r[0]: (r[1], r[2]) for r in rows}
        self._latents: dict[int, torch.Tensor] = {}
        self._captions: dict[str, torch.Tensor] = {}
        self.unlearner = Unlearner(self.model, settings, self._fisher(), len(self.train_ids))
        key = settings.scoring_key(self.model.hash)
        self.before = _Cache(self.cache_dir / f"abu-before-{key}.npz", ("loss", "loss_flip"))
        ref_key = settings.reference_key(self.model.hash)
        self.reference = _Cache(self.cache_dir / f"abu-reference-{ref_key}.npz", ("delta", "delta_flip"))
        self._reference_delta_path = self.cache_dir / f"abu-reference-{ref_key}.safetensors"
        self._reference_delta = None

    # ------------------------------------------------------------------ training-side inputs
    def training_inputs(self, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, flipped latents, caption embeddings) of training images, encoded once per run."""
        todo = [int(i) for i in ids if int(i) not in self._latents]
        if todo:
            pixels = torch.stack([self.model.pixels(_read_image(self.train_meta[i][0], self.limits)) for i in todo])
            both = self.model.latents(torch.cat([pixels, pixels.flip(-1)])).cpu()
            for j, i in enumerate(todo):
                self._latents[i] = (both[j], both[len(todo) + j])
        captions = [self.train_meta[int(i)][1] or "" for i in ids]
        new = sorted({c for c in captions if c not in self._captions})
        if new:
            self._captions.update(zip(new, self.model.text_embeddings(new).cpu()))
        return (
            torch.stack([self._latents[int(i)][0] for i in ids]),
            torch.stack([self._latents[int(i)][1] for i in ids]),
            torch.stack([self._captions[c] for c in captions]),
        )

    def _fisher(self) -> dict[str, torch.Tensor]:
        s = self.settings
        path = self.cache_dir / f"fisher-{self.model.hash}-{s.fisher_samples}-{s.seed}.safetensors"
        if path.is_file():
            return load_file(str(path), device=str(self.model.device))
        rng = np.random.default_rng(s.seed)
        sample = rng.choice(self.train_ids, size=min(s.fisher_samples, len(self.train_ids)), replace=False)
        latents, flipped, captions = self.training_inputs(sample)
        if self.model.flip_augmentation:
            # Training saw flips half the time; so does the Fisher.
            use_flip = torch.from_numpy(rng.random(len(sample)) < 0.5)
            latents = torch.where(use_flip[:, None, None, None], flipped, latents)
        fisher = estimate_fisher(self.model, latents, captions, s.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in fisher.items()}, str(path))
        return fisher

    # ------------------------------------------------------------------ scoring
    def losses(self, ids, seed: int | None = None) -> np.ndarray:
        """(n, 2) losses of the images and their flips under the current weights."""
        latents, flipped, captions = self.training_inputs(ids)
        plain = self.unlearner.losses(ids, latents, captions, seed)
        if not self.model.flip_augmentation:
            return np.stack([plain, plain], axis=1)
        return np.stack([plain, self.unlearner.losses(ids, flipped, captions, seed)], axis=1)

    def before_losses(self, ids) -> np.ndarray:
        missing = self.before.missing(ids)
        if missing:
            self.before.put(missing, self.losses(missing))
            self.before.save()
        return self.before.get(ids)

    def reference_delta(self) -> dict[str, torch.Tensor]:
        """The generic update: unlearning the mean gradient of random training images (see teacher.py)."""
        if self._reference_delta is None:
            if self._reference_delta_path.is_file():
                self._reference_delta = load_file(str(self._reference_delta_path), device=str(self.model.device))
            else:
                s = self.settings
                rng = np.random.default_rng(s.seed + 1)
                sample = rng.choice(self.train_ids, size=min(s.reference_samples, len(self.train_ids)), replace=False)
                latents, _, captions = self.training_inputs(sample)
                grad = self.unlearner.gradient(latents, captions, s.draws * max(1, len(sample) // 8), s.seed + 2)
                self._reference_delta = self.unlearner.natural_step(grad)
                save_file({k: v.contiguous().cpu() for k, v in self._reference_delta.items()}, str(self._reference_delta_path))
        return self._reference_delta

    def reference_changes(self, ids) -> np.ndarray:
        missing = self.reference.missing(ids)
        if missing:
            with self.unlearner.applied(self.reference_delta()):
                after = self.losses(missing)
            self.reference.put(missing, after - self.before_losses(missing))
            self.reference.save()
        return self.reference.get(ids)


def _select(store: Store, encoder_id: str, settings_hash: str, top: int | None, where: str | None, generation: int | None):
    if top is None and where is None and generation is None:
        raise AuditError("say which generations to confirm: --top N, --where SQL or --generation ID")
    conditions = ["g.id NOT IN (SELECT c.generation_id FROM confirmations c JOIN confirm_runs r ON r.id = c.run_id WHERE r.settings_hash = ?)"]
    params: list = [FAST, encoder_id, settings_hash]
    if where:
        conditions.append(f"({where})")
    if generation is not None:
        conditions.append("g.id = ?")
        params.append(generation)
    sql = (
        "SELECT g.id, g.path, g.prompt FROM generations g"
        " JOIN attributions a ON a.generation_id = g.id AND a.rank = 1 AND a.method = ? AND a.encoder_id = ?"
        f" WHERE {' AND '.join(conditions)} ORDER BY a.share DESC, g.id"
    )
    if top is not None:
        sql += f" LIMIT {int(top)}"
    try:
        return store.rows(sql, params)
    except Exception as exc:  # a user's --where can be anything
        raise AuditError(f"--where is not a valid condition over generations g: {str(exc).splitlines()[0]}") from None


def confirm(
    ws: Workspace,
    *,
    top: int | None = None,
    where: str | None = None,
    generation: int | None = None,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] = lambda message: None,
    **overrides,
) -> ConfirmResult:
    """Confirm the fast attributions of the selected generations with the AbU teacher; returns what it did."""
    progress = progress or Silent()
    section = ws.config["confirm"]
    if section.get("method", "abu") != "abu":
        raise AuditError(f"confirm.method {section.get('method')!r} is not available; use abu")
    settings = AbuSettings.from_config(section, **overrides)
    model_path = Path(model) if model else ws.path_setting("paths", "model")
    if model_path is None:
        raise AuditError(f"no diffusion model configured; set [paths] model in {ws.config_path} or pass --model PATH")
    torch_device = embed.resolve_device(device or ws.config["encoder"]["device"])
    started = time.perf_counter()

    with ws.writing(), Store(ws.db_path) as store:
        ctx = TeacherSession(ws, store, model_path, torch_device, settings, str(section.get("flip", "auto")))
        settings_hash = settings.hash(ctx.model.hash, "abu", ctx.encoder.id, str(ctx.model.flip_augmentation))
        selected = _select(store, ctx.encoder.id, settings_hash, top, where, generation)
        result = ConfirmResult(None)
        if not selected:
            announce("nothing to confirm: every selected generation is already confirmed with this model and these settings")
            return result
        result.estimate_seconds = _estimate(ctx, len(selected))
        announce(
            f"confirming {len(selected)} generation(s) with AbU on {torch_device}: "
            f"{settings.candidates} candidates + {settings.controls} controls × {settings.timesteps} timesteps"
            f"{' × 2 (flip)' if ctx.model.flip_augmentation else ''}; estimated {result.estimate_seconds:.0f} s"
        )
        with store.transaction():
            store.con.execute("UPDATE confirm_runs SET status = 'interrupted' WHERE status = 'running'")
            run_id = store.next_id("confirm_runs")
            store.con.execute(
                "INSERT INTO confirm_runs (id, method, model_hash, model_path, encoder_id, settings, settings_hash, started_at, status)"
                " VALUES (?, 'abu', ?, ?, ?, ?, ?, ?, 'running')",
                [run_id, ctx.model.hash, str(ctx.model.folder), ctx.encoder.id,
                 json.dumps({**asdict(settings), "flip": ctx.model.flip_augmentation}), settings_hash, utcnow()],
            )
        result.run_id = run_id
        progress.start("confirming", len(selected))
        snr = []
        for gen_id, path, prompt in selected:
            t0 = time.perf_counter()
            try:
                image = _read_image(path, ctx.limits)
            except ingest.IngestError as exc:
                result.failed.append((gen_id, f"{path}: {exc.reason}"))
                progress.advance()
                continue
            scored = _score(ctx, gen_id, image, prompt)
            if result.noise_floor is None:
                result.noise_floor = _noise_floor(ctx, scored)
            verdict, scores = _agreement(ctx, gen_id, scored, result.noise_floor)
            snr.append(verdict.pop("snr"))
            seconds = time.perf_counter() - t0
            with store.transaction():
                store.insert_arrow("teacher_scores", pa.table({"run_id": pa.array([run_id] * len(scores["training_id"]), pa.int64()), **scores}))
                store.con.execute(
                    "INSERT INTO confirmations (generation_id, run_id, method, encoder_id, k, map_at_k, top1_agree, spearman,"
                    " control_margin, confirmed, seconds, confirmed_at) VALUES (?, ?, 'abu', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [gen_id, run_id, ctx.encoder.id, settings.k, verdict["map_at_k"], verdict["top1_agree"], verdict["spearman"],
                     verdict["control_margin"], verdict["confirmed"], seconds, utcnow()],
                )
                store.con.execute("UPDATE confirm_runs SET n_generations = n_generations + 1 WHERE id = ?", [run_id])
            result.generations += 1
            result.confirmed += int(verdict["confirmed"])
            progress.advance()
        result.seconds = time.perf_counter() - started
        store.con.execute(
            "UPDATE confirm_runs SET status = 'finished', finished_at = ?, noise_floor = ?, signal_to_noise = ?,"
            " seconds_per_generation = ? WHERE id = ?",
            [utcnow(), result.noise_floor, float(np.median(snr)) if snr else None,
             result.seconds / max(1, result.generations), run_id],
        )
        result.signal_to_noise = float(np.median(snr)) if snr else None
    return result


def unlearn(ctx: TeacherSession, image, prompt, seed: int) -> dict:
    """The weight change that forgets this (image, prompt): latents and prompt embedding in the model's own space."""
    latent = ctx.model.latents(ctx.model.pixels(image)[None])[0]
    return ctx.unlearner.unlearn(latent, ctx.model.text_embeddings([prompt])[0], ctx.settings.seed + seed)


def _candidates(ctx: TeacherSession, gen_id: int, image, prompt) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, fast scores, fast ranks, is_control): the fast top-K plus a seeded random control sample of the rest."""
    s = ctx.settings
    feature = ctx.encoder.features(ctx.encoder.preprocess(image)[None], [prompt])
    top_ids, top_scores = ctx.searcher.search(feature, min(s.candidates, len(ctx.train_ids)))
    top_ids, top_scores = top_ids[0][top_ids[0] >= 0], top_scores[0][top_ids[0] >= 0]
    rest = np.setdiff1d(ctx.train_ids, top_ids)
    rng = np.random.default_rng(s.seed * 7919 + gen_id)
    controls = rng.choice(rest, size=min(s.controls, len(rest)), replace=False) if len(rest) else np.zeros(0, np.int64)
    control_scores = ctx.table.vectors(controls) @ feature[0] if len(controls) else np.zeros(0)
    ids = np.concatenate([top_ids, controls]).astype(np.int64)
    fast = np.concatenate([top_scores, control_scores]).astype(np.float64)
    ranks = np.concatenate([np.arange(1, len(top_ids) + 1), np.zeros(len(controls), int)])
    return ids, fast, ranks, np.concatenate([np.zeros(len(top_ids), bool), np.ones(len(controls), bool)])


def influence(ctx: TeacherSession, ids, delta, seed: int | None = None, before: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(raw, corrected) influence per candidate: max over image and flip of the loss change under delta."""
    before = ctx.before_losses(ids) if before is None else before
    with ctx.unlearner.applied(delta):
        after = ctx.losses(ids, seed)
    change = after - before
    raw = change.max(axis=1)
    if not ctx.settings.bias_correction:
        return raw, raw
    alpha = ctx.unlearner.alignment(delta, ctx.reference_delta())
    corrected = (change - alpha * ctx.reference_changes(ids)).max(axis=1)
    return raw, corrected


@dataclass
class _Scored:
    ids: np.ndarray
    fast: np.ndarray
    fast_rank: np.ndarray
    is_control: np.ndarray
    raw: np.ndarray
    influence: np.ndarray
    delta: dict


def _score(ctx: TeacherSession, gen_id: int, image, prompt) -> _Scored:
    """Unlearn the generation and score its candidates."""
    ids, fast, ranks, is_control = _candidates(ctx, gen_id, image, prompt)
    delta = unlearn(ctx, image, prompt, gen_id)
    raw, scores = influence(ctx, ids, delta)
    return _Scored(ids, fast, ranks, is_control, raw, scores, delta)


def _noise_floor(ctx: TeacherSession, scored: _Scored) -> float:
    """Monte-Carlo noise of the influence: the same unlearning scored again with independent noise.
    floor = std(Δ_a − Δ_b)/√2 over the candidates."""
    other = ctx.settings.seed + 10_007
    raw_b, _ = influence(ctx, scored.ids, scored.delta, seed=other, before=ctx.losses(scored.ids, other))
    return float(np.std(scored.raw - raw_b) / np.sqrt(2))


def _agreement(ctx: TeacherSession, gen_id: int, scored: _Scored, noise_floor: float) -> tuple[dict, dict]:
    s = ctx.settings
    ids, fast, influence, is_control = scored.ids, scored.fast, scored.influence, scored.is_control
    order = np.argsort(-influence, kind="stable")
    teacher_rank = np.empty(len(ids), np.int32)
    teacher_rank[order] = np.arange(1, len(ids) + 1)
    k = min(s.k, len(ids))
    top_fast = ~is_control & (scored.fast_rank <= k)
    margin = float(np.median(influence[top_fast]) - np.median(influence[is_control])) if is_control.any() else 0.0
    floor = noise_floor if noise_floor > 0 else float("nan")
    verdict = {
        "map_at_k": metrics.map_at_k(ids, fast, influence, k),
        "top1_agree": bool(teacher_rank[0] <= k),
        "spearman": metrics.spearman(fast[~is_control], influence[~is_control]),
        "control_margin": margin / floor if noise_floor > 0 else margin,
        "snr": float(np.std(scored.raw) / floor) if noise_floor > 0 else float("inf"),
    }
    verdict["confirmed"] = bool(verdict["map_at_k"] >= s.confirm_threshold and verdict["control_margin"] > 0)
    scores = {
        "generation_id": pa.array([gen_id] * len(ids), pa.int64()),
        "training_id": pa.array(ids),
        "influence": pa.array(influence),
        "raw_influence": pa.array(scored.raw),
        "teacher_rank": pa.array(teacher_rank),
        "fast_rank": pa.array([int(r) if r > 0 else None for r in scored.fast_rank], pa.int32()),
        "is_control": pa.array(is_control),
    }
    return verdict, scores


def _estimate(ctx: TeacherSession, n_generations: int) -> float:
    """Seconds for the run, from timing one scoring batch on this device (printed before the work starts)."""
    s = ctx.settings
    probe = ctx.train_ids[: min(8, len(ctx.train_ids))]
    ctx.training_inputs(probe)
    t0 = time.perf_counter()
    ctx.unlearner.losses(probe, *ctx.training_inputs(probe)[::2])
    per_row = (time.perf_counter() - t0) / (len(probe) * s.timesteps)
    flips = 2 if ctx.model.flip_augmentation else 1
    scoring_rows = (s.candidates + s.controls) * s.timesteps * flips
    # A backward pass costs about two forwards; the first generation also fills the 'before' and reference caches
    # and measures the noise floor (a second scoring).
    first_time = 3 * scoring_rows if not ctx.before.data else scoring_rows
    return per_row * ((scoring_rows + 3 * s.draws * s.steps) * n_generations + first_time)
