"""The default pack's rig: a skeleton with clean weights, and expression shape keys named after
ARKit's blendshapes, made from vertex positions in the head's own frame.

**Skeleton.** The armature object ``Skeleton`` (a child of ``Root``, its origin at the root) has
the bones ``root`` (bottom of the torso, up), ``neck`` (neck base to the head pivot), ``head``
(from the head pivot, where ``HeadRoot`` turns, up), ``jaw`` (from the jaw hinge in front of the
ears to the chin) and ``eye.L``/``eye.R`` (from behind each eye out through it; ``.L`` is the
character's left, +X). Every mesh has an Armature modifier and weights that sum to 1: clothes and
neck blend root -> neck -> head up the neck, the head and beards blend head -> jaw below a line
from the mouth to the jaw hinge (lower lip on the jaw, mouth corners half way, upper lip and teeth
on the head), eyes are rigid on their eye bones, and every other head part (hair, bangs, hats,
glasses, earrings, ears, nose, brows) is rigid on ``head``. Options are shown and hidden, never
rebuilt, so every option carries its weights whichever is chosen.

**Expressions.** ``EXPRESSIONS`` (ARKit names; Left is the character's left) are relative shape
keys on the meshes they move (the head skin, beards, cheeks and nose share the face's fields; the
mouth, lips, eyes and brows have their own), each driven by a custom property of the same name on
``Skeleton`` (0..1), so one value moves every mesh; engines get per-mesh morph targets of that
name. A key is the avatar's current identity shape moved by the expression, so ``refresh``
remakes them whenever the identity changes (``render_engine.avatar.apply`` calls it after every
apply): a blink closes a narrow eye as well as a round one, and mouth keys follow the mouth's
height and width sliders. ``eyeLook*`` slide the iris and pupil inside the eye's outline (the
eyes are flat discs: an eye bone turns the whole disc, which suits small turns); ``mouthClose``
is, as in ARKit, a corrective over ``jawOpen`` (the lips held shut while the jaw opens). A
control set from Python takes effect after ``Skeleton.update_tag()`` (custom properties tag
nothing themselves; ``render_engine.avatar.set_expressions`` does it).
"""
from __future__ import annotations

import math

import numpy as np

from . import meshkit as mk
from .stylized import EYE_RINGS, MOUTH_W, NECK_Y, PIVOT, ROOT

SKELETON = "Skeleton"
HINGE = (0.0, 0.05, -0.35)          # jaw hinge, in front of the ears (head frame)
CHIN = (0.0, -0.55, -1.45)
JAW_OPEN_DEG = 16.0
SIGNATURE_PROP = "likeness_expression_basis"

# name -> (head, tail, parent) in the builder's frame (world at rest, Root at ROOT); the eye
# bones are placed from the eyes themselves (``build``)
BONES = {
    "root": (ROOT, (ROOT[0], ROOT[1], ROOT[2] + 1.2), None),
    "neck": ((0.0, NECK_Y, -1.9), PIVOT, "root"),
    "head": (PIVOT, (PIVOT[0], PIVOT[1], 1.0), "neck"),
    "jaw": (HINGE, CHIN, "head"),
}

EXPRESSIONS = (
    "eyeBlinkLeft", "eyeBlinkRight", "eyeSquintLeft", "eyeSquintRight", "eyeWideLeft", "eyeWideRight",
    "eyeLookInLeft", "eyeLookInRight", "eyeLookOutLeft", "eyeLookOutRight",
    "eyeLookUpLeft", "eyeLookUpRight", "eyeLookDownLeft", "eyeLookDownRight",
    "jawOpen", "jawForward", "jawLeft", "jawRight", "mouthClose",
    "mouthSmileLeft", "mouthSmileRight", "mouthFrownLeft", "mouthFrownRight",
    "mouthStretchLeft", "mouthStretchRight", "mouthPucker", "mouthFunnel", "mouthLeft", "mouthRight",
    "browDownLeft", "browDownRight", "browInnerUp", "browOuterUpLeft", "browOuterUpRight",
    "cheekPuff", "cheekSquintLeft", "cheekSquintRight", "noseSneerLeft", "noseSneerRight",
)
_EXPRESSION_SET = frozenset(EXPRESSIONS)
_SIDES = (("Left", 1), ("Right", -1))


