"""Build the digits example world: a tiny, fully synthetic text-to-image universe.

Eight made-up contributors each own a disjoint share of scikit-learn's bundled
handwritten digits, each drawn in their own ink-on-paper palette. On that
training set the build trains a small Stable-Diffusion-style pipeline (VAE,
CLIP text encoder, cross-attention UNet) and a tiny open_clip backbone, then
generates prompted outputs and measures quality gates. Nothing is downloaded.

    python examples/digits_world/build.py                      # every stage
    python examples/digits_world/build.py --stage outputs --stage gates

Each stage reads the earlier stages' artifacts from disk, so a late stage can be
re-run alone. Stage times, measurements and gates go to build_stats.json and
WORLD.md.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model here is built locally
# Training: spinning OpenMP threads are ~3x faster than the auditor's PASSIVE default (see auditor/__init__.py).
os.environ.setdefault("OMP_WAIT_POLICY", "ACTIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo

from auditor.diffusion import tokenize  # noqa: E402
from auditor.retrain import Recipe, cosine_lr, posterior, train  # noqa: E402

SEED = 0
THREADS = 2
SIZE = 32  # image side in pixels
WORLD_DIR = Path(__file__).resolve().parent

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


# --------------------------------------------------------------------------- world definition

# Ink words are distinct across contributors, and so are paper words, so that a
# prompt names one contributor's palette unambiguously and two palettes can be mixed.
CONTRIBUTORS = [
    # id, name, licence, share of training set, (ink word, rgb), (paper word, rgb)
    ("c0", "Ada Quill Studio", "CC-BY-4.0", 0.18, ("red", (205, 35, 45)), ("cream", (245, 234, 200))),
    ("c1", "Bram Okafor", "CC0-1.0", 0.15, ("blue", (35, 75, 215)), ("white", (255, 255, 255))),
    ("c2", "Night Garden Press", "proprietary-licensed", 0.14, ("green", (40, 205, 80)), ("black", (15, 15, 15))),
    ("c3", "Mira Castellanos", "CC-BY-SA-4.0", 0.13, ("white", (250, 250, 250)), ("navy", (25, 35, 100))),
    ("c4", "Hive and Harbor Design", "CC-BY-4.0", 0.12, ("black", (15, 15, 15)), ("yellow", (250, 215, 40))),
    ("c5", "Tomasz Wren", "CC-BY-NC-4.0", 0.10, ("yellow", (255, 220, 60)), ("purple", (105, 40, 140))),
    ("c6", "Lumen Atelier", "proprietary-licensed", 0.09, ("orange", (250, 135, 25)), ("teal", (20, 120, 125))),
    ("c7", "Kiko Ferreira", "CC0-1.0", 0.09, ("pink", (255, 135, 195)), ("brown", (95, 55, 30))),
]
HELDOUT_FRACTION = 0.10

# Words the pipeline tokenizer keeps whole (on top of every caption word); anything
# else still tokenises, into smaller BPE pieces down to single bytes.
EXTRA_WORDS = (
    "a an the of in on with and by for from style drawn written digit digits number numeral "
    "ink paper background colour color colored coloured image picture photo scan sketch art "
    "handwriting handwritten black white grey gray dark light bright new old"
).split()

MAX_TOKENS = 32  # pipeline tokenizer max length == text encoder max_position_embeddings

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    latent_channels=4,
    sample_size=SIZE,
    down_block_types=("DownEncoderBlock2D",) * 3,  # 3 blocks -> 2 downsamples: 32x32 -> 8x8
    up_block_types=("UpDecoderBlock2D",) * 3,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    norm_num_groups=16,
)
VAE_TRAIN = dict(steps=900, batch=64, lr=1e-3, kl_weight=1e-3)

TEXT_ENCODER_CONFIG = dict(
    hidden_size=128,
    intermediate_size=512,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=MAX_TOKENS,
    projection_dim=128,
)
UNET_CONFIG = dict(
    sample_size=SIZE // 4,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    block_out_channels=(64, 128),
    layers_per_block=1,
    norm_num_groups=16,
    cross_attention_dim=TEXT_ENCODER_CONFIG["hidden_size"],
    attention_head_dim=4,  # diffusers quirk: this is the number of heads
)
# The noise schedule the UNet is trained with; the DDIM sampler saved with the
# pipeline shares its betas and prediction type.
SCHEDULE = dict(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")
# steps_offset only shifts "leading" spacing; 1 is what the SD pipeline insists on.
SAMPLER = dict(clip_sample=False, set_alpha_to_one=False, timestep_spacing="trailing", steps_offset=1)
DIFFUSION_TRAIN = dict(  # an auditor.retrain.Recipe; seed 2 is the stage's offset of SEED
    steps=1000,
    batch_size=128,
    lr=2e-3,
    weight_decay=1e-2,
    warmup_steps=100,
    min_lr_ratio=0.1,
    ema_decay=0.995,
    caption_dropout=0.1,
    grad_clip=1.0,
    autocast="bfloat16",
    seed=SEED + 2,
)

CLIP_NAME = "digits-clip-tiny"
CLIP_CONFIG = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": SIZE, "layers": 4, "width": 128, "patch_size": 4, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4, "layers": 4},
}
CLIP_TRAIN = dict(steps=1500, batch=64, lr=3e-4, weight_decay=0.05, warmup=100, max_shift=2)
# Caption variants the backbone is trained on, with their probabilities: the
# short ones are the zero-shot prompt templates.
CLIP_CAPTION_VARIANTS = (("full", 0.6), ("digit", 0.2), ("palette", 0.2))

SAMPLING = dict(steps=30, guidance=4.0, sampler="DDIM")
OUTPUT_SEEDS_PER_PROMPT = 2
MIXED_PROMPTS = 20  # distinct two-palette prompts, each with OUTPUT_SEEDS_PER_PROMPT seeds
SIDECAR_FRACTION = 0.15

GATE_DIGIT = 0.70
GATE_PALETTE = 0.90


# --------------------------------------------------------------------------- small helpers


def seed_everything(offset: int) -> None:
    random.seed(SEED + offset)
    np.random.seed(SEED + offset)
    torch.manual_seed(SEED + offset)


def caption(ink_word: str, digit: int, paper_word: str) -> str:
    # "a orange ..." on purpose: the shipped model was trained on this exact caption template.
    return f"a {ink_word} handwritten {DIGIT_WORDS[digit]} on {paper_word} paper"


def caption_digit(text: str) -> int:
    """The digit a caption or prompt names (captions are the only digit labels on disk)."""
    return next(DIGIT_WORDS.index(w) for w in text.split() if w in DIGIT_WORDS)


def palettes() -> dict[str, dict]:
    return {
        cid: {
            "name": name,
            "ink_word": ink[0],
            "ink_rgb": list(ink[1]),
            "paper_word": paper[0],
            "paper_rgb": list(paper[1]),
        }
        for cid, name, _, _, ink, paper in CONTRIBUTORS
    }


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def load_pngs(paths: list[Path]) -> np.ndarray:
    """(N, 32, 32, 3) uint8."""
    return np.stack([np.asarray(Image.open(p).convert("RGB")) for p in paths])


def load_split(out: Path, split: str) -> tuple[list[dict], np.ndarray]:
    csv_path = out / "training" / "contributors.csv" if split == "training" else out / "heldout" / "heldout.csv"
    rows = read_csv(csv_path)
    return rows, load_pngs([csv_path.parent / r["path"] for r in rows])


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 NHWC -> float NCHW in [-1, 1], the range the VAE works in."""
    # contiguous: a permuted (channels-last) batch makes the convolutions several times slower
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 127.5 - 1.0


