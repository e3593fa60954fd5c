"""Fidelity measures: colour science, per-image stats on synthetic label maps, aggregate scorers,
and a check on real CelebAMask-HQ faces (read in place, skipped when the data is absent)."""
from __future__ import annotations

import numpy as np
import pytest

from likeness.backend import colour as col
from likeness.backend import fidelity as F
from likeness.backend import report_html
from likeness.backend.schema import CLASS_IDS as C, load_pack

# ------------------------------------------------------------------------------------------------
# Colour
# ------------------------------------------------------------------------------------------------

# Sharma, Wu & Dalal (2005), Table 1: L1 a1 b1 L2 a2 b2 and the published CIEDE2000 (34 pairs).
SHARMA = """
50.0000 2.6772 -79.7751 50.0000 0.0000 -82.7485 2.0425
50.0000 3.1571 -77.2803 50.0000 0.0000 -82.7485 2.8615
50.0000 2.8361 -74.0200 50.0000 0.0000 -82.7485 3.4412
50.0000 -1.3802 -84.2814 50.0000 0.0000 -82.7485 1.0000
50.0000 -1.1848 -84.8006 50.0000 0.0000 -82.7485 1.0000
50.0000 -0.9009 -85.5211 50.0000 0.0000 -82.7485 1.0000
50.0000 0.0000 0.0000 50.0000 -1.0000 2.0000 2.3669
50.0000 -1.0000 2.0000 50.0000 0.0000 0.0000 2.3669
50.0000 2.4900 -0.0010 50.0000 -2.4900 0.0009 7.1792
50.0000 2.4900 -0.0010 50.0000 -2.4900 0.0010 7.1792
50.0000 2.4900 -0.0010 50.0000 -2.4900 0.0011 7.2195
50.0000 2.4900 -0.0010 50.0000 -2.4900 0.0012 7.2195
50.0000 -0.0010 2.4900 50.0000 0.0009 -2.4900 4.8045
50.0000 -0.0010 2.4900 50.0000 0.0010 -2.4900 4.8045
50.0000 -0.0010 2.4900 50.0000 0.0011 -2.4900 4.7461
50.0000 2.5000 0.0000 50.0000 0.0000 -2.5000 4.3065
50.0000 2.5000 0.0000 73.0000 25.0000 -18.0000 27.1492
50.0000 2.5000 0.0000 61.0000 -5.0000 29.0000 22.8977
50.0000 2.5000 0.0000 56.0000 -27.0000 -3.0000 31.9030
50.0000 2.5000 0.0000 58.0000 24.0000 15.0000 19.4535
50.0000 2.5000 0.0000 50.0000 3.1736 0.5854 1.0000
50.0000 2.5000 0.0000 50.0000 3.2972 0.0000 1.0000
50.0000 2.5000 0.0000 50.0000 1.8634 0.5757 1.0000
50.0000 2.5000 0.0000 50.0000 3.2592 0.3350 1.0000
60.2574 -34.0099 36.2677 60.4626 -34.1751 39.4387 1.2644
63.0109 -31.0961 -5.8663 62.8187 -29.7946 -4.0864 1.2630
61.2901 3.7196 -5.3901 61.4292 2.2480 -4.9620 1.8731
35.0831 -44.1164 3.7933 35.0232 -40.0716 1.5901 1.8645
22.7233 20.0904 -46.6940 23.0331 14.9730 -42.5619 2.0373
36.4612 47.8580 18.3852 36.2715 50.5065 21.2231 1.4146
90.8027 -2.0831 1.4410 91.1528 -1.6435 0.0447 1.4441
90.9257 -0.5406 -0.9208 88.6381 -0.8985 -0.7239 1.5381
6.7747 -0.2908 -2.4247 5.8714 -0.0985 -2.2286 0.6377
2.0776 0.0795 -1.1350 0.9033 -0.0636 -0.5514 0.9082
"""


def _sharma() -> np.ndarray:
    return np.array([[float(v) for v in line.split()] for line in SHARMA.strip().splitlines()])


def test_ciede2000_matches_sharma_pairs_vectorised_and_one_by_one():
    d = _sharma()
    assert d.shape == (34, 7)
    got = col.ciede2000(d[:, 0:3], d[:, 3:6])
    np.testing.assert_allclose(got, d[:, 6], atol=5e-5)       # published to 4 decimals
    for row in d[[0, 6, 12, 16, 33]]:                          # scalar path gives the same
        assert float(col.ciede2000(row[0:3], row[3:6])) == pytest.approx(row[6], abs=5e-5)


