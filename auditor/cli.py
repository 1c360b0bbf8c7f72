"""The `audit` command: a thin typer layer over the library (every command is one call into it)."""

from __future__ import annotations

import logging
import sys
from datetime import datetime
from decimal import Decimal, InvalidOperation
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from rich.text import Text

from . import prefer_spinning_threads
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


class RichProgress:
    """Adapts the library's progress protocol to a rich progress bar."""

    def __init__(self, progress: Progress):
        self.progress = progress
        self.task = None

    def start(self, description: str, total: int) -> None:
        self.task = self.progress.add_task(description, total=total)

    def advance(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


def _announce(message: str) -> None:
    console.print(message, highlight=False, soft_wrap=True)


def _progress() -> Progress:
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


def _ws():
    return workspace_api.find(state.workspace)


def _engine(name: str) -> str:
    if name not in ("local", "ray"):
        raise typer.BadParameter(f"{name!r} is not an engine; use local or ray", param_hint="--engine")
    return name


@app.command()
def init(
    directory: Path = typer.Argument(Path("."), help="Where to create .audit/."),
    encoder: Path | None = typer.Option(None, help="Encoder bundle directory (encoder.json + safetensors)."),
    model: Path | None = typer.Option(None, help="Diffusers pipeline folder used by `audit confirm`."),
    lancedb: str | None = typer.Option(None, help="LanceDB URI (default: .audit/lancedb)."),
):
    """Create a workspace: .audit/ with audit.toml, audit.duckdb and the LanceDB folder."""
    ws = workspace_api.init(directory, encoder=encoder, model=model, lancedb=lancedb)
    out.print(f"created workspace {ws.dir}")


@app.command()
def index(
    training_dir: Path = typer.Argument(..., help="Folder of training images."),
    contributors: Path | None = typer.Option(
        None,
        "--contributors",
        help="Manifest CSV: path,contributor_id[,contributor_name,caption,license] (default: TRAINING_DIR/contributors.csv).",
    ),
    device: str | None = typer.Option(None, help="auto, cpu or cuda (default from audit.toml)."),
    batch_size: int | None = typer.Option(None, help="Images per encoder batch."),
    engine: str = typer.Option(
        "local",
        "--engine",
        help="local (this process) or ray (embed on a Ray cluster: RAY_ADDRESS, else a local Ray instance).",
    ),
):
    """Embed the training set into the vector table and register images and contributors."""
    from .training import index_training

    ws = _ws()
    with _progress() as bar:
        result = index_training(
            ws,
            training_dir,
            contributors,
            device=device,
            batch_size=batch_size,
            progress=RichProgress(bar),
            engine=_engine(engine),
        )
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
    top_k: int | None = typer.Option(None, "--top-k", help="Training images attributed per generation (default 50)."),
    device: str | None = typer.Option(None, help="auto, cpu or cuda (default from audit.toml)."),
    batch_size: int | None = typer.Option(None, help="Images per encoder batch."),
    engine: str = typer.Option(
        "local",
        "--engine",
        help="local (this process) or ray (embed on a Ray cluster: RAY_ADDRESS, else a local Ray instance).",
    ),
):
    """Attribute every generated image under OUTPUTS_DIR; resumable and idempotent."""
    from .scan import scan as scan_api

    ws = _ws()
    with _progress() as bar:
        result = scan_api(
            ws,
            outputs_dir,
            top_k=top_k,
            device=device,
            batch_size=batch_size,
            progress=RichProgress(bar),
            engine=_engine(engine),
        )
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
    method: str | None = typer.Option(
        None,
        "--method",
        help="The teacher: abu (attribution by unlearning) or dtrak (projected gradients; [dtrak] in audit.toml). Default: [confirm] method.",
    ),
    top: int | None = typer.Option(
        None,
        "--top",
        help="Confirm the N generations most in need (highest top-1 share, not yet confirmed with this model and settings).",
    ),
    where: str | None = typer.Option(
        None, "--where", help="SQL condition over `generations g` selecting what to confirm."
    ),
    generation: int | None = typer.Option(None, "--generation", help="Confirm this generation id."),
    model: Path | None = typer.Option(
        None, "--model", help="Diffusers pipeline folder (default: [paths] model in audit.toml)."
    ),
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
    candidates: int | None = typer.Option(None, help="Fast-path top-K scored by the teacher."),
    controls: int | None = typer.Option(None, help="Random training images outside the top-K scored as controls."),
    steps: int | None = typer.Option(None, help="Unlearning steps."),
    step_size: float | None = typer.Option(None, help="Unlearning step size (eta)."),
    draws: int | None = typer.Option(None, help="(timestep, noise) draws averaged in the unlearning gradient."),
    timesteps: int | None = typer.Option(
        None, help="Evenly spaced timesteps of the scoring loss (AbU) or output function (D-TRAK)."
    ),
):
    """Run a teacher (AbU unlearning or D-TRAK gradients) on flagged generations and store its verdict beside the fast one."""
    from .confirm import confirm as confirm_api

    ws = _ws()
    with _progress() as bar:
        result = confirm_api(
            ws,
            method=method,
            top=top,
            where=where,
            generation=generation,
            model=model,
            device=device,
            progress=RichProgress(bar),
            announce=_announce,
            candidates=candidates,
            controls=controls,
            steps=steps,
            step_size=step_size,
            draws=draws,
            timesteps=timesteps,
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


distill_app = typer.Typer(
    help="Distil the teacher into the encoder (FastGDA): collect rankings, train the head.", no_args_is_help=True
)
app.add_typer(distill_app, name="distill")


@distill_app.command("collect")
def distill_collect(
    queries: int | None = typer.Option(
        None,
        help="Query images to generate (default from audit.toml [distill]); a larger "
        "count than an earlier run with the same settings adds the missing ones.",
    ),
    prompts: Path | None = typer.Option(None, help="Prompt set, one per line (default: the training captions)."),
    folder: Path | None = typer.Option(
        None,
        help="Use these images as queries instead of generating them; a rerun adds "
        "images new to the folder or changed since, and skips files that are no readable image.",
    ),
    candidates: int | None = typer.Option(
        None, help="Nearest training images (untuned backbone) the teacher ranks per query."
    ),
    seed: int | None = typer.Option(
        None,
        help="Seed of the generated query images (default from audit.toml [distill]); "
        "a new seed adds new images, ranked by the same teacher.",
    ),
    model: Path | None = typer.Option(None, help="Diffusers pipeline folder (default: [paths] model)."),
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
):
    """Generate query images and store the teacher's ranking of each one's candidates (resumable)."""
    from .distill import collect

    ws = _ws()
    with _progress() as bar:
        result = collect(
            ws,
            prompts_file=prompts,
            folder=folder,
            model=model,
            device=device,
            progress=RichProgress(bar),
            announce=_announce,
            queries=queries,
            candidates=candidates,
            seed=seed,
        )
    out.print(
        f"{result.collected} ranked now; {result.train} train + {result.test} test queries collected of {result.planned}; {result.seconds:.0f} s"
    )


@distill_app.command("train")
def distill_train(
    out_dir: Path | None = typer.Option(None, "--out", help="Directory for the new encoder bundle."),
    epochs: int | None = typer.Option(None, help="Maximum epochs (early stopping on validation mAP)."),
    strengths: bool | None = typer.Option(
        None,
        "--strengths/--no-strengths",
        help="Learn an influence strength per training image (default from audit.toml [distill]).",
    ),
    use: bool = typer.Option(False, "--use", help="Switch the workspace to the new encoder and re-index."),
):
    """Train the distilled head on the collected rankings and write a new encoder bundle (the old one is untouched)."""
    from .distill import train

    ws = _ws()
    result = train(
        ws,
        out=out_dir,
        epochs=epochs,
        strengths=strengths,
        announce=_announce,
        progress_row=lambda r: console.print(
            f"refit epoch {r['epoch']}: loss {r['loss']:.4f}"
            if r.get("refit")
            else f"epoch {r['epoch']}: loss {r['loss']:.4f}, val mAP {r['val_map']:.3f}",
            highlight=False,
        ),
    )
    out.print(
        f"encoder {result.encoder_id} written to {result.path}: val mAP@k {result.best_val_map:.3f} (epoch {result.epochs}), "
        f"temperature {result.temperature:.4g} (NLL {result.calibration_nll:.3f}, ECE {result.calibration_ece:.4f}); "
        f"{result.train_queries} train / {result.val_queries} validation queries, head fitted on {result.fitted_queries}; "
        f"{result.seconds:.0f} s"
    )
    if use:
        use_encoder(result.path)


@distill_app.command("export")
def distill_export(
    out_dir: Path = typer.Argument(
        ..., help="New folder for the collection (queries.parquet, rankings.parquet, replicates.parquet, images/)."
    ),
):
    """Write the collected rankings and their query images to a folder another workspace can import (collect where the teacher is fast, train anywhere)."""
    from .distill import export_collection

    n = export_collection(_ws(), out_dir)
    out.print(f"{n} collected queries written to {out_dir}")


@distill_app.command("import")
def distill_import(
    folder: Path = typer.Argument(..., help="A folder written by `audit distill export`."),
    model: Path | None = typer.Option(
        None, help="Diffusers pipeline folder (default: [paths] model); must be the model the collection was ranked on."
    ),
):
    """Add an exported collection to this workspace (same model and training set; importing twice adds nothing)."""
    from .distill import import_collection

    result = import_collection(_ws(), folder, model=model)
    out.print(
        f"{result.queries} queries ({result.rankings} ranked candidates, {result.replicates} replicate scores) imported; "
        f"{result.skipped} already here"
    )


@app.command("use-encoder")
def use_encoder(
    bundle: Path = typer.Argument(..., help="Encoder bundle directory."),
    device: str | None = typer.Option(None, help="auto, cpu or cuda."),
):
    """Switch the workspace to another encoder and embed the registered training set with it (earlier attributions stay, under their encoder id)."""
    from .training import reindex

    ws = _ws()
    with _progress() as bar:
        result = reindex(ws, bundle, device=device, progress=RichProgress(bar))
    out.print(
        f"workspace now uses encoder {result.encoder_id}: {result.re_embedded} training images embedded, table has {result.rows} vectors"
    )


@app.command("eval")
def eval_command(
    encoder: list[Path] | None = typer.Option(
        None, "--encoder", help="Encoder bundle(s) to evaluate (default: the workspace's)."
    ),
    k: list[int] | None = typer.Option(None, "--k", help="k of mAP@k (repeatable; default 5 10 20 50)."),
    out_dir: Path | None = typer.Option(
        None,
        "--out",
        help="Write eval.json and eval.md (planted.* with --planted, counterfactual.* with --counterfactual) here.",
    ),
    planted: bool = typer.Option(
        False,
        "--planted",
        help="Planted ground truth instead (AbC): customise the model on new-style exemplars, score every method (fast, untuned, AbU, D-TRAK) by Recall@5/10/100 and mAP of the exemplars.",
    ),
    exemplars: Path | None = typer.Option(
        None,
        "--exemplars",
        help="With --planted: folder of images that become the exemplars (e.g. examples/digits_world/heldout).",
    ),
    style: str | None = typer.Option(
        None,
        "--style",
        help="With --planted: palette (recolour --exemplars images into new palettes), stroke (mirrored, upside down, bold, thin strokes in their own colours) or as-is (one subfolder per customisation, unchanged). Default from audit.toml [planted].",
    ),
    customisations: int | None = typer.Option(
        None, help="With --planted: number of customised models (default from audit.toml [planted])."
    ),
    generations: int | None = typer.Option(None, help="With --planted: images generated per customised model."),
    tune: str | None = typer.Option(
        None,
        "--tune",
        help="With --planted: weights fine-tuned per customisation, kv (cross-attention keys/values) or all (the whole UNet).",
    ),
    steps: int | None = typer.Option(None, help="With --planted: fine-tuning steps per customisation."),
    replicate: bool = typer.Option(
        False,
        "--replicate",
        help="Also run the teacher again on the held-out queries with independent noise and score it like a method: the ceiling any student can reach against this teacher (costs one teacher run per query).",
    ),
    pooled: bool = typer.Option(
        False,
        "--pooled",
        help="Positives from the mean of the teacher's run and its replicate (implies --replicate): twice the scoring samples per query, so less of the teacher's own noise, which lowers every method's mAP and hides part of the gap between them.",
    ),
    counterfactual: bool = typer.Option(
        False,
        "--counterfactual",
        help="Leave-K-out instead: retrain the model from scratch by its recipe without each method's top-K (fast, AbU, D-TRAK) and without K random / K most similar images; report the loss increase on the generation and how far its regeneration moves.",
    ),
    generation: list[int] | None = typer.Option(
        None,
        "--generation",
        help="With --counterfactual: generation id to check (repeatable; default: [counterfactual] generations AbU-scored ones, distinct prompts first).",
    ),
    remove: int | None = typer.Option(
        None,
        "--remove",
        help="With --counterfactual: images left out per generation and method (default from audit.toml [counterfactual] k).",
    ),
    retrain_steps: int | None = typer.Option(
        None,
        "--retrain-steps",
        help="With --counterfactual: training steps of every retraining (default: the recipe's own).",
    ),
    model: Path | None = typer.Option(
        None,
        "--model",
        help="With --planted, --counterfactual, --replicate or --pooled: diffusers pipeline folder (default: [paths] model).",
    ),
    device: str | None = typer.Option(
        None, help="With --planted, --counterfactual, --replicate or --pooled: auto, cpu or cuda."
    ),
):
    """mAP@k against the teacher on held-out queries: distilled vs untuned image, text and image ⊕ text; or, with --planted, every method against planted ground truth; or, with --counterfactual, the leave-K-out check."""
    ws = _ws()
    if counterfactual:
        prefer_spinning_threads()
        from . import counterfactual as counterfactual_api

        with _progress() as bar:
            report = counterfactual_api.counterfactual(
                ws,
                generations=generation,
                model=model,
                device=device,
                progress=RichProgress(bar),
                announce=_announce,
                k=remove,
                retrain_steps=retrain_steps,
            )
        markdown, data, stem = (
            counterfactual_api.to_markdown(report),
            counterfactual_api.to_json(report),
            "counterfactual",
        )
    elif planted:
        from . import planted as planted_api

        if exemplars is None:
            raise AuditError(
                "--planted needs --exemplars DIR: a folder of images to turn into exemplars (e.g. examples/digits_world/heldout)"
            )
        with _progress() as bar:
            report = planted_api.planted(
                ws,
                exemplars=exemplars,
                model=model,
                device=device,
                progress=RichProgress(bar),
                announce=_announce,
                style=style,
                tune=tune,
                customisations=customisations,
                generations=generations,
                steps=steps,
            )
        markdown, data, stem = planted_api.to_markdown(report), planted_api.to_json(report), "planted"
    else:
        from .evaluate import evaluate, to_json, to_markdown

        replica = None
        if replicate or pooled:
            from .distill import replicate as replicate_teacher

            with _progress() as bar:
                replica = replicate_teacher(
                    ws, model=model, device=device, progress=RichProgress(bar), announce=_announce
                )
        results, n = evaluate(
            ws,
            encoders=encoder,
            ks=tuple(k) if k else (5, 10, 20, 50),
            replicate=replica,
            pooled=pooled,
            announce=_announce,
        )
        markdown, data, stem = to_markdown(results, n, pooled=pooled), to_json(results, n, pooled=pooled), "eval"
    out.print(markdown, markup=False, highlight=False)
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.md").write_text(markdown)
        (out_dir / f"{stem}.json").write_text(data)


@app.command("sql")
def sql_command(
    query: str = typer.Argument(..., help="One SQL statement over the audit store (see schemas/README.md)."),
    fmt: str = typer.Option("table", "--format", "-f", help="table, csv, json or parquet."),
    out_file: Path | None = typer.Option(None, "--out", "-o", help="Write the result to this file."),
    write: bool = typer.Option(False, "--write", help="Allow statements that change the store."),
):
    """Run SQL against the audit store (read-only unless --write)."""
    frame = sql_api.query(_ws(), query, write=write)
    if frame is None:
        out.print("ok")
        return
    text = sql_api.render(frame, fmt, out_file)
    if text is not None:
        sys.stdout.write(text)


def _amount(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise typer.BadParameter(f"{text!r} is not an amount like 1000 or 1000.00") from None


@app.command()
def report(
    period: str | None = typer.Option(None, help="Calendar month YYYY-MM: the generations registered in it (UTC)."),
    date_from: datetime | None = typer.Option(
        None, "--from", formats=["%Y-%m-%d"], help="First day of the period (inclusive)."
    ),
    date_to: datetime | None = typer.Option(
        None, "--to", formats=["%Y-%m-%d"], help="Last day of the period (inclusive)."
    ),
    pool: Decimal = typer.Option(..., parser=_amount, help="The amount divided among the contributors."),
    currency: str = typer.Option("EUR", help="ISO 4217 code; amounts are exact to its minor unit."),
    policy: str = typer.Option(
        "per-output", help="per-output (by attributed credit) or training-set (by images indexed)."
    ),
    confirmed_weight: float = typer.Option(
        2.0, help="Weight of a teacher-confirmed attribution within its generation (others: 1)."
    ),
    min_payout: Decimal = typer.Option(
        "0", parser=_amount, help="Smaller amounts are paid 0 and shared among the others."
    ),
    encoder: str | None = typer.Option(None, help="encoder_id whose attributions count (default: the latest scan's)."),
    out_dir: Path = typer.Option(
        Path("report"), "--out", "-o", help="Report folder; an earlier report there is replaced."
    ),
):
    """Write compensation statements: OUT/index.html, OUT/contributors/<id>.html, payouts.csv and payouts.parquet."""
    from .report import build_report

    result = build_report(
        _ws(),
        out_dir,
        period=period,
        date_from=date_from and date_from.date(),
        date_to=date_to and date_to.date(),
        pool=pool,
        currency=currency,
        policy=policy,
        confirmed_weight=confirmed_weight,
        min_payout=min_payout,
        encoder_id=encoder,
    )
    table = Table(title=f"report {result.period}", show_header=False)
    for label, value in (
        ("basis", result.policy),
        ("generations credited", f"{result.credited_generations} of {result.generations}"),
        ("contributors paid", f"{int(result.payouts['paid'].sum())} of {result.payouts.height}"),
        ("pool", f"{result.currency} {result.pool:,}"),
        ("paid out", f"{result.currency} {result.total_paid:,}"),
    ):
        table.add_row(label, value)
    out.print(table)
    out.print(f"report: {result.index}", markup=False, highlight=False, soft_wrap=True)


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
