"""`audit report`: the payout arithmetic, and the rendered report checked against DuckDB in a real browser."""

from __future__ import annotations

import shutil
import subprocess
from datetime import date, datetime
from decimal import Decimal
from fractions import Fraction
from html.parser import HTMLParser
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from auditor import payout
from auditor.credit import Period, credit
from auditor.errors import AuditError
from auditor.report import build_report, statement_name
from auditor.scan import scan
from auditor.store import Store, utcnow

from .helpers import audit

HOSTILE = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
BOLD_NAME = "Ben <b>Bold</b> & Sons"
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


# --------------------------------------------------------------------------- payout arithmetic


def test_largest_remainder_splits_100_eur_three_ways_exactly():
    split = payout.split(payout.to_minor(Decimal("100.00"), "EUR"), {"a": 1, "b": 1, "c": 1})
    assert split.amount == {"a": 3334, "b": 3333, "c": 3333}  # the tie goes to the first key
    assert sum(payout.from_minor(v, "EUR") for v in split.amount.values()) == Decimal("100.00")


@pytest.mark.parametrize("pool", [0, 1, 2, 7, 99, 10001, 123457, 10**12 + 3])
def test_amounts_always_add_up_to_the_pool_and_stay_within_one_unit_of_the_quota(pool):
    credits = {f"c{i}": value for i, value in enumerate([0.3141, 0.2718, 0.1618, 0.1414, 0.0577, 0.0001, 1e-9])}
    split = payout.split(pool, credits)
    assert sum(split.amount.values()) == pool
    assert all(abs(split.amount[key] - split.quota[key]) < 1 for key in credits)


def test_jpy_has_no_minor_unit():
    pool = payout.to_minor(Decimal("1000"), "JPY")
    assert pool == 1000
    split = payout.split(pool, {"a": 1, "b": 1, "c": 1})
    assert sorted(split.amount.values()) == [333, 333, 334]
    assert payout.from_minor(334, "JPY") == Decimal("334")
    with pytest.raises(AuditError, match="at most 0 decimal places"):
        payout.to_minor(Decimal("1000.5"), "JPY")


def test_amounts_finer_than_the_currency_negative_or_unknown_are_refused():
    assert payout.to_minor(Decimal("1.234"), "BHD") == 1234
    for amount, currency in ((Decimal("100.001"), "EUR"), (Decimal("-1"), "EUR"), (Decimal("NaN"), "EUR")):
        with pytest.raises(AuditError):
            payout.to_minor(amount, currency)
    with pytest.raises(AuditError, match="unknown currency"):
        payout.minor_digits("XYZ")


def test_minimum_payout_redistributes_pro_rata_to_the_others():
    split = payout.split(1000, {"a": 50, "b": 30, "c": 15, "d": 5}, min_payout=60)
    assert split.quota["d"] == 50  # below 60: paid nothing
    assert split.paid == {"a", "b", "c"}
    assert split.adjusted == {
        "a": Fraction(1000 * 50, 95),
        "b": Fraction(1000 * 30, 95),
        "c": Fraction(1000 * 15, 95),
        "d": 0,
    }
    assert split.amount == {"a": 526, "b": 316, "c": 158, "d": 0}
    with pytest.raises(AuditError, match="no contributor reaches the minimum payout"):
        payout.split(1000, {"a": 1, "b": 1}, min_payout=501)


def test_confirmed_attributions_weigh_more_within_their_generation_only():
    frame = pl.DataFrame(
        {
            "generation_id": [1, 1, 2, 2, 2],
            "share": [0.5, 0.5, 0.6, 0.3, 0.1],
            "confirmed": [True, False, False, False, False],
            "generation_confirmed": [True, True, None, None, None],
            "contributor_id": ["a", "b", "a", "b", None],
        }
    )
    credited = credit(frame, confirmed_weight=3.0)
    assert credited["credit"].to_list() == pytest.approx([0.75, 0.25, 0.6 / 0.9, 0.3 / 0.9])
    assert credited["check"].to_list() == ["confirmed", "not confirmed", "unchecked", "unchecked"]
    assert credited.group_by("generation_id").agg(pl.col("credit").sum())["credit"].to_list() == pytest.approx([1, 1])