def test_ciede2000_is_symmetric_zero_on_identity_and_broadcasts():
    d = _sharma()
    np.testing.assert_allclose(col.ciede2000(d[:, 3:6], d[:, 0:3]), d[:, 6], atol=5e-5)
    assert np.all(col.ciede2000(d[:, 0:3], d[:, 0:3]) == 0)
    one = col.ciede2000(d[:, 0:3], np.array([50.0, 0.0, 0.0]))
    assert one.shape == (34,)
    loop = [float(col.ciede2000(row[0:3], [50.0, 0.0, 0.0])) for row in d]
    np.testing.assert_allclose(one, loop, rtol=1e-12)
    grid = col.ciede2000(d[:, None, 0:3], d[None, :5, 3:6])              # (34, 1) x (1, 5)
    assert grid.shape == (34, 5)
    np.testing.assert_allclose(np.diag(grid[:5]), d[:5, 6], atol=5e-5)
    assert float(col.ciede2000([50.0, 0.0, 0.0], [50.0, -1.0, 2.0])) == pytest.approx(2.3669, abs=5e-5)


def test_srgb_lab_reference_values_and_round_trip():
    # Published D65 CIELAB of the sRGB primaries and white.
    np.testing.assert_allclose(col.srgb_to_lab(np.array([255, 0, 0], np.uint8)),
                               [53.2408, 80.0925, 67.2032], atol=2e-3)
    np.testing.assert_allclose(col.srgb_to_lab(np.array([0, 255, 0], np.uint8)),
                               [87.7347, -86.1827, 83.1793], atol=2e-3)
    np.testing.assert_allclose(col.srgb_to_lab(np.array([1.0, 1.0, 1.0])), [100, 0, 0], atol=1e-9)
    np.testing.assert_allclose(col.srgb_to_lab(np.zeros(3)), [0, 0, 0], atol=1e-9)
    # uint8 and float inputs agree.
    rgb8 = np.random.default_rng(1).integers(0, 256, (50, 3)).astype(np.uint8)
    np.testing.assert_allclose(col.srgb_to_lab(rgb8), col.srgb_to_lab(rgb8 / 255.0), atol=1e-12)
    np.testing.assert_allclose(col.lab_to_srgb(col.srgb_to_lab(rgb8)) * 255, rgb8, atol=1e-6)
    assert col.lab_to_hex(col.hex_to_lab("#a0522d")) == "#a0522d"
    with pytest.raises(ValueError):
        col.hex_to_lab("#12345")


# ------------------------------------------------------------------------------------------------
# Synthetic faces: rectangles with hand-computable geometry (200 x 200 frame)
# ------------------------------------------------------------------------------------------------

H = W = 200


def synthetic_face(fringe_rows: int = 0, brows_hidden: bool = False) -> np.ndarray:
    """Skin 100 px wide (cols 50..149), rows 40..179; eyes 5 x 15 centred on row 80 (columns
    72 and 127); brows rows 64..67; nose rows 80..119; lips 40 px wide, rows 130..139 (centroid
    134.5); hair rows 0..39, and rows 40..39+fringe_rows across the face when asked."""
    m = np.zeros((H, W), np.uint8)
    m[40:180, 50:150] = C["skin"]
    m[0:40, :] = C["hair"]
    m[64:68, 62:83] = C["l_brow"]
    m[64:68, 117:138] = C["r_brow"]
    m[78:83, 65:80] = C["l_eye"]
    m[78:83, 120:135] = C["r_eye"]
    m[80:120, 92:108] = C["nose"]
    m[130:135, 80:120] = C["u_lip"]
    m[135:140, 80:120] = C["l_lip"]
    if fringe_rows:
        m[40:40 + fringe_rows, 50:150] = C["hair"]
    if brows_hidden:
        m[40:68, 50:150] = C["hair"]
    return m


