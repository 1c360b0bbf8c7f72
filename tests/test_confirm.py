"""`audit confirm`: the AbU teacher on a tiny randomly initialised SD-layout pipeline."""

import numpy as np
import pytest
import torch

from auditor import abu, confirm, diffusion, metrics, sql, teacher
from auditor.abu import Unlearner, estimate_fisher
from auditor.config import ConfirmSettings
from auditor.errors import AuditError

from .helpers import audit, sql_value
from .tiny_sd import random_batch as _batch


def test_model_loads_in_its_own_space(model, tiny_pipeline):
    assert model.resolution == 32 and model.flip_augmentation is False
    assert len(diffusion.kv_parameters(model.unet)) == 8  # 4 transformer blocks (down 1, mid 1, up 2) × to_k, to_v
    assert all("attn2" in n for n in diffusion.kv_parameters(model.unet))
    assert model.hash == diffusion.model_hash(tiny_pipeline)


def test_only_kv_weights_move_and_are_restored_exactly(model):
    latents, text = _batch(model)
    fisher = estimate_fisher(model, latents, text, seed=0)
    unlearner = Unlearner(model, ConfirmSettings(draws=8, step_size=1.0), fisher, n_train=10)
    before = {n: p.detach().clone() for n, p in model.unet.named_parameters()}
    delta = unlearner.unlearn(latents[0], text[0], seed=1)
    kv = set(diffusion.kv_parameters(model.unet))
    with unlearner.applied(delta):
        moved = {n for n, p in model.unet.named_parameters() if not torch.equal(p, before[n])}
    assert moved == kv
    assert all(torch.equal(p, before[n]) for n, p in model.unet.named_parameters())


def test_fixed_seed_losses_are_reproducible_before_and_after(model):
    latents, text = _batch(model)
    fisher = {n: torch.ones_like(p) for n, p in diffusion.kv_parameters(model.unet).items()}
    unlearner = Unlearner(model, ConfirmSettings(draws=8, timesteps=5, step_size=5.0), fisher, n_train=1)
    ids = np.array([11, 12, 13])
    first = unlearner.losses(ids, latents, text)
    assert np.array_equal(first, unlearner.losses(ids, latents, text))
    assert not np.array_equal(first, unlearner.losses(ids, latents, text, seed=99))
    delta = unlearner.unlearn(latents[0], text[0], seed=3)
    assert any(float(d.abs().max()) > 0 for d in delta.values())
    with unlearner.applied(delta):
        after = unlearner.losses(ids, latents, text)
    with unlearner.applied(unlearner.unlearn(latents[0], text[0], seed=3)):
        again = unlearner.losses(ids, latents, text)
    assert np.array_equal(after, again)
    assert not np.array_equal(after, first)
    # Unlearning ascends the query's own loss.
    with unlearner.applied(delta):
        query_after = unlearner.losses(np.array([1]), latents[:1], text[:1])
    assert query_after[0] > unlearner.losses(np.array([1]), latents[:1], text[:1])[0]


def test_confirm_stores_scores_and_agreement_and_skips_on_rerun(scanned_ws):
    result = confirm.confirm(scanned_ws, top=2)
    assert (result.generations, len(result.failed)) == (2, 0)
    assert result.noise_floor > 0 and result.signal_to_noise > 0
    n_candidates = 20 + 8
    assert sql_value(scanned_ws, "select count(*) from teacher_scores") == 2 * n_candidates
    assert (
        sql_value(scanned_ws, "select count(*) from teacher_scores where is_control = (fast_rank is null)")
        == 2 * n_candidates
    )
    assert sql_value(scanned_ws, "select count(distinct teacher_rank) from teacher_scores") == n_candidates
    row = sql.query(scanned_ws, "select * from confirm_runs").row(0, named=True)
    assert row["status"] == "finished" and row["n_generations"] == 2 and row["noise_floor"] > 0
    conf = sql.query(scanned_ws, "select * from confirmations")
    assert conf.height == 2 and conf["map_at_k"].is_between(0, 1).all()
    # The two with the highest top-1 share were picked.
    picked = set(conf["generation_id"].to_list())
    best = set(
        sql.query(
            scanned_ws,
            "select generation_id from attributions where rank = 1 order by share desc, generation_id limit 2",
        )["generation_id"].to_list()
    )
    assert picked == best
    checks = sql_value(scanned_ws, "select count(*) from attribution_checks where confirm_run_id is not null")
    assert checks == 2 * 5

    again = confirm.confirm(scanned_ws, top=2)
    assert again.generations == 2
    assert set(
        sql.query(scanned_ws, "select generation_id from confirmations where run_id = 2")["generation_id"].to_list()
    ).isdisjoint(picked)
    gen = next(iter(picked))
    # A run killed after its last commit is left 'running'; the next call, even one with nothing to do, ends it.
    sql.query(scanned_ws, "update confirm_runs set status = 'running', finished_at = null where id = 2", write=True)
    assert confirm.confirm(scanned_ws, generation=gen).run_id is None  # already confirmed: nothing to do
    # The teacher's batch size is memory only: a smaller one (after running out of memory) is the same run.
    assert confirm.confirm(scanned_ws, generation=gen, batch_size=7).run_id is None
    assert sql_value(scanned_ws, "select status from confirm_runs where id = 2") == "interrupted"
    # Caches are reused: the Fisher and the reference update were made once.
    assert len(list((scanned_ws.dir / "cache").glob("fisher-*.safetensors"))) == 1
    assert len(list((scanned_ws.dir / "cache").glob("abu-reference-*.safetensors"))) == 1


