"""The sidebar: View3D > Sidebar > Likeness.

* Likeness: the pack of new avatars and Add Avatar, the avatars of the scene (click one to edit
  it), Create from Photo…, Randomize (seed), Reset, Copy/Paste, Import/Export.
* Photo: the aligned face crop the model saw, warnings, and for every slot the model's confidence
  and its next-best options as one-click alternatives.
* Shape: the pack's parameters as sliders, grouped by region (the manifest's ``group``).
* Options: one dropdown per slot (with the model's confidence after a photo).
"""
from __future__ import annotations

import bpy

from ..render_engine import avatar
from . import props


def _active(context):
    try:
        return avatar.active_avatar(context)
    except Exception:
        return None


def _pack(coll):
    try:
        return avatar.pack_of(coll)
    except Exception:
        return None


class LikenessPanel:
    bl_space_type = "VIEW_3D"
    bl_region_type = "UI"
    bl_category = "Likeness"


class LIKENESS_PT_main(LikenessPanel, bpy.types.Panel):
    bl_idname = "LIKENESS_PT_main"
    bl_label = "Likeness"

    def draw(self, context):
        layout = self.layout
        scene = context.scene
        settings = getattr(scene, "likeness", None)
        row = layout.row(align=True)
        if settings is not None:
            row.prop(settings, "pack", text="")
        row.operator("likeness.add_avatar", text="Add Avatar", icon="ADD")

        found = avatar.avatars(scene)
        active = _active(context)
        if found:
            col = layout.column(align=True)
            for coll in found:
                r = col.row(align=True)
                op = r.operator("likeness.select_avatar", text=coll.name,
                                icon="OUTLINER_COLLECTION", depress=(coll == active))
                op.avatar = coll.name
                op = r.operator("likeness.remove_avatar", text="", icon="X")
                op.avatar = coll.name

        layout.separator()
        big = layout.row()
        big.scale_y = 1.5
        big.operator("likeness.create_from_photo", text="Create from Photo…", icon="IMAGE_DATA")
        if active is None:
            layout.label(text="No avatar yet: a photo adds one", icon="INFO")
            return

        col = layout.column(align=True)
        row = col.row(align=True)
        row.operator("likeness.randomize", icon="FILE_REFRESH")
        if settings is not None:
            row.prop(settings, "seed", text="Seed")
        col.operator("likeness.reset", icon="LOOP_BACK")
        row = layout.row(align=True)
        row.operator("likeness.copy_vector", text="Copy", icon="COPYDOWN")
        row.operator("likeness.paste_vector", text="Paste", icon="PASTEDOWN")
        row = layout.row(align=True)
        row.operator("likeness.import_vector", text="Import", icon="IMPORT")
        row.operator("likeness.export_vector", text="Export", icon="EXPORT")
        layout.operator("likeness.export_avatar", text="Export Avatar…", icon="EXPORT")


class LIKENESS_PT_photo(LikenessPanel, bpy.types.Panel):
    bl_idname = "LIKENESS_PT_photo"
    bl_label = "Photo"
    bl_parent_id = "LIKENESS_PT_main"

    @classmethod
    def poll(cls, context):
        coll = _active(context)
        return coll is not None and avatar.prediction_info(coll) is not None

    def draw(self, context):
        layout = self.layout
        coll = _active(context)
        info = avatar.prediction_info(coll) or {}
        pack = _pack(coll)
        image = avatar.crop_image(coll)
        if image is not None:
            image.preview_ensure()
            layout.template_icon(icon_value=image.preview.icon_id, scale=7.0)
        source = bpy.path.basename(info.get("source", "")) or "photo"
        layout.label(text=f"From {source}", icon="IMAGE_DATA")
        for w in info.get("warnings", []):
            layout.label(text=w, icon="ERROR")
        if pack is None:
            return
        values = props.values_of(coll, pack.id)
        current = avatar.read(coll).slots if values is None else None
        for slot_name, choice, prob, alts in avatar.iter_slot_confidences(coll):
            slot = pack.slot(slot_name)
            now = getattr(values, props.slot_prop(slot_name)) if values is not None else current[slot_name]
            box = layout.box()
            head = box.row()
            head.label(text=slot.label or slot_name)
            head.label(text=f"{slot.option(choice).label} {prob:.0%}",
                       icon="CHECKMARK" if now == choice else "BLANK1")
            row = box.row(align=True)
            for alt in alts:
                if alt["option"] == now:
                    continue
                op = row.operator("likeness.apply_alternative",
                                  text=f"{alt['label']} {alt['probability']:.0%}")
                op.avatar, op.slot, op.option = coll.name, slot_name, alt["option"]
        layout.operator("likeness.clear_prediction", icon="TRASH")


def _avatar_values(layout, context):
    """(collection, pack, per-pack values) of the active avatar; reports an unavailable pack."""
    coll = _active(context)
    pack = _pack(coll)
    values = props.values_of(coll, pack.id) if pack is not None else None
    if values is None:
        layout.label(text="This avatar's pack is not available", icon="ERROR")
    return coll, pack, values


class AvatarPanel(LikenessPanel):
    """A sub-panel about the active avatar: shown only when there is one."""

    @classmethod
    def poll(cls, context):
        return _active(context) is not None


class LIKENESS_PT_shape(AvatarPanel, bpy.types.Panel):
    bl_idname = "LIKENESS_PT_shape"
    bl_label = "Shape"
    bl_parent_id = "LIKENESS_PT_main"

    def draw(self, context):
        layout = self.layout
        coll, pack, values = _avatar_values(layout, context)
        if values is None:
            return
        layout.label(text=f"{coll.name} ({pack.name})", icon="OUTLINER_COLLECTION")
        groups: dict[str, list] = {}
        for p in pack.parameters:
            groups.setdefault(p.group, []).append(p)
        for group, params in groups.items():
            header, body = layout.panel(f"likeness_group_{group}", default_closed=(group != "face"))
            header.label(text=group.replace("_", " ").capitalize())
            if body is None:
                continue
            col = body.column(align=True)
            for p in params:
                col.prop(values, props.param_prop(p.name), slider=True)


class LIKENESS_PT_options(AvatarPanel, bpy.types.Panel):
    bl_idname = "LIKENESS_PT_options"
    bl_label = "Options"
    bl_parent_id = "LIKENESS_PT_main"

    def draw(self, context):
        layout = self.layout
        coll, pack, values = _avatar_values(layout, context)
        if values is None:
            return
        conf = {s: (c, p) for s, c, p, _ in avatar.iter_slot_confidences(coll)}
        col = layout.column()
        for s in pack.slots:
            row = col.row(align=True)
            split = row.split(factor=0.8, align=True)
            split.prop(values, props.slot_prop(s.name))
            if s.name in conf:
                choice, p = conf[s.name]
                split.label(text=f"{p:.0%}" if getattr(values, props.slot_prop(s.name)) == choice
                            else "edited")


CLASSES = (LIKENESS_PT_main, LIKENESS_PT_photo, LIKENESS_PT_shape, LIKENESS_PT_options)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
