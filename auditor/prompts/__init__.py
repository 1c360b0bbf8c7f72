"""How a generated (or training) image was made, as its own metadata or a sidecar file says.

`read_metadata` returns a `GenerationMetadata`: positive and negative prompt, generator, model, seed, steps,
sampler, CFG scale and size. Readers, in order (the first that yields a prompt wins; the image's own metadata
beats a sidecar):

1. PNG `parameters` chunk: SwarmUI or Fooocus JSON, else AUTOMATIC1111 text (`a1111.py`);
2. NovelAI text chunks (`novelai.py`);
3. InvokeAI `invokeai_metadata`, `sd-metadata`, `Dream` (`invokeai.py`);
4. ComfyUI `prompt` graph, then its `workflow` (`comfyui.py`);
5. Draw Things XMP (`drawthings.py`);
6. EXIF UserComment (JPEG/WebP): any of the JSON shapes, else A1111 text;
7. stealth metadata in the pixels' LSBs (A1111 extension, NovelAI), which `ingest.decode` extracts;
8. `<name>.txt` (A1111 text or a plain prompt), then `<name>.json` (any of the shapes, or {prompt|parameters|caption}).

Then, whatever those found, a C2PA manifest (`c2pa.py`, optional library) adds the digital source type, and the
generator when none was named; alone it makes the source "c2pa" (no prompt: C2PA declares none).

Metadata is untrusted (issue #24): nothing here raises. A reader that meets malformed input records why in
`warnings`; when nothing usable is left the source is "unreadable" (metadata was there) or "none".
"""

from __future__ import annotations

import os

from . import a1111, c2pa, comfyui, drawthings, fooocus, invokeai, novelai, swarmui
from .base import (
    GenerationMetadata,
    Unreadable,
    as_prompt,
    as_text,
    clean,
    finish,
    load_json,
    looks_like_json_object,
)

__all__ = [
    "GenerationMetadata",
    "prompt_of",
    "read_generation",
    "read_metadata",
    "read_prompt",
    "read_sidecar",
    "stealth_info",
]

MAX_PROMPT_CHARS = 65536
MAX_RAW_CHARS = 65536
MAX_SIDECAR_BYTES = 1024 * 1024

STEALTH_KEY = "stealth_metadata"
STEALTH_ERROR_KEY = "stealth_metadata_error"
C2PA_KEY = c2pa.C2PA_KEY


def c2pa_info(data: bytes) -> dict:
    """The entry for a decoded image's info dict that lets `read_metadata` read its C2PA manifest (none without)."""
    return {C2PA_KEY: data} if c2pa.present(data) else {}


def stealth_info(image) -> dict:
    """Stealth metadata of a decoded (not yet RGB-converted) image, as entries for its info dict."""
    try:
        text = a1111.read_stealth(image)
    except Exception as exc:  # pixels are input too: a broken payload must not fail the image
        return {STEALTH_ERROR_KEY: f"stealth metadata unreadable: {exc}"}
    return {STEALTH_KEY: text} if text else {}


def from_json(data, raw: str | None, source: str | None = None, unknown: str = "fooocus") -> GenerationMetadata:
    """A parsed JSON object of any known shape; `source` overrides the reader's own name (sidecars), `unknown`
    names a shape no generator claims (read by the common keys prompt, negative_prompt, seed, ...)."""
    if not isinstance(data, dict):
        raise Unreadable(f"metadata JSON is a {type(data).__name__}, not an object")
    if swarmui.is_swarmui(data):
        return swarmui.parse(data, raw, source or "swarmui")
    if drawthings.is_drawthings(data):
        return drawthings.parse(data, raw, source or "drawthings")
    if novelai.is_novelai(data):
        md = novelai.parse(data, raw)
    elif invokeai.is_invokeai(data):
        md = invokeai.parse(data, raw)
    elif comfyui.is_workflow(data):
        md = comfyui.parse_graph(comfyui.workflow_to_graph(data), raw)
    elif comfyui.is_graph(data):
        md = comfyui.parse_graph(data, raw)
    elif isinstance(data.get("parameters"), str) and not isinstance(data.get("prompt"), str):
        md = _parameters(data["parameters"], fooocus_scheme=None)
    else:
        md = fooocus.parse(data, raw, source or ("fooocus" if fooocus.is_fooocus(data) else unknown))
        md.prompt = md.prompt or as_prompt(data.get("caption"))
    md.source = source or md.source
    return md


def _parameters(text: str, fooocus_scheme: str | None) -> GenerationMetadata:
    if looks_like_json_object(text):
        data = load_json(text, "parameters JSON")
        if isinstance(data, dict) and not swarmui.is_swarmui(data):
            # Fooocus is the generator that writes JSON here; its reader also takes unknown JSON by common keys.
            return fooocus.parse(data, text)
        return from_json(data, text)
    md = a1111.parse(text, "fooocus" if fooocus_scheme else "a1111")
    if fooocus_scheme:
        md.generator = "Fooocus"
    return md


_TEXT_KEYS = ("parameters", "fooocus_scheme", "invokeai_metadata", "sd-metadata", "dream", "prompt", "workflow", "xmp",
              "xml:com.adobe.xmp")  # fmt: skip


