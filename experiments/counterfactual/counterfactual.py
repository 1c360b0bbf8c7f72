"""The leave-K-out check on the example world: experiments/counterfactual/COUNTERFACTUAL.md, and per run length
counterfactual-<steps>.json and .md beside it.

    python -m experiments.counterfactual.counterfactual [--workdir build/counterfactual-world] [--generations 4]
                                                        [--remove 10] [--retrain-steps 400]

What a user would run: a workspace on the world, `audit scan` of its outputs, `audit confirm`
with AbU and with D-TRAK on a few single-palette generations with distinct digits and
palettes (so their top sets barely overlap), then `audit eval counterfactual`.
Resumable: retrained models are cached in the workspace, so a rerun only measures.
On 2 CPU cores (COUNTERFACTUAL.md): 46 minutes with 400-step retrainings, 25 of them confirming the
generations; the recipe's 1,000 steps then took another hour of retraining.
"""

from __future__ import annotations

from auditor import runtime

runtime.tune_process()  # as the CLI does, before torch loads
runtime.prefer_spinning_threads()  # retraining-bound, as `audit eval counterfactual` is

import argparse  # noqa: E402
import csv  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from auditor import confirm, counterfactual, sql  # noqa: E402
from experiments.world import WORLD, open_workspace  # noqa: E402

HERE = Path(__file__).resolve().parent  # what this experiment writes: COUNTERFACTUAL.md, counterfactual-<steps>.*


def pick(n: int) -> list[str]:
    """Output files of single-palette generations, distinct digits and distinct contributors."""
    rows = list(csv.DictReader(open(WORLD / "outputs" / "manifest.csv")))
    picked, digits, contributors = [], set(), set()
    for row in rows:
        if (
            row["ink_contributor"] != row["paper_contributor"]
            or row["digit"] in digits
            or row["ink_contributor"] in contributors
        ):
            continue
        picked.append(row["file"])
        digits.add(row["digit"])
        contributors.add(row["ink_contributor"])
        if len(picked) == n:
            break
    return picked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("build/counterfactual-world"))
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--remove", type=int, default=10)
    parser.add_argument("--retrain-steps", type=int, default=400)
    args = parser.parse_args()
    root = args.workdir.resolve()
    started = time.perf_counter()
    ws = open_workspace(root, scan_outputs=True)
    files = pick(args.generations)
    gen_ids = [sql.query(ws, f"select id from generations where path like '%/{name}'").item() for name in files]
    timings = {}
    for method in ("abu", "dtrak"):
        t0 = time.perf_counter()
        for gen in gen_ids:
            confirm.confirm(ws, method=method, generation=gen, announce=print)
        timings[method] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = counterfactual.counterfactual(
        ws, generations=gen_ids, k=args.remove, retrain_steps=args.retrain_steps, announce=print
    )
    retrain_seconds = time.perf_counter() - t0
    prompts = dict(
        sql.query(ws, f"select id, prompt from generations where id in ({','.join(map(str, gen_ids))})").rows()
    )
    header = (
        f"Made by `python -m experiments.counterfactual.counterfactual --generations {args.generations} --remove {args.remove} "
        f"--retrain-steps {args.retrain_steps}` on {time.strftime('%Y-%m-%d')} (2 CPU cores): {time.perf_counter() - started:.0f} s in all, "
        f"of which {retrain_seconds:.0f} s retraining and measuring; confirming the generations took {timings['abu']:.0f} s with AbU "
        f"and {timings['dtrak']:.0f} s with D-TRAK (0 s: already confirmed by an earlier run).\n\n"
        "Generations checked (single palette, distinct digits and contributors):\n\n"
        + "".join(f'- {g}: "{prompts[g]}"\n' for g in report.generations)
    )
    (HERE / f"counterfactual-{report.retrain_steps}.json").write_text(counterfactual.to_json(report))
    (HERE / f"counterfactual-{report.retrain_steps}.md").write_text(header)
    write_summary()


def write_summary() -> None:
    """COUNTERFACTUAL.md from every run length measured so far (counterfactual-<steps>.json and .md)."""
    sections = []
    for path in sorted(HERE.glob("counterfactual-*.json"), key=lambda p: int(p.stem.split("-")[1])):
        report = counterfactual.from_json(path.read_text())
        sections.append(
            f"## Retrainings of {report.retrain_steps} steps (the recipe has {report.recipe_steps})\n\n"
            + path.with_suffix(".md").read_text()
            + "\n"
            + counterfactual.to_markdown(report)
        )
    (HERE / "COUNTERFACTUAL.md").write_text("# Leave-K-out on the example world\n\n" + "\n".join(sections))
    print("\n".join(sections))


if __name__ == "__main__":
    main()
