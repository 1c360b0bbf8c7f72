"""Training a text-to-image model from scratch by its recipe, on all of its training set or a part of it.

The leave-K-out check (docs/methods.md §1) asks what the model would have been without some
training images, and only retraining answers that. The recipe is the model folder's
`auditor_training.json` (diffusion.TRAINING_FACTS): a model without one cannot be
retrained here, and the check says so. The example world's model is trained by this
same function (examples/digits_world/build.py), so the retrained models differ from
the shipped one only in the data they saw (and in length when a shorter run is asked for).

What the recipe covers: the UNet and the text encoder trained jointly from fresh
initialisations of their configs (the VAE and tokenizer stay as shipped), the
scheduler's objective on VAE posterior samples × scaling factor, uniform timesteps,
AdamW with linear warm-up and cosine decay, gradient clipping, optional autocast,
caption dropout to the empty caption, and EMA weights as the result.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .diffusion import TRAINING_FACTS, prediction_target
from .errors import AuditError


@dataclass
class Recipe:
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    grad_clip: float
    autocast: str  # "bfloat16" or "none"
    ema_decay: float
    caption_dropout: float
    seed: int  # of the torch generator that initialises the weights and draws every batch
    empty_caption: str = ""

    @classmethod
    def from_folder(cls, folder: Path) -> Recipe:
        path = Path(folder) / TRAINING_FACTS
        if not path.is_file():
            raise AuditError(
                f"{folder} has no {TRAINING_FACTS}; retraining needs the model's recipe (steps, batch_size, lr, …), see docs/research/leave-k-out.md"
            )
        facts = json.loads(path.read_text())
        missing = [f.name for f in fields(cls) if f.name not in facts and f.name != "empty_caption"]
        if missing:
            raise AuditError(
                f"{path} lacks {', '.join(missing)}; retraining needs them (see docs/research/leave-k-out.md)"
            )
        if "from scratch" not in facts.get("text_encoder", ""):
            raise AuditError(
                f"{path} does not say the text encoder was trained from scratch with the UNet; only such recipes can be retrained here"
            )
        return cls(**{f.name: facts[f.name] for f in fields(cls) if f.name in facts})

    def as_facts(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def cosine_lr(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine decay to min_ratio: the learning-rate factor at `step`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1.0 - decay)


@torch.no_grad()
def posterior(vae, pixels: torch.Tensor, batch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation of the VAE posterior (unscaled) of images in [-1, 1]."""
    means, stds = [], []
    for chunk in pixels.split(batch):
        dist = vae.encode(chunk.to(vae.device)).latent_dist
        means.append(dist.mean.cpu())
        stds.append(dist.std.cpu())
    return torch.cat(means), torch.cat(stds)


def train(
    unet_config: dict,
    text_config,
    noise_schedule,
    latent_mean: torch.Tensor,
    latent_std: torch.Tensor,
    scaling: float,
    caption_tokens: torch.Tensor,
    empty_tokens: torch.Tensor,
    recipe: Recipe,
    *,
    steps: int | None = None,
    device: torch.device = torch.device("cpu"),
    log: Callable[[int, float], None] = lambda step, loss: None,
) -> tuple[torch.nn.Module, torch.nn.Module, list[float]]:
    """(EMA UNet, EMA text encoder, per-step losses) trained from scratch on the given rows.

    `steps` shortens the run (warm-up shrinks with it; the cosine still ends at min_lr_ratio).
    Every random draw comes from the global torch generator seeded with recipe.seed inside
    a fork, so a run is a function of (recipe, rows, steps) and leaves the caller's RNG as it was.
    """
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    total = int(steps or recipe.steps)
    warmup = max(1, round(recipe.warmup_steps * total / recipe.steps))
    n = len(latent_mean)
    if n < recipe.batch_size:
        raise AuditError(f"{n} training images are fewer than one batch of {recipe.batch_size}")
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(recipe.seed)
        text_encoder = CLIPTextModel(text_config).to(device)
        unet = UNet2DConditionModel.from_config(unet_config).to(device)
        ema_text, ema_unet = copy.deepcopy(text_encoder).eval(), copy.deepcopy(unet).eval()
        params = list(unet.parameters()) + list(text_encoder.parameters())
        opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, total, warmup, recipe.min_lr_ratio))
        unet.train()
        text_encoder.train()
        caption_tokens, empty_tokens = caption_tokens.to(device), empty_tokens.to(device)
        latent_mean, latent_std = latent_mean.to(device), latent_std.to(device)
        autocast = recipe.autocast not in ("none", "", None)
        order, cursor, losses = torch.randperm(n), 0, []
        for step in range(total):
            if cursor + recipe.batch_size > n:  # epoch boundary: reshuffle
                order, cursor = torch.randperm(n), 0
            idx = order[cursor : cursor + recipe.batch_size].to(device)
            cursor += recipe.batch_size
            latents = (latent_mean[idx] + latent_std[idx] * torch.randn_like(latent_mean[idx])) * scaling
            noise = torch.randn_like(latents)
            t = torch.randint(0, noise_schedule.config.num_train_timesteps, (len(idx),)).to(device)
            noisy = noise_schedule.add_noise(latents, noise, t)
            target = prediction_target(noise_schedule, latents, noise, t)
            drop = (torch.rand(len(idx)) < recipe.caption_dropout).to(device)
            batch_tokens = torch.where(drop[:, None], empty_tokens, caption_tokens[idx])
            with torch.autocast(
                device.type, dtype=getattr(torch, recipe.autocast) if autocast else None, enabled=autocast
            ):
                hidden = text_encoder(batch_tokens)[0]
                pred = unet(noisy, t, hidden).sample
            loss = torch.nn.functional.mse_loss(pred.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
            opt.step()
            sched.step()
            # EMA warm-up: early averages must not be dominated by the random init.
            decay = min(recipe.ema_decay, (1 + step) / (10 + step))
            ema_update(ema_unet, unet, decay)
            ema_update(ema_text, text_encoder, decay)
            losses.append(loss.item())
            log(step, float(np.mean(losses[-100:])))
    return ema_unet.requires_grad_(False), ema_text.requires_grad_(False), losses
