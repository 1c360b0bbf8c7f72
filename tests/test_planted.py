"""`audit eval planted`: the AbC-style benchmark runs end to end on the tiny model and leaves the workspace as it was."""

import json

import numpy as np
from PIL import Image

from auditor import exemplar_styles

from .helpers import audit, sql_value


def test_recolour_moves_an_image_into_the_new_palette():
    alpha = np.zeros((8, 8))
    alpha[2:6, 3:5] = 1.0
    alpha[2, 2] = 0.5
    old_ink, old_paper = np.array([200, 30, 30]), np.array([250, 240, 215])
    image = Image.fromarray((alpha[..., None] * old_ink + (1 - alpha[..., None]) * old_paper).round().astype(np.uint8))
    out = np.asarray(exemplar_styles.recolour(image, (0, 200, 0), (0, 0, 100)), float)
    expected = alpha[..., None] * np.array([0, 200, 0]) + (1 - alpha[..., None]) * np.array([0, 0, 100])
    assert np.abs(out - expected).max() <= 2


def test_restroke_keeps_the_palette_and_changes_the_strokes():
    alpha = np.zeros((8, 8))
    alpha[1:7, 1] = 1.0  # a bar on the left
    ink, paper = np.array([20, 40, 200]), np.array([255, 255, 255])
    image = Image.fromarray((alpha[..., None] * ink + (1 - alpha[..., None]) * paper).round().astype(np.uint8))
    mirrored = np.asarray(exemplar_styles.restroke(image, dict(exemplar_styles.NEW_STROKES)["mirrored"]), float)
    assert np.abs(mirrored[1:7, 6] - ink).max() <= 1 and np.abs(mirrored[:, 1] - paper).max() <= 1
    bold = np.asarray(exemplar_styles.restroke(image, dict(exemplar_styles.NEW_STROKES)["bold"]), float)
    assert np.abs(bold[3, 2] - ink).max() <= 1 and np.abs(bold[3, 5] - paper).max() <= 1


def test_planted_benchmark_end_to_end(indexed_ws, cheap_teacher, outputs_dir, tmp_path):
    ws = cheap_teacher(indexed_ws)
    ws.config.dtrak = ws.config.dtrak.override(dim=128, timesteps=2, batch_size=32)
    ws.config.planted = ws.config.planted.override(
        exemplars=2, steps=4, batch_size=4, candidates=10, kernel_samples=12, prior_samples=8, sample_steps=2
    )
    ws.save()
    n_train = sql_value(ws, "select count(*) from training_images")
    lance_before = sorted(p.name for p in (ws.dir / "lancedb").iterdir())

    audit(
        "eval",
        "planted",
        "--exemplars",
        outputs_dir,
        "--style",
        "stroke",
        "--tune",
        "all",
        "--customisations",
        2,
        "--generations",
        2,
        "--out",
        tmp_path / "out",
        ws=ws,
    )
    report = json.loads((tmp_path / "out" / "planted.json").read_text())
    names = [m["name"] for m in report["methods"]]
    assert names[1:] == ["untuned image", "untuned image ⊕ text", "AbU (candidates)", "D-TRAK (candidates)"]
    assert names[0].startswith("fast (")
    assert report["queries"] == 4 and report["training"] == n_train + 2 * 2
    for m in report["methods"]:
        assert 0 <= m["map"]["mean"] <= 1
        assert set(m["recall_at"]) == {"5", "10", "100"} and all(0 <= r["mean"] <= 1 for r in m["recall_at"].values())
    # The teachers' candidates (fast top 10 + the exemplars) always hold the exemplars: all found within K = 100.
    assert all(m["recall_at"]["100"]["mean"] == 1 for m in report["methods"][3:])
    markdown = (tmp_path / "out" / "planted.md").read_text()
    assert all(name in markdown for name in names) and "candidates" in markdown

    # The workspace's index and store are untouched; the scratch work is in .audit/planted.
    assert sql_value(ws, "select count(*) from training_images") == n_train
    assert sorted(p.name for p in (ws.dir / "lancedb").iterdir()) == lance_before
    run_dir = next((ws.dir / "planted").iterdir())
    assert len(list(run_dir.glob("c*/exemplar_*.png"))) == 4 and len(list(run_dir.glob("c*/generated_*.png"))) == 4


def test_planted_needs_exemplars(indexed_ws):
    proc = audit("eval", "planted", ws=indexed_ws, check=False)
    assert proc.returncode == 1 and "--exemplars" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
