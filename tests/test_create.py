"""`likeness create` and `likeness pack info` as a user runs them, with a small model made here."""
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from likeness.backend import realfaces
from likeness.backend.schema import find_pack


def likeness(*args, **kw):
    return subprocess.run([sys.executable, "-m", "likeness.cli", *args], capture_output=True,
                          text=True, **kw)


@pytest.fixture(scope="module")
def model(tiny_default_model):
    return tiny_default_model


@pytest.mark.real_faces
def test_create_on_real_photos_and_the_default_portrait(model, tmp_path):
    stems = realfaces.stems(split="val")[:2]
    photos = tmp_path / "photos"
    photos.mkdir()
    for s in stems:   # a copy in a temp folder only, never in the repository
        (photos / f"{s}.jpg").write_bytes((realfaces.default_root() / "images" / f"{s}.jpg").read_bytes())
    (photos / "notes.txt").write_text("not a photo")
    r = likeness("create", "--photos", str(photos), "--model", str(model), "--out", str(tmp_path / "o"),
                 "--resolution", "128")
    assert r.returncode == 0, r.stderr
    for s in stems:
        out = tmp_path / "o" / f"{s}_jpg"         # the file name: unique beside s.png
        rec = json.loads((out / "vector.json").read_text())
        vec = find_pack("default").vector_from_json(rec["vector"])
        assert set(rec["slots"]) == set(vec.slots)
        assert np.asarray(Image.open(out / "render.png")).shape == (128, 128, 3)
        assert np.asarray(Image.open(out / "crop.png")).shape == (64, 64, 3)
        assert (np.asarray(Image.open(out / "mask.png")) == 1).mean() > 0.1
    r = likeness("create", "--model", str(model), "--out", str(tmp_path / "astro"), "--resolution", "128")
    assert r.returncode == 0 and "astronaut" in r.stderr
    assert (tmp_path / "astro" / "side_by_side.png").is_file()


def test_create_bad_input(model, tmp_path):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((300, 300, 3), 200, np.uint8)).save(blank)
    r = likeness("create", "--photo", str(blank), "--model", str(model), "--out", str(tmp_path / "b"))
    assert r.returncode == 1 and "no face found" in r.stderr
    r = likeness("create", "--photo", str(tmp_path / "missing.jpg"), "--model", str(model),
                 "--out", str(tmp_path / "c"))
    assert r.returncode == 1 and "missing.jpg" in r.stderr
    r = likeness("create", "--model", str(tmp_path / "none.onnx"), "--out", str(tmp_path / "d"))
    assert r.returncode == 1 and "model file not found" in r.stderr


def test_pack_info_json():
    r = likeness("pack", "info", "--json")
    info = json.loads(r.stdout)
    assert info["id"] == "stylized" and info["counts"]["parameters"] >= 24
    assert info["counts"]["slots"] >= 8 and info["counts"]["options"] >= 60
    hair = next(s for s in info["slots"] if s["name"] == "hair")
    assert {"bald", "buzz", "long", "ponytail", "bun", "afro"} <= {o["id"] for o in hair["options"]}
    assert {o["tags"].get("hair_length") for o in hair["options"]} >= {"bald", "buzz", "short", "medium", "long"}
