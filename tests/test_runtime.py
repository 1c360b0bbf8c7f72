"""Process-wide runtime policies set by `import auditor` (auditor/__init__.py), and a user's own settings winning."""

import json
import os
import subprocess
import sys

# Allocate and free a 64 MiB block, and report how much of it stays resident, with the OpenMP policy torch will see.
PROBE = """
import json, auditor, numpy as np
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
a = np.ones(64 * 2**20 // 8); held = rss_mib(); del a
print(json.dumps({"kept_mib": rss_mib() - (held - 64), "omp": __import__("os").environ.get("OMP_WAIT_POLICY")}))
"""


def _probe(**env) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "OMP_WAIT_POLICY")}
    out = subprocess.run([sys.executable, "-c", PROBE], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_freed_memory_stays_in_the_heap_unless_the_user_set_malloc_options():
    # Kept: the freed 64 MiB is still resident, ready for the next forward's activations.
    assert _probe()["kept_mib"] > 48
    # The user's own glibc settings win: the block goes back to the kernel as glibc's defaults would have it.
    assert _probe(MALLOC_MMAP_THRESHOLD_="131072")["kept_mib"] < 16


def test_openmp_threads_sleep_by_default_and_the_users_policy_wins():
    assert _probe()["omp"] == "PASSIVE"
    assert _probe(OMP_WAIT_POLICY="ACTIVE")["omp"] == "ACTIVE"
