"""What every reader shares: the result type, text sanitising and tolerant number parsing.

Metadata is attacker-controlled text, so readers never trust a type: every value goes
through `as_int` / `as_float` / `as_str`, and every string that leaves the package goes
through `clean` (see `finish`), so the store can always encode it as UTF-8.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field

# Inputs longer than this are cut before parsing: no real generator writes more, and it bounds the work per image.
MAX_INPUT_CHARS = 4 * 1024 * 1024
# Model names, samplers, hashes: short by nature; a longer one is junk that would bloat the store.
MAX_FIELD_CHARS = 1024
MAX_WARNING_CHARS = 300


class Unreadable(Exception):
    """Metadata is present but malformed: the image keeps going, the prompt is lost, the reason is kept."""


@dataclass
class GenerationMetadata:
    prompt: str | None = None
    negative_prompt: str | None = None
    source: str = "none"
    generator: str | None = None
    model_name: str | None = None
    model_hash: str | None = None
    seed: int | None = None
    steps: int | None = None
    sampler: str | None = None
    cfg_scale: float | None = None
    width: int | None = None
    height: int | None = None
    raw: str | None = None
    digital_source_type: str | None = None  # C2PA's IPTC code: what kind of process made it (c2pa.py)
    warnings: list[str] = field(default_factory=list)

    def has_fields(self) -> bool:
        return any(
            v is not None
            for v in (self.negative_prompt, self.model_name, self.model_hash, self.seed, self.steps, self.sampler)
        )


# Lone surrogates (json.loads turns "\udc80" into one) cannot be encoded as UTF-8; C0/C1 controls
# other than \t and \n (NUL above all) break terminals, CSV exports and some database drivers.
_BAD_CHARS = re.compile("[\ud800-\udfff]|[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def clean(text: str) -> str:
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _BAD_CHARS.sub(lambda m: "\ufffd" if m.group() >= "\ud800" else "", text)


def as_text(value) -> str | None:
    """A metadata value as clean text (before parsing, so a NUL cannot break a number). Bytes are UTF-8 with
    replacement; a str that is UTF-8 misread as Latin-1 (Pillow decodes tEXt chunks as Latin-1, but many tools
    write UTF-8 there) is repaired."""
    if isinstance(value, bytes | bytearray):
        return clean(bytes(value[: MAX_INPUT_CHARS * 4]).decode("utf-8", "replace")[:MAX_INPUT_CHARS])
    if not isinstance(value, str):
        return None
    value = value[:MAX_INPUT_CHARS]
    if not value.isascii() and max(value) <= "\xff":
        try:
            value = value.encode("latin-1").decode("utf-8")
        except UnicodeDecodeError:
            pass
    return clean(value)


def load_json(text: str, what: str):
    """json.loads that turns every failure (bad syntax, 100k-deep nesting, 5000-digit ints) into Unreadable."""
    try:
        return json.loads(text)
    except RecursionError:
        raise Unreadable(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise Unreadable(f"{what} is not valid JSON: {exc}") from None


def looks_like_json_object(text: str) -> bool:
    return text.lstrip()[:1] == "{"


def as_int(value) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return int(value) if math.isfinite(value) and value.is_integer() else None
    if isinstance(value, str) and len(value) <= 40:
        value = value.strip()
        if re.fullmatch(r"[+-]?\d+", value):
            return int(value)
        number = as_float(value)
        return int(number) if number is not None and number.is_integer() else None
    return None


def as_float(value) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int | float):
        number = float(value) if abs(value) < 1e300 else math.inf
    elif isinstance(value, str) and len(value) <= 40:
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def as_str(value) -> str | None:
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def as_prompt(value) -> str | None:
    if not isinstance(value, str):
        return None
    return value.strip() or None


def size_of(value) -> tuple[int | None, int | None]:
    """(width, height) from "512x768", "(1024, 1024)", "1024 × 1024" or [w, h]."""
    if isinstance(value, list | tuple) and len(value) == 2:
        return positive(value[0]), positive(value[1])
    if isinstance(value, str):
        found = re.fullmatch(r"\D{0,3}(\d{1,6})\s*(?:x|×|,|\*)\s*(\d{1,6})\D{0,3}", value.strip())
        if found:
            return positive(found.group(1)), positive(found.group(2))
    return None, None


def positive(value) -> int | None:
    number = as_int(value)
    return number if number is not None and number > 0 else None


def finish(md: GenerationMetadata, max_prompt_chars: int, max_raw_chars: int) -> GenerationMetadata:
    """Clean and cap every string, noting each cut: the single exit through which results leave the package."""
    for name, limit in (("prompt", max_prompt_chars), ("negative_prompt", max_prompt_chars), ("raw", max_raw_chars)):
        value = getattr(md, name)
        if value is None or limit <= 0:
            setattr(md, name, None)
            continue
        value = clean(value)
        if len(value) > limit:
            what = "raw metadata" if name == "raw" else name.replace("_", " ")
            md.warnings.append(f"{what} cut at {limit} characters (was {len(value)})")
            value = value[:limit]
        setattr(md, name, value if value.strip() or name == "raw" else None)
    for name in ("generator", "model_name", "model_hash", "sampler", "digital_source_type"):
        value = getattr(md, name)
        if value is not None:
            setattr(md, name, clean(value)[:MAX_FIELD_CHARS].strip() or None)
    md.warnings = [clean(w)[:MAX_WARNING_CHARS] for w in md.warnings]
    return md
