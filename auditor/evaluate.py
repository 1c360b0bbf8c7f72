"""`audit eval teacher`: how well each way of ranking training images agrees with the teacher, on held-out queries.

For every test query (split = 'test' in distill_queries) each method ranks the *whole*
training set; the positives are the teacher's top-k of that query's candidates, and
the figure is average precision over the full ranking (FastGDA's mAP@k, docs/methods.md §2),
with its standard error over queries. Recall@K: the teacher's top-1 within the
method's top K. With the teacher's replicate, the positives can come from the mean of its two
runs instead (`pooled`): twice the scoring samples per query, so less of the teacher's Monte-Carlo noise,
which lowers every method's mAP and hides part of the gap between them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import embed, metrics
from .distill import load_rankings
from .errors import AuditError
from .features import head_scores, joint, query_embeddings, training_digests, training_embeddings
from .metrics import markdown_table, mean_se
from .store import Store
from .workspace import Workspace


@dataclass
class MethodScores:
    name: str
    map_at: dict[int, tuple[float, float]]  # k → (mean, standard error)
    recall_at: dict[int, float]
    per_query: dict[int, list[float]] = field(default_factory=dict)  # k → AP of each query, for paired comparisons


def _evaluate(name: str, sims: np.ndarray, queries, ks, recall_ks) -> MethodScores:
    maps = {k: [] for k in ks}
    hits = {K: 0 for K in recall_ks}
    all_idx = np.arange(sims.shape[1])
    for row, (_, _, _, cand, ranks) in zip(sims, queries):
        ranking = all_idx[np.argsort(-row, kind="stable")]
        by_teacher = cand[np.argsort(ranks, kind="stable")]
        for k in ks:
            maps[k].append(metrics.average_precision(ranking, set(by_teacher[:k].tolist())))
        position = int(np.flatnonzero(ranking == by_teacher[0])[0]) + 1
        for K in recall_ks:
            hits[K] += position <= K
    n = len(queries)
    return MethodScores(
        name,
        {k: mean_se(v) for k, v in maps.items()},
        {K: hits[K] / n for K in recall_ks},
        maps,
    )


def evaluate(
    ws: Workspace,
    *,
    encoders: list[str | os.PathLike] | None = None,
    ks=(5, 10, 20, 50),
    recall_ks=(1, 10, 50),
    replicate: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
    pooled: bool = False,
    announce: Callable[[str], None] = lambda message: None,
) -> tuple[list[MethodScores], int]:
    """Untuned baselines (image, text, image ⊕ text of the workspace encoder's backbone) and every given bundle
    (default: the workspace's encoder), on the held-out queries; with `replicate` (distill.replicate), also the teacher
    run again with independent noise: its candidates by its own scores, then the rest by image ⊕ text. With `pooled`,
    the positives are the top-k of the mean of the teacher's run and its replicate, and the replicate is no method."""
    if pooled and replicate is None:
        raise AuditError(
            "a pooled reference needs the teacher's replicate: run `audit eval teacher --replicate --pooled`"
        )
    bundles = [Path(p) for p in (encoders or [ws.encoder_dir()])]
    base = embed.load(bundles[0], "cpu")
    with ws.reader() as store:
        ids, img, txt = training_embeddings(ws, store, base)
        digests = training_digests(store)
        index_of = {int(i): j for j, i in enumerate(ids)}
        queries, images = load_rankings(store, "test", index_of, ws.limits, announce)
        if pooled:
            queries = _pool(store, queries, replicate, ids)
    if not queries:
        raise AuditError("no held-out queries with teacher rankings; run `audit distill collect` first")
    q_img, q_txt = query_embeddings(base, queries, images)
    results = [
        _evaluate("untuned image", q_img @ img.T, queries, ks, recall_ks),
        _evaluate("untuned text", q_txt @ txt.T, queries, ks, recall_ks),
        _evaluate("untuned image ⊕ text", joint(q_img, q_txt) @ joint(img, txt).T, queries, ks, recall_ks),
    ]
    if replicate is not None and not pooled:
        backbone = joint(q_img, q_txt) @ joint(img, txt).T
        for row, (qid, *_rest) in zip(backbone, queries):
            candidates, influence = replicate[qid]
            # Above every backbone cosine (≤ 1), in the replicate's order.
            row[[index_of[int(t)] for t in candidates]] = 2.0 + np.argsort(np.argsort(influence)) / len(influence)
        results.append(_evaluate("teacher replicate (independent noise)", backbone, queries, ks, recall_ks))
    for path in bundles:
        enc = base if path == bundles[0] else embed.load(path, "cpu")
        if enc.head is None:
            continue  # its features are the untuned image ⊕ text above
        if enc.image_dim != img.shape[1] or enc.text_dim != txt.shape[1]:
            raise AuditError(f"encoder {path} has a different backbone from {bundles[0]}; evaluate them separately")
        scores = head_scores(enc, np.concatenate([q_img, q_txt], 1), np.concatenate([img, txt], 1), digests)
        results.append(_evaluate(f"distilled ({enc.name}, {enc.id})", scores, queries, ks, recall_ks))
    return results, len(queries)


def _pool(store: Store, queries, replicate: dict[int, tuple[np.ndarray, np.ndarray]], ids: np.ndarray):
    """load_rankings rows ranked by the mean influence of the teacher's run and its replicate."""
    run = {
        int(q): dict(zip(t, v))
        for q, t, v in store.rows(
            "SELECT query_id, list(training_id), list(influence) FROM distill_rankings"
            " WHERE query_id IN (SELECT id FROM distill_queries WHERE split = 'test') GROUP BY 1"
        )
    }
    pooled = []
    for qid, path, prompt, cand, _ in queries:
        training_ids = ids[cand].tolist()
        if qid not in replicate or set(replicate[qid][0].tolist()) != set(training_ids):
            raise AuditError(
                f"the teacher's replicate of held-out query {qid} does not cover its candidates; "
                "run `audit eval teacher --replicate` to score what is missing"
            )
        again = dict(zip(replicate[qid][0].tolist(), replicate[qid][1].tolist()))
        pooled.append((qid, path, prompt, cand, metrics.ranks([(run[qid][t] + again[t]) / 2 for t in training_ids])))
    return pooled


def paired_difference(a: MethodScores, b: MethodScores, k: int) -> tuple[float, float]:
    """mAP@k of a minus b, with the standard error of the per-query differences (both ranked the same queries)."""
    return mean_se(np.array(a.per_query[k]) - np.array(b.per_query[k]))


UNTUNED = "untuned "  # the name prefix of the baselines every other method has to beat


def gains_over_untuned(results: list[MethodScores]) -> dict[str, dict[int, tuple[float, float, str]]]:
    """Per method other than the untuned baselines: at each k, its mAP@k minus that of the best untuned baseline at
    that k, paired over queries: (mean, standard error, the baseline's name)."""
    untuned = [r for r in results if r.name.startswith(UNTUNED)]
    if not untuned:
        return {}
    best = {k: max(untuned, key=lambda u: u.map_at[k][0]) for k in untuned[0].map_at}
    return {
        r.name: {k: (*paired_difference(r, b, k), b.name) for k, b in best.items()}
        for r in results
        if not r.name.startswith(UNTUNED)
    }


POOLED_NOTE = "Positives: the top-k of the mean influence of the teacher's run and its replicate (pooled)."


def to_markdown(
    results: list[MethodScores], n_queries: int, n_candidates: int | None = None, pooled: bool = False
) -> str:
    ks = list(results[0].map_at)
    recall_ks = list(results[0].recall_at)
    head = ["method"] + [f"mAP@{k}" for k in ks] + [f"R@{K} (teacher top-1)" for K in recall_ks]
    rows = [
        [r.name] + [f"{m:.3f} ± {se:.3f}" for m, se in r.map_at.values()] + [f"{v:.2f}" for v in r.recall_at.values()]
        for r in results
    ]
    note = f"\n{n_queries} held-out queries (prompts never used in training); ± is the standard error over queries."
    if n_candidates:
        note += f" Teacher candidates per query: {n_candidates}."
    if pooled:
        note += " " + POOLED_NOTE
    text = markdown_table(head, rows) + "\n" + note + "\n"
    gains = gains_over_untuned(results)
    if gains:
        text += (
            "\nGain over the best untuned feature at each k (paired: mean ± standard error of the per-query differences; "
            "that feature in brackets):\n\n"
        )
        text += (
            markdown_table(
                ["method"] + [f"mAP@{k}" for k in ks],
                [
                    [name] + [f"{d:+.3f} ± {se:.3f} ({base.removeprefix(UNTUNED)})" for d, se, base in by_k.values()]
                    for name, by_k in gains.items()
                ],
            )
            + "\n"
        )
    return text


def to_json(results: list[MethodScores], n_queries: int, pooled: bool = False) -> str:
    gains = gains_over_untuned(results)
    methods = []
    for r in results:
        method = {
            "name": r.name,
            "map_at": {str(k): {"mean": m, "stderr": se} for k, (m, se) in r.map_at.items()},
            "recall_at": {str(k): v for k, v in r.recall_at.items()},
        }
        if r.name in gains:
            method["gain_over_best_untuned"] = {
                str(k): {"mean": d, "stderr": se, "baseline": base} for k, (d, se, base) in gains[r.name].items()
            }
        methods.append(method)
    return json.dumps({"queries": n_queries, "reference": "pooled" if pooled else "run", "methods": methods}, indent=2)
