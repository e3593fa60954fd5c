"""The Blender add-on in real bpy, headless: registration, avatars, sliders, every operator,
Create from photo with a real ONNX estimator on a real photo, bad inputs, undo, panels.

No mocks: the estimator is a small torch model exported with ``training/estimator/export.py`` (biased so a
few slots have a confident choice), run by onnxruntime through ``backend.predict``.

Panels cannot be drawn headless (the bpy module has a window and a 3D-view area but never redraws),
so ``poll`` runs in that real area and ``draw`` runs on a recording layout that checks every
property, operator, operator property and icon it is given against Blender's RNA.
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

import addon_utils  # noqa: E402

from likeness.backend.errors import UserError  # noqa: E402
from likeness.backend.schema import SchemaError, find_pack, load_pack  # noqa: E402
from likeness.render_engine import avatar, rig  # noqa: E402

MODULE = "likeness"
PHOTOS = Path(__file__).resolve().parents[2] / "shared" / "data" / "celebamask-hq-1k" / "images"
# Slots the test estimator is confident about (large logit bias), and what it picks: slots the
# attribute reader leaves to the estimator (it decides hair, glasses, fringe, facial hair, hats).
FAVOURITES = {"brows": "arched", "nose": "pointed", "top": "hoodie"}
INPUT_SIZE = 64
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


# --------------------------------------------------------------------------------------------
# Helpers shared with tests/test_extension.py and scripts
# --------------------------------------------------------------------------------------------

def make_tiny_estimator(pack, path, favourites=FAVOURITES, seed=0):
    """Export a small estimator for ``pack`` (continuous sigmoid, logits per slot; the
    ``favourites`` options get a +6 logit bias) to ``path`` with training/estimator/export.py."""
    import torch
    from likeness.training.estimator.export import export_estimator

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(seed)
            self.features = torch.nn.Sequential(
                torch.nn.Conv2d(3, 8, 3, stride=4, padding=1), torch.nn.ReLU(),
                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
            self.cont = torch.nn.Linear(8, pack.n_continuous)
            self.heads = torch.nn.ModuleList(torch.nn.Linear(8, k) for k in pack.slot_sizes)
            with torch.no_grad():
                for slot, head in zip(pack.slots, self.heads):
                    if slot.name in favourites:
                        head.bias[slot.index(favourites[slot.name])] += 6.0

        def forward(self, x):
            f = self.features(x)
            return torch.sigmoid(self.cont(f)), [h(f) for h in self.heads]

    return export_estimator(Tiny(), pack, path, INPUT_SIZE, MEAN, STD)


def real_photo() -> Path:
    photos = sorted(PHOTOS.glob("*.jpg")) if PHOTOS.is_dir() else []
    if not photos:
        pytest.skip(f"no real photos in {PHOTOS}")
    return photos[0]


def ensure_enabled():
    if MODULE not in bpy.context.preferences.addons:
        addon_utils.enable(MODULE, default_set=True, handle_error=_raise)


def _raise(exc):
    raise exc


def fresh_file():
    ensure_enabled()
    bpy.ops.wm.read_homefile(use_empty=True)


def scene_state():
    """Everything an operator could leave behind, as plain data."""
    return {
        "objects": sorted(o.name for o in bpy.data.objects),
        "collections": sorted(c.name for c in bpy.data.collections),
        "meshes": len(bpy.data.meshes), "materials": len(bpy.data.materials),
        "images": sorted(i.name for i in bpy.data.images),
        "libraries": len(bpy.data.libraries),
        "vectors": {c.name: avatar.read(c).to_json() for c in avatar.avatars()},
        "predictions": {c.name: c.get(avatar.PREDICTION_PROP) for c in avatar.avatars()},
        "serial": bpy.context.scene.get(avatar.SCENE_SERIAL_PROP),
    }


def rig_state(coll):
    """The avatar's objects, shape keys and material colours (by original name)."""
    out = {}
    for ob in coll.all_objects:
        name = rig.original_name(ob)
        out[name] = (ob.hide_render, ob.hide_viewport, tuple(ob.location), tuple(ob.scale),
                     tuple(ob.rotation_euler))
        keys = getattr(ob.data, "shape_keys", None) if ob.type == "MESH" else None
        if keys is not None:
            for kb in keys.key_blocks:
                out[f"{name}:{kb.name}"] = round(kb.value, 6)
        for slot in ob.material_slots:
            if slot.material is not None:
                out["mat:" + rig.original_name(slot.material)] = tuple(
                    round(c, 6) for c in slot.material.diffuse_color)
    return out


def init_undo():
    bpy.ops.ed.undo_push(message="likeness test start")
    bpy.ops.ed.undo_push(message="likeness test start")