def update_stats(out: Path, section: str, values: dict) -> None:
    path = out / "build_stats.json"
    stats = json.loads(path.read_text()) if path.exists() else {}
    stats.setdefault(section, {}).update(values)
    path.write_text(json.dumps(stats, indent=2) + "\n")


def load_stats(out: Path) -> dict:
    path = out / "build_stats.json"
    return json.loads(path.read_text()) if path.exists() else {}


# --------------------------------------------------------------------------- stage: data


def render(alpha: np.ndarray, ink: tuple, paper: tuple) -> np.ndarray:
    """Mix ink over paper by ink intensity in [0, 1]; (H, W) -> (H, W, 3) uint8."""
    ink, paper = np.asarray(ink, np.float32), np.asarray(paper, np.float32)
    rgb = paper + alpha[..., None] * (ink - paper)
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def upsample_digits(images8: np.ndarray) -> np.ndarray:
    """8x8 scans (0..16) -> smooth 32x32 ink intensity in [0, 1]."""
    x = torch.from_numpy(images8 / 16.0).float()[:, None]
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bicubic", align_corners=False)
    return x.clamp(0, 1)[:, 0].numpy()


def assign_contributors(n: int, rng: np.random.Generator) -> list[str]:
    """Disjoint random shares of the training set, sized by CONTRIBUTORS' shares."""
    shares = np.array([c[3] for c in CONTRIBUTORS])
    bounds = np.rint(np.cumsum(shares) / shares.sum() * n).astype(int)
    owner = np.empty(n, dtype=object)
    for (cid, *_), start, stop in zip(CONTRIBUTORS, np.r_[0, bounds[:-1]], bounds):
        owner[start:stop] = cid
    return list(owner[rng.permutation(n)])


