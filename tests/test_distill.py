"""distill + eval: the head learns a teacher's ranking, shares are calibrated, the pipeline runs end to end."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from auditor import distill, embed, evaluate, features, metrics, sql, workspace
from auditor.config import DistillSettings
from auditor.distill import collecting, fitting
from auditor.errors import AuditError
from auditor.scan import scan
from auditor.store import Store

from .helpers import sql_value


def _synthetic(n_train=100, n_queries=300, dim=16, true_dim=4, candidates=100, seed=0, strengths=None, query_turn=None):
    """A ranking problem whose true embedding is known: the teacher ranks by cosine after a hidden projection
    (times a per-training-item strength, when given; with the queries' projection turned by `query_turn`, when given)."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((dim, true_dim))
    t = rng.standard_normal((n_train, dim)).astype(np.float32)
    q = rng.standard_normal((n_queries, dim)).astype(np.float32)

    def true_sims(a, b):
        a, b = a @ w @ (np.eye(true_dim) if query_turn is None else query_turn), b @ w
        return (a / np.linalg.norm(a, axis=1, keepdims=True)) @ (b / np.linalg.norm(b, axis=1, keepdims=True)).T

    sims = true_sims(q, t) * (1.0 if strengths is None else strengths[None, :])
    cands, ranks = [], []
    for row in sims:
        # Candidates in random order (the backbone knows nothing); the teacher ranks them by the hidden similarity.
        # Every training item is a candidate, so a perfect embedding scores mAP = 1 over the full ranking.
        c = rng.choice(n_train, candidates, replace=False)
        order = np.argsort(-row[c])
        r = np.empty(candidates, int)
        r[order] = np.arange(1, candidates + 1)
        cands.append(c)
        ranks.append(r)
    return q, t, cands, ranks


def _split(q, cands, ranks, at):
    """Fit and validation Rankings: the queries before `at`, and from `at` on."""
    return (
        distill.Rankings(q[:at], cands[:at], ranks[:at]),
        distill.Rankings(q[at:], cands[at:], ranks[at:]),
    )


def _small_head(**overrides) -> DistillSettings:
    """A small, deterministic head (no dropout, no LayerNorm) for synthetic rankings; long runs unless overridden."""
    base = dict(
        hidden_dims=(64,),
        out_dim=16,
        dropout=0.0,
        layernorm=False,
        epochs=80,
        batch_size=512,
        lr=3e-3,
        patience=15,
        k=5,
    )
    return DistillSettings(**{**base, **overrides})


def _raw_cosine_map(val, t, k):
    from auditor import metrics

    qn = val.query_features / np.linalg.norm(val.query_features, axis=1, keepdims=True)
    tn = t / np.linalg.norm(t, axis=1, keepdims=True)
    sims = qn @ tn.T
    return np.mean(
        [
            metrics.average_precision(np.argsort(-row), set(c[np.argsort(r)[:k]].tolist()))
            for row, c, r in zip(sims, val.candidates, val.ranks)
        ]
    )


def test_head_recovers_a_known_ranking_embedding():
    q, t, cands, ranks = _synthetic()
    train, val = _split(q, cands, ranks, 240)
    s = _small_head()
    raw = _raw_cosine_map(val, t, 5)
    fit = distill.fit_head(train, val, t, s)
    print(f"val mAP@5: raw cosine {raw:.3f} → distilled {fit.best_val_map:.3f} after {fit.epochs} epochs")
    assert fit.best_val_map >= 0.9
    assert fit.best_val_map > raw + 0.3


def test_validation_scores_and_the_fit_keeps_the_weights_moving_average():
    q, t, cands, ranks = _synthetic(n_queries=120)
    train, val = _split(q, cands, ranks, 90)
    s = _small_head(hidden_dims=(32,), epochs=4, batch_size=256, patience=10, strengths=False)
    plain, averaged = (distill.fit_head(train, val, t, replace(s, ema=ema)) for ema in (0.0, 0.9))
    # The same optimisation (same seed); only what validation sees and the fit keeps differs after the first step.
    assert plain.history[0]["val_map"] == averaged.history[0]["val_map"] and plain.epochs > 0 and averaged.epochs > 0
    assert any(
        not torch.equal(a, b) for a, b in zip(plain.head.state_dict().values(), averaged.head.state_dict().values())
    )
    for fit in (plain, averaged):  # the head kept is the one validation scored
        assert fitting._val_map(fit.head, val, torch.as_tensor(t), s.k) == pytest.approx(fit.best_val_map)


def test_the_shipped_head_is_refit_on_fit_and_validation_queries_for_the_epochs_validation_picked():
    q, t, cands, ranks = _synthetic(n_train=2000, n_queries=120, candidates=10)
    train, val = _split(q, cands, ranks, 90)
    s = _small_head(hidden_dims=(32,), epochs=8, batch_size=256, patience=10, negatives=0.0)
    rows = []
    selected, final = distill.fit(train, val, t, s, rows.append)
    assert selected.epochs > 0 and final.epochs == selected.epochs
    assert [r["epoch"] for r in rows if r.get("refit")] == list(range(1, selected.epochs + 1))
    assert len([r for r in rows if not r.get("refit")]) == len(selected.history) - 1
    # The refit fitted the validation queries: their candidates got strengths, and the head is not one trained on the
    # fit queries alone for as long.
    only_val = np.setdiff1d(np.concatenate(val.candidates), np.concatenate(train.candidates))
    assert len(only_val) and not selected.touched[only_val].any() and final.touched[only_val].all()
    fit_only = distill.fit_head(train, None, t, replace(s, epochs=selected.epochs))
    assert fit_only.epochs == selected.epochs
    assert any(
        not torch.equal(a, b) for a, b in zip(fit_only.head.state_dict().values(), final.head.state_dict().values())
    )
    # A run that keeps the head it validated ships that one.
    kept, shipped = distill.fit(train, val, t, replace(s, refit=False))
    assert shipped is kept


def test_strengths_recover_a_known_per_image_factor():
    from scipy.stats import spearmanr

    # The teacher ranks by strength × cosine, the strengths spread over a factor of ~10: a head alone, whose scores are
    # cosines, cannot rank a strong image above a weak one at the same angle; one free strength per image can.
    true_log = np.random.default_rng(5).normal(0.0, 0.8, 100)
    q, t, cands, ranks = _synthetic(strengths=np.exp(true_log))
    train, val = _split(q, cands, ranks, 240)
    s = _small_head(strength_decay=1e-5, query_map=False)  # the strengths alone
    without = distill.fit_head(train, val, t, replace(s, strengths=False))
    fit = distill.fit_head(train, val, t, s)
    rho = spearmanr(fit.log_strength[fit.touched], true_log[fit.touched])[0]
    print(
        f"val mAP@5: without strengths {without.best_val_map:.3f}, with {fit.best_val_map:.3f}; strength Spearman {rho:.3f}"
    )
    assert fit.touched.all() and without.log_strength is None
    assert rho >= 0.9
    assert fit.best_val_map >= 0.85 and fit.best_val_map > without.best_val_map + 0.1


def test_a_query_map_recovers_an_asymmetric_ranking():
    # The teacher ranks training items by their cosine with the query's hidden projection turned by 90° in one plane:
    # q scores t unlike t scores q. A shared head scores both ways alike; the query map can learn the turn.
    turn = np.eye(4)
    turn[:2, :2] = [[0.0, -1.0], [1.0, 0.0]]
    q, t, cands, ranks = _synthetic(query_turn=turn)
    train, val = _split(q, cands, ranks, 240)
    s = _small_head(strengths=False)
    shared = distill.fit_head(train, val, t, replace(s, query_map=False))
    fit = distill.fit_head(train, val, t, s)
    print(f"val mAP@5: shared head {shared.best_val_map:.3f}, with the query map {fit.best_val_map:.3f}")
    assert shared.head.query_map is None and fit.head.query_map is not None
    assert fit.best_val_map >= 0.85 and fit.best_val_map > shared.best_val_map + 0.2


def test_an_untrained_residual_head_ranks_like_the_untuned_feature():
    import torch

    rng = np.random.default_rng(2)
    x = rng.standard_normal((50, 24)).astype(np.float32)
    head = embed.ProjectionHead(24, [32, 32], 40, layernorm=True, dropout=0.1, residual=True, query_map=True).eval()
    with torch.no_grad():
        out, as_query = head(torch.as_tensor(x)).numpy(), head(torch.as_tensor(x), query=True).numpy()
    joint = x / np.linalg.norm(x, axis=1, keepdims=True)
    np.testing.assert_allclose(out @ out.T, joint @ joint.T, atol=1e-5)
    np.testing.assert_allclose(as_query @ out.T, joint @ joint.T, atol=1e-5)  # the query map starts at zero


def test_temperature_fit_recovers_a_known_temperature():
    rng = np.random.default_rng(1)
    true_tau = 0.05
    scores, positives = [], []
    for _ in range(2000):
        s = np.sort(rng.uniform(0.2, 0.9, 20))[::-1]
        p = embed.softmax_shares(s[None], true_tau)[0]
        mask = np.zeros(20, bool)
        mask[rng.choice(20, p=p)] = True
        scores.append(s)
        positives.append(mask)
    tau, nll = distill.fit_temperature(scores, positives)
    assert tau == pytest.approx(true_tau, rel=0.1)
    assert distill.calibration_error(scores, positives, tau) < distill.calibration_error(
        scores, positives, true_tau * 20
    )


COLLECT = dict(queries=10, candidates=12, sample_steps=2, test_fraction=0.3)


def _copy(ws, target):
    shutil.copytree(ws.root, target, symlinks=True)
    return workspace.load(target)


@pytest.fixture(scope="module")
def collected_template(tmp_path_factory, indexed_template, outputs_dir, cheap_teacher):
    """The small world scanned and a collection of 10 teacher-ranked queries, made once; tests work on copies. Also
    returns the teacher settings each AbU teacher of the collection was built with."""
    ws = cheap_teacher(_copy(indexed_template, tmp_path_factory.mktemp("collected") / "ws"))
    scan(ws, outputs_dir, top_k=5)
    teachers = []
    built = collecting.AbuTeacher
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            collecting, "AbuTeacher", lambda t, settings, cache: teachers.append(settings) or built(t, settings, cache)
        )
        first = distill.collect(ws, **COLLECT)
    return ws, first, teachers