# ------------------------------------------------------------------------------------------
# Which meshes do what (by the pack's object names)
# ------------------------------------------------------------------------------------------

def role(name: str) -> str | None:
    """The expression role of a pack object: skin, mouth, lip_upper, lip_lower, eye, brow."""
    if name in ("Head", "Nose") or name.startswith(("FacialHair.", "Cheeks.")):
        return "skin"
    if name == "Mouth":
        return "mouth"
    if name in ("Lip.Upper", "Lip.Lower"):
        return "lip_upper" if name == "Lip.Upper" else "lip_lower"
    if name in ("Eye.L", "Eye.R"):
        return "eye"
    if name in ("Brow.L", "Brow.R"):
        return "brow"
    return None


def _side(name: str) -> int:
    return 1 if name.endswith(".L") else -1


# ------------------------------------------------------------------------------------------
# Fields in the head frame
# ------------------------------------------------------------------------------------------

def jaw_weight(p: np.ndarray, mouth_centre, closed: bool = False) -> np.ndarray:
    """How much of the jaw's motion a point of the face surface takes: 1 below a line from the
    mouth to the hinge, 0 above it and behind the hinge; the band between is narrow at the
    mouth (the lips part there) and widens toward the hinge (no crease along the jaw line).
    ``closed``: the share with the lips held shut (``mouthClose``): a wide band under the mouth,
    so the skin below the closed lips stretches evenly."""
    my, mz = float(mouth_centre[1]), float(mouth_centre[2])
    slope = (HINGE[2] - mz) / (HINGE[1] - my)
    line = mz + (p[:, 1] - my) * slope
    k = mk.smoothstep(my, HINGE[1], p[:, 1])
    low = 0.3 if closed else 0.06
    below = mk.smoothstep(line + 0.02 + 0.1 * k, line - low - 0.2 * k, p[:, 2])
    front = mk.smoothstep(HINGE[1] + 0.4, HINGE[1] - 0.05, p[:, 1])
    return below * front


def _rot_x(deg: float) -> np.ndarray:
    a = math.radians(deg)
    c, s = math.cos(a), math.sin(a)
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


def _jaw_fields(p: np.ndarray, w: np.ndarray) -> dict[str, np.ndarray]:
    """jaw* displacements (head frame) of points p taking w of the jaw's motion."""
    h = np.asarray(HINGE)
    rot = (p - h) @ _rot_x(JAW_OPEN_DEG).T + h - p
    w = w[:, None]
    return {
        "jawOpen": w * rot,
        "jawForward": w * np.array([0.0, -0.06, 0.0]),
        "jawLeft": w * np.array([0.07, 0.0, 0.0]),
        "jawRight": w * np.array([-0.07, 0.0, 0.0]),
    }


def _gauss(q, c, s):
    d = (q - np.asarray(c, float)) / np.asarray(s, float)
    return np.exp(-(d * d).sum(-1))


def _mouth_fields(q: np.ndarray) -> dict[str, np.ndarray]:
    """Mouth-area displacements in the mouth's own frame (origin at the mouth centre, x across
    it, unscaled: the corners at x = +-MOUTH_W)."""
    W = MOUTH_W
    x, y, z = q[:, 0], q[:, 1], q[:, 2]
    near = np.exp(-(z / 0.24) ** 2 - (y / 0.4) ** 2)          # the mouth's band of the face
    out = {}
    for tag, s in _SIDES:
        corner = _gauss(q, (s * W, 0.0, 0.0), (0.62 * W, 0.4, 0.22))[:, None]
        cheek = _gauss(q, (s * (W + 0.15), 0.0, 0.3), (0.28, 0.45, 0.2))[:, None]
        wide = _gauss(q, (s * W, 0.0, 0.0), (0.75 * W, 0.4, 0.22))[:, None]
        out[f"mouthSmile{tag}"] = corner * (s * 0.035, 0.03, 0.07) + cheek * (0.0, -0.01, 0.05)
        out[f"mouthFrown{tag}"] = corner * (s * 0.01, 0.0, -0.07)
        out[f"mouthStretch{tag}"] = wide * (s * 0.06, 0.01, -0.025)
    across = np.exp(-(x / (2.0 * W)) ** 2) * near
    centre = np.exp(-(x / (1.3 * W)) ** 2) * near
    zero = np.zeros_like(x)
    out["mouthPucker"] = np.stack([-0.38 * x * across, -0.07 * centre, -0.3 * z * centre], -1)
    out["mouthFunnel"] = np.stack([-0.25 * x * across, -0.05 * centre,
                                   0.05 * np.tanh(z / 0.03) * np.exp(-(x / (1.2 * W)) ** 2) * near], -1)
    shift = np.exp(-(x / (1.5 * W)) ** 2) * near
    out["mouthLeft"] = np.stack([0.09 * shift, zero, zero], -1)
    out["mouthRight"] = np.stack([-0.09 * shift, zero, zero], -1)
    return out


