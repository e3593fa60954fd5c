"""Properties of the add-on: per-pack slider groups on avatar collections, scene settings.

Packs differ, so each pack gets its own PropertyGroup class, built from its manifest when the
add-on registers (packs on the search path) or when an avatar of another pack appears:

* one ``FloatProperty`` per parameter (``p_<name>``, the parameter's range, default and label),
* one ``EnumProperty`` per slot (``s_<name>``, the option ids and labels).

The group hangs off ``bpy.types.Collection`` as ``likeness_<pack id>``, so each avatar collection
carries its own values: saved in the .blend and restored by undo like any ID data. Changing a value
applies the avatar's vector with that one entry changed (``render_engine.avatar.set_values``).
When a whole vector is applied (randomize, paste, photo, undoable operators), the services call
``sync`` once afterwards, which writes every value with updates suppressed: one rig apply, no
update storm.
"""
from __future__ import annotations

import re

import bpy
from bpy.props import EnumProperty, IntProperty, PointerProperty, StringProperty

from ..backend.schema import Pack

_SYNC_DEPTH = 0                      # > 0 while values are written by ``sync``
_REGISTERED: dict[str, tuple[type, str]] = {}      # pack id -> (PropertyGroup class, schema hash)
_PACK_ITEMS: list[tuple[str, str, str]] = []        # kept alive for the dynamic enum


def attr_name(pack_id: str) -> str:
    """The Collection attribute holding a pack's values: ``likeness_<id>``."""
    return "likeness_" + re.sub(r"\W", "_", pack_id)[:50]


def param_prop(name: str) -> str:
    return "p_" + name


def slot_prop(name: str) -> str:
    return "s_" + name


def values_of(collection, pack_id: str | None = None):
    """The avatar's PropertyGroup instance (None if its pack's class is not registered)."""
    pack_id = pack_id or collection.get("likeness_pack")
    if not pack_id or pack_id not in _REGISTERED:
        return None
    return getattr(collection, attr_name(pack_id), None)


# --------------------------------------------------------------------------------------------
# Updates
# --------------------------------------------------------------------------------------------

def _report_error(context, message: str) -> None:
    print(f"Likeness: {message}")
    wm = getattr(context, "window_manager", None) or bpy.context.window_manager
    try:
        wm.popup_menu(lambda menu, ctx: menu.layout.label(text=message), title="Likeness",
                      icon="ERROR")
    except Exception:           # no UI (background): the console line is enough
        pass


def _param_update(name: str):
    def update(self, context):
        if _SYNC_DEPTH:
            return
        from ..backend.errors import UserError
        from ..render_engine import avatar
        try:
            avatar.set_values(self.id_data, params={name: float(getattr(self, param_prop(name)))})
        except UserError as e:
            _report_error(context, str(e))
    return update


def _slot_update(name: str):
    def update(self, context):
        if _SYNC_DEPTH:
            return
        from ..backend.errors import UserError
        from ..render_engine import avatar
        try:
            avatar.set_values(self.id_data, slots={name: getattr(self, slot_prop(name))})
        except UserError as e:
            _report_error(context, str(e))
    return update


def sync(collection, vector) -> None:
    """Write ``vector`` into the avatar's sliders without triggering their updates
    (``render_engine.avatar.apply_hooks`` calls this after every apply)."""
    global _SYNC_DEPTH
    values = values_of(collection, vector.pack.id)
    if values is None:
        return
    _SYNC_DEPTH += 1
    try:
        for p in vector.pack.parameters:
            attr = param_prop(p.name)
            v = float(vector.params[p.name])
            if abs(getattr(values, attr) - v) > 1e-7:
                setattr(values, attr, v)
        for s in vector.pack.slots:
            attr = slot_prop(s.name)
            if getattr(values, attr) != vector.slots[s.name]:
                setattr(values, attr, vector.slots[s.name])
    finally:
        _SYNC_DEPTH -= 1


# --------------------------------------------------------------------------------------------
# Per-pack classes
# --------------------------------------------------------------------------------------------

