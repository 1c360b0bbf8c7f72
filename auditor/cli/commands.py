"""The stage commands: init, index, scan, confirm, use-encoder, sql, report."""

from __future__ import annotations

import sys
from datetime import datetime
from decimal import Decimal, InvalidOperation
from enum import StrEnum
from pathlib import Path

import typer
from rich.table import Table
from rich.text import Text

from .. import sql as sql_api
from .. import workspace as workspace_api
from ..config import ConfirmSettings, ReportSettings, ScanSettings, SourcesSettings
from ..errors import AuditError
from .app import (
    BatchSizeOption,
    DeviceOption,
    Engine,
    EngineOption,
    ModelOption,
    RichProgress,
    announce,
    app,
    current_workspace,
    default,
    out,
    progress_bar,
)


def _summary(title: str, rows: list[tuple[str, object]]) -> None:
    table = Table(title=title, show_header=False)
    for label, value in rows:
        table.add_row(label, Text(str(value)))
    out.print(table)


@app.command()
def init(
    directory: Path = typer.Argument(Path("."), help="Where to create .audit/."),
    encoder: Path | None = typer.Option(None, help="Encoder bundle directory (encoder.json + safetensors)."),
    model: Path | None = typer.Option(
        None,
        help="The diffusion model the teachers load: a diffusers folder of Stable Diffusion 1.x/2.x or SDXL, or one "
        ".safetensors/.ckpt checkpoint of them (with --model-config). Checked now; other families are refused.",
    ),
    model_config: Path | None = typer.Option(
        None,
        "--model-config",
        help="For a single-file --model: a local diffusers folder of the same family to read it with ([paths] "
        "model_config; configs, tokenizers and scheduler, no weights needed).",
    ),
    variant: str | None = typer.Option(
        None,
        "--variant",
        help="Weights variant of a diffusers --model folder, e.g. fp16 ([paths] model_variant); by default the plain "
        "weights, or the only variant there is.",
    ),
    lancedb: str | None = typer.Option(None, help="LanceDB URI (default: .audit/lancedb)."),
):
    """Create a workspace: .audit/ with audit.toml, audit.duckdb and the LanceDB folder."""
    ws = workspace_api.init(
        directory, encoder=encoder, model=model, lancedb=lancedb, model_config=model_config, variant=variant
    )
    out.print(Text(f"created workspace {ws.dir}"))
    if model:
        out.print(Text(f"model: {ws.model_source().describe()}"))


@app.command()
def index(
    source: str = typer.Argument(
        ...,
        help="Folder of training images; or WebDataset tar shards or Parquet manifests: a path, s3:// or gs:// URL, "
        "or pattern such as 'shards/{00000..00999}.tar' or 'meta/*.parquet'.",
    ),
    contributors: Path | None = typer.Option(
        None,
        "--contributors",
        help="Manifest CSV: path,contributor_id[,contributor_name,caption,license] "
        "(default: TRAINING_DIR/contributors.csv).",
    ),
    image_field: str | None = typer.Option(
        None, "--image-field", help=f"Parquet column with the image ({default(SourcesSettings, 'image')})."
    ),
    caption_field: str | None = typer.Option(
        None,
        "--caption-field",
        help=f"Parquet column or shard JSON field with the caption ({default(SourcesSettings, 'caption')}).",
    ),
    contributor_field: str | None = typer.Option(
        None,
        "--contributor-field",
        help=f"Parquet column or shard JSON field with the contributor id ({default(SourcesSettings, 'contributor')}).",
    ),
    license_field: str | None = typer.Option(
        None,
        "--license-field",
        help=f"Parquet column or shard JSON field with the licence ({default(SourcesSettings, 'license')}).",
    ),
    allow_outside: bool = typer.Option(
        False,
        "--allow-outside",
        help="Index manifest paths that resolve outside TRAINING_DIR (`../`, absolute paths, symlinks pointing out); "
        "without it they are recorded in index_errors as outside_training_dir.",
    ),
    device: DeviceOption = None,
    batch_size: BatchSizeOption = None,
    engine: EngineOption = Engine.local,
):
    """Embed the training set into the vector table and register images and contributors.

    Shards and Parquet files are read one at a time and recorded when read to their end: a rerun reads only the
    ones not read before (a killed run resumes at the one in flight)."""
    from ..index import index_training

    ws = current_workspace()
    fields = ws.config.sources.override(
        image=image_field, caption=caption_field, contributor=contributor_field, license=license_field
    ).fields()
    with progress_bar() as bar:
        result = index_training(
            ws,
            source,
            contributors,
            device=device,
            batch_size=batch_size,
            progress=RichProgress(bar),
            engine=engine.value,
            allow_outside=allow_outside,
            fields=fields,
        )
    search = f"ANN {result.ann_index}" if result.ann_index else "exact search"
    out.print(
        f"indexed: {result.added} new, {result.re_embedded} re-embedded, {result.unchanged} unchanged, "
        f"{result.errors} errors; table has {result.rows} vectors ({search}); encoder {result.encoder_id}; "
        f"{result.seconds:.1f}s"
    )
    for path, reason in result.error_samples:
        out.print(Text(f"  skipped {path}: {reason}"))


