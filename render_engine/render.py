"""Camera, look and rendering of a pack's avatar: RGB images and segmentation masks.

The camera and the look come from the manifest's ``[camera]`` table (all keys optional)::

    [camera]
    type = "perspective"          # or "orthographic"
    location = [0.0, -9.4, -0.08]
    look_at = [0.0, 0.0, -0.08]
    lens = 90.0                   # mm, perspective
    sensor_width = 36.0           # mm
    ortho_scale = 3.8             # orthographic: visible width in scene units
    clip_start = 0.1
    clip_end = 100.0
    background = "#e8e5e0"        # plain world colour (sRGB hex)

    [camera.look]                 # Workbench look of the RGB pass
    light = "studio"              # studio | matcap | flat
    studio_light = "studio.sl"    # a studio light (or matcap) name shipped with Blender
    rotate_z = 0.0                # studio light rotation in degrees (world-space lighting)
    cavity = true                 # cavity shading: ridge/valley accents
    cavity_type = "WORLD"         # WORLD | SCREEN | BOTH
    cavity_ridge = 1.0
    cavity_valley = 1.0
    curvature_ridge = 1.0
    curvature_valley = 1.0
    outline = false               # Workbench object outline (drawn around selected objects only)
    outline_color = "#2a2220"
    specular = true               # specular highlights
    shadows = false               # Workbench cast shadows
    shadow_intensity = 0.4
    aa = "8"                      # anti-aliasing of plain F12 renders: OFF FXAA 5 8 11 16 32
    supersample = 2               # render_sample: RGB at N x resolution without AA, box-filtered
                                  # down (much faster than Workbench AA on software GL); 1 = use aa
    cycles_samples = 16           # samples when rendering with Cycles (CPU, two area lights, the
                                  # film composited over the background colour)

    [camera.jitter]               # seeded variation of render_sample(jitter_seed=...)
    head_root = "HeadRoot"        # object rotated for the head pose
    yaw = 6.0                     # maximum absolute angles in degrees
    pitch = 4.0
    roll = 4.0
    light = 35.0                  # studio light rotation range in degrees

Masks: a second Workbench pass with flat lighting and no anti-aliasing renders every material in a
unique colour of its CelebAMask-HQ class (``[segmentation]`` of the manifest); the colours are
decoded back to class ids. Transparent materials (eyeglass lenses) are opaque in that pass, so the
whole glasses area, lenses included, is labelled ``eyeglasses`` as in CelebAMask-HQ. Everything
the passes change is restored afterwards.
"""
from __future__ import annotations

import math
import os
import sys
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import bpy
import numpy as np
from mathutils import Euler, Vector

from ..backend.schema import CLASSES, CLASS_IDS, Pack
from .rig import hex_to_linear

CAMERA_NAME = "LikenessCamera"
WORLD_NAME = "LikenessWorld"
LIGHT_PREFIX = "LikenessLight"

DEFAULT_CAMERA = {
    "type": "perspective", "location": [0.0, -9.4, -0.08], "look_at": [0.0, 0.0, -0.08],
    "lens": 90.0, "sensor_width": 36.0, "ortho_scale": 3.8, "clip_start": 0.1, "clip_end": 100.0,
    "background": "#e8e5e0",
}
DEFAULT_LOOK = {
    "light": "studio", "studio_light": "studio.sl", "rotate_z": 0.0, "cavity": False,
    "cavity_type": "WORLD", "cavity_ridge": 1.0, "cavity_valley": 1.0, "curvature_ridge": 1.0,
    "curvature_valley": 1.0, "outline": False, "outline_color": "#2a2220", "specular": True,
    "shadows": False, "shadow_intensity": 0.4, "aa": "8", "supersample": 2, "cycles_samples": 16,
}
DEFAULT_JITTER = {"head_root": "", "yaw": 6.0, "pitch": 4.0, "roll": 4.0, "light": 35.0}

