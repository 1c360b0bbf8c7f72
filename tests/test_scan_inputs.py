"""Scan-side input handling (issue #24): every file's prompt kept, unsupported files counted, deep trees, FIFOs,
disk-full and permission messages, and scans stopped by Ctrl-C or SIGTERM marked interrupted."""

import errno
import io
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import duckdb
import numpy as np
import pytest
from PIL import Image

from auditor import ingest, workspace
from auditor.errors import storage_message
from auditor.scan import scan
from auditor.store import Store

from .helpers import sql_value, store_made_before


def _png(seed: int, size: int = 16) -> bytes:
    """Distinct content per seed."""
    image = Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def _rows(ws, query: str) -> list[tuple]:
    with Store(ws.db_path, read_only=True) as db:
        return db.rows(query)


def test_every_file_keeps_its_prompt_and_a_rerun_adds_no_rows(indexed_ws, tmp_path):
    folder = tmp_path / "outputs"
    folder.mkdir()
    twin = _png(1)
    for name, prompt in (("a", "the first prompt"), ("b", "the second prompt")):
        (folder / f"{name}.png").write_bytes(twin)
        (folder / f"{name}.txt").write_text(prompt)
    (folder / "c.png").write_bytes(_png(2))
    for name in ("clip.mp4", "photo.heic", "noext"):  # unsupported: counted and listed
        (folder / name).write_bytes(b"\x00" * 16)
    for name in ("c.txt", "orphan.json", "notes.md", ".DS_Store", "Thumbs.db"):  # text and litter: not counted
        (folder / name).write_bytes(b"x")
    first = scan(indexed_ws, folder, top_k=3)
    assert (first.seen, first.attributed, first.skipped, first.errors, first.unsupported) == (3, 2, 1, 0, 3)
    query = "select path, prompt, prompt_source, first_scan_id, last_scan_id from generation_files order by path"
    files = [(os.path.basename(p), prompt, source, a, b) for p, prompt, source, a, b in _rows(indexed_ws, query)]
    assert files == [
        ("a.png", "the first prompt", "sidecar_txt", 1, 1),
        ("b.png", "the second prompt", "sidecar_txt", 1, 1),
        ("c.png", "x", "sidecar_txt", 1, 1),
    ]
    assert sql_value(indexed_ws, "select count(*) from generations") == 2
    unsupported = _rows(indexed_ws, "select path, code, reason from scan_errors order by path")
    assert [(os.path.basename(p), code) for p, code, _ in unsupported] == [
        ("clip.mp4", "unsupported"),
        ("noext", "unsupported"),
        ("photo.heic", "unsupported"),
    ]
    assert "(.mp4 files)" in unsupported[0][2]
    assert _rows(indexed_ws, "select n_errors, n_unsupported from scans") == [(0, 3)]

    second = scan(indexed_ws, folder, top_k=3)  # nothing new: no row added, each file's last scan moves
    assert (second.attributed, second.skipped) == (0, 3)
    again = [(os.path.basename(p), prompt, source, a, b) for p, prompt, source, a, b in _rows(indexed_ws, query)]
    assert again == [(name, prompt, source, 1, 2) for name, prompt, source, _, _ in files]

    (folder / "d.png").write_bytes(twin)  # known content under a new name: read for its own prompt, not embedded
    (folder / "d.txt").write_text("the third prompt")
    (folder / "c.png").write_bytes(_png(3))  # a file replaced by other bytes: a new row, the old one stays
    third = scan(indexed_ws, folder, top_k=3)
    assert (third.attributed, third.skipped) == (1, 3)
    rows = [(os.path.basename(p), prompt, a, b) for p, prompt, _, a, b in _rows(indexed_ws, query)]
    assert rows == [
        ("a.png", "the first prompt", 1, 3),
        ("b.png", "the second prompt", 1, 3),
        ("c.png", "x", 1, 2),
        ("c.png", "x", 3, 3),
        ("d.png", "the third prompt", 3, 3),
    ]
    assert sql_value(indexed_ws, "select count(distinct generation_id) from generation_files") == 3


def test_migration_006_backfills_generation_files(tmp_path):
    path = tmp_path / "audit.duckdb"
    with store_made_before(path, 6) as old:
        old.con.execute(
            "INSERT INTO scans (id, started_at, root, encoder_id, index_version, top_k, device, status)"
            " VALUES (3, now(), '/out', 'e', 1, 5, 'cpu', 'finished')"
        )
    with Store(path) as new:
        assert new.rows(
            "select generation_id, path, prompt, prompt_source, first_scan_id, last_scan_id from generation_files"
        ) == [(7, "/out/x.png", "a fox", "a1111", 3, 3)]
        assert new.rows("select n_unsupported from scans") == [(0,)]


