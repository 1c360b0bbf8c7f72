"""`audit report` with hostile user text: no control characters on the pages, names bidi-isolated, a CSV no spreadsheet runs.

The store is seeded directly (no encoder, no scan): contributors, training images and generations
whose names, ids, licences, captions, prompts and paths carry NUL and other controls, U+202E,
spreadsheet formulas and markup-like brackets.
"""

from __future__ import annotations

import csv
import re
from decimal import Decimal
from html.parser import HTMLParser

import polars as pl
import pytest

from auditor import workspace
from auditor.report import build_report, plain, spreadsheet_safe
from auditor.store import Store

from .helpers import audit, insert_finished_scan

RLO = "\u202e"
FORMULA = '=HYPERLINK("http://x","y")'
# contributor id -> (name, licence)
CONTRIBUTORS = {
    "nul": ("Nul\x00Byte\x07 \x1b[31mRed\x1b[0m \x85Next\x9bCSI\x7f", "CC-BY-4.0\x00"),
    "rlo": (f"Photo {RLO}gnp.exe", "CC0"),
    "=cmd": (FORMULA, "+SUM(A1:A9)"),
    "@at": ("@import \t\r\n tabs", "-2+3"),
    "-12.5": ("-12.5", "\tTAB"),
    "markup": ("[bold]Big[/bold] <b>x</b> a [cat:dog:0.5] on [white] paper", "[/bold]"),
}
PROMPTS = [
    f"a prompt\x00 with NUL and {RLO}gnp.exe",
    "x [/bold] y <script>alert(1)</script>",
    f"{FORMULA} \x1b]8;;http://x\x07link\x1b]8;;\x07",
]
# C0 but tab and newline, DEL, C1, and the bidi embeddings, overrides and isolates
UNSHOWN = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@pytest.fixture
def hostile_report(tmp_path):
    ws = workspace.init(tmp_path / "ws")
    ids = list(CONTRIBUTORS)
    with Store(ws.db_path) as store:
        store.con.executemany(
            "INSERT INTO contributors (id, name, license) VALUES (?, ?, ?)",
            [[c, name, licence] for c, (name, licence) in CONTRIBUTORS.items()],
        )
        store.con.executemany(
            "INSERT INTO training_images (id, path, sha256, contributor_id, caption, caption_source, width, height, indexed_at) VALUES (?, ?, ?, ?, ?, 'manifest', 32, 32, now())",
            [
                [i + 1, f"/nowhere/{c}/gnp.{RLO}exe\x1b.png", f"t{i}", c, f"caption\x00 of {c} {RLO}{FORMULA}"]
                for i, c in enumerate(ids)
            ],
        )
        store.con.execute(
            "INSERT INTO encoders (id, name, path, dim, config) VALUES ('enc', ?, '/e', 32, '{}')", [f"enc{RLO}\x00"]
        )
        insert_finished_scan(store.con, 3)
        store.con.executemany(
            "INSERT INTO generations (id, sha256, path, prompt, prompt_source, width, height, first_scan_id)"
            " VALUES (?, ?, ?, ?, 'txt', 32, 32, 1)",
            [[g + 1, f"g{g}", f"/out/g{g}\x00{RLO}.png", prompt] for g, prompt in enumerate(PROMPTS)],
        )
        # Every generation is attributed to two contributors, so every contributor is credited.
        store.con.executemany(
            "INSERT INTO attributions VALUES (?, 'knn', 'enc', ?, ?, 0.5, 0.5, 1)",
            [[g + 1, rank + 1, (2 * g + rank) % len(ids) + 1] for g in range(len(PROMPTS)) for rank in range(2)],
        )
    out = tmp_path / "report"
    result = build_report(ws, out, pool=Decimal("600.00"))
    return ws, result, out