def stage_data(out: Path) -> dict:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    alphas = upsample_digits(digits.images)
    train_idx, held_idx = train_test_split(
        np.arange(len(digits.target)), test_size=HELDOUT_FRACTION, stratify=digits.target, random_state=SEED
    )
    rng = np.random.default_rng(SEED)
    pal = palettes()
    by_id = {c[0]: c for c in CONTRIBUTORS}

    rows = []
    for i, cid in zip(sorted(train_idx), assign_contributors(len(train_idx), rng)):
        p, d = pal[cid], int(digits.target[i])
        rel = f"{cid}/{i:04d}.png"
        (out / "training" / cid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(render(alphas[i], p["ink_rgb"], p["paper_rgb"])).save(out / "training" / rel)
        rows.append(
            {
                "path": rel,
                "contributor_id": cid,
                "contributor_name": p["name"],
                "caption": caption(p["ink_word"], d, p["paper_word"]),
                "license": by_id[cid][2],
            }
        )
    write_csv(
        out / "training" / "contributors.csv",
        ["path", "contributor_id", "contributor_name", "caption", "license"],
        rows,
    )
    (out / "training" / "palettes.json").write_text(json.dumps(pal, indent=2) + "\n")

    # Held-out digits get the palettes round-robin within each digit, so every
    # (digit, palette) cell is represented for zero-shot evaluation.
    held_rows = []
    (out / "heldout").mkdir(parents=True, exist_ok=True)
    held_sorted = sorted(held_idx, key=lambda i: (digits.target[i], i))
    for k, i in enumerate(held_sorted):
        cid = CONTRIBUTORS[k % len(CONTRIBUTORS)][0]
        p, d = pal[cid], int(digits.target[i])
        rel = f"{i:04d}.png"
        Image.fromarray(render(alphas[i], p["ink_rgb"], p["paper_rgb"])).save(out / "heldout" / rel)
        held_rows.append(
            {"path": rel, "digit": d, "palette_id": cid, "caption": caption(p["ink_word"], d, p["paper_word"])}
        )
    write_csv(out / "heldout" / "heldout.csv", ["path", "digit", "palette_id", "caption"], held_rows)

    per_contributor = {c[0]: sum(r["contributor_id"] == c[0] for r in rows) for c in CONTRIBUTORS}
    return {"training_images": len(rows), "heldout_images": len(held_rows), "per_contributor": per_contributor}


# --------------------------------------------------------------------------- stage: tokenizer


def traced_bpe(word: str, ranks: dict) -> list[tuple[str, str]]:
    """The merges CLIP's BPE applies to one (byte-encoded) word, in order."""
    symbols = tuple(word[:-1]) + (word[-1] + "</w>",)
    used = []
    while len(symbols) > 1:
        best = min(zip(symbols, symbols[1:]), key=lambda pair: ranks.get(pair, math.inf))
        if best not in ranks:
            break
        used.append(best)
        merged, i = [], 0
        while i < len(symbols):
            if i < len(symbols) - 1 and (symbols[i], symbols[i + 1]) == best:
                merged.append(symbols[i] + symbols[i + 1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = tuple(merged)
    return used


def world_words() -> set[str]:
    words = set(EXTRA_WORDS) | set(DIGIT_WORDS)
    for _, name, *_rest in CONTRIBUTORS:
        words |= set(re.findall(r"[a-z]+", name.lower()))
    for _, _, _, _, ink, paper in CONTRIBUTORS:
        words |= {ink[0], paper[0]}
    return words


def stage_tokenizer(out: Path) -> dict:
    """A CLIPTokenizer whose vocabulary is the part of open_clip's bundled BPE this world needs.

    Keeping only the merges that fire on the world's words (in their original
    order) tokenises those words exactly as full CLIP would, while the embedding
    table stays a few hundred rows. All 512 byte symbols stay in the vocabulary,
    so any unknown word still tokenises (into smaller pieces).
    """
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    clip_bpe = SimpleTokenizer()
    used = set()
    for word in world_words():
        encoded = "".join(clip_bpe.byte_encoder[b] for b in word.encode("utf-8"))
        used.update(traced_bpe(encoded, clip_bpe.bpe_ranks))
    merges = sorted(used, key=clip_bpe.bpe_ranks.get)
    bytes_ = list(clip_bpe.byte_encoder.values())
    tokens = bytes_ + [b + "</w>" for b in bytes_] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {t: i for i, t in enumerate(tokens)}

    tokenizer = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")
    folder = out / "model" / "tokenizer"
    tokenizer.save_pretrained(folder)
    # vocab.json / merges.txt as well, for tokenizer implementations that read those.
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))

    reloaded = CLIPTokenizer.from_pretrained(folder)
    example = caption("red", 7, "cream")
    pieces = reloaded.convert_ids_to_tokens(reloaded(example).input_ids)
    assert pieces[1:-1] == [w + "</w>" for w in example.split()], pieces
    return {
        "vocab_size": len(vocab),
        "merges": len(merges),
        "model_max_length": MAX_TOKENS,
        "example": " ".join(pieces),
    }


# --------------------------------------------------------------------------- stage: vae


def stage_vae(out: Path) -> dict:
    from diffusers import AutoencoderKL

    seed_everything(1)
    _, train_imgs = load_split(out, "training")
    _, held_imgs = load_split(out, "heldout")
    x, x_held = to_model_range(train_imgs), to_model_range(held_imgs)

    vae = AutoencoderKL(**VAE_CONFIG)
    cfg = VAE_TRAIN
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg["lr"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg["steps"], 50, 0.1))
    vae.train()
    for step in range(cfg["steps"]):
        batch = x[torch.randint(len(x), (cfg["batch"],))]
        dist = vae.encode(batch).latent_dist
        recon = vae.decode(dist.sample()).sample
        # KL per pixel value, so kl_weight reads relative to the per-pixel MSE.
        loss = F.mse_loss(recon, batch) + cfg["kl_weight"] * dist.kl().mean() / batch[0].numel()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if step % 100 == 0 or step == cfg["steps"] - 1:
            print(f"  vae step {step:4d} loss {loss.item():.5f}", flush=True)

    vae.eval()
    mean, _ = posterior(vae, x)
    scaling = 1.0 / mean.std().item()  # unit-variance latents for the diffusion model
    vae.register_to_config(scaling_factor=scaling)
    with torch.no_grad():
        held_mean, _ = posterior(vae, x_held)
        recon = vae.decode(held_mean).sample.clamp(-1, 1)
    mse = F.mse_loss(recon, x_held).item()
    vae.save_pretrained(out / "model" / "vae")
    return {
        "params": sum(p.numel() for p in vae.parameters()),
        "scaling_factor": scaling,
        "latent_mean": mean.mean().item(),
        "heldout_recon_mse": mse,
        "heldout_recon_psnr_db": 10 * math.log10(4.0 / mse),
        **cfg,
    }


# --------------------------------------------------------------------------- stage: diffusion


