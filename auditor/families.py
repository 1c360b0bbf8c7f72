"""Which diffusion models the teachers load, and from which files.

Families: Stable Diffusion 1.x and 2.x (diffusers' StableDiffusionPipeline: one CLIP text encoder; 2.x with
1024-wide cross-attention, often v-prediction at 768 px) and SDXL (StableDiffusionXLPipeline: two text encoders,
pooled text embeddings and size conditioning). A model is either a diffusers folder, whose model_index.json names
its pipeline class, with plain or variant weights (`*.fp16.safetensors`, as many Hub downloads are), or one
.safetensors/.ckpt checkpoint whose architecture, tokenizers and schedulers come from a local diffusers folder of
the same family ([paths] model_config): diffusers' single-file loader then never reaches for the network.
Anything else (SD3, FLUX, Kandinsky, ...) is refused in one line when the model is named (`audit init --model`).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import AuditError

PIPELINES = {"StableDiffusionPipeline": "Stable Diffusion 1.x/2.x", "StableDiffusionXLPipeline": "SDXL"}
SUPPORTED = (
    "supported: Stable Diffusion 1.x/2.x (StableDiffusionPipeline) and SDXL (StableDiffusionXLPipeline), as a "
    "diffusers folder or a single .safetensors/.ckpt file"
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
COMPONENTS = {
    "StableDiffusionPipeline": ("unet", "vae", "text_encoder", "tokenizer", "scheduler"),
    "StableDiffusionXLPipeline": (
        "unet",
        "vae",
        "text_encoder",
        "tokenizer",
        "text_encoder_2",
        "tokenizer_2",
        "scheduler",
    ),
}
WEIGHT_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
_PLAIN = re.compile(rf"^(?:{'|'.join(WEIGHT_STEMS)})(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
_VARIANT = re.compile(rf"^(?:{'|'.join(WEIGHT_STEMS)})\.([A-Za-z0-9_]+)(?:-\d+-of-\d+)?\.(?:safetensors|bin)$")
# Key prefixes of the original (LDM / SGM) checkpoint layouts: which family a single file holds.
SINGLE_FILE_KEYS = (
    ("conditioner.embedders.", "StableDiffusionXLPipeline"),
    ("cond_stage_model.", "StableDiffusionPipeline"),
)


@dataclass(frozen=True)
class Source:
    """Where a model's weights and architecture are."""

    path: Path  # the diffusers folder, or the single checkpoint file
    pipeline: str  # its diffusers pipeline class (a key of PIPELINES)
    config: Path  # the diffusers folder its configs, tokenizers and schedulers come from (the folder itself)
    variant: str = ""  # a folder's weights variant ("fp16"); "" for plain weights

    @property
    def single_file(self) -> bool:
        return self.path.is_file()

    @property
    def is_xl(self) -> bool:
        return self.pipeline == "StableDiffusionXLPipeline"

    @property
    def components(self) -> tuple[str, ...]:
        return COMPONENTS[self.pipeline]

    def describe(self) -> str:
        how = "single file" if self.single_file else "diffusers folder"
        return f"{PIPELINES[self.pipeline]} ({how}{f', {self.variant} weights' if self.variant else ''})"

    def variant_of(self, component: str) -> str | None:
        """The variant to load this component with: the chosen one where the component has files of it."""
        if not self.variant:
            return None
        return self.variant if self.variant in _variants(self.path / component) else None

    def files(self) -> list[Path]:
        """What the model's identity covers: every file of its components (a folder), or the checkpoint and the
        configs it is read with (a single file)."""
        if self.single_file:
            configs = sorted(
                p for c in self.components for p in (self.config / c).rglob("*") if p.is_file() and not _weights(p)
            )
            return [self.path, *configs]
        return sorted(p for c in self.components for p in (self.path / c).rglob("*") if p.is_file())


def _weights(path: Path) -> bool:
    return bool(_PLAIN.match(path.name) or _VARIANT.match(path.name))


def _variants(folder: Path) -> set[str]:
    return {m.group(1) for p in folder.glob("*") if (m := _VARIANT.match(p.name))} if folder.is_dir() else set()


def _has_plain(folder: Path) -> bool:
    return folder.is_dir() and any(_PLAIN.match(p.name) for p in folder.iterdir())