def test_geometry_of_synthetic_face_is_exact():
    g = F.face_geometry(synthetic_face())
    assert g["eye_y"] == pytest.approx(80.0)
    assert g["eye_x"] == pytest.approx([72.0, 127.0])
    assert g["mouth_y"] == pytest.approx(134.5)
    assert g["D"] == pytest.approx(54.5)
    assert g["brow_top"] == pytest.approx(64.0)
    assert g["chin_y"] == pytest.approx(179.0)
    assert g["nose_bottom"] == pytest.approx(119.0)
    assert g["yaw"] == pytest.approx(0.0)
    # Width: 100 px of 200; height: chin 179 - eye line 80 = 99 px of 200.
    assert g["face_width"] == pytest.approx(100 / 200)
    assert g["face_height"] == pytest.approx(99 / 200)
    assert g["face_aspect"] == pytest.approx(100 / 99)
    assert g["eye_area_ratio"] == pytest.approx(2 * 75 / (100 * 99))
    assert g["mouth_width_ratio"] == pytest.approx(40 / 100)
    assert g["nose_length_ratio"] == pytest.approx((119 - 80) / 99)


def test_geometry_is_robust_to_hair_occlusion_and_stray_skin():
    m = synthetic_face()
    base = F.face_geometry(m)
    occluded = m.copy()
    occluded[40:75, 50:150] = C["hair"]          # fringe down to the brows
    occluded[90:125, 50:70] = C["hair"]          # a lock across one cheek, not all rows
    occluded[:, 196:200] = C["skin"]             # a hand at the frame edge, labelled skin
    g = F.face_geometry(occluded)
    for k in F.SHAPES:
        assert g[k] == pytest.approx(base[k]), k
    # One eye hidden: the eye area counts the visible one twice.
    one_eye = m.copy()
    one_eye[78:83, 120:135] = C["hair"]
    assert F.face_geometry(one_eye)["eye_area_ratio"] == pytest.approx(base["eye_area_ratio"])
    # A wider face and a longer nose change the right measures the right way.
    wide = m.copy()
    wide[40:180, 40:50] = C["skin"]
    wide[40:180, 150:160] = C["skin"]
    gw = F.face_geometry(wide)
    assert gw["face_width"] == pytest.approx(120 / 200)
    assert gw["mouth_width_ratio"] == pytest.approx(40 / 120)
    long_nose = m.copy()
    long_nose[120:125, 92:108] = C["nose"]
    assert F.face_geometry(long_nose)["nose_length_ratio"] == pytest.approx((124 - 80) / 99)


def test_geometry_without_face_anchors_gives_none():
    m = np.zeros((H, W), np.uint8)
    m[:100] = C["hair"]
    s = F.mask_stats(m, np.zeros((H, W, 3), np.uint8))
    for k in F.SHAPES:
        assert s[k] is None
    assert s["fringe"] is None and s["fringe_fraction"] is None
    assert s["hair_fraction"] == pytest.approx(0.5)
    assert s["skin"] is None and s["hair"] is not None


def test_fringe_band_on_synthetic_forehead():
    # Band: rows brow_top - 0.45 D .. brow_top - 0.05 D = 39.5 .. 61.3 -> rows 40..61 (22 rows),
    # columns between the eye centres 72..127.
    band = F.fringe_band(synthetic_face())
    ys, xs = np.nonzero(band)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (40, 61, 72, 127)
    clear = F.mask_stats(synthetic_face())
    assert clear["fringe_fraction"] == 0.0 and clear["fringe"] is False
    bangs = F.mask_stats(synthetic_face(fringe_rows=16))      # hair rows 40..55: 16 of 22
    assert bangs["fringe_fraction"] == pytest.approx(16 / 22) and bangs["fringe"] is True
    wisp = F.mask_stats(synthetic_face(fringe_rows=6))        # 6 of 22
    assert wisp["fringe_fraction"] == pytest.approx(6 / 22) and wisp["fringe"] is False
    # Bangs hiding the brows: brow line estimated from the eyes, band all hair.
    hidden = F.mask_stats(synthetic_face(brows_hidden=True))
    assert hidden["fringe_fraction"] == pytest.approx(1.0) and hidden["fringe"] is True
    g = F.face_geometry(synthetic_face(brows_hidden=True))
    assert g["brow_top"] == pytest.approx(80 - F.BROW_ABOVE_EYE * 54.5)
    # A hat over the forehead is not a fringe.
    hat = synthetic_face()
    hat[0:62, :] = C["hat"]
    s = F.mask_stats(hat)
    assert s["fringe"] is False and s["headwear"] is True


