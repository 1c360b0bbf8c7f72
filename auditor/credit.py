"""What a period's store says, and the credit each contributor earns from it: the data side of `audit report`.

A generation belongs to the period in which the audit first registered it
(`generations.created_at`, UTC): the store holds no earlier time for it, and a scan's
time would move old generations into a later period when a new encoder re-scans them.
The money itself is divided by payout.py; report.py renders the result.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

import polars as pl

from . import checks, payout
from .errors import AuditError
from .store import Store


@dataclass(frozen=True)
class Period:
    start: datetime | None  # inclusive, UTC
    end: datetime | None  # exclusive, UTC
    label: str

    @classmethod
    def parse(cls, period: str | None = None, date_from: date | None = None, date_to: date | None = None) -> Period:
        """A calendar month ('2026-11'), or first and last day (both inclusive, either may be open), or all time."""
        if period and (date_from or date_to):
            raise AuditError("give either --period or --from/--to, not both")
        if period:
            match = re.fullmatch(r"(\d{4})-(\d{2})", period.strip())
            if not match or not 1 <= int(match[2]) <= 12:
                raise AuditError(f"--period {period!r} is not a month like 2026-11")
            year, month = int(match[1]), int(match[2])
            return cls(datetime(year, month, 1), datetime(year + month // 12, month % 12 + 1, 1), f"{year}-{month:02d}")
        if date_from and date_to and date_to < date_from:
            raise AuditError(f"--to {date_to} is before --from {date_from}")
        start = datetime.combine(date_from, datetime.min.time()) if date_from else None
        end = datetime.combine(date_to + timedelta(days=1), datetime.min.time()) if date_to else None
        label = f"{date_from or 'start'} to {date_to or 'now'}" if (date_from or date_to) else "all time"
        return cls(start, end, label)

    def where(self, column: str) -> tuple[str, list]:
        clauses, params = ["true"], []
        if self.start:
            clauses.append(f"{column} >= ?")
            params.append(self.start)
        if self.end:
            clauses.append(f"{column} < ?")
            params.append(self.end)
        return " AND ".join(clauses), params


def _check(confirmed: pl.Expr, generation_confirmed: pl.Expr, verdict: pl.Expr) -> pl.Expr:
    """The badge of an attribution (or, given the generation's confirmed flag twice, of a generation): `confirmed`;
    the generation's verdict when the teacher disputed it or could not decide (`disputed`, `inconclusive`);
    `not confirmed` for an image outside the teacher's top-k of a confirmed generation, or for a confirmation made
    before verdicts (migration 009) that did not confirm; `unchecked` when no teacher looked."""
    return (
        pl.when(confirmed)
        .then(pl.lit("confirmed"))
        .when(generation_confirmed.is_null())
        .then(pl.lit("unchecked"))
        .when(verdict.is_in(["disputed", "inconclusive"]))
        .then(verdict)
        .otherwise(pl.lit("not confirmed"))
    )


@dataclass
class Audit:
    """What the store says about the period, as polars frames."""

    generations: pl.DataFrame  # id, path, prompt, prompt_source, created_at
    attributions: pl.DataFrame  # the ranking's rows for those generations, with owner and teacher verdict
    contributors: pl.DataFrame  # contributor_id, name, license, images_indexed
    method: str | None
    encoder_id: str | None
    encoder_name: str | None
    teacher_runs: list[dict]
    # The teacher's own top-k of each generation whose latest verdict decided (confirmed or disputed), for
    # `--policy teacher`: generation_id, rank (the teacher's), training_id, influence, contributor_id, training_path,
    # caption, confirm_run_id, teacher_method, verdict.
    teacher_top: pl.DataFrame | None = None
    # Per teacher method, its latest results on the workspace's stored ground-truth checks (leave_k_out, lds,
    # planted: text, None where that check has not been run; auditor/checks.py).
    ground_truth: dict | None = None
    # Encoder bundles judged against their untuned baseline before a switch (auditor/earn.py), newest first:
    # run_id, encoder_id, finished_at, use, reason.
    bundle_checks: list[dict] | None = None


# Which generations a report pays for, by the model they declare (generations.model_match, auditor/model_identity.py).
# `not-other` is the default: contributors are not paid for outputs another model declares it made, but outputs
# without metadata (stripped by a re-encode or an upload, or a server that writes none) still count.
MODEL_FILTERS = {
    "same": "g.model_match = 'same'",
    "not-other": "g.model_match IS DISTINCT FROM 'other'",
    "any": "true",
}


def read(store: Store, period: Period, encoder_id: str | None, model: str = "any") -> Audit:
    if model not in MODEL_FILTERS:
        raise AuditError(f"--model {model!r}: use {', '.join(MODEL_FILTERS)}")
    in_period, params = period.where("g.created_at")
    in_period = f"{in_period} AND {MODEL_FILTERS[model]}"
    generations = store.con.sql(
        f"SELECT id, path, prompt, prompt_source, created_at FROM generations g WHERE {in_period} ORDER BY id",
        params=params,
    ).pl()
    # Earlier encoders' rankings stay in the store; the period is paid from one ranking, the latest
    # scan's (or the named encoder's latest), so no generation is credited twice.
    ranking = store.rows(
        "SELECT a.method, a.encoder_id FROM attributions a"
        " JOIN generations g ON g.id = a.generation_id JOIN scans s ON s.id = a.scan_id"
        f" WHERE {in_period} AND (?::VARCHAR IS NULL OR a.encoder_id = ?)"
        " ORDER BY s.started_at DESC, s.id DESC LIMIT 1",
        params + [encoder_id, encoder_id],
    )
    if encoder_id and not ranking:
        raise AuditError(
            f'encoder {encoder_id} attributed no generation in {period.label}; see `audit sql "select * from scans"`'
        )
    method, encoder_id = ranking[0] if ranking else (None, None)
    attributions = store.con.sql(
        "SELECT c.generation_id, c.rank, c.training_id, c.share, c.confirmed, c.generation_confirmed, c.confirm_run_id,"
        "  c.verdict, c.teacher_method, c.teacher_rank, c.teacher_influence,"
        "  t.contributor_id, t.path AS training_path, t.caption"
        " FROM attribution_checks c JOIN generations g ON g.id = c.generation_id"
        " LEFT JOIN training_images t ON t.id = c.training_id"
        f" WHERE c.method = ? AND c.encoder_id = ? AND {in_period}",
        params=[method, encoder_id] + params,
    ).pl()
    # The report opens the store read-only and cannot repair it; paying around these rows would hand their
    # share to the generation's other contributors (index.reconcile drops them under the writer lock).
    dangling = attributions.filter(pl.col("training_path").is_null())
    if dangling.height:
        raise AuditError(
            f"{dangling.height} attribution row(s) of {dangling['generation_id'].n_unique()} generation(s) cite training"
            " images the store does not have (a scan searched an interrupted `audit index`); run `audit scan` on their"
            " outputs folder again: it drops those rankings and attributes the generations anew"
        )
    # The training-set basis counts the images indexed by the end of the period.
    contributors = store.con.sql(
        "SELECT c.id AS contributor_id, c.name, c.license, count(t.id) AS images_indexed"
        " FROM contributors c LEFT JOIN training_images t ON t.contributor_id = c.id AND (?::TIMESTAMP IS NULL OR t.indexed_at < ?)"
        " GROUP BY ALL ORDER BY c.id",
        params=[period.end, period.end],
    ).pl()
    run_ids = attributions["confirm_run_id"].drop_nulls().unique().to_list()
    teacher_runs = (
        store.con.sql(
            "SELECT id, method, model_hash, model_path, finished_at FROM confirm_runs WHERE list_contains(?, id) ORDER BY id",
            params=[run_ids],
        )
        .pl()
        .to_dicts()
    )
    encoder_name = store.value("SELECT name FROM encoders WHERE id = ?", [encoder_id])
    # The latest confirmation of each generation, as attribution_checks picks it, where its verdict decided.
    teacher_top = store.con.sql(
        "WITH latest AS (SELECT * FROM confirmations WHERE encoder_id = ?"
        "  QUALIFY row_number() OVER (PARTITION BY generation_id ORDER BY confirmed_at DESC, run_id DESC) = 1)"
        " SELECT s.generation_id, s.teacher_rank AS rank, s.training_id, s.influence, t.contributor_id,"
        "  t.path AS training_path, t.caption, l.run_id AS confirm_run_id, l.method AS teacher_method, l.verdict"
        " FROM latest l JOIN generations g ON g.id = l.generation_id"
        " JOIN teacher_scores s ON s.run_id = l.run_id AND s.generation_id = l.generation_id AND s.teacher_rank <= l.k"
        " LEFT JOIN training_images t ON t.id = s.training_id"
        f" WHERE l.verdict IN ('confirmed', 'disputed') AND {in_period} ORDER BY s.generation_id, s.teacher_rank",
        params=[encoder_id] + params,
    ).pl()
    # Per teacher method, its latest figure on each stored ground-truth check (auditor/checks.py), as text.
    ground_truth = {
        method: {
            key: f"{figure.describe()} (eval run {figure.run_id}, n = {figure.n})" if figure else None
            for key, figure in (
                (key, by_kind.get(kind))
                for key, kind in (("leave_k_out", "counterfactual"), ("planted", "planted"), ("lds", "lds"))
            )
        }
        for method, by_kind in checks.standings(store).items()
    }
    return Audit(
        generations,
        attributions,
        contributors,
        method,
        encoder_id,
        encoder_name,
        teacher_runs,
        teacher_top,
        ground_truth,
        [
            {"run_id": r, "encoder_id": e, "finished_at": at, **json.loads(settings)}
            for r, e, at, settings in store.rows(
                "SELECT id, encoder_id, finished_at, settings FROM eval_runs WHERE kind = 'bundle' ORDER BY id DESC"
            )
        ],
    )


def credit(attributions: pl.DataFrame, confirmed_weight: float) -> pl.DataFrame:
    """Each attribution's part of its generation's one unit of credit (the per-output formula, as the report prints it).

    weight = confirmed_weight for a confirmed attribution, else 1;
    credit = share × weight / Σ (share × weight) over the generation's attributions.
    Images with no contributor are left out first: nobody can be paid for them, so the
    generation's unit goes to the contributors it can be traced to.
    """
    weighted = pl.col("share") * pl.when(pl.col("confirmed")).then(confirmed_weight).otherwise(1.0)
    return (
        _with_teacher_columns(attributions)
        .filter(pl.col("contributor_id").is_not_null())
        .with_columns(weighted.alias("weighted"))
        .with_columns((pl.col("weighted") / pl.col("weighted").sum().over("generation_id")).alias("credit"))
        .filter(pl.col("credit").is_finite())  # a generation whose owned shares all underflowed to 0
        .with_columns(_checks())
    )


def _checks() -> list[pl.Expr]:
    verdict = pl.col("verdict")
    return [
        _check(pl.col("confirmed"), pl.col("generation_confirmed"), verdict).alias("check"),
        _check(pl.col("generation_confirmed"), pl.col("generation_confirmed"), verdict).alias("generation_check"),
    ]


def _with_teacher_columns(attributions: pl.DataFrame) -> pl.DataFrame:
    """Frames made before verdicts (and tests' hand-made ones) lack the teacher's columns: they are NULL there."""
    missing = {"verdict": pl.String, "teacher_method": pl.String, "source": pl.String}
    return attributions.with_columns(
        pl.lit(None if name != "source" else "fast", dtype).alias(name)
        for name, dtype in missing.items()
        if name not in attributions.columns
    )


def teacher_credit(audit: Audit, confirmed_weight: float) -> pl.DataFrame:
    """Credit under `--policy teacher`: where the teacher's latest verdict on a generation decided (confirmed or
    disputed), its unit is shared by the teacher's own scores over the teacher's top-k,

        credit_g(c) = Σ_{i in teacher top-k of g, owned by c} max(influence_i, 0) ÷ Σ_{i in teacher top-k of g} max(influence_i, 0);

    elsewhere (never checked, inconclusive, or every top-k influence ≤ 0) by the per-output formula (credit()).
    Rows paid on the teacher carry source = 'teacher', rank = the teacher's rank, share = the normalised influence."""
    top = audit.teacher_top if audit.teacher_top is not None else pl.DataFrame()
    positive = pl.col("influence").clip(lower_bound=0.0)
    if top.height:
        top = top.with_columns(
            (positive / positive.sum().over("generation_id")).alias("share"),
            (pl.col("verdict") == "confirmed").alias("generation_confirmed"),
        ).filter(pl.col("share").is_finite())
    decided = set(top["generation_id"].to_list()) if top.height else set()
    fast = credit(audit.attributions.filter(~pl.col("generation_id").is_in(list(decided))), confirmed_weight)
    if not top.height:
        return fast
    teacher = (
        top.filter(pl.col("contributor_id").is_not_null())
        .with_columns(
            pl.col("generation_confirmed").alias("confirmed"),
            pl.lit("teacher").alias("source"),
            pl.col("rank").alias("teacher_rank"),
            pl.col("influence").alias("teacher_influence"),
        )
        .with_columns((pl.col("share") / pl.col("share").sum().over("generation_id")).alias("credit"))
        .filter(pl.col("credit").is_finite())
        .with_columns(pl.col("share").alias("weighted"), *_checks())
    )
    return pl.concat([fast, teacher.select(fast.columns)], how="vertical_relaxed")


def summary(contributors: pl.DataFrame, credited: pl.DataFrame) -> pl.DataFrame:
    """One row per contributor: images indexed, and what the period's attributions credit them with."""
    per_contributor = credited.group_by("contributor_id").agg(
        generations=pl.col("generation_id").n_unique(),
        attributions=pl.len(),
        confirmed_attributions=pl.col("confirmed").sum(),
        credit=pl.col("credit").sum(),
    )
    return contributors.join(per_contributor, on="contributor_id", how="left").with_columns(
        pl.col("generations", "attributions", "confirmed_attributions").fill_null(0).cast(pl.Int64),
        pl.col("credit").fill_null(0.0),
    )


def payouts(
    summary: pl.DataFrame, policy: str, pool: int, min_payout: int, currency: str
) -> tuple[pl.DataFrame, payout.Split]:
    """The summary with each contributor's basis C, quota, adjusted quota and amount (the rows of payouts.csv)."""
    basis = summary["images_indexed" if policy == "training-set" else "credit"].cast(pl.Float64).alias("basis")
    ids = summary["contributor_id"].to_list()
    split = payout.split(pool, dict(zip(ids, basis)), min_payout)
    fine = pl.Decimal(38, payout.minor_digits(currency) + 2)
    frame = summary.with_columns(
        basis,
        (basis / basis.sum()).alias("share"),
        pl.Series("quota", [payout.fraction_to_decimal(split.quota[key], currency) for key in ids], fine),
        pl.Series("paid", [key in split.paid for key in ids], pl.Boolean),
        pl.Series("adjusted", [payout.fraction_to_decimal(split.adjusted[key], currency) for key in ids], fine),
        pl.Series(
            "amount",
            [payout.from_minor(split.amount[key], currency) for key in ids],
            pl.Decimal(38, payout.minor_digits(currency)),
        ),
        pl.Series("amount_minor", [split.amount[key] for key in ids], pl.Int64),
        pl.lit(currency).alias("currency"),
    )
    return frame.sort(["amount_minor", "contributor_id"], descending=[True, False]), split


# C0 controls but tab and newline (NUL included), DEL, C1 controls, and the bidi embeddings,
# overrides and isolates (U+202A-U+202E, U+2066-U+2069): U+202E can make "gnp.exe" read "exe.png".
