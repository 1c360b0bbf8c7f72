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

Which generations and credit a period holds is credit.py's job.
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
from datetime import date
from decimal import Decimal
from pathlib import Path

import jinja2
import markupsafe
import polars as pl

from . import credit, ingest, payout, sources
from .errors import AuditError
from .store import utcnow
from .workspace import Workspace

POLICIES = ("per-output", "training-set", "teacher")
THUMBNAIL_PIXELS = 64  # longest side; thumbnails are shown at most this big


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
    generations: int  # registered in the period (and paid for under `model`)
    credited_generations: int  # of those, with credit for at least one contributor
    model: str = "not-other"  # which generations count by the model they declare (credit.MODEL_FILTERS)
    model_left_out: int = 0  # generations of the period the model filter left out


def statement_name(contributor_id: str) -> str:
    """The statement's file name: the id itself when it is safe in any file system and URL, else a readable stem plus a hash."""
    stem = re.sub(r"[^a-z0-9_-]+", "_", contributor_id.lower())[:60]
    if stem != contributor_id or not stem:
        stem += "-" + hashlib.sha256(contributor_id.encode()).hexdigest()[:10]
    return f"{stem}.html"


def thumbnail(
    path: str, limits: ingest.Limits, storage: sources.Storage, kept: tuple[str, str, str] | None = None
) -> str | None:
    """A small PNG data URI of an image on disk, or kept in a shard or Parquet file (`kept`: shard, member, key;
    sources.read_image), read as safely as a scan reads it; None when it cannot be read."""
    try:
        data = sources.read_image(path, *kept, limits, storage) if kept else ingest.read_bytes(path, limits)
        image, _ = ingest.decode(data, limits)
    except (ingest.IngestError, ValueError):  # ValueError: a stored path with NUL in it, which no file can have
        return None
    image.thumbnail((THUMBNAIL_PIXELS, THUMBNAIL_PIXELS))
    buffer = io.BytesIO()
    image.save(buffer, "PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


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
        audit: credit.Audit,
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
        verdicts = (
            credited.filter(pl.col("teacher_method").is_not_null())
            .group_by("generation_id")
            .agg(pl.first("teacher_method"), pl.first("generation_check"))
            .group_by("teacher_method", "generation_check")
            .len()
        )
        teachers = [
            {
                "method": method,
                "verdicts": {
                    row["generation_check"]: row["len"]
                    for row in verdicts.filter(pl.col("teacher_method") == method).to_dicts()
                },
                **(audit.ground_truth or {}).get(method, {"leave_k_out": None, "planted": None, "lds": None}),
            }
            for method in sorted({run["method"] for run in audit.teacher_runs} | set(audit.ground_truth or {}))
        ]
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
            self.context,
            totals=totals,
            contributors=self.contributors,
            generations=self._generations(generations),
            teachers=teachers,
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
                pl.first("teacher_method"),
                pl.first("confirm_run_id"),
                pl.struct("rank", "training_id", "share", "check", "teacher_method", "source").alias("hits"),
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
    model: str = "not-other",
) -> ReportResult:
    """Divide `pool` among the contributors for one period and write the report folder (see the module doc).
    `model` picks the generations paid for by the model they declare (credit.MODEL_FILTERS)."""
    if policy not in POLICIES:
        raise AuditError(f"unknown policy {policy!r}; choose {', '.join(POLICIES)}")
    if not confirmed_weight > 0:
        raise AuditError("--confirmed-weight must be above 0")
    span = credit.Period.parse(period, date_from, date_to)
    currency = currency.upper()
    pool_minor = payout.to_minor(pool, currency, "--pool")
    min_minor = payout.to_minor(min_payout, currency, "--min-payout")

    with ws.reader() as store:
        audit = credit.read(store, span, encoder_id, model)
        # Attributed training images kept in shards or Parquet files: their thumbnails are read from there.
        kept = {
            path: (shard, member, key)
            for path, shard, member, key in store.rows(
                "SELECT path, shard, shard_member, shard_key FROM training_images WHERE shard_member IS NOT NULL"
                " AND id IN (SELECT training_id FROM attributions)"
            )
        }
        left_out = store.value(
            "SELECT count(*) FROM generations g WHERE "
            f"{span.where('g.created_at')[0]} AND NOT ({credit.MODEL_FILTERS[model]})",
            span.where("g.created_at")[1],
        )
    credited = (
        credit.teacher_credit(audit, confirmed_weight)
        if policy == "teacher"
        else credit.credit(audit.attributions, confirmed_weight)
    )
    if policy != "training-set" and credited.is_empty():
        also = f" ({left_out} left out by --model {model})" if left_out else ""
        raise AuditError(
            f"no generation registered in {span.label} is attributed to a contributor{also}; nothing to pay per output"
        )
    payouts, split = credit.payouts(
        credit.summary(audit.contributors, credited), policy, pool_minor, min_minor, currency
    )

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
        "bundle_checks": audit.bundle_checks or [],
        "model_filter": model,
        "model_left_out": left_out,
        "generated_at": utcnow(),
    }
    limits, storage = ws.limits, ws.storage
    pages = _Pages(
        context,
        audit,
        credited,
        payouts,
        functools.cache(lambda path: thumbnail(path, limits, storage, kept.get(path))),
    )
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
        model=model,
        model_left_out=left_out,
    )
