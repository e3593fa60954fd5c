"""Dual-domain generators: parts, loaders, model shapes, losses, training runs, exact resume, DDP.

Everything at the tiny config on CPU with real torch steps; real faces read in place from
../shared/data (skipped when absent); fake engine datasets and a fake CelebAMask-HQ release tree are
generated in tmp folders. The array cache goes to a session tmp folder (LIKENESS_CACHE).
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from likeness.backend import realfaces
from likeness.backend.errors import UserError
from likeness.backend.schema import CLASSES, CLASS_IDS
from likeness.training.common import data as D
from likeness.training.generators import train_gan as T
from likeness.training.readout.face_parser import FaceParser, confusion, miou
from likeness.training.generators.gan_configs import CONFIGS, get_config
from likeness.training.common.parts import (INVALID, NUM_PARTS, PART_IDS, PARTS, TRANSPARENT_PARTS,
                                     colorize_parts, labels_to_parts)
from likeness.training.generators.semantic_gan import (Discriminator, Generator, LocalGenerators, MappingNetwork,
                                            RenderNet, fuse)

TINY = get_config("tiny")
REAL_ROOT = realfaces.default_root()
needs_real = pytest.mark.skipif(not (REAL_ROOT / "images").is_dir(), reason="shared real faces absent")
PY = sys.executable


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module", autouse=True)
def array_cache(tmp_path_factory):
    old = os.environ.get("LIKENESS_CACHE")
    os.environ["LIKENESS_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    yield Path(os.environ["LIKENESS_CACHE"])
    if old is None:
        os.environ.pop("LIKENESS_CACHE")
    else:
        os.environ["LIKENESS_CACHE"] = old


@pytest.fixture(scope="module")
def real32():
    if not (REAL_ROOT / "images").is_dir():
        pytest.skip("shared real faces absent")
    return D.real_faces(None, "train", 32)


# --------------------------------------------------------------------------------------------
# Fake data
# --------------------------------------------------------------------------------------------

def fake_face(rng, res):
    """A random 'face': background, cloth, neck, face ellipse, hair cap, eyes, mouth, optional glasses."""
    yy, xx = np.mgrid[0:res, 0:res] / res
    lab = np.zeros((res, res), np.uint8)
    cx, cy = 0.5 + rng.uniform(-0.05, 0.05), 0.45 + rng.uniform(-0.05, 0.05)
    lab[yy > 0.85] = CLASS_IDS["cloth"]
    lab[(abs(xx - cx) < 0.1) & (yy > 0.6) & (yy <= 0.85)] = CLASS_IDS["neck"]
    face = ((xx - cx) / 0.25) ** 2 + ((yy - cy) / 0.32) ** 2 < 1
    hair = (((xx - cx) / 0.3) ** 2 + ((yy - cy + 0.08) / 0.34) ** 2 < 1) & (yy < cy - 0.12)
    lab[face] = CLASS_IDS["skin"]
    lab[hair] = CLASS_IDS["hair"]
    for ex in (-0.09, 0.09):
        lab[((xx - cx - ex) / 0.05) ** 2 + ((yy - cy) / 0.025) ** 2 < 1] = CLASS_IDS["l_eye"]
    lab[((xx - cx) / 0.08) ** 2 + ((yy - cy - 0.17) / 0.03) ** 2 < 1] = CLASS_IDS["u_lip"]
    if rng.random() < 0.5:
        lab[(abs(yy - cy) < 0.05) & (abs(xx - cx) < 0.17) & ~(abs(yy - cy) < 0.035)] = CLASS_IDS["eyeglasses"]
    pal = rng.integers(0, 256, (len(CLASSES), 3)).astype(np.uint8)
    img = pal[lab] + rng.integers(0, 20, (res, res, 3)).astype(np.uint8)
    return img, lab


def make_avatar_dataset(root: Path, n=24, res=32, incomplete=2, seed=0):
    from PIL import Image
    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "vectors"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").write_text(json.dumps({
        "pack": "fake", "count": n + incomplete, "resolution": res, "classes": "celebamask-hq-19",
        "layout": {"images": "images/{index}.png", "masks": "masks/{index}.png",
                   "vectors": "vectors/{index}.json", "index_width": 6}}))
    for i in range(n + incomplete):
        img, lab = fake_face(rng, res)
        Image.fromarray(img).save(root / "images" / f"{i:06d}.png")
        Image.fromarray(lab, mode="L").save(root / "masks" / f"{i:06d}.png")
        if i < n:                                        # the last ones are incomplete: no vector yet
            (root / "vectors" / f"{i:06d}.json").write_text(json.dumps({"index": i}))
    return root


def make_release_tree(root: Path, nums, img_res=64, mask_res=32, seed=0, images=None):
    """The official CelebAMask-HQ layout: CelebA-HQ-img/<n>.jpg + anno/<n // 2000>/<n:05d>_<part>.png"""
    from PIL import Image
    rng = np.random.default_rng(seed)
    (root / D.RELEASE_IMAGES).mkdir(parents=True, exist_ok=True)
    labels = {}
    for n in nums:
        img, lab = fake_face(rng, mask_res)
        big = np.asarray(Image.fromarray(img).resize((img_res, img_res), Image.NEAREST))
        if images and n in images:
            big = images[n]
        Image.fromarray(big).save(root / D.RELEASE_IMAGES / f"{n}.jpg", quality=95)
        folder = root / D.RELEASE_MASKS / str(n // 2000)
        folder.mkdir(parents=True, exist_ok=True)
        for cid, part in enumerate(D.RELEASE_PARTS, start=1):
            m = lab == cid
            if part == "l_eye":
                m = lab == CLASS_IDS["l_eye"]
            if m.any():
                Image.fromarray((m * 255).astype(np.uint8), mode="L").save(folder / f"{n:05d}_{part}.png")
        labels[n] = lab
    return labels


# --------------------------------------------------------------------------------------------
# Parts
# --------------------------------------------------------------------------------------------

def test_parts_mapping_numpy_and_torch():
    labels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    p_np = labels_to_parts(labels)
    p_t = labels_to_parts(torch.from_numpy(labels))
    assert p_np.dtype == np.uint8 and p_t.dtype == torch.uint8
    assert np.array_equal(p_np, p_t.numpy())
    flat = p_np.ravel()
    assert set(flat[:19]) == set(range(NUM_PARTS))            # every part has a class
    assert (flat[19:] == INVALID).all()
    assert flat[CLASS_IDS["l_eye"]] == flat[CLASS_IDS["r_eye"]] == PART_IDS["eyes"]
    assert flat[CLASS_IDS["u_lip"]] == flat[CLASS_IDS["mouth"]] == PART_IDS["mouth"]
    assert flat[CLASS_IDS["eyeglasses"]] == PART_IDS["eyeglasses"]
    assert 10 <= NUM_PARTS <= 13 and "eyeglasses" in TRANSPARENT_PARTS
    assert colorize_parts(flat[None, :19]).shape == (1, 19, 3)


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------

def test_module_shapes_and_dtypes():
    torch.manual_seed(0)
    cfg, B, K = TINY, 3, NUM_PARTS
    z = torch.randn(B, cfg.z_dim)
    w = MappingNetwork(cfg.z_dim, cfg.w_dim, cfg.n_mlp)(z)
    assert w.shape == (B, cfg.w_dim) and w.dtype == torch.float32
    local = LocalGenerators(cfg)
    depths, feats = local(w, w[:, None].expand(-1, K, -1), w[:, None].expand(-1, K, -1))
    h = cfg.local_res
    assert depths.shape == (B, K, h, h) and feats.shape == (B, K, cfg.feat_dim, h, h)
    fused, masks = fuse(depths, feats)
    assert fused.shape == (B, cfg.feat_dim, h, h)
    assert torch.allclose(masks.sum(1), torch.ones(B, h, h), atol=1e-5)
    render = RenderNet(cfg)
    rgb, seg = render(fused, w[:, None].expand(-1, render.n_styles, -1))
    R = cfg.resolution
    assert rgb.shape == (B, 3, R, R) and seg.shape == (B, K, R, R)

    G = Generator(cfg)
    assert G.n_latent == G.n_base + 2 * K
    wp = G.broadcast(G.map(z))
    assert wp.shape == (B, G.n_latent, cfg.w_dim)
    out = G(wp)
    assert out["image"].shape == (B, 3, R, R) and out["seg"].shape == (B, K, R, R)
    assert out["depths"].shape == (B, K, h, h)
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in out.values())
    # explicit noise (one map per render conv) makes the output deterministic
    noise = [torch.randn(B, 1, r, r) for r, _ in cfg.render_channels for _ in range(2)]
    assert torch.equal(G(wp, noise)["image"], G(wp, noise)["image"])
    # style mixing picks codes by index
    w2 = G.map(torch.randn(B, cfg.z_dim))
    w1 = G.map(z)
    mixed = G.mix(w1, w2, torch.tensor([1, 5, G.n_latent]))
    assert torch.equal(mixed[1, :5], w1[1].expand(5, -1))
    assert torch.equal(mixed[1, 5:], w2[1].expand(G.n_latent - 5, -1))
    assert torch.equal(mixed[2], wp[2]) and torch.equal(mixed[0, 1:], w2[0].expand(G.n_latent - 1, -1))

    Dn = Discriminator(cfg)
    logits = Dn(out["image"], out["seg"].softmax(1))
    assert logits.shape == (B, 1) and logits.dtype == torch.float32

    parser = FaceParser(cfg.parser_channels)
    assert parser(out["image"]).shape == (B, K, R, R)
    assert [f.shape[1] for f in parser.features(out["image"])] == list(cfg.parser_channels)

    m = G.mean_latents(n=400, batch=200, min_samples=5)
    assert m["w_mean"].shape == m["w_mean_transparent"].shape == (G.n_latent, cfg.w_dim)
    diff = (m["w_mean"] != m["w_mean_transparent"]).any(dim=1).nonzero().ravel().tolist()
    k = PART_IDS["eyeglasses"]
    assert set(diff) <= {G.shape_index(k), G.texture_index(k)} and diff
    # the modified mean shows at least as much eyeglasses as the plain mean
    cov = lambda wpm: (G.local_forward(wpm[None])[0].softmax(1)[0, k]).mean()
    assert cov(m["w_mean_transparent"]) >= cov(m["w_mean"])


