"""Avatars in a Blender file: the services the add-on's UI is built on, and the scripting API.

Stateless functions over bpy data (no UI, no operators), so scripts do what the panel does::

    from likeness.render_engine import avatar
    coll = avatar.add_avatar("default")          # append the pack's avatar into the current scene
    avatar.randomize(coll, seed=3)
    vector = avatar.read(coll)                   # AvatarVector
    text = avatar.vector_to_json(vector)
    avatar.apply(coll, avatar.vector_from_json(coll, text))
    avatar.set_expressions(coll, {"jawOpen": 0.5, "eyeBlinkLeft": 1.0})   # ARKit-named keys

An avatar is a collection appended from its pack's .blend (code-built packs: the cached build in
``backend.cache.cache_root()/packs``, the extension's user folder inside Blender, built in a
separate process first if needed, so the open file is never replaced), tagged with the pack id and
folder and placed with its root object at the 3D cursor. Several avatars can live in one scene: Blender
renames the appended copies ("Head.001"), so every object and material is stamped with its name in
the pack (``likeness_name``) and the rig resolves manifest names within the avatar's collection.

The applied vector is stored on the collection (``render_engine.rig``); a photo prediction's
summary (per-slot confidence and alternatives) and the aligned crop the model saw are stored there
too, so they are saved with the file and restored by undo.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import bpy

from ..backend.errors import UserError
from ..backend.schema import AvatarVector, Pack, SchemaError, find_pack, load_pack
from . import rig

PACK_PROP = "likeness_pack"               # pack id
PACK_ROOT_PROP = "likeness_pack_root"     # pack folder when the avatar was added
SERIAL_PROP = "likeness_serial"           # order of adding (scene counter)
PREDICTION_PROP = "likeness_prediction"   # JSON summary of the last photo prediction
CROP_PROP = "likeness_crop"               # the aligned crop (an Image datablock)
SCENE_SERIAL_PROP = "likeness_avatar_serial"

# Called as hook(collection, vector) after every apply (the add-on keeps its sliders in sync).
apply_hooks: list[Callable[[Any, AvatarVector], None]] = []

_PACK_CACHE: dict[tuple[str, float], Pack] = {}


# --------------------------------------------------------------------------------------------
# Packs
# --------------------------------------------------------------------------------------------

def as_pack(pack: Pack | str | os.PathLike) -> Pack:
    """A ``Pack`` from a pack, a pack name ("default") or a pack folder."""
    return pack if isinstance(pack, Pack) else find_pack(pack)


def _load_cached(root: Path) -> Pack:
    manifest = root / "pack.toml"
    key = (str(manifest), manifest.stat().st_mtime)
    pack = _PACK_CACHE.get(key)
    if pack is None:
        pack = _PACK_CACHE[key] = load_pack(root)
    return pack


def pack_of(collection) -> Pack:
    """The pack an avatar collection was made from (its stored folder, else its id)."""
    pack_id = collection.get(PACK_PROP)
    if not isinstance(pack_id, str) or not pack_id:
        raise UserError(f"collection '{collection.name}' is not a Likeness avatar")
    root = collection.get(PACK_ROOT_PROP)
    if isinstance(root, str) and root and (Path(root) / "pack.toml").is_file():
        pack = _load_cached(Path(root))
        if pack.id == pack_id:
            return pack
    try:
        found = find_pack(pack_id)
    except SchemaError:
        raise UserError(f"avatar '{collection.name}' needs pack '{pack_id}', which is not installed "
                        f"(it was added from {root or 'an unknown folder'})") from None
    return _load_cached(found.root)


def available_packs() -> list[Pack]:
    """Packs found on the pack search path (``$LIKENESS_PACKS_PATH``, then the built-in ones)."""
    from ..backend.schema import pack_search_path
    out: dict[str, Pack] = {}
    for folder in pack_search_path():
        if not folder.is_dir():
            continue
        for d in sorted(folder.iterdir()):
            if (d / "pack.toml").is_file():
                try:
                    pack = _load_cached(d)
                except (SchemaError, OSError):
                    continue
                out.setdefault(pack.id, pack)
    return list(out.values())


def _build_in_subprocess(pack: Pack) -> None:
    """Build a code-built pack into the cache in another process (the open file stays as it is).

    The child gets a throw-away Blender user folder (``BLENDER_USER_RESOURCES``), so nothing it
    does to preferences or extensions can reach the user's: a child that reset its preferences in
    the user's folder once made Blender delete every extension's wheels. It writes into this
    process's cache (``LIKENESS_CACHE``), which inside Blender is the extension's user folder."""
    import tempfile
    from ..backend.cache import cache_root
    root = Path(__file__).resolve().parent.parent          # the package root (repo or extension)
    code = (
        "import importlib.util, sys\n"
        f"root = {str(root)!r}\n"
        "spec = importlib.util.spec_from_file_location('_likeness_build', root + '/__init__.py', "
        "submodule_search_locations=[root])\n"
        "mod = importlib.util.module_from_spec(spec); sys.modules['_likeness_build'] = mod\n"
        "spec.loader.exec_module(mod)\n"
        "from _likeness_build.backend.schema import load_pack\n"
        "from _likeness_build.render_engine.packs import open_pack_scene\n"
        f"open_pack_scene(load_pack({str(pack.root)!r}), check=True)\n"
    )
    if bpy.app.binary_path:                     # a Blender binary: run it headless
        cmd = [bpy.app.binary_path, "-b", "--factory-startup", "--python-exit-code", "1",
               "--python-expr", code]
    else:                                       # the bpy module: this Python imports bpy too
        cmd = [sys.executable, "-c", code]
    with tempfile.TemporaryDirectory(prefix="likeness-build-") as user:
        env = dict(os.environ, BLENDER_USER_RESOURCES=user, LIKENESS_CACHE=str(cache_root()))
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-6:])
        raise UserError(f"building pack '{pack.id}' failed:\n{tail}")


def pack_blend(pack: Pack) -> Path:
    """The .blend holding the pack's avatar: the pack's own, or the cached build (built if needed)."""
    if pack.blend:
        path = pack.blend_path()
        if path is None or not path.is_file():
            raise UserError(f"pack '{pack.id}': blend file {path} not found")
        return path
    from .packs import built_blend_path
    path = built_blend_path(pack)
    if not path.is_file():
        _build_in_subprocess(pack)
        if not path.is_file():
            raise UserError(f"building pack '{pack.id}' did not produce {path}")
    return path


# --------------------------------------------------------------------------------------------
# Adding and finding avatars
# --------------------------------------------------------------------------------------------

_SKIP_ID_COLLECTIONS = {"window_managers", "screens", "workspaces"}


def _id_snapshot() -> dict[str, set[int]]:
    out = {}
    for prop in bpy.data.bl_rna.properties:
        if prop.type == "COLLECTION" and prop.identifier not in _SKIP_ID_COLLECTIONS:
            out[prop.identifier] = {idb.as_pointer() for idb in getattr(bpy.data, prop.identifier)}
    return out


def _new_ids(before: dict[str, set[int]]) -> list:
    new = []
    for attr, seen in before.items():
        new.extend(idb for idb in getattr(bpy.data, attr) if idb.as_pointer() not in seen)
    return new


def _stamp(idblock, names: set[str]) -> None:
    """Store the datablock's name in the pack: its own name if the pack has it, else its name
    without the ".NNN" suffixes appending added."""
    orig = idblock.name
    while orig not in names:
        stripped = rig._NUMBER_SUFFIX.sub("", orig)
        if stripped == orig:
            orig = rig._NUMBER_SUFFIX.sub("", idblock.name)
            break
        orig = stripped
    idblock[rig.ORIGINAL_NAME_PROP] = orig


def _scene_of(context=None, scene=None):
    if scene is not None:
        return scene
    context = context or bpy.context
    return context.scene


def add_avatar(pack: Pack | str | os.PathLike = "default", context=None, scene=None,
               location=None):
    """Append the pack's avatar collection into ``scene`` (default: the context's) and return it.

    The collection is tagged with the pack id and folder and posed with the vector stored in the
    .blend (the pack's default vector if it has none). Its root object (``root_object``) lands at
    ``location``, by default the scene's 3D cursor, as Blender's own add operators place objects;
    the other parentless objects of a pack, if any, move with it.
    If the .blend lacks the collection or an object/material/shape key the manifest names, a
    ``UserError`` names them and nothing is left behind."""
    pack = as_pack(pack)
    scene = _scene_of(context, scene)
    path = pack_blend(pack)
    before = _id_snapshot()
    for attempt in (0, 1):
        try:
            with bpy.data.libraries.load(str(path), link=False) as (src, dst):
                if pack.collection not in src.collections:
                    raise UserError(f"pack '{pack.id}': {path.name} has no collection "
                                    f"'{pack.collection}' (it has: {', '.join(src.collections) or 'none'})")
                object_names, material_names = set(src.objects), set(src.materials)
                dst.collections = [pack.collection]
            break
        except OSError as e:
            if pack.blend or attempt:       # the pack's own file: the TD's to restore
                raise UserError(f"pack '{pack.id}': cannot read {path}: {e}") from None
            # a cached build damaged by something else: build it again, once
            print(f"likeness: the cached build of pack '{pack.id}' ({path}) is damaged ({e}); "
                  "rebuilding it", file=sys.stderr)
            path.unlink(missing_ok=True)
            path = pack_blend(pack)
    new_ids = _new_ids(before)
    coll = dst.collections[0] if dst.collections else None
    try:
        if coll is None:
            raise UserError(f"pack '{pack.id}': could not append collection '{pack.collection}' "
                            f"from {path}")
        for ob in coll.all_objects:
            _stamp(ob, object_names)
            for slot in ob.material_slots:
                if slot.material is not None and rig.ORIGINAL_NAME_PROP not in slot.material:
                    _stamp(slot.material, material_names)
        problems = rig.check_scene(pack, collection=coll, segmentation=False)
        if problems:
            raise UserError(f"pack '{pack.id}' does not match {path.name}:\n  - "
                            + "\n  - ".join(problems))
        coll[PACK_PROP] = pack.id
        coll[PACK_ROOT_PROP] = str(pack.root)
        serial = int(scene.get(SCENE_SERIAL_PROP, 0)) + 1
        coll[SERIAL_PROP] = serial
        scene.collection.children.link(coll)
        # a posed .blend keeps its vector; a fresh build shows every option: pose the defaults
        apply(coll, read(coll) if coll.get(rig.VECTOR_PROP) else pack.default_vector())
        place(coll, scene.cursor.location if location is None else location)
    except BaseException:
        if coll is not None and _alive(coll) and scene.collection.children.get(coll.name) is not None:
            scene.collection.children.unlink(coll)
        bpy.data.batch_remove([idb for idb in new_ids if _alive(idb)])
        raise
    scene[SCENE_SERIAL_PROP] = serial
    # the appended data is local now; drop the library reference append leaves behind
    for idb in new_ids:
        if isinstance(idb, bpy.types.Library) and _alive(idb):
            if not any(getattr(i, "library", None) == idb for i in new_ids if _alive(i) and i is not idb):
                bpy.data.libraries.remove(idb)
    return coll


def _alive(idb) -> bool:
    try:
        idb.name
        return True
    except ReferenceError:
        return False


def is_avatar(collection) -> bool:
    return isinstance(collection, bpy.types.Collection) and bool(collection.get(PACK_PROP))


def avatars(scene=None) -> list:
    """The avatar collections linked in ``scene`` (default: the current one), in adding order."""
    scene = scene or bpy.context.scene
    found = [c for c in scene.collection.children_recursive if is_avatar(c)]
    return sorted(found, key=lambda c: (int(c.get(SERIAL_PROP, 0)), c.name))


def active_avatar(context=None):
    """The avatar containing the active object, else the last one added; None if there is none."""
    context = context or bpy.context
    scene = getattr(context, "scene", None)
    if scene is None:
        return None
    found = avatars(scene)
    if not found:
        return None
    ob = getattr(context, "active_object", None)
    if ob is not None:
        for coll in reversed(found):
            if coll.all_objects.get(ob.name) is not None:
                return coll
    return found[-1]


def get_avatar(name: str = "", context=None):
    """An avatar by collection name, or the active one when ``name`` is empty; UserError if none."""
    if name:
        coll = bpy.data.collections.get(name)
        if coll is None or not is_avatar(coll):
            raise UserError(f"no avatar named '{name}'")
        return coll
    coll = active_avatar(context)
    if coll is None:
        raise UserError("no avatar in this scene: add one first (Likeness > Add Avatar)")
    return coll


def remove_avatar(collection) -> None:
    """Delete an avatar: its collection, objects and the data only they used."""
    crop = collection.get(CROP_PROP)
    objs = list(collection.all_objects)
    data = [ob.data for ob in objs if ob.data is not None]
    mats = {slot.material for ob in objs for slot in ob.material_slots if slot.material is not None}
    keys = [d.shape_keys for d in data if getattr(d, "shape_keys", None) is not None]
    bpy.data.batch_remove([collection, *objs])
    leftovers = [i for i in (*data, *keys, *mats) if _alive(i) and i.users == 0]
    if isinstance(crop, bpy.types.Image) and _alive(crop):
        leftovers.append(crop)
    if leftovers:
        bpy.data.batch_remove(leftovers)


# --------------------------------------------------------------------------------------------
# Vectors
# --------------------------------------------------------------------------------------------

def apply(collection, vector: AvatarVector) -> AvatarVector:
    """Pose the avatar to ``vector`` (which must be for the avatar's pack)."""
    pack = pack_of(collection)
    if vector.pack.id != pack.id:
        raise UserError(f"the vector is for pack '{vector.pack.id}', avatar '{collection.name}' "
                        f"is a '{pack.id}' avatar")
    if vector.pack is not pack:
        vector = pack.vector_from_json(vector.to_json())
    rig.apply_vector(vector, collection=collection)
    from .builders import refresh
    refresh(pack, collection)                # e.g. expression keys that follow the identity
    for hook in list(apply_hooks):
        hook(collection, vector)
    return vector


def read(collection) -> AvatarVector:
    """The vector the avatar shows."""
    return rig.read_vector(pack_of(collection), collection=collection)


def randomize(collection, seed: int = 0) -> AvatarVector:
    """A random vector from the pack's distributions (reproducible for a seed), applied."""
    pack = pack_of(collection)
    return apply(collection, pack.sample(random.Random(f"likeness:randomize:{pack.id}:{int(seed)}")))


def reset(collection) -> AvatarVector:
    """The pack's default vector, applied."""
    return apply(collection, pack_of(collection).default_vector())


def set_values(collection, params: dict[str, float] | None = None,
               slots: dict[str, str] | None = None) -> AvatarVector:
    """Change some parameters/slots of the avatar's current vector and apply it."""
    current = read(collection).to_json()
    current["params"].update(params or {})
    current["slots"].update(slots or {})
    return apply(collection, pack_of(collection).vector_from_json(current))


def vector_to_json(vector: AvatarVector, indent: int | None = 2) -> str:
    return json.dumps(vector.to_json(), indent=indent)


def vector_from_json(target, text: str | dict) -> AvatarVector:
    """Parse a vector for ``target`` (a pack or an avatar collection). Missing entries take the
    pack's defaults; a vector of another pack or a stale schema is refused (``SchemaError``)."""
    pack = target if isinstance(target, Pack) else pack_of(target)
    return pack.vector_from_json(text, partial=True)


# --------------------------------------------------------------------------------------------
# Photo predictions
# --------------------------------------------------------------------------------------------

def prediction_summary(prediction, model_path: str | os.PathLike | None = None) -> dict[str, Any]:
    """What the panel shows about a ``backend.predict.Prediction``: per slot the choice, its
    probability and the next-best options; warnings and timings."""
    slots = {}
    for slot, alts in prediction.alternatives.items():
        choice = prediction.vector.slots[slot]
        slots[slot] = {
            "choice": choice,
            "probability": float(prediction.probabilities[slot][choice]),
            "alternatives": [{"option": a.option, "label": a.label,
                              "probability": float(a.probability)} for a in alts],
        }
    return {
        "source": str(prediction.source),
        "model": str(model_path) if model_path else "",
        "slots": slots,
        "warnings": list(prediction.warnings),
        "timings_ms": {k: round(v * 1000, 1) for k, v in prediction.timings.items()},
        "faces_found": int(prediction.n_faces),
    }


def set_image_pixels(image, rgb) -> None:
    """uint8 HxWx3 (top row first) -> a Blender image's pixels (bottom row first, RGBA float)."""
    import numpy as np
    rgb = np.asarray(rgb)
    h, w = rgb.shape[:2]
    rgba = np.ones((h, w, 4), np.float32)
    rgba[..., :3] = rgb[::-1, :, :3].astype(np.float32) / 255.0
    if tuple(image.size) != (w, h):
        image.scale(w, h)
    image.pixels.foreach_set(rgba.ravel())
    image.update()


def store_crop(collection, rgb):
    """Keep the aligned crop as a new image of the avatar (packed into the .blend); returns it.

    A new image each time (the previous one is removed when nothing else uses it), so undo
    brings back the previous crop with the previous prediction."""
    h, w = rgb.shape[:2]
    old = collection.get(CROP_PROP)
    image = bpy.data.images.new(f"{collection.name} photo crop", w, h, alpha=False)
    image.colorspace_settings.name = "sRGB"
    set_image_pixels(image, rgb)
    image.pack()
    collection[CROP_PROP] = image
    if isinstance(old, bpy.types.Image) and old.users == 0:
        bpy.data.images.remove(old)
    return image


def apply_prediction(collection, prediction, model_path: str | os.PathLike | None = None) -> AvatarVector:
    """Apply a photo prediction to the avatar and keep its summary and crop for the panel."""
    vector = apply(collection, prediction.vector)
    collection[PREDICTION_PROP] = json.dumps(prediction_summary(prediction, model_path))
    store_crop(collection, prediction.crop)
    return vector


def prediction_info(collection) -> dict[str, Any] | None:
    """The stored summary of the avatar's last photo prediction (None if it has none)."""
    raw = collection.get(PREDICTION_PROP)
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (TypeError, ValueError):
        return None


def crop_image(collection):
    image = collection.get(CROP_PROP)
    return image if isinstance(image, bpy.types.Image) else None


def apply_alternative(collection, slot: str, option: str) -> AvatarVector:
    """Switch one slot to another option (e.g. the model's second choice)."""
    pack = pack_of(collection)
    pack.slot(slot).index(option)          # SchemaError naming the slot/option if unknown
    return set_values(collection, slots={slot: option})


def iter_slot_confidences(collection) -> Iterable[tuple[str, str, float, list[dict]]]:
    """(slot, choice, probability, alternatives) of the stored prediction, in pack slot order."""
    info = prediction_info(collection)
    if not info:
        return
    for s in pack_of(collection).slots:
        entry = info.get("slots", {}).get(s.name)
        if entry:
            yield s.name, entry["choice"], float(entry["probability"]), entry["alternatives"]


def _parentless(collection) -> list:
    return sorted((o for o in collection.all_objects if o.parent is None), key=lambda o: o.name)


def root_object(collection):
    """The object to select and move for an avatar: its one object without a parent (the default
    pack's ``Root``); for a pack with several, the pack's head root, else the first by name."""
    tops = _parentless(collection)
    if len(tops) == 1:
        return tops[0]
    pack = pack_of(collection)
    head_root = (pack.camera.get("jitter") or {}).get("head_root") if isinstance(pack.camera, dict) else None
    if head_root:
        ob = rig.Names(collection, scoped=True).object(head_root)
        if ob is not None:
            return ob
    return tops[0] if tops else None


def skeleton(collection):
    """The avatar's armature object (the default pack's ``Skeleton``), or None."""
    return next((o for o in sorted(collection.all_objects, key=lambda o: o.name)
                 if o.type == "ARMATURE"), None)


def expressions(collection) -> dict[str, float]:
    """The avatar's expression controls (ARKit blendshape names, 0..1) and their values: custom
    properties of its skeleton, each driving every mesh's shape key of that name."""
    from .export import EXPRESSION_KEYS
    skel = skeleton(collection)
    if skel is None:
        return {}
    return {k: float(skel[k]) for k in sorted(skel.keys()) if k in EXPRESSION_KEYS}


def set_expressions(collection, values: dict[str, float]) -> dict[str, float]:
    """Set expression controls (``{"jawOpen": 0.6, "eyeBlinkLeft": 1}``, clamped to 0..1); the
    meshes follow on the next depsgraph update. Returns every control's value."""
    have = expressions(collection)
    unknown = sorted(set(values) - set(have))
    if unknown:
        raise UserError(f"avatar '{collection.name}' has no expression {', '.join(unknown)} "
                        f"(it has: {', '.join(have) or 'none'})")
    skel = skeleton(collection)
    for k, v in values.items():
        skel[k] = min(1.0, max(0.0, float(v)))
    skel.update_tag()                  # a custom property set from Python tags nothing itself
    return expressions(collection)


def _rest_world(ob):
    """The object's world matrix from its own and its parents' transforms (``matrix_world`` of a
    just-appended object is not evaluated yet)."""
    if ob.parent is None:
        return ob.matrix_basis.copy()
    return _rest_world(ob.parent) @ ob.matrix_parent_inverse @ ob.matrix_basis


def place(collection, location) -> None:
    """Move the avatar so its root object's origin is at ``location`` (world space); every
    parentless object moves by the same offset."""
    from mathutils import Vector
    root = root_object(collection)
    if root is None:
        return
    offset = Vector(location) - _rest_world(root).translation
    for ob in _parentless(collection):
        ob.location = ob.location + offset
