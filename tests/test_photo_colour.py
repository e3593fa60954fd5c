"""Photo colours: the shipped face parser, colour matching through a calibration, and the
Predictor reading hair / skin colour from the photo instead of the estimator."""
from __future__ import annotations

import json

import numpy as np
import pytest

from likeness.backend import colour_match as cm
from likeness.backend import fidelity, models, realfaces
from likeness.backend.colour import ciede2000
from likeness.backend.errors import UserError
from likeness.backend.predict import Predictor
from likeness.backend.schema import find_pack

PARSER = models.SHIPPED / models.PARSER
ESTIMATOR = models.SHIPPED / "stylized" / models.FILENAME
CALIBRATION = models.SHIPPED / "stylized" / models.CALIBRATION
HAVE_FACES = realfaces.default_root().is_dir()
needs_faces = pytest.mark.skipif(not HAVE_FACES, reason="the shared real faces are not here")

# Measured in the dataset's own frame at 128 px: hair IoU 0.818, face (skin) 0.867 on all 256
# validation photos, 0.806 / 0.875 on the 32 of this test; floors with about 0.08 of margin.
HAIR_IOU_FLOOR = 0.72
SKIN_IOU_FLOOR = 0.80


@pytest.fixture(scope="module")
def pack():
    return find_pack("default")


@pytest.fixture(scope="module")
def parser():
    return cm.ParserModel(PARSER, device="cpu", threads=1)


# ---- the exported parser ------------------------------------------------------------------------

def test_parser_metadata(parser):
    assert PARSER.stat().st_size <= 3 << 20
    assert parser.input_size == 128
    assert "non-commercial" in parser.licence and "CelebAMask-HQ" in parser.licence
    assert {"hair", "face", "mouth", "eyes"} <= set(parser.parts)
    assert set(parser.regions) <= set(cm.REGION_PARTS)
    assert parser.report["validation"]["photos"] == 256


@needs_faces
def test_parser_segments_validation_photos(parser):
    """onnxruntime, real validation photos (never trained on), IoU against their true masks."""
    from PIL import Image
    from likeness.training.common.parts import PARTS, labels_to_parts
    assert tuple(parser.parts) == PARTS
    stems = realfaces.stems(split="val")[::8]                  # 32 photos
    imgs, truths = [], []
    for s in stems:
        rgb, mask = realfaces.load_pair(s)
        imgs.append(np.asarray(Image.fromarray(rgb).resize((128, 128), Image.Resampling.LANCZOS)))
        truths.append(labels_to_parts(np.asarray(Image.fromarray(mask).resize((128, 128), Image.NEAREST))))
    pred = parser.run(np.stack(imgs))
    assert pred.shape == (len(stems), 128, 128) and pred.dtype == np.uint8
    # dynamic batch: one image alone gives the same map as inside the batch
    assert (parser.run(imgs[3]) == pred[3]).mean() > 0.999
    truth = np.stack(truths)
    for part, floor in (("hair", HAIR_IOU_FLOOR), ("face", SKIN_IOU_FLOOR)):
        k = PARTS.index(part)
        iou = ((pred == k) & (truth == k)).sum() / ((pred == k) | (truth == k)).sum()
        assert iou >= floor, f"{part} IoU {iou:.3f} under {floor}"


# ---- colour matching on a hand-made calibration -------------------------------------------------

