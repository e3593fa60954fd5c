"""AgileAvatar's mapper (training/baselines/mapper.py): the model and its scaled softmax, training on a real tiny
retrain's latents, exact resume, photos through the shared latent space, and the refusals of bad input.

Real torch steps on CPU at the tiny config. The retrain work folder is the session's ``tiny_run``
(tests/conftest.py); folders that must be broken are built beside it from symlinks and small files.
"""
import argparse
import json
import math
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from likeness.backend import realfaces
from likeness.backend.errors import UserError
from likeness.backend.schema import AvatarVector, find_pack
from likeness.evaluation.methods import load_method
from likeness.training.baselines import mapper as mp
from likeness.training.pairs.invert import load_latents

from test_invert import write_pack

torch.set_num_threads(1)          # a shared 2-core machine: one thread is much faster than two

PACK = find_pack("default")
QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory):
    """A complete mapper folder made through the CLI entry point (mapper + G_real encoder)."""
    work, _ = tiny_run
    out = tmp_path_factory.mktemp("mapper") / "agile"
    args = argparse.Namespace(retrain=str(work), work=str(out), pack=None, config="tiny", epochs=6, resume=False,
                              threads=1, real_encoder_steps=30, augment=None, opt_steps=None)
    assert mp.cli_train_mapper(args) == 0
    return work, out


def fake_work(root, tiny_work, n=None, latents=None, names=None, real=True, pack_id=None, mode="full"):
    """A retrain work folder from the tiny run's pieces: pipeline.json, render/ (manifest + vectors of
    ``names``), invert/latents.safetensors (``latents`` [n, L, D], default the run's own), and G_real /
    the parser as symlinks (``real`` False: no G_real at all)."""
    root.mkdir(parents=True)
    ident = json.loads((tiny_work / "pipeline.json").read_text())
    ident.update(mode=mode, **({"pack": pack_id} if pack_id else {}))
    (root / "pipeline.json").write_text(json.dumps(ident))
    lat = load_latents(tiny_work / "invert" / "latents.safetensors")
    names = names or lat["names"][:n]
    wp = lat["wp"][:len(names)] if latents is None else latents
    (root / "render" / "vectors").mkdir(parents=True)
    shutil.copy(tiny_work / "render" / "manifest.json", root / "render" / "manifest.json")
    for name in names:
        src = tiny_work / "render" / "vectors" / f"{name}.json"
        if src.is_file():
            shutil.copy(src, root / "render" / "vectors" / f"{name}.json")
    (root / "invert").mkdir()
    save_file({"wp": wp.contiguous(), "index": torch.arange(len(wp)), "loss": torch.zeros(len(wp))},
              str(root / "invert" / "latents.safetensors"),
              metadata={"names": json.dumps(list(names)), "dataset": str((root / "render").resolve())})
    if real:
        (root / "real").symlink_to(tiny_work / "real")
        (root / "parser").symlink_to(tiny_work / "parser")
    return root


# ---- the model ---------------------------------------------------------------------------------

def test_shapes_and_one_mlp_per_wplus_row():
    torch.manual_seed(0)
    m = mp.Mapper(5, 4, PACK.n_continuous, PACK.slot_sizes, layer_hidden=6, layer_out=3, head_hidden=8)
    wp = torch.randn(7, 5, 4)
    cont, logits = m(wp)
    assert cont.shape == (7, PACK.n_continuous) and ((cont > 0) & (cont < 1)).all()
    assert [tuple(lg.shape) for lg in logits] == [(7, k) for k in PACK.slot_sizes]
    # row r's features depend on row r alone, through row r's own weights
    f = m.rows(wp)
    assert f.shape == (7, 5, 3)
    wp2 = wp.clone()
    wp2[:, 2] += 1.0
    changed = (m.rows(wp2) - f).abs().sum(dim=(0, 2)) > 0
    assert changed.tolist() == [False, False, True, False, False]
    w1, b1, w2, b2 = (p[2] for p in (m.rows.w1, m.rows.b1, m.rows.w2, m.rows.b2))
    by_hand = torch.nn.functional.leaky_relu(
        torch.nn.functional.leaky_relu(wp[:, 2] @ w1.T + b1, 0.2) @ w2.T + b2, 0.2)
    assert torch.allclose(f[:, 2], by_hand, atol=1e-6)
    with pytest.raises(ValueError, match="mapper takes"):
        m(torch.randn(2, 6, 4))
    # the normalisation is fitted on the training latents and saved with the weights
    m.fit_normalisation(wp * 3 + 1)
    assert torch.allclose(m.w_mean, (wp * 3 + 1).mean(0)) and "w_std" in m.state_dict()


