"""Create from photo: photo -> estimator -> the active avatar (or a new one), as one undo step.

``invoke`` (the UI) opens a file browser; the prediction then runs in a background thread while a
modal timer keeps Blender responsive and shows progress; the result is applied on the main thread
when the thread is done (bpy is not thread-safe). ``execute`` alone (scripts, headless, tests)
runs synchronously. Errors (no face, unreadable photo, missing or mismatched model, a pack whose
.blend lacks objects) are reported and the operator returns CANCELLED with nothing changed: the
avatar is only touched after a successful prediction.

The estimator comes from the operator's ``model`` property, else the preferences' model for the
avatar's pack, else ``backend.models.find_model``. Loaded predictors are cached per model file.
"""
from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import bpy
from bpy.props import BoolProperty, StringProperty

from ..backend.errors import UserError
from ..render_engine import avatar

_CACHE_LOCK = threading.Lock()
_PREDICTORS: dict[tuple, object] = {}
_MAX_CACHED = 3


def resolve_model(pack, explicit: str = "", context=None) -> Path:
    """The estimator file for ``pack``: explicit, else the preferences', else an installed one."""
    from . import prefs
    if explicit:
        return Path(bpy.path.abspath(explicit))
    configured = prefs.model_for(pack.id, context)
    if configured:
        return Path(configured)
    from ..backend.models import find_model
    try:
        return find_model(pack)
    except UserError:
        raise UserError(f"no estimator model for pack '{pack.id}': choose one in Preferences > "
                        "Add-ons > Likeness (Models), or install one with `likeness retrain --pack "
                        f"{pack.id} --install`") from None


def get_predictor(pack, model_path: Path, device: str):
    """A cached ``backend.predict.Predictor`` (reloaded when the model file changes)."""
    from ..backend.predict import Predictor
    try:
        st = model_path.stat()
        stamp = (st.st_mtime_ns, st.st_size)
    except OSError:
        stamp = None                    # load_model reports the missing file
    key = (pack.id, pack.schema_hash, str(model_path), stamp, device)
    with _CACHE_LOCK:
        pred = _PREDICTORS.get(key)
        if pred is not None:
            return pred
    pred = Predictor(pack, model_path, device=device)
    with _CACHE_LOCK:
        while len(_PREDICTORS) >= _MAX_CACHED:
            _PREDICTORS.pop(next(iter(_PREDICTORS)))
        _PREDICTORS[key] = pred
    return pred


def clear_cache() -> None:
    with _CACHE_LOCK:
        _PREDICTORS.clear()


class PhotoJob:
    """One photo -> ``Prediction``, runnable in a thread (no bpy calls in ``run``)."""

    def __init__(self, pack, model_path: Path, device: str, photo: str):
        self.pack = pack
        self.model_path = model_path
        self.device = device
        self.photo = photo
        self.prediction = None
        self.error: str | None = None
        self.stage = "starting"
        self.progress = 0.0
        self.done = threading.Event()
        self.thread: threading.Thread | None = None
        self.seconds = 0.0

    def run(self) -> None:
        t = time.perf_counter()
        try:
            self.stage, self.progress = "loading the model", 0.1
            predictor = get_predictor(self.pack, self.model_path, self.device)
            self.stage, self.progress = "finding the face", 0.4
            self.prediction = predictor.predict(self.photo)
            self.stage, self.progress = "done", 1.0
        except UserError as e:
            self.error = str(e)
        except MemoryError:
            self.error = f"{Path(self.photo).name}: not enough memory to read this photo"
        except Exception as e:          # never let a bug take Blender down: report it
            import traceback
            traceback.print_exc()
            self.error = f"could not process {Path(self.photo).name}: {type(e).__name__}: {e}"
        finally:
            self.seconds = time.perf_counter() - t
            self.done.set()

    def start(self) -> None:
        self.thread = threading.Thread(target=self.run, name="likeness-photo", daemon=True)
        self.thread.start()

    def wait(self, timeout: float | None = None) -> bool:
        return self.done.wait(timeout)


def _target_and_pack(op, context):
    """(avatar collection or None, pack) the photo is for."""
    if op.avatar:
        coll = avatar.get_avatar(op.avatar, context)
        return coll, avatar.pack_of(coll)
    coll = avatar.active_avatar(context)
    if coll is not None:
        return coll, avatar.pack_of(coll)
    settings = getattr(context.scene, "likeness", None)
    return None, avatar.as_pack(op.pack or getattr(settings, "pack", "") or "default")


