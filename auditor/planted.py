"""`audit eval planted`: every method measured against ground truth made by construction (AbC, docs/methods.md §4).

For each customisation: a few exemplar images in a style the model has never seen —
images from `--exemplars` recoloured into a new palette (`--style palette`, the
default), redrawn with new strokes in their own colours (`stroke`: mirrored, upside
down, bold, thin), or one subfolder of your own per customisation (`as-is`) — the
model fine-tuned on them (`planted.tune`: the cross-attention K/V as Custom Diffusion,
or the whole UNet as DreamBooth; with prior preservation) under a caption with a new
word ("a handwritten digit in <word> style"; a rare letter string the tokenizer spells
out, so no embedding is added), and N images generated with the customised model:
those are influenced by their exemplars by construction. All exemplars join a copy of
the training set (in memory and in this run's scratch folder; the workspace's index
and store are never written), every method ranks that augmented set for every
generated image, and we report AbC's Recall@K (the fraction of the image's exemplars
within the top K) and mAP (average precision with its exemplars as the positives),
mean ± standard error over the generated images.

A style only plants if the model can draw it: the run compares the VAE's
reconstruction error on the exemplars with that on training images and warns when
the exemplars are out of its reach (the digits world's VAE, trained on eight palettes,
turns every new palette into one of them; strokes survive).

Methods: the fast path (the workspace's encoder, with its distilled head if it has
one), the untuned image and image ⊕ text features of its backbone, and the two
teachers on the customised model. The teachers rank only candidates — the fast path's
top-K of the augmented set plus the customisation's exemplars — and the rest follow in
fast-path order; their candidate set always holds the answer, so their numbers say how
well they order it, not what they would find on their own. D-TRAK's kernel on each
customised model comes from a random sample of training images plus the exemplars
(Φ over the whole set for every customisation would cost more than the rest of the
eval); λ is relative to the trace, so the sample size does not set its scale.

Scratch work (exemplars, weight changes, generated images, teacher caches, D-TRAK
features) lives in `.audit/planted/<settings hash>/`; a rerun reuses it.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from . import checks, diffusion, dtrak, embed, exemplar_styles, ingest, memory, metrics
from .abu import AbuTeacher
from .config import PlantedSettings
from .diffusion import applied, trainable
from .errors import AuditError
from .features import embed_images, fast_space, joint, training_embeddings
from .metrics import markdown_table, mean_se
from .progress import Progress, Silent
from .store import Store
from .teacher import registered
from .workspace import Workspace

RECALL_KS = (5, 10, 100)


@dataclass
class PlantedScores:
    name: str
    map: tuple[float, float]  # (mean, standard error)
    recall_at: dict[int, tuple[float, float]]
    method: str = ""  # the key it is stored under (eval_results.method)


@dataclass
class PlantedReport:
    methods: list[PlantedScores]
    queries: int
    customisations: list[str]
    exemplars: int
    candidates: int
    training: int  # images in the augmented set
    folder: Path
    seconds: float


def customise(
    model: diffusion.DiffusionModel,
    params: dict,
    latents: torch.Tensor,
    text_emb: torch.Tensor,
    prior: tuple[torch.Tensor, torch.Tensor],
    s: PlantedSettings,
    seed: int,
) -> dict:
    """The change of `params` that teaches the model its exemplars under their caption, with prior preservation (Custom
    Diffusion, DreamBooth): half of every batch is training images under their own captions, or the empty one 10 % of
    the time, so other prompts and the unconditional branch of guidance keep working. The model is left as it was."""
    start = {name: p.detach().clone() for name, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=s.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    prior_latents, prior_emb = prior
    empty = model.text_embeddings([""]).cpu()[0]
    dev = model.device
    half = max(1, s.batch_size // 2)
    # The fine-tuning batch is a setting of the method; memory decides how many of its rows go through at once.
    micro = model.batch("gradient")
    try:
        with trainable(params), memory.guard(micro, "fine-tuning a customisation"):
            for _ in range(s.steps):
                pick = torch.randint(0, len(latents), (half,), generator=gen)
                other = torch.randint(0, len(prior_latents), (s.batch_size - half,), generator=gen)
                other_emb = torch.where(
                    (torch.rand(len(other), generator=gen) < 0.1)[:, None, None], empty, prior_emb[other]
                )
                x = torch.cat([latents[pick], prior_latents[other]])
                c = torch.cat([text_emb.expand(half, -1, -1), other_emb])
                t = torch.randint(0, model.num_train_timesteps, (len(x),), generator=gen)
                noise = torch.randn(x.shape, generator=gen)
                optimizer.zero_grad()
                for first in range(0, len(x), micro.size):
                    rows = slice(first, first + micro.size)
                    loss = model.denoising_loss(x[rows].to(dev), c[rows].to(dev), t[rows].to(dev), noise[rows].to(dev))
                    (loss.sum() / len(x)).backward()  # the batch mean, accumulated over its parts
                optimizer.step()
        return {name: p.detach() - start[name] for name, p in params.items()}
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(start[name])
                p.grad = None


def _teacher_ranking(scores: np.ndarray, candidates: np.ndarray, fast_ranking: np.ndarray) -> np.ndarray:
    """Candidates by teacher score, then everything else in fast-path order."""
    ranked = candidates[np.argsort(-scores, kind="stable")]
    return np.concatenate([ranked, fast_ranking[~np.isin(fast_ranking, candidates)]])


def planted(
    ws: Workspace,
    *,
    exemplars: str | os.PathLike,
    model: str | os.PathLike | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] = lambda message: None,
    encoder_dir: str | os.PathLike | None = None,
    teachers: bool = True,
    **overrides,
) -> PlantedReport:
    """Build the planted benchmark on the workspace's model and score every method on it; stored as an eval run.
    `encoder_dir` ranks with another bundle than the workspace's; without `teachers` only the encoder spaces are
    ranked (what judging a bundle needs: the customisations and generated images are reused from an earlier run)."""
    progress = progress or Silent()
    started = time.perf_counter()
    s = ws.config.planted.override(**overrides)
    abu, gradients, limits = ws.config.confirm, ws.config.dtrak, ws.limits
    model_path = ws.model_source(model)
    torch_device = ws.device(device)
    base = diffusion.load(model_path, torch_device, ws.dir / "cache", abu.flip, ws.config.memory)
    folder = Path(exemplars).expanduser().resolve()
    run_dir = ws.dir / "planted" / s.hash(base.hash, str(folder))
    sets, styles = exemplar_styles.exemplar_sets(folder, s, run_dir, limits)
    words = exemplar_styles.words(s.customisations, s.seed)
    prompts = [s.prompt.format(word=w) for w in words]

    # The augmented training set: the workspace's images, then every customisation's exemplars under new ids.
    encoder = embed.load(encoder_dir or ws.encoder_dir(), torch_device)
    with ws.reader() as store:
        rows = registered(store)
        ids, img, txt = training_embeddings(ws, store, encoder)
    if not rows:
        raise AuditError("the workspace has no training images; run `audit index TRAINING_DIR` first")
    first_id = int(ids.max()) + 1
    ex_rows = [
        (first_id + c * s.exemplars + j, str(path), prompts[c])
        for c, files in enumerate(sets)
        for j, path in enumerate(files)
    ]
    exemplar_images = [diffusion.read_image(r[1], limits) for r in ex_rows]
    ex_img, ex_txt = embed_images(encoder, exemplar_images, [r[2] for r in ex_rows])
    aug_ids = np.concatenate([ids, [r[0] for r in ex_rows]]).astype(np.int64)
    aug_img, aug_txt = np.concatenate([img, ex_img]), np.concatenate([txt, ex_txt])
    spaces = {  # method → (training features, how a query's (image, text) embeddings map into that space)
        f"fast ({encoder.name}, {'distilled' if encoder.head is not None else 'no head: = untuned image ⊕ text'})": fast_space(
            encoder, aug_img, aug_txt
        ),
        "untuned image": (aug_img, lambda qi, qt: qi),
        "untuned image ⊕ text": (joint(aug_img, aug_txt), joint),
    }
    fast_name = next(iter(spaces))
    training = diffusion.TrainingSet(base, rows + ex_rows, limits, ws.storage)
    tuned = diffusion.parameter_set(base.unet, s.tune, "planted.tune")
    rng = np.random.default_rng(s.seed)
    kernel_ids = np.concatenate(
        [rng.choice(ids, min(s.kernel_samples, len(ids)), replace=False), [r[0] for r in ex_rows]]
    )
    prior_ids = rng.choice(ids, min(s.prior_samples, len(ids)), replace=False)
    prior_latents, _, prior_emb = training.inputs(prior_ids)
    ratio = _reconstruction_error(base, exemplar_images) / _reconstruction_error(
        base, [training.image(i) for i in prior_ids[:32]]
    )
    if ratio > 3:
        # Measured on the digits world: its VAE snaps any new palette to the nearest training palette.
        announce(
            f"warning: the model's VAE reconstructs the exemplars {ratio:.1f}× worse than its training images; it cannot "
            "represent their style, so no customisation can reproduce it (try --style stroke)"
        )

    teacher_names = ["AbU (candidates)", "D-TRAK (candidates)"] if teachers else []
    rankings: dict[str, list[np.ndarray]] = {name: [] for name in [*spaces, *teacher_names]}
    positives: list[set[int]] = []
    pipe = diffusion.pipeline(base)
    progress.start("planted", s.customisations * s.generations)
    for c, _files in enumerate(sets):
        c_dir = run_dir / f"c{c}"
        c_rows = ex_rows[c * s.exemplars : (c + 1) * s.exemplars]
        delta = _tuned(
            base, tuned, training, c_dir, [r[0] for r in c_rows], prompts[c], (prior_latents, prior_emb), s, c
        )
        announce(
            f"customisation {c + 1}/{len(sets)}: {styles[c]} as '{words[c]}'; generating {s.generations} image(s) and ranking"
        )
        with applied(tuned, delta):
            images = [
                _generated(pipe, c_dir / f"generated_{g}.png", prompts[c], s.seed * 100_003 + c * 1_000 + g, s, limits)
                for g in range(s.generations)
            ]
            q_img, q_txt = embed_images(encoder, images, [prompts[c]] * len(images))
            if teachers:
                abu_teacher = AbuTeacher(training, abu, c_dir / "cache")
                dtrak_teacher = dtrak.DtrakTeacher(
                    training,
                    gradients,
                    dtrak.FeatureTable(str(c_dir / "lancedb"), f"dtrak_{gradients.feature_key()}", gradients.dim),
                )
                dtrak_teacher.fill(kernel_ids)
                dtrak_teacher.kernel, dtrak_teacher.lam = dtrak.kernel(
                    [dtrak_teacher.table.get(kernel_ids)], gradients.dim, gradients.damping
                )
            own = np.flatnonzero(np.isin(aug_ids, [r[0] for r in c_rows]))
            for g, image in enumerate(images):
                for name, (train, query) in spaces.items():
                    rankings[name].append(
                        np.argsort(-(train @ query(q_img[g : g + 1], q_txt[g : g + 1])[0]), kind="stable")
                    )
                positives.append(set(own.tolist()))
                if not teachers:
                    progress.advance()
                    continue
                fast_ranking = rankings[fast_name][-1]
                candidates = np.concatenate(
                    [fast_ranking[: s.candidates], own[~np.isin(own, fast_ranking[: s.candidates])]]
                )
                seed = c * 1_000 + g
                _, abu_scores = abu_teacher.score(image, prompts[c], aug_ids[candidates], seed)
                dtrak_teacher.fill(aug_ids[candidates])
                _, dtrak_scores = dtrak_teacher.score(image, prompts[c], aug_ids[candidates], seed)
                rankings["AbU (candidates)"].append(_teacher_ranking(abu_scores, candidates, fast_ranking))
                rankings["D-TRAK (candidates)"].append(_teacher_ranking(dtrak_scores, candidates, fast_ranking))
                progress.advance()
    keys = dict(zip(rankings, ["fast", "untuned_image", "untuned", "abu", "dtrak"]))
    methods = [_scores(name, ranks, positives, keys[name]) for name, ranks in rankings.items()]
    report = PlantedReport(
        methods,
        len(positives),
        [f"{w} ({st})" for w, st in zip(words, styles)],
        s.exemplars,
        s.candidates,
        len(aug_ids),
        run_dir,
        time.perf_counter() - started,
    )
    with ws.writing(), Store(ws.db_path) as store:
        checks.record(
            store,
            "planted",
            model_hash=base.hash,
            encoder_id=encoder.id,
            settings={**asdict(s), "exemplars": str(folder), "teachers": teachers},
            n=report.queries,
            seconds=report.seconds,
            results=[
                checks.Result(
                    m.method,
                    checks.METRICS["planted"],
                    *m.map,
                    m.name,
                    encoder.id if m.method in ("fast", "untuned", "untuned_image") else None,
                )
                for m in methods
            ],
        )
    return report


def _tuned(
    model,
    params: dict,
    training: diffusion.TrainingSet,
    c_dir: Path,
    exemplar_ids,
    prompt: str,
    prior,
    s: PlantedSettings,
    c: int,
) -> dict:
    """This customisation's weight change, fine-tuned once and kept in its folder."""
    path = c_dir / "delta.safetensors"
    if path.is_file():
        return load_file(str(path), device=str(model.device))
    latents, _, _ = training.inputs(exemplar_ids)
    delta = customise(model, params, latents, model.text_embeddings([prompt]).cpu(), prior, s, s.seed + c)
    c_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous().cpu() for k, v in delta.items()}, str(path))
    return delta


