"""The default pack's rig in real Blender: build, apply, read back, check (no mocks)."""
from __future__ import annotations

import math
import time

import pytest

bpy = pytest.importorskip("bpy")

from likeness.backend.schema import TAG_VOCABULARY, find_pack  # noqa: E402
from likeness.render_engine import rig  # noqa: E402
from likeness.render_engine.builders import build  # noqa: E402


TIMES: dict[str, float] = {}


@pytest.fixture(scope="module")
def pack():
    p = find_pack("default")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    t0 = time.perf_counter()
    build(p)
    TIMES["build"] = time.perf_counter() - t0
    return p


def _state(pack):
    """Everything apply_vector may touch, as plain data."""
    coll = bpy.data.collections[pack.collection]
    out = {}
    for ob in coll.all_objects:
        out[ob.name] = (ob.hide_render, ob.hide_viewport, tuple(ob.location), tuple(ob.scale),
                        tuple(ob.rotation_euler))
        keys = getattr(ob.data, "shape_keys", None) if ob.type == "MESH" else None
        if keys is not None:
            for kb in keys.key_blocks:
                out[f"{ob.name}:{kb.name}"] = kb.value
    for m in bpy.data.materials:
        out["mat:" + m.name] = tuple(m.diffuse_color)
    return out


def test_manifest_counts_and_tags(pack):
    assert pack.id == "stylized" and pack.builder == "stylized" and pack.collection == "Likeness"
    assert pack.n_continuous >= 24
    assert len(pack.slots) >= 8
    assert pack.n_options >= 60
    assert len(pack.slot("hair").options) >= 10
    groups = {p.group for p in pack.parameters}
    assert {"face", "eyes", "brows", "nose", "mouth", "ears", "neck", "colour"} <= groups
    for tag, values in (("hair_length", {"bald", "buzz", "short", "medium", "long"}),
                        ("glasses", {"none", "eyeglasses", "sunglasses"}),
                        ("headwear", {"none", "hat"}), ("bangs", {"none", "bangs"}),
                        ("earrings", {"none", "earrings"})):
        seen = {o.tags[tag] for s in pack.slots for o in s.options if tag in o.tags}
        assert values <= seen, (tag, seen)
        assert seen <= set(TAG_VOCABULARY[tag])
    facial = {o.tags["facial_hair"] for o in pack.slot("facial_hair").options}
    assert {"none", "stubble", "mustache", "goatee", "beard"} <= facial


def test_every_option_appears_in_random_samples(pack):
    seen = {s.name: set() for s in pack.slots}
    for i in range(3000):
        v = pack.sample_seeded(123, i)
        for s, o in v.slots.items():
            seen[s].add(o)
    for s in pack.slots:
        assert seen[s.name] == set(s.option_ids), s.name
    # "none" is the most common choice of the accessory slots
    for name in ("glasses", "headwear", "facial_hair", "earrings"):
        s = pack.slot(name)
        none = s.option("none").weight
        assert all(none > o.weight for o in s.options if o.id != "none")


def test_build_result(pack):
    scene = bpy.context.scene
    coll = bpy.data.collections.get("Likeness")
    assert coll is not None and coll.name in scene.collection.children
    meshes = [o for o in coll.all_objects if o.type == "MESH"]
    assert len(meshes) > 40
    assert not any(o.type in ("CAMERA", "LIGHT") for o in bpy.data.objects)
    assert rig.check_scene(pack) == []
    assert TIMES["build"] < 10.0
    # subject's left eye/ear/brow are at world +X (image right, CelebAMask l_*)
    bpy.context.view_layer.update()
    for side, sign in (("L", 1), ("R", -1)):
        for part in ("Eye", "Brow", "Ear"):
            assert sign * bpy.data.objects[f"{part}.{side}"].matrix_world.translation.x > 0.2
    # every visible material has a segmentation class
    for ob in meshes:
        for slot in ob.material_slots:
            assert pack.class_of_material(slot.material.name) is not None, slot.material.name


def test_apply_is_idempotent_and_read_back_exact(pack):
    for i in range(6):
        v = pack.sample_seeded(5, i)
        rig.apply_vector(v)
        first = _state(pack)
        rig.apply_vector(v)
        assert _state(pack) == first
        back = rig.read_vector(pack)
        assert back == v
        assert back.to_json() == v.to_json()


