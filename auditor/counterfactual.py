"""`audit eval counterfactual`: the leave-K-out check, the gold standard of attribution (docs/methods.md §1).

For a few generations that a teacher has scored, each method's top-K training images
are removed and the model is retrained from scratch by its own recipe
(auditor/retrain.py); then we measure, against a model retrained the same way on
everything, (a) how much the model's denoising loss on the generated image rises and
(b) how far an image regenerated with the same prompt and noise moves (pixel MSE, and
cosine distance of the encoder's backbone image embedding). Better attribution ⇒ larger
change than removing K random images or the K images most similar by plain image
features (the controls).

Cost control, said in the report: every condition removes the *union* of its top-K over
all checked generations in one retraining (generations with different prompts barely
share their top sets, and the sizes are reported), and `retrain_steps` may shorten the
recipe — all conditions, the reference included, are then trained with the same
shortened run. Retraining is seeded, so the only difference between a condition and
the reference is the data; what remains of the SGD path's chaos is what the random
control measures.

Retrained weights are kept in `.audit/counterfactual/<key>/` (key: model, recipe, steps,
training set) per removed set, so an interrupted run resumes and a rerun is free.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import checks, diffusion, embed, memory, retrain
from .config import CounterfactualSettings
from .errors import AuditError
from .features import embed_images, training_embeddings
from .metrics import markdown_table, mean_se
from .progress import Progress, Silent
from .scan import METHOD as FAST
from .store import Store
from .teacher import training_set
from .workspace import Workspace

TEACHERS = ("abu", "dtrak")


@dataclass
class ConditionResult:
    name: str
    removed: int  # images left out of this retraining (union over generations)
    loss_increase: tuple[float, float]  # mean ± standard error over generations, loss(x̂) − reference loss(x̂)
    relative_increase: tuple[float, float]  # the same, as a fraction of the reference loss
    pixel_mse: tuple[float, float]  # regenerated image vs the reference's regeneration, pixels in [0, 1]
    embedding_distance: tuple[float, float]  # 1 − cosine of their backbone image embeddings
    per_generation: list[dict]


@dataclass
class CounterfactualReport:
    conditions: list[ConditionResult]
    generations: list[int]
    k: int
    retrain_steps: int
    recipe_steps: int
    reference_loss: float
    folder: Path
    seconds: float


def _rankings(
    store: Store, encoder: embed.Encoder, gen_ids: list[int], methods: list[str]
) -> dict[str, dict[int, np.ndarray]]:
    """Per method, per generation: training ids best first (the fast path's stored attributions, the latest run of each teacher)."""
    out: dict[str, dict[int, np.ndarray]] = {}
    for method in methods:
        if method == "fast":
            rows = store.rows(
                "SELECT generation_id, list(training_id ORDER BY rank) FROM attributions WHERE method = ? AND encoder_id = ?"
                f" AND generation_id IN ({','.join('?' * len(gen_ids))}) GROUP BY 1",
                [FAST, encoder.id, *gen_ids],
            )
        else:
            rows = store.rows(
                "WITH latest AS (SELECT s.generation_id, max(s.run_id) AS run_id FROM teacher_scores s"
                " JOIN confirm_runs r ON r.id = s.run_id WHERE r.method = ? GROUP BY 1)"
                " SELECT s.generation_id, list(s.training_id ORDER BY s.teacher_rank) FROM teacher_scores s"
                " JOIN latest l USING (generation_id, run_id)"
                f" WHERE s.generation_id IN ({','.join('?' * len(gen_ids))}) GROUP BY 1",
                [method, *gen_ids],
            )
        out[method] = {int(g): np.array(ids, np.int64) for g, ids in rows}
    return out


def _select(
    store: Store, s: CounterfactualSettings, generation_ids: list[int] | None
) -> list[tuple[int, str, str | None]]:
    """The generations to check: those given, else up to `generations` AbU-scored ones with distinct prompts."""
    scored = store.rows(
        "SELECT DISTINCT g.id, g.path, g.prompt FROM generations g JOIN teacher_scores s ON s.generation_id = g.id"
        " JOIN confirm_runs r ON r.id = s.run_id WHERE r.method = 'abu' ORDER BY g.id"
    )
    if generation_ids:
        wanted = set(generation_ids)
        picked = [r for r in scored if r[0] in wanted]
        missing = wanted - {r[0] for r in picked}
        if missing:
            raise AuditError(
                f"generation(s) {', '.join(map(str, sorted(missing)))} have no AbU scores; run `audit confirm --generation ID` first"
            )
        return picked
    if not scored:
        raise AuditError(
            "no generation has AbU scores; run `audit confirm --top N` first, then the counterfactual checks them"
        )
    picked, prompts = [], set()
    for row in scored:  # distinct prompts first: their top sets overlap least
        if row[2] not in prompts:
            picked.append(row)
            prompts.add(row[2])
    picked += [r for r in scored if r not in picked]
    return picked[: s.generations]


def _removal_sets(
    s: CounterfactualSettings, gens, rankings, train_ids: np.ndarray, backbone: tuple[np.ndarray, np.ndarray]
) -> dict[str, dict[int, np.ndarray]]:
    sets: dict[str, dict[int, np.ndarray]] = {}
    for method, by_gen in rankings.items():
        if all(g in by_gen for g, _, _ in gens):
            sets[method] = {g: by_gen[g][: s.k] for g, _, _ in gens}
    image_features, query_features = backbone
    sets["random"] = {
        g: np.random.default_rng(s.seed * 7919 + g).choice(train_ids, s.k, replace=False) for g, _, _ in gens
    }
    sets["similar"] = {
        g: train_ids[np.argsort(-(image_features @ query_features[j]), kind="stable")[: s.k]]
        for j, (g, _, _) in enumerate(gens)
    }
    return sets


class _Retrainer:
    """The model's recipe on its registered training set, minus a given set of images; results cached per set."""

    def __init__(self, model: diffusion.DiffusionModel, training: diffusion.TrainingSet, steps: int, folder: Path):
        self.model = model
        self.recipe = retrain.Recipe.from_folder(model.folder)
        self.steps = steps or self.recipe.steps
        self.ids = training.ids
        pixels = torch.stack([model.pixels(training.image(i)) for i in self.ids])
        batch = model.batch("vae")
        with memory.guard(batch, "encoding the training images for retraining"):
            self.mean, self.std = retrain.posterior(model.vae, pixels, batch.size)
        self.tokens = diffusion.tokenize(model.tokenizer, [training.meta[int(i)][1] for i in self.ids])
        self.empty = diffusion.tokenize(model.tokenizer, [self.recipe.empty_caption])
        key = hashlib.sha256(
            json.dumps([model.hash, self.recipe.as_facts(), self.steps, self.ids.tolist()]).encode()
        ).hexdigest()[:16]
        self.folder = folder / key

    def path(self, removed: np.ndarray) -> Path:
        return self.folder / f"without-{hashlib.sha256(np.sort(removed).tobytes()).hexdigest()[:16]}.safetensors"

    def model_without(self, removed: np.ndarray, progress: Progress) -> diffusion.DiffusionModel:
        path = self.path(removed)
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        if path.is_file():
            unet = UNet2DConditionModel.from_config(self.model.unet.config)
            text_encoder = CLIPTextModel(self.model.text_encoder.config)
            weights = load_file(str(path))
            unet.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("unet.")})
            text_encoder.load_state_dict({k[5:]: v for k, v in weights.items() if k.startswith("text.")})
            progress.advance(self.steps)
        else:
            keep = ~np.isin(self.ids, removed)
            unet, text_encoder, _ = retrain.train(
                self.model.unet.config,
                self.model.text_encoder.config,
                self.model.scheduler,
                self.mean[keep],
                self.std[keep],
                self.model.vae.config.scaling_factor,
                self.tokens[keep],
                self.empty,
                self.recipe,
                steps=self.steps,
                device=self.model.device,
                log=lambda step, loss: progress.advance(),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            weights = {f"unet.{k}": v for k, v in unet.state_dict().items()} | {
                f"text.{k}": v for k, v in text_encoder.state_dict().items()
            }
            save_file({k: v.contiguous().cpu() for k, v in weights.items()}, str(path.with_suffix(".partial")))
            path.with_suffix(".partial").replace(path)
        unet.to(self.model.device).eval().requires_grad_(False)
        text_encoder.to(self.model.device).eval().requires_grad_(False)
        return dataclasses.replace(self.model, unet=unet, text_encoder=text_encoder)


@torch.no_grad()
def generation_loss(
    model: diffusion.DiffusionModel, latent: torch.Tensor, prompt: str | None, gen_id: int, s: CounterfactualSettings
) -> float:
    """Mean denoising loss of one generated image over evenly spaced timesteps × fixed noise draws (the same in every model)."""
    timesteps = diffusion.evenly_spaced_timesteps(s.loss_timesteps, model.num_train_timesteps).repeat_interleave(
        s.loss_draws
    )
    noise = diffusion.fixed_noise([gen_id], len(timesteps), tuple(latent.shape), s.seed)[0]
    text = model.text_embeddings([prompt])
    dev = model.device
    batch = model.batch("forward")
    losses = []
    with memory.guard(batch, "measuring a generation's loss"):
        for start in range(0, len(timesteps), batch.size):
            rows = slice(start, start + batch.size)
            n = len(timesteps[rows])
            losses.append(
                model.denoising_loss(
                    latent.to(dev).expand(n, -1, -1, -1),
                    text.expand(n, -1, -1),
                    timesteps[rows].to(dev),
                    noise[rows].to(dev),
                ).cpu()
            )
    return float(torch.cat(losses).double().mean())


def counterfactual(
    ws: Workspace,
    *,
    generations: list[int] | None = None,
    model: str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
    announce: Callable[[str], None] = lambda message: None,
    **overrides,
) -> CounterfactualReport:
    """Retrain without each method's (and each control's) top-K of the checked generations; measure what changed."""
    progress = progress or Silent()
    started = time.perf_counter()
    s = ws.config.counterfactual.override(**overrides)
    unknown = set(s.methods) - {"fast", *TEACHERS}
    if unknown:
        raise AuditError(f"counterfactual method(s) {', '.join(sorted(unknown))} are not known; use fast, abu, dtrak")
    model_path = ws.model_source(model)
    torch_device = ws.device(device)
    encoder = embed.load(ws.encoder_dir(), torch_device)
    with ws.reader() as store:
        training = training_set(ws, store, model_path, torch_device, "off")
        gens = _select(store, s, generations)
        rankings = _rankings(store, encoder, [g for g, _, _ in gens], list(s.methods))
        train_ids, train_img, _ = training_embeddings(ws, store, encoder)
    base = training.model
    images = [diffusion.read_image(path, ws.limits) for _, path, _ in gens]
    query_img, _ = embed_images(encoder, images, [p or "" for _, _, p in gens])
    sets = _removal_sets(s, gens, rankings, train_ids, (train_img, query_img))
    skipped = [m for m in s.methods if m not in sets]
    if skipped:
        announce(
            f"skipping {', '.join(skipped)}: not every checked generation has its scores (run `audit confirm --method …` on them)"
        )
    retrainer = _Retrainer(base, training, s.retrain_steps, ws.dir / "counterfactual")
    conditions = {"reference": np.zeros(0, np.int64)} | {
        name: np.unique(np.concatenate(list(by_gen.values()))) for name, by_gen in sets.items()
    }
    announce(
        f"leave-{s.k}-out on {len(gens)} generation(s): {len(conditions)} retrainings of {retrainer.steps} steps "
        f"(the recipe has {retrainer.recipe.steps}); conditions {', '.join(conditions)}"
    )
    progress.start("retraining", len(conditions) * retrainer.steps)
    latents = base.latents(torch.stack([base.pixels(im) for im in images])).cpu()
    out_dir = retrainer.folder
    out_dir.mkdir(parents=True, exist_ok=True)
    measured: dict[str, list[dict]] = {}
    for name, removed in conditions.items():
        variant = retrainer.model_without(removed, progress)
        pipe = diffusion.pipeline(variant)
        rows = []
        for j, (gen_id, _, prompt) in enumerate(gens):
            regenerated = diffusion.generate(pipe, prompt or "", s.seed * 100_003 + gen_id, s.sample_steps, s.guidance)
            regenerated.save(out_dir / f"{name}-generation-{gen_id}.png")
            rows.append(
                {
                    "generation_id": gen_id,
                    "loss": generation_loss(variant, latents[j], prompt, gen_id, s),
                    "image": np.asarray(regenerated, np.float64) / 255.0,
                }
            )
        measured[name] = rows
        del variant, pipe
    ref = measured.pop("reference")
    ref_img, _ = embed_images(encoder, [_pil(r["image"]) for r in ref], [""] * len(ref))
    results = []
    for name, rows in measured.items():
        emb, _ = embed_images(encoder, [_pil(r["image"]) for r in rows], [""] * len(rows))
        per_gen = []
        for j, (row, ref_row) in enumerate(zip(rows, ref)):
            per_gen.append(
                {
                    "generation_id": row["generation_id"],
                    "removed": sets[name][row["generation_id"]].tolist(),
                    "loss": row["loss"],
                    "reference_loss": ref_row["loss"],
                    "loss_increase": row["loss"] - ref_row["loss"],
                    "relative_increase": (row["loss"] - ref_row["loss"]) / ref_row["loss"],
                    "pixel_mse": float(((row["image"] - ref_row["image"]) ** 2).mean()),
                    "embedding_distance": float(1.0 - emb[j] @ ref_img[j]),
                }
            )
        results.append(
            ConditionResult(
                name,
                len(conditions[name]),
                *(
                    mean_se([p[key] for p in per_gen])
                    for key in ("loss_increase", "relative_increase", "pixel_mse", "embedding_distance")
                ),
                per_gen,
            )
        )
    report = CounterfactualReport(
        results,
        [g for g, _, _ in gens],
        s.k,
        retrainer.steps,
        retrainer.recipe.steps,
        float(np.mean([r["loss"] for r in ref])),
        out_dir,
        time.perf_counter() - started,
    )
    with ws.writing(), Store(ws.db_path) as store:
        checks.record(
            store,
            "counterfactual",
            model_hash=base.hash,
            encoder_id=encoder.id,
            settings={**dataclasses.asdict(s), "retrain_steps": retrainer.steps, "generations": report.generations},
            n=len(gens),
            seconds=report.seconds,
            results=[
                checks.Result(
                    c.name,
                    checks.METRICS["counterfactual"],
                    *c.relative_increase,
                    LABELS.get(c.name, c.name),
                    encoder.id if c.name == "fast" else None,
                )
                for c in results
            ],
        )
    return report


def _pil(array: np.ndarray):
    from PIL import Image

    return Image.fromarray((array * 255).round().astype(np.uint8))


LABELS = {
    "fast": "fast path top-K",
    "abu": "AbU top-K",
    "dtrak": "D-TRAK top-K",
    "random": "random K (control)",
    "similar": "K most similar, untuned image (control)",
}


def to_markdown(report: CounterfactualReport) -> str:
    head = [
        "removed",
        "images left out",
        "loss increase on x̂",
        "relative",
        "regenerated: pixel MSE",
        "regenerated: embedding distance",
    ]
    rows = [
        [
            LABELS.get(c.name, c.name),
            str(c.removed),
            f"{c.loss_increase[0]:+.5f} ± {c.loss_increase[1]:.5f}",
            f"{100 * c.relative_increase[0]:+.2f} % ± {100 * c.relative_increase[1]:.2f}",
            f"{c.pixel_mse[0]:.5f} ± {c.pixel_mse[1]:.5f}",
            f"{c.embedding_distance[0]:.4f} ± {c.embedding_distance[1]:.4f}",
        ]
        for c in report.conditions
    ]
    note = (
        f"\nLeave-{report.k}-out on {len(report.generations)} generation(s) ({', '.join(map(str, report.generations))}): each row is one "
        f"retraining from scratch without the union of that row's top-{report.k} over the generations, compared with a reference "
        f"retrained on everything by the same recipe and seed ({report.retrain_steps} steps; the model's recipe has {report.recipe_steps}). "
        f"Loss: mean denoising loss on the generated image at fixed timesteps and noise (reference {report.reference_loss:.4f}). "
        f"Regenerated: same prompt and initial noise in both models. ± is the standard error over generations.\n"
    )
    same = _identical(report.conditions)
    if same:
        note += "".join(
            f"\n{' and '.join(LABELS.get(n, n) for n in names)} left out the same images, so they are one retraining.\n"
            for names in same
        )
    return markdown_table(head, rows) + "\n" + note


def _identical(conditions: list[ConditionResult]) -> list[list[str]]:
    """Groups of conditions whose removed sets coincide for every generation."""
    groups: dict[str, list[str]] = {}
    for c in conditions:
        key = json.dumps([sorted(p["removed"]) for p in c.per_generation])
        groups.setdefault(key, []).append(c.name)
    return [names for names in groups.values() if len(names) > 1]


def to_json(report: CounterfactualReport) -> str:
    return json.dumps(
        {**{k: v for k, v in dataclasses.asdict(report).items() if k != "folder"}, "folder": str(report.folder)},
        indent=2,
    )


def from_json(text: str) -> CounterfactualReport:
    """A report back from to_json (e.g. to render a saved run)."""
    data = json.loads(text)
    pairs = ("loss_increase", "relative_increase", "pixel_mse", "embedding_distance")
    conditions = [ConditionResult(**{**c, **{k: tuple(c[k]) for k in pairs}}) for c in data.pop("conditions")]
    return CounterfactualReport(conditions=conditions, **{**data, "folder": Path(data["folder"])})
