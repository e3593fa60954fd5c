"""Export one avatar for a game engine: glTF binary (.glb), glTF with a separate .bin (.gltf) or
FBX, with only the options it shows.

A pack's avatar carries every option of every slot (hidden ones included), so exporting its
collection as it is ships all of them (the default pack: 57.6 MB and 114 nodes for two avatars).
``export_avatar`` exports temporary copies of what the avatar shows: the objects whose options are
chosen (``hide_render`` off), their parents up to the root (empties and the skeleton, if the pack
has one), with their shape keys (as glTF morph targets / FBX blend shapes, at the values the
avatar shows) and their materials. With ``bake_identity`` the identity shape keys (face shape,
features, hat fitting: everything the vector sets) are applied into the meshes and dropped, and
only expression keys (``EXPRESSION_KEYS``, ARKit's blendshape names) stay as morph targets.
A pack with a skeleton exports it with its rest pose, and every skinned mesh (an Armature modifier)
under it with its weights, as engines expect (glTF skins, FBX clusters); pivots left empty by that
(the default pack's ``HeadRoot``) are left out.

The copies are named after the pack's names ("Head", not "Head.001"; other objects holding those
names are renamed for the moment of the export), the avatar is exported with its root at the
origin, scaled by ``scale`` (default 0.1: the default pack's head, about 2 units wide, becomes
20 cm), and everything the export added is removed again; the file is left as it was.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import bpy

from ..backend.errors import UserError
from . import rig

FORMATS = {"glb": ".glb", "gltf": ".gltf", "fbx": ".fbx"}

# ARKit's 52 blendshape names (Apple's ARFaceAnchor.BlendShapeLocation, camelCase as engines and
# face-capture apps use them). A pack's shape key with one of these names is an expression: it is
# kept as a morph target when identity sliders are baked.
ARKIT_BLENDSHAPES = (
    "eyeBlinkLeft", "eyeLookDownLeft", "eyeLookInLeft", "eyeLookOutLeft", "eyeLookUpLeft",
    "eyeSquintLeft", "eyeWideLeft", "eyeBlinkRight", "eyeLookDownRight", "eyeLookInRight",
    "eyeLookOutRight", "eyeLookUpRight", "eyeSquintRight", "eyeWideRight",
    "jawForward", "jawLeft", "jawRight", "jawOpen",
    "mouthClose", "mouthFunnel", "mouthPucker", "mouthLeft", "mouthRight",
    "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthDimpleLeft", "mouthDimpleRight", "mouthStretchLeft", "mouthStretchRight",
    "mouthRollLower", "mouthRollUpper", "mouthShrugLower", "mouthShrugUpper",
    "mouthPressLeft", "mouthPressRight", "mouthLowerDownLeft", "mouthLowerDownRight",
    "mouthUpperUpLeft", "mouthUpperUpRight",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight",
    "noseSneerLeft", "noseSneerRight", "tongueOut",
)
EXPRESSION_KEYS = frozenset(ARKIT_BLENDSHAPES)


def shown_objects(collection) -> list:
    """What the avatar shows, with every ancestor (root, pivots, skeleton), in a stable order."""
    keep: dict[int, Any] = {}
    for ob in collection.all_objects:
        shown = not ob.hide_render if ob.type == "MESH" else ob.type == "ARMATURE"
        if not shown:
            continue
        while ob is not None and ob.as_pointer() not in keep:
            keep[ob.as_pointer()] = ob
            ob = ob.parent
    return sorted(keep.values(), key=lambda o: o.name)


def _positions(mesh):
    import numpy as np
    co = np.empty(len(mesh.vertices) * 3, np.float32)
    mesh.vertices.foreach_get("co", co)
    return co


def _bake(original, copy, depsgraph) -> None:
    """Apply the original's shape-key mix (what it shows, drivers included) into the copy's mesh
    and keep only its expression keys, re-based on the baked shape."""
    import numpy as np
    keys = copy.data.shape_keys
    if keys is None:
        return
    basis = np.empty(len(copy.data.vertices) * 3, np.float32)
    keys.reference_key.data.foreach_get("co", basis)
    expressions = {}
    for kb in keys.key_blocks:
        if kb.name in EXPRESSION_KEYS:
            co = np.empty_like(basis)
            kb.data.foreach_get("co", co)
            expressions[kb.name] = (co - basis, kb.value, kb.slider_min, kb.slider_max)
    # the shape as shown, expressions at rest and the skeleton's pose left out: mute them and
    # the Armature modifiers for the evaluation
    muted = []
    for kb in original.data.shape_keys.key_blocks:
        if kb.name in EXPRESSION_KEYS and not kb.mute:
            kb.mute = True
            muted.append(kb)
    posed = [m for m in original.modifiers if m.type == "ARMATURE" and m.show_viewport]
    for m in posed:
        m.show_viewport = False
    try:
        depsgraph.update()
        ev = original.evaluated_get(depsgraph)
        mesh = ev.to_mesh()
        try:
            if len(mesh.vertices) != len(copy.data.vertices):
                raise UserError(f"'{original.name}': its modifiers change the vertex count; "
                                "export without baking")
            shaped = _positions(mesh)
        finally:
            ev.to_mesh_clear()
    finally:
        for kb in muted:
            kb.mute = False
        for m in posed:
            m.show_viewport = True
    copy.shape_key_clear()
    copy.data.vertices.foreach_set("co", shaped)
    copy.data.update()
    if expressions:
        copy.shape_key_add(name="Basis", from_mix=False)
        for name, (delta, value, lo, hi) in expressions.items():
            kb = copy.shape_key_add(name=name, from_mix=False)
            kb.data.foreach_set("co", shaped + delta)
            kb.slider_min, kb.slider_max = lo, hi
            kb.value = value


def _skin_under_skeleton(originals, copies: dict) -> list:
    """Parent every skinned copy (an Armature modifier on an exported armature) to that armature,
    where it stays in place, as engines expect a skinned mesh; empties left with nothing under
    them (the default pack's ``HeadRoot``, a render pivot) are not exported. Returns the copies
    to export, in the originals' order."""
    by_copy = {c.as_pointer(): ob for ob, c in ((ob, copies[ob.as_pointer()]) for ob in originals)}
    arm_copies = {c.as_pointer() for c in copies.values() if c.type == "ARMATURE"}
    for c in copies.values():
        mod = next((m for m in c.modifiers if m.type == "ARMATURE" and m.object is not None
                    and m.object.as_pointer() in arm_copies), None)
        if mod is None or c.parent == mod.object:
            continue
        world = by_copy[c.as_pointer()].matrix_world.copy()
        arm_world = by_copy[mod.object.as_pointer()].matrix_world
        c.parent = mod.object
        c.parent_type = "OBJECT"
        c.matrix_parent_inverse = arm_world.inverted() @ world @ c.matrix_basis.inverted()
    children = {c.parent.as_pointer() for c in copies.values() if c.parent is not None}
    keep = []
    for ob in originals:
        c = copies[ob.as_pointer()]
        if c.type == "EMPTY" and c.parent is not None and c.as_pointer() not in children:
            continue
        keep.append(c)
    return keep


def _claim_names(pairs) -> list:
    """Give each (datablock, wanted name) its name, renaming other holders for the moment;
    returns what to undo (in order)."""
    undo = []
    for idb, wanted in pairs:
        if idb.name == wanted:
            continue
        coll = bpy.data.objects if isinstance(idb, bpy.types.Object) else bpy.data.materials
        holder = coll.get(wanted)
        if holder is not None and holder != idb:
            undo.append((holder, holder.name))
            holder.name = f"{wanted}~likeness-export"
        undo.append((idb, idb.name))
        idb.name = wanted
    return undo


def export_avatar(collection, filepath: str | os.PathLike, format: str | None = None,
                  bake_identity: bool = False, scale: float = 0.1,
                  context=None) -> dict[str, Any]:
    """Write the avatar to ``filepath`` (format from ``format`` or the file's extension: glb,
    gltf, fbx). Returns what was written: file, format, objects, meshes, materials, shape keys
    (per object), bones, bytes."""
    context = context or bpy.context
    path = Path(bpy.path.abspath(str(filepath)))
    fmt = (format or path.suffix.lstrip(".")).lower()
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (use one of: {', '.join(FORMATS)})")
    if path.suffix.lower() != FORMATS[fmt]:
        path = path.with_suffix(FORMATS[fmt])
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None
    scene = context.scene
    view_layer = context.view_layer
    originals = shown_objects(collection)
    if not originals:
        raise UserError(f"avatar '{collection.name}' shows nothing to export")
    depsgraph = context.evaluated_depsgraph_get()

    temp = bpy.data.collections.new(f"{collection.name} export")
    scene.collection.children.link(temp)
    copies: dict[int, Any] = {}
    made_meshes, undo_names = [], []
    selection = [o for o in view_layer.objects if o.select_get()]
    active = view_layer.objects.active
    try:
        for ob in originals:
            c = ob.copy()
            if ob.data is not None:
                c.data = ob.data.copy()
                made_meshes.append(c.data)
            c.animation_data_clear()
            c.hide_render = c.hide_viewport = False
            c.hide_set(False)
            temp.objects.link(c)
            copies[ob.as_pointer()] = c
        for ob in originals:
            c = copies[ob.as_pointer()]
            if ob.parent is not None:
                c.parent = copies[ob.parent.as_pointer()]
                c.matrix_parent_inverse = ob.matrix_parent_inverse.copy()
            for mod in c.modifiers:
                target = getattr(mod, "object", None)
                if target is not None and target.as_pointer() in copies:
                    mod.object = copies[target.as_pointer()]
            if c.data is not None and getattr(c.data, "shape_keys", None) is not None:
                c.data.shape_keys.animation_data_clear()     # drivers point at the originals
                for kb, okb in zip(c.data.shape_keys.key_blocks, ob.data.shape_keys.key_blocks):
                    kb.value = okb.value                       # as shown, drivers evaluated
                if bake_identity:
                    _bake(ob, c, depsgraph)
        exported = _skin_under_skeleton(originals, copies)
        roots = [copies[o.as_pointer()] for o in originals if o.parent is None]
        for r in roots:                                        # root at the origin, in metres
            r.location = r.location - roots[0].location if len(roots) > 1 else (0.0, 0.0, 0.0)
            r.location = r.location * scale
            r.scale = r.scale * scale
        materials = {}
        for c in exported:
            for slot in c.material_slots:
                if slot.material is not None:
                    materials[slot.material.as_pointer()] = slot.material
        undo_names = _claim_names(
            [(c, rig.original_name(ob)) for ob, c in zip(originals, copies.values())
             if c in exported]
            + [(m, rig.original_name(m)) for m in materials.values()])
        for o in selection:
            o.select_set(False)
        for c in exported:
            c.select_set(True)
        view_layer.objects.active = roots[0]
        if fmt == "gltf":                  # written in place: its .bin is named after it
            _write(fmt, path)
        else:                              # a half-written file never has the final name
            tmp = path.with_name(f".{path.stem}.tmp{os.getpid()}{path.suffix}")
            try:
                _write(fmt, tmp)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        info = {
            "file": str(path), "format": fmt, "bytes": path.stat().st_size,
            "objects": sorted(c.name for c in exported),
            "meshes": sum(c.type == "MESH" for c in exported),
            "materials": sorted(m.name for m in materials.values()),
            "shape_keys": {c.name: [kb.name for kb in c.data.shape_keys.key_blocks[1:]]
                           for c in exported
                           if c.type == "MESH" and c.data.shape_keys is not None},
            "bones": sorted(b.name for c in exported if c.type == "ARMATURE"
                            for b in c.data.bones),
        }
    finally:
        for idb, name in reversed(undo_names):
            idb.name = name
        keys = [m.shape_keys for m in made_meshes
                if getattr(m, "shape_keys", None) is not None]
        bpy.data.batch_remove([*copies.values()])
        bpy.data.batch_remove([m for m in made_meshes if m.users == 0]
                              + [k for k in keys if k.users == 0])
        bpy.data.collections.remove(temp)
        for o in selection:
            if o.name in view_layer.objects:
                o.select_set(True)
        if active is not None and active.name in view_layer.objects:
            view_layer.objects.active = active
    return info


def _write(fmt: str, path: Path) -> None:
    from .render import quiet_stdout
    with quiet_stdout():
        if fmt in ("glb", "gltf"):
            bpy.ops.export_scene.gltf(
                filepath=str(path), export_format="GLB" if fmt == "glb" else "GLTF_SEPARATE",
                use_selection=True, export_apply=False, export_morph=True,
                export_morph_normal=False, export_skins=True, export_animations=False,
                export_extras=False, export_yup=True, export_materials="EXPORT")
        else:
            bpy.ops.export_scene.fbx(
                filepath=str(path), use_selection=True, object_types={"EMPTY", "MESH", "ARMATURE"},
                use_mesh_modifiers=False, mesh_smooth_type="FACE", add_leaf_bones=False,
                bake_anim=False, apply_scale_options="FBX_SCALE_ALL", path_mode="COPY",
                embed_textures=True)


# ---- CLI ---------------------------------------------------------------------------------------

def cli_export(args) -> int:
    """``likeness export VECTOR.json --pack P --format glb|gltf|fbx --out F [--bake]``."""
    from ..backend.schema import find_pack
    from .avatar import add_avatar, apply
    from .packs import empty_scene, vector_from_arg
    pack = find_pack(args.pack)
    vector = vector_from_arg(pack, args.vector)
    empty_scene()
    coll = add_avatar(pack, location=(0.0, 0.0, 0.0))
    apply(coll, vector)
    info = export_avatar(coll, args.out, format=args.format, bake_identity=args.bake,
                         scale=args.scale)
    keys = sorted({k for ks in info["shape_keys"].values() for k in ks})
    print(f"{info['file']}: {info['bytes'] / 1e6:.2f} MB, {len(info['objects'])} objects "
          f"({info['meshes']} meshes), {len(info['materials'])} materials, "
          f"{len(keys)} shape-key names, {len(info['bones'])} bones")
    return 0
