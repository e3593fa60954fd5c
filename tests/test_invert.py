"""GAN inversion of renders: perceptual distances, optimisation, the encoder, resumable dataset inversion.

All at the tiny config on CPU, with real generators (randomly initialised, fixed seeds) and targets made by
the same generator from known latents; a fake engine dataset in the engine's folder layout.
"""
import json
import textwrap

import numpy as np
import pytest
import torch

from likeness.backend.errors import UserError
from likeness.backend.png import encode_png
from likeness.backend.schema import CLASS_IDS, load_pack
from likeness.training.pairs import invert as inv
from likeness.training.readout.face_parser import FaceParser
from likeness.training.generators.gan_configs import get_config as gan_config
from likeness.training.common.parts import CLASS_TO_PART, PARTS, labels_to_parts
from likeness.training.common.perceptual import make_perceptual, resolve_perceptual
from likeness.training.generators.semantic_gan import Generator

PACK_TOML = """
[pack]
id = "fake"
name = "Fake"
version = "1.0"
builder = "none"

[[parameters]]
name = "face_width"
min = -1.0
max = 1.0

[[parameters]]
name = "skin_tone"
min = 0.0
max = 1.0

[[slots]]
name = "glasses"
options = [ { id = "none" }, { id = "round" }, { id = "shades" } ]

[[slots]]
name = "hair"
options = [ { id = "short" }, { id = "long" } ]

[segmentation]
"Skin*" = "skin"
"""

# one CelebAMask-HQ class per part, to write part maps back as engine label maps
PART_TO_CLASS = np.array([min(CLASS_IDS[c] for c, p in CLASS_TO_PART.items() if p == part) for part in PARTS],
                         np.uint8)


def write_pack(root):
    folder = root / "fakepack"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "pack.toml").write_text(textwrap.dedent(PACK_TOML))
    return load_pack(folder)


def tiny_generator(seed=0):
    torch.manual_seed(seed)
    return Generator(gan_config("tiny")).eval()


def known_targets(G, n, seed=1, keys=None):
    """Images and part maps G draws from known W+ codes: (wp, image [-1, 1], parts, noise)."""
    wp = inv.sample_wplus(G, n, torch.Generator().manual_seed(seed), 0.5, 0.5)
    noise = inv.make_noise(G, range(n) if keys is None else keys, 0)
    with torch.no_grad():
        out = G(wp, noise)
    return wp, out["image"], out["seg"].argmax(1), noise


