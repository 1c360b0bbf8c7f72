import os
import subprocess
import sys

AUDIT = [sys.executable, "-m", "auditor"]


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
