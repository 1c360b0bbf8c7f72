"""provenance auditor."""

import ctypes as _ctypes
import os as _os
import sys as _sys

# torch's OpenMP threads spin-wait between parallel regions by default (libgomp's ACTIVE policy). In a scan,
# decoding threads, DuckDB and other processes share the cores, and the spinning steals their CPU and the
# model's own: on 2 shared cores bench/bench_scan.py measured scan 54 -> 290 img/s and the bare forward
# 174 -> 356 img/s with PASSIVE (docs/benchmarks.md). It must be set before torch loads; a user's setting wins.
_USER_OMP_POLICY = "OMP_WAIT_POLICY" in _os.environ
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# MKL chooses its kernels by the operands' memory alignment, so two processes whose heaps had other histories could
# multiply the same matrices to results that differ in the last bits: query text embeddings differed by 3e-8 between a
# process that had just imported a distillation collection and one that reopened it, and training amplified that into
# held-out gains up to 0.01 apart for the same seed. Strict conditional numerical reproducibility makes MKL's results
# independent of alignment, at no measured cost (54 s vs 57 s for an embedding pass and two training epochs on 2
# cores). MKL reads it at its first call; a user's setting wins.
_os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")


# glibc returns every freed block above its mmap threshold (at most 32 MiB by default) to the kernel, so a full-size
# encoder's activations (a ViT-B/32 MLP at batch 64 is 39 MiB per layer) are mapped and page-faulted afresh in every
# forward: the CPU forward ran at 48-50 ms/img against 42 ms/img with the heap kept (bench_scan.py's model, 2 cores).
# Keeping freed memory in the heap costs nothing at peak (it is the high-water mark either way). A user's own malloc
# settings win; other C libraries are left alone.
_MALLOC_SETTINGS = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "GLIBC_TUNABLES")
if _sys.platform.startswith("linux") and not any(name in _os.environ for name in _MALLOC_SETTINGS):
    try:
        _mallopt = _ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        pass
    else:
        _M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
        _mallopt(_M_MMAP_THRESHOLD, 1 << 30)
        _mallopt(_M_TRIM_THRESHOLD, (1 << 31) - 1)


def prefer_spinning_threads() -> None:
    """For commands dominated by training (bf16 autocast, many small parallel regions), where sleeping threads cost
    more than they save: retraining the example world's model ran at 1.7 s/step ACTIVE vs 5.2 s/step PASSIVE on 2
    shared cores. Only effective before torch loads, and never over a user's own setting."""
    if not _USER_OMP_POLICY and "torch" not in _sys.modules:
        _os.environ["OMP_WAIT_POLICY"] = "ACTIVE"
