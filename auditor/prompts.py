"""The prompt a generated (or training) image was made with, as its file or a sidecar says.

Sources, in order: an AUTOMATIC1111 `parameters` text chunk, a ComfyUI `prompt` graph,
an EXIF UserComment, then `<name>.txt` / `<name>.json` beside the image. Each reader
returns (prompt, source); (None, "none") when nothing usable is found.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def parse_a1111(text: str) -> str:
    """The positive prompt of an AUTOMATIC1111 `parameters` text: everything before the negative prompt / settings lines."""
    lines = text.strip("\n").split("\n")
    if lines and lines[-1].startswith("Steps:"):
        lines = lines[:-1]
    prompt = []
    for line in lines:
        if line.startswith("Negative prompt:"):
            break
        prompt.append(line)
    return "\n".join(prompt).strip()


def parse_comfyui(text: str) -> str | None:
    """The positive prompt of a ComfyUI `prompt` graph: the text node wired to a sampler's `positive` input."""
    try:
        graph = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(graph, dict):
        return None
    nodes = {str(k): v for k, v in graph.items() if isinstance(v, dict)}

    def text_of(node_id, depth=0):
        node = nodes.get(str(node_id))
        if not node or depth > 8:
            return None
        inputs = node.get("inputs", {})
        for key in ("text", "text_g", "prompt"):
            if isinstance(inputs.get(key), str):
                return inputs[key]
        # Follow a conditioning chain (e.g. ConditioningCombine) to its first text.
        for value in inputs.values():
            if isinstance(value, list) and value and str(value[0]) in nodes:
                found = text_of(value[0], depth + 1)
                if found:
                    return found
        return None

    for node in nodes.values():
        positive = node.get("inputs", {}).get("positive")
        if "Sampler" in str(node.get("class_type", "")) and isinstance(positive, list) and positive:
            found = text_of(positive[0])
            if found:
                return found
    for node in nodes.values():
        if node.get("class_type") == "CLIPTextEncode" and isinstance(node.get("inputs", {}).get("text"), str):
            return node["inputs"]["text"]
    return None


def _exif_comment(raw) -> str | None:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, bytes) and len(raw) >= 8:
        header, body = raw[:8], raw[8:]
        if header.startswith(b"UNICODE"):
            for encoding in ("utf-16-be", "utf-16-le"):
                try:
                    return body.decode(encoding)
                except UnicodeDecodeError:
                    continue
        return body.decode("utf-8", "replace")
    return None


def read_sidecar(path: str) -> tuple[str | None, str]:
    """Prompt from `<name>.txt` or `<name>.json` next to the image."""
    stem = os.path.splitext(path)[0]
    for ext, source in ((".txt", "sidecar_txt"), (".json", "sidecar_json")):
        side = stem + ext
        if not os.path.isfile(side):
            continue
        try:
            text = Path(side).read_bytes().decode("utf-8", "replace")
        except OSError:
            continue
        if ext == ".txt":
            prompt = parse_a1111(text) if "\nSteps:" in text else text.strip()
            if prompt:
                return prompt, source
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                continue
            if isinstance(data, dict):
                for key in ("prompt", "parameters", "caption"):
                    if isinstance(data.get(key), str) and data[key].strip():
                        value = data[key]
                        return (parse_a1111(value) if key == "parameters" else value.strip()), source
    return None, "none"


def read_prompt(path: str, info: dict) -> tuple[str | None, str]:
    """(prompt, source): PNG/WebP text chunks first, then EXIF UserComment, then sidecar files; else (None, 'none')."""
    params = info.get("parameters")
    if isinstance(params, str) and parse_a1111(params):
        return parse_a1111(params), "a1111"
    comfy = info.get("prompt")
    if isinstance(comfy, str):
        found = parse_comfyui(comfy)
        if found:
            return found, "comfyui"
    comment = _exif_comment(info.get("exif_user_comment"))
    if comment and parse_a1111(comment):
        return parse_a1111(comment), "exif"
    return read_sidecar(path)