@pytest.fixture
def collected(collected_template, tmp_path):
    return _copy(collected_template[0], tmp_path / "ws")


@pytest.fixture(scope="module")
def trained(collected_template, tmp_path_factory):
    """A distilled bundle trained once from the collection."""
    ws = collected_template[0]
    out = tmp_path_factory.mktemp("distilled") / "bundle"
    return distill.train(ws, out=out, epochs=3, hidden_dims=(32,), out_dim=16, batch_size=64)


def test_collect_ranks_every_query_and_never_trains_on_a_test_prompt(collected_template):
    ws, first, _ = collected_template
    assert first.collected == 10 and first.train + first.test == 10 and first.test > 0
    assert sql_value(ws, "select count(*) from distill_rankings") == 10 * 12
    overlap = sql_value(
        ws,
        "select count(*) from distill_queries a join distill_queries b on a.prompt = b.prompt "
        "where a.split = 'test' and b.split = 'train'",
    )
    assert overlap == 0


def test_collect_resumes_and_keeps_its_collection_when_only_memory_or_selection_settings_change(collected):
    ws = collected
    assert distill.collect(ws, **COLLECT).collected == 0
    # The teacher is [confirm]'s. Its settings that leave the scores alone (batch size, how candidates are picked and
    # judged) keep the collection resumable; a teacher setting passed to collect is refused, not applied to both.
    ws.config.confirm = ws.config.confirm.override(batch_size=3, candidates=5, k=4, confirm_threshold=0.9)
    assert distill.collect(ws, **COLLECT).collected == 0
    with pytest.raises(
        AuditError, match=r"timesteps: no \[distill\] setting; the teacher's settings are the workspace's \[confirm\]"
    ):
        distill.collect(ws, queries=10, timesteps=3)


