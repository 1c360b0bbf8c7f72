"""Which model made a generation: the workspace's model identity, and how a generation's declared model is matched.

Generators write the model they used into an image's metadata (auditor/prompts/): AUTOMATIC1111, Forge, Fooocus
and SwarmUI a hash of the checkpoint file (`Model hash: 31e35c80fc`) and its name (`Model: sd_xl_base_1.0`);
ComfyUI the checkpoint's file name (`ckpt_name`) and no hash; InvokeAI its own hash (`blake3:...`) and name;
NovelAI a short hash of its model (`Source: Stable Diffusion XL C1E1DE52`).

The workspace's identity ([model] in audit.toml, `audit model`):

- checkpoint files: `[model] checkpoints`, and `[paths] model` when that is a single .safetensors/.ckpt file (a
  diffusers folder has no single file: name the file(s) it was converted from or served as). Each is hashed, in
  one streaming pass, as A1111 hashes checkpoints:
  - SHA-256 of the whole file. A1111 writes its first 10 hex digits as `Model hash` (Civitai: AutoV2);
  - AutoV1, A1111's legacy hash: the first 8 hex digits of the SHA-256 of the 0x10000 bytes at offset 0x100000;
  - AutoV3, for safetensors files only: the SHA-256 of the file after its header (an 8-byte little-endian length
    N, then N bytes of JSON), as kohya-ss sd-scripts and A1111 (`addnet_hash_safetensors`) compute it; A1111
    writes its first 12 hex digits for LoRAs, Civitai lists it as AutoV3.
  The hashes are cached in the store (`checkpoint_hashes`) by path, size and modification time; the file's name
  counts as one of the model's names.
- `[model] hashes` and `[model] names`: hashes and names declared for it by hand.

Matching (`ModelIdentity.match`) gives `same`, `other`, `none` (the generation declares no model) or `unknown`
(it declares one, but the workspace knows nothing to compare it with):

1. A declared hash is read case-insensitively, without a `0x` or `sha256:` prefix. A hex hash matches when it and
   one of the model's hashes (full SHA-256, AutoV1, AutoV3, or a hex `[model] hashes` entry) are prefixes of each
   other, the shorter at least 8 digits: `31e35c80fc` (AutoV2) matches the full SHA-256 `31e35c80fc4829d1...`. A
   hash of another scheme (`blake3:9a8b...`) matches only an equal `[model] hashes` entry.
   A matching hash makes the generation `same`; a hex hash matching none makes it `other` (a hash is stronger than
   a name: two fine-tunes can share a file name). A non-hex hash matching none is set aside (`other` when
   `[model] hashes` has an entry of the same scheme), and the name decides.
2. A declared name matches when its stem equals, case-insensitively, the stem of a checkpoint file or of a
   `[model] names` entry. The stem is the last path component (`/` or `\\`) without a trailing ` [hash]` and
   without a model file extension: `SDXL\\sd_xl_base_1.0.safetensors [31e35c80fc]` → `sd_xl_base_1.0`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from .errors import AuditError
from .store import Store, utcnow

CHECKPOINT_EXTENSIONS = (".safetensors", ".ckpt")
MODEL_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".gguf", ".sft")
AUTOV1_OFFSET, AUTOV1_LENGTH = 0x100000, 0x10000
CHUNK = 1024 * 1024
MIN_PREFIX = 8
MATCHES = ("same", "other", "none", "unknown")


# --- hashing ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckpointHashes:
    path: str
    size: int
    mtime_ns: int
    sha256: str
    autov1: str
    autov3: str | None  # safetensors files only

    @property
    def autov2(self) -> str:
        return self.sha256[:10]

    @property
    def name(self) -> str:
        return name_stem(self.path) or ""


def autov1(path: str | os.PathLike) -> str:
    """A1111's legacy model hash: SHA-256 of the 0x10000 bytes at 0x100000 (fewer, or none, in a shorter file)."""
    with open(path, "rb") as fh:
        fh.seek(AUTOV1_OFFSET)
        return hashlib.sha256(fh.read(AUTOV1_LENGTH)).hexdigest()[:8]


def _safetensors_header_end(fh, size: int) -> int | None:
    """Where a safetensors file's tensor data starts (8 + header length), None when it is no safetensors file."""
    fh.seek(0)
    head = fh.read(9)
    if len(head) < 9:
        return None
    end = 8 + int.from_bytes(head[:8], "little")
    return end if head[8:9] == b"{" and end <= size else None