def make_fake_dataset(root, pack, n=6, res=64, G=None, skip=(), solid=False, seed=0):
    """An engine dataset folder: manifest.json, images/, masks/, vectors/ (samples in ``skip`` incomplete).

    Images: G's images of known latents (upsampled to ``res``) with their part maps as label maps, or,
    with ``solid``, a flat colour that encodes the sample's vector (R = continuous[1], G = discrete[0])."""
    width = 6
    for sub in ("images", "masks", "vectors"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "pack": pack.id, "schema": pack.schema_hash, "seed": seed, "count": n, "resolution": res,
        "classes": "celebamask-hq-19", "layout": {"index_width": width}}))
    wp = None
    if not solid:
        G = G or tiny_generator()
        wp, img, parts, _ = known_targets(G, n, seed=seed + 1, keys=list(range(n)))
        img = torch.nn.functional.interpolate(img.clamp(-1, 1), size=res, mode="bilinear", align_corners=False)
        rgb = ((img + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        parts = torch.nn.functional.interpolate(parts[:, None].float(), size=res, mode="nearest")[:, 0]
        labels = PART_TO_CLASS[parts.long().numpy()]
    for i in range(n):
        name = f"{i:0{width}d}"
        cont, disc = pack.sample_seeded(seed, i).to_arrays()
        if solid:
            rgb_i = np.zeros((res, res, 3), np.uint8)
            rgb_i[..., 0] = round(cont[1] * 255)
            rgb_i[..., 1] = disc[0] * 100
            lab_i = np.zeros((res, res), np.uint8)
        else:
            rgb_i, lab_i = rgb[i], labels[i]
        (root / "images" / f"{name}.png").write_bytes(encode_png(rgb_i))
        (root / "masks" / f"{name}.png").write_bytes(encode_png(lab_i))
        if i not in skip:
            (root / "vectors" / f"{name}.json").write_text(json.dumps(
                {"index": i, "seed": seed, "continuous": cont, "discrete": disc}))
    return wp


# ---- perceptual ------------------------------------------------------------------------------

def test_lpips_is_skipped_without_local_weights_and_the_fallback_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("LIKENESS_LPIPS_BACKBONE", str(tmp_path / "no-such-alexnet.pth"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def no_download(*a, **k):
        raise AssertionError("a download was attempted")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    fn, desc = make_perceptual("lpips")
    assert fn is None and desc.startswith("LPIPS skipped")
    parser = FaceParser((8, 16, 32))
    fn, desc, used = resolve_perceptual("lpips", "parser", parser)
    assert used == "parser" and fn is not None
    assert "LPIPS skipped" in desc and "fallback chose: parser features" in desc
    fn, desc, used = resolve_perceptual("lpips", "parser", None)       # no parser: down to MSE
    assert used == "mse" and fn is None and "no face parser" in desc and "pixel MSE" in desc
    fn, desc = make_perceptual("mse")
    assert fn is None and "no perceptual term" in desc
    with pytest.raises(ValueError):
        make_perceptual("ssim")


def test_parser_distance_is_zero_on_equal_images_and_differentiable():
    torch.manual_seed(0)
    parser = FaceParser((8, 16, 32))
    fn, _ = make_perceptual("parser", parser)
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    y = torch.rand(3, 3, 32, 32) * 2 - 1
    assert fn(x, x).abs().max() < 1e-6
    d = fn(x, y)
    assert d.shape == (3,) and (d > 1e-3).all()
    xg = x.clone().requires_grad_(True)
    fn(xg, y).sum().backward()
    assert xg.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in parser.parameters())     # only images get gradients

    class WithFeatures(torch.nn.Module):                              # any module with features(x)
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

        def features(self, x):
            return [self.conv(x), torch.relu(self.conv(x))]
    fn2, _ = make_perceptual("parser", WithFeatures())
    assert fn2(x, x).abs().max() < 1e-6 and (fn2(x, y) > 0).all()


# ---- optimisation --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny():
    G = tiny_generator()
    means = G.mean_latents(n=300)
    torch.manual_seed(0)
    parser = FaceParser((8, 16, 32))
    fn, _ = make_perceptual("parser", parser)
    return G, means, fn


def test_inversion_reduces_its_loss_and_beats_the_mean_latent(tiny):
    G, means, perc = tiny
    cfg = inv.get_config("tiny")
    w0 = inv.start_latent(means, cfg)
    wp_true, y, parts, noise = known_targets(G, 3)
    r = inv.invert(G, y, parts, cfg, w0, perc, noise, steps=20)
    assert r["history"].shape == (21, 3)
    assert (r["loss"] < 0.6 * r["initial_loss"]).all()               # every sample's own loss fell
    with torch.no_grad():
        mean_mse = (G(w0.expand(3, -1, -1), noise)["image"] - y).pow(2).mean(dim=(1, 2, 3))
        rec_mse = (G(r["wp"], noise)["image"] - y).pow(2).mean(dim=(1, 2, 3))
    assert (rec_mse < 0.6 * mean_mse).all()
    assert set(r["terms"]) == {"pixel", "latent", "perceptual"}
    # the mask term: the cross-entropy against the target's part map falls when it is optimised
    rm = inv.invert(G, y, parts, cfg, w0, perc, noise, steps=20, lambda_m=1.0)
    with torch.no_grad():
        ce0 = inv.part_ce(G(w0.expand(3, -1, -1), noise)["seg"], parts)
    assert (rm["terms"]["mask"] < 0.8 * ce0).all()


def test_batched_inversion_is_many_independent_inversions(tiny):
    G, means, perc = tiny
    cfg = inv.get_config("tiny")
    w0 = inv.start_latent(means, cfg)
    _, y, parts, noise = known_targets(G, 3)
    together = inv.invert(G, y, parts, cfg, w0, perc, noise, steps=6)["wp"]
    alone = inv.invert(G, y[1:2], parts[1:2], cfg, w0, perc, [m[1:2] for m in noise], steps=6)["wp"]
    assert torch.allclose(together[1:2], alone, atol=1e-4)


# ---- encoder ------------------------------------------------------------------------------

def _heldout_loss(G, enc, cfg):
    losses = []
    for step in (10**6, 10**6 + 1):
        wp, noise, img, parts = inv._encoder_step_batch(G, cfg, step)
        with torch.no_grad():
            losses.append(inv.encoder_loss(G, enc, cfg, wp, noise, img, parts, True)[1]["total"])
    return sum(losses) / len(losses)


def test_encoder_training_reduces_its_loss_and_resumes_exactly(tiny, tmp_path):
    G, means, _ = tiny
    cfg = inv.get_config("tiny", enc_steps=24, enc_batch=8, enc_lr=2e-3, enc_ckpt_every=8)
    before = _heldout_loss(G, inv.build_encoder(G, cfg, means["w_mean"]), cfg)
    full = inv.train_encoder(G, cfg, tmp_path / "a", means=means, progress=False, log=lambda *a: None)
    after = _heldout_loss(G, full, cfg)
    assert after < 0.9 * before
    # interrupted after 10 steps (last checkpoint at 10 since max_steps saves), then resumed
    inv.train_encoder(G, cfg, tmp_path / "b", means=means, max_steps=10, progress=False, log=lambda *a: None)
    st = json.loads((tmp_path / "b" / "encoder" / "state.json").read_text())
    assert st["step"] == 10
    logs = []
    resumed = inv.train_encoder(G, cfg, tmp_path / "b", means=means, progress=False, log=logs.append)
    assert logs and "resuming encoder at step 10" in logs[0]
    a, b = full.state_dict(), resumed.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    loaded = inv.load_encoder(tmp_path / "b", G)
    assert all(torch.equal(a[k], loaded.state_dict()[k]) for k in a)
    with pytest.raises(UserError, match="another config"):
        inv.train_encoder(G, inv.get_config(cfg, enc_lr=1e-2), tmp_path / "b", means=means, progress=False)


# ---- datasets -----------------------------------------------------------------------------

def test_invert_dataset_writes_chunks_and_resumes(tiny, tmp_path):
    G, means, perc = tiny
    pack = write_pack(tmp_path)
    data = tmp_path / "renders"
    make_fake_dataset(data, pack, n=7, res=64, G=G, skip=(3,))      # sample 3 incomplete: left out
    cfg = inv.get_config("tiny", chunk=4, batch=3, steps=8, perceptual="mse")
    w0 = inv.start_latent(means, cfg)
    out = tmp_path / "latents"
    path = inv.invert_dataset(G, None, data, out, cfg, w_init=w0, progress=False, log=lambda *a: None)
    lat = inv.load_latents(path)
    names = ["000000", "000001", "000002", "000004", "000005", "000006"]
    assert lat["names"] == names and lat["index"].tolist() == [0, 1, 2, 4, 5, 6]
    assert lat["wp"].shape == (6, G.n_latent, G.cfg.w_dim)
    # the latents reconstruct the renders better than the start does
    y, parts = inv.load_renders(data, names, G.cfg.resolution)
    noise = inv.make_noise(G, lat["index"].tolist(), cfg.seed)
    m_opt = inv.reconstruction_metrics(G, lat["wp"], y, parts, noise)
    m_mean = inv.reconstruction_metrics(G, w0.expand(6, -1, -1), y, parts, noise)
    assert m_opt["mse"] < m_mean["mse"]
    # resume: chunk 0 is kept as is, the removed chunk 1 is redone identically
    c0, c1 = out / "chunks" / "chunk_000000.safetensors", out / "chunks" / "chunk_000001.safetensors"
    t0 = c0.stat().st_mtime_ns
    c1.unlink()
    again = inv.load_latents(inv.invert_dataset(G, None, data, out, cfg, w_init=w0, progress=False,
                                                log=lambda *a: None))
    assert c0.stat().st_mtime_ns == t0 and c1.is_file()
    assert torch.equal(again["wp"], lat["wp"])
    with pytest.raises(UserError, match="another"):
        inv.invert_dataset(G, None, data, out, inv.get_config(cfg, steps=3), w_init=w0, progress=False,
                           log=lambda *a: None)
    # encoder mode: the encoder's prediction then short_steps of optimisation
    enc = inv.build_encoder(G, cfg, means["w_mean"])
    p2 = inv.invert_dataset(G, enc, data, tmp_path / "latents-enc", inv.get_config(cfg, short_steps=3),
                            progress=False, log=lambda *a: None)
    lat2 = inv.load_latents(p2)
    assert lat2["meta"]["mode"] == "encoder+opt" and lat2["wp"].shape == lat["wp"].shape


def test_load_renders_maps_labels_to_parts(tmp_path):
    pack = write_pack(tmp_path)
    make_fake_dataset(tmp_path / "r", pack, n=2, res=64)
    y, parts = inv.load_renders(tmp_path / "r", ["000000", "000001"], 32)
    assert y.shape == (2, 3, 32, 32) and y.min() >= -1 and y.max() <= 1
    from PIL import Image
    lab = np.asarray(Image.open(tmp_path / "r" / "masks" / "000001.png").resize((32, 32), Image.NEAREST))
    assert torch.equal(parts[1], torch.from_numpy(labels_to_parts(lab)).long())
