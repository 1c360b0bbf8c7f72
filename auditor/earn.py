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
    compared: list[Comparison] = []
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
        compared.append(Comparison("planted mAP", "map", by["fast"], by["untuned"]))
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
        compared.append(Comparison("LDS", "lds", by["fast"], by["untuned"]))
    use, reason = decide(bundle.id, compared)
    figures = [
        checks.Result(method, c.metric, *figure, label, bundle.id)
        for c in compared
        for method, figure, label in (
            ("fast", c.bundle, "distilled bundle"),
            ("untuned", c.baseline, "untuned image ⊕ text"),
        )
    ]
    if teacher_map is not None:
        figures.append(checks.Result("fast", "teacher_map", teacher_map, float("nan"), "held-out mAP@k", bundle.id))
    with ws.writing(), Store(ws.db_path) as store:
        run_id = checks.record(
            store,
            "bundle",
            model_hash=next(iter(v[1] for v in stored.values() if v), ""),
            encoder_id=bundle.id,
            settings={"bundle": str(Path(bundle_dir).resolve()), "use": use, "reason": reason},
            n=len(compared),
            seconds=0.0,
            results=figures,
        )
    return Judgement(use, reason, run_id)


@dataclass(frozen=True)
class Comparison:
    check: str  # as said to the user
    metric: str  # eval_results.metric
    bundle: tuple[float, float]  # (mean, standard error), higher is better
    baseline: tuple[float, float]

    @property
    def lost(self) -> bool:
        """The baseline leads by more than the combined standard error."""
        return self.baseline[0] - self.bundle[0] > math.hypot(self.bundle[1], self.baseline[1])

    def __str__(self) -> str:
        return (
            f"{self.check} {self.bundle[0]:.3f} ± {self.bundle[1]:.3f} vs untuned "
            f"{self.baseline[0]:.3f} ± {self.baseline[1]:.3f}"
        )


def decide(encoder_id: str, compared: list[Comparison]) -> tuple[bool, str]:
    """(use, why): refused when the bundle loses any ground-truth check; allowed, saying so, when none exists."""
    if not compared:
        return True, (
            "no ground-truth check on this workspace to judge it by (audit eval planted, audit eval lds); switching "
            "on its agreement with the teacher alone"
        )
    lost = [str(c) for c in compared if c.lost]
    if lost:
        return False, f"encoder {encoder_id} loses to its untuned baseline on ground truth: " + "; ".join(lost)
    return True, f"encoder {encoder_id} holds up against its untuned baseline: " + "; ".join(map(str, compared))