def hash_checkpoint(path: str | os.PathLike) -> CheckpointHashes:
    """Every hash of a checkpoint file in one streaming pass (constant memory, whatever the file's size)."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            stat = os.fstat(fh.fileno())
            header_end = _safetensors_header_end(fh, stat.st_size)
            whole, tail = hashlib.sha256(), hashlib.sha256() if header_end is not None else None
            fh.seek(0)
            buffer, offset = bytearray(CHUNK), 0
            view = memoryview(buffer)
            while n := fh.readinto(buffer):
                chunk = view[:n]
                whole.update(chunk)
                if tail is not None and offset + n > header_end:
                    tail.update(chunk[max(0, header_end - offset) :])
                offset += n
        legacy = autov1(path)
    except OSError as exc:
        raise AuditError(f"cannot hash the checkpoint {path}: {exc.strerror or exc}") from None
    return CheckpointHashes(
        path, stat.st_size, stat.st_mtime_ns, whole.hexdigest(), legacy, tail.hexdigest() if tail else None
    )


def checkpoint_files(ws) -> list[Path]:
    """The checkpoint files that identify the workspace's model: [model] checkpoints, and [paths] model when it is
    one .safetensors/.ckpt file."""
    files = [ws.resolve(p) for p in ws.config.model.checkpoints if p]
    model = ws.resolve(ws.config.paths.model)
    if model is not None and model.suffix.lower() in CHECKPOINT_EXTENSIONS and not model.is_dir():
        files.append(model)
    unique: dict[str, Path] = {}
    for path in files:
        unique.setdefault(str(path), path)
    return list(unique.values())


def cached_hashes(store: Store, path: Path, *, write: bool, announce: Callable[[str], None]) -> CheckpointHashes:
    """The file's hashes from the store's cache when its size and modification time are unchanged, else computed
    (and cached when `write`). A file gone since it was hashed keeps its cached hashes."""
    key = str(path)
    row = store.rows("SELECT path, size, mtime_ns, sha256, autov1, autov3 FROM checkpoint_hashes WHERE path = ?", [key])
    cached = CheckpointHashes(*row[0]) if row else None
    try:
        stat = path.stat()
    except OSError:
        if cached is not None:
            announce(f"checkpoint {key} is gone; using the hashes it had when it was last seen")
            return cached
        raise AuditError(f"[model] checkpoint {key} does not exist; fix [model] checkpoints in audit.toml") from None
    if cached is not None and (cached.size, cached.mtime_ns) == (stat.st_size, stat.st_mtime_ns):
        return cached
    announce(f"hashing checkpoint {key} ({stat.st_size / 1e9:.1f} GB)")
    hashes = hash_checkpoint(path)
    if write:
        store.con.execute(
            "INSERT OR REPLACE INTO checkpoint_hashes (path, size, mtime_ns, sha256, autov1, autov3, hashed_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            [key, hashes.size, hashes.mtime_ns, hashes.sha256, hashes.autov1, hashes.autov3, utcnow()],
        )
    return hashes


# --- matching -----------------------------------------------------------------------------------------------------

_HEX = re.compile(r"[0-9a-f]{8,64}")
_SCHEME = re.compile(r"([a-z0-9_-]{2,20}):\S+")


def normal_hash(value: str | None) -> str | None:
    """A hash as compared: lower case, without whitespace, a `0x` or a `sha256:` prefix."""
    if not value:
        return None
    text = value.strip().lower()
    for prefix in ("0x", "sha256:"):
        if text.startswith(prefix):
            text = text[len(prefix) :]
    return text or None


def name_stem(value: str | None) -> str | None:
    """A model name as compared: last path component, no trailing ` [hash]`, no model file extension, lower case."""
    if not value:
        return None
    text = re.split(r"[/\\]", value.strip())[-1]
    text = re.sub(r"\s*\[[0-9a-fA-F]{6,64}\]$", "", text)
    base, ext = os.path.splitext(text)
    if ext.lower() in MODEL_EXTENSIONS:
        text = base
    return text.strip().lower() or None


def _scheme(text: str) -> str | None:
    found = _SCHEME.fullmatch(text)
    return found.group(1) if found else None


@dataclass
class ModelIdentity:
    checkpoints: list[CheckpointHashes]
    hashes: tuple[str, ...] = ()  # [model] hashes
    names: tuple[str, ...] = ()  # [model] names

    def __post_init__(self):
        declared = [h for h in (normal_hash(x) for x in self.hashes) if h]
        self.hex_hashes = {h for h in declared if _HEX.fullmatch(h)}
        for c in self.checkpoints:
            self.hex_hashes |= {c.sha256, c.autov1} | ({c.autov3} if c.autov3 else set())
        self.other_hashes = {h for h in declared if not _HEX.fullmatch(h)}
        self.stems = {s for s in (name_stem(n) for n in self.names) if s} | {c.name for c in self.checkpoints}

    @property
    def empty(self) -> bool:
        return not (self.hex_hashes or self.other_hashes or self.stems)

    def match(self, model_hash: str | None, model_name: str | None) -> str:
        """same, other, none or unknown: see the module doc."""
        declared, stem = normal_hash(model_hash), name_stem(model_name)
        if declared is None and stem is None:
            return "none"
        if declared is not None:
            if _HEX.fullmatch(declared):
                if any(_prefixes(declared, known) for known in self.hex_hashes):
                    return "same"
                if self.hex_hashes:
                    return "other"
            elif declared in self.other_hashes:
                return "same"
            elif (scheme := _scheme(declared)) and any(_scheme(h) == scheme for h in self.other_hashes):
                return "other"
        if stem is not None and self.stems:
            return "same" if stem in self.stems else "other"
        return "unknown"


def _prefixes(a: str, b: str) -> bool:
    short, long = (a, b) if len(a) <= len(b) else (b, a)
    return len(short) >= MIN_PREFIX and long.startswith(short)


def identity(
    ws, store: Store, *, write: bool = True, announce: Callable[[str], None] = lambda message: None
) -> ModelIdentity:
    """The workspace's model identity, hashing (and, when `write`, caching) checkpoint files not hashed yet."""
    checkpoints = [cached_hashes(store, path, write=write, announce=announce) for path in checkpoint_files(ws)]
    return ModelIdentity(checkpoints, ws.config.model.hashes, ws.config.model.names)