@app.command()
def scan(
    outputs_dir: Path = typer.Argument(..., help="Folder of generated images (searched recursively)."),
    top_k: int | None = typer.Option(
        None, "--top-k", help=f"Training images attributed per generation ({default(ScanSettings, 'top_k')})."
    ),
    device: DeviceOption = None,
    batch_size: BatchSizeOption = None,
    engine: EngineOption = Engine.local,
):
    """Attribute every generated image under OUTPUTS_DIR; resumable and idempotent."""
    from ..scan import scan as scan_api

    ws = current_workspace()
    try:
        with progress_bar() as bar:
            result = scan_api(
                ws,
                outputs_dir,
                top_k=top_k,
                device=device,
                batch_size=batch_size,
                progress=RichProgress(bar),
                engine=engine.value,
                announce=announce,
            )
    except KeyboardInterrupt:
        announce("scan interrupted (status 'interrupted' in scans); committed batches are kept, rerun to finish")
        raise typer.Exit(130) from None
    _summary(
        f"scan {result.scan_id}",
        [
            ("images seen", result.seen),
            ("attributed", result.attributed),
            ("skipped (already attributed)", result.skipped),
            ("errors (see scan_errors)", result.errors),
            ("unsupported files (see scan_errors)", result.unsupported),
            ("images/s", f"{result.images_per_second:.1f}"),
            ("encoder", result.encoder_id),
        ],
    )
    if result.models:
        models = Table(title="attributed, by the model they declare", show_header=True)
        for column in ("model (hash / name)", "match", "generations"):
            models.add_column(column)
        for (label, match), count in sorted(result.models.items(), key=lambda kv: (-kv[1], kv[0])):
            models.add_row(Text(label), Text(match), Text(str(count)))
        out.print(models)
    if not result.identity_known and any(match == "unknown" for _, match in result.models):
        announce(
            "the workspace's model identity is empty, so declared models could not be matched: "
            "set it with `audit model add-checkpoint FILE` or `audit model alias`"
        )


class TeacherMethod(StrEnum):
    abu = "abu"
    dtrak = "dtrak"
    auto = "auto"


