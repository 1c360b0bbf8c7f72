"""`audit eval lds`: the linear datamodeling score (TRAK, D-TRAK's headline metric), one more ground-truth check
beside leave-K-out (docs/methods.md §1).

The model is retrained by its own recipe (auditor/retrain.py, through counterfactual's retrainer: seeded, cached per
subset in `.audit/counterfactual/<key>/`, so an interrupted run resumes and a rerun is free) on `subsets` random
subsets each keeping `fraction` of the training set. For each checked generation, each method predicts a subset
model's output by the sum of its scores over the images the subset keeps; LDS is the Spearman correlation over the
subsets between that prediction and the generation's measured denoising loss under the subset model (measured as
`audit eval counterfactual` measures it), negated: a method's score says how much an image *helps* the model make the
generation, so more of it should mean a *lower* loss. 1: the method's scores order the subsets exactly as retraining
does; 0: no better than random scores. Mean ± standard error over generations.

Every method scores the same candidates per generation, those the teachers scored (the fast top-K and random
controls of `audit confirm`); an image outside them counts 0 for every method, so a method is judged on how it weighs
the images it was asked about. `fast` is the workspace's encoder (or any bundle: `judge_bundle`) on them, `untuned`
the untuned image ⊕ text features of its backbone, `random` scores drawn at random (LDS ≈ 0, the floor).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from . import checks, diffusion, embed
from .counterfactual import TEACHERS, _Retrainer, _select, generation_loss
from .errors import AuditError
from .features import embed_images, fast_space, joint, training_embeddings
from .metrics import markdown_table, mean_se, spearman
from .progress import Progress, Silent
from .store import Store
from .teacher import training_set
from .workspace import Workspace


def lds(masks: np.ndarray, scores: np.ndarray, losses: np.ndarray) -> float:
    """Spearman correlation over subsets between Σ scores of the kept images (masks: subsets × images, bool) and
    −loss: 1 when the scores order the subsets as their retrained models' losses do."""
    return spearman(np.asarray(masks, float) @ np.asarray(scores, float), -np.asarray(losses, float))


def subsets(n: int, count: int, fraction: float, seed: int) -> np.ndarray:
    """(count, n) bool: each row keeps round(fraction·n) images drawn at random, seeded by (seed, row)."""
    keep = max(1, round(fraction * n))
    masks = np.zeros((count, n), bool)
    for row in range(count):
        masks[row, np.random.default_rng([seed, row]).choice(n, keep, replace=False)] = True
    return masks


@dataclass
class LdsMethod:
    name: str
    lds: tuple[float, float]  # mean ± standard error over generations
    per_generation: list[float]


@dataclass
class LdsReport:
    methods: list[LdsMethod]
    generations: list[int]
    subsets: int
    fraction: float
    retrain_steps: int
    recipe_steps: int
    seconds: float


def _scores(store: Store, gen_ids: list[int]) -> dict[str, dict[int, dict[int, float]]]:
    """Per teacher, per generation: its latest run's influence per candidate."""
    out: dict[str, dict[int, dict[int, float]]] = {}
    for method in TEACHERS:
        rows = store.rows(
            "WITH latest AS (SELECT s.generation_id, max(s.run_id) AS run_id FROM teacher_scores s"
            " JOIN confirm_runs r ON r.id = s.run_id WHERE r.method = ? GROUP BY 1)"
            " SELECT s.generation_id, s.training_id, s.influence FROM teacher_scores s JOIN latest l USING (generation_id, run_id)"
            f" WHERE s.generation_id IN ({','.join('?' * len(gen_ids))})",
            [method, *gen_ids],
        )
        for g, t, v in rows:
            out.setdefault(method, {}).setdefault(int(g), {})[int(t)] = float(v)
    return out


