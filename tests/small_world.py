"""A small world the tests build in seconds: coloured real digits, contributors, generated-looking outputs, a random tiny encoder."""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from sklearn.datasets import load_digits

from auditor import embed

PALETTES = {
    "ana": ((200, 30, 30), (250, 240, 215), "red", "cream"),
    "ben": ((20, 40, 200), (255, 255, 255), "blue", "white"),
    "chloe": ((40, 170, 60), (10, 10, 10), "green", "black"),
    "dmitri": ((250, 250, 250), (20, 30, 90), "white", "navy"),
}
WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
}


def digit_image(pixels8: np.ndarray, ink, paper, size: int = 32) -> Image.Image:
    grey = Image.fromarray((pixels8 / 16.0 * 255).astype(np.uint8), "L").resize((size, size), Image.BICUBIC)
    alpha = np.asarray(grey, np.float32)[..., None] / 255.0
    rgb = alpha * np.asarray(ink, np.float32) + (1 - alpha) * np.asarray(paper, np.float32)
    return Image.fromarray(rgb.round().astype(np.uint8), "RGB")


def caption(digit: int, contributor: str) -> str:
    _, _, ink, paper = PALETTES[contributor]
    return f"a {ink} handwritten {WORDS[digit]} on {paper} paper"


def build_training(root: Path, per_contributor: int = 30, seed: int = 0) -> Path:
    digits = load_digits()
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(digits.images))
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for c, name in enumerate(PALETTES):
        ink, paper, _, _ = PALETTES[name]
        (root / name).mkdir(exist_ok=True)
        for j in order[c * per_contributor : (c + 1) * per_contributor]:
            rel = f"{name}/{j:04d}.png"
            digit_image(digits.images[j], ink, paper).save(root / rel)
            rows.append(
                {
                    "path": rel,
                    "contributor_id": name,
                    "contributor_name": name.title() + " Studio",
                    "caption": caption(int(digits.target[j]), name),
                    "license": "CC-BY-4.0",
                }
            )
    with open(root / "contributors.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return root


def training_rows(training: Path) -> list[dict]:
    """The manifest rows of a training folder built by build_training, in order."""
    with open(training / "contributors.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def write_shards(
    training: Path, out: Path, per_shard: int = 30, contributor_field: str = "contributor_id"
) -> list[Path]:
    """The training folder's images as img2dataset writes WebDataset shards: out/00000.tar, ... in manifest order,
    each sample KEY.png + KEY.txt (caption) + KEY.json (the rest; the contributor under `contributor_field`)."""
    rows = training_rows(training)
    out.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, len(rows), per_shard):
        shard = out / f"{s // per_shard:05d}.tar"
        with tarfile.open(shard, "w") as tar:
            for n, row in enumerate(rows[s : s + per_shard]):
                key = f"{s // per_shard:05d}{n:04d}"
                meta = {
                    "key": key,
                    contributor_field: row["contributor_id"],
                    "license": row["license"],
                    "status": "success",
                }
                add_member(tar, f"{key}.png", (training / row["path"]).read_bytes())
                add_member(tar, f"{key}.txt", row["caption"].encode())
                add_member(tar, f"{key}.json", json.dumps(meta).encode())
        shards.append(shard)
    return shards


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_parquet(training: Path, target: Path, images: str = "bytes") -> Path:
    """The training folder's manifest as a Parquet table: image (its bytes, or its path relative to `target`),
    caption, contributor_id, license, in manifest order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = training_rows(training)
    if images == "bytes":
        image = pa.array([(training / r["path"]).read_bytes() for r in rows], pa.binary())
    else:
        image = pa.array([os.path.relpath(training / r["path"], target.parent) for r in rows])
    table = pa.table(
        {
            "image": image,
            "caption": [r["caption"] for r in rows],
            "contributor_id": [r["contributor_id"] for r in rows],
            "license": [r["license"] for r in rows],
        }
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, target, row_group_size=50)
    return target


def a1111(prompt: str, seed: int) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text(
        "parameters",
        f"{prompt}\nNegative prompt: blurry\nSteps: 20, Sampler: DDIM, CFG scale: 4, Seed: {seed}, Size: 32x32",
    )
    return info


def build_outputs(root: Path, n: int = 24, seed: int = 1) -> Path:
    """Stand-ins for generated images: held-out real digits with prompts in every supported place."""
    digits = load_digits()
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    (root / "nested").mkdir(exist_ok=True)
    names = list(PALETTES)
    for i in range(n):
        j = int(rng.integers(len(digits.images)))
        who = names[i % len(names)]
        ink, paper, _, _ = PALETTES[who]
        image = digit_image(digits.images[j], ink, paper)
        prompt = caption(int(digits.target[j]), who)
        folder = root / "nested" if i % 3 == 0 else root
        if i % 4 == 0:
            image.save(folder / f"gen_{i:03d}.png")
            (folder / f"gen_{i:03d}.txt").write_text(prompt)
        elif i % 4 == 1:
            image.save(folder / f"gen_{i:03d}.png", pnginfo=_comfy(prompt))
        elif i % 4 == 2:
            image.save(folder / f"gen_{i:03d}.png", pnginfo=a1111(prompt, i))
        else:
            image.save(folder / f"gen_{i:03d}.jpg", quality=95)  # no prompt anywhere
    return root


def _comfy(prompt: str) -> PngImagePlugin.PngInfo:
    graph = {
        "3": {"class_type": "KSampler", "inputs": {"positive": ["6", 0], "negative": ["7", 0], "seed": 1}},
        "6": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["4", 1]}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "ugly", "clip": ["4", 1]}},
    }
    info = PngImagePlugin.PngInfo()
    info.add_text("prompt", json.dumps(graph))
    return info


def build_encoder(root: Path, seed: int = 0, model_config: dict = TINY_CLIP) -> Path:
    """A tiny open_clip bundle with random (seeded) weights: real code paths, no download."""
    import open_clip

    torch.manual_seed(seed)
    model = open_clip.model.CLIP(**model_config)
    config = embed.open_clip_bundle_config(
        "tiny-test-clip", model_config, image_size=32, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    embed.save(root, config, {"backbone.safetensors": model.state_dict()})
    return root