def test_collect_extends_with_more_queries_and_with_a_new_seed_under_the_same_teacher(collected_template, tmp_path):
    ws = _copy(collected_template[0], tmp_path / "ws")
    teachers = list(collected_template[2])
    built = collecting.AbuTeacher
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            collecting, "AbuTeacher", lambda t, settings, cache: teachers.append(settings) or built(t, settings, cache)
        )
        # A larger count extends the collection: only the missing queries are planned and ranked, continuing its
        # seeds and its prompts, even when captions were indexed since (the collection keeps the list it started from).
        captions = [c for (c,) in sql.query(ws, "select distinct caption from training_images order by 1").rows()]
        renamed = "update training_images set caption = ? where id = (select min(id) from training_images)"
        first_caption = sql_value(ws, "select caption from training_images order by id limit 1")
        sql.query(ws, renamed.replace("?", "'a aardvark'"), write=True)
        extended = distill.collect(ws, **{**COLLECT, "queries": 12})
        sql.query(ws, renamed.replace("?", f"'{first_caption}'"), write=True)
        # A new seed adds new images of the same prompts, ranked by the same teacher.
        more = distill.collect(ws, **{**COLLECT, "queries": 4}, seed=1)
    assert extended.collected == 2 and extended.planned == 12
    assert [
        p for (p,) in sql.query(ws, "select prompt from distill_queries where id in (11, 12) order by id").rows()
    ] == [
        captions[10 % len(captions)],
        captions[11 % len(captions)],
    ]
    assert sql_value(ws, "select count(*) from distill_rankings") == (12 + 4) * 12
    assert more.collected == 4 and more.planned == 4
    assert sql_value(ws, "select count(distinct seed) from distill_queries") == 16
    newer_prompts = "select count(*) from distill_queries where id > 12 and prompt not in "
    assert sql_value(ws, newer_prompts + "(select prompt from distill_queries where id <= 12)") == 0
    assert len(teachers) == 3 and teachers[2] == teachers[0]