def stage_diffusion(out: Path) -> dict:
    """Train the text encoder and the UNet jointly, from scratch, on VAE latents, by the recipe auditor/retrain.py
    runs (which `audit eval --counterfactual` also retrains with)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTokenizer

    rows, train_imgs = load_split(out, "training")
    tokenizer = CLIPTokenizer.from_pretrained(out / "model" / "tokenizer")
    vae = AutoencoderKL.from_pretrained(out / "model" / "vae").eval()
    latent_mean, latent_std = posterior(vae, to_model_range(train_imgs))
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **TEXT_ENCODER_CONFIG,
    )
    recipe = Recipe(**DIFFUSION_TRAIN)
    started = time.time()

    def log(step: int, loss: float) -> None:
        if step % 100 == 0 or step == recipe.steps - 1:
            print(f"  diffusion step {step:5d} loss(avg100) {loss:.4f} {time.time() - started:6.0f}s", flush=True)

    ema_unet, ema_text_encoder, losses = train(
        UNET_CONFIG,
        text_config,
        DDPMScheduler(**SCHEDULE),
        latent_mean,
        latent_std,
        vae.config.scaling_factor,
        tokenize(tokenizer, [r["caption"] for r in rows]),
        tokenize(tokenizer, [""]),
        recipe,
        log=log,
    )

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=ema_text_encoder,
        tokenizer=tokenizer,
        unet=ema_unet,
        scheduler=DDIMScheduler(**SCHEDULE, **SAMPLER),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out / "model")

    facts = {
        "objective": "v_prediction",
        "loss": "mse(unet(z_t, t, text), v)",
        "noise_schedule": SCHEDULE["beta_schedule"],
        "num_train_timesteps": SCHEDULE["num_train_timesteps"],
        "timestep_sampling": "uniform",
        "optimizer": "AdamW",
        "lr_schedule": f"linear warmup {recipe.warmup_steps} steps, cosine to {recipe.min_lr_ratio} x lr",
        **recipe.as_facts(),
        "saved_weights": "ema",
        "flip_augmentation": False,
        "augmentation": "none",
        "latents": "vae posterior sample * vae.config.scaling_factor",
        "text_encoder": "trained jointly with the unet, from scratch",
        "training_set": "training/contributors.csv (caption column)",
        "resolution": SIZE,
        "final_loss_avg100": float(np.mean(losses[-100:])),
    }
    (out / "model" / "auditor_training.json").write_text(json.dumps(facts, indent=2) + "\n")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    return {
        "unet_params": count(ema_unet),
        "text_encoder_params": count(ema_text_encoder),
        "final_loss_avg100": facts["final_loss_avg100"],
        "seconds_per_step": (time.time() - started) / recipe.steps,
    }


# --------------------------------------------------------------------------- stage: encoder


def clip_caption(kind: str, palette: dict, digit: int) -> str:
    if kind == "full":
        return caption(palette["ink_word"], digit, palette["paper_word"])
    if kind == "digit":
        return digit_prompt(digit)
    return palette_prompt(palette)


def digit_prompt(digit: int) -> str:
    return f"a handwritten {DIGIT_WORDS[digit]}"


def palette_prompt(palette: dict) -> str:
    return f"a {palette['ink_word']} handwritten digit on {palette['paper_word']} paper"


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Translate each image by up to max_shift pixels, extending its border (no flips: digits)."""
    padded = F.pad(x, (max_shift,) * 4, mode="replicate")
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2))
    return torch.stack([p[:, i : i + SIZE, j : j + SIZE] for p, (i, j) in zip(padded, offsets.tolist())])


def encoder_inputs(images: np.ndarray, mean: list, std: list) -> torch.Tensor:
    """uint8 NHWC -> the backbone's normalised input (already 32x32: no resize needed)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().float() / 255.0
    mean, std = torch.tensor(mean, dtype=torch.float32), torch.tensor(std, dtype=torch.float32)
    return (x - mean[:, None, None]) / std[:, None, None]


def stage_encoder(out: Path) -> dict:
    """Contrastive training of a tiny open_clip CLIP on the training (image, caption) pairs."""
    import open_clip
    from safetensors.torch import save_file

    seed_everything(3)
    rows, images = load_split(out, "training")
    pal = palettes()
    pal_ids = list(pal)
    digit = torch.tensor([caption_digit(r["caption"]) for r in rows])
    owner = torch.tensor([pal_ids.index(r["contributor_id"]) for r in rows])

    pixels = images.reshape(-1, 3) / 255.0
    mean, std = [round(float(v), 4) for v in pixels.mean(0)], [round(float(v), 4) for v in pixels.std(0)]
    x = encoder_inputs(images, mean, std)

    # Every caption variant of every image, tokenised once with open_clip's own tokenizer.
    kinds = [k for k, _ in CLIP_CAPTION_VARIANTS]
    texts = [clip_caption(kind, pal[r["contributor_id"]], int(d)) for r, d in zip(rows, digit) for kind in kinds]
    tokens = open_clip.tokenizer.tokenize(texts).view(len(rows), len(kinds), -1)
    kind_p = torch.tensor([p for _, p in CLIP_CAPTION_VARIANTS])

    model = open_clip.model.CLIP(**CLIP_CONFIG, output_dict=True)
    cfg = CLIP_TRAIN
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_lr(s, cfg["steps"], cfg["warmup"], 0.0))
    model.train()
    for step in range(cfg["steps"]):
        idx = torch.randint(len(rows), (cfg["batch"],))
        kind = torch.multinomial(kind_p, len(idx), replacement=True)
        out_ = model(random_shift(x[idx], cfg["max_shift"]), tokens[idx, kind])
        logits = out_["logit_scale"] * out_["image_features"] @ out_["text_features"].T
        # Many images in a batch share a caption (80 palette x digit cells), and the
        # short variants match whole groups: every compatible pair is a positive.
        digit_ok = (kind[None, :] == 2) | (digit[idx][:, None] == digit[idx][None, :])
        pal_ok = (kind[None, :] == 1) | (owner[idx][:, None] == owner[idx][None, :])
        positives = (digit_ok & pal_ok).float()
        loss = 0.5 * (
            torch.sum(-positives / positives.sum(1, keepdim=True) * logits.log_softmax(1)) / len(idx)
            + torch.sum(-positives / positives.sum(0, keepdim=True) * logits.log_softmax(0)) / len(idx)
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 100 == 0 or step == cfg["steps"] - 1:
            print(f"  encoder step {step:5d} loss {loss.item():.4f}", flush=True)

    # Shipped in fp16 (the 49408-row token table dominates); the in-memory model is
    # rounded the same way so what gets measured is exactly what ships.
    state = {k: v.detach().half().contiguous() for k, v in model.state_dict().items()}
    model.load_state_dict(state)
    folder = out / "encoder"
    folder.mkdir(parents=True, exist_ok=True)
    save_file(state, folder / "backbone.safetensors")
    bundle = {
        "format": "auditor.encoder/1",
        "name": CLIP_NAME,
        "image_tower": {
            "library": "open_clip",
            "model_name": CLIP_NAME,
            "model_config": CLIP_CONFIG,
            "weights": "backbone.safetensors",
            "image_size": SIZE,
            "mean": mean,
            "std": std,
            "interpolation": "bicubic",
        },
        "text_tower": {
            "library": "open_clip",
            "model_name": CLIP_NAME,
            "model_config": CLIP_CONFIG,
            "weights": "backbone.safetensors",
            "context_length": CLIP_CONFIG["text_cfg"]["context_length"],
        },
        "head": None,
        "temperature": 0.05,
    }
    (folder / "encoder.json").write_text(json.dumps(bundle, indent=2) + "\n")

    # The bundle must rebuild to the very same embeddings.
    reloaded, _ = load_encoder(folder)
    model.eval()
    with torch.no_grad():
        probe_tokens = open_clip.tokenizer.tokenize(texts[:8])
        same = torch.equal(model.encode_image(x[:8]), reloaded.encode_image(x[:8])) and torch.equal(
            model.encode_text(probe_tokens), reloaded.encode_text(probe_tokens)
        )
    assert same, "encoder bundle does not round-trip"
    return {
        "params": sum(p.numel() for p in model.parameters()),
        "mean": mean,
        "std": std,
        "round_trip_identical": same,
        **cfg,
    }


def load_encoder(folder: Path):
    """Rebuild the backbone exactly as the auditor's loader does: CLIP(**model_config) + state dict."""
    import open_clip
    from safetensors.torch import load_file

    bundle = json.loads((folder / "encoder.json").read_text())
    tower = bundle["image_tower"]
    model = open_clip.model.CLIP(**tower["model_config"])
    model.load_state_dict(load_file(folder / tower["weights"]))
    return model.eval(), bundle


