"""provenance auditor."""

import os as _os
import sys as _sys

# torch's OpenMP threads spin-wait between parallel regions by default (libgomp's ACTIVE policy). In a scan,
# decoding threads, DuckDB and other processes share the cores, and the spinning steals their CPU and the
# model's own: on 2 shared cores bench/bench_scan.py measured scan 54 -> 290 img/s and the bare forward
# 174 -> 356 img/s with PASSIVE (docs/benchmarks.md). It must be set before torch loads; a user's setting wins.
_USER_OMP_POLICY = "OMP_WAIT_POLICY" in _os.environ
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def prefer_spinning_threads() -> None:
    """For commands dominated by training (bf16 autocast, many small parallel regions), where sleeping threads cost
    more than they save: retraining the example world's model ran at 1.7 s/step ACTIVE vs 5.2 s/step PASSIVE on 2
    shared cores. Only effective before torch loads, and never over a user's own setting."""
    if not _USER_OMP_POLICY and "torch" not in _sys.modules:
        _os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
