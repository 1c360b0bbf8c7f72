"""`audit report`: compensation statements for data contributors, as a folder of HTML that works offline.

Reads one period's generations and their attributions from the store (DuckDB, aggregated
with polars), turns them into each contributor's credit under a payout policy, divides
the pool (auditor/payout.py), and renders reports/templates/ into OUT/:

    index.html                  the operator's overview: totals, every contributor, the method
    contributors/<id>.html      one statement per contributor, about them alone
    payouts.csv, payouts.parquet

Pages carry everything they show (CSS inline, thumbnails as PNG data URIs, charts as
inline SVG) and forbid scripts, so the folder can be moved, mailed, or opened offline.

Names, ids, licences, captions, prompts and paths are user text. On the pages it is escaped,
stripped of control characters and bidi overrides (`plain`) and set in <bdi> elements, so
it can neither add markup nor reorder the text around it; in payouts.csv a cell a
spreadsheet would read as a formula is prefixed with ' (`spreadsheet_safe`), while
payouts.parquet keeps every value as the store has it.

A generation belongs to the period in which the audit first registered it
(`generations.created_at`, UTC): the store holds no earlier time for it, and a scan's
time would move old generations into a later period when a new encoder re-scans them.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import io
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import jinja2
import markupsafe
import polars as pl

from . import ingest, payout
from .errors import AuditError
from .store import Store, utcnow
from .workspace import Workspace

POLICIES = ("per-output", "training-set")
THUMBNAIL_PIXELS = 64  # longest side; thumbnails are shown at most this big


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


@dataclass
class ReportResult:
    out_dir: Path
    index: Path
    statements: dict[str, Path]  # contributor id -> statement
    payouts: pl.DataFrame  # the rows of payouts.csv
    period: str
    policy: str
    currency: str
    pool: Decimal
    total_paid: Decimal  # equals the pool
    generations: int  # registered in the period
    credited_generations: int  # of those, with credit for at least one contributor


def statement_name(contributor_id: str) -> str:
    """The statement's file name: the id itself when it is safe in any file system and URL, else a readable stem plus a hash."""
    stem = re.sub(r"[^a-z0-9_-]+", "_", contributor_id.lower())[:60]
    if stem != contributor_id or not stem:
        stem += "-" + hashlib.sha256(contributor_id.encode()).hexdigest()[:10]
    return f"{stem}.html"


def thumbnail(path: str, limits: ingest.Limits) -> str | None:
    """A small PNG data URI of an image on disk, read as safely as a scan reads it; None when it cannot be read."""
    try:
        image, _ = ingest.decode(ingest.read_bytes(path, limits), limits)
    except (ingest.IngestError, ValueError):  # ValueError: a stored path with NUL in it, which no file can have
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def _check(confirmed: pl.Expr, verdict: pl.Expr) -> pl.Expr:
    """The badge of an attribution (or, given the generation's verdict twice, of a generation)."""
    return (
        pl.when(confirmed)
        .then(pl.lit("confirmed"))
        .when(verdict.is_null())
        .then(pl.lit("unchecked"))
        .otherwise(pl.lit("not confirmed"))
    )


@dataclass
class _Audit:
    """What the store says about the period, as polars frames."""

    generations: pl.DataFrame  # id, path, prompt, prompt_source, created_at
    attributions: pl.DataFrame  # the ranking's rows for those generations, with owner and teacher verdict
    contributors: pl.DataFrame  # contributor_id, name, license, images_indexed
    method: str | None
    encoder_id: str | None
    encoder_name: str | None
    teacher_runs: list[dict]


def _read(store: Store, period: Period, encoder_id: str | None) -> _Audit:
    in_period, params = period.where("g.created_at")
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
        "  t.contributor_id, t.path AS training_path, t.caption"
        " FROM attribution_checks c JOIN generations g ON g.id = c.generation_id"
        " LEFT JOIN training_images t ON t.id = c.training_id"
        f" WHERE c.method = ? AND c.encoder_id = ? AND {in_period}",
        params=[method, encoder_id] + params,
    ).pl()
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
    return _Audit(generations, attributions, contributors, method, encoder_id, encoder_name, teacher_runs)


def credit(attributions: pl.DataFrame, confirmed_weight: float) -> pl.DataFrame:
    """Each attribution's part of its generation's one unit of credit (the per-output formula, as the report prints it).

    weight = confirmed_weight for a confirmed attribution, else 1;
    credit = share × weight / Σ (share × weight) over the generation's attributions.
    Images with no contributor are left out first: nobody can be paid for them, so the
    generation's unit goes to the contributors it can be traced to.
    """
    weighted = pl.col("share") * pl.when(pl.col("confirmed")).then(confirmed_weight).otherwise(1.0)
    return (
        attributions.filter(pl.col("contributor_id").is_not_null())
        .with_columns(weighted.alias("weighted"))
        .with_columns((pl.col("weighted") / pl.col("weighted").sum().over("generation_id")).alias("credit"))
        .filter(pl.col("credit").is_finite())  # a generation whose owned shares all underflowed to 0
        .with_columns(
            _check(pl.col("confirmed"), pl.col("generation_confirmed")).alias("check"),
            _check(pl.col("generation_confirmed"), pl.col("generation_confirmed")).alias("generation_check"),
        )
    )