# --------------------------------------------------------------------------- measurements


def ink_map(images: np.ndarray) -> np.ndarray:
    """Palette-free ink intensity: colour distance from the paper (the median border colour)."""
    x = images.astype(np.float32)
    border = np.concatenate([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], axis=1)
    paper = np.median(border, axis=1)
    dist = np.linalg.norm(x - paper[:, None, None], axis=-1)
    return dist / np.maximum(dist.max(axis=(1, 2), keepdims=True), 1e-6)


def digit_features(images: np.ndarray) -> np.ndarray:
    """Back to the scans' own 8x8 grid and 0..16 range."""
    ink = ink_map(images)
    return 16 * ink.reshape(len(ink), 8, SIZE // 8, 8, SIZE // 8).mean(axis=(2, 4)).reshape(len(ink), 64)


def fit_palette(image: np.ndarray, pal: dict) -> tuple[str, str]:
    """Which contributor's paper, then which contributor's ink, explain the image best.

    Paper: the palette paper colour nearest the median border colour. Ink: the
    palette ink whose ink-over-paper mixing line leaves the smallest residual.
    """
    x = image.reshape(-1, 3).astype(np.float32)
    border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]]).astype(np.float32)
    papers = {cid: np.array(p["paper_rgb"], np.float32) for cid, p in pal.items()}
    paper_id = min(papers, key=lambda c: np.linalg.norm(papers[c] - np.median(border, axis=0)))
    paper = papers[paper_id]

    def residual(cid: str) -> float:
        line = np.array(pal[cid]["ink_rgb"], np.float32) - paper
        if line @ line < 1e-6 * 255**2:  # ink the colour of this paper cannot be told apart
            return math.inf
        a = np.clip((x - paper) @ line / (line @ line), 0, 1)
        return float(np.mean(np.sum((x - paper - a[:, None] * line) ** 2, axis=1)))

    return min(pal, key=residual), paper_id


# --------------------------------------------------------------------------- stage: outputs


def output_jobs() -> list[dict]:
    """Every palette x digit with OUTPUT_SEEDS_PER_PROMPT seeds, then prompts mixing two palettes."""
    pal = palettes()
    jobs = []
    for cid, p in pal.items():
        for d in range(10):
            for _ in range(OUTPUT_SEEDS_PER_PROMPT):
                jobs.append(
                    {
                        "prompt": caption(p["ink_word"], d, p["paper_word"]),
                        "digit": d,
                        "ink_contributor": cid,
                        "paper_contributor": cid,
                    }
                )
    rng = random.Random(SEED)
    pairs = [
        (a, b)
        for a in pal
        for b in pal
        if a != b and np.abs(np.subtract(pal[a]["ink_rgb"], pal[b]["paper_rgb"])).sum() > 200
    ]  # legible
    for a, b in rng.sample(pairs, MIXED_PROMPTS):
        d = rng.randrange(10)
        for _ in range(OUTPUT_SEEDS_PER_PROMPT):
            jobs.append(
                {
                    "prompt": caption(pal[a]["ink_word"], d, pal[b]["paper_word"]),
                    "digit": d,
                    "ink_contributor": a,
                    "paper_contributor": b,
                }
            )
    for k, job in enumerate(jobs):
        job["seed"] = 1000 + k
        job["file"] = f"gen_{k:03d}.png"
    return jobs


def a1111_parameters(prompt: str, seed: int) -> str:
    return (
        f"{prompt}\nNegative prompt: \nSteps: {SAMPLING['steps']}, Sampler: {SAMPLING['sampler']}, "
        f"CFG scale: {SAMPLING['guidance']:g}, Seed: {seed}, Size: {SIZE}x{SIZE}, Model: digits-world"
    )


