"""The linear datamodeling score (auditor/lds.py) on a known linear datamodel: pure functions, no retraining."""

import numpy as np
import pytest

from auditor import lds


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