@app.command()
def confirm(
    method: TeacherMethod | None = typer.Option(
        None,
        "--method",
        help="The teacher: abu (attribution by unlearning), dtrak (projected gradients; [dtrak] in audit.toml), or "
        "auto (the one that did best on this workspace's stored leave-K-out, LDS and planted checks; the default "
        f"when none has measured both) ({default(ConfirmSettings, 'method')}).",
    ),
    top: int | None = typer.Option(
        None,
        "--top",
        help="Confirm the N generations most in need (highest top-1 share, not yet confirmed with this model and "
        "settings).",
    ),
    where: str | None = typer.Option(
        None, "--where", help="SQL condition over `generations g` selecting what to confirm."
    ),
    generation: int | None = typer.Option(None, "--generation", help="Confirm this generation id."),
    model: ModelOption = None,
    device: DeviceOption = None,
    candidates: int | None = typer.Option(
        None, help=f"Fast-path top-K scored by the teacher ({default(ConfirmSettings, 'candidates')})."
    ),
    controls: int | None = typer.Option(
        None,
        help=f"Random training images outside the top-K scored as controls ({default(ConfirmSettings, 'controls')}).",
    ),
    steps: int | None = typer.Option(None, help=f"Unlearning steps ({default(ConfirmSettings, 'steps')})."),
    step_size: float | None = typer.Option(
        None, help=f"Unlearning step size, eta ({default(ConfirmSettings, 'step_size')})."
    ),
    draws: int | None = typer.Option(
        None,
        help=f"(timestep, noise) draws of the unlearning gradient ({default(ConfirmSettings, 'draws')}).",
    ),
    timesteps: int | None = typer.Option(
        None,
        help="Evenly spaced timesteps of the scoring loss (AbU; [confirm] timesteps) or of the output function "
        "(D-TRAK; [dtrak] timesteps).",
    ),
    any_model: bool = typer.Option(
        False,
        "--any-model",
        help="Also confirm generations that declare another model than the workspace's (left out and counted "
        "otherwise; see `audit model`).",
    ),
    dry_run: bool = typer.Option(
        False,
        "--dry-run",
        help="Print the estimate per phase (measured on one training image) and stop: nothing heavy runs and nothing "
        "is stored.",
    ),
):
    """Run a teacher (AbU unlearning or D-TRAK gradients) on flagged generations; store its verdict beside the fast one."""
    from ..confirm import confirm as confirm_api

    ws = current_workspace()
    with progress_bar() as bar:
        result = confirm_api(
            ws,
            method=method.value if method else None,
            top=top,
            where=where,
            generation=generation,
            model=model,
            device=device,
            progress=RichProgress(bar),
            announce=announce,
            candidates=candidates,
            controls=controls,
            steps=steps,
            step_size=step_size,
            draws=draws,
            timesteps=timesteps,
            any_model=any_model,
            dry_run=dry_run,
        )
    if result.run_id is None:
        return
    # The mean of the generations' stored seconds; loading the model and the Fisher are the setup.
    per = result.generation_seconds / max(1, result.generations)
    setup = result.seconds - result.generation_seconds
    out.print(
        f"confirm run {result.run_id}: {result.generations} generation(s), "
        + "".join(f"{result.verdicts.get(v, 0)} {v}, " for v in ("confirmed", "disputed", "inconclusive"))
        + f"{len(result.failed)} failed; {per:.1f} s each (+ {setup:.1f} s setup); noise floor {result.noise_floor:.3g}, "
        f"signal/noise {result.signal_to_noise:.1f} (see confirmations)"
        + (f"; {result.other_model} left out: declared by another model" if result.other_model else "")
    )
    for gen_id, reason in result.failed:
        out.print(Text(f"  generation {gen_id} not confirmed: {reason}"))


ForceOption = typer.Option(
    False,
    "--force",
    help="Switch even when the distilled bundle loses to its untuned baseline on the workspace's ground-truth checks.",
)


@app.command("use-encoder")
def use_encoder(
    bundle: Path = typer.Argument(..., help="Encoder bundle directory."),
    device: DeviceOption = None,
    force: bool = ForceOption,
):
    """Switch the workspace to another encoder and embed the registered training set with it (earlier attributions
    stay, under their encoder id). A distilled bundle must first hold up against its untuned baseline on the
    workspace's ground-truth checks; --force switches anyway."""
    switch_encoder(bundle, device, force)


def switch_encoder(bundle: Path, device: str | None, force: bool, teacher_map: float | None = None) -> None:
    """Judge a bundle on the workspace's ground truth (auditor/earn.py), then switch to it and re-embed."""
    from .. import earn
    from ..index import reindex

    ws = current_workspace()
    judgement = earn.judge(ws, bundle, device=device, teacher_map=teacher_map, announce=announce)
    if not judgement.use and not force:
        raise AuditError(f"{judgement.reason}; not switched (--force switches anyway)")
    announce(judgement.reason + ("; switching anyway (--force)" if not judgement.use else ""))
    with progress_bar() as bar:
        result = reindex(ws, bundle, device=device, progress=RichProgress(bar))
    out.print(
        f"workspace now uses encoder {result.encoder_id}: {result.re_embedded} training images embedded, "
        f"table has {result.rows} vectors"
    )


