"""The unlearning teacher (AbU, methods.md §1): forget a generated image, see which training images are forgotten with it.

Only the cross-attention key/value projections move. The update is a damped
natural-gradient ascent step on the generated image's denoising loss,
θ ← θ + η · (F + λ)⁻¹ ∇θ L(x̂, c) / N, with F the diagonal empirical Fisher over
the training set and the gradient averaged over many (timestep, noise) draws. Each
candidate is scored by its denoising loss before and after with identical noise and
evenly spaced timesteps; influence = after − before (max over the image and its flip
when the model was trained with flips). The noise is drawn afresh for every query:
noise fixed per candidate would let 'before' losses be cached, but it gives each
candidate one push up or down in every query of a run, a per-image bias that
payouts add up instead of averaging away (examples/digits_world/TEACHER.md).

Generic-influence correction: on undertrained models, images that are sensitive to
*any* update (e.g. the ones with the most ink) rise for every query (methods.md §7).
We measure each candidate's change under a reference update made from the mean
gradient of random training images and remove the query update's component along
that reference direction: influence = Δ − α·Δ_ref, α = ⟨δ, δ_ref⟩ / ⟨δ_ref, δ_ref⟩.
The uncorrected Δ is kept as `raw_influence`.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .diffusion import DiffusionModel, evenly_spaced_timesteps, fixed_noise, kv_parameters
from .settings import AbuSettings

Delta = dict[str, torch.Tensor]


class Unlearner:
    """AbU on one model, with its Fisher and training-set size fixed."""

    def __init__(self, model: DiffusionModel, settings: AbuSettings, fisher: Delta, n_train: int):
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
        with trainable(self.params):
            for start in range(0, draws, self.settings.batch_size):
                sl = slice(start, start + self.settings.batch_size)
                dev = self.model.device
                loss = self.model.denoising_loss(
                    latents[index[sl]].to(dev), text_emb[index[sl]].to(dev), t[sl].to(dev), noise[sl].to(dev)
                )
                grads = torch.autograd.grad(loss.sum() / draws, list(self.params.values()))
                for name, g in zip(self.params, grads):
                    total[name] += g
        return total

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
        for start in range(0, rows, self.settings.batch_size):
            sl = slice(start, start + self.settings.batch_size)
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


@contextlib.contextmanager
def trainable(params: dict[str, torch.nn.Parameter]):
    """Gradients on for these parameters (and only these) inside the block."""
    for p in params.values():
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p in params.values():
            p.requires_grad_(False)


@contextlib.contextmanager
def applied(params: dict[str, torch.nn.Parameter], delta: Delta):
    """Weights moved by delta inside the block; restored bit-exactly after, even on error."""
    saved = {name: p.detach().clone() for name, p in params.items()}
    try:
        with torch.no_grad():
            for name, p in params.items():
                p.add_(delta[name])
        yield
    finally:
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(saved[name])


def estimate_fisher(model: DiffusionModel, latents: torch.Tensor, text_emb: torch.Tensor, seed: int) -> Delta:
    """Diagonal empirical Fisher: mean over training samples of the squared per-sample gradient
    (one random timestep and noise each, the sample's own caption)."""
    params = kv_parameters(model.unet)
    gen = torch.Generator().manual_seed(seed)
    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    with trainable(params):
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
