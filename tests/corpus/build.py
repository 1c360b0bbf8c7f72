"""Generate the hostile-input corpus: files a scan must either attribute or record in scan_errors, never crash on.

    python -m tests.corpus.build OUT_DIR

`build(out)` returns {file name (as the store displays it): Case}: "attributed" with the prompt source and prompt
its generation_files row must hold, or the scan_errors code (including `unsupported`, and `unreadable` for a folder
that cannot be listed). Nothing here is a checked-in binary: every case is made by code, so the corpus documents
itself. Text beside the images (sidecars, notes, hidden files) is neither attributed nor reported: not a case.
"""

from __future__ import annotations

import io
import json
import os
import socket
import struct
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin, features

ATTRIBUTED = "attributed"
TOO_LARGE_BYTES = 3 * 1024 * 1024  # the test sets scan.max_file_bytes below this
PROMPT_CAP = 65536  # [scan] max_text_chars: a longer prompt is stored cut to this
DEEP_LEVELS = 1100  # one-character folder names: about 2,200 characters of path, under PATH_MAX (4096)
NESTING = 100_000


@dataclass(frozen=True)
class Case:
    outcome: str  # ATTRIBUTED or the scan_errors code
    source: str | None = None  # attributed: the file's prompt_source
    prompt: str | None = None  # attributed: the prompt stored for the file (None: no prompt)


def _exif_comment(body: bytes) -> bytes:
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + body
    return exif.tobytes()


def _comfy_graph(text: str) -> str:
    return json.dumps(
        {
            "1": {"class_type": "CLIPTextEncode", "inputs": {"text": text}},
            "2": {"class_type": "KSampler", "inputs": {"positive": ["1", 0]}},
        }
    )


def _digit(size=32, seed=0) -> Image.Image:
    """A stroke whose colour and position depend on seed, so cases do not share pixels (one sha256 = one generation)."""
    rng = np.random.default_rng(seed)
    arr = np.full((size, size, 3), 240, np.uint8)
    x = int(rng.integers(4, size - 8))
    arr[size // 4 : 3 * size // 4, x : x + 4] = rng.integers(0, 120, 3)
    arr[int(rng.integers(0, size)), int(rng.integers(0, size))] = rng.integers(0, 256, 3)
    return Image.fromarray(arr, "RGB")


def _png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **kwargs)
    return buffer.getvalue()