def _image_attempts(info: dict, image):
    """Thunks, one per reader that applies, in order of preference; each returns a result or raises."""
    fields = {k.lower(): v for k, v in info.items() if isinstance(k, str)}
    texts = {key: as_text(fields.get(key)) for key in _TEXT_KEYS}
    text = texts.get

    if text("parameters") is not None:
        yield lambda: _parameters(text("parameters"), text("fooocus_scheme"))
    named = {name: fields.get(name.lower()) for name in ("Software", "Description", "Comment", "Source")}
    if novelai.is_novelai(named):
        yield lambda: novelai.parse(named)
    for key, parse in (("invokeai_metadata", invokeai.parse_metadata), ("sd-metadata", invokeai.parse_sd_metadata)):
        if text(key) is not None:
            yield lambda key=key, parse=parse: parse(load_json(text(key), key), text(key))
    if text("dream") is not None:
        yield lambda: invokeai.parse_dream(text("dream"))
    if text("prompt") is not None:
        yield lambda: comfyui.parse_prompt(text("prompt"))
    if text("workflow") is not None:
        yield lambda: comfyui.parse_workflow(text("workflow"))
    xmp = text("xmp") or text("xml:com.adobe.xmp")
    if xmp is not None:
        yield lambda: _drawthings_xmp(xmp)
    if fields.get("exif_user_comment") is not None:
        yield lambda: _exif(fields["exif_user_comment"])
    if image is not None and STEALTH_KEY not in info and STEALTH_ERROR_KEY not in info:
        info = {**info, **stealth_info(image)}
    if STEALTH_ERROR_KEY in info:
        yield lambda: _raise(info[STEALTH_ERROR_KEY])
    elif info.get(STEALTH_KEY) is not None:
        yield lambda: _stealth(as_text(info[STEALTH_KEY]) or "")


def _raise(reason: str):
    raise Unreadable(reason)


def _drawthings_xmp(xmp: str) -> GenerationMetadata | None:
    comment = drawthings.xmp_field(xmp, "exif:UserComment")
    if comment is not None and looks_like_json_object(comment):
        data = load_json(comment, "Draw Things XMP UserComment")
        if isinstance(data, dict) and drawthings.is_drawthings(data):
            return drawthings.parse(data, comment)
    if "Draw Things" in (drawthings.xmp_field(xmp, "xmp:CreatorTool") or ""):
        description = drawthings.xmp_field(xmp, "dc:description") or ""
        md = a1111.parse(description, "drawthings")
        md.generator = "Draw Things"
        return md
    return None  # XMP from a camera or an editor: its description is no prompt