@pytest.fixture
def deep_tmp(tmp_path):
    """tmp_path, removed here: pytest's own cleanup (shutil.rmtree) recurses per level and fails on a deep tree."""
    yield tmp_path
    subprocess.run(["rm", "-rf", str(tmp_path)], check=True)


def test_walk_is_iterative_sorted_and_does_not_follow_folder_links(deep_tmp):
    tmp_path = deep_tmp
    deep = str(tmp_path)
    for _ in range(1100):  # deeper than the recursion limit
        deep = os.path.join(deep, "d")
        os.mkdir(deep)
    open(os.path.join(deep, "leaf.png"), "wb").close()
    (tmp_path / "b.png").touch()
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "z.jpg").touch()
    (tmp_path / "a.gif").touch()
    (tmp_path / "loop").symlink_to(tmp_path)  # never followed, not counted
    (tmp_path / "linked.png").symlink_to(tmp_path / "a")  # a folder link named like an image: read (and reported)
    (tmp_path / "x.mp4").touch()
    found = ingest.walk(tmp_path)
    assert found.images == sorted(found.images, key=os.fsencode)
    assert [os.path.relpath(p, tmp_path) for p in found.images] == [
        "a.gif",  # by bytes: "." sorts before "/"
        "a/z.jpg",
        "b.png",
        os.path.join(*["d"] * 1100, "leaf.png"),
        "linked.png",
    ]
    assert [os.path.basename(p) for p, _ in found.unsupported] == ["x.mp4"]
    assert ingest.discover(tmp_path) == found.images


def _read_within(path, seconds=5.0):
    """read_bytes in a thread: a FIFO that was opened would block it forever, failing the test instead of hanging."""
    result = {}

    def run():
        try:
            ingest.read_bytes(str(path), ingest.Limits())
        except ingest.IngestError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"read_bytes blocked on {path}"
    return result["error"]


def test_fifos_sockets_and_devices_are_never_opened(tmp_path):
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "null.png").symlink_to("/dev/null")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind(str(tmp_path / "sock.png"))
    (tmp_path / "dir.png").symlink_to(tmp_path)
    reasons = {name: _read_within(tmp_path / name) for name in ("fifo.png", "null.png", "sock.png", "dir.png")}
    assert {name: error.code for name, error in reasons.items()} == dict.fromkeys(reasons, "not_a_file")
    assert reasons["fifo.png"].reason.startswith("a FIFO (named pipe)")
    assert reasons["null.png"].reason.startswith("a character device")
    assert reasons["sock.png"].reason.startswith("a socket")
    assert reasons["dir.png"].reason.startswith("a directory")


# The texts DuckDB and Lance produce (duckdb/duckdb#14501 and spiceai/spiceai#13985 for DuckDB's ENOSPC, lance#5218
# and lancedb#1630 for Lance's io errors, which end in a path of the Rust sources).
DUCKDB_COMMIT = (
    'TransactionContext Error: Failed to commit: Failed to create checkpoint because of error: Could not write file "{db}"'
    ": No space left on device"
)
DUCKDB_WAL = 'IO Error: Could not write file "{db}.wal": No space left on device'
LANCE = (
    "LanceError(IO): Generic LocalFileSystem error: Unable to create dir {lance}/_transactions: No space left on device"
    " (os error 28), /home/runner/work/lance/lance/rust/lance/src/io/commit.rs:98:5"
)
LANCE_PERMISSION = (
    "LanceError(IO): Generic LocalFileSystem error: Unable to copy file from {lance}/_versions/.tmp_1.manifest to"
    " {lance}/_versions/1.manifest: Operation not permitted (os error 1),"
    " /home/runner/work/lance/lance/rust/lance-table/src/io/commit.rs:693:54"
)


