"""The default pack's rig, in real bpy: a skeleton every mesh is weighted to (weights summing to 1),
bones that move what they should, ARKit-named expression keys that move the right region, all of
it still right after slider changes and option swaps, and carried by glTF and FBX exports.

Positions are evaluated (depsgraph) world positions of an avatar placed with its root where the
builder has it, so world coordinates are the builder's: X the character's left, -Y toward the
camera, Z up, the eye line at z = 0, the mouth at z = -0.9."""
from __future__ import annotations

import math

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from mathutils import Quaternion  # noqa: E402

from likeness.backend.errors import UserError  # noqa: E402
from likeness.render_engine import avatar, export, rig  # noqa: E402
from likeness.render_engine.builders import stylized, stylized_rig  # noqa: E402
from test_addon import fresh_file  # noqa: E402
from test_export import read_glb  # noqa: E402

BONES = {"root": None, "neck": "root", "head": "neck", "jaw": "head", "eye.L": "head",
         "eye.R": "head"}
REQUIRED = ("eyeBlinkLeft", "eyeBlinkRight", "jawOpen", "mouthClose", "mouthSmileLeft",
            "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight", "mouthPucker", "mouthFunnel",
            "browInnerUp", "browDownLeft", "browDownRight", "cheekPuff")
DRESSED = {"hair": "side_part", "headwear": "cap", "glasses": "round", "earrings": "hoops",
           "facial_hair": "goatee", "top": "crew"}


def new_avatar(slots=None, params=None):
    fresh_file()
    coll = avatar.add_avatar("default", location=stylized.ROOT)
    if slots or params:
        avatar.set_values(coll, params=params, slots=slots)
    return coll


def obj(coll, name):
    return rig.Names(coll, scoped=True).object(name)


def world(ob) -> np.ndarray:
    """Evaluated vertex positions in world space."""
    dg = bpy.context.evaluated_depsgraph_get()
    ev = ob.evaluated_get(dg)
    me = ev.to_mesh()
    co = np.empty(len(me.vertices) * 3)
    me.vertices.foreach_get("co", co)
    ev.to_mesh_clear()
    m = np.array(ev.matrix_world)
    return co.reshape(-1, 3) @ m[:3, :3].T + m[:3, 3]


def pose(coll, bone: str | None = None, axis=(1.0, 0.0, 0.0), degrees: float = 0.0) -> None:
    skel = avatar.skeleton(coll)
    for pb in skel.pose.bones:
        pb.rotation_mode = "QUATERNION"
        pb.rotation_quaternion = (1.0, 0.0, 0.0, 0.0)
    if bone:
        skel.pose.bones[bone].rotation_quaternion = Quaternion(axis, math.radians(degrees))
    bpy.context.view_layer.update()


def moved(coll, names, change) -> dict[str, np.ndarray]:
    """Per object: how far each vertex moves when ``change()`` runs (then undone by the caller)."""
    before = {n: world(obj(coll, n)) for n in names}
    change()
    return {n: np.linalg.norm(world(obj(coll, n)) - before[n], axis=1) for n in names}


def expression(coll, names, key, value=1.0) -> dict[str, np.ndarray]:
    """Per object: evaluated displacement vectors when the expression control is set."""
    before = {n: world(obj(coll, n)) for n in names}
    avatar.set_expressions(coll, {key: value})
    after = {n: world(obj(coll, n)) for n in names}
    avatar.set_expressions(coll, {key: 0.0})
    return {n: after[n] - before[n] for n in names}


def lid_gap(eye: np.ndarray) -> float:
    """The eye's largest opening: the height between its upper and lower outline (the disc's
    outline ring) at the same x."""
    outline = eye[1 + 9 * 64:1 + 10 * 64]
    upper = np.sin(np.linspace(0, 2 * math.pi, 64, endpoint=False)) > 0
    up, low = outline[upper], outline[~upper]
    up, low = up[np.argsort(up[:, 0])], low[np.argsort(low[:, 0])]
    x = np.linspace(max(up[0, 0], low[0, 0]), min(up[-1, 0], low[-1, 0]), 50)
    return float((np.interp(x, up[:, 0], up[:, 2]) - np.interp(x, low[:, 0], low[:, 2])).max())


