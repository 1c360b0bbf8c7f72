"""Ingest: find image files and read them safely; the prompt they were made with comes from prompts.py.

Every failure becomes an `IngestError` with a short code and a reason a person can
act on; callers record it and go on (bad input never stops a batch).
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import io
import os
import struct
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from . import prompts

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp"}
EXIF_USER_COMMENT = 0x9286
EXIF_IFD = 0x8769


class IngestError(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def display_path(path: str | bytes | os.PathLike) -> str:
    """A path as valid UTF-8 text for the store: undecodable bytes become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def discover(root: str | os.PathLike) -> list[str]:
    """Image files under root (recursive, sorted). Directory symlinks are not followed, so loops cannot trap the walk;
    file symlinks are returned (a broken one is reported when read)."""
    root = os.fspath(root)
    if os.path.isfile(root):
        return [root]
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        for name in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                found.append(os.path.join(dirpath, name))
    return sorted(found, key=os.fsencode)


@dataclass
class Limits:
    max_pixels: int = 50_000_000
    max_file_bytes: int = 256 * 1024 * 1024


def read_bytes(path: str, limits: Limits) -> bytes:
    if os.path.islink(path) and not os.path.exists(path):
        raise IngestError("broken_symlink", "symlink points to a file that does not exist")
    try:
        size = os.stat(path).st_size
        if os.path.isdir(path):
            raise IngestError("not_a_file", "a directory named like an image")
        if size == 0:
            raise IngestError("empty_file", "file is empty (0 bytes)")
        if size > limits.max_file_bytes:
            raise IngestError(
                "too_large", f"file is {size} bytes, over the {limits.max_file_bytes}-byte limit (scan.max_file_bytes)"
            )
        with open(path, "rb") as fh:
            return fh.read()
    except PermissionError:
        raise IngestError("unreadable", "permission denied") from None
    except OSError as exc:
        if exc.errno == 40:  # ELOOP: a symlink that points at itself
            raise IngestError("broken_symlink", "symlink loop") from None
        raise IngestError("unreadable", f"cannot read: {exc.strerror or exc}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any mode (palette, alpha, CMYK, 16-bit, float) as 8-bit RGB; transparency is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        grey = np.clip(arr / top * 255.0, 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB") if image.mode != "RGB" else image


def decode(data: bytes, limits: Limits) -> tuple[Image.Image, dict]:
    """Decode the first frame as RGB (EXIF orientation applied); returns the image and its text metadata."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size
            if width * height > limits.max_pixels:
                raise IngestError(
                    "too_many_pixels",
                    f"{width}x{height} is over the {limits.max_pixels}-pixel limit (scan.max_pixels); possible decompression bomb",
                )
            info = dict(image.info)
            exif = image.getexif()
            image.load()
            # Stealth metadata lives in the alpha/RGB LSBs, which orientation and the RGB conversion destroy.
            for key in (prompts.STEALTH_KEY, prompts.STEALTH_ERROR_KEY):  # a text chunk must not pose as pixels
                info.pop(key, None)
            if image.format in ("PNG", "WEBP"):
                info.update(prompts.stealth_info(image))
            image = ImageOps.exif_transpose(image)
            rgb = to_rgb(image)
    except IngestError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise IngestError("too_many_pixels", f"decompression bomb refused: {exc}") from None
    except UnidentifiedImageError:
        raise IngestError("not_an_image", "not a readable image (unknown or wrong format)") from None
    except (OSError, SyntaxError, ValueError, EOFError, struct.error) as exc:
        raise IngestError("corrupt", f"corrupt or truncated image: {exc}") from None
    comment = exif.get_ifd(EXIF_IFD).get(EXIF_USER_COMMENT) if exif else None
    if comment is not None:
        info["exif_user_comment"] = comment
    return rgb, info


@dataclass
class Item:
    """One file after ingest: either an image ready for the encoder, or an error, or a skip."""

    path: str  # display path (valid UTF-8)
    sha256: str | None = None
    pixels: np.ndarray | None = None
    width: int = 0
    height: int = 0
    text: str | None = None
    text_source: str = "none"
    skipped: bool = False
    error: IngestError | None = None
    metadata: prompts.GenerationMetadata | None = None  # all the image says about how it was made (generations)


def load_item(
    path: str,
    limits: Limits,
    transform: Callable[[Image.Image], np.ndarray],
    skip: Callable[[str], bool] = lambda sha: False,
    text_of: Callable[[str, dict], prompts.GenerationMetadata | tuple[str | None, str]] = prompts.read_generation,
) -> Item:
    """`text_of` gives the text the encoder embeds: a GenerationMetadata (kept as `item.metadata`; its prompt is the
    text, never its negative prompt) or a (text, source) pair (training captions)."""
    item = Item(display_path(path))
    try:
        data = read_bytes(path, limits)
        item.sha256 = hashlib.sha256(data).hexdigest()
        if skip(item.sha256):
            item.skipped = True
            return item
        image, info = decode(data, limits)
        item.width, item.height = image.size
        described = text_of(path, info)
        if isinstance(described, prompts.GenerationMetadata):
            item.metadata = described
            described = prompts.prompt_of(described)
        item.text, item.text_source = described
        item.pixels = transform(image)
    except IngestError as exc:
        item.error = exc
    except Exception as exc:  # a decoder bug must not stop the batch; record it
        item.error = IngestError("decode_failed", f"{type(exc).__name__}: {exc}")
    return item


def load_all(paths: Iterable[str], threads: int, load: Callable[[str], Item], ahead: int = 0) -> Iterator[Item]:
    """Decode in a thread pool, in order, with bounded read-ahead (at least `ahead` files) so decoding overlaps embedding."""
    window = max(2, threads * 4, ahead)
    with cf.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="audit-load") as pool:
        pending: deque[cf.Future] = deque()
        for path in paths:
            pending.append(pool.submit(load, path))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