def test_apply_is_order_independent(pack):
    a, b = pack.sample_seeded(9, 0), pack.sample_seeded(9, 1)
    rig.apply_vector(a)
    ref = _state(pack)
    rig.apply_vector(b)
    rig.apply_vector(a)
    assert _state(pack) == ref


def test_apply_visibility_and_option_keys(pack):
    v = pack.default_vector()
    v.slots.update(glasses="round", headwear="cap", eyes="almond", hair="long")
    rig.apply_vector(v)
    obs = bpy.data.objects
    assert not obs["Glasses.Round"].hide_render and not obs["Glasses.Round"].hide_viewport
    assert obs["Glasses.Sunglasses"].hide_render and obs["Glasses.Sunglasses"].hide_viewport
    assert not obs["Hair.Long"].hide_render and obs["Hair.Crop"].hide_render
    keys = obs["Eye.L"].data.shape_keys.key_blocks
    assert keys["eye_almond"].value == 1.0 and keys["eye_narrow"].value == 0.0
    assert obs["Head"].data.shape_keys.key_blocks["hat_cap"].value == 1.0
    v.slots.update(eyes="narrow", headwear="none")
    rig.apply_vector(v)
    assert keys["eye_almond"].value == 0.0 and keys["eye_narrow"].value == 1.0
    assert obs["Head"].data.shape_keys.key_blocks["hat_cap"].value == 0.0


def test_apply_drives_shape_keys_properties_colours(pack):
    v = pack.default_vector()
    v.params.update(face_width=0.6, eye_spacing=-1.0, skin_tone=0.0)
    rig.apply_vector(v)
    head_keys = bpy.data.objects["Head"].data.shape_keys.key_blocks
    assert head_keys["face_width"].value == pytest.approx(0.6)
    assert bpy.data.objects["Eye.L"].location.x == pytest.approx(0.37 - 0.045, abs=1e-6)
    assert bpy.data.objects["Eye.R"].location.x == pytest.approx(-0.37 + 0.045, abs=1e-6)
    light = tuple(bpy.data.materials["Skin"].diffuse_color[:3])
    assert light == pytest.approx(rig.hex_to_linear("#f7dac6"), abs=1e-6)
    node = rig._principled(bpy.data.materials["Skin"])
    assert tuple(node.inputs["Base Color"].default_value[:3]) == pytest.approx(light, abs=1e-6)
    v.params["skin_tone"] = 1.0
    rig.apply_vector(v)
    deep = tuple(bpy.data.materials["Skin"].diffuse_color[:3])
    assert sum(deep) < sum(light) / 4
    # accessories follow the head's face keys through drivers
    fc = bpy.data.objects["Hair.Crop"].data.shape_keys.animation_data.drivers
    assert any('face_width' in d.data_path for d in fc)


def test_read_vector_sees_hand_edits(pack):
    v = pack.sample_seeded(11, 3)
    v.slots.update(glasses="none", eyes="round")
    rig.apply_vector(v)
    bpy.data.objects["Head"].data.shape_keys.key_blocks["face_width"].value = 0.5
    bpy.data.objects["Eye.L"].location.x = 0.37 + 0.045 * 0.8
    bpy.data.objects["Glasses.Round"].hide_render = False
    bpy.data.objects["Eye.L"].data.shape_keys.key_blocks["eye_hooded"].value = 1.0
    bpy.data.objects["Eye.R"].data.shape_keys.key_blocks["eye_hooded"].value = 1.0
    back = rig.read_vector(pack)
    assert back.params["face_width"] == pytest.approx(0.5, abs=1e-5)
    assert back.params["eye_spacing"] == pytest.approx(0.8, abs=1e-4)
    assert back.slots["glasses"] == "round"
    assert back.slots["eyes"] == "hooded"
    # colours come from the stored vector; untouched values stay exact
    assert back.params["skin_tone"] == v.params["skin_tone"]
    assert back.params["nose_length"] == v.params["nose_length"]
    rig.apply_vector(v)
    assert rig.read_vector(pack) == v


