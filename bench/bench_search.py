"""LanceDB IVF_PQ search (auditor.search.VectorTable): latency p50/p95 and recall@50 vs exact, index build time,
and recall after appends (the exact delta, then the rebuild), on synthetic clustered vectors.

    python bench/bench_search.py [--quick]      # --quick: 10^5 vectors only (default: 10^5 and 10^6)

Vectors: the encoder's dimension (examples/digits_world/encoder: 256; else 64), drawn around n/1000 random
centres with a per-cluster spread, L2-normalised (random vectors make recall meaningless: every neighbour
is about as far as every other). Queries: 200 fresh draws from the same mixture. Truth: exact cosine top-50
by numpy. Latency: one query per call ("single") and per query within batches of 64 ("batch64"), both as
the scan calls it (`AnnSearcher.search`). A grid of (nprobes, refine_factor) shows the trade-off; the
workspace defaults (auditor/config.py IndexSettings) are marked.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
import numpy as np
from _common import WORLD, percentile, report

K = 50
GRID = [(10, 10), (20, 5), (20, 10), (20, 20), (40, 10), (40, 20), (80, 20)]


def clustered(n: int, dim: int, centres: np.ndarray, spread: np.ndarray, rng) -> np.ndarray:
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        which = rng.integers(len(centres), size=m)
        x = centres[which] + spread[which, None] * rng.standard_normal((m, dim), dtype=np.float32)
        out[start : start + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def exact_top(queries: np.ndarray, vectors: np.ndarray, k: int = K) -> np.ndarray:
    """Row indices of the exact top-k (cosine = dot of normalised vectors), chunked to bound memory."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), 200_000):
        s = queries @ vectors[start : start + 200_000].T
        top = np.argpartition(-s, k - 1, axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(s, top, 1)], 1)
        best_i = np.concatenate([best_i, top + start], 1)
        keep = np.argpartition(-best_s, k - 1, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall(found_ids: np.ndarray, truth_ids: np.ndarray) -> float:
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / len(t) for f, t in zip(found_ids, truth_ids)]))


def measure(searcher, queries: np.ndarray, truth_ids: np.ndarray) -> dict:
    single, found = [], []
    searcher.search(queries[:1], K)  # warm-up
    for q in queries:
        t0 = time.perf_counter()
        ids, _ = searcher.search(q[None], K)
        single.append((time.perf_counter() - t0) * 1000)
        found.append(ids[0])
    batch = []
    for start in range(0, len(queries) - 63, 64):
        t0 = time.perf_counter()
        searcher.search(queries[start : start + 64], K)
        batch.append((time.perf_counter() - t0) * 1000 / 64)
    return {
        "recall_at_50": recall(np.stack(found), truth_ids),
        "single_ms_p50": percentile(single, 50),
        "single_ms_p95": percentile(single, 95),
        "batch64_ms_per_query_p50": percentile(batch, 50),
        "batch64_ms_per_query_p95": percentile(batch, 95),
    }


def encoder_dim() -> int:
    bundle = WORLD / "encoder"
    if (bundle / "encoder.json").is_file():
        from auditor import embed

        return embed.load(bundle, "cpu").dim
    return 64