def _reconstruction_error(model: diffusion.DiffusionModel, images: list[Image.Image]) -> float:
    """Mean absolute error of the model's VAE round trip, in [-1, 1] pixel units."""
    pixels = torch.stack([model.pixels(image) for image in images])
    latents = model.latents(pixels) / model.vae.config.scaling_factor
    batch = model.batch("vae")
    with torch.no_grad(), memory.guard(batch, "decoding with the VAE"):
        decoded = torch.cat(
            [
                model.vae.decode(latents[start : start + batch.size]).sample.clamp(-1, 1).cpu()
                for start in range(0, len(latents), batch.size)
            ]
        )
    return float((decoded - pixels).abs().mean())


def _generated(pipe, path: Path, prompt: str, seed: int, s: PlantedSettings, limits: ingest.Limits) -> Image.Image:
    if path.is_file():
        return diffusion.read_image(str(path), limits)
    image = diffusion.generate(pipe, prompt, seed, s.sample_steps, s.guidance)
    image.save(path)
    return image


def _scores(name: str, rankings: list[np.ndarray], positives: list[set[int]], method: str) -> PlantedScores:
    aps = [metrics.average_precision(r, p) for r, p in zip(rankings, positives)]
    recalls = {K: [len(p & set(r[:K].tolist())) / len(p) for r, p in zip(rankings, positives)] for K in RECALL_KS}
    return PlantedScores(name, mean_se(aps), {K: mean_se(v) for K, v in recalls.items()}, method)