def test_signed_parameter_on_a_pair_of_unsigned_keys(pack):
    """nose_length drives nose_longer (+) and nose_shorter (-), both limited to 0..1."""
    keys = bpy.data.objects["Nose"].data.shape_keys.key_blocks
    v = pack.default_vector()
    v.params["nose_length"] = -0.6
    rig.apply_vector(v)
    assert keys["nose_longer"].value == 0.0
    assert keys["nose_shorter"].value == pytest.approx(0.6)
    assert rig.read_vector(pack).params["nose_length"] == -0.6
    keys["nose_shorter"].value = 0.25          # a hand edit of the negative side
    assert rig.read_vector(pack).params["nose_length"] == pytest.approx(-0.25)
    keys["nose_shorter"].value = 0.0
    keys["nose_longer"].value = 0.4
    assert rig.read_vector(pack).params["nose_length"] == pytest.approx(0.4)


def test_colour_ramp_and_tint_in_linear_space(pack):
    mid = rig.ramp_color(["#000000", "#ffffff"], 0.5)
    assert mid == pytest.approx((0.5, 0.5, 0.5))
    assert rig.ramp_color(["#000000", "#ff0000", "#00ff00"], 0.75) == pytest.approx((0.5, 0.5, 0.0))
    v = pack.default_vector()
    v.params.update(hair_color=0.0, hair_red=0.0, hair_grey=0.0)
    rig.apply_vector(v)
    black = tuple(bpy.data.materials["Hair"].diffuse_color[:3])
    v.params["hair_grey"] = 1.0
    rig.apply_vector(v)
    grey = tuple(bpy.data.materials["Hair"].diffuse_color[:3])
    assert grey == pytest.approx(rig.hex_to_linear("#dcdcd8"), abs=1e-6)
    v.params.update(hair_grey=0.0, hair_red=1.0)
    rig.apply_vector(v)
    red = bpy.data.materials["Hair"].diffuse_color
    assert red[0] > 2 * red[2] and red[0] > black[0]
    assert red[3] == 1.0


def test_apply_speed(pack):
    vectors = [pack.sample_seeded(3, i) for i in range(30)]
    rig.apply_vector(vectors[0])
    t0 = time.perf_counter()
    for v in vectors:
        rig.apply_vector(v)
    per = (time.perf_counter() - t0) / len(vectors)
    assert per < 0.02, f"apply_vector took {per * 1000:.1f} ms"


def test_check_scene_reports_problems(pack):
    ob = bpy.data.objects["Glasses.Round"]
    ob.name = "Glasses.Renamed"
    try:
        problems = rig.check_scene(pack)
        assert any("Glasses.Round" in p and "missing" in p for p in problems)
    finally:
        ob.name = "Glasses.Round"
    kb = bpy.data.objects["Nose"].data.shape_keys.key_blocks["nose_tip_bigger"]
    kb.name = "nose_tip_renamed"
    try:
        assert any("nose_tip_bigger" in p for p in rig.check_scene(pack))
    finally:
        kb.name = "nose_tip_bigger"
    me = bpy.data.meshes.new("Stray")
    me.from_pydata([(0, 0, 0), (1, 0, 0), (0, 0, 1)], [], [(0, 1, 2)])
    me.materials.append(bpy.data.materials.new("Unclassified"))
    stray = bpy.data.objects.new("Stray", me)
    bpy.data.collections[pack.collection].objects.link(stray)
    try:
        assert any("Unclassified" in p for p in rig.check_scene(pack))
    finally:
        bpy.data.objects.remove(stray)
    assert rig.check_scene(pack) == []


def test_read_vector_without_stored_vector(pack):
    coll = bpy.data.collections[pack.collection]
    v = pack.sample_seeded(21, 0)
    rig.apply_vector(v)
    del coll[rig.VECTOR_PROP]
    back = rig.read_vector(pack)
    # discrete choices and key/property-driven values come from the rig itself
    assert back.slots == v.slots
    for p in pack.parameters:
        if p.drives[0].kind in ("shape_key", "property"):
            assert back.params[p.name] == pytest.approx(v.params[p.name], abs=1e-4), p.name
    rig.apply_vector(v)
    assert math.isfinite(rig.read_vector(pack).params["face_width"])
