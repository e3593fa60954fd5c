"""Rendering the default pack in real Blender: what the pixels say (no mocks)."""
from __future__ import annotations

import numpy as np
import pytest

bpy = pytest.importorskip("bpy")

from likeness.backend.schema import CLASS_IDS, find_pack  # noqa: E402
from likeness.render_engine import render, rig  # noqa: E402
from likeness.render_engine.builders import build  # noqa: E402

RES = 128


@pytest.fixture(scope="module")
def pack():
    p = find_pack("default")
    bpy.ops.wm.read_factory_settings(use_empty=True)
    build(p)
    render.setup_render(p, RES)
    return p


def _vector(pack, **changes):
    v = pack.default_vector()
    for k, val in changes.items():
        if k in pack.slot_names:
            v.slots[k] = val
        else:
            v.params[k] = val
    return v


def _render(pack, jitter_seed=None, **changes):
    rig.apply_vector(_vector(pack, **changes))
    return render.render_sample(pack, RES, jitter_seed=jitter_seed)


def _frac(mask, cls):
    return float((mask == CLASS_IDS[cls]).mean())


def _centroid(mask, classes):
    sel = np.isin(mask, [CLASS_IDS[c] for c in classes])
    ys, xs = np.nonzero(sel)
    return xs.mean() / mask.shape[1], ys.mean() / mask.shape[0]


def test_default_frame_classes_and_layout(pack):
    rgb, mask = _render(pack)
    assert rgb.shape == (RES, RES, 3) and rgb.dtype == np.uint8
    assert mask.shape == (RES, RES) and mask.dtype == np.uint8
    for cls in ("skin", "nose", "l_eye", "r_eye", "l_brow", "r_brow", "l_ear", "r_ear",
                "u_lip", "l_lip", "hair", "neck", "cloth", "background"):
        assert _frac(mask, cls) > 0, cls
    for cls in ("eyeglasses", "hat", "earring"):
        assert _frac(mask, cls) == 0, cls
    # CelebAMask-HQ layout: l_eye on the image right, eyes/nose/mouth near the aligned positions
    lx, ly = _centroid(mask, ["l_eye"])
    rx, ry = _centroid(mask, ["r_eye"])
    assert rx < 0.5 < lx
    assert abs(lx - 0.605) < 0.03 and abs(rx - 0.395) < 0.03
    assert abs(ly - 0.478) < 0.03 and abs(ry - 0.478) < 0.03
    nx, ny = _centroid(mask, ["nose"])
    assert abs(nx - 0.5) < 0.02 and abs(ny - 0.577) < 0.03
    mx, my = _centroid(mask, ["mouth", "u_lip", "l_lip"])
    assert abs(mx - 0.5) < 0.02 and abs(my - 0.749) < 0.03
    ys, xs = np.nonzero(mask == CLASS_IDS["skin"])
    assert abs(xs.min() / RES - 0.24) < 0.04 and abs(xs.max() / RES - 0.77) < 0.04
    assert abs(ys.max() / RES - 0.93) < 0.04


def test_mask_matches_rgb(pack):
    rgb, mask = _render(pack)
    bg = np.array([int(round(255 * rig.linear_to_srgb(c)))
                   for c in rig.hex_to_linear(render.camera_settings(pack)["background"])])
    is_bg_rgb = np.abs(rgb.astype(int) - bg).max(-1) <= 2
    is_bg_mask = mask == 0
    agree = (is_bg_rgb == is_bg_mask).mean()
    assert agree > 0.97
    # away from edges the two agree everywhere
    from numpy.lib.stride_tricks import sliding_window_view
    win = sliding_window_view(np.pad(mask, 1, mode="edge"), (3, 3)).reshape(RES, RES, 9)
    interior = (win == mask[..., None]).all(-1)
    assert (is_bg_rgb == is_bg_mask)[interior].mean() > 0.995


def test_glasses_make_eyeglass_pixels(pack):
    _, plain = _render(pack, glasses="none")
    assert _frac(plain, "eyeglasses") == 0
    for option in ("round", "rectangular", "sunglasses", "aviators"):
        _, mask = _render(pack, glasses=option)
        assert _frac(mask, "eyeglasses") > 0.01, option
    _, sun = _render(pack, glasses="sunglasses")
    # dark lenses hide the eyes
    assert _frac(sun, "l_eye") < 0.3 * _frac(plain, "l_eye")


def test_bald_has_almost_no_hair_pixels(pack):
    _, bald = _render(pack, hair="bald", bangs="none", headwear="none")
    _, crop = _render(pack, hair="crop", bangs="none", headwear="none")
    _, long = _render(pack, hair="long", bangs="none", headwear="none")
    assert _frac(bald, "hair") < 0.002
    assert _frac(crop, "hair") > 0.05
    assert _frac(long, "hair") > _frac(crop, "hair") * 1.5


def test_hat_option_gives_hat_pixels(pack):
    for option in ("cap", "beanie", "fedora", "bucket", "headband"):
        _, mask = _render(pack, headwear=option)
        assert _frac(mask, "hat") > 0.005, option


