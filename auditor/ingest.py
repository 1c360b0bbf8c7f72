"""Ingest: find image files and read them safely; the prompt they were made with comes from prompts.py.

Every failure becomes an `IngestError` with a short code and a reason a person can
act on; callers record it and go on (bad input never stops a batch).
"""

from __future__ import annotations

import concurrent.futures as cf
import errno
import hashlib
import io
import os
import stat
import struct
import warnings
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError, features

from . import prompts

# What Pillow decodes (first frame of an animation or a multi-page TIFF); AVIF where this Pillow build has it.
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
if features.check("avif"):
    IMAGE_EXTENSIONS.add(".avif")
# Files beside the images that are not images and never will be: sidecars (the prompt readers' .txt and .json, kohya's
# .caption), logs and notes. A scan neither attributes nor reports them; every other file it cannot read it counts.
TEXT_EXTENSIONS = {".txt", ".json", ".caption", ".csv", ".log", ".md", ".yaml", ".yml", ".toml", ".ini", ".xmp"}
# Operating-system litter (hidden files such as .DS_Store and ._name AppleDouble files are skipped by name).
LITTER_NAMES = {"thumbs.db", "desktop.ini"}
EXIF_USER_COMMENT = 0x9286
EXIF_IFD = 0x8769
T = TypeVar("T")
R = TypeVar("R")


class IngestError(Exception):
    def __init__(self, code: str, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def display_path(path: str | bytes | os.PathLike) -> str:
    """A path as valid UTF-8 text for the store: undecodable bytes become \\xNN escapes."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


@dataclass
class Discovery:
    """What a walk found: image files to read, files of a type the scan cannot read, folders it could not list."""

    images: list[str]
    unsupported: list[tuple[str, str]]  # (path, reason)
    unlisted: list[tuple[str, str]]  # (folder, reason)


def discover(root: str | os.PathLike) -> list[str]:
    """Image files under root (recursive, sorted by their bytes). Directory symlinks are not followed, so loops cannot
    trap the walk; file symlinks are returned (a broken one is reported when read)."""
    return walk(root).images


def walk(root: str | os.PathLike) -> Discovery:
    """Everything under root, sorted by path bytes: images, unsupported files, unlistable folders. Iterative (an
    explicit stack), so a tree thousands of levels deep cannot exhaust the interpreter's recursion limit."""
    root = os.fspath(root)
    if os.path.isfile(root):
        return Discovery([root], [], [])
    if not os.path.isdir(root):
        raise FileNotFoundError(root)
    found = Discovery([], [], [])
    stack = [root]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = list(it)
        except OSError as exc:
            found.unlisted.append(
                (folder, f"cannot list this folder: {exc.strerror or exc}; its files were not scanned")
            )
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
            except OSError:
                is_dir = False
            if is_dir:
                stack.append(entry.path)
                continue
            extension = os.path.splitext(entry.name)[1].lower()
            if extension in IMAGE_EXTENSIONS:
                found.images.append(entry.path)  # a symlink to a folder too: reported as not_a_file when read
            elif not _ignorable(entry, extension):
                kind = f"{extension} files" if extension else "files without an extension"
                found.unsupported.append((entry.path, f"not an image the scan reads ({kind})"))
    found.images.sort(key=os.fsencode)
    found.unsupported.sort(key=lambda pair: os.fsencode(pair[0]))
    found.unlisted.sort(key=lambda pair: os.fsencode(pair[0]))
    return found


def _ignorable(entry: os.DirEntry, extension: str) -> bool:
    """Text beside the images, hidden files, OS litter, and symlinks to folders (never followed): not unsupported."""
    if extension in TEXT_EXTENSIONS or entry.name.startswith(".") or entry.name.lower() in LITTER_NAMES:
        return True
    try:
        return entry.is_symlink() and entry.is_dir()
    except OSError:
        return False


@dataclass
class Limits:
    max_pixels: int = 50_000_000
    max_file_bytes: int = 256 * 1024 * 1024
    max_text_chars: int = prompts.MAX_PROMPT_CHARS


_NOT_REGULAR = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
)


def _not_regular(mode: int) -> IngestError | None:
    if stat.S_ISREG(mode):
        return None
    what = next((name for test, name in _NOT_REGULAR if test(mode)), "not a regular file")
    return IngestError("not_a_file", f"{what} named like an image, not a regular file")