def _hand_calibration(pack, over=None):
    """Skin: a grey ramp L* 30 / 50 / 70 at skin_tone 0 / 0.5 / 1. Hair: hair_color only, its
    variant slot making the "long" styles 10 L* darker than the default style."""
    hair_slot = pack.slot("hair")
    default = hair_slot.default or hair_slot.options[0].id
    options = {}
    for o in hair_slot.options:
        d = -10.0 if o.tags.get("hair_length") == "long" else 0.0
        options[o.id] = {"weight": o.weight, "tags": dict(o.tags),
                         "lab": [[20 + d, 0, 0], [60 + d, 0, 0]], "offset": [[d, 0, 0], [d, 0, 0]]}
    cal = {"pack": pack.id, "schema": pack.schema_hash, "regions": {
        "skin": {"params": ["skin_tone"], "axes": [[0.0, 0.5, 1.0]],
                 "lab": [[30.0, 0.0, 0.0], [50.0, 0.0, 0.0], [70.0, 0.0, 0.0]], "variants": None},
        "hair": {"params": ["hair_color"], "axes": [[0.0, 1.0]], "lab": [[20.0, 0, 0], [60.0, 0, 0]],
                 "variants": {"slot": "hair", "param": "hair_color", "axis": [0.0, 1.0],
                              "default_option": default, "options": options}}}}
    cal.update(over or {})
    return cal


def test_match_hand_made_table(pack):
    m = cm.ColourMatcher(pack, _hand_calibration(pack))
    r = m.match("skin", (50.3, 0.0, 0.0))
    assert r.params == {"skin_tone": 0.5} and r.lab == (50.0, 0.0, 0.0) and r.residual < 0.5
    # between grid points: the upsampled table (4 steps a cell) finds 0.375 for L* 45
    assert m.match("skin", (45.0, 0.0, 0.0)).params["skin_tone"] == pytest.approx(0.375)
    # hair: L* 40 is hair_color 0.5 on the default table, 0.75 for a long style (renders darker)
    long_opt = next(o.id for o in pack.slot("hair").options if o.tags.get("hair_length") == "long")
    assert m.group("hair", {"hair": long_opt}) == cm.OPTION_GROUP + long_opt
    assert m.match("hair", (40.0, 0, 0), None).params["hair_color"] == pytest.approx(0.5)
    assert m.match("hair", (40.0, 0, 0), "long").params["hair_color"] == pytest.approx(0.75)
    assert m.match("hair", (40.0, 0, 0), m.group("hair", {"hair": long_opt})).params["hair_color"] \
        == pytest.approx(0.75)


def test_the_hair_colour_is_matched_on_the_chosen_styles_own_render(pack):
    """Styles of one hair length render the same engine colour differently (a curly style's
    shading is darker than a bob's): the colour is matched on the chosen option's calibrated
    colours, not on its length group's mean; an option the calibration lacks takes its group's."""
    cal = _hand_calibration(pack)
    medium = [o.id for o in pack.slot("hair").options if o.tags.get("hair_length") == "medium"]
    dark, *rest = medium
    cal["regions"]["hair"]["variants"]["options"][dark]["offset"] = [[-20, 0, 0], [-20, 0, 0]]
    m = cm.ColourMatcher(pack, cal)
    on_dark = m.match("hair", (40.0, 0, 0), m.group("hair", {"hair": dark})).params["hair_color"]
    on_rest = m.match("hair", (40.0, 0, 0), m.group("hair", {"hair": rest[0]})).params["hair_color"]
    assert on_dark == pytest.approx(1.0) and on_rest == pytest.approx(0.5)    # L* 40 = 0.5 - 20
    del cal["regions"]["hair"]["variants"]["options"][rest[0]]
    assert cm.ColourMatcher(pack, cal).group("hair", {"hair": rest[0]}) == "medium"


def test_photo_colours_override_and_limits(pack):
    """PhotoColours.apply on a hand-made crop: a grey skin patch sets skin_tone; a colour far from
    every engine colour (saturated blue) and a region too small keep the estimator's values."""
    class Stub:                                   # the parser's interface: parts and regions
        parts = ("background", "face", "hair", "mouth", "eyes")
        regions = ("skin", "hair", "lips", "eyes")
    pc = cm.PhotoColours(pack, Stub(), cm.ColourMatcher(pack, _hand_calibration(pack)))
    crop = np.zeros((64, 64, 3), np.uint8)
    labels = np.zeros((64, 64), np.uint8)
    labels[20:50, 10:50] = 1                      # skin: mid grey, L* ~ 50
    crop[labels == 1] = 119
    labels[0:15, :] = 2                           # hair: pure blue, no engine colour near it
    crop[labels == 2] = (0, 0, 255)
    cont = np.full(pack.n_continuous, 0.9, np.float32)
    out = pc.apply(crop, labels, cont, {s.name: s.default or s.options[0].id for s in pack.slots})
    names = pack.param_names
    assert out["skin"].source == "photo" and cont[names.index("skin_tone")] == pytest.approx(0.5)
    assert out["hair"].source == "model" and out["hair"].residual > cm.MAX_COLOUR_RESIDUAL
    assert cont[names.index("hair_color")] == pytest.approx(0.9)
    assert json.dumps({r: c.to_json() for r, c in out.items()})       # JSON-able record


