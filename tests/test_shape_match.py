"""Face shape read from the photo: the parse -> measures -> sliders through the shape surrogate."""
from __future__ import annotations

import json

import numpy as np
import pytest

from likeness.backend import fidelity, models, realfaces
from likeness.backend.errors import UserError
from likeness.backend.predict import Predictor
from likeness.backend.schema import CLASS_IDS, find_pack
from likeness.backend.colour_match import parts_to_classes
from likeness.backend.shape_match import ShapeMatcher, load_shape_table

ESTIMATOR = models.SHIPPED / "stylized" / models.FILENAME
TABLE = models.SHIPPED / "stylized" / models.SHAPE
needs_faces = pytest.mark.skipif(not realfaces.default_root().is_dir(),
                                 reason="the shared real faces are not here")


@pytest.fixture(scope="module")
def pack():
    return find_pack("default")


def hand_table(pack, slider: int = 3, gain: float = 0.5) -> dict:
    """face_aspect = 0.8 + gain * slider; the other measures depend on nothing."""
    F = pack.n_continuous + sum(pack.slot_sizes) + 1
    W = np.zeros((F, 4))
    W[slider, 0], W[-1] = gain, [0.8, 0.1, 0.4, 0.5]
    return {"format": 1, "pack": pack.id, "schema": pack.schema_hash,
            "measures": ["face_aspect", "eye_area_ratio", "mouth_width_ratio", "nose_length_ratio"],
            "weights": W.tolist(), "render_mean": [1.05, 0.1, 0.4, 0.5],
            "render_sd": [0.1, 0.01, 0.02, 0.02], "photo_mean": [0.9, 0.05, 0.45, 0.4],
            "photo_sd": [0.05, 0.01, 0.03, 0.04], "prior": 0.05}


def test_sliders_follow_the_measured_shape(pack):
    m = ShapeMatcher(pack, hand_table(pack))
    cont = np.full(pack.n_continuous, 0.5, np.float32)
    choice = [0] * len(pack.slots)
    # a photo one sd wider than the training photos -> one render sd above the renders' mean:
    # 0.8 + 0.5 x = 1.15 -> x = 0.7 (a small prior pulls it slightly back toward 0.5)
    x, used = m.fit(cont, choice, {"face_aspect": 0.95})
    assert used == ["face_aspect"]
    assert 0.66 < x[3] < 0.70
    assert np.array_equal(np.delete(x, 3), np.delete(cont, 3))   # unconstrained sliders stay
    x, _ = m.fit(cont, choice, {"face_aspect": 0.80})            # two sds narrower: 0.85 -> x = 0.1
    assert 0.100 < x[3] < 0.102
    x, _ = m.fit(cont, choice, {"face_aspect": 2.0})             # far outside: clipped
    assert x[3] == 1.0
    x, used = m.fit(cont, choice, {"face_aspect": None})         # nothing measured: unchanged
    assert used == [] and np.array_equal(x, cont)


def hair_table(pack) -> dict:
    """Hair fraction = 0.02 x the hair option's index (bald 0 ... bun 0.26); photos' parses read
    twice the renders' fractions (quantile map 0..0.6 -> 0..0.3)."""
    F = pack.n_continuous + sum(pack.slot_sizes) + 1
    k = [s.name for s in pack.slots].index("hair")
    start = pack.n_continuous + sum(pack.slot_sizes[:k])
    w = np.zeros(F)
    w[start:start + pack.slot_sizes[k]] = 0.02 * np.arange(pack.slot_sizes[k])
    return {**hand_table(pack), "hair": {"slot": "hair", "weights": w.tolist(), "resid_sd": 0.02,
                                         "photo_quantiles": [0.0, 0.6], "render_quantiles": [0.0, 0.3]}}


