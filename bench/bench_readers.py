"""Readers during a scan: how long `audit sql` waits while a 10,000-image scan runs, and what it costs the scan.

    python bench/bench_readers.py [--quick] [--images 10000] [--batch-size 64] [--workdir DIR]

Images, encoder and training set as bench_scan.py (32x32 digit PNGs with A1111 prompts; the example world's
encoder and its 1,617 training images). Four scans of the same images (top-50), each into a fresh copy of one
indexed workspace and in its own process: without a reader; with a reader; with the same reader loop on another
workspace (its processes take the same CPU but never meet the scan's lock); without a reader again. The machine
is shared: the figures are the with-reader throughput over the mean of the two without, and over the
other-workspace run (what the lock itself costs).

The reader runs `audit -v sql "SELECT ..."` in a loop, a new process each time as an operator's would be, and
every answer is checked: while the scan is running, its attribution rows must be top_k x its n_attributed
(whole batches only). A reader's wait is what the store logs at -v ("opened ... after waiting X s", from its
first try to the open; 0 when the first try got in); each call's wall time (Python start-up, imports, query)
is recorded beside it. The scan reports how often it let readers in and how long its store opens took.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common  # noqa: F401  (sys.path, HF offline)
from _common import WORLD, percentile, report

TOP_K = 50
QUERY = (
    "SELECT (SELECT count(*) FROM attributions) AS attribution_rows,"
    " (SELECT max(n_attributed) FROM scans WHERE status = 'running') AS attributed,"
    " (SELECT count(*) FROM scans WHERE status = 'running') AS running"
)
WAITED = re.compile(r"after waiting ([0-9.]+) s")


def child(args) -> None:
    """One scan; prints one JSON line (with the store's yields and reopen seconds)."""
    from auditor import scan, workspace

    stores = []
    store_for = scan.ScanLedger.store_for

    def spy(ws):
        stores.append(store_for(ws))
        return stores[-1]

    scan.ScanLedger.store_for = staticmethod(spy)
    ws = workspace.load(args.ws)
    print("started", flush=True)
    started = time.perf_counter()
    result = scan.scan(ws, args.images_dir, batch_size=args.batch_size, top_k=TOP_K, device="cpu")
    wall = time.perf_counter() - started
    store = stores[0]
    print(
        json.dumps(
            {
                "attributed": result.attributed,
                "scan_seconds": result.seconds,
                "wall_seconds": wall,
                "images_per_s": result.images_per_second,
                "yields": store.yields,
                "store_open_seconds": store.waited,
            }
        ),
        flush=True,
    )


def reader_loop(ws_root: Path, stop: threading.Event, calls: list[dict]) -> None:
    env = {**os.environ, "AUDIT_WORKSPACE": str(ws_root), "HF_HUB_OFFLINE": "1"}
    while not stop.is_set():
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "auditor", "-v", "sql", QUERY, "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            calls.append({"ok": False, "wall": wall, "error": proc.stderr.strip()[-300:]})
            continue
        answer = json.loads(proc.stdout)[0]
        waited = WAITED.search(proc.stderr)
        calls.append({"ok": True, "wall": wall, "wait": float(waited[1]) if waited else 0.0, **answer})


def run_scan(ws_root: Path, images: Path, batch_size: int, reader: Path | None) -> dict:
    """One scan in its own process; with `reader`, the `audit sql` loop runs on that workspace meanwhile."""
    proc = subprocess.Popen(
        [sys.executable, __file__, "--child", "--ws", str(ws_root), "--images-dir", str(images)]
        + ["--batch-size", str(batch_size)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "started"
    stop, calls, thread = threading.Event(), [], None
    if reader:
        thread = threading.Thread(target=reader_loop, args=(reader, stop, calls))
        thread.start()
    out, _ = proc.communicate()
    stop.set()
    if thread:
        thread.join()
    if proc.returncode != 0:
        raise SystemExit(f"scan failed ({proc.returncode})")
    run = json.loads(out.strip().splitlines()[-1])
    run["calls"] = calls
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1,000 images")
    parser.add_argument("--images", type=int, default=None, help="images scanned (default 10,000)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--ws", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", dest="images_dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)

    from bench_scan import build_images

    from auditor import workspace
    from auditor.index import index_training

    n = args.images or (1000 if args.quick else 10_000)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_readers_"))
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    if len(list(images.rglob("*.png"))) != n:
        shutil.rmtree(images, ignore_errors=True)
        build_images(images, n, 32)
    template = work / "indexed"
    if not template.exists():
        ws = workspace.init(template, encoder=WORLD / "encoder")
        index_training(ws, WORLD / "training", device="cpu")

    runs = {}
    for name, reader in (
        ("without reader (1)", None),
        ("with reader", "same"),
        ("reader on another workspace", "other"),
        ("without reader (2)", None),
    ):
        ws_root = work / "ws"
        shutil.rmtree(ws_root, ignore_errors=True)
        shutil.copytree(template, ws_root, symlinks=True)
        runs[name] = run_scan(ws_root, images, args.batch_size, {"same": ws_root, "other": template}.get(reader))
        print(f"{name}: {runs[name]['images_per_s']:.1f} img/s", flush=True)

    with_reader = runs["with reader"]
    calls = with_reader["calls"]
    failed = [c for c in calls if not c["ok"]]
    during = [c for c in calls if c["ok"] and c["running"]]
    inconsistent = [c for c in during if c["attribution_rows"] != TOP_K * c["attributed"]]
    waits = [c["wait"] for c in during]
    base = statistics.mean(runs[k]["images_per_s"] for k in ("without reader (1)", "without reader (2)"))
    summary = {
        "images": n,
        "batch_size": args.batch_size,
        "top_k": TOP_K,
        "reader_calls_during_scan": len(during),
        "reader_calls_failed": len(failed),
        "inconsistent_answers": len(inconsistent),
        "reader_wait_max_s": max(waits) if waits else None,
        "reader_wait_median_s": statistics.median(waits) if waits else None,
        "reader_wait_p90_s": percentile(waits, 90) if waits else None,
        "reader_call_wall_median_s": statistics.median(c["wall"] for c in during) if during else None,
        "reader_call_wall_max_s": max(c["wall"] for c in during) if during else None,
        "throughput_ratio_with_reader": with_reader["images_per_s"] / base,
        # The same loop on another workspace costs the scan the same CPU but never meets its lock.
        "throughput_ratio_with_reader_vs_cpu_only_reader": with_reader["images_per_s"]
        / runs["reader on another workspace"]["images_per_s"],
        "scan_yields": with_reader["yields"],
        "scan_store_open_seconds": with_reader["store_open_seconds"],
    }
    rows = [
        [
            name,
            r["attributed"],
            round(r["images_per_s"], 1),
            round(r["scan_seconds"], 1),
            r["yields"],
            round(r["store_open_seconds"], 2),
        ]
        for name, r in runs.items()
    ]
    report(
        "bench_readers",
        f"scan with and without an `audit sql` loop ({n} images, batch {args.batch_size}, top-{TOP_K})",
        ["scan", "attributed", "img/s", "seconds", "times it let readers in", "store open s"],
        rows,
        {"summary": summary, "runs": runs},
    )
    print(json.dumps(summary, indent=2))
    if failed or inconsistent:
        raise SystemExit(f"{len(failed)} reader calls failed, {len(inconsistent)} answers inconsistent")


if __name__ == "__main__":
    main()