def test_presence_thresholds_scale_with_frame():
    m = synthetic_face()
    n = H * W
    side = int(np.ceil(np.sqrt(F.PRESENCE_THRESHOLDS["glasses"] * n))) + 1
    m2 = m.copy()
    m2[70:70 + side, 60:60 + side] = C["eyeglasses"]
    assert F.mask_stats(m2)["glasses"] is True
    small = max(1, int(np.sqrt(F.PRESENCE_THRESHOLDS["glasses"] * n)) - 3)
    m3 = m.copy()
    m3[70:70 + small, 60:60 + small] = C["eyeglasses"]
    s3 = F.mask_stats(m3)
    assert s3["glasses"] is False and s3["glasses_fraction"] == pytest.approx(small * small / n)
    m4 = m.copy()
    m4[120:124, 45:48] = C["earring"]                       # 12 px of 40,000: above 1e-4
    assert F.mask_stats(m4)["earrings"] is True
    assert F.mask_stats(m)["earrings"] is False
    # The same layout at twice the resolution gives the same flags and fractions.
    big = np.kron(m2, np.ones((2, 2), np.uint8))
    s_big = F.mask_stats(big)
    assert s_big["glasses"] is True
    assert s_big["face_width"] == pytest.approx(F.mask_stats(m2)["face_width"])


def test_robust_colours_ignore_speculars_shadows_and_sclera():
    m = synthetic_face()
    rng = np.random.default_rng(0)
    rgb = np.zeros((H, W, 3), np.uint8)
    hair, skin, lips, iris = (90, 60, 40), (220, 170, 140), (180, 80, 80), (60, 90, 140)
    rgb[m == C["hair"]] = hair
    rgb[m == C["skin"]] = skin
    rgb[np.isin(m, [C["u_lip"], C["l_lip"]])] = lips
    eye = np.isin(m, [C["l_eye"], C["r_eye"]])
    rgb[eye] = iris
    # Speculars and shadows: 6 % white and 6 % black pixels in hair and skin.
    for cls in (C["hair"], C["skin"]):
        ys, xs = np.nonzero(m == cls)
        pick = rng.choice(len(ys), int(0.12 * len(ys)), replace=False)
        half = len(pick) // 2
        rgb[ys[pick[:half]], xs[pick[:half]]] = 255
        rgb[ys[pick[half:]], xs[pick[half:]]] = 0
    # Sclera: the outer 40 % of each eye's columns are white.
    for x0 in (65, 120):
        rgb[78:83, x0:x0 + 3] = 250
        rgb[78:83, x0 + 12:x0 + 15] = 250
    s = F.mask_stats(m, rgb)
    for name, c in (("hair", hair), ("skin", skin), ("lips", lips), ("eyes", iris)):
        want = col.srgb_to_lab(np.array(c, np.uint8))
        assert float(col.ciede2000(s[name], want)) < 1e-6, name
    # Absent lips -> None; without an image every colour is None.
    no_lips = m.copy()
    no_lips[np.isin(m, [C["u_lip"], C["l_lip"]])] = C["skin"]
    assert F.mask_stats(no_lips, rgb)["lips"] is None
    assert all(F.mask_stats(m)[k] is None for k in F.COLOURS)


def test_colour_erosion_drops_edge_pixels_that_mix_with_neighbours():
    rgb = np.zeros((12, 12, 3), np.uint8)
    region = np.zeros((12, 12), bool)
    region[1:11, 1:11] = True
    rgb[1:11, 1:11] = (120, 140, 90)          # the 2-px rim (64 of 100 px): mixed with the
    rgb[3:9, 3:9] = (110, 70, 50)             # background; the 6 x 6 core: the true colour
    rule = F.ColourRule((0,), l_lo=0.0, l_hi=100.0, erode=2)
    got = F.robust_colour(rgb, region, rule, min_pixels=10)
    assert float(col.ciede2000(got, col.srgb_to_lab(np.array([110, 70, 50], np.uint8)))) < 1e-9
    # Too small to erode: falls back to the whole region (the rim's colour wins the median).
    got = F.robust_colour(rgb, region, rule, min_pixels=40)
    assert float(col.ciede2000(got, col.srgb_to_lab(np.array([120, 140, 90], np.uint8)))) < 1e-9
    assert F.robust_colour(rgb, region, rule, min_pixels=101) is None


