"""The linear datamodeling score (auditor/lds.py): on a known linear datamodel (pure, fast), then end to end on the tiny\nmodel, where it also judges a distilled bundle (auditor/earn.py)."""

import json
import shutil

import numpy as np
import pytest

from auditor import confirm, earn, embed, lds, sql
from auditor.features import training_embeddings
from auditor.store import Store


@pytest.mark.parametrize("seed", range(3))
def test_lds_recovers_a_linear_datamodel_and_not_shuffled_scores(seed):
    rng = np.random.default_rng(seed)
    n, count = 200, 64
    effects = rng.exponential(1.0, n)  # how much each training image lowers the generation's loss
    masks = lds.subsets(n, count, 0.5, seed)
    assert masks.shape == (count, n) and (masks.sum(1) == n // 2).all()
    kept = masks.astype(float) @ effects
    losses = 10.0 - kept + 0.05 * kept.std() * rng.standard_normal(count)
    assert lds.lds(masks, effects, losses) > 0.95
    # Noisy estimates of the effects still rank the subsets well; shuffled ones say nothing.
    assert lds.lds(masks, effects + 0.3 * rng.standard_normal(n), losses) > 0.7
    shuffled = [lds.lds(masks, rng.permutation(effects), losses) for _ in range(50)]
    assert abs(np.mean(shuffled)) < 0.06 and np.std(shuffled) < 0.2
    # Scores of the wrong sign (the images that *hurt*) are anti-correlated.
    assert lds.lds(masks, -effects, losses) < -0.95


def test_subsets_are_seeded_and_differ():
    a, b = lds.subsets(50, 8, 0.5, 0), lds.subsets(50, 8, 0.5, 0)
    assert (a == b).all() and len({row.tobytes() for row in a}) == 8
    assert not (lds.subsets(50, 8, 0.5, 1) == a).all()


def _headed_bundle(encoder_dir, out, in_dim):
    """The encoder with an untrained residual head: it ranks as the untuned image ⊕ text features do (embed.py)."""
    config = json.loads((encoder_dir / embed.CONFIG_NAME).read_text())
    config.pop("format")
    head = dict(in_dim=in_dim, hidden_dims=[8], out_dim=in_dim, residual=True, weights="head.safetensors")
    head_module = embed.ProjectionHead.from_config(head)
    config.update(name="tiny-headed", head=head)
    out.mkdir(parents=True)
    for name in {
        config["image_tower"]["weights"],
        *([config["text_tower"]["weights"]] if config.get("text_tower") else []),
    }:
        shutil.copy2(encoder_dir / name, out / name)
    embed.save(out, config, {"head.safetensors": head_module.state_dict()})
    return out


def test_lds_end_to_end_cached_stored_and_judging_a_bundle(scanned_ws, tmp_path):
    confirm.confirm(scanned_ws, top=2)
    report = lds.evaluate(scanned_ws, subsets=4, retrain_steps=4)
    names = [m.name for m in report.methods]
    assert names == ["fast", "untuned", "abu", "random"] and report.generations and report.subsets == 4
    assert all(len(m.per_generation) == len(report.generations) for m in report.methods)
    stored = sql.query(
        scanned_ws, "select r.kind, e.method, e.value from eval_results e join eval_runs r on r.id = e.run_id"
    )
    assert set(stored["kind"]) == {"lds"} and set(stored["method"]) == set(names)
    # Subset models and their losses are cached: a rerun retrains nothing and measures the same.
    files = sorted(p for p in (scanned_ws.dir / "counterfactual").rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    again = lds.evaluate(scanned_ws, subsets=4, retrain_steps=4)
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert [m.lds for m in again.methods] == [m.lds for m in report.methods]
    assert "LDS" in lds.to_markdown(report)
    # Only AbU has been measured: `--method auto` has no comparison to go by and says it keeps the default.
    said = []
    again_confirmed = confirm.confirm(scanned_ws, generation=report.generations[0], method="auto", announce=said.append)
    assert again_confirmed.generations == 0  # already confirmed with the same teacher and settings
    assert said[0].startswith("--method auto: no ground-truth check has measured both teachers") and "abu" in said[0]

    # A bundle with a head is judged on the stored LDS check against its untuned baseline, and the comparison stored.
    with Store(scanned_ws.db_path, read_only=True) as store:
        _, img, txt = training_embeddings(
            scanned_ws, store, embed.load(scanned_ws.encoder_dir(), scanned_ws.device(None))
        )
    bundle = _headed_bundle(scanned_ws.encoder_dir(), tmp_path / "headed", img.shape[1] + txt.shape[1])
    judgement = earn.judge(scanned_ws, bundle, teacher_map=0.5)
    assert judgement.use and "LDS" in judgement.reason, judgement.reason
    rows = sql.query(scanned_ws, f"select method, metric from eval_results where run_id = {judgement.run_id}")
    assert set(zip(rows["method"], rows["metric"])) == {("fast", "lds"), ("untuned", "lds"), ("fast", "teacher_map")}
    # The workspace's own bundle has no head: it is its own baseline, nothing to judge.
    assert earn.judge(scanned_ws, scanned_ws.encoder_dir()).run_id is None


def test_a_bundle_that_loses_on_ground_truth_is_refused():
    # The planted figures: the shipped distilled bundle against its untuned backbone.
    lost = earn.Comparison("planted mAP", "map", (0.734, 0.057), (0.959, 0.015))
    use, why = earn.decide("enc-d", [lost])
    assert not use and "loses to its untuned baseline" in why and "0.734 ± 0.057 vs untuned 0.959 ± 0.015" in why
    level = earn.Comparison("LDS", "lds", (0.30, 0.05), (0.33, 0.05))  # within the standard errors
    assert earn.decide("enc-d", [level])[0] and not earn.decide("enc-d", [level, lost])[0]
    use, why = earn.decide("enc-d", [])
    assert use and "no ground-truth check" in why