def test_the_hairstyle_follows_the_photos_hair_amount(pack):
    m = ShapeMatcher(pack, hair_table(pack))
    k = [s.name for s in pack.slots].index("hair")
    n = pack.slot_sizes[k]
    cont = np.full(pack.n_continuous, 0.5, np.float32)
    choice = [0] * len(pack.slots)
    probs = [np.full(size, 1.0 / size) for size in pack.slot_sizes]
    probs[k] = np.full(n, 0.5 / (n - 2))
    probs[k][[2, 3]] = [0.05, 0.2]                      # the estimator prefers option 3 to 2
    got, changed = m.choose_hair(cont, choice, probs, 0.2)     # -> render 0.1: option 5
    assert changed and got[k] == 5 and np.array_equal(np.delete(got, k), np.delete(choice, k))
    got, _ = m.choose_hair(cont, choice, probs, 0.13)   # -> 0.065, between 3 and 4: the estimator's 3
    assert got[k] == 3
    got, _ = m.choose_hair(cont, choice, probs, 5.0)    # beyond the photos' range: the most hair
    assert got[k] == n - 1
    assert m.choose_hair(cont, choice, probs, None) == (choice, False)
    got, _ = m.choose_hair(cont, choice, probs, 0.15)   # -> 0.075, nearer 4: the estimator's 3 wins
    assert got[k] == 3
    hot = hair_table(pack)
    hot["hair"]["temperature"] = 100.0                  # an estimator trusted 100x less: the amount's 4
    got, _ = ShapeMatcher(pack, hot).choose_hair(cont, choice, probs, 0.15)
    assert got[k] == 4
    plain = ShapeMatcher(pack, hand_table(pack))          # a table without hair: nothing changes
    assert plain.hair is None and plain.choose_hair(cont, choice, probs, 0.2) == (choice, False)


def sides_entry(pack) -> dict:
    """Every hair option without hair beside the cheeks but "bob" and "long" (hair down)."""
    k = [s.name for s in pack.slots].index("hair")
    options = {o.id: 0.02 for o in pack.slots[k].options}
    options["bob"], options["long"] = 0.5, 0.6
    return {"slot": "hair", "options": options, "photo_down": 0.35}


def test_the_hairstyle_shows_hair_down_the_sides_when_the_photo_does(pack):
    """Among the options the reader allows (two "medium" styles here), a photo with hair beside
    the cheeks gets the style that shows it over the estimator's top bun, and one without keeps the
    bun; where no allowed option agrees with the photo, the choice is left to the scores."""
    from likeness.backend.shape_match import photo_side_hair, side_hair
    k = [s.name for s in pack.slots].index("hair")
    ids = [o.id for o in pack.slots[k].options]
    cont = np.full(pack.n_continuous, 0.5, np.float32)
    choice = [0] * len(pack.slots)
    probs = [np.full(size, 1.0 / size) for size in pack.slot_sizes]
    probs[k] = np.full(len(ids), 0.01)
    probs[k][ids.index("bun")] = 0.6
    medium = {k: np.array([i in ("bob", "bun") for i in ids])}    # amounts 0.14, 0.26
    m = ShapeMatcher(pack, {**hair_table(pack), "hair_sides": sides_entry(pack)})
    down = np.zeros((16, 16), bool)
    down[6:12, 2:4] = down[6:12, 12:14] = True                     # the six cells beside the cheeks
    assert side_hair(down) == pytest.approx(1.0) and side_hair(~down) < 1.0
    for share, want in ((0.6, "bob"), (0.1, "bun"), (None, "bun")):  # 0.4: a tie on amount
        got, _ = m.choose_hair(cont, choice, probs, 0.4, allowed=medium, side_share=share)
        assert ids[got[k]] == want, share
    short = {k: np.array([i in ("crop", "spiky") for i in ids])}    # no short style shows hair down
    got, _ = m.choose_hair(cont, choice, probs, 0.4, allowed=short, side_share=0.6)
    assert ids[got[k]] in ("crop", "spiky")
    labels = np.zeros((16, 16), np.uint8)
    labels[down] = 2
    assert photo_side_hair(labels, ("background", "face", "hair")) == pytest.approx(1.0)
    assert photo_side_hair(labels, ("background", "face")) is None
    assert ShapeMatcher(pack, {**hand_table(pack), "hair_sides": sides_entry(pack)}).sides is None


