"""Encoder bundles from pretrained model names (`audit encoder create`); `embed.py` loads what this writes.

A source is a library and a model name in that library:

- `open_clip:NAME` (a built-in config: `ViT-B-32`, `ViT-B-32-quickgelu`, `ViT-B-16-SigLIP`, ...), `open_clip:NAME/TAG`
  (a pretrained tag: its weights from the local Hugging Face cache, its QuickGELU setting and preprocessing) or
  `open_clip:hf-hub:ORG/REPO` (open_clip_config.json and weights from the cache);
- `timm:NAME` (e.g. `vit_base_patch16_224.dino`): weights from the model's Hub repo in the cache;
- `transformers:ID` (e.g. `openai/clip-vit-base-patch32`, or a local folder): a CLIP model's config.json and weights.

The architecture always comes from the library's own config for the name; weights come from the file given or the local
Hugging Face cache, never the network. Loading is strict: a weight missing, unexpected or of the wrong shape is an error.
Presets: `clip` (one CLIP model, image ⊕ text) and `dino-clip` (FastGDA's recipe: a DINO image tower ⊕ a CLIP text
tower, the CLIP image tower not stored). `encoder.json` records each source's library, name, file and SHA-256.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import embed
from .errors import BundleError

PRESETS = ("clip", "dino-clip")
LIBRARIES = {"open_clip": "open_clip", "open-clip": "open_clip", "timm": "timm", "transformers": "transformers"}
LIBRARIES["hf"] = LIBRARIES["transformers"]  # an alias: transformers:ID or hf:ID
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Source:
    """A model named in its library, with an optional local weights file (else the local Hugging Face cache)."""

    library: str
    name: str
    weights: Path | None = None
    kwargs: dict = field(default_factory=dict)  # timm.create_model keyword arguments

    @staticmethod
    def parse(text: str, default_library: str, weights: Path | None = None) -> Source:
        """'LIBRARY:NAME', or NAME in `default_library` ('hf-hub:ORG/REPO' is an open_clip name)."""
        head, sep, rest = text.partition(":")
        if sep and head.lower() in LIBRARIES:
            return Source(LIBRARIES[head.lower()], rest, weights)
        return Source(default_library, text, weights)

    def __str__(self) -> str:
        return f"{self.library}:{self.name}"


@dataclass
class Tower:
    """One part of a bundle: its encoder.json entry (without `weights`), its state dict, where it came from."""

    part: dict
    state: dict[str, torch.Tensor]
    source: dict
    tokenizer: object | None = None  # a Hugging Face tokenizer to save in the bundle
    notes: list[str] = field(default_factory=list)


@dataclass
class Created:
    path: Path
    encoder_id: str
    config: dict
    notes: list[str] = field(default_factory=list)  # what the user may want to check (e.g. QuickGELU)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _hub_file(repo: str, filenames: list[str], what: str) -> Path:
    """The first of `filenames` in the local Hugging Face cache (or in `repo` when it is a local folder)."""
    if Path(repo).expanduser().is_dir():
        for name in filenames:
            if (Path(repo).expanduser() / name).is_file():
                return Path(repo).expanduser() / name
        raise BundleError(f"{what}: the folder {repo} holds none of {', '.join(filenames)}")
    from huggingface_hub import hf_hub_download

    for name in filenames:
        try:
            return Path(hf_hub_download(repo, name, local_files_only=True))
        except Exception:  # not cached (or no such repo): try the next name
            continue
    raise BundleError(
        f"{what}: {' or '.join(filenames)} of {repo} not in the local Hugging Face cache (nothing is downloaded); "
        f"pass its weights file (--clip-weights / --dino-weights), or run `huggingface-cli download {repo}` where there "
        "is network and copy the cache here"
    )


def _checked_file(path: Path, what: str) -> Path:
    path = Path(path).expanduser()
    if not path.is_file():
        raise BundleError(
            f"{what}: weights file {path} does not exist; pass a local checkpoint (.safetensors, .bin, .pt)"
        )
    return path


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if any(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _strict(model: torch.nn.Module, state: dict, path: Path, what: str) -> None:
    """Load `state` into `model`, refusing any missing, unexpected or misshapen weight in one line."""
    _load_strictly(lambda: model.load_state_dict(state, strict=False), path, what)


def _load_strictly(load, path: Path, what: str) -> None:
    """Run `load` (a non-strict load returning missing and unexpected keys) and refuse any mismatch in one line."""
    try:
        result = load()
    except RuntimeError as exc:  # a weight of the wrong shape
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise BundleError(f"{path} does not fit {what}: {lines[1] if len(lines) > 1 else lines[0]}") from None
    if not result:  # open_clip's big_vision (.npz) conversion reports nothing
        return
    problems = [
        f"{len(keys)} {label} weights (e.g. {', '.join(sorted(keys)[:3])})"
        for label, keys in (("missing", result.missing_keys), ("unexpected", result.unexpected_keys))
        if keys
    ]
    if problems:
        raise BundleError(
            f"{path} does not fit {what}: {'; '.join(problems)}; check the model name matches the weights"
        )


def _source_record(source: Source, path: Path) -> dict:
    return {"library": source.library, "name": source.name, "file": str(path.resolve()), "sha256": sha256_file(path)}


# ---------------------------------------------------------------------------------------------------------- open_clip


def open_clip_tower(source: Source, tower: str | None) -> Tower:
    """An open_clip model from its config: both towers (`tower` None), or only 'image' or 'text'."""
    import open_clip
    from open_clip.factory import parse_model_name

    what = f"open_clip {source.name}"
    schema, ident = parse_model_name(source.name)
    name, tag, preprocess, pretrained = source.name, None, {}, {}
    if schema == "hf-hub":
        full = json.loads(_hub_file(ident, ["open_clip_config.json"], what).read_text())
        cfg, preprocess = full.get("model_cfg", full), full.get("preprocess_cfg", {})
    elif schema == "local-dir":
        full = json.loads(_hub_file(ident, ["open_clip_config.json"], what).read_text())
        cfg, preprocess = full.get("model_cfg", full), full.get("preprocess_cfg", {})
    else:
        name, _, tag = source.name.partition("/")
        cfg = open_clip.get_model_config(name)
        if cfg is None:
            raise BundleError(f"open_clip has no model config named {name!r} (see open_clip.list_models())")
        if tag:
            pretrained = open_clip.get_pretrained_cfg(name, tag)
            if not pretrained:
                tags = open_clip.list_pretrained_tags_by_model(name)
                raise BundleError(
                    f"open_clip {name} has no pretrained tag {tag!r}; it has: {', '.join(tags) or 'none'}"
                )
    if "hf_model_name" in cfg.get("text_cfg", {}):
        raise BundleError(
            f"{what}: its text tower is a Hugging Face model ({cfg['text_cfg']['hf_model_name']}), which bundles do not "
            "support; use a config with open_clip's own text transformer"
        )
    if pretrained.get("quick_gelu"):
        # OpenAI's weights were trained with QuickGELU: the same weight names, a different activation.
        cfg["quick_gelu"] = True

    if source.weights is not None:
        path = _checked_file(source.weights, what)
    elif schema in ("hf-hub", "local-dir"):
        path = _hub_file(ident, ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"], what)
    elif pretrained.get("hf_hub"):
        repo, filename = pretrained["hf_hub"].rstrip("/"), None
        if repo.count("/") > 1:
            repo, filename = repo.rsplit("/", 1)
        names = [filename] if filename else []
        path = _hub_file(repo, names + ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"], what)
    else:
        raise BundleError(
            f"{what}: no weights; pass the weights file, or a pretrained tag as NAME/TAG "
            f"(tags: {', '.join(open_clip.list_pretrained_tags_by_model(name)) or 'none'})"
        )

    model = embed._build_open_clip({"model_config": cfg, "model_name": name})
    # open_clip's own conversions first (older layouts, logit scale shapes, position embedding sizes), then strict.
    _load_strictly(lambda: open_clip.load_checkpoint(model, str(path), strict=False), path, what)
    embed.open_clip_tower(model, tower)

    vision = cfg["vision_cfg"]
    size = vision.get("image_size", 224)
    size = size if isinstance(size, int) else int(size[0])
    mean = pretrained.get("mean") or preprocess.get("mean") or OPENAI_MEAN
    std = pretrained.get("std") or preprocess.get("std") or OPENAI_STD
    part = {"library": "open_clip", "model_name": name, "model_config": cfg}
    if tower:
        part["tower"] = tower
    image = {
        "image_size": size,
        "mean": list(mean),
        "std": list(std),
        "interpolation": pretrained.get("interpolation") or preprocess.get("interpolation") or "bicubic",
    }
    text_cfg = cfg.get("text_cfg", {})
    text = {"context_length": int(text_cfg.get("context_length", 77))}
    tokenizer = None
    if text_cfg.get("hf_tokenizer_name") and tower != "image":
        tokenizer = _hf_tokenizer(text_cfg["hf_tokenizer_name"], what)
        text["tokenizer"] = "tokenizer"
        text["tokenizer_kwargs"] = {**text_cfg.get("tokenizer_kwargs", {})}
        if text_cfg.get("tokenizer_mode"):
            text["tokenizer_kwargs"]["tokenizer_mode"] = text_cfg["tokenizer_mode"]
    elif "siglip" in name.lower() and tower != "image":
        raise BundleError(f"{what}: its config names no Hugging Face tokenizer (text_cfg.hf_tokenizer_name)")
    notes = []
    if source.weights is not None and not cfg.get("quick_gelu") and open_clip.get_model_config(f"{name}-quickgelu"):
        # Nothing in the weights says which activation they were trained with.
        notes.append(
            f"{name} uses GELU; if {source.weights} holds OpenAI's original CLIP weights (trained with QuickGELU), "
            f"create the bundle with {name}-quickgelu instead"
        )
    record = _source_record(source, path)
    return Tower({**part, "image": image, "text": text}, model.state_dict(), record, tokenizer, notes)


def _hf_tokenizer(name: str, what: str):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, local_files_only=True)
    except Exception as exc:
        raise BundleError(
            f"{what}: its tokenizer {name} is not in the local Hugging Face cache ({type(exc).__name__}); "
            f"run `huggingface-cli download {name}` where there is network and copy the cache here"
        ) from None


# --------------------------------------------------------------------------------------------------------------- timm


def timm_tower(source: Source) -> Tower:
    """A timm image model (classifier removed, as embed.py builds it) and its data config."""
    import timm
    from timm.data import resolve_data_config

    what = f"timm {source.name}"
    try:
        model = timm.create_model(source.name, pretrained=False, num_classes=0, **source.kwargs)
    except RuntimeError as exc:
        raise BundleError(f"timm cannot build {source.name!r}: {exc}") from None
    pcfg = dict(getattr(model, "pretrained_cfg", None) or {})
    if source.weights is not None:
        path = _checked_file(source.weights, what)
    elif pcfg.get("hf_hub_id"):
        names = [pcfg["hf_hub_filename"]] if pcfg.get("hf_hub_filename") else []
        path = _hub_file(pcfg["hf_hub_id"], names + ["model.safetensors", "pytorch_model.bin"], what)
    else:
        raise BundleError(f"{what}: timm knows no Hub repo for its weights; pass the weights file")
    state = _read_state(path)
    module = sys.modules.get(type(model).__module__)
    convert = getattr(module, "checkpoint_filter_fn", None)
    if convert is not None:  # timm's own conversion of other checkpoint layouts (e.g. the original DINO release)
        try:
            state = convert(state, model)
        except Exception:
            pass
    classifier = pcfg.get("classifier")
    if classifier:  # built with num_classes=0: a checkpoint's classifier is not used
        heads = [classifier] if isinstance(classifier, str) else list(classifier)
        state = {k: v for k, v in state.items() if not any(k.startswith(h + ".") for h in heads)}
    _strict(model, state, path, what)
    data = resolve_data_config({}, model=model)
    size = getattr(getattr(model, "patch_embed", None), "img_size", None) or data["input_size"][-1]  # kwargs win
    part = {"library": "timm", "model_name": source.name, "kwargs": dict(source.kwargs)}
    image = {
        "image_size": int(size if isinstance(size, int) else size[-1]),
        "mean": list(data["mean"]),
        "std": list(data["std"]),
        "interpolation": data["interpolation"] if data.get("interpolation") in ("bilinear", "nearest") else "bicubic",
    }
    return Tower({**part, "image": image}, model.state_dict(), _source_record(source, path))


# ------------------------------------------------------------------------------------------------------- transformers


def transformers_towers(source: Source) -> dict[str, Tower]:
    """A Hugging Face transformers CLIP model split into its vision and text towers (with projections)."""
    import transformers

    what = f"transformers {source.name}"
    try:
        config = transformers.CLIPConfig.from_pretrained(source.name, local_files_only=True)
    except Exception as exc:
        raise BundleError(
            f"{what}: no CLIP config.json in that folder or the local Hugging Face cache ({type(exc).__name__}); "
            "pass a local model folder or a cached Hub id"
        ) from None
    if config.text_config.vocab_size != 49408:
        raise BundleError(f"{what}: vocabulary of {config.text_config.vocab_size}, not OpenAI's CLIP BPE (49408)")
    if source.weights is not None:
        path = _checked_file(source.weights, what)
    else:
        path = _hub_file(source.name, ["model.safetensors", "pytorch_model.bin"], what)
    state = {k: v for k, v in _read_state(path).items() if not k.endswith("position_ids")}
    _strict(transformers.CLIPModel(config), state, path, what)
    record = _source_record(source, path)
    try:
        processor = transformers.CLIPImageProcessor.from_pretrained(source.name, local_files_only=True)
        size = processor.crop_size["height"] if isinstance(processor.crop_size, dict) else processor.crop_size
        mean, std = processor.image_mean, processor.image_std
    except Exception:  # no preprocessor_config.json: CLIP's own
        size, mean, std = config.vision_config.image_size, OPENAI_MEAN, OPENAI_STD
    towers = {}
    for role, cls, sub, prefixes in (
        ("image", "CLIPVisionModelWithProjection", config.vision_config, ("vision_model.", "visual_projection.")),
        ("text", "CLIPTextModelWithProjection", config.text_config, ("text_model.", "text_projection.")),
    ):
        sub.projection_dim = config.projection_dim
        model = getattr(transformers, cls)(sub)
        _strict(model, {k: v for k, v in state.items() if k.startswith(prefixes)}, path, f"{what} ({role} tower)")
        part = {"library": "transformers", "model_name": source.name, "model_class": cls, "model_config": sub.to_dict()}
        extra = (
            {"image_size": int(size), "mean": list(mean), "std": list(std), "interpolation": "bicubic"}
            if role == "image"
            else {"context_length": int(sub.max_position_embeddings)}
        )
        towers[role] = Tower({**part, role: extra}, model.state_dict(), record)
    return towers


# ------------------------------------------------------------------------------------------------------------ presets


def _clip_towers(source: Source, need_image: bool) -> dict[str, Tower]:
    if source.library == "open_clip":
        tower = open_clip_tower(source, None if need_image else "text")
        return {"image": tower, "text": tower} if need_image else {"text": tower}
    if source.library == "transformers":
        towers = transformers_towers(source)
        return towers if need_image else {"text": towers["text"]}
    raise BundleError(f"--clip {source}: a CLIP model comes from open_clip or transformers, not {source.library}")


def create(
    directory: str | Path,
    preset: str,
    clip: Source,
    dino: Source | None = None,
    *,
    name: str | None = None,
    temperature: float = 0.05,
) -> Created:
    """Build a bundle in `directory` (which must not hold one yet) and return its path, encoder id and config."""
    directory = Path(directory).expanduser()
    if preset not in PRESETS:
        raise BundleError(f"unknown preset {preset!r}; use {' or '.join(PRESETS)}")
    if (directory / embed.CONFIG_NAME).exists():
        raise BundleError(f"{directory} already holds an encoder bundle; choose another --out or remove it")
    if preset == "clip":
        if dino is not None:
            raise BundleError("preset clip takes only --clip; for a DINO image tower use preset dino-clip")
        towers = _clip_towers(clip, need_image=True)
    else:
        if dino is None:
            raise BundleError("preset dino-clip needs --dino (a timm model, e.g. vit_base_patch16_224.dino)")
        if dino.library != "timm":
            raise BundleError(f"--dino {dino}: the DINO image tower comes from timm, not {dino.library}")
        towers = {"image": timm_tower(dino), **_clip_towers(clip, need_image=False)}

    image, text = towers["image"], towers["text"]
    weights: dict[str, dict[str, torch.Tensor]] = {}
    config: dict = {"name": name or (f"{dino.name}+{clip.name}" if preset == "dino-clip" else clip.name)}
    if image is text:  # one open_clip model with both towers: one file, as open_clip_bundle_config writes
        files = {"image": "backbone.safetensors", "text": "backbone.safetensors"}
    else:
        files = {"image": "image.safetensors", "text": "text.safetensors"}
    sources = {"preset": preset}
    for role, tower in (("image", image), ("text", text)):
        part = {k: v for k, v in tower.part.items() if k not in ("image", "text")}
        config[f"{role}_tower"] = {**part, "weights": files[role], **tower.part[role]}
        weights[files[role]] = tower.state
        sources[f"{role}_tower"] = tower.source
    config.update({"head": None, "temperature": float(temperature), "sources": sources})
    # Written beside the target and moved into place once it loads as the product loads it: no half-written bundle.
    staging = directory.with_name(directory.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        if text.tokenizer is not None:
            text.tokenizer.save_pretrained(str(staging / "tokenizer"))
        encoder_id = embed.save(staging, config, weights)
        embed.load(staging)
        directory.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            item.replace(directory / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    directory, written = embed.read_config(directory)
    notes = image.notes + (text.notes if text is not image else [])
    return Created(directory, encoder_id, written, notes)


__all__ = [
    "Created",
    "PRESETS",
    "Source",
    "create",
    "open_clip_tower",
    "sha256_file",
    "timm_tower",
    "transformers_towers",
]
