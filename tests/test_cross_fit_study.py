"""scripts/cross_fit_study.py: heads fitted on one parse's features, scored on another's."""

import numpy as np
import pytest

from _scripts import load_script

def _script():
    return load_script("cross_fit_study")


def test_a_feature_that_leaks_the_label_only_in_the_fitted_parse_fails_on_a_new_parse():
    """Column 0 is the label itself in the parse fitted on the photos (as a parser's own training
    photos parse), noise in a new parse; column 1 is a weak honest signal in both. Heads fitted on
    the leaky features score perfectly there and near chance on the new parse; heads fitted on the
    new parse's own features do better on it."""
    pytest.importorskip("torch")
    cs = _script()
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    honest = y + rng.normal(0, 1.0, 300)
    leaky = np.stack([y * 4.0 + rng.normal(0, 0.01, 300), honest], 1)
    new = np.stack([rng.normal(2, 2, 300), honest], 1)
    cols = np.array([True, True])
    assert cs.transfer_cv(leaky, leaky, y, 2, cols, 0.01) > 0.99
    on_new = cs.transfer_cv(leaky, new, y, 2, cols, 0.01)
    own = cs.transfer_cv(new, new, y, 2, cols, 0.01)
    assert on_new < 0.65 < own
    assert cs.transfer_cv(new, new, y, 2, cols, 0.01) == own        # seeded folds: repeatable
    y[:20] = -1                                                       # unknown labels are left out
    assert 0.6 < cs.transfer_cv(new, new, y, 2, cols, 0.01) < 0.9