# Mask pass: class i is drawn in sRGB colour with channels (d * 127.5) for its base-3 digits.
_LEVELS = (0, 128, 255)


def class_color_srgb(class_id: int) -> tuple[int, int, int]:
    r, rem = divmod(class_id, 9)
    g, b = divmod(rem, 3)
    return _LEVELS[r], _LEVELS[g], _LEVELS[b]


def _class_color_linear(class_id: int) -> tuple[float, float, float]:
    from .rig import srgb_to_linear
    return tuple(srgb_to_linear(c / 255.0) for c in class_color_srgb(class_id))


def decode_mask(rgb: np.ndarray) -> np.ndarray:
    """Class ids (uint8 HxW) from a mask-pass image; anything that is not a palette colour
    (there should be none) becomes background."""
    x = rgb[..., :3].astype(np.int16)
    digits = np.clip(np.rint(x / 127.5), 0, 2).astype(np.int16)
    err = np.abs(x - digits * 127.5).max(-1)
    code = digits[..., 0] * 9 + digits[..., 1] * 3 + digits[..., 2]
    code[(err > 24) | (code >= len(CLASSES))] = 0
    return code.astype(np.uint8)


# --------------------------------------------------------------------------------------------
# Setup
# --------------------------------------------------------------------------------------------

def camera_settings(pack: Pack) -> dict[str, Any]:
    cam = dict(DEFAULT_CAMERA)
    cam.update({k: v for k, v in pack.camera.items() if k not in ("look", "jitter")})
    return cam


def look_settings(pack: Pack) -> dict[str, Any]:
    look = dict(DEFAULT_LOOK)
    look.update(pack.camera.get("look", {}) or {})
    return look


def jitter_settings(pack: Pack) -> dict[str, Any]:
    jit = dict(DEFAULT_JITTER)
    jit.update(pack.camera.get("jitter", {}) or {})
    return jit