def weight_sums(ob) -> tuple[np.ndarray, dict[str, int]]:
    """Per vertex the sum of its weights; per bone group how many vertices it holds."""
    names = {g.index: g.name for g in ob.vertex_groups}
    sums = np.zeros(len(ob.data.vertices))
    counts: dict[str, int] = {}
    for v in ob.data.vertices:
        for g in v.groups:
            sums[v.index] += g.weight
            counts[names[g.group]] = counts.get(names[g.group], 0) + 1
    return sums, counts


def test_skeleton_hierarchy_and_clean_weights_on_every_mesh():
    coll = new_avatar()
    skel = avatar.skeleton(coll)
    assert rig.original_name(skel) == "Skeleton" and skel.parent == avatar.root_object(coll)
    bones = {b.name: (b.parent.name if b.parent else None) for b in skel.data.bones}
    assert bones == BONES
    assert all(b.use_deform for b in skel.data.bones)
    for ob in coll.all_objects:                       # hidden options included
        if ob.type != "MESH":
            continue
        name = rig.original_name(ob)
        mods = [m for m in ob.modifiers if m.type == "ARMATURE"]
        assert len(mods) == 1 and mods[0].object == skel and mods[0].use_vertex_groups, name
        sums, counts = weight_sums(ob)
        assert np.allclose(sums, 1.0, atol=2e-3), name
        assert set(counts) <= set(BONES), name
        if name.startswith(("Hair.", "Bangs.", "Hat.", "Glasses.", "Earring.", "Ear.", "Brow.")) \
                or name == "Nose":
            assert set(counts) == {"head"}, name        # rigid on the head
        if name in ("Eye.L", "Eye.R"):
            assert set(counts) == {"eye." + name[-1]}, name
        if name == "Head":
            assert set(counts) == {"head", "jaw"}
        if name == "Neck" or name.startswith("Top."):
            assert "root" in counts and "neck" in counts, name
    # at rest the skeleton changes nothing: the evaluated head is its shape keys' mix
    head = obj(coll, "Head")
    _, shaped = stylized_rig.identity_shape(head, stylized_rig.identity_values(head))
    assert np.allclose(world(head), shaped, atol=1e-5)


def test_bones_move_what_follows_them():
    coll = new_avatar(slots=DRESSED)
    parts = ["Hair.SidePart", "Hat.Cap", "Glasses.Round", "Earring.Hoops.L", "Head", "Neck",
             "Top.Crew", "Eye.L", "Eye.R", "FacialHair.Goatee"]
    rest = {n: world(obj(coll, n)) for n in parts}
    d = moved(coll, parts, lambda: pose(coll, "head", (0, 0, 1), 20))
    for n in ("Hair.SidePart", "Hat.Cap", "Glasses.Round", "Earring.Hoops.L", "Eye.L"):
        assert d[n].min() > 0.02, n                    # every vertex follows the head
    assert np.median(d["Head"]) > 0.2
    low = rest["Top.Crew"][:, 2] < -2.2
    assert d["Top.Crew"][low].max() < 1e-5             # the torso stays
    neck_low, neck_top = rest["Neck"][:, 2] < -2.2, rest["Neck"][:, 2] > -0.9
    assert d["Neck"][neck_low].max() < 1e-5 and d["Neck"][neck_top].min() > 0.02

    pose(coll)
    d = moved(coll, parts, lambda: pose(coll, "jaw", (1, 0, 0), 15))
    head = rest["Head"]
    chin = (head[:, 2] < -1.3) & (head[:, 1] < -0.3)
    forehead = (head[:, 2] > 0.4) & (head[:, 1] < -0.3)
    assert d["Head"][chin].min() > 0.1 and d["Head"][forehead].max() < 1e-5
    assert d["FacialHair.Goatee"].max() > 0.1 and d["Hat.Cap"].max() < 1e-5
    chin_after = world(obj(coll, "Head"))[chin]
    assert (chin_after[:, 2] < head[chin][:, 2]).all()      # +X opens the jaw: the chin drops

    pose(coll)
    d = moved(coll, parts, lambda: pose(coll, "eye.L", (0, 0, 1), 10))
    assert d["Eye.L"].min() > 0.005 and d["Eye.R"].max() < 1e-5 and d["Head"].max() < 1e-5
    pose(coll)


