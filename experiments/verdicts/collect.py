"""Teacher scores for measuring the verdict's error rates on the example world (docs/research/verdicts.md).

    python -m experiments.verdicts.collect [--generations 30] [--workdir build/verdicts]

Indexes and scans the example world with the shipped distilled encoder (as `make demo` does), then, for the
generations `audit confirm --top N` would pick, scores the fast top-100 plus 50 random controls (`audit confirm`'s
own candidate selection) with:

- the AbU teacher at 10 timesteps (seed 0), twice with independent scoring noise (its noise floor per generation);
- an independent replicate of the teacher (seed 1: its own Fisher sample, unlearning draws and scoring noise);
- the seed-0 update scored at 2 timesteps, twice (a too-few-timesteps run).

Each generation's arrays go to experiments/verdicts/scores/<generation>.npz as soon as they exist, so the script
resumes; analyse.py turns them into verdict mixes and error rates.
"""

from __future__ import annotations

from auditor import runtime

runtime.tune_process()  # as the CLI does, before torch loads

import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from auditor import confirm, diffusion, embed, workspace  # noqa: E402
from auditor.abu import AbuTeacher  # noqa: E402
from auditor.index import index_training  # noqa: E402
from auditor.scan import METHOD, scan  # noqa: E402
from auditor.search import VectorTable  # noqa: E402
from auditor.store import Store  # noqa: E402
from auditor.teacher import training_set  # noqa: E402
from experiments.world import ROOT, WORLD  # noqa: E402

HERE = Path(__file__).resolve().parent
SETTINGS = dict(candidates=100, controls=50, timesteps=10, k=10)


def open_ws(root: Path) -> workspace.Workspace:
    if (root / ".audit").is_dir():
        return workspace.load(root)
    ws = workspace.init(root, encoder=WORLD / "encoder-distilled", model=WORLD / "model")
    index_training(ws, WORLD / "training")
    scan(ws, WORLD / "outputs", top_k=20)
    return ws


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--generations", type=int, default=30)
    parser.add_argument("--workdir", type=Path, default=ROOT / "build" / "verdicts")
    parser.add_argument("--out", type=Path, default=HERE / "scores")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    ws = open_ws(args.workdir.resolve())
    device = torch.device("cpu")
    settings = ws.config.confirm.override(**SETTINGS)
    with Store(ws.db_path, read_only=True) as store:
        training = training_set(ws, store, ws.model_dir(), device, settings.flip)
        encoder = embed.load(ws.encoder_dir(), device)
        selected = store.rows(
            "SELECT g.id, g.path, g.prompt FROM generations g JOIN attributions a ON a.generation_id = g.id"
            " AND a.rank = 1 AND a.method = ? AND a.encoder_id = ? ORDER BY a.share DESC, g.id LIMIT ?",
            [METHOD, encoder.id, args.generations],
        )
    table = VectorTable.for_encoder(ws.lancedb_uri, encoder, ws.config.index)
    fast = confirm._FastPath(encoder, table, table.searcher(), training.ids)
    cache = ws.dir / "cache"
    t0 = time.perf_counter()
    run = AbuTeacher(training, settings, cache)
    replicate = AbuTeacher(training, settings.override(seed=1), cache)
    few = AbuTeacher(training, settings.override(timesteps=2), cache)
    few._reference_delta = run.reference_delta()  # the reference update does not depend on the scoring timesteps
    print(f"teachers ready in {time.perf_counter() - t0:.0f} s", flush=True)
    for gen_id, path, prompt in selected:
        target = args.out / f"{gen_id}.npz"
        if target.exists():
            continue
        t0 = time.perf_counter()
        image = diffusion.read_image(path, training.limits)
        ids, fast_scores, fast_ranks, is_control = confirm._candidates(fast, settings, gen_id, image, prompt)
        delta = run.unlearn(image, prompt, gen_id)
        raw_a, inf_a = run.influence(ids, delta, run.noise_seed(gen_id))
        raw_b, inf_b = run.influence(ids, delta, run.noise_seed(gen_id, stream=1))
        raw_r, inf_r = replicate.score(image, prompt, ids, gen_id)
        raw_2a, inf_2a = few.influence(ids, delta, few.noise_seed(gen_id))
        raw_2b, inf_2b = few.influence(ids, delta, few.noise_seed(gen_id, stream=1))
        np.savez(
            target,
            ids=ids,
            fast=fast_scores,
            fast_rank=fast_ranks,
            is_control=is_control,
            raw_a=raw_a,
            inf_a=inf_a,
            raw_b=raw_b,
            inf_b=inf_b,
            raw_r=raw_r,
            inf_r=inf_r,
            raw_2a=raw_2a,
            inf_2a=inf_2a,
            raw_2b=raw_2b,
            inf_2b=inf_2b,
            prompt=np.array(prompt or ""),
        )
        print(f"generation {gen_id}: {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
