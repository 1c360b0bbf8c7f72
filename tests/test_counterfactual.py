"""Leave-K-out (`audit eval counterfactual`): retraining by the model's recipe, and the check end to end on a tiny model."""

import json
import shutil

import numpy as np
import pytest
import torch

from auditor import confirm, counterfactual, diffusion, retrain
from auditor.errors import AuditError


def _inputs(model, n=24, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean, std = torch.randn((n, 4, 8, 8), generator=gen), torch.rand((n, 4, 8, 8), generator=gen) * 0.1
    tokens = diffusion.tokenize(model.tokenizer, [f"a digit {i % 10}" for i in range(n)])
    return mean, std, tokens, diffusion.tokenize(model.tokenizer, [""])


def _train(model, keep, recipe):
    mean, std, tokens, empty = _inputs(model)
    unet, text, losses = retrain.train(
        model.unet.config,
        model.text_encoder.config,
        model.scheduler,
        mean[keep],
        std[keep],
        0.18,
        tokens[keep],
        empty,
        recipe,
        steps=6,
    )
    return torch.cat([p.flatten() for p in [*unet.parameters(), *text.parameters()]]), losses


def test_retraining_depends_only_on_recipe_and_data(model, tiny_pipeline):
    recipe = retrain.Recipe.from_folder(tiny_pipeline)
    everything = np.ones(24, bool)
    fewer = everything.copy()
    fewer[[3, 7]] = False
    before = torch.get_rng_state()
    a, losses = _train(model, everything, recipe)
    assert torch.equal(torch.get_rng_state(), before)  # the caller's generator is left alone
    b, _ = _train(model, everything, recipe)
    c, _ = _train(model, fewer, recipe)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert len(losses) == 6 and all(np.isfinite(losses))


def test_cosine_schedule_warms_up_then_decays_to_the_floor():
    factors = [retrain.cosine_lr(s, 100, 10, 0.1) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(x >= y for x, y in zip(factors[10:], factors[11:]))
    assert factors[-1] == pytest.approx(0.1, abs=1e-3)


def test_a_model_without_a_recipe_cannot_be_retrained(tmp_path, tiny_pipeline):
    folder = tmp_path / "model"
    shutil.copytree(tiny_pipeline, folder)
    (folder / "auditor_training.json").write_text(json.dumps({"steps": 10}))
    with pytest.raises(AuditError, match="lacks batch_size"):
        retrain.Recipe.from_folder(folder)
    (folder / "auditor_training.json").unlink()
    with pytest.raises(AuditError, match="no auditor_training.json"):
        retrain.Recipe.from_folder(folder)


def test_counterfactual_end_to_end_on_a_tiny_model(scanned_ws):
    confirm.confirm(scanned_ws, top=2)
    report = counterfactual.counterfactual(scanned_ws, k=3, retrain_steps=8, methods=["fast", "abu"])
    names = [c.name for c in report.conditions]
    assert names == ["fast", "abu", "random", "similar"]
    assert len(report.generations) == 2
    for c in report.conditions:
        assert 3 <= c.removed <= 6  # the union of two top-3 sets
        assert len(c.per_generation) == 2
        assert all(np.isfinite(p["loss"]) and p["reference_loss"] > 0 for p in c.per_generation)
        assert c.pixel_mse[0] >= 0 and 0 <= c.embedding_distance[0] <= 2
    # The teacher's removed images are its own top-3.
    gen = report.generations[0]
    abu = next(c for c in report.conditions if c.name == "abu").per_generation[0]["removed"]
    from auditor import sql

    top = sql.query(
        scanned_ws, f"select training_id from teacher_scores where generation_id = {gen} order by teacher_rank limit 3"
    )
    assert abu == top["training_id"].to_list()
    # Retrained weights are cached per removed set: a rerun retrains nothing and measures the same.
    cached = sorted(report.folder.glob("without-*.safetensors"))
    assert len(cached) == 5  # the reference and four conditions
    stamps = [p.stat().st_mtime_ns for p in cached]
    again = counterfactual.counterfactual(scanned_ws, k=3, retrain_steps=8, methods=["fast", "abu"])
    assert [p.stat().st_mtime_ns for p in sorted(report.folder.glob("without-*.safetensors"))] == stamps
    assert [c.loss_increase for c in again.conditions] == [c.loss_increase for c in report.conditions]
    assert "AbU top-K" in counterfactual.to_markdown(report)
    assert json.loads(counterfactual.to_json(report))["k"] == 3
    assert counterfactual.from_json(counterfactual.to_json(report)) == report


def test_counterfactual_needs_teacher_scores(scanned_ws):
    with pytest.raises(AuditError, match="run `audit confirm"):
        counterfactual.counterfactual(scanned_ws, k=3, retrain_steps=4)