def pipeline_class(folder: Path) -> str:
    """The pipeline class a diffusers folder's model_index.json names, once it is one the teachers support."""
    index = folder / "model_index.json"
    if not index.is_file():
        raise AuditError(
            f"{folder} has no model_index.json; expected a diffusers pipeline folder or a .safetensors/.ckpt file ({SUPPORTED})"
        )
    try:
        name = json.loads(index.read_text()).get("_class_name", "")
    except (json.JSONDecodeError, AttributeError):
        raise AuditError(f"{index} is not valid JSON; re-download or fix the model folder") from None
    if name not in PIPELINES:
        raise AuditError(
            f"model {folder} is a {name or 'unnamed'} pipeline, which the teachers cannot load; {SUPPORTED}"
        )
    return name


def single_file_pipeline(path: Path) -> str:
    """The family of an original-layout checkpoint, from its key names (safetensors: read without the tensors)."""
    try:
        if path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                keys = list(fh.keys())
        else:
            import torch

            state = torch.load(str(path), map_location="cpu", mmap=True, weights_only=True)
            keys = list(state.get("state_dict", state))
    except Exception as exc:  # noqa: BLE001 — any unreadable checkpoint is one line
        raise AuditError(f"cannot read checkpoint {path}: {str(exc).splitlines()[0] if str(exc) else exc!r}") from None
    for prefix, name in SINGLE_FILE_KEYS:
        if any(k.startswith(prefix) for k in keys) and any(
            k.startswith("model.diffusion_model.input_blocks") for k in keys
        ):
            return name
    raise AuditError(f"checkpoint {path} is no Stable Diffusion 1.x/2.x or SDXL checkpoint; {SUPPORTED}")


def weights_variant(folder: Path, requested: str) -> str:
    """The variant a diffusers folder's weights are loaded from: `requested`, else none when the UNet has plain
    weights, else the one variant it has."""
    found = _variants(folder / "unet")
    if requested:
        if requested not in found:
            have = ", ".join(sorted(found)) or "none"
            raise AuditError(f"the UNet in {folder} has no {requested!r} variant weights (variants there: {have})")
        return requested
    if _has_plain(folder / "unet"):
        return ""
    if len(found) == 1:
        return found.pop()
    if not found:
        raise AuditError(f"the UNet in {folder} has no weights (no diffusion_pytorch_model files)")
    raise AuditError(
        f"{folder} has the variants {', '.join(sorted(found))} and no plain weights; choose one with "
        "[paths] model_variant (audit init --variant)"
    )


def resolve(path: str | os.PathLike, config: str | os.PathLike | None = None, variant: str = "") -> Source:
    """The model at `path` checked on the spot: it exists, its family is supported, its weights and (for a single
    file) its local config are found. Nothing heavy is read."""
    path = Path(path).expanduser().resolve()
    if path.is_dir():
        name = pipeline_class(path)
        missing = [c for c in COMPONENTS[name] if not (path / c).is_dir()]
        if missing:
            raise AuditError(
                f"model folder {path} lacks {', '.join(missing)}; expected a diffusers {name} folder "
                f"({', '.join(COMPONENTS[name])})"
            )
        return Source(path, name, path, weights_variant(path, variant))
    if path.is_file():
        if path.suffix not in SINGLE_FILE_SUFFIXES:
            raise AuditError(f"model {path} is neither a diffusers folder nor a .safetensors/.ckpt checkpoint")
        name = single_file_pipeline(path)
        if not config:
            raise AuditError(
                f"single-file checkpoint {path} needs a local diffusers config of its family ({PIPELINES[name]}): "
                "set [paths] model_config (audit init --model-config DIR) to a diffusers folder of that model "
                "(model_index.json, component configs, tokenizers, scheduler; no weights needed)"
            )
        config_dir = Path(config).expanduser().resolve()
        if not config_dir.is_dir():
            raise AuditError(f"model config folder {config_dir} does not exist; set [paths] model_config")
        config_name = pipeline_class(config_dir)
        if config_name != name:
            raise AuditError(
                f"checkpoint {path} is {PIPELINES[name]} but its config {config_dir} is {PIPELINES[config_name]}; "
                "use a config folder of the same family"
            )
        return Source(path, name, config_dir)
    raise AuditError(f"model {path} does not exist; set [paths] model in audit.toml or pass --model")
