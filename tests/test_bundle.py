"""A pack's bundle: everything the backend reads for it (estimator, colour calibration, shape table)
made by `likeness retrain`, installed whole with one manifest, and found where its estimator is;
the alignment constants as data; the photo parser a retrain starts from."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from likeness.backend import models
from likeness.backend.errors import UserError
from likeness.backend.schema import find_pack

ROOT = Path(__file__).resolve().parent.parent
MINI = ROOT / "tests" / "data" / "mini_pack"
SHIPPED = models.SHIPPED / "stylized"


def likeness(*args, env=None):
    return subprocess.run([sys.executable, "-m", "likeness.cli", *args], capture_output=True, text=True,
                          env=env)


@pytest.fixture
def user_dirs(tmp_path, monkeypatch):
    """An empty user data folder (where --install goes) and no extra model folders."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LIKENESS_MODELS_PATH", raising=False)
    return tmp_path / "xdg" / "likeness" / "models"


def make_bundle(folder: Path, pack, estimator: Path, shape: bool = True) -> Path:
    folder.mkdir(parents=True)
    shutil.copyfile(estimator, folder / models.FILENAME)
    shutil.copyfile(SHIPPED / models.CALIBRATION, folder / models.CALIBRATION)
    made_by = {models.FILENAME: "test", models.CALIBRATION: "test"}
    if shape:
        shutil.copyfile(SHIPPED / models.SHAPE, folder / models.SHAPE)
        made_by[models.SHAPE] = "test"
    models.write_bundle_manifest(folder, pack, made_by, {"by": "test"}, parser=models.find_parser(),
                                 reader=models.SHIPPED / "attributes")
    return folder


def test_a_bundle_is_found_where_its_estimator_is_and_holds_only_what_it_lists(
        tiny_default_model, tmp_path, monkeypatch, user_dirs):
    pack = find_pack("default")
    extra = tmp_path / "extra"
    monkeypatch.setenv("LIKENESS_MODELS_PATH", str(extra))
    bundle = make_bundle(extra / pack.id, pack, tiny_default_model, shape=False)
    man = json.loads((bundle / models.MANIFEST).read_text())
    assert man["pack"] == pack.id and man["schema"] == pack.schema_hash
    assert man["shared"]["parser"]["path"] == "models/parser/parser.onnx"
    assert set(man["shared"]["attributes"]["files"]) >= {"reader.json", "colour_rule.json"}
    assert models.check_bundle(bundle, pack) == []
    assert models.find_model(pack) == bundle / models.FILENAME
    assert models.find_calibration(pack) == bundle / models.CALIBRATION
    assert models.find_calibration(pack, bundle / models.FILENAME) == bundle / models.CALIBRATION
    # the bundle lists no shape table: none, although the shipped folder has one for the pack
    assert (SHIPPED / models.SHAPE).is_file()
    assert models.find_shape(pack) is None and models.find_shape(pack, bundle / models.FILENAME) is None
    assert models.find_parser(pack) == models.SHIPPED / models.PARSER        # the shared one
    # an estimator outside a bundle: beside it, then the model folders (as before bundles)
    loose = tmp_path / "loose" / "m.onnx"
    loose.parent.mkdir()
    shutil.copyfile(tiny_default_model, loose)
    assert models.find_shape(pack, loose) == SHIPPED / models.SHAPE
    # a bundle's own parser is what its estimator is read with
    shutil.copyfile(models.SHIPPED / models.PARSER, bundle / models.BUNDLE_PARSER)
    made = {n: "test" for n in (models.FILENAME, models.CALIBRATION, models.BUNDLE_PARSER)}
    models.write_bundle_manifest(bundle, pack, made, {"by": "test"})
    assert models.find_parser(pack) == bundle / models.BUNDLE_PARSER
    assert models.find_parser() == models.SHIPPED / models.PARSER


def test_the_shipped_default_models_are_a_bundle():
    pack = find_pack("default")
    assert models.check_bundle(SHIPPED, pack) == []
    man = models.read_bundle(SHIPPED)
    assert set(man["files"]) == {models.FILENAME, models.CALIBRATION, models.SHAPE}
    assert man["shared"]["parser"]["sha256"] == models.sha256(models.SHIPPED / models.PARSER)


