"""Distil the example world's teacher into its encoder and measure it: the shipped `encoder-distilled/` and EVAL.md.

    python examples/digits_world/distill.py [--workdir build/distill-world] [--queries 240]

Runs what a user would: a workspace on the world, `distill collect` (query images generated
from the world's captions, ranked by the AbU teacher over each query's 100 nearest training
images by the untuned backbone), `distill train`, `eval` on the held-out prompts. Resumable:
rerunning continues the collection where it stopped.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))
sys.path.insert(0, str(HERE))

from auditor import distill, evaluate  # noqa: E402
from world import open_workspace  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", type=Path, default=Path("build/distill-world"))
    parser.add_argument("--queries", type=int, default=240)
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--timesteps", type=int, default=10)
    parser.add_argument("--stage", choices=["collect", "train"], action="append")
    args = parser.parse_args()
    stages = args.stage or ["collect", "train"]
    root = args.workdir.resolve()
    ws = open_workspace(root)
    ws.config["confirm"]["timesteps"] = args.timesteps
    ws.save()
    if "collect" in stages:
        t0 = time.perf_counter()
        result = distill.collect(ws, queries=args.queries, candidates=args.candidates, announce=print)
        print(f"collect: {result} in {time.perf_counter() - t0:.0f} s", flush=True)
    if "train" in stages:
        target = HERE / "encoder-distilled"
        staging = root / "encoder-distilled"
        shutil.rmtree(staging, ignore_errors=True)
        trained = distill.train(ws, out=staging, progress_row=lambda r: print(r, flush=True))
        print(trained, flush=True)
        # The teacher again with independent noise: how well it agrees with itself bounds every student.
        replica = distill.replicate(ws, announce=print)
        results, n = evaluate.evaluate(ws, encoders=[HERE / "encoder", staging], ks=(5, 10, 20, 50), replicate=replica)
        table = evaluate.to_markdown(results, n, args.candidates)
        main_k = 10
        untuned = max(r.map_at[main_k][0] for r in results if r.name.startswith("untuned"))
        distilled = next((r.map_at[main_k][0] for r in results if r.name.startswith("distilled")), untuned)
        replica_map = next(r.map_at[main_k][0] for r in results if r.name.startswith("teacher replicate"))
        shipped = trained.epochs > 0 and distilled > untuned
        shutil.rmtree(target, ignore_errors=True)
        if shipped:
            shutil.copytree(staging, target)
        n_queries = trained.train_queries + trained.val_queries
        (HERE / "EVAL.md").write_text(
            "# Distilled vs untuned encoders on the example world\n\n"
            + ("" if shipped else
               f"**The distilled head is not shipped**: it does not beat the best untuned feature on held-out queries "
               f"(mAP@{main_k} {distilled:.3f} vs {untuned:.3f}), so `make demo` uses the untuned `encoder/`.\n\n")
            + f"Made by `python examples/digits_world/distill.py --queries {args.queries} --candidates {args.candidates} "
            f"--timesteps {args.timesteps}` on {time.strftime('%Y-%m-%d')} (2 CPU cores). "
            f"Teacher: AbU with `audit confirm` defaults except {args.timesteps} scoring timesteps; "
            f"{args.candidates} candidates per query (its nearest training images by the untuned backbone). "
            f"The main k is {main_k} = {main_k / args.candidates:.0%} of the candidate set: the teacher's top set, small enough to be the images that matter, "
            f"large enough to be stable against its noise.\n\n"
            f"Head training: {trained.train_queries} train / {trained.val_queries} validation queries ({n_queries} in all, validation by prompt), "
            f"best epoch {trained.epochs} (0 = the untrained residual head, i.e. the untuned ranking), "
            f"{trained.seconds:.0f} s on CPU; share temperature {trained.temperature:.4g} "
            f"(validation NLL {trained.calibration_nll:.3f}, ECE {trained.calibration_ece:.4f}).\n\n" + table
            + "\nThe 'teacher replicate' row is the same teacher run again on the held-out queries with independent noise "
              "(a new Fisher sample, unlearning draws and scoring noise; `audit eval --replicate`): how well the teacher agrees "
              "with itself, and so roughly the most any student can be expected to agree with it. "
            + f"Here it is {replica_map:.3f} at mAP@{main_k}: the best untuned feature already reaches {untuned / replica_map:.0%} of it, "
              f"and untuned + 0.15 = {untuned + 0.15:.3f} would {'exceed' if untuned + 0.15 > replica_map else 'come within ' + format(replica_map - untuned - 0.15, '.3f') + ' of'} "
              "the teacher's agreement with itself.\n"
        )
        (HERE / "eval.json").write_text(evaluate.to_json(results, n))
        print(table)

if __name__ == "__main__":
    main()
