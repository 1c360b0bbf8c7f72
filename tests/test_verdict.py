"""The teacher's verdict (auditor/verdict.py): the pure decision on synthetic numbers, and known cases through
`audit confirm` on the tiny world (a shuffled fast ranking is disputed, the teacher's own replicate as the fast ranking
is confirmed, a too-few-timesteps teacher is inconclusive)."""

import numpy as np
import pytest
import torch

from auditor import abu, confirm, sql, teacher, verdict
from auditor.store import Store
from auditor.verdict import CONFIRMED, DISPUTED, INCONCLUSIVE, Stats, Thresholds

from .helpers import sql_value, store_made_before


def stats(**values) -> Stats:
    base = dict(p_value=1e-6, auc=0.9, agreement=0.6, chance=0.05, self_agreement=0.8, noise_floor=0.01, timesteps=10)
    return Stats(**{**base, **values})


def test_decide_on_synthetic_numbers():
    t = Thresholds(alpha=0.01, min_self_agreement=0.5, confirm_ratio=0.25, dispute_ratio=0.1)
    assert verdict.decide(stats(), t).verdict == CONFIRMED
    # (0.3 − 0.05) / (0.8 − 0.05) = 0.33 of the teacher's own agreement: the make-demo case confirms.
    assert verdict.decide(stats(agreement=0.3), t).verdict == CONFIRMED
    # No higher than the controls, or clearly other images first: disputed, whatever else holds.
    assert verdict.decide(stats(auc=0.45, p_value=0.7), t).verdict == DISPUTED
    assert verdict.decide(stats(agreement=0.1), t).verdict == DISPUTED
    # Above the controls but not significantly; agreement in between: inconclusive, with what would decide it.
    middling = verdict.decide(stats(p_value=0.2, auc=0.6), t)
    assert middling.verdict == INCONCLUSIVE and "controls" in middling.hint
    between = verdict.decide(stats(agreement=0.15), t)
    assert between.verdict == INCONCLUSIVE and "timesteps = 40" in between.hint
    # A teacher that does not agree with itself decides nothing, and says how many timesteps would let it.
    noisy = stats(self_agreement=0.3, agreement=0.05, self_agreement_by_multiplier=((2, 0.4), (4, 0.55)))
    v = verdict.decide(noisy, t, knob="[dtrak] timesteps")
    assert v.verdict == INCONCLUSIVE and v.hint.startswith("[dtrak] timesteps = 40")
    hopeless = verdict.decide(stats(self_agreement=0.1, self_agreement_by_multiplier=((16, 0.2),)), t)
    assert hopeless.verdict == INCONCLUSIVE and "more than [confirm] timesteps = 160" in hopeless.hint
    # Without controls there is no rank test: never confirmed, and not disputed for want of one.
    no_controls = verdict.decide(stats(p_value=float("nan"), auc=float("nan")), t)
    assert no_controls.verdict == INCONCLUSIVE and "controls" in no_controls.hint
    assert verdict.decide(stats(p_value=float("nan"), auc=float("nan"), agreement=0.05), t).verdict == DISPUTED
    # Thresholds move the boundary.
    assert verdict.decide(stats(agreement=0.3), Thresholds(confirm_ratio=0.5)).verdict == INCONCLUSIVE
    assert verdict.decide(stats(p_value=0.02), Thresholds(alpha=0.05)).verdict == CONFIRMED


def world(rng, n_top=100, n_controls=50, signal=1.0):
    """A candidate set: the fast top-K are related to the generation (influence decreasing with fast rank), the
    controls are not."""
    truth = np.concatenate([signal * np.exp(-np.arange(n_top) / 15), np.zeros(n_controls)])
    truth += 0.02 * rng.standard_normal(len(truth))
    fast = np.concatenate([np.linspace(1, 0.5, n_top), np.linspace(0.4, 0, n_controls)])
    return truth, fast, np.arange(len(truth)) >= n_top