def test_install_checks_the_bundle_and_replaces_the_old_one_whole(tiny_default_model, tmp_path,
                                                                   user_dirs):
    pack = find_pack("default")
    bundle = make_bundle(tmp_path / "b1", pack, tiny_default_model)
    dest = models.install_bundle(bundle, pack)
    assert dest == user_dirs / pack.id
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [models.FILENAME, models.CALIBRATION, models.SHAPE, models.MANIFEST])
    assert models.find_model(pack) == dest / models.FILENAME
    assert models.find_shape(pack) == dest / models.SHAPE
    # a second bundle without a shape table replaces the first whole: no stale shape.json stays
    second = make_bundle(tmp_path / "b2", pack, tiny_default_model, shape=False)
    models.install_bundle(second, pack)
    assert not (dest / models.SHAPE).exists() and models.find_shape(pack) is None
    assert [p.name for p in user_dirs.iterdir()] == [pack.id]            # no temporary folders left
    # a damaged bundle is refused before anything is replaced
    (second / models.CALIBRATION).write_text("{}")
    with pytest.raises(UserError, match="differs from the manifest"):
        models.install_bundle(second, pack)
    with pytest.raises(UserError, match="not pack"):
        models.install_bundle(bundle, find_pack(MINI))
    assert models.check_bundle(dest, pack) == []


def test_alignment_constants_are_data(tmp_path):
    from likeness.backend import align
    data = align.read_alignment()
    assert np.allclose(align.TEMPLATE, data["template"]) and align.FRAME_HALF == data["frame"]["half"]
    out = align.write_alignment(align.TEMPLATE, (align.FRAME_CENTRE, align.FRAME_HALF, align.FRAME_ANGLE_DEG),
                                align.RESIDUAL, (744, 744), tmp_path / "alignment.json")
    assert align.read_alignment(out) == data                # what --write stores is what ships
    (tmp_path / "bad.json").write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(UserError, match="not alignment constants"):
        align.read_alignment(tmp_path / "bad.json")
    assert "TEMPLATE = np.array([\n" not in Path(align.__file__).read_text()   # no constants in source


def test_the_shipped_photo_parser_is_what_a_fine_tune_starts_from():
    """Its ONNX file's weights, rebuilt as the torch U-Net (checked against onnxruntime)."""
    pytest.importorskip("torch")
    from likeness.training.readout import photo_parser as pp
    net, channels = pp.onnx_weights(pp.SHIPPED_PARSER)
    assert channels == (16, 32, 64, 128) and sum(p.numel() for p in net.parameters()) > 400_000
    trainer = pp.photo_trainer_class(net)
    assert trainer.__name__ == "PhotoParserTrainer"


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory):
    """A tiny --baseline retrain of tests/data/mini_pack (at an estimator input the parse can
    measure shape at), installed into an empty user folder: (work, summary, user data folder)."""
    from likeness.backend import realfaces
    from likeness.training.pipeline.retrain import get_config, retrain
    if not (realfaces.default_root() / "images").is_dir():
        pytest.skip(f"the shared real faces are not at {realfaces.default_root()}")
    tmp = tmp_path_factory.mktemp("mini")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("XDG_DATA_HOME", str(tmp / "xdg"))
        mp.delenv("LIKENESS_MODELS_PATH", raising=False)
        summary = retrain(str(MINI), get_config("tiny", estimator_input=64), str(tmp / "work"),
                          baseline=True, install=True, progress=False, log=lambda s: None)
    return tmp / "work", summary, tmp / "xdg"