def load_pipeline(out: Path):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(out / "model")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def stage_outputs(out: Path, batch: int = 40) -> dict:
    pipe = load_pipeline(out)
    jobs = output_jobs()
    sidecar = set(random.Random(SEED + 5).sample(range(len(jobs)), round(SIDECAR_FRACTION * len(jobs))))
    folder = out / "outputs"
    folder.mkdir(parents=True, exist_ok=True)
    for stale in folder.glob("gen_*"):  # a stale sidecar would attach a wrong prompt
        stale.unlink()
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        images = pipe(
            [j["prompt"] for j in chunk],
            num_inference_steps=SAMPLING["steps"],
            guidance_scale=SAMPLING["guidance"],
            generator=[torch.Generator().manual_seed(j["seed"]) for j in chunk],
        ).images
        for k, (job, image) in enumerate(zip(chunk, images), start):
            path = folder / job["file"]
            if k in sidecar:  # the prompt travels beside the image, not inside it
                image.save(path)
                path.with_suffix(".txt").write_text(job["prompt"] + "\n")
                job["prompt_source"] = "sidecar"
            else:
                info = PngInfo()
                info.add_text("parameters", a1111_parameters(job["prompt"], job["seed"]))
                image.save(path, pnginfo=info)
                job["prompt_source"] = "png-parameters"
        print(f"  generated {min(start + batch, len(jobs))}/{len(jobs)}", flush=True)

    rows = [
        {**j, "contributor_ids": ";".join(dict.fromkeys([j["ink_contributor"], j["paper_contributor"]]))} for j in jobs
    ]
    write_csv(
        folder / "manifest.csv",
        ["file", "prompt", "digit", "contributor_ids", "ink_contributor", "paper_contributor", "seed", "prompt_source"],
        rows,
    )
    return {
        "images": len(jobs),
        "mixed_palette_images": sum(j["ink_contributor"] != j["paper_contributor"] for j in jobs),
        "sidecar_prompts": len(sidecar),
        **SAMPLING,
    }


# --------------------------------------------------------------------------- stage: gates


def zero_shot(model, images: np.ndarray, prompts: list[str], bundle: dict) -> np.ndarray:
    """Index of the best-matching prompt for each image."""
    import open_clip

    tower = bundle["image_tower"]
    with torch.no_grad():
        img = model.encode_image(encoder_inputs(images, tower["mean"], tower["std"]), normalize=True)
        txt = model.encode_text(
            open_clip.tokenizer.tokenize(prompts, context_length=bundle["text_tower"]["context_length"]), normalize=True
        )
    return (img @ txt.T).argmax(1).numpy()


def stage_gates(out: Path) -> dict:
    from sklearn.linear_model import LogisticRegression

    pal = palettes()
    train_rows, train_imgs = load_split(out, "training")
    held_rows, held_imgs = load_split(out, "heldout")
    gen_rows = read_csv(out / "outputs" / "manifest.csv")
    gen_imgs = load_pngs([out / "outputs" / r["file"] for r in gen_rows])
    single = np.array([r["ink_contributor"] == r["paper_contributor"] for r in gen_rows])
    gen_digit = np.array([int(r["digit"]) for r in gen_rows])
    held_digit = np.array([int(r["digit"]) for r in held_rows])

    # (a) digit recognisability, by a classifier that only ever saw real digits
    clf = LogisticRegression(max_iter=5000, C=0.1)
    clf.fit(digit_features(train_imgs), [caption_digit(r["caption"]) for r in train_rows])
    gen_pred = clf.predict(digit_features(gen_imgs))
    digit_acc = float(np.mean(gen_pred[single] == gen_digit[single]))
    digit_acc_mixed = float(np.mean(gen_pred[~single] == gen_digit[~single]))
    classifier_real = float(np.mean(clf.predict(digit_features(held_imgs)) == held_digit))

    # (b) palette fidelity
    fits = [fit_palette(im, pal) for im in gen_imgs]
    palette_ok = np.array([f == (r["ink_contributor"], r["paper_contributor"]) for f, r in zip(fits, gen_rows)])
    follows_ink = np.array([f == (r["ink_contributor"],) * 2 for f, r in zip(fits, gen_rows)])
    palette_real = float(
        np.mean([fit_palette(im, pal) == (r["palette_id"],) * 2 for im, r in zip(held_imgs, held_rows)])
    )

    # (c) zero-shot accuracy of the shipped encoder bundle on held-out real digits
    model, bundle = load_encoder(out / "encoder")
    pal_ids = list(pal)
    zs_digit = float(np.mean(zero_shot(model, held_imgs, [digit_prompt(d) for d in range(10)], bundle) == held_digit))
    held_pal = np.array([pal_ids.index(r["palette_id"]) for r in held_rows])
    zs_palette = float(
        np.mean(zero_shot(model, held_imgs, [palette_prompt(pal[c]) for c in pal_ids], bundle) == held_pal)
    )
    zs_digit_gen = float(np.mean(zero_shot(model, gen_imgs, [digit_prompt(d) for d in range(10)], bundle) == gen_digit))

    write_contact_sheet(out, train_rows, train_imgs, gen_rows, gen_imgs)
    gates = {
        "digit_accuracy_single_palette": digit_acc,
        "digit_accuracy_mixed_palette": digit_acc_mixed,
        "digit_classifier_accuracy_on_real_heldout": classifier_real,
        "palette_match_single_palette": float(palette_ok[single].mean()),
        "palette_match_mixed_palette": float(palette_ok[~single].mean()),
        "mixed_palette_drawn_in_ink_contributors_palette": float(follows_ink[~single].mean()),
        "palette_fit_accuracy_on_real_heldout": palette_real,
        "zero_shot_digit_heldout": zs_digit,
        "zero_shot_palette_heldout": zs_palette,
        "zero_shot_digit_generated": zs_digit_gen,
        "n_generated_single": int(single.sum()),
        "n_generated_mixed": int((~single).sum()),
        "n_heldout": len(held_rows),
    }
    gates["pass_digit"] = digit_acc >= GATE_DIGIT
    gates["pass_palette"] = gates["palette_match_single_palette"] >= GATE_PALETTE
    return gates


