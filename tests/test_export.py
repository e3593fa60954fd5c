"""Export an avatar for game engines, in real bpy: the glTF holds only the chosen options (node
names, meshes, materials, morph-target names read from the file itself), imports back into
Blender with the same objects, shape keys and materials, baking applies the sliders, FBX imports
back, the file is left as it was, and the operator and ``likeness export`` write the same."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from likeness.render_engine import avatar, export, rig  # noqa: E402
from test_addon import fresh_file  # noqa: E402

CHOICE = {"glasses": "round", "headwear": "cap", "hair": "side_part", "earrings": "hoops",
          "facial_hair": "none", "top": "hoodie"}


def read_glb(path) -> dict:
    """The JSON chunk of a .glb file."""
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data, 0)
    assert magic == b"glTF" and version == 2 and length == len(data)
    chunk_len, chunk_type = struct.unpack_from("<I4s", data, 12)
    assert chunk_type == b"JSON"
    return json.loads(data[20:20 + chunk_len])


def file_state():
    return {
        "objects": sorted(o.name for o in bpy.data.objects),
        "meshes": sorted(m.name for m in bpy.data.meshes),
        "materials": sorted(m.name for m in bpy.data.materials),
        "collections": sorted(c.name for c in bpy.data.collections),
        "keys": len(bpy.data.shape_keys),
        "selected": sorted(o.name for o in bpy.context.view_layer.objects if o.select_get()),
        "active": getattr(bpy.context.view_layer.objects.active, "name", None),
    }


def two_avatars():
    fresh_file()
    a = avatar.add_avatar("default")
    b = avatar.add_avatar("default", location=(3.0, 0.0, 0.0))
    avatar.set_values(b, params={"face_width": 0.9, "jaw_width": -0.6}, slots=CHOICE)
    return a, b


def imported_mesh_bounds(name):
    ob = bpy.data.objects[name]
    co = np.array([ob.matrix_world @ v.co for v in ob.data.vertices])
    return np.stack([co.min(0), co.max(0)])


def test_glb_holds_only_the_chosen_options_and_imports_back(tmp_path):
    a, b = two_avatars()
    shown = [o for o in b.all_objects if o.type == "MESH" and not o.hide_render]
    shown_names = sorted(rig.original_name(o) for o in shown)
    assert "Hat.Cap" in shown_names and "Hat.Beanie" not in shown_names
    before = file_state()
    info = export.export_avatar(b, tmp_path / "b.glb")
    assert file_state() == before                       # nothing added, renamed or deselected
    path = tmp_path / "b.glb"
    assert info["file"] == str(path) and info["bytes"] == path.stat().st_size
    gltf = read_glb(path)
    nodes = sorted(n["name"] for n in gltf["nodes"])
    # the shown meshes, the root and the skeleton (its bones are nodes too), nothing hidden,
    # pack names; the skinned meshes hang under the skeleton, so the render pivot HeadRoot is
    # left out
    assert set(shown_names) <= set(nodes) and {"Root", "Skeleton"} <= set(nodes)
    assert "HeadRoot" not in nodes and {"head", "jaw", "eye.L"} <= set(nodes)
    assert not any("." in n and n.rsplit(".", 1)[1].isdigit() for n in nodes)
    assert not {"Hat.Beanie", "Glasses.Sunglasses", "Top.Crew", "Hair.Afro"} & set(nodes)
    assert len(nodes) == len(info["objects"]) + len(info["bones"]) <= len(shown) + 2 + 6
    assert len(gltf["meshes"]) == len(shown)
    materials = {m["name"] for m in gltf["materials"]}
    used = {rig.original_name(s.material) for o in shown for s in o.material_slots if s.material}
    assert materials == used and "Skin" in materials and "Glasses.Frame" in materials
    head = next(m for m in gltf["meshes"] if m["name"].startswith("Head"))
    names = head["extras"]["targetNames"]
    assert {"face_width", "jaw_width", "chin_length", "hat_cap"} <= set(names)
    weights = dict(zip(names, head["weights"]))
    assert weights["face_width"] == pytest.approx(0.9, abs=1e-3)
    assert weights["hat_cap"] == pytest.approx(1.0)
    assert path.stat().st_size < 8e6                    # all options of two avatars: 57.6 MB

    # Blender's own importer reads it back (without the Icosphere mesh it adds to draw bones)
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=str(path), disable_bone_shape=True)
    meshes = sorted(o.name for o in bpy.data.objects if o.type == "MESH")
    assert meshes == shown_names
    assert [k.name for k in bpy.data.objects["Head"].data.shape_keys.key_blocks[1:]] == names
    assert {m.name for m in bpy.data.materials} >= used
    # the root at the origin, in metres: the avatar stands on the origin, about 0.64 m tall
    lo = min(imported_mesh_bounds(n)[0][2] for n in meshes)
    hi = max(imported_mesh_bounds(n)[1][2] for n in meshes)
    assert lo == pytest.approx(0.0, abs=0.01) and 0.55 < hi - lo < 0.75


def test_baked_identity_applies_the_sliders(tmp_path):
    a, b = two_avatars()
    plain = export.export_avatar(b, tmp_path / "plain.glb")
    baked = export.export_avatar(b, tmp_path / "baked.glb", bake_identity=True)
    assert baked["bytes"] < plain["bytes"]
    gltf = read_glb(tmp_path / "baked.glb")
    for mesh in gltf["meshes"]:                         # identity keys are gone
        names = set((mesh.get("extras") or {}).get("targetNames", []))
        assert names <= export.EXPRESSION_KEYS, mesh["name"]
    # the baked head has the shape the avatar shows; the plain one its base shape
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=str(tmp_path / "baked.glb"), disable_bone_shape=True)
    baked_head = imported_mesh_bounds("Head")
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.import_scene.gltf(filepath=str(tmp_path / "plain.glb"), disable_bone_shape=True)
    base_head = imported_mesh_bounds("Head")          # its basis: the shape keys at 0
    a, b = two_avatars()
    dg = bpy.context.evaluated_depsgraph_get()
    ev = avatar.rig.Names(b, scoped=True).object("Head").evaluated_get(dg)
    co = np.array([v.co for v in ev.to_mesh().vertices])
    width_shown = (co[:, 0].max() - co[:, 0].min()) * 0.1     # in metres
    assert baked_head[1][0] - baked_head[0][0] == pytest.approx(width_shown, rel=1e-3)
    assert base_head[1][0] - base_head[0][0] < width_shown * 0.99  # face_width 0.9 widens it


def test_fbx_imports_back(tmp_path):
    a, b = two_avatars()
    info = export.export_avatar(b, tmp_path / "b.fbx", bake_identity=False)
    assert info["format"] == "fbx" and (tmp_path / "b.fbx").stat().st_size == info["bytes"]
    bpy.ops.wm.read_homefile(use_empty=True)
    bpy.ops.import_scene.fbx(filepath=str(tmp_path / "b.fbx"))
    meshes = {o.name for o in bpy.data.objects if o.type == "MESH"}
    assert {"Head", "Hat.Cap", "Glasses.Round", "Neck", "Top.Hoodie"} <= meshes
    assert "Hat.Beanie" not in meshes
    keys = [k.name for k in bpy.data.objects["Head"].data.shape_keys.key_blocks]
    assert "face_width" in keys and "hat_cap" in keys


def test_operator_and_command_line_export(tmp_path):
    a, b = two_avatars()
    assert bpy.ops.likeness.export_avatar(filepath=str(tmp_path / "op.fbx"), format="glb",
                                          avatar=b.name) == {"FINISHED"}
    assert not (tmp_path / "op.fbx").exists()            # the format's extension wins
    nodes = {n["name"] for n in read_glb(tmp_path / "op.glb")["nodes"]}
    assert "Hat.Cap" in nodes and "Hat.Beanie" not in nodes
    from likeness.cli import main
    vector = tmp_path / "v.json"
    vector.write_text(avatar.vector_to_json(avatar.read(b)))
    assert main(["export", str(vector), "--pack", "default", "--out", str(tmp_path / "cli.glb"),
                 "--bake"]) == 0
    cli = read_glb(tmp_path / "cli.glb")
    assert {n["name"] for n in cli["nodes"]} == nodes
    assert main(["export", str(tmp_path / "missing.json"), "--out", str(tmp_path / "x.glb")]) == 1
    with pytest.raises(Exception):
        export.export_avatar(b, tmp_path / "x.obj", format="obj")