@pytest.mark.real_faces
def test_a_second_pack_retrained_installed_and_created_reads_the_photo_as_the_default(mini_run, tmp_path):
    """`likeness create --pack` of the installed second pack on a real photo: its colours and shape
    come from the photo, as the default pack's do."""
    from likeness.backend import realfaces
    work, summary, xdg = mini_run
    pack = find_pack(MINI)
    dest = xdg / "likeness" / "models" / pack.id
    assert summary["installed"] == str(dest)
    assert models.check_bundle(dest, pack) == []
    man = json.loads((dest / models.MANIFEST).read_text())
    assert set(man["files"]) == {models.FILENAME, models.CALIBRATION, models.SHAPE}
    assert {f["made_by"].split("'")[1] for f in man["files"].values()} == {"export", "calibration", "shape"}
    assert man["shared"]["parser"]["sha256"] == models.sha256(models.SHIPPED / models.PARSER)
    assert man["made"]["stage_keys"]["shape"] == json.loads((work / "shape" / "stage.json").read_text())["key"]
    assert json.loads((dest / models.SHAPE).read_text())["hair"]["slot"] == "hair"
    # the validate stage measured the bundle as a user gets it
    assert "from the photo" in summary["validation"]["colours"]["note"]
    assert "fitted to the photo" in summary["validation"]["shape"]["note"]

    photo = realfaces.default_root() / "images" / f"{realfaces.stems(split='val')[0]}.jpg"
    env = {**os.environ, "XDG_DATA_HOME": str(xdg), "OMP_NUM_THREADS": "1"}
    env.pop("LIKENESS_MODELS_PATH", None)
    notes, records = {}, {}
    for name, pack_arg in (("mini", str(MINI)), ("default", "default")):
        out = tmp_path / f"out_{name}"
        r = likeness("create", "--pack", pack_arg, "--photo", str(photo), "--out", str(out),
                     "--resolution", "64", env=env)
        assert r.returncode == 0, r.stderr
        notes[name] = [ln for ln in r.stderr.splitlines() if "colours" in ln][-1]
        records[name] = json.loads((out / "vector.json").read_text())
    for name in ("mini", "default"):
        assert "colours of hair, skin, lips from the photo" in notes[name], notes[name]
        assert "shape sliders fitted to the photo's" in notes[name], notes[name]
        assert "hairstyle chosen for the photo's hair amount" in notes[name], notes[name]
        rec = records[name]
        assert rec["colours"]["mode"] == "photo"
        assert {r for r, s in rec["colours"]["sources"].items() if s == "photo"} == {"hair", "skin", "lips"}
        assert rec["shape_from_photo"]
    assert notes["mini"].split("; ")[1:] == notes["default"].split("; ")[1:]


@pytest.mark.real_faces
def test_a_fine_tuned_photo_parser_travels_in_the_bundle(mini_run, tmp_path, monkeypatch):
    """photo_parser_steps > 0: the stage fine-tunes the shipped parser, the shape table is refitted
    with it, the bundle carries it and the backend reads the pack's photos with it."""
    from likeness.training.pipeline.retrain import get_config, retrain
    work, _, _ = mini_run
    shutil.copytree(work, tmp_path / "work")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv("LIKENESS_MODELS_PATH", raising=False)
    cfg = get_config("tiny", estimator_input=64, photo_parser_steps=2, photo_parser_batch=2)
    log = []
    summary = retrain(str(MINI), cfg, str(tmp_path / "work"), baseline=True, install=True,
                      progress=False, log=log.append)
    redone = {ln.split("]")[0][1:] for ln in log if "inputs changed" in ln}
    assert redone == {"photo_parser", "shape", "bundle", "validate"}      # not the estimator
    pack = find_pack(MINI)
    dest = Path(summary["installed"])
    man = json.loads((dest / models.MANIFEST).read_text())
    assert models.BUNDLE_PARSER in man["files"] and "parser" not in man["shared"]
    assert models.find_parser(pack) == dest / models.BUNDLE_PARSER
    assert models.find_parser() == models.SHIPPED / models.PARSER          # other packs: the shared one
    rec = json.loads((tmp_path / "work" / "photo_parser" / "stage.json").read_text())["result"]
    assert rec["init"].startswith(str(models.SHIPPED / models.PARSER)) and rec["steps"] == 2
    assert rec["val_miou"] > 0.55                                          # a fine-tune, not a wreck
