"""Where `audit index` reads training samples from: a folder (index.py), WebDataset tar shards, or Parquet manifests.

Every source yields the same records (`Entry`) into the one embed/write path (index.index_training), in units: a
shard or Parquet file is one unit, read to its end before it is recorded in `training_shards`, so a killed index
resumes at the unit in flight (what it had committed is known by content and not embedded again) and units added
later are read on their own. A corrupt sample becomes an entry refused with a reason; a corrupt or truncated shard
ends its unit with an error, keeping the samples before the damage; neither stops the run.

Shards follow img2dataset / WebDataset: members named `KEY.EXT`, one sample per key (its members adjacent), the
image in `KEY.jpg|png|webp|...`, the caption in `KEY.txt`, per-sample metadata in `KEY.json`. Local paths, `s3://`
URLs (read with the workspace's [storage] settings, the ones LanceDB uses) and `gs://` URLs (credentials from the
environment) work, through pyarrow's filesystems; patterns expand braces (`{00000..00999}`, `{a,b}`) and then globs
(`*`).
"""

from __future__ import annotations

import fnmatch
import glob
import json
import os
import posixpath
import re
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

from . import ingest, prompts
from .errors import AuditError
from .prompts.base import clean

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz")
PARQUET_SUFFIXES = (".parquet",)
IMAGE_MEMBERS = {ext.lstrip(".") for ext in ingest.IMAGE_EXTENSIONS}
STREAM_BUFFER = 8 << 20  # bytes per read of a shard streamed from object storage


@dataclass
class Entry:
    """One training sample as a source gives it: where its bytes are (a file, or `data` read from a container) and
    what the source says about it."""

    path: str
    contributor_id: str | None
    contributor_name: str | None = None
    caption: str | None = None
    license: str | None = None
    known_id: int | None = None  # set when re-embedding an already registered image
    # Every contributor the manifest lists this path for; more than one is a conflict_path (contributor_id is then None).
    claimants: tuple[str, ...] = ()
    refused: tuple[str, str] | None = None  # (code, reason) when the entry is not indexed at all
    caption_source: str = "manifest"  # training_images.caption_source when `caption` is set
    # Read from a shard or Parquet file (training_images.shard, shard_key, shard_member; schemas/README.md).
    shard: str | None = None
    shard_key: str | None = None
    shard_member: str | None = None  # the tar member or Parquet column holding the bytes; None: the bytes are at path
    data: bytes | None = None  # the image's bytes when the source has read them already (dropped once decoded)
    warning: tuple[str, str] | None = None  # (code, reason) recorded in index_errors; the sample is still indexed

    @property
    def owners(self) -> tuple[str, ...]:
        return self.claimants or ((self.contributor_id,) if self.contributor_id else ())


def text(value) -> str | None:
    """User text from a manifest, a shard or a Parquet cell, cleaned like metadata; None when empty."""
    if value is None:
        return None
    return clean(str(value)).strip() or None


@dataclass(frozen=True)
class Fields:
    """Which Parquet column, or which field of a shard sample's JSON, holds each thing ([sources] in audit.toml)."""

    image: str = "image"
    caption: str = "caption"
    contributor: str = "contributor_id"
    license: str = "license"


