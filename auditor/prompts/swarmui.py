"""SwarmUI: the `parameters` chunk (or EXIF UserComment) holds JSON
{"sui_image_params": {prompt, negativeprompt, model, seed, steps, cfgscale, sampler, width, height, ...},
 "sui_models": [{"name": ..., "param": "model", "hash": ...}], ...}."""

from __future__ import annotations

from .base import GenerationMetadata, as_float, as_int, as_prompt, as_str, positive


def is_swarmui(data: dict) -> bool:
    return isinstance(data.get("sui_image_params"), dict)


def parse(data: dict, raw: str | None, source: str = "swarmui") -> GenerationMetadata:
    params = data["sui_image_params"]
    models = data.get("sui_models") if isinstance(data.get("sui_models"), list) else []
    model_hash = next(
        (m.get("hash") for m in models if isinstance(m, dict) and m.get("param") == "model"),
        None,
    )
    return GenerationMetadata(
        prompt=as_prompt(params.get("prompt")),
        negative_prompt=as_prompt(params.get("negativeprompt")),
        source=source,
        generator="SwarmUI",
        model_name=as_str(params.get("model")),
        model_hash=as_str(model_hash),
        seed=as_int(params.get("seed")),
        steps=as_int(params.get("steps")),
        sampler=as_str(params.get("sampler")),
        cfg_scale=as_float(params.get("cfgscale")),
        width=positive(params.get("width")),
        height=positive(params.get("height")),
        raw=raw,
    )