def test_hair_colour_moves_hair_pixels(pack):
    rgb_dark, m_dark = _render(pack, hair="long", hair_color=0.0)
    rgb_light, m_light = _render(pack, hair="long", hair_color=1.0)
    dark = rgb_dark[m_dark == CLASS_IDS["hair"]].mean(0)
    light = rgb_light[m_light == CLASS_IDS["hair"]].mean(0)
    assert light.mean() > dark.mean() + 80
    rgb_red, m_red = _render(pack, hair="long", hair_color=0.5, hair_red=1.0)
    red = rgb_red[m_red == CLASS_IDS["hair"]].mean(0)
    assert red[0] > red[2] + 40


def test_skin_tone_moves_skin_pixels(pack):
    rgb_l, m_l = _render(pack, skin_tone=0.0)
    rgb_d, m_d = _render(pack, skin_tone=1.0)
    light = rgb_l[m_l == CLASS_IDS["skin"]].mean(0)
    deep = rgb_d[m_d == CLASS_IDS["skin"]].mean(0)
    assert light.mean() > deep.mean() + 90
    # the neck follows the skin tone
    assert rgb_l[m_l == CLASS_IDS["neck"]].mean() > rgb_d[m_d == CLASS_IDS["neck"]].mean() + 60


def test_determinism_and_jitter(pack):
    v = pack.sample_seeded(4, 2)
    rig.apply_vector(v)
    a_rgb, a_mask = render.render_sample(pack, RES, jitter_seed=17)
    rig.apply_vector(pack.sample_seeded(4, 3))
    rig.apply_vector(v)
    b_rgb, b_mask = render.render_sample(pack, RES, jitter_seed=17)
    assert np.array_equal(a_rgb, b_rgb) and np.array_equal(a_mask, b_mask)
    c_rgb, c_mask = render.render_sample(pack, RES, jitter_seed=18)
    assert not np.array_equal(a_mask, c_mask)
    n_rgb, n_mask = render.render_sample(pack, RES)
    n2_rgb, n2_mask = render.render_sample(pack, RES)
    assert np.array_equal(n_rgb, n2_rgb) and np.array_equal(n_mask, n2_mask)
    assert not np.array_equal(a_mask, n_mask)


def _scene_snapshot(pack):
    scene = bpy.context.scene
    sh = scene.display.shading
    snap = {
        "engine": scene.render.engine, "res": (scene.render.resolution_x, scene.render.resolution_y),
        "aa": scene.display.render_aa, "world": tuple(scene.world.color),
        "filepath": scene.render.filepath, "view": scene.view_settings.view_transform,
    }
    for a in ("light", "color_type", "show_cavity", "show_object_outline", "show_specular_highlight",
              "show_shadows", "studio_light", "studiolight_rotate_z", "use_world_space_lighting"):
        snap["sh." + a] = getattr(sh, a)
    for m in bpy.data.materials:
        snap["mat." + m.name] = tuple(m.diffuse_color)
    root = bpy.data.objects["HeadRoot"]
    snap["root"] = (tuple(root.rotation_euler), tuple(root.location))
    return snap


def test_render_restores_scene(pack):
    rig.apply_vector(_vector(pack, glasses="round", hair="long"))
    before = _scene_snapshot(pack)
    render.render_sample(pack, RES, jitter_seed=5)
    assert _scene_snapshot(pack) == before
    render.render_sample(pack, RES)
    assert _scene_snapshot(pack) == before


def test_render_to_files(pack, tmp_path):
    from PIL import Image
    rig.apply_vector(pack.default_vector())
    paths = render.render_to_files(pack, tmp_path, RES, stem="x_", color_mask=True)
    rgb = np.asarray(Image.open(paths["render"]))
    mask = np.asarray(Image.open(paths["mask"]))
    assert rgb.shape == (RES, RES, 3) and mask.shape == (RES, RES)
    assert mask.max() < 19 and (mask == CLASS_IDS["skin"]).any()
    assert paths["mask_color"].is_file()


def test_decode_palette_roundtrip():
    ids = np.arange(19, dtype=np.uint8)
    img = np.array([render.class_color_srgb(int(i)) for i in ids], np.uint8)[None]
    assert np.array_equal(render.decode_mask(img)[0], ids)
    assert render.decode_mask(np.array([[[200, 60, 10]]], np.uint8))[0, 0] == 0


def test_cycles_option(pack):
    rig.apply_vector(_vector(pack, glasses="round"))
    wb_rgb, wb_mask = render.render_sample(pack, RES)
    try:
        rgb, mask = render.render_sample(pack, RES, engine="cycles")
        assert bpy.context.scene.render.engine == "CYCLES"
        assert rgb.shape == (RES, RES, 3) and rgb.std() > 10
        assert np.array_equal(mask, wb_mask)          # the mask pass is the same Workbench pass
        # the backdrop stays the plain background colour
        assert np.abs(rgb[2, 2].astype(int) - wb_rgb[2, 2].astype(int)).max() <= 3
    finally:
        render.setup_render(pack, RES, engine="workbench")
    assert not any(o.name.startswith(render.LIGHT_PREFIX) for o in bpy.data.objects)
