"""The workspace: a `.audit/` folder holding audit.toml, the DuckDB store and (by default) the LanceDB data.

Commands find it like git finds a repository: `--workspace`, else `AUDIT_WORKSPACE`,
else the nearest parent of the current directory that has a `.audit/` folder.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import os
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import tomli_w

from .errors import AuditError, WorkspaceBusy, WorkspaceNotFound
from .settings import (
    AbuSettings,
    CounterfactualSettings,
    DistillSettings,
    DtrakSettings,
    IndexSettings,
    PlantedSettings,
)

AUDIT_DIR = ".audit"
CONFIG_NAME = "audit.toml"
DB_NAME = "audit.duckdb"
ENV_VAR = "AUDIT_WORKSPACE"

# Defaults every workspace starts from; a key missing from an older audit.toml
# falls back to these, so adding a setting never breaks existing workspaces.
DEFAULT_CONFIG: dict = {
    "paths": {
        # Any URI LanceDB accepts (s3://..., gs://...); a relative path is
        # relative to the .audit folder.
        "lancedb": "lancedb",
        # Diffusers pipeline folder used by `audit confirm`.
        "model": "",
    },
    "encoder": {
        "path": "",
        "device": "auto",
        "batch_size": 64,
    },
    "index": asdict(IndexSettings()),
    # `audit confirm` (the AbU teacher): see auditor/teacher.py.
    # flip = auto: the model folder's auditor_training.json says; else assume SD's random flips.
    "confirm": {"method": "abu", "flip": "auto", **asdict(AbuSettings())},
    # `audit confirm --method dtrak` (the gradient teacher): see auditor/dtrak.py.
    "dtrak": asdict(DtrakSettings()),
    # `audit eval --planted`: see auditor/planted.py.
    "planted": asdict(PlantedSettings()),
    "distill": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(DistillSettings()).items()},
    # `audit eval --counterfactual`: see auditor/counterfactual.py.
    "counterfactual": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(CounterfactualSettings()).items()},
    "scan": {
        "top_k": 50,
        "max_pixels": 50_000_000,
        "max_file_bytes": 256 * 1024 * 1024,
        "loader_threads": 4,
    },
}


def _merged(defaults: dict, overrides: dict) -> dict:
    out = copy.deepcopy(defaults)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


@dataclass
class Workspace:
    root: Path
    config: dict

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
        uri = self.config["paths"]["lancedb"]
        if "://" in uri:
            return uri
        return str((self.dir / uri).resolve())

    def path_setting(self, section: str, key: str) -> Path | None:
        """A path from audit.toml; relative paths are relative to the workspace root."""
        value = self.config[section][key]
        if not value:
            return None
        path = Path(value).expanduser()
        return path if path.is_absolute() else (self.root / path).resolve()

    def model_dir(self, override: str | os.PathLike | None = None) -> Path:
        """The diffusion model folder: `override` (a --model option) or [paths] model."""
        path = Path(override) if override else self.path_setting("paths", "model")
        if path is None:
            raise AuditError(
                f"no diffusion model configured; set [paths] model in {self.config_path} or pass --model PATH"
            )
        return path

    def encoder_dir(self) -> Path:
        path = self.path_setting("encoder", "path")
        if path is None:
            raise AuditError(
                f"no encoder configured in {self.config_path}; set [encoder] path, or run `audit init --encoder BUNDLE_DIR`"
            )
        return path

    def save(self) -> None:
        self.config_path.write_text(
            "# provenance auditor workspace settings; see README.md#configuration\n" + tomli_w.dumps(self.config)
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


def init(
    directory: str | os.PathLike = ".",
    *,
    encoder: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    lancedb: str | None = None,
) -> Workspace:
    """Create `DIRECTORY/.audit/` with audit.toml, the DuckDB store and the LanceDB folder."""
    from .store import Store

    root = Path(directory).expanduser().resolve()
    audit_dir = root / AUDIT_DIR
    if (audit_dir / CONFIG_NAME).exists():
        raise AuditError(f"{audit_dir} already exists; use that workspace or choose another directory")
    audit_dir.mkdir(parents=True, exist_ok=True)
    config = copy.deepcopy(DEFAULT_CONFIG)
    if encoder:
        config["encoder"]["path"] = str(Path(encoder).expanduser().resolve())
    if model:
        config["paths"]["model"] = str(Path(model).expanduser().resolve())
    if lancedb:
        config["paths"]["lancedb"] = lancedb
    ws = Workspace(root, config)
    ws.save()
    if "://" not in ws.lancedb_uri:
        Path(ws.lancedb_uri).mkdir(parents=True, exist_ok=True)
    Store(ws.db_path).close()
    return ws


def load(root: str | os.PathLike) -> Workspace:
    root = Path(root).expanduser().resolve()
    config_path = root / AUDIT_DIR / CONFIG_NAME
    try:
        raw = tomllib.loads(config_path.read_text())
    except FileNotFoundError:
        raise WorkspaceNotFound(f"no workspace at {root} (missing {config_path}); run `audit init {root}`") from None
    except tomllib.TOMLDecodeError as exc:
        raise AuditError(f"{config_path} is not valid TOML ({exc}); fix or recreate it") from None
    return Workspace(root, _merged(DEFAULT_CONFIG, raw))


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
