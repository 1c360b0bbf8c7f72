"""The teachers on full-size Stable Diffusion 1.5-, 2.1- and XL-shaped models: seconds per phase and peak memory.

    python bench/full_size.py [--family sd15,sd21,sdxl] [--teacher abu,dtrak] [--device cpu|cuda]
                              [--train 64] [--models DIR] [--workdir DIR] [--full-counts]

Models: built once under --models (default bench/.models) from the published configs of each family (UNet, VAE,
text encoder(s), scheduler; SD 1.5: 860M-parameter UNet, CLIP ViT-L/14 text encoder, epsilon, 512 px; SD 2.1:
OpenCLIP ViT-H/14 text encoder, 1024-wide cross-attention, v-prediction, 768 px; SDXL: 2.6B-parameter UNet, CLIP
ViT-L/14 plus OpenCLIP ViT-bigG/14 text encoders, pooled text embeddings and time ids, 1024 px) with random weights,
stored as fp16 safetensors as released checkpoints are, with CLIP's real BPE vocabulary (open_clip ships it). Memory
and time do not depend on the weights' values.
Data: --train training photos (crops of scikit-learn's two bundled photographs, 512 px JPEG, one of four
contributors each) and two 512 px PNG "generations" with A1111 prompts; a full-size random-weight ViT-B/32 bundle
as the fast encoder.
Each (family, teacher) runs in its own process: `audit init`, `index`, `scan`, then `audit confirm --top 1` with
the teacher's counts reduced (draws, timesteps, candidates, controls, Fisher and reference samples; --full-counts
keeps the defaults) but batch sizes, resolution, precision and flips at their defaults. Measured: the model load
and cost probe (until the estimate is announced), the once-per-model phase (AbU's Fisher and reference update,
D-TRAK's training features), the generation's own seconds (`confirmations.seconds`), the printed estimate of the
same phases, and peak memory (ru_maxrss; on CUDA also torch.cuda.max_memory_allocated). A teacher that is refused
(e.g. not enough memory) is recorded with its one-line reason.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path, HF offline, thread tuning)
from _common import ROOT, report

FAMILIES = ("sd15", "sd21", "sdxl")
TEACHERS = ("abu", "dtrak")
RESOLUTION = {"sd15": 512, "sd21": 768, "sdxl": 1024}
# Counts reduced so a CPU finishes; every size that decides memory (batch, resolution, precision) stays default.
REDUCED = {
    "abu": {"draws": 4, "timesteps": 2, "candidates": 6, "controls": 2, "fisher_samples": 4, "reference_samples": 2},
    "dtrak": {"timesteps": 1, "candidates": 6, "controls": 2},
}
CONTRIBUTORS = ("ana", "ben", "chidi", "dana")


# ----------------------------------------------------------------------------------------------- models from configs


def _tokenizer(folder: Path, pad_token: str = "<|endoftext|>") -> None:
    """CLIP's BPE tokenizer files (vocab.json, merges.txt) from the vocabulary open_clip ships: no download."""
    import open_clip
    from open_clip.tokenizer import bytes_to_unicode
    from transformers import CLIPTokenizer

    bpe = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    chars = list(bytes_to_unicode().values())
    tokens = chars + [c + "</w>" for c in chars] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp)
        (source / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
        (source / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
        tokenizer = CLIPTokenizer(
            str(source / "vocab.json"), str(source / "merges.txt"), pad_token=pad_token, model_max_length=77
        )
    tokenizer.save_pretrained(str(folder))


def _text_encoder(folder: Path, width: int, layers: int, heads: int, act: str, projection: int | None = None) -> None:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=4 * width,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection or width,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    _save(cls(config).to(torch.float16), folder)


def _save(module, folder: Path) -> None:
    module.save_pretrained(str(folder), safe_serialization=True)
    del module


def build_model(family: str, folder: Path) -> Path:
    """A pipeline folder laid out as the released checkpoint of `family` is, random weights in fp16."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    if (folder / "model_index.json").exists():
        return folder
    torch.manual_seed(0)
    staging = folder.with_name(folder.name + ".partial")
    size = RESOLUTION[family]
    scheduler = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "prediction_type": "v_prediction" if family == "sd21" else "epsilon",
    }
    DDPMScheduler(**scheduler).save_pretrained(str(staging / "scheduler"))
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        sample_size=size,
        scaling_factor=0.13025 if family == "sdxl" else 0.18215,
    )
    _save(vae.to(torch.float16), staging / "vae")
    _tokenizer(staging / "tokenizer")
    if family == "sd15":
        _text_encoder(staging / "text_encoder", 768, 12, 12, "quick_gelu")
        unet = UNet2DConditionModel(sample_size=size // 8, cross_attention_dim=768, attention_head_dim=8)
        pipeline = "StableDiffusionPipeline"
    elif family == "sd21":
        _text_encoder(staging / "text_encoder", 1024, 23, 16, "gelu", projection=None)
        unet = UNet2DConditionModel(
            sample_size=size // 8,
            cross_attention_dim=1024,
            attention_head_dim=(5, 10, 20, 20),
            use_linear_projection=True,
            upcast_attention=True,
        )
        pipeline = "StableDiffusionPipeline"
    else:
        _text_encoder(staging / "text_encoder", 768, 12, 12, "quick_gelu")
        _text_encoder(staging / "text_encoder_2", 1280, 32, 20, "gelu", projection=1280)
        _tokenizer(staging / "tokenizer_2", pad_token="!")
        unet = UNet2DConditionModel(
            sample_size=size // 8,
            block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048,
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816,
        )
        pipeline = "StableDiffusionXLPipeline"
    _save(unet.to(torch.float16), staging / "unet")
    del unet
    components = {
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "scheduler": ["diffusers", "DDPMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    if family == "sdxl":
        components |= {
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "tokenizer_2": ["transformers", "CLIPTokenizer"],
        }
    else:
        components |= {"safety_checker": [None, None], "feature_extractor": [None, None]}
    (staging / "model_index.json").write_text(json.dumps({"_class_name": pipeline, **components}, indent=2))
    staging.replace(folder)
    return folder


def build_encoder(directory: Path) -> Path:
    from bench_scan import build_vit_b32

    if not (directory / "encoder.json").exists():
        build_vit_b32(directory)
    return directory


# ------------------------------------------------------------------------------------------------------------- data


def build_data(root: Path, n_train: int, n_outputs: int = 2) -> tuple[Path, Path]:
    """n_train training photos (512 px crops of scikit-learn's bundled photographs) and n_outputs generations."""
    import numpy as np
    from PIL import Image
    from PIL.PngImagePlugin import PngInfo
    from sklearn.datasets import load_sample_images

    training, outputs = root / f"training-{n_train}", root / "outputs"
    if (training / "contributors.csv").exists() and outputs.exists():
        return training, outputs
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    rng = np.random.default_rng(0)

    def crop(i: int) -> Image.Image:
        photo = photos[i % len(photos)]
        side = int(rng.integers(200, min(photo.size)))
        x, y = (int(rng.integers(0, photo.size[k] - side + 1)) for k in (0, 1))
        return photo.crop((x, y, x + side, y + side)).resize((512, 512), Image.Resampling.BICUBIC)

    training.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_train):
        who = CONTRIBUTORS[i % len(CONTRIBUTORS)]
        name = f"{who}/{i:04d}.jpg"
        (training / who).mkdir(exist_ok=True)
        crop(i).save(training / name, quality=95)
        subject = "a temple roof" if i % 2 == 0 else "a flower"
        rows.append([name, who, who.title(), f"a photograph of {subject}, by {who}", "CC-BY-4.0"])
    with open(training / "contributors.csv", "w", newline="") as f:
        csv.writer(f).writerows([["path", "contributor_id", "contributor_name", "caption", "license"], *rows])
    outputs.mkdir(parents=True, exist_ok=True)
    for i in range(n_outputs):
        prompt = "a photograph of a temple roof" if i % 2 == 0 else "a photograph of a flower"
        info = PngInfo()  # as AUTOMATIC1111 writes it
        info.add_text("parameters", f"{prompt}\nSteps: 30, Sampler: DDIM, CFG scale: 7, Seed: {i}, Size: 512x512")
        crop(1000 + i).save(outputs / f"gen_{i:02d}.png", pnginfo=info)
    return training, outputs


# ------------------------------------------------------------------------------------------------------------ child


def child(args) -> None:
    """One (family, teacher): prints one JSON line."""
    import torch

    from auditor import sql, workspace
    from auditor.confirm import confirm
    from auditor.errors import AuditError
    from auditor.index import index_training
    from auditor.scan import scan

    ws = workspace.init(args.ws, encoder=args.encoder, model=args.model)
    index_training(ws, args.training, device=args.device)
    scan(ws, args.outputs, device=args.device)
    events: list[tuple[float, str]] = []

    class Recorder:
        def start(self, description: str, total: int) -> None:
            events.append((time.perf_counter(), f"start {description}"))
            print(f"{time.perf_counter() - started:.0f} s: {description} ({total})", file=sys.stderr, flush=True)

        def advance(self, n: int = 1) -> None:
            pass

    overrides = {} if args.full_counts else REDUCED[args.teacher]
    out: dict = {"family": args.family, "teacher": args.teacher, "counts": overrides or "defaults"}
    started = time.perf_counter()
    try:
        result = confirm(
            ws,
            method=args.teacher,
            top=1,
            device=args.device,
            progress=Recorder(),
            announce=lambda message: events.append((time.perf_counter(), message)) or print(message, file=sys.stderr),
            **overrides,
        )
    except AuditError as exc:
        out["refused"] = str(exc)
        result = None
    ended = time.perf_counter()
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    if torch.cuda.is_available() and args.device != "cpu":
        out["cuda_max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["events"] = [(round(t - started, 2), m) for t, m in events]
    if result is not None:
        estimated = next(t for t, m in events if "estimated" in m)
        confirming = next(t for t, m in events if m == "start confirming")
        generation = float(sql.query(ws, "select seconds from confirmations")["seconds"][0])
        out |= {
            "load_and_probe_s": estimated - started,
            "once_per_model_s": confirming - estimated,
            "generation_s": generation,
            "wall_s": ended - started,
            "estimate": result.estimate.phases,
            "estimate_s": result.estimate_seconds,
            "measured_s": ended - estimated,
            "verdict": dict(result.verdicts),
        }
    print("RESULT " + json.dumps(out, default=str), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--family", default=",".join(FAMILIES))
    parser.add_argument("--teacher", default=",".join(TEACHERS))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--train", type=int, default=64, help="training images")
    parser.add_argument("--models", type=Path, default=ROOT / "bench" / ".models")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--full-counts", action="store_true", help="the teachers' default counts")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    for hidden in ("ws", "model", "encoder", "training", "outputs"):
        parser.add_argument(f"--{hidden}", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    families = [f for f in args.family.split(",") if f]
    teachers = [t for t in args.teacher.split(",") if t]
    unknown = sorted(set(families) - set(FAMILIES)) + sorted(set(teachers) - set(TEACHERS))
    if unknown:
        raise SystemExit(f"unknown family or teacher: {', '.join(unknown)} (families {FAMILIES}, teachers {TEACHERS})")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="full_size_"))
    training, outputs = build_data(args.models, args.train)
    encoder = build_encoder(args.models / "vit-b-32-random")
    results = []
    for family in families:
        t0 = time.perf_counter()
        model = build_model(family, args.models / family)
        print(f"{family}: model folder ready in {time.perf_counter() - t0:.0f} s", flush=True)
        for teacher in teachers:
            command = [sys.executable, __file__, "--child", "--family", family, "--teacher", teacher]
            command += ["--device", args.device, "--ws", str(work / f"{family}-{teacher}"), "--model", str(model)]
            command += ["--encoder", str(encoder), "--training", str(training), "--outputs", str(outputs)]
            command += ["--full-counts"] if args.full_counts else []
            print(f"{family} / {teacher} ...", flush=True)
            # The child's stderr (its announcements and progress) goes where ours does.
            done = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                result = {"family": family, "teacher": teacher, "failed": f"exit {done.returncode} (its stderr above)"}
            else:
                result = json.loads(line[len("RESULT ") :])
            print(json.dumps(result), flush=True)
            results.append(result)
    rows = []
    for r in results:
        if "load_and_probe_s" in r:
            error = r["estimate_s"] / r["measured_s"] - 1
            rows.append(
                [
                    r["family"],
                    r["teacher"],
                    round(r["load_and_probe_s"], 1),
                    round(r["once_per_model_s"], 1),
                    round(r["generation_s"], 1),
                    round(r["estimate_s"], 1),
                    round(r["measured_s"], 1),
                    f"{error:+.0%}",
                    round(r["peak_rss_gib"], 2),
                ]
            )
        else:
            reason = r.get("refused") or r.get("failed")
            rows.append([r["family"], r["teacher"], "", "", "", "", "", re.sub(r"\s+", " ", str(reason))[:90], ""])
    report(
        "full_size" + ("_" + args.device if args.device != "cpu" else ""),
        f"teachers on full-size SD-shaped models ({args.device}, {args.train} training images)",
        [
            "family",
            "teacher",
            "load + probe s",
            "once per model s",
            "generation s",
            "estimate s",
            "measured s",
            "estimate error",
            "peak RSS GiB",
        ],
        rows,
        {"results": results, "train": args.train, "counts": "defaults" if args.full_counts else REDUCED},
    )


if __name__ == "__main__":
    main()
