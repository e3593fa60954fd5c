"""Apply avatar vectors to a Blender rig and read them back, for any pack.

Everything here is driven by the pack manifest (``backend.schema``), never by a particular pack:

* continuous parameters set shape-key values, RNA properties and material colours through their
  ``drives`` (colour drives run in manifest order: a ramp sets a base colour, tints then pull it
  toward another colour; colours are interpolated in linear RGB, manifest stops are sRGB hex);
* discrete slots show the chosen option's objects (``hide_render`` and ``hide_viewport``) and set
  its shape keys, zeroing the keys the slot's other options use;
* the applied vector is stored as JSON on the pack's collection (``likeness_vector``), so
  ``read_vector`` can return exactly what was applied, while still noticing hand edits: shape-key
  and property values are read from the rig and mapped back through the drive's linear map, and a
  slot's option is the one that agrees with what is actually visible.

A shape-key or property drive whose object name contains ``*``, ``?`` or ``[`` is a glob over the
objects of the pack's collection (all matches are driven, the first match by name is read back).

Several avatars in one file: ``apply_vector``, ``read_vector`` and ``check_scene`` take an optional
``collection=``, one avatar's collection. Manifest names then resolve only to the objects of that
collection and the materials they use, by their *original* name: the ``likeness_name`` property
stamped when the avatar was added (``render_engine.avatar``), else the datablock name without
Blender's ".001"-style suffix (appending a pack twice makes "Head" and "Head.001"). Without
``collection=`` names resolve file-wide, exactly (the dataset's one-avatar scenes).
"""
from __future__ import annotations

import fnmatch
import json
import math
import re
from typing import Iterable

import bpy

from ..backend.errors import UserError
from ..backend.schema import AvatarVector, Drive, Pack, Parameter

VECTOR_PROP = "likeness_vector"
BASE_COLOR_PROP = "likeness_base_color"
ORIGINAL_NAME_PROP = "likeness_name"
_GLOB_CHARS = set("*?[")
_NUMBER_SUFFIX = re.compile(r"\.\d{3,}$")


# --------------------------------------------------------------------------------------------
# Colours
# --------------------------------------------------------------------------------------------

def srgb_to_linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def linear_to_srgb(c: float) -> float:
    c = min(1.0, max(0.0, c))
    return c * 12.92 if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055


def hex_to_linear(color: str) -> tuple[float, float, float]:
    """'#rrggbb' (sRGB) -> linear RGB floats."""
    h = color.lstrip("#")
    return tuple(srgb_to_linear(int(h[i:i + 2], 16) / 255.0) for i in (0, 2, 4))


def ramp_color(colors: Iterable[str], u: float) -> tuple[float, float, float]:
    """Colour at ``u`` in [0, 1] along evenly spaced sRGB hex stops, interpolated in linear RGB."""
    stops = [hex_to_linear(c) for c in colors]
    u = min(1.0, max(0.0, float(u)))
    x = u * (len(stops) - 1)
    i = min(int(math.floor(x)), len(stops) - 2)
    t = x - i
    a, b = stops[i], stops[i + 1]
    return tuple(a[k] + (b[k] - a[k]) * t for k in range(3))


def _lerp3(a, b, t):
    return tuple(a[k] + (b[k] - a[k]) * t for k in range(3))


# --------------------------------------------------------------------------------------------
# Lookups
# --------------------------------------------------------------------------------------------

def pack_collection(pack: Pack, scene=None, collection=None):
    """``collection`` when given, else the pack's collection by name; UserError if absent."""
    if collection is not None:
        if not isinstance(collection, bpy.types.Collection):
            raise UserError(f"expected an avatar collection, got {type(collection).__name__}")
        return collection
    coll = bpy.data.collections.get(pack.collection)
    if coll is None:
        raise UserError(f"no collection '{pack.collection}' for pack '{pack.id}' in this scene: "
                        f"build or load the pack first")
    return coll


def original_name(idblock) -> str:
    """The name a datablock has in its pack: the stamped ``likeness_name``, else its name
    without Blender's ".NNN" duplicate suffix."""
    stored = idblock.get(ORIGINAL_NAME_PROP)
    if isinstance(stored, str) and stored:
        return stored
    return _NUMBER_SUFFIX.sub("", idblock.name)