def setup_render(pack: Pack, resolution: int = 256, engine: str = "workbench", scene=None):
    """Create or update the camera, world and render settings from the manifest."""
    scene = scene or bpy.context.scene
    cs = camera_settings(pack)
    look = look_settings(pack)

    cam_ob = bpy.data.objects.get(CAMERA_NAME)
    if cam_ob is None or cam_ob.type != "CAMERA":
        cam_ob = bpy.data.objects.new(CAMERA_NAME, bpy.data.cameras.new(CAMERA_NAME))
    if scene.collection.objects.get(cam_ob.name) is None and not any(
            c.objects.get(cam_ob.name) for c in scene.collection.children_recursive):
        scene.collection.objects.link(cam_ob)
    cam = cam_ob.data
    cam.type = "ORTHO" if str(cs["type"]).lower().startswith("ortho") else "PERSP"
    cam.lens = float(cs["lens"])
    cam.sensor_fit = "HORIZONTAL"
    cam.sensor_width = float(cs["sensor_width"])
    cam.ortho_scale = float(cs["ortho_scale"])
    cam.clip_start = float(cs["clip_start"])
    cam.clip_end = float(cs["clip_end"])
    loc = Vector(cs["location"])
    cam_ob.location = loc
    direction = Vector(cs["look_at"]) - loc
    cam_ob.rotation_mode = "XYZ"
    cam_ob.rotation_euler = direction.to_track_quat("-Z", "Y").to_euler()
    scene.camera = cam_ob

    world = scene.world or bpy.data.worlds.get(WORLD_NAME) or bpy.data.worlds.new(WORLD_NAME)
    scene.world = world
    world.color = hex_to_linear(cs["background"])

    r = scene.render
    r.resolution_x = r.resolution_y = int(resolution)
    r.resolution_percentage = 100
    r.pixel_aspect_x = r.pixel_aspect_y = 1.0
    r.film_transparent = False
    r.dither_intensity = 0.0
    r.use_compositing = False
    r.use_sequencer = False
    r.image_settings.file_format = "PNG"
    r.image_settings.color_mode = "RGB"
    r.image_settings.color_depth = "8"
    r.image_settings.compression = 0
    vs = scene.view_settings
    scene.display_settings.display_device = "sRGB"
    vs.view_transform = "Standard"
    vs.look = "None"
    vs.exposure = 0.0
    vs.gamma = 1.0
    vs.use_curve_mapping = False

    # Workbench look (also used by the mask pass, whatever the RGB engine)
    sh = scene.display.shading
    light = str(look["light"]).upper()
    sh.light = light if light in ("STUDIO", "MATCAP", "FLAT") else "STUDIO"
    if sh.light in ("STUDIO", "MATCAP") and look.get("studio_light"):
        try:
            sh.studio_light = str(look["studio_light"])
        except TypeError:
            pass
    sh.color_type = "MATERIAL"
    sh.use_world_space_lighting = True
    sh.studiolight_rotate_z = math.radians(float(look["rotate_z"]))
    sh.show_cavity = bool(look["cavity"])
    sh.cavity_type = str(look["cavity_type"]).upper()
    sh.cavity_ridge_factor = float(look["cavity_ridge"])
    sh.cavity_valley_factor = float(look["cavity_valley"])
    sh.curvature_ridge_factor = float(look["curvature_ridge"])
    sh.curvature_valley_factor = float(look["curvature_valley"])
    sh.show_object_outline = bool(look["outline"])
    sh.object_outline_color = hex_to_linear(look["outline_color"])
    sh.show_specular_highlight = bool(look["specular"])
    sh.show_shadows = bool(look["shadows"])
    sh.shadow_intensity = float(look["shadow_intensity"])
    sh.show_xray = False
    sh.show_backface_culling = False
    sh.background_type = "WORLD"
    scene.display.render_aa = str(look["aa"])

    engine = engine.lower()
    for ob in [o for o in bpy.data.objects if o.name.startswith(LIGHT_PREFIX)]:
        bpy.data.objects.remove(ob, do_unlink=True)
    if engine == "cycles":
        r.engine = "CYCLES"
        scene.cycles.device = "CPU"
        scene.cycles.samples = int(look["cycles_samples"])
        scene.cycles.use_adaptive_sampling = True
        scene.cycles.use_denoising = False
        scene.cycles.max_bounces = 3
        scene.cycles.diffuse_bounces = 1
        scene.cycles.glossy_bounces = 1
        scene.cycles.transmission_bounces = 2
        scene.cycles.transparent_max_bounces = 8
        scene.cycles.caustics_reflective = scene.cycles.caustics_refractive = False
        if world.node_tree is None:          # Blender < 5 worlds need nodes switched on
            world.use_nodes = True
        bg = world.node_tree.nodes.get("Background") if world.node_tree else None
        if bg is not None:
            bg.inputs["Color"].default_value = (*hex_to_linear(cs["background"]), 1.0)
            bg.inputs["Strength"].default_value = 0.55
        target = Vector(cs["look_at"])
        for name, offset, energy, size in (("Key", (-4.0, -6.0, 4.0), 380.0, 5.0),
                                           ("Fill", (5.0, -5.0, 1.0), 140.0, 6.0)):
            ld = bpy.data.lights.new(f"{LIGHT_PREFIX}.{name}", "AREA")
            ld.energy = energy
            ld.size = size
            lo = bpy.data.objects.new(f"{LIGHT_PREFIX}.{name}", ld)
            lo.location = target + Vector(offset)
            lo.rotation_euler = (target - lo.location).to_track_quat("-Z", "Y").to_euler()
            scene.collection.objects.link(lo)
    elif engine == "workbench":
        r.engine = "BLENDER_WORKBENCH"
    else:
        raise ValueError(f"unknown engine '{engine}' (workbench, cycles)")
    scene["likeness_render"] = {"pack": pack.id, "resolution": int(resolution), "engine": engine}
    return cam_ob