def _a1111(prompt: str) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", f"{prompt}\nNegative prompt: \nSteps: 20, Sampler: DDIM, CFG scale: 4, Seed: 1")
    return info


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header declaring a gigantic canvas over a few bytes of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def build(out: str | os.PathLike) -> dict[str, Case]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, Case] = {}

    seeds = iter(range(1000, 2000))

    def fresh() -> Image.Image:
        return _digit(seed=next(seeds))

    def image_case(name: str, image: Image.Image, fmt: str | None = None, source="none", prompt=None, **kwargs) -> None:
        image.save(out / name, fmt, **kwargs)
        expected[name] = Case(ATTRIBUTED, source, prompt)

    def raw_case(name: str, data: bytes, outcome: str, source="none", prompt=None) -> None:
        (out / name).write_bytes(data)
        expected[name] = Case(outcome, source, prompt) if outcome == ATTRIBUTED else Case(outcome)

    def chunk_case(name: str, kind: bytes, key: str, data: bytes, source: str, prompt: str | None) -> None:
        info = PngImagePlugin.PngInfo()
        info.add(kind, key.encode("latin-1") + (b"\x00\x00\x00\x00\x00" if kind == b"iTXt" else b"\x00") + data)
        image_case(name, fresh(), source=source, prompt=prompt, pnginfo=info)

    def sidecar_case(name: str, sidecar: str, data: bytes, source: str, prompt: str | None) -> None:
        image_case(name, fresh(), source=source, prompt=prompt)
        (out / (Path(name).stem + sidecar)).write_bytes(data)

    base = _digit()
    png = _png_bytes(base)
    # --- images that must be attributed -------------------------------------------
    image_case("plain.png", fresh(), source="a1111", prompt="a plain digit", pnginfo=_a1111("a plain digit"))
    image_case("one_by_one.png", Image.new("RGB", (1, 1), (10, 20, 30)))
    image_case("wide_strip.png", fresh().resize((400, 8)))
    image_case("cmyk.jpg", fresh().convert("CMYK"), "JPEG")
    image_case("grey16.png", Image.fromarray(np.asarray(fresh().convert("L"), np.uint16) * 257).convert("I;16"))
    image_case("paletted.png", fresh().convert("P", palette=Image.ADAPTIVE, colors=16))
    paletted = fresh().convert("P", palette=Image.ADAPTIVE, colors=16)
    paletted.info["transparency"] = 0
    image_case("paletted_transparent.png", paletted, transparency=0)
    rgba = fresh().convert("RGBA")
    rgba.putalpha(128)
    image_case("rgba.png", rgba)
    image_case("grey_alpha.png", fresh().convert("LA"))
    image_case("grey.png", fresh().convert("L"))
    image_case("bilevel.png", fresh().convert("1"))
    image_case("static.webp", fresh(), "WEBP", lossless=True)
    frames = [fresh() for _ in range(3)]
    frames[0].save(out / "animated.webp", "WEBP", save_all=True, append_images=frames[1:], duration=100)
    expected["animated.webp"] = Case(ATTRIBUTED, "none")
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    image_case("exif_rotated.jpg", fresh().resize((32, 16)), "JPEG", exif=exif.tobytes())
    exif_prompt = _exif_comment("a jpeg prompt\nSteps: 20".encode("utf-16-be"))
    image_case("exif_prompt.jpg", fresh(), "JPEG", source="exif", prompt="a jpeg prompt", exif=exif_prompt)
    image_case("UPPER.PNG", fresh())
    raw_case("png_named.jpg", _png_bytes(fresh()), ATTRIBUTED)
    script, sql = "<script>alert('x')</script> a digit", "'); DROP TABLE generations; --"
    image_case("script_prompt.png", fresh(), source="a1111", prompt=script, pnginfo=_a1111(script))
    image_case("sql_prompt.png", fresh(), source="a1111", prompt=sql, pnginfo=_a1111(sql))
    long_prompt = "a very long prompt " * (1024 * 1024 // 19)
    sidecar_case("megabyte_prompt.png", ".txt", long_prompt.encode(), "sidecar_txt", long_prompt[:PROMPT_CAP].strip())
    chunk_case("bad_comfy_json.png", b"tEXt", "prompt", b"{not json", "unreadable", None)
    json_prompt = json.dumps({"prompt": "from a json sidecar"}).encode()
    sidecar_case("json_sidecar.png", ".json", json_prompt, "sidecar_json", "from a json sidecar")
    sidecar_case("non_utf8_sidecar.png", ".txt", b"caf\xe9 prompt", "sidecar_txt", "caf\ufffd prompt")
    odd_names = [b"caf\xe9_latin1.png", b"new\nline.png", "emoji_\U0001f600.png".encode()]
    for raw in odd_names:
        with open(os.path.join(os.fsencode(out), raw), "wb") as fh:
            fh.write(_png_bytes(fresh()))
        expected[raw.decode("utf-8", "backslashreplace")] = Case(ATTRIBUTED, "none")
    # Formats beyond PNG/JPEG/WebP: the first frame of an animation or a multi-page TIFF.
    image_case("static.gif", fresh().convert("P", palette=Image.ADAPTIVE, colors=16), "GIF")
    gif_frames = [fresh().convert("P", palette=Image.ADAPTIVE, colors=16) for _ in range(3)]
    gif_frames[0].save(out / "animated.gif", "GIF", save_all=True, append_images=gif_frames[1:], duration=100, loop=0)
    expected["animated.gif"] = Case(ATTRIBUTED, "none")
    image_case("plain.bmp", fresh(), "BMP")
    image_case("plain.tiff", fresh(), "TIFF")
    pages = [fresh() for _ in range(2)]
    pages[0].save(out / "multipage.tif", "TIFF", save_all=True, append_images=pages[1:])
    expected["multipage.tif"] = Case(ATTRIBUTED, "none")
    if features.check("avif"):
        image_case("plain.avif", fresh(), "AVIF")
    # Identical bytes under two names: one generation, each file keeps its own sidecar's prompt.
    twin = _png_bytes(fresh())
    for name, prompt in (("dup_first.png", "the first file's prompt"), ("dup_second.png", "the second file's prompt")):
        raw_case(name, twin, ATTRIBUTED, "sidecar_txt", prompt)
        (out / (Path(name).stem + ".txt")).write_text(prompt)
    # Lone surrogates (UTF-16 halves, invalid in UTF-8) in every text source.
    surrogate = b"a \xed\xa0\x80 cat"  # U+D800 as if UTF-8 encoded
    chunk_case("surrogate_text.png", b"tEXt", "parameters", surrogate, "a1111", "a \xed\xa0 cat")  # Latin-1, C1 cut
    chunk_case("surrogate_itxt.png", b"iTXt", "parameters", surrogate, "none", None)  # Pillow drops bad UTF-8 iTXt
    body = "a ".encode("utf-16-be") + b"\xd8\x00" + " cat".encode("utf-16-be")
    image_case("surrogate_exif.jpg", fresh(), "JPEG", source="exif", prompt="a \ufffd cat", exif=_exif_comment(body))
    sidecar_case("surrogate_txt.png", ".txt", surrogate, "sidecar_txt", "a \ufffd\ufffd\ufffd cat")
    escaped = b'{"prompt": "a \\ud800 cat"}'  # JSON's escape for a lone surrogate
    sidecar_case("surrogate_json.png", ".json", escaped, "sidecar_json", "a \ufffd cat")
    comfy_escaped = _comfy_graph("a \ud800 cat").encode()
    chunk_case("surrogate_comfy.png", b"tEXt", "prompt", comfy_escaped, "comfyui", "a \ufffd cat")
    # Prompts that look like markup (rich, BBCode) are text: stored and shown as they are.
    for name, prompt in (
        ("markup_brackets.png", "a [cat:dog:0.5] on [white] paper"),
        ("markup_close.png", "x [/bold] y"),
    ):
        image_case(name, fresh(), source="a1111", prompt=prompt, pnginfo=_a1111(prompt))
    # Metadata over the caps: stored cut, or left unread; the image is attributed either way.
    huge = "".join(f"word{n} " for n in range(400_000))  # about 4.4 MB of text, over the sidecar read limit
    sidecar_case("huge_sidecar.png", ".txt", huge.encode(), "sidecar_txt", huge[:PROMPT_CAP].strip())
    chunk_case("huge_comfy.png", b"tEXt", "prompt", _comfy_graph(huge[:2_000_000]).encode(), "comfyui",
               huge[:PROMPT_CAP])  # fmt: skip
    info = PngImagePlugin.PngInfo()
    info.add(b"zTXt", b"parameters\x00\x00" + zlib.compress(b"y" * 5_000_000))  # inflates past Pillow's 1 MiB limit
    image_case("ztxt_bomb.png", fresh(), source="unreadable", prompt=None, pnginfo=info)
    nested = "[" * NESTING + "]" * NESTING
    chunk_case("deep_comfy.png", b"tEXt", "prompt", ('{"1": ' + nested + "}").encode(), "unreadable", None)
    sidecar_case("deep_json.png", ".json", ('{"prompt": ' + nested + "}").encode(), "unreadable", None)
    # A tree deeper than Python's recursion limit.
    deep = str(out)
    for _ in range(DEEP_LEVELS):  # os.makedirs recurses once per level
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    Path(deep, "deep.png").write_bytes(_png_bytes(fresh()))
    expected["deep.png"] = Case(ATTRIBUTED, "none")
    # Beside the images, never counted: sidecars without an image, notes, logs, hidden files, OS litter.
    for name in ("orphan.txt", "orphan.json", "orphan.caption", "notes.md", "log.csv", ".DS_Store", "Thumbs.db"):
        (out / name).write_bytes(b"not an image")
    # --- files that must land in scan_errors --------------------------------------
    raw_case("empty.png", b"", "empty_file")
    raw_case("truncated.png", png[: len(png) // 2], "corrupt")
    jpeg = io.BytesIO()
    base.resize((256, 256)).save(jpeg, "JPEG", quality=95)
    raw_case("truncated.jpg", jpeg.getvalue()[: len(jpeg.getvalue()) // 2], "corrupt")
    raw_case("signature_only.png", b"\x89PNG\r\n\x1a\n", "not_an_image")
    raw_case("text.png", b"this is not an image, just text\n", "not_an_image")
    raw_case("garbage.webp", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not_an_image")
    raw_case("bomb.png", _bomb_png(20_000, 20_000), "too_many_pixels")
    raw_case("huge_file.png", png + b"\x00" * TOO_LARGE_BYTES, "too_large")
    os.symlink(out / "does_not_exist.png", out / "broken_link.png")
    expected["broken_link.png"] = Case("broken_symlink")
    os.symlink("loop_b.png", out / "loop_a.png")
    os.symlink("loop_a.png", out / "loop_b.png")
    expected["loop_a.png"] = expected["loop_b.png"] = Case("broken_symlink")
    os.symlink(".", out / "dir_loop")  # a directory loop: must not be followed
    raw_case("unreadable.png", png, "unreadable")
    os.chmod(out / "unreadable.png", 0)
    # Not regular files: never opened (a FIFO would block the read forever).
    os.mkfifo(out / "fifo.png")
    expected["fifo.png"] = Case("not_a_file")
    os.symlink("/dev/null", out / "devnull.png")
    expected["devnull.png"] = Case("not_a_file")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(out / "socket.png"))
    expected["socket.png"] = Case("not_a_file")
    os.mkdir(out / "a_folder")
    os.symlink("a_folder", out / "folder_link.png")
    expected["folder_link.png"] = Case("not_a_file")
    image_case("fifo_sidecar.png", fresh())
    os.mkfifo(out / "fifo_sidecar.txt")  # a FIFO where the sidecar would be: not read, so no prompt
    # A folder the scan cannot list: recorded, not silently skipped.
    (out / "locked").mkdir()
    (out / "locked" / "inside.png").write_bytes(_png_bytes(fresh()))
    os.chmod(out / "locked", 0)
    expected["locked"] = Case("unreadable")
    # Files of a type the scan does not read: counted and listed.
    for name, data in (("clip.mp4", b"\x00\x00\x00\x18ftypmp42"), ("photo.heic", b"\x00\x00\x00\x18ftypheic"),
                       ("model.safetensors", b"{}"), ("no_extension", b"\x89PNG")):  # fmt: skip
        raw_case(name, data, "unsupported")
    return expected


if __name__ == "__main__":
    cases = build(sys.argv[1])
    print(f"{len(cases)} cases written to {sys.argv[1]}")
