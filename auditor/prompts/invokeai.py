"""InvokeAI, in the three layouts it has written over time:

- `invokeai_metadata` (3.x and later): JSON with positive_prompt, negative_prompt, model{name|model_name, hash},
  seed, steps, cfg_scale, scheduler, width, height;
- `sd-metadata` (2.x): JSON {model_weights, model_hash, image: {prompt, seed, steps, cfg_scale, sampler, ...}}
  where image.prompt is a string or a list of {prompt, weight};
- `Dream` (1.x): `"a prompt [negative words]" -s 50 -S 123 -W 512 -H 512 -C 7.5 -A k_lms`.

Before 3.x the negative prompt lived inside the prompt, in square brackets.
"""

from __future__ import annotations

import re
import shlex

from .base import GenerationMetadata, Unreadable, as_float, as_int, as_prompt, as_str, positive


def is_invokeai(data: dict) -> bool:
    return "positive_prompt" in data or (isinstance(data.get("image"), dict) and "model_weights" in data)


def parse(data: dict, raw: str | None) -> GenerationMetadata:
    """A JSON object in either of the JSON layouts."""
    return parse_sd_metadata(data, raw) if isinstance(data.get("image"), dict) else parse_metadata(data, raw)


def parse_metadata(data, raw: str | None) -> GenerationMetadata:
    if not isinstance(data, dict):
        raise Unreadable("InvokeAI metadata is not a JSON object")
    model = data.get("model") if isinstance(data.get("model"), dict) else {}
    return GenerationMetadata(
        prompt=as_prompt(data.get("positive_prompt")),
        negative_prompt=as_prompt(data.get("negative_prompt")),
        source="invokeai",
        generator="InvokeAI",
        model_name=as_str(model.get("name", model.get("model_name"))) or as_str(data.get("model")),
        model_hash=as_str(model.get("hash")),
        seed=as_int(data.get("seed")),
        steps=as_int(data.get("steps")),
        sampler=as_str(data.get("scheduler")),
        cfg_scale=as_float(data.get("cfg_scale")),
        width=positive(data.get("width")),
        height=positive(data.get("height")),
        raw=raw,
    )


def split_brackets(text: str) -> tuple[str | None, str | None]:
    """("a cat on a mat", "ugly, blurry") from "a cat [ugly] on a mat [blurry]"."""
    negatives = [m.strip() for m in re.findall(r"\[([^\[\]]*)\]", text) if m.strip()]
    positive_text = re.sub(r"\s*\[[^\[\]]*\]", "", text)
    return positive_text.strip(" ,\n\t") or None, ", ".join(negatives) or None


def parse_sd_metadata(data, raw: str | None) -> GenerationMetadata:
    image = data.get("image") if isinstance(data, dict) else None
    if not isinstance(image, dict):
        raise Unreadable("InvokeAI sd-metadata has no image object")
    prompt = image.get("prompt")
    if isinstance(prompt, list):  # weighted sub-prompts: [{"prompt": ..., "weight": ...}, ...]
        prompt = " ".join(p["prompt"] for p in prompt if isinstance(p, dict) and isinstance(p.get("prompt"), str))
    positive_text, negative = split_brackets(prompt) if isinstance(prompt, str) else (None, None)
    return GenerationMetadata(
        prompt=positive_text,
        negative_prompt=negative,
        source="invokeai",
        generator="InvokeAI",
        model_name=as_str(data.get("model_weights")),
        model_hash=as_str(data.get("model_hash")),
        seed=as_int(image.get("seed")),
        steps=as_int(image.get("steps")),
        sampler=as_str(image.get("sampler")),
        cfg_scale=as_float(image.get("cfg_scale")),
        width=positive(image.get("width")),
        height=positive(image.get("height")),
        raw=raw,
    )


_DREAM_SWITCHES = {
    "-s": "steps", "--steps": "steps", "-S": "seed", "--seed": "seed", "-W": "width", "--width": "width",
    "-H": "height", "--height": "height", "-C": "cfg", "--cfg_scale": "cfg", "-A": "sampler", "--sampler": "sampler",
    "-m": "model", "--model": "model",
}  # fmt: skip
MAX_DREAM_CHARS = 256 * 1024  # shlex is a pure-Python scanner; a real Dream line is a few hundred characters


def parse_dream(text: str) -> GenerationMetadata:
    try:
        tokens = shlex.split(text[:MAX_DREAM_CHARS])
    except ValueError as exc:
        raise Unreadable(f"InvokeAI Dream line unreadable: {exc}") from None
    if not tokens:
        raise Unreadable("InvokeAI Dream line is empty")
    words, values = [], {}
    i = 0
    while i < len(tokens):
        name = _DREAM_SWITCHES.get(tokens[i])
        if name and i + 1 < len(tokens):
            values[name], i = tokens[i + 1], i + 2
        elif tokens[i].startswith("-") and len(tokens[i]) > 1 and words:
            i += 2 if i + 1 < len(tokens) and not tokens[i + 1].startswith("-") else 1  # a switch we do not keep
        else:
            words.append(tokens[i])
            i += 1
    positive_text, negative = split_brackets(" ".join(words))
    return GenerationMetadata(
        prompt=positive_text,
        negative_prompt=negative,
        source="invokeai",
        generator="InvokeAI",
        model_name=as_str(values.get("model")),
        seed=as_int(values.get("seed")),
        steps=as_int(values.get("steps")),
        sampler=as_str(values.get("sampler")),
        cfg_scale=as_float(values.get("cfg")),
        width=positive(values.get("width")),
        height=positive(values.get("height")),
        raw=text,
    )
