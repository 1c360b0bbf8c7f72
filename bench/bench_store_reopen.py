"""What a batch commit costs when the writer closes and reopens the store around it, by store size.

    python bench/bench_store_reopen.py [--quick] [--sizes 0 1000000 5000000] [--batches 20]

The scan's commit shape (64 generations x top-50 = 3,200 attribution rows and the counter update in one
transaction, rows from auditor.scan._attribution_rows) on a store prefilled with N attribution rows, three ways:
the connection held (what a scan does with no reader waiting), opened and closed around every commit (DuckDB
checkpoints the WAL on close; what a scan does for each batch that a reader is waiting at), and a reader's
read-only open + count(*) + close. Median ms per batch, split into open / commit / close. This is why the scan
lets go only when a reader waits (auditor/store.py) instead of around every batch.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
import duckdb
import numpy as np
import pyarrow as pa
from _common import report

K, BATCH = 50, 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 0 and 10^6")
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--batches", type=int, default=20, help="batches timed per way")
    args = parser.parse_args()
    from auditor import embed, scan
    from auditor.store import Store

    sizes = args.sizes or ([0, 1_000_000] if args.quick else [0, 1_000_000, 5_000_000])
    rng = np.random.default_rng(0)
    next_gen = [1]

    def batch_rows(m: int = BATCH) -> pa.Table:
        start = next_gen[0]
        next_gen[0] += m
        ids = rng.integers(1, 100_000, (m, K))
        scores = np.sort(rng.random((m, K)).astype(np.float32), axis=1)[:, ::-1]
        shares = embed.softmax_shares(scores.astype(np.float64), 0.05)
        return scan._attribution_rows(list(range(start, start + m)), ids, scores, shares, "enc", 1)

    def commit(con: duckdb.DuckDBPyConnection, rows: pa.Table) -> None:
        # As ScanLedger.commit through Store.transaction / insert_arrow.
        con.execute("BEGIN TRANSACTION")
        con.register("_incoming", rows)
        columns = ", ".join(rows.column_names)
        con.execute(f"INSERT INTO attributions ({columns}) SELECT {columns} FROM _incoming")
        con.unregister("_incoming")
        con.execute("UPDATE scans SET n_attributed = n_attributed + ? WHERE id = 1", [BATCH])
        con.execute("COMMIT")

    results = []
    for size in sizes:
        next_gen[0] = 1
        path = Path(tempfile.mkdtemp(prefix="bench_reopen_")) / "audit.duckdb"
        with Store(path) as store:
            store.con.execute(
                "INSERT INTO scans (id, started_at, root, encoder_id, index_version, top_k, device, status)"
                " VALUES (1, now(), '/x', 'e', 1, 50, 'cpu', 'running')"
            )
            for _ in range(0, size, 1_000_000):
                chunk = min(1_000_000, size)
                store.insert_arrow(
                    "attributions", pa.concat_tables([batch_rows() for _ in range(chunk // (BATCH * K))])
                )
        for way in ("held", "reopen", "reader"):
            times = {"open": [], "commit": [], "close": []}
            held = duckdb.connect(str(path)) if way == "held" else None
            for _ in range(args.batches):
                t0 = time.perf_counter()
                # What the scan's reopen does (Store.con after letting readers in): connect, no migration.
                con = held or duckdb.connect(str(path), read_only=way == "reader")
                t1 = time.perf_counter()
                if way == "reader":
                    con.execute("SELECT count(*) FROM attributions").fetchall()
                else:
                    commit(con, batch_rows())
                t2 = time.perf_counter()
                if held is None:
                    con.close()
                t3 = time.perf_counter()
                times["open"].append(t1 - t0)
                times["commit"].append(t2 - t1)
                times["close"].append(t3 - t2)
            if held is not None:
                held.close()
            ms = {k: statistics.median(v) * 1000 for k, v in times.items()}
            results.append({"store_rows": size, "way": way, **{f"{k}_ms": v for k, v in ms.items()}})
            results[-1]["total_ms"] = sum(ms.values())
        results[-1]["file_mb"] = path.stat().st_size / 1e6

    report(
        "bench_store_reopen",
        f"per-batch store cost: held vs reopened ({BATCH} x top-{K} rows per commit; median ms)",
        ["attribution rows in store", "way", "open", "commit / query", "close", "total"],
        [
            [r["store_rows"], r["way"], *(round(r[f"{k}_ms"], 1) for k in ("open", "commit", "close", "total"))]
            for r in results
        ],
        {"results": results, "batch": BATCH, "top_k": K},
    )


if __name__ == "__main__":
    main()