def test_train_writes_a_new_bundle_refit_with_strengths_and_leaves_the_old_one(collected_template, trained):
    ws = collected_template[0]
    bundle = embed.load(trained.path)
    # Shipped after the refit on train + validation queries, when validation picked a trained epoch.
    assert trained.fitted_queries == trained.train_queries + (trained.val_queries if trained.epochs else 0)
    config = json.loads((trained.path / embed.CONFIG_NAME).read_text())
    assert config["distilled"]["fitted_queries"] == trained.fitted_queries
    assert bundle.head is not None and bundle.dim == 16 and bundle.id == trained.encoder_id
    assert bundle.temperature == pytest.approx(trained.temperature) and trained.temperature > 0
    assert embed.load(ws.encoder_dir()).head is None  # the old bundle is untouched
    # One learned strength per training image a training pair reached, keyed by content; the index ranks by inner product.
    assert bundle.metric == "dot" and 0 < len(bundle.strengths) <= 120
    digests = [d for (d,) in sql.query(ws, "select sha256 from training_images order by id").rows()]
    assert set(bundle.strengths) <= set(digests)
    assert np.exp(np.mean(np.log(list(bundle.strengths.values())))) == pytest.approx(1.0, rel=1e-4)


def test_eval_reports_each_methods_paired_gain_over_the_best_untuned_feature(collected_template, trained):
    ws = collected_template[0]
    results, n = evaluate.evaluate(ws, encoders=[ws.encoder_dir(), trained.path], ks=(3, 5))
    names = [r.name for r in results]
    assert names[:3] == ["untuned image", "untuned text", "untuned image ⊕ text"] and names[3].startswith("distilled")
    assert all(0 <= m <= 1 for r in results for m, _ in r.map_at.values())
    assert "mAP@3" in evaluate.to_markdown(results, n)
    gains = evaluate.gains_over_untuned(results)
    assert list(gains) == names[3:]
    for k in (3, 5):
        best = max(results[:3], key=lambda r: r.map_at[k][0])
        differences = np.array(results[3].per_query[k]) - np.array(best.per_query[k])
        mean, se, baseline = gains[names[3]][k]
        assert baseline == best.name and mean == pytest.approx(differences.mean())
        assert se == pytest.approx(differences.std(ddof=1) / np.sqrt(len(differences)))
        method = json.loads(evaluate.to_json(results, n))["methods"][3]
        assert method["gain_over_best_untuned"][str(k)]["baseline"] == best.name
    assert f"{gains[names[3]][5][0]:+.3f} ± {gains[names[3]][5][1]:.3f}" in evaluate.to_markdown(results, n)


