"""The imitator (AgileAvatar's differentiable engine), F2P and F2P v2: real torch steps, tiny config, CPU.

Inputs are the session's ``tiny_run`` (tests/conftest.py), a whole ``likeness retrain --config tiny`` folder:
48 renders of the default pack (real Blender) and the tiny G_real, face parser and G_avatar trained on them.
"""
import argparse
import json
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from likeness.backend import realfaces
from likeness.backend.errors import UserError
from likeness.backend.schema import find_pack, load_pack
from likeness.training.baselines import imitator as im
from likeness.training.baselines.f2p import get_v2_config, load_f2p_method, load_f2p_v2_method, train_f2p_v2
from likeness.training.generators.gan_configs import get_config as gan_config
from likeness.training.generators.semantic_gan import Generator

PACK = find_pack("default")
quiet = lambda s: None                                       # noqa: E731
SET = ["id_steps=10", "ckpt_every=8", "sample_every=8", "log_every=4"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def gans(tiny_run):
    """--renders, --generator, --parser of the tiny retrain folder (as ``--retrain DIR`` finds them)."""
    work, _ = tiny_run
    return SimpleNamespace(work=work, **im.retrain_inputs(work))


def tiny_cfg(**kw):
    """The config of ``imitator_run``: tiny with --steps 16 --set SET (and ``kw``)."""
    return im.get_config("tiny", **{"steps": 16, "id_steps": 10, "ckpt_every": 8, "sample_every": 8,
                                    "log_every": 4, **kw})


def train(gans, work, cfg=None, generator=None, **kw):
    return im.train_imitator(PACK, gans.renders, generator or gans.generator, gans.parser, work,
                             cfg or tiny_cfg(), progress=False, log=quiet, **kw)


@pytest.fixture(scope="module")
def imitator_run(gans, tmp_path_factory):
    """An imitator trained 16 steps through the CLI entry point, from the retrain folder."""
    out = tmp_path_factory.mktemp("imitator") / "run"
    args = argparse.Namespace(pack=None, renders=None, generator=None, parser=None, retrain=str(gans.work),
                              config="tiny", work=str(out), steps=16, resume=False, set=SET, threads=1)
    assert im.cli_train_imitator(args) == 0
    return out, json.loads((out / "summary.json").read_text())


def validation_photo() -> np.ndarray:
    stem = realfaces.stems(split="val")[0]                   # inference only: no model trains on c-f faces
    return realfaces.load_pair(stem)[0]


def assert_valid(vector):
    assert vector.pack is PACK
    assert PACK.vector_from_json(vector.to_json()) == vector  # ranges and option ids validated


# ---- encoder and relaxed vectors --------------------------------------------------------------

def test_encoder_shapes_one_hot_and_relaxed_and_gradients_reach_slot_logits():
    layout = im.VectorLayout.of(PACK)
    torch.manual_seed(0)
    G = Generator(gan_config("tiny"))
    imitator = im.Imitator(layout, G, hidden=16, layers=1, w_mean=torch.randn(G.n_latent, G.cfg.w_dim))
    arrays = [PACK.sample_seeded(0, i).to_arrays() for i in range(3)]
    cont = torch.tensor([a[0] for a in arrays], dtype=torch.float32)
    disc = torch.tensor([a[1] for a in arrays])
    x = layout.one_hot(cont, disc)
    assert x.shape == (3, PACK.n_continuous + PACK.n_options) == (3, layout.dim)
    for block in layout.slot_logits(x[:, layout.n_continuous:]):
        assert torch.equal(block.sum(1), torch.ones(3))
    wp = imitator.encoder(x)
    assert wp.shape == (3, G.n_latent, G.cfg.w_dim)
    assert torch.equal(wp, imitator.encoder.w_mean.expand(3, -1, -1))   # untrained: the mean latent
    out = imitator(x)
    assert out["image"].shape == (3, 3, 32, 32) and out["seg"].shape == (3, G.n_parts, 32, 32)
    assert torch.equal(imitator(x)["image"], out["image"])              # fixed noise: deterministic
    c, d = layout.discretise(cont, x[:, layout.n_continuous:])          # one-hot -> the same vectors
    for i, (ci, di) in enumerate(zip(c, d)):
        v, truth = PACK.vector_from_arrays(ci, di), PACK.sample_seeded(0, i)
        assert v.slots == truth.slots
        assert v.params == pytest.approx(truth.params, abs=1e-6)             # float32 round trip

    with torch.no_grad():                                               # as after training: a live last layer
        imitator.encoder.out.weight.normal_(0, 0.1)
    logits = torch.randn(3, layout.n_options, requires_grad=True)
    cont_u = torch.full((3, layout.n_continuous), 0.5, requires_grad=True)
    xr = layout.relaxed(cont_u, logits, tau=0.5)
    assert xr.shape == x.shape
    for block in layout.slot_logits(xr[:, layout.n_continuous:]):
        assert torch.allclose(block.sum(1), torch.ones(3))
    out = imitator(xr)
    (out["image"].pow(2).mean() + out["seg"].softmax(1)[:, 0].mean()).backward()
    assert cont_u.grad.abs().sum() > 0
    for k, g in enumerate(layout.slot_logits(logits.grad)):
        assert g.abs().sum() > 0, f"no gradient reaches slot {PACK.slots[k].name}"
    with pytest.raises(ValueError, match="takes"):
        imitator(x[:, :-1])


# ---- training ----------------------------------------------------------------------------------

def test_imitator_trains_reduces_its_loss_and_reports_held_out_fidelity(gans, imitator_run, tmp_path):
    work, summary = imitator_run
    assert summary["finished"] and summary["step"] == 16
    held = summary["held_out"]
    assert held["n"] == 6 and 0 <= held["l1"] <= 1 and 0 <= held["miou"] <= 1
    assert {"perceptual", "identity", "iou", "pixel_accuracy"} <= set(held)
    assert "parser features" in summary["perceptual"]          # no LPIPS backbone here: the fallback is named
    assert "identity CNN" in summary["identity"]
    assert (work / "summary.json").is_file() and (work / "samples" / "step_00000016.png").is_file()
    # the step-2 loss on one fixed batch of training renders: untrained (step 0) vs trained
    from likeness.training.common.data import avatar_dataset
    from likeness.training.pairs.paired_data import read_vectors
    start = tmp_path / "start"
    train(gans, start, max_steps=0)                           # writes the step-0 checkpoint only
    ds = avatar_dataset(gans.renders, 32)
    cont, disc = read_vectors(gans.renders, ds.names, PACK)
    held_out = set(im.load_imitator(work)[1]["renders"]["held_out"])
    idx = [i for i, n in enumerate(ds.names) if n not in held_out][:8]
    y, parts = ds.batch(idx)
    perceptual, identity, _ = im.load_loss_terms(work)
    losses = []
    for folder in (start, work):
        imitator, info = im.load_imitator(folder, PACK)
        out = imitator.draw(torch.from_numpy(cont[idx]), torch.from_numpy(disc[idx]))
        with torch.no_grad():
            losses.append(im.imitator_loss(out, y, parts, tiny_cfg(), perceptual, identity)[1]["total"])
    assert losses[1] < losses[0] * 0.9, losses


def test_resume_reproduces_the_uninterrupted_run_exactly(gans, imitator_run, tmp_path):
    from safetensors.torch import load_file
    work_a, _ = imitator_run
    work_b = tmp_path / "b"
    train(gans, work_b, max_steps=8)
    with pytest.raises(UserError, match="--resume"):
        train(gans, work_b)
    train(gans, work_b, resume=True)
    a = load_file(str(work_a / "checkpoint" / "imitator.safetensors"))
    b = load_file(str(work_b / "checkpoint" / "imitator.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    oa = torch.load(work_a / "checkpoint" / "optim.pt", weights_only=True)["state"]
    ob = torch.load(work_b / "checkpoint" / "optim.pt", weights_only=True)["state"]
    assert all(torch.equal(oa[i]["exp_avg_sq"], ob[i]["exp_avg_sq"]) for i in oa)
    with pytest.raises(UserError, match="another config"):       # a resume must keep the model's config
        train(gans, work_b, cfg=tiny_cfg(lambda_seg=0.0), resume=True)


def test_a_retrain_without_a_parser_stage_gives_its_photo_parser(tmp_path):
    """The cpu config inverts with the encoder alone, so its parser stage trains nothing: --retrain then
    finds the retrain's photo parser (.onnx), which loads as the same torch U-Net at its input size."""
    from likeness.backend.models import SHIPPED
    from likeness.training.readout.face_parser import FaceParser
    onnx = SHIPPED / "parser" / "parser.onnx"
    work = tmp_path / "cpu_run"
    for stage, result in (("parser", {"skipped": "encoder-only inversion needs no perceptual term"}),
                          ("photo_parser", {"parser": str(onnx), "shipped": True})):
        (work / stage).mkdir(parents=True)
        (work / stage / "stage.json").write_text(json.dumps({"done": True, "result": result}))
    (work / "pipeline.json").write_text("{}")
    parser = im.retrain_inputs(work)["parser"]
    assert parser == onnx
    net, res, source = im.load_face_parser(parser)
    assert isinstance(net, FaceParser) and res == 128 and source == onnx
    probs = im.parse_probs(net, torch.zeros(2, 3, 64, 64), res)      # the cpu imitator's 64 px
    assert probs.shape[:1] + probs.shape[2:] == (2, 64, 64)
    torch.testing.assert_close(probs.sum(dim=1), torch.ones(2, 64, 64))


def test_the_imitator_trains_with_a_photo_parser_onnx(gans, tmp_path):
    from likeness.backend.models import SHIPPED
    onnx = SHIPPED / "parser" / "parser.onnx"
    work = tmp_path / "onnx_parser"
    summary = im.train_imitator(PACK, gans.renders, gans.generator, onnx, work, tiny_cfg(steps=4),
                                progress=False, log=quiet)
    assert summary["finished"] and summary["step"] == 4
    net, res = im.load_folder_parser(work)                    # what F2P reads back
    assert res == 128 and json.loads((work / "imitator.json").read_text())["parser"]["source"] == str(onnx)
    resumed = im.train_imitator(PACK, gans.renders, gans.generator, None, work, tiny_cfg(steps=6),
                                resume=True, progress=False, log=quiet)   # the .onnx comes from imitator.json
    assert resumed["step"] == 6


# ---- F2P ---------------------------------------------------------------------------------------

def test_f2p_on_a_validation_photo_lowers_its_objective_and_returns_a_valid_vector(imitator_run):
    from likeness.evaluation.methods import Method, load_method
    work, _ = imitator_run
    method = load_f2p_method(work, PACK, "f2p-tiny")
    assert method.name == "f2p-tiny" and isinstance(method, Method)
    photo = validation_photo()
    r = method.optimise([photo], steps=25)
    assert r["history"].shape == (26, 1)
    assert float(r["history"][-1, 0]) < float(r["history"][0, 0])
    assert r["continuous"].min() >= 0 and r["continuous"].max() <= 1
    assert_valid(method.predict(photo))
    assert method.last["history"].shape == (method.cfg.steps + 1, 1)
    spec = load_method(f"f2p:{work}=mine", PACK)                        # the harness's lazy loader
    assert spec.name == "mine"


# ---- F2P v2 ------------------------------------------------------------------------------------

def test_f2p_v2_trains_through_the_imitator_and_predicts_valid_vectors(imitator_run, tmp_path):
    from likeness.evaluation.methods import load_method
    work, _ = imitator_run
    cfg = get_v2_config("tiny", steps=12, ckpt_every=6, log_every=3)
    summary = train_f2p_v2(PACK, work, tmp_path / "v2", cfg, progress=False, log=quiet)
    assert summary["finished"] and summary["photos"]["train"] + summary["photos"]["held_out"] == 744
    assert summary["held_out"]["objective"] < summary["initial_held_out"]["objective"]
    assert summary["images_per_s"] > 0
    method = load_f2p_v2_method(tmp_path / "v2", PACK, "v2")
    photo = validation_photo()
    vector = method.predict(photo)
    assert_valid(vector)
    assert method.predict(photo) == vector                            # deterministic
    assert load_method(f"f2pv2:{tmp_path / 'v2'}", PACK).predict(photo[::2, ::2].copy()).pack is PACK
    # stopped half-way and resumed: the same predictor, bit for bit
    from safetensors.torch import load_file
    train_f2p_v2(PACK, work, tmp_path / "half", cfg, max_steps=6, progress=False, log=quiet)
    train_f2p_v2(PACK, None, tmp_path / "half", cfg, resume=True, progress=False, log=quiet)
    a = load_file(str(tmp_path / "v2" / "checkpoint" / "predictor.safetensors"))
    b = load_file(str(tmp_path / "half" / "checkpoint" / "predictor.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # through an imitator whose run has not finished: said, not silent
    import shutil
    partial = tmp_path / "partial_imitator"
    shutil.copytree(work, partial)
    (partial / "summary.json").unlink()
    lines = []
    train_f2p_v2(PACK, partial, tmp_path / "early", cfg, max_steps=1, progress=False, log=lines.append)
    assert any("has not finished its run" in ln for ln in lines)
    lines.clear()
    train_f2p_v2(PACK, work, tmp_path / "late", cfg, max_steps=1, progress=False, log=lines.append)
    assert not any("has not finished" in ln for ln in lines)


# ---- bad input ---------------------------------------------------------------------------------

FAKE_PACK = """
[pack]
id = "fake"
name = "Fake"
version = "1.0"
builder = "none"

[[parameters]]
name = "face_width"
min = -1.0
max = 1.0

[[slots]]
name = "hair"
options = [ { id = "short" }, { id = "long" } ]

[segmentation]
"Skin*" = "skin"
"""


def test_bad_inputs_are_clear_user_errors(gans, imitator_run, tmp_path):
    from likeness.training.generators import train_gan
    work, _ = imitator_run
    with pytest.raises(UserError, match="no such folder"):
        train(gans, tmp_path / "w1", generator=tmp_path / "missing")
    # a generator of another GAN config
    cfg = gan_config("cpu")
    G = Generator(cfg)
    fake = SimpleNamespace(step=1, rank=0, world=1, data_gen=torch.Generator(), modules=lambda: {"G_ema": G},
                           state=lambda: {"step": 1})
    train_gan.save_checkpoint(tmp_path / "g_cpu", fake, cfg, "avatar")
    with pytest.raises(UserError, match="GAN config 'cpu'.*expects 'tiny'"):
        train(gans, tmp_path / "w2", generator=tmp_path / "g_cpu")
    with pytest.raises(UserError, match="stage 'real'"):
        train(gans, tmp_path / "w3", generator=gans.work / "real")
    # renders and imitators of another pack
    (tmp_path / "fakepack").mkdir()
    (tmp_path / "fakepack" / "pack.toml").write_text(textwrap.dedent(FAKE_PACK))
    other = load_pack(tmp_path / "fakepack")
    with pytest.raises(UserError, match="pack 'stylized', not 'fake'"):
        im.train_imitator(other, gans.renders, gans.generator, gans.parser, tmp_path / "w4", tiny_cfg(),
                          progress=False, log=quiet)
    with pytest.raises(UserError, match="imitator of pack 'stylized'"):
        load_f2p_method(work, other)
    # missing or wrong folders for the methods
    with pytest.raises(UserError, match="no such imitator folder"):
        load_f2p_method(tmp_path / "nothing", PACK)
    with pytest.raises(UserError, match="not a trained imitator"):
        load_f2p_method(tmp_path, PACK)
    with pytest.raises(UserError, match="not a trained F2P v2 folder"):
        load_f2p_v2_method(work, PACK)
    with pytest.raises(UserError, match="no such F2P v2 folder"):
        load_f2p_v2_method(tmp_path / "nothing", PACK)
    with pytest.raises(UserError, match="aligned face"):
        load_f2p_method(work, PACK).predict(np.zeros((32, 40, 3), np.uint8))