def rematch(store: Store, ident: ModelIdentity) -> int:
    """Decide `model_match` again for every generation scanned with metadata (after the identity changed);
    returns how many changed. One decision per distinct declared (hash, name), so it stays cheap."""
    pairs = store.rows(
        "SELECT DISTINCT model_hash, model_name, model_match FROM generations WHERE model_match IS NOT NULL"
    )
    changed = [(h, n, ident.match(h, n)) for h, n, old in pairs if ident.match(h, n) != old]
    if not changed:
        return 0
    table = pa.table(
        {
            "model_hash": pa.array([h for h, _, _ in changed], pa.string()),
            "model_name": pa.array([n for _, n, _ in changed], pa.string()),
            "decided": pa.array([m for _, _, m in changed], pa.string()),
        }
    )
    store.con.register("_rematch", table)
    try:
        updated = store.rows(
            "UPDATE generations g SET model_match = r.decided FROM _rematch r"
            " WHERE g.model_match IS NOT NULL AND g.model_hash IS NOT DISTINCT FROM r.model_hash"
            " AND g.model_name IS NOT DISTINCT FROM r.model_name AND g.model_match <> r.decided RETURNING g.id"
        )
        return len(updated)
    finally:
        store.con.unregister("_rematch")


def model_label(model_hash: str | None, model_name: str | None) -> str:
    """How summaries name a declared model: its hash and name, as declared."""
    if model_hash and model_name:
        return f"{model_hash} ({model_name})"
    return model_hash or model_name or "no model declared"


def add_checkpoints(
    ws, files: list[str | os.PathLike], announce: Callable[[str], None] = lambda message: None
) -> ModelIdentity:
    """Add checkpoint files to [model] checkpoints (hashed and cached now), save audit.toml and decide `model_match`
    again for the generations already scanned."""
    paths = []
    for file in files:
        path = Path(file).expanduser().resolve()
        if not path.is_file():
            raise AuditError(f"{file} is not a checkpoint file")
        paths.append(str(path))
    return update(ws, checkpoints=paths, announce=announce)


def update(
    ws,
    *,
    checkpoints: list[str] = (),
    hashes: list[str] = (),
    names: list[str] = (),
    announce: Callable[[str], None] = lambda message: None,
) -> ModelIdentity:
    """Add to [model] checkpoints / hashes / names, save audit.toml and decide `model_match` again."""
    settings = ws.config.model

    def added(current: tuple[str, ...], new) -> tuple[str, ...]:
        return current + tuple(v for v in dict.fromkeys(v.strip() for v in new) if v and v not in current)

    with ws.writing(), Store(ws.db_path) as store:
        ws.config.model = settings.override(
            checkpoints=added(settings.checkpoints, checkpoints),
            hashes=added(settings.hashes, hashes),
            names=added(settings.names, names),
        )
        try:
            with store.transaction():
                ident = identity(ws, store, announce=announce)
                changed = rematch(store, ident)
        except BaseException:
            ws.config.model = settings
            raise
        ws.save()
    if changed:
        announce(f"{changed} generation(s) matched again against the model's new identity")
    return ident


def prepare(ws, store: Store, announce: Callable[[str], None] = lambda message: None) -> ModelIdentity:
    """A scan's identity: hashed (and cached), with the stored generations matched again if it changed."""
    with store.transaction():
        ident = identity(ws, store, announce=announce)
        changed = rematch(store, ident)
    if changed:
        announce(f"{changed} generation(s) scanned earlier matched again against the model's identity")
    return ident