def _face_fields(p: np.ndarray) -> dict[str, np.ndarray]:
    """Displacements of the face surface away from the mouth (head frame)."""
    front = mk.smoothstep(0.25, -0.3, p[:, 1])[:, None]
    out = {}
    puff = np.zeros_like(p)
    for tag, s in _SIDES:
        g = _gauss(p[:, [0, 2]], (s * 0.52, -0.68), (0.3, 0.26))[:, None] * front
        puff += g * np.array([s * 0.55, -0.83, 0.0]) * 0.11
        sq = _gauss(p[:, [0, 2]], (s * 0.42, -0.3), (0.2, 0.14))[:, None] * front
        out[f"cheekSquint{tag}"] = sq * (0.0, -0.01, 0.045)
        nose = _gauss(p[:, [0, 2]], (s * 0.1, -0.45), (0.09, 0.09))[:, None] * front
        out[f"noseSneer{tag}"] = nose * (s * 0.012, 0.0, 0.045)
    out["cheekPuff"] = puff
    return out


# ------------------------------------------------------------------------------------------
# Eyes and brows, in their own frames
# ------------------------------------------------------------------------------------------

N_ANG = 64
N_RINGS = len(EYE_RINGS) + 2          # the rings clamped to the outline, then two lash rings
OUTLINE = len(EYE_RINGS) - 1


