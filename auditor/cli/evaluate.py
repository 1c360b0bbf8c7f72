"""`audit eval`: one subcommand per check, each with its own options."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from .. import runtime
from ..config import CounterfactualSettings, LdsSettings, PlantedSettings
from ..errors import AuditError
from .app import DeviceOption, ModelOption, RichProgress, announce, app, current_workspace, default, out, progress_bar

eval_app = typer.Typer(
    rich_markup_mode=None,  # help texts name settings as [section] key: not markup
    help="Measure attribution: against the teacher, against planted ground truth, or by leave-K-out retraining.",
    no_args_is_help=True,
)
app.add_typer(eval_app, name="eval")

OutOption = Annotated[
    Path | None, typer.Option("--out", help="Also write the table as STEM.md and its data as STEM.json in this folder.")
]


def _publish(markdown: str, data: str, out_dir: Path | None, stem: str) -> None:
    out.print(Text(markdown))
    if out_dir:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / f"{stem}.md").write_text(markdown)
        (out_dir / f"{stem}.json").write_text(data)


@eval_app.command("teacher")
def eval_teacher(
    encoder: list[Path] | None = typer.Option(
        None, "--encoder", help="Encoder bundle(s) to evaluate (default: the workspace's)."
    ),
    k: list[int] | None = typer.Option(None, "--k", help="k of mAP@k (repeatable; default 5 10 20 50)."),
    replicate: bool = typer.Option(
        False,
        "--replicate",
        help="Also run the teacher again on the held-out queries with independent noise and score it like a method: "
        "the ceiling any student can reach against this teacher (one teacher run per query, stored).",
    ),
    pooled: bool = typer.Option(
        False,
        "--pooled",
        help="Positives from the mean of the teacher's run and its replicate (implies --replicate): twice the "
        "scoring samples per query, so less of the teacher's own noise.",
    ),
    out_dir: OutOption = None,
    model: ModelOption = None,
    device: DeviceOption = None,
):
    """mAP@k against the teacher on held-out queries: distilled vs untuned image, text and image ⊕ text (eval.md)."""
    from ..distill import replicate as replicate_teacher
    from ..evaluate import evaluate, to_json, to_markdown

    ws = current_workspace()
    replica = None
    if replicate or pooled:
        with progress_bar() as bar:
            replica = replicate_teacher(ws, model=model, device=device, progress=RichProgress(bar), announce=announce)
    results, n = evaluate(
        ws, encoders=encoder, ks=tuple(k) if k else (5, 10, 20, 50), replicate=replica, pooled=pooled, announce=announce
    )
    _publish(to_markdown(results, n, pooled=pooled), to_json(results, n, pooled=pooled), out_dir, "eval")


class Style(StrEnum):
    palette = "palette"
    stroke = "stroke"
    as_is = "as-is"


class Tuned(StrEnum):
    kv = "kv"
    all = "all"


@eval_app.command("planted")
def eval_planted(
    exemplars: Path | None = typer.Option(
        None, "--exemplars", help="Folder of images that become the exemplars (e.g. examples/digits_world/heldout)."
    ),
    style: Style | None = typer.Option(
        None,
        "--style",
        help="palette (recolour the exemplars into new palettes), stroke (mirrored, upside down, bold, thin strokes "
        f"in their own colours) or as-is (one subfolder per customisation) ({default(PlantedSettings, 'style')}).",
    ),
    customisations: int | None = typer.Option(
        None, help=f"Customised models ({default(PlantedSettings, 'customisations')})."
    ),
    generations: int | None = typer.Option(
        None, help=f"Images generated per customised model ({default(PlantedSettings, 'generations')})."
    ),
    tune: Tuned | None = typer.Option(
        None,
        "--tune",
        help="Weights fine-tuned per customisation: kv (cross-attention keys/values) or all (the whole UNet) "
        f"({default(PlantedSettings, 'tune')}).",
    ),
    steps: int | None = typer.Option(
        None, help=f"Fine-tuning steps per customisation ({default(PlantedSettings, 'steps')})."
    ),
    out_dir: OutOption = None,
    model: ModelOption = None,
    device: DeviceOption = None,
):
    """Planted ground truth (AbC): customise the model on new-style exemplars, then score every method (fast, untuned,
    AbU, D-TRAK) by Recall@5/10/100 and mAP of the exemplars (planted.md)."""
    from .. import planted

    if exemplars is None:
        raise AuditError(
            "audit eval planted needs --exemplars DIR: a folder of images to turn into exemplars "
            "(e.g. examples/digits_world/heldout)"
        )
    ws = current_workspace()
    with progress_bar() as bar:
        report = planted.planted(
            ws,
            exemplars=exemplars,
            model=model,
            device=device,
            progress=RichProgress(bar),
            announce=announce,
            style=style.value if style else None,
            tune=tune.value if tune else None,
            customisations=customisations,
            generations=generations,
            steps=steps,
        )
    _publish(planted.to_markdown(report), planted.to_json(report), out_dir, "planted")


@eval_app.command("counterfactual")
def eval_counterfactual(
    generation: list[int] | None = typer.Option(
        None,
        "--generation",
        help="Generation id to check (repeatable; default: [counterfactual] generations AbU-scored ones, distinct "
        "prompts first).",
    ),
    remove: int | None = typer.Option(
        None, "--remove", help=f"Images left out per generation and method ({default(CounterfactualSettings, 'k')})."
    ),
    retrain_steps: int | None = typer.Option(
        None,
        "--retrain-steps",
        help=f"Training steps of every retraining; 0 is the recipe's own "
        f"({default(CounterfactualSettings, 'retrain_steps')}).",
    ),
    out_dir: OutOption = None,
    model: ModelOption = None,
    device: DeviceOption = None,
):
    """Leave-K-out: retrain the model by its recipe without each method's top-K (fast, AbU, D-TRAK) and without K
    random / K most similar images; the loss increase on the generation and how far its regeneration moves."""
    runtime.prefer_spinning_threads()
    from .. import counterfactual

    ws = current_workspace()
    with progress_bar() as bar:
        report = counterfactual.counterfactual(
            ws,
            generations=generation,
            model=model,
            device=device,
            progress=RichProgress(bar),
            announce=announce,
            k=remove,
            retrain_steps=retrain_steps,
        )
    _publish(counterfactual.to_markdown(report), counterfactual.to_json(report), out_dir, "counterfactual")


@eval_app.command("lds")
def eval_lds(
    generation: list[int] | None = typer.Option(
        None,
        "--generation",
        help="Generation id to check (repeatable; default: [lds] generations teacher-scored ones, distinct prompts "
        "first).",
    ),
    subsets: int | None = typer.Option(
        None, "--subsets", help=f"Models retrained on random subsets ({default(LdsSettings, 'subsets')})."
    ),
    retrain_steps: int | None = typer.Option(
        None,
        "--retrain-steps",
        help=f"Training steps of every retraining; 0 is the recipe's own ({default(LdsSettings, 'retrain_steps')}).",
    ),
    out_dir: OutOption = None,
    model: ModelOption = None,
    device: DeviceOption = None,
):
    """Linear datamodeling score: retrain the model by its recipe on random half subsets (cached, resumable); per
    method, the Spearman correlation between the sum of its scores over each subset and the subset model's loss on
    the generation."""
    runtime.prefer_spinning_threads()
    from .. import lds

    ws = current_workspace()
    with progress_bar() as bar:
        report = lds.evaluate(
            ws,
            generations=generation,
            model=model,
            device=device,
            progress=RichProgress(bar),
            announce=announce,
            subsets=subsets,
            retrain_steps=retrain_steps,
        )
    _publish(lds.to_markdown(report), lds.to_json(report), out_dir, "lds")