def test_periods_are_months_or_inclusive_days():
    assert Period.parse("2026-12") == Period(datetime(2026, 12, 1), datetime(2027, 1, 1), "2026-12")
    days = Period.parse(date_from=date(2026, 11, 3), date_to=date(2026, 11, 5))
    assert (days.start, days.end) == (datetime(2026, 11, 3), datetime(2026, 11, 6))
    assert Period.parse().where("t") == ("true", [])
    for bad in (
        {"period": "2026-13"},
        {"period": "11/2026"},
        {"period": "2026-11", "date_from": date(2026, 11, 1)},
        {"date_from": date(2026, 11, 5), "date_to": date(2026, 11, 3)},
    ):
        with pytest.raises(AuditError):
            Period.parse(**bad)


def test_statement_names_are_safe_file_names():
    assert statement_name("ana") == "ana.html"
    names = {statement_name(i) for i in ("../../etc/passwd", "Ana", "ana ", "a/b", "", "<script>")}
    assert len(names) == 6
    assert all(name.endswith(".html") and "/" not in name and not name.startswith(".") for name in names)


# --------------------------------------------------------------------------- a seeded workspace


@pytest.fixture
def seeded(indexed_ws, outputs_dir):
    """The small world scanned, then edited where a real audit would differ from it.

    In the small world every generation's top 5 belong to one contributor, so: one of ana's generations
    ('mixed') has ranks 4-5 moved to ben's images and a hostile prompt; three of dmitri's generations are
    moved to chloe's images (so dmitri falls below a minimum payout); ben's name carries markup; a teacher
    run confirms 'mixed' (its rank-1 and rank-4 images in its top 2), disputes another of ana's ('checked') and
    is inconclusive on a third ('unsure').
    """
    result = scan(indexed_ws, outputs_dir, top_k=5)
    with Store(indexed_ws.db_path) as store:
        owner = dict(
            store.rows(
                "SELECT a.generation_id, t.contributor_id FROM attributions a JOIN training_images t ON t.id = a.training_id WHERE a.rank = 1"
            )
        )
        images = {
            c: [
                row[0] for row in store.rows("SELECT id FROM training_images WHERE contributor_id = ? ORDER BY id", [c])
            ]
            for c in set(owner.values())
        }
        generations = {c: sorted(g for g, o in owner.items() if o == c) for c in images}
        mixed, checked, unsure = generations["ana"][:3]
        moves = [(images["ben"][rank], mixed, rank) for rank in (4, 5)]
        moves += [(images["chloe"][rank], g, rank) for g in generations["dmitri"][:3] for rank in range(1, 6)]
        store.con.executemany("UPDATE attributions SET training_id = ? WHERE generation_id = ? AND rank = ?", moves)
        store.con.execute("UPDATE generations SET prompt = ? WHERE id = ?", [HOSTILE, mixed])
        store.con.execute("UPDATE contributors SET name = ? WHERE id = 'ben'", [BOLD_NAME])
        now = utcnow()
        store.con.execute(
            "INSERT INTO confirm_runs (id, method, model_hash, model_path, encoder_id, settings, settings_hash,"
            " started_at, finished_at, n_generations, status) VALUES (1, 'abu', 'model-hash-1', '/models/digits', ?, '{}', 'h', ?, ?, 3, 'finished')",
            [result.encoder_id, now, now],
        )
        teacher_rank = {
            mixed: {1: 2, 2: 3, 3: 4, 4: 1, 5: 5},
            checked: {r: r for r in range(1, 6)},
            unsure: {r: 6 - r for r in range(1, 6)},
        }
        store.con.executemany(
            "INSERT INTO teacher_scores SELECT 1, generation_id, training_id, 1.0 / ?, 0.0, ?, rank, false"
            " FROM attributions WHERE generation_id = ? AND rank = ?",
            [[t, t, g, r] for g, ranks in teacher_rank.items() for r, t in ranks.items()],
        )
        store.con.executemany(
            "INSERT INTO confirmations (generation_id, run_id, method, encoder_id, k, map_at_k, top1_agree, spearman,"
            " control_margin, confirmed, seconds, confirmed_at, verdict, p_value)"
            " VALUES (?, 1, 'abu', ?, 2, ?, ?, 0.5, 3.0, ?, 1.0, ?, ?, ?)",
            [
                [mixed, result.encoder_id, 0.9, True, True, now, "confirmed", 1e-4],
                [checked, result.encoder_id, 0.1, False, False, now, "disputed", 0.6],
                [unsure, result.encoder_id, 0.2, False, False, now, "inconclusive", 0.2],
            ],
        )
    return indexed_ws, {"mixed": mixed, "checked": checked, "unsure": unsure, "images": images}