def to_markdown(report: PlantedReport) -> str:
    head = ["method", "mAP"] + [f"R@{K}" for K in RECALL_KS]
    rows = [
        [m.name, f"{m.map[0]:.3f} ± {m.map[1]:.3f}"] + [f"{v:.3f} ± {se:.3f}" for v, se in m.recall_at.values()]
        for m in report.methods
    ]
    note = (
        f"\nPlanted ground truth (AbC): {len(report.customisations)} customisation(s) — {', '.join(report.customisations)} — "
        f"each fine-tuned on {report.exemplars} exemplar(s); {report.queries} generated images ranked against "
        f"{report.training} training images (the workspace's plus all exemplars); positives = the image's own exemplars. "
        f"Recall@K = fraction of them in the top K; ± is the standard error over generated images. "
        f"AbU and D-TRAK rank only candidates: the fast path's top {report.candidates} plus the exemplars (always included), "
        f"then the rest in fast-path order, so their figures measure ordering within a set that holds the answer. "
        f"The exemplars' captions and the generations' prompts share the new word, so methods that read text get that cue; "
        f"'untuned image' does not.\n"
    )
    return markdown_table(head, rows) + "\n" + note


def to_json(report: PlantedReport) -> str:
    return json.dumps(
        {
            **{k: v for k, v in asdict(report).items() if k not in ("methods", "folder")},
            "folder": str(report.folder),
            "candidates_note": "AbU and D-TRAK rank the fast top-K plus the exemplars; the rest follow in fast order",
            "methods": [
                {
                    "name": m.name,
                    "map": {"mean": m.map[0], "stderr": m.map[1]},
                    "recall_at": {str(K): {"mean": v, "stderr": se} for K, (v, se) in m.recall_at.items()},
                }
                for m in report.methods
            ],
        },
        indent=2,
    )
