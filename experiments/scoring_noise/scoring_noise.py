"""Is the teacher's scoring noise a per-image bias shared by every query of a run? (experiments/teacher_signal/TEACHER.md,
last section)

    python -m experiments.scoring_noise.scoring_noise [--workdir build/distill-world] [--queries 60]

On the collected test queries of a distillation workspace (experiments/distill/distill.py), each query's
unlearning update is scored twice: with the run's scoring noise and with an independent set (the noise floor's).
If the noise only adds per-query jitter, a candidate's rank difference between the two averages out across
queries; if it is a per-candidate bias, its mean over one half of the queries predicts its mean over the other
half. Until the teacher drew its noise per query (AbU scheme 2), it was such a bias. Writes
experiments/scoring_noise/scoring-noise.json (scoring-noise-scheme1.json beside it is the scheme 1 run); 60 queries
took 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

from auditor import runtime

runtime.tune_process()  # as the CLI does, before torch loads

import argparse  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from auditor import distill  # noqa: E402
from auditor.abu import AbuTeacher  # noqa: E402
from auditor.store import Store  # noqa: E402
from auditor.teacher import training_set  # noqa: E402
from experiments.world import open_workspace  # noqa: E402

HERE = Path(__file__).resolve().parent  # what this experiment writes: scoring-noise.json


def normalised_rank(x: np.ndarray) -> np.ndarray:
    return (np.argsort(np.argsort(x)) + 0.5) / len(x)


def split_half(differences: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, shuffle: bool) -> float:
    """Correlation, over candidates seen in both halves of the queries, of their mean rank difference per half."""
    order = rng.permutation(len(differences))
    means = []
    for half in (order[: len(order) // 2], order[len(order) // 2 :]):
        total, count = {}, {}
        for i in half:
            ids, d = differences[i]
            for cid, value in zip(ids.tolist(), (rng.permutation(d) if shuffle else d).tolist()):
                total[cid] = total.get(cid, 0.0) + value
                count[cid] = count.get(cid, 0) + 1
        means.append({k: total[k] / count[k] for k in total})
    common = sorted(set(means[0]) & set(means[1]))
    return float(np.corrcoef([means[0][k] for k in common], [means[1][k] for k in common])[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("build/distill-world"))
    parser.add_argument("--splits", type=int, default=20, help="random query halvings to average over")
    parser.add_argument("--queries", type=int, default=0, help="use the first N collected test queries (0: all)")
    args = parser.parse_args()
    ws = open_workspace(args.workdir)
    settings = ws.config.confirm
    with Store(ws.db_path, read_only=True) as store:
        rows, images = distill.current_queries(
            distill.collected_queries(store, "test")[: args.queries or None], ws.limits, print
        )
        training = training_set(ws, store, ws.model_dir(), torch.device("cpu"), settings.flip)
    if not rows:
        raise SystemExit(
            f"no collected test queries in {args.workdir}; run `python -m experiments.distill.distill --stage collect` first"
        )
    teacher = AbuTeacher(training, settings, ws.dir / "cache")
    differences, agreement = [], []
    for (qid, _path, prompt, candidates), image in zip(rows, images):
        ids = np.array(candidates, np.int64)
        delta = teacher.unlearn(image, prompt, qid)
        raw_run, _ = teacher.influence(ids, delta, teacher.noise_seed(qid))
        raw_other, _ = teacher.influence(ids, delta, teacher.noise_seed(qid, stream=1))
        differences.append((ids, normalised_rank(raw_run) - normalised_rank(raw_other)))
        agreement.append(float(np.corrcoef(normalised_rank(raw_run), normalised_rank(raw_other))[0, 1]))
    rng = np.random.default_rng(0)
    shared = [split_half(differences, rng, shuffle=False) for _ in range(args.splits)]
    null = [split_half(differences, rng, shuffle=True) for _ in range(args.splits)]
    result = {
        "queries": len(rows),
        "scheme": settings.scheme,
        "candidates_per_query": len(rows[0][3]),
        "timesteps": settings.timesteps,
        "within_query_spearman_run_vs_other_noise": float(np.mean(agreement)),
        "split_half_correlation": [float(np.mean(shared)), float(np.std(shared))],
        "null_shuffled_within_query": [float(np.mean(null)), float(np.std(null))],
    }
    (HERE / "scoring-noise.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