def _make_class(pack: Pack) -> type:
    ann = {}
    for p in pack.parameters:
        ann[param_prop(p.name)] = bpy.props.FloatProperty(
            name=p.label or p.name.replace("_", " ").capitalize(),
            description=f"{p.label or p.name} ({p.group}; {p.min:g} to {p.max:g})",
            min=p.min, max=p.max, soft_min=p.min, soft_max=p.max, default=p.default,
            precision=3, step=1, update=_param_update(p.name))
    for s in pack.slots:
        items = [(o.id, o.label or o.id, f"{s.label}: {o.label or o.id}", i)
                 for i, o in enumerate(s.options)]
        ann[slot_prop(s.name)] = EnumProperty(
            name=s.label or s.name, description=f"{s.label or s.name} of the avatar",
            items=items, default=s.default or s.options[0].id, update=_slot_update(s.name))
    ident = re.sub(r"\W", "_", pack.id)
    return type(f"LIKENESS_PG_pack_{ident}", (bpy.types.PropertyGroup,),
                {"__annotations__": ann, "__module__": __name__, "pack_id": pack.id})


def ensure_pack(pack: Pack) -> str:
    """Register the PropertyGroup of ``pack`` (again, if its schema changed); returns the
    Collection attribute name. Values already stored on collections are kept."""
    attr = attr_name(pack.id)
    current = _REGISTERED.get(pack.id)
    if current is not None and current[1] == pack.schema_hash:
        return attr
    if current is not None:
        _unregister_pack(pack.id)
    cls = _make_class(pack)
    bpy.utils.register_class(cls)
    setattr(bpy.types.Collection, attr, PointerProperty(type=cls))
    _REGISTERED[pack.id] = (cls, pack.schema_hash)
    return attr


def _unregister_pack(pack_id: str) -> None:
    cls, _ = _REGISTERED.pop(pack_id)
    attr = attr_name(pack_id)
    if hasattr(bpy.types.Collection, attr):
        delattr(bpy.types.Collection, attr)
    bpy.utils.unregister_class(cls)


def registered_packs() -> list[str]:
    return list(_REGISTERED)


def ensure_avatars_in_file() -> None:
    """Register the classes of every pack an avatar in the open file uses."""
    from ..backend.errors import UserError
    from ..render_engine import avatar
    for coll in bpy.data.collections:
        pack_id = coll.get(avatar.PACK_PROP)
        if pack_id and pack_id not in _REGISTERED:
            try:
                ensure_pack(avatar.pack_of(coll))
            except UserError as e:
                print(f"Likeness: {e}")


@bpy.app.handlers.persistent
def _on_load_post(*_args):
    ensure_avatars_in_file()


def _on_apply(collection, vector) -> None:
    if vector.pack.id not in _REGISTERED:
        ensure_pack(vector.pack)
    sync(collection, vector)


# --------------------------------------------------------------------------------------------
# Scene settings
# --------------------------------------------------------------------------------------------

def _pack_items(self, context):
    from ..render_engine import avatar
    items = [(p.id, p.name, p.description or p.name) for p in avatar.available_packs()]
    _PACK_ITEMS[:] = items or [("default", "Default", "The built-in pack")]
    return _PACK_ITEMS


class LIKENESS_PG_scene(bpy.types.PropertyGroup):
    pack: EnumProperty(name="Pack", description="Asset pack of new avatars", items=_pack_items)
    seed: IntProperty(name="Seed", description="Seed of Randomize (the same seed gives the same "
                      "avatar)", default=0, min=0)
    last_photo_dir: StringProperty(name="Photo folder", subtype="DIR_PATH", options={"HIDDEN"})


CLASSES = (LIKENESS_PG_scene,)


def register() -> None:
    from ..render_engine import avatar
    for cls in CLASSES:
        bpy.utils.register_class(cls)
    bpy.types.Scene.likeness = PointerProperty(type=LIKENESS_PG_scene)
    for pack in avatar.available_packs():
        ensure_pack(pack)
    avatar.apply_hooks.append(_on_apply)
    bpy.app.handlers.load_post.append(_on_load_post)


def unregister() -> None:
    from ..render_engine import avatar
    if _on_load_post in bpy.app.handlers.load_post:
        bpy.app.handlers.load_post.remove(_on_load_post)
    while _on_apply in avatar.apply_hooks:
        avatar.apply_hooks.remove(_on_apply)
    for pack_id in list(_REGISTERED):
        _unregister_pack(pack_id)
    if hasattr(bpy.types.Scene, "likeness"):
        del bpy.types.Scene.likeness
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    _PACK_ITEMS.clear()
