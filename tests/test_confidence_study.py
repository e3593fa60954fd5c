"""scripts/confidence_study.py: a head fitted with the unsure labels weighted less."""

import numpy as np
import pytest

from _scripts import load_script


def test_unit_weights_fit_the_shipped_softmax_and_down_weighting_drops_noisy_labels():
    pytest.importorskip("torch")
    cs = load_script("confidence_study")
    from likeness.training.readout import attributes as T
    rng = np.random.default_rng(0)
    n, k = 300, 3
    y = rng.integers(0, k, n)
    X = (y[:, None] == np.arange(k)) * 1.5 + rng.normal(0, 1, (n, k))
    X = (X - X.mean(0)) / X.std(0)
    W0, b0 = T.fit_softmax(X, y, k, 0.1)
    W1, b1 = cs.fit_weighted(X, y, k, 0.1, np.ones(n))
    assert np.allclose(W0, W1, atol=1e-5) and np.allclose(b0, b1, atol=1e-5)
    # the unsure half carries labels pointing away from the features: weighting it less helps
    confident = np.arange(n) % 2 == 0
    noisy = np.where(confident, y, (y + 1) % k)
    full = cs.score_weighting(X, noisy, k, confident, 1.0, seeds=(0,))
    less = cs.score_weighting(X, noisy, k, confident, 0.25, seeds=(0,))
    assert less["cv_confident"] > full["cv_confident"] + 0.05
    assert less["lambda"] in T.LAMBDAS