# --------------------------------------------------------------------------- naming shards


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")
_LIST = re.compile(r"\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a/{00000..00002}.tar` -> a/00000.tar, a/00001.tar, a/00002.tar (width kept); `{x,y}` -> both."""
    match = _RANGE.search(pattern) or _LIST.search(pattern)
    if not match:
        return [pattern]
    if match.re is _RANGE:
        first, last = match[1], match[2]
        width = len(first) if first.startswith("0") else 0
        step = 1 if int(last) >= int(first) else -1
        choices = [str(n).zfill(width) for n in range(int(first), int(last) + step, step)]
    else:
        choices = match[1].split(",")
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [path for choice in choices for path in expand_braces(head + choice + tail)]


class Storage:
    """How `s3://` and `gs://` URLs are opened: pyarrow filesystems, the S3 one set from `options` (a workspace's
    [storage] settings and keys, named as Lance's storage options: Workspace.object_store_options), asked for only
    when a URL is opened; GCS credentials come from the environment."""

    def __init__(self, options: Callable[[], dict[str, str]] = dict):
        self.options = options
        self._filesystems: dict = {}

    def filesystem(self, uri: str):
        """(pyarrow filesystem, path inside it) of a URL."""
        scheme, _, path = uri.partition("://")
        if scheme not in self._filesystems:
            self._filesystems[scheme] = self._connect(uri, scheme)
        return self._filesystems[scheme], path

    def _connect(self, uri: str, scheme: str):
        import pyarrow.fs as pafs

        if scheme == "gs":
            return pafs.GcsFileSystem()
        if scheme != "s3":
            raise AuditError(f"cannot read {uri}: only local paths, s3:// and gs:// URLs are read")
        options = self.options()
        endpoint = options.get("aws_endpoint")
        if endpoint and endpoint.startswith("http://") and not options.get("allow_http"):
            raise AuditError(f"[storage] endpoint {endpoint} is plain HTTP; set [storage] allow_http = true to use it")
        return pafs.S3FileSystem(
            endpoint_override=endpoint,
            region=options.get("aws_region"),
            access_key=options.get("aws_access_key_id"),
            secret_key=options.get("aws_secret_access_key"),
            session_token=options.get("aws_session_token"),
        )


def list_shards(pattern: str, storage: Storage) -> list[str]:
    """The shards or Parquet files a pattern names, in order: braces expanded, then globs matched. Local paths are made
    absolute (a shard is known by this name in `training_shards`); a named file that does not exist is kept, so
    reading it records why."""
    found: list[str] = []
    for uri in expand_braces(pattern):
        if not is_remote(uri):
            uri = os.path.abspath(os.path.expanduser(uri.removeprefix("file://")))
        if not any(c in uri for c in "*?["):
            found.append(uri)
        elif not is_remote(uri):
            found += sorted(glob.glob(uri))
        else:
            found += _glob_remote(uri, storage)
    return list(dict.fromkeys(found))


def _glob_remote(uri: str, storage: Storage) -> list[str]:
    """The objects a URL's glob matches, a component per path level (as a local glob matches)."""
    import pyarrow.fs as pafs

    fs, path = storage.filesystem(uri)
    scheme = uri.partition("://")[0]
    parts = path.split("/")
    fixed = next(n for n, part in enumerate(parts) if any(c in part for c in "*?["))
    selector = pafs.FileSelector("/".join(parts[:fixed]), recursive=fixed < len(parts) - 1, allow_not_found=True)
    return sorted(
        f"{scheme}://{info.path}"
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
        and info.path.count("/") == path.count("/")
        and fnmatch.fnmatchcase(info.path, path)
    )


def kind_of(uri: str) -> str | None:
    """'webdataset', 'parquet', or None by the file name."""
    lower = uri.lower()
    if lower.endswith(TAR_SUFFIXES):
        return "webdataset"
    if lower.endswith(PARQUET_SUFFIXES):
        return "parquet"
    return None


def _open(uri: str, storage: Storage, stream: bool = False):
    """A binary file object for a local path or a URL; `stream`: read front to back only, from object storage in
    STREAM_BUFFER-sized requests (a random-access file makes one request per read: per 10 KiB tar block)."""
    if not is_remote(uri):
        return open(uri, "rb")  # noqa: SIM115 (the caller closes it)
    fs, path = storage.filesystem(uri)
    if stream:
        return fs.open_input_stream(path, compression=None, buffer_size=STREAM_BUFFER)
    return fs.open_input_file(path)


def read_bytes(path: str, limits: ingest.Limits, storage: Storage) -> bytes:
    """A file's bytes, local (ingest.read_bytes: regular files only) or at a URL, within the size limit."""
    if not is_remote(path):
        return ingest.read_bytes(path, limits)
    try:
        with _open(path, storage) as fh:
            if fh.size() > limits.max_file_bytes:
                raise ingest.IngestError(
                    "too_large",
                    f"file is {fh.size()} bytes, over the {limits.max_file_bytes}-byte limit (scan.max_file_bytes)",
                )
            return fh.read()
    except (OSError, AuditError) as exc:
        raise ingest.IngestError("unreadable", f"cannot read: {exc}") from None


# --------------------------------------------------------------------------- units


class Unit:
    """A run of entries read together. `shard`: the shard or Parquet file recorded in training_shards when the unit
    has been read to its end (None: nothing to record, e.g. re-embedding registered images). `error`: (code, reason)
    when the unit stopped early (a corrupt or truncated shard), set once iteration ends."""

    shard: str | None = None
    error: tuple[str, str] | None = None
    size: int | None = None  # entries, when known before reading

    def __iter__(self) -> Iterator[Entry]:
        raise NotImplementedError


class Files(Unit):
    """Entries whose bytes are files (a folder; Parquet rows naming paths being re-embedded)."""

    def __init__(self, entries: list[Entry]):
        self.entries = entries
        self.size = len(entries)

    def __iter__(self) -> Iterator[Entry]:
        return iter(self.entries)


def _member_error(uri: str, exc: Exception) -> tuple[str, str]:
    return (
        "corrupt_shard",
        f"{posixpath.basename(uri)}: corrupt or truncated ({type(exc).__name__}: {exc}); the samples before it were read",
    )


class TarShard(Unit):
    """One WebDataset tar shard, read front to back as a stream (object storage needs no seeks). `wanted`: read only
    these image members, giving their registered entries (re-embedding); None: every sample, as new entries."""

    def __init__(
        self,
        uri: str,
        fields: Fields,
        limits: ingest.Limits,
        storage: Storage,
        wanted: dict[str, Entry] | None = None,
        record=True,
    ):
        self.uri, self.fields, self.limits, self.storage, self.wanted = uri, fields, limits, storage, wanted
        self.shard = uri if record else None

    def __iter__(self) -> Iterator[Entry]:
        try:
            fh = _open(self.uri, self.storage, stream=True)
        except (OSError, AuditError) as exc:
            self.error = ("unreadable", f"cannot open the shard: {exc}")
            return
        with fh:
            key, members = None, {}
            try:
                with tarfile.open(fileobj=fh, mode="r|*") as tar:
                    for info in tar:
                        if not info.isfile():
                            continue
                        base, ext = _split(info.name)
                        if base != key:
                            entry = self._sample(key, members)
                            if entry:
                                yield entry
                            key, members = base, {}
                        members[ext.lower()] = self._read(tar, info)
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                self.error = _member_error(self.uri, exc)
                return
            entry = self._sample(key, members)
            if entry:
                yield entry

    def _read(self, tar: tarfile.TarFile, info: tarfile.TarInfo) -> bytes | ingest.IngestError:
        if info.size > self.limits.max_file_bytes:
            return ingest.IngestError(
                "too_large",
                f"member is {info.size} bytes, over the {self.limits.max_file_bytes}-byte limit (scan.max_file_bytes)",
            )
        if self.wanted is not None and info.name not in self.wanted:
            return b""  # a registered sample keeps its caption and metadata; streaming skips the unread data
        data = tar.extractfile(info).read()
        if len(data) != info.size:
            raise EOFError(f"{info.name} ends after {len(data)} of {info.size} bytes")
        return data

    def _sample(self, key: str | None, members: dict) -> Entry | None:
        if key is None:
            return None
        image = next((ext for ext in members if ext in IMAGE_MEMBERS), None)
        member = f"{key}.{image}" if image else None
        if self.wanted is not None:
            entry = self.wanted.get(member) if member else None
            if entry is None:
                return None
        else:
            entry = Entry(
                path=f"{self.uri}#{member or key}",
                contributor_id=None,
                shard=self.uri,
                shard_key=key,
                shard_member=member,
            )
            self._describe(entry, members)
        if image is None:
            entry.refused = ("no_image", "the sample has no image member (.jpg, .png, .webp, ...)")
        elif isinstance(members[image], ingest.IngestError):
            entry.refused = (members[image].code, members[image].reason)
        else:
            entry.data = members[image]
        return entry

    def _describe(self, entry: Entry, members: dict) -> None:
        meta: dict = {}
        raw = members.get("json")
        if isinstance(raw, bytes) and raw:
            try:
                meta = json.loads(raw[: prompts.MAX_SIDECAR_BYTES])
                if not isinstance(meta, dict):
                    raise ValueError("not a JSON object")
            except ValueError as exc:
                meta = {}
                entry.warning = (
                    "metadata_unreadable",
                    f"{entry.shard_key}.json is not a JSON object ({exc}); indexed without its metadata",
                )
        caption = members.get("txt")
        if isinstance(caption, bytes) and caption:
            entry.caption = text(caption[: prompts.MAX_SIDECAR_BYTES].decode("utf-8", "replace"))
        else:
            entry.caption = text(meta.get(self.fields.caption))
        entry.caption_source = "webdataset"
        entry.contributor_id = text(meta.get(self.fields.contributor))
        entry.license = text(meta.get(self.fields.license))


def _split(name: str) -> tuple[str, str]:
    """WebDataset's key/extension split: the extension starts at the first dot of the last path component."""
    folder, slash, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return folder + slash + stem, ext


class ParquetFile(Unit):
    """One Parquet manifest: a row per image, the image as bytes, as a path (relative to the file's folder), or as a
    Hugging Face datasets `{bytes, path}` struct. `wanted`: only these row numbers, giving their registered entries."""

    BATCH_ROWS = 256

    def __init__(
        self,
        uri: str,
        fields: Fields,
        limits: ingest.Limits,
        storage: Storage,
        wanted: dict[str, Entry] | None = None,
        record=True,
        allow_outside: bool = False,
    ):
        self.uri, self.fields, self.limits, self.storage, self.wanted = uri, fields, limits, storage, wanted
        self.allow_outside = allow_outside
        self.shard = uri if record else None

    def __iter__(self) -> Iterator[Entry]:
        import pyarrow.parquet as pq

        try:
            fh = _open(self.uri, self.storage)
            parquet = pq.ParquetFile(fh)
        except (OSError, AuditError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            self.error = ("corrupt_shard" if isinstance(exc, ValueError) else "unreadable", f"cannot open: {exc}")
            return
        with fh:
            names = parquet.schema_arrow.names
            f = self.fields
            if f.image not in names:
                raise AuditError(
                    f"{self.uri} has no column {f.image!r} (columns: {', '.join(names)}); name the image column with"
                    " --image-field or [sources] image"
                )
            columns = [c for c in dict.fromkeys((f.image, f.caption, f.contributor, f.license)) if c in names]
            row = 0
            try:
                for batch in parquet.iter_batches(batch_size=self.BATCH_ROWS, columns=columns):
                    for values in batch.to_pylist():
                        entry = self._entry(row, values)
                        row += 1
                        if entry:
                            yield entry
            except (OSError, ValueError) as exc:
                self.error = _member_error(self.uri, exc)

    def _entry(self, row: int, values: dict) -> Entry | None:
        key = str(row)
        if self.wanted is not None:
            entry = self.wanted.get(key)
            if entry is None:
                return None
        else:
            entry = Entry(path=f"{self.uri}#{key}", contributor_id=text(values.get(self.fields.contributor)))
            entry.shard, entry.shard_key = self.uri, key
            entry.caption, entry.caption_source = text(values.get(self.fields.caption)), "parquet"
            entry.license = text(values.get(self.fields.license))
        image = values.get(self.fields.image)
        if isinstance(image, dict):  # Hugging Face datasets' Image feature
            image = image.get("bytes") or image.get("path")
        if isinstance(image, bytes):
            entry.data, entry.shard_member = image, self.fields.image
            if len(image) > self.limits.max_file_bytes:
                entry.data = None
                entry.refused = ("too_large", f"{len(image)} bytes, over the {self.limits.max_file_bytes}-byte limit")
        elif isinstance(image, str) and image:
            if self.wanted is None:
                entry.path = self._resolve(image)
                if not self.allow_outside and not is_remote(entry.path):
                    root = os.path.realpath(os.path.dirname(self.uri))
                    if os.path.commonpath([root, os.path.realpath(entry.path)]) != root:
                        entry.refused = (
                            "outside_training_dir",
                            f"resolves outside the Parquet file's folder {root}; `audit index --allow-outside` indexes it",
                        )
        else:
            entry.refused = ("no_image", f"row {row} has no image in column {self.fields.image!r}")
        return entry

    def _resolve(self, path: str) -> str:
        if is_remote(path) or os.path.isabs(path):
            return path
        if is_remote(self.uri):
            return posixpath.join(posixpath.dirname(self.uri), path)
        return os.path.normpath(os.path.join(os.path.dirname(self.uri), path))


def unit_of(uri: str, fields: Fields, limits: ingest.Limits, storage: Storage, **kwargs) -> Unit:
    kind = kind_of(uri)
    if kind == "webdataset":
        kwargs.pop("allow_outside", None)
        return TarShard(uri, fields, limits, storage, **kwargs)
    return ParquetFile(uri, fields, limits, storage, **kwargs)


def registered_units(entries: list[Entry], fields: Fields, limits: ingest.Limits, storage: Storage) -> list[Unit]:
    """Units reading these entries: files at their paths in one, the ones kept in a shard or Parquet file grouped by
    it (each read once, only the wanted samples)."""
    files, kept = [], {}
    for entry in entries:
        if not (entry.shard and entry.shard_member):
            files.append(entry)
        elif kind_of(entry.shard) == "webdataset":
            kept.setdefault((entry.shard, None), {})[entry.shard_member] = entry
        else:  # the column the bytes were read from, whatever [sources] image says now
            kept.setdefault((entry.shard, entry.shard_member), {})[entry.shard_key] = entry
    units: list[Unit] = [Files(files)] if files else []
    for (shard, column), wanted in kept.items():
        unit = unit_of(
            shard, replace(fields, image=column or fields.image), limits, storage, wanted=wanted, record=False
        )
        unit.size = len(wanted)
        units.append(unit)
    return units


class ContainerSource:
    """WebDataset shards or Parquet files named by a pattern; each one not yet read to its end is a unit."""

    entries: list[Entry] = []  # nothing known before reading

    def __init__(
        self, uris: list[str], fields: Fields, limits: ingest.Limits, storage: Storage, allow_outside: bool = False
    ):
        self.uris, self.fields, self.limits, self.storage = uris, fields, limits, storage
        self.allow_outside = allow_outside

    def units(self, done: set[str]) -> list[Unit]:
        return [
            unit_of(uri, self.fields, self.limits, self.storage, allow_outside=self.allow_outside)
            for uri in self.uris
            if uri not in done
        ]


def read_image(
    path: str, shard: str | None, member: str | None, key: str | None, limits: ingest.Limits, storage: Storage
) -> bytes:
    """The bytes of one registered training image, wherever they are kept (a report's thumbnail): the file at `path`,
    a tar shard's member, or a Parquet row's cell. Raises IngestError."""
    if not shard or not member:
        return read_bytes(path, limits, storage)
    try:
        with _open(shard, storage) as fh:
            if kind_of(shard) == "webdataset":
                with tarfile.open(fileobj=fh, mode="r:*") as tar:
                    info = tar.getmember(member)
                    if info.size > limits.max_file_bytes:
                        raise ingest.IngestError("too_large", f"member is {info.size} bytes")
                    return tar.extractfile(info).read()
            import pyarrow.parquet as pq

            parquet, row = pq.ParquetFile(fh), int(key or 0)
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if row < rows:
                    value = parquet.read_row_group(group, columns=[member]).column(0)[row].as_py()
                    value = value.get("bytes") if isinstance(value, dict) else value
                    if not isinstance(value, bytes):
                        raise ingest.IngestError("not_an_image", "the Parquet cell holds no image bytes")
                    return value
                row -= rows
            raise ingest.IngestError("unreadable", f"{shard} has no row {key}")
    except (OSError, KeyError, ValueError, tarfile.TarError, AuditError) as exc:
        raise ingest.IngestError("unreadable", f"cannot read {member} from {shard}: {exc}") from None


def entry_bytes(entry: Entry, limits: ingest.Limits, storage: Storage) -> bytes:
    """An entry's image bytes: what its source read, else its file. Drops them from the entry (they are decoded once)."""
    data, entry.data = entry.data, None
    if data is None:
        return read_bytes(entry.path, limits, storage)
    if not data:
        raise ingest.IngestError("empty_file", "the image is empty (0 bytes)")
    return data
