"""The diffusion model as the teachers see it: a Stable-Diffusion-layout diffusers folder, in its own space.

Latents come from the pipeline's VAE (× its scaling factor), prompt embeddings from its
own text encoder, the noise schedule and objective (epsilon / v / sample prediction)
from its scheduler config. Everything runs in fp32: the teachers' signals are
differences of losses, and bf16 loses them (docs/methods.md §7).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import ingest
from .errors import AuditError

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
TRAINING_FACTS = "auditor_training.json"  # optional: how the model was trained (e.g. flip augmentation)


def model_hash(folder: Path, cache_dir: Path | None = None) -> str:
    """Content hash of every file of the pipeline's components; cached by (path, size, mtime) since SD weights are GBs."""
    files = sorted(p for c in COMPONENTS for p in (folder / c).rglob("*") if p.is_file())
    stamp = json.dumps([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    cache_file = cache_dir / "model_hashes.json" if cache_dir else None
    known = json.loads(cache_file.read_text()) if cache_file and cache_file.is_file() else {}
    key = hashlib.sha256(f"{folder.resolve()}|{stamp}".encode()).hexdigest()
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode())
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    value = digest.hexdigest()[:16]
    if cache_file:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        known[key] = value
        cache_file.write_text(json.dumps(known))
    return value


def kv_parameters(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The cross-attention key/value projections: the only weights AbU updates."""
    return {
        name: p for name, p in unet.named_parameters() if "attn2" in name and (".to_k." in name or ".to_v." in name)
    }


def evenly_spaced_timesteps(n: int, num_train_timesteps: int) -> torch.Tensor:
    """n timesteps at the centres of n equal bins of the schedule: the teachers' fixed scoring timesteps."""
    return ((torch.arange(n) + 0.5) * num_train_timesteps / n).long().clamp(max=num_train_timesteps - 1)


def fixed_noise(ids, n: int, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """(len(ids), n, *shape) standard normal noise, seeded by (seed, id): the same sample sees the same noise in every
    run, query and process, whatever else is in its batch."""
    return torch.stack(
        [torch.randn((n, *shape), generator=torch.Generator().manual_seed(seed * 1_000_003 + int(i))) for i in ids]
    )


def parameter_set(unet: torch.nn.Module, which: str, setting: str) -> dict[str, torch.nn.Parameter]:
    """'kv': the cross-attention keys/values; 'all': every UNet weight."""
    if which == "kv":
        return kv_parameters(unet)
    if which == "all":
        return dict(unet.named_parameters())
    raise AuditError(f"{setting} {which!r} is not known; use kv (cross-attention keys/values) or all")


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
def applied(params: dict[str, torch.nn.Parameter], delta: dict[str, torch.Tensor]):
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


@dataclass
class DiffusionModel:
    folder: Path
    hash: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object
    device: torch.device
    flip_augmentation: bool

    @property
    def resolution(self) -> int:
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return int(self.unet.config.sample_size) * scale

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    def pixels(self, image: Image.Image) -> torch.Tensor:
        """RGB image → (3, R, R) in [-1, 1]: resize the short side and centre-crop, as SD training does."""
        size = self.resolution
        w, h = image.size
        scale = size / min(w, h)
        image = image.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BICUBIC)
        left, top = (image.size[0] - size) // 2, (image.size[1] - size) // 2
        image = image.crop((left, top, left + size, top + size))
        arr = np.asarray(image, np.float32) / 127.5 - 1.0
        return torch.from_numpy(arr.transpose(2, 0, 1).copy())

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """VAE posterior means × scaling factor (deterministic, so cached latents are reproducible)."""
        out = []
        for start in range(0, len(pixels), batch_size):
            chunk = pixels[start : start + batch_size].to(self.device)
            out.append(self.vae.encode(chunk).latent_dist.mean * self.vae.config.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str | None]) -> torch.Tensor:
        """The pipeline's own conditioning: last hidden state of its text encoder; a missing prompt is the empty one."""
        return self.text_encoder(tokenize(self.tokenizer, prompts).to(self.device))[0]

    def denoising_loss(self, latents, text_emb, timesteps, noise) -> torch.Tensor:
        """Per-sample training loss (mean squared error against the scheduler's target), shape (B,)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        pred = self.unet(noisy, timesteps, encoder_hidden_states=text_emb).sample
        target = prediction_target(self.scheduler, latents, noise, timesteps)
        return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))


def tokenize(tokenizer, prompts: list[str | None]) -> torch.Tensor:
    """The pipeline's own tokenisation of prompts (a missing prompt is the empty one)."""
    return tokenizer(
        [p or "" for p in prompts],
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def prediction_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the UNet is trained to predict under the scheduler's objective."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise AuditError(f"scheduler prediction_type {kind!r} is not supported (epsilon, v_prediction, sample)")


def pipeline(model: DiffusionModel):
    """A StableDiffusionPipeline over the model's own modules, so weights changed in memory are the ones that generate,
    with the folder's inference scheduler."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(
        model.folder,
        unet=model.unet,
        vae=model.vae,
        text_encoder=model.text_encoder,
        tokenizer=model.tokenizer,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, prompt: str, seed: int, steps: int, guidance: float) -> Image.Image:
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator).images[0]


def read_image(path: str, limits: ingest.Limits) -> Image.Image:
    image, _ = ingest.decode(ingest.read_bytes(path, limits), limits)
    return image


class TrainingSet:
    """The training images a teacher scores (id → path, caption), encoded into the model's space on demand."""

    def __init__(self, model: DiffusionModel, rows: list[tuple[int, str, str | None]], limits: ingest.Limits):
        if not rows:
            raise AuditError("the workspace has no training images; run `audit index TRAINING_DIR` first")
        self.model = model
        self.limits = limits
        self.ids = np.array([r[0] for r in rows], np.int64)
        self.meta = {int(r[0]): (r[1], r[2]) for r in rows}
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._captions: dict[str, torch.Tensor] = {}

    def encode(self, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, flipped latents, caption embeddings), not kept: for passes over the whole training set."""
        pixels = torch.stack([self.model.pixels(read_image(self.meta[int(i)][0], self.limits)) for i in ids])
        both = self.model.latents(torch.cat([pixels, pixels.flip(-1)])).cpu()
        return both[: len(ids)], both[len(ids) :], self.captions(ids)

    def captions(self, ids) -> torch.Tensor:
        captions = [self.meta[int(i)][1] or "" for i in ids]
        new = sorted({c for c in captions if c not in self._captions})
        if new:
            self._captions.update(zip(new, self.model.text_embeddings(new).cpu()))
        return torch.stack([self._captions[c] for c in captions])

    def inputs(self, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """As encode, kept for the session: candidates recur across queries."""
        todo = [int(i) for i in ids if int(i) not in self._latents]
        if todo:
            latents, flipped, _ = self.encode(todo)
            self._latents.update((i, (latents[j], flipped[j])) for j, i in enumerate(todo))
        return (
            torch.stack([self._latents[int(i)][0] for i in ids]),
            torch.stack([self._latents[int(i)][1] for i in ids]),
            self.captions(ids),
        )


def checked_folder(folder: str | os.PathLike) -> Path:
    """The model folder, resolved, once it is known to hold every pipeline component."""
    folder = Path(folder).expanduser().resolve()
    if not folder.is_dir():
        raise AuditError(f"model folder {folder} does not exist; set [paths] model in audit.toml or pass --model")
    missing = [c for c in COMPONENTS if not (folder / c).is_dir()]
    if missing:
        raise AuditError(
            f"model folder {folder} lacks {', '.join(missing)}; expected a diffusers Stable Diffusion folder (unet, vae, text_encoder, tokenizer, scheduler)"
        )
    return folder


def load(
    folder: str | os.PathLike, device: torch.device, cache_dir: Path | None = None, flip: str = "auto"
) -> DiffusionModel:
    """Load unet, vae, text encoder, tokenizer and scheduler from a local Stable Diffusion folder (no hub access)."""
    folder = checked_folder(folder)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    try:
        unet = UNet2DConditionModel.from_pretrained(folder / "unet", dtype=torch.float32)
        vae = AutoencoderKL.from_pretrained(folder / "vae", dtype=torch.float32)
        text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=torch.float32)
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        # The training noise schedule: DDPM's add_noise / get_velocity over the folder's betas.
        scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    except (OSError, ValueError) as exc:
        raise AuditError(f"cannot load the diffusers pipeline in {folder}: {str(exc).splitlines()[0]}") from None
    for module in (unet, vae, text_encoder):
        module.to(device).eval().requires_grad_(False)
    if not kv_parameters(unet):
        raise AuditError(
            f"the UNet in {folder} has no cross-attention (attn2.to_k / attn2.to_v); AbU needs a text-conditioned UNet"
        )
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    facts_path = folder / TRAINING_FACTS
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    if flip == "auto":
        # Without a record of how the model was trained, assume SD's usual random flips (docs/methods.md §1).
        flip_aug = bool(facts.get("flip_augmentation", True))
    else:
        flip_aug = flip == "on"
    return DiffusionModel(
        folder, model_hash(folder, cache_dir), unet, vae, text_encoder, tokenizer, scheduler, device, flip_aug
    )
