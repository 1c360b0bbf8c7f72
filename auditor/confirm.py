"""`audit confirm`: run the slow, faithful teacher on the generations that matter most and store its verdict
beside the fast attribution, with how far the two agree.

Selection (`--top N`): generations attributed by the workspace's encoder, not yet
confirmed under the same model + teacher settings, highest top-1 share first — the
attributions where most money rides on a single training image. `--where SQL`
filters with a condition over `generations g`; `--generation ID` names one.
Each generation's scores and agreement commit together, so a killed run resumes
where it stopped.

Teachers (`--method`): `abu`, attribution by unlearning (teacher.py, the default), and
`dtrak`, projected gradients (dtrak.py). Both score the same candidates — the fast
top-K plus seeded random controls, from the [confirm] settings — into the same
tables, so their verdicts and the fast path's compare in one query.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from . import diffusion, embed, ingest, metrics
from .dtrak import DtrakTeacher
from .errors import AuditError
from .progress import Progress, Silent
from .scan import METHOD as FAST
from .search import IndexSettings, Searcher, VectorTable
from .settings import AbuSettings, DtrakSettings
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


class Teacher(Protocol):
    """What `confirm` needs from a teacher; AbU (TeacherSession) and D-TRAK (dtrak.DtrakTeacher) provide it."""

    method: str

    def describe(self) -> str: ...  # its cost knobs, for the announcement

    def record(self) -> dict: ...  # its settings, stored in confirm_runs.settings

    def score(self, image, prompt: str | None, candidate_ids: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(raw, influence) per candidate; `seed` (the generation id) fixes the query's own randomness."""

    def noise_floor(self, image, prompt: str | None, candidate_ids: np.ndarray, seed: int, raw: np.ndarray) -> float:
        """The spread of `raw` that independent noise alone produces, in its units."""

    def estimate(self, n_generations: int, n_candidates: int) -> float: ...


def training_set(
    ws: Workspace, store: Store, model_path: Path, device: torch.device, flip: str
) -> diffusion.TrainingSet:
    """The workspace's diffusion model and its registered training images."""
    limits = ingest.Limits(int(ws.config["scan"]["max_pixels"]), int(ws.config["scan"]["max_file_bytes"]))
    model = diffusion.load(model_path, device, ws.dir / "cache", flip)
    return diffusion.TrainingSet(model, store.rows("SELECT id, path, caption FROM training_images ORDER BY id"), limits)