def _test_influence(ws, column: str = "influence") -> dict:
    return dict(
        sql.query(
            ws,
            f"select q.id, list(r.{column} order by r.backbone_rank) from distill_queries q "
            "join distill_rankings r on r.query_id = q.id where q.split = 'test' group by 1",
        ).rows()
    )


def test_the_replicate_ranks_the_same_candidates_with_new_noise_and_is_stored_once(collected, monkeypatch):
    ws = collected
    replica = distill.replicate(ws)
    assert {q: c.tolist() for q, (c, _) in replica.items()} == _test_influence(ws, "training_id")
    stored = _test_influence(ws)
    assert all(not np.allclose(influence, stored[q]) for q, (_, influence) in replica.items())
    # Stored as it goes: asking again runs no teacher and returns the same scores.
    assert sql_value(ws, "select count(*) from distill_replicates") == sum(len(c) for c, _ in replica.values())
    monkeypatch.setattr(collecting, "AbuTeacher", None)
    again = distill.replicate(ws)
    assert again.keys() == replica.keys() and all(np.array_equal(again[q][1], replica[q][1]) for q in replica)
    # Settings that pick or judge confirm's candidates do not change a replicate's scores: it is still answered.
    ws.config.confirm = ws.config.confirm.override(candidates=5, controls=1, k=2, confirm_threshold=0.9)
    ws.save()
    assert distill.replicate(ws).keys() == replica.keys()
    monkeypatch.undo()
    with_replica, _ = evaluate.evaluate(ws, ks=(3,), replicate=replica)
    assert with_replica[-1].name == "teacher replicate (independent noise)" and 0 < with_replica[-1].map_at[3][0] <= 1


def test_a_pooled_reference_takes_its_positives_from_the_mean_of_run_and_replicate(collected):
    ws = collected
    replica = distill.replicate(ws)
    stored = _test_influence(ws)
    with pytest.raises(AuditError, match="teacher --replicate --pooled"):
        evaluate.evaluate(ws, ks=(3,), pooled=True)
    single, n = evaluate.evaluate(ws, ks=(3,))
    pooled, n_pooled = evaluate.evaluate(ws, ks=(3,), replicate=replica, pooled=True)
    assert [r.name for r in pooled] == [r.name for r in single] and n_pooled == n
    # By hand for untuned image ⊕ text: its ranking of the training set, the positives from the mean influence.
    base = embed.load(ws.encoder_dir(), "cpu")
    with Store(ws.db_path, read_only=True) as store:
        ids, img, txt = features.training_embeddings(ws, store, base)
        index_of = {int(i): j for j, i in enumerate(ids)}
        rows, images = distill.load_rankings(store, "test", index_of, ws.limits)
    q_img, q_txt = features.query_embeddings(base, rows, images)
    sims = features.joint(q_img, q_txt) @ features.joint(img, txt).T
    moved = 0
    for row, (qid, *_), ap in zip(sims, rows, pooled[2].per_query[3]):
        candidates, influence = replica[qid]  # in backbone order, like `stored`
        by_mean = candidates[np.argsort(-(np.array(stored[qid]) + influence) / 2, kind="stable")]
        top = {index_of[int(t)] for t in by_mean[:3]}
        assert ap == pytest.approx(metrics.average_precision(np.argsort(-row, kind="stable"), top))
        by_run = candidates[np.argsort(-np.array(stored[qid]), kind="stable")[:3]]
        moved += set(by_mean[:3].tolist()) != set(by_run.tolist())
    assert moved > 0  # the replicate changes some query's top-3, so the check above sees the pooling
    assert evaluate.POOLED_NOTE in evaluate.to_markdown(pooled, n_pooled, pooled=True)
    assert json.loads(evaluate.to_json(pooled, n_pooled, pooled=True))["reference"] == "pooled"


