"""The viewer's yardstick (labels, avatar readings, scores) and the attribute reader that makes the
avatar show what a viewer sees: hand-made cases, the shipped files, fits that never see validation."""
from __future__ import annotations

import csv

import numpy as np
import pytest

from likeness.backend import attributes as A
from likeness.backend import realfaces, viewer
from likeness.backend.colour import lab_to_srgb
from likeness.backend.errors import UserError
from likeness.backend.schema import CLASS_IDS, find_pack

HEADER = ["stem", "glasses", "facial_hair", "hair_length", "hair_color", "skin_tone", "bangs",
          "hat", "confidence"]


@pytest.fixture(scope="module")
def pack():
    return find_pack("default")


def write_labels(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)
    return path


def test_labels_map_the_guide_to_the_viewer_classes(tmp_path):
    path = write_labels(tmp_path / "a.csv", [
        ["s1", "sunglasses", "goatee", "buzz", "blonde", "light", "yes", "no", "high"],
        ["s2", "none", "none", "unknown", "other", "dark", "no", "yes", "low"]])
    labels = viewer.read_labels(path)
    assert labels["s1"].classes == {"glasses": "any", "facial_hair": "any", "hair_length": "short",
                                    "hair_color": "blonde", "skin_tone": "light", "bangs": "yes",
                                    "hat": "no"}
    assert labels["s1"].glasses_type == "sunglasses" and labels["s1"].confident
    assert labels["s2"].classes["hair_length"] is None       # unknown: skipped
    assert labels["s2"].classes["hair_color"] is None        # "other": no avatar class
    assert not labels["s2"].confident
    bad = tmp_path / "b.csv"
    bad.write_text("stem,glasses\ns1,none\n")
    with pytest.raises(UserError, match="expected columns"):
        viewer.read_labels(bad)
    bad.write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(UserError, match="unreadable labels"):
        viewer.read_labels(bad)


def test_balanced_accuracy_by_hand():
    # two "none", one "any": one of each right -> recalls 0.5 and 1.0; a None prediction misses
    r = viewer.balanced_accuracy(["none", "none", "any", None], ["none", None, "any", "any"],
                                 ("none", "any"))
    assert r["value"] == pytest.approx(0.75) and r["n"] == 3
    assert r["recall"] == {"none": 0.5, "any": 1.0}
    assert viewer.balanced_accuracy([None], ["any"], ("none", "any"))["value"] is None


def test_score_and_bootstrap_on_a_hand_made_table():
    mk = lambda conf, **c: viewer.Labels({a: c.get(a, viewer.ATTRIBUTES[a][0]) for a in viewer.ATTRIBUTES},
                                         "none", conf)
    labels = [mk(True, glasses="any"), mk(True), mk(False), mk(True, hat="yes")]
    perfect = [dict(l.classes, glasses_type="none") for l in labels]
    wrong = [dict(r) for r in perfect]
    wrong[0]["glasses"] = "none"                                 # misses the one pair of glasses
    s = viewer.score(labels, perfect)
    assert s["mean"] == pytest.approx(1.0)
    assert s["high_confidence"]["photos"] == 3
    s2 = viewer.score(labels, wrong)
    assert s2["attributes"]["glasses"]["value"] == pytest.approx(0.5)
    assert s2["mean"] == pytest.approx((6 + 0.5) / 7)
    boot = viewer.paired_bootstrap(labels, perfect, wrong, draws=200)
    assert boot["glasses"]["diff"] == pytest.approx(0.5)
    assert boot["hat"]["diff"] == pytest.approx(0.0)
    assert boot["glasses"]["low"] <= 0.5 <= boot["glasses"]["high"]
    targets = {t["name"]: t["passed"] for t in viewer.check_targets(s2)}
    assert not targets["glasses"] and targets["hat"] and targets["mean"]      # 0.93 >= 0.85


def test_tags_are_read_from_the_chosen_options(pack):
    v = pack.default_vector()
    v.slots.update(glasses="aviators", hair="buzz", headwear="cap", facial_hair="goatee",
                   bangs="blunt")
    r = viewer.read_tags(v)
    assert r == {"glasses": "any", "glasses_type": "sunglasses", "hair_length": "short",
                 "hat": "yes", "facial_hair": "any", "bangs": "yes"}
    v.slots.update(glasses="round", hair="long_wavy", headwear="none", facial_hair="none",
                   bangs="none")
    r = viewer.read_tags(v)
    assert (r["glasses"], r["glasses_type"], r["hair_length"], r["hat"], r["facial_hair"],
            r["bangs"]) == ("any", "eyeglasses", "long", "no", "none", "no")


