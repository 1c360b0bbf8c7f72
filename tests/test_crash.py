"""A scan or index killed with SIGKILL mid-way, then rerun, ends exactly where an uninterrupted run does."""

import os
import shutil
import signal
import subprocess
import sys

import pytest

from auditor import sql, workspace
from auditor.search import IndexSettings, VectorTable

from . import small_world


def _start(args, ws_root):
    env = {**os.environ, "AUDIT_WORKSPACE": str(ws_root), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen([sys.executable, "-m", "auditor", "-v", *map(str, args)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _kill_after(proc, marker: str, count: int) -> int:
    """SIGKILL the process once it has logged `marker` `count` times; returns how many it logged."""
    seen = 0
    for line in proc.stderr:
        if marker in line:
            seen += 1
            if seen >= count:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    return seen


def _attributions(ws):
    return sql.query(
        ws,
        "select g.sha256, a.rank, a.training_id, a.score, a.share "
        "from attributions a join generations g on g.id = a.generation_id order by 1, 2",
    )


@pytest.fixture(scope="module")
def many_outputs(tmp_path_factory):
    return small_world.build_outputs(tmp_path_factory.mktemp("many") / "outputs", n=160, seed=7)


@pytest.mark.parametrize("kill_after_batches", [1, 6])
def test_scan_killed_midway_then_rerun_matches_uninterrupted(indexed_template, tmp_path, many_outputs, kill_after_batches):
    reference_root, crashed_root = tmp_path / "reference", tmp_path / "crashed"
    shutil.copytree(indexed_template.root, reference_root, symlinks=True)
    shutil.copytree(indexed_template.root, crashed_root, symlinks=True)
    reference = _start(["scan", many_outputs, "--top-k", 5, "--batch-size", 4], reference_root)
    reference.communicate()
    assert reference.returncode == 0

    proc = _start(["scan", many_outputs, "--top-k", 5, "--batch-size", 4], crashed_root)
    assert _kill_after(proc, "committed batch", kill_after_batches) == kill_after_batches
    assert proc.returncode == -signal.SIGKILL
    crashed = workspace.load(crashed_root)
    partial = sql.query(crashed, "select count(*) from generations").item()
    assert 0 < partial < 160  # really interrupted mid-way

    rerun = _start(["scan", many_outputs, "--top-k", 5, "--batch-size", 4], crashed_root)
    rerun.communicate()
    assert rerun.returncode == 0
    expected, got = _attributions(workspace.load(reference_root)), _attributions(crashed)
    assert got.height == expected.height == 160 * 5
    # Same rows; scores may differ in the last float bits because batches were composed differently.
    assert got.select("sha256", "rank", "training_id").equals(expected.select("sha256", "rank", "training_id"))
    assert (got["score"] - expected["score"]).abs().max() < 1e-5
    assert (got["share"] - expected["share"]).abs().max() < 1e-5
    statuses = sql.query(crashed, "select status from scans order by id")["status"].to_list()
    assert statuses == ["interrupted", "finished"]


def test_index_killed_midway_then_rerun_keeps_lance_and_duckdb_in_step(ws, tmp_path, training_dir):
    proc = _start(["index", training_dir, "--batch-size", 8], ws.root)
    assert _kill_after(proc, "indexed batch", 3) == 3
    rerun = _start(["index", training_dir, "--batch-size", 8], ws.root)
    rerun.communicate()
    assert rerun.returncode == 0
    ws = workspace.load(ws.root)
    rows = sql.query(ws, "select id, (select count(*) from training_images) n from encoders").row(0)
    table = VectorTable(ws.lancedb_uri, rows[0], 64, IndexSettings())
    ids = table.ids()
    assert rows[1] == 120 == len(ids) == len(set(ids.tolist()))
    db_ids = set(sql.query(ws, "select id from training_images")["id"].to_list())
    assert db_ids == set(ids.tolist())