# ---- the Predictor ---------------------------------------------------------------------------

def _calibrated_lab(matcher, region, params, slots):
    """The rendered colour (calibration table) of the parameter values nearest ``params``."""
    names, axes, table, _ = matcher.table(region, matcher.group(region, slots))
    idx = tuple(int(np.argmin(np.abs(axes[k] - params[n]))) for k, n in enumerate(names))
    return table[idx]


@needs_faces
def test_photo_colours_move_toward_the_photo(pack):
    stems = realfaces.stems(split="val")[1::32]                    # 8 validation photos
    paths = [str(realfaces.default_root() / "images" / f"{s}.jpg") for s in stems]
    photo = Predictor(pack, ESTIMATOR, device="cpu", threads=1, colours="photo",
                      photo_regions=("hair", "skin"), shape="model",
                      attributes="model")                               # colours alone change
    model = Predictor(pack, ESTIMATOR, device="cpu", threads=1, colours="model")
    assert photo.colour_mode == "photo" and model.colour_mode == "model"
    rp, rm = photo.predict_many(paths), model.predict_many(paths)
    matcher = photo.photo.matcher
    for region in ("hair", "skin"):
        d_photo, d_model = [], []
        for s, a, b in zip(stems, rp, rm):
            rgb, mask = realfaces.load_pair(s)
            truth = fidelity.mask_stats(mask, rgb)[region]
            assert a.vector.slots == b.vector.slots                # only colours change
            if truth is None:                                     # no such region in the true mask
                continue
            params = matcher.calibration["regions"][region]["params"]
            got = {n: a.vector.params[n] for n in params}
            assert a.colour_sources[region] == "photo"
            assert b.colour_sources[region] == "model"
            d_photo.append(float(ciede2000(np.array(truth), _calibrated_lab(
                matcher, region, {n: pack.parameter(n).normalize(v) for n, v in got.items()},
                a.vector.slots))))
            d_model.append(float(ciede2000(np.array(truth), _calibrated_lab(
                matcher, region, {n: pack.parameter(n).normalize(b.vector.params[n]) for n in params},
                b.vector.slots))))
        assert np.mean(d_photo) < np.mean(d_model), (region, d_photo, d_model)
    js = rp[0].to_json()["colours"]
    assert js["mode"] == "photo" and js["sources"]["hair"] == "photo"
    assert set(js["regions"]["hair"]) >= {"source", "params", "model_params", "photo_lab", "residual_de00"}


def test_calibration_for_another_pack_is_refused(pack, tmp_path):
    for bad, words in (({"pack": "other"}, "for pack 'other'"),
                       ({"schema": "0123456789abcdef"}, "schema 0123456789abcdef")):
        path = tmp_path / "calibration.json"
        path.write_text(json.dumps(_hand_calibration(pack, bad)))
        with pytest.raises(UserError, match=words):
            Predictor(pack, ESTIMATOR, device="cpu", threads=1, calibration=path)
        with pytest.raises(UserError, match="recalibrate"):
            cm.load_calibration(path, pack)
    path.write_text(json.dumps({"hello": 1}))
    with pytest.raises(UserError, match="not a colour calibration"):
        Predictor(pack, ESTIMATOR, device="cpu", threads=1, calibration=path)
    path.write_text("{not json")
    with pytest.raises(UserError, match="unreadable colour calibration"):
        cm.load_calibration(path, pack)