def write_contact_sheet(out: Path, train_rows, train_imgs, gen_rows, gen_imgs, zoom: int = 2) -> None:
    """Per contributor: one real training image per digit, then one generated image per digit."""
    cell, label_w, gap, header = SIZE * zoom + 2, 190, 16, 18
    sheet = Image.new("RGB", (label_w + 20 * cell + gap, header + len(CONTRIBUTORS) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    font = ImageFont.load_default()
    draw.text((label_w, 3), "real training images 0-9", fill="black", font=font)
    draw.text((label_w + 10 * cell + gap, 3), "generated (prompted palette, digits 0-9)", fill="black", font=font)
    pal = palettes()
    for row, cid in enumerate(pal):
        y = header + row * cell
        draw.text(
            (4, y + cell // 2 - 6), f"{cid} {pal[cid]['ink_word']} on {pal[cid]['paper_word']}", fill="black", font=font
        )
        for d in range(10):
            real = next(
                (
                    i
                    for i, r in enumerate(train_rows)
                    if r["contributor_id"] == cid and caption_digit(r["caption"]) == d
                ),
                None,
            )
            gen = next(
                i
                for i, r in enumerate(gen_rows)
                if r["ink_contributor"] == r["paper_contributor"] == cid and int(r["digit"]) == d
            )
            for image, x in (
                (None if real is None else train_imgs[real], label_w + d * cell),
                (gen_imgs[gen], label_w + 10 * cell + gap + d * cell),
            ):
                if image is not None:
                    sheet.paste(Image.fromarray(image).resize((SIZE * zoom,) * 2, Image.NEAREST), (x + 1, y + 1))
    sheet.save(out / "contact_sheet.png")


# --------------------------------------------------------------------------- WORLD.md


def folder_bytes(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def write_world_md(out: Path) -> None:
    stats = load_stats(out)
    data, tok, vae, diff, enc, outs, gates = (
        stats.get(k, {}) for k in ("data", "tokenizer", "vae", "diffusion", "encoder", "outputs", "gates")
    )
    times = stats.get("times", {})
    pal = palettes()
    vision, text = CLIP_CONFIG["vision_cfg"], CLIP_CONFIG["text_cfg"]
    lines = [
        "# The digits example world",
        "",
        "A tiny, fully synthetic text-to-image world for exercising the auditor end to end on a CPU.",
        "Everything here is regenerated by one command (fixed seeds, nothing downloaded):",
        "",
        "```bash",
        "HF_HUB_OFFLINE=1 python examples/digits_world/build.py            # all stages",
        "HF_HUB_OFFLINE=1 python examples/digits_world/build.py --stage gates   # one stage, from artifacts on disk",
        "```",
        "",
        f"Stages, in order: {', '.join(STAGES)}. This file is rewritten after every run from `build_stats.json`.",
        "",
        "## Contributors",
        "",
        "scikit-learn's bundled `load_digits()` scans (1,797 real 8x8 digits), bicubic-upsampled to 32x32,",
        "ink mixed over paper by intensity. A stratified 10 % is held out (`heldout/`, not training data).",
        "",
        "| id | name | licence | palette | training images |",
        "|---|---|---|---|---|",
    ]
    for cid, name, licence, *_ in CONTRIBUTORS:
        n = data.get("per_contributor", {}).get(cid, "?")
        lines.append(f"| {cid} | {name} | {licence} | {pal[cid]['ink_word']} on {pal[cid]['paper_word']} | {n} |")
    lines += [
        "",
        'Captions read `a <ink> handwritten <digit word> on <paper> paper` ("a orange" too: the shipped models were',
        "trained on that exact template); the caption is the only digit",
        "label on disk (`heldout/heldout.csv` also has a `digit` column).",
        "",
        "## Layout",
        "",
        "- `training/contributors.csv` (`path,contributor_id,contributor_name,caption,license`), "
        "`training/<contributor_id>/<scan index>.png`, `training/palettes.json`",
        "- `heldout/heldout.csv` (`path,digit,palette_id,caption`), `heldout/<scan index>.png`",
        "- `model/`: diffusers `StableDiffusionPipeline` (no safety checker / feature extractor); "
        "`model/auditor_training.json` holds the training facts the teacher needs",
        "- `encoder/`: `encoder.json` + `backbone.safetensors`, an `auditor.encoder/1` bundle (open_clip)",
        "- `outputs/`: generated PNGs, prompts in an AUTOMATIC1111 `parameters` chunk or a sidecar `.txt`; "
        "`outputs/manifest.csv` (prompted digit, contributors, seed) is ground truth for evaluation only",
        "- `contact_sheet.png`, `build_stats.json`, this file",
        "",
        "## Models",
        "",
        f"- **Tokenizer** (`model/tokenizer`): `CLIPTokenizer` over the subset of open_clip's bundled BPE that "
        f"the world's words use ({tok.get('vocab_size', '?')} tokens, {tok.get('merges', '?')} merges, all 512 "
        f"byte symbols kept so unknown words still tokenise); pad = `<|endoftext|>`, model_max_length "
        f"{MAX_TOKENS} (= text encoder `max_position_embeddings`). Example: `{tok.get('example', '')}`.",
        f"- **VAE**: `AutoencoderKL`, 32x32x3 -> 8x8x4, {vae.get('params', 0):,} params, "
        f"`scaling_factor` = {vae.get('scaling_factor', float('nan')):.4f} (1 / std of the training latents), "
        f"held-out reconstruction PSNR {vae.get('heldout_recon_psnr_db', float('nan')):.1f} dB.",
        f"- **Text encoder**: `CLIPTextModel`, {TEXT_ENCODER_CONFIG['num_hidden_layers']} layers, width "
        f"{TEXT_ENCODER_CONFIG['hidden_size']}, {diff.get('text_encoder_params', 0):,} params, trained jointly with "
        "the UNet from scratch.",
        f"- **UNet**: `UNet2DConditionModel`, sample_size 8, channels {UNET_CONFIG['block_out_channels']}, "
        f"cross-attention (`attn2.to_k` / `attn2.to_v`) at both levels and the mid block, "
        f"{diff.get('unet_params', 0):,} params.",
        f"- **Training**: v-prediction, `{SCHEDULE['beta_schedule']}` schedule, {DIFFUSION_TRAIN['steps']} steps x "
        f"batch {DIFFUSION_TRAIN['batch_size']}, AdamW {DIFFUSION_TRAIN['lr']}, EMA {DIFFUSION_TRAIN['ema_decay']} "
        f"(EMA weights shipped), {DIFFUSION_TRAIN['caption_dropout']:.0%} caption dropout (empty caption), "
        f"{DIFFUSION_TRAIN['autocast']} autocast, **no horizontal flip augmentation** (`flip_augmentation: false`). "
        "The loop is `auditor.retrain.train`, the one `audit eval --counterfactual` retrains with, and the recipe is in "
        "`model/auditor_training.json` (the shipped weights predate the move of the loop into the package, with the same "
        "recipe and seed).",
        "- **Scheduler** saved: `DDIMScheduler` with the training betas and `prediction_type: v_prediction`, "
        "`timestep_spacing: trailing`. "
        f"Outputs: {SAMPLING['steps']} DDIM steps, guidance {SAMPLING['guidance']:g}.",
        f"- **Encoder backbone** `{CLIP_NAME}`: open_clip CLIP (ViT width {vision['width']}, {vision['layers']} "
        f"layers, patch {vision['patch_size']}; text width {text['width']}, {text['layers']} layers, context "
        f"{text['context_length']}; embed {CLIP_CONFIG['embed_dim']}), {enc.get('params', 0):,} params, contrastive training "
        f"{CLIP_TRAIN['steps']} steps x batch {CLIP_TRAIN['batch']}, lr {CLIP_TRAIN['lr']}, on full captions and "
        "the short zero-shot templates (`a handwritten seven`, `a red handwritten digit on cream paper`). "
        "Weights stored fp16; loading into the fp32 model reproduces the measured embeddings exactly.",
        "",
        "## Quality gates",
        "",
    ]
    if gates:
        mark = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
        lines += [
            "| gate | measured | bar |",
            "|---|---|---|",
            f"| (a) prompted digit recognised, single-palette outputs (n={gates['n_generated_single']}) | "
            f"{gates['digit_accuracy_single_palette']:.3f} | >= {GATE_DIGIT} {mark(gates['pass_digit'])} |",
            f"| (b) ink and paper match the prompted palette, single-palette outputs | "
            f"{gates['palette_match_single_palette']:.3f} | >= {GATE_PALETTE} {mark(gates['pass_palette'])} |",
            f"| (c) zero-shot digit accuracy, held-out real (10-way, n={gates['n_heldout']}) | "
            f"{gates['zero_shot_digit_heldout']:.3f} | chance 0.10 |",
            f"| (c) zero-shot palette accuracy, held-out real (8-way) | "
            f"{gates['zero_shot_palette_heldout']:.3f} | chance 0.125 |",
            "",
            "Context: digit classifier (logistic regression on palette-free 8x8 ink maps of real training "
            f"images) on held-out real digits {gates['digit_classifier_accuracy_on_real_heldout']:.3f}; "
            f"palette fit on held-out real digits {gates['palette_fit_accuracy_on_real_heldout']:.3f}. "
            f"Mixed-palette prompts (n={gates['n_generated_mixed']}): digit {gates['digit_accuracy_mixed_palette']:.3f}, "
            f"both colours {gates['palette_match_mixed_palette']:.3f}; drawn entirely in the palette of the "
            f"contributor whose ink was named {gates['mixed_palette_drawn_in_ink_contributors_palette']:.3f} "
            "(every training caption pairs an ink with one paper, so the model never learned to recombine them: "
            "for attribution, such an output owes its palette to the ink-word contributor alone). "
            f"Zero-shot digit accuracy on all generated outputs: {gates['zero_shot_digit_generated']:.3f}.",
            "",
            "![contact sheet](contact_sheet.png)",
        ]
    else:
        lines.append("Not measured yet (run the `gates` stage).")
    threads = stats.get("threads", {})
    lines += [
        "",
        "## Build",
        "",
        "Wall time per stage on a 2-core machine shared with other work (so upper bounds):",
        "",
        "| stage | seconds | torch threads |",
        "|---|---|---|",
    ]
    lines += [f"| {s} | {times[s]:.0f} | {threads.get(s, '?')} |" for s in STAGES if s in times]
    if times:
        lines.append(f"| total | {sum(times.values()):.0f} | |")
    lines += ["", "Artifact sizes (apparent bytes):", "", "| path | MB |", "|---|---|"]
    parts = ["training", "heldout", "model", "encoder", "outputs", "contact_sheet.png"]
    sizes = {p: folder_bytes(out / p) / 1e6 for p in parts if (out / p).exists()}
    lines += [f"| {p} | {mb:.1f} |" for p, mb in sizes.items()]
    lines += [f"| total | {sum(sizes.values()):.1f} |", ""]
    (out / "WORLD.md").write_text("\n".join(lines))


# --------------------------------------------------------------------------- driver

STAGE_FUNCTIONS = {
    "data": stage_data,
    "tokenizer": stage_tokenizer,
    "vae": stage_vae,
    "diffusion": stage_diffusion,
    "encoder": stage_encoder,
    "outputs": stage_outputs,
    "gates": stage_gates,
}
STAGES = list(STAGE_FUNCTIONS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--stage", action="append", choices=STAGES, help="stage to run (repeatable); default: all, in order"
    )
    parser.add_argument("--out", type=Path, default=WORLD_DIR, help="world directory (default: next to this script)")
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="torch threads; use 1 when another job holds a core (2 oversubscribed is ~10x slower)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stage in [s for s in STAGES if s in (args.stage or STAGES)]:
        print(f"== {stage}", flush=True)
        started = time.time()
        result = STAGE_FUNCTIONS[stage](out)
        seconds = time.time() - started
        update_stats(out, stage, result)
        update_stats(out, "times", {stage: seconds})
        update_stats(out, "threads", {stage: args.threads})
        print(f"== {stage} done in {seconds:.1f}s: {json.dumps(result, default=str)[:400]}", flush=True)
    write_world_md(out)


if __name__ == "__main__":
    main()
