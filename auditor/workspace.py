"""The workspace: a `.audit/` folder holding audit.toml, the DuckDB store and (by default) the LanceDB data.

Commands find it like git finds a repository: `--workspace`, else `AUDIT_WORKSPACE`,
else the nearest parent of the current directory that has a `.audit/` folder.
"""

from __future__ import annotations

import configparser
import contextlib
import fcntl
import os
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from .config import Config
from .errors import AuditError, WorkspaceBusy, WorkspaceNotFound

AUDIT_DIR = ".audit"
CONFIG_NAME = "audit.toml"
DB_NAME = "audit.duckdb"
ENV_VAR = "AUDIT_WORKSPACE"


@dataclass
class Workspace:
    root: Path
    config: Config

    @property
    def dir(self) -> Path:
        return self.root / AUDIT_DIR

    @property
    def config_path(self) -> Path:
        return self.dir / CONFIG_NAME

    @property
    def db_path(self) -> Path:
        return self.dir / DB_NAME

    @property
    def lancedb_uri(self) -> str:
        uri = self.config.paths.lancedb
        if "://" in uri:
            return uri
        return str((self.dir / uri).resolve())

    @property
    def storage_options(self) -> dict[str, str]:
        """LanceDB / Lance storage options of [paths] lancedb: the [storage] settings and the keys (see its doc)."""
        return self.object_store_options() if self.lancedb_uri.startswith("s3://") else {}

    def object_store_options(self) -> dict[str, str]:
        """The [storage] settings and the keys, named as Lance's storage options: what `s3://` URLs are read with
        (LanceDB, and training shards through `storage`)."""
        storage = self.config.storage
        options = {"aws_endpoint": storage.endpoint, "aws_region": storage.region}
        options["allow_http"] = "true" if storage.allow_http else ""
        keys = ("aws_access_key_id", "aws_secret_access_key", "aws_session_token")
        found = {key: os.environ.get(key.upper(), "") for key in keys}
        if not found["aws_access_key_id"] and storage.profile:
            found = _profile_keys(storage.profile, keys)
        options.update(found)
        return {key: value for key, value in options.items() if value}

    @property
    def storage(self):
        """How training shards and Parquet files at `s3://` / `gs://` URLs are opened here (sources.Storage)."""
        from .sources import Storage

        return Storage(self.object_store_options)

    def vector_table(self, encoder):
        """The training vectors of an encoder (embed.Encoder) in this workspace's LanceDB."""
        from .search import VectorTable

        return VectorTable.for_encoder(self.lancedb_uri, encoder, self.config.index, self.storage_options)

    def resolve(self, value: str) -> Path | None:
        """A path setting of audit.toml; relative paths are relative to the workspace root."""
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.root / path).resolve()

    @property
    def limits(self):
        """How any image and its text are read here: the [scan] pixel, byte and text limits."""
        from .ingest import Limits

        scan = self.config.scan
        return Limits(scan.max_pixels, scan.max_file_bytes, scan.max_text_chars)

    def device(self, override: str | None = None):
        """The torch device of a command: its --device, else [encoder] device."""
        from .embed import resolve_device

        return resolve_device(override or self.config.encoder.device)

    def model_dir(self, override: str | os.PathLike | None = None) -> Path:
        """The diffusion model folder: `override` (a --model option) or [paths] model."""
        path = Path(override) if override else self.resolve(self.config.paths.model)
        if path is None:
            raise AuditError(
                f"no diffusion model configured; set [paths] model in {self.config_path} or pass --model PATH"
            )
        return path

    def model_source(self, override: str | os.PathLike | None = None):
        """The diffusion model checked on the spot (auditor/families.py): `override` (a --model option) or [paths]
        model, with [paths] model_config and model_variant."""
        from .families import resolve

        paths = self.config.paths
        return resolve(self.model_dir(override), self.resolve(paths.model_config), paths.model_variant)

    def encoder_dir(self) -> Path:
        path = self.resolve(self.config.encoder.path)
        if path is None:
            raise AuditError(
                f"no encoder configured in {self.config_path}; set [encoder] path, or run `audit init --encoder BUNDLE_DIR`"
            )
        return path

    def reader(self):
        """A read-only connection to the store; it waits up to [store] busy_timeout for a writer to let go."""
        from .store import Store

        return Store(self.db_path, read_only=True, wait=self.config.store.busy_timeout)

    def save(self) -> None:
        self.config_path.write_text(
            "# provenance auditor workspace settings: docs/config.md\n" + tomli_w.dumps(self.config.to_toml())
        )

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the workspace's writer lock: one writing process at a time."""
        lock_path = self.dir / "lock"
        with open(lock_path, "a+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.seek(0)
                holder = fh.read().strip() or "another process"
                raise WorkspaceBusy(
                    f"workspace is busy: {holder} is writing to {self.dir}; "
                    "wait for it to finish and run the command again"
                ) from None
            fh.seek(0)
            fh.truncate()
            fh.write(f"audit process {os.getpid()}")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)


