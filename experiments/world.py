"""The example world, and a workspace on it, shared by the experiments that measure it (distill, planted, prompt_curve,
scoring_noise, counterfactual, teacher_signal).

The experiments read the world's data, models, encoders and collections from examples/digits_world/ (WORLD) and write
what they measure into their own folder, experiments/<name>/.
"""

from __future__ import annotations

from pathlib import Path

from auditor import workspace
from auditor.index import index_training
from auditor.scan import scan

ROOT = Path(__file__).resolve().parent.parent
WORLD = ROOT / "examples" / "digits_world"


def open_workspace(root: Path, *, scan_outputs: bool = False) -> workspace.Workspace:
    """The workspace at root, made on first use: the world's encoder and model, its training set indexed (and its
    outputs scanned when asked). A later call reopens it as it was, so the scripts resume."""
    root = root.resolve()
    if (root / ".audit").is_dir():
        return workspace.load(root)
    ws = workspace.init(root, encoder=WORLD / "encoder", model=WORLD / "model")
    index_training(ws, WORLD / "training")
    if scan_outputs:
        scan(ws, WORLD / "outputs")
    return ws