def expected(ws, confirmed_weight: float) -> dict[str, dict]:
    """Each contributor's counts and credit straight from DuckDB, the per-output formula written in SQL."""
    with Store(ws.db_path, read_only=True) as store:
        rows = store.rows(
            "WITH w AS (SELECT c.generation_id, t.contributor_id, c.confirmed,"
            "   c.share * CASE WHEN c.confirmed THEN ? ELSE 1 END AS w"
            "   FROM attribution_checks c JOIN training_images t ON t.id = c.training_id)"
            " SELECT contributor_id, count(*), count(*) FILTER (WHERE confirmed), count(DISTINCT generation_id),"
            "   sum(w / total) FROM (SELECT *, sum(w) OVER (PARTITION BY generation_id) AS total FROM w) GROUP BY 1",
            [confirmed_weight],
        )
        totals = store.rows(
            "SELECT (SELECT count(*) FROM generations), count(*), count(*) FILTER (WHERE confirmed) FROM attribution_checks"
        )[0]
    keys = ("attributions", "confirmed", "generations", "credit")
    return {
        "contributors": {row[0]: dict(zip(keys, row[1:])) for row in rows},
        "generations": totals[0],
        "attributions": totals[1],
        "confirmed": totals[2],
    }


# --------------------------------------------------------------------------- the DOM Chromium rendered