def _profile_keys(profile: str, keys: tuple[str, ...]) -> dict[str, str]:
    path = Path(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials").expanduser()
    parser = configparser.ConfigParser()
    parser.read(path)
    if not parser.has_section(profile):
        raise AuditError(f"[storage] profile {profile!r} is not in {path}; add it there or change the setting")
    return {key: parser.get(profile, key, fallback="") for key in keys}


def init(
    directory: str | os.PathLike = ".",
    *,
    encoder: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    lancedb: str | None = None,
    model_config: str | os.PathLike | None = None,
    variant: str | None = None,
) -> Workspace:
    """Create `DIRECTORY/.audit/` with audit.toml, the DuckDB store and the LanceDB folder. The encoder bundle and
    the diffusion model, when given, are checked first (a missing path or an unsupported model family is refused)."""
    from .families import resolve
    from .store import Store

    root = Path(directory).expanduser().resolve()
    audit_dir = root / AUDIT_DIR
    if (audit_dir / CONFIG_NAME).exists():
        raise AuditError(f"{audit_dir} already exists; use that workspace or choose another directory")
    config = Config()
    if encoder:
        config.encoder.path = str(_checked_bundle(encoder))
    if model_config:
        config.paths.model_config = str(Path(model_config).expanduser().resolve())
    if variant:
        config.paths.model_variant = variant
    if model:
        source = resolve(model, config.paths.model_config or None, config.paths.model_variant)
        config.paths.model = str(source.path)
    elif model_config or variant:
        raise AuditError("--model-config and --variant describe a model; pass --model PATH with them")
    if lancedb:
        config.paths.lancedb = lancedb
    audit_dir.mkdir(parents=True, exist_ok=True)
    ws = Workspace(root, config)
    ws.save()
    if "://" not in ws.lancedb_uri:
        Path(ws.lancedb_uri).mkdir(parents=True, exist_ok=True)
    Store(ws.db_path).close()
    return ws


def _checked_bundle(path: str | os.PathLike) -> Path:
    """An encoder bundle path that exists and has its encoder.json (docs/encoders.md)."""
    bundle = Path(path).expanduser().resolve()
    if not (bundle / "encoder.json").is_file():
        what = "has no encoder.json" if bundle.is_dir() else "does not exist"
        raise AuditError(
            f"encoder bundle {bundle} {what}; pass a bundle folder (make one with `audit encoder create`, docs/encoders.md)"
        )
    return bundle


def load(root: str | os.PathLike) -> Workspace:
    root = Path(root).expanduser().resolve()
    config_path = root / AUDIT_DIR / CONFIG_NAME
    try:
        raw = tomllib.loads(config_path.read_text())
    except FileNotFoundError:
        raise WorkspaceNotFound(f"no workspace at {root} (missing {config_path}); run `audit init {root}`") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuditError(f"{config_path} is not valid TOML ({exc}); fix or recreate it") from None
    try:
        return Workspace(root, Config.from_toml(raw))
    except AuditError as exc:
        raise AuditError(f"{config_path}: {exc}") from None


def find(explicit: str | os.PathLike | None = None, start: str | os.PathLike | None = None) -> Workspace:
    """The workspace named explicitly or by AUDIT_WORKSPACE, else the nearest one above `start`."""
    named = explicit or os.environ.get(ENV_VAR)
    if named:
        root = Path(named).expanduser()
        # Accept both the workspace root and its .audit folder.
        if root.name == AUDIT_DIR:
            root = root.parent
        return load(root)
    here = Path(start or Path.cwd()).resolve()
    for candidate in (here, *here.parents):
        if (candidate / AUDIT_DIR / CONFIG_NAME).is_file():
            return load(candidate)
    raise WorkspaceNotFound(
        f"no audit workspace in {here} or any parent; run `audit init` there, or pass --workspace / set {ENV_VAR}"
    )
