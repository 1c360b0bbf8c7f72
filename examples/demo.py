"""`make demo`: the whole product on the bundled example world, with the commands a user would type.

    python examples/demo.py [--workdir build/demo] [--limit N] [--confirm N]

Creates a fresh workspace, indexes the world's training set, scans its generated
images, confirms a few attributions with the unlearning teacher, prints the top
attributions of a few generations with their contributors, and writes the
compensation report.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

WORLD = Path(__file__).resolve().parent / "digits_world"


def run(*args: str, workspace: Path | None = None) -> str:
    print(f"$ audit {' '.join(shlex.quote(str(a)) for a in args)}", flush=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    if workspace is not None:
        env["AUDIT_WORKSPACE"] = str(workspace)
    proc = subprocess.run([sys.executable, "-m", "auditor", *map(str, args)], env=env, text=True, capture_output=True)
    sys.stdout.write(proc.stdout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(proc.returncode)
    return proc.stdout


def encoder_bundle() -> Path:
    """The distilled encoder when the world ships one, else the untuned backbone."""
    distilled = WORLD / "encoder-distilled"
    return distilled if (distilled / "encoder.json").is_file() else WORLD / "encoder"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("build/demo"))
    parser.add_argument("--limit", type=int, default=0, help="scan only the first N outputs (a reduced run)")
    parser.add_argument("--confirm", type=int, default=2, help="generations to confirm with the teacher (0: skip)")
    args = parser.parse_args()
    started = time.perf_counter()
    for part in ("training", "outputs", "model", "encoder"):
        if not (WORLD / part).exists():
            raise SystemExit(
                f"error: {WORLD / part} is missing; rebuild the example world with `python {WORLD / 'build.py'}`"
            )
    workdir = args.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    outputs = WORLD / "outputs"
    if args.limit:
        outputs = workdir / "outputs"
        outputs.mkdir()
        for png in sorted((WORLD / "outputs").glob("*.png"))[: args.limit]:
            shutil.copy2(png, outputs / png.name)
            sidecar = png.with_suffix(".txt")
            if sidecar.exists():
                shutil.copy2(sidecar, outputs / sidecar.name)
    ws = workdir / "workspace"

    run("init", ws, "--encoder", encoder_bundle(), "--model", WORLD / "model")
    # The world's outputs name their model as a generator UI would; a real checkpoint file would be hashed instead
    # (`audit model add-checkpoint`).
    run("model", "alias", "--name", "digits-world", workspace=ws)
    run("index", WORLD / "training", workspace=ws)
    run("scan", outputs, "--top-k", 20, workspace=ws)
    if args.confirm:
        # Fewer candidates and timesteps than the defaults keep the demo within a few minutes on 2 cores.
        run("confirm", "--top", args.confirm, "--candidates", 100, "--controls", 20, "--timesteps", 10, workspace=ws)
    print("\nTop attributions of a few generations:")
    run(
        "sql",
        "SELECT g.id AS gen, g.prompt, a.rank, c.name AS contributor, t.caption AS training_caption, round(a.share, 3) AS share "
        "FROM attributions a JOIN generations g ON g.id = a.generation_id JOIN training_images t ON t.id = a.training_id "
        "JOIN contributors c ON c.id = t.contributor_id WHERE a.rank <= 3 AND g.id IN (1, 2, 3) ORDER BY g.id, a.rank",
        workspace=ws,
    )
    print("\nCredit per contributor (sum of shares):")
    run(
        "sql",
        "SELECT c.name AS contributor, round(sum(a.share), 2) AS credit, count(DISTINCT a.generation_id) AS generations "
        "FROM attributions a JOIN training_images t ON t.id = a.training_id JOIN contributors c ON c.id = t.contributor_id "
        "GROUP BY 1 ORDER BY 2 DESC",
        workspace=ws,
    )
    run("report", "--pool", "1000", "--currency", "EUR", "--out", workdir / "report", workspace=ws)
    print(
        f"\ndemo finished in {time.perf_counter() - started:.0f} s; workspace {ws}; report {workdir / 'report' / 'index.html'}"
    )


if __name__ == "__main__":
    main()