def _ensure_setup(pack: Pack, resolution: int, scene, engine: str | None = None) -> None:
    info = scene.get("likeness_render")
    cam = bpy.data.objects.get(CAMERA_NAME)
    current = str(info.get("engine", "workbench")) if info is not None else "workbench"
    engine = (engine or current).lower()
    if (info is None or cam is None or scene.camera != cam or info.get("pack") != pack.id
            or int(info.get("resolution", 0)) != int(resolution) or engine != current):
        setup_render(pack, resolution, engine=engine, scene=scene)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

_TMP: Path | None = None


def _tmpdir() -> Path:
    global _TMP
    if _TMP is None or not _TMP.is_dir():
        import atexit
        import shutil
        _TMP = Path(tempfile.mkdtemp(prefix="likeness-render-"))
        atexit.register(shutil.rmtree, _TMP, True)
    return _TMP


EGL_NOISE = b"EGL Error (0x3009)"     # Blender's first GPU context on a headless machine: harmless


@contextmanager
def quiet_stdout():
    """Blender logs a 'Saved: ...' line per render on the C-level stdout; keep job logs readable.
    The C-level stderr is passed on without the EGL lines a headless GPU context prints."""
    fd, efd = 1, 2                  # Blender's C code writes to these, whatever sys.stdout is
    try:
        os.fstat(fd)
        os.fstat(efd)
        sys.stdout.flush()
        sys.stderr.flush()
    except (AttributeError, OSError, ValueError):
        yield
        return
    saved, saved_err = os.dup(fd), os.dup(efd)
    devnull = os.open(os.devnull, os.O_WRONLY)
    err = tempfile.TemporaryFile()
    os.dup2(devnull, fd)
    os.dup2(err.fileno(), efd)
    try:
        yield
    finally:
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, fd)
        os.dup2(saved_err, efd)
        os.close(saved)
        os.close(saved_err)
        os.close(devnull)
        err.seek(0)
        kept = b"".join(ln for ln in err.read().splitlines(keepends=True) if not ln.startswith(EGL_NOISE))
        err.close()
        if kept:
            os.write(efd, kept)


def _read_png(path: Path, channels: int = 3) -> np.ndarray:
    """An 8-bit PNG Blender wrote, read back through bpy (no Pillow inside a stock Blender)."""
    img = bpy.data.images.load(str(path), check_existing=False)
    try:
        w, h = img.size
        px = np.empty(w * h * img.channels, np.float32)
        img.pixels.foreach_get(px)
    finally:
        bpy.data.images.remove(img)
    px = px.reshape(h, w, -1)[::-1, :, :channels]   # Blender stores rows bottom-up
    return np.rint(px * 255.0).astype(np.uint8)


def _render_to_array(scene, path: Path) -> np.ndarray:
    old = scene.render.filepath
    scene.render.filepath = str(path)
    try:
        with quiet_stdout():
            bpy.ops.render.render(write_still=True, scene=scene.name)
    finally:
        scene.render.filepath = old
    return _read_png(path)


@contextmanager
def jitter(pack: Pack, seed: int | None, scene=None):
    """Seeded small head pose and lighting changes, fully restored on exit."""
    scene = scene or bpy.context.scene
    if seed is None:
        yield
        return
    js = jitter_settings(pack)
    rng = random.Random(f"likeness-jitter:{pack.id}:{seed}")
    yaw = math.radians(rng.uniform(-1, 1) * float(js["yaw"]))
    pitch = math.radians(rng.uniform(-1, 1) * float(js["pitch"]))
    roll = math.radians(rng.uniform(-1, 1) * float(js["roll"]))
    light = math.radians(rng.uniform(-1, 1) * float(js["light"]))
    root = bpy.data.objects.get(js["head_root"]) if js.get("head_root") else None
    sh = scene.display.shading
    saved_root = (root.rotation_mode, tuple(root.rotation_euler)) if root is not None else None
    saved_light = (sh.use_world_space_lighting, sh.studiolight_rotate_z)
    try:
        if root is not None:
            root.rotation_mode = "XYZ"
            base = Euler(saved_root[1], "XYZ")
            root.rotation_euler = (base.x + pitch, base.y + roll, base.z + yaw)
        sh.use_world_space_lighting = True
        sh.studiolight_rotate_z = saved_light[1] + light
        yield
    finally:
        if root is not None:
            root.rotation_mode = saved_root[0]
            root.rotation_euler = saved_root[1]
        sh.use_world_space_lighting, sh.studiolight_rotate_z = saved_light


