"""Colour calibration (real Blender renders) and partial labels of the real TRAIN photos, and the
estimator's auxiliary loss on them. Real renders, real photos, real training steps; caches go to
tmp folders. Kept small: a reduced calibration grid, ~30 photos, 32-64 px estimator inputs."""
from __future__ import annotations

import json
import time

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")
torch = pytest.importorskip("torch")
torch.set_num_threads(1)      # on a busy 2-core machine two threads are far slower than one

from likeness.backend import fidelity, realfaces  # noqa: E402
from likeness.backend.colour import ciede2000  # noqa: E402
from likeness.backend.errors import UserError  # noqa: E402
from likeness.backend.schema import CLASS_IDS, TAG_VOCABULARY, find_pack  # noqa: E402
from likeness.render_engine import calibration as calib  # noqa: E402
from likeness.training.estimator import model as est  # noqa: E402
from likeness.training.estimator import real_labels as rl  # noqa: E402
from likeness.training.estimator.paired_set import write_paired_set  # noqa: E402

RES = 128
MAX_POINTS = 72          # hair grid 8 x 3 x 3 (the full default is 15 x 5 x 5)

if not realfaces.default_root().is_dir():
    pytest.skip("the shared real faces are not here", allow_module_level=True)


@pytest.fixture(scope="module")
def pack():
    return find_pack("default")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("likeness-cache")


@pytest.fixture(scope="module")
def cal(pack, cache):
    return calib.calibrate_colours(pack, RES, max_points=MAX_POINTS, cache_dir=cache / "cal")


def _mask_fractions(stem):
    from PIL import Image
    with Image.open(realfaces.default_root() / "masks" / f"{stem}.png") as im:
        m = np.asarray(im)
    counts = np.bincount(m.ravel(), minlength=len(CLASS_IDS)) / m.size
    return counts, m


@pytest.fixture(scope="module")
def stems():
    """Train photos: the first with eyeglasses, the first with hats, and 20 more."""
    train = realfaces.stems(split="train")
    glasses, hats = [], []
    for s in train:
        f, _ = _mask_fractions(s)
        if f[CLASS_IDS["eyeglasses"]] > 0.01 and len(glasses) < 5:
            glasses.append(s)
        if f[CLASS_IDS["hat"]] > 0.02 and len(hats) < 4:
            hats.append(s)
        if len(glasses) == 5 and len(hats) == 4:
            break
    rest = [s for s in train[:40] if s not in glasses + hats][:20]
    return sorted(set(glasses + hats + rest))


@pytest.fixture(scope="module")
def labels(pack, cal, stems, cache):
    return rl.real_partial_labels(pack, cal, "train", size=64, stems=stems,
                                  cache_dir=cache / "arrays")


# ---- calibration ---------------------------------------------------------------------------

def test_calibration_finds_drives_and_is_monotone(pack, cal, cache):
    # found from the manifest + renders, not named anywhere in the code
    regions = {n: d["region"] for n, d in cal["drives"].items()}
    assert regions == {"skin_tone": "skin", "hair_color": "hair", "hair_red": "hair",
                       "hair_grey": "hair", "eye_color": "eyes", "lip_color": "lips"}
    assert cal["regions"]["hair"]["params"] == ["hair_color", "hair_red", "hair_grey"]

    skin = np.array(cal["regions"]["skin"]["lab"])                 # light -> deep ramp
    assert (np.diff(skin[:, 0]) < 0).all() and skin[0, 0] - skin[-1, 0] > 40
    hair = np.array(cal["regions"]["hair"]["lab"])                 # [colour, red, grey, 3]
    assert (np.diff(hair[:, 0, 0, 0]) > 0).all() and hair[-1, 0, 0, 0] - hair[0, 0, 0, 0] > 50
    # redness raises a*; full greyness makes every hair colour the same grey
    assert (hair[:, -1, 0, 1] > hair[:, 0, 0, 1]).all()
    grey = hair[:, :, -1].reshape(-1, 3)
    assert ciede2000(grey, np.repeat(grey[:1], len(grey), 0)).max() < 3.0

    # per-style offsets: the hair slot shapes the hair region; bald shows no hair to measure
    var = cal["regions"]["hair"]["variants"]
    assert var["slot"] == "hair" and "bald" not in var["options"] and "long" in var["options"]
    assert np.allclose(var["options"][var["default_option"]]["offset"], 0.0)
    assert cal["regions"]["skin"]["variants"] is None

    # cached: same tables again without rendering
    t = time.monotonic()
    again = calib.calibrate_colours(pack, RES, max_points=MAX_POINTS, cache_dir=cache / "cal")
    assert again == cal and time.monotonic() - t < 2.0