def run(op, *args, **kw):
    """Call an operator as the UI does: with an undo push."""
    return op("EXEC_DEFAULT", True, *args, **kw)


# --------------------------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def pack():
    return find_pack("default")


@pytest.fixture(scope="module", autouse=True)
def enabled():
    ensure_enabled()
    yield
    if MODULE in bpy.context.preferences.addons:
        addon_utils.disable(MODULE, default_set=True)


@pytest.fixture
def clean():
    fresh_file()
    yield
    bpy.ops.wm.read_homefile(use_empty=True)


@pytest.fixture(scope="module")
def models(tmp_path_factory, pack):
    pytest.importorskip("torch")
    pytest.importorskip("onnx")
    root = tmp_path_factory.mktemp("addon-models")
    other = root / "otherpack"
    other.mkdir()
    (other / "pack.toml").write_text(
        '[pack]\nid = "other"\nbuilder = "none"\n[[parameters]]\nname = "x"\nmin = 0.0\nmax = 1.0\n'
        '[[slots]]\nname = "s"\noptions = [{ id = "a" }, { id = "b" }]\n')
    other_pack = load_pack(other)
    return {
        "stylized": make_tiny_estimator(pack, root / "stylized.onnx"),
        "other": make_tiny_estimator(other_pack, root / "other.onnx", favourites={}),
        "root": root,
    }


@pytest.fixture(scope="module")
def broken_pack(tmp_path_factory, pack):
    """A pack shipping a .blend that lacks 'Hair.Afro' (made from the built default pack)."""
    folder = tmp_path_factory.mktemp("broken") / "broken"
    folder.mkdir()
    src = avatar.pack_blend(pack)
    blend = folder / "avatar.blend"
    code = ("import bpy\n"
            f"bpy.ops.wm.open_mainfile(filepath={str(src)!r})\n"
            "bpy.data.objects.remove(bpy.data.objects['Hair.Afro'], do_unlink=True)\n"
            f"bpy.ops.wm.save_as_mainfile(filepath={str(blend)!r})\n")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    text = (pack.root / "pack.toml").read_text()
    text = text.replace('id = "stylized"', 'id = "broken"', 1).replace(
        'builder = "stylized"', 'blend = "avatar.blend"', 1)
    (folder / "pack.toml").write_text(text)
    return load_pack(folder)


# --------------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------------

_SEEN_CLASSES: set = set()


def _registration_snapshot():
    from likeness.addon import _CLI_HANDLES, operators, panels, photo, prefs, props
    _SEEN_CLASSES.update(cls for m in (operators, panels, photo, prefs, props) for cls in m.CLASSES)
    _SEEN_CLASSES.update(cls for cls, _ in props._REGISTERED.values())
    return {
        "types": sorted(n for n in dir(bpy.types) if n.upper().startswith("LIKENESS")),
        "registered": sorted(c.__name__ for c in _SEEN_CLASSES if c.is_registered),
        "collection_props": sorted(n for n in dir(bpy.types.Collection) if n.startswith("likeness")),
        "scene_props": sorted(n for n in dir(bpy.types.Scene) if n.startswith("likeness")),
        "load_post": len(bpy.app.handlers.load_post),
        "hooks": len(avatar.apply_hooks),
        "cli": len(_CLI_HANDLES),
        "addon": MODULE in bpy.context.preferences.addons,
    }


def test_register_unregister_cycles_leave_nothing_behind():
    addon_utils.disable(MODULE, default_set=True)
    empty = _registration_snapshot()
    assert empty["types"] == [] and empty["collection_props"] == [] and not empty["addon"]
    assert empty["registered"] == []
    assert empty["cli"] == 0
    for _ in range(3):
        addon_utils.enable(MODULE, default_set=True, handle_error=_raise)
        on = _registration_snapshot()
        assert "LIKENESS_OT_create_from_photo" in on["types"]
        assert "LIKENESS_PT_main" in on["types"]
        assert {"LikenessPreferences", "LIKENESS_PG_scene", "LIKENESS_PG_model",
                "LIKENESS_PG_pack_stylized"} <= set(on["registered"])
        assert isinstance(bpy.context.preferences.addons[MODULE].preferences,
                          bpy.types.AddonPreferences)
        assert on["collection_props"] == ["likeness_stylized"]
        assert on["scene_props"] == ["likeness"]
        assert on["load_post"] == empty["load_post"] + 1 and on["hooks"] == empty["hooks"] + 1
        assert on["cli"] == 1
        addon_utils.disable(MODULE, default_set=True)
        assert _registration_snapshot() == empty
    # the bare register()/unregister() the extension system calls
    import likeness
    for _ in range(2):
        likeness.register()
        likeness.unregister()
        assert _registration_snapshot() == empty
    ensure_enabled()


