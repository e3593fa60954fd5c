"""Operators over ``render_engine.avatar``: add, select, randomize, reset, copy/paste,
import/export vectors, export the avatar (``render_engine.export``), apply an alternative. Every change is one undo step ('REGISTER', 'UNDO').

Each operator works on the avatar named by its ``avatar`` property, else on the active avatar (the
one holding the active object, else the last added). Errors meant for users are reported with
``self.report({'ERROR'}, ...)`` and the operator returns CANCELLED with nothing changed.
"""
from __future__ import annotations

import bpy
from bpy.props import BoolProperty, EnumProperty, FloatProperty, IntProperty, StringProperty
from bpy_extras.io_utils import ExportHelper, ImportHelper

from ..backend.errors import UserError
from ..render_engine import avatar


def has_avatar(context) -> bool:
    return getattr(context, "scene", None) is not None and bool(avatar.avatars(context.scene))


def make_active(context, coll) -> None:
    """Select the avatar's root object and make it active (the panel then edits this avatar)."""
    ob = avatar.root_object(coll)
    view_layer = getattr(context, "view_layer", None)
    if ob is None or view_layer is None or view_layer.objects.get(ob.name) is None:
        return
    for other in context.selected_objects if hasattr(context, "selected_objects") else ():
        other.select_set(False)
    ob.select_set(True)
    view_layer.objects.active = ob