def test_bad_hair_sides_entries_are_refused(pack):
    t = hair_table(pack)
    good = sides_entry(pack)
    for bad in ({"slot": "no_such_slot"}, {"photo_down": 1.5}, {"photo_down": "x"},
                {"options": {**good["options"], "bob": 2.0}},
                {"options": {o: v for o, v in good["options"].items() if o != "bun"}}):
        with pytest.raises(UserError, match="hair_sides entry"):
            ShapeMatcher(pack, {**t, "hair_sides": {**good, **bad}})
    glasses = {o.id: 0.0 for o in pack.slot("glasses").options}
    with pytest.raises(UserError, match="another slot"):
        ShapeMatcher(pack, {**t, "hair_sides": {**good, "slot": "glasses", "options": glasses}})


def test_the_shipped_table_tells_hair_down_from_tied_up(pack):
    """The shipped ``hair_sides`` entry: buns, ponytails and short cuts show no hair beside the
    cheeks, jaw-length and long styles do; its photo threshold was fitted on TRAIN photos."""
    from likeness.backend.shape_match import OPTION_DOWN
    e = json.loads(TABLE.read_text())["hair_sides"]
    up = {o for o, v in e["options"].items() if v < OPTION_DOWN}
    assert {"bun", "ponytail", "crop", "buzz", "bald"} <= up
    assert not up & {"medium", "bob", "long", "long_wavy", "curly"}
    assert e["fit"]["split"].startswith("TRAIN") and e["fit"]["balanced_accuracy"] > 0.85


def test_bad_tables_are_refused(pack, tmp_path):
    t = hand_table(pack)
    with pytest.raises(UserError, match="not pack"):
        ShapeMatcher(pack, {**t, "schema": "0000"})
    with pytest.raises(UserError, match="do not fit"):
        ShapeMatcher(pack, {**t, "weights": t["weights"][:-1]})
    with pytest.raises(UserError, match="non-positive"):
        ShapeMatcher(pack, {**t, "photo_sd": [0, 1, 1, 1]})
    with pytest.raises(UserError, match="newer"):
        ShapeMatcher(pack, {**t, "format": 99})
    bad = tmp_path / "shape.json"
    bad.write_text("{not json")
    with pytest.raises(UserError, match="unreadable shape table"):
        load_shape_table(bad, pack)


def test_bad_hair_entries_are_refused(pack):
    t = hair_table(pack)
    for bad in ({"slot": "no_such_slot"}, {"weights": [0.1, 0.2]}, {"resid_sd": 0},
                {"photo_quantiles": [0.6, 0.0]}, {"render_quantiles": [0.0]}, {"temperature": 0}):
        with pytest.raises(UserError, match="hair entry"):
            ShapeMatcher(pack, {**t, "hair": {**t["hair"], **bad}})


def test_parts_map_to_face_classes_with_eyes_split():
    parts = ("background", "face", "eyes")
    lab = np.array([[2, 1, 0, 2]], np.uint8)                      # split at the face's column
    cls = parts_to_classes(lab, parts)
    assert cls.tolist() == [[CLASS_IDS["l_eye"], CLASS_IDS["skin"], CLASS_IDS["background"],
                             CLASS_IDS["r_eye"]]]
    with pytest.raises(UserError, match="no face class"):
        parts_to_classes(lab, ("background", "tail", "eyes"))


def test_shipped_table_matches_the_pack_and_is_small(pack):
    assert TABLE.stat().st_size < 64_000
    table = json.loads(TABLE.read_text())
    assert table["fitted"]["split"].startswith("TRAIN")
    ShapeMatcher(pack, table)
    assert models.find_shape(pack, ESTIMATOR) == TABLE