def read_bytes(path: str, limits: Limits) -> bytes:
    """The file's bytes. Only a regular file is ever opened: a FIFO would block the read forever and a device could
    be endless or act on open; the type is checked before opening and again on the open descriptor (O_NONBLOCK, so
    a FIFO swapped in between cannot block the open either)."""
    if os.path.islink(path) and not os.path.exists(path):
        raise IngestError("broken_symlink", "symlink points to a file that does not exist")
    try:
        error = _not_regular(os.stat(path).st_mode)
        if error:
            raise error
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
        with open(fd, "rb", closefd=True) as fh:
            info = os.fstat(fd)
            error = _not_regular(info.st_mode)
            if error:
                raise error
            if info.st_size == 0:
                raise IngestError("empty_file", "file is empty (0 bytes)")
            if info.st_size > limits.max_file_bytes:
                raise IngestError(
                    "too_large",
                    f"file is {info.st_size} bytes, over the {limits.max_file_bytes}-byte limit (scan.max_file_bytes)",
                )
            return fh.read()
    except PermissionError:
        raise IngestError("unreadable", "permission denied") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # a symlink that points at itself
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


# Pillow refuses a whole PNG whose compressed text chunk inflates past PngImagePlugin.MAX_TEXT_CHUNK (1 MiB) or whose
# text chunks add up past MAX_TEXT_MEMORY: a metadata bomb. The pixels are still good, so they are decoded without it.
_PNG_TEXT_BOMB = ("MAX_TEXT_CHUNK", "MAX_TEXT_MEMORY")
_PNG_TEXT_CHUNKS = {b"tEXt", b"zTXt", b"iTXt"}
METADATA_ERROR_KEY = prompts.STEALTH_ERROR_KEY  # an info entry the prompt readers report as "unreadable"


def _without_png_text(data: bytes) -> bytes | None:
    """The PNG with its text chunks left out; None when the chunk structure cannot be walked."""
    if not data.startswith(b"\x89PNG\r\n\x1a\n"):
        return None
    parts, pos = [data[:8]], 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos : pos + 8])
        end = pos + 12 + length
        if end > len(data):
            return None
        if kind not in _PNG_TEXT_CHUNKS:
            parts.append(data[pos:end])
        pos = end
        if kind == b"IEND":
            break
    return b"".join(parts)


def decode(data: bytes, limits: Limits, reduce_to: int = 0) -> tuple[Image.Image, dict]:
    """Decode the first frame as RGB (EXIF orientation applied); returns the image and its text metadata.

    `reduce_to` > 0: a JPEG may be decoded at a DCT scale of 1/2, 1/4 or 1/8 whose shorter side stays at least
    `reduce_to` pixels (`decode_sized` gives the full size as well)."""
    image, info, _ = decode_sized(data, limits, reduce_to)
    return image, info


def decode_sized(data: bytes, limits: Limits, reduce_to: int = 0) -> tuple[Image.Image, dict, tuple[int, int]]:
    """`decode`, plus the image's full (declared, oriented) size, which a reduced decode makes smaller than the
    image it returns."""
    try:
        return _decode(data, limits, reduce_to)
    except IngestError as exc:
        stripped = _without_png_text(data) if any(word in exc.reason for word in _PNG_TEXT_BOMB) else None
        if stripped is None:
            raise
        image, info, size = _decode(stripped, limits, reduce_to)
        info.update(prompts.c2pa_info(data))  # the manifest signs the file as it is, text chunks and all
        if prompts.STEALTH_KEY not in info:  # metadata hidden in the pixels is still read
            info[METADATA_ERROR_KEY] = "PNG text chunks over Pillow's size limits (a metadata bomb): left unread"
        return image, info, size


# EXIF orientations that swap width and height (transposed and rotated by 90 or 270 degrees).
_SWAPS_AXES = {5, 6, 7, 8}
EXIF_ORIENTATION = 0x0112


