"""NovelAI: PNG text chunks Software="NovelAI", Description=prompt, Source="<model name> <8-hex hash>",
Comment=JSON {prompt, uc (negative), steps, scale, seed, sampler, width, height, v4_prompt, ...}.
The same keys also come as one JSON object hidden in the alpha channel (stealth metadata)."""

from __future__ import annotations

import re

from .base import GenerationMetadata, Unreadable, as_float, as_int, as_prompt, as_str, as_text, load_json, positive


def is_novelai(fields: dict) -> bool:
    software = as_text(fields.get("Software")) or ""
    return software.strip().startswith("NovelAI") or (
        isinstance(fields.get("Comment"), str) and "Description" in fields and "Source" in fields
    )


def _caption(value) -> str | None:
    """V4 puts the prompt in {"caption": {"base_caption": ...}}."""
    caption = value.get("caption") if isinstance(value, dict) else None
    return as_prompt(caption.get("base_caption")) if isinstance(caption, dict) else None


def parse(fields: dict, raw: str | None = None) -> GenerationMetadata:
    """`fields`: the PNG text chunks (or the stealth JSON object) by name."""
    comment = as_text(fields.get("Comment"))
    settings = {}
    if comment is not None:
        settings = load_json(comment, "NovelAI Comment")
        if not isinstance(settings, dict):
            raise Unreadable("NovelAI Comment is not a JSON object")
    elif isinstance(fields.get("Comment"), dict):
        settings = fields["Comment"]
    source = as_text(fields.get("Source")) or ""
    model = re.fullmatch(r"(.*?)\s+([0-9A-Fa-f]{8})", source.strip())
    return GenerationMetadata(
        prompt=as_prompt(as_text(fields.get("Description")))
        or as_prompt(settings.get("prompt"))
        or _caption(settings.get("v4_prompt")),
        negative_prompt=as_prompt(settings.get("uc")) or _caption(settings.get("v4_negative_prompt")),
        source="novelai",
        generator="NovelAI",
        model_name=model.group(1) if model else as_str(source),
        model_hash=model.group(2) if model else None,
        seed=as_int(settings.get("seed")),
        steps=as_int(settings.get("steps")),
        sampler=as_str(settings.get("sampler")),
        cfg_scale=as_float(settings.get("scale")),
        width=positive(settings.get("width")),
        height=positive(settings.get("height")),
        raw=raw if raw is not None else comment,
    )
