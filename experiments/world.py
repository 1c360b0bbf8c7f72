"""A workspace on the example world, shared by the scripts that measure it (distill.py, planted.py, counterfactual.py)."""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent.parent))

from auditor import workspace  # noqa: E402
from auditor.scan import scan  # noqa: E402
from auditor.training import index_training  # noqa: E402


def open_workspace(root: Path, *, scan_outputs: bool = False) -> workspace.Workspace:
    """The workspace at root, made on first use: the world's encoder and model, its training set indexed (and its
    outputs scanned when asked). A later call reopens it as it was, so the scripts resume."""
    root = root.resolve()
    if (root / ".audit").is_dir():
        return workspace.load(root)
    ws = workspace.init(root, encoder=HERE / "encoder", model=HERE / "model")
    index_training(ws, HERE / "training")
    if scan_outputs:
        scan(ws, HERE / "outputs")
    return ws
