"""`make demo`'s path end to end, on a reduced run over the shipped example world."""

import subprocess
import sys
from pathlib import Path

import polars as pl

ROOT = Path(__file__).resolve().parent.parent


def test_demo_reduced_run(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "demo.py"),
            "--workdir",
            str(tmp_path / "demo"),
            "--limit",
            "12",
            "--confirm",
            "1",
        ],
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    out = proc.stdout
    for command in (
        "$ audit init",
        "$ audit index",
        "$ audit scan",
        "$ audit confirm",
        "$ audit sql",
        "$ audit report",
    ):
        assert command in out
    assert "Ada Quill Studio" in out or "Bram Okafor" in out  # contributors of the world appear in the attributions
    report = tmp_path / "demo" / "report"
    assert (report / "index.html").is_file() and (report / "payouts.csv").is_file()
    payouts = pl.read_csv(report / "payouts.csv")
    assert payouts.height == 8