def _summary(contributors: pl.DataFrame, credited: pl.DataFrame) -> pl.DataFrame:
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


def _payouts(
    summary: pl.DataFrame, policy: str, pool: int, min_payout: int, currency: str
) -> tuple[pl.DataFrame, payout.Split]:
    """The summary with each contributor's basis C, quota, adjusted quota and amount (the rows of payouts.csv)."""
    basis = summary["credit" if policy == "per-output" else "images_indexed"].cast(pl.Float64).alias("basis")
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
_UNSHOWN = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def plain(text: str) -> str:
    """User text as the pages show it: without control characters or bidi overrides."""
    return _UNSHOWN.sub("", text)


def _finalize(value):
    """Applied to every {{ expression }} before escaping, attributes and <title> included."""
    if isinstance(value, markupsafe.Markup):
        return markupsafe.Markup(plain(str(value)))
    return plain(value) if isinstance(value, str) else value


def _bdi(value, missing: str = "—") -> markupsafe.Markup:
    """User text in a bidi-isolated element, so its direction cannot spill into the text around it."""
    if value is None or value == "":
        return markupsafe.Markup(missing)
    return markupsafe.Markup("<bdi>{}</bdi>").format(plain(str(value)))


# A cell starting with one of these is a formula (or becomes one) in Excel, LibreOffice and Sheets;
# a cell that is all number (-0.5, +3) is left alone.
_FORMULA = r"^[=+\-@\t\r]"
_NUMBER = r"^[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+)?$"


def spreadsheet_safe(frame: pl.DataFrame) -> pl.DataFrame:
    """Text cells a spreadsheet would run as a formula, prefixed with ' (numbers and non-text columns as they are)."""
    return frame.with_columns(
        pl.when(pl.col(name).str.contains(_FORMULA) & ~pl.col(name).str.contains(_NUMBER))
        .then(pl.lit("'") + pl.col(name))
        .otherwise(pl.col(name))
        .alias(name)
        for name, dtype in frame.schema.items()
        if dtype == pl.String
    )


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("auditor", "templates"),
        autoescape=True,  # every name, prompt, caption and path is user text
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        finalize=_finalize,
    )
    env.filters["bdi"] = _bdi
    env.filters["money"] = lambda amount: f"{amount:,}"
    env.filters["when"] = lambda moment: moment.strftime("%Y-%m-%d %H:%M UTC") if moment else "—"
    env.filters["file_name"] = lambda path: Path(path).name if path else "—"
    return env


