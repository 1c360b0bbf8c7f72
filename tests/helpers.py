import os
import subprocess
import sys

AUDIT = [sys.executable, "-m", "auditor"]
S3_BUCKET = "audit-vectors"  # the bucket of the `s3` fixture (conftest.py)


def audit(*args, ws=None, check=True, **kwargs) -> subprocess.CompletedProcess:
    """Run the real `audit` CLI in a subprocess."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    if ws is not None:
        env["AUDIT_WORKSPACE"] = str(ws.root if hasattr(ws, "root") else ws)
    proc = subprocess.run([*AUDIT, *map(str, args)], capture_output=True, text=True, env=env, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"audit {' '.join(map(str, args))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def sql_value(ws, query: str):
    from auditor import sql

    frame = sql.query(ws, query)
    return frame.row(0)[0]


def insert_finished_scan(con, attributed: int, scan_id: int = 1) -> None:
    """A finished scan row for stores a test fills by hand (columns named: migrations add more)."""
    con.execute(
        "INSERT INTO scans (id, started_at, finished_at, root, encoder_id, index_version, top_k, device, n_seen,"
        " n_attributed, status) VALUES (?, now(), now(), '/out', 'enc', 1, 2, 'cpu', ?, ?, 'finished')",
        [scan_id, attributed, attributed],
    )


def store_made_before(path, version: int):
    """A store as a release before migration `version` left it (only the earlier migrations applied), holding one
    generation that release scanned. Close it; the next Store(path) applies the rest."""
    import pytest

    from auditor import store

    every = store.migrations()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(store, "migrations", lambda: [m for m in every if m[0] < version])
        old = store.Store(path)
    old.con.execute(
        "INSERT INTO generations (id, sha256, path, prompt, prompt_source, width, height, first_scan_id)"
        " VALUES (7, 'abc', '/out/x.png', 'a fox', 'a1111', 8, 8, 3)"
    )
    return old