def test_all_configs_build():
    for name, cfg in CONFIGS.items():
        if name == "paper":
            continue                                        # 70M parameters: built in other runs
        G, Dn = Generator(cfg), Discriminator(cfg)
        assert G.render.n_styles == 2 * len(cfg.render_channels)
    assert CONFIGS["paper"].resolution == 512 and CONFIGS["paper"].batch == 16


def test_color_loss_zero_and_monotonic():
    torch.manual_seed(0)
    B, K, R = 2, NUM_PARTS, 16
    probs = torch.rand(B, K, R, R).softmax(1)
    img = torch.rand(B, 3, R, R) * 2 - 1
    assert float(T.color_loss(img, probs, img, probs)) == 0.0
    # same mean colours under different layouts: zero too
    flat = torch.full((B, 3, R, R), 0.3)
    other = torch.rand(B, K, R, R).softmax(1)
    assert float(T.color_loss(flat, probs, flat, other)) < 1e-4      # eps: one pixel of weight
    losses = [float(T.color_loss(img, probs, img + d, probs)) for d in (0.1, 0.2, 0.4, 0.8)]
    assert all(a < b for a, b in zip(losses, losses[1:])) and losses[0] > 0
    # only hair and face count: changing the nose colour alone costs nothing
    hard = torch.zeros(B, K, R, R)
    hard[:, PART_IDS["nose"]] = 1
    assert float(T.color_loss(img, hard, img + 0.5, hard)) < 1e-10