class Names:
    """How manifest object and material names resolve to datablocks.

    File-wide (``scoped=False``): objects by exact name, globs over the collection's objects
    (one avatar per file). Scoped to ``coll``: only that collection's objects and the materials
    they use, matched by ``original_name``."""

    def __init__(self, coll, scoped: bool):
        self.coll = coll
        self.scoped = scoped
        self._objects: dict[str, list] = {}
        self._materials: dict[str, object] = {}
        if scoped:
            # stamped names first, so a stray copy never shadows the avatar's own object
            obs = sorted(coll.all_objects,
                         key=lambda o: (o.get(ORIGINAL_NAME_PROP) is None, o.name))
            for ob in obs:
                self._objects.setdefault(original_name(ob), []).append(ob)
                for slot in ob.material_slots:
                    m = slot.material
                    if m is not None:
                        self._materials.setdefault(original_name(m), m)

    def objects(self, name: str) -> list:
        """Objects named ``name``, or matching it if it is a glob (within the collection)."""
        if _GLOB_CHARS & set(name):
            if self.scoped:
                return [ob for orig in sorted(self._objects) if fnmatch.fnmatchcase(orig, name)
                        for ob in self._objects[orig]]
            objs = self.coll.all_objects if self.coll is not None else bpy.data.objects
            return sorted((o for o in objs if fnmatch.fnmatchcase(o.name, name)), key=lambda o: o.name)
        if self.scoped:
            return list(self._objects.get(name, ()))
        ob = bpy.data.objects.get(name)
        return [ob] if ob is not None else []

    def object(self, name: str):
        objs = self.objects(name)
        return objs[0] if objs else None

    def material(self, name: str):
        if self.scoped:
            return self._materials.get(name)
        return bpy.data.materials.get(name)


def _objects(name: str, coll) -> list:
    """Objects named ``name``, or matching it if it is a glob (file-wide resolution)."""
    return Names(coll, scoped=False).objects(name)


def _key_block(ob, key: str):
    keys = getattr(ob.data, "shape_keys", None) if ob is not None and ob.data is not None else None
    if keys is None:
        return None
    return keys.key_blocks.get(key)


def _split_path(path: str) -> tuple[str, str]:
    """'data.foo' -> ('data', 'foo'); 'scale' -> ('', 'scale'); '["x"]' stays whole."""
    if path.endswith("]") and '["' in path:
        i = path.rfind('["')
        return path[:i].rstrip("."), path[i:]
    if "." in path:
        head, _, attr = path.rpartition(".")
        return head, attr
    return "", path


def _resolve_prop(ob, path: str):
    """(owner, attribute name or custom-property key, is_custom, current value) for an RNA path."""
    head, attr = _split_path(path)
    owner = ob.path_resolve(head) if head else ob
    if attr.startswith('["'):
        key = attr[2:-2]
        return owner, key, True, owner[key]
    return owner, attr, False, getattr(owner, attr)


def _set_prop(ob, path: str, index: int, value: float) -> None:
    owner, attr, custom, current = _resolve_prop(ob, path)
    if hasattr(current, "__len__") and not isinstance(current, str):
        if index >= 0:
            if custom:
                seq = list(current)
                seq[index] = value
                owner[attr] = seq
            else:
                current[index] = value
            return
        value = [value] * len(current)
    if custom:
        owner[attr] = value
    else:
        setattr(owner, attr, value)


def _get_prop(ob, path: str, index: int) -> float:
    current = _resolve_prop(ob, path)[3]
    if hasattr(current, "__len__") and not isinstance(current, str):
        return float(current[max(index, 0)])
    return float(current)


def _material_base(mat) -> tuple[float, float, float]:
    """The colour a material had before any tint: stored on first use so applies stay idempotent."""
    base = mat.get(BASE_COLOR_PROP)
    if base is None:
        base = tuple(mat.diffuse_color[:3])
        mat[BASE_COLOR_PROP] = list(base)
    return tuple(base)


def _principled(mat):
    tree = mat.node_tree if getattr(mat, "node_tree", None) is not None else None
    if tree is None:
        return None
    for node in tree.nodes:
        if node.type == "BSDF_PRINCIPLED":
            return node
    return None


def _set_material_color(mat, rgb) -> None:
    a = mat.diffuse_color[3]
    mat.diffuse_color = (rgb[0], rgb[1], rgb[2], a)
    node = _principled(mat)
    if node is not None:
        inp = node.inputs.get("Base Color")
        if inp is not None:
            inp.default_value = (rgb[0], rgb[1], rgb[2], 1.0)


# --------------------------------------------------------------------------------------------
# Apply
# --------------------------------------------------------------------------------------------

def _drive_value(d: Drive, value: float) -> float:
    return value * d.scale + d.offset


