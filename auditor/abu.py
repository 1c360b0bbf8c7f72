"""The unlearning teacher (AbU, docs/methods.md §1): forget a generated image, see which training images are forgotten with it.

Only the cross-attention key/value projections move. The update is a damped
natural-gradient ascent step on the generated image's denoising loss,
θ ← θ + η · (F + λ)⁻¹ ∇θ L(x̂, c) / N, with F the diagonal empirical Fisher over
the training set and the gradient averaged over many (timestep, noise) draws. Each
candidate is scored by its denoising loss before and after with identical noise and
evenly spaced timesteps; influence = after − before (max over the image and its flip
when the model was trained with flips). The noise is drawn afresh for every query:
noise fixed per candidate would let 'before' losses be cached, but it gives each
candidate one push up or down in every query of a run, a per-image bias that
payouts add up instead of averaging away (experiments/teacher_signal/TEACHER.md).

Generic-influence correction: on undertrained models, images that are sensitive to
*any* update (e.g. the ones with the most ink) rise for every query (docs/methods.md §7).
We measure each candidate's change under a reference update made from the mean
gradient of random training images and remove the query update's component along
that reference direction: influence = Δ − α·Δ_ref, α = ⟨δ, δ_ref⟩ / ⟨δ_ref, δ_ref⟩.
The uncorrected Δ is kept as `raw_influence`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from . import cost, memory
from .config import ConfirmSettings
from .diffusion import (
    DiffusionModel,
    TrainingSet,
    applied,
    evenly_spaced_timesteps,
    fixed_noise,
    kv_parameters,
    trainable,
)

Delta = dict[str, torch.Tensor]


class Unlearner:
    """AbU on one model, with its Fisher and training-set size fixed."""

    def __init__(self, model: DiffusionModel, settings: ConfirmSettings, fisher: Delta, n_train: int):
        self.model = model
        self.settings = settings
        self.params = kv_parameters(model.unet)
        self.n_train = n_train
        # Layer-wise damping, as AbU+ damps its EK-FAC: λ = damping × mean Fisher of the layer.
        self.inverse = {name: 1.0 / (f + settings.damping * f.mean().clamp_min(1e-30)) for name, f in fisher.items()}
        self.score_timesteps = evenly_spaced_timesteps(settings.timesteps, model.num_train_timesteps)

    # ------------------------------------------------------------------ gradients
    def gradient(self, latents: torch.Tensor, text_emb: torch.Tensor, draws: int, seed: int) -> Delta:
        """∇θ of the mean denoising loss over `draws` (timestep, noise) draws spread across the given samples."""
        gen = torch.Generator().manual_seed(seed)
        index = torch.arange(draws) % len(latents)
        t = torch.randint(0, self.model.num_train_timesteps, (draws,), generator=gen)
        noise = torch.randn((draws, *latents.shape[1:]), generator=gen)
        total = {name: torch.zeros_like(p) for name, p in self.params.items()}
        batch = self.batch("gradient")
        with trainable(self.params), memory.guard(batch, "computing the unlearning gradient"):
            for start in range(0, draws, batch.size):
                sl = slice(start, start + batch.size)
                dev = self.model.device
                loss = self.model.denoising_loss(
                    latents[index[sl]].to(dev), text_emb[index[sl]].to(dev), t[sl].to(dev), noise[sl].to(dev)
                )
                grads = torch.autograd.grad(loss.sum() / draws, list(self.params.values()))
                for name, g in zip(self.params, grads):
                    total[name] += g
        return total

    def batch(self, kind: str) -> memory.Batch:
        """UNet rows per pass: [confirm] batch_size, or sized from the memory available."""
        return self.model.batch(kind, self.settings.batch_size, "[confirm] batch_size")

    def natural_step(self, grad: Delta) -> Delta:
        return {name: self.settings.step_size * self.inverse[name] * g / self.n_train for name, g in grad.items()}

    def unlearn(self, latent: torch.Tensor, text_emb: torch.Tensor, seed: int) -> Delta:
        """The total weight change that forgets one (latent, prompt) pair: `steps` natural-gradient ascent steps."""
        delta = {name: torch.zeros_like(p) for name, p in self.params.items()}
        for step in range(self.settings.steps):
            with self.applied(delta):
                grad = self.gradient(latent[None], text_emb[None], self.settings.draws, seed + step)
            for name, d in self.natural_step(grad).items():
                delta[name] += d
        return delta

    def applied(self, delta: Delta):
        return applied(self.params, delta)

    # ------------------------------------------------------------------ scoring
    @torch.no_grad()
    def losses(
        self, ids: np.ndarray, latents: torch.Tensor, text_emb: torch.Tensor, seed: int | None = None
    ) -> np.ndarray:
        """Mean loss over the evenly spaced timesteps for each candidate; noise is seeded by (seed, id), so a candidate
        sees the same noise before and after an update scored with the same seed."""
        seed = self.settings.seed if seed is None else seed
        n_t = len(self.score_timesteps)
        noise = fixed_noise(ids, n_t, tuple(latents.shape[1:]), seed)
        rows = len(ids) * n_t
        cand = torch.arange(rows) // n_t
        step = torch.arange(rows) % n_t
        out = torch.empty(rows)
        dev = self.model.device
        batch = self.batch("forward")
        with memory.guard(batch, "scoring candidates"):
            for start in range(0, rows, batch.size):
                sl = slice(start, start + batch.size)
                c, s = cand[sl], step[sl]
                out[sl] = self.model.denoising_loss(
                    latents[c].to(dev), text_emb[c].to(dev), self.score_timesteps[s].to(dev), noise[c, s].to(dev)
                ).cpu()
        return out.view(len(ids), n_t).mean(dim=1).double().numpy()

    @staticmethod
    def alignment(delta: Delta, reference: Delta) -> float:
        """α = ⟨δ, δ_ref⟩ / ⟨δ_ref, δ_ref⟩: how much of the query update is the generic one."""
        dot = sum(float((delta[n] * reference[n]).sum()) for n in delta)
        norm = sum(float((reference[n] ** 2).sum()) for n in reference)
        return dot / norm if norm > 0 else 0.0


def estimate_fisher(model: DiffusionModel, latents: torch.Tensor, text_emb: torch.Tensor, seed: int) -> Delta:
    """Diagonal empirical Fisher: mean over training samples of the squared per-sample gradient
    (one random timestep and noise each, the sample's own caption)."""
    params = kv_parameters(model.unet)
    gen = torch.Generator().manual_seed(seed)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    # One sample per backward pass (the Fisher squares per-sample gradients): only checkpointing lowers its memory.
    batch = memory.Batch(1, "[memory] gradient_checkpointing", False, "UNet row per backward pass")
    with trainable(params), memory.guard(batch, "estimating the Fisher"):
        for i in range(len(latents)):
            t = torch.randint(0, model.num_train_timesteps, (1,), generator=gen)
            noise = torch.randn((1, *latents.shape[1:]), generator=gen)
            dev = model.device
            loss = model.denoising_loss(
                latents[i : i + 1].to(dev), text_emb[i : i + 1].to(dev), t.to(dev), noise.to(dev)
            ).sum()
            for name, g in zip(params, torch.autograd.grad(loss, list(params.values()))):
                fisher[name] += g.detach() ** 2
    return {name: f / len(latents) for name, f in fisher.items()}


class AbuTeacher:
    """The AbU teacher on one model and training set: Fisher, unlearner and caches, loaded once per run."""

    method = "abu"

    def __init__(self, training: TrainingSet, settings: ConfirmSettings, cache_dir: Path):
        self.training = training
        self.model = training.model
        self.settings = settings
        self.cache_dir = cache_dir
        self._unlearner: Unlearner | None = None
        self._fisher_path = (
            cache_dir / f"fisher-{self.model.hash}-{settings.fisher_samples}-{settings.seed}.safetensors"
        )
        self._reference_delta_path = cache_dir / f"abu-reference-{settings.reference_key(self.model.hash)}.safetensors"
        self._reference_delta = None
        self._last_update: tuple[int, Delta] | None = None  # (seed, update) of the last query scored

    @property
    def unlearner(self) -> Unlearner:
        """Made on first use: the Fisher (computed once per model, cached) is the run's first heavy step, after the
        estimate."""
        if self._unlearner is None:
            self._unlearner = Unlearner(self.model, self.settings, self._fisher(), len(self.training.ids))
        return self._unlearner

    def _fisher(self) -> dict[str, torch.Tensor]:
        s = self.settings
        path = self._fisher_path
        if path.is_file():
            return load_file(str(path), device=str(self.model.device))
        rng = np.random.default_rng(s.seed)
        sample = rng.choice(self.training.ids, size=min(s.fisher_samples, len(self.training.ids)), replace=False)
        latents, flipped, captions = self.training.encode(sample)
        if self.model.flip_augmentation:
            # Training saw flips half the time; so does the Fisher.
            use_flip = torch.from_numpy(rng.random(len(sample)) < 0.5)
            latents = torch.where(use_flip[:, None, None, None], flipped, latents)
        fisher = estimate_fisher(self.model, latents, captions, s.seed)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous().cpu() for k, v in fisher.items()}, str(path))
        return fisher

    # ------------------------------------------------------------------ the teacher protocol
    def prepare(self, progress=None, announce=lambda message: None) -> None:
        """The once-per-model work, after the estimate: the Fisher and the reference update (both cached)."""
        if self._unlearner is None and not self._fisher_path.is_file():
            announce(
                f"AbU: estimating the Fisher on {min(self.settings.fisher_samples, len(self.training.ids))} training images (once per model)"
            )
        _ = self.unlearner  # computes the Fisher
        if self.settings.bias_correction:
            self.reference_delta()

    def describe(self) -> str:
        return f"AbU, {self.settings.timesteps} timesteps{' × 2 (flip)' if self.model.flip_augmentation else ''}"

    def record(self) -> dict:
        return {**asdict(self.settings), "scheme": self.settings.scheme, "flip": self.model.flip_augmentation}

    def score(self, image, prompt, candidate_ids, seed):
        self._last_update = (seed, self.unlearn(image, prompt, seed))  # the noise floor rescores it
        return self.influence(candidate_ids, self._last_update[1], self.noise_seed(seed))

    def noise_floor(self, image, prompt, candidate_ids, seed, influence) -> float:
        """The same unlearning (deterministic in its seed) scored again with independent noise:
        floor = std(a − b)/√2 over the candidates, on the corrected influence the verdict ranks by."""
        last = self._last_update
        delta = last[1] if last and last[0] == seed else self.unlearn(image, prompt, seed)
        _, b = self.influence(candidate_ids, delta, self.noise_seed(seed, stream=1))
        return float(np.std(influence - b) / np.sqrt(2))

    def noise_seed(self, query_seed: int, stream: int = 0) -> int:
        """The scoring noise of one query. Each query draws its own: noise fixed per candidate across queries gave every
        candidate the same push up or down in every query, which payouts summed instead of averaging away (experiments/teacher_signal/TEACHER.md)."""
        return int(np.random.SeedSequence([self.settings.seed, query_seed, stream]).generate_state(1)[0])

    def estimate(self, n_generations: int, n_candidates: int) -> cost.Estimate:
        """Seconds per phase of the run, from operations timed on one training image (cost.probe) before any heavy
        work: the Fisher and the reference update when they are not cached yet, then per generation."""
        self.timings = cost.probe(self.training, kv_parameters(self.model.unet))
        return self.phases(self.timings, n_generations, n_candidates)

    def phases(self, t: cost.Timings, n_generations: int, n_candidates: int) -> cost.Estimate:
        s = self.settings
        flip = self.model.flip_augmentation
        n_train = len(self.training.ids)
        phases = {}
        if not self._fisher_path.is_file() and self._unlearner is None:
            n = min(s.fisher_samples, n_train)
            phases["Fisher (once per model)"] = cost.encoding(t, n, flip) + n * t.gradient
        if s.bias_correction and not self._reference_delta_path.is_file() and self._reference_delta is None:
            n = min(s.reference_samples, n_train)
            phases["reference update (once per model)"] = (
                cost.encoding(t, n, flip) + s.draws * max(1, n // 8) * t.gradient
            )
        # Candidates are encoded once per session; queries share many of them.
        phases["encoding candidates"] = cost.encoding(t, min(n_train, n_candidates * max(1, n_generations)), flip)
        unlearning = t.vae + t.text + s.steps * s.draws * t.gradient
        # Losses before, after the query's update and after the reference update, all under the query's noise.
        passes = 3 if s.bias_correction else 2
        scoring = passes * n_candidates * s.timesteps * cost.views(flip) * t.forward
        phases[f"unlearning ({n_generations} generation(s))"] = n_generations * unlearning
        phases[f"scoring ({n_generations} generation(s))"] = n_generations * scoring
        # Every generation also measures its noise floor: its update scored again under other noise.
        phases[f"noise floor ({n_generations} generation(s))"] = n_generations * scoring
        return cost.rounded(phases)

    # ------------------------------------------------------------------ scoring
    def losses(self, ids, noise: int) -> np.ndarray:
        """(n, 2) losses of the images and their flips under the current weights and the given scoring noise."""
        latents, flipped, captions = self.training.inputs(ids)
        plain = self.unlearner.losses(ids, latents, captions, noise)
        if not self.model.flip_augmentation:
            return np.stack([plain, plain], axis=1)
        return np.stack([plain, self.unlearner.losses(ids, flipped, captions, noise)], axis=1)

    def reference_delta(self) -> dict[str, torch.Tensor]:
        """The generic update: unlearning the mean gradient of random training images (see the module doc)."""
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

    # ------------------------------------------------------------------ unlearning
    def unlearn(self, image, prompt, seed: int) -> Delta:
        """The weight change that forgets this (image, prompt): latents and prompt embedding in the model's own space."""
        latent = self.model.latents(self.model.pixels(image)[None])[0]
        return self.unlearner.unlearn(latent, self.model.text_embeddings([prompt])[0], self.settings.seed + seed)

    def influence(self, ids, delta: Delta, noise: int) -> tuple[np.ndarray, np.ndarray]:
        """(raw, corrected) influence per candidate: max over image and flip of the loss change under delta, every loss
        under the same scoring noise (seeded by `noise` and the candidate)."""
        before = self.losses(ids, noise)
        with self.unlearner.applied(delta):
            change = self.losses(ids, noise) - before
        raw = change.max(axis=1)
        if not self.settings.bias_correction:
            return raw, raw
        reference = self.reference_delta()
        with self.unlearner.applied(reference):
            reference_change = self.losses(ids, noise) - before
        alpha = self.unlearner.alignment(delta, reference)
        return raw, (change - alpha * reference_change).max(axis=1)