class Node:
    def __init__(self, tag: str, attrs: dict):
        self.tag, self.attrs, self.children = tag, attrs, []

    def iter(self):
        yield self
        for child in self.children:
            if isinstance(child, Node):
                yield from child.iter()

    def find(self, tag: str | None = None, **attrs) -> list[Node]:
        return [
            n
            for n in self.iter()
            if (tag is None or n.tag == tag) and all(n.attrs.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]

    def has_class(self, name: str) -> bool:
        return name in (self.attrs.get("class") or "").split()

    def text(self) -> str:
        return "".join(c if isinstance(c, str) else c.text() for c in self.children)


class _Dom(HTMLParser):
    VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.stack = [Node("#document", {})]
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        node = Node(tag, dict(attrs))
        self.stack[-1].children.append(node)
        if tag not in self.VOID:
            self.stack.append(node)

    def handle_endtag(self, tag):
        while len(self.stack) > 1 and self.stack.pop().tag != tag:
            pass

    def handle_data(self, data):
        self.stack[-1].children.append(data)


def chromium() -> str:
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get"):
        pytest.fail(
            "Chromium is not installed: run `make browser` (apt-get install chromium); the report test needs a real browser"
        )
    pytest.skip(
        "Chromium is not installed and cannot be here (no apt-get): the report's browser test needs Debian's chromium"
    )


def open_in_chromium(page: Path, screenshot: Path, profile: Path) -> Node:
    """Load the page from disk in headless Chromium; screenshot it and return the DOM after its scripts (if any) ran."""
    proc = subprocess.run(
        [
            chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            "--dump-dom",
            f"--screenshot={screenshot}",
            "--window-size=1280,1600",
            page.as_uri(),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0 and proc.stdout, proc.stderr[-2000:]
    with Image.open(screenshot) as shot:
        assert shot.size == (1280, 1600)
        assert len(shot.convert("RGB").getcolors(1 << 20) or range(1 << 20)) > 50, "the screenshot is (nearly) blank"
    return _Dom(proc.stdout).stack[0]


def assert_inert(dom: Node, title: str) -> None:
    """User text stayed text: nothing executed, no element came from it."""
    assert dom.find("head")[0].find("title")[0].text() == title  # not 'pwned'
    assert dom.find("script") == []
    assert dom.find("b") == []
    assert all(
        img.attrs["src"].startswith("data:image/png;base64,") and set(img.attrs) == {"class", "src", "alt"}
        for img in dom.find("img")
    )


def minor_of(cell: Node) -> int:
    """The euro amount a person reads in a cell, as cents."""
    return payout.to_minor(Decimal(cell.text().split()[-1].replace(",", "")), "EUR")


def test_report_in_chromium_matches_duckdb_sums_to_the_pool_and_runs_no_user_text(seeded, tmp_path):
    ws, seed = seeded
    pool, weight, minimum = Decimal("1000.01"), 2.0, Decimal("150.00")
    result = build_report(ws, tmp_path / "report", pool=pool, confirmed_weight=weight, min_payout=minimum)
    truth = expected(ws, weight)
    credits = {c: row["credit"] for c, row in truth["contributors"].items()}
    split = payout.split(100001, credits, 15000)
    assert split.paid == {"ana", "ben", "chloe"}  # dmitri's quota is below the minimum

    dom = open_in_chromium(result.index, tmp_path / "index.png", tmp_path / "profile-index")
    assert_inert(dom, "Contributor payouts all time")
    assert [n.text() for n in dom.find("span") if n.has_class("prompt-text") and n.text() == HOSTILE]
    assert BOLD_NAME in dom.find("table", id="contributors")[0].text()

    rows = {tr.attrs["data-contributor"]: tr for tr in dom.find("tr") if "data-contributor" in tr.attrs}
    assert set(rows) == set(truth["contributors"])
    for contributor, want in truth["contributors"].items():
        cells = {td.attrs["data-field"]: td for td in rows[contributor].find("td") if "data-field" in td.attrs}
        assert int(cells["attributions"].text()) == want["attributions"]
        assert int(cells["confirmed_attributions"].text()) == want["confirmed"]
        assert int(cells["generations"].text()) == want["generations"]
        assert float(cells["basis"].attrs["data-value"]) == pytest.approx(want["credit"], abs=1e-9)
        assert int(cells["amount"].attrs["data-minor"]) == minor_of(cells["amount"]) == split.amount[contributor]
    amounts = [minor_of(rows[c].find(data_field="amount")[0]) for c in rows]
    assert (
        sum(amounts)
        == 100001
        == int(dom.find(id="pool")[0].attrs["data-minor"])
        == int(dom.find(id="total-paid")[0].attrs["data-minor"])
    )
    assert minor_of(dom.find(id="sum-amounts")[0]) == 100001
    assert amounts.count(0) == 1
    for element, want in (
        ("generations", truth["generations"]),
        ("attributions", truth["attributions"]),
        ("confirmed-attributions", truth["confirmed"]),
    ):
        assert int(dom.find(id=element)[0].text()) == want
    assert truth["confirmed"] == 2  # 'mixed': ana's rank 1 and ben's rank 4

    # ana's statement: her amount, her images, the hostile prompt as text, and nobody else
    statement = open_in_chromium(result.statements["ana"], tmp_path / "ana.png", tmp_path / "profile-ana")
    assert_inert(statement, "Compensation statement all time: Ana Studio")
    assert int(statement.find(id="amount")[0].attrs["data-minor"]) == split.amount["ana"]
    assert [n for n in statement.find("span") if n.has_class("prompt-text") and n.text() == HOSTILE]
    shown = {int(tr.attrs["data-training"]) for tr in statement.find("tr") if "data-training" in tr.attrs}
    linked = {int(a.attrs["href"].removeprefix("#img-")) for a in statement.find("a")}
    assert shown and linked <= shown <= set(seed["images"]["ana"])
    text = statement.text()
    for other in ("Bold", "Ben Studio", "Chloe Studio", "Dmitri Studio", "dmitri", "chloe"):
        assert other not in text
    for other in ("ben", "chloe"):
        assert f"{result.payouts.filter(pl.col('contributor_id') == other)['amount'][0]:,}" not in text

    # ben's statement shows his two images in 'mixed' and not ana's three
    ben = _Dom(result.statements["ben"].read_text()).stack[0]
    mixed_row = ben.find("tr", data_generation=str(seed["mixed"]))[0]
    assert sorted(a.attrs["href"] for a in mixed_row.find("a")) == [f"#img-{seed['images']['ben'][r]}" for r in (4, 5)]
    assert len([span for span in mixed_row.find("span") if span.has_class("confirmed")]) == 2  # the generation, rank 4
    assert "Ana Studio" not in ben.text()

    # Every attribution on ana's statement shows its verdict and the teacher that gave it, as DuckDB has them.
    with Store(ws.db_path, read_only=True) as store:
        want = {
            (g, t): (check, teacher or "")
            for g, t, check, teacher in store.rows(
                "SELECT c.generation_id, c.training_id, CASE WHEN c.confirmed THEN 'confirmed'"
                " WHEN c.generation_confirmed IS NULL THEN 'unchecked'"
                " WHEN c.verdict IN ('disputed', 'inconclusive') THEN c.verdict ELSE 'not confirmed' END,"
                " c.teacher_method FROM attribution_checks c JOIN training_images t ON t.id = c.training_id"
                " WHERE t.contributor_id = 'ana'"
            )
        }
    shown = {}
    for tr in statement.find("tr"):
        if "data-generation" not in tr.attrs:
            continue
        for hit in (span for span in tr.find("span") if span.has_class("hit")):
            key = (int(tr.attrs["data-generation"]), int(hit.attrs["data-training"]))
            shown[key] = (hit.attrs["data-verdict"], hit.attrs["data-teacher"])
            badge = [b.text() for b in hit.find("span") if b.has_class("badge")]
            assert badge == [hit.attrs["data-verdict"]]
            assert ("by AbU" in hit.text()) == (hit.attrs["data-teacher"] == "abu")
    assert shown == want
    assert {v for v, _ in shown.values()} == {"confirmed", "not confirmed", "disputed", "inconclusive", "unchecked"}

    # The index says, per teacher, how its verdicts came out and that its ground-truth checks have not been run.
    evidence = dom.find("tr", data_teacher="abu")[0]
    cells = {td.attrs["data-field"]: td.text() for td in evidence.find("td") if "data-field" in td.attrs}
    assert (cells["confirmed"], cells["disputed"], cells["inconclusive"]) == ("1", "1", "1")
    assert "not run" in cells["leave-k-out"] and "not run" in cells["planted"]


def test_payout_files_period_and_cli(seeded, tmp_path):
    ws, seed = seeded
    with Store(ws.db_path) as store:  # 'checked' was registered in January 2025
        store.con.execute(
            "UPDATE generations SET created_at = TIMESTAMP '2025-01-15 12:00:00' WHERE id = ?", [seed["checked"]]
        )
    out = tmp_path / "january"
    proc = audit("report", "--period", "2025-01", "--pool", "1000", "--currency", "JPY", "--out", out, ws=ws)
    assert f"report: {out / 'index.html'}" in proc.stdout
    csv = pl.read_csv(out / "payouts.csv")
    assert csv["amount"].sum() == 1000 and csv.filter(pl.col("amount") > 0)["contributor_id"].to_list() == ["ana"]
    parquet = pl.read_parquet(out / "payouts.parquet")
    assert (
        parquet["amount"].dtype == pl.Decimal(38, 0)
        and parquet["amount_minor"].to_list() == csv["amount_minor"].to_list()
    )
    january = _Dom((out / "index.html").read_text()).stack[0]
    assert january.find(id="generations")[0].text() == "1"
    assert [tr.attrs["data-generation"] for tr in january.find("tr") if "data-generation" in tr.attrs] == [
        str(seed["checked"])
    ]

    # the rest of the audit is in this month; an earlier report in the folder is replaced whole
    month = utcnow().strftime("%Y-%m")
    result = build_report(ws, out, period=month, pool=Decimal("99.99"), currency="usd")
    assert result.generations == 23 and result.total_paid == Decimal("99.99")
    parquet = pl.read_parquet(out / "payouts.parquet")
    assert parquet["amount"].dtype == pl.Decimal(38, 2) and parquet["amount"].sum() == Decimal("99.99")
    assert pl.read_csv(out / "payouts.csv")["amount_minor"].sum() == 9999
    assert sorted(p.name for p in out.iterdir()) == ["contributors", "index.html", "payouts.csv", "payouts.parquet"]


def test_training_set_policy_pays_by_images_indexed(seeded, tmp_path):
    ws, _ = seeded
    with Store(ws.db_path) as store:  # three of dmitri's images gone, with the rankings citing them
        gone = [row[0] for row in store.rows("SELECT id FROM training_images WHERE contributor_id = 'dmitri' LIMIT 3")]
        store.con.execute("DELETE FROM attributions WHERE list_contains(?, training_id)", [gone])
        store.con.execute("DELETE FROM training_images WHERE list_contains(?, id)", [gone])
    result = build_report(ws, tmp_path / "report", pool=Decimal("100.00"), policy="training-set")
    amounts = dict(zip(result.payouts["contributor_id"], result.payouts["amount_minor"]))
    assert sum(amounts.values()) == 10000
    assert amounts == payout.split(10000, {"ana": 30, "ben": 30, "chloe": 30, "dmitri": 27}).amount
    assert "share of the training set" in result.index.read_text()


def test_teacher_policy_pays_on_teacher_scores_where_the_verdict_decided(seeded, tmp_path):
    ws, seed = seeded
    result = build_report(ws, tmp_path / "report", pool=Decimal("1000.00"), policy="teacher")
    with Store(ws.db_path, read_only=True) as store:
        # Decided generations ('mixed' confirmed, 'checked' disputed): the teacher's top-k (k = 2) by influence;
        # the rest ('unsure' inconclusive, and the unchecked): the per-output formula.
        rows = store.rows(
            "WITH decided AS (SELECT generation_id, run_id, k FROM confirmations WHERE verdict IN ('confirmed', 'disputed')),"
            " teacher AS (SELECT s.generation_id, t.contributor_id, greatest(s.influence, 0) AS w"
            "   FROM teacher_scores s JOIN decided d USING (generation_id, run_id) JOIN training_images t ON t.id = s.training_id"
            "   WHERE s.teacher_rank <= d.k),"
            " fast AS (SELECT c.generation_id, t.contributor_id, c.share * CASE WHEN c.confirmed THEN 2 ELSE 1 END AS w"
            "   FROM attribution_checks c JOIN training_images t ON t.id = c.training_id"
            "   WHERE c.generation_id NOT IN (SELECT generation_id FROM decided)),"
            " w AS (SELECT * FROM teacher UNION ALL SELECT * FROM fast)"
            " SELECT contributor_id, sum(w / total) FROM (SELECT *, sum(w) OVER (PARTITION BY generation_id) AS total FROM w)"
            " GROUP BY 1"
        )
    credits = dict(rows)
    assert dict(zip(result.payouts["contributor_id"], result.payouts["basis"])) == pytest.approx(
        {c: credits.get(c, 0.0) for c in result.payouts["contributor_id"]}
    )
    amounts = dict(zip(result.payouts["contributor_id"], result.payouts["amount_minor"]))
    assert amounts == payout.split(100000, credits).amount | {c: 0 for c in amounts if c not in credits}
    # ben's images are in the teacher's top 2 of 'mixed' (rank 4 is its top 1): paid on the teacher there.
    ben = result.statements["ben"].read_text()
    assert 'data-source="teacher"' in ben and "paid on the teacher where it decided" in ben


def test_report_refuses_to_overwrite_a_folder_that_is_not_a_report(seeded, tmp_path):
    ws, _ = seeded
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(AuditError, match="does not hold an earlier report"):
        build_report(ws, tmp_path / "notes", pool=Decimal("1"))
    assert (tmp_path / "notes" / "keep.txt").read_text() == "mine"