def apply_vector(vector: AvatarVector, scene=None, collection=None) -> None:
    """Pose the rig to ``vector`` (deterministic and idempotent) and store it on the collection.

    ``collection``: one avatar's collection (names resolved within it, see the module notes);
    default the pack's collection by name."""
    pack = vector.pack
    coll = pack_collection(pack, scene, collection)
    names = Names(coll, scoped=collection is not None)
    colours: dict[str, tuple[float, float, float]] = {}
    for p in pack.parameters:
        value = vector.params[p.name]
        for d in p.drives:
            if d.kind == "shape_key":
                target = _drive_value(d, value)
                for ob in names.objects(d.object):
                    kb = _key_block(ob, d.key)
                    if kb is not None:
                        kb.value = target      # Blender clamps to the key's slider range
            elif d.kind == "property":
                target = _drive_value(d, value)
                for ob in names.objects(d.object):
                    _set_prop(ob, d.path, d.index, target)
            elif d.kind == "ramp":
                rgb = ramp_color(d.colors, p.normalize(value))
                for m in d.materials:
                    colours[m] = rgb
            elif d.kind == "tint":
                amount = min(1.0, max(0.0, value * d.scale))
                target = hex_to_linear(d.color)
                for m in d.materials:
                    base = colours.get(m)
                    if base is None:
                        mat = names.material(m)
                        if mat is None:
                            continue
                        base = _material_base(mat)
                    colours[m] = _lerp3(base, target, amount)
    for name, rgb in colours.items():
        mat = names.material(name)
        if mat is not None:
            _set_material_color(mat, rgb)

    # discrete slots: visibility and option shape keys
    shown: set[str] = set()
    controlled: set[str] = set()
    key_values: dict[str, float] = {}
    for s in pack.slots:
        controlled.update(s.controlled_objects)
        for k in s.controlled_shape_keys:
            key_values.setdefault(k, 0.0)
    for s in pack.slots:
        opt = s.option(vector.slots[s.name])
        shown.update(opt.show)
        for k, v in opt.shape_keys.items():
            key_values[k] = v
    for name in controlled:
        visible = name in shown
        for ob in names.objects(name):
            if ob.hide_render == visible:
                ob.hide_render = not visible
            if ob.hide_viewport == visible:
                ob.hide_viewport = not visible
    for spec, v in key_values.items():
        obj_name, _, key = spec.partition(":")
        for ob in names.objects(obj_name):
            kb = _key_block(ob, key)
            if kb is not None:
                kb.value = v
    coll[VECTOR_PROP] = json.dumps(vector.to_json(), separators=(",", ":"))


# --------------------------------------------------------------------------------------------
# Read back
# --------------------------------------------------------------------------------------------

def _read_param(p: Parameter, stored: float, names: Names) -> float:
    """The parameter value the rig shows, or the stored one if the rig agrees with it.

    Each shape-key/property drive is compared with what the stored value would produce (shape
    keys clamped to their slider range, as Blender does). If one disagrees, the value is read
    back through the first drive that is not pinned at a slider bound (so +/- key pairs work)."""
    readings = []          # (actual value, drive, pinned at a slider bound, agrees with stored)
    for d in p.drives:
        if d.kind not in ("shape_key", "property") or d.scale == 0:
            continue
        for ob in names.objects(d.object):
            try:
                if d.kind == "shape_key":
                    kb = _key_block(ob, d.key)
                    if kb is None:
                        continue
                    actual = float(kb.value)
                    lo, hi = float(kb.slider_min), float(kb.slider_max)
                    expected = min(hi, max(lo, _drive_value(d, stored)))
                    at_bound = abs(actual - lo) <= 1e-6 or abs(actual - hi) <= 1e-6
                else:
                    actual = _get_prop(ob, d.path, d.index)
                    expected = _drive_value(d, stored)
                    at_bound = False
            except (AttributeError, ValueError, KeyError, IndexError, TypeError):
                continue
            agrees = abs(actual - expected) <= 1e-5 * max(1.0, abs(expected))
            readings.append((actual, d, at_bound, agrees))
            break               # a glob drive is read from its first object
    if not readings or all(r[3] for r in readings):
        return stored
    free = [r for r in readings if not r[2]] or readings
    # prefer a drive that disagrees with the stored value (that is what was edited)
    actual, d, _, _ = next((r for r in free if not r[3]), free[0])
    return min(p.max, max(p.min, (actual - d.offset) / d.scale))