def painted(hair_lab, skin_lab, size=64):
    """A hand-made 'render': top half hair, bottom half skin, in the given CIELAB colours."""
    rgb = np.zeros((size, size, 3), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    rgb[: size // 2] = np.round(lab_to_srgb(np.array(hair_lab, float)) * 255)
    rgb[size // 2:] = np.round(lab_to_srgb(np.array(skin_lab, float)) * 255)
    mask[: size // 2] = CLASS_IDS["hair"]
    mask[size // 2:] = CLASS_IDS["skin"]
    return rgb, mask


# photo hair is dark: the TRAIN photos' median hair colours are black L* 7, brown 16, blonde 48
@pytest.mark.parametrize("hair, expected", [((6, 0, 1), "black"), ((17, 6, 7), "brown"),
                                            ((55, 6, 22), "blonde"), ((30, 20, 22), "red"),
                                            ((65, 0, 2), "gray")])
def test_the_shipped_colour_rule_reads_clear_colours(pack, hair, expected):
    rule = viewer.default_colour_rule()
    rgb, mask = painted(hair, (68, 14, 17))
    reading = viewer.read_avatar(pack.default_vector(), rgb, mask, rule)
    assert reading["hair_color"] == expected
    assert reading["skin_tone"] == "light"
    rgb, mask = painted(hair, (36, 18, 23))
    assert viewer.read_avatar(pack.default_vector(), rgb, mask, rule)["skin_tone"] == "dark"
    bald = mask.copy()
    bald[bald == CLASS_IDS["hair"]] = 0                       # nothing to read: a miss, not a guess
    assert viewer.read_avatar(pack.default_vector(), rgb, bald, rule)["hair_color"] is None


def test_colour_rule_refuses_a_foreign_file(tmp_path):
    p = tmp_path / "rule.json"
    p.write_text('{"kind": "something else"}')
    with pytest.raises(UserError, match="not a Likeness colour-category rule"):
        viewer.ColourCategories.load(p)


def test_category_matching_gives_engine_colours_of_the_asked_class(pack):
    """The calibrated engine colours the colour rule reads as each class: matching a photo colour
    within a class returns one the rule reads as that class, even when the photo's own colour
    sits in another."""
    from likeness.backend import colour_match as cm
    from likeness.backend import models
    cal = cm.load_calibration(models.SHIPPED / "stylized" / models.CALIBRATION, pack)
    matcher = cm.ColourMatcher(pack, cal)
    rule = viewer.default_colour_rule()
    photo = (17, 6, 7)                                           # brown (TRAIN median)
    for cls in ("black", "brown", "blonde", "gray"):
        allowed = matcher.in_category("hair", None, rule, "hair_color", cls)
        assert allowed.any(), cls
        m = matcher.match("hair", photo, None, tie=0.0, allowed=allowed)
        assert rule.classify("hair_color", m.lab) == cls
    free = matcher.match("hair", photo, None, tie=0.0)
    assert rule.classify("hair_color", free.lab) == "brown"


def test_the_reader_decides_what_the_options_show(pack):
    """Hand-made readings through the real Predictor: each tag-read slot moves to the estimator's
    likeliest option showing the read class, glasses to the read type; agreeing choices stay."""
    from likeness.backend import models
    from likeness.backend.predict import Predictor
    pred = Predictor(pack, models.SHIPPED / "stylized" / models.FILENAME, device="cpu", threads=1)
    assert pred.reader is not None
    names = [s.name for s in pack.slots]
    probs = [np.linspace(1.0, 2.0, len(s.options)) for s in pack.slots]
    probs = [p / p.sum() for p in probs]                      # the last option is the likeliest
    choice = [0] * len(pack.slots)                            # "none" / bald everywhere
    one = lambda attr, cls: {c: float(c == cls) for c in A.HEAD_CLASSES[attr]}
    reading = {"glasses": one("glasses", "any"), "glasses_type": one("glasses_type", "eyeglasses"),
               "facial_hair": one("facial_hair", "none"), "hair_length": one("hair_length", "long"),
               "bangs": one("bangs", "yes"), "hat": one("hat", "no")}
    sources, allowed = pred._attribute_choice(choice, probs, reading)
    slot = lambda n: pack.slots[names.index(n)]
    pick = lambda n: slot(n).options[choice[names.index(n)]]
    assert pick("glasses").tags["glasses"] == "eyeglasses" and sources["glasses"] == "photo"
    assert pick("hair").tags["hair_length"] == "long"
    assert pick("hair").id == [o.id for o in slot("hair").options if o.tags.get("hair_length") == "long"][-1]
    assert pick("bangs").tags["bangs"] == "bangs"
    assert pick("facial_hair").id == "none" and sources["facial_hair"] == "model"
    assert pick("headwear").id == "none" and sources["headwear"] == "model"
    hair_k = names.index("hair")
    assert [o.tags.get("hair_length") == "long" for o in slot("hair").options] == list(allowed[hair_k])


@pytest.mark.real_faces
def test_the_shipped_reader_on_real_photos(pack):
    """The shipped reader on TRAIN photos it was fitted on reads their labels for most attributes,
    and Predictor's avatar then shows the read classes (tags) -- the real files, end to end."""
    from likeness.backend import models
    from likeness.backend.predict import Predictor
    root = realfaces.default_root()
    labels = viewer.read_labels(viewer.labels_path(root))
    stems = [s for s in realfaces.stems(root, "train") if labels[s].classes["glasses"] == "any"][:3]
    stems += realfaces.stems(root, "train")[:5]
    pred = Predictor(pack, models.SHIPPED / "stylized" / models.FILENAME, device="cpu", threads=1)
    for s in stems:
        r = pred.predict(str(root / "images" / f"{s}.jpg"))
        tags = viewer.read_tags(r.vector)
        for attr in viewer.TAG_READING:
            read = max(r.attributes[attr], key=r.attributes[attr].get)
            assert tags[attr] == read, (s, attr)
        assert r.to_json()["attributes"]["glasses"]
    assert pred.reader_note.startswith("what the avatar shows")


def test_model_mode_leaves_the_reader_out(pack):
    from likeness.backend import models
    from likeness.backend.predict import Predictor
    pred = Predictor(pack, models.SHIPPED / "stylized" / models.FILENAME, device="cpu", threads=1,
                     attributes="model")
    assert pred.reader is None
    with pytest.raises(UserError, match="attributes from the photo are not possible"):
        Predictor(pack, models.SHIPPED / "stylized" / models.FILENAME, device="cpu", threads=1,
                  colours="model", attributes="photo")


def test_layout_and_context_features_by_hand():
    parts = ("background", "face", "hair")
    labels = np.zeros((16, 16), np.uint8)
    labels[:8] = 2                                             # hair on the top half
    f = A.layout_features(labels, parts)
    assert f.shape == (len(A.GRID_PARTS) * A.GRID * A.GRID,)
    hair = f[:A.GRID * A.GRID].reshape(A.GRID, A.GRID)
    assert np.all(hair[:4] == 1) and np.all(hair[4:] == 0)
    crop = np.zeros((32, 32, 3), np.uint8)
    crop[:16] = (200, 180, 60)
    ctx = A.context_features(crop, labels, parts)
    assert np.isnan(ctx[9:18]).all()                          # no face part: NaN (filled later)
    assert ctx[0] > 60                                         # hair L* percentile


def test_hair_colour_features_by_hand():
    """Black and dark-brown hair of nearly the same median lightness differ in their hue
    histogram, percentiles and offset from the face; too little hair gives NaN (filled later)."""
    parts = ("background", "face", "hair")
    labels = np.zeros((32, 32), np.uint8)
    labels[:12], labels[16:] = 2, 1                            # hair on top, face below
    out = {}
    for name, rgb in (("black", (40, 39, 40)), ("brown", (58, 36, 18))):      # L* 15.8, 16.5
        crop = np.zeros((32, 32, 3), np.uint8)
        crop[:12], crop[16:] = rgb, (220, 180, 160)
        out[name] = f = A.hair_features(crop, labels, parts)
        assert f.shape == (A.HAIR_SIZE,) and np.isfinite(f).all()
        light = f[:A.HAIR_L_BINS]
        assert light.sum() == pytest.approx(1.0) and light[1] == 1.0      # every pixel L* 10-20
        assert f[-2] == 1.0 and f[-1] == 0.0                               # near-black, none light
    hues = slice(A.HAIR_L_BINS, A.HAIR_L_BINS + A.HAIR_HUE_BINS)
    assert out["brown"][hues].max() == pytest.approx(1.0)                 # one warm hue
    b_median = A.HAIR_L_BINS + A.HAIR_HUE_BINS + 3 * 2 + 2                 # b* at the 50th percentile
    assert out["brown"][b_median] > out["black"][b_median] + 10
    offset = slice(A.HAIR_SIZE - 5, A.HAIR_SIZE - 2)
    assert out["black"][offset][0] < -50                                   # far darker than the face
    few = labels.copy()
    few[:12] = 0
    few[0, :8] = 2                                                         # 8 hair pixels
    assert np.isnan(A.hair_features(crop, few, parts)).all()
    assert np.isnan(A.hair_features(crop, labels, ("background", "face"))).all()


def test_hair_light_features_by_hand():
    """Hair with a warm sheen against a known background: the inner pixels' percentiles, the
    highlight's hue, the log ratio to the background and the grey-world chromaticity by hand; the
    outline's mixed pixels peeled off; too little hair or no background gives NaN (filled later)."""
    from likeness.backend.colour import srgb_to_lab, srgb_to_linear
    from likeness.backend.fidelity import erode
    ring = np.zeros((12, 12), bool)
    ring[3:9, 3:9] = True
    assert np.array_equal(erode(ring, 1, square=False), np.pad(np.ones((4, 4), bool), 4))
    plus = np.zeros((5, 5), bool)
    plus[1:4, 2] = plus[2, 1:4] = True
    assert erode(plus, 1, square=False)[2, 2] and not erode(plus, 1)[2, 2]   # cross vs square
    assert not erode(np.ones((5, 5), bool), 3, square=False).any()   # the frame's edge is outside
    parts = ("background", "face", "hair")
    labels = np.zeros((64, 64), np.uint8)
    labels[:40] = 2                                            # hair rows 0-39, background below
    crop = np.zeros((64, 64, 3), np.uint8)
    crop[:40], crop[40:] = (40, 39, 40), (128, 128, 128)       # near-black hair, grey background
    for edge in (np.s_[:3], np.s_[37:40], np.s_[:40, :3], np.s_[:40, 61:]):
        crop[edge] = (128, 128, 128)                           # the outline (588 px) mixed with the grey
    crop[10:30, 10:35] = (150, 100, 50)                        # a warm highlight: 500 of 1,972 inner px
    f = A.hair_light_features(crop, labels, parts)
    assert f.shape == (A.LIGHT_SIZE,) and np.isfinite(f).all()
    P = 3 * len(A.LIGHT_PERCENTILES)
    dark, warm = srgb_to_lab(np.array([40, 39, 40], np.uint8)), srgb_to_lab(np.array([150, 100, 50], np.uint8))
    assert f[3:6] == pytest.approx(dark, abs=1e-6)             # the median pixel: the dark hair
    assert f[6:9] == pytest.approx(warm, abs=1e-6)             # the 90th: the highlight, not the outline
    a, b, chroma, cos, sin = f[P:P + 5]
    assert (a, b) == pytest.approx(tuple(warm[1:]), abs=1e-6)  # the top 20 % of L*: the highlight
    assert chroma == pytest.approx(np.hypot(*warm[1:])) and cos > 0 and sin > 0      # warm hue
    ratio = f[P + 5:P + 8]
    lin = srgb_to_linear(np.array([[40, 39, 40], [128, 128, 128]], np.uint8)) + 1e-4
    assert ratio == pytest.approx(np.log(lin[0] / lin[1]), abs=1e-6)
    under = lin[0] / (srgb_to_linear(crop).reshape(-1, 3).mean(0) + 1e-4)
    assert f[P + 8:P + 11] == pytest.approx(np.log(under / under.mean()), abs=1e-6)
    warmer = crop.copy()
    warmer[40:] = (150, 120, 100)                              # the same hair in warmer light
    assert A.hair_light_features(warmer, labels, parts)[P + 8] < f[P + 8]   # reads less red
    no_back = labels.copy()
    no_back[40:] = 1
    g = A.hair_light_features(crop, no_back, parts)
    assert np.isnan(g[P + 5:P + 8]).all() and np.isfinite(np.delete(g, range(P + 5, P + 8))).all()
    few = np.zeros_like(labels)
    few[0, :8] = 2
    assert np.isnan(A.hair_light_features(crop, few, parts)).all()
    assert np.isnan(A.hair_light_features(crop, labels, ("background", "face"))).all()


def test_hair_reach_features_by_hand():
    """Hair that falls past the chin on one side and stops at the ears on the other: the strips'
    profiles, their lowest rows, the reach against chin and ears; hidden ears give NaN (filled
    later), a bald parse reaches nowhere."""
    parts = ("background", "face", "hair", "ears")
    h = w = 32
    labels = np.zeros((h, w), np.uint8)
    labels[8:24, 10:22] = 1                                    # the face, chin at row 24
    labels[:28, :10] = 2                                       # left: hair down to row 28
    labels[:12, 22:] = 2                                       # right: hair down to row 12
    labels[12:18, 22:24] = 3                                   # the right ear, its bottom at row 18
    f = A.reach_features(labels, parts)
    assert f.shape == (A.REACH_SIZE,) and np.isfinite(f).all()
    R = A.REACH_ROWS
    left, right = f[:R], f[R:2 * R]
    assert np.all(left[:14] == 1) and np.all(left[14:] == 0)   # 2-row bands: rows 0-27 hold hair
    assert np.all(right[:6] == 1) and np.all(right[6:] == 0)
    low_left, low_right = f[2 * R], f[2 * R + 1]
    assert (low_left, low_right) == (28 / h, 12 / h)
    past_chin, past_ears = f[2 * R + 2], f[2 * R + 3]
    assert past_chin == pytest.approx((28 - 24) / h) and past_ears == pytest.approx((28 - 18) / h)
    assert f[2 * R + 4] == pytest.approx(12 / (h * w))          # the ears' share
    assert f[2 * R + 5] > 0 and f[-2] == 0                      # hair below the chin; none at the bottom
    mirrored = A.reach_features(labels[:, ::-1], parts)
    assert np.array_equal(mirrored[:R], right) and np.array_equal(mirrored[R:2 * R], left)
    hidden = labels.copy()
    hidden[hidden == 3] = 2                                    # hair over the ear
    assert np.isnan(A.reach_features(hidden, parts)[2 * R + 3])
    bald = labels.copy()
    bald[bald == 2] = 0
    g = A.reach_features(bald, parts)
    assert np.all(g[:2 * R + 2] == 0) and g[2 * R + 2] == pytest.approx(-24 / h)
    with pytest.raises(ValueError, match="multiple"):
        A.reach_features(np.zeros((20, 20), np.uint8), parts)


def test_soft_parse_features_by_hand_and_from_the_shipped_parser():
    """The parser's eyeglass and hat probabilities: grid means and peak statistics by hand; from
    the shipped parser, the same part ids as ``run`` and probabilities in [0, 1]."""
    from likeness.backend.colour_match import ParserModel
    from likeness.backend.models import SHIPPED
    soft = np.zeros((len(A.SOFT_PARTS), 16, 16), np.float32)
    soft[0, 6:8, :] = 0.8                                   # an eyeglass band in grid row 3
    f = A.soft_features(soft)
    assert f.shape == (A.SOFT_SIZE,)
    grid = f[:A.GRID * A.GRID].reshape(A.GRID, A.GRID)
    assert np.allclose(grid[3], 0.8) and np.allclose(np.delete(grid, 3, 0), 0)
    stats = f[A.GRID * A.GRID:A.GRID * A.GRID + 4]
    assert stats[0] == pytest.approx(0.8) and stats[3] == pytest.approx(0.8 * 32 / 256)
    assert not f[A.SOFT_SIZE // 2:].any()                  # no hat
    with pytest.raises(ValueError, match="expected"):
        A.soft_features(soft[:1])
    parser = ParserModel(SHIPPED / "parser" / "parser.onnx", device="cpu", threads=1)
    crop = _astronaut_crop()
    labels, probs = parser.run_soft(crop[None], A.SOFT_PARTS + ("no such part",))
    assert np.array_equal(labels, parser.run(crop[None]))
    S = parser.input_size
    assert probs.shape == (1, 3, S, S) and probs.min() >= 0 and probs.max() <= 1
    assert not probs[0, 2].any()                           # a part the parser lacks: zeros


def _astronaut_crop() -> np.ndarray:
    from likeness.backend.predict import prepare_photo
    skimage_data = pytest.importorskip("skimage.data")
    return prepare_photo(skimage_data.astronaut(), size=128).crop


def tiny_faces(tmp_path, n_train, n_val):
    """A real-face folder of the first TRAIN and validation photos (links, read in place: never
    copies of the faces) with their labels: (root, train stems, validation stems)."""
    src = realfaces.default_root()
    train, val = realfaces.stems(src, "train")[:n_train], realfaces.stems(src, "val")[:n_val]
    root = tmp_path / "faces"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for s in train + val:
        (root / "images" / f"{s}.jpg").symlink_to(src / "images" / f"{s}.jpg")
        (root / "masks" / f"{s}.png").symlink_to(src / "masks" / f"{s}.png")
    with open(src / "attributes.csv") as f:
        rows = [r for r in csv.reader(f)]
    write_labels(root / "attributes.csv", [r for r in rows[1:] if r[0] in set(train + val)])
    return root, train, val


def reader_folder(out):
    """A reader output folder holding the shipped face networks."""
    import shutil
    out.mkdir()
    for f in ("age.onnx", "gender.onnx", "descriptor.onnx"):
        shutil.copy(A.default_dir() / f, out / f)
    return out


@pytest.mark.slow
@pytest.mark.real_faces
def test_tiny_fit_of_the_reader_and_rule_never_sees_validation(tmp_path, monkeypatch, pack):
    """``likeness train attributes`` end to end on a tiny real-face folder holding TRAIN and
    validation photos: the colour rule and the reader are written, the Predictor uses them, and
    no validation stem is ever loaded, aligned or fitted on."""
    from likeness.backend import predict as predict_mod
    from likeness.training.readout import attributes as T
    src = realfaces.default_root()
    root, train, val = tiny_faces(tmp_path, 14, 4)
    seen = []
    real_load, real_prepare = realfaces.load_pair, predict_mod.Predictor.prepare
    monkeypatch.setattr(realfaces, "load_pair", lambda s, r=None: (seen.append(s), real_load(s, r))[1])
    monkeypatch.setattr(predict_mod.Predictor, "prepare",
                        lambda self, photo, name=None: (seen.append(str(photo)), real_prepare(self, photo, name))[1])
    # two block unions instead of all 127: the search is the same code, at a test's cost
    all_unions = T.block_subsets
    monkeypatch.setattr(T, "block_subsets", lambda blocks: dict(list(all_unions(blocks).items())[-2:]))
    out = reader_folder(tmp_path / "reader")
    rule = T.fit_colour_rule(root, log=lambda *a: None)
    (out / "colour_rule.json").write_text(__import__("json").dumps(rule))
    data = T.fit_reader(out, root, log=lambda *a: None, flip=True, cache=tmp_path / "cache")
    assert seen and not any(v in x for x in seen for v in val)
    assert data["report"]["fitted_on"].startswith("14 TRAIN photos")
    assert set(data["heads"]) == set(A.HEAD_CLASSES) and data["descriptor"]
    every = "colour+context+hair+reach+faces+descriptor+crown+frame+descriptor_map+crown_map"
    assert {h["features"] for h in data["heads"].values()} <= {every, "layout+" + every}
    assert data["descriptor_blocks"] == list(A.DESCRIPTOR_BLOCKS)
    # extending that reader: each head keeps its blocks, may add the crown's map, and the new
    # reader computes only the descriptor-side blocks its heads may read
    monkeypatch.setattr(T, "block_subsets", all_unions)
    base = {a: h["features"] for a, h in data["heads"].items()}
    (out / "reader.json").write_text(__import__("json").dumps(
        {**data, "heads": {a: {**h, "features": "layout+descriptor"} for a, h in data["heads"].items()}}))
    wider = T.fit_reader(out, root, log=lambda *a: None, flip=True, cache=tmp_path / "cache",
                         extend=out, blocks=["crown_map"])
    assert base and {h["features"] for h in wider["heads"].values()} <= {
        "layout+descriptor", "layout+descriptor+crown_map"}
    assert wider["descriptor_blocks"] == ["descriptor", "crown_map"]
    assert wider["report"]["extended"]["blocks"] == ["crown_map"]
    reader = A.AttributeReader(out)
    assert reader.descriptor_blocks == ["descriptor", "crown_map"] and len(reader.mean) == len(wider["mean"])
    with pytest.raises(UserError, match="needs --blocks"):
        T.fit_reader(out, root, log=lambda *a: None, cache=tmp_path / "cache", extend=out)
    assert len(data["hair_fill"]) == A.HAIR_SIZE and data["parse_soft"]
    assert len(data["reach_fill"]) == A.REACH_SIZE and len(data["light_fill"]) == A.LIGHT_SIZE
    from likeness.backend.predict import Predictor
    from likeness.backend import models
    pred = Predictor(pack, models.SHIPPED / "stylized" / models.FILENAME, device="cpu", threads=1,
                     reader=out)
    r = pred.predict(str(src / "images" / f"{val[0]}.jpg"))
    assert set(r.attributes) == set(A.HEAD_CLASSES)
    assert all(abs(sum(p.values()) - 1) < 1e-6 for p in r.attributes.values())


def test_heads_chosen_in_worker_processes_match_one_process():
    """``fit_heads`` with two worker processes makes the same choices and weights as one: real
    L-BFGS fits on features whose second block alone tells the classes apart."""
    pytest.importorskip("torch")
    from likeness.training.readout import attributes as T
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 60)
    X = np.concatenate([rng.normal(size=(60, 4)), y[:, None] + 0.3 * rng.normal(size=(60, 2))], 1)
    sets = {"noise": np.arange(6) < 4, "signal": np.arange(6) >= 4, "all": np.ones(6, bool)}
    targets = {"bangs": y, "hat": np.where(np.arange(60) < 5, -1, 1 - y)}
    one = T.fit_heads(X, targets, log=lambda *a: None, feature_sets=sets, lambdas=(0.1, 1.0))
    two = T.fit_heads(X, targets, log=lambda *a: None, feature_sets=sets, lambdas=(0.1, 1.0),
                      workers=2)
    assert one[1] == two[1] and one[0] == two[0]
    assert {one[1][a]["features"] for a in targets} <= {"signal", "all"}
    assert one[1]["hat"]["photos"] == 55 and one[1]["bangs"]["cv_balanced_accuracy"]["1.0"] > 0.9


@pytest.mark.real_faces
def test_the_descriptor_reads_its_views_and_maps_and_refuses_unknown_blocks(tmp_path):
    """The descriptor on its own chip and the two wider views (three different 128-d vectors of
    one real photo), a view's map from the same pass; a reader naming a block this version lacks is
    refused, whether format 9 lists it or format 8 named it a view."""
    import json
    import shutil
    root = realfaces.default_root()
    rgb, _ = realfaces.load_pair(realfaces.stems(root, "train")[0], root)
    from PIL import Image
    crop = np.asarray(Image.fromarray(rgb).resize((256, 256)))
    d = A.Descriptor(A.default_dir())
    views = [d.features(crop, box) for box in A.DESCRIPTOR_VIEWS.values()]
    assert views[0].tolist() == d.features(crop).tolist()
    assert all(v.shape == (A.DESCRIPTOR_SIZE,) and np.isfinite(v).all() for v in views)
    assert min(np.linalg.norm(a - b) for i, a in enumerate(views) for b in views[i + 1:]) > 0.1
    crown, crown_map = d.run(crop, A.DESCRIPTOR_VIEWS["crown"], with_map=True)
    assert crown.tolist() == views[1].tolist() and crown_map.shape == (A.MAP_SIZE,)
    assert np.isfinite(crown_map).all() and crown_map.min() >= 0 and crown_map.max() > 0   # after a ReLU
    got = A.descriptor_blocks(d, crop, ["crown_map", "descriptor", "descriptor_map"])
    assert got[0].tolist() == crown_map.tolist() and got[1].tolist() == views[0].tolist()
    assert got[2].shape == (A.MAP_SIZE,) and np.abs(got[2] - crown_map).max() > 0.1
    folder = tmp_path / "reader"
    shutil.copytree(A.default_dir(), folder)
    data = json.loads((folder / "reader.json").read_text())
    data.pop("descriptor_blocks", None)
    for key in ("descriptor_blocks", "descriptor_views"):
        (folder / "reader.json").write_text(json.dumps({**data, key: ["descriptor", "chin"]}))
        with pytest.raises(UserError, match="unknown descriptor block chin"):
            A.AttributeReader(folder)
    # a descriptor.onnx exported before the map: a reader of maps is refused when it loads
    import onnx
    model = onnx.load(str(folder / "descriptor.onnx"))
    kept = [o for o in model.graph.output if o.name == "descriptor"]
    del model.graph.output[:]
    model.graph.output.extend(kept)
    onnx.save(model, str(folder / "descriptor.onnx"))
    assert not A.Descriptor(folder).has_map
    (folder / "reader.json").write_text(json.dumps({**data, "descriptor_blocks": ["descriptor", "crown_map"]}))
    with pytest.raises(UserError, match="read the descriptor's map, which .* lacks"):
        A.AttributeReader(folder)


def test_cross_fitting_folds_partition_the_train_photos():
    pytest.importorskip("torch")
    from likeness.training.readout.photo_parser import cross_fit_fold, parse_fold
    stems = [f"{i:02x}" for i in range(20)]
    folds = [cross_fit_fold(stems[::-1], k, 3) for k in range(3)]     # the order given does not matter
    assert sorted(sum(folds, [])) == stems and all(len(f) in (6, 7) for f in folds)
    assert cross_fit_fold(stems, 1, 3) == stems[1::3]
    assert parse_fold("2/3") == (2, 3)
    for bad in ("3/3", "a/3", "1", "-1/2"):
        with pytest.raises(UserError):
            parse_fold(bad)


@pytest.mark.slow
@pytest.mark.real_faces
def test_cross_fitted_parsers_read_each_train_photo_with_the_one_that_never_saw_it(tmp_path, monkeypatch):
    """Two tiny parsers, each trained without one half of the TRAIN photos: their reports list
    the photos held out, each TRAIN photo's reader features come from the parser that never saw
    it, and sets that do not cover the photos exactly once are refused."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    from likeness.training.readout import attributes as T
    from likeness.training.readout import photo_parser as pp
    paths = []
    for k in range(2):
        summary = pp.train(tmp_path / f"run{k}", steps=2, batch=2, init="scratch", fold=(k, 2),
                           log=lambda *a: None)
        assert summary["fold"] == [k, 2] and len(summary["held_out"]) == 372
        paths.append(tmp_path / f"fold{k}.onnx")
        pp.export(tmp_path / f"run{k}", paths[-1], extra_report=pp.fold_report(k, 2), log=lambda *a: None)
    train = realfaces.stems(None, "train")
    first, second = train[0], train[1]                 # folds 0 and 1 of 2
    parser_for = T.cross_fit_parsers(paths, [first, second])
    assert parser_for[first].path == paths[0] and parser_for[second].path == paths[1]
    assert "outside cross-fitting fold 0 of 2" in parser_for[first].report["trained_on"]
    with pytest.raises(UserError, match="seen by every"):
        T.cross_fit_parsers(paths[:1], [first, second])
    with pytest.raises(UserError, match="both hold out"):
        T.cross_fit_parsers([paths[0], paths[0]], [first])
    from likeness.backend import models
    with pytest.raises(UserError, match="not a cross-fitted parser"):
        T.cross_fit_parsers([models.SHIPPED / "parser" / "parser.onnx"], [first])
    nets = A.FaceNets(A.default_dir())
    root = realfaces.default_root()
    shipped = T.photo_parts([first], root, nets, log=lambda *a: None)
    crossed = T.photo_parts([first], root, nets, log=lambda *a: None, parser_for=parser_for)
    assert np.array_equal(shipped["faces"], crossed["faces"])          # the face nets see no parse
    assert not np.allclose(shipped["layout"], crossed["layout"])      # the layout is the parse's
    # the whole fit with them: its features cached apart from the shipped parser's, its report says so
    import json
    root, _, _ = tiny_faces(tmp_path, 14, 2)
    out = reader_folder(tmp_path / "reader")
    (out / "colour_rule.json").write_text(json.dumps(T.fit_colour_rule(root, log=lambda *a: None)))
    all_unions = T.block_subsets
    monkeypatch.setattr(T, "block_subsets", lambda blocks: dict(list(all_unions(blocks).items())[-1:]))
    data = T.fit_reader(out, root, log=lambda *a: None, cache=tmp_path / "cache", cross_fit=paths)
    assert "cross-fitted parsers" in data["report"]["parse"]
    # tiny parsers mark no ears on any photo: the missing value's fill is 0, never NaN
    assert np.isfinite(data["mean"]).all() and np.isfinite(data["reach_fill"]).all()
    assert all(np.isfinite(h["W"]).all() for h in data["heads"].values())
    assert sorted(p.name for p in (tmp_path / "cache").iterdir())[0].startswith(
        f"reader_raw{A.READER_FORMAT}_xfit")
    # the reader parses a user's photo with the parsers its heads learned from: the mean of the
    # heads' probabilities over their parses, and the Predictor reads photos that way
    assert data["parsers"] == ["parser_fold_0.onnx", "parser_fold_1.onnx"]
    reader = A.AttributeReader(out)
    from likeness.backend.colour_match import measure_regions
    from likeness.backend.predict import Predictor
    from likeness.backend import models
    pred = Predictor(find_pack("default"), models.SHIPPED / "stylized" / models.FILENAME, device="cpu",
                     threads=1, reader=out)
    photo = str(realfaces.default_root() / "images" / f"{realfaces.stems(None, 'val')[0]}.jpg")
    prep = pred.prepare(photo)
    big = prep.colour_crop if prep.colour_crop is not None else prep.crop
    each = []
    for parser in reader.parsers:
        labels, soft = parser.run_soft(prep.crop[None], A.SOFT_PARTS)
        each.append(reader.read(prep.crop, labels[0], parser.parts,
                                measure_regions(big, labels[0], parser.parts, A.COLOUR_REGIONS), big, soft[0]))
    own = reader.read_own(prep.crop, big)
    for attr, probs in own.items():
        for c, v in probs.items():
            assert v == pytest.approx(np.mean([e[attr][c] for e in each]), abs=1e-9)
    got = pred.predict(photo).attributes
    assert all(got[attr][c] == pytest.approx(v, abs=1e-9) for attr in own for c, v in own[attr].items())
    again = T.fit_reader(out, root, log=lambda *a: None, cache=tmp_path / "cache", cross_fit=paths)
    assert again["heads"] == data["heads"] and again["mean"] == data["mean"]   # read back from the cache
    # heads restricted to some blocks (--blocks) read only those; a block that does not exist is
    # refused before any photo is read
    some = T.fit_reader(out, root, log=lambda *a: None, cache=tmp_path / "cache", cross_fit=paths,
                        blocks=["layout", "faces"])
    assert {h["features"] for h in some["heads"].values()} == {"layout+faces"}
    monkeypatch.setattr(T, "photo_parts", lambda *a, **k: pytest.fail("photos read"))
    with pytest.raises(UserError, match="feature blocks shape"):
        T.fit_reader(out, root, log=lambda *a: None, blocks=["layout", "shape"])


def test_an_unsure_reader_keeps_the_photo_colours_category(pack):
    """Where the reader is not sure of the hair colour, the engine colour is matched among those the
    colour rule reads as the photo colour's own class; where it is sure, among its class."""
    from likeness.backend import models
    from likeness.backend.predict import Predictor
    pred = Predictor(pack, models.SHIPPED / "stylized" / models.FILENAME, device="cpu", threads=1)
    pred.reader.min_confidence["hair_color"] = 0.6     # a reader trusted from 0.6 (the shipped: 0)
    rule = pred.colour_rule
    photo = {"hair": (40.0, 12.0, 24.0), "skin": (70.0, 12.0, 16.0), "lips": None}
    own = rule.classify("hair_color", photo["hair"])
    unsure = {"hair_color": {c: 1 / 5 for c in A.HEAD_CLASSES["hair_color"]},
              "skin_tone": {"light": 1.0, "medium": 0.0, "dark": 0.0}}
    cats = pred._colour_categories(unsure, photo)
    assert cats["hair"][1:] == ("hair_color", own)
    assert cats["skin"][1:] == ("skin_tone", "light")
    sure = dict(unsure, hair_color={c: float(c == "gray") for c in A.HEAD_CLASSES["hair_color"]})
    assert pred._colour_categories(sure, photo)["hair"][2] == "gray"
    assert "hair" not in pred._colour_categories(unsure, dict(photo, hair=None))
    pred.reader.min_confidence["hair_color"] = 0.0     # always trusted: its likeliest class, however unsure
    assert pred._colour_categories(unsure, photo)["hair"][2] == A.HEAD_CLASSES["hair_color"][0]
