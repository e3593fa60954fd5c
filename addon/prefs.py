"""Add-on preferences: an estimator model per pack and the compute device."""
from __future__ import annotations

import bpy
from bpy.props import CollectionProperty, EnumProperty, IntProperty, StringProperty

# The extension's package: "likeness" from a source checkout, "bl_ext.<repo>.likeness" installed.
ROOT_PACKAGE = __package__.rpartition(".")[0]

_DEVICE_ITEMS: list[tuple[str, str, str, int]] = []
_CUDA: list[bool] = []              # cached answer of cuda_available()


def cuda_available() -> bool:
    """Whether onnxruntime offers the CUDA provider (imports onnxruntime on first use only)."""
    if not _CUDA:
        try:
            import onnxruntime
            _CUDA.append("CUDAExecutionProvider" in onnxruntime.get_available_providers())
        except Exception:
            _CUDA.append(False)
    return _CUDA[0]


def _device_items(self, context):
    items = [("AUTO", "Automatic", "CUDA when onnxruntime can use it, else the CPU", 0),
             ("CPU", "CPU", "Run the estimator on the CPU", 1)]
    if cuda_available():
        items.append(("CUDA", "CUDA", "Run the estimator on the GPU (onnxruntime-gpu)", 2))
    _DEVICE_ITEMS[:] = items
    return _DEVICE_ITEMS


class LIKENESS_PG_model(bpy.types.PropertyGroup):
    pack: StringProperty(name="Pack", description="Pack id the model estimates avatars of")
    path: StringProperty(name="Model", description="Estimator .onnx file", subtype="FILE_PATH")


class LikenessPreferences(bpy.types.AddonPreferences):
    bl_idname = ROOT_PACKAGE

    models: CollectionProperty(type=LIKENESS_PG_model, name="Models")
    device: EnumProperty(name="Device", description="Where the estimator runs", items=_device_items)

    def draw(self, context):
        layout = self.layout
        layout.prop(self, "device")
        box = layout.box()
        box.label(text="Estimator model per pack (empty: the installed or shipped model)")
        for i, entry in enumerate(self.models):
            row = box.row(align=True)
            row.prop(entry, "pack", text="")
            row.prop(entry, "path", text="")
            op = row.operator("likeness.model_remove", text="", icon="X")
            op.index = i
        box.operator("likeness.model_add", icon="ADD")


class LIKENESS_OT_model_add(bpy.types.Operator):
    """Add a model entry for a pack to the preferences"""
    bl_idname = "likeness.model_add"
    bl_label = "Add Model"
    bl_options = {"REGISTER", "INTERNAL"}

    pack: StringProperty(name="Pack", default="stylized")
    path: StringProperty(name="Model", subtype="FILE_PATH")

    def execute(self, context):
        prefs = get_prefs(context)
        if prefs is None:
            self.report({"ERROR"}, "the Likeness add-on is not enabled in the preferences")
            return {"CANCELLED"}
        set_model(self.pack, self.path, context)
        return {"FINISHED"}


class LIKENESS_OT_model_remove(bpy.types.Operator):
    """Remove this model entry"""
    bl_idname = "likeness.model_remove"
    bl_label = "Remove Model"
    bl_options = {"REGISTER", "INTERNAL"}

    index: IntProperty()

    def execute(self, context):
        prefs = get_prefs(context)
        if prefs is None or not 0 <= self.index < len(prefs.models):
            return {"CANCELLED"}
        prefs.models.remove(self.index)
        return {"FINISHED"}


def get_prefs(context=None):
    """The add-on's preferences (None when it was registered without the add-on system)."""
    context = context or bpy.context
    addon = context.preferences.addons.get(ROOT_PACKAGE)
    return addon.preferences if addon is not None else None


def model_for(pack_id: str, context=None) -> str:
    """The model file the preferences name for a pack ('' if none)."""
    prefs = get_prefs(context)
    if prefs is None:
        return ""
    for entry in prefs.models:
        if entry.pack == pack_id and entry.path.strip():
            return bpy.path.abspath(entry.path.strip())
    return ""


def set_model(pack_id: str, path: str, context=None) -> None:
    prefs = get_prefs(context)
    if prefs is None:
        raise RuntimeError("the Likeness add-on is not enabled in the preferences")
    for entry in prefs.models:
        if entry.pack == pack_id:
            entry.path = path
            return
    entry = prefs.models.add()
    entry.pack, entry.path = pack_id, path


def device(context=None) -> str:
    """'auto', 'cpu' or 'cuda' for ``backend.contract.load_model``."""
    prefs = get_prefs(context)
    if prefs is None:
        return "auto"
    return {"CPU": "cpu", "CUDA": "cuda"}.get(prefs.device, "auto")


CLASSES = (LIKENESS_PG_model, LikenessPreferences, LIKENESS_OT_model_add, LIKENESS_OT_model_remove)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    _DEVICE_ITEMS.clear()
