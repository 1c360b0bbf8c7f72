"""Ground-truth checks kept in the audit store (schemas/011_eval_checks.sql), and the choices made from them.

`audit eval counterfactual` (leave-K-out), `audit eval planted` and `audit eval lds` each record a run with every
method's headline metric and its standard error (`record`). From them:

- `choose_teacher`: the teacher (`audit confirm --method auto`) that did best on this workspace's own checks. Per
  check kind, the latest run on the workspace's model that measured both teachers; a teacher wins that check when it
  leads the other by more than their combined standard error (√(se₁² + se₂²)); the teacher with more wins is chosen.
  No checks, or no clear winner: the configured default, saying so.
- `standings`: per teacher method, its latest figure on each check kind, for the report.
- `judge_bundle`: a distilled bundle against the untuned baseline on the ground-truth checks that exist.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

from .store import Store, utcnow

TEACHERS = ("abu", "dtrak")
# The headline metric of each check kind: every one is "higher is better".
METRICS = {"counterfactual": "relative_loss_increase", "planted": "map", "lds": "lds"}
CHECK_NAMES = {"counterfactual": "leave-K-out", "planted": "planted", "lds": "LDS"}
GROUND_TRUTH = tuple(METRICS)


@dataclass(frozen=True)
class Result:
    method: str  # fast | abu | dtrak | untuned | untuned_image | random | similar
    metric: str
    value: float
    stderr: float
    label: str = ""
    encoder_id: str | None = None


@dataclass(frozen=True)
class Figure:
    kind: str
    run_id: int
    finished_at: object
    value: float
    stderr: float
    n: int

    def describe(self) -> str:
        unit = (lambda v: f"{100 * v:+.2f} %") if self.kind == "counterfactual" else (lambda v: f"{v:.3f}")
        se = f"{100 * self.stderr:.2f}" if self.kind == "counterfactual" else f"{self.stderr:.3f}"
        return f"{unit(self.value)} ± {se}"


def record(
    store: Store,
    kind: str,
    *,
    model_hash: str,
    encoder_id: str,
    settings: dict,
    n: int,
    seconds: float,
    results: list[Result],
) -> int:
    """Store one check's run and its per-method results; returns the run id."""
    with store.transaction():
        run_id = store.next_id("eval_runs")
        store.con.execute(
            "INSERT INTO eval_runs (id, kind, model_hash, encoder_id, settings, n, seconds, finished_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            [
                run_id,
                kind,
                model_hash,
                encoder_id,
                json.dumps(settings, sort_keys=True, default=str),
                n,
                seconds,
                utcnow(),
            ],
        )
        for r in results:
            store.con.execute(
                "INSERT INTO eval_results (run_id, method, encoder_id, metric, value, stderr, label)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                [run_id, r.method, r.encoder_id, r.metric, _finite(r.value), _finite(r.stderr), r.label],
            )
    return run_id


def _finite(x: float) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def standings(store: Store, model_hash: str | None = None) -> dict[str, dict[str, Figure]]:
    """Per teacher method, per check kind: its figure in the latest run of that kind (on `model_hash` when given)."""
    where = "AND r.model_hash = ?" if model_hash else ""
    rows = store.rows(
        "SELECT r.kind, e.method, r.id, r.finished_at, e.value, e.stderr, r.n FROM eval_results e"
        " JOIN eval_runs r ON r.id = e.run_id"
        f" WHERE e.method IN ({', '.join('?' * len(TEACHERS))}) AND e.value IS NOT NULL {where}"
        " AND e.metric = CASE r.kind " + " ".join(f"WHEN '{k}' THEN '{m}'" for k, m in METRICS.items()) + " END"
        " QUALIFY row_number() OVER (PARTITION BY r.kind, e.method ORDER BY r.id DESC) = 1",
        [*TEACHERS, *([model_hash] if model_hash else [])],
    )
    out: dict[str, dict[str, Figure]] = {}
    for kind, method, run_id, at, value, se, n in rows:
        out.setdefault(method, {})[kind] = Figure(kind, run_id, at, value, se or 0.0, n)
    return out


def choose_teacher(store: Store, model_hash: str, default: str) -> tuple[str, str]:
    """(method, why): the teacher that did best on this model's stored checks, else `default` (see the module doc)."""
    table = standings(store, model_hash)
    wins = dict.fromkeys(TEACHERS, 0)
    said = []
    for kind in GROUND_TRUTH:
        figures = {m: table[m][kind] for m in TEACHERS if kind in table.get(m, {})}
        if len(figures) < 2:
            continue
        (best, a), (other, b) = sorted(figures.items(), key=lambda item: -item[1].value)
        margin = math.hypot(a.stderr, b.stderr)
        clear = a.value - b.value > margin
        wins[best] += int(clear)
        said.append(
            f"{CHECK_NAMES[kind]} (eval run {a.run_id}): {best} {a.describe()} vs {other} {b.describe()}"
            + ("" if clear else ", within their standard errors")
        )
    if not said:
        return default, (
            f"no ground-truth check has measured both teachers on this model; using the default {default} "
            "([confirm] method; run `audit eval counterfactual`, `audit eval lds` or `audit eval planted` to choose by evidence)"
        )
    ranked = sorted(wins.items(), key=lambda item: -item[1])
    if ranked[0][1] == ranked[1][1]:
        return default, f"no clear winner, using the default {default}: " + "; ".join(said)
    return ranked[0][0], f"{ranked[0][0]} did best on this workspace's checks: " + "; ".join(said)
