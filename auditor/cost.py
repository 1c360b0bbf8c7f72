"""What a teacher run will cost, measured before any heavy work.

`probe` times each operation a teacher is built from on one training image: a VAE encoding, a prompt encoding, UNet
rows without gradients and one UNet row with gradients. The teachers (`estimate` in abu.py and dtrak.py) multiply
these by the operations each phase of the run needs (Fisher and reference update included when they are not cached)
and `audit confirm` prints the phases before it starts; `--dry-run` stops there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import memory
from .diffusion import TrainingSet, trainable

PROBE_ROWS = 4


@dataclass(frozen=True)
class Timings:
    """Seconds per operation on this device, at the batch sizes the run will use."""

    vae: float  # one image through the VAE encoder
    text: float  # one prompt through the text encoder
    forward: float  # one UNet row without gradients
    gradient: float  # one UNet row with gradients (forward + backward)


@dataclass
class Estimate:
    """Seconds per phase, in the order they run."""

    phases: dict[str, float] = field(default_factory=dict)

    @property
    def total(self) -> float:
        return float(sum(self.phases.values()))

    def lines(self) -> list[str]:
        return [f"  {name}: {_duration(seconds)}" for name, seconds in self.phases.items()]

    def __str__(self) -> str:
        return f"estimated {_duration(self.total)}: " + "; ".join(
            f"{name} {_duration(seconds)}" for name, seconds in self.phases.items()
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def probe(training: TrainingSet, params: dict[str, torch.nn.Parameter]) -> Timings:
    """Time each operation once on the first training image (UNet rows: two without gradients, one with gradients
    with respect to `params`); nothing is kept."""
    model = training.model
    dev = model.device
    caption = training.meta[int(training.ids[0])][1]
    pixels = model.pixels(training.image(training.ids[0]))[None]
    t0 = time.perf_counter()
    latent = model.latents(pixels).cpu()
    vae = time.perf_counter() - t0
    t0 = time.perf_counter()
    text = model.text_embeddings([caption]).cpu()
    text_s = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(0)
    # Rows per forward as the run batches them, up to a few: the image at several timesteps.
    batch = model.batch("forward")
    rows = max(2, min(PROBE_ROWS, batch.size))
    timesteps = torch.randint(0, model.num_train_timesteps, (rows,), generator=gen)
    noise = torch.randn((rows, *latent.shape[1:]), generator=gen)
    x, c = latent.expand(rows, -1, -1, -1).to(dev), text.expand(rows, -1, -1).to(dev)
    with memory.guard(batch, "measuring the cost (UNet rows)"):
        t0 = time.perf_counter()
        with torch.no_grad():
            model.denoising_loss(x, c, timesteps.to(dev), noise.to(dev))
        forward = (time.perf_counter() - t0) / rows
        t0 = time.perf_counter()
        with trainable(params):
            loss = model.denoising_loss(x[:1], c[:1], timesteps[:1].to(dev), noise[:1].to(dev)).sum()
            torch.autograd.grad(loss, list(params.values()))
        gradient = time.perf_counter() - t0
    return Timings(float(vae), float(text_s), float(forward), float(gradient))


def views(flip: bool) -> int:
    return 2 if flip else 1


def encoding(t: Timings, n_images: int, flip: bool, n_prompts: int | None = None) -> float:
    """Reading n training images into the model's space (and their flips when the model was trained with them)."""
    return n_images * views(flip) * t.vae + (n_images if n_prompts is None else n_prompts) * t.text


def rounded(phases: dict[str, float]) -> Estimate:
    return Estimate({k: float(np.round(v, 3)) for k, v in phases.items() if v > 0})