def _mask_pass(pack: Pack, scene, path: Path) -> np.ndarray:
    sh = scene.display.shading
    r = scene.render
    world = scene.world
    mats = [m for m in bpy.data.materials if m.users]
    saved_colors = [(m, tuple(m.diffuse_color)) for m in mats]
    saved_world = tuple(world.color)
    shading_attrs = ("light", "color_type", "show_cavity", "show_object_outline",
                     "show_specular_highlight", "show_shadows", "show_xray", "show_backface_culling")
    saved_shading = {a: getattr(sh, a) for a in shading_attrs}
    saved_aa = scene.display.render_aa
    saved_engine = r.engine
    saved_view = (scene.view_settings.view_transform, scene.view_settings.look,
                  scene.view_settings.exposure, scene.view_settings.gamma, r.dither_intensity)
    try:
        r.engine = "BLENDER_WORKBENCH"
        sh.light = "FLAT"
        sh.color_type = "MATERIAL"
        sh.show_cavity = False
        sh.show_object_outline = False
        sh.show_specular_highlight = False
        sh.show_shadows = False
        sh.show_xray = False
        scene.display.render_aa = "OFF"
        scene.view_settings.view_transform = "Standard"
        scene.view_settings.look = "None"
        scene.view_settings.exposure = 0.0
        scene.view_settings.gamma = 1.0
        r.dither_intensity = 0.0
        world.color = _class_color_linear(CLASS_IDS["background"])
        cache: dict[str, tuple] = {}
        for m in mats:
            cls = pack.class_of_material(m.name)
            cid = CLASS_IDS[cls] if cls is not None else CLASS_IDS["background"]
            if cid not in cache:
                cache[cid] = (*_class_color_linear(cid), 1.0)
            m.diffuse_color = cache[cid]
        img = _render_to_array(scene, path)
    finally:
        for m, c in saved_colors:
            m.diffuse_color = c
        world.color = saved_world
        for a, v in saved_shading.items():
            if getattr(sh, a) != v:
                setattr(sh, a, v)
        scene.display.render_aa = saved_aa
        r.engine = saved_engine
        (scene.view_settings.view_transform, scene.view_settings.look,
         scene.view_settings.exposure, scene.view_settings.gamma, r.dither_intensity) = saved_view
    return decode_mask(img)


_SRGB_TO_LIN = np.array([((i / 255) / 12.92 if i / 255 <= 0.04045 else ((i / 255 + 0.055) / 1.055) ** 2.4)
                         for i in range(256)], np.float32)
_LIN_TO_SRGB = np.array([round(255 * (c * 12.92 if c <= 0.0031308 else 1.055 * c ** (1 / 2.4) - 0.055))
                         for c in np.linspace(0, 1, 4096)], np.uint8)


def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    """Box-filter an sRGB uint8 image by an integer factor, averaging in linear light."""
    if factor <= 1:
        return img
    h, w = img.shape[0] // factor, img.shape[1] // factor
    lin = _SRGB_TO_LIN[img[:h * factor, :w * factor]]
    lin = lin.reshape(h, factor, w, factor, -1).mean(axis=(1, 3))
    return _LIN_TO_SRGB[np.clip(np.rint(lin * 4095), 0, 4095).astype(np.int32)]