def _replace_folder(out_dir: Path, write) -> None:
    """Write the report into a fresh sibling folder, then put it in place of OUT, so a failed run leaves OUT as it was."""
    earlier_report = (out_dir / "index.html").is_file() and (out_dir / "payouts.csv").is_file()
    if out_dir.exists() and not earlier_report and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise AuditError(f"{out_dir} exists and does not hold an earlier report; choose another --out")
    staging = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        write(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    staging.rename(out_dir)


class _Pages:
    """The report folder's files, rendered from the period's frames."""

    def __init__(
        self,
        context: dict,
        audit: _Audit,
        credited: pl.DataFrame,
        payouts: pl.DataFrame,
        thumb: Callable[[str], str | None],
    ):
        self.env = _environment()
        self.context, self.audit, self.credited, self.payouts, self.thumb = context, audit, credited, payouts, thumb
        pool = context["split"].pool
        self.contributors = [
            row
            | {
                "statement": statement_name(row["contributor_id"]),
                "pool_share": row["amount_minor"] / pool if pool else 0.0,
            }
            for row in payouts.to_dicts()
        ]

    def write(self, folder: Path) -> None:
        (folder / "index.html").write_text(self.index())
        (folder / "contributors").mkdir()
        by_contributor = self.credited.partition_by("contributor_id", as_dict=True)
        for row in self.contributors:
            mine = by_contributor.get((row["contributor_id"],), self.credited.clear())
            (folder / "contributors" / row["statement"]).write_text(self.statement(row, mine))
        table = self.payouts.select(
            "contributor_id",
            "name",
            "license",
            "images_indexed",
            "generations",
            "attributions",
            "confirmed_attributions",
            "credit",
            "basis",
            "share",
            "quota",
            "paid",
            "adjusted",
            "amount",
            "amount_minor",
            "currency",
        )
        spreadsheet_safe(table).write_csv(folder / "payouts.csv")
        table.write_parquet(folder / "payouts.parquet")

    def _generations(self, frame: pl.DataFrame) -> list[dict]:
        return [row | {"thumb": self.thumb(row["path"])} for row in frame.to_dicts()]

    def index(self) -> str:
        credited, audit, split = self.credited, self.audit, self.context["split"]
        largest_credit = (
            credited.group_by("generation_id", "contributor_id")
            .agg(pl.col("credit").sum().alias("top_credit"))
            .sort(["generation_id", "top_credit", "contributor_id"], descending=[False, True, False])
            .group_by("generation_id", maintain_order=True)
            .first()
            .join(
                audit.contributors.select("contributor_id", pl.col("name").alias("top_name")),
                on="contributor_id",
                how="left",
            )
            .rename({"contributor_id": "top_contributor"})
        )
        generations = audit.generations.join(
            credited.group_by("generation_id").agg(pl.len().alias("attributions"), pl.first("generation_check")),
            left_on="id",
            right_on="generation_id",
            how="left",
        ).join(largest_credit, left_on="id", right_on="generation_id", how="left")
        totals = {
            "generations": audit.generations.height,
            "credited_generations": credited["generation_id"].n_unique(),
            "attributions": credited.height,
            "confirmed_attributions": int(credited["confirmed"].sum()),
            "checked_generations": credited.filter(pl.col("generation_check") != "unchecked")[
                "generation_id"
            ].n_unique(),
            "unowned_attributions": audit.attributions["contributor_id"].null_count(),
            "images_indexed": int(self.payouts["images_indexed"].sum()),
            "contributors": self.payouts.height,
            "paid_contributors": len(split.paid),
        }
        return self.env.get_template("index.html").render(
            self.context, totals=totals, contributors=self.contributors, generations=self._generations(generations)
        )

    def statement(self, row: dict, mine: pl.DataFrame) -> str:
        """One contributor's statement, from their own attributions only."""
        images = (
            mine.group_by("training_id")
            .agg(
                pl.first("training_path"),
                pl.first("caption"),
                pl.len().alias("attributions"),
                pl.col("confirmed").sum(),
                pl.col("credit").sum(),
            )
            .sort(["credit", "training_id"], descending=[True, False])
        )
        influenced = (
            mine.sort("rank")
            .group_by("generation_id", maintain_order=True)
            .agg(
                pl.col("credit").sum(),
                pl.first("generation_check"),
                pl.struct("rank", "training_id", "share", "check").alias("hits"),
            )
            .join(self.audit.generations, left_on="generation_id", right_on="id")
            .sort(["credit", "generation_id"], descending=[True, False])
        )
        return self.env.get_template("contributor.html").render(
            self.context,
            contributor=row,
            images=[image | {"thumb": self.thumb(image["training_path"])} for image in images.to_dicts()],
            generations=self._generations(influenced),
        )


def build_report(
    ws: Workspace,
    out_dir: str | Path,
    *,
    period: str | None = None,
    date_from: date | None = None,
    date_to: date | None = None,
    pool: Decimal,
    currency: str = "EUR",
    policy: str = "per-output",
    confirmed_weight: float = 2.0,
    min_payout: Decimal = Decimal(0),
    encoder_id: str | None = None,
) -> ReportResult:
    """Divide `pool` among the contributors for one period and write the report folder (see the module doc)."""
    if policy not in POLICIES:
        raise AuditError(f"unknown policy {policy!r}; choose {' or '.join(POLICIES)}")
    if not confirmed_weight > 0:
        raise AuditError("--confirmed-weight must be above 0")
    span = Period.parse(period, date_from, date_to)
    currency = currency.upper()
    pool_minor = payout.to_minor(pool, currency, "--pool")
    min_minor = payout.to_minor(min_payout, currency, "--min-payout")

    with Store(ws.db_path, read_only=True) as store:
        audit = _read(store, span, encoder_id)
    credited = credit(audit.attributions, confirmed_weight)
    if policy == "per-output" and credited.is_empty():
        raise AuditError(
            f"no generation registered in {span.label} is attributed to a contributor; nothing to pay per output"
        )
    payouts, split = _payouts(_summary(audit.contributors, credited), policy, pool_minor, min_minor, currency)

    context = {
        "period": span,
        "policy": policy,
        "currency": currency,
        "pool": payout.from_minor(pool_minor, currency),
        "paid": payout.from_minor(sum(split.amount.values()), currency),
        "min_payout": payout.from_minor(min_minor, currency),
        "confirmed_weight": confirmed_weight,
        "split": split,
        "credit_total": float(split.credit_total),
        "paid_credit_total": float(split.paid_credit_total),
        "method": audit.method,
        "encoder_id": audit.encoder_id,
        "encoder_name": audit.encoder_name,
        "teacher_runs": audit.teacher_runs,
        "generated_at": utcnow(),
    }
    limits = ws.limits
    pages = _Pages(context, audit, credited, payouts, functools.cache(lambda path: thumbnail(path, limits)))
    out_dir = Path(out_dir).expanduser().resolve()
    _replace_folder(out_dir, pages.write)
    return ReportResult(
        out_dir=out_dir,
        index=out_dir / "index.html",
        statements={row["contributor_id"]: out_dir / "contributors" / row["statement"] for row in pages.contributors},
        payouts=payouts,
        period=span.label,
        policy=policy,
        currency=currency,
        pool=context["pool"],
        total_paid=context["paid"],
        generations=audit.generations.height,
        credited_generations=credited["generation_id"].n_unique(),
    )
