"""Generate the hostile-input corpus: files a scan must either attribute or record in scan_errors, never crash on.

    python -m tests.corpus.build OUT_DIR

`build(out)` returns {file name (as the store displays it): expected}, where expected is
"attributed" or the scan_errors code. Nothing here is a checked-in binary: every case is
made by code, so the corpus documents itself.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

ATTRIBUTED = "attributed"
TOO_LARGE_BYTES = 3 * 1024 * 1024  # the test sets scan.max_file_bytes below this


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


def build(out: str | os.PathLike) -> dict[str, str]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    expected: dict[str, str] = {}

    seeds = iter(range(1000, 2000))

    def fresh() -> Image.Image:
        return _digit(seed=next(seeds))

    def image_case(name: str, image: Image.Image, fmt: str | None = None, **kwargs) -> None:
        image.save(out / name, fmt, **kwargs)
        expected[name] = ATTRIBUTED

    def raw_case(name: str, data: bytes, outcome: str) -> None:
        (out / name).write_bytes(data)
        expected[name] = outcome

    base = _digit()
    png = _png_bytes(base)
    # --- images that must be attributed -------------------------------------------
    image_case("plain.png", fresh(), pnginfo=_a1111("a plain digit"))
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
    expected["animated.webp"] = ATTRIBUTED
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° on display
    image_case("exif_rotated.jpg", fresh().resize((32, 16)), "JPEG", exif=exif.tobytes())
    exif_prompt = Image.Exif()
    exif_prompt.get_ifd(0x8769)[0x9286] = b"UNICODE\x00" + "a jpeg prompt\nSteps: 20".encode("utf-16-be")
    image_case("exif_prompt.jpg", fresh(), "JPEG", exif=exif_prompt.tobytes())
    image_case("UPPER.PNG", fresh())
    raw_case("png_named.jpg", _png_bytes(fresh()), ATTRIBUTED)
    image_case("script_prompt.png", fresh(), pnginfo=_a1111("<script>alert('x')</script> a digit"))
    image_case("sql_prompt.png", fresh(), pnginfo=_a1111("'); DROP TABLE generations; --"))
    image_case("megabyte_prompt.png", fresh())
    (out / "megabyte_prompt.txt").write_text("a very long prompt " * (1024 * 1024 // 19))
    comfy = PngImagePlugin.PngInfo()
    comfy.add_text("prompt", "{not json")
    image_case("bad_comfy_json.png", fresh(), pnginfo=comfy)
    image_case("json_sidecar.png", fresh())
    (out / "json_sidecar.json").write_text(json.dumps({"prompt": "from a json sidecar"}))
    image_case("non_utf8_sidecar.png", fresh())
    (out / "non_utf8_sidecar.txt").write_bytes(b"caf\xe9 prompt")
    odd_names = [b"caf\xe9_latin1.png", b"new\nline.png", "emoji_\U0001f600.png".encode()]
    for raw in odd_names:
        with open(os.path.join(os.fsencode(out), raw), "wb") as fh:
            fh.write(_png_bytes(fresh()))
        expected[raw.decode("utf-8", "backslashreplace")] = ATTRIBUTED
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
    expected["broken_link.png"] = "broken_symlink"
    os.symlink("loop_b.png", out / "loop_a.png")
    os.symlink("loop_a.png", out / "loop_b.png")
    expected["loop_a.png"] = expected["loop_b.png"] = "broken_symlink"
    os.symlink(".", out / "dir_loop")  # a directory loop: must not be followed
    raw_case("unreadable.png", png, "unreadable")
    os.chmod(out / "unreadable.png", 0)
    return expected


if __name__ == "__main__":
    cases = build(sys.argv[1])
    print(f"{len(cases)} cases written to {sys.argv[1]}")
