"""`audit sql` runs in a sandbox DuckDB enforces: no escape reaches a file, database or extension outside the store.

Every escape is run against a small seeded store and must fail with a one-line error while
audit.toml, the store's content, the workspace's files and the escape's target stay as they were.
"""

from __future__ import annotations

import json
import os

import polars as pl
import pytest

from auditor import sql, workspace
from auditor.errors import AuditError
from auditor.store import Store

from .helpers import audit, insert_finished_scan

FILES = "reads or writes files outside the audit store"
PROMPTS = ("a [cat:dog:0.5] on [white] paper", "x [/bold] y", ":x: [link=http://x]y[/link] [red]")


@pytest.fixture
def store_ws(tmp_path):
    """A workspace (no encoder: nothing here embeds) whose store holds a few rows in the tables users query."""
    ws = workspace.init(tmp_path / "ws")
    with Store(ws.db_path) as store:
        store.con.executemany(
            "INSERT INTO contributors (id, name, license) VALUES (?, ?, 'CC-BY-4.0')",
            [["ana", "Ana Studio"], ["ben", "Ben Studio"]],
        )
        store.con.executemany(
            "INSERT INTO training_images (id, path, sha256, contributor_id, caption, caption_source, width, height, indexed_at) VALUES (?, ?, ?, ?, 'a caption', 'manifest', 32, 32, now())",
            [[1, "ana/1.png", "t1", "ana"], [2, "ben/2.png", "t2", "ben"]],
        )
        insert_finished_scan(store.con, 2)
        store.con.executemany(
            "INSERT INTO generations (id, sha256, path, prompt, prompt_source, width, height, first_scan_id)"
            " VALUES (?, ?, ?, ?, 'txt', 32, 32, 1)",
            [[i + 1, f"g{i}", f"/out/g{i}.png", prompt] for i, prompt in enumerate(PROMPTS)],
        )
        store.con.executemany(
            "INSERT INTO attributions VALUES (?, 'knn', 'enc', ?, ?, 0.5, 0.5, 1)",
            [[g, rank, rank] for g in range(1, len(PROMPTS) + 1) for rank in (1, 2)],
        )
    return ws


def snapshot(ws) -> tuple:
    """audit.toml's bytes, every row of every table, and the workspace's files (the writer's lock file aside)."""
    with Store(ws.db_path, read_only=True) as store:
        tables = [row[0] for row in store.rows("SELECT table_name FROM duckdb_tables() ORDER BY 1")]
        content = {table: sorted(map(repr, store.rows(f'SELECT * FROM "{table}"'))) for table in tables}
    files = sorted(str(p.relative_to(ws.root)) for p in ws.root.rglob("*") if p.name != "lock")
    return ws.config_path.read_bytes(), content, files


def refused(ws, statement: str, *, write: bool = False) -> str:
    """Run `statement` through the library; it must fail with a one-line AuditError and change nothing."""
    before = snapshot(ws)
    with pytest.raises(AuditError) as info:
        sql.query(ws, statement, write=write)
    assert snapshot(ws) == before
    message = str(info.value)
    assert message and "\n" not in message
    return message


def refused_cli(ws, statement: str, *args) -> str:
    """Run `statement` through the real CLI; it must exit 1 with one line on stderr, print nothing, change nothing."""
    before = snapshot(ws)
    proc = audit("sql", statement, *args, ws=ws, check=False)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout == "" and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and proc.stderr.startswith("error: ")
    assert snapshot(ws) == before
    return proc.stderr


# --------------------------------------------------------------------------- the escapes, one by one