def _eye_fields(v: np.ndarray, side: int) -> dict[str, np.ndarray]:
    """Blink, squint and wide for an eye disc (local: x across, z up), from its current shape."""
    tag = "Left" if side > 0 else "Right"
    n_disc = 1 + N_RINGS * N_ANG
    if len(v) < n_disc:
        return {}
    theta = np.linspace(0, 2 * math.pi, N_ANG, endpoint=False)
    upper = np.sin(theta) > 0
    rings = v[1:n_disc].reshape(N_RINGS, N_ANG, 3)
    outline = rings[OUTLINE]                                   # (N_ANG, 3)
    low = outline[~upper]
    order = np.argsort(low[:, 0])
    lx, lz, ly = low[order, 0], low[order, 2], low[order, 1]
    centre_z = float(v[0, 2])

    def lid_line(x):                       # where the closed lids meet: a third of the way down
        return centre_z + 0.3 * (np.interp(x, lx, lz) - centre_z)

    def lid_depth(x):
        return np.interp(x, lx, ly)

    def collapse(pts, keep=0.0):
        out = pts.copy()
        line = lid_line(pts[:, 0])
        out[:, 2] = line + (pts[:, 2] - line) * keep
        out[:, 1] = np.minimum(pts[:, 1], lid_depth(pts[:, 0])) - 0.003
        return out

    blink = v.copy()
    blink[0] = collapse(v[:1])[0]
    inner = rings[:OUTLINE + 1].reshape(-1, 3)
    closed = collapse(inner).reshape(OUTLINE + 1, N_ANG, 3)
    lash = rings[OUTLINE + 1:]
    lash_closed = closed[OUTLINE][None] + (lash - outline[None]) * np.where(upper, 1.0, 0.0)[None, :, None]
    lash_closed[..., 1] = np.minimum(lash_closed[..., 1], closed[OUTLINE][None, :, 1] - 0.002)
    blink[1:n_disc] = np.concatenate([closed, lash_closed]).reshape(-1, 3)
    # highlights: shrunk to a point on the closed lids (no white specks on a closed eye)
    rest = v[n_disc:]
    if len(rest):
        c = rest.mean(0)
        blink[n_disc:] = (c[0], min(float(c[1]), float(lid_depth(c[0]))) - 0.003, float(lid_line(c[0])))

    # squint: the lower lid rises; wide: the upper lid lifts (the outline's rings, not the iris)
    r_out = np.linalg.norm(outline[:, [0, 2]] - v[0, [0, 2]], axis=-1)
    rad = np.linalg.norm(rings[..., [0, 2]] - v[0, [0, 2]], axis=-1)
    near_outline = np.clip(rad / np.maximum(r_out[None], 1e-6), 0, 1) ** 3
    dz = rings[..., 2] - centre_z
    squint = np.zeros_like(rings)
    squint[..., 2] = np.where(dz < 0, -0.45 * dz, 0.0)
    wide = np.zeros_like(rings)
    wide[..., 2] = np.where(upper[None], 0.18 * dz * near_outline, 0.0)
    wide[OUTLINE + 1:, :, 2] = wide[OUTLINE][None, :, 2]
    # looking: the iris and pupil slide inside the outline (the white's rings follow less), so
    # the gaze moves without turning the disc into the face
    follow = np.array([1.0] * 6 + [0.7, 0.4, 0.15] + [0.0] * (N_RINGS - 9))
    ang_out = np.arctan2(outline[:, 2] - centre_z, outline[:, 0] - v[0, 0])
    order_out = np.argsort(ang_out)

    def clamp(pts, margin):
        rel = pts[:, [0, 2]] - v[0, [0, 2]]
        phi = np.arctan2(rel[:, 1], rel[:, 0])
        limit = margin * np.interp(phi, ang_out[order_out], r_out[order_out], period=2 * math.pi)
        r = np.linalg.norm(rel, axis=-1)
        scale = np.where(r > limit, limit / np.maximum(r, 1e-9), 1.0)
        out = pts.copy()
        out[:, 0] = v[0, 0] + rel[:, 0] * scale
        out[:, 2] = v[0, 2] + rel[:, 1] * scale
        return out

    def quadric(pts):
        x, z = pts[:, 0] - v[0, 0], pts[:, 2] - centre_z
        return np.stack([np.ones_like(x), x, z, x * x, z * z, x * z], -1)

    surface = np.linalg.lstsq(quadric(v[:n_disc]), v[:n_disc, 1], rcond=None)[0]

    def look(dx, dz):
        moved = v[:n_disc].copy()
        moved[0, [0, 2]] += (dx, dz)
        ring_pts = moved[1:].reshape(N_RINGS, N_ANG, 3)
        ring_pts[..., 0] += follow[:, None] * dx
        ring_pts[..., 2] += follow[:, None] * dz
        moved = clamp(moved, 0.97)
        # the depth of the disc where a vertex lands (the face curves); the iris well in front
        # of the white it slides over (a closer one loses depth tests in Workbench)
        depth = quadric(moved) @ surface
        ring = np.clip(np.arange(n_disc) - 1, 0, None) // N_ANG
        iris = follow[ring] >= 1.0
        moved[:, 1] = np.minimum(moved[:, 1], depth) - np.where(iris, 0.02, 0.0)
        moved[1:][np.repeat(follow == 0, N_ANG)] = v[1:n_disc][np.repeat(follow == 0, N_ANG)]
        shine = clamp(v[n_disc:] + (dx, 0.0, dz), 0.9)     # the highlights stay on the iris
        shine[:, 1] -= 0.022
        return np.concatenate([moved - v[:n_disc], shine - v[n_disc:]])

    looks = {f"eyeLookIn{tag}": look(-side * 0.07, 0.0), f"eyeLookOut{tag}": look(side * 0.07, 0.0),
             f"eyeLookUp{tag}": look(0.0, 0.05), f"eyeLookDown{tag}": look(0.0, -0.05)}
    pad = np.zeros((1, 3)), np.zeros((len(rest), 3))
    lift = np.zeros((len(rest), 3))              # highlights low in the eye rise with the lid
    if len(rest):
        lift[:, 2] = np.where(rest[:, 2] < centre_z, -0.45 * (rest[:, 2] - centre_z), 0.0)
    return {
        f"eyeBlink{tag}": blink - v,
        f"eyeSquint{tag}": np.concatenate([pad[0], squint.reshape(-1, 3), lift]),
        f"eyeWide{tag}": np.concatenate([pad[0], wide.reshape(-1, 3), pad[1]]),
        **looks,
    }