def test_erode_and_input_checks():
    sq = np.zeros((9, 9), bool)
    sq[2:7, 2:7] = True
    e = F.erode(sq)
    assert e.sum() == 9 and e[3:6, 3:6].all()
    assert F.erode(sq, 3).sum() == 0
    edge = np.ones((4, 4), bool)
    assert F.erode(edge).sum() == 4                      # the frame edge counts as outside
    with pytest.raises(Exception):
        F.mask_stats(np.zeros((10, 10), np.uint8), np.zeros((10, 11, 3), np.uint8))


# ------------------------------------------------------------------------------------------------
# Aggregate scorers
# ------------------------------------------------------------------------------------------------

def test_balanced_accuracy_hand_computed_and_degenerate():
    truth = [True, True, True, False, False, False, False, False, None]
    pred = [True, True, False, False, False, False, True, False, True]
    r = F.balanced_accuracy(truth, pred)
    # TP 2, FN 1, FP 1, TN 4 -> TPR 2/3, TNR 4/5 (the None pair skipped).
    assert r["confusion"] == {"tp": 2, "fn": 1, "fp": 1, "tn": 4}
    assert r["value"] == pytest.approx((2 / 3 + 4 / 5) / 2)
    assert r["n"] == 8 and r["degenerate"] is None
    assert r["accuracy"] == pytest.approx(6 / 8)
    neg = F.balanced_accuracy([False] * 4, [False, True, False, False])
    assert neg["value"] == pytest.approx(0.75) and neg["degenerate"] == "only negatives"
    pos = F.balanced_accuracy([True] * 5, [True, True, False, True, True])
    assert pos["value"] == pytest.approx(0.8) and pos["degenerate"] == "only positives"
    empty = F.balanced_accuracy([None], [True])
    assert empty["value"] is None and empty["degenerate"] == "empty"
    # Always answering "no" scores 0.5 however rare the positives are.
    assert F.balanced_accuracy([True] + [False] * 99, [False] * 100)["value"] == pytest.approx(0.5)


def test_spearman_with_ties_hand_computed():
    x = [1, 2, 2, 3, 4]
    y = [1, 3, 2, 2, 5]
    # Ranks x: 1, 2.5, 2.5, 4, 5; ranks y: 1, 4, 2.5, 2.5, 5 -> 7.25 / 9.5.
    np.testing.assert_allclose(F.rankdata(x), [1, 2.5, 2.5, 4, 5])
    np.testing.assert_allclose(F.rankdata(y), [1, 4, 2.5, 2.5, 5])
    r = F.spearman(x, y)
    assert r["value"] == pytest.approx(7.25 / 9.5) and r["n"] == 5
    # Invariant to monotone transforms, sign flips under reversal, skips None.
    assert F.spearman(np.exp(x), np.array(y) ** 3)["value"] == pytest.approx(7.25 / 9.5)
    assert F.spearman(x, [-v for v in y])["value"] == pytest.approx(-7.25 / 9.5)
    assert F.spearman(x + [None], y + [7])["value"] == pytest.approx(7.25 / 9.5)
    const = F.spearman(x, [3] * 5)
    assert const["value"] is None and const["degenerate"] == "constant"
    assert F.spearman([1, 2], [2, 1])["degenerate"] == "too few"


def test_spearman_agrees_with_scipy_when_available():
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(3)
    x = rng.integers(0, 6, 40).astype(float)              # many ties
    y = x + rng.integers(-3, 4, 40)
    assert F.spearman(x, y)["value"] == pytest.approx(stats.spearmanr(x, y)[0], abs=1e-12)


def test_colour_errors_and_constant_predictor():
    d = _sharma()
    photo = [tuple(r[0:3]) for r in d[:10]] + [None]
    avatar = [tuple(r[3:6]) for r in d[:10]] + [(50.0, 0.0, 0.0)]
    r = F.colour_errors(photo, avatar)
    assert r["n"] == 10
    assert r["median"] == pytest.approx(np.median(d[:10, 6]), abs=1e-4)
    assert r["p90"] == pytest.approx(np.percentile(d[:10, 6], 90), abs=1e-4)


