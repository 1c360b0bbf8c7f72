"""Concurrent readers (issue #24): `audit sql` answers while a scan runs in another process, a reader that holds the
store makes the scan wait and go on, and the scan's rows are exactly those of a scan nobody read during.

The scan runs in a subprocess with its commit slowed down (a pause after each batch, as a slower model would
take), so it is still running while the test's readers come and go.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from auditor import scan, workspace
from auditor.errors import WorkspaceBusy
from auditor.store import Store

from . import small_world
from .helpers import audit

TOP_K, BATCH = 5, 4

SCANNER = r"""
import sys, time, pathlib
from auditor import scan, workspace
ws = workspace.load(sys.argv[1])
stop, pause = pathlib.Path(sys.argv[3]), float(sys.argv[4])
commit = scan.ScanLedger.commit
def slow_commit(self, batch, ids, scores):
    commit(self, batch, ids, scores)
    print("committed", self.result.attributed, time.monotonic(), flush=True)
    if not stop.exists():
        time.sleep(pause)
scan.ScanLedger.commit = slow_commit
result = scan.scan(ws, sys.argv[2], top_k=int(sys.argv[5]), batch_size=int(sys.argv[6]))
print("done", result.attributed, flush=True)
"""

HOLDER = r"""
import sys, time
from auditor.store import Store
with Store(sys.argv[1], read_only=True, wait=120) as store:
    print("open", time.monotonic(), store.value("SELECT count(*) FROM attributions"), flush=True)
    time.sleep(float(sys.argv[2]))
