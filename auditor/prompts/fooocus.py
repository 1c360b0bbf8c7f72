"""Fooocus: its own scheme stores one JSON object in the `parameters` chunk (PNG) or EXIF UserComment (JPEG/WebP),
with a `fooocus_scheme` chunk (or EXIF MakerNote) naming the scheme. With the "a1111" scheme the text is
AUTOMATIC1111's; either way the JSON must never be read as A1111 text, which would keep the whole blob as a prompt.

JSON keys: prompt, negative_prompt, base_model, base_model_hash, seed (a string), steps, sampler, scheduler,
guidance_scale, resolution ("(1024, 1024)"), version ("Fooocus v2.5.0"), metadata_scheme ("fooocus").
"""

from __future__ import annotations

from .base import GenerationMetadata, as_float, as_int, as_prompt, as_str, positive, size_of


def is_fooocus(data: dict) -> bool:
    version = data.get("version")
    return (
        data.get("metadata_scheme") == "fooocus"
        or (isinstance(version, str) and version.startswith("Fooocus"))
        or {"base_model", "guidance_scale"} <= data.keys()
    )


def parse(data: dict, raw: str | None, source: str = "fooocus") -> GenerationMetadata:
    """Also the reader for JSON of no known generator: the same key names are the common ground."""
    width, height = size_of(data.get("resolution"))
    return GenerationMetadata(
        prompt=as_prompt(data.get("prompt")),
        negative_prompt=as_prompt(data.get("negative_prompt")),
        source=source,
        generator="Fooocus" if is_fooocus(data) else None,
        model_name=as_str(data.get("base_model")) or as_str(data.get("model")),
        model_hash=as_str(data.get("base_model_hash")) or as_str(data.get("model_hash")),
        seed=as_int(data.get("seed")),
        steps=as_int(data.get("steps")),
        sampler=as_str(data.get("sampler")),
        cfg_scale=as_float(data.get("guidance_scale", data.get("cfg_scale"))),
        width=width or positive(data.get("width")),
        height=height or positive(data.get("height")),
        raw=raw,
    )