def run_size(
    n: int,
    dim: int,
    work: Path,
    queries_n: int,
    append: bool,
    seed: int = 0,
    grid=GRID,
    sub_vectors: int = 0,
    partitions: int = 0,
) -> tuple[list[dict], dict]:
    from auditor.config import IndexSettings
    from auditor.search import AnnSearcher, ExactSearcher, VectorTable

    rng = np.random.default_rng(seed)
    clusters = max(10, n // 1000)
    centres = rng.standard_normal((clusters, dim), dtype=np.float32)
    spread = rng.uniform(0.25, 0.5, clusters).astype(np.float32)
    vectors = clustered(n, dim, centres, spread, rng)
    queries = clustered(queries_n, dim, centres, spread, rng)
    ids = np.arange(1, n + 1)

    defaults = IndexSettings()
    settings = IndexSettings(ann_threshold=1, num_sub_vectors=sub_vectors, num_partitions=partitions)
    table = VectorTable(str(work / f"lance_{n}_{sub_vectors}_{partitions}"), f"bench{n}", dim, settings)
    t0 = time.perf_counter()
    for start in range(0, n, 100_000):
        table.add(
            ids[start : start + 100_000], ["c"] * len(ids[start : start + 100_000]), vectors[start : start + 100_000]
        )
    insert_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    table.maintain()
    build_s = time.perf_counter() - t0
    stats = table.table.index_stats(table._index_name())
    t0 = time.perf_counter()
    truth = ids[exact_top(queries, vectors)]
    truth_s = time.perf_counter() - t0

    rows = []
    exact = measure(ExactSearcher(table), queries, truth)
    rows.append({"n": n, "search": "exact (numpy)", "nprobes": None, "refine_factor": None, **exact})
    for nprobes, refine in grid:
        table.settings.nprobes, table.settings.refine_factor = nprobes, refine
        result = measure(AnnSearcher(table), queries, truth)
        is_default = (nprobes, refine) == (defaults.nprobes, defaults.refine_factor)
        label = "IVF_PQ" + (f" pq{sub_vectors}" if sub_vectors else "") + (f" ivf{partitions}" if partitions else "")
        rows.append(
            {
                "n": n,
                "search": label + (" (default)" if is_default and not sub_vectors and not partitions else ""),
                "nprobes": nprobes,
                "refine_factor": refine,
                **result,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    info = {
        "n": n,
        "dim": dim,
        "clusters": clusters,
        "insert_s": insert_s,
        "index_build_s": build_s,
        "exact_truth_s": truth_s,
        "num_partitions": stats.num_indices if hasattr(stats, "num_indices") else None,
        "index_stats": {
            k: getattr(stats, k)
            for k in ("index_type", "num_indexed_rows", "num_unindexed_rows", "distance_type")
            if hasattr(stats, k)
        },
    }
    try:
        info["num_partitions"] = int(
            table.table.to_lance().stats.index_stats(table._index_name())["indices"][0]["num_partitions"]
        )
    except Exception:
        info["num_partitions"] = None

    if append:  # incremental training data: rows appended after the index was built
        table.settings.nprobes, table.settings.refine_factor = defaults.nprobes, defaults.refine_factor
        table.settings.rebuild_fraction = defaults.rebuild_fraction
        after = []
        all_vectors, next_id = vectors, n + 1
        for label, fraction in (("+10% appended (exact delta)", 0.10), ("+25% appended (rebuilt)", 0.15)):
            extra = clustered(int(n * fraction), dim, centres, spread, rng)
            extra_ids = np.arange(next_id, next_id + len(extra))
            table.add(extra_ids, ["c"] * len(extra), extra)
            next_id += len(extra)
            all_vectors = np.concatenate([all_vectors, extra])
            t0 = time.perf_counter()
            table.maintain()
            maintain_s = time.perf_counter() - t0
            stats = table.table.index_stats(table._index_name())
            truth_all = exact_top(queries, all_vectors) + 1
            result = measure(AnnSearcher(table), queries, truth_all)
            after.append(
                {
                    "n": n,
                    "search": f"IVF_PQ default, {label}",
                    "nprobes": defaults.nprobes,
                    "refine_factor": defaults.refine_factor,
                    "rows": int(table.count()),
                    "indexed": int(stats.num_indexed_rows),
                    "unindexed": int(stats.num_unindexed_rows),
                    "maintain_s": maintain_s,
                    **result,
                }
            )
            print(json.dumps(after[-1]), flush=True)
        rows += after
    return rows, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="10^5 vectors only")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--dim", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument(
        "--sub-vectors", type=int, default=0, help="IVF_PQ num_sub_vectors (0: the workspace default, dim/8)"
    )
    parser.add_argument("--partitions", type=int, default=0, help="IVF_PQ num_partitions (0: the workspace default)")
    parser.add_argument("--grid", default=None, help='(nprobes,refine) pairs, e.g. "10,10 20,20"')
    parser.add_argument("--no-append", action="store_true", help="skip the append / rebuild measurement")
    parser.add_argument("--name", default="bench_search", help="results file name (bench/results/NAME.json)")
    args = parser.parse_args()
    grid = [tuple(int(x) for x in pair.split(",")) for pair in args.grid.split()] if args.grid else GRID
    sizes = args.sizes or ([100_000] if args.quick else [100_000, 1_000_000])
    dim = args.dim or encoder_dim()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="bench_search_"))
    work.mkdir(parents=True, exist_ok=True)
    rows, infos = [], []
    for n in sizes:
        size_rows, info = run_size(
            n,
            dim,
            work,
            args.queries,
            append=(n == min(sizes)) and not args.no_append,
            grid=grid,
            sub_vectors=args.sub_vectors,
            partitions=args.partitions,
        )
        rows += size_rows
        infos.append(info)
        print(json.dumps(info), flush=True)
    table_rows = [
        [
            r["n"],
            r["search"],
            r["nprobes"] or "",
            r["refine_factor"] or "",
            round(r["recall_at_50"], 4),
            round(r["single_ms_p50"], 2),
            round(r["single_ms_p95"], 2),
            round(r["batch64_ms_per_query_p50"], 2),
            round(r["batch64_ms_per_query_p95"], 2),
        ]
        for r in rows
    ]
    report(
        args.name,
        f"vector search, dim {dim}, top-{K}, {args.queries} queries",
        [
            "vectors",
            "search",
            "nprobes",
            "refine",
            "recall@50",
            "single p50 ms",
            "single p95 ms",
            "batch64 p50 ms/q",
            "batch64 p95 ms/q",
        ],
        table_rows,
        {"dim": dim, "k": K, "queries": args.queries, "results": rows, "sizes": infos},
    )


if __name__ == "__main__":
    main()