class TeacherSession:
    """The AbU teacher on one model and training set: Fisher, unlearner and caches, loaded once per run."""

    method = "abu"

    def __init__(self, training: diffusion.TrainingSet, settings: AbuSettings, cache_dir: Path):
        self.training = training
        self.model = training.model
        self.settings = settings
        self.cache_dir = cache_dir
        self.unlearner = Unlearner(self.model, settings, self._fisher(), len(training.ids))
        self._reference_delta_path = cache_dir / f"abu-reference-{settings.reference_key(self.model.hash)}.safetensors"
        self._reference_delta = None

    def _fisher(self) -> dict[str, torch.Tensor]:
        s = self.settings
        path = self.cache_dir / f"fisher-{self.model.hash}-{s.fisher_samples}-{s.seed}.safetensors"
        if path.is_file():
            return load_file(str(path), device=str(self.model.device))
        rng = np.random.default_rng(s.seed)
        sample = rng.choice(self.training.ids, size=min(s.fisher_samples, len(self.training.ids)), replace=False)
        latents, flipped, captions = self.training.inputs(sample)
        if self.model.flip_augmentation:
            # Training saw flips half the time; so does the Fisher.
            use_flip = torch.from_numpy(rng.random(len(sample)) < 0.5)
            latents = torch.where(use_flip[:, None, None, None], flipped, latents)
        fisher = estimate_fisher(self.model, latents, captions, s.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in fisher.items()}, str(path))
        return fisher

    # ------------------------------------------------------------------ the teacher protocol
    def describe(self) -> str:
        return f"AbU, {self.settings.timesteps} timesteps{' × 2 (flip)' if self.model.flip_augmentation else ''}"

    def record(self) -> dict:
        return {**asdict(self.settings), "scheme": self.settings.scheme, "flip": self.model.flip_augmentation}

    def score(self, image, prompt, candidate_ids, seed):
        return influence(self, candidate_ids, unlearn(self, image, prompt, seed), self.noise_seed(seed))

    def noise_floor(self, image, prompt, candidate_ids, seed, raw) -> float:
        """The same unlearning (deterministic in its seed) scored again with independent noise:
        floor = std(Δ_a − Δ_b)/√2 over the candidates."""
        raw_b, _ = influence(self, candidate_ids, unlearn(self, image, prompt, seed), self.noise_seed(seed, stream=1))
        return float(np.std(raw - raw_b) / np.sqrt(2))

    def noise_seed(self, query_seed: int, stream: int = 0) -> int:
        """The scoring noise of one query. Each query draws its own: noise fixed per candidate across queries gave every
        candidate the same push up or down in every query, which payouts summed instead of averaging away (TEACHER.md)."""
        return int(np.random.SeedSequence([self.settings.seed, query_seed, stream]).generate_state(1)[0])

    def estimate(self, n_generations: int, n_candidates: int) -> float:
        """Seconds for the run, from timing one scoring batch on this device."""
        s = self.settings
        probe = self.training.ids[: min(8, len(self.training.ids))]
        latents, _, captions = self.training.inputs(probe)
        t0 = time.perf_counter()
        self.unlearner.losses(probe, latents, captions)
        per_row = (time.perf_counter() - t0) / (len(probe) * s.timesteps)
        # Losses before, after the query's update and after the reference update, all under the query's noise.
        passes = 3 if s.bias_correction else 2
        scoring_rows = passes * n_candidates * s.timesteps * (2 if self.model.flip_augmentation else 1)
        # A backward pass costs about two forwards; the first generation also measures the noise floor (a second
        # unlearning and scoring), and the first run makes the reference update.
        once = scoring_rows + 3 * s.draws * s.steps
        if s.bias_correction and not self._reference_delta_path.is_file():
            once += 3 * s.draws * max(1, s.reference_samples // 8)
        return per_row * ((scoring_rows + 3 * s.draws * s.steps) * n_generations + once)

    # ------------------------------------------------------------------ scoring
    def losses(self, ids, noise: int) -> np.ndarray:
        """(n, 2) losses of the images and their flips under the current weights and the given scoring noise."""
        latents, flipped, captions = self.training.inputs(ids)
        plain = self.unlearner.losses(ids, latents, captions, noise)
        if not self.model.flip_augmentation:
            return np.stack([plain, plain], axis=1)
        return np.stack([plain, self.unlearner.losses(ids, flipped, captions, noise)], axis=1)

    def reference_delta(self) -> dict[str, torch.Tensor]:
        """The generic update: unlearning the mean gradient of random training images (see teacher.py)."""
        if self._reference_delta is None:
            if self._reference_delta_path.is_file():
                self._reference_delta = load_file(str(self._reference_delta_path), device=str(self.model.device))
            else:
                s = self.settings
                rng = np.random.default_rng(s.seed + 1)
                sample = rng.choice(
                    self.training.ids, size=min(s.reference_samples, len(self.training.ids)), replace=False
                )
                latents, _, captions = self.training.inputs(sample)
                grad = self.unlearner.gradient(latents, captions, s.draws * max(1, len(sample) // 8), s.seed + 2)
                self._reference_delta = self.unlearner.natural_step(grad)
                save_file(
                    {k: v.contiguous().cpu() for k, v in self._reference_delta.items()}, str(self._reference_delta_path)
                )
        return self._reference_delta


def _select(
    store: Store, encoder_id: str, settings_hash: str, top: int | None, where: str | None, generation: int | None
):
    if top is None and where is None and generation is None:
        raise AuditError("say which generations to confirm: --top N, --where SQL or --generation ID")
    conditions = [
        "g.id NOT IN (SELECT c.generation_id FROM confirmations c JOIN confirm_runs r ON r.id = c.run_id WHERE r.settings_hash = ?)"
    ]
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


METHODS = ("abu", "dtrak")


def confirm(
    ws: Workspace,
    *,
    method: str | None = None,
    top: int | None = None,
    where: str | None = None,
    generation: int | None = None,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] = lambda message: None,
    **overrides,
) -> ConfirmResult:
    """Confirm the fast attributions of the selected generations with a teacher (AbU or D-TRAK); returns what it did."""
    progress = progress or Silent()
    section = ws.config["confirm"]
    method = method or section.get("method", "abu")
    if method not in METHODS:
        raise AuditError(f"confirm method {method!r} is not available; use {' or '.join(METHODS)}")
    # Candidates, controls and agreement come from [confirm] whatever the teacher, so AbU and D-TRAK
    # verdicts on a generation are about the same candidates.
    selection = AbuSettings.from_config(section, **overrides)
    model_path = ws.model_dir(model)
    torch_device = embed.resolve_device(device or ws.config["encoder"]["device"])
    started = time.perf_counter()

    with ws.writing(), Store(ws.db_path) as store:
        training = training_set(ws, store, model_path, torch_device, str(section.get("flip", "auto")))
        encoder = embed.load(ws.encoder_dir(), torch_device)
        table = VectorTable.for_encoder(ws.lancedb_uri, encoder, IndexSettings.from_config(ws.config["index"]))
        fast = _FastPath(encoder, table, table.searcher(), training.ids)
        flip = str(training.model.flip_augmentation)
        if method == "abu":
            settings_hash = selection.hash(training.model.hash, "abu", encoder.id, flip)
        else:
            dtrak_settings = DtrakSettings.from_config(ws.config["dtrak"], **overrides)
            settings_hash = dtrak_settings.hash(
                training.model.hash, "dtrak", encoder.id, flip, json.dumps(selection.selection(), sort_keys=True)
            )
        # A run killed after its last commit is over too, even when this call finds nothing left to do.
        store.con.execute("UPDATE confirm_runs SET status = 'interrupted' WHERE status = 'running'")
        selected = _select(store, encoder.id, settings_hash, top, where, generation)
        result = ConfirmResult(None)
        if not selected:
            announce(
                "nothing to confirm: every selected generation is already confirmed with this model and these settings"
            )
            return result
        teacher: Teacher = (
            TeacherSession(training, selection, ws.dir / "cache")
            if method == "abu"
            else DtrakTeacher.for_workspace(ws, training, dtrak_settings, progress, announce)
        )
        n_candidates = selection.candidates + selection.controls
        result.estimate_seconds = teacher.estimate(len(selected), n_candidates)
        announce(
            f"confirming {len(selected)} generation(s) with {teacher.describe()} on {torch_device}: "
            f"{selection.candidates} candidates + {selection.controls} controls; estimated {result.estimate_seconds:.0f} s"
        )
        with store.transaction():
            run_id = store.next_id("confirm_runs")
            store.con.execute(
                "INSERT INTO confirm_runs (id, method, model_hash, model_path, encoder_id, settings, settings_hash, started_at, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, 'running')",
                [
                    run_id,
                    method,
                    training.model.hash,
                    str(training.model.folder),
                    encoder.id,
                    json.dumps({**selection.selection(), **teacher.record()}),
                    settings_hash,
                    utcnow(),
                ],
            )
        result.run_id = run_id
        progress.start("confirming", len(selected))
        snr = []
        for gen_id, path, prompt in selected:
            t0 = time.perf_counter()
            try:
                image = diffusion.read_image(path, training.limits)
            except ingest.IngestError as exc:
                result.failed.append((gen_id, f"{path}: {exc.reason}"))
                progress.advance()
                continue
            ids, fast_scores, fast_ranks, is_control = _candidates(fast, selection, gen_id, image, prompt)
            raw, scores = teacher.score(image, prompt, ids, gen_id)
            scored = _Scored(ids, fast_scores, fast_ranks, is_control, raw, scores)
            if result.noise_floor is None:
                result.noise_floor = teacher.noise_floor(image, prompt, ids, gen_id, raw)
            verdict, rows = _agreement(selection, gen_id, scored, result.noise_floor)
            snr.append(verdict.pop("snr"))
            seconds = time.perf_counter() - t0
            with store.transaction():
                store.insert_arrow(
                    "teacher_scores", pa.table({"run_id": pa.array([run_id] * len(ids), pa.int64()), **rows})
                )
                store.con.execute(
                    "INSERT INTO confirmations (generation_id, run_id, method, encoder_id, k, map_at_k, top1_agree, spearman,"
                    " control_margin, confirmed, seconds, confirmed_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    [
                        gen_id,
                        run_id,
                        method,
                        encoder.id,
                        selection.k,
                        verdict["map_at_k"],
                        verdict["top1_agree"],
                        verdict["spearman"],
                        verdict["control_margin"],
                        verdict["confirmed"],
                        seconds,
                        utcnow(),
                    ],
                )
                store.con.execute("UPDATE confirm_runs SET n_generations = n_generations + 1 WHERE id = ?", [run_id])
            result.generations += 1
            result.confirmed += int(verdict["confirmed"])
            progress.advance()
        result.seconds = time.perf_counter() - started
        store.con.execute(
            "UPDATE confirm_runs SET status = 'finished', finished_at = ?, noise_floor = ?, signal_to_noise = ?,"
            " seconds_per_generation = ? WHERE id = ?",
            [
                utcnow(),
                result.noise_floor,
                float(np.median(snr)) if snr else None,
                result.seconds / max(1, result.generations),
                run_id,
            ],
        )
        result.signal_to_noise = float(np.median(snr)) if snr else None
    return result


def unlearn(ctx: TeacherSession, image, prompt, seed: int) -> dict:
    """The weight change that forgets this (image, prompt): latents and prompt embedding in the model's own space."""
    latent = ctx.model.latents(ctx.model.pixels(image)[None])[0]
    return ctx.unlearner.unlearn(latent, ctx.model.text_embeddings([prompt])[0], ctx.settings.seed + seed)


def influence(ctx: TeacherSession, ids, delta, noise: int) -> tuple[np.ndarray, np.ndarray]:
    """(raw, corrected) influence per candidate: max over image and flip of the loss change under delta, every loss
    under the same scoring noise (seeded by `noise` and the candidate)."""
    before = ctx.losses(ids, noise)
    with ctx.unlearner.applied(delta):
        change = ctx.losses(ids, noise) - before
    raw = change.max(axis=1)
    if not ctx.settings.bias_correction:
        return raw, raw
    reference = ctx.reference_delta()
    with ctx.unlearner.applied(reference):
        reference_change = ctx.losses(ids, noise) - before
    alpha = ctx.unlearner.alignment(delta, reference)
    return raw, (change - alpha * reference_change).max(axis=1)


@dataclass
class _FastPath:
    encoder: embed.Encoder
    table: VectorTable
    searcher: Searcher
    train_ids: np.ndarray


def _candidates(
    fast: _FastPath, s: AbuSettings, gen_id: int, image, prompt
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(ids, fast scores, fast ranks, is_control): the fast top-K plus a seeded random control sample of the rest."""
    feature = fast.encoder.features(fast.encoder.preprocess(image)[None], [prompt])
    top_ids, top_scores = fast.searcher.search(feature, min(s.candidates, len(fast.train_ids)))
    top_ids, top_scores = top_ids[0][top_ids[0] >= 0], top_scores[0][top_ids[0] >= 0]
    rest = np.setdiff1d(fast.train_ids, top_ids)
    rng = np.random.default_rng(s.seed * 7919 + gen_id)
    controls = rng.choice(rest, size=min(s.controls, len(rest)), replace=False) if len(rest) else np.zeros(0, np.int64)
    control_scores = fast.table.vectors(controls) @ feature[0] if len(controls) else np.zeros(0)
    ids = np.concatenate([top_ids, controls]).astype(np.int64)
    scores = np.concatenate([top_scores, control_scores]).astype(np.float64)
    ranks = np.concatenate([np.arange(1, len(top_ids) + 1), np.zeros(len(controls), int)])
    return ids, scores, ranks, np.concatenate([np.zeros(len(top_ids), bool), np.ones(len(controls), bool)])


@dataclass
class _Scored:
    ids: np.ndarray
    fast: np.ndarray
    fast_rank: np.ndarray
    is_control: np.ndarray
    raw: np.ndarray
    influence: np.ndarray


def _agreement(s: AbuSettings, gen_id: int, scored: _Scored, noise_floor: float) -> tuple[dict, dict]:
    ids, fast, influence, is_control = scored.ids, scored.fast, scored.influence, scored.is_control
    teacher_rank = metrics.ranks(influence)
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