def test_grid_counts_respect_the_cap(pack):
    assert calib.grid_counts(pack, ["hair_color", "hair_red", "hair_grey"], 400) == [15, 5, 5]
    assert calib.grid_counts(pack, ["hair_color", "hair_red", "hair_grey"], 72) == [8, 3, 3]
    assert calib.grid_counts(pack, ["skin_tone"], 400) == [15]


# ---- labels --------------------------------------------------------------------------------

def test_labels_never_hold_validation_photos(pack, cal, labels, cache):
    assert labels.stems and not any(realfaces.is_validation(s) for s in labels.stems)
    val = realfaces.stems(split="val")
    with pytest.raises(UserError, match="split must be 'train'"):
        rl.real_partial_labels(pack, cal, "val", size=64, cache_dir=cache / "arrays")
    with pytest.raises(UserError, match="not real training photos"):
        rl.real_partial_labels(pack, cal, "train", size=64, stems=labels.stems[:2] + val[:1],
                               cache_dir=cache / "arrays")
    # rows are the photos they claim to be
    for i in (0, len(labels) - 1):
        want = rl._decode_image(realfaces.default_root() / "images" / f"{labels.stems[i]}.jpg", 64)
        assert np.array_equal(np.asarray(labels.images[i]), want)


def test_presence_labels_equal_mask_presence(labels):
    j_g = labels.presence_names.index("glasses")
    j_h = labels.presence_names.index("headwear")
    seen = {"glasses": 0, "headwear": 0}
    for i, s in enumerate(labels.stems):
        f, _ = _mask_fractions(s)
        g = f[CLASS_IDS["eyeglasses"]] >= fidelity.PRESENCE_THRESHOLDS["glasses"]
        h = f[CLASS_IDS["hat"]] >= fidelity.PRESENCE_THRESHOLDS["headwear"]
        assert labels.presence_valid[i, j_g] and labels.presence[i, j_g] == float(g), s
        assert labels.presence[i, j_h] == float(h), s
        seen["glasses"] += g
        seen["headwear"] += h
        # a hat hides the hair: no hair-length label then
        assert labels.hair_valid[i] == (not h)
    assert seen["glasses"] >= 3 and seen["headwear"] >= 3


def test_hair_length_rule(labels):
    f = np.array([0.0, 0.02, 0.05, 0.15, 0.3, 0.5])
    assert rl.hair_rank_of_fraction(f).tolist() == [0, 0, 1, 2, 3, 4]
    cum = rl.hair_cumulative_targets(f)
    assert (np.diff(cum, axis=0) >= 0).all() and (np.diff(cum, axis=1) <= 0).all()
    assert cum[0].max() < 0.01 and cum[-1].min() > 0.8
    for k, t in enumerate(rl.HAIR_LENGTH_THRESHOLDS):      # soft boundaries: 1/2 at the boundary,
        at = rl.hair_cumulative_targets(np.array([t / 1.5, t, t * 1.5]))[:, k]   # clear at 1.5x
        assert at[0] < 0.1 and at[1] == pytest.approx(0.5, abs=1e-6) and at[2] > 0.9
    v = labels.hair_valid
    assert (labels.hair_rank[v] == rl.hair_rank_of_fraction(labels.hair_fraction[v])).all()
    assert (labels.hair_rank[~v] == -1).all()
    for i, s in enumerate(labels.stems):
        fr, _ = _mask_fractions(s)
        assert labels.hair_fraction[i] == pytest.approx(fr[CLASS_IDS["hair"]], abs=1e-6)


def _render_stats(pack, vector):
    from likeness.render_engine.render import render_sample
    from likeness.render_engine.rig import apply_vector
    apply_vector(vector)
    rgb, mask = render_sample(pack, RES)
    return fidelity.mask_stats(mask, rgb)