def test_arkit_keys_move_the_right_region():
    coll = new_avatar(params={"mouth_open": 0.0, "smile": 0.0})
    controls = avatar.expressions(coll)
    assert set(REQUIRED) <= set(controls) <= export.EXPRESSION_KEYS
    assert all(v == 0.0 for v in controls.values())
    names = ["Head", "Eye.L", "Eye.R", "Brow.L", "Brow.R", "Lip.Upper", "Lip.Lower", "Mouth", "Nose"]
    rest = {n: world(obj(coll, n)) for n in names}
    keys = {n: {k.name for k in obj(coll, n).data.shape_keys.key_blocks} for n in names}
    assert {"eyeBlinkLeft"} <= keys["Eye.L"] and "eyeBlinkLeft" not in keys["Eye.R"]
    assert {"jawOpen", "mouthClose", "mouthSmileLeft", "mouthPucker"} <= keys["Lip.Lower"]
    assert {"jawOpen", "cheekPuff", "mouthSmileLeft"} <= keys["Head"]
    assert {"browInnerUp", "browDownLeft"} <= keys["Brow.L"] and "browDownLeft" not in keys["Brow.R"]

    def size(d):
        return {n: np.linalg.norm(v, axis=1) for n, v in d.items()}

    # a blink closes the character's left eye (+X), only that one: its top comes down
    d = expression(coll, names, "eyeBlinkLeft")
    s = size(d)
    assert s["Eye.R"].max() < 1e-6 and s["Head"].max() < 1e-6 and s["Eye.L"].max() > 0.1
    eye = rest["Eye.L"]
    top = eye[:, 2] > eye[:, 2].max() - 0.03
    assert (d["Eye.L"][top, 2] < -0.1).all()
    assert lid_gap(eye + d["Eye.L"]) < 0.005                  # pupil to outline: one line
    d = expression(coll, names, "eyeBlinkRight")
    assert size(d)["Eye.L"].max() < 1e-6 and size(d)["Eye.R"].max() > 0.1

    # jawOpen lowers the chin and the lower lip, leaves forehead, eyes and upper lip
    d = expression(coll, names, "jawOpen")
    head = rest["Head"]
    chin = (head[:, 2] < -1.3) & (head[:, 1] < -0.3)
    forehead = head[:, 2] > 0.3
    assert (d["Head"][chin, 2] < -0.04).all() and d["Head"][chin, 2].mean() < -0.08
    assert np.abs(d["Head"][forehead]).max() < 1e-4
    assert d["Lip.Lower"][:, 2].mean() < -0.2 and np.abs(d["Lip.Upper"][:, 2]).mean() < 0.1
    assert size(d)["Eye.L"].max() < 1e-6

    # mouthClose shuts the lips the jaw opened
    avatar.set_expressions(coll, {"jawOpen": 1.0})
    opened = world(obj(coll, "Lip.Lower"))
    avatar.set_expressions(coll, {"mouthClose": 1.0})
    shut = world(obj(coll, "Lip.Lower"))
    avatar.set_expressions(coll, {"jawOpen": 0.0, "mouthClose": 0.0})
    assert (shut[:, 2] - opened[:, 2]).mean() > 0.2
    assert np.abs(shut - rest["Lip.Lower"]).max() < 1e-3     # back where the closed lip was

    # a smile lifts its own corner (character's left = +X), a frown lowers it
    lip = rest["Lip.Upper"]
    left, right = lip[:, 0] > 0.2, lip[:, 0] < -0.2
    for key, sign, side, other in (("mouthSmileLeft", 1, left, right),
                                   ("mouthSmileRight", 1, right, left),
                                   ("mouthFrownLeft", -1, left, right),
                                   ("mouthFrownRight", -1, right, left)):
        d = expression(coll, names, key)
        assert (sign * d["Lip.Upper"][side, 2]).mean() > 0.04, key
        assert np.abs(d["Lip.Upper"][other, 2]).mean() < 0.01, key
        assert np.abs(d["Head"][forehead]).max() < 1e-4, key

    # pucker narrows the lips and pushes them forward; funnel narrows them and parts them
    width = np.ptp(lip[:, 0])
    d = expression(coll, names, "mouthPucker")
    assert np.ptp((lip + d["Lip.Upper"])[:, 0]) < 0.85 * width
    assert d["Lip.Upper"][:, 1].mean() < -0.03 and d["Lip.Lower"][:, 1].mean() < -0.03
    d = expression(coll, names, "mouthFunnel")
    assert np.ptp((lip + d["Lip.Upper"])[:, 0]) < 0.9 * width
    assert d["Lip.Upper"][:, 2].mean() > 0.02 and d["Lip.Lower"][:, 2].mean() < -0.02

    # brows: inner ends up on both, each brow down only on its side
    d = expression(coll, names, "browInnerUp")
    for n, side in (("Brow.L", 1), ("Brow.R", -1)):
        b = rest[n]
        inner = side * b[:, 0] < np.percentile(side * b[:, 0], 20)
        outer = side * b[:, 0] > np.percentile(side * b[:, 0], 80)
        assert d[n][inner, 2].mean() > 0.05 and d[n][inner, 2].mean() > 3 * d[n][outer, 2].mean()
    d = expression(coll, names, "browDownLeft")
    assert d["Brow.L"][:, 2].max() < -0.02 and size(d)["Brow.R"].max() < 1e-6
    d = expression(coll, names, "browDownRight")
    assert d["Brow.R"][:, 2].max() < -0.02 and size(d)["Brow.L"].max() < 1e-6

    # cheekPuff: the cheeks come out (sideways and toward the camera), not the forehead
    d = expression(coll, names, "cheekPuff")
    cheek = (np.abs(head[:, 0] - 0.52) < 0.1) & (np.abs(head[:, 2] + 0.68) < 0.1) & (head[:, 1] < 0)
    assert (d["Head"][cheek, 0] > 0.02).all() and (d["Head"][cheek, 1] < -0.02).all()
    assert np.abs(d["Head"][forehead]).max() < 1e-4


