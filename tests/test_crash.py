"""`kill -9` at random points of `audit index`, `audit scan` and `audit confirm`, then rerun: the stores end exactly
where an uninterrupted run ends (0 rows lost, 0 duplicated; LanceDB and DuckDB agree).

Each seed kills a run three times at random points (after a random number of committed batches plus a random
delay, so kills land anywhere in the next batch: decoding, embedding, the Lance write, the DuckDB commit; confirm
logs nothing per commit, so its kills come at random times), reruns it each time, and lets the last rerun
finish. The commands run in processes forked from a "zygote" that imported auditor, torch, open_clip and
diffusers once, so a launch costs milliseconds instead of seconds of imports; each child runs the real CLI
(`auditor.cli.main`) and is killed with SIGKILL.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from auditor import sql, workspace
from auditor.search import IndexSettings, VectorTable

from . import small_world

ZYGOTE = r"""
import json, os, sys, traceback, warnings
warnings.filterwarnings("ignore", message="lancedb fork support")
import auditor.cli, auditor.confirm, auditor.scan, auditor.index, auditor.sql, open_clip, torch  # the slow imports, once
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel  # noqa (confirm's)
from transformers import CLIPTextModel, CLIPTokenizer  # noqa
print("ready", flush=True)
for line in sys.stdin:
    request = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(log, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            os.environ.update(request["env"])
            sys.argv = ["audit", *request["args"]]
            auditor.cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stderr.flush()
            os._exit(code)
    print(pid, flush=True)
    _, status = os.waitpid(pid, 0)
    print(-os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status), flush=True)
