"""The validation runner end to end on real validation photos with a small model made here."""
import json

import numpy as np
import pytest
from PIL import Image

from likeness.backend import realfaces
from likeness.backend import fidelity
from likeness.render_engine.validate_job import read_stats, validate


@pytest.fixture(scope="module")
def model(tiny_default_model):
    return tiny_default_model


@pytest.mark.real_faces
def test_validate_end_to_end(model, tmp_path):
    report = validate(str(model), "default", str(tmp_path), limit=4, log=lambda s: None)
    val = realfaces.stems(split="val")[:4]
    assert report["photos"] == 4 and report["detected"] + len(report["failures"]) == 4
    assert all(realfaces.is_validation(s) for s in val)
    assert report["n"] == report["detected"] >= 3
    skin = report["colour"]["skin"]
    assert skin["median"] is not None and skin["constant"]["median"] is not None
    names = {t["name"] for t in report["targets"]}
    assert {"glasses_balanced_accuracy", "skin_colour_median_de00", "hair_amount_spearman"} <= names
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["machine"] and saved["model"].endswith("tiny.onnx")
    rows = (tmp_path / "per_photo.csv").read_text().splitlines()
    assert len(rows) == 1 + report["detected"] and rows[1].split(",")[0] in val
    sheet = np.asarray(Image.open(tmp_path / "sheet.png"))
    assert sheet.shape[0] >= 128                       # photo | avatar tiles
    assert "glasses" in (tmp_path / "report.md").read_text()
    # the per-photo measures reproduce the report, and a model against itself differs by nothing
    stats = read_stats(tmp_path / "stats.json")
    assert stats["stems"] == [r.split(",")[0] for r in rows[1:]]
    again = fidelity.check_targets(fidelity.compare(stats["photo"], stats["avatar"],
                                                    stats["constant"]))
    assert [v for _, v, _, _ in again] == pytest.approx([t["value"] for t in report["targets"]])
    same = fidelity.paired_bootstrap(stats["photo"], stats["avatar"], stats["avatar"],
                                     stats["constant"], resamples=20)
    assert all(r["diff"] in (0.0, None) for r in same.values())


@pytest.mark.real_faces
def test_split_rule_keeps_validation_out_of_training():
    train, val = realfaces.stems(split="train"), realfaces.stems(split="val")
    assert len(val) == 256 and len(train) == 744 and not set(train) & set(val)
    assert all(s[0] in "cdef" for s in val) and not any(s[0] in "cdef" for s in train)


@pytest.mark.skipif(not (realfaces.default_root() / "images").is_dir(), reason="the shared real faces are not here")
def test_each_perturbation_changes_a_real_photo_the_way_it_says():
    """The robustness table's rows on a real TRAIN photo, each measured against the photo."""
    from PIL import ImageFilter
    from likeness.render_engine import validate_job as V
    from likeness.backend.errors import UserError
    rgb = realfaces.load_pair(realfaces.stems(None, "train")[0])[0]
    f = rgb.astype(float)

    def sharpness(x):                      # energy of the Laplacian: what blur and low resolution lose
        x = np.asarray(x, float).mean(2)
        return float(np.abs(4 * x[1:-1, 1:-1] - x[:-2, 1:-1] - x[2:, 1:-1] - x[1:-1, :-2] - x[1:-1, 2:]).mean())

    out = {k: V.perturb(rgb, k) for k in V.PERTURBATIONS}
    for k, x in out.items():
        assert x.shape == rgb.shape and x.dtype == np.uint8, k
        assert not np.array_equal(x, rgb), k
    assert sharpness(out["blur"]) < 0.5 * sharpness(rgb)
    assert sharpness(out["low_res"]) < 0.7 * sharpness(rgb)
    assert abs(out["low_res"].astype(float).mean() - f.mean()) < 2.0
    mid = (f > 40) & (f < 215)             # away from the levels where the noise is clipped
    noise = (out["noise"].astype(float) - f)[mid]
    assert abs(noise.std() - V.NOISE_SIGMA) < 0.5 and abs(noise.mean()) < 0.2
    assert np.array_equal(V.perturb(rgb, "noise"), out["noise"])          # seeded
    ratio = lambda x: x[..., 0].astype(float).mean() / max(1.0, x[..., 2].astype(float).mean())
    assert ratio(out["warm"]) > ratio(rgb) > ratio(out["cold"])
    assert out["under"].mean() < f.mean() < out["over"].mean()
    assert 0.5 < abs(out["jpeg30"].astype(float) - f).mean() < 10
    # the looser frame: the photo shrunk to 70 % in the middle
    h, w = rgb.shape[:2]
    small = np.asarray(Image.fromarray(rgb).resize((int(w * 0.7), int(h * 0.7)), Image.Resampling.LANCZOS))
    py, px = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2
    assert np.array_equal(out["loose_crop"][py:py + small.shape[0], px:px + small.shape[1]], small)
    with pytest.raises(UserError, match="unknown perturbation"):
        V.perturb(rgb, "fisheye")
    # the CLI offers exactly these (it keeps its own list so that `likeness --help` stays light)
    from likeness.cli import build_parser
    val = build_parser()._subparsers._group_actions[0].choices["validate"]
    assert tuple(next(a for a in val._actions if a.dest == "perturb").choices) == V.PERTURBATIONS