def test_colour_targets_round_trip(pack, cal, labels):
    """Render the avatar at each photo's colour targets: its measured hair and skin colours come
    back close to the photo's, far closer than the default avatar's."""
    from likeness.render_engine.render import setup_render
    from likeness.render_engine.packs import open_pack_scene
    open_pack_scene(pack)
    setup_render(pack, RES)
    const = _render_stats(pack, pack.default_vector())
    hr, sk = labels.regions.index("hair"), labels.regions.index("skin")
    cols = {n: labels.colour_params.index(n) for n in labels.colour_params}
    ok = labels.colour_valid.all(1) & labels.hair_valid & (labels.hair_rank > 0)
    rows = np.nonzero(ok)[0]
    rows = rows[np.argsort(labels.photo_lab[rows, hr, 0])]           # dark to light hair
    rows = rows[np.linspace(0, len(rows) - 1, min(10, len(rows))).round().astype(int)]
    assert len(rows) >= 8
    slot = pack.slot("hair")
    var = cal["regions"]["hair"]["variants"]
    err = {"hair": [], "skin": [], "hair_const": [], "skin_const": [], "table": []}
    for i in rows:
        v = pack.default_vector()
        for n, j in cols.items():
            v.params[n] = pack.parameter(n).denormalize(float(labels.colour_target[i, j]))
        group = TAG_VOCABULARY["hair_length"][labels.hair_rank[i]]
        style = max((o for o in slot.options if o.tags.get("hair_length") == group
                     and o.id in var["options"]), key=lambda o: o.weight)
        v.slots["hair"] = style.id
        s = _render_stats(pack, v)
        for name, r in (("hair", hr), ("skin", sk)):
            photo = labels.photo_lab[i, r].astype(float)
            err[name].append(float(ciede2000(photo, np.array(s[name]))))
            err[name + "_const"].append(float(ciede2000(photo, np.array(const[name]))))
        # the calibration predicts the render: this style's table at the target parameters
        params, axes, table = rl.colour_table(cal, "hair", option_weights={style.id: 1.0})
        at = tuple(int(np.abs(axes[k] - labels.colour_target[i, cols[n]]).argmin())
                   for k, n in enumerate(params))
        err["table"].append(float(ciede2000(table[at], np.array(s["hair"]))))
    med = {k: float(np.median(v)) for k, v in err.items()}
    assert med["table"] < 2.5, med
    assert med["hair"] < 0.5 * med["hair_const"] and med["hair"] < 7.0, med
    assert med["skin"] < 0.75 * med["skin_const"] and med["skin"] < 8.0, med


def test_labels_are_cached(pack, cal, labels, cache):
    t = time.monotonic()
    again = rl.real_partial_labels(pack, cal, "train", size=64, stems=labels.stems,
                                   cache_dir=cache / "arrays")
    assert time.monotonic() - t < 2.0 and again.key == labels.key
    for k in ("presence", "colour_target", "colour_valid", "hair_cum", "residual"):
        assert np.array_equal(getattr(again, k), getattr(labels, k), equal_nan=True)
    assert json.dumps(labels.summary())      # plain data


# ---- the auxiliary loss ----------------------------------------------------------------------