def test_storage_failures_become_one_actionable_line():
    db, lance = "/ws/.audit/audit.duckdb", "/ws/.audit/lancedb/training_x.lance"
    places = ["/ws/.audit"]
    commit = storage_message(duckdb.TransactionException(DUCKDB_COMMIT.format(db=db)), places)
    assert commit == (
        f"no space left on the disk holding {db} (No space left on device); free some space and run the command"
        " again: committed batches are kept"
    )
    assert storage_message(duckdb.IOException(DUCKDB_WAL.format(db=db)), places).startswith(
        f"no space left on the disk holding {db}.wal "
    )
    lance_full = storage_message(OSError(LANCE.format(lance=lance)), places)
    assert lance_full.startswith("no space left on the disk holding /ws/.audit (No space left on device)")
    assert "rust" not in lance_full
    denied = storage_message(OSError(LANCE_PERMISSION.format(lance=lance)), places)
    assert denied.startswith("cannot write to /ws/.audit (Operation not permitted); make it writable")
    written = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/ws/.audit/lock")
    assert storage_message(written, places).startswith("no space left on the disk holding /ws/.audit/lock ")
    read_only = PermissionError(errno.EROFS, os.strerror(errno.EROFS), "/ws/.audit/audit.toml")
    assert storage_message(read_only, places).startswith("cannot write to /ws/.audit/audit.toml (Read-only")
    try:  # the cause counts too
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise RuntimeError("writing failed") from exc
    except RuntimeError as exc:
        assert storage_message(exc, places).startswith("no space left on the disk holding /ws/.audit ")
    assert storage_message(ValueError("bad value"), places) is None


def test_disk_full_during_a_scan_is_one_line_and_marks_it_interrupted(indexed_ws, outputs_dir, monkeypatch, capsys):
    from auditor import cli

    db = str(indexed_ws.db_path)

    def full(self, table, data):
        raise duckdb.TransactionException(DUCKDB_COMMIT.format(db=db))

    monkeypatch.setattr(Store, "insert_arrow", full)
    monkeypatch.setattr(sys, "argv", ["audit", "--workspace", str(indexed_ws.root), "scan", str(outputs_dir)])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 1
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: no space left on the disk holding {db} (No space left on device); free some space" in err
    assert "unexpected" not in err and "Traceback" not in err
    monkeypatch.undo()
    assert _rows(indexed_ws, "select status, finished_at is not null, n_attributed from scans") == [
        ("interrupted", True, 0)
    ]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl_c", "sigterm"])
def test_a_stopped_scan_is_marked_interrupted(indexed_ws, tmp_path, signum):
    folder = tmp_path / "outputs"
    folder.mkdir()
    for n in range(1500):  # one image per batch: a scan long enough to stop in the middle
        (folder / f"{n:04d}.png").write_bytes(_png(n, size=8))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "AUDIT_WORKSPACE": str(indexed_ws.root), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "auditor", "-v", "scan", str(folder), "--batch-size", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 120
    for line in proc.stderr:  # the first committed batch
        if "committed batch" in line or time.monotonic() > deadline:
            break
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "scan interrupted" in err and "Traceback" not in err
    status, finished, attributed = _rows(indexed_ws, "select status, finished_at is not null, n_attributed from scans")[
        0
    ]
    assert (status, finished) == ("interrupted", True)
    assert 0 < attributed < 1500
    assert sql_value(indexed_ws, "select count(distinct generation_id) from attributions") == attributed
    assert sql_value(indexed_ws, "select count(*) from generation_files") == attributed
    ws = workspace.load(indexed_ws.root)  # the next scan completes the rest
    result = scan(ws, folder, top_k=3)
    assert (result.attributed + attributed, result.skipped) == (1500, attributed)


def test_prompts_are_cut_at_the_workspace_limit_and_the_cut_is_noted(indexed_ws, tmp_path):
    long_prompt = "".join(f"word{n} " for n in range(20_000)).strip()  # 188,889 characters
    outputs = tmp_path / "outputs"
    outputs.mkdir()
    (outputs / "long.png").write_bytes(_png(1))
    (outputs / "long.txt").write_text(long_prompt)
    scan(indexed_ws, outputs, top_k=3)
    prompt, warnings = _rows(indexed_ws, "select prompt, metadata_warnings from generations")[0]
    assert prompt == long_prompt[:65536]
    assert warnings == [
        f"prompt cut at 65536 characters (was {len(long_prompt)})",
        f"raw metadata cut at 65536 characters (was {len(long_prompt)})",
    ]

    indexed_ws.config.scan.max_text_chars = 200_000
    (outputs / "long_too.png").write_bytes(_png(2))
    (outputs / "long_too.txt").write_text(long_prompt)
    scan(indexed_ws, outputs, top_k=3)
    prompt, warnings = _rows(
        indexed_ws, "select prompt, metadata_warnings from generations where path like '%too.png'"
    )[0]
    assert prompt == long_prompt and warnings == [f"raw metadata cut at 65536 characters (was {len(long_prompt)})"]