def test_rig_survives_slider_changes_and_option_swaps():
    coll = new_avatar(slots=DRESSED)
    avatar.set_values(coll, params={"face_width": 0.8, "chin_length": -0.7, "mouth_height": 1.0,
                                    "mouth_width": 0.9, "eye_size": 0.8},
                      slots={"hair": "long", "glasses": "aviators", "headwear": "beanie",
                             "eyes": "narrow", "facial_hair": "full_beard"})
    shown = {rig.original_name(o) for o in coll.all_objects if o.type == "MESH" and not o.hide_render}
    assert {"Hair.Long", "Glasses.Aviators", "Hat.Beanie", "FacialHair.FullBeard"} <= shown
    assert not {"Hair.SidePart", "Glasses.Round", "Hat.Cap"} & shown
    # the new options follow the head
    parts = ["Hair.Long", "Glasses.Aviators", "Hat.Beanie", "FacialHair.FullBeard", "Eye.L"]
    d = moved(coll, parts, lambda: pose(coll, "head", (1, 0, 0), 15))
    assert all(np.median(d[n]) > 0.1 for n in parts), d
    pose(coll)
    # the keys follow the new identity: the narrow eye closes to one line too (a key made for the
    # round eye would turn the narrow one inside out), the jaw opens the moved mouth
    eye = world(obj(coll, "Eye.L"))
    d = expression(coll, ["Eye.L"], "eyeBlinkLeft")["Eye.L"]
    assert lid_gap(eye) > 0.15 and lid_gap(eye + d) < 0.005
    lower = world(obj(coll, "Lip.Lower"))
    d = expression(coll, ["Lip.Lower", "Head"], "jawOpen")
    assert d["Lip.Lower"][:, 2].mean() < -0.2
    avatar.set_expressions(coll, {"jawOpen": 1.0, "mouthClose": 1.0})
    assert np.abs(world(obj(coll, "Lip.Lower")) - lower).max() < 1e-3
    avatar.set_expressions(coll, {"jawOpen": 0.0, "mouthClose": 0.0})
    # an expression survives the next apply; the keys stay (values too), the weights stay
    avatar.set_expressions(coll, {"eyeBlinkRight": 0.5})
    avatar.set_values(coll, params={"face_width": -0.5}, slots={"eyes": "round"})
    assert avatar.expressions(coll)["eyeBlinkRight"] == 0.5
    bpy.context.view_layer.update()
    assert obj(coll, "Eye.R").data.shape_keys.key_blocks["eyeBlinkRight"].value == pytest.approx(0.5)
    sums, counts = weight_sums(obj(coll, "Head"))
    assert np.allclose(sums, 1.0, atol=2e-3) and set(counts) == {"head", "jaw"}