def test_shipped_calibration_is_found_and_small(pack):
    assert models.find_calibration(pack, ESTIMATOR) == CALIBRATION
    assert CALIBRATION.stat().st_size < 64 << 10
    cm.load_calibration(CALIBRATION, pack)
    assert models.find_parser() is not None


def test_missing_parser_falls_back_to_the_model(pack, tmp_path):
    missing = tmp_path / "no_parser.onnx"
    auto = Predictor(pack, ESTIMATOR, device="cpu", threads=1, parser=missing)
    assert auto.colour_mode == "model" and "no face parser" in auto.colour_note
    asked = Predictor(pack, ESTIMATOR, device="cpu", threads=1, parser=missing, colours="photo")
    skimage_data = pytest.importorskip("skimage.data")
    r = asked.predict(skimage_data.astronaut())
    assert r.colour_sources == {k: "model" for k in fidelity.COLOURS}
    assert any("no face parser" in w for w in r.warnings)
    assert r.to_json()["colours"]["mode"] == "model"
    # a file that is not a parser is an error, not a silent fallback
    with pytest.raises(UserError, match="not a Likeness face parser"):
        Predictor(pack, ESTIMATOR, device="cpu", threads=1, parser=ESTIMATOR)
    with pytest.raises(UserError, match="colours must be"):
        Predictor(pack, ESTIMATOR, device="cpu", threads=1, colours="paint")


# ---- headwear from the photo's parse ------------------------------------------------------------

def test_a_hat_in_the_parse_switches_headwear_on(pack):
    """Hand-made parses through the real Predictor: hat pixels at the parser's rule switch a
    "none" headwear to the likeliest hat; fewer, or an estimator that already chose one, do not."""
    pred = Predictor(pack, ESTIMATOR, device="cpu", threads=1, colours="photo")
    k = next(i for i, s in enumerate(pack.slots) if s.name == "headwear")
    slot = pack.slots[k]
    none = [i for i, o in enumerate(slot.options) if o.tags.get("headwear") == "none"]
    hats = [i for i, o in enumerate(slot.options) if o.tags.get("headwear") != "none"]
    p = np.full(len(slot.options), 0.02)
    p[none[0]], p[hats[-1]] = 0.8, 0.1                          # "none", and which hat if any
    probs = [np.full(len(s.options), 1 / len(s.options)) for s in pack.slots]
    probs[k] = p / p.sum()
    hat_id = pred.photo.parser.parts.index("hat")
    parse = np.zeros((128, 128), np.uint8)
    rule = pred.photo.parser.rules.get("headwear", fidelity.PRESENCE_THRESHOLDS["headwear"])
    n_rule = int(np.ceil(rule * parse.size))
    parse.flat[:n_rule - 1] = hat_id                            # one pixel short of the rule
    choice = [int(np.argmax(q)) for q in probs]
    no_face = {"bangs": "model"}                                # no face anchors: fringe unknown
    assert pred._photo_presence(choice, probs, parse) == {"headwear": "model", **no_face}
    assert choice[k] == none[0]
    parse.flat[:n_rule] = hat_id
    assert pred._photo_presence(choice, probs, parse) == {"headwear": "photo", **no_face}
    assert choice[k] == hats[-1]                                # the likeliest hat option
    choice[k] = hats[0]                                         # the estimator's own hat stays
    assert pred._photo_presence(choice, probs, parse) == {"headwear": "model", **no_face}
    assert choice[k] == hats[0]
    model_only = Predictor(pack, ESTIMATOR, device="cpu", threads=1, colours="model")
    assert model_only._photo_presence(choice, probs, parse) == {}