def test_copy_to_cannot_overwrite_audit_toml_or_write_any_file(store_ws, tmp_path):
    toml = store_ws.config_path
    outside = tmp_path / "outside" / "rows.csv"
    outside.parent.mkdir()
    for write in (False, True):
        assert FILES in refused(store_ws, f"COPY (SELECT 'pwned') TO '{toml}' (HEADER false)", write=write)
        assert FILES in refused(store_ws, f"COPY attributions TO '{outside}'", write=write)
    assert "--out FILE" in refused_cli(store_ws, f"COPY (SELECT 'pwned') TO '{toml}' (HEADER false)", "--write")
    assert FILES in refused_cli(store_ws, f"COPY attributions TO '{outside}'")
    assert not outside.exists() and list(outside.parent.iterdir()) == []
    assert workspace.load(store_ws.root).config == store_ws.config


def test_attach_cannot_open_or_write_another_database(store_ws, tmp_path):
    other = tmp_path / "other.duckdb"
    for write in (False, True):
        message = refused(store_ws, f"ATTACH '{other}' AS other (READ_ONLY false)", write=write)
        assert "attaches another database" in message
    assert "attaches another database" in refused_cli(store_ws, f"ATTACH '{other}' AS other (READ_ONLY false)")
    assert not other.exists()


def test_export_database_writes_nothing(store_ws, tmp_path):
    target = tmp_path / "exported"
    for write in (False, True):
        assert FILES in refused(store_ws, f"EXPORT DATABASE '{target}'", write=write)
    assert not target.exists()


def test_read_csv_cannot_read_files(store_ws, tmp_path):
    assert FILES in refused(store_ws, "SELECT * FROM read_csv('/etc/passwd')")
    mine = tmp_path / "mine.csv"
    mine.write_text("a,b\n1,2\n")
    for reader in ("read_csv", "read_csv_auto", "read_json", "read_parquet", "read_blob"):
        assert FILES in refused(store_ws, f"SELECT * FROM {reader}('{mine}')")
    assert FILES in refused_cli(store_ws, "SELECT * FROM read_csv('/etc/passwd')")


def test_read_text_does_not_return_the_environment(store_ws, monkeypatch):
    marker = "sandbox-marker-6c1f0e"
    monkeypatch.setenv("AUDIT_SQL_TEST_MARKER", marker)
    statement = "SELECT content FROM read_text('/proc/self/environ')"
    assert FILES in refused(store_ws, statement)
    stderr = refused_cli(store_ws, statement)
    assert marker not in stderr and os.environ["HOME"] not in stderr


def test_glob_lists_no_directory(store_ws):
    assert FILES in refused(store_ws, "SELECT * FROM glob('/root/*')")
    assert FILES in refused(store_ws, f"SELECT * FROM glob('{store_ws.dir}/*')")


def test_extensions_cannot_be_installed_or_loaded(store_ws):
    for statement in ("INSTALL httpfs", "LOAD httpfs", "FORCE INSTALL httpfs", "INSTALL spatial FROM community"):
        assert "installs or loads a DuckDB extension" in refused(store_ws, statement)
    assert "extension" in refused_cli(store_ws, "INSTALL httpfs")


def test_the_sandbox_cannot_be_switched_off(store_ws):
    for statement in (
        "SET enable_external_access = true",
        "SET lock_configuration = false",
        "RESET enable_external_access",
        "SET autoload_known_extensions = true",
        "SET allow_community_extensions = true",
        "PRAGMA enable_profiling",
    ):
        assert "changes DuckDB settings" in refused(store_ws, statement, write=True)
    settings = sql.query(
        store_ws,
        "SELECT name, value FROM duckdb_settings() WHERE name IN"
        " ('enable_external_access', 'autoinstall_known_extensions', 'autoload_known_extensions',"
        " 'allow_community_extensions', 'lock_configuration') ORDER BY name",
    )
    assert dict(settings.rows()) == {
        "allow_community_extensions": "false",
        "autoinstall_known_extensions": "false",
        "autoload_known_extensions": "false",
        "enable_external_access": "false",
        "lock_configuration": "true",
    }