def _stats(hair_lab, skin_lab, glasses, hat, fringe, hair_fraction, aspect):
    return {"hair": hair_lab, "skin": skin_lab, "lips": None, "eyes": None,
            "glasses": glasses, "headwear": hat, "earrings": False, "fringe": fringe,
            "hair_fraction": hair_fraction, "face_aspect": aspect, "face_width": None,
            "face_height": None, "eye_area_ratio": aspect / 10, "mouth_width_ratio": aspect / 3,
            "nose_length_ratio": 1 / aspect, "presence_source": {"glasses": "mask"}}


def test_compare_report_and_targets():
    rng = np.random.default_rng(7)
    n = 12
    photos = [_stats((float(rng.uniform(10, 60)), 5.0, 10.0), (65.0, 15.0, 18.0), i % 3 == 0,
                     i % 4 == 0, i % 2 == 0, 0.05 * i, 1.0 + 0.02 * i) for i in range(n)]
    perfect = [dict(p) for p in photos]
    const = F.constant_stats(hair="#3b2a20", skin=(60.0, 12.0, 15.0))
    rep = F.compare(photos, perfect, const)
    assert rep["n"] == n
    assert rep["presence"]["glasses"]["value"] == 1.0
    assert rep["colour"]["hair"]["median"] == 0.0 and rep["colour"]["hair"]["ratio_median"] == 0.0
    want_const = col.ciede2000(np.array([p["hair"] for p in photos]), const["hair"])
    assert rep["colour"]["hair"]["constant"]["median"] == pytest.approx(np.median(want_const))
    assert rep["colour"]["lips"]["n"] == 0 and rep["colour"]["lips"]["median"] is None
    assert rep["correlation"]["hair_fraction"]["value"] == pytest.approx(1.0)
    assert rep["correlation"]["face_width"]["value"] is None        # all None: not measured
    checks = F.check_targets(rep)
    assert {name for name, *_ in checks} == {t.name for t in F.TARGETS}
    assert all(ok for *_, ok in checks), checks

    # A poor model: glasses inverted, hair colours shuffled far, hair amount reversed.
    poor = []
    for p in photos:
        q = dict(p)
        q["glasses"] = not p["glasses"]
        q["hair"] = (p["hair"][0] + 25.0, p["hair"][1], p["hair"][2])
        q["hair_fraction"] = -p["hair_fraction"]
        poor.append(q)
    rep2 = F.compare(photos, poor, const)
    res = {name: (value, ok) for name, value, _, ok in F.check_targets(rep2)}
    assert res["glasses_balanced_accuracy"] == (0.0, False)
    assert res["hair_colour_median_de00"][1] is False
    assert res["hair_amount_spearman"][0] == pytest.approx(-1.0)
    assert res["skin_colour_median_de00"] == (0.0, True)
    # Without a constant predictor the relative targets cannot pass.
    res3 = {name: (value, ok) for name, value, _, ok in F.check_targets(F.compare(photos, perfect))}
    assert res3["hair_colour_vs_constant"] == (None, False)
    with pytest.raises(Exception):
        F.compare(photos, perfect[:-1])

    md = report_html.to_markdown(rep2)
    assert "| glasses_balanced_accuracy | 0.000 | >= 0.85 | FAIL |" in md
    page = report_html.to_html(rep2)
    assert page.startswith("<!DOCTYPE html>") and 'class="fail"' in page and "<script" not in page


