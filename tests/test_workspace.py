import os
import re
import subprocess
import sys

import pytest

from auditor import workspace
from auditor.errors import AuditError, WorkspaceBusy, WorkspaceNotFound
from auditor.store import Store, migrations

from .helpers import audit


def test_init_creates_config_store_and_lancedb_dir(tmp_path, tiny_encoder):
    ws = workspace.init(tmp_path, encoder=tiny_encoder)
    assert (tmp_path / ".audit" / "audit.toml").is_file()
    assert (tmp_path / ".audit" / "audit.duckdb").is_file()
    assert os.path.isdir(ws.lancedb_uri)
    reloaded = workspace.load(tmp_path)
    assert reloaded.config.encoder.path == str(tiny_encoder.resolve())
    assert reloaded.config.scan.top_k == 50


def test_init_twice_is_refused(tmp_path):
    workspace.init(tmp_path)
    with pytest.raises(AuditError, match="already exists"):
        workspace.init(tmp_path)


def test_find_walks_up_like_git(tmp_path):
    workspace.init(tmp_path)
    deep = tmp_path / "a" / "b" / "c"
    deep.mkdir(parents=True)
    assert workspace.find(start=deep).root == tmp_path.resolve()


def test_env_var_and_explicit_override_the_walk(tmp_path, monkeypatch):
    workspace.init(tmp_path / "one")
    workspace.init(tmp_path / "two")
    monkeypatch.setenv("AUDIT_WORKSPACE", str(tmp_path / "two"))
    assert workspace.find(start=tmp_path / "one").root == (tmp_path / "two").resolve()
    assert workspace.find(tmp_path / "one" / ".audit").root == (tmp_path / "one").resolve()


def test_no_workspace_is_a_one_line_error(tmp_path, monkeypatch):
    monkeypatch.delenv("AUDIT_WORKSPACE", raising=False)
    with pytest.raises(WorkspaceNotFound, match="audit init"):
        workspace.find(start=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "AUDIT_WORKSPACE"}
    proc = subprocess.run(
        [sys.executable, "-m", "auditor", "sql", "select 1"], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "audit init" in proc.stderr


def test_migrations_are_applied_once_and_recorded(tmp_path):
    ws = workspace.init(tmp_path)
    with Store(ws.db_path) as store:
        assert store.migrate() == []
        versions = [row[0] for row in store.rows("SELECT version FROM schema_migrations ORDER BY version")]
    assert versions == [m[0] for m in migrations()]
    assert versions == sorted(versions) and versions[0] == 1


def test_a_store_an_older_version_made_is_brought_up_to_date_for_readers_too(tmp_path):
    ws = workspace.init(tmp_path)
    latest, name, sql = migrations()[-1]
    tables, columns = re.findall(r"CREATE TABLE (\w+)", sql), re.findall(r"ALTER TABLE (\w+) ADD COLUMN (\w+)", sql)
    assert tables or columns, f"teach this test to undo migration {latest}_{name}"
    with Store(ws.db_path) as store:  # as the version before the latest migration left it
        for table in tables:
            store.con.execute(f"DROP TABLE {table}")
        for table, column in columns:
            store.con.execute(f"ALTER TABLE {table} DROP COLUMN {column}")
        store.con.execute("DELETE FROM schema_migrations WHERE version = ?", [latest])
    with Store(ws.db_path, read_only=True) as store:
        assert store.pending() == []
        for table in tables:  # there (a migration may fill it: 010 makes the workspace's id)
            assert store.value(f"SELECT count(*) FROM {table}") is not None
        for table, column in columns:
            assert store.value(f"SELECT count({column}) FROM {table}") == 0


def test_second_writer_gets_workspace_busy(tmp_path):
    ws = workspace.init(tmp_path)
    with ws.writing():
        with pytest.raises(WorkspaceBusy, match="workspace is busy"):
            with workspace.load(tmp_path).writing():
                pass
    with ws.writing():  # released after the first writer ends
        pass


def test_busy_workspace_from_another_process_is_a_clear_error(tmp_path, outputs_dir):
    ws = workspace.init(tmp_path)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from auditor import workspace; "
            "w=workspace.load(sys.argv[1]);\nwith w.writing():\n print('held', flush=True); time.sleep(600)",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = audit("scan", outputs_dir, ws=ws, check=False)
        assert proc.returncode == 1
        assert "workspace is busy" in proc.stderr and "Traceback" not in proc.stderr
    finally:
        holder.kill()
        holder.wait()