def test_aux_loss_trains_on_a_small_batch(pack, labels):
    torch.manual_seed(0)
    model = est.Estimator(pack.n_continuous, pack.slot_sizes, hidden=64)
    cfg = est.get_config("tiny", input_size=64, real_fraction=0.5)
    real = est.RealBatches(labels, pack)
    idx = np.arange(min(8, len(labels)))
    imgs, target = real.batch(idx)
    x = est.prepare_batch(imgs, 64, augment=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(12):
        loss, parts = est.real_loss(model(x), target, real, cfg)
        assert torch.isfinite(loss) and set(parts) == {"real_presence", "real_hair", "real_colour",
                                                       "real_shape"}
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.5 * losses[0], losses

    # nothing valid -> zero loss, no NaN
    empty = {k: (torch.zeros_like(v) if v.dtype == torch.bool else v) for k, v in target.items()}
    loss, _ = est.real_loss(model(x), empty, real, cfg)
    assert float(loss.detach()) == 0.0


def test_real_loss_matches_hand_computation(pack, labels):
    """P(glasses) is the summed softmax of the non-none options; BCE weighted by class balance."""
    real = est.RealBatches(labels, pack, balance=False)
    cfg = est.get_config("tiny", lambda_real=1.0, lambda_real_colour=0.0)
    k = pack.slot_names.index("glasses")
    logits = [torch.zeros(1, n) for n in pack.slot_sizes]
    logits[k] = torch.tensor([[1.0, 0.5, 0.0, -1.0, 0.2]])
    cont = torch.full((1, pack.n_continuous), 0.5)
    n_p = len(labels.presence_names)
    assert labels.presence_names[0] == "glasses"
    target = {"presence": torch.tensor([[1.0] + [0.0] * (n_p - 1)]),
              "presence_valid": torch.tensor([[True] + [False] * (n_p - 1)]),
              "hair_cum": torch.zeros(1, 4), "hair_valid": torch.tensor([False]),
              "colour_target": torch.zeros(1, len(labels.colour_params)),
              "colour_valid": torch.zeros(1, len(labels.colour_params), dtype=torch.bool)}
    loss, _ = est.real_loss((cont, logits), target, real, cfg)
    p = torch.softmax(logits[k], 1)[0, 1:].sum()
    assert float(loss) == pytest.approx(float(-torch.log(p)), rel=1e-5)


def test_train_estimator_mixes_real_photos_and_resumes(pack, labels, tmp_path):
    rng = np.random.default_rng(0)
    n, size = 24, 32
    vecs = [pack.sample_seeded(0, i).to_arrays() for i in range(n)]
    cont = np.array([c for c, _ in vecs], np.float32)
    disc = np.array([d for _, d in vecs], np.int64)
    imgs = rng.integers(0, 255, (n, size, size, 3), dtype=np.uint8)
    write_paired_set(tmp_path / "pairs", pack, imgs, cont, disc, kind="test")
    cfg = est.get_config("tiny", input_size=32, batch=8, epochs=1, real_fraction=0.25,
                         checkpoint_every=100, val_fraction=0.2)
    quiet = dict(progress=False, log=lambda s: None)
    with pytest.raises(UserError, match="needs real labels"):
        est.train_estimator(pack, tmp_path / "pairs", tmp_path / "none", cfg, **quiet)
    full = est.train_estimator(pack, tmp_path / "pairs", tmp_path / "full", cfg,
                               real_labels=labels, **quiet)
    assert {"real_presence", "real_hair", "real_colour"} <= set(full)
    held = full["real_held_out"]
    assert held["n"] >= 1 and set(held["presence"]) == set(labels.presence_names)

    part = est.train_estimator(pack, tmp_path / "pairs", tmp_path / "split", cfg, max_steps=1,
                               real_labels=labels, **quiet)
    assert part == {"stopped_at": 1}
    est.train_estimator(pack, tmp_path / "pairs", tmp_path / "split", cfg, real_labels=labels,
                        **quiet)
    from safetensors.torch import load_file
    a = load_file(str(tmp_path / "full/checkpoint/model.safetensors"))
    b = load_file(str(tmp_path / "split/checkpoint/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)

    # The same labels under another provenance key (their code was edited, what they say was not)
    # resume; labels that say something else are refused.
    import dataclasses
    est.train_estimator(pack, tmp_path / "pairs", tmp_path / "edit", cfg, max_steps=1,
                        real_labels=labels, **quiet)
    same = dataclasses.replace(labels, key="edited-code")
    assert same.content_key() == labels.content_key()
    est.train_estimator(pack, tmp_path / "pairs", tmp_path / "edit", cfg, real_labels=same, **quiet)
    c = load_file(str(tmp_path / "edit/checkpoint/model.safetensors"))
    assert all(torch.equal(a[k], c[k]) for k in a)
    other = dataclasses.replace(labels, presence=1 - labels.presence)
    assert other.content_key() != labels.content_key()
    est.train_estimator(pack, tmp_path / "pairs", tmp_path / "other", cfg, max_steps=1,
                        real_labels=labels, **quiet)
    with pytest.raises(UserError, match="other real labels"):
        est.train_estimator(pack, tmp_path / "pairs", tmp_path / "other", cfg,
                            real_labels=other, **quiet)


# ---- face shape through the shape surrogate -------------------------------------------------

@pytest.fixture(scope="module")
def surrogate(pack, cache):
    """Fitted on 96 real engine renders at 80 px (unjittered)."""
    from likeness.render_engine.dataset import Job, render_dataset
    out = cache / "renders"
    render_dataset(Job(pack, out, 96, seed=5, resolution=80), workers=1, progress=False)
    return rl.shape_surrogate(pack, out, cache_dir=cache / "arrays")


def test_shape_surrogate_follows_the_sliders(pack, surrogate):
    assert surrogate["measures"] == list(fidelity.SHAPES_TARGETED) and surrogate["n"] == 96
    W = np.asarray(surrogate["weights"])
    assert W.shape == (pack.n_continuous + sum(pack.slot_sizes) + 1, 4)
    col = {m: j for j, m in enumerate(surrogate["measures"])}
    p = {n: i for i, n in enumerate(pack.param_names)}
    # the slider that draws a measure drives its prediction the right way
    assert W[p["mouth_width"], col["mouth_width_ratio"]] > 0
    assert W[p["eye_size"], col["eye_area_ratio"]] > 0
    assert W[p["nose_length"], col["nose_length_ratio"]] > 0
    assert W[p["face_width"], col["face_aspect"]] > 0 > W[p["face_length"], col["face_aspect"]]
    # held-out R^2 is honest about 96 renders for 98 inputs (on 3,000 renders: 0.61-0.96); the
    # labels keep only measures over SHAPE_MIN_R2
    assert len(surrogate["r2"]) == 4 and all(np.isfinite(surrogate["r2"]))
    with pytest.raises(UserError, match="at least 50"):
        rl.shape_surrogate(pack, realfaces.default_root(), cache=False)


def test_hair_surrogate_ranks_the_hairstyles_by_hair(pack, cache, surrogate):
    """The hair-amount surrogate (shape.json's hair entry) on the same 96 renders: bald has the
    least hair, the long and voluminous styles the most; the hair-only fit is cached apart."""
    hair = rl.shape_surrogate(pack, cache / "renders", cache_dir=cache / "arrays",
                              measures=("hair_fraction",))
    assert hair["measures"] == ["hair_fraction"] and hair["fingerprint"] != surrogate["fingerprint"]
    assert hair["resid_sd"][0] > 0 and hair["r2"][0] > 0.5
    k = [s.name for s in pack.slots].index("hair")
    start = pack.n_continuous + sum(pack.slot_sizes[:k])
    w = {o.id: np.asarray(hair["weights"])[start + i, 0] for i, o in enumerate(pack.slots[k].options)}
    assert w["bald"] == min(w.values()) and w["bald"] < w["crop"] < w["long"]


def test_shape_labels_and_loss(pack, cal, stems, surrogate, cache):
    sur = dict(surrogate, r2=[1.0] * 4)                        # keep every measure for the test
    lab = rl.real_partial_labels(pack, cal, "train", size=64, stems=stems, shapes=sur,
                                 cache_dir=cache / "arrays")
    assert lab.shape_names == fidelity.SHAPES_TARGETED and lab.shape_valid.sum() > 0
    stats = rl.photo_stats(realfaces.default_root(), stems, cache_dir=cache / "arrays")
    for j, m in enumerate(lab.shape_names):      # targets keep the photos' order (rank-preserving)
        v = lab.shape_valid[:, j]
        photo = np.array([stats[i][m] for i in np.nonzero(v)[0]])
        assert fidelity.spearman(photo, lab.shape_target[v, j])["value"] == pytest.approx(1.0)
        assert lab.shape_target[v, j].mean() == pytest.approx(sur["mean"][j], rel=1e-4)
        for i in np.nonzero(~v)[0]:              # turned heads and missing measures: no label
            st = stats[i]
            assert st[m] is None or st["yaw"] is None or abs(st["yaw"]) > rl.SHAPE_MAX_YAW
    with pytest.raises(UserError, match="shape surrogate is for pack"):
        rl.real_partial_labels(pack, cal, "train", size=64, stems=stems,
                               shapes=dict(sur, schema="0000"), cache_dir=cache / "arrays")

    # the loss: Huber of (surrogate(cont | softmax | 1) - target) / sd, over valid labels
    real = est.RealBatches(lab, pack, balance=False)
    cfg = est.get_config("tiny", lambda_real=0.0, lambda_real_colour=0.0, lambda_real_shape=1.0)
    i = int(np.nonzero(lab.shape_valid.all(1))[0][0])
    _, target = real.batch(np.array([i]))
    cont = torch.full((1, pack.n_continuous), 0.3, requires_grad=True)
    logits = [torch.randn(1, n, generator=torch.Generator().manual_seed(k))
              for k, n in enumerate(pack.slot_sizes)]
    loss, parts = est.real_loss((cont, logits), target, real, cfg)
    feats = np.concatenate([np.full(pack.n_continuous, 0.3),
                            *[torch.softmax(lg, 1)[0].numpy() for lg in logits], [1.0]])
    d = (feats @ np.asarray(sur["weights"]) - lab.shape_target[i]) / np.asarray(sur["sd"])
    huber = np.where(np.abs(d) < 1, 0.5 * d ** 2, np.abs(d) - 0.5).mean()
    assert float(loss) == pytest.approx(huber, rel=1e-4) and parts["real_shape"] == pytest.approx(huber, rel=1e-4)
    loss.backward()                              # gradients reach the sliders
    assert cont.grad is not None and float(cont.grad.abs().sum()) > 0