def _brow_fields(v: np.ndarray, side: int) -> dict[str, np.ndarray]:
    """Brow motions (local frame: origin at the brow, x across, z up)."""
    tag = "Left" if side > 0 else "Right"
    u = side * v[:, 0]                                # toward the outer end
    q = np.clip((u + 0.19) / 0.42, 0.0, 1.0)[:, None]  # 0 at the inner end, 1 at the outer
    inner = (1.0 - q) ** 1.5
    return {
        f"browDown{tag}": np.concatenate([-side * 0.025 * (1 - q), 0 * q, -0.07 * (1 - 0.5 * q)], -1),
        "browInnerUp": inner * (side * -0.01, 0.0, 0.085),
        f"browOuterUp{tag}": q ** 1.5 * (0.0, 0.0, 0.075),
    }


# ------------------------------------------------------------------------------------------
# Reading the rig: frames, current shapes
# ------------------------------------------------------------------------------------------

def _rest_world(ob):
    from mathutils import Matrix
    m = Matrix.Identity(4)
    chain = []
    while ob is not None:
        chain.append(ob)
        ob = ob.parent
    for o in reversed(chain):
        m = m @ (o.matrix_parent_inverse if o.parent is not None else Matrix.Identity(4)) @ o.matrix_basis
    return m


def _frame(ob, head) -> np.ndarray:
    """Object-local -> head-frame matrix (4x4), from the objects' own transforms."""
    return np.array(_rest_world(head).inverted() @ _rest_world(ob))


def _points(kb):
    """A key's points as a typed collection (``foreach_get``/``set`` on ``data`` take the generic,
    some hundred times slower path)."""
    return getattr(kb, "points", kb.data)


def _co(kb) -> np.ndarray:
    pts = _points(kb)
    co = np.empty(len(pts) * 3, np.float32)
    pts.foreach_get("co", co)
    return co.reshape(-1, 3).astype(float)


def _driver_values(keys) -> dict[str, float]:
    """Values of driven key blocks read from their source (a key of another Key datablock),
    so they are right before the depsgraph has run the drivers."""
    out = {}
    ad = keys.animation_data
    if ad is None:
        return out
    for fc in ad.drivers:
        if not fc.data_path.startswith('key_blocks["') or not fc.data_path.endswith('"].value'):
            continue
        drv = fc.driver
        if len(drv.variables) != 1 or drv.variables[0].type != "SINGLE_PROP":
            continue
        t = drv.variables[0].targets[0]
        if t.id_type != "KEY" or t.id is None:
            continue
        try:
            out[fc.data_path[12:-8]] = float(t.id.path_resolve(t.data_path))
        except (ValueError, TypeError):
            continue
    return out


def identity_values(ob) -> dict[str, float]:
    """The values of an object's identity keys (every key but the expressions), drivers read
    from their source."""
    keys = ob.data.shape_keys
    driven = _driver_values(keys)
    out = {}
    for kb in keys.key_blocks[1:]:
        if kb.name in _EXPRESSION_SET or kb.mute:
            continue
        value = driven.get(kb.name, kb.value)
        out[kb.name] = min(max(value, kb.slider_min), kb.slider_max)
    return out