@pytest.mark.parametrize("seed", range(3))
def test_measure_known_cases_on_synthetic_scores(seed):
    rng = np.random.default_rng(seed)
    truth, fast, is_control = world(rng)
    sigma = 0.02
    run, replicate = (truth + sigma * rng.standard_normal(len(truth)) for _ in range(2))
    t = Thresholds()

    def judge(fast_scores, influence, floor=sigma, timesteps=10):
        s = verdict.measure(fast_scores, influence, is_control, 10, floor, timesteps, seed, t.min_self_agreement)
        return s, verdict.decide(s, t)

    s, v = judge(replicate, run)
    assert v.verdict == CONFIRMED and s.self_agreement > 0.5 and 0.5 < s.relative < 1.5
    # Shuffled into nonsense: never confirmed, nearly always disputed (a shuffle can, by luck, keep a few of the
    # real top images at its top and land between the thresholds).
    shuffled = [judge(rng.permutation(fast), run)[1].verdict for _ in range(20)]
    assert CONFIRMED not in shuffled and shuffled.count(DISPUTED) >= 16
    # Scoring noise ten times the spread of the signal at the top: nothing can be said, and more timesteps would help.
    noisy = truth + 0.5 * rng.standard_normal(len(truth))
    s, v = judge(fast, noisy, floor=0.5, timesteps=2)
    assert v.verdict == INCONCLUSIVE and s.self_agreement < 0.5 and "[confirm] timesteps" in v.hint
    # The test's null holds exactly when the "fast top-k" are random images: p is uniform, so confirming at p ≤ alpha
    # happens at most alpha of the time.
    ps = [verdict.rank_test(rng.standard_normal(10), rng.standard_normal(40))[0] for _ in range(2000)]
    assert np.mean(np.array(ps) <= 0.01) < 0.02


# A tiny-world teacher precise enough to judge by (the tests' usual settings are cheaper and noisier); on this
# randomly initialised model it agrees with itself at about 0.6, so the self-agreement bar is set below that.
PRECISE = dict(
    candidates=16,
    controls=16,
    draws=16,
    timesteps=128,
    fisher_samples=16,
    reference_samples=8,
    k=5,
    verdict_min_self_agreement=0.5,
)


def _replicate_fast(ws, monkeypatch, *, shuffle: bool = False):
    """Replace the fast path's ranking of confirm's candidates: by the teacher's replicate (the same unlearning
    scored again under independent noise, the replicate its noise floor measures), or shuffled at random (seeded
    by the generation). A replicate with its own Fisher sample and unlearning draws as well is measured on the
    example world (docs/research/verdicts.md); on this randomly initialised tiny model those draws change the
    ranking more than the scoring noise does."""
    with Store(ws.db_path, read_only=True) as store:
        training = teacher.training_set(ws, store, ws.model_dir(), torch.device("cpu"), "auto")
    replica = abu.AbuTeacher(training, ws.config.confirm, ws.dir / "cache")
    real = confirm._candidates

    def candidates(fast, s, gen_id, image, prompt):
        ids, scores, ranks, is_control = real(fast, s, gen_id, image, prompt)
        if shuffle:  # the fast scores and ranks, handed to the candidates in a random order
            return ids[np.random.default_rng(gen_id).permutation(len(ids))], scores, ranks, is_control
        delta = replica.unlearn(image, prompt, gen_id)
        _, influence = replica.influence(ids, delta, replica.noise_seed(gen_id, stream=2))
        top = ~is_control
        order = np.argsort(-influence[top], kind="stable")
        new_scores = influence.copy()
        new_scores[is_control] = influence.min() - 1 - np.arange(is_control.sum())  # controls stay outside the top
        ranks = ranks.copy()
        ranks[np.flatnonzero(top)[order]] = np.arange(1, top.sum() + 1)
        return ids, new_scores, ranks, is_control

    monkeypatch.setattr(confirm, "_candidates", candidates)


def _memoised_teacher(monkeypatch):
    """The teacher's scores of a generation's candidates computed once (they depend on the settings, the generation
    and the candidate set, not on the fast ranking), so a second run with another fast ranking costs no scoring."""
    memo = {}
    score, floor = abu.AbuTeacher.score, abu.AbuTeacher.noise_floor

    def cached(self, image, prompt, ids, seed):
        key = (repr(self.settings), seed, tuple(sorted(ids.tolist())))
        if key not in memo:
            order = np.argsort(ids)
            raw, influence = score(self, image, prompt, ids[order], seed)
            memo[key] = dict(zip(ids[order].tolist(), zip(raw, influence)))
        raw, influence = zip(*(memo[key][i] for i in ids.tolist()))
        return np.array(raw), np.array(influence)

    def cached_floor(self, image, prompt, ids, seed, raw):
        key = ("floor", repr(self.settings), seed, tuple(sorted(ids.tolist())))
        if key not in memo:
            memo[key] = floor(self, image, prompt, ids, seed, raw)
        return memo[key]

    monkeypatch.setattr(abu.AbuTeacher, "score", cached)
    monkeypatch.setattr(abu.AbuTeacher, "noise_floor", cached_floor)


