"""Process-wide tuning for the programs this package runs: the `audit` CLI, the benchmarks and the experiments.

`import auditor` changes nothing in the process of a library user; the CLI calls `tune_process()` when it starts,
before torch loads, and so do the scripts in bench/ and experiments/. Every setting leaves a user's own alone.
"""

import ctypes
import os
import sys

# Read when this module is first imported, before tune_process sets its own default.
_user_omp_policy = "OMP_WAIT_POLICY" in os.environ
_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")


def tune_process() -> None:
    """Threads that sleep, reproducible MKL products and a heap that keeps freed blocks (measured in
    docs/benchmarks.md). The OpenMP and MKL settings only take effect before torch loads and calls MKL."""
    # torch's OpenMP threads spin-wait between parallel regions by default (libgomp's ACTIVE policy). In a scan,
    # decoding threads, DuckDB and other processes share the cores, and the spinning steals their CPU and the
    # model's own (bench/bench_scan.py: scan 54 -> 290 img/s and the bare forward 174 -> 356 img/s with PASSIVE).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    # MKL chooses its kernels by the operands' memory alignment, so two processes whose heaps had other histories
    # could multiply the same matrices to results that differ in the last bits, which training amplified into held-out
    # gains up to 0.01 apart for the same seed. Strict conditional numerical reproducibility makes MKL's results
    # independent of alignment, at no measured cost.
    os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
    # glibc returns every freed block above its mmap threshold (at most 32 MiB) to the kernel, so a full-size
    # encoder's activations are mapped and page-faulted afresh in every forward (48-50 ms/img against 42 ms/img with
    # the heap kept, ViT-B/32 on 2 cores). Keeping freed memory costs nothing at peak (the high-water mark either way).
    if sys.platform.startswith("linux") and not any(name in os.environ for name in _MALLOC_SETTINGS):
        try:
            mallopt = ctypes.CDLL("libc.so.6").mallopt
        except (OSError, AttributeError):  # not glibc
            return
        m_trim_threshold, m_mmap_threshold = -1, -3
        mallopt(m_mmap_threshold, 1 << 30)
        mallopt(m_trim_threshold, (1 << 31) - 1)


def prefer_spinning_threads() -> None:
    """For commands dominated by training (bf16 autocast, many small parallel regions), where sleeping threads cost
    more than they save: retraining the example world's model ran at 1.7 s/step ACTIVE vs 5.2 s/step PASSIVE on 2
    shared cores. Only effective before torch loads, and never over a user's own setting."""
    if not _user_omp_policy and "torch" not in sys.modules:
        os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
