"""scripts/head_study.py: a block is scored by its heads' cross-validation on fresh fold assignments;
a head fitted with the unsure labels weighted less; the ordinal head; scripts/descriptor_map_study.py's
inner tensors."""

import numpy as np
import pytest

from _scripts import load_script


def test_a_block_that_carries_the_label_scores_higher_and_noise_does_not():
    pytest.importorskip("torch")
    vs = load_script("head_study")
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 240)
    weak = (y[:, None] == np.arange(3)) * 0.6 + rng.normal(0, 1, (240, 3))
    strong = (y[:, None] == np.arange(3)) * 3.0 + rng.normal(0, 1, (240, 3))
    noise = rng.normal(0, 1, (240, 6))
    X = np.concatenate([weak, strong, noise], 1)
    X = (X - X.mean(0)) / X.std(0)
    base = np.r_[[True] * 3, [False] * 9]
    with_strong = np.r_[[True] * 6, [False] * 6]
    with_noise = np.r_[[True] * 3, [False] * 3, [True] * 6]
    lam, cv, per_seed = vs.score_blocks(X, y, 3, base)
    from likeness.training.readout.attributes import LAMBDAS
    assert lam in LAMBDAS
    assert len(per_seed) == len(vs.SEEDS) and abs(np.mean(per_seed) - cv) < 1e-12
    assert 0.45 < cv < 0.85
    assert vs.score_blocks(X, y, 3, with_strong)[1] > 0.95
    assert vs.score_blocks(X, y, 3, with_noise)[1] < cv + 0.03
    assert vs.score_blocks(X, y, 3, base) == (lam, cv, per_seed)    # seeded folds: repeatable


def test_unit_weights_fit_the_shipped_softmax_and_down_weighting_drops_noisy_labels():
    pytest.importorskip("torch")
    cs = load_script("head_study")
    from likeness.training.readout import attributes as T
    rng = np.random.default_rng(0)
    n, k = 300, 3
    y = rng.integers(0, k, n)
    X = (y[:, None] == np.arange(k)) * 1.5 + rng.normal(0, 1, (n, k))
    X = (X - X.mean(0)) / X.std(0)
    W0, b0 = T.fit_softmax(X, y, k, 0.1)
    W1, b1 = T.fit_softmax(X, y, k, 0.1, weight=np.ones(n))
    assert np.allclose(W0, W1, atol=1e-5) and np.allclose(b0, b1, atol=1e-5)
    # the unsure half carries labels pointing away from the features: weighting it less helps
    confident = np.arange(n) % 2 == 0
    noisy = np.where(confident, y, (y + 1) % k)
    full = cs.score_weighting(X, noisy, k, confident, 1.0, seeds=(0,))
    less = cs.score_weighting(X, noisy, k, confident, 0.25, seeds=(0,))
    assert less["cv_confident"] > full["cv_confident"] + 0.05
    assert less["lambda"] in T.LAMBDAS


def test_the_ordinal_head_reads_an_ordered_score_and_keeps_its_classes_in_order():
    pytest.importorskip("torch")
    hs = load_script("head_study")
    rng = np.random.default_rng(1)
    score = rng.normal(0, 1, 400)
    y = np.digitize(score + rng.normal(0, 0.3, 400), [-0.5, 0.7])       # three ordered classes
    X = np.stack([score, rng.normal(0, 1, 400)], 1)
    prob = hs.fit_ordinal(X, y, 3, 0.01)(X)
    assert prob.shape == (400, 3) and np.allclose(prob.sum(1), 1.0)
    from likeness.training.readout.attributes import balanced
    assert balanced(y, prob.argmax(1), 3) > 0.8
    # a higher score never moves a row to a lower class
    grid = np.stack([np.linspace(-3, 3, 50), np.zeros(50)], 1)
    assert np.all(np.diff(hs.fit_ordinal(X, y, 3, 0.01)(grid).argmax(1)) >= 0)
    lam, cv = hs.score_ordinal(X, y, 3, seeds=(0,))
    assert cv > 0.8


def test_the_map_study_reads_the_inner_levels_and_its_chosen_one_is_the_shipped_map():
    """scripts/descriptor_map_study.py's candidates come from the shipped descriptor's inner tensors;
    the one shipped (the 128-channel level on 4 x 4 cells) equals descriptor.onnx's own ``map``."""
    import onnxruntime as ort
    from likeness.backend import attributes as A
    ms = load_script("descriptor_map_study")
    path = A.default_dir() / "descriptor.onnx"
    session = ms.inner_session(path)
    chip = np.random.default_rng(0).normal(0, 0.5, (1, 3, 150, 150)).astype(np.float32)
    got = ms.inner_blocks(session, chip)
    assert {k: v.shape for k, v in got.items()} == {"pool": (256,), "q4": (1024,), "r4": (1024,),
                                                    "q8": (A.MAP_SIZE,)}
    shipped = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    d, m = shipped.run(["descriptor", "map"], {"images": chip})
    np.testing.assert_allclose(got["q8"], m[0].ravel(), atol=1e-5)
    # "pool" is what the last layer projects to the descriptor
    import onnx
    from onnx import numpy_helper
    fc = {t.name.removesuffix("_fp16"): numpy_helper.to_array(t).astype(np.float32)
          for t in onnx.load(str(path)).graph.initializer}["fc"]
    np.testing.assert_allclose(got["pool"] @ fc, d[0], atol=1e-4)


def test_mediapipe_geometry_is_centred_on_the_irises_and_fills_a_missing_face():
    """scripts/mediapipe_features.py's mesh block: landmarks centred on the irises' midpoint and
    divided by their distance, so a face moved and scaled in the frame gives the same row; a photo
    without a face gets the others' mean."""
    mf = load_script("mediapipe_features")
    rng = np.random.default_rng(0)
    face = rng.uniform(0.3, 0.7, (478, 3)).astype(np.float32)
    face[mf.IRISES[0], :2], face[mf.IRISES[1], :2] = (0.4, 0.45), (0.6, 0.45)
    moved = face.copy()
    moved[:, :2] = (face[:, :2] - 0.5) * 1.5 + 0.55
    moved[:, 2] *= 1.5
    other = rng.uniform(0.3, 0.7, (478, 3)).astype(np.float32)
    g = mf.geometry(np.stack([face, moved, other, np.full_like(face, np.nan)]))
    assert g.shape == (4, 1434) and np.isfinite(g).all()
    np.testing.assert_allclose(g[0], g[1], atol=1e-5)
    pts = g[0].reshape(478, 3)
    np.testing.assert_allclose(pts[list(mf.IRISES), :2], [[-0.5, 0], [0.5, 0]], atol=1e-6)
    np.testing.assert_allclose(g[3], g[:3].mean(0), atol=1e-6)
