"""provenance auditor."""

import os as _os

# torch's OpenMP threads spin-wait between parallel regions by default (libgomp's ACTIVE policy). In a scan,
# decoding threads, DuckDB and other processes share the cores, and the spinning steals their CPU and the
# model's own: on 2 shared cores bench/bench_scan.py measured scan 54 -> 290 img/s and the bare forward
# 174 -> 356 img/s with PASSIVE (docs/benchmarks.md). It must be set before torch loads; a user's setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