def test_scoring_noise_is_drawn_per_query(scanned_ws):
    from auditor.store import Store

    with Store(scanned_ws.db_path, read_only=True) as store:
        training = teacher.training_set(scanned_ws, store, scanned_ws.model_dir(), torch.device("cpu"), "auto")
    settings = scanned_ws.config.confirm.override(draws=8, timesteps=4)
    session = abu.AbuTeacher(training, settings, scanned_ws.dir / "cache")
    ids = training.ids[:6]
    # Before and after share the query's noise: no update, no influence, exactly.
    zero = {name: torch.zeros_like(p) for name, p in session.unlearner.params.items()}
    raw, corrected = session.influence(ids, zero, session.noise_seed(1))
    assert not raw.any() and not corrected.any()
    # Another query draws other noise for the same candidates (a candidate's luck does not follow it from query to
    # query); the same query draws the same.
    first, second = session.losses(ids, session.noise_seed(1)), session.losses(ids, session.noise_seed(2))
    assert (first != second).all()
    assert np.array_equal(first, session.losses(ids, session.noise_seed(1)))
    image = diffusion.read_image(
        sql_value(scanned_ws, "select path from generations order by id limit 1"), training.limits
    )
    a, b = session.score(image, "a prompt", ids, 5), session.score(image, "a prompt", ids, 5)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and np.abs(a[0]).max() > 0


def test_confirm_where_selects_by_sql(scanned_ws):
    result = confirm.confirm(scanned_ws, where="g.prompt_source = 'a1111'", top=1)
    gen = sql_value(scanned_ws, "select generation_id from confirmations")
    assert result.generations == 1
    assert sql_value(scanned_ws, f"select prompt_source from generations where id = {gen}") == "a1111"
    with pytest.raises(AuditError, match="--where"):
        confirm.confirm(scanned_ws, where="no_such_column = 1")


def test_confirm_errors_are_one_line(scanned_ws, tmp_path):
    proc = audit("confirm", ws=scanned_ws, check=False)
    assert proc.returncode == 1 and "--top N" in proc.stderr and "Traceback" not in proc.stderr
    proc = audit("confirm", "--top", 1, "--model", tmp_path / "nope", ws=scanned_ws, check=False)
    assert proc.returncode == 1 and "does not exist" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_map_at_k_matches_a_hand_computed_example():
    ids = np.array([1, 2, 3, 4, 5])
    teacher = np.array([5.0, 4.0, 0.0, 0.0, 0.0])  # teacher's top-2: ids 1 and 2
    student = np.array([0.9, 0.1, 0.8, 0.7, 0.6])  # student ranks: 1, 3, 4, 5, 2
    # positives at student positions 1 and 5: AP = (1/1 + 2/5) / 2 = 0.7
    assert metrics.map_at_k(ids, student, teacher, 2) == pytest.approx(0.7)
    assert metrics.map_at_k(ids, teacher, teacher, 2) == pytest.approx(1.0)
    assert metrics.spearman(np.arange(5.0), np.arange(5.0) ** 3) == pytest.approx(1.0)