def _rgb_pass(pack: Pack, scene, path: Path) -> np.ndarray:
    ss = max(1, int(look_settings(pack).get("supersample", 1)))
    if scene.render.engine == "CYCLES":
        return _cycles_pass(pack, scene, path)
    if scene.render.engine != "BLENDER_WORKBENCH" or ss == 1:
        return _render_to_array(scene, path)
    r = scene.render
    saved = (r.resolution_x, r.resolution_y, scene.display.render_aa)
    try:
        r.resolution_x, r.resolution_y = saved[0] * ss, saved[1] * ss
        scene.display.render_aa = "OFF"
        img = _render_to_array(scene, path)
    finally:
        r.resolution_x, r.resolution_y, scene.display.render_aa = saved
    return downsample(img, ss)


def _cycles_pass(pack: Pack, scene, path: Path) -> np.ndarray:
    """Cycles with a transparent film, composited over the plain background colour (the world
    colour only lights the scene, dimmed, so the backdrop stays the manifest's colour)."""
    r = scene.render
    saved = (r.film_transparent, r.image_settings.color_mode)
    try:
        r.film_transparent = True
        r.image_settings.color_mode = "RGBA"
        old = r.filepath
        r.filepath = str(path)
        try:
            with quiet_stdout():
                bpy.ops.render.render(write_still=True, scene=scene.name)
        finally:
            r.filepath = old
        rgba = _read_png(path, channels=4).astype(np.float32) / 255.0
    finally:
        r.film_transparent, r.image_settings.color_mode = saved
    from .rig import linear_to_srgb
    bg = np.array([linear_to_srgb(c) for c in hex_to_linear(camera_settings(pack)["background"])],
                  np.float32)
    a = rgba[..., 3:4]
    out = rgba[..., :3] * a + bg * (1 - a)
    return np.clip(np.rint(out * 255), 0, 255).astype(np.uint8)


def render_sample(pack: Pack, resolution: int = 256, jitter_seed: int | None = None,
                  scene=None, mask: bool = True, engine: str | None = None,
                  ) -> tuple[np.ndarray, np.ndarray | None]:
    """Render the current rig: (RGB uint8 HxWx3, class-id mask uint8 HxW) from the same camera
    and pose. The camera/look are set up from the manifest if they are not already (``engine``:
    "workbench" or "cycles"; None keeps the engine of the last ``setup_render``). The mask is
    always a Workbench pass."""
    scene = scene or bpy.context.scene
    _ensure_setup(pack, resolution, scene, engine)
    tmp = _tmpdir()
    with jitter(pack, jitter_seed, scene):
        rgb = _rgb_pass(pack, scene, tmp / f"rgb-{os.getpid()}.png")
        labels = _mask_pass(pack, scene, tmp / f"mask-{os.getpid()}.png") if mask else None
    return rgb, labels


def render_to_files(pack: Pack, out_dir: str | os.PathLike, resolution: int = 256,
                    jitter_seed: int | None = None, stem: str = "", scene=None,
                    color_mask: bool = False) -> dict[str, Path]:
    """Render and write ``{stem}render.png`` (RGB) and ``{stem}mask.png`` (class ids, 8-bit
    grey; with ``color_mask`` also ``{stem}mask_color.png``). Returns the written paths."""
    from PIL import Image
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rgb, labels = render_sample(pack, resolution, jitter_seed, scene=scene)
    paths = {"render": out / f"{stem}render.png", "mask": out / f"{stem}mask.png"}
    Image.fromarray(rgb).save(paths["render"])
    Image.fromarray(labels).save(paths["mask"])
    if color_mask:
        from ..backend.visual import colorize_mask
        paths["mask_color"] = out / f"{stem}mask_color.png"
        Image.fromarray(colorize_mask(labels)).save(paths["mask_color"])
    return paths
