"""Seconds per query of the fast path (`audit scan`) vs the teacher (`audit confirm`) on the example world.

    python bench/bench_teacher.py [--quick] [--top N]     # --quick: confirm 1 generation (default 3)

Needs examples/digits_world/{training,outputs,encoder,model} (built by examples/digits_world/build.py).
A fresh workspace indexes the world's training set, scans its outputs (timed: seconds per attributed
generation, steady state and wall including model load), then confirms the top-N generations with the
workspace's default teacher settings (timed: `confirmations.seconds`, the per-generation time, and the
run's wall time per generation including model load, Fisher and cache fills). The figure is the
speed-up teacher / fast (target >= 10^4).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
from _common import WORLD, percentile, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--top", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    missing = [
        p
        for p in ("training/contributors.csv", "outputs", "encoder/encoder.json", "model/model_index.json")
        if not (WORLD / p).exists()
    ]
    if missing:
        raise SystemExit(
            f"the example world is not built ({', '.join(missing)} missing): run examples/digits_world/build.py first"
        )

    from auditor import sql, workspace
    from auditor.confirm import confirm
    from auditor.index import index_training
    from auditor.scan import scan

    top = args.top or (1 if args.quick else 3)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_teacher_"))
    ws = workspace.init(work / "ws", encoder=WORLD / "encoder", model=WORLD / "model")
    index_training(ws, WORLD / "training", device=args.device)
    t0 = time.perf_counter()
    scanned = scan(ws, WORLD / "outputs", device=args.device)
    scan_wall = time.perf_counter() - t0
    fast = scanned.seconds / scanned.attributed
    fast_wall = scan_wall / scanned.attributed

    t0 = time.perf_counter()
    confirmed = confirm(ws, top=top, device=args.device)
    confirm_wall = time.perf_counter() - t0
    per_generation = sql.query(ws, f"select seconds from confirmations where run_id = {confirmed.run_id}")[
        "seconds"
    ].to_list()
    teacher = percentile(per_generation, 50)
    teacher_wall = confirm_wall / max(1, confirmed.generations)
    data = {
        "scan": {
            "generations": scanned.attributed,
            "seconds": scanned.seconds,
            "wall_seconds": scan_wall,
            "seconds_per_generation": fast,
            "wall_seconds_per_generation": fast_wall,
        },
        "confirm": {
            "generations": confirmed.generations,
            "per_generation_seconds": per_generation,
            "wall_seconds": confirm_wall,
            "median_seconds_per_generation": teacher,
            "wall_seconds_per_generation": teacher_wall,
            "settings": ws.config.confirm,
        },
        "speedup": teacher / fast,
        "speedup_wall": teacher_wall / fast_wall,
    }
    report(
        "bench_teacher",
        "fast path vs teacher, seconds per generation (example world)",
        ["path", "generations", "s/generation", "s/generation (wall, incl. load)"],
        [
            ["scan (fast)", scanned.attributed, round(fast, 5), round(fast_wall, 5)],
            ["confirm (teacher)", confirmed.generations, round(teacher, 2), round(teacher_wall, 2)],
            ["speed-up", "", round(teacher / fast), round(teacher_wall / fast_wall)],
        ],
        data,
    )


if __name__ == "__main__":
    main()
