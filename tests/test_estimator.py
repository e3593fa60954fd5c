"""The estimator: SCE by hand, real training steps that learn, exact resume, ONNX export parity."""
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from likeness.backend.errors import UserError
from likeness.backend.schema import load_pack
from likeness.training.estimator import model as est
from likeness.training.estimator.paired_set import PairedSet, write_paired_set
from test_schema import write_pack

COLOURS = np.array([[220, 40, 40], [40, 200, 60], [40, 60, 220]], np.uint8)


@pytest.fixture
def pack(tmp_path):
    return load_pack(write_pack(tmp_path))


def synthetic_pairs(pack, folder, n=96, size=32, seed=0):
    """Faces stand-in whose labels are visible: glasses slot = colour of a centre square,
    face_width = brightness of the background; other columns random."""
    rng = np.random.default_rng(seed)
    disc = np.stack([rng.integers(0, k, n) for k in pack.slot_sizes], 1)
    cont = rng.random((n, pack.n_continuous)).astype(np.float32)
    imgs = np.zeros((n, size, size, 3), np.uint8)
    imgs[:] = (cont[:, 0] * 255).astype(np.uint8)[:, None, None, None]
    q = size // 4
    imgs[:, q:3 * q, q:3 * q] = COLOURS[disc[:, 0]][:, None, None]
    write_paired_set(folder, pack, imgs, cont, disc, groups=np.arange(n) // 2, kind="test")
    return folder


def test_sce_matches_hand_computation():
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    target = torch.tensor([0, 2])
    p = torch.softmax(logits, 1)
    ce = -(math.log(p[0, 0]) + math.log(p[1, 2])) / 2
    rce = (4 * (1 - p[0, 0]) + 4 * (1 - p[1, 2])) / 2      # -A (1 - p_y), A = -4
    want = 0.1 * ce + 1.0 * rce
    got = est.symmetric_cross_entropy(logits, target, alpha=0.1, beta=1.0, log_floor=-4.0)
    assert float(got) == pytest.approx(float(want), rel=1e-6)


def test_training_learns_and_resumes_exactly(pack, tmp_path):
    pairs = synthetic_pairs(pack, tmp_path / "pairs")
    cfg = est.get_config("tiny", input_size=32, epochs=4, lr=3e-3, checkpoint_every=3)
    data = PairedSet(pairs, pack)
    _, val_idx = data.split(cfg.val_fraction, cfg.seed)
    tr, va = data.split(cfg.val_fraction, cfg.seed)
    assert not set(data.groups[tr]) & set(data.groups[va])           # groups never straddle

    torch.manual_seed(cfg.seed)
    untrained = est.Estimator(pack.n_continuous, pack.slot_sizes, cfg.head_hidden)
    before = est.evaluate(untrained, data, val_idx, cfg, pack)
    full = est.train_estimator(pack, pairs, tmp_path / "full", cfg, progress=False, log=lambda s: None)
    assert full["slot_accuracy"]["glasses"] > max(0.8, before["slot_accuracy"]["glasses"] + 0.3)
    hist = [h["loss"] for h in __import__("json").loads(
        (tmp_path / "full/checkpoint/state.json").read_text())["history"]]
    assert hist[-1] < hist[0]

    # Interrupted after 5 steps (mid-epoch, between checkpoints), then resumed.
    part = est.train_estimator(pack, pairs, tmp_path / "split", cfg, progress=False,
                               max_steps=5, log=lambda s: None)
    assert part == {"stopped_at": 5}
    est.train_estimator(pack, pairs, tmp_path / "split", cfg, progress=False, log=lambda s: None)
    a = load_file(str(tmp_path / "full/checkpoint/model.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoint/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    with pytest.raises(UserError, match="another config"):
        est.train_estimator(pack, pairs, tmp_path / "full", est.get_config("tiny", epochs=9),
                            progress=False, log=lambda s: None)


def test_render_share_trains_on_renders_beside_pairs(pack, tmp_path):
    """The pairs' glasses labels are shuffled (nothing to learn); the renders show theirs. Only a
    run that draws part of every batch from the renders learns glasses; bad set-ups are refused."""
    renders = synthetic_pairs(pack, tmp_path / "renders", seed=1)
    noisy = PairedSet(synthetic_pairs(pack, tmp_path / "clean", seed=2), pack)
    disc = noisy.discrete.copy()
    disc[:, 0] = np.random.default_rng(3).permutation(disc[:, 0])
    write_paired_set(tmp_path / "pairs", pack, np.asarray(noisy.images), noisy.continuous, disc,
                         groups=noisy.groups, kind="test")
    ren = PairedSet(renders, pack)
    quiet = dict(progress=False, log=lambda s: None)

    def glasses_accuracy(share):
        cfg = est.get_config("tiny", input_size=32, epochs=4, lr=3e-3, render_share=share)
        est.train_estimator(pack, tmp_path / "pairs", tmp_path / f"share{share}", cfg,
                            renders=renders, **quiet)
        model, _ = est.load_trained(pack, tmp_path / f"share{share}")
        return est.evaluate(model, ren, np.arange(len(ren)), cfg, pack)["slot_accuracy"]["glasses"]

    assert glasses_accuracy(0.5) > glasses_accuracy(0.0) + 0.25

    cfg = est.get_config("tiny", input_size=32, render_share=0.5)
    with pytest.raises(UserError, match="needs a paired set of renders"):
        est.train_estimator(pack, tmp_path / "pairs", tmp_path / "none", cfg, **quiet)
    synthetic_pairs(pack, tmp_path / "big", size=48)
    with pytest.raises(UserError, match="48 px"):
        est.train_estimator(pack, tmp_path / "pairs", tmp_path / "size", cfg, renders=tmp_path / "big",
                            **quiet)


def test_export_parity_and_contract(pack, tmp_path):
    from likeness.backend.contract import load_model
    from likeness.training.estimator.export import export_estimator
    torch.manual_seed(0)
    model = est.Estimator(pack.n_continuous, pack.slot_sizes, 32).eval()
    path = tmp_path / "m.onnx"
    export_estimator(model, pack, path, 64, est.IMAGENET_MEAN, est.IMAGENET_STD)
    onnx_model = load_model(path, pack, device="cpu")
    imgs = np.random.default_rng(1).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    cont, probs = onnx_model.run(imgs)
    with torch.no_grad():
        tc, tl = model(est.prepare_batch(torch.from_numpy(imgs), 64, augment=False))
    assert np.abs(cont - tc.numpy()).max() < 1e-4
    for p, lg in zip(probs, tl):
        assert np.abs(p - torch.softmax(lg, 1).numpy()).max() < 1e-4


def test_paired_set_refuses_bad_data(pack, tmp_path):
    pairs = synthetic_pairs(pack, tmp_path / "p", n=8)
    np.save(pairs / "continuous.npy", np.zeros((7, pack.n_continuous), np.float32))
    with pytest.raises(UserError, match="inconsistent: 8 images, 7 continuous"):
        PairedSet(pairs, pack)
    other = load_pack(write_pack(tmp_path, open(write_pack(tmp_path) / "pack.toml").read()
                                 .replace('id = "mini"', 'id = "other"'), "other"))
    pairs2 = synthetic_pairs(pack, tmp_path / "p2", n=8)
    with pytest.raises(UserError, match="is for pack 'mini', not 'other'"):
        PairedSet(pairs2, other)
    with pytest.raises(UserError, match="not a paired set"):
        PairedSet(tmp_path / "nothing", pack)


def test_half_weight_export_is_smaller_and_close(pack, tmp_path):
    from likeness.backend.contract import load_model
    from likeness.training.estimator.export import export_estimator
    torch.manual_seed(0)
    model = est.Estimator(pack.n_continuous, pack.slot_sizes, 32).eval()
    full = export_estimator(model, pack, tmp_path / "f.onnx", 64, est.IMAGENET_MEAN, est.IMAGENET_STD)
    half = export_estimator(model, pack, tmp_path / "h.onnx", 64, est.IMAGENET_MEAN, est.IMAGENET_STD,
                            half_weights=True)
    assert half.stat().st_size < 0.55 * full.stat().st_size
    imgs = np.random.default_rng(2).integers(0, 256, (4, 64, 64, 3), dtype=np.uint8)
    a, pa = load_model(full, pack, device="cpu").run(imgs)
    b, pb = load_model(half, pack, device="cpu").run(imgs)
    assert np.abs(a - b).max() < 1e-2 and all(np.abs(x - y).max() < 1e-2 for x, y in zip(pa, pb))