def evaluate(
    ws: Workspace,
    *,
    generations: list[int] | None = None,
    model: str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] = lambda message: None,
    encoder_dir: str | os.PathLike | None = None,
    **overrides,
) -> LdsReport:
    """Retrain on random subsets (cached, resumable), measure each generation's loss under each (cached too), score
    every method; stored as an eval run (checks.record). `encoder_dir`: the fast path is this bundle, not the
    workspace's."""
    progress = progress or Silent()
    started = time.perf_counter()
    s = ws.config.lds.override(**overrides)
    cf = ws.config.counterfactual.override(generations=s.generations)
    torch_device = ws.device(device)
    encoder = embed.load(encoder_dir or ws.encoder_dir(), torch_device)
    with ws.reader() as store:
        training = training_set(ws, store, ws.model_dir(model), torch_device, "off")
        gens = _select(store, cf, generations)
        teacher_scores = _scores(store, [g for g, _, _ in gens])
        train_ids, img, txt = training_embeddings(ws, store, encoder)
    base = training.model
    retrainer = _Retrainer(base, training, s.retrain_steps, ws.dir / "counterfactual")
    masks = subsets(len(train_ids), s.subsets, s.fraction, s.seed)
    announce(
        f"LDS on {len(gens)} generation(s): {s.subsets} retrainings of {retrainer.steps} steps (the recipe has "
        f"{retrainer.recipe.steps}) on {s.fraction:g} of {len(train_ids)} training images; cached, resumable"
    )
    images = [diffusion.read_image(path, ws.limits) for _, path, _ in gens]
    latents = base.latents(torch.stack([base.pixels(im) for im in images])).cpu()
    losses = np.zeros((s.subsets, len(gens)))
    progress.start("retraining subsets", s.subsets * retrainer.steps)
    for row, keep in enumerate(masks):
        cached = retrainer.path(train_ids[~keep]).with_suffix(f".losses-{_loss_key(cf, gens)}.npy")
        if cached.is_file():
            losses[row] = np.load(cached)
            progress.advance(retrainer.steps)
            continue
        variant = retrainer.model_without(train_ids[~keep], progress)
        losses[row] = [generation_loss(variant, latents[j], p, g, cf) for j, (g, _, p) in enumerate(gens)]
        np.save(cached, losses[row])
        del variant
    methods = score_methods(encoder, images, gens, train_ids, img, txt, teacher_scores, s.seed)
    results = [
        LdsMethod(name, mean_se(values), values)
        for name, values in (
            (name, [lds(masks, by_gen[j], losses[:, j]) for j in range(len(gens))]) for name, by_gen in methods.items()
        )
    ]
    report = LdsReport(
        results,
        [g for g, _, _ in gens],
        s.subsets,
        s.fraction,
        retrainer.steps,
        retrainer.recipe.steps,
        time.perf_counter() - started,
    )
    with ws.writing(), Store(ws.db_path) as store:
        checks.record(
            store,
            "lds",
            model_hash=base.hash,
            encoder_id=encoder.id,
            settings={**dataclasses.asdict(s), "retrain_steps": retrainer.steps, "generations": report.generations},
            n=len(gens),
            seconds=report.seconds,
            results=[
                checks.Result(
                    m.name, "lds", *m.lds, LABELS.get(m.name, m.name), encoder.id if m.name in ENCODED else None
                )
                for m in results
            ],
        )
    return report


def _loss_key(cf, gens) -> str:
    """What a subset model's losses on the generations depend on besides its weights."""
    facts = [cf.loss_timesteps, cf.loss_draws, cf.seed, [g for g, _, _ in gens]]
    return hashlib.sha256(json.dumps(facts).encode()).hexdigest()[:12]


ENCODED = ("fast", "untuned")
LABELS = {
    "fast": "fast path",
    "untuned": "untuned image ⊕ text",
    "abu": "AbU",
    "dtrak": "D-TRAK",
    "random": "random scores (floor)",
}


def score_methods(encoder, images, gens, train_ids, img, txt, teacher_scores, seed) -> dict[str, list[np.ndarray]]:
    """Per method, per generation: its score of every training image (0 outside the teachers' candidates)."""
    q_img, q_txt = embed_images(encoder, images, [p or "" for _, _, p in gens])
    rows, query = fast_space(encoder, img, txt)
    spaces = {"fast": (rows, query), "untuned": (joint(img, txt), joint)}
    position = {int(t): i for i, t in enumerate(train_ids)}
    out: dict[str, list[np.ndarray]] = {name: [] for name in [*spaces, *teacher_scores, "random"]}
    for j, (g, _, _) in enumerate(gens):
        candidates = sorted(set().union(*(by_gen.get(g, {}) for by_gen in teacher_scores.values())))
        if not candidates:
            raise AuditError(f"generation {g} has no teacher scores; run `audit confirm --generation {g}` first")
        at = np.array([position[c] for c in candidates])
        for name, (train, q) in spaces.items():
            full = np.zeros(len(train_ids))
            full[at] = train[at] @ q(q_img[j : j + 1], q_txt[j : j + 1])[0]
            out[name].append(full)
        for name, by_gen in teacher_scores.items():
            full = np.zeros(len(train_ids))
            scored = by_gen.get(g, {})
            full[at] = [scored.get(c, 0.0) for c in candidates]
            out[name].append(full)
        full = np.zeros(len(train_ids))
        full[at] = np.random.default_rng([seed, g]).standard_normal(len(at))
        out["random"].append(full)
    return out


def to_markdown(report: LdsReport) -> str:
    rows = [[LABELS.get(m.name, m.name), f"{m.lds[0]:+.3f} ± {m.lds[1]:.3f}"] for m in report.methods]
    note = (
        f"\nLinear datamodeling score on {len(report.generations)} generation(s) "
        f"({', '.join(map(str, report.generations))}): {report.subsets} models retrained by the recipe on random "
        f"subsets keeping {report.fraction:g} of the training set ({report.retrain_steps} steps; the recipe has "
        f"{report.recipe_steps}). Per generation, the Spearman correlation over the subsets between the sum of a method's "
        "scores over the kept images and the retrained model's (negated) loss on the generation; ± is the standard "
        "error over generations. Every method scores the teachers' candidates (others count 0).\n"
    )
    return markdown_table(["method", "LDS"], rows) + "\n" + note


def to_json(report: LdsReport) -> str:
    return json.dumps(dataclasses.asdict(report), indent=2)