class AvatarOperator:
    """Mixin: the target avatar, and user errors turned into reports."""

    avatar: StringProperty(name="Avatar", description="Avatar collection (empty: the active avatar)",
                           options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        if not has_avatar(context):
            cls.poll_message_set("Add an avatar first")
            return False
        return True

    def target(self, context):
        return avatar.get_avatar(self.avatar, context)

    def execute(self, context):
        try:
            return self.run(context)
        except UserError as e:
            self.report({"ERROR"}, str(e))
        except Exception as e:               # a bug: report it instead of a traceback dialog
            self.report({"ERROR"}, f"{type(e).__name__}: {e}")
            import traceback
            traceback.print_exc()
        return {"CANCELLED"}

    def run(self, context):
        raise NotImplementedError


class LIKENESS_OT_add_avatar(bpy.types.Operator):
    """Add an avatar of a pack to the scene"""
    bl_idname = "likeness.add_avatar"
    bl_label = "Add Avatar"
    bl_options = {"REGISTER", "UNDO"}

    pack: StringProperty(name="Pack", description="Pack id or folder (empty: the panel's pack)",
                         options={"SKIP_SAVE"})

    @classmethod
    def poll(cls, context):
        return getattr(context, "scene", None) is not None

    def execute(self, context):
        from . import props
        pack = self.pack or getattr(getattr(context.scene, "likeness", None), "pack", "") or "default"
        try:
            coll = avatar.add_avatar(pack, context)
        except UserError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        props.ensure_pack(avatar.pack_of(coll))
        props.sync(coll, avatar.read(coll))
        make_active(context, coll)
        self.report({"INFO"}, f"Added avatar '{coll.name}' ({avatar.pack_of(coll).name})")
        return {"FINISHED"}


class LIKENESS_OT_remove_avatar(AvatarOperator, bpy.types.Operator):
    """Delete the avatar: its collection, objects and the data only they use"""
    bl_idname = "likeness.remove_avatar"
    bl_label = "Delete Avatar"
    bl_options = {"REGISTER", "UNDO"}

    def run(self, context):
        coll = self.target(context)
        name = coll.name
        avatar.remove_avatar(coll)
        self.report({"INFO"}, f"Deleted avatar '{name}'")
        return {"FINISHED"}


class LIKENESS_OT_select_avatar(AvatarOperator, bpy.types.Operator):
    """Make this avatar the active one (selects its root object)"""
    bl_idname = "likeness.select_avatar"
    bl_label = "Select Avatar"
    bl_options = {"REGISTER", "UNDO"}

    def run(self, context):
        make_active(context, self.target(context))
        return {"FINISHED"}


class LIKENESS_OT_randomize(AvatarOperator, bpy.types.Operator):
    """A random avatar from the pack's distributions; the same seed gives the same avatar"""
    bl_idname = "likeness.randomize"
    bl_label = "Randomize"
    bl_options = {"REGISTER", "UNDO"}

    seed: IntProperty(name="Seed", default=-1, min=-1, options={"SKIP_SAVE"},
                      description="Seed (-1: the panel's seed, which then advances by one)")

    def run(self, context):
        coll = self.target(context)
        settings = getattr(context.scene, "likeness", None)
        seed = self.seed
        if seed < 0:
            seed = settings.seed if settings is not None else 0
            if settings is not None:
                settings.seed = seed + 1
            self.seed = seed                 # redo ("Adjust Last Operation") repeats this seed
        avatar.randomize(coll, seed)
        self.report({"INFO"}, f"Randomized '{coll.name}' with seed {seed}")
        return {"FINISHED"}


class LIKENESS_OT_reset(AvatarOperator, bpy.types.Operator):
    """Set every parameter and slot to the pack's default"""
    bl_idname = "likeness.reset"
    bl_label = "Reset"
    bl_options = {"REGISTER", "UNDO"}

    def run(self, context):
        avatar.reset(self.target(context))
        return {"FINISHED"}


class LIKENESS_OT_copy_vector(AvatarOperator, bpy.types.Operator):
    """Copy the avatar's vector (JSON) to the clipboard"""
    bl_idname = "likeness.copy_vector"
    bl_label = "Copy Vector"
    bl_options = {"REGISTER"}

    def run(self, context):
        coll = self.target(context)
        context.window_manager.clipboard = avatar.vector_to_json(avatar.read(coll))
        self.report({"INFO"}, f"Copied the vector of '{coll.name}'")
        return {"FINISHED"}


class LIKENESS_OT_paste_vector(AvatarOperator, bpy.types.Operator):
    """Apply a vector (JSON) from the clipboard to the avatar"""
    bl_idname = "likeness.paste_vector"
    bl_label = "Paste Vector"
    bl_options = {"REGISTER", "UNDO"}

    text: StringProperty(name="Text", description="Vector JSON (empty: the clipboard)",
                         options={"SKIP_SAVE", "HIDDEN"})

    def run(self, context):
        coll = self.target(context)
        text = self.text or context.window_manager.clipboard
        if not text.strip():
            raise UserError("the clipboard is empty: copy an avatar vector (JSON) first")
        avatar.apply(coll, avatar.vector_from_json(coll, text))
        self.report({"INFO"}, f"Pasted a vector onto '{coll.name}'")
        return {"FINISHED"}


class LIKENESS_OT_export_vector(AvatarOperator, bpy.types.Operator, ExportHelper):
    """Save the avatar's vector as a JSON file"""
    bl_idname = "likeness.export_vector"
    bl_label = "Export Vector"
    bl_options = {"REGISTER"}

    filename_ext = ".json"
    filter_glob: StringProperty(default="*.json", options={"HIDDEN"})

    def run(self, context):
        import os
        coll = self.target(context)
        path = bpy.path.abspath(self.filepath)
        tmp = path + ".tmp"
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(avatar.vector_to_json(avatar.read(coll)) + "\n")
            os.replace(tmp, path)
        except OSError as e:
            raise UserError(f"cannot write {path}: {e.strerror or e}") from None
        self.report({"INFO"}, f"Saved the vector of '{coll.name}' to {path}")
        return {"FINISHED"}


class LIKENESS_OT_export_avatar(AvatarOperator, bpy.types.Operator, ExportHelper):
    """Export the avatar for a game engine (glTF or FBX): only its chosen options, with its
    skeleton, shape keys and materials"""
    bl_idname = "likeness.export_avatar"
    bl_label = "Export Avatar"
    bl_options = {"REGISTER"}

    filename_ext = ".glb"
    filter_glob: StringProperty(default="*.glb;*.gltf;*.fbx", options={"HIDDEN"})
    # the file gets the format's extension (``export_avatar``)
    format: EnumProperty(name="Format", default="glb", items=(
        ("glb", "glTF Binary (.glb)", "One file: meshes, morph targets, skin, materials"),
        ("gltf", "glTF Separate (.gltf + .bin)", "JSON with a binary buffer beside it"),
        ("fbx", "FBX (.fbx)", "Meshes, blend shapes, skeleton, materials"),
    ))
    bake_identity: BoolProperty(
        name="Bake Identity Sliders", default=False,
        description="Apply the face-shape and feature sliders into the meshes; only expression "
                    "shape keys stay")
    scale: FloatProperty(name="Scale", default=0.1, min=1e-4, soft_max=10.0,
                         description="Metres per Blender unit (0.1: a 20 cm wide head)")

    def run(self, context):
        from ..render_engine.export import export_avatar
        coll = self.target(context)
        info = export_avatar(coll, self.filepath, format=self.format,
                             bake_identity=self.bake_identity, scale=self.scale, context=context)
        self.report({"INFO"}, f"Exported '{coll.name}' to {info['file']} "
                              f"({info['bytes'] / 1e6:.1f} MB, {len(info['objects'])} objects)")
        return {"FINISHED"}


class LIKENESS_OT_import_vector(AvatarOperator, bpy.types.Operator, ImportHelper):
    """Apply a vector JSON file to the avatar"""
    bl_idname = "likeness.import_vector"
    bl_label = "Import Vector"
    bl_options = {"REGISTER", "UNDO"}

    filename_ext = ".json"
    filter_glob: StringProperty(default="*.json", options={"HIDDEN"})

    def run(self, context):
        coll = self.target(context)
        path = bpy.path.abspath(self.filepath)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"cannot read {path}: {getattr(e, 'strerror', None) or e}") from None
        avatar.apply(coll, avatar.vector_from_json(coll, text))
        self.report({"INFO"}, f"Applied {bpy.path.basename(path)} to '{coll.name}'")
        return {"FINISHED"}


