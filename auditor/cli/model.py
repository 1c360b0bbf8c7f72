"""`audit model`: the identity of the workspace's model, which decides whether a generation declares it."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from .app import announce, app, current_workspace, out

model_app = typer.Typer(
    rich_markup_mode=None,  # help texts name settings as [section] key: not markup
    help="The model the audited outputs must come from: its checkpoint hashes and names (auditor/model_identity.py).",
    no_args_is_help=True,
)
app.add_typer(model_app, name="model")


def _show(ident) -> None:
    table = Table(title="model identity", show_header=True)
    for column in ("kind", "value", "from"):
        table.add_column(column)
    for c in ident.checkpoints:
        table.add_row("sha256 (AutoV2 = first 10)", Text(c.sha256), Text(c.path))
        table.add_row("AutoV1", Text(c.autov1), Text(c.path))
        if c.autov3:
            table.add_row("AutoV3", Text(c.autov3), Text(c.path))
        table.add_row("name", Text(c.name), Text(c.path))
    for value in ident.hashes:
        table.add_row("hash", Text(value), "[model] hashes")
    for value in ident.names:
        table.add_row("name", Text(value), "[model] names")
    out.print(table)
    if ident.empty:
        out.print(
            "no identity yet: generations that declare a model are matched 'unknown'; add the checkpoint file(s) "
            "the model was served from with `audit model add-checkpoint FILE`"
        )


@model_app.command("show")
def model_show():
    """Show the model's identity: its checkpoint files' hashes (computed when not cached yet) and names."""
    from ..model_identity import identity

    ws = current_workspace()
    with ws.reader() as store:
        ident = identity(ws, store, write=False, announce=announce)
    _show(ident)


@model_app.command("add-checkpoint")
def model_add_checkpoint(
    files: list[Path] = typer.Argument(..., help="Checkpoint files (.safetensors, .ckpt) the model was served from."),
):
    """Add checkpoint files to [model] checkpoints: hash them (streaming) and match the stored generations again."""
    from ..model_identity import add_checkpoints

    _show(add_checkpoints(current_workspace(), files, announce=announce))


@model_app.command("alias")
def model_alias(
    hashes: list[str] = typer.Option([], "--hash", help="A hash generators write for this model (repeatable)."),
    names: list[str] = typer.Option([], "--name", help="A model name generators write for it (repeatable)."),
):
    """Add hashes or names to [model] hashes / names (when no checkpoint file is at hand) and match again."""
    from ..errors import AuditError
    from ..model_identity import update

    if not hashes and not names:
        raise AuditError("give --hash HASH or --name NAME")
    _show(update(current_workspace(), hashes=hashes, names=names, announce=announce))
