"""`--engine ray` on two Ray nodes of this machine (tests/ray_cluster.py: one CPU each): wall time of index and scan
of the test world (120 training images in chunks of 60, 24 outputs, batches of 8), LanceDB in a local folder.
Ray's fixed costs (actors, each loading the encoder) dominate at this size; the figure tracks them.

    PYTHONPATH=. python bench/bench_ray.py
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import _common  # noqa: F401  (HF offline, process tuning)
from _common import LOAD_AT_START, report


def main() -> None:
    from auditor import engine_ray, workspace
    from auditor.index import index_training
    from auditor.scan import scan
    from tests import ray_cluster, small_world

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        encoder = small_world.build_encoder(root / "encoder")
        training, outputs = small_world.build_training(root / "training"), small_world.build_outputs(root / "outputs")
        ws = workspace.init(root / "ws", encoder=encoder)
        engine_ray.INDEX_CHUNK = 60
        with ray_cluster.two_nodes():
            started = time.perf_counter()
            index_training(ws, training, batch_size=8, engine="ray")
            indexed = time.perf_counter()
            scan(ws, outputs, top_k=5, batch_size=8, engine="ray")
            scanned = time.perf_counter()
    rows = [["index (120 images, 2 chunks)", indexed - started], ["scan (24 images)", scanned - indexed]]
    rows.append(["index + scan", scanned - started])
    report("bench_ray", "--engine ray on two local nodes, seconds", ["stage", "seconds"], rows, {"load": LOAD_AT_START})


if __name__ == "__main__":
    main()