def exif_comment(raw) -> str | None:
    """EXIF UserComment: an 8-byte charset header, then text; "UNICODE" is UTF-16 of either byte order."""
    if isinstance(raw, str):
        return as_text(raw)
    if not isinstance(raw, bytes) or len(raw) < 8:
        return None
    header, body = raw[:8], raw[8:]
    if not header.startswith(b"UNICODE"):
        return as_text(body.rstrip(b"\x00"))
    if body[:2] in (b"\xff\xfe", b"\xfe\xff"):
        encoding, body = ("utf-16-le" if body[:2] == b"\xff\xfe" else "utf-16-be"), body[2:]
    else:
        # No BOM: ASCII-range text has its zero bytes first in big-endian (piexif, A1111) and last in little-endian.
        sample = body[:512]
        encoding = "utf-16-be" if sample[0::2].count(0) >= sample[1::2].count(0) else "utf-16-le"
    return clean(body[: len(body) // 2 * 2].decode(encoding, "replace").rstrip("\x00"))


def _exif(raw) -> GenerationMetadata | None:
    text = exif_comment(raw)
    if not text or not text.strip():
        return None
    if looks_like_json_object(text):
        return from_json(load_json(text, "EXIF UserComment"), text, unknown="exif")
    return a1111.parse(text, "exif")


def _stealth(text: str) -> GenerationMetadata:
    if looks_like_json_object(text):  # NovelAI's stealth payload is its text chunks as one JSON object
        return from_json(load_json(text, "stealth metadata"), text)
    return a1111.parse(text, "a1111_stealth")


def _read_limited(path: str, limit: int) -> tuple[str, bool]:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    cut = len(data) > limit
    text = data[:limit].decode("utf-8", "replace")
    return clean(text.rstrip("\ufffd") if cut else text), cut


def _sidecar_attempts(path: str, max_bytes: int):
    stem = os.path.splitext(path)[0]
    for ext, source in ((".txt", "sidecar_txt"), (".json", "sidecar_json")):
        side = stem + ext
        if os.path.isfile(side):  # not a FIFO or device: reading one could block or never end
            yield lambda side=side, source=source: _sidecar(side, source, max_bytes)


def _sidecar(side: str, source: str, max_bytes: int) -> GenerationMetadata:
    try:
        text, cut = _read_limited(side, max_bytes)
    except OSError as exc:
        raise Unreadable(f"{os.path.basename(side)}: cannot read: {exc.strerror or exc}") from None
    if source == "sidecar_txt":
        md = a1111.parse(text, source)
    else:
        md = from_json(load_json(text, os.path.basename(side)), text, source)
    if cut:
        md.warnings.append(f"{os.path.basename(side)} read only up to {max_bytes} bytes")
    return md


class _Collector:
    def __init__(self):
        self.notes: list[str] = []
        self.broken = False
        self.fallback: GenerationMetadata | None = None

    def first(self, attempts) -> GenerationMetadata | None:
        """The first result with a prompt; keeps the first without one as a fallback, and every failure's reason."""
        for attempt in attempts:
            try:
                md = attempt()
            except Unreadable as exc:
                self.broken = True
                self.notes.append(str(exc))
                continue
            except Exception as exc:  # a reader bug on odd input loses that reader, not the image
                self.broken = True
                self.notes.append(f"metadata reader failed: {type(exc).__name__}: {exc}")
                continue
            if md is None:
                continue
            if md.prompt:
                return md
            if self.fallback is None and md.has_fields():
                self.fallback = md
        return None


def read_metadata(
    path: str | None,
    info: dict | None,
    image=None,
    *,
    max_prompt_chars: int = MAX_PROMPT_CHARS,
    max_raw_chars: int = MAX_RAW_CHARS,
    max_sidecar_bytes: int = MAX_SIDECAR_BYTES,
) -> GenerationMetadata:
    """Everything known about how the image at `path` was made. `info` is `ingest.decode`'s metadata dict;
    `image` (a PIL image with its alpha intact) is only needed for stealth metadata `decode` did not extract."""
    collector = _Collector()
    try:
        md = collector.first(_image_attempts(info if isinstance(info, dict) else {}, image))
        if md is None and path is not None:
            md = collector.first(_sidecar_attempts(os.fsdecode(path), max_sidecar_bytes))
        if md is None:
            md = collector.fallback or GenerationMetadata(source="unreadable" if collector.broken else "none")
        md.warnings[:0] = collector.notes
        if isinstance(info, dict) and isinstance(info.get(C2PA_KEY), bytes):
            _add_c2pa(md, c2pa.read(info[C2PA_KEY]))
        return finish(md, max_prompt_chars, max_raw_chars)
    except Exception as exc:  # the promise is "never raises": the last net under the readers' own
        notes = [*collector.notes, f"metadata reader failed: {type(exc).__name__}: {exc}"]
        return finish(GenerationMetadata(source="unreadable", warnings=notes), max_prompt_chars, max_raw_chars)


def _add_c2pa(md: GenerationMetadata, facts: c2pa.Facts) -> None:
    """C2PA complements the other readers: it never replaces their prompt, generator or raw text."""
    md.warnings.extend(facts.warnings)
    md.generator = md.generator or facts.generator
    md.digital_source_type = facts.digital_source_type
    if facts.found and md.source == "none":
        md.source = "c2pa"
        md.raw = md.raw or facts.raw


def prompt_of(md: GenerationMetadata) -> tuple[str | None, str]:
    """(prompt, source) of a result, as the store's `prompt` and `prompt_source` record it: the source is 'none'
    (or 'unreadable') when no prompt was found, even if other fields were."""
    if md.prompt:
        return md.prompt, md.source
    return None, "unreadable" if md.source == "unreadable" else "none"


def _text_limits(max_chars: int) -> dict:
    # A configured cap above the sidecar read limit must be reachable: UTF-8 takes at most 4 bytes a character.
    return {"max_prompt_chars": max_chars, "max_sidecar_bytes": max(MAX_SIDECAR_BYTES, 4 * max_chars)}


def read_generation(path: str, info: dict, max_chars: int = MAX_PROMPT_CHARS) -> GenerationMetadata:
    """Everything a scan stores about a generated image: prompts cut at `max_chars` ([scan] max_text_chars), the
    raw metadata at MAX_RAW_CHARS, each cut noted in the warnings."""
    return read_metadata(path, info, max_raw_chars=MAX_RAW_CHARS, **_text_limits(max_chars))


def read_prompt(path: str, info: dict, max_chars: int = MAX_PROMPT_CHARS) -> tuple[str | None, str]:
    """(prompt, source) for callers that only want the prompt; (None, 'none') when there is none."""
    return prompt_of(read_metadata(path, info, max_raw_chars=0, **_text_limits(max_chars)))


def read_sidecar(path: str, max_chars: int = MAX_PROMPT_CHARS) -> tuple[str | None, str]:
    """(prompt, source) from `<name>.txt` or `<name>.json` beside `path` only (training captions)."""
    return prompt_of(read_metadata(path, None, max_raw_chars=0, **_text_limits(max_chars)))


def parse_a1111(text: str) -> str:
    """The positive prompt of an AUTOMATIC1111 `parameters` text (kept for existing callers)."""
    return a1111.split(text)[0]


def parse_comfyui(text: str) -> str | None:
    """The positive prompt of a ComfyUI `prompt` graph, None when unreadable (kept for existing callers)."""
    try:
        return finish(comfyui.parse_prompt(text), MAX_PROMPT_CHARS, 0).prompt
    except Exception:
        return None
