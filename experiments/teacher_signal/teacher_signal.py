"""Does the unlearning teacher see the right thing on the example world?

    python -m experiments.teacher_signal.teacher_signal [--generations 20] [--workdir build/teacher-signal]
                                                        [--out experiments/teacher_signal/TEACHER.md]

Indexes and scans the example world, confirms N generations with `audit confirm`'s default
settings, and measures, for the teacher's top-10 of each generation, the fraction of training
images that show the prompted digit / palette / both — against the base rate over the whole
training set and over the candidate set the teacher ranked (candidates come from the fast path,
so the candidate base rate is the honest comparison). Raw (uncorrected) and corrected rankings
are both reported, and the controls' influence is compared with the fast top-k's. Rewrites the
top of TEACHER.md and keeps the sections after it (the scoring-noise one, written from
experiments/scoring_noise/'s measurements). 12 generations took 7 minutes on 2 CPU cores.
The workdir is deleted and made afresh.
"""

from __future__ import annotations

from auditor import runtime

runtime.tune_process()  # as the CLI does, before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from auditor import confirm, sql  # noqa: E402
from auditor.scan import scan  # noqa: E402
from experiments.world import ROOT, WORLD, open_workspace  # noqa: E402

HERE = Path(__file__).resolve().parent  # what this experiment writes: TEACHER.md
CAPTION = re.compile(r"a (\w+) handwritten (\w+) on (\w+) paper")


def parse(text: str | None):
    match = CAPTION.search(text or "")
    return (match[2], (match[1], match[3])) if match else (None, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=20)
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "teacher-signal")
    parser.add_argument("--out", type=Path, default=HERE / "TEACHER.md")
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    shutil.rmtree(args.workdir, ignore_errors=True)
    ws = open_workspace(args.workdir)
    scan(ws, WORLD / "outputs", top_k=20)
    started = time.perf_counter()
    result = confirm.confirm(ws, top=args.generations, announce=print)
    seconds = time.perf_counter() - started

    training = {i: parse(c) for i, c in sql.query(ws, "select id, caption from training_images").rows()}
    all_digits = np.array([d for d, _ in training.values()])
    all_palettes = [p for _, p in training.values()]
    rows = sql.query(
        ws,
        "select s.generation_id, g.prompt, s.training_id, s.influence, s.raw_influence, s.teacher_rank, s.is_control,"
        " s.fast_rank from teacher_scores s join generations g on g.id = s.generation_id",
    ).rows()
    by_gen: dict[int, list] = {}
    for row in rows:
        by_gen.setdefault(row[0], []).append(row)

    def fractions(ids, digit, palette):
        d = np.mean([training[i][0] == digit for i in ids])
        p = np.mean([training[i][1] == palette for i in ids])
        b = np.mean([training[i][0] == digit and training[i][1] == palette for i in ids])
        return d, p, b

    stats = {key: [] for key in ("corrected", "raw", "fast", "candidates", "all")}
    margins, controls_in_top = [], []
    for _gen, items in by_gen.items():
        digit, palette = parse(items[0][1])
        if digit is None:
            continue
        ids = np.array([r[2] for r in items])
        infl = np.array([r[3] for r in items])
        raw = np.array([r[4] for r in items])
        control = np.array([r[6] for r in items])
        fast_rank = np.array([r[7] if r[7] is not None else 10**9 for r in items])
        stats["corrected"].append(fractions(ids[np.argsort(-infl)[: args.k]], digit, palette))
        stats["raw"].append(fractions(ids[np.argsort(-raw)[: args.k]], digit, palette))
        stats["fast"].append(fractions(ids[np.argsort(fast_rank)[: args.k]], digit, palette))
        stats["candidates"].append(fractions(ids[~control], digit, palette))
        stats["all"].append(
            (
                np.mean(all_digits == digit),
                np.mean([p == palette for p in all_palettes]),
                np.mean([(training[i][0] == digit and training[i][1] == palette) for i in training]),
            )
        )
        top_fast = (~control) & (fast_rank <= args.k)
        margins.append(float(np.median(infl[top_fast]) - np.median(infl[control])))
        controls_in_top.append(float(control[np.argsort(-infl)[: args.k]].mean()))
    run = sql.query(ws, "select * from confirm_runs").row(0, named=True)
    conf = sql.query(
        ws,
        "select avg(map_at_k) m, avg(top1_agree::int) t1, avg(spearman) sp, avg(confirmed::int) c from confirmations",
    ).row(0, named=True)
    labels = {
        "corrected": "teacher top-10 (corrected, stored as influence)",
        "raw": "teacher top-10 (raw Δloss)",
        "fast": "fast path top-10",
        "candidates": "base rate: the teacher's candidate set",
        "all": "base rate: whole training set",
    }
    lines = [
        "# The unlearning teacher on the example world",
        "",
        f"Measured by `python -m experiments.teacher_signal.teacher_signal --generations {args.generations}` on {time.strftime('%Y-%m-%d')}, "
        f"2 CPU cores, `audit confirm` defaults ({json.loads(run['settings'])['candidates']} fast candidates + "
        f"{json.loads(run['settings'])['controls']} random controls, {json.loads(run['settings'])['timesteps']} timesteps, "
        f"{json.loads(run['settings'])['draws']} draws, step size {json.loads(run['settings'])['step_size']}).",
        "",
        f"Fraction of training images showing the prompted digit / palette / both, mean over {len(stats['corrected'])} generations:",
        "",
        "| ranking | digit | palette | both |",
        "|---|---|---|---|",
    ]
    for key, label in labels.items():
        d, p, b = np.mean(stats[key], axis=0)
        lines.append(f"| {label} | {d:.2f} | {p:.2f} | {b:.2f} |")
    lines += [
        "",
        f"- Controls (random training images outside the fast top-K): median influence of the fast top-{args.k} minus the controls' "
        f"= {np.median(margins):.3g} (positive in {np.mean(np.array(margins) > 0):.0%} of generations); "
        f"controls make up {np.mean(controls_in_top):.1%} of the teacher's top-{args.k} (they are "
        f"{json.loads(run['settings'])['controls'] / (json.loads(run['settings'])['candidates'] + json.loads(run['settings'])['controls']):.0%} of the candidates).",
        f"- Noise floor (std of Δ between two scoring seeds / √2): {run['noise_floor']:.3g}; signal-to-noise (std of Δ over candidates ÷ floor), median: {run['signal_to_noise']:.1f}.",
        f"- Agreement with the fast path: mAP@{args.k} {conf['m']:.3f}, top-1 in teacher top-{args.k} {conf['t1']:.0%}, Spearman {conf['sp']:.3f}, confirmed {conf['c']:.0%}.",
        f"- Time: {seconds:.0f} s for {result.generations} generations including model load, Fisher and caches; "
        f"{run['seconds_per_generation']:.1f} s per generation as recorded in `confirm_runs`.",
    ]
    # The sections after this part (the scoring-noise one) are other scripts': keep them.
    previous = args.out.read_text() if args.out.is_file() else ""
    later = previous[previous.index("\n## ") :] if "\n## " in previous else ""
    args.out.write_text("\n".join(lines) + "\n" + later)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
