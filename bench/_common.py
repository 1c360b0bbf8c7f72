"""Shared by the bench scripts: machine description, one table printed, JSON written to bench/results/<name>.json."""

from __future__ import annotations

import datetime
import json
import os
import platform
from pathlib import Path

from auditor import runtime

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
WORLD = ROOT / "examples" / "digits_world"
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Benchmarks measure the product as the CLI runs it: the same thread and allocator tuning, before torch loads.
runtime.tune_process()
LOAD_AT_START = [round(x, 2) for x in os.getloadavg()]  # 1/5/15-minute load: the machine is shared


def machine() -> dict:
    cpu = next(
        (line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
        platform.processor(),
    )
    mem = next((int(line.split()[1]) for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    import torch

    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "ram_gib": round(mem / 2**20, 1),
        "load_average_at_start": LOAD_AT_START,
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def report(name: str, title: str, columns: list[str], rows: list[list], data: dict) -> Path:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(f"{v:.4g}" if isinstance(v, float) else str(v) for v in row))
    Console(width=160).print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(
        json.dumps(
            {"name": name, "machine": machine(), "columns": columns, "rows": rows, **data}, indent=2, default=str
        )
        + "\n"
    )
    print(f"written {path.relative_to(ROOT)}")
    return path


def percentile(values, q: float) -> float:
    import numpy as np

    return float(np.percentile(np.asarray(values, float), q))