def test_paired_bootstrap_separates_a_real_gain_from_noise():
    rng = np.random.default_rng(3)
    n = 60
    photos = [_stats((float(rng.uniform(10, 60)), 5.0, 10.0), (65.0, 15.0, 18.0), i % 3 == 0,
                     i % 5 == 0, i % 2 == 0, float(rng.uniform(0, 0.4)), 1.0 + 0.02 * i)
              for i in range(n)]
    const = F.constant_stats(hair="#3b2a20", skin=(60.0, 12.0, 15.0))

    def model(flip_every, hair_shift):
        out = []
        for i, p in enumerate(photos):
            q = dict(p)
            if i % flip_every == 0:
                q["glasses"] = not p["glasses"]
            q["hair"] = (p["hair"][0] + hair_shift, p["hair"][1], p["hair"][2])
            out.append(q)
        return out

    weak, strong = model(2, 12.0), model(1000, 2.0)       # strong: one flip, small colour error
    res = F.paired_bootstrap(photos, weak, strong, const, resamples=200, seed=1)
    g = res["glasses_balanced_accuracy"]
    full_weak = F.compare(photos, weak, const)["presence"]["glasses"]["value"]
    assert g["a"] == pytest.approx(full_weak) and g["diff"] == pytest.approx(g["b"] - g["a"])
    assert g["lo"] > 0 and g["p_better"] == 1.0              # a real gain: the interval excludes 0
    h = res["hair_colour_median_de00"]
    assert h["diff"] < 0 and h["hi"] < 0 and h["p_better"] == 1.0     # lower is better for dE00
    # A model against itself: every difference is exactly 0, never "better".
    same = F.paired_bootstrap(photos, weak, weak, const, resamples=50)
    assert all(r["diff"] in (0.0, None) and r["p_better"] in (0.0, None) for r in same.values())
    assert same["hair_amount_spearman"]["lo"] == same["hair_amount_spearman"]["hi"] == 0.0
    with pytest.raises(Exception, match="pair up"):
        F.paired_bootstrap(photos, weak, strong[:-1], const)


def test_compare_yaw_filter_restricts_shape_pairs():
    photos = [dict(_stats(None, None, False, False, False, 0.1 * i, 1.0 + 0.1 * i), yaw=0.02 * i)
              for i in range(10)]
    avatars = [dict(p) for p in photos]
    assert F.compare(photos, avatars)["correlation"]["face_aspect"]["n"] == 10
    rep = F.compare(photos, avatars, max_abs_yaw=0.09)
    assert rep["correlation"]["face_aspect"]["n"] == 5                   # yaw 0 .. 0.08
    assert rep["correlation"]["hair_fraction"]["n"] == 10                # amounts unaffected


PACK_TOML = """
[pack]
id = "tagtest"
builder = "none"
[[parameters]]
name = "hair_tone"
min = 0.0
max = 1.0
[[slots]]
name = "glasses"
options = [{id = "none", tags = {glasses = "none"}},
           {id = "round", tags = {glasses = "eyeglasses"}}]
[[slots]]
name = "hair"
options = [{id = "crop", tags = {hair_length = "short", bangs = "none"}},
           {id = "bob", tags = {hair_length = "medium", bangs = "bangs"}}]
"""


def test_avatar_presence_from_vector_tags(tmp_path):
    (tmp_path / "pack.toml").write_text(PACK_TOML)
    pack = load_pack(tmp_path)
    v = pack.vector_from_json({"params": {"hair_tone": 0.5},
                               "slots": {"glasses": "round", "hair": "bob"}})
    render = synthetic_face()                       # no glasses pixels, no fringe in the mask
    s = F.avatar_stats(render, None, vector=v)
    assert s["glasses"] is True and s["fringe"] is True
    assert s["headwear"] is False                   # no headwear tag in the pack: from the mask
    assert s["presence_source"] == {"glasses": "tags", "headwear": "mask", "earrings": "mask",
                                    "fringe": "tags", "facial_hair": "pixels"}
    assert s["facial_hair"] is None                 # no pixels, no facial-hair tag in this pack
    assert s["hair_length_rank"] == 3
    plain = pack.default_vector()
    assert F.presence_from_tags(plain) == {"glasses": False, "headwear": None, "earrings": None,
                                           "fringe": False, "facial_hair": None}
    assert F.presence_from_tags({"glasses": "sunglasses"})["glasses"] is True
    rep = F.compare([F.mask_stats(synthetic_face(fringe_rows=16))] * 3, [s] * 3)
    assert rep["presence_source"]["glasses"] == {"tags": 3}
    assert rep["presence"]["fringe"]["value"] == 1.0


def _face_rgb(lower=None, seed=0):
    """RGB for ``synthetic_face``: smooth skin, the lower face (rows 120..179) painted by
    ``lower(rng, shape)`` when given."""
    rgb = np.zeros((H, W, 3), np.float32)
    rgb[:] = (224, 184, 153)
    if lower is not None:
        rgb[120:180, 50:150] = lower(np.random.default_rng(seed), (60, 100))
    return np.clip(rgb, 0, 255).astype(np.uint8)