print("closed", time.monotonic(), flush=True)
"""

STATE = (
    "SELECT (SELECT count(*) FROM attributions) AS attribution_rows, n_attributed, status"
    " FROM scans ORDER BY id DESC LIMIT 1"
)


def _env():
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def _start_scan(ws, outputs, stop, pause):
    return subprocess.Popen(
        [sys.executable, "-c", SCANNER, str(ws.root), str(outputs), str(stop), str(pause), str(TOP_K), str(BATCH)],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )


def _rows(ws) -> list[tuple]:
    with Store(ws.db_path, read_only=True) as store:
        return store.rows(
            "SELECT g.sha256, a.rank, a.training_id, round(a.score, 5) FROM attributions a"
            " JOIN generations g ON g.id = a.generation_id ORDER BY 1, 2"
        )


def _reference(template, tmp_path, outputs) -> list[tuple]:
    """The rows of the same scan with nobody reading."""
    shutil.copytree(template.root, tmp_path / "reference", symlinks=True)
    ws = workspace.load(tmp_path / "reference")
    scan.scan(ws, outputs, top_k=TOP_K, batch_size=BATCH)
    return _rows(ws)


def _check_finished(ws, n_images):
    with Store(ws.db_path, read_only=True) as store:
        rows, attributed, status = store.rows(STATE)[0]
        distinct = store.value("SELECT count(DISTINCT generation_id) FROM attributions")
    assert status == "finished"
    assert attributed == distinct == n_images  # no lost batch
    assert rows == TOP_K * attributed


@pytest.fixture
def many_outputs(tmp_path):
    return small_world.build_outputs(tmp_path / "many", n=400, seed=5)


def _distinct_images(outputs) -> int:
    import hashlib

    return len({hashlib.sha256(p.read_bytes()).hexdigest() for p in outputs.rglob("gen_*") if p.suffix != ".txt"})


def test_sql_answers_while_a_scan_runs(indexed_ws, indexed_template, tmp_path, many_outputs):
    stop = tmp_path / "stop"
    scanner = _start_scan(indexed_ws, many_outputs, stop, pause=0.3)
    try:
        assert scanner.stdout.readline().startswith("committed")
        answers = []
        for _ in range(3):
            proc = audit("sql", STATE, "--format", "json", ws=indexed_ws, timeout=120)
            answers.append(json.loads(proc.stdout)[0])
        stop.touch()
        out, _ = scanner.communicate(timeout=300)
    finally:
        stop.touch()
        if scanner.poll() is None:
            scanner.kill()
            scanner.wait()
    assert scanner.returncode == 0, out
    # Every answer came while the scan was running, and saw whole committed batches only.
    assert [a["status"] for a in answers] == ["running"] * 3
    for answer in answers:
        assert answer["attribution_rows"] == TOP_K * answer["n_attributed"] > 0
        assert answer["attribution_rows"] % TOP_K == 0
    assert [a["n_attributed"] for a in answers] == sorted(a["n_attributed"] for a in answers)
    _check_finished(indexed_ws, _distinct_images(many_outputs))
    assert _rows(indexed_ws) == _reference(indexed_template, tmp_path, many_outputs)


def test_a_reader_holding_the_store_makes_the_scan_wait(indexed_ws, indexed_template, tmp_path, many_outputs):
    stop, hold = tmp_path / "stop", 2.0
    scanner = _start_scan(indexed_ws, many_outputs, stop, pause=0.1)
    holder = None
    try:
        assert scanner.stdout.readline().startswith("committed")
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(indexed_ws.db_path), str(hold)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
        )
        opened = holder.stdout.readline().split()
        closed = holder.stdout.readline().split()
        assert opened[0] == "open" and closed[0] == "closed", (opened, closed)
        stop.touch()
        out, _ = scanner.communicate(timeout=300)
    finally:
        stop.touch()
        for proc in (scanner, holder):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
    assert scanner.returncode == 0, out
    assert int(opened[2]) % TOP_K == 0  # the reader saw whole batches
    commits = [float(line.split()[2]) for line in out.splitlines() if line.startswith("committed")]
    # No batch committed while the reader held the store: the scan waited, then went on.
    held_from, held_to = float(opened[1]), float(closed[1])
    assert not [t for t in commits if held_from + 0.5 < t < held_to - 0.05]  # (the commit that let it in prints late)
    assert [t for t in commits if t >= held_to], "the scan went on after the reader closed"
    _check_finished(indexed_ws, _distinct_images(many_outputs))
    assert _rows(indexed_ws) == _reference(indexed_template, tmp_path, many_outputs)


def test_a_reader_gives_up_after_busy_timeout_with_the_busy_message(tmp_path):
    ws = workspace.init(tmp_path / "ws")
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys,time; from auditor.store import Store\n"
            "with Store(sys.argv[1]):\n print('held', flush=True); time.sleep(60)",
            str(ws.db_path),
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        assert writer.stdout.readline().strip() == "held"
        started = time.monotonic()
        with pytest.raises(WorkspaceBusy, match=r"workspace is busy: process \d+ holds .*busy_timeout"):
            Store(ws.db_path, read_only=True, wait=0.5)
        assert 0.5 <= time.monotonic() - started < 10
    finally:
        writer.kill()
        writer.wait()
    with Store(ws.db_path, read_only=True, wait=0) as store:  # free again: no wait
        assert store.value("SELECT count(*) FROM scans") == 0


def test_a_scan_gives_up_after_writer_timeout_and_a_rerun_completes(indexed_ws, outputs_dir):
    indexed_ws.config.store = indexed_ws.config.store.override(writer_timeout=1.0)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(indexed_ws.db_path), "60"], stdout=subprocess.PIPE, text=True, env=_env()
    )
    try:
        assert holder.stdout.readline().startswith("open")
        with pytest.raises(WorkspaceBusy, match=r"workspace is busy: process \d+ holds .*writer_timeout"):
            scan.scan(indexed_ws, outputs_dir, top_k=TOP_K, batch_size=BATCH)
    finally:
        holder.kill()
        holder.wait()
    result = scan.scan(indexed_ws, outputs_dir, top_k=TOP_K, batch_size=BATCH)
    assert result.attributed == _distinct_images(outputs_dir) > 0
