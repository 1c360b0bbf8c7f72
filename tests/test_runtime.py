"""Process-wide runtime policies: set by the programs (auditor.runtime.tune_process, which the CLI calls), never by
`import auditor`, and a user's own settings winning."""

import json
import os
import subprocess
import sys

# Allocate and free a 64 MiB block, and report how much of it stays resident, with the OpenMP policy torch will see.
PROBE = """
import json, auditor.runtime, numpy as np
auditor.runtime.tune_process()
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
a = np.ones(64 * 2**20 // 8); held = rss_mib(); del a
print(json.dumps({"kept_mib": rss_mib() - (held - 64), "omp": __import__("os").environ.get("OMP_WAIT_POLICY")}))
"""

# The same linear layers on inputs copied to addresses of other alignments: how many results differ in any bit.
ALIGNMENT = """
import json, os, auditor.runtime
auditor.runtime.tune_process()
import torch
torch.manual_seed(0)
differ = 0
for m, k, n in [(2, 64, 64), (3, 128, 128), (5, 64, 64), (7, 128, 512), (9, 256, 64), (64, 64, 128), (1000, 128, 768)]:
    a, w, bias = torch.randn(m, k), torch.randn(n, k), torch.randn(n)
    reference, buffer = torch.nn.functional.linear(a, w, bias), torch.empty(m * k + 16)
    for offset in (1, 2, 3, 5):
        moved = buffer[offset: offset + m * k].view(m, k)
        moved.copy_(a)
        differ += not torch.equal(reference, torch.nn.functional.linear(moved, w, bias))
print(json.dumps({"differ": differ, "cbwr": os.environ.get("MKL_CBWR")}))
"""


def _probe(script: str = PROBE, **env) -> dict:
    clean = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MALLOC_") and k not in ("GLIBC_TUNABLES", "OMP_WAIT_POLICY", "MKL_CBWR")
    }
    out = subprocess.run(
        [sys.executable, "-c", script], env={**clean, **env}, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout)


def test_freed_memory_stays_in_the_heap_unless_the_user_set_malloc_options():
    # Kept: the freed 64 MiB is still resident, ready for the next forward's activations.
    assert _probe()["kept_mib"] > 48
    # The user's own glibc settings win: the block goes back to the kernel as glibc's defaults would have it.
    assert _probe(MALLOC_MMAP_THRESHOLD_="131072")["kept_mib"] < 16


def test_openmp_threads_sleep_by_default_and_the_users_policy_wins():
    assert _probe()["omp"] == "PASSIVE"
    assert _probe(OMP_WAIT_POLICY="ACTIVE")["omp"] == "ACTIVE"


def test_matrix_products_do_not_depend_on_memory_alignment_and_the_users_mkl_setting_wins():
    # Without the policy MKL's kernels for few rows follow the operands' alignment (20 of these 28 products differed on
    # the 2-core machine), and training amplifies such bits into other results for the same seed (auditor/runtime.py).
    assert _probe(ALIGNMENT) == {"differ": 0, "cbwr": "AUTO,STRICT"}
    assert _probe(ALIGNMENT, MKL_CBWR="AUTO")["cbwr"] == "AUTO"


def test_importing_the_library_changes_no_process_wide_setting():
    library = """
import json, os, auditor, auditor.scan, auditor.confirm
print(json.dumps({"omp": os.environ.get("OMP_WAIT_POLICY"), "cbwr": os.environ.get("MKL_CBWR")}))
"""
    assert _probe(library) == {"omp": None, "cbwr": None}
    assert _probe(library.replace("import json, os, auditor,", "import json, os, auditor, auditor.cli,")) == {
        "omp": None,
        "cbwr": None,
    }


def test_the_cli_tunes_its_process_before_torch_loads():
    cli = """
import json, os, sys
import auditor.cli
sys.argv = ["audit", "--help"]
try:
    auditor.cli.main()
except SystemExit:
    pass
print(json.dumps({"omp": os.environ.get("OMP_WAIT_POLICY"), "cbwr": os.environ.get("MKL_CBWR"),
                  "torch": "torch" in sys.modules}))
"""
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "MKL_CBWR")}
    result = subprocess.run([sys.executable, "-c", cli], env=clean, capture_output=True, text=True, check=True)
    last = json.loads(result.stdout.strip().splitlines()[-1])
    assert last == {"omp": "PASSIVE", "cbwr": "AUTO,STRICT", "torch": False}