def read_vector(pack: Pack, scene=None, collection=None) -> AvatarVector:
    """The vector the rig currently shows (exactly the applied one unless edited by hand).

    ``collection``: one avatar's collection (see ``apply_vector``)."""
    coll = pack_collection(pack, scene, collection)
    names = Names(coll, scoped=collection is not None)
    raw = coll.get(VECTOR_PROP)
    if raw:
        try:
            stored = pack.vector_from_json(json.loads(raw), partial=True)
        except Exception:               # stale or foreign vector: fall back to the rig itself
            stored = pack.default_vector()
    else:
        stored = pack.default_vector()
    params = {p.name: _read_param(p, stored.params[p.name], names) for p in pack.parameters}
    slots = {}
    for s in pack.slots:
        objs = {name: [not ob.hide_render for ob in names.objects(name)] for name in s.controlled_objects}
        keys = {}
        for spec in s.controlled_shape_keys:
            obj_name, _, key = spec.partition(":")
            for ob in names.objects(obj_name):
                kb = _key_block(ob, key)
                if kb is not None:
                    keys[spec] = float(kb.value)
                    break
        best, best_score = None, None
        for o in s.options:
            score = 0.0
            for name, vis in objs.items():
                want = name in o.show
                score += sum(1 for v in vis if v != want)
            for spec, actual in keys.items():
                score += min(1.0, abs(actual - o.shape_keys.get(spec, 0.0)) * 10)
            if best_score is None or score < best_score - 1e-9 or (
                    abs(score - best_score) <= 1e-9 and o.id == stored.slots[s.name]):
                best, best_score = o.id, score
        slots[s.name] = best
    return AvatarVector(pack, params, slots)


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------

def check_scene(pack: Pack, scene=None, collection=None, segmentation: bool = True) -> list[str]:
    """Human-readable problems between the manifest and the scene (empty list: all good).

    ``collection``: check one avatar's collection (see ``apply_vector``). ``segmentation=False``
    skips the check that every material has a segmentation class (only rendering masks needs it)."""
    problems: list[str] = []
    coll = collection if collection is not None else bpy.data.collections.get(pack.collection)
    if coll is None:
        return [f"collection '{pack.collection}' is missing"]
    names = Names(coll, scoped=collection is not None)

    def need_object(name: str, where: str) -> list:
        objs = names.objects(name)
        if not objs:
            problems.append(f"{where}: object '{name}' is missing")
        return objs

    def need_material(name: str, where: str) -> None:
        if names.material(name) is None:
            problems.append(f"{where}: material '{name}' is missing")

    for p in pack.parameters:
        where = f"parameter '{p.name}'"
        for d in p.drives:
            if d.kind == "shape_key":
                objs = need_object(d.object, where)
                if objs and not any(_key_block(ob, d.key) is not None for ob in objs):
                    problems.append(f"{where}: shape key '{d.key}' is missing on '{d.object}'")
            elif d.kind == "property":
                for ob in need_object(d.object, where):
                    try:
                        v = _resolve_prop(ob, d.path)[3]
                        if d.index >= 0 and (not hasattr(v, "__len__") or d.index >= len(v)):
                            problems.append(f"{where}: '{ob.name}.{d.path}' has no index {d.index}")
                    except (AttributeError, ValueError, KeyError, TypeError):
                        problems.append(f"{where}: property '{d.path}' not found on '{ob.name}'")
            else:
                for m in d.materials:
                    need_material(m, where)
    for s in pack.slots:
        for o in s.options:
            where = f"slot '{s.name}' option '{o.id}'"
            for name in o.show:
                need_object(name, where)
            for spec in o.shape_keys:
                obj_name, _, key = spec.partition(":")
                objs = need_object(obj_name, where)
                if objs and not any(_key_block(ob, key) is not None for ob in objs):
                    problems.append(f"{where}: shape key '{key}' is missing on '{obj_name}'")
    root = (pack.camera.get("jitter") or {}).get("head_root") if isinstance(pack.camera, dict) else None
    if root and names.object(root) is None:
        problems.append(f"[camera.jitter]: head root object '{root}' is missing")

    if not segmentation:
        return problems
    # materials that may render without a segmentation class
    controlled = {n for s in pack.slots for n in s.controlled_objects}
    seen: set[str] = set()
    for ob in sorted(coll.all_objects, key=lambda o: o.name):
        if ob.type not in ("MESH", "CURVE", "SURFACE", "META", "FONT"):
            continue
        if ob.hide_render and (original_name(ob) if names.scoped else ob.name) not in controlled:
            continue
        mats = [slot.material for slot in ob.material_slots]
        if not mats or all(m is None for m in mats):
            problems.append(f"object '{ob.name}' has no material (it would have no segmentation class)")
            continue
        for m in mats:
            if m is None or m.name in seen:
                continue
            seen.add(m.name)
            if pack.class_of_material(original_name(m) if names.scoped else m.name) is None:
                problems.append(f"material '{m.name}' (on '{ob.name}') has no segmentation class")
    return problems