@needs_faces
def test_a_fringe_in_the_parse_switches_bangs_on(pack):
    """A true TRAIN mask with a fringe, as parser parts, through the real Predictor: bangs switch
    on to the likeliest fringe option; the same face with its forehead band cleared does not."""
    from likeness.training.common.parts import labels_to_parts
    root = realfaces.default_root()
    stem = next(s for s in realfaces.stems(root, "train")
                if fidelity.mask_stats(realfaces.load_pair(s, root)[1])["fringe"])
    parse = labels_to_parts(realfaces.load_pair(stem, root)[1]).astype(np.uint8)
    pred = Predictor(pack, ESTIMATOR, device="cpu", threads=1, colours="photo")
    k = next(i for i, s in enumerate(pack.slots) if s.name == "bangs")
    opts = pack.slots[k].options
    none = [i for i, o in enumerate(opts) if o.tags.get("bangs") == "none"]
    p = np.full(len(opts), 0.05)
    p[none[0]], p[2] = 0.7, 0.15
    probs = [np.full(len(s.options), 1 / len(s.options)) for s in pack.slots]
    probs[k] = p / p.sum()
    choice = [int(np.argmax(q)) for q in probs]
    assert pred._photo_presence(choice, probs, parse)["bangs"] == "photo" and choice[k] == 2
    band = fidelity.fringe_band(cm.parts_to_classes(parse, pred.photo.parser.parts))
    parse[band & (parse == pred.photo.parser.parts.index("hair"))] = pred.photo.parser.parts.index("face")
    choice = [int(np.argmax(q)) for q in probs]
    assert pred._photo_presence(choice, probs, parse)["bangs"] == "model" and choice[k] == none[0]


def _switched_on_by_the_parse(pack, label: str, tag: str):
    """Validation photos a viewer labelled as showing ``label`` (and as many labelled without),
    through the shipped model with colours (and the parse) off and on: (hits, false alarms) per
    mode, and whether any photo lost ``tag`` when the parse was on."""
    from likeness.backend import viewer
    root = realfaces.default_root()
    labels = viewer.read_labels(viewer.labels_path(root))
    shown, not_shown = [], []
    for s in realfaces.stems(root, "val"):
        v = labels[s].classes[label] if s in labels else None
        if v is not None:
            (shown if v == "yes" else not_shown).append(s)
    stems = shown + not_shown[:len(shown)]
    paths = [str(root / "images" / f"{s}.jpg") for s in stems]
    found = {}
    for mode in ("model", "photo"):
        # the parse rules: what Predictor does where the attribute reader is absent
        results = Predictor(pack, ESTIMATOR, device="cpu", threads=1, colours=mode,
                            attributes="model").predict_many(paths)
        found[mode] = np.array([r.vector.tag(tag) not in (None, "none") for r in results])
    n = len(shown)
    hits = {m: int(f[:n].sum()) for m, f in found.items()}
    false = {m: int(f[n:].sum()) for m, f in found.items()}
    return n, hits, false, bool((found["model"] & ~found["photo"]).any())


def _balanced(n, hits, false):
    return {m: (hits[m] / n + 1 - false[m] / n) / 2 for m in hits}


@needs_faces
def test_fringes_of_real_validation_photos_are_found_more_often(pack):
    """The parse finds fringes the estimator misses, at a cost in false fringes a viewer's balanced
    accuracy repays (the labels are the viewer's, the threshold was chosen on TRAIN)."""
    n, hits, false, lost = _switched_on_by_the_parse(pack, "bangs", "bangs")
    assert n >= 20
    ba = _balanced(n, hits, false)
    assert hits["photo"] >= hits["model"] + 3, (hits, false)
    assert ba["photo"] >= ba["model"] + 0.05 and false["photo"] <= 0.15 * n, (n, hits, false)
    assert not lost                                             # only ever switches a fringe on


@needs_faces
def test_hats_of_real_validation_photos_are_found_more_often(pack):
    """The parse finds hats the estimator misses and adds few where there are none."""
    n, hits, false, lost = _switched_on_by_the_parse(pack, "hat", "headwear")
    assert n >= 10
    ba = _balanced(n, hits, false)
    assert hits["photo"] >= hits["model"] + 3, (hits, false)
    assert ba["photo"] >= ba["model"] + 0.05 and false["photo"] <= 0.15 * n, (n, hits, false)
    assert not lost                                             # only ever switches hats on