def _verdicts(ws, run_id):
    return sql.query(
        ws,
        "select generation_id, verdict, p_value, auc, chance, self_agreement, relative_agreement"
        f" from confirmations where run_id = {run_id}",
    )


def test_confirm_verdicts_of_known_cases(scanned_ws, monkeypatch):
    scanned_ws.config.confirm = scanned_ws.config.confirm.override(**PRECISE)
    scanned_ws.save()
    _memoised_teacher(monkeypatch)
    with monkeypatch.context() as m:
        _replicate_fast(scanned_ws, m)
        replicate = confirm.confirm(scanned_ws, top=2)
    assert replicate.verdicts == {CONFIRMED: 2}, _verdicts(scanned_ws, replicate.run_id).to_dicts()
    # The numbers behind each verdict are stored beside it, and the view carries it to every attribution.
    row = sql.query(scanned_ws, f"select * from confirmations where run_id = {replicate.run_id}").row(0, named=True)
    assert row["p_value"] <= 0.01 and row["self_agreement"] >= 0.5 and row["noise_floor"] > 0
    assert row["confirmed"] and row["verdict_reason"] and row["deciding_setting"] is None
    assert sql_value(scanned_ws, "select count(*) from attribution_checks where verdict is not null") == 2 * 5

    # The same generations and teacher, the fast ranking shuffled into nonsense.
    sql.query(scanned_ws, "delete from confirmations", write=True)
    with monkeypatch.context() as m:
        _replicate_fast(scanned_ws, m, shuffle=True)
        shuffled = confirm.confirm(scanned_ws, top=2)
    assert shuffled.verdicts == {DISPUTED: 2}, _verdicts(scanned_ws, shuffled.run_id).to_dicts()

    # One scoring timestep: the run measures a far higher noise floor, the teacher's scores vary hardly more than
    # that noise, so it cannot agree with itself: inconclusive, naming the setting that would decide it.
    few = confirm.confirm(scanned_ws, top=2, timesteps=1)
    floors = dict(sql.query(scanned_ws, "select id, noise_floor from confirm_runs").rows())
    assert floors[few.run_id] > 4 * floors[replicate.run_id]
    assert few.signal_to_noise < replicate.signal_to_noise
    assert few.verdicts == {INCONCLUSIVE: 2}, _verdicts(scanned_ws, few.run_id).to_dicts()
    hints = sql.query(scanned_ws, f"select deciding_setting from confirmations where run_id = {few.run_id}")
    assert all("[confirm] timesteps = " in hint for hint in hints["deciding_setting"])


def test_migration_009_applies_to_a_store_made_before_it(tmp_path):
    """A confirmation made before verdicts keeps a NULL verdict and its old `confirmed`; the view carries both."""
    path = tmp_path / "audit.duckdb"
    old = store_made_before(path, 9)
    old.con.execute(
        "INSERT INTO attributions (generation_id, method, encoder_id, rank, training_id, score, share, scan_id)"
        " VALUES (7, 'knn', 'enc', 1, 11, 0.9, 1.0, 3)"
    )
    old.con.execute("INSERT INTO confirmations VALUES (7, 1, 'abu', 'enc', 10, 0.4, true, 0.5, 3.0, true, 1.0, now())")
    old.con.execute("INSERT INTO teacher_scores VALUES (1, 7, 11, 0.2, 0.2, 1, 1, false)")
    old.close()
    with Store(path) as store:
        assert 9 in {row[0] for row in store.rows("SELECT version FROM schema_migrations")}
        assert store.rows("SELECT confirmed, verdict, p_value FROM confirmations") == [(True, None, None)]
        assert store.rows("SELECT confirmed, verdict, teacher_influence FROM attribution_checks") == [(True, None, 0.2)]
