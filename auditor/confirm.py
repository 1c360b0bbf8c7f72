"""`audit confirm`: run the slow, faithful teacher on the generations that matter most and store its verdict
beside the fast attribution, with how far the two agree.

Selection (`--top N`): generations attributed by the workspace's encoder, not yet
confirmed under the same model + teacher settings, highest top-1 share first — the
attributions where most money rides on a single training image. `--where SQL`
filters with a condition over `generations g`; `--generation ID` names one.
Each generation's scores and agreement commit together, so a killed run resumes
where it stopped.

Teachers (`--method`): `abu`, attribution by unlearning (abu.py, the default), and
`dtrak`, projected gradients (dtrak.py), both speaking teacher.Teacher; `auto`, the one that did best on the
workspace's stored ground-truth checks (checks.choose_teacher), else [confirm] method. Both score the same candidates — the fast
top-K plus seeded random controls, from the [confirm] settings — into the same
tables, so their verdicts and the fast path's compare in one query.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from . import checks, cost, diffusion, embed, ingest, metrics, verdict
from .abu import AbuTeacher
from .config import ConfirmSettings
from .dtrak import DtrakTeacher
from .errors import AuditError
from .index import reconcile
from .progress import Progress, Silent
from .scan import METHOD as FAST
from .search import Searcher, VectorTable
from .store import Store, utcnow
from .teacher import Teacher, training_set
from .workspace import Workspace


@dataclass
class ConfirmResult:
    run_id: int | None
    generations: int = 0
    confirmed: int = 0
    verdicts: dict[str, int] = field(default_factory=dict)  # confirmed / disputed / inconclusive: how many of each
    failed: list[tuple[int, str]] = field(default_factory=list)
    seconds: float = 0.0
    noise_floor: float | None = None  # the median of the generations' own
    signal_to_noise: float | None = None
    estimate_seconds: float = 0.0
    estimate: cost.Estimate | None = None  # per phase, printed before any heavy work
    generation_seconds: float = 0.0  # the sum of the generations' stored `seconds` (the run's setup is not in it)
    other_model: int = 0  # selected generations left out because they declare another model (see --any-model)


# A generation declared by another model was not made by the model the teacher runs: its verdict would be noise.
OTHER_MODEL = "g.model_match IS NOT DISTINCT FROM 'other'"


def _select(
    store: Store,
    encoder_id: str,
    settings_hash: str,
    top: int | None,
    where: str | None,
    generation: int | None,
    any_model: bool = False,
) -> tuple[list[tuple], int]:
    """The generations to confirm, and how many more the selection held that declare another model (left out
    unless `any_model`)."""
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
    joined = (
        "FROM generations g"
        " JOIN attributions a ON a.generation_id = g.id AND a.rank = 1 AND a.method = ? AND a.encoder_id = ?"
        f" WHERE {' AND '.join(conditions)}"
    )
    sql = f"SELECT g.id, g.path, g.prompt {joined}{'' if any_model else f' AND NOT {OTHER_MODEL}'} ORDER BY a.share DESC, g.id"
    if top is not None:
        sql += f" LIMIT {int(top)}"
    try:
        selected = store.rows(sql, params)
        refused = 0 if any_model else int(store.value(f"SELECT count(*) {joined} AND {OTHER_MODEL}", params))
    except Exception as exc:  # a user's --where can be anything
        raise AuditError(f"--where is not a valid condition over generations g: {str(exc).splitlines()[0]}") from None
    return selected, refused


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
    any_model: bool = False,
    dry_run: bool = False,
    **overrides,
) -> ConfirmResult:
    """Confirm the fast attributions of the selected generations with a teacher (AbU or D-TRAK); returns what it did.
    Generations that declare another model than the workspace's (`generations.model_match = 'other'`) are left out
    and counted unless `any_model`. `overrides` are [confirm] settings; for D-TRAK, `timesteps` is its own
    ([dtrak] timesteps). The estimate per phase is announced before any heavy work (the Fisher, D-TRAK's features);
    `dry_run` stops there, having written nothing to the store. `method="auto"` picks the teacher by the stored checks
    and announces which and why."""
    progress = progress or Silent()
    auto = method == "auto"
    # Candidates, controls and agreement come from [confirm] whatever the teacher, so AbU and D-TRAK
    # verdicts on a generation are about the same candidates.
    selection = ws.config.confirm.override(method=None if auto else method, **overrides)
    model_path = ws.model_source(model)
    torch_device = ws.device(device)
    started = time.perf_counter()

    with ws.writing(), Store(ws.db_path) as store:
        training = training_set(ws, store, model_path, torch_device, selection.flip)
        if auto:
            chosen, why = checks.choose_teacher(store, training.model.hash, selection.method)
            announce(f"--method auto: {why}")
            selection = selection.override(method=chosen)
        method = selection.method
        encoder = embed.load(ws.encoder_dir(), torch_device)
        table = ws.vector_table(encoder)
        if not dry_run:
            reconcile(store, table)
        fast = _FastPath(encoder, table, table.searcher(), training.ids)
        flip = str(training.model.flip_augmentation)
        if method == "abu":
            settings_hash = selection.hash(training.model.hash, "abu", encoder.id, flip)
        else:
            dtrak_settings = ws.config.dtrak.override(timesteps=overrides.get("timesteps"))
            settings_hash = dtrak_settings.hash(
                training.model.hash, "dtrak", encoder.id, flip, json.dumps(selection.selection(), sort_keys=True)
            )
        if not dry_run:
            # A run killed after its last commit is over too, even when this call finds nothing left to do.
            store.con.execute("UPDATE confirm_runs SET status = 'interrupted' WHERE status = 'running'")
        selected, refused = _select(store, encoder.id, settings_hash, top, where, generation, any_model)
        result = ConfirmResult(None, other_model=refused)
        if refused:
            announce(
                f"left out {refused} generation(s) declared by another model than the workspace's "
                "(generations.model_match = 'other'; `audit model` shows its identity; --any-model includes them)"
            )
        if not selected:
            if not refused:
                announce(
                    "nothing to confirm: every selected generation is already confirmed with this model and these "
                    "settings"
                )
            return result
        teacher: Teacher = (
            AbuTeacher(training, selection, ws.dir / "cache")
            if method == "abu"
            else DtrakTeacher.for_workspace(ws, training, dtrak_settings, progress, announce, prepare=False)
        )
        n_candidates = selection.candidates + selection.controls
        # Measured on one training image before anything heavy (Fisher, D-TRAK's features) runs.
        result.estimate = teacher.estimate(len(selected), n_candidates)
        result.estimate_seconds = result.estimate.total
        announce(
            f"{'dry run: would confirm' if dry_run else 'confirming'} {len(selected)} generation(s) with "
            f"{teacher.describe()} on {torch_device}: {selection.candidates} candidates + {selection.controls} "
            f"controls; {result.estimate}"
        )
        if dry_run:
            return result
        teacher.prepare(progress, announce)
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
        snr, floors = [], []
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
            # Each generation's own: the noise differs between generations as much as twofold (docs/methods.md §1).
            floors.append(teacher.noise_floor(image, prompt, ids, gen_id, scores))
            knob = "[confirm] timesteps" if method == "abu" else "[dtrak] timesteps"
            timesteps = selection.timesteps if method == "abu" else dtrak_settings.timesteps
            judged, rows = _agreement(selection, gen_id, scored, floors[-1], timesteps, knob)
            snr.append(judged.pop("snr"))
            seconds = time.perf_counter() - t0
            result.generation_seconds += seconds
            with store.transaction():
                store.insert_arrow(
                    "teacher_scores", pa.table({"run_id": pa.array([run_id] * len(ids), pa.int64()), **rows})
                )
                row = {
                    "generation_id": gen_id,
                    "run_id": run_id,
                    "method": method,
                    "encoder_id": encoder.id,
                    "k": selection.k,
                    **judged,
                    "seconds": seconds,
                    "confirmed_at": utcnow(),
                }
                store.con.execute(
                    f"INSERT INTO confirmations ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})",
                    list(row.values()),
                )
                store.con.execute("UPDATE confirm_runs SET n_generations = n_generations + 1 WHERE id = ?", [run_id])
            result.generations += 1
            result.confirmed += int(judged["confirmed"])
            result.verdicts[judged["verdict"]] = result.verdicts.get(judged["verdict"], 0) + 1
            progress.advance()
        result.seconds = time.perf_counter() - started
        result.noise_floor = float(np.median(floors)) if floors else None
        store.con.execute(
            "UPDATE confirm_runs SET status = 'finished', finished_at = ?, noise_floor = ?, signal_to_noise = ?,"
            " seconds_per_generation = ? WHERE id = ?",
            [
                utcnow(),
                result.noise_floor,
                float(np.median(snr)) if snr else None,
                # The generations' own seconds, as stored with each: the run's setup (loading, Fisher) is not in it.
                result.generation_seconds / max(1, result.generations),
                run_id,
            ],
        )
        result.signal_to_noise = float(np.median(snr)) if snr else None
    return result


@dataclass
class _FastPath:
    encoder: embed.Encoder
    table: VectorTable
    searcher: Searcher
    train_ids: np.ndarray


def _candidates(
    fast: _FastPath, s: ConfirmSettings, gen_id: int, image, prompt
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


def _agreement(
    s: ConfirmSettings, gen_id: int, scored: _Scored, noise_floor: float, timesteps: int, knob: str
) -> tuple[dict, dict]:
    """The confirmations row of one generation (agreement measures, the verdict and the numbers behind it:
    auditor/verdict.py) and its teacher_scores rows."""
    ids, fast, influence, is_control = scored.ids, scored.fast, scored.influence, scored.is_control
    teacher_rank = metrics.ranks(influence)
    k = min(s.k, len(ids))
    top_fast = ~is_control & (scored.fast_rank <= k)
    margin = float(np.median(influence[top_fast]) - np.median(influence[is_control])) if is_control.any() else 0.0
    floor = noise_floor if noise_floor > 0 else float("nan")
    verdict_row = {
        "map_at_k": metrics.map_at_k(ids, fast, influence, k),
        "top1_agree": bool(teacher_rank[0] <= k),
        "spearman": metrics.spearman(fast[~is_control], influence[~is_control]),
        "control_margin": margin / floor if noise_floor > 0 else margin,
        "snr": float(np.std(influence) / floor) if noise_floor > 0 else float("inf"),
    }
    thresholds = s.thresholds()
    stats = verdict.measure(
        fast, influence, is_control, k, noise_floor, timesteps, s.seed * 7919 + gen_id, thresholds.min_self_agreement
    )
    judged = verdict.decide(stats, thresholds, knob)
    verdict_row.update(verdict.record(stats, judged))
    verdict_row["confirmed"] = judged.verdict == verdict.CONFIRMED
    scores = {
        "generation_id": pa.array([gen_id] * len(ids), pa.int64()),
        "training_id": pa.array(ids),
        "influence": pa.array(influence),
        "raw_influence": pa.array(scored.raw),
        "teacher_rank": pa.array(teacher_rank),
        "fast_rank": pa.array([int(r) if r > 0 else None for r in scored.fast_rank], pa.int32()),
        "is_control": pa.array(is_control),
    }
    return verdict_row, scores
