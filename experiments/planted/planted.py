"""Planted ground truth on the example world: experiments/planted/PLANTED.md and planted.json.

    python -m experiments.planted.planted [--workdir build/planted-world]

What a user would run: a workspace on the world, then `audit eval planted --exemplars
examples/digits_world/heldout --style stroke --tune all`. Strokes, not palettes: the world's
VAE was trained on eight palettes and turns any new one into one of them, so a palette
customisation cannot plant anything (the eval warns about it); mirrored, upside-down, bold
and thin strokes survive the VAE. The whole UNet is tuned (DreamBooth-style) because the
K/V projections alone do not learn a new stroke style on this model (200 steps at lr 1e-3). Resumable: the
customised weights and generated images are kept in the workspace. About 7 minutes on 2 CPU cores (PLANTED.md).
"""

from __future__ import annotations

from auditor import runtime

runtime.tune_process()  # as the CLI does, before torch loads

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from auditor import planted  # noqa: E402
from experiments.world import WORLD, open_workspace  # noqa: E402

HERE = Path(__file__).resolve().parent  # what this experiment writes: PLANTED.md and planted.json


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("build/planted-world"))
    args = parser.parse_args()
    root = args.workdir.resolve()
    ws = open_workspace(root)
    started = time.perf_counter()
    # 200 steps at lr 1e-3: the whole UNet learns each stroke style without forgetting the rest (prior preservation).
    ws.config.planted = ws.config.planted.override(style="stroke", tune="all", steps=200, lr=1e-3)
    ws.save()
    report = planted.planted(ws, exemplars=WORLD / "heldout", announce=print)
    table = planted.to_markdown(report)
    s = ws.config.planted
    (HERE / "PLANTED.md").write_text(
        "# Planted ground truth on the example world\n\n"
        f"Made by `python -m experiments.planted.planted` on {time.strftime('%Y-%m-%d')} (2 CPU cores, "
        f"{time.perf_counter() - started:.0f} s): `audit eval planted --exemplars examples/digits_world/heldout "
        f"--style stroke --tune all`, {s.steps} fine-tuning steps at lr {s.lr} per customisation, "
        f"{s.generations} images generated with each.\n\n" + table
    )
    (HERE / "planted.json").write_text(planted.to_json(report))
    print(table)


if __name__ == "__main__":
    main()
