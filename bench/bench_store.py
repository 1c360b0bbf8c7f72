"""DuckDB write rate of attribution rows through the store's Arrow insert path (auditor.store.Store.insert_arrow).

    python bench/bench_store.py [--quick]      # --quick: 10^5 rows (default 10^6)

Two shapes: the scan's (one transaction per batch of 64 generations x top-50 = 3,200 rows, with the
generations rows and the scan counter update, as auditor.scan.ScanLedger.commit does) and one bulk
insert of every row. Rows are built by the scan's own row builder (auditor.scan._attribution_rows).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import _common  # noqa: F401
import numpy as np
from _common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rows", type=int, default=None)
    args = parser.parse_args()
    from auditor import embed, scan
    from auditor.store import Store

    n_rows = args.rows or (100_000 if args.quick else 1_000_000)
    k, batch = 50, 64
    n_gen = n_rows // k
    rng = np.random.default_rng(0)
    work = Path(tempfile.mkdtemp(prefix="bench_store_"))
    results = []

    # The scan's shape: one transaction per batch.
    with Store(work / "batched.duckdb") as store:
        store.con.execute(
            "INSERT INTO scans (id, started_at, root, encoder_id, index_version, top_k, device, status) VALUES (1, now(), '/x', 'e', 1, 50, 'cpu', 'running')"
        )
        batches = []
        for start in range(0, n_gen, batch):
            m = min(batch, n_gen - start)
            ids = rng.integers(1, 100_000, (m, k))
            scores = np.sort(rng.random((m, k)).astype(np.float32), axis=1)[:, ::-1]
            shares = embed.softmax_shares(scores.astype(np.float64), 0.05)
            batches.append(scan._attribution_rows(list(range(start + 1, start + m + 1)), ids, scores, shares, "enc", 1))
        t0 = time.perf_counter()
        for _i, rows in enumerate(batches):
            with store.transaction():
                store.insert_arrow("attributions", rows)
                store.con.execute("UPDATE scans SET n_attributed = n_attributed + ? WHERE id = 1", [rows.num_rows // k])
        seconds = time.perf_counter() - t0
        count = store.value("SELECT count(*) FROM attributions")
    results.append(
        {
            "shape": f"per batch of {batch} generations ({batch * k} rows), one transaction each",
            "rows": count,
            "transactions": len(batches),
            "seconds": seconds,
            "rows_per_s": count / seconds,
            "ms_per_transaction": seconds / len(batches) * 1000,
        }
    )

    import pyarrow as pa

    everything = pa.concat_tables(batches)
    with Store(work / "bulk.duckdb") as store:
        t0 = time.perf_counter()
        with store.transaction():
            store.insert_arrow("attributions", everything)
        seconds = time.perf_counter() - t0
        count = store.value("SELECT count(*) FROM attributions")
    results.append(
        {
            "shape": "one bulk insert",
            "rows": count,
            "transactions": 1,
            "seconds": seconds,
            "rows_per_s": count / seconds,
            "ms_per_transaction": seconds * 1000,
        }
    )

    report(
        "bench_store",
        "DuckDB attribution writes (Store.insert_arrow)",
        ["shape", "rows", "transactions", "seconds", "rows/s", "ms/transaction"],
        [
            [
                r["shape"],
                r["rows"],
                r["transactions"],
                round(r["seconds"], 3),
                round(r["rows_per_s"]),
                round(r["ms_per_transaction"], 2),
            ]
            for r in results
        ],
        {"results": results},
    )


if __name__ == "__main__":
    main()