def test_one_statement_per_call_with_and_without_write(store_ws):
    for write in (False, True):
        message = refused(store_ws, "select 1; delete from attributions", write=write)
        assert message.startswith("2 SQL statements given") and "one statement at a time" in message
    assert "one statement at a time" in refused_cli(store_ws, "select 1; delete from attributions", "--write")
    assert "no SQL statement" in refused(store_ws, " ; -- nothing")
    assert sql.query(store_ws, "select count(*) n from attributions")["n"].item() == 2 * len(PROMPTS)


# --------------------------------------------------------------------------- what must keep working


def test_selects_over_the_store_and_writes_with_write_still_work(store_ws, tmp_path):
    assert sql.query(store_ws, "select count(*) n from attribution_checks")["n"].item() == 2 * len(PROMPTS)
    joined = sql.query(
        store_ws,
        "select c.name, count(*) n from attributions a join training_images t on t.id = a.training_id"
        " join contributors c on c.id = t.contributor_id group by 1 order by 1;",
    )
    assert joined.rows() == [("Ana Studio", 3), ("Ben Studio", 3)]
    assert "--write" in refused(store_ws, "delete from attributions where rank = 2")
    sql.query(store_ws, "update contributors set name = 'Renamed' where id = 'ana'", write=True)
    sql.query(store_ws, "delete from attributions where rank = 2", write=True)
    assert sql.query(store_ws, "select name from contributors where id = 'ana'").item() == "Renamed"
    assert sql.query(store_ws, "select count(*) from attributions").item() == len(PROMPTS)

    # Results leave through Python: --out keeps working for every format.
    q = "select id, name from contributors order by id"
    audit("sql", q, "--format", "parquet", "--out", tmp_path / "c.parquet", ws=store_ws)
    audit("sql", q, "--format", "csv", "--out", tmp_path / "c.csv", ws=store_ws)
    assert pl.read_parquet(tmp_path / "c.parquet")["id"].to_list() == ["ana", "ben"]
    assert pl.read_csv(tmp_path / "c.csv")["name"].to_list() == ["Renamed", "Ben Studio"]
    proc = audit("sql", "update contributors set license = 'CC0' where id = 'ben'", "--write", ws=store_ws)
    assert proc.returncode == 0
    assert json.loads(
        audit("sql", "select license from contributors where id = 'ben'", "-f", "json", ws=store_ws).stdout
    ) == [{"license": "CC0"}]


def test_a_reader_sharing_the_duckdb_instance_is_sandboxed_too(store_ws):
    """DuckDB shares one instance per file within a process: `query` then finds the sandbox already locked."""
    with Store(store_ws.db_path, read_only=True) as held:
        assert sql.query(store_ws, "select count(*) from contributors").item() == 2
        assert sql.query(store_ws, "select count(*) from contributors").item() == 2  # already locked: fine
        assert held.value("select current_setting('enable_external_access')") is False
    with Store(store_ws.db_path, read_only=True) as fresh:  # the last connection closed: a new instance
        assert fresh.value("select current_setting('enable_external_access')") is True


# --------------------------------------------------------------------------- plain text out


def test_table_output_prints_user_text_verbatim(store_ws):
    proc = audit("sql", "select id, prompt from generations order by id", ws=store_ws)
    for prompt in PROMPTS:
        assert prompt in proc.stdout
    assert proc.stderr == "" and "❌" not in proc.stdout
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["id", "prompt"] and lines[-1] == f"({len(PROMPTS)} rows)"


def test_table_cells_stay_on_one_line_and_move_no_cursor():
    frame = pl.DataFrame({"name": ["gnp.\u202eexe", "two\nlines", "\x1b[2Jclear", None], "n": [1, 22, 333, None]})
    text = sql.table(frame)
    assert text.splitlines() == [
        "name              n",
        "--------------  ---",
        "gnp.\\u202eexe     1",
        "two\\nlines       22",
        "\\u001b[2Jclear  333",
        "",
        "(4 rows)",
    ]