def test_facial_hair_cue_beard_clean_and_shadow():
    m = synthetic_face()
    beard = _face_rgb(lambda rng, sh: np.array([70, 52, 40]) + rng.normal(0, 25, (*sh, 1)))
    cue = F.facial_hair_cue(m, beard)
    assert cue["present"] is True and cue["dL"] > 30 and cue["dC"] > 1.5 and cue["texture"] > 2
    clean = F.facial_hair_cue(m, _face_rgb())
    assert clean["present"] is False and clean["dL"] == pytest.approx(0.0, abs=1e-4)
    # A smooth shadow under the mouth darkens like a beard but is not textured: never a beard.
    shadow = F.facial_hair_cue(m, _face_rgb(lambda rng, sh: np.full((*sh, 3), (150, 118, 98))))
    assert shadow["dL"] > 15 and shadow["present"] is None
    # No anchors (no mouth): no call at all; the measure is part of mask_stats with pixels only.
    no_mouth = m.copy()
    no_mouth[np.isin(no_mouth, [C["u_lip"], C["l_lip"]])] = C["skin"]
    assert F.facial_hair_cue(no_mouth, beard)["present"] is None
    assert F.mask_stats(m, beard)["facial_hair"] is True
    assert F.mask_stats(m)["facial_hair"] is None


# ------------------------------------------------------------------------------------------------
# Real faces (read in place; never copied)
# ------------------------------------------------------------------------------------------------

def _real_val(n: int = 20):
    from likeness.backend import realfaces
    try:
        stems = realfaces.stems(split="val")
    except Exception as e:                                              # data not on this machine
        pytest.skip(f"real faces unavailable: {e}")
    return [(st, *realfaces.load_pair(st)) for st in stems[:n]]


@pytest.fixture(scope="module")
def real20():
    faces = _real_val(20)
    return [(st, rgb, m, F.mask_stats(m, rgb)) for st, rgb, m in faces]


def test_real_face_against_itself_agrees_perfectly(real20):
    stats = [s for *_, s in real20]
    const = F.constant_stats(hair="#3b2a20", skin="#e0b899", lips="#b05a55", eyes="#3a2c24")
    rep = F.compare(stats, [dict(s) for s in stats], const)
    for name in F.COLOURS:
        r = rep["colour"][name]
        assert r["n"] > 0 and r["median"] == 0.0 and r["p90"] == 0.0, name
        assert r["constant"]["median"] > 0 and r["ratio_median"] == 0.0
    for name in F.PRESENCE:
        r = rep["presence"][name]
        assert r["value"] == 1.0 and r["n"] > 0, (name, r)
    for name in (*F.AMOUNTS, *F.SHAPES):
        assert rep["correlation"][name]["value"] == pytest.approx(1.0), name
    # Against the constant avatar, the colour targets are not met.
    rep_const = F.compare(stats, [const] * len(stats), const)
    assert rep_const["colour"]["skin"]["ratio_median"] == pytest.approx(1.0)


def test_real_face_stats_are_plausible(real20):
    n_frame = 512 * 512
    for st, rgb, m, s in real20:
        counts = np.bincount(m.ravel(), minlength=19)
        assert s["skin"] is not None, st
        L, a, b = s["skin"]
        assert 20 < L < 95 and abs(a) < 40 and abs(b) < 50, (st, s["skin"])
        assert 0 < s["hair_fraction"] < 1
        assert s["hair_fraction"] == pytest.approx(counts[C["hair"]] / m.size)
        for name, cls in (("glasses", "eyeglasses"), ("headwear", "hat"), ("earrings", "earring")):
            frac = counts[C[cls]] / m.size
            assert s[name] == (frac >= F.PRESENCE_THRESHOLDS[name]), (st, name)
            if counts[C[cls]] == 0:
                assert s[name] is False
        if s["hair"] is None:
            assert counts[C["hair"]] < 200
        if s["face_width"] is not None:
            assert 0.25 < s["face_width"] < 0.8 and 0.2 < s["face_height"] < 0.6, st
    assert m.size == n_frame
    stats = [s for *_, s in real20]
    assert sum(all(s[k] is not None for k in F.SHAPES) for s in stats) >= 18
    assert sum(s["fringe"] is not None for s in stats) >= 18
    # Skin is redder (a*) than hair on average and lighter: a crude but real sanity check.
    skin_L = np.median([s["skin"][0] for s in stats])
    hair_L = np.median([s["hair"][0] for s in stats if s["hair"] is not None])
    assert skin_L > hair_L