def test_switching_encoders_reembeds_with_strengths_and_keeps_earlier_attributions(collected, trained):
    from auditor.index import reindex
    from auditor.search import VectorTable

    ws = collected
    bundle = embed.load(trained.path)
    digests = [d for (d,) in sql.query(ws, "select sha256 from training_images order by id").rows()]
    before = sql_value(ws, "select count(*) from attributions")
    switched = reindex(ws, trained.path)
    assert switched.re_embedded == 120 and switched.encoder_id == trained.encoder_id
    table = VectorTable.for_encoder(ws.lancedb_uri, bundle, ws.config.index)
    norms = np.linalg.norm(table.vectors(np.arange(1, 121)), axis=1)
    np.testing.assert_allclose(norms, bundle.strength(digests), rtol=1e-5)  # each vector carries its image's strength
    rescan = scan(ws, _outputs(ws), top_k=5)
    assert rescan.attributed == 24
    by_encoder = dict(sql.query(ws, "select encoder_id, count(*) from attributions group by 1").rows())
    assert by_encoder[trained.encoder_id] == 24 * 5 and sum(by_encoder.values()) == before + 24 * 5


def test_distill_collect_from_a_folder_skips_unreadable_files_picks_up_new_ones_and_ranks_replaced_ones_again(
    indexed_ws, outputs_dir, cheap_teacher, tmp_path
):
    ws = cheap_teacher(indexed_ws)
    folder = tmp_path / "queries"
    folder.mkdir()
    images = sorted(outputs_dir.glob("*.png"))

    def add(path):  # with its sidecar prompt, where it has one
        for source in (path, path.with_suffix(".txt")):
            if source.exists():
                shutil.copy2(source, folder / source.name)

    for path in images[:2]:
        add(path)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    messages = []
    first = distill.collect(ws, folder=folder, candidates=8, announce=messages.append)
    assert first.collected == 2 and first.planned == 2
    assert first.skipped == [(str(folder / "broken.png"), first.skipped[0][1])] and "image" in first.skipped[0][1]
    assert any(m.startswith(f"skipped {folder / 'broken.png'}") for m in messages)
    # Prompts come from the images' metadata, as in a scan.
    assert sql_value(ws, "select count(*) from distill_queries where source = 'folder' and prompt like 'a %'") == 2
    # Images added to the folder later are planned and ranked; those already collected are not ranked again.
    add(images[2])
    second = distill.collect(ws, folder=folder, candidates=8)
    assert second.collected == 1 and second.planned == 3 and len(second.skipped) == 1
    assert sql_value(ws, "select count(*) from distill_rankings") == 3 * 8
    assert sql_value(ws, "select count(distinct path) from distill_queries") == 3

    left_out = []

    def current():  # the queries training and evaluation would use
        with Store(ws.db_path, read_only=True) as store:
            index_of = {int(i): j for j, (i,) in enumerate(store.rows("select id from training_images order by id"))}
            return sum(
                len(distill.load_rankings(store, split, index_of, ws.limits, left_out.append)[0])
                for split in ("train", "test")
            )

    assert current() == 3 and not left_out
    # A file replaced under its path no longer matches its ranking: left out until a rerun ranks it as a new query.
    replaced = folder / images[0].name
    shutil.copy2(images[3], replaced)
    assert current() == 2 and left_out == [
        f"left out query 1 ({replaced}): the file has changed since the teacher ranked it; "
        "`audit distill collect` ranks a folder's new file again"
    ]
    third = distill.collect(ws, folder=folder, candidates=8)
    assert third.collected == 1 and third.planned == 3
    with Store(ws.db_path, read_only=True) as store:
        rows = store.rows(
            "select id, replaced_at is not null from distill_queries where path = ? order by id", [str(replaced)]
        )
    assert rows == [(1, True), (4, False)]
    assert sql_value(ws, "select count(*) from distill_rankings") == 4 * 8  # the old ranking stays, for SQL
    left_out.clear()
    assert current() == 3 and not left_out
    assert distill.export_collection(ws, tmp_path / "exported") == 3  # current queries only
    # A query image that is gone is left out too, and a collection cannot be exported without it.
    (folder / images[1].name).unlink()
    assert current() == 2 and "cannot read" in left_out[0]
    with pytest.raises(AuditError, match=f"query image {folder / images[1].name} .*cannot read"):
        distill.export_collection(ws, tmp_path / "exported-again")


