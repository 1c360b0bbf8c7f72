"""`audit index` throughput from WebDataset shards vs the bare encoder forward (issue #28).

    python bench/bench_index_shards.py [--n 10000] [--per-shard 1000] [--device cpu|cuda] [--batch-size 64]
                                       [--image-size 256] [--arch ViT-B-32|tiny]

Shards: n synthetic digit images (tests/small_world.py palettes, scikit-learn's digits, seeded noise so every image
is distinct content), `--image-size` pixels square, JPEG quality 90, written as img2dataset writes them: KEY.jpg,
KEY.txt (caption), KEY.json (contributor), `--per-shard` samples per tar. Encoder: a random-weight full-size open_clip
ViT-B/32 built from open_clip's bundled config (bench_scan.build_vit_b32; no download), or `--arch tiny` (the test
encoder). Index: `index_training` on a fresh workspace over the brace pattern (read the tars, sha256, decode,
preprocess, embed image and caption, write LanceDB and DuckDB, record each shard). Bare: `Encoder.index_features` on
pre-decoded, pre-processed tensors of up to `--bare-images` of the same images, same batch size and device, timed
before and twice after the index; bare = the median of the three. The figure is index images/s ÷ bare images/s
(target >= 0.9 at 10^4 on a CPU).
"""

from __future__ import annotations

import argparse
import io
import json
import tarfile
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path, HF offline)
from _common import report
from bench_scan import build_vit_b32


def build_shards(out: Path, n: int, per_shard: int, size: int, seed: int = 0) -> str:
    """n distinct JPEG samples in tars of `per_shard`; returns the brace pattern naming them."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    from tests import small_world

    digits = load_digits()
    rng = np.random.default_rng(seed)
    names = list(small_world.PALETTES)
    out.mkdir(parents=True, exist_ok=True)
    shards = (n + per_shard - 1) // per_shard
    for s in range(shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i in range(s * per_shard, min(n, (s + 1) * per_shard)):
                j = int(rng.integers(len(digits.images)))
                who = names[i % len(names)]
                ink, paper, _, _ = small_world.PALETTES[who]
                image = small_world.digit_image(digits.images[j], ink, paper, size)
                noisy = np.clip(np.asarray(image, np.int16) + rng.integers(-3, 4, (size, size, 3)), 0, 255)
                buffer = io.BytesIO()
                Image.fromarray(noisy.astype(np.uint8), "RGB").save(buffer, "JPEG", quality=90)
                key = f"{i:09d}"
                small_world.add_member(tar, f"{key}.jpg", buffer.getvalue())
                small_world.add_member(tar, f"{key}.txt", small_world.caption(int(digits.target[j]), who).encode())
                small_world.add_member(tar, f"{key}.json", json.dumps({"key": key, "contributor_id": who}).encode())
    return str(out / f"{{00000..{shards - 1:05d}}}.tar")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000, help="images indexed (default 10^4)")
    parser.add_argument("--per-shard", type=int, default=1000)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=256, help="square JPEGs of this many pixels")
    parser.add_argument("--arch", choices=["ViT-B-32", "tiny"], default="ViT-B-32")
    parser.add_argument("--bare-images", type=int, default=2048, help="images timed in the bare forward")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()

    import numpy as np
    import torch

    from auditor import embed, ingest, sources, workspace
    from auditor.index import index_training
    from tests import small_world

    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_index_shards_"))
    work.mkdir(parents=True, exist_ok=True)
    if args.arch == "ViT-B-32":
        encoder_dir = build_vit_b32(work / "vit-b-32")
    else:
        encoder_dir = small_world.build_encoder(work / "tiny-encoder")
    t0 = time.perf_counter()
    pattern = build_shards(work / f"shards_{args.n}_{args.image_size}", args.n, args.per_shard, args.image_size)
    print(f"{args.n} samples in shards built in {time.perf_counter() - t0:.0f} s")

    encoder = embed.load(encoder_dir, args.device)
    limits = ingest.Limits()
    bare_samples = []
    storage = sources.Storage()  # local shards: nothing to configure
    for unit in sources.ContainerSource(sources.list_shards(pattern, storage), sources.Fields(), limits, storage).units(
        set()
    ):
        for entry in unit:
            item = ingest.load_item(entry.path, limits, encoder.preprocess, read=lambda p, lim, e=entry: e.data)
            bare_samples.append(item)
            if len(bare_samples) >= min(args.n, args.bare_images):
                break
        if len(bare_samples) >= min(args.n, args.bare_images):
            break
    pixels = np.stack([item.pixels for item in bare_samples])
    texts = [item.text for item in bare_samples]
    shas = [item.sha256 for item in bare_samples]
    bs = args.batch_size

    def bare_forward() -> float:
        encoder.index_features(pixels[:bs], texts[:bs], shas[:bs])  # warm-up
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(0, len(pixels), bs):
            encoder.index_features(pixels[i : i + bs], texts[i : i + bs], shas[i : i + bs])
        if encoder.device.type == "cuda":
            torch.cuda.synchronize()
        return len(pixels) / (time.perf_counter() - t0)

    bare_runs = [bare_forward()]
    ws = workspace.init(work / f"ws_{time.time_ns()}", encoder=encoder_dir)
    started = time.perf_counter()
    result = index_training(ws, pattern, device=args.device, batch_size=bs)
    wall = time.perf_counter() - started
    bare_runs += [bare_forward(), bare_forward()]
    bare = sorted(bare_runs)[1]
    index_rate = result.added / wall
    run = {
        "images": args.n,
        "added": result.added,
        "errors": result.errors,
        "shards": (args.n + args.per_shard - 1) // args.per_shard,
        "index_wall_seconds": wall,
        "index_images_per_s": index_rate,
        "bare_images_per_s": bare,
        "bare_runs": bare_runs,
        "bare_images": len(pixels),
        "ratio": index_rate / bare,
        "device": str(encoder.device),
        "encoder": encoder.name,
        "image_size": args.image_size,
        "batch_size": bs,
    }
    name = f"bench_index_shards_{args.arch}_{args.device}_{args.n}"
    report(
        name,
        "audit index from WebDataset shards vs bare encoder forward",
        ["images", "shards", "index img/s", "bare img/s", "index / bare"],
        [[args.n, run["shards"], index_rate, bare, run["ratio"]]],
        {"run": run},
    )


if __name__ == "__main__":
    main()