def finish(op, context, job: PhotoJob, coll_name: str):
    """Apply a finished job on the main thread: report and return the operator result."""
    from . import operators, props
    if job.error:
        op.report({"ERROR"}, job.error)
        return {"CANCELLED"}
    pred = job.prediction
    new = False
    try:
        if coll_name:
            coll = bpy.data.collections.get(coll_name)
            if coll is None or not avatar.is_avatar(coll):
                raise UserError(f"avatar '{coll_name}' was deleted while the photo was processed")
        else:
            coll = avatar.add_avatar(job.pack, context)
            new = True
        props.ensure_pack(avatar.pack_of(coll))
        avatar.apply_prediction(coll, pred, job.model_path)
    except UserError as e:
        if new:
            avatar.remove_avatar(coll)
        op.report({"ERROR"}, str(e))
        return {"CANCELLED"}
    if new:
        operators.make_active(context, coll)
    for w in pred.warnings:
        op.report({"WARNING"}, w)
    low = sorted((info[pred.vector.slots[s]], s) for s, info in pred.probabilities.items()
                 if info[pred.vector.slots[s]] < 0.5)
    names = [s.replace("_", " ") for _, s in low[:3]] + ([f"{len(low) - 3} more"] if len(low) > 3 else [])
    note = f"; least sure about {', '.join(names)} (see the alternatives)" if low else ""
    op.report({"INFO"}, f"'{coll.name}' from {Path(str(pred.source)).name} in "
                        f"{job.seconds:.2f} s{note}")
    return {"FINISHED"}


class LIKENESS_OT_create_from_photo(bpy.types.Operator):
    """Estimate the avatar from a photo of a face (applies to the active avatar, or adds one)"""
    bl_idname = "likeness.create_from_photo"
    bl_label = "Create from Photo…"
    bl_options = {"REGISTER", "UNDO"}

    filepath: StringProperty(name="Photo", subtype="FILE_PATH", options={"SKIP_SAVE"})
    filter_image: BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})
    filter_folder: BoolProperty(default=True, options={"HIDDEN", "SKIP_SAVE"})
    avatar: StringProperty(name="Avatar", description="Avatar collection (empty: the active "
                           "avatar, or a new one)", options={"SKIP_SAVE"})
    pack: StringProperty(name="Pack", description="Pack of a new avatar (empty: the panel's pack)",
                         options={"SKIP_SAVE"})
    model: StringProperty(name="Model", subtype="FILE_PATH", options={"SKIP_SAVE"},
                          description="Estimator .onnx (empty: the preferences' model for the "
                          "pack, else the installed one)")
    background: BoolProperty(default=False, options={"HIDDEN", "SKIP_SAVE"},
                             description="Run in a background thread with progress (set by invoke)")

    _job: PhotoJob | None = None
    _timer = None
    _coll_name = ""

    @classmethod
    def poll(cls, context):
        return getattr(context, "scene", None) is not None

    def invoke(self, context, event):
        self.background = True
        settings = getattr(context.scene, "likeness", None)
        if self.filepath:
            return self.execute(context)
        if settings is not None and settings.last_photo_dir:
            self.filepath = os.path.join(settings.last_photo_dir, "")
        context.window_manager.fileselect_add(self)
        return {"RUNNING_MODAL"}

    def _prepare(self, context) -> PhotoJob:
        path = bpy.path.abspath(self.filepath)
        if not path:
            raise UserError("choose a photo")
        if os.path.isdir(path):
            raise UserError(f"{path} is a folder: choose a photo file")
        coll, pack = _target_and_pack(self, context)
        self._coll_name = coll.name if coll is not None else ""
        from . import prefs
        model_path = resolve_model(pack, self.model, context)
        settings = getattr(context.scene, "likeness", None)
        if settings is not None:
            settings.last_photo_dir = os.path.dirname(path)
        return PhotoJob(pack, model_path, prefs.device(context), path)

    def execute(self, context):
        try:
            job = self._prepare(context)
        except UserError as e:
            self.report({"ERROR"}, str(e))
            return {"CANCELLED"}
        # redo ("Adjust Last Operation") must finish synchronously, as must headless runs
        if (self.background and not self.options.is_repeat and not bpy.app.background
                and context.window is not None):
            return self._start_modal(context, job)
        job.run()
        return finish(self, context, job, self._coll_name)

    # ---- background thread + modal timer (interactive sessions) ------------------------------
    def _start_modal(self, context, job: PhotoJob):
        self._job = job
        wm = context.window_manager
        self._timer = wm.event_timer_add(0.1, window=context.window)
        wm.progress_begin(0, 100)
        wm.modal_handler_add(self)
        job.start()
        self._status(context, f"Likeness: {job.stage}… (Esc to cancel)")
        return {"RUNNING_MODAL"}

    def _status(self, context, text):
        ws = getattr(context, "workspace", None)
        if ws is not None:
            ws.status_text_set(text)

    def _cleanup(self, context):
        wm = context.window_manager
        if self._timer is not None:
            wm.event_timer_remove(self._timer)
            self._timer = None
        wm.progress_end()
        self._status(context, None)

    def modal(self, context, event):
        job = self._job
        if event.type == "ESC":
            self._cleanup(context)
            self.report({"WARNING"}, "Create from photo cancelled")
            return {"CANCELLED"}
        if event.type != "TIMER":
            return {"PASS_THROUGH"}
        context.window_manager.progress_update(int(job.progress * 100))
        if not job.done.is_set():
            self._status(context, f"Likeness: {job.stage}… (Esc to cancel)")
            return {"RUNNING_MODAL"}
        self._cleanup(context)
        return finish(self, context, job, self._coll_name)

    def cancel(self, context):
        self._cleanup(context)


CLASSES = (LIKENESS_OT_create_from_photo,)


def register():
    for cls in CLASSES:
        bpy.utils.register_class(cls)


def unregister():
    for cls in reversed(CLASSES):
        bpy.utils.unregister_class(cls)
    clear_cache()