def _outputs(ws):
    return sql_value(ws, "select root from scans order by id limit 1")


def test_a_collection_exported_from_one_workspace_imports_into_another(
    indexed_ws, indexed_template, cheap_teacher, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq

    from auditor import workspace

    source = cheap_teacher(indexed_ws)
    distill.collect(source, queries=6, candidates=8, sample_steps=2, test_fraction=0.3)
    replica = distill.replicate(source)
    assert distill.export_collection(source, tmp_path / "collection") == 6
    with pytest.raises(AuditError, match="already holds a collection"):
        distill.export_collection(source, tmp_path / "collection")

    shutil.copytree(indexed_template.root, tmp_path / "other", symlinks=True)
    target = cheap_teacher(workspace.load(tmp_path / "other"))
    sql.query(
        target,
        "insert into distill_queries (id, split, source, path, prompt, model_hash, backbone_id, settings_hash) "
        "values (1, 'train', 'folder', 'elsewhere.png', 'x', 'm', 'b', 'another collection')",
        write=True,
    )
    imported = distill.import_collection(target, tmp_path / "collection")
    assert (imported.queries, imported.rankings, imported.replicates, imported.skipped) == (6, 48, 8 * len(replica), 0)
    assert sorted(imported.ids.values()) == list(range(2, 8))  # after the store's own query: ids never collide

    # The same queries, splits, images and teacher ranks, with candidates matched by content, not by id.
    ranked = (
        "select q.prompt, q.split, q.seed, q.sha256, t.sha256, r.teacher_rank, r.influence from distill_rankings r "
        "join distill_queries q on q.id = r.query_id join training_images t on t.id = r.training_id "
        "where q.settings_hash <> 'another collection' order by q.seed, t.sha256"
    )
    assert sql.query(target, ranked).rows() == sql.query(source, ranked).rows()

    def images(ws):
        return [
            open(p, "rb").read()
            for (p,) in sql.query(  # noqa: E731
                ws, "select path from distill_queries where settings_hash <> 'another collection' order by seed"
            ).rows()
        ]

    assert images(target) == images(source)
    # The teacher's replicate came along: the target answers it from the store, without a teacher run.
    monkeypatch.setattr(collecting, "AbuTeacher", None)
    moved = distill.replicate(target)
    assert sorted(moved) == sorted(imported.ids[q] for q in replica)
    assert all(np.array_equal(moved[imported.ids[q]][1], replica[q][1]) for q in replica)
    monkeypatch.undo()
    # Collecting with the same settings finds the imported queries done; a second import adds nothing.
    assert distill.collect(target, queries=6, candidates=8, sample_steps=2, test_fraction=0.3).collected == 0
    assert distill.import_collection(target, tmp_path / "collection").skipped == 6

    # A collection ranked on another model is refused, with what to do.
    queries = pq.read_table(tmp_path / "collection" / distill.QUERIES_FILE)
    foreign = tmp_path / "foreign"
    shutil.copytree(tmp_path / "collection", foreign)
    pq.write_table(
        queries.set_column(
            queries.column_names.index("model_hash"), "model_hash", pa.array(["0123456789abcdef"] * queries.num_rows)
        ),
        foreign / distill.QUERIES_FILE,
    )
    with pytest.raises(AuditError, match="on model 0123456789abcdef.*import into a workspace on that model"):
        distill.import_collection(target, foreign)
    # An image swapped inside the folder is not the one its ranking was made from: refused.
    tampered = tmp_path / "tampered"
    shutil.copytree(tmp_path / "collection", tampered)
    names = queries.column("path").to_pylist()
    shutil.copy2(tampered / names[1], tampered / names[0])
    shutil.copytree(indexed_template.root, tmp_path / "third", symlinks=True)
    with pytest.raises(AuditError, match=f"{tampered / names[0]} is not the image the teacher ranked"):
        distill.import_collection(cheap_teacher(workspace.load(tmp_path / "third")), tampered)