def test_expression_controls_refuse_unknown_names():
    coll = new_avatar()
    with pytest.raises(UserError, match="no expression tongueOut"):
        avatar.set_expressions(coll, {"tongueOut": 1.0})
    assert avatar.set_expressions(coll, {"jawOpen": 3.0})["jawOpen"] == 1.0


def test_glb_carries_the_skeleton_weights_and_expressions(tmp_path):
    coll = new_avatar(slots=DRESSED)
    info = export.export_avatar(coll, tmp_path / "a.glb")
    assert sorted(info["bones"]) == sorted(BONES)
    gltf = read_glb(tmp_path / "a.glb")
    assert len(gltf["skins"]) == 1
    joints = {gltf["nodes"][j]["name"] for j in gltf["skins"][0]["joints"]}
    assert joints == set(BONES)
    targets = {n["name"]: set((gltf["meshes"][n["mesh"]].get("extras") or {}).get("targetNames", []))
               for n in gltf["nodes"] if "mesh" in n}
    assert set(REQUIRED) - {"eyeBlinkLeft", "eyeBlinkRight", "browInnerUp", "browDownLeft",
                            "browDownRight"} <= targets["Head"] | targets["Lip.Lower"]
    assert "eyeBlinkLeft" in targets["Eye.L"] and "browInnerUp" in targets["Brow.R"]
    skinned = [n for n in gltf["nodes"] if "mesh" in n]
    assert skinned and all("skin" in n for n in skinned)

    # a fresh scene imports it: the bones, their hierarchy, the morph targets, working weights
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=str(tmp_path / "a.glb"), disable_bone_shape=True)
    arms = [o for o in bpy.data.objects if o.type == "ARMATURE"]
    assert len(arms) == 1
    bones = {b.name: (b.parent.name if b.parent else None) for b in arms[0].data.bones}
    assert bones == BONES
    head = bpy.data.objects["Head"]
    assert set(REQUIRED) - {"eyeBlinkLeft", "eyeBlinkRight", "browInnerUp", "browDownLeft",
                            "browDownRight"} <= {k.name for k in head.data.shape_keys.key_blocks}
    assert "eyeBlinkLeft" in bpy.data.objects["Eye.L"].data.shape_keys.key_blocks
    hair = bpy.data.objects["Hair.SidePart"]
    before = world(hair)
    arms[0].pose.bones["head"].rotation_quaternion = Quaternion((0, 0, 1), math.radians(20))
    bpy.context.view_layer.update()
    assert np.linalg.norm(world(hair) - before, axis=1).min() > 0.002      # metres now


def test_fbx_carries_the_skeleton_weights_and_expressions(tmp_path):
    coll = new_avatar(slots=DRESSED)
    export.export_avatar(coll, tmp_path / "a.fbx")
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.import_scene.fbx(filepath=str(tmp_path / "a.fbx"))
    arms = [o for o in bpy.data.objects if o.type == "ARMATURE"]
    assert len(arms) == 1 and set(BONES) <= {b.name for b in arms[0].data.bones}
    keys = {k.name for k in bpy.data.objects["Head"].data.shape_keys.key_blocks}
    assert {"jawOpen", "mouthSmileLeft", "cheekPuff"} <= keys
    assert {g.name for g in bpy.data.objects["Head"].vertex_groups} >= {"head", "jaw"}