def test_diff_augment_consistent():
    torch.manual_seed(0)
    B, K, R = 4, NUM_PARTS, 16
    img = torch.rand(B, 3, R, R, requires_grad=True)
    seg = torch.nn.functional.one_hot(torch.randint(0, K, (B, R, R)), K).permute(0, 3, 1, 2).float()
    seg.requires_grad_(True)
    a, s = T.diff_augment(img, seg, "translation")
    # geometric augmentation moves image and mask together: recover the shift from the segmentation
    for b in range(B):
        found = False
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                ref = torch.roll(seg[b], (dy, dx), (1, 2))
                inner = (slice(None), slice(2, R - 2), slice(2, R - 2))
                if torch.equal(s[b][inner], ref[inner]):
                    assert torch.equal(a[b][inner], torch.roll(img[b], (dy, dx), (1, 2))[inner])
                    found = True
        assert found
    a, s = T.diff_augment(img, seg, "color,translation,cutout")
    assert a.shape == img.shape and s.shape == seg.shape
    assert (s.sum(1) <= 1 + 1e-6).all()
    (a.sum() + s.sum()).backward()
    assert img.grad is not None and seg.grad is not None


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

@needs_real
def test_real_loader_split_and_cache(real32, array_cache):
    assert len(real32) == len(realfaces.stems(REAL_ROOT, "train")) > 0
    assert not any(realfaces.is_validation(s) for s in real32.names)
    assert real32.images.dtype == torch.uint8 and real32.images.shape[1:] == (3, 32, 32)
    assert real32.parts.shape[1:] == (32, 32) and int(real32.parts.max()) < NUM_PARTS
    img, parts = real32.batch([0, 5, 7])
    assert img.dtype == torch.float32 and img.shape == (3, 3, 32, 32) and -1 <= img.min() <= img.max() <= 1
    assert parts.dtype == torch.long and parts.shape == (3, 32, 32)
    x, p = real32[4]
    assert x.shape == (3, 32, 32) and p.shape == (32, 32)
    # cached: a second open reads the .npy, no decoding
    entries = list((array_cache / "arrays").glob("real-32-*"))
    assert entries and (entries[0] / "images.npy").is_file()
    t = time.perf_counter()
    again = D.real_faces(None, "train", 32)
    assert time.perf_counter() - t < 1.0
    assert torch.equal(again.images, real32.images) and again.names == real32.names
    val = D.real_faces(None, "val", 32)
    assert len(val) and all(realfaces.is_validation(s) for s in val.names)
    assert not set(val.names) & set(real32.names)