class LIKENESS_OT_apply_alternative(AvatarOperator, bpy.types.Operator):
    """Use this option instead of the model's choice"""
    bl_idname = "likeness.apply_alternative"
    bl_label = "Apply Alternative"
    bl_options = {"REGISTER", "UNDO"}

    slot: StringProperty(name="Slot", options={"SKIP_SAVE"})
    option: StringProperty(name="Option", options={"SKIP_SAVE"})

    @classmethod
    def description(cls, context, properties):
        return f"Use '{properties.option}' for {properties.slot.replace('_', ' ')}"

    def run(self, context):
        coll = self.target(context)
        avatar.apply_alternative(coll, self.slot, self.option)
        return {"FINISHED"}


class LIKENESS_OT_clear_prediction(AvatarOperator, bpy.types.Operator):
    """Forget the photo prediction shown for this avatar (the avatar keeps its shape)"""
    bl_idname = "likeness.clear_prediction"
    bl_label = "Clear Photo Result"
    bl_options = {"REGISTER", "UNDO"}

    def run(self, context):
        coll = self.target(context)
        image = avatar.crop_image(coll)
        for key in (avatar.PREDICTION_PROP, avatar.CROP_PROP):
            if key in coll:
                del coll[key]
        if image is not None and image.users == 0:
            bpy.data.images.remove(image)
        return {"FINISHED"}


CLASSES = (
    LIKENESS_OT_add_avatar, LIKENESS_OT_remove_avatar, LIKENESS_OT_select_avatar,
    LIKENESS_OT_randomize, LIKENESS_OT_reset, LIKENESS_OT_copy_vector, LIKENESS_OT_paste_vector,
    LIKENESS_OT_export_vector, LIKENESS_OT_import_vector, LIKENESS_OT_apply_alternative,
    LIKENESS_OT_export_avatar,
    LIKENESS_OT_clear_prediction,
)


register, unregister = bpy.utils.register_classes_factory(CLASSES)
