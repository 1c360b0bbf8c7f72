"""The `audit` command: a thin typer layer over the library (every command is one call into it)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import sql as sql_api
from . import workspace as workspace_api
from .errors import AuditError

app = typer.Typer(
    help="Provenance auditor: which training images, and so which contributors, influenced each generated image.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


class _State:
    workspace: Optional[str] = None
    debug: bool = False


state = _State()


@app.callback()
def _main(
    workspace: Optional[Path] = typer.Option(
        None, "--workspace", "-w", envvar=workspace_api.ENV_VAR, help="Workspace root (default: nearest parent with .audit/)."
    ),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks for errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each committed batch to stderr."),
):
    state.workspace = str(workspace) if workspace else None
    state.debug = debug
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)


class RichProgress:
    """Adapts the library's progress protocol to a rich progress bar."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None

    def start(self, description: str, total: int) -> None:
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
        console=console, transient=False, disable=not console.is_terminal,
    )


def _ws():
    return workspace_api.find(state.workspace)


@app.command()
def init(
    directory: Path = typer.Argument(Path("."), help="Where to create .audit/."),
    encoder: Optional[Path] = typer.Option(None, help="Encoder bundle directory (encoder.json + safetensors)."),
    model: Optional[Path] = typer.Option(None, help="Diffusers pipeline folder used by `audit confirm`."),
    lancedb: Optional[str] = typer.Option(None, help="LanceDB URI (default: .audit/lancedb)."),
):
    """Create a workspace: .audit/ with audit.toml, audit.duckdb and the LanceDB folder."""
    ws = workspace_api.init(directory, encoder=encoder, model=model, lancedb=lancedb)
    out.print(f"created workspace {ws.dir}")


@app.command()
def index(
    training_dir: Path = typer.Argument(..., help="Folder of training images."),
    contributors: Optional[Path] = typer.Option(
        None, "--contributors", help="Manifest CSV: path,contributor_id[,contributor_name,caption,license] (default: TRAINING_DIR/contributors.csv)."
    ),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default from audit.toml)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per encoder batch."),
):
    """Embed the training set into the vector table and register images and contributors."""
    from .training import index_training

    ws = _ws()
    with _progress() as bar:
        result = index_training(ws, training_dir, contributors, device=device, batch_size=batch_size, progress=RichProgress(bar))
    out.print(
        f"indexed: {result.added} new, {result.re_embedded} re-embedded, {result.unchanged} unchanged, "
        f"{result.errors} errors; table has {result.rows} vectors "
        f"({'ANN ' + result.ann_index if result.ann_index else 'exact search'}); encoder {result.encoder_id}; {result.seconds:.1f}s"
    )
    for path, reason in result.error_samples:
        out.print(f"  skipped {path}: {reason}", markup=False)


@app.command()
def scan(
    outputs_dir: Path = typer.Argument(..., help="Folder of generated images (searched recursively)."),
    top_k: Optional[int] = typer.Option(None, "--top-k", help="Training images attributed per generation (default 50)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda (default from audit.toml)."),
    batch_size: Optional[int] = typer.Option(None, help="Images per encoder batch."),
):
    """Attribute every generated image under OUTPUTS_DIR; resumable and idempotent."""
    from .scan import scan as scan_api

    ws = _ws()
    with _progress() as bar:
        result = scan_api(ws, outputs_dir, top_k=top_k, device=device, batch_size=batch_size, progress=RichProgress(bar))
    table = Table(title=f"scan {result.scan_id}", show_header=False)
    for label, value in (
        ("images seen", result.seen),
        ("attributed", result.attributed),
        ("skipped (already attributed)", result.skipped),
        ("errors (see scan_errors)", result.errors),
        ("images/s", f"{result.images_per_second:.1f}"),
        ("encoder", result.encoder_id),
    ):
        table.add_row(label, str(value))
    out.print(table)


@app.command()
def confirm(
    top: Optional[int] = typer.Option(None, "--top", help="Confirm the N generations most in need (highest top-1 share, not yet confirmed with this model and settings)."),
    where: Optional[str] = typer.Option(None, "--where", help="SQL condition over `generations g` selecting what to confirm."),
    generation: Optional[int] = typer.Option(None, "--generation", help="Confirm this generation id."),
    model: Optional[Path] = typer.Option(None, "--model", help="Diffusers pipeline folder (default: [paths] model in audit.toml)."),
    device: Optional[str] = typer.Option(None, help="auto, cpu or cuda."),
    candidates: Optional[int] = typer.Option(None, help="Fast-path top-K scored by the teacher."),
    controls: Optional[int] = typer.Option(None, help="Random training images outside the top-K scored as controls."),
    steps: Optional[int] = typer.Option(None, help="Unlearning steps."),
    step_size: Optional[float] = typer.Option(None, help="Unlearning step size (eta)."),
    draws: Optional[int] = typer.Option(None, help="(timestep, noise) draws averaged in the unlearning gradient."),
    timesteps: Optional[int] = typer.Option(None, help="Evenly spaced timesteps of the scoring loss."),
):
    """Run the unlearning teacher (AbU) on flagged generations and store its verdict beside the fast one."""
    from .confirm import confirm as confirm_api

    ws = _ws()
    with _progress() as bar:
        result = confirm_api(
            ws, top=top, where=where, generation=generation, model=model, device=device, progress=RichProgress(bar),
            announce=lambda message: console.print(message, highlight=False, soft_wrap=True),
            candidates=candidates, controls=controls, steps=steps, step_size=step_size, draws=draws, timesteps=timesteps,
        )
    if result.run_id is None:
        return
    per = result.seconds / max(1, result.generations)
    out.print(
        f"confirm run {result.run_id}: {result.generations} generation(s), {result.confirmed} confirmed, "
        f"{len(result.failed)} failed; {per:.1f} s each; noise floor {result.noise_floor:.3g}, "
        f"signal/noise {result.signal_to_noise:.1f} (see confirmations)"
    )
    for gen_id, reason in result.failed:
        out.print(f"  generation {gen_id} not confirmed: {reason}", markup=False)


@app.command("sql")
def sql_command(
    query: str = typer.Argument(..., help="One SQL statement over the audit store (see schemas/README.md)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, json or parquet."),
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write the result to this file."),
    write: bool = typer.Option(False, "--write", help="Allow statements that change the store."),
):
    """Run SQL against the audit store (read-only unless --write)."""
    frame = sql_api.query(_ws(), query, write=write)
    if frame is None:
        out.print("ok")
        return
    if fmt == "table" and out_file is None:
        table = Table(*frame.columns)
        for row in frame.iter_rows():
            table.add_row(*("" if v is None else str(v) for v in row))
        out.print(table)
        return
    text = sql_api.render(frame, fmt, out_file)
    if text is not None:
        sys.stdout.write(text)


def _fail(message: str) -> None:
    # One line, never wrapped, never read as markup: user text can contain anything.
    console.print(Text("error: ", style="bold red") + Text(" ".join(message.split())), soft_wrap=True, highlight=False)
    sys.exit(1)


def main() -> None:
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
        _fail(f"unexpected {type(exc).__name__}: {exc} (rerun with --debug for the traceback)")
