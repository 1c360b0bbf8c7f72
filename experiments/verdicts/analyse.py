"""Verdict mixes and error rates from collect.py's teacher scores (docs/research/verdicts.md).

    python -m experiments.verdicts.analyse [--shuffles 20]

For every generation scored: the verdict of the real fast ranking; of the fast scores shuffled at random over all
scored candidates (nonsense: a confirmation is a false confirm); of the teacher's independent replicate (seed 1)
used as the "fast" ranking (the best any fast path can do: a dispute is a false dispute); of the same run rescored
with fresh noise; and of the real fast ranking judged by the 2-timestep teacher. As `audit confirm` does, the
noise floor of a run is measured on its first generation (the one with the highest top-1 share). Also a sweep of
the thresholds. Writes experiments/verdicts/verdicts.json and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from auditor import metrics, verdict
from auditor.verdict import Thresholds

HERE = Path(__file__).resolve().parent
K, TIMESTEPS = 10, 10


def load(folder: Path) -> list[dict]:
    # collect.py writes generations in `audit confirm --top` order; file times keep that order.
    files = sorted(folder.glob("*.npz"), key=lambda p: p.stat().st_mtime)
    return [dict(np.load(f), gen=int(f.stem)) for f in files]


def floor(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.std(a - b) / math.sqrt(2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scores", type=Path, default=HERE / "scores")
    parser.add_argument("--shuffles", type=int, default=20)
    parser.add_argument("--out", type=Path, default=HERE / "verdicts.json")
    parser.add_argument("--collection-shuffles", type=int, default=5)
    args = parser.parse_args()
    gens = load(args.scores)
    run_floor = floor(gens[0]["raw_a"], gens[0]["raw_b"])
    few_floor = floor(gens[0]["raw_2a"], gens[0]["raw_2b"])
    rng = np.random.default_rng(0)
    cases: dict[str, list[verdict.Stats]] = {k: [] for k in ("fast", "shuffled", "replicate", "rescored", "few")}
    measured = {"replicate": [], "rescored": [], "bootstrap": [], "few_bootstrap": []}
    t = Thresholds()
    for g in gens:
        c = g["is_control"]

        def stats(fast, influence, noise=run_floor, timesteps=TIMESTEPS, seed=g["gen"], c=c):
            return verdict.measure(fast, influence, c, K, noise, timesteps, seed, t.min_self_agreement)

        cases["fast"].append(stats(g["fast"], g["inf_a"]))
        for _ in range(args.shuffles):
            cases["shuffled"].append(stats(rng.permutation(g["fast"]), g["inf_a"]))
        cases["replicate"].append(stats(g["inf_r"], g["inf_a"]))
        cases["rescored"].append(stats(g["inf_b"], g["inf_a"]))
        cases["few"].append(stats(g["fast"], g["inf_2a"], few_floor, 2))
        ids = np.arange(len(c))
        measured["replicate"].append(metrics.map_at_k(ids, g["inf_r"], g["inf_a"], K))
        measured["rescored"].append(metrics.map_at_k(ids, g["inf_b"], g["inf_a"], K))
        measured["bootstrap"].append(cases["fast"][-1].self_agreement)
        measured["few_bootstrap"].append(cases["few"][-1].self_agreement)

    def mix(stats_list, thresholds):
        counts = Counter(verdict.decide(s, thresholds).verdict for s in stats_list)
        return {v: counts[v] / len(stats_list) for v in verdict.VERDICTS}

    out = {
        "generations": len(gens),
        "shuffles_per_generation": args.shuffles,
        "settings": {"candidates": 100, "controls": 50, "timesteps": TIMESTEPS, "k": K, "draws": 256},
        "noise_floor": run_floor,
        "noise_floor_2_timesteps": few_floor,
        "per_generation_floor": [floor(g["raw_a"], g["raw_b"]) for g in gens],
        "self_agreement": {k: metrics.mean_se(v) for k, v in measured.items()},
        "defaults": asdict(t),
        "mix": {name: mix(s, t) for name, s in cases.items()},
        "stats": {
            name: {
                field: metrics.mean_se([getattr(x, field) for x in s if math.isfinite(getattr(x, field))])
                for field in ("p_value", "auc", "agreement", "chance", "self_agreement", "relative")
            }
            for name, s in cases.items()
        },
        "floor_ratio": float(np.median([floor(g["raw_a"], g["raw_b"]) / np.std(g["inf_a"]) for g in gens])),
        "sweep": [],
    }
    out["collection"] = collection(out["floor_ratio"], args.collection_shuffles)
    for alpha in (0.001, 0.01, 0.05):
        for confirm_ratio in (0.15, 0.2, 0.25, 0.3):
            for dispute_ratio in (0.05, 0.1, 0.15):
                if dispute_ratio >= confirm_ratio:
                    continue
                th = replace(t, alpha=alpha, confirm_ratio=confirm_ratio, dispute_ratio=dispute_ratio)
                out["sweep"].append(
                    {
                        **asdict(th),
                        "false_confirm": mix(cases["shuffled"], th)["confirmed"],
                        "false_dispute": mix(cases["replicate"], th)["disputed"],
                        "replicate_confirmed": mix(cases["replicate"], th)["confirmed"],
                        "fast": mix(cases["fast"], th),
                    }
                )
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k not in ("sweep", "per_generation_floor")}, indent=1))
    print("alpha confirm dispute | false-confirm false-dispute replicate-confirmed | fast C/D/I")
    for row in out["sweep"]:
        f = row["fast"]
        print(
            f"{row['alpha']:<5} {row['confirm_ratio']:<7} {row['dispute_ratio']:<7} | {row['false_confirm']:.3f} "
            f"{row['false_dispute']:.3f} {row['replicate_confirmed']:.3f} | "
            f"{f['confirmed']:.2f}/{f['disputed']:.2f}/{f['inconclusive']:.2f}"
        )


def collection(ratio: float, shuffles: int = 5, limit: int | None = None) -> dict:
    """The agreement half of the verdict on the example world's distillation collection (120 held-out queries with
    an independent teacher replicate, 100 candidates each, no random controls, so no rank test): the replicate as
    the "fast" ranking (false dispute: R ≤ dispute_ratio) and shuffled rankings (an upper bound on false confirm:
    R ≥ confirm_ratio, the rank test left out). The collection stores no noise floor; σ per query is `ratio` × the
    std of its influence, the ratio measured by collect.py at 10 timesteps."""
    import pyarrow.parquet as pq

    from experiments.world import WORLD

    folder = WORLD / "distill-collection"
    run = pq.read_table(folder / "rankings.parquet").to_pandas()
    rep = pq.read_table(folder / "replicates.parquet").to_pandas()
    merged = rep.merge(run, on=["query_id", "training_sha256"], suffixes=("_rep", ""))
    rng = np.random.default_rng(1)
    replicate_r, shuffled_r, self_agreement, measured = [], [], [], []
    for i, (_, q) in enumerate(merged.groupby("query_id")):
        if limit and i >= limit:
            break
        influence, other = q["influence"].to_numpy(), q["influence_rep"].to_numpy()
        none = np.zeros(len(q), bool)
        floor_q = ratio * float(np.std(influence))
        s = verdict.measure(other, influence, none, K, floor_q, TIMESTEPS, i)
        replicate_r.append(s.relative)
        self_agreement.append(s.self_agreement)
        measured.append(s.agreement)
        for _ in range(shuffles):
            shuffled_r.append(
                verdict.measure(rng.permutation(other), influence, none, K, floor_q, TIMESTEPS, i).relative
            )
    t = Thresholds()
    replicate_r, shuffled_r = np.array(replicate_r), np.array(shuffled_r)
    return {
        "queries": len(replicate_r),
        "shuffles": len(shuffled_r),
        "floor_ratio": ratio,
        "replicate_map": metrics.mean_se(measured),
        "bootstrap_self_agreement": metrics.mean_se(self_agreement),
        "replicate_relative": metrics.mean_se(replicate_r),
        "false_dispute": float(np.mean(replicate_r <= t.dispute_ratio)),
        "false_confirm_upper_bound": float(np.mean(shuffled_r >= t.confirm_ratio)),
        "false_confirm_upper_bound_by_ratio": {r: float(np.mean(shuffled_r >= r)) for r in (0.15, 0.2, 0.25, 0.3)},
        "false_dispute_by_ratio": {r: float(np.mean(replicate_r <= r)) for r in (0.05, 0.1, 0.15, 0.2)},
        "shuffled_disputed": float(np.mean(shuffled_r <= t.dispute_ratio)),
        "replicate_r_quantiles": np.quantile(replicate_r, [0.01, 0.05, 0.5]).tolist(),
        "shuffled_r_quantiles": np.quantile(shuffled_r, [0.5, 0.95, 0.99]).tolist(),
    }


if __name__ == "__main__":
    main()