"""


class Zygote:
    def __init__(self):
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        assert self.proc.stdout.readline().strip() == "ready"

    def start(self, args, ws_root, log) -> "Child":
        request = {"args": [str(a) for a in args], "env": {"AUDIT_WORKSPACE": str(ws_root)}, "log": str(log)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return Child(self, int(self.proc.stdout.readline()), log)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Child:
    def __init__(self, zygote, pid, log):
        self.zygote, self.pid, self.log = zygote, pid, log

    def alive(self) -> bool:
        try:
            os.kill(self.pid, 0)
            return True
        except ProcessLookupError:
            return False

    def logged(self, marker: str) -> int:
        return self.log.read_text(errors="replace").count(marker) if self.log.exists() else 0

    def wait(self) -> int:
        return int(self.zygote.proc.stdout.readline())

    def kill_after(self, marker: str, count: int, delay: float, timeout: float = 120) -> int:
        """SIGKILL once `marker` was logged `count` times and `delay` seconds passed; returns the exit status."""
        deadline = time.monotonic() + timeout
        while self.alive() and self.logged(marker) < count:
            assert time.monotonic() < deadline, f"no {count}× {marker!r} within {timeout}s:\n{self.log.read_text()}"
            time.sleep(0.005)
        time.sleep(delay)
        if self.alive():
            os.kill(self.pid, signal.SIGKILL)
        return self.wait()

    def finish(self) -> int:
        status = self.wait()
        assert status == 0, self.log.read_text()
        return status


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


@pytest.fixture(scope="module")
def many_outputs(tmp_path_factory):
    return small_world.build_outputs(tmp_path_factory.mktemp("many") / "outputs", n=160, seed=7)


def _copy(template, target):
    shutil.copytree(template, target, symlinks=True)
    return target


def _attributions(ws):
    return sql.query(
        ws,
        "select g.sha256, a.rank, a.training_id, a.score, a.share "
        "from attributions a join generations g on g.id = a.generation_id order by 1, 2",
    )


@pytest.fixture(scope="module")
def scan_reference(zygote, indexed_template, many_outputs, tmp_path_factory):
    root = _copy(indexed_template.root, tmp_path_factory.mktemp("scanref") / "ws")
    zygote.start(["-v", "scan", many_outputs, "--top-k", 5, "--batch-size", 4], root, root / "log").finish()
    return workspace.load(root)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_scan_killed_at_random_points_then_rerun_matches_uninterrupted(
    zygote, scan_reference, indexed_template, many_outputs, tmp_path, seed
):
    rng = np.random.default_rng(seed)
    root = _copy(indexed_template.root, tmp_path / "crashed")
    args = ["-v", "scan", many_outputs, "--top-k", 5, "--batch-size", 4]
    progress = []
    for kill in range(3):  # 40 batches of 4; at most 3 × 7 of them commit before the kills
        child = zygote.start(args, root, tmp_path / f"kill{kill}.log")
        assert (
            child.kill_after("committed batch", int(rng.integers(1, 8)), float(rng.uniform(0, 0.02))) == -signal.SIGKILL
        )
        progress.append(sql.query(workspace.load(root), "select count(*) n from generations")["n"].item())
    assert 0 < progress[0] <= progress[1] <= progress[2] < 160  # really interrupted, mid-way, three times
    zygote.start(args, root, tmp_path / "rerun.log").finish()

    crashed = workspace.load(root)
    expected, got = _attributions(scan_reference), _attributions(crashed)
    assert got.height == expected.height == 160 * 5
    # Same rows; scores may differ in the last float bits because batches were composed differently.
    assert got.select("sha256", "rank", "training_id").equals(expected.select("sha256", "rank", "training_id"))
    assert (got["score"] - expected["score"]).abs().max() < 1e-5
    assert (got["share"] - expected["share"]).abs().max() < 1e-5
    counts = sql.query(crashed, "select count(*) n, count(distinct sha256) d from generations").row(0)
    assert counts == (160, 160)
    files = sql.query(crashed, "select count(*) n, count(distinct path) d from generation_files").row(0)
    assert files == (160, 160)  # one row per file, committed with its generation
    statuses = sql.query(crashed, "select status from scans order by id")["status"].to_list()
    assert statuses == ["interrupted"] * 3 + ["finished"]
    totals = sql.query(crashed, "select sum(n_attributed) a, sum(n_errors) e from scans").row(0)
    assert totals == (160, 0)  # every committed batch's counters match its rows


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_index_killed_at_random_points_keeps_lance_and_duckdb_in_step(
    zygote, ws, indexed_template, training_dir, tmp_path, seed
):
    rng = np.random.default_rng(100 + seed)
    args = ["-v", "index", training_dir, "--batch-size", 4]
    for kill in range(3):  # 30 batches of 4 (a few ms each); at most 3 × 7 of them commit before the kills
        child = zygote.start(args, ws.root, tmp_path / f"kill{kill}.log")
        assert (
            child.kill_after("indexed batch", int(rng.integers(1, 8)), float(rng.uniform(0, 0.01))) == -signal.SIGKILL
        )
    zygote.start(args, ws.root, tmp_path / "rerun.log").finish()

    crashed = workspace.load(ws.root)
    query = "select id, sha256, contributor_id, caption, caption_source, width, height from training_images order by id"
    assert sql.query(crashed, query).equals(
        sql.query(indexed_template, query)
    )  # same ids for the same content: 0 lost, 0 extra
    encoder_id, recorded = sql.query(crashed, "select encoder_id, rows from vector_tables").row(0)
    table = VectorTable(crashed.lancedb_uri, encoder_id, 64, IndexSettings())
    ids = table.ids()
    assert recorded == table.count() == len(ids) == len(set(ids.tolist())) == 120
    assert set(ids.tolist()) == set(range(1, 121))
    reference = VectorTable(indexed_template.lancedb_uri, encoder_id, 64, IndexSettings())
    assert np.abs(table.vectors(np.arange(1, 121)) - reference.vectors(np.arange(1, 121))).max() < 1e-5


def _teacher_rows(ws):
    return sql.query(
        ws,
        "select s.generation_id, s.training_id, s.teacher_rank, s.fast_rank, s.is_control, s.influence"
        " from teacher_scores s order by 1, 2",
    )


def test_confirm_killed_at_random_points_then_rerun_matches_uninterrupted(zygote, scanned_ws, tmp_path):
    # The cheapest teacher that still runs every stage (Fisher, caches, unlearning, scoring, controls, agreement).
    scanned_ws.config.confirm = scanned_ws.config.confirm.override(
        candidates=6, controls=2, draws=2, timesteps=2, fisher_samples=4, reference_samples=2, k=3
    )
    scanned_ws.save()
    reference_root = _copy(scanned_ws.root, tmp_path / "reference")
    n = 24  # every generation of the small world: the runs last long enough for kills to land mid-way
    args = ["confirm", "--where", f"g.id <= {n}"]
    started = time.monotonic()
    zygote.start(args, reference_root, tmp_path / "reference.log").finish()
    duration = time.monotonic() - started
    reference = workspace.load(reference_root)

    rng = np.random.default_rng(7)
    killed, done = [], 0
    for kill in range(3):  # confirm commits per generation and logs nothing per commit: kill at random moments
        child = zygote.start(args, scanned_ws.root, tmp_path / f"kill{kill}.log")
        time.sleep(float(rng.uniform(0.25, 0.6)) * duration * max(0.4, (n - done) / n))  # scaled to the work left
        if child.alive():
            os.kill(child.pid, signal.SIGKILL)
        status = child.wait()
        done = sql.query(workspace.load(scanned_ws.root), "select count(*) n from confirmations")["n"].item()
        if status == -signal.SIGKILL:
            killed.append(done)
    print(f"confirm: reference {duration:.1f} s; generations confirmed when each kill landed: {killed}")
    assert any(0 < c < n for c in killed)  # really interrupted mid-way
    zygote.start(args, scanned_ws.root, tmp_path / "rerun.log").finish()

    crashed = workspace.load(scanned_ws.root)
    confirmed = "select generation_id, k from confirmations order by 1"
    assert sql.query(crashed, confirmed).equals(
        sql.query(reference, confirmed)
    )  # each generation once: 0 lost, 0 duplicated
    assert sql.query(crashed, confirmed).height == n
    expected, got = _teacher_rows(reference), _teacher_rows(crashed)
    assert got.height == expected.height == n * 8  # 6 candidates + 2 controls each
    assert got.select("generation_id", "training_id", "fast_rank", "is_control").equals(
        expected.select("generation_id", "training_id", "fast_rank", "is_control")
    )
    assert np.allclose(got["influence"].to_numpy(), expected["influence"].to_numpy(), rtol=1e-3, atol=1e-9)
    runs = sql.query(crashed, "select status, n_generations from confirm_runs order by id")
    assert runs["n_generations"].sum() == n  # every run's counter matches the rows it committed
    statuses = runs["status"].to_list()
    assert set(statuses[:-1]) <= {"interrupted"}
    # The last run finished; or it was killed after its last commit, and the rerun had nothing left to do.
    assert statuses[-1] in ("finished", "running")
