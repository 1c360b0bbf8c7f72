"""`audit encoder`: build an encoder bundle from pretrained model names, and switch the workspace to one."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path

import typer
from rich.text import Text

from .app import DeviceOption, announce, app, out
from .commands import ForceOption, switch_encoder

encoder_app = typer.Typer(
    rich_markup_mode=None,  # help texts name settings as [section] key: not markup
    help="Encoder bundles: build one from pretrained open_clip, timm or transformers models (auditor/bundle.py), "
    "or switch the workspace to one.",
    no_args_is_help=True,
)
app.add_typer(encoder_app, name="encoder")


class Preset(StrEnum):
    clip = "clip"
    dino_clip = "dino-clip"


@encoder_app.command("create")
def encoder_create(
    preset: Preset = typer.Argument(
        ..., help="clip: one CLIP model, image ⊕ text. dino-clip: a DINO image tower ⊕ a CLIP text tower (FastGDA)."
    ),
    out_dir: Path = typer.Option(..., "--out", help="The bundle directory to write (must not hold a bundle yet)."),
    clip: str = typer.Option(
        ...,
        "--clip",
        help="The CLIP model: open_clip:NAME[/TAG] (e.g. ViT-B-32/openai, ViT-B-32-quickgelu, ViT-B-16-SigLIP/webli; "
        "open_clip:hf-hub:ORG/REPO) or transformers:ID (a Hub id in the local cache, or a local folder). "
        "Without a library prefix: open_clip.",
    ),
    clip_weights: Path | None = typer.Option(
        None, "--clip-weights", help="Local weights for --clip (default: its files in the local Hugging Face cache)."
    ),
    dino: str | None = typer.Option(
        None, "--dino", help="dino-clip's image tower, a timm model: timm:NAME (e.g. vit_base_patch16_224.dino)."
    ),
    dino_weights: Path | None = typer.Option(
        None, "--dino-weights", help="Local weights for --dino (default: its files in the local Hugging Face cache)."
    ),
    name: str | None = typer.Option(None, "--name", help="Display name (default: from the model names)."),
    temperature: float = typer.Option(0.05, "--temperature", help="τ of the shares (audit distill train fits it)."),
):
    """Build an encoder bundle from model names: the architecture from the library's own config, the weights from local
    files or the local Hugging Face cache (never downloaded), loaded strictly; encoder.json records each source's name
    and SHA-256."""
    from .. import bundle

    made = bundle.create(
        out_dir,
        preset.value,
        bundle.Source.parse(clip, "open_clip", clip_weights),
        bundle.Source.parse(dino, "timm", dino_weights) if dino else None,
        name=name,
        temperature=temperature,
    )
    config = made.config
    dims = f"image {config['image_tower']['library']}:{config['image_tower']['model_name']}"
    dims += f" ⊕ text {config['text_tower']['library']}:{config['text_tower']['model_name']}"
    out.print(Text(f"wrote encoder {made.encoder_id} ({dims}) to {made.path}"))
    out.print(Text(f"use it: audit init --encoder {made.path}, or audit encoder use {made.path}"))
    for note in made.notes:
        announce(f"note: {note}")


@encoder_app.command("use")
def encoder_use(
    bundle_dir: Path = typer.Argument(..., help="Encoder bundle directory."),
    device: DeviceOption = None,
    force: bool = ForceOption,
):
    """Switch the workspace to another encoder and embed the registered training set with it (as `audit
    use-encoder`); a distilled bundle must first hold up against its untuned baseline on the workspace's ground-truth
    checks."""
    switch_encoder(bundle_dir, device, force)
