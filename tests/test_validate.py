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
