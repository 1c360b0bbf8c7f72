"""A distilled bundle must earn its place: before `audit distill train --use` or `audit encoder use` switches the
workspace to a bundle with a distilled head, it is judged against the untuned image ⊕ text features of its own
backbone on the workspace's ground-truth checks that exist (issue #29: a bundle distilled toward a weak teacher made
the fast path worse by planted ground truth, and nothing stopped it becoming the default).

- planted: the latest stored `audit eval planted` run on this model is ranked again with the bundle (its
  customisations and generated images are reused; the teachers are not run again);
- LDS: the latest stored `audit eval lds` run's subset models (cached) score the bundle again;
- leave-K-out is not re-measured: a new bundle's top-K needs new retrainings (`audit eval counterfactual` after
  switching measures it).

The bundle loses a check when the baseline leads it by more than their combined standard error; it is refused when it
loses any. The comparison (with the bundle's held-out agreement with the teacher, when distillation just measured it)
is stored as an eval run of kind `bundle` and shown in the report's method section.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from . import checks, embed, lds, planted
from .store import Store
from .workspace import Workspace

# Settings of a stored planted run that choose its customisations (the rest is PlantedSettings' own).
PLANTED_KEYS = ("style", "customisations", "generations", "tune", "steps")


@dataclass
class Judgement:
    use: bool
    reason: str
    run_id: int | None


def _latest(store: Store, kind: str) -> tuple[dict, str] | None:
    row = store.rows(
        "SELECT settings, model_hash FROM eval_runs WHERE kind = ? AND (kind <> 'planted' OR"
        " json_extract(settings, '$.teachers')::BOOLEAN) ORDER BY id DESC LIMIT 1",
        [kind],
    )
    return (json.loads(row[0][0]), row[0][1]) if row else None


def judge(
    ws: Workspace,
    bundle_dir: str | os.PathLike,
    *,
    device: str | None = None,
    teacher_map: float | None = None,
    announce: Callable[[str], None] = lambda message: None,
) -> Judgement:
    """Judge a bundle against its untuned baseline on the ground-truth checks that exist; store the comparison."""
    bundle = embed.load(Path(bundle_dir), ws.device(device))
    if bundle.head is None:
        return Judgement(True, "no distilled head: the bundle is its own untuned baseline", None)
    with ws.reader() as store:
        stored = {kind: _latest(store, kind) for kind in ("planted", "lds")}
    figures: list[checks.Result] = []
    lost, said = [], []
    if stored["planted"]:
        settings = stored["planted"][0]
        announce(f"judging the bundle on the stored planted check ({settings['exemplars']}), re-ranked with it")
        report = planted.planted(
            ws,
            exemplars=settings["exemplars"],
            device=device,
            encoder_dir=bundle_dir,
            teachers=False,
            **{k: settings[k] for k in PLANTED_KEYS if k in settings},
        )
        by = {m.method: m.map for m in report.methods}
        _compare("planted mAP", by["fast"], by["untuned"], "map", figures, lost, said, bundle.id)
    if stored["lds"]:
        settings = stored["lds"][0]
        announce(f"judging the bundle on the stored LDS check ({settings['subsets']} cached subset models)")
        report = lds.evaluate(
            ws,
            generations=settings["generations"],
            device=device,
            encoder_dir=bundle_dir,
            subsets=settings["subsets"],
            fraction=settings["fraction"],
            retrain_steps=settings["retrain_steps"],
            seed=settings["seed"],
        )
        by = {m.name: m.lds for m in report.methods}
        _compare("LDS", by["fast"], by["untuned"], "lds", figures, lost, said, bundle.id)
    if teacher_map is not None:
        figures.append(checks.Result("fast", "teacher_map", teacher_map, float("nan"), "held-out mAP@k", bundle.id))
    if not said:
        reason = (
            "no ground-truth check on this workspace to judge it by (audit eval planted, audit eval lds); switching "
            "on its agreement with the teacher alone"
        )
        use = True
    elif lost:
        reason = f"encoder {bundle.id} loses to its untuned baseline on ground truth: " + "; ".join(lost)
        use = False
    else:
        reason = f"encoder {bundle.id} holds up against its untuned baseline: " + "; ".join(said)
        use = True
    with ws.writing(), Store(ws.db_path) as store:
        run_id = checks.record(
            store,
            "bundle",
            model_hash=next(iter(v[1] for v in stored.values() if v), ""),
            encoder_id=bundle.id,
            settings={"bundle": str(Path(bundle_dir).resolve()), "use": use, "reason": reason},
            n=len(said),
            seconds=0.0,
            results=figures,
        )
    return Judgement(use, reason, run_id)


def _compare(name, bundle, baseline, metric, figures, lost, said, encoder_id) -> None:
    figures += [
        checks.Result("fast", metric, *bundle, "distilled bundle", encoder_id),
        checks.Result("untuned", metric, *baseline, "untuned image ⊕ text", encoder_id),
    ]
    text = f"{name} {bundle[0]:.3f} ± {bundle[1]:.3f} vs untuned {baseline[0]:.3f} ± {baseline[1]:.3f}"
    said.append(text)
    if baseline[0] - bundle[0] > math.hypot(bundle[1], baseline[1]):
        lost.append(text)