def test_register_imports_nothing_heavy():
    code = ("import sys, bpy, likeness\n"
            "likeness.register()\n"
            "heavy = ['onnxruntime', 'PIL', 'torch', 'scipy', 'skimage', 'likeness.backend.predict',\n"
            "         'likeness.backend.contract', 'likeness.backend.face_detect',\n"
            "         'likeness.render_engine.render', 'likeness.render_engine.dataset']\n"
            "print([m for m in heavy if m in sys.modules])\n"
            "likeness.unregister()\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout


def test_cli_command_runs_the_likeness_cli(capsys):
    from likeness.addon import _CLI_HANDLES, _cli
    assert len(_CLI_HANDLES) == 1
    assert _cli(["pack", "info", "--pack", "default", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["id"] == "stylized" and info["counts"]["parameters"] == 33
    assert _cli(["pack", "info", "--pack", "no-such-pack"]) == 1
    assert "unknown pack" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------
# Avatars and sliders
# --------------------------------------------------------------------------------------------

def test_two_avatars_live_side_by_side(clean, pack):
    bpy.ops.mesh.primitive_cube_add()
    cube = bpy.context.active_object
    cube.name = "Head"                                   # a user object with a pack object name
    assert run(bpy.ops.likeness.add_avatar) == {"FINISHED"}
    assert run(bpy.ops.likeness.add_avatar) == {"FINISHED"}
    a, b = avatar.avatars()
    assert (a.name, b.name) == ("Likeness", "Likeness.001")
    assert avatar.active_avatar(bpy.context) == b           # its root object is active now
    assert bpy.context.active_object == avatar.root_object(b)
    assert len(bpy.data.libraries) == 0                     # no dangling library after append
    for coll in (a, b):
        assert rig.check_scene(pack, collection=coll) == []
        assert avatar.read(coll) == pack.default_vector()
        assert all(rig.ORIGINAL_NAME_PROP in ob for ob in coll.all_objects)
    # the renamed copies resolve to their own collection's objects
    head_b = rig.Names(b, scoped=True).object("Head")
    assert head_b.name != "Head" and head_b.name in b.all_objects
    before_a = rig_state(a)
    vb = avatar.randomize(b, seed=11)
    assert avatar.read(b) == vb and avatar.read(a) == pack.default_vector()
    assert rig_state(a) == before_a
    assert rig_state(b) != before_a
    assert head_b.data.shape_keys.key_blocks["face_width"].value == pytest.approx(
        vb.params["face_width"], abs=1e-6)
    assert cube.type == "MESH" and cube.data.shape_keys is None     # the user's object untouched
    va = avatar.randomize(a, seed=12)
    assert avatar.read(a) == va and avatar.read(b) == vb and va != vb
    # the active avatar follows the active object
    bpy.context.view_layer.objects.active = rig.Names(a, scoped=True).object("Nose")
    assert avatar.active_avatar(bpy.context) == a


def test_sliders_drive_their_avatar_and_whole_vectors_apply_once(clean, pack):
    run(bpy.ops.likeness.add_avatar)
    run(bpy.ops.likeness.add_avatar)
    a, b = avatar.avatars()
    values = a.likeness_stylized
    assert values.p_face_width == pytest.approx(0.0) and values.s_hair == "crop"
    before_b = rig_state(b)
    values.p_face_width = 0.6
    names = rig.Names(a, scoped=True)
    assert names.object("Head").data.shape_keys.key_blocks["face_width"].value == pytest.approx(0.6)
    assert avatar.read(a).params["face_width"] == pytest.approx(0.6)
    values.s_hair = "afro"
    assert not names.object("Hair.Afro").hide_render and names.object("Hair.Crop").hide_render
    assert avatar.read(a).slots["hair"] == "afro"
    values.p_skin_tone = 1.0                             # a material ramp, on this avatar only
    assert names.material("Skin").diffuse_color[0] < 0.2
    assert rig.Names(b, scoped=True).material("Skin").diffuse_color[0] > 0.5
    assert rig_state(b) == before_b

    calls = []
    hook = lambda coll, vector: calls.append(coll.name)      # noqa: E731
    avatar.apply_hooks.append(hook)
    try:
        v = avatar.randomize(a, seed=5)
        assert calls == ["Likeness"]                     # one apply for the whole vector
        calls.clear()
        values.p_nose_width = 0.25                       # one slider: one apply
        assert calls == ["Likeness"]
    finally:
        avatar.apply_hooks.remove(hook)
    # the sliders show the whole applied vector
    for p in pack.parameters:
        expected = v.params[p.name] if p.name != "nose_width" else 0.25
        assert getattr(values, "p_" + p.name) == pytest.approx(expected, abs=1e-6)
    for s in pack.slots:
        assert getattr(values, "s_" + s.name) == v.slots[s.name]


def test_vector_json_helpers(clean, pack):
    run(bpy.ops.likeness.add_avatar)
    coll = avatar.active_avatar()
    v = avatar.randomize(coll, 3)
    text = avatar.vector_to_json(v)
    assert avatar.vector_from_json(coll, text) == v
    assert avatar.vector_from_json(pack, json.loads(text)) == v
    with pytest.raises(SchemaError, match="wrong pack"):
        avatar.vector_from_json(coll, json.dumps({"pack": "other", "params": {}, "slots": {}}))
    with pytest.raises(SchemaError, match="out of range"):
        avatar.vector_from_json(coll, json.dumps({"params": {"face_width": 3.0}}))


def test_add_avatar_builds_the_pack_without_replacing_the_open_file(clean, pack, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setenv("LIKENESS_CACHE", str(tmp_path / "cache"))
    from likeness.render_engine.packs import built_blend_path
    assert not built_blend_path(pack).exists()
    bpy.ops.mesh.primitive_monkey_add()
    user_objects = sorted(o.name for o in bpy.data.objects)
    filepath = bpy.data.filepath
    coll = avatar.add_avatar(pack)
    assert built_blend_path(pack).is_file()
    assert bpy.data.filepath == filepath
    assert set(user_objects) < {o.name for o in bpy.data.objects}
    assert avatar.avatars() == [coll] and rig.check_scene(pack, collection=coll) == []


def test_pack_blend_missing_an_object_is_refused_and_leaves_nothing(clean, broken_pack):
    run(bpy.ops.likeness.add_avatar)
    before = scene_state()
    with pytest.raises(RuntimeError, match="Hair.Afro"):
        run(bpy.ops.likeness.add_avatar, pack=str(broken_pack.root))
    assert scene_state() == before
    with pytest.raises(UserError, match="object 'Hair.Afro' is missing"):
        avatar.add_avatar(broken_pack)
    assert scene_state() == before


# --------------------------------------------------------------------------------------------
# Operators
# --------------------------------------------------------------------------------------------

def test_every_operator_headless(clean, pack, tmp_path):
    with pytest.raises(RuntimeError, match="Add an avatar first"):
        bpy.ops.likeness.randomize()
    run(bpy.ops.likeness.add_avatar)
    run(bpy.ops.likeness.add_avatar)
    a, b = avatar.avatars()
    settings = bpy.context.scene.likeness
    assert settings.pack == "stylized"

    # randomize: the given seed is reproducible; without one the panel's seed is used and advances
    assert run(bpy.ops.likeness.randomize, seed=7, avatar=a.name) == {"FINISHED"}
    v7 = avatar.read(a)
    run(bpy.ops.likeness.randomize, seed=8, avatar=a.name)
    assert avatar.read(a) != v7
    run(bpy.ops.likeness.randomize, seed=7, avatar=a.name)
    assert avatar.read(a) == v7
    settings.seed = 7
    run(bpy.ops.likeness.randomize)                      # the active avatar: b
    assert avatar.read(b) == v7 and settings.seed == 8

    # reset
    assert run(bpy.ops.likeness.reset, avatar=b.name) == {"FINISHED"}
    assert avatar.read(b) == pack.default_vector()

    # export / import
    path = tmp_path / "vector.json"
    assert bpy.ops.likeness.export_vector(filepath=str(path), avatar=a.name) == {"FINISHED"}
    assert pack.vector_from_json(path.read_text()) == v7
    assert run(bpy.ops.likeness.import_vector, filepath=str(path), avatar=b.name) == {"FINISHED"}
    assert avatar.read(b) == v7
    bad = tmp_path / "bad.json"
    bad.write_text('{"params": {"face_width": "wide"}}')
    run(bpy.ops.likeness.reset, avatar=b.name)
    before = scene_state()
    with pytest.raises(RuntimeError, match="face_width"):
        run(bpy.ops.likeness.import_vector, filepath=str(bad), avatar=b.name)
    with pytest.raises(RuntimeError, match="cannot read"):
        run(bpy.ops.likeness.import_vector, filepath=str(tmp_path / "missing.json"), avatar=b.name)
    assert scene_state() == before

    # copy / paste (the window-manager clipboard is a no-op in the headless bpy module)
    wm = bpy.context.window_manager
    wm.clipboard = "probe"
    clipboard_works = wm.clipboard == "probe"
    assert bpy.ops.likeness.copy_vector(avatar=a.name) == {"FINISHED"}
    if clipboard_works:
        assert pack.vector_from_json(wm.clipboard) == v7
    assert run(bpy.ops.likeness.paste_vector, text=avatar.vector_to_json(v7),
               avatar=b.name) == {"FINISHED"}
    assert avatar.read(b) == v7
    run(bpy.ops.likeness.reset, avatar=b.name)
    before = scene_state()
    with pytest.raises(RuntimeError, match="not valid JSON"):
        run(bpy.ops.likeness.paste_vector, text="{oops", avatar=b.name)
    with pytest.raises(RuntimeError, match="wrong pack"):
        run(bpy.ops.likeness.paste_vector, text='{"pack": "other"}', avatar=b.name)
    if not clipboard_works:
        with pytest.raises(RuntimeError, match="clipboard is empty"):
            run(bpy.ops.likeness.paste_vector, avatar=b.name)
    with pytest.raises(RuntimeError, match="no avatar named"):
        run(bpy.ops.likeness.reset, avatar="nope")
    assert scene_state() == before

    # alternatives: any option of a slot, refused for unknown ones
    assert run(bpy.ops.likeness.apply_alternative, slot="glasses", option="aviators",
               avatar=b.name) == {"FINISHED"}
    assert avatar.read(b).slots["glasses"] == "aviators"
    with pytest.raises(RuntimeError, match="unknown option"):
        run(bpy.ops.likeness.apply_alternative, slot="glasses", option="monocle", avatar=b.name)

    # select, then delete
    assert run(bpy.ops.likeness.select_avatar, avatar=a.name) == {"FINISHED"}
    assert avatar.active_avatar(bpy.context) == a
    meshes = len(bpy.data.meshes)
    n_meshes = sum(ob.type == "MESH" for ob in a.all_objects)        # all but the empties
    assert run(bpy.ops.likeness.remove_avatar, avatar=a.name) == {"FINISHED"}
    assert [c.name for c in avatar.avatars()] == ["Likeness.001"]
    assert len(bpy.data.meshes) == meshes - n_meshes
    assert all(ob.name.endswith(".001") for ob in bpy.data.objects)


# --------------------------------------------------------------------------------------------
# Create from photo
# --------------------------------------------------------------------------------------------

def test_create_from_photo_end_to_end(clean, pack, models):
    from likeness.backend.predict import Predictor
    photo = real_photo()
    expected = Predictor(pack, models["stylized"], device="cpu").predict(str(photo))
    assert {s: expected.vector.slots[s] for s in FAVOURITES} == FAVOURITES

    # no avatar yet: the photo adds one
    assert run(bpy.ops.likeness.create_from_photo, filepath=str(photo),
               model=str(models["stylized"])) == {"FINISHED"}
    coll, = avatar.avatars()
    got = avatar.read(coll)
    assert got.slots == expected.vector.slots
    for name, value in expected.vector.params.items():
        assert got.params[name] == pytest.approx(value, abs=1e-6)
    assert coll.likeness_stylized.s_nose == "pointed"         # the sliders show it
    assert coll.likeness_stylized.p_face_width == pytest.approx(expected.vector.params["face_width"],
                                                                abs=1e-6)
    # the crop the model saw, as an image datablock
    image = avatar.crop_image(coll)
    assert tuple(image.size) == (INPUT_SIZE, INPUT_SIZE) and image.packed_file is not None
    px = np.empty(INPUT_SIZE * INPUT_SIZE * 4, np.float32)
    image.pixels.foreach_get(px)
    px = (px.reshape(INPUT_SIZE, INPUT_SIZE, 4)[::-1, :, :3] * 255).round()
    assert np.abs(px - expected.crop).max() <= 1
    # confidences and alternatives for the panel
    info = avatar.prediction_info(coll)
    assert info["source"].endswith(photo.name) and info["model"] == str(models["stylized"])
    assert set(info["slots"]) == set(pack.slot_names)
    for slot, alts in expected.alternatives.items():
        entry = info["slots"][slot]
        assert entry["choice"] == expected.vector.slots[slot]
        assert entry["probability"] == pytest.approx(expected.probabilities[slot][entry["choice"]])
        assert [a["option"] for a in entry["alternatives"]] == [a.option for a in alts]
        assert len(alts) == 3
    assert info["slots"]["nose"]["probability"] > 0.9
    rows = list(avatar.iter_slot_confidences(coll))
    assert [r[0] for r in rows] == list(pack.slot_names)

    # with an avatar active, the photo goes to it (no new avatar), replacing the crop
    run(bpy.ops.likeness.reset)
    assert run(bpy.ops.likeness.create_from_photo, filepath=str(photo),
               model=str(models["stylized"])) == {"FINISHED"}
    assert avatar.avatars() == [coll] and avatar.read(coll).slots == expected.vector.slots
    assert len(bpy.data.images) == 1

    # a second avatar gets its own prediction
    run(bpy.ops.likeness.add_avatar)
    second = avatar.avatars()[1]
    assert avatar.prediction_info(second) is None and avatar.read(second) == pack.default_vector()


def test_create_from_photo_uses_the_preferences_model_and_device(clean, pack, models, monkeypatch,
                                                                  tmp_path):
    from likeness.addon import photo, prefs
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))          # no installed model
    monkeypatch.delenv("LIKENESS_MODELS_PATH", raising=False)
    p = prefs.get_prefs()
    assert p is not None and type(p).bl_idname == MODULE
    try:
        prefs.set_model("stylized", str(models["stylized"]))
        p.device = "CPU"
        assert prefs.model_for("stylized") == str(models["stylized"]) and prefs.device() == "cpu"
        photo.clear_cache()
        assert run(bpy.ops.likeness.create_from_photo, filepath=str(real_photo())) == {"FINISHED"}
        assert avatar.read(avatar.active_avatar()).slots["nose"] == "pointed"
        (pred,) = photo._PREDICTORS.values()
        assert pred.model.device == "cpu" and str(pred.model.info.path) == str(models["stylized"])
    finally:
        p.models.clear()
        p.device = "AUTO"


def test_prediction_in_a_background_thread_matches(pack, models):
    from likeness.addon.photo import PhotoJob
    photo = str(real_photo())
    sync_job = PhotoJob(pack, models["stylized"], "cpu", photo)
    sync_job.run()
    job = PhotoJob(pack, models["stylized"], "cpu", photo)
    job.start()
    assert job.thread is not threading.main_thread()
    assert job.wait(60) and job.error is None
    assert job.prediction.vector == sync_job.prediction.vector
    assert np.array_equal(job.prediction.crop, sync_job.prediction.crop)
    bad = PhotoJob(pack, models["stylized"], "cpu", "/nonexistent/photo.jpg")
    bad.start()
    assert bad.wait(60) and bad.prediction is None and "photo.jpg" in bad.error


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    from PIL import Image
    root = tmp_path_factory.mktemp("bad-photos")
    Image.new("RGB", (640, 480), (200, 190, 180)).save(root / "blank.jpg", quality=90)
    data = real_photo().read_bytes()
    (root / "corrupt.jpg").write_bytes(data[:200] + bytes(range(256)) * 8)
    (root / "notes.png").write_text("this is not an image\n" * 20)
    return root


@pytest.mark.parametrize("case, message", [
    ("no_face", "no face found"),
    ("corrupt", "corrupt.jpg"),
    ("not_an_image", "notes.png"),
    ("missing_model", "no estimator model for pack 'stylized'"),
    ("missing_model_file", "model file not found"),
    ("other_pack_model", "estimator for pack 'other', not for pack 'stylized'"),
    ("folder", "is a folder"),
])
def test_create_from_photo_errors_change_nothing(clean, pack, models, bad_inputs, case, message,
                                                 monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))          # no installed model
    monkeypatch.delenv("LIKENESS_MODELS_PATH", raising=False)
    photo, model = str(real_photo()), str(models["stylized"])
    if case == "no_face":
        photo = str(bad_inputs / "blank.jpg")
    elif case == "corrupt":
        photo = str(bad_inputs / "corrupt.jpg")
    elif case == "not_an_image":
        photo = str(bad_inputs / "notes.png")
    elif case == "missing_model":
        model = ""                                   # and no shipped model either
        import likeness.backend.models as models_mod
        monkeypatch.setattr(models_mod, "SHIPPED", tmp_path / "no-shipped-models")
    elif case == "missing_model_file":
        model = str(tmp_path / "gone.onnx")
    elif case == "other_pack_model":
        model = str(models["other"])
    elif case == "folder":
        photo = str(bad_inputs)
    for with_avatar in (False, True):
        if with_avatar:
            run(bpy.ops.likeness.add_avatar)
            avatar.randomize(avatar.active_avatar(), 4)
        before = scene_state()
        with pytest.raises(RuntimeError, match=message):
            run(bpy.ops.likeness.create_from_photo, filepath=photo, model=model)
        assert scene_state() == before


def test_create_from_photo_with_a_broken_pack_changes_nothing(clean, broken_pack, models):
    path = make_tiny_estimator(broken_pack, models["root"] / "broken.onnx", favourites={})
    before = scene_state()
    with pytest.raises(RuntimeError, match="Hair.Afro"):
        run(bpy.ops.likeness.create_from_photo, filepath=str(real_photo()), model=str(path),
            pack=str(broken_pack.root))
    assert scene_state() == before


# --------------------------------------------------------------------------------------------
# Undo
# --------------------------------------------------------------------------------------------

def _only_avatar():
    (coll,) = avatar.avatars()
    return coll


def test_undo_restores_the_previous_vector(clean, pack, models):
    run(bpy.ops.likeness.add_avatar)
    avatar.randomize(_only_avatar(), 21)
    init_undo()
    start = avatar.read(_only_avatar())

    assert run(bpy.ops.likeness.create_from_photo, filepath=str(real_photo()),
               model=str(models["stylized"])) == {"FINISHED"}
    after_photo = avatar.read(_only_avatar())
    assert after_photo != start and avatar.prediction_info(_only_avatar()) is not None
    bpy.ops.ed.undo()
    assert avatar.read(_only_avatar()) == start
    assert avatar.prediction_info(_only_avatar()) is None and avatar.crop_image(_only_avatar()) is None
    assert _only_avatar().likeness_stylized.s_hair == start.slots["hair"]
    bpy.ops.ed.redo()
    assert avatar.read(_only_avatar()) == after_photo

    run(bpy.ops.likeness.randomize, seed=99)
    randomized = avatar.read(_only_avatar())
    assert randomized != after_photo
    bpy.ops.ed.undo()
    assert avatar.read(_only_avatar()) == after_photo

    alt = avatar.prediction_info(_only_avatar())["slots"]["hair"]["alternatives"][1]["option"]
    run(bpy.ops.likeness.apply_alternative, slot="hair", option=alt)
    assert avatar.read(_only_avatar()).slots["hair"] == alt
    bpy.ops.ed.undo()
    assert avatar.read(_only_avatar()) == after_photo
    shown = find_pack("default").slot("hair").option(after_photo.slots["hair"]).show
    assert all(rig.Names(_only_avatar(), scoped=True).object(o).hide_render is False for o in shown)


def test_undo_of_a_photo_that_added_the_avatar_removes_it(clean, models):
    init_undo()
    before = scene_state()
    run(bpy.ops.likeness.create_from_photo, filepath=str(real_photo()), model=str(models["stylized"]))
    assert len(avatar.avatars()) == 1
    bpy.ops.ed.undo()
    assert scene_state() == before


# --------------------------------------------------------------------------------------------
# Panels
# --------------------------------------------------------------------------------------------

_ICONS = set(bpy.types.UILayout.bl_rna.functions["label"].parameters["icon"].enum_items.keys())


class _OpProps:
    def __init__(self, idname, rna, log):
        object.__setattr__(self, "_idname", idname)
        object.__setattr__(self, "_names", set(rna.properties.keys()))
        object.__setattr__(self, "values", {})
        log.append(("operator", idname, self))

    def __setattr__(self, name, value):
        assert name in self._names, f"{self._idname} has no property '{name}'"
        self.values[name] = value


class RecordingLayout:
    """Stands in for bpy.types.UILayout; checks what the panels reference against the RNA."""

    def __init__(self, log=None):
        self.log = [] if log is None else log
        self.enabled = self.active = True
        self.alert = False
        self.scale_x = self.scale_y = 1.0

    def _child(self, *args, **kw):
        return RecordingLayout(self.log)

    row = column = box = split = _child

    def panel(self, idname, default_closed=False):
        self.log.append(("panel", idname))
        return RecordingLayout(self.log), RecordingLayout(self.log)

    def _icon(self, icon):
        assert icon in _ICONS, f"unknown icon {icon}"

    def prop(self, data, prop, text=None, icon="NONE", **kw):
        assert prop in data.bl_rna.properties.keys(), f"{data} has no property '{prop}'"
        self._icon(icon)
        self.log.append(("prop", prop))

    def operator(self, idname, text=None, icon="NONE", **kw):
        mod, name = idname.split(".")
        rna = getattr(getattr(bpy.ops, mod), name).get_rna_type()
        self._icon(icon)
        return _OpProps(idname, rna, self.log)

    def label(self, text="", icon="NONE", **kw):
        self._icon(icon)
        self.log.append(("label", text))

    def separator(self, **kw):
        pass

    def template_icon(self, icon_value=0, scale=1.0):
        assert isinstance(icon_value, int)
        self.log.append(("icon", icon_value))


def _draw(panel_cls):
    """(poll result in the real 3D view, what draw() laid out)."""
    area = next((a for w in bpy.context.window_manager.windows for a in w.screen.areas
                 if a.type == "VIEW_3D"), None)
    if area is not None:
        region = next(r for r in area.regions if r.type == "UI")
        with bpy.context.temp_override(area=area, region=region):
            polled = panel_cls.poll(bpy.context) if hasattr(panel_cls, "poll") else True
    else:
        polled = panel_cls.poll(bpy.context) if hasattr(panel_cls, "poll") else True
    if not polled:
        return False, []
    layout = RecordingLayout()

    class Self:
        pass
    me = Self()
    me.layout = layout
    panel_cls.draw(me, bpy.context)
    return True, layout.log


def test_panels_poll_and_draw(clean, pack, models):
    from likeness.addon import panels
    ok, log = _draw(panels.LIKENESS_PT_main)
    assert ok and [e[1] for e in log if e[0] == "operator"] == [
        "likeness.add_avatar", "likeness.create_from_photo"]
    assert ("label", "No avatar yet: a photo adds one") in log
    for cls in (panels.LIKENESS_PT_photo, panels.LIKENESS_PT_shape, panels.LIKENESS_PT_options):
        assert _draw(cls) == (False, [])                 # nothing to edit yet
    run(bpy.ops.likeness.create_from_photo, filepath=str(real_photo()), model=str(models["stylized"]))
    run(bpy.ops.likeness.add_avatar)
    run(bpy.ops.likeness.select_avatar, avatar="Likeness")

    ok, log = _draw(panels.LIKENESS_PT_main)
    ops = [e[1] for e in log if e[0] == "operator"]
    for idname in ("likeness.add_avatar", "likeness.create_from_photo", "likeness.randomize",
                   "likeness.reset", "likeness.copy_vector", "likeness.paste_vector",
                   "likeness.import_vector", "likeness.export_vector"):
        assert idname in ops
    selects = [e[2].values["avatar"] for e in log if e[:2] == ("operator", "likeness.select_avatar")]
    assert selects == ["Likeness", "Likeness.001"]

    ok, log = _draw(panels.LIKENESS_PT_shape)
    props = [e[1] for e in log if e[0] == "prop"]
    assert ok and props == ["p_" + p.name for p in pack.parameters]
    groups = [e[1] for e in log if e[0] == "panel"]
    assert groups == [f"likeness_group_{g}" for g in dict.fromkeys(p.group for p in pack.parameters)]

    ok, log = _draw(panels.LIKENESS_PT_options)
    assert ok and [e[1] for e in log if e[0] == "prop"] == ["s_" + s.name for s in pack.slots]
    assert ("label", f"{avatar.prediction_info(avatar.active_avatar())['slots']['hair']['probability']:.0%}") in log

    ok, log = _draw(panels.LIKENESS_PT_photo)
    assert ok and any(e[0] == "icon" for e in log)       # the crop preview
    alts = [e[2].values for e in log if e[:2] == ("operator", "likeness.apply_alternative")]
    assert {a["slot"] for a in alts} == set(pack.slot_names)
    assert all(a["avatar"] == "Likeness" for a in alts)
    assert all(a["option"] != avatar.read(avatar.active_avatar()).slots[a["slot"]] for a in alts)
    # the other avatar has no photo: no photo panel
    run(bpy.ops.likeness.select_avatar, avatar="Likeness.001")
    assert _draw(panels.LIKENESS_PT_photo) == (False, [])


def test_blend_pack_avatar_saved_and_reopened(clean, pack, tmp_path):
    """A pack that ships its own .blend (not on the pack search path): its slider group is made
    when the avatar is added, saved with the file, and registered again when the file is opened
    after a restart of the add-on (load_post handler)."""
    import shutil
    from likeness.addon import props
    folder = tmp_path / "tdpack"
    folder.mkdir()
    shutil.copyfile(avatar.pack_blend(pack), folder / "avatar.blend")
    text = (pack.root / "pack.toml").read_text()
    (folder / "pack.toml").write_text(text.replace('id = "stylized"', 'id = "tdpack"', 1).replace(
        'builder = "stylized"', 'blend = "avatar.blend"', 1))
    assert run(bpy.ops.likeness.add_avatar, pack=str(folder)) == {"FINISHED"}
    coll = avatar.active_avatar()
    assert coll["likeness_pack"] == "tdpack" and "tdpack" in props.registered_packs()
    coll.likeness_tdpack.p_jaw_width = -0.5
    coll.likeness_tdpack.s_glasses = "aviators"
    saved = avatar.read(coll)
    assert saved.params["jaw_width"] == pytest.approx(-0.5) and saved.slots["glasses"] == "aviators"
    path = tmp_path / "scene.blend"
    bpy.ops.wm.save_as_mainfile(filepath=str(path))

    addon_utils.disable(MODULE, default_set=True)
    assert not hasattr(bpy.types.Collection, "likeness_tdpack")
    ensure_enabled()
    assert "tdpack" not in props.registered_packs()
    bpy.ops.wm.open_mainfile(filepath=str(path))
    assert "tdpack" in props.registered_packs()
    coll = avatar.active_avatar()
    assert coll.likeness_tdpack.p_jaw_width == pytest.approx(-0.5)
    assert coll.likeness_tdpack.s_glasses == "aviators" and avatar.read(coll) == saved
    coll.likeness_tdpack.s_glasses = "none"
    assert rig.Names(coll, scoped=True).object("Glasses.Aviators").hide_render