def test_shape_from_the_photo_needs_the_parse(pack, tmp_path):
    with pytest.raises(UserError, match="not parsed"):
        Predictor(pack, ESTIMATOR, device="cpu", colours="model", shape="photo")
    p = Predictor(pack, ESTIMATOR, device="cpu", colours="model")      # default: says why not
    assert p.shape is None and "not parsed" in p.shape_note
    with pytest.raises(UserError, match="'photo' or 'model'"):
        Predictor(pack, ESTIMATOR, device="cpu", shape="guess")


@needs_faces
def test_hair_temperature_is_fitted_on_photos_the_estimator_kept_aside(pack):
    """The shape table's hair temperature: the shipped estimator's held-out TRAIN photos
    (never a validation stem), a grid that holds 1, and a choice no worse than 1 on them."""
    from likeness.training.estimator.real_labels import split_rows
    fit = _fit_script()
    got = fit.hair_temperature(pack, ESTIMATOR, "hair", realfaces.default_root())
    held = split_rows(len(realfaces.stems(split="train")), 0.1, 0)[1]
    assert 0.9 * len(held) <= got["photos"] <= len(held)         # hats are left out
    assert got["temperature"] in fit.TEMPERATURES and got["nll"] <= got["nll_at_1"]
    assert got["temperature"] == 1.0 or got["nll_at_1"] - got["nll"] >= fit.MIN_NLL_GAIN


def _fit_script():
    from likeness.training.readout import photo_shape
    return photo_shape


def test_a_pack_without_hair_length_tags_gets_no_hair_entry(tmp_path, capsys):
    from likeness.backend.schema import load_pack
    from test_schema import MANIFEST, write_pack
    text = MANIFEST.replace('tags = { hair_length = "bald" }, ', "").replace(
        'tags = { hair_length = "long" }, ', "")
    bare = load_pack(write_pack(tmp_path, text))
    assert not bare.slots_with_tag("hair_length")
    assert _fit_script().hair_entry(bare, tmp_path / "no_renders", [], None, None, tmp_path) is None
    assert "no hair entry" in capsys.readouterr().out


@needs_faces
def test_real_photos_get_avatars_shaped_more_like_them(pack):
    """64 real validation photos through the shipped estimator and parser, with and without shape
    from the photo: the avatar's face aspect and hair amount (as the surrogates predict them from
    the vector) rank the photos much more like their true masks do."""
    root = realfaces.default_root()
    stems = realfaces.stems(root, "val")[::4]
    truth = {"face_aspect": [], "hair_fraction": []}
    for s in stems:
        _, mask = realfaces.load_pair(s, root)
        truth["face_aspect"].append(fidelity.face_geometry(mask)["face_aspect"])
        truth["hair_fraction"].append(float((mask == fidelity.C["hair"]).mean()))
    paths = [str(root / "images" / f"{s}.jpg") for s in stems]
    table = ShapeMatcher(pack, json.loads(TABLE.read_text()))
    rho = {}
    for mode in ("model", "photo"):
        results = Predictor(pack, ESTIMATOR, device="cpu", threads=1, shape=mode,
                            attributes="model").predict_many(paths)   # the shape fit alone
        pred = {"face_aspect": [], "hair_fraction": []}
        for r in results:
            cont, choice = r.vector.to_arrays()
            feats = np.concatenate([cont, *[np.eye(k)[c] for k, c in zip(pack.slot_sizes, choice)], [1]])
            pred["face_aspect"].append(float(feats @ table.W[:, 0]))
            pred["hair_fraction"].append(float(feats @ table.hair["w"]))
            assert ("hair_fraction" in r.shape_from_photo) == (mode == "photo")
        for m in pred:
            rho[mode, m] = fidelity.spearman(truth[m], pred[m])["value"]
    assert rho["photo", "face_aspect"] > rho["model", "face_aspect"] + 0.2, rho
    assert rho["photo", "face_aspect"] > 0.5, rho
    assert rho["photo", "hair_fraction"] > rho["model", "hair_fraction"] + 0.08, rho
    assert rho["photo", "hair_fraction"] > 0.75, rho
