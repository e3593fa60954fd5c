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
def test_real_photos_get_avatars_shaped_more_like_them(pack):
    """64 real validation photos through the shipped estimator and parser, with and without shape
    from the photo: the avatar's face aspect (as the surrogate predicts it from the sliders) ranks
    the photos much more like their true masks do."""
    root = realfaces.default_root()
    stems = realfaces.stems(root, "val")[::4]
    truth = []
    for s in stems:
        _, mask = realfaces.load_pair(s, root)
        truth.append(fidelity.face_geometry(mask)["face_aspect"])
    paths = [str(root / "images" / f"{s}.jpg") for s in stems]
    table = ShapeMatcher(pack, json.loads(TABLE.read_text()))
    rho = {}
    for mode in ("model", "photo"):
        results = Predictor(pack, ESTIMATOR, device="cpu", threads=1, shape=mode).predict_many(paths)
        pred = []
        for r in results:
            cont, choice = r.vector.to_arrays()
            feats = np.concatenate([cont, *[np.eye(k)[c] for k, c in zip(pack.slot_sizes, choice)], [1]])
            pred.append(float(feats @ table.W[:, 0]))
            assert (mode == "photo") == bool(r.shape_from_photo) or r.shape_from_photo == []
        rho[mode] = fidelity.spearman(truth, pred)["value"]
    assert rho["photo"] > rho["model"] + 0.2 and rho["photo"] > 0.5, rho
