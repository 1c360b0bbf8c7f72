"""Draw Things: XMP whose exif:UserComment holds JSON {c (prompt), uc (negative), model, seed, steps, scale,
sampler, size ("512x768")}, with the prompt also in dc:description and "Draw Things" as xmp:CreatorTool."""

from __future__ import annotations

import html

from .base import GenerationMetadata, as_float, as_int, as_prompt, as_str, size_of


def xmp_field(xmp: str, tag: str) -> str | None:
    """The text of the first `tag` element (its first rdf:li when it is an Alt/Seq) or attribute.
    str.find rather than a regex: a lazy `.*?` over a megabyte of unclosed tags is quadratic."""
    start = xmp.find(f"<{tag}")
    while start >= 0 and xmp[start + len(tag) + 1 : start + len(tag) + 2] not in (">", " ", "\n", "\t", "/"):
        start = xmp.find(f"<{tag}", start + 1)
    if start >= 0:
        open_end = xmp.find(">", start)
        close = xmp.find(f"</{tag}>", open_end)
        if open_end >= 0 and close >= 0:
            inner = xmp[open_end + 1 : close]
            li = inner.find("<rdf:li")
            if li >= 0:
                li_end, li_close = inner.find(">", li), inner.find("</rdf:li>", li)
                inner = inner[li_end + 1 : li_close] if 0 <= li_end < li_close else ""
            return html.unescape(inner)
    attr = xmp.find(f' {tag}="')
    if attr < 0:
        attr = xmp.find(f'\n{tag}="')
    if attr >= 0:
        begin = attr + len(tag) + 3
        end = xmp.find('"', begin)
        return html.unescape(xmp[begin:end]) if end >= 0 else None
    return None


def is_drawthings(data: dict) -> bool:
    return isinstance(data.get("c"), str) and ("uc" in data or "scale" in data or "sampler" in data)


def parse(data: dict, raw: str | None, source: str = "drawthings") -> GenerationMetadata:
    width, height = size_of(data.get("size"))
    return GenerationMetadata(
        prompt=as_prompt(data.get("c")),
        negative_prompt=as_prompt(data.get("uc")),
        source=source,
        generator="Draw Things",
        model_name=as_str(data.get("model")),
        seed=as_int(data.get("seed")),
        steps=as_int(data.get("steps")),
        sampler=as_str(data.get("sampler")),
        cfg_scale=as_float(data.get("scale")),
        width=width,
        height=height,
        raw=raw,
    )