def test_scaled_softmax_beta_schedule_and_loss_by_hand():
    cfg = mp.get_config("tiny", beta0=1.0)
    assert [mp.beta_at(cfg, e) for e in range(4)] == [1.0, 2.0, 3.0, 4.0]          # β = β0 + epoch
    assert mp.beta_at(mp.get_config("tiny", beta0=0.5), 2) == 2.5
    # logits (0, ln 2): softmax(β·z) = (1, 2^β) / (1 + 2^β)
    z = torch.tensor([[0.0, math.log(2.0)]])
    for beta, p1 in ((1.0, 2 / 3), (2.0, 4 / 5), (3.0, 8 / 9)):
        p = mp.scaled_softmax(z, beta)
        assert torch.allclose(p, torch.tensor([[1 - p1, p1]]), atol=1e-6)
    assert mp.scaled_softmax(z, 0.0).tolist() == [[0.5, 0.5]]                 # β 0: no preference
    # the loss: λc·L1 + λd·mean over slots of CE(β·logits); harder (larger β) -> smaller CE when right
    cfg = mp.get_config("tiny", lambda_c=2.0, lambda_d=0.5)
    cont_pred, cont = torch.tensor([[0.25, 0.5]]), torch.tensor([[0.5, 0.5]])
    logits = [z, torch.tensor([[1.0, 0.0, 0.0]])]
    disc = torch.tensor([[1, 0]])
    for beta in (1.0, 3.0):
        loss, terms = mp.mapper_loss((cont_pred, logits), cont, disc, beta, cfg)
        ce1 = -math.log(2 ** beta / (1 + 2 ** beta))
        ce2 = -math.log(math.exp(beta) / (math.exp(beta) + 2))
        assert terms["l1"] == pytest.approx(0.125) and terms["ce"] == pytest.approx((ce1 + ce2) / 2, rel=1e-5)
        assert float(loss) == pytest.approx(2.0 * 0.125 + 0.5 * (ce1 + ce2) / 2, rel=1e-5)


# ---- training on the real tiny retrain ----------------------------------------------------------