def identity_shape(ob, values: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    """(basis, the shape the identity keys make at ``values``)."""
    keys = ob.data.shape_keys
    basis = _co(keys.reference_key)
    shaped = basis.copy()
    cache = {keys.reference_key.name: basis}
    for name, value in values.items():
        if value == 0.0:
            continue
        kb = keys.key_blocks[name]
        rel = kb.relative_key
        if rel.name not in cache:
            cache[rel.name] = _co(rel)
        shaped += value * (_co(kb) - cache[rel.name])
    return basis, shaped


# ------------------------------------------------------------------------------------------
# Expressions of one object
# ------------------------------------------------------------------------------------------

def _teeth(ob) -> np.ndarray:
    """Vertices of the Mouth's teeth (its second material)."""
    me = ob.data
    mi = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("material_index", mi)
    starts = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("loop_start", starts)
    totals = np.empty(len(me.polygons), np.int32)
    me.polygons.foreach_get("loop_total", totals)
    loops = np.empty(len(me.loops), np.int32)
    me.loops.foreach_get("vertex_index", loops)
    mask = np.zeros(len(me.vertices), bool)
    for s, t in zip(starts[mi == 1], totals[mi == 1]):
        mask[loops[s:s + t]] = True
    return mask


def _mouth_jaw_weight(kind: str, q: np.ndarray, ob=None) -> np.ndarray:
    """The jaw's share for the mouth's own meshes (q: mouth frame)."""
    t = np.clip(np.abs(q[:, 0]) / MOUTH_W, 0.0, 1.0)
    if kind == "lip_lower":
        return 1.0 - 0.5 * t * t
    if kind == "lip_upper":
        return 0.5 * t * t
    # the mouth: its rings open from the top (0) to the bottom (1), corners half way; teeth stay
    n = len(q)
    w = np.full(n, 0.5)
    n_a = 40
    disc = 1 + 3 * n_a
    if n >= disc:
        a = np.linspace(0, 2 * math.pi, n_a, endpoint=False)
        w[1:disc] = np.tile(0.5 - 0.5 * np.sin(a), 3)
    if ob is not None:
        w[_teeth(ob)] = 0.0
    return w


def object_fields(name: str, ob, local: np.ndarray, frame: np.ndarray, mouth_frame: np.ndarray,
                  extra: dict | None = None) -> dict[str, np.ndarray]:
    """Expression displacements (object-local) of an object's vertices ``local`` (its current
    shape). ``frame``: local -> head frame; ``mouth_frame``: the Mouth's local -> head frame."""
    kind = role(name)
    if kind is None:
        return {}
    if kind == "eye":
        return _eye_fields(local, _side(name))
    if kind == "brow":
        return _brow_fields(local, _side(name))
    lin, off = frame[:3, :3], frame[:3, 3]
    p = local @ lin.T + off                                     # head frame
    mlin, moff = mouth_frame[:3, :3], mouth_frame[:3, 3]
    q = (p - moff) @ np.linalg.inv(mlin).T                      # mouth frame
    head_disp = {}
    if kind == "skin":
        w = jaw_weight(p, moff)
        head_disp.update(_face_fields(p))
        closed = jaw_weight(p, moff, closed=True)
        head_disp["mouthClose"] = _jaw_fields(p, closed - w)["jawOpen"]
    else:
        w = _mouth_jaw_weight(kind, q, ob)
    head_disp.update(_jaw_fields(p, w))
    for k, d in _mouth_fields(q).items():
        head_disp[k] = d @ mlin.T
    if name == "Head":
        # the head is closed behind the mouth: where the lips part, its skin recedes so the
        # mouth's inside shows
        cavity = (np.exp(-(q[:, 0] / (0.9 * MOUTH_W)) ** 4 - ((q[:, 2] + 0.02) / 0.06) ** 2)
                  * np.exp(-(q[:, 1] / 0.3) ** 2))[:, None] * (mlin @ np.array([0.0, 1.0, 0.0]))
        head_disp["jawOpen"] = head_disp["jawOpen"] + 0.22 * cavity
        head_disp["mouthFunnel"] = head_disp["mouthFunnel"] + 0.1 * cavity
        head_disp["mouthClose"] = head_disp["mouthClose"] - 0.22 * cavity
    inv = np.linalg.inv(lin)
    out = {k: d @ inv.T for k, d in head_disp.items()}
    if kind != "skin":
        # mouthClose: the lips (and the mouth between them) shut whatever opens them: the jaw's
        # motion and the identity's mouth_open
        close = -out["jawOpen"]
        if extra and "mouth_open" in extra:
            value, delta = extra["mouth_open"]
            close = close - value * delta
        out["mouthClose"] = close
    return out


# ------------------------------------------------------------------------------------------
# Build: skeleton, weights, keys, drivers
# ------------------------------------------------------------------------------------------

def _named(collection):
    from ..rig import original_name
    return {original_name(ob): ob for ob in collection.all_objects}


def weights(name: str, ob, local: np.ndarray, frame: np.ndarray, mouth_frame: np.ndarray) -> dict[str, np.ndarray]:
    """Bone weights (summing to 1) of an object's rest vertices."""
    n = len(local)
    one = np.ones(n)
    if name in ("Eye.L", "Eye.R"):
        return {"eye." + name[-1]: one}
    p = local @ frame[:3, :3].T + frame[:3, 3]
    if name == "Neck" or name.startswith("Top."):
        z = p[:, 2]
        head = mk.smoothstep(-1.45, -1.0, z)
        root = mk.smoothstep(-1.75, -2.1, z)
        return {"root": root, "neck": 1.0 - head - root, "head": head}
    kind = role(name)
    if kind == "skin" and name != "Nose":
        jaw = jaw_weight(p, mouth_frame[:3, 3])
    elif kind in ("mouth", "lip_upper", "lip_lower"):
        q = (p - mouth_frame[:3, 3]) @ np.linalg.inv(mouth_frame[:3, :3]).T
        jaw = _mouth_jaw_weight(kind, q, ob)
    else:
        return {"head": one}
    return {"head": 1.0 - jaw, "jaw": jaw}


def _set_weights(ob, groups: dict[str, np.ndarray]) -> None:
    """Vertex groups from per-vertex weights, quantized to 1/1000 (the last group takes the rest,
    so every vertex sums to 1); zero weights are left out."""
    names = list(groups)
    q = {k: np.round(np.clip(groups[k], 0, 1) * 1000).astype(int) for k in names[:-1]}
    q[names[-1]] = 1000 - sum(q.values()) if q else np.full(len(groups[names[-1]]), 1000)
    for k in names:
        vals = q[k]
        vg = ob.vertex_groups.get(k) or ob.vertex_groups.new(name=k)
        for level in np.unique(vals):
            if level <= 0:
                continue
            idx = np.nonzero(vals == level)[0].tolist()
            vg.add(idx, level / 1000.0, "REPLACE")


def build_skeleton(coll, objects: dict):
    """The armature (bones in ``BONES`` plus the eyes), a child of ``Root``."""
    import bpy
    from mathutils import Matrix, Vector
    arm = bpy.data.armatures.new(SKELETON)
    arm.display_type = "STICK"
    ob = bpy.data.objects.new(SKELETON, arm)
    coll.objects.link(ob)
    ob.parent = objects["Root"]
    ob.matrix_parent_inverse = Matrix.Translation(ROOT).inverted()
    ob.location = ROOT
    bones = dict(BONES)
    for side in ("L", "R"):
        eye = objects[f"Eye.{side}"]
        x, y, z = eye.location
        bones[f"eye.{side}"] = ((x, y + 0.25, z), (x, y - 0.08, z), "head")
    view_layer = bpy.context.view_layer
    active = view_layer.objects.active
    view_layer.objects.active = ob
    bpy.ops.object.mode_set(mode="EDIT")
    try:
        origin = Vector(ROOT)
        made = {}
        for name, (head, tail, parent) in bones.items():
            eb = arm.edit_bones.new(name)
            eb.head = Vector(head) - origin
            eb.tail = Vector(tail) - origin
            # every bone's X axis is world +X: a positive X rotation nods the head forward,
            # opens the jaw, turns the eyes down
            up = Vector((0.0, -1.0, 0.0)) if abs(eb.vector.normalized().z) > 0.9 else Vector((0.0, 0.0, 1.0))
            eb.align_roll(up)
            if eb.x_axis.x < 0:
                eb.align_roll(-up)
            if parent:
                eb.parent = made[parent]
                eb.use_connect = (Vector(head) - Vector(bones[parent][1])).length < 1e-6
            eb.use_deform = True
            made[name] = eb
    finally:
        bpy.ops.object.mode_set(mode="OBJECT")
        view_layer.objects.active = active
    return ob


def _add_control(skel, name: str) -> None:
    skel[name] = 0.0
    skel.id_properties_ui(name).update(min=0.0, max=1.0, soft_min=0.0, soft_max=1.0,
                                       description=f"ARKit blendshape {name}: drives every "
                                       f"mesh's '{name}' shape key")


def _drive(ob, kb, skel) -> None:
    fc = kb.driver_add("value")
    drv = fc.driver
    drv.type = "AVERAGE"
    var = drv.variables.new()
    var.type = "SINGLE_PROP"
    var.targets[0].id_type = "OBJECT"
    var.targets[0].id = skel
    var.targets[0].data_path = f'["{kb.name}"]'


def build(coll, objects: dict) -> None:
    """Give the built avatar its skeleton, weights and expression keys (at build time)."""
    skel = build_skeleton(coll, objects)
    named = _named(coll)
    head, mouth = named["Head"], named["Mouth"]
    mouth_frame = _frame(mouth, head)
    for name in EXPRESSIONS:
        _add_control(skel, name)
    for name, ob in sorted(named.items()):
        if ob.type != "MESH":
            continue
        local = np.empty(len(ob.data.vertices) * 3)
        ob.data.vertices.foreach_get("co", local)
        local = local.reshape(-1, 3)
        frame = _frame(ob, head)
        _set_weights(ob, weights(name, ob, local, frame, mouth_frame))
        mod = ob.modifiers.new(SKELETON, "ARMATURE")
        mod.object = skel
        mod.use_vertex_groups = True
        mod.use_deform_preserve_volume = False
        if role(name) is None:
            continue
        fields = object_fields(name, ob, local, frame, mouth_frame)
        keep = {k: d for k, d in fields.items() if np.abs(d).max() > 1e-3}
        if not keep:
            continue
        if ob.data.shape_keys is None:
            ob.shape_key_add(name="Basis", from_mix=False)
        for k in EXPRESSIONS:
            if k in keep:
                kb = ob.shape_key_add(name=k, from_mix=False)
                kb.slider_min, kb.slider_max = 0.0, 1.0
                kb.value = 0.0
                _drive(ob, kb, skel)
    refresh(coll, force=True)


# ------------------------------------------------------------------------------------------
# Refresh after an apply
# ------------------------------------------------------------------------------------------

def refresh(collection, force: bool = False) -> int:
    """Remake the avatar's expression keys from its current identity shape; an object whose
    identity keys and place did not change since its last refresh is left alone (``force``:
    remake all). Returns how many objects were remade."""
    named = _named(collection)
    head, mouth = named.get("Head"), named.get("Mouth")
    if head is None or mouth is None:
        return 0
    mouth_frame = _frame(mouth, head)
    done = 0
    for name, ob in sorted(named.items()):
        if ob.type != "MESH" or role(name) is None or ob.data.shape_keys is None:
            continue
        kbs = [kb for kb in ob.data.shape_keys.key_blocks if kb.name in _EXPRESSION_SET]
        if not kbs:
            continue
        values = identity_values(ob)
        frame = _frame(ob, head)
        placed = role(name) not in ("eye", "brow")      # eyes and brows work in their own frame
        signature = repr((sorted((k, round(v, 6)) for k, v in values.items()),
                          np.round(frame, 6).tolist() if placed else None,
                          np.round(mouth_frame, 6).tolist() if placed else None))
        if not force and ob.get(SIGNATURE_PROP) == signature:
            continue
        basis, shaped = identity_shape(ob, values)
        extra = None
        kb_open = ob.data.shape_keys.key_blocks.get("mouth_open")
        if kb_open is not None:
            extra = {"mouth_open": (values.get("mouth_open", 0.0), _co(kb_open) - basis)}
        fields = object_fields(name, ob, shaped, frame, mouth_frame, extra)
        for kb in kbs:
            d = fields.get(kb.name)
            co = basis if d is None else basis + d
            _points(kb).foreach_set("co", co.astype(np.float32).ravel())
        ob.data.update()
        ob[SIGNATURE_PROP] = signature
        done += 1
    return done