def _decode(data: bytes, limits: Limits, reduce_to: int = 0) -> tuple[Image.Image, dict, tuple[int, int]]:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            width, height = image.size  # the declared size: the pixel limit applies to it, never to a reduced decode
            if width * height > limits.max_pixels:
                raise IngestError(
                    "too_many_pixels",
                    f"{width}x{height} is over the {limits.max_pixels}-pixel limit (scan.max_pixels); possible decompression bomb",
                )
            info = dict(image.info)
            exif = image.getexif()
            # JPEG DCT scaling: libjpeg decodes at 1/2, 1/4 or 1/8 scale for a fraction of the work. Only JPEG (no
            # stealth metadata lives in its pixels); PNG has no reduced decoding and Pillow's WebP decoder offers none.
            if reduce_to > 0 and image.format == "JPEG" and min(width, height) >= 2 * reduce_to:
                image.draft(None, (reduce_to, reduce_to))
            image.load()
            # Stealth metadata lives in the alpha/RGB LSBs, which orientation and the RGB conversion destroy.
            for key in (prompts.STEALTH_KEY, prompts.STEALTH_ERROR_KEY, prompts.C2PA_KEY):  # a text chunk must not
                info.pop(key, None)  # pose as pixels or file bytes
            info.update(prompts.c2pa_info(data))  # the C2PA reader reads the file itself
            if image.format in ("PNG", "WEBP"):
                info.update(prompts.stealth_info(image))
            swapped = exif.get(EXIF_ORIENTATION) in _SWAPS_AXES if exif else False
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
    return rgb, info, ((height, width) if swapped else (width, height))


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
    text_read: bool = False  # text/text_source are this file's (a skipped file's are read only when asked)


def load_item(
    path: str,
    limits: Limits,
    transform: Callable[[Image.Image], np.ndarray],
    skip: Callable[[str], bool] = lambda sha: False,
    text_of: Callable[[str, dict, int], prompts.GenerationMetadata | tuple[str | None, str]] = prompts.read_generation,
    recorded: Callable[[str, str], bool] = lambda sha, path: True,
    reduce_to: int | None = None,
    read: Callable[[str, Limits], bytes] = read_bytes,
) -> Item:
    """`text_of` gives the text the encoder embeds: a GenerationMetadata (kept as `item.metadata`; its prompt is the
    text, never its negative prompt) or a (text, source) pair (training captions).

    `skip(sha256)`: the content is already attributed, so it is not embedded again; its text is still read
    (a decode, no embedding) unless `recorded(sha256, display path)` says this file was recorded before.

    `reduce_to`: the shorter side a reduced decode must keep (`decode`); None asks the transform (an encoder's
    `Preprocess.min_decode_size`; 0 when it has none), 0 always decodes at full size. `item.width`/`height` are the
    full size either way. `read(path, limits)` gives the bytes (a training source may hold them already)."""
    item = Item(display_path(path))
    if reduce_to is None:
        reduce_to = getattr(transform, "min_decode_size", 0)
    try:
        data = read(path, limits)
        if len(data) > limits.max_file_bytes:  # read_bytes checks the file; bytes from elsewhere are checked here
            raise IngestError(
                "too_large", f"{len(data)} bytes, over the {limits.max_file_bytes}-byte limit (scan.max_file_bytes)"
            )
        item.sha256 = hashlib.sha256(data).hexdigest()
        if skip(item.sha256):
            item.skipped = True
            if recorded(item.sha256, item.path):
                return item
        image, info, (item.width, item.height) = decode_sized(data, limits, reduce_to)
        described = text_of(path, info, limits.max_text_chars)
        if isinstance(described, prompts.GenerationMetadata):
            item.metadata = described
            described = prompts.prompt_of(described)
        item.text, item.text_source = described
        item.text_read = True
        if not item.skipped:
            item.pixels = transform(image)
    except IngestError as exc:
        item.error = exc
    except Exception as exc:  # a decoder bug must not stop the batch; record it
        item.error = IngestError("decode_failed", f"{type(exc).__name__}: {exc}")
    return item


def load_all(paths: Iterable[T], threads: int, load: Callable[[T], R], ahead: int = 0) -> Iterator[R]:
    """Decode in a thread pool, in order, with bounded read-ahead (at least `ahead` files) so decoding overlaps embedding.
    `paths` is consumed as the window allows, so it may be a stream (a shard being read)."""
    window = max(2, threads * 4, ahead)
    with cf.ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="audit-load") as pool:
        pending: deque[cf.Future] = deque()
        for path in paths:
            pending.append(pool.submit(load, path))
            if len(pending) >= window:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
