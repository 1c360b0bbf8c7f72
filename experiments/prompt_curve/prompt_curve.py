"""Does the distilled head generalise to new prompts with more training prompts, or with more queries per prompt?

    python -m experiments.prompt_curve.prompt_curve [--workdir build/distill-world]   # writes PROMPT_CURVE.md

On the shipped collection (imported as experiments/distill/distill.py does), the head is trained as `distill train`
trains it but without the refit (`distill.refit = false`, so every run fits only its own fit split) on subsets of the
training queries: a random share of the training prompts with all their queries, or every prompt with a share of its
queries; each is scored on the 120 test queries of experiments/distill/EVAL.md (prompts never trained on) against
untuned image ⊕ text. Why `distill train` refits on the validation prompts (auditor/distill/fit.py, `fit`). The output,
experiments/prompt_curve/PROMPT_CURVE.md, is written beside this script.
"""

from __future__ import annotations

from auditor import runtime

runtime.tune_process()  # as the CLI does, before torch loads

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from auditor import distill, features, metrics  # noqa: E402
from experiments.distill.distill import aps, split_features, teacher_tops, with_collection  # noqa: E402
from experiments.world import open_workspace  # noqa: E402

HERE = Path(__file__).resolve().parent  # what this experiment writes: PROMPT_CURVE.md

SUBSETS = (("prompts", 0.5), ("prompts", 0.75), ("queries per prompt", 0.5), ("prompts", 1.0))


def keep_mask(prompts: list[str], kind: str, share: float, rng: np.random.Generator) -> np.ndarray:
    """Which training queries a subset keeps: a share of the prompts (all their queries), or a share of every prompt's."""
    prompts = np.array(prompts)
    if kind == "prompts":
        names = sorted(set(prompts.tolist()))
        kept = set(rng.permutation(names)[: int(round(len(names) * share))].tolist())
        return np.array([p in kept for p in prompts.tolist()])
    keep = np.zeros(len(prompts), bool)
    for name in sorted(set(prompts.tolist())):
        rows = np.flatnonzero(prompts == name)
        keep[rng.permutation(rows)[: int(round(len(rows) * share))]] = True
    return keep


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("build/distill-world"))
    parser.add_argument("--k", type=int, default=10)
    args = parser.parse_args()
    ws = open_workspace(args.workdir)
    ws.config.confirm.timesteps = 12  # distill.py's --timesteps, with which the collection was made
    ws.save()
    with_collection(ws)
    s = ws.config.distill.override(refit=False)
    img, txt, train, q_img, q_txt = split_features(ws, "train")
    _, _, test, tq_img, tq_txt = split_features(ws, "test")
    q_feat, t_feat, tq_feat = (
        np.concatenate([q_img, q_txt], 1),
        np.concatenate([img, txt], 1),
        np.concatenate([tq_img, tq_txt], 1),
    )
    tops = teacher_tops(test, args.k)
    untuned = aps(features.joint(tq_img, tq_txt) @ features.joint(img, txt).T, tops)
    rows = []
    for kind, share in SUBSETS:
        keep = keep_mask([q[2] or "" for q in train], kind, share, np.random.default_rng(123))
        subset = [q for q, k in zip(train, keep) if k]
        fit_set, val, _ = distill.split_validation(subset, q_feat[keep], s)
        t0 = time.perf_counter()
        selected, _ = distill.fit(fit_set, val, t_feat, s)
        gain, se = metrics.mean_se(aps(selected.scores(tq_feat, t_feat), tops) - untuned)
        rows.append(
            f"| {kind} × {share:g} | {len({q[2] for q in subset})} | {len(subset)} ({len(fit_set.candidates)} fit) | "
            f"{selected.epochs} | {gain:+.3f} ± {se:.3f} |"
        )
        print(rows[-1], f"{time.perf_counter() - t0:.0f} s", flush=True)
    (HERE / "PROMPT_CURVE.md").write_text(
        "# Training prompts or queries per prompt?\n\n"
        f"Made by `python -m experiments.prompt_curve.prompt_curve` on {time.strftime('%Y-%m-%d')} from the shipped collection: "
        "the head trained as `distill train` trains it, without the refit, on subsets of the 1,088 training queries "
        f"(validation by prompt inside each subset), scored on the {len(test)} test queries of prompts never trained on; "
        f"gain in mAP@{args.k} over untuned image ⊕ text, paired per query (mean ± standard error).\n\n"
        "| training queries kept | prompts | queries | best epoch | gain |\n|---|---|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n"
        "Fewer prompts cost far more than fewer queries of each prompt: what generalises to a new prompt is having seen "
        "many prompts. Hence `distill train` refits on its validation prompts too (`distill.refit`).\n"
    )


if __name__ == "__main__":
    main()
