"""The typer app, what every command shares (workspace, progress, options declared once), and the entry point."""

from __future__ import annotations

import logging
import os
import signal
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text

from .. import runtime
from .. import workspace as workspace_api
from ..config import Section
from ..errors import AuditError, storage_message

app = typer.Typer(
    help="Provenance auditor: which training images, and so which contributors, influenced each generated image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # help texts name settings as [section] key: not markup
)
console = Console(stderr=True, highlight=False)
out = Console(highlight=False)


class _State:
    workspace: str | None = None
    debug: bool = False


state = _State()


@app.callback()
def _main(
    workspace: Path | None = typer.Option(
        None,
        "--workspace",
        "-w",
        envvar=workspace_api.ENV_VAR,
        help="Workspace root (default: nearest parent with .audit/).",
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each committed batch to stderr."),
):
    state.workspace = str(workspace) if workspace else None
    state.debug = debug
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


def default(section: type[Section], key: str) -> str:
    """'[section] key, VALUE unless audit.toml says otherwise': a help text's default, read from the config."""
    value = getattr(section, key)
    return f"default: [{section.name}] {key}, {value} unless audit.toml says otherwise"


class Engine(StrEnum):
    local = "local"
    ray = "ray"


# Options several commands share, declared once.
DeviceOption = Annotated[
    str | None, typer.Option("--device", help="auto, cpu, cuda or cuda:N (default: [encoder] device).")
]
ModelOption = Annotated[
    Path | None,
    typer.Option(
        "--model",
        help="The diffusion model: a diffusers folder or a single checkpoint file (default: [paths] model; [paths] model_config and model_variant apply).",
    ),
]
BatchSizeOption = Annotated[
    int | None, typer.Option("--batch-size", help="Images per encoder batch (default: [encoder] batch_size).")
]
EngineOption = Annotated[
    Engine,
    typer.Option(
        "--engine", help="local (this process) or ray (a Ray cluster: RAY_ADDRESS, else a local Ray instance)."
    ),
]


class RichProgress:
    """Adapts the library's progress protocol to a rich progress bar."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None

    def start(self, description: str, total: int) -> None:
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


def announce(message: str) -> None:
    # Messages carry user text (paths, prompts): never read as markup.
    console.print(Text(message), soft_wrap=True)


def progress_bar() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal,
    )


def current_workspace() -> workspace_api.Workspace:
    return workspace_api.find(state.workspace)


def _fail(message: str) -> None:
    # One line, never wrapped, never read as markup: user text can contain anything.
    console.print(Text("error: ", style="bold red") + Text(" ".join(message.split())), soft_wrap=True)
    sys.exit(1)


def _workspace_places() -> list[str]:
    """The folders the current workspace writes to (for a disk-full message); none when there is no workspace."""
    try:
        ws = current_workspace()
    except Exception:
        return []
    places = [str(ws.dir)]
    lance = ws.lancedb_uri
    if "://" not in lance and not os.path.abspath(lance).startswith(str(ws.dir) + os.sep):
        places.append(lance)
    return places


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a command the way Ctrl-C does: runs are marked interrupted, not left running


def main() -> None:
    runtime.tune_process()
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        app()
    except AuditError as exc:
        if state.debug:
            raise
        _fail(str(exc))
    except KeyboardInterrupt:
        console.print("interrupted; committed batches are kept, rerun to finish")
        sys.exit(130)
    except Exception as exc:  # the one-line promise holds for bugs too
        if state.debug:
            raise
        _fail(
            storage_message(exc, _workspace_places())
            or f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)"
        )