class _Text(HTMLParser):
    """The text of every <bdi>, and the document's <title> (the first; the chart's SVG has one too)."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.bdi, self.title, self.open = [], "", []
        self.feed(html)
        self.close()

    def handle_starttag(self, tag, attrs):
        if tag in ("bdi", "title"):
            self.open.append([tag, ""])

    def handle_endtag(self, tag):
        if self.open and self.open[-1][0] == tag:
            _, text = self.open.pop()
            if tag == "bdi":
                self.bdi.append(text)
            else:
                self.title = self.title or text

    def handle_data(self, data):
        for element in self.open:
            element[1] += data


def test_pages_carry_no_control_characters_and_isolate_every_name(hostile_report):
    _, result, out = hostile_report
    pages = [out / "index.html", *(out / "contributors").iterdir()]
    assert len(pages) == 1 + len(CONTRIBUTORS)
    for page in pages:
        html = page.read_text()
        assert not UNSHOWN.search(html), (page.name, UNSHOWN.findall(html))
        assert "<b>" not in html and "<script>" not in html  # escaped, as before
    index = _Text((out / "index.html").read_text())
    for contributor, (name, licence) in CONTRIBUTORS.items():
        assert {plain(name), plain(contributor), plain(licence)} <= set(index.bdi)
        statement = _Text(result.statements[contributor].read_text())
        assert plain(name) in statement.bdi  # the heading
        assert statement.title.endswith(": " + plain(name))  # <title> cannot hold <bdi>: stripped only
        assert f"caption of {plain(contributor)} {FORMULA}" in statement.bdi
        assert "gnp.exe.png" in statement.bdi  # the training image's file name, its override gone
    assert "Photo gnp.exe" in index.bdi and "[bold]Big[/bold] <b>x</b> a [cat:dog:0.5] on [white] paper" in index.bdi
    assert [plain(prompt) for prompt in PROMPTS] == [text for text in index.bdi if text in map(plain, PROMPTS)]
    assert "enc" in index.bdi  # the encoder's name
    assert "g0.png" in index.bdi  # a generation's file name, NUL and override gone


def test_payouts_csv_is_safe_in_a_spreadsheet_and_parquet_keeps_the_raw_values(hostile_report):
    _, _, out = hostile_report
    with open(out / "payouts.csv", newline="") as fh:
        rows = {row["contributor_id"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"nul", "rlo", "'=cmd", "'@at", "-12.5", "markup"}
    assert rows["'=cmd"]["name"] == "'" + FORMULA and rows["'=cmd"]["license"] == "'+SUM(A1:A9)"
    assert rows["'@at"]["name"] == "'@import \t\r\n tabs" and rows["'@at"]["license"] == "'-2+3"
    assert rows["-12.5"]["name"] == "-12.5" and rows["-12.5"]["license"] == "'\tTAB"  # a number stays a number
    assert rows["rlo"]["name"] == CONTRIBUTORS["rlo"][0]  # only formulas are touched in the CSV
    for row in rows.values():
        for column, value in row.items():
            assert not value.startswith(("=", "+", "@", "\t", "\r")), (column, value)
            assert not value.startswith("-") or re.fullmatch(r"-\d+(\.\d+)?", value), (column, value)

    parquet = pl.read_parquet(out / "payouts.parquet")
    raw = {row["contributor_id"]: row for row in parquet.to_dicts()}
    assert {c: (raw[c]["name"], raw[c]["license"]) for c in raw} == CONTRIBUTORS
    as_read = pl.read_csv(out / "payouts.csv")
    assert as_read["amount_minor"].to_list() == parquet["amount_minor"].to_list()
    assert as_read["amount_minor"].sum() == 60000
    assert as_read["credit"].to_list() == pytest.approx(parquet["credit"].to_list())


def test_plain_strips_exactly_controls_and_bidi_overrides():
    controls = "".join(map(chr, [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]))
    bidi = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    kept = "tab\there\nnew line, عربي עברית 日本語 é ❌ \u200e\u00a0[b]<x>&"
    assert plain(controls + kept + bidi) == kept


def test_spreadsheet_safe_prefixes_formulas_only():
    frame = pl.DataFrame(
        {
            "text": ["=1+1", "+1", "-1", "-1.5e3", "-x", "@a", "\tx", "\rx", "a=b", "", None, "'=already", " =x"],
            "number": list(range(-6, 7)),
        }
    )
    safe = spreadsheet_safe(frame)
    assert safe["text"].to_list() == [
        "'=1+1",
        "+1",
        "-1",
        "-1.5e3",
        "'-x",
        "'@a",
        "'\tx",
        "'\rx",
        "a=b",
        "",
        None,
        "'=already",
        " =x",
    ]
    assert safe["number"].to_list() == frame["number"].to_list()


def test_report_cli_on_hostile_text(hostile_report, tmp_path):
    ws, _, _ = hostile_report
    proc = audit("report", "--pool", "10", "--out", tmp_path / "again", ws=ws)
    assert "Traceback" not in proc.stderr
    assert not UNSHOWN.search((tmp_path / "again" / "index.html").read_text())