def test_training_on_real_tiny_latents_lowers_the_loss(trained):
    work, out = trained
    state = json.loads((out / "checkpoint" / "state.json").read_text())
    hist = state["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 7))
    assert [h["beta"] for h in hist] == [1.0 + e for e in range(6)]                 # β = β0 + epoch, β0 = 1
    split = state["split"]                                                      # 50 renders, 1/4 held out
    assert split["train"] + split["held_out"] == 50 and 11 <= split["held_out"] <= 14, split
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    held = hist[-1]
    assert held["n"] == 12 and set(held["slot_accuracy"]) == set(PACK.slot_names)
    assert 0 <= held["mean_slot_accuracy"] <= 1 and 0 < held["chance_mean_slot_accuracy"] < 1
    # on a fixed set (the training latents, fixed β), the trained mapper beats a fresh one
    src, pack = mp.locate_work(work)
    data = mp.load_pairs(src, pack)
    tr, _ = mp.split_groups(data.groups, 0.25, 0)
    cfg = mp.get_config("tiny")
    fresh = mp.build_mapper(cfg, pack, data.wp.shape[1], data.wp.shape[2])
    fresh.fit_normalisation(data.wp[tr])
    method = load_method(f"mapper:{out}", PACK)
    fixed = (data.wp[tr], data.continuous[tr], data.discrete[tr])
    args = (*fixed, pack, 3.0, cfg, fixed[1:])
    before, after = mp.evaluate(fresh, *args), mp.evaluate(method.model, *args)
    assert after["loss"] < before["loss"] and after["continuous_l1"] < before["continuous_l1"]
    assert after["mean_slot_accuracy"] > max(before["mean_slot_accuracy"], before["chance_mean_slot_accuracy"])


def test_held_out_accuracy_above_chance_when_the_latents_carry_the_vector(tiny_run, tmp_path):
    """A fixed set with a known answer: the real run's W+ statistics plus option- and slider-dependent
    directions (slot k's options in row k, slider j in one of the other rows). The held-out renders, never
    trained on, are read well above the majority-class rate and the constant answer."""
    work, _ = tiny_run
    lat = load_latents(work / "invert" / "latents.safetensors")["wp"]
    n, (L, D), K = 400, lat.shape[1:], len(PACK.slots)
    g = torch.Generator().manual_seed(0)
    names = [f"{i:06d}" for i in range(n)]
    root = fake_work(tmp_path / "work", work, latents=torch.zeros(n, L, D), names=names[:1])
    vecs = [PACK.sample_seeded(7, i).to_arrays() for i in range(n)]
    for name, (c, d) in zip(names, vecs):
        (root / "render" / "vectors" / f"{name}.json").write_text(json.dumps({"continuous": c, "discrete": d}))
    emb = [torch.randn(k, D, generator=g) for k in PACK.slot_sizes]
    proj = torch.zeros(PACK.n_continuous, L, D)
    for j in range(PACK.n_continuous):
        proj[j, K + j % (L - K)] = 2 * torch.randn(D, generator=g)
    wp = lat.mean(0) + lat.std() * torch.randn(n, L, D, generator=g)
    for i, (c, d) in enumerate(vecs):
        for k, o in enumerate(d):
            wp[i, k] += emb[k][o]
        wp[i] += torch.einsum("c,cld->ld", torch.tensor(c) - 0.5, proj)
    save_file({"wp": wp, "index": torch.arange(n), "loss": torch.zeros(n)},
              str(root / "invert" / "latents.safetensors"), metadata={"names": json.dumps(names)})
    cfg = mp.get_config("tiny", epochs=12, n_aug=0)
    s = mp.train_mapper(root, tmp_path / "m", None, cfg, real_encoder=False, **QUIET)
    h = s["held_out"]
    assert h["n"] == 100 and not s["complete"]
    assert h["mean_slot_accuracy"] > h["chance_mean_slot_accuracy"] + 0.3
    assert h["continuous_l1"] < 0.7 * h["constant_l1"]


def test_resume_reproduces_parameters_exactly(tiny_run, tmp_path):
    work, _ = tiny_run
    cfg = mp.get_config("tiny", epochs=3)
    mp.train_mapper(work, tmp_path / "a", None, cfg, real_encoder=False, **QUIET)
    # 36 training latents, batch 16: 3 steps an epoch; stop in the middle of the second epoch
    r = mp.train_mapper(work, tmp_path / "b", None, cfg, real_encoder=False, max_steps=4, **QUIET)
    assert r["stopped_at"] == 4
    with pytest.raises(UserError, match="pass --resume"):
        mp.train_mapper(work, tmp_path / "b", None, cfg, real_encoder=False, **QUIET)
    with pytest.raises(UserError, match="another config"):
        mp.train_mapper(work, tmp_path / "b", None, mp.get_config("tiny", epochs=3, lr=1e-4), resume=True,
                        real_encoder=False, **QUIET)
    mp.train_mapper(work, tmp_path / "b", None, cfg, resume=True, real_encoder=False, **QUIET)
    a = load_file(str(tmp_path / "a" / "checkpoint" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoint" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(tmp_path / "a" / "checkpoint" / "optim.pt", weights_only=True)["state"]
    ob = torch.load(tmp_path / "b" / "checkpoint" / "optim.pt", weights_only=True)["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    ha = json.loads((tmp_path / "a" / "checkpoint" / "state.json").read_text())["history"]
    hb = json.loads((tmp_path / "b" / "checkpoint" / "state.json").read_text())["history"]
    drop = lambda h: {k: v for k, v in h.items() if k != "latents_per_s"}      # noqa: E731
    assert [drop(h) for h in ha] == [drop(h) for h in hb]


# ---- photos ------------------------------------------------------------------------------------

@pytest.mark.skipif(not (realfaces.default_root() / "images").is_dir(), reason="no shared real faces")
def test_predict_a_real_validation_photo(trained, tmp_path):
    _, out = trained
    stem = realfaces.stems(split="val")[0]
    aligned = realfaces.load_pair(stem)[0]                       # CelebA-HQ faces are already in the frame
    moved = tmp_path / "elsewhere"
    shutil.copytree(out, moved)                                  # the folder carries what predict needs
    method = load_method(f"mapper:{moved}=agile", PACK)
    assert method.name == "agile"
    info = method.describe()
    assert info["held_out"]["n"] == 12 and info["real_encoder"]["steps"] == 30
    assert "non-commercial" in info["licence"]
    vec = method.predict(aligned)
    assert isinstance(vec, AvatarVector) and vec.pack.id == PACK.id
    assert PACK.vector_from_json(vec.to_json()) == vec                        # a valid vector of the pack
    cont, probs = method.predict_wplus(method.encode(aligned))
    assert cont.shape == (1, PACK.n_continuous) and all(np.allclose(p.sum(1), 1, atol=1e-5) for p in probs)
    # with a few optimisation steps against G_real after the encoder
    opt = mp.load_mapper_method(moved, PACK, "agile+opt")
    opt.opt_steps = 2
    assert opt.predict(aligned).pack.id == PACK.id
    with pytest.raises(UserError, match="aligned uint8 RGB"):
        method.predict(aligned[..., 0])


# ---- bad input ---------------------------------------------------------------------------------

def test_bad_inputs_are_refused_before_training(tiny_run, trained, tmp_path):
    work, _ = tiny_run
    _, out = trained
    cfg = mp.get_config("tiny", epochs=1)

    def refused(src, match, pack=None):
        dest = tmp_path / f"out-{len(list(tmp_path.iterdir()))}"
        with pytest.raises(UserError, match=match):
            mp.train_mapper(src, dest, pack, cfg, **QUIET)
        assert not dest.exists()                                 # nothing written

    (tmp_path / "empty").mkdir()
    refused(tmp_path / "empty", "not a retrain work folder")
    refused(work, "is a retrain of pack 'stylized', not 'fake'", pack=write_pack(tmp_path))
    refused(fake_work(tmp_path / "other", work, n=8, pack_id="other"), "retrain of pack 'other'", pack=PACK)
    refused(fake_work(tmp_path / "base", work, n=8, mode="baseline"), "baseline")
    no_lat = fake_work(tmp_path / "nolat", work, n=8)
    shutil.rmtree(no_lat / "invert")
    refused(no_lat, "no inversion latents")
    refused(fake_work(tmp_path / "noreal", work, n=8, real=False), "no G_real checkpoint")
    # latents whose names have no vector, or of another shape than G_real's W+
    names = [f"{i:06d}" for i in range(8)]
    mism = fake_work(tmp_path / "mism", work, n=8)
    (mism / "render" / "vectors" / "000003.json").unlink()
    refused(mism, "latents and vectors do not match")
    refused(fake_work(tmp_path / "shape", work, latents=torch.zeros(8, 5, 7), names=names), "shared latent space")
    rows = fake_work(tmp_path / "rows", work, latents=torch.zeros(6, 31, 32), names=names)
    refused(rows, "inconsistent")
    other = fake_work(tmp_path / "otherdata", work, n=8)
    meta = load_latents(other / "invert" / "latents.safetensors")
    save_file({"wp": meta["wp"], "index": meta["index"], "loss": meta["loss"]},
              str(other / "invert" / "latents.safetensors"),
              metadata={"names": json.dumps(meta["names"]), "dataset": str(work / "render")})
    refused(other, "inversions of")
    # a mapper folder for another pack, or not one at all
    with pytest.raises(UserError, match="not 'fake'"):
        mp.load_mapper_method(out, write_pack(tmp_path / "p2"))
    with pytest.raises(UserError, match="not a mapper folder"):
        mp.load_mapper_method(tmp_path / "empty", PACK)
    with pytest.raises(UserError, match="unknown mapper config"):
        mp.get_config("huge")
