"""AUTOMATIC1111 (and its forks') `parameters` text, and the "stealth" copy of it hidden in pixel LSBs.

The text is the prompt, an optional `Negative prompt:` block, then one settings line:
`Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x768, Model hash: abcdef1234, Model: name, ...`
where a value containing commas is JSON-quoted.
"""

from __future__ import annotations

import json
import re
import zlib

import numpy as np

from .base import GenerationMetadata, Unreadable, as_float, as_int, as_str, size_of

# Keys that only a settings line has: a prompt line that merely contains "a: b, c: d, e: f" is not one.
_SETTINGS_KEYS = {"Steps", "Sampler", "CFG scale", "Seed", "Size", "Model hash", "Model"}
_KEY = re.compile(r"\w[\w \-/]{0,63}")


def parse_settings(line: str) -> dict[str, str]:
    """`Key: value, Key: "quoted, value", ...` as a dict. A hand-written scanner rather than A1111's regex:
    that regex backtracks quadratically on a long line without colons, and lines here can be megabytes."""
    out: dict[str, str] = {}
    pos, n = 0, len(line)
    no_close_quote_after = n + 1  # once a quote has no closing partner, no later quote has one either
    while pos < n:
        while pos < n and line[pos] in " \t,":
            pos += 1
        key = _KEY.match(line, pos)
        colon = key.end() if key else -1
        if not key or colon >= n or line[colon] != ":":
            comma = line.find(",", pos)
            pos = n if comma < 0 else comma + 1
            continue
        pos = colon + 1
        while pos < n and line[pos] == " ":
            pos += 1
        value = None
        if pos < n and line[pos] == '"' and pos < no_close_quote_after:
            end = _closing_quote(line, pos + 1)
            if end < 0:
                no_close_quote_after = pos
            elif end + 1 == n or line[end + 1] == ",":
                try:
                    value = json.loads(line[pos : end + 1])
                except ValueError:
                    value = line[pos + 1 : end]
                pos = end + 1
        if value is None:
            comma = line.find(",", pos)
            comma = n if comma < 0 else comma
            value, pos = line[pos:comma].strip(), comma
        out[key.group().strip()] = value
    return out


def _closing_quote(line: str, start: int) -> int:
    while True:
        end = line.find('"', start)
        if end < 0:
            return -1
        backslashes = len(line[start:end]) - len(line[start:end].rstrip("\\"))
        if backslashes % 2 == 0:
            return end
        start = end + 1


def _is_settings_line(line: str) -> bool:
    if line.startswith("Steps:"):
        return True
    if len(line) > 65536 or line.count(":") < 3:
        return False
    settings = parse_settings(line)
    return len(settings) >= 3 and len(_SETTINGS_KEYS & settings.keys()) >= 2


def split(text: str) -> tuple[str, str | None, dict[str, str]]:
    """(prompt, negative prompt, settings) of a `parameters` text."""
    lines = text.strip().split("\n")
    settings: dict[str, str] = {}
    # The settings line is the last one, but extensions (dynamic prompts) may append lines after it.
    for i in range(len(lines) - 1, max(-1, len(lines) - 5), -1):
        if _is_settings_line(lines[i].strip()):
            settings = parse_settings(lines[i].strip())
            lines = lines[:i]
            break
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if not in_negative and line.startswith("Negative prompt:"):
            in_negative, line = True, line[len("Negative prompt:") :]
        (negative if in_negative else prompt).append(line)
    return "\n".join(prompt).strip(), "\n".join(negative).strip() or None, settings


def looks_like_a1111(text: str) -> bool:
    _, negative, settings = split(text)
    return bool(settings) or negative is not None


def parse(text: str, source: str = "a1111") -> GenerationMetadata:
    prompt, negative, settings = split(text)
    width, height = size_of(settings.get("Size"))
    version = as_str(settings.get("Version")) or ""
    generator = "AUTOMATIC1111"
    if version.startswith("Fooocus"):
        generator = "Fooocus"
    elif re.match(r"f\d", version):
        generator = "Forge"
    elif settings.get("Model") is None and settings.get("Steps") is None and not negative:
        generator = None  # plain text: nothing says A1111 wrote it
    return GenerationMetadata(
        prompt=prompt or None,
        negative_prompt=negative,
        source=source,
        generator=generator,
        model_name=as_str(settings.get("Model")),
        model_hash=as_str(settings.get("Model hash")),
        seed=as_int(settings.get("Seed")),
        steps=as_int(settings.get("Steps")),
        sampler=as_str(settings.get("Sampler")),
        cfg_scale=as_float(settings.get("CFG scale")),
        width=width,
        height=height,
        raw=text,
    )


# Stealth metadata (the stealth-pnginfo extension; NovelAI writes it too): a signature, a 32-bit big-endian
# payload length in bits, then the payload, one bit per pixel in the alpha LSB (or three per pixel in the
# RGB LSBs), pixels taken column by column. "comp" signatures mean the payload is gzip-compressed.
_SIGNATURES = {
    "alpha": {b"stealth_pnginfo": False, b"stealth_pngcomp": True},
    "rgb": {b"stealth_rgbinfo": False, b"stealth_rgbcomp": True},
}
_HEADER_BITS = 15 * 8 + 32
MAX_STEALTH_BYTES = 2 * 1024 * 1024
MAX_STEALTH_TEXT = 4 * 1024 * 1024


def _lsbs(image, channels: list[int], nbits: int) -> np.ndarray:
    width, height = image.size
    columns = min(width, -(-nbits // (height * len(channels))))
    pixels = np.asarray(image.crop((0, 0, columns, height)))
    return (pixels[:, :, channels].transpose(1, 0, 2).reshape(-1) & 1)[:nbits]


def read_stealth(image) -> str | None:
    """The stealth payload of an RGBA or RGB image as text; None without a signature; Unreadable if broken."""
    if image.mode not in ("RGBA", "RGB") or image.width * image.height < _HEADER_BITS:
        return None
    modes = (["alpha"] if image.mode == "RGBA" else []) + ["rgb"]
    for mode in modes:
        channels = [3] if mode == "alpha" else [0, 1, 2]
        header = _lsbs(image, channels, _HEADER_BITS)
        compressed = _SIGNATURES[mode].get(np.packbits(header[:120]).tobytes())
        if compressed is None:
            continue
        nbits = int.from_bytes(np.packbits(header[120:]).tobytes(), "big")
        available = image.width * image.height * len(channels) - _HEADER_BITS
        if nbits > available or nbits > MAX_STEALTH_BYTES * 8:
            raise Unreadable(
                f"stealth metadata claims {nbits} bits; the image holds {available} (cap {MAX_STEALTH_BYTES} bytes)"
            )
        payload = np.packbits(_lsbs(image, channels, _HEADER_BITS + nbits)[_HEADER_BITS:]).tobytes()
        if compressed:
            try:
                payload = zlib.decompressobj(wbits=31).decompress(payload, MAX_STEALTH_TEXT)
            except zlib.error as exc:
                raise Unreadable(f"stealth metadata is not valid gzip: {exc}") from None
        return payload.decode("utf-8", "replace")
    return None
