"""`audit distill`: collect teacher rankings, train the head, move collections between workspaces."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.text import Text

from ..config import DistillSettings
from .app import (
    DeviceOption,
    ModelOption,
    RichProgress,
    announce,
    app,
    console,
    current_workspace,
    default,
    out,
    progress_bar,
)
from .commands import ForceOption, switch_encoder

distill_app = typer.Typer(
    rich_markup_mode=None,  # help texts name settings as [section] key: not markup
    help="Distil the teacher into the encoder (FastGDA): collect rankings, train the head.",
    no_args_is_help=True,
)
app.add_typer(distill_app, name="distill")


@distill_app.command("collect")
def distill_collect(
    queries: int | None = typer.Option(
        None,
        help="Query images to generate; a larger count than an earlier run with the same settings adds the missing "
        f"ones ({default(DistillSettings, 'queries')}).",
    ),
    prompts: Path | None = typer.Option(None, help="Prompt set, one per line (default: the training captions)."),
    folder: Path | None = typer.Option(
        None,
        help="Use these images as queries instead of generating them; a rerun adds images new to the folder or "
        "changed since, and skips files that are no readable image.",
    ),
    candidates: int | None = typer.Option(
        None,
        help="Nearest training images (untuned backbone) the teacher ranks per query "
        f"({default(DistillSettings, 'candidates')}).",
    ),
    seed: int | None = typer.Option(
        None,
        help="Seed of the generated query images; a new seed adds new images, ranked by the same teacher "
        f"({default(DistillSettings, 'seed')}).",
    ),
    model: ModelOption = None,
    device: DeviceOption = None,
):
    """Generate query images and store the teacher's ranking of each one's candidates (resumable)."""
    from ..distill import collect

    ws = current_workspace()
    with progress_bar() as bar:
        result = collect(
            ws,
            prompts_file=prompts,
            folder=folder,
            model=model,
            device=device,
            progress=RichProgress(bar),
            announce=announce,
            queries=queries,
            candidates=candidates,
            seed=seed,
        )
    out.print(
        f"{result.collected} ranked now; {result.train} train + {result.test} test queries collected of "
        f"{result.planned}; {result.seconds:.0f} s"
    )


def _epoch(row: dict) -> None:
    if row.get("refit"):
        console.print(f"refit epoch {row['epoch']}: loss {row['loss']:.4f}")
    else:
        console.print(f"epoch {row['epoch']}: loss {row['loss']:.4f}, val mAP {row['val_map']:.3f}")


@distill_app.command("train")
def distill_train(
    out_dir: Path | None = typer.Option(None, "--out", help="Directory for the new encoder bundle."),
    epochs: int | None = typer.Option(
        None, help=f"Maximum epochs, early stopping on validation mAP ({default(DistillSettings, 'epochs')})."
    ),
    strengths: bool | None = typer.Option(
        None,
        "--strengths/--no-strengths",
        help=f"Learn an influence strength per training image ({default(DistillSettings, 'strengths')}).",
    ),
    use: bool = typer.Option(
        False,
        "--use",
        help="Switch the workspace to the new encoder and re-index, if it holds up against its untuned baseline on the "
        "workspace's ground-truth checks (planted, LDS).",
    ),
    force: bool = ForceOption,
):
    """Train the distilled head on the collected rankings and write a new encoder bundle (the old one is untouched)."""
    from ..distill import train

    ws = current_workspace()
    result = train(ws, out=out_dir, epochs=epochs, strengths=strengths, announce=announce, progress_row=_epoch)
    out.print(
        Text(
            f"encoder {result.encoder_id} written to {result.path}: val mAP@k {result.best_val_map:.3f} "
            f"(epoch {result.epochs}), temperature {result.temperature:.4g} (NLL {result.calibration_nll:.3f}, "
            f"ECE {result.calibration_ece:.4f}); {result.train_queries} train / {result.val_queries} validation "
            f"queries, head fitted on {result.fitted_queries}; {result.seconds:.0f} s"
        )
    )
    if use:
        switch_encoder(result.path, None, force, teacher_map=result.best_val_map)


@distill_app.command("export")
def distill_export(
    out_dir: Path = typer.Argument(
        ..., help="New folder for the collection (queries.parquet, rankings.parquet, replicates.parquet, images/)."
    ),
):
    """Write the collected rankings and their query images to a folder another workspace can import (collect where
    the teacher is fast, train anywhere)."""
    from ..distill import export_collection

    n = export_collection(current_workspace(), out_dir)
    out.print(Text(f"{n} collected queries written to {out_dir}"))


@distill_app.command("import")
def distill_import(
    folder: Path = typer.Argument(..., help="A folder written by `audit distill export`."),
    model: ModelOption = None,
):
    """Add an exported collection to this workspace (same model and training set; importing twice adds nothing)."""
    from ..distill import import_collection

    result = import_collection(current_workspace(), folder, model=model)
    out.print(
        f"{result.queries} queries ({result.rankings} ranked candidates, {result.replicates} replicate scores) "
        f"imported; {result.skipped} already here"
    )