def test_real_loader_refuses_bad_data(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    root = tmp_path / "faces"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for s in ("a1", "b2"):
        img, lab = fake_face(rng, 64)
        Image.fromarray(img).save(root / "images" / f"{s}.jpg")
        Image.fromarray(lab, mode="L").save(root / "masks" / f"{s}.png")
    assert len(D.real_faces(root, "train", 32, cache=False)) == 2
    Image.fromarray(img).save(root / "images" / "b3.jpg")                    # image without mask
    with pytest.raises(UserError, match="without a matching mask"):
        D.real_faces(root, "train", 32, cache=False)
    Image.fromarray(lab[:32, :32], mode="L").save(root / "masks" / "b3.png")  # mask of another size
    with pytest.raises(UserError, match="mask is 32x32"):
        D.real_faces(root, "train", 32, cache=False)
    Image.fromarray(np.full((64, 64), 40, np.uint8), mode="L").save(root / "masks" / "b3.png")
    with pytest.raises(UserError, match="class layout"):
        D.real_faces(root, "train", 32, cache=False)
    Image.fromarray(lab, mode="L").save(root / "masks" / "b3.png")
    (root / "images" / "b3.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    with pytest.raises(UserError, match="corrupt"):
        D.real_faces(root, "train", 32, cache=False)
    Image.fromarray(img).save(root / "images" / "b3.jpg")
    with pytest.raises(UserError, match="smaller than the training resolution"):
        D.real_faces(root, "train", 128, cache=False)


def test_release_reader_and_converter(tmp_path):
    nums = [0, 1, 2, 3, 2001, 2002, 7, 9]
    labels = make_release_tree(tmp_path / "rel", nums)
    ds_all = D.release_faces(tmp_path / "rel", "all", 32, exclude_root=tmp_path / "none")
    assert len(ds_all) == len(nums)
    # composed masks equal the source label maps (folder n // 2000 is read too)
    by_stem = dict(zip(ds_all.names, range(len(ds_all))))
    for n in nums:
        i = by_stem[D.release_stem(n)]
        assert np.array_equal(ds_all.parts[i].numpy(), labels_to_parts(labels[n]))
    # the split rule applies to the release stems
    tr = D.release_faces(tmp_path / "rel", "train", 32, exclude_root=tmp_path / "none")
    va = D.release_faces(tmp_path / "rel", "val", 32, exclude_root=tmp_path / "none") \
        if any(realfaces.is_validation(D.release_stem(n)) for n in nums) else None
    assert all(not realfaces.is_validation(s) for s in tr.names)
    assert len(tr) + (len(va) if va else 0) == len(nums)
    # painting order: cloth is painted after skin, like the official script
    n = nums[0]
    folder = tmp_path / "rel" / D.RELEASE_MASKS / "0"
    from PIL import Image
    Image.fromarray(np.full((32, 32), 255, np.uint8), mode="L").save(folder / f"{n:05d}_cloth.png")
    lab = D.compose_release_mask({p: folder / f"{n:05d}_{p}.png" for p in ("skin", "cloth")})
    assert (lab == CLASS_IDS["cloth"]).all()
    # converter -> the 1k layout, readable by the real-face loader with the same split
    out = tmp_path / "conv"
    assert D.convert_release(tmp_path / "rel", out) == len(nums)
    conv = D.real_faces(out, "all", 32, cache=False)
    assert sorted(conv.names) == sorted(D.release_stem(n) for n in nums)
    assert json.loads((out / "sources.json").read_text())[D.release_stem(3)] == 3
    # a part mask of an unknown face, an unknown part name
    (folder / "00099_skin.png").write_bytes((folder / f"{nums[1]:05d}_skin.png").read_bytes())
    with pytest.raises(UserError, match="no image"):
        D.release_faces(tmp_path / "rel", "all", 32, cache=False)
    (folder / "00099_skin.png").unlink()
    (folder / "00001_wig.png").write_bytes(b"")
    with pytest.raises(UserError, match="not a CelebAMask-HQ part mask"):
        D.release_faces(tmp_path / "rel", "all", 32, cache=False)


@needs_real
def test_release_training_split_drops_validation_faces(tmp_path):
    """A release face that is one of the 1k validation faces never reaches the training split."""
    from PIL import Image
    val_stem = realfaces.stems(REAL_ROOT, "val")[0]
    with Image.open(REAL_ROOT / "images" / f"{val_stem}.jpg") as im:      # read in place, copied only to tmp
        face = np.asarray(im.convert("RGB").resize((128, 128), Image.LANCZOS))
    train_nums = [n for n in range(40) if not realfaces.is_validation(D.release_stem(n))][:4]
    make_release_tree(tmp_path / "rel", train_nums, img_res=128, images={train_nums[0]: face})
    ds = D.release_faces(tmp_path / "rel", "train", 32, cache=False)
    assert D.release_stem(train_nums[0]) not in ds.names
    assert len(ds) == len(train_nums) - 1


def test_avatar_loader(tmp_path):
    root = make_avatar_dataset(tmp_path / "av", n=10, res=32, incomplete=2)
    ds = D.avatar_dataset(root, 32)
    assert len(ds) == 10 and ds.names[0] == "000000"       # incomplete samples are left out
    img, parts = ds.batch(torch.arange(4))
    assert img.shape == (4, 3, 32, 32) and parts.shape == (4, 32, 32)
    assert D.open_dataset(root, 32).names == ds.names
    assert len(D.avatar_dataset(root, 16, cache=False)) == 10
    with pytest.raises(UserError, match="smaller than the training resolution"):
        D.avatar_dataset(root, 64, cache=False)
    (root / "masks" / "000003.png").unlink()
    with pytest.raises(UserError, match="without their mask"):
        D.avatar_dataset(root, 32, cache=False)
    from PIL import Image
    Image.fromarray(np.full((32, 32), 25, np.uint8), mode="L").save(root / "masks" / "000003.png")
    with pytest.raises(UserError, match="class layout"):
        D.avatar_dataset(root, 32, cache=False)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(root / "masks" / "000003.png")
    with pytest.raises(UserError, match="single-channel"):
        D.avatar_dataset(root, 32, cache=False)
    Image.fromarray(np.zeros((32, 32), np.uint8), mode="L").save(root / "masks" / "000003.png")
    Image.fromarray(np.zeros((48, 48, 3), np.uint8)).save(root / "images" / "000004.png")
    with pytest.raises(UserError, match="manifest says 32"):
        D.avatar_dataset(root, 32, cache=False)
    (root / "images" / "000004.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(UserError, match="corrupt"):
        D.avatar_dataset(root, 32, cache=False)
    man = json.loads((root / "manifest.json").read_text())
    (root / "manifest.json").write_text(json.dumps({**man, "classes": "lapa-11"}))
    with pytest.raises(UserError, match="class layout"):
        D.avatar_dataset(root, 32, cache=False)
    with pytest.raises(UserError, match="not a dataset"):
        D.open_dataset(tmp_path, 32)


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------

@needs_real
def test_tiny_training_reduces_losses(real32):
    """On a fixed batch and fixed latents (no augmentation), D steps lower D's loss, G steps lower G's,
    and parser steps lower the parser's cross-entropy: real gradient steps of the tiny config."""
    cfg = TINY.replace(augment="")
    tr = T.GANTrainer(cfg, real32)
    g = torch.Generator().manual_seed(1)
    real = tr.real_batch()
    lat = (torch.randn(tr.b, cfg.z_dim, generator=g), torch.randn(tr.b, cfg.z_dim, generator=g),
           torch.full((tr.b,), tr.G.n_latent))
    noise_seed = 5

    def d_loss():
        torch.manual_seed(noise_seed)
        return tr.d_loss(real, lat)

    def g_loss():
        torch.manual_seed(noise_seed)
        return tr.g_loss(lat)[0]

    T.requires_grad(tr.G, False)
    before = float(d_loss().detach())
    for _ in range(5):
        loss = d_loss()
        tr.opt_d.zero_grad()
        loss.backward()
        tr.opt_d.step()
    after = float(d_loss().detach())
    assert after < before - 0.05, (before, after)

    T.requires_grad(tr.G, True)
    T.requires_grad(tr.D, False)
    before = float(g_loss().detach())
    for _ in range(5):
        loss = g_loss()
        tr.opt_g.zero_grad()
        loss.backward()
        tr.opt_g.step()
    after = float(g_loss().detach())
    assert after < before - 0.05, (before, after)

    pt = T.ParserTrainer(cfg, real32)
    img, parts = pt.batch()
    with torch.no_grad():
        before = float(pt.loss(img, parts))
    for _ in range(15):
        pt.train_step()
    with torch.no_grad():
        after = float(pt.loss(img, parts))
    assert after < before - 0.1, (before, after)


@needs_real
def test_train_resume_exact_and_refusals(real32, tmp_path):
    kw = dict(dataset=real32, log=lambda s: None, overrides={"ckpt_every": 2, "sample_every": 2})
    full = T.train("real", "tiny", work_dir=tmp_path / "a", steps=5, **kw)["trainer"]
    T.train("real", "tiny", work_dir=tmp_path / "b", steps=2, **kw)
    res = T.train("real", "tiny", work_dir=tmp_path / "b", steps=5, resume=True, **kw)
    assert res["step"] == 5
    resumed = res["trainer"]
    for name in ("G", "G_ema", "D"):
        a, b = full.modules()[name].state_dict(), resumed.modules()[name].state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert torch.equal(full.pl_mean, resumed.pl_mean)
    # files: safetensors weights, optimiser states loadable with weights_only, JSON state, sample grids, log
    ck = T.find_checkpoint(tmp_path / "b")
    assert ck.name == "step_00000005" and (ck / "G_ema.safetensors").is_file()
    torch.load(ck / "optim_g.pt", weights_only=True)
    assert json.loads((ck / "state.json").read_text())["step"] == 5
    assert sorted(p.name for p in (tmp_path / "b" / "samples").glob("*.png"))[-1] == "step_00000005.png"
    assert "checkpoint step 4" in (tmp_path / "b" / "log.txt").read_text()
    assert len(list((tmp_path / "b" / "checkpoints").glob("step_*"))) <= TINY.keep_ckpts
    # an existing run is not overwritten; another config's checkpoint is refused
    with pytest.raises(UserError, match="--resume"):
        T.train("real", "tiny", work_dir=tmp_path / "b", steps=6, **kw)
    with pytest.raises(UserError, match="cannot resume config.*lr_g"):
        T.train("real", "tiny", work_dir=tmp_path / "b", steps=6, resume=True, dataset=real32,
                log=lambda s: None, overrides={"lr_g": 0.001})
    with pytest.raises(UserError, match="stage 'real', not 'parser'"):
        T.train("parser", "tiny", work_dir=tmp_path / "b", steps=6, resume=True, dataset=real32,
                log=lambda s: None)


@needs_real
def test_divergence_stops_clearly(real32, tmp_path):
    with pytest.raises(UserError, match="diverged at step"):
        T.train("real", "tiny", work_dir=tmp_path / "nan", steps=6, dataset=real32, log=lambda s: None,
                overrides={"lr_d": float("inf")})
    assert (tmp_path / "nan" / "diverged.json").is_file()


@needs_real
def test_avatar_stage_from_real(real32, tmp_path):
    T.train("real", "tiny", work_dir=tmp_path / "real", steps=2, dataset=real32, log=lambda s: None)
    av = make_avatar_dataset(tmp_path / "av", n=16, res=32)
    out = T.train("avatar", "tiny", data=av, work_dir=tmp_path / "avatar", steps=3, init=tmp_path / "real",
                  log=lambda s: None, overrides={"freeze_local": True, "lambda_color": 2.0})
    tr = out["trainer"]
    assert "color" in out["stats"] and out["stats"]["color"] >= 0
    G_real, _ = T.load_generator(tmp_path / "real")
    ref, av_sd = G_real.state_dict(), tr.G.state_dict()
    frozen = [k for k in ref if k.startswith(("mapping.", "local."))]
    assert frozen and all(torch.equal(ref[k], av_sd[k]) for k in frozen)          # frozen: unchanged
    assert any(not torch.equal(ref[k], av_sd[k]) for k in ref if k.startswith("render."))
    from PIL import Image
    with Image.open(tmp_path / "avatar" / "samples" / "step_00000003.png") as im:
        # 4 columns (G_real image | seg | G_avatar image | seg) of 32 px tiles, 2 px padding
        assert im.size[0] == 4 * (32 + 2) + 2
    # resume needs no --init: G_real is kept in the work dir
    T.train("avatar", "tiny", data=av, work_dir=tmp_path / "avatar", steps=4, resume=True,
            log=lambda s: None, overrides={"freeze_local": True, "lambda_color": 2.0})
    with pytest.raises(UserError, match="needs --init"):
        T.train("avatar", "tiny", data=av, work_dir=tmp_path / "x", steps=1, log=lambda s: None)
    with pytest.raises(UserError, match="cannot train stage 'real'"):
        T.train("real", "tiny", data=av, work_dir=tmp_path / "y", steps=1, log=lambda s: None)


@needs_real
def test_parser_stage_reports_validation_miou(real32, tmp_path):
    lines = []
    out = T.train("parser", "tiny", work_dir=tmp_path / "p", steps=4, dataset=real32, log=lines.append)
    meta = json.loads((T.find_checkpoint(tmp_path / "p") / "meta.json").read_text())
    assert 0 <= meta["val"]["miou"] <= 1 and any("validation mIoU" in l for l in lines)
    net, _ = T.load_parser(tmp_path / "p")
    conf = confusion(torch.tensor([0, 1, 1]), torch.tensor([0, 1, 2]))
    assert miou(conf)[0] == pytest.approx((1 + 0.5 + 0) / 3)


def _env(cache):
    env = dict(os.environ, LIKENESS_CACHE=str(cache), OMP_NUM_THREADS="1")
    env.pop("WORLD_SIZE", None)
    return env


@needs_real
def test_ddp_two_processes(tmp_path, array_cache):
    cmd = [PY, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "likeness.training.generators.train_gan", "--stage", "real", "--config", "tiny",
           "--work", str(tmp_path / "ddp"), "--steps", "2", "--device", "cpu"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env(array_cache))
    assert r.returncode == 0, r.stderr[-3000:]
    ck = T.find_checkpoint(tmp_path / "ddp")
    assert ck.name == "step_00000002"
    assert (ck / "rng_rank0.pt").is_file() and (ck / "rng_rank1.pt").is_file()
    assert T.read_state(ck)["world"] == 2
    assert "2 process(es)" in (tmp_path / "ddp" / "log.txt").read_text()


@needs_real
def test_ctrl_c_saves_and_exits(tmp_path, array_cache):
    work = tmp_path / "int"
    cmd = [PY, "-m", "likeness.training.generators.train_gan", "--stage", "real", "--config", "tiny",
           "--work", str(work), "--steps", "100000"]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         env=_env(array_cache))
    lines = []
    for line in p.stdout:
        lines.append(line)
        if "step 10/" in line:
            p.send_signal(signal.SIGINT)
            break
    rest, _ = p.communicate(timeout=120)
    out = "".join(lines) + rest
    assert p.returncode == 0, out[-2000:]
    assert "stopped at step" in out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["stopped"] and summary["step"] >= 10
    assert T.find_checkpoint(work).name == f"step_{summary['step']:08d}"


@needs_real
def test_metrics(real32):
    from likeness.training.generators.gan_metrics import coherence, cross_domain, throughput
    torch.manual_seed(0)
    G, G2 = Generator(TINY), Generator(TINY)
    parser = FaceParser(TINY.parser_channels)
    c = coherence(G, parser, n=8, batch=4)
    assert 0 <= c["miou"] <= 1 and set(c["per_part"]) == set(PARTS)
    same = cross_domain(G, G, n=8, batch=4)
    other = cross_domain(G, G2, n=8, batch=4)
    assert same["miou"] == pytest.approx(1.0) and same["color_distance"]["hair"] < 1e-6
    assert other["miou"] < 1 and other["color_distance"]["face"] > same["color_distance"]["face"]
    chance = cross_domain(G, G, n=8, batch=4, shuffled=True)      # another sample's z: no agreement
    assert chance["miou"] < 1 and chance["color_distance"]["hair"] > 1e-3
    t = throughput(TINY, dataset=real32, steps=2, warmup=1)
    assert t["images_per_s"] > 0 and t["batch"] == TINY.batch


@needs_real
def test_the_shipped_photo_parser_judges_coherence():
    """The add-on's photo parser as the coherence judge: on real validation faces at the generator's
    64 px it reads their true masks well (the ceiling), on an untrained generator it disagrees."""
    from likeness.training.common.data import real_faces
    from likeness.training.generators.gan_metrics import coherence, onnx_parser, parser_reference
    judge = onnx_parser(Path(__file__).resolve().parents[1] / "models" / "parser" / "parser.onnx")
    ref = parser_reference(judge, real_faces(None, "val", 64))
    assert ref["photos"] == 256 and ref["miou"] > 0.45
    assert ref["per_part"]["hair"] > 0.6 and ref["per_part"]["face"] > 0.7
    torch.manual_seed(0)
    untrained = coherence(Generator(get_config("cpu")), judge, n=16, batch=8)
    assert untrained["miou"] < ref["miou"] - 0.2


def test_layout_loss_ties_parts_and_leaves_accessories_free():
    K = NUM_PARTS
    hair, face, hat, glasses = (PART_IDS[p] for p in ("hair", "face", "hat", "eyeglasses"))

    def logits(ids):                           # confident logits of a part map [1, H, W]
        return 20.0 * torch.nn.functional.one_hot(torch.as_tensor(ids), K).permute(0, 3, 1, 2).float()

    real = torch.full((1, 4, 4), face)
    real[:, :2] = hair
    assert float(T.layout_loss(logits(real), logits(real))) < 1e-6         # same layout
    swapped = torch.where(real == hair, face, hair)
    assert float(T.layout_loss(logits(real), logits(swapped))) > 10         # other layout
    with_hat = real.clone()
    with_hat[:, 0] = hat                                                    # an accessory over hair
    with_glasses = real.clone()
    with_glasses[:, 2, 1:3] = glasses
    assert float(T.layout_loss(logits(real), logits(with_hat))) < 1e-6
    assert float(T.layout_loss(logits(real), logits(with_glasses))) < 1e-6
    # where G_real wears the hat, the avatar must cover it with an accessory too
    assert float(T.layout_loss(logits(with_hat), logits(real))) > 3      # 4 of 16 pixels at ~13.8


@needs_real
def test_layout_loss_trains_the_avatar_toward_g_reals_layout(real32):
    """Avatar stage with lambda_layout: G steps on fixed latents lower the layout loss against a
    G_real whose layout differs; the weight 0 only monitors it."""
    torch.manual_seed(0)
    cfg = TINY.replace(augment="", lambda_layout=5.0, lambda_color=0.0)
    g_ref = Generator(TINY)
    tr = T.GANTrainer(cfg, real32, stage="avatar", g_ref=g_ref)
    lat = (torch.randn(tr.b, cfg.z_dim), torch.randn(tr.b, cfg.z_dim), torch.full((tr.b,), tr.G.n_latent))
    T.requires_grad(tr.D, False)

    def layout():
        torch.manual_seed(3)
        tr.g_loss(lat)
        return float(tr.last_layout.detach())
    before = layout()
    for _ in range(8):
        torch.manual_seed(3)
        loss = tr.g_loss(lat)[0]
        tr.opt_g.zero_grad()
        loss.backward()
        tr.opt_g.step()
    assert layout() < before - 0.1, (before, layout())
    stats = T.GANTrainer(TINY, real32, stage="avatar", g_ref=g_ref).train_step()
    assert "layout" in stats and float(stats["layout"]) > 0                 # monitored at weight 0
    assert TINY.fingerprint() == TINY.replace(lambda_layout=0.0).fingerprint()
    assert cfg.fingerprint() != cfg.replace(lambda_layout=0.0).fingerprint()


@needs_real
def test_balanced_sampling_shows_g_real_the_rare_faces(real32, tmp_path):
    """balance > 0 draws faces with hats and glasses (5 % of the shared faces) far more often, by the
    hair-length x glasses x hat groups of their masks; it is a schedule: a run may switch it on
    when it resumes."""
    groups, names = T.attribute_groups(real32)
    hat = (groups & 1).astype(bool)
    assert len(groups) == len(real32) and 0.02 < hat.mean() < 0.1 and names[1] == "bald hat"
    w = T.balance_weights(real32, 1.0)
    assert w.sum() == pytest.approx(1.0) and w[hat].sum() > 0.3            # uniform: ~0.05
    for g in np.unique(groups):                                             # power 1: groups equal
        assert w[groups == g].sum() == pytest.approx(1.0 / len(np.unique(groups)))
    trainer = T.GANTrainer(TINY.replace(balance=0.5), real32)
    drawn = torch.cat([torch.multinomial(trainer.data_weights, 64, True, generator=trainer.data_gen)
                       for _ in range(20)]).numpy()
    assert 0.12 < hat[drawn].mean() < 0.3
    kw = dict(dataset=real32, log=lambda s: None, overrides={"ckpt_every": 2, "sample_every": 99})
    T.train("real", "tiny", work_dir=tmp_path / "r", steps=2, **kw)
    res = T.train("real", "tiny", work_dir=tmp_path / "r", steps=3, resume=True, dataset=real32,
                  log=lambda s: None, overrides={"balance": 0.5, "ckpt_every": 2, "sample_every": 99})
    assert res["step"] == 3 and res["trainer"].data_weights is not None


def test_attribute_shares_of_generated_faces():
    """``attributes`` counts what the judge sees in G's images: hats, glasses, hair lengths."""
    from likeness.training.generators.gan_metrics import attributes
    from likeness.training.common.parts import PART_IDS
    G = Generator(TINY)

    def judge(img):                                  # a judge whose answer is known: 1 in 4 a hat
        b, _, h, w = img.shape
        parts = torch.full((b, h, w), PART_IDS["face"])
        parts[:, : h // 2] = PART_IDS["hair"]        # hair half the frame: "long"
        parts[::4, : h // 4] = PART_IDS["hat"]
        return parts
    res = attributes(G, judge, n=16, batch=8)
    assert res["n"] == 16 and res["hat"] == 0.25 and res["glasses"] == 0.0
    assert res["hair_length"]["long"] == 0.75 and sum(res["hair_length"].values()) == pytest.approx(1)


@needs_real
def test_the_photo_parser_counts_hats_and_glasses_as_the_masks_do():
    """On the real validation faces at 64 px, the shares the shipped parser reads are close to the
    true masks' (the attributes measure of G_real is only as good as this)."""
    from likeness.training.common.data import real_faces
    from likeness.training.generators.gan_metrics import onnx_parser
    ds = real_faces(None, "val", 64)
    truth = T.group_shares(T.attribute_groups(ds)[0])
    judge = onnx_parser(Path(__file__).resolve().parents[1] / "models" / "parser" / "parser.onnx")
    read = T.group_shares(np.concatenate([T.groups_of_parts(judge(ds.batch(np.arange(i, min(i + 64, len(ds))))[0]))
                                          for i in range(0, len(ds), 64)]))
    assert truth["n"] == read["n"] == 256
    assert abs(read["hat"] - truth["hat"]) < 0.04 and abs(read["glasses"] - truth["glasses"]) < 0.04
    assert abs(read["hair_length"]["long"] - truth["hair_length"]["long"]) < 0.1
