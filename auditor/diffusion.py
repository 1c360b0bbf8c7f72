"""The diffusion model as the teachers see it: a Stable Diffusion 1.x / 2.x or SDXL model, in its own space.

Latents come from the pipeline's VAE (× its scaling factor), a prompt's conditioning from
its own text encoder(s) (`DiffusionModel.text_embeddings`), the noise schedule and
objective (epsilon / v / sample prediction) from its scheduler config, and every UNet
forward of every teacher goes through `DiffusionModel.predict`, which adds what the
family needs (SDXL: pooled text embeddings and size conditioning). Which files a model
is read from (folders, variants, single files) is auditor/families.py. Everything runs
in fp32 whatever the files hold (fp16 variants are upcast): the teachers' signals are
differences of losses, and bf16 loses them (docs/methods.md §7).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import families, ingest, memory
from .config import MemorySettings
from .errors import AuditError

DTYPE = torch.float32  # the teachers' precision, whatever the weights files hold
# Per-item memory estimates, in activations of the size named: rough upper bounds that scale with the model
# (auditor/memory.py sizes batches from them). VAE: its first stage's activation at full resolution; UNet: its first
# stage's activation at latent resolution, per row (one image at one timestep).
VAE_ACTIVATIONS = 6
# UNet: its activation per row is counted over resolution levels, channels × tokens × (1 + transformer layers), in
# units of an SD 1.x-layout UNet's first stage (whose levels sum to 3.5625 of it): the constants below were set there,
# and SDXL's 10-layer transformers at low resolution count as they should.
SD1_LEVEL_WEIGHT = 3.5625
UNET_FORWARD_ACTIVATIONS = 12
UNET_GRADIENT_ACTIVATIONS = 500  # every activation kept for the backward pass
UNET_CHECKPOINTED_ACTIVATIONS = 48  # block inputs kept, one block recomputed at a time
TEXT_ACTIVATIONS = 16
# The batches the product used before they were sized: the most an automatic batch takes.
BATCH_CAPS = {"vae": 64, "text": 256, "forward": 256, "gradient": 256}
SETTINGS = {
    "vae": ("vae_batch_size", "images per VAE pass"),
    "text": ("text_batch_size", "prompts per text-encoder pass"),
    "forward": ("unet_batch_size", "UNet rows per pass"),
    "gradient": ("unet_batch_size", "UNet rows per backward pass"),
}
CHECKPOINT_BELOW_ROWS = 16  # gradient_checkpointing = "auto": on when fewer gradient rows than this fit without it
TRAINING_FACTS = "auditor_training.json"  # optional: how the model was trained (e.g. flip augmentation)


def model_hash(model: families.Source | str | os.PathLike, cache_dir: Path | None = None) -> str:
    """Content hash of every file of the model (families.Source.files); cached by (path, size, mtime) since SD
    weights are GBs."""
    source = model if isinstance(model, families.Source) else families.resolve(model)
    files = source.files()

    def label(path: Path) -> str:
        for base in (source.path, source.config):
            if path.is_relative_to(base) and path != base:
                return str(path.relative_to(base))
        return path.name

    stamp = json.dumps([(label(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files])
    cache_file = cache_dir / "model_hashes.json" if cache_dir else None
    known = json.loads(cache_file.read_text()) if cache_file and cache_file.is_file() else {}
    key = hashlib.sha256(f"{source.path}|{stamp}".encode()).hexdigest()
    if key in known:
        return known[key]
    digest = hashlib.sha256()
    for path in files:
        digest.update(label(path).encode())
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
    folder: Path  # the diffusers folder, or the single checkpoint file
    hash: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: object  # the training noise schedule (DDPM over the model's betas)
    device: torch.device
    flip_augmentation: bool
    memory: MemorySettings = field(default_factory=MemorySettings)
    # SDXL's second text encoder (with projection: its pooled embedding conditions the UNet) and its tokenizer.
    text_encoder_2: torch.nn.Module | None = None
    tokenizer_2: object = None
    sampler: object = None  # the model's own inference scheduler, for generating
    pipeline_options: dict = field(default_factory=dict)  # the pipeline's own settings (SDXL: zeroed negative prompt)

    @property
    def is_xl(self) -> bool:
        return self.text_encoder_2 is not None

    @property
    def pooled_rows(self) -> int:
        """SDXL: rows of the conditioning that carry the pooled text embedding (see `text_embeddings`)."""
        width = int(self.unet.config.cross_attention_dim)
        return math.ceil(int(self.text_encoder_2.config.projection_dim) / width)

    @property
    def time_ids(self) -> torch.Tensor:
        """SDXL's size conditioning, as its pipeline generates by default: original size = target size = the
        model's resolution, crop at (0, 0). Training images are resized and centre-cropped to that resolution."""
        size = self.resolution
        return torch.tensor([size, size, 0, 0, size, size], dtype=DTYPE, device=self.device)

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

    @property
    def checkpointing(self) -> bool:
        return bool(self.unet.is_gradient_checkpointing)

    def item_bytes(self, kind: str, checkpointing: bool | None = None) -> float:
        """Estimated peak memory of one item of a pass: an image through the VAE ('vae'), a prompt through the text
        encoder ('text'), a UNet row without ('forward') or with gradients ('gradient')."""
        if kind == "vae":
            elt = next(self.vae.parameters()).element_size()
            return VAE_ACTIVATIONS * self.vae.config.block_out_channels[0] * self.resolution**2 * elt
        if kind == "text":
            # SDXL's two encoders run one after the other: the wider one bounds the batch.
            return max(
                TEXT_ACTIVATIONS
                * max(e.config.hidden_size, getattr(e.config, "intermediate_size", e.config.hidden_size))
                * t.model_max_length
                * next(e.parameters()).element_size()
                for e, t in ((self.text_encoder, self.tokenizer), (self.text_encoder_2, self.tokenizer_2))
                if e is not None
            )
        elt = next(self.unet.parameters()).element_size()
        tokens = int(self.unet.config.sample_size) ** 2
        activation = unet_levels(self.unet.config) / SD1_LEVEL_WEIGHT * elt
        # Plain attention materialises a (heads × tokens × tokens) matrix; scaled-dot-product attention does not.
        plain = any(type(p).__name__ != "AttnProcessor2_0" for p in self.unet.attn_processors.values())
        attention = 8 * tokens**2 * elt if plain else 0
        if kind == "forward":
            return UNET_FORWARD_ACTIVATIONS * activation + attention
        checkpointing = self.checkpointing if checkpointing is None else checkpointing
        kept = UNET_CHECKPOINTED_ACTIVATIONS if checkpointing else UNET_GRADIENT_ACTIVATIONS
        return kept * activation + attention * (1 if checkpointing else 4)

    def batch(self, kind: str, value: int = 0, setting: str | None = None) -> memory.Batch:
        """The batch of a pass of this kind: `value` (named `setting`) when above 0, else the [memory] setting when
        above 0, else sized from the memory available (auditor/memory.py)."""
        key, what = SETTINGS[kind]
        if value <= 0:
            value, setting = getattr(self.memory, key), f"[memory] {key}"
        return memory.sized(
            value, setting, what, self.item_bytes(kind), self.device, self.memory.budget, BATCH_CAPS[kind]
        )

    @torch.no_grad()
    def latents(self, pixels: torch.Tensor) -> torch.Tensor:
        """VAE posterior means × scaling factor (deterministic, so cached latents are reproducible)."""
        batch = self.batch("vae")
        out = []
        with memory.guard(batch, "encoding images with the VAE"):
            for start in range(0, len(pixels), batch.size):
                chunk = pixels[start : start + batch.size].to(self.device)
                out.append(self.vae.encode(chunk).latent_dist.mean * self.vae.config.scaling_factor)
        return torch.cat(out)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str | None]) -> torch.Tensor:
        """Each prompt's conditioning as its pipeline computes it, one (tokens, width) tensor per prompt whatever the
        family, so every teacher caches, batches and stacks it alike; a missing prompt is the empty one. SD 1.x / 2.x:
        the last hidden state of the text encoder. SDXL: both encoders' penultimate hidden states side by side, then
        the second encoder's pooled (projected) embedding packed into `pooled_rows` extra rows; `predict` unpacks it."""
        batch = self.batch("text")
        with memory.guard(batch, "encoding prompts"):
            return torch.cat(
                [
                    self._conditioning(prompts[start : start + batch.size])
                    for start in range(0, len(prompts), batch.size)
                ]
            )

    def _conditioning(self, prompts: list[str | None]) -> torch.Tensor:
        tokens = tokenize(self.tokenizer, prompts).to(self.device)
        if not self.is_xl:
            return self.text_encoder(tokens)[0]
        first = self.text_encoder(tokens, output_hidden_states=True)
        second = self.text_encoder_2(tokenize(self.tokenizer_2, prompts).to(self.device), output_hidden_states=True)
        hidden = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
        pooled = second.text_embeds
        width, rows = hidden.shape[-1], self.pooled_rows
        packed = torch.nn.functional.pad(pooled, (0, rows * width - pooled.shape[-1])).view(len(pooled), rows, width)
        return torch.cat([hidden, packed], dim=1)

    def predict(self, noisy: torch.Tensor, timesteps: torch.Tensor, conditioning: torch.Tensor) -> torch.Tensor:
        """The UNet's output for noisy latents under prompt conditionings (`text_embeddings`, one per row): the one
        forward every teacher, its training loss and its scoring use, with the extras the family needs."""
        if not self.is_xl:
            return self.unet(noisy, timesteps, encoder_hidden_states=conditioning).sample
        rows = self.pooled_rows
        pooled = conditioning[:, -rows:].flatten(1)[:, : int(self.text_encoder_2.config.projection_dim)]
        extras = {"text_embeds": pooled, "time_ids": self.time_ids.to(noisy.dtype).expand(len(noisy), -1)}
        return self.unet(
            noisy, timesteps, encoder_hidden_states=conditioning[:, :-rows], added_cond_kwargs=extras
        ).sample

    def denoising_loss(self, latents, text_emb, timesteps, noise) -> torch.Tensor:
        """Per-sample training loss (mean squared error against the scheduler's target), shape (B,)."""
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        pred = self.predict(noisy, timesteps, text_emb)
        target = prediction_target(self.scheduler, latents, noise, timesteps)
        return ((pred.float() - target.float()) ** 2).mean(dim=tuple(range(1, pred.ndim)))