class SqlFormat(StrEnum):
    table = "table"
    csv = "csv"
    json = "json"
    parquet = "parquet"


@app.command("sql")
def sql_command(
    query: str = typer.Argument(..., help="One SQL statement over the audit store (see schemas/README.md)."),
    fmt: SqlFormat = typer.Option(SqlFormat.table, "--format", "-f", help="table, csv, json or parquet."),
    out_file: Path | None = typer.Option(None, "--out", "-o", help="Write the result to this file."),
    write: bool = typer.Option(False, "--write", help="Allow statements that change the store."),
):
    """Run SQL against the audit store (read-only unless --write)."""
    frame = sql_api.query(current_workspace(), query, write=write)
    if frame is None:
        out.print("ok")
        return
    text = sql_api.render(frame, fmt.value, out_file)
    if text is not None:
        sys.stdout.write(text)


def _amount(text: str) -> Decimal:
    try:
        return Decimal(text)
    except InvalidOperation:
        raise typer.BadParameter(f"{text!r} is not an amount like 1000 or 1000.00") from None


class ModelFilter(StrEnum):
    same = "same"
    not_other = "not-other"
    any = "any"


class Policy(StrEnum):
    per_output = "per-output"
    training_set = "training-set"
    teacher = "teacher"


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
    currency: str | None = typer.Option(
        None, help=f"ISO 4217 code; amounts are exact to its minor unit ({default(ReportSettings, 'currency')})."
    ),
    policy: Policy | None = typer.Option(
        None,
        help="per-output (by attributed credit), training-set (by images indexed) or teacher (per output, on the "
        "teacher's scores where its verdict decided: confirmed or disputed) "
        f"({default(ReportSettings, 'policy')}).",
    ),
    confirmed_weight: float | None = typer.Option(
        None,
        help="Weight of a teacher-confirmed attribution within its generation, others 1 "
        f"({default(ReportSettings, 'confirmed_weight')}).",
    ),
    min_payout: Decimal | None = typer.Option(
        None,
        parser=_amount,
        help=f"Smaller amounts are paid 0 and shared among the others ({default(ReportSettings, 'min_payout')}).",
    ),
    encoder: str | None = typer.Option(None, help="encoder_id whose attributions count (default: the latest scan's)."),
    model: ModelFilter | None = typer.Option(
        None,
        "--model",
        help="Generations paid for, by the model they declare: same (only the workspace's model), not-other (all "
        "but those declaring another model) or any "
        f"({default(ReportSettings, 'model')}).",
    ),
    out_dir: Path = typer.Option(
        Path("report"), "--out", "-o", help="Report folder; an earlier report there is replaced."
    ),
):
    """Write compensation statements: OUT/index.html, OUT/contributors/<id>.html, payouts.csv and payouts.parquet."""
    from ..report import build_report

    ws = current_workspace()
    settings = ws.config.report
    result = build_report(
        ws,
        out_dir,
        period=period,
        date_from=date_from and date_from.date(),
        date_to=date_to and date_to.date(),
        pool=pool,
        currency=currency or settings.currency,
        policy=policy.value if policy else settings.policy,
        confirmed_weight=settings.confirmed_weight if confirmed_weight is None else confirmed_weight,
        min_payout=_amount(settings.min_payout) if min_payout is None else min_payout,
        encoder_id=encoder,
        model=model.value if model else settings.model,
    )
    _summary(
        f"report {result.period}",
        [
            ("basis", result.policy),
            ("generations credited", f"{result.credited_generations} of {result.generations}"),
            (f"left out by --model {result.model}", result.model_left_out),
            ("contributors paid", f"{int(result.payouts['paid'].sum())} of {result.payouts.height}"),
            ("pool", f"{result.currency} {result.pool:,}"),
            ("paid out", f"{result.currency} {result.total_paid:,}"),
        ],
    )
    out.print(Text(f"report: {result.index}"), soft_wrap=True)