def unet_levels(config) -> float:
    """Σ over the UNet's resolution levels of channels × latent tokens × (1 + transformer layers): how its
    activations per row scale with its layout (the memory estimate's unit is SD 1.x's share of it)."""
    side = int(config.sample_size)
    depth = config.transformer_layers_per_block
    total = 0.0
    for level, (channels, kind) in enumerate(zip(config.block_out_channels, config.down_block_types)):
        layers = depth[level] if isinstance(depth, list | tuple) else depth
        attention = int(layers) if "CrossAttn" in kind else 0
        total += channels * (side / 2**level) ** 2 * (1 + attention)
    return total


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
    """The family's diffusers pipeline over the model's own modules, so weights changed in memory are the ones that
    generate, with the model's own inference scheduler."""
    import diffusers

    parts = dict(unet=model.unet, vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer)
    parts["scheduler"] = model.sampler
    if model.is_xl:
        pipe = diffusers.StableDiffusionXLPipeline(
            **parts,
            text_encoder_2=model.text_encoder_2,
            tokenizer_2=model.tokenizer_2,
            add_watermarker=False,
            **model.pipeline_options,
        )
    else:
        pipe = diffusers.StableDiffusionPipeline(
            **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
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
    """The training images a teacher scores (id → path, caption), encoded into the model's space on demand. A row may
    go on with where `audit index` read the image (shard, shard_member, shard_key: a WebDataset shard's member or a
    Parquet cell), read from there with `storage` (sources.Storage) as report thumbnails are."""

    def __init__(self, model: DiffusionModel, rows: list[tuple], limits: ingest.Limits, storage=None):
        if not rows:
            raise AuditError("the workspace has no training images; run `audit index TRAINING_DIR` first")
        self.model = model
        self.limits = limits
        self.storage = storage
        self.ids = np.array([r[0] for r in rows], np.int64)
        self.meta = {int(r[0]): (r[1], r[2]) for r in rows}
        self._kept = {int(r[0]): tuple(r[3:6]) for r in rows if len(r) > 3 and r[3]}
        self._latents: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._captions: dict[str, torch.Tensor] = {}

    def image(self, i: int) -> Image.Image:
        """Training image `i`, decoded with the ingest limits."""
        from . import sources

        path, kept = self.meta[int(i)][0], self._kept.get(int(i))
        if kept is None:
            return read_image(path, self.limits)
        image, _ = ingest.decode(sources.read_image(path, *kept, self.limits, self.storage), self.limits)
        return image

    def encode(self, ids) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(latents, flipped latents, caption embeddings), not kept: for passes over the whole training set. Images are
        read a VAE batch at a time; the flips are encoded only when the model was trained with flips (otherwise the
        'flipped' latents are the latents themselves, which nothing reads)."""
        step = self.model.batch("vae").size
        plain, mirrored = [], []
        for start in range(0, len(ids), step):
            chunk = ids[start : start + step]
            pixels = torch.stack([self.model.pixels(self.image(i)) for i in chunk])
            plain.append(self.model.latents(pixels).cpu())
            if self.model.flip_augmentation:
                mirrored.append(self.model.latents(pixels.flip(-1)).cpu())
        latents = torch.cat(plain) if plain else torch.zeros(0)
        return latents, torch.cat(mirrored) if mirrored else latents, self.captions(ids)

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


def load(
    model: families.Source | str | os.PathLike,
    device: torch.device,
    cache_dir: Path | None = None,
    flip: str = "auto",
    memory_settings: MemorySettings | None = None,
) -> DiffusionModel:
    """Load the model's unet, vae, text encoder(s), tokenizer(s) and schedulers from local files only (a path is
    checked with families.resolve), in the teachers' precision, with scaled-dot-product attention and gradient
    checkpointing as [memory] says."""
    source = model if isinstance(model, families.Source) else families.resolve(model)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        parts = _single_file_parts(source) if source.single_file else _folder_parts(source)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise AuditError(
            f"cannot load the {source.describe()} at {source.path}: {str(exc).strip().splitlines()[0]}"
        ) from None
    from diffusers import DDPMScheduler

    # The training noise schedule: DDPM's add_noise / get_velocity over the model's betas and objective.
    scheduler = DDPMScheduler.from_config(parts["sampler"].config)
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if parts.get(name) is not None:
            parts[name].to(device).eval().requires_grad_(False)
    if not kv_parameters(parts["unet"]):
        raise AuditError(
            f"the UNet in {source.path} has no cross-attention (attn2.to_k / attn2.to_v); AbU needs a text-conditioned UNet"
        )
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    facts_path = source.path / TRAINING_FACTS
    facts = json.loads(facts_path.read_text()) if facts_path.is_file() else {}
    if flip == "auto":
        # Without a record of how the model was trained, assume SD's usual random flips (docs/methods.md §1).
        flip_aug = bool(facts.get("flip_augmentation", True))
    else:
        flip_aug = flip == "on"
    loaded = DiffusionModel(
        source.path,
        model_hash(source, cache_dir),
        parts["unet"],
        parts["vae"],
        parts["text_encoder"],
        parts["tokenizer"],
        scheduler,
        device,
        flip_aug,
        memory_settings or MemorySettings(),
        text_encoder_2=parts.get("text_encoder_2"),
        tokenizer_2=parts.get("tokenizer_2"),
        sampler=parts["sampler"],
        pipeline_options=parts.get("options", {}),
    )
    memory_efficient(loaded)
    return loaded


def _folder_parts(source: families.Source) -> dict:
    """The components of a diffusers folder, each from its plain or variant weights, upcast to DTYPE."""
    import diffusers
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    folder = source.path

    def weights(cls, name):
        return cls.from_pretrained(folder / name, variant=source.variant_of(name), dtype=DTYPE)

    parts = {
        "unet": weights(UNet2DConditionModel, "unet"),
        "vae": weights(AutoencoderKL, "vae"),
        "text_encoder": weights(CLIPTextModel, "text_encoder"),
        "tokenizer": CLIPTokenizer.from_pretrained(folder / "tokenizer"),
    }
    if source.is_xl:
        parts["text_encoder_2"] = weights(CLIPTextModelWithProjection, "text_encoder_2")
        parts["tokenizer_2"] = CLIPTokenizer.from_pretrained(folder / "tokenizer_2")
        index = json.loads((folder / "model_index.json").read_text())
        parts["options"] = {"force_zeros_for_empty_prompt": bool(index.get("force_zeros_for_empty_prompt", True))}
    sampler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    parts["sampler"] = getattr(diffusers, sampler).from_pretrained(folder / "scheduler")
    return parts


def _single_file_parts(source: families.Source) -> dict:
    """The components of a single checkpoint, converted by diffusers' single-file loader with the local config folder
    (local_files_only: no network), upcast to DTYPE."""
    import diffusers

    cls = getattr(diffusers, source.pipeline)
    extra = (
        {} if source.is_xl else {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    )
    pipe = cls.from_single_file(
        str(source.path), config=str(source.config), local_files_only=True, torch_dtype=DTYPE, **extra
    )
    parts = {name: getattr(pipe, name) for name in source.components if name != "scheduler"}
    parts["sampler"] = pipe.scheduler
    if source.is_xl:
        parts["options"] = {"force_zeros_for_empty_prompt": bool(pipe.config.force_zeros_for_empty_prompt)}
    return parts


def memory_efficient(model: DiffusionModel) -> None:
    """Scaled-dot-product attention in the UNet and VAE (diffusers' default where torch has it; set explicitly so a
    folder saved with another processor does not materialise attention matrices), and gradient checkpointing per
    [memory] gradient_checkpointing. diffusers checkpoints whenever gradients are enabled, in eval mode too."""
    from diffusers.models.attention_processor import AttnProcessor2_0

    for module in (model.unet, model.vae):
        if any(type(p) is not AttnProcessor2_0 for p in module.attn_processors.values()):
            module.set_attn_processor(AttnProcessor2_0())
    mode = model.memory.gradient_checkpointing
    if mode == "auto":
        fits = model.memory.budget * memory.available_bytes(model.device) / model.item_bytes("gradient", False)
        mode = "on" if fits < CHECKPOINT_BELOW_ROWS else "off"
    if mode == "on":
        model.unet.enable_gradient_checkpointing()
    elif model.checkpointing:
        model.unet.disable_gradient_checkpointing()
