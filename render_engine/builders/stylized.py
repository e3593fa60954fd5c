"""The default "stylized" pack: a cartoon head and shoulders built entirely from code.

Every surface is generated with numpy (signed-distance shapes meshed radially, sweeps, shells
that follow the skull) and written with ``foreach_set``. Face-shape shape keys live on the
``Head`` object; every other head object carries the same keys (the head's radial change applied
to its own vertices) driven by the head's key, so editing a head key by hand reshapes hair,
hats, glasses and features together.

Axes: X is the subject's left (image right), -Y points at the camera, Z is up. The eye line is
at z = 0; the head is about 2 units wide.

Objects (all in the pack's collection and all under the empty ``Root`` at the bottom of the
torso, the one object to move; head parts are children of the empty ``HeadRoot``, the pivot the
renderer turns for pose jitter, itself a child of ``Root``):

* ``Head`` (keys face_width, face_length, face_round, jaw_width, chin_length, chin_width, cheeks,
  forehead, and the control keys hat_cap, hat_beanie, hat_fedora, hat_bucket, hat_headband that
  have no shape of their own but press the hair under the chosen hat through drivers);
* ``Nose``; ``Eye.L``/``Eye.R`` (eye-shape keys eye_*); ``Brow.L``/``Brow.R`` (brow_*);
  ``Ear.L``/``Ear.R``; ``Mouth`` with its children ``Lip.Upper``/``Lip.Lower`` (lip_full, smile,
  mouth_open); ``Neck``; ``Top.*`` (clothes; these two are children of ``Root``, not HeadRoot);
* options: ``Hair.*``, ``Bangs.*``, ``Hat.*``, ``Glasses.*``, ``FacialHair.*``,
  ``Earring.*.L/R`` (children of the ears), ``Cheeks.*``.
* ``Skeleton``: the armature (a child of ``Root``) every mesh is weighted to, with the expression
  controls; see ``stylized_rig``.

Subject-left parts (``*.L``) sit at +X, so they appear on the image right, like CelebAMask-HQ's
``l_*`` classes. Material names follow the pack's ``[segmentation]`` patterns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from . import meshkit as mk

TAU = 2.0 * math.pi

# ------------------------------------------------------------------------------------------
# Layout of the default face (world units)
# ------------------------------------------------------------------------------------------
EYE_X = 0.37          # eye centres at x = +-EYE_X, z = 0 (pack.toml eye_spacing offset)
EYE_SCALE = 1.14      # overall size of the eye outlines
BROW_Z = 0.36         # (pack.toml brow_height offset)
NOSE_Z = -0.4         # nose tip height
MOUTH_Z = -0.9        # mouth centre height (pack.toml mouth_height offset)
EAR_Z = -0.16
PIVOT = (0.0, 0.15, -1.35)   # head root (pose jitter pivot, neck top)
ROOT = (0.0, 0.0, -4.25)     # the avatar's root: the bottom of the torso, on the centre line
CENTRE = np.array([0.0, 0.02, -0.15])   # radial centre of the head


# ------------------------------------------------------------------------------------------
# Head shape: a smooth union of ellipsoids, meshed radially from CENTRE
# ------------------------------------------------------------------------------------------

@dataclass
class HeadParams:
    cran_c: tuple = (0.0, 0.12, 0.3)
    cran_r: tuple = (1.0, 1.1, 1.15)
    jaw_c: tuple = (0.0, -0.1, -0.45)
    jaw_r: tuple = (0.9, 0.88, 1.1)
    chin_c: tuple = (0.0, -0.44, -1.22)
    chin_r: tuple = (0.4, 0.4, 0.36)
    cheek_c: tuple = (0.48, -0.36, -0.38)
    cheek_r: tuple = (0.45, 0.46, 0.42)
    k: float = 0.45


def _add(t, d):
    return tuple(a + b for a, b in zip(t, d))


def _mul(t, d):
    return tuple(a * b for a, b in zip(t, d))


# Face-shape keys: each is the head at key value +1 (the rig extrapolates to -1).
HEAD_KEYS = {
    "face_width": lambda p: replace(
        p, cran_r=_mul(p.cran_r, (1.1, 1, 1)), jaw_r=_mul(p.jaw_r, (1.12, 1, 1)),
        cheek_c=_mul(p.cheek_c, (1.12, 1, 1)), chin_r=_mul(p.chin_r, (1.1, 1, 1))),
    "face_length": lambda p: replace(
        p, jaw_c=_add(p.jaw_c, (0, 0, -0.06)), jaw_r=_add(p.jaw_r, (0, 0, 0.06)),
        chin_c=_add(p.chin_c, (0, 0, -0.12)), cran_r=_add(p.cran_r, (0, 0, 0.06))),
    "face_round": lambda p: replace(
        p, jaw_r=_add(p.jaw_r, (0.08, 0.0, -0.04)), chin_r=_add(p.chin_r, (0.12, 0.02, 0.0)),
        chin_c=_add(p.chin_c, (0, 0, 0.05)), cheek_r=_add(p.cheek_r, (0.04, 0.02, 0.04))),
    "jaw_width": lambda p: replace(
        p, jaw_r=_add(p.jaw_r, (0.12, 0.0, 0.0)), jaw_c=_add(p.jaw_c, (0, 0, -0.05))),
    "chin_length": lambda p: replace(
        p, chin_c=_add(p.chin_c, (0, -0.02, -0.13)), chin_r=_add(p.chin_r, (0, 0, 0.04))),
    "chin_width": lambda p: replace(p, chin_r=_add(p.chin_r, (0.12, 0.0, 0.0))),
    "cheeks": lambda p: replace(
        p, cheek_r=_add(p.cheek_r, (0.07, 0.06, 0.06)), cheek_c=_add(p.cheek_c, (0.04, -0.04, 0))),
    "forehead": lambda p: replace(
        p, cran_r=_add(p.cran_r, (0.0, 0.03, 0.12)), cran_c=_add(p.cran_c, (0, 0, 0.1))),
}


def head_sdf(p: HeadParams):
    ck = np.array(p.cheek_c)

    def f(x: np.ndarray) -> np.ndarray:
        d = mk.smin(mk.sd_ellipsoid(x, p.cran_c, p.cran_r), mk.sd_ellipsoid(x, p.jaw_c, p.jaw_r), p.k)
        d = mk.smin(d, mk.sd_ellipsoid(x, p.chin_c, p.chin_r), 0.25)
        cl = mk.sd_ellipsoid(x, ck, p.cheek_r)
        cr = mk.sd_ellipsoid(x, ck * (-1, 1, 1), p.cheek_r)
        d = mk.smin(d, np.minimum(cl, cr), 0.22)
        return d
    return f


class Head:
    """The head surface for one parameter set, with a radius lookup table for fast warps."""

    def __init__(self, params: HeadParams):
        self.params = params
        self.sdf = head_sdf(params)
        self._lut = None
        self._depth = None

    def radial(self, dirs: np.ndarray) -> np.ndarray:
        return mk.radial_solve(self.sdf, CENTRE, dirs, 2.8)

    # front depth map: y of the surface seen from the front, tabulated on an x/z grid
    DEPTH_X = (-1.3, 1.3, 131)
    DEPTH_Z = (-1.8, 1.6, 171)

    def face_y(self, x, z) -> np.ndarray:
        """y of the face surface seen from the front at (x, z)."""
        x, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(z, float))
        if self._depth is None:
            gx = np.linspace(*self.DEPTH_X)
            gz = np.linspace(*self.DEPTH_Z)
            X, Z = np.meshgrid(gx, gz, indexing="ij")
            xz = np.stack([X.ravel(), Z.ravel()], -1)
            self._depth = mk.depth_solve(self.sdf, xz, -2.5, 0.6).reshape(X.shape)
        x0, x1, nx = self.DEPTH_X
        z0, z1, nz = self.DEPTH_Z
        fi = (x.ravel() - x0) / (x1 - x0) * (nx - 1)
        fj = (z.ravel() - z0) / (z1 - z0) * (nz - 1)
        out = np.empty(fi.shape)
        ok = (fi >= 0) & (fi <= nx - 1) & (fj >= 0) & (fj <= nz - 1)
        i0 = np.clip(np.floor(fi[ok]).astype(int), 0, nx - 2)
        j0 = np.clip(np.floor(fj[ok]).astype(int), 0, nz - 2)
        ti, tj = fi[ok] - i0, fj[ok] - j0
        d = self._depth
        out[ok] = ((d[i0, j0] * (1 - tj) + d[i0, j0 + 1] * tj) * (1 - ti)
                   + (d[i0 + 1, j0] * (1 - tj) + d[i0 + 1, j0 + 1] * tj) * ti)
        if not ok.all():
            xz = np.stack([x.ravel()[~ok], z.ravel()[~ok]], -1)
            out[~ok] = mk.depth_solve(self.sdf, xz, -2.5, 0.6)
        return out.reshape(x.shape)

    # radius as a function of direction, tabulated on a lat-long grid ---------------------
    LUT_LAT, LUT_LON = 73, 145

    def lut(self) -> np.ndarray:
        if self._lut is None:
            lat = np.linspace(-math.pi / 2, math.pi / 2, self.LUT_LAT)
            lon = np.linspace(-math.pi, math.pi, self.LUT_LON)
            La, Lo = np.meshgrid(lat, lon, indexing="ij")
            d = _dir(Lo, La).reshape(-1, 3)
            self._lut = self.radial(d).reshape(La.shape)
        return self._lut

    def radius_at(self, dirs: np.ndarray) -> np.ndarray:
        """Interpolated surface radius along unit directions (bilinear on the table)."""
        lut = self.lut()
        lat = np.arcsin(np.clip(dirs[:, 2], -1, 1))
        lon = np.arctan2(dirs[:, 0], -dirs[:, 1])
        fi = (lat + math.pi / 2) / math.pi * (self.LUT_LAT - 1)
        fj = (lon + math.pi) / TAU * (self.LUT_LON - 1)
        i0 = np.clip(np.floor(fi).astype(int), 0, self.LUT_LAT - 2)
        j0 = np.clip(np.floor(fj).astype(int), 0, self.LUT_LON - 2)
        ti, tj = fi - i0, fj - j0
        a = lut[i0, j0] * (1 - tj) + lut[i0, j0 + 1] * tj
        b = lut[i0 + 1, j0] * (1 - tj) + lut[i0 + 1, j0 + 1] * tj
        return a * (1 - ti) + b * ti


def _dir(lon, lat):
    """Unit direction for azimuth ``lon`` (0 = toward the camera, +pi/2 = +X) and elevation."""
    cl = np.cos(lat)
    return np.stack([cl * np.sin(lon), -cl * np.cos(lon), np.sin(lat)], -1)


def _unit(v):
    return v / np.maximum(np.linalg.norm(v, axis=-1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------
# Parts: every builder returns (verts, faces, face material indices) in world rest space and
# optional shape keys {name: verts}.
# ------------------------------------------------------------------------------------------

@dataclass
class Part:
    name: str
    verts: np.ndarray
    faces: list
    mats: np.ndarray
    materials: tuple                      # material names, indexed by ``mats``
    keys: dict = field(default_factory=dict)
    parent: str = "HeadRoot"
    origin: tuple = (0.0, 0.0, 0.0)      # object location at rest (vertices are stored relative)
    follow_head: bool = True             # carries the face-shape keys
    hair: bool = False                   # squashed under hats
    smooth: bool = True


def _part(name, parts, materials, **kw) -> Part:
    v, f, m = mk.merge(parts)
    return Part(name, v, f, m, tuple(materials), **kw)


def build_head(head: Head, keyed: dict[str, Head]) -> Part:
    dirs, quads = mk.cube_sphere(30)
    r = head.radial(dirs)
    verts = CENTRE + dirs * r[:, None]
    keys = {name: CENTRE + dirs * h.radial(dirs)[:, None] for name, h in keyed.items()}
    return _part("Head", [(verts, [quads], 0)], ["Skin"], keys=keys, follow_head=False)


# ---- eyes --------------------------------------------------------------------------------

EYE_RINGS = (  # (radius, material of the band inside it): 0 pupil, 1 iris, 2 white, 3 lash
    (0.028, 0), (0.056, 0), (0.08, 1), (0.1, 1), (0.116, 1), (0.127, 0), (0.15, 2),
    (0.19, 2), (0.24, 2), (0.4, 2))


def _outline(top, bottom, a=0.2):
    """Polar radius function of an eye outline given top/bottom curves over u in [-a, a]
    (u > 0 toward the outer corner)."""
    u = np.linspace(-a, a, 201)
    pts = np.concatenate([np.stack([u, top(u)], -1), np.stack([u[::-1], bottom(u[::-1])], -1)])
    ang = np.arctan2(pts[:, 1], pts[:, 0])
    rad = np.hypot(pts[:, 0], pts[:, 1])
    order = np.argsort(ang)
    ang, rad = ang[order], rad[order]

    def f(theta):
        return np.interp(np.mod(theta + math.pi, TAU) - math.pi, ang, rad, period=TAU)
    return f


def _lid(h, a=0.2, p=0.5, tilt=0.0, peak=0.0):
    def f(u):
        x = np.clip(u / a, -1, 1)
        base = h * (1 - x * x) ** p
        return base * (1 + peak * x) + tilt * x
    return f


EYE_SHAPES = {  # name -> outline (top curve, bottom curve); "round" is the basis
    "round": (_lid(0.165, p=0.55, peak=0.05), _lid(-0.145, p=0.6)),
    "almond": (_lid(0.14, p=0.75, peak=0.1, tilt=0.015), _lid(-0.105, p=0.9)),
    "narrow": (_lid(0.095, p=0.7, peak=0.1), _lid(-0.075, p=0.8)),
    "upturned": (_lid(0.135, p=0.7, peak=0.25, tilt=0.055), _lid(-0.11, p=0.8, tilt=0.055)),
    "downturned": (_lid(0.14, p=0.7, peak=-0.25, tilt=-0.05), _lid(-0.12, p=0.7, tilt=-0.05)),
    "hooded": (lambda u: 0.075 * (1 - np.clip(u / 0.2, -1, 1) ** 2) ** 0.3, _lid(-0.14, p=0.6)),
}


def build_eye(head: Head, side: int) -> Part:
    """Eye disc: polar rings clamped to the outline (pupil, iris, white), a lash band over the
    upper lid and two highlights. ``side`` +1 is the subject's left (world +X)."""
    ex = side * EYE_X
    ey = float(head.face_y(ex, 0.0))
    origin = (ex, ey, 0.0)
    n_ang = 64
    theta = np.linspace(0, TAU, n_ang, endpoint=False)

    def disc(shape):
        top, bottom = EYE_SHAPES[shape]
        rout = _outline(top, bottom)(theta)
        rings = [np.minimum(r, rout) for r, _ in EYE_RINGS]
        upper = mk.smoothstep(0.0, 0.5, np.sin(theta)) * (0.75 + 0.25 * np.cos(theta))
        flick = np.exp(-((theta - 0.12) / 0.2) ** 2)
        rings.append(rout + 0.004 + 0.03 * upper + 0.03 * flick)
        rings.append(rout + 0.012 + 0.045 * upper + 0.05 * flick)
        R = np.stack(rings) * EYE_SCALE                      # (rings, n_ang)
        u = R * np.cos(theta)[None] * side                    # outer corner at side * +u
        v = R * np.sin(theta)[None]
        wx, wz = ex + u, v
        surf = head.face_y(wx, wz) - ey
        bulge = 0.035 * np.clip(1 - (R / (0.2 * EYE_SCALE)) ** 2, 0, 1)
        w = surf - 0.012 - bulge
        w[-2:] -= 0.006
        pts = np.stack([u, w, v], -1).reshape(-1, 3)
        centre = np.array([[0.0, float(surf[0, 0]) - 0.012 - 0.035, 0.0]])
        return np.concatenate([centre, pts])

    base = disc("round")
    n_r = len(EYE_RINGS) + 2
    faces = [mk.fan(0, np.arange(n_ang) + 1)]
    quads = mk.grid_quads(n_r, n_ang, wrap=True, offset=1)
    faces.append(quads)
    band_mats = [EYE_RINGS[0][1]] + [m for _, m in EYE_RINGS[1:]] + [3, 3]
    mats = np.concatenate([np.full(n_ang, 0), np.repeat(band_mats[1:], n_ang)])
    # highlights (not mirrored: the light comes from the same side for both eyes)
    hl_parts = []
    zc = float(base[0, 1])
    for (hx, hz, hr) in ((-0.05, 0.055, 0.034), (0.045, -0.05, 0.016)):
        a = np.linspace(0, TAU, 16, endpoint=False)
        ring = np.stack([hx + hr * np.cos(a), np.full(16, zc - 0.006), hz + hr * np.sin(a)], -1)
        hl_parts.append((np.concatenate([[[hx, zc - 0.006, hz]], ring]), [mk.fan(0, np.arange(16) + 1, reverse=True)], 4))
    verts, hfaces, hmats = mk.merge(hl_parts)
    all_v = np.concatenate([base, verts])
    off = len(base)
    faces = _each_toward(all_v, faces + [f + off for f in hfaces], (0, -1, 0))
    mats = np.concatenate([mats, hmats])
    keys = {}
    for shape in EYE_SHAPES:
        if shape != "round":
            keys[f"eye_{shape}"] = np.concatenate([disc(shape), verts])
    tag = "L" if side > 0 else "R"
    mats_names = [f"Eye.{tag}.Pupil", f"Eye.{tag}.Iris", f"Eye.{tag}.White", f"Eye.{tag}.Lash",
                  f"Eye.{tag}.Highlight"]
    return Part(f"Eye.{tag}", all_v, faces, mats, tuple(mats_names), keys=keys, origin=origin)


# ---- brows -------------------------------------------------------------------------------

def _brow_style(arch=0.05, peak=0.03, thick_in=0.07, thick_out=0.035, tilt=0.0, angled=False):
    return dict(arch=arch, peak=peak, thick_in=thick_in, thick_out=thick_out, tilt=tilt, angled=angled)


BROW_STYLES = {
    "natural": _brow_style(),
    "straight": _brow_style(arch=0.01, peak=0.0, thick_in=0.065, thick_out=0.05),
    "arched": _brow_style(arch=0.085, peak=0.06, thick_in=0.055, thick_out=0.028),
    "thick": _brow_style(arch=0.04, thick_in=0.105, thick_out=0.07),
    "thin": _brow_style(arch=0.06, thick_in=0.032, thick_out=0.018),
    "angled": _brow_style(arch=0.09, peak=0.09, thick_in=0.065, thick_out=0.03, angled=True),
}


def build_brow(head: Head, side: int) -> Part:
    bx = side * EYE_X
    by = float(head.face_y(bx, BROW_Z))
    origin = (bx, by, BROW_Z)
    n = 28

    def strip(style):
        s = BROW_STYLES[style]
        t = np.linspace(-1, 1, n)                      # -1 inner end, +1 outer end
        u = t * 0.21 + 0.02
        if s["angled"]:
            z = s["arch"] * (1 - np.abs(t - 0.3) / 1.3) - 0.02
        else:
            z = s["arch"] * (1 - ((t - 0.2) / 1.2) ** 2) + s["peak"] * np.exp(-((t - 0.35) / 0.3) ** 2) * 0.3
        z = z - 0.5 * s["tilt"] * t
        thick = np.interp(t, [-1, -0.7, 0.4, 1], [s["thick_in"] * 0.8, s["thick_in"], (s["thick_in"] + s["thick_out"]) / 2, s["thick_out"] * 0.6])
        x = side * u
        y = head.face_y(bx + x, BROW_Z + z) - by - 0.028
        path = np.stack([x, y, z], -1)
        v, f = mk.sweep(path, 0.022, thick / 2, ring=10)
        return v, f

    v, f = strip("natural")
    keys = {f"brow_{k}": strip(k)[0] for k in BROW_STYLES if k != "natural"}
    tag = "L" if side > 0 else "R"
    return Part(f"Brow.{tag}", v, f, np.zeros(sum(len(x) for x in f), np.int32), (f"Brow.{tag}",),
                keys=keys, origin=origin)


# ---- nose --------------------------------------------------------------------------------

@dataclass
class NoseParams:
    tip_z: float = NOSE_Z
    tip_r: tuple = (0.085, 0.08, 0.075)
    tip_fwd: float = 0.1
    ala_x: float = 0.085
    ala_r: float = 0.058
    bridge_r: float = 0.04
    bridge_top: float = -0.1


NOSE_KEYS = {
    # continuous parameters drive these in +/- pairs (keys limited to 0..1), so each end is a
    # real shape rather than an extrapolation
    "nose_longer": lambda p: replace(p, tip_z=p.tip_z - 0.06, tip_fwd=p.tip_fwd + 0.025),
    "nose_shorter": lambda p: replace(p, tip_z=p.tip_z + 0.04, tip_fwd=p.tip_fwd - 0.02, bridge_top=p.bridge_top - 0.06),
    "nose_wider": lambda p: replace(p, ala_x=p.ala_x + 0.035, ala_r=p.ala_r + 0.012, tip_r=_add(p.tip_r, (0.015, 0, 0))),
    "nose_narrower": lambda p: replace(p, ala_x=p.ala_x - 0.025, ala_r=p.ala_r - 0.008, tip_r=_add(p.tip_r, (-0.012, 0, 0))),
    "nose_tip_bigger": lambda p: replace(p, tip_r=_add(p.tip_r, (0.03, 0.025, 0.03))),
    "nose_tip_smaller": lambda p: replace(p, tip_r=_add(p.tip_r, (-0.02, -0.015, -0.02))),
    # nose-shape options (slot "nose")
    "nose_button": lambda p: replace(p, tip_z=p.tip_z + 0.05, tip_r=_add(p.tip_r, (0.01, 0.01, 0.01)), bridge_r=0.025, bridge_top=p.bridge_top - 0.12, tip_fwd=p.tip_fwd - 0.02),
    "nose_wide": lambda p: replace(p, ala_x=p.ala_x + 0.05, ala_r=p.ala_r + 0.02, tip_r=_add(p.tip_r, (0.03, -0.01, -0.005)), tip_fwd=p.tip_fwd - 0.03, bridge_r=0.05),
    "nose_pointed": lambda p: replace(p, tip_r=_add(p.tip_r, (-0.025, -0.015, -0.02)), tip_fwd=p.tip_fwd + 0.05, ala_x=p.ala_x - 0.015, tip_z=p.tip_z + 0.02),
}
UNSIGNED_KEYS = {"nose_longer", "nose_shorter", "nose_wider", "nose_narrower", "nose_tip_bigger",
                 "nose_tip_smaller"}


def nose_sdf(head: Head, p: NoseParams):
    fy_tip = float(head.face_y(0.0, p.tip_z))
    fy_top = float(head.face_y(0.0, p.bridge_top))
    tip = np.array([0.0, fy_tip - p.tip_fwd + 0.03, p.tip_z])
    top = np.array([0.0, fy_top + 0.03, p.bridge_top])

    def f(x):
        d = mk.sd_ellipsoid(x, tip, p.tip_r)
        for s in (-1, 1):
            d = mk.smin(d, mk.sd_ellipsoid(x, tip + (s * p.ala_x, 0.07, -0.035), (p.ala_r, p.ala_r * 0.9, p.ala_r * 0.85)), 0.04)
        d = mk.smin(d, mk.sd_capsule(x, top, tip + (0, 0.02, 0.03), p.bridge_r, p.bridge_r * 1.4), 0.06)
        return d
    return f, tip + (0, 0.07, 0.03)


def build_nose(head: Head) -> Part:
    dirs, quads = mk.cube_sphere(14)
    base = NoseParams()
    f, c = nose_sdf(head, base)
    verts = c + dirs * mk.radial_solve(f, c, dirs, 0.7)[:, None]
    keys = {}
    for name, mod in NOSE_KEYS.items():
        fk, _ = nose_sdf(head, mod(base))
        # vertices stay on the basis rays, so every key shares the basis topology
        keys[name] = c + dirs * mk.radial_solve(fk, c, dirs, 0.7)[:, None]
    return Part("Nose", verts, [quads], np.zeros(len(quads), np.int32), ("Nose",), keys=keys)


# ---- mouth -------------------------------------------------------------------------------

MOUTH_W = 0.27


def build_mouth(head: Head) -> list[Part]:
    my = float(head.face_y(0.0, MOUTH_Z))
    origin = (0.0, my, MOUTH_Z)

    def surf(x, z):
        return head.face_y(x, MOUTH_Z + z) - my

    def smile_dz(x, amount):
        return 0.075 * amount * ((x / MOUTH_W) ** 2 - 0.25)

    # inner mouth (dark) and upper teeth, local to the mouth origin
    def inner(open_=0.0, smile=0.0):
        n_a, radii = 40, np.array([0.0, 0.5, 0.8, 1.0])
        a = np.linspace(0, TAU, n_a, endpoint=False)
        rx = MOUTH_W * 0.92
        rz_top, rz_bot = 0.02 + 0.05 * open_, 0.02 + 0.1 * open_
        zc = 0.0
        x = rx * np.cos(a)[None] * radii[:, None]
        rz = np.where(np.sin(a) > 0, rz_top, rz_bot)
        z = zc + rz[None] * np.sin(a)[None] * radii[:, None] + smile_dz(x, smile)
        y = surf(x, z) - 0.006
        disc = np.stack([x, y, z], -1).reshape(-1, 3)[n_a - 1:]     # first ring is the centre
        disc[0] = (0.0, float(surf(0.0, zc)) - 0.006, zc)
        # teeth: an arched band under the upper lip
        tu = np.linspace(-1, 1, 17)
        tx = tu * MOUTH_W * 0.62
        ttop = 0.025 + 0.05 * open_ + smile_dz(tx, smile) * 0.9
        tbot = ttop - 0.055 - 0.04 * open_
        tz = np.stack([ttop, tbot], 0)
        tx2 = np.stack([tx, tx], 0)
        ty = surf(tx2, tz) - 0.014
        teeth = np.stack([tx2, ty, tz], -1).reshape(-1, 3)
        return np.concatenate([disc, teeth])

    n_a = 40
    faces_disc = [mk.fan(0, np.arange(n_a) + 1, reverse=True), mk.grid_quads(3, n_a, wrap=True, offset=1)]
    teeth_q = mk.grid_quads(2, 17, offset=1 + 3 * n_a)[:, ::-1]
    base = inner()
    mats = np.concatenate([np.zeros(n_a + 2 * n_a, np.int32), np.ones(16, np.int32)])
    mouth = Part("Mouth", base, _each_toward(base, faces_disc + [teeth_q], (0, -1, 0)), mats, ("Mouth", "Teeth"), origin=origin,
                 keys={"mouth_open": inner(open_=1.0), "smile": inner(smile=1.0)})

    def lip(upper: bool, full=0.0, open_=0.0, smile=0.0):
        n = 36
        t = np.linspace(-1, 1, n)
        x = t * MOUTH_W * (1.0 if upper else 0.94)
        prof = np.clip(1 - t * t, 0, 1) ** 0.55
        if upper:
            ry = (0.034 + 0.016 * full) * prof + 0.005
            z = 0.03 + 0.008 * full + 0.045 * open_ - 0.012 * np.exp(-(t / 0.12) ** 2) * prof
        else:
            ry = (0.048 + 0.022 * full) * prof + 0.005
            z = -0.048 - 0.014 * full - 0.085 * open_
        z = z + smile_dz(x, smile * 0.8) * (1.0 if upper else 0.85)
        rx = (0.036 + 0.014 * full) * prof + 0.006
        y = surf(x, z) - rx * 0.55
        v, f = mk.sweep(np.stack([x, y, z], -1), rx, ry, ring=12)
        return v, f

    parts = [mouth]
    for upper, name in ((True, "Lip.Upper"), (False, "Lip.Lower")):
        v, f = lip(upper)
        keys = {"lip_full": lip(upper, full=1.0)[0], "mouth_open": lip(upper, open_=1.0)[0],
                "smile": lip(upper, smile=1.0)[0]}
        parts.append(Part(name, v, f, np.zeros(sum(len(x) for x in f), np.int32), (name,),
                          keys=keys, parent="Mouth", origin=origin))
    return parts


# ---- ears --------------------------------------------------------------------------------

def build_ear(head: Head, side: int) -> Part:
    root_c = np.array([0.0, 0.1, EAR_Z])
    rx = float(mk.radial_solve(head.sdf, root_c, np.array([[side, 0.0, 0.0]]), 2.0)[0])
    origin = root_c + (side * (rx - 0.04), 0, 0)
    beta = math.radians(48)
    a = np.array([side * math.cos(beta), -math.sin(beta), 0.0])     # ear plane normal
    b = np.array([-side * math.sin(beta), -math.cos(beta), 0.0])    # forward in the plane
    c = np.array([0.0, 0.0, 1.0])

    def sdf(q):   # q in (a, b, c) coordinates
        d = mk.sd_ellipsoid(q, (0.0, 0.0, 0.0), (0.06, 0.17, 0.26))
        d = mk.smin(d, mk.sd_ellipsoid(q, (-0.01, 0.02, -0.19), (0.055, 0.085, 0.09)), 0.05)
        bowl = mk.sd_ellipsoid(q, (0.06, 0.015, 0.02), (0.05, 0.11, 0.18))
        return mk.smax(d, -bowl, 0.025)

    dirs, quads = mk.cube_sphere(12)
    centre = np.array([-0.02, 0.0, 0.0])
    r = mk.radial_solve(sdf, centre, dirs, 0.5)
    q = centre + dirs * r[:, None]
    q = q + (0.1, 0.0, 0.0)           # push the ear out of the head
    local = q[:, :1] * a + q[:, 1:2] * b + q[:, 2:3] * c
    if np.linalg.det(np.stack([a, b, c])) < 0:        # mirrored frame: keep normals outward
        quads = quads[:, ::-1]
    tag = "L" if side > 0 else "R"
    return Part(f"Ear.{tag}", local, [quads], np.zeros(len(quads), np.int32), (f"Ear.{tag}",),
                origin=tuple(origin))


# ---- neck and clothes --------------------------------------------------------------------

NECK_Y = 0.16


def neck_profile(z):
    """Half-width and front depth of the neck's elliptic section at height z."""
    rad = np.interp(z, [-2.9, -2.2, -1.85, -1.6, -1.2, -0.5], [1.0, 0.85, 0.6, 0.5, 0.47, 0.47])
    depth = np.interp(z, [-2.9, -2.2, -1.85, -1.6, -0.5], [0.6, 0.55, 0.48, 0.44, 0.42])
    return rad, depth


def build_neck() -> Part:
    zs = np.linspace(-0.5, -2.9, 40)
    rad, depth = neck_profile(zs)
    n = 40
    a = np.linspace(0, TAU, n, endpoint=False)
    x = rad[:, None] * np.sin(a)[None]
    y = -depth[:, None] * np.cos(a)[None] * 1.0
    z = np.broadcast_to(zs[:, None], x.shape)
    origin = (0.0, NECK_Y, -1.5)
    v = np.stack([x, y, z - origin[2]], -1).reshape(-1, 3)
    quads = mk.grid_quads(len(zs), n, wrap=True)
    return Part("Neck", v, [quads[:, ::-1]], np.zeros(len(quads), np.int32), ("Neck",),
                parent="", origin=origin, follow_head=False)


def torso_sdf(bulk=0.0):
    def f(x):
        d = mk.sd_ellipsoid(x, (0.0, 0.3, -2.95), (1.75 + bulk, 0.95 + bulk, 1.3 + bulk))
        for s in (-1, 1):
            d = mk.smin(d, mk.sd_ellipsoid(x, (s * 1.3, 0.3, -2.3), (0.75 + bulk, 0.62 + bulk, 0.5 + bulk)), 0.4)
        return d
    return f


TORSO_C = np.array([0.0, 0.3, -2.7])


def _torso(bulk=0.0, n=26):
    dirs, quads = mk.cube_sphere(n)
    f = torso_sdf(bulk)
    r = mk.radial_solve(f, TORSO_C, dirs, 4.0)
    return TORSO_C + dirs * r[:, None], [quads]


def _surface_y(f, x, z, y0=-1.5, y1=0.5):
    x, z = np.broadcast_arrays(np.asarray(x, float), np.asarray(z, float))
    return mk.depth_solve(f, np.stack([x.ravel(), z.ravel()], -1), y0, y1).reshape(x.shape)


def build_tops() -> list[Part]:
    parts = []
    tv, tf = _torso()
    # crew neck: a rolled collar ring around the neck
    cv, cf = mk.torus(0.54, 0.06, 40, 10, rz=0.05)
    tilt = math.radians(-14)
    rot = np.array([[1, 0, 0], [0, math.cos(tilt), -math.sin(tilt)], [0, math.sin(tilt), math.cos(tilt)]])
    cv = cv * (1.0, 0.93, 1.0) @ rot.T + (0.0, NECK_Y + 0.02, -1.63)
    parts.append(_part("Top.Crew", [(tv, tf, 0), (cv, cf, 0)], ["Cloth"], parent="", follow_head=False))

    # v-neck: the shirt front comes up over the neck except for a V of skin, with a trim band
    f = torso_sdf()
    tv2, tf2 = _torso()
    zt, zb, hw, side_x = -1.5, -2.2, 0.4, 0.68

    def front_y(x, z):
        rad, depth = neck_profile(z)
        inside = np.clip(1 - (x / rad) ** 2, 0, None)
        neck = np.where(np.abs(x) < rad, NECK_Y - depth * np.sqrt(inside), 9.0)
        return np.minimum(_surface_y(f, x, z), neck)

    bib = []
    A, B = np.meshgrid(np.linspace(0, 1, 10), np.linspace(0, 1, 14), indexing="ij")
    z = zt + (-2.25 - zt) * B
    wv = hw * np.clip((z - zb) / (zt - zb), 0, 1)
    for s_ in (-1, 1):
        x = s_ * (wv + A * (side_x - wv))
        y = front_y(x, z) - 0.015
        q = mk.grid_quads(10, 14)
        bib.append((np.stack([x, y, z], -1).reshape(-1, 3), [q if s_ > 0 else q[:, ::-1]], 0))
    edge_t = np.linspace(0, 1, 20)
    trims = []
    for s_ in (-1, 1):
        ex = s_ * hw * (1 - edge_t)
        ez = zt + (zb - zt) * edge_t
        ey = front_y(ex, ez) - 0.03
        trims.append((*mk.sweep(np.stack([ex, ey, ez], -1), 0.035, 0.035, ring=8), 0))
    back = np.linspace(0.15, math.pi - 0.15, 24)
    rb = 0.56
    arc = np.stack([rb * np.cos(back) * 1.05, NECK_Y + rb * np.sin(back) * 0.6, np.full_like(back, zt)], -1)
    trims.append((*mk.sweep(arc, 0.04, 0.04, ring=8), 0))
    parts.append(_part("Top.VNeck", [(tv2, tf2, 0), *bib, *trims], ["Cloth"],
                       parent="", follow_head=False))

    # shirt with a collar: two flaps and a band behind the neck
    tv3, tf3 = _torso()
    flaps = []
    for s in (-1, 1):
        ta = np.linspace(0, 1, 10)
        tb = np.linspace(0, 1, 6)
        A, B = np.meshgrid(ta, tb, indexing="ij")
        # flap corners: neck side top, collar point, inner bottom
        p0 = np.array([s * 0.56, 0.0, -1.5])
        p1 = np.array([s * 0.68, 0.0, -1.88])
        p2 = np.array([s * 0.06, 0.0, -1.86])
        p3 = np.array([s * 0.18, 0.0, -1.6])
        P = ((1 - A)[..., None] * ((1 - B)[..., None] * p0 + B[..., None] * p3)
             + A[..., None] * ((1 - B)[..., None] * p1 + B[..., None] * p2))
        yy = _surface_y(f, P[..., 0], P[..., 2])
        yy = np.minimum(yy, -0.44 + 0 * yy) - 0.035 - 0.03 * (1 - A)
        P[..., 1] = yy
        fq = mk.grid_quads(10, 6)
        if s < 0:
            fq = fq[:, ::-1]
        flaps.append((P.reshape(-1, 3), [fq], 0))
    band = mk.torus(0.56, 0.05, 40, 8, rz=0.14)
    bandv = band[0] + (0.0, NECK_Y + 0.03, -1.5)
    placket = mk.sweep(np.stack([np.zeros(8), _surface_y(f, np.zeros(8), np.linspace(-1.86, -2.6, 8)) - 0.01,
                                 np.linspace(-1.86, -2.6, 8)], -1), 0.035, 0.01, ring=8)
    parts.append(_part("Top.Collar", [(tv3, tf3, 0), *flaps, (bandv, band[1], 0),
                                      (placket[0], placket[1], 1)], ["Cloth", "Cloth.Trim"],
                       parent="", follow_head=False))

    # hoodie: a thick hood roll around the neck and two drawstrings
    tv4, tf4 = _torso(bulk=0.05)
    hv, hf = mk.torus(0.68, 0.2, 48, 14, rz=0.16)
    ang = np.arctan2(hv[:, 1], hv[:, 0])
    back_w = mk.smoothstep(-0.2, 1.0, np.sin(ang))      # thicker behind the neck
    hv = hv * (1.0 + 0.25 * back_w[:, None] * (1, 1, 0)) + (0, 0, 0.12) * back_w[:, None]
    hv = hv @ rot.T + (0.0, NECK_Y + 0.05, -1.62)
    strings = []
    for s in (-1, 1):
        sz = np.linspace(-1.7, -2.4, 10)
        sx = s * (0.22 + 0.02 * np.linspace(0, 1, 10))
        sy = _surface_y(torso_sdf(0.05), sx, sz) - 0.03
        strings.append(mk.sweep(np.stack([sx, sy, sz], -1), 0.022, 0.022, ring=8))
    parts.append(_part("Top.Hoodie", [(tv4, tf4, 0), (hv, hf, 0), (strings[0][0], strings[0][1], 1),
                                      (strings[1][0], strings[1][1], 1)], ["Cloth", "Cloth.Trim"],
                       parent="", follow_head=False))

    # turtleneck: a tube up the neck with a rolled top
    tv5, tf5 = _torso()
    zs = np.linspace(-1.82, -1.38, 10)
    rad = np.interp(zs, [-1.82, -1.65, -1.45, -1.38], [0.62, 0.56, 0.55, 0.56])
    a = np.linspace(0, TAU, 40, endpoint=False)
    xx = rad[:, None] * np.sin(a)[None]
    yy = -rad[:, None] * np.cos(a)[None] * 0.98 + NECK_Y
    zz = np.broadcast_to(zs[:, None], xx.shape)
    tube = np.stack([xx, yy, zz], -1).reshape(-1, 3)
    roll_v, roll_f = mk.torus(0.56, 0.05, 40, 8)
    roll_v = roll_v + (0, NECK_Y, -1.4)
    parts.append(_part("Top.Turtleneck", [(tv5, tf5, 0), (tube, [mk.grid_quads(10, 40, wrap=True)[:, ::-1]], 0),
                                          (roll_v, roll_f, 0)], ["Cloth"], parent="", follow_head=False))
    return parts


# ---- hair --------------------------------------------------------------------------------

@dataclass
class HairStyle:
    hem: tuple                      # (azimuth deg, z) control points of the hem, |azimuth|
    top: float = 0.12               # thickness at the crown
    side: float = 0.06              # thickness low on the sides/back
    drape: bool = False             # hang straight down below the widest point
    drape_min: float = 0.0          # minimal horizontal radius of the drape (to cover ears)
    flare: float = 0.35             # outward flare per unit z over the shoulders
    open_deg: float = 62.0          # columns inside this azimuth rest on the forehead
    curls: float = 0.0              # bump amplitude
    curl_freq: float = 7.0
    waves: float = 0.0              # drape wave amplitude
    spikes: float = 0.0
    part: float = 0.0               # side part: x of the part line (0 = none)
    swoop: float = 0.0              # side-part fringe drop over the forehead
    grooves: float = 0.012          # strand clump grooves
    curl_in: float = 0.0            # hem curls toward the neck (bob)
    front_lift: float = 0.0         # extra volume above the forehead (quiff)
    sphere: float = 0.0             # round silhouette of this radius (afro)


HAIR_STYLES = {
    "buzz": HairStyle(hem=((0, 0.98), (55, 0.62), (70, 0.28), (80, -0.02), (86, 0.14), (106, 0.14),
                           (125, -0.45), (180, -0.8)), top=0.025, side=0.02, grooves=0.0),
    "crop": HairStyle(hem=((0, 0.98), (55, 0.62), (70, 0.3), (80, -0.02), (86, 0.14), (106, 0.14),
                           (125, -0.5), (180, -0.85)), top=0.13, side=0.05, grooves=0.015),
    "side_part": HairStyle(hem=((0, 0.9), (55, 0.6), (70, 0.3), (80, -0.02), (86, 0.14), (106, 0.14),
                                (125, -0.55), (180, -0.9)), top=0.16, side=0.06, part=0.34,
                           swoop=0.28, grooves=0.02),
    "spiky": HairStyle(hem=((0, 0.95), (55, 0.6), (70, 0.3), (80, -0.02), (86, 0.14), (106, 0.14),
                            (125, -0.5), (180, -0.85)), top=0.1, side=0.05, spikes=0.16, grooves=0.0),
    "quiff": HairStyle(hem=((0, 0.96), (55, 0.62), (70, 0.3), (80, -0.02), (86, 0.14), (106, 0.14),
                            (125, -0.5), (180, -0.85)), top=0.12, side=0.05, front_lift=0.38,
                       grooves=0.02),
    "medium": HairStyle(hem=((0, 0.98), (60, 0.55), (68, -1.25), (110, -1.4), (180, -1.45)),
                        top=0.14, side=0.1, drape=True, drape_min=1.28, grooves=0.02),
    "bob": HairStyle(hem=((0, 0.98), (60, 0.55), (67, -1.05), (120, -1.0), (180, -0.9)),
                     top=0.15, side=0.12, drape=True, drape_min=1.32, curl_in=0.12, grooves=0.01),
    "long": HairStyle(hem=((0, 0.98), (62, 0.55), (69, -2.35), (180, -2.6)),
                      top=0.13, side=0.09, drape=True, drape_min=1.24, grooves=0.022),
    "long_wavy": HairStyle(hem=((0, 0.98), (62, 0.55), (69, -2.3), (180, -2.5)),
                           top=0.16, side=0.12, drape=True, drape_min=1.32, waves=0.09,
                           grooves=0.02, flare=0.5),
    "curly": HairStyle(hem=((0, 0.98), (60, 0.55), (68, -1.3), (180, -1.35)),
                       top=0.24, side=0.2, drape=True, drape_min=1.42, curls=0.09, curl_freq=12.0,
                       grooves=0.0, flare=0.3),
    "afro": HairStyle(hem=((0, 1.0), (56, 0.6), (68, -0.1), (80, -0.55), (110, -0.6), (140, -0.8),
                           (180, -0.9)), top=0.5, side=0.4, curls=0.08, curl_freq=10.0, grooves=0.0,
                      sphere=1.62),
    "ponytail": HairStyle(hem=((0, 1.0), (55, 0.6), (70, 0.3), (80, 0.05), (86, 0.16), (106, 0.16),
                               (125, -0.45), (180, -0.8)), top=0.07, side=0.05, grooves=0.012),
    "bun": HairStyle(hem=((0, 1.0), (55, 0.6), (70, 0.3), (80, 0.05), (86, 0.16), (106, 0.16),
                          (125, -0.45), (180, -0.8)), top=0.07, side=0.05, grooves=0.012),
}


def _noise3(p: np.ndarray, freq: float, seed: int = 1) -> np.ndarray:
    """Smooth deterministic pseudo-noise in [-1, 1] (a sum of oriented sines)."""
    rng = np.random.default_rng(seed)
    out = np.zeros(p.shape[:-1])
    for _ in range(6):
        k = rng.normal(size=3)
        k = k / np.linalg.norm(k) * freq * rng.uniform(0.7, 1.3)
        out += np.sin(p @ k + rng.uniform(0, TAU))
    return out / 6 ** 0.5 / 1.2


def _hem(style: HairStyle, alpha: np.ndarray) -> np.ndarray:
    deg = np.degrees(np.abs(alpha))
    pts = np.array(style.hem, float)
    z = np.interp(deg, pts[:, 0], pts[:, 1])
    return z


def hair_shell(head: Head, style: HairStyle, cols: int = 120, rows: int = 44,
               alpha_range: tuple | None = None, thick_fn=None, hem_fn=None, k: int = 220):
    """Grid (rows+1, cols) of a hair shell following the skull from the crown to the hem.
    With ``alpha_range`` the grid covers only that azimuth span (an open strip)."""
    if alpha_range is None:
        alpha = np.linspace(-math.pi, math.pi, cols, endpoint=False)
    else:
        alpha = np.linspace(math.radians(alpha_range[0]), math.radians(alpha_range[1]), cols)
    lat = np.linspace(math.pi / 2, -math.pi / 2 + 0.05, k)
    A, L = np.meshgrid(alpha, lat, indexing="ij")                # (cols, k)
    d = _dir(A, L)
    r = head.radius_at(d.reshape(-1, 3)).reshape(A.shape)
    hem = hem_fn(alpha) if hem_fn is not None else _hem(style, alpha)
    hem = _smooth_periodic(hem, 2 if alpha_range is None else 0)
    base = CENTRE + d * r[..., None]
    if thick_fn is not None:
        t = thick_fn(A, L, base)
    else:
        w = mk.smoothstep(math.radians(75), math.radians(5), L)
        t = style.top * (1 - w) + style.side * w
    outer = CENTRE + d * (r + t)[..., None]
    # drape: below the widest point the hair falls straight (and flares over the shoulders)
    rho = np.hypot(outer[..., 0] - CENTRE[0], outer[..., 1] - CENTRE[1])
    if style.drape:
        valid = outer[..., 2] > -0.2
        kw = np.argmax(np.where(valid, rho, -1), axis=1)
        prof = []
        zdrop = np.linspace(0, 1, 90)
        for j in range(len(alpha)):
            top = outer[j, :kw[j] + 1]
            zw, rw = top[-1, 2], rho[j, kw[j]]
            z = zw + (-3.3 - zw) * zdrop[1:]
            target = max(rw, style.drape_min) + style.flare * np.clip(-1.75 - z, 0, None)
            rr = rw + (target - rw) * mk.smoothstep(zw, zw - 0.45, z)
            if style.waves:
                rr = rr + style.waves * np.sin((zw - z) * 5.5 + alpha[j] * 2.0) * mk.smoothstep(zw, zw - 0.6, z)
            hdir = np.array([math.sin(alpha[j]), -math.cos(alpha[j])])
            drop = np.stack([CENTRE[0] + rr * hdir[0], CENTRE[1] + rr * hdir[1], z], -1)
            prof.append(np.concatenate([top, drop]))
    else:
        prof = [outer[j] for j in range(len(alpha))]
    grid = np.zeros((len(alpha), rows + 1, 3))
    resting = np.zeros(len(alpha), bool)
    for j, pj in enumerate(prof):
        seg = np.linalg.norm(np.diff(pj, axis=0), axis=1)
        s = np.concatenate([[0], np.cumsum(seg)])
        below = np.nonzero(pj[:, 2] < hem[j])[0]
        if len(below) == 0:
            cut = s[-1]
        else:
            i = max(below[0], 1)
            z0, z1 = pj[i - 1, 2], pj[i, 2]
            f = (z0 - hem[j]) / max(z0 - z1, 1e-9)
            cut = s[i - 1] + f * (s[i] - s[i - 1])
        resting[j] = (not style.drape) or abs(math.degrees(alpha[j])) < style.open_deg
        ss = np.linspace(0, cut, rows + 1)
        for c in range(3):
            grid[j, :, c] = np.interp(ss, s, pj[:, c])
    return alpha, grid, resting


def _smooth_periodic(x, sigma):
    if sigma <= 0:
        return x
    k = np.arange(-3 * sigma, 3 * sigma + 1)
    w = np.exp(-0.5 * (k / sigma) ** 2)
    w /= w.sum()
    n = len(x)
    idx = (np.arange(n)[:, None] + k[None]) % n
    return (x[idx] * w[None]).sum(1)


def _grid_mesh(grid: np.ndarray, wrap: bool, pole: bool):
    """Faces for a (cols, rows, 3) grid: rows run from the crown (row 0) to the hem."""
    cols, rows, _ = grid.shape
    pts = np.transpose(grid, (1, 0, 2))                     # (rows, cols, 3)
    if pole:
        crown = pts[0].mean(0, keepdims=True)
        verts = np.concatenate([crown, pts[1:].reshape(-1, 3)])
        faces = [mk.fan(0, np.arange(cols) + 1, reverse=False)] if wrap else []
        faces.append(mk.grid_quads(rows - 1, cols, wrap=wrap, offset=1))
    else:
        verts = pts.reshape(-1, 3)
        faces = [mk.grid_quads(rows, cols, wrap=wrap)]
    return verts, faces


def _orient_out(verts, faces, centre=CENTRE):
    f0 = faces[-1]
    a, b, c = verts[f0[:, 0]], verts[f0[:, 1]], verts[f0[:, 2]]
    n = np.cross(b - a, c - a)
    out = np.einsum("ij,ij->i", n, a - centre)
    if np.sum(out) < 0:
        return [f[:, ::-1] for f in faces]
    return faces


def build_hair(head: Head, name: str, style: HairStyle) -> Part:
    def thick(A, L, base):
        w = mk.smoothstep(math.radians(75), math.radians(5), L)
        t = style.top * (1 - w) + style.side * w
        if style.front_lift:
            front = np.exp(-(A / 0.5) ** 2) * mk.smoothstep(math.radians(10), math.radians(45), L) \
                * (1 - mk.smoothstep(math.radians(60), math.radians(85), L))
            t = t + style.front_lift * front
        if style.part:
            dist = np.abs(base[..., 0] - style.part)
            top = mk.smoothstep(0.5, 0.9, base[..., 2]) * (base[..., 1] < 0.5)
            t = t * (1 - 0.75 * np.exp(-(dist / 0.05) ** 2) * top)
            t = t + 0.08 * (base[..., 0] < style.part) * mk.smoothstep(0.3, 0.9, base[..., 2]) \
                * mk.smoothstep(-style.part, style.part - 0.1, base[..., 0])
        if style.grooves:
            t = t + style.grooves * np.sin(A * 26 + L * 3) * mk.smoothstep(math.radians(80), math.radians(40), L)
        if style.sphere:
            # outer surface on a sphere around the upper head, at least a thin layer
            sc = np.array([0.0, 0.2, 0.3]) - CENTRE
            dd = (base - CENTRE) / np.linalg.norm(base - CENTRE, axis=-1, keepdims=True)
            bdot = dd @ sc
            dist = bdot + np.sqrt(np.maximum(bdot ** 2 - sc @ sc + style.sphere ** 2, 0))
            rb = np.linalg.norm(base - CENTRE, axis=-1)
            t = np.maximum(dist - rb, 0.08) * mk.smoothstep(math.radians(-75), math.radians(-20), L) \
                + 0.08 * (1 - mk.smoothstep(math.radians(-75), math.radians(-20), L))
        if style.curls:
            n1 = _noise3(base, style.curl_freq, seed=3)
            n2 = _noise3(base, style.curl_freq * 2.1, seed=4)
            t = t + style.curls * (1.0 - 2.0 * np.abs(n1)) + 0.5 * style.curls * (1.0 - 2.0 * np.abs(n2))
        if style.spikes:
            n = np.clip(_noise3(base, 17.0, seed=7), 0, None) ** 2.5
            t = t + style.spikes * n * mk.smoothstep(math.radians(-5), math.radians(40), L)
        return t

    def hem(alpha):
        z = _hem(style, alpha)
        if style.swoop:
            # a fringe swept from the part across the forehead
            x = np.sin(alpha)
            z = z - style.swoop * np.exp(-((x + 0.1) / 0.45) ** 2) * (np.abs(np.degrees(alpha)) < 60)
        if style.spikes:
            z = z - 0.06 * np.clip(np.sin(alpha * 22), 0, None)
        return z

    alpha, grid, resting = hair_shell(head, style, thick_fn=thick, hem_fn=hem)
    # thin the shell toward hems that rest on the skin, so the hair meets the scalp
    rows = grid.shape[1]
    s = np.linspace(0, 1, rows)
    r_in = np.linalg.norm(grid - CENTRE, axis=-1)
    d = (grid - CENTRE) / r_in[..., None]
    r_head = head.radius_at(d.reshape(-1, 3)).reshape(r_in.shape)
    t = r_in - r_head
    taper = 0.2 + 0.8 * mk.smoothstep(1.0, 0.8, s)[None]
    taper = np.where(resting[:, None], taper, 1.0)
    if style.curl_in:
        tuck = mk.smoothstep(0.85, 1.0, s)[None] * (~resting[:, None])
        hd = grid[..., :2] - CENTRE[:2]
        grid[..., :2] -= hd / np.maximum(np.linalg.norm(hd, axis=-1, keepdims=True), 1e-9) * style.curl_in * tuck[..., None]
        grid[..., 2] += 0.5 * style.curl_in * tuck
        r_in = np.linalg.norm(grid - CENTRE, axis=-1)
        d = (grid - CENTRE) / r_in[..., None]
        t = r_in - head.radius_at(d.reshape(-1, 3)).reshape(r_in.shape)
    # r_in - t is the skull radius along each vertex ray
    grid = CENTRE + d * (r_in - t + np.maximum(t * taper, 0.006))[..., None]
    verts, faces = _grid_mesh(grid, wrap=True, pole=True)
    faces = _orient_out(verts, faces)
    parts = [(verts, faces, 0)]
    if name == "Hair.Bun":
        bc = np.array([0.0, 0.3, 1.62])
        dirs, quads = mk.cube_sphere(10)
        bsdf = lambda x: mk.sd_ellipsoid(x, bc, (0.42, 0.4, 0.36)) - 0.02 * _noise3(x, 12, seed=5)
        bv = bc + dirs * mk.radial_solve(bsdf, bc, dirs, 1.0)[:, None]
        parts.append((bv, [quads], 0))
    if name == "Hair.Ponytail":
        # a high ponytail that falls over the right shoulder, visible from the front
        ctrl = np.array([[0.0, 0.85, 1.05], [-0.45, 1.25, 0.95], [-1.05, 0.95, 0.25],
                         [-1.3, 0.45, -0.6], [-1.35, 0.1, -1.7]])
        tt = np.linspace(0, 1, 36)
        path = np.stack([np.interp(tt, np.linspace(0, 1, 5), ctrl[:, c]) for c in range(3)], -1)
        for _ in range(3):
            path[1:-1] = 0.25 * path[:-2] + 0.5 * path[1:-1] + 0.25 * path[2:]
        rad = 0.24 * (1 - 0.75 * tt ** 2) + 0.1 * np.sin(np.clip(tt * 1.4, 0, 1) * math.pi) * (tt > 0.05)
        rad = np.where(tt < 0.06, 0.13, rad)
        pv, pf = mk.sweep(path, rad, rad * 0.85, ring=14, up=(0, 1, 0))
        parts.append((pv, pf, 0))
    v, f, m = mk.merge(parts)
    return Part(name, v, f, m, ("Hair",), hair=True)


BANG_STYLES = {
    # name: (azimuth half-span, hem function over normalised x in [-1, 1], thickness at hem)
    "blunt": (58, lambda x: 0.5 + 0.1 * x ** 6 - 0.03 * np.clip(np.sin(x * 30), 0, None), 0.06),
    "side_swept": (60, lambda x: 0.52 + 0.26 * (x + 1) / 2 + 0.12 * x ** 4 - 0.25 * np.exp(-((x + 0.55) / 0.35) ** 2), 0.06),
    "curtain": (62, lambda x: 0.8 - 0.42 * np.abs(x) ** 0.7 + 0.12 * x ** 8, 0.07),
    "wispy": (52, lambda x: 0.66 + 0.06 * x ** 4 - 0.1 * np.clip(np.sin(x * 18 + 0.5), 0, None) ** 2, 0.04),
}


def build_bangs(head: Head, name: str, kind: str) -> Part:
    span, hem_x, t_hem = BANG_STYLES[kind]
    style = HairStyle(hem=((0, 0.0),), top=0.14, side=0.08)

    def hem(alpha):
        return hem_x(np.degrees(alpha) / span)

    def thick(A, L, base):
        x = np.degrees(A) / span
        edge = 1 - mk.smoothstep(0.7, 1.0, np.abs(x))
        t = 0.05 + (t_hem + 0.05) * mk.smoothstep(math.radians(70), math.radians(25), L)
        t = t * (0.55 + 0.45 * edge) + 0.012 * np.sin(A * 40)
        return t

    alpha, grid, _ = hair_shell(head, style, cols=48, rows=20, alpha_range=(-span, span),
                                thick_fn=thick, hem_fn=hem)
    # start the strip inside the hair volume (not at the crown)
    grid = grid[:, 6:]
    verts, faces = _grid_mesh(grid, wrap=False, pole=False)
    faces = _orient_out(verts, faces)
    return Part(name, verts, faces, np.zeros(sum(len(f) for f in faces), np.int32), ("Hair",), hair=True)


# ---- hats --------------------------------------------------------------------------------

@dataclass
class HatShape:
    front: float          # band height at the front (z)
    back: float           # band height at the back
    squash: float         # hair above the band is pressed to this thickness
    band_only: float = 0.0   # headband: squash only within this half-height of the band


HATS = {
    "cap": HatShape(front=0.9, back=0.45, squash=0.1),
    "beanie": HatShape(front=0.72, back=0.2, squash=0.07),
    "fedora": HatShape(front=0.86, back=0.62, squash=0.1),
    "bucket": HatShape(front=0.74, back=0.42, squash=0.1),
    "headband": HatShape(front=0.88, back=0.6, squash=0.05, band_only=0.09),
}


def _band_z(hat: HatShape, alpha):
    """Band height around the head (a tilted plane seen on the skull)."""
    return 0.5 * (hat.front + hat.back) + 0.5 * (hat.front - hat.back) * np.cos(alpha)


def _band_z_at(hat: HatShape, p):
    """Band height for points p (by their azimuth around the head axis)."""
    alpha = np.arctan2(p[..., 0] - CENTRE[0], -(p[..., 1] - CENTRE[1]))
    return _band_z(hat, alpha)


def squash_for_hat(head: Head, world: np.ndarray, hat: HatShape) -> np.ndarray:
    """Hair vertices pressed under a hat: the thickness above the band is limited."""
    rel = world - CENTRE
    rho = np.linalg.norm(rel, axis=-1)
    d = rel / rho[:, None]
    r = head.radius_at(d)
    t = rho - r
    zb = _band_z_at(hat, world)
    if hat.band_only:
        w = 1 - mk.smoothstep(hat.band_only, hat.band_only + 0.12, np.abs(world[:, 2] - zb))
    else:
        w = mk.smoothstep(zb - 0.12, zb + 0.06, world[:, 2])
    t_new = t + (np.minimum(t, hat.squash) - t) * w
    return CENTRE + d * (r + t_new)[:, None]


def build_hats(head: Head) -> list[Part]:
    parts = []
    style = HairStyle(hem=((0, 0),), top=0.16, side=0.16)

    def crown(hat: HatShape, t_top, t_side, extra_fn=None, rows=22):
        def hem(alpha):
            return _band_z(hat, alpha)

        def thick(A, L, base):
            w = mk.smoothstep(math.radians(80), math.radians(10), L)
            t = t_top * (1 - w) + t_side * w
            if extra_fn is not None:
                t = t + extra_fn(A, L, base)
            return t
        alpha, grid, _ = hair_shell(head, style, cols=72, rows=rows, thick_fn=thick, hem_fn=hem)
        v, f = _grid_mesh(grid, wrap=True, pole=True)
        return alpha, grid, v, _orient_out(v, f)

    # baseball cap: crown, visor, button
    cap = HATS["cap"]
    alpha, grid, cv, cf = crown(cap, 0.2, 0.15)
    edge = grid[:, -1]                                        # band ring (cols, 3)
    front = np.abs(alpha) < math.radians(56)
    ring = edge[front]
    a_f = alpha[front]
    hd = ring[:, :2] - CENTRE[:2]
    hd = hd / np.linalg.norm(hd, axis=1, keepdims=True)
    reach = 0.7 * np.cos(a_f * 1.2) ** 0.5
    steps = np.linspace(0, 1, 8)
    visor = []
    for s_ in steps:
        pt = ring.copy()
        pt[:, 0] += hd[:, 0] * reach * s_ * 0.8
        pt[:, 1] += hd[:, 1] * reach * s_ - 0.05 * s_
        pt[:, 2] += -0.2 * s_ ** 1.3 - 0.22 * s_ * (np.abs(a_f) / 1.0) ** 2
        visor.append(pt)
    visor = np.stack(visor)                                   # (steps, n, 3)
    top_v = visor.reshape(-1, 3)
    bot_v = top_v - (0, 0, 0.035)
    nv = len(top_v)
    q = mk.grid_quads(len(steps), len(a_f))
    rim = np.stack([np.arange(len(a_f)) + (len(steps) - 1) * len(a_f)], 0)[0]
    side_q = np.stack([rim[:-1], rim[1:], rim[1:] + nv, rim[:-1] + nv], -1)
    visor_v = np.concatenate([top_v, bot_v])
    visor_f = [q[:, ::-1], q + nv, side_q]
    btn_dirs, btn_q = mk.cube_sphere(4)
    top_pt = cv[0] + (0, 0, -0.01)
    bv = top_pt + btn_dirs * (0.07, 0.07, 0.045)
    parts.append(_part("Hat.Cap", [(cv, cf, 0), (visor_v, visor_f, 0), (bv, [btn_q], 0)], ["Hat"]))

    # beanie: ribbed knit with a folded cuff and a pom-pom
    bea = HATS["beanie"]

    def knit(A, L, base):
        zb = _band_z_at(bea, base)
        cuff = 1 - mk.smoothstep(zb + 0.22, zb + 0.26, base[..., 2])
        return 0.012 * np.sin(A * 48) * (1 - cuff) + 0.045 * cuff + 0.08 * mk.smoothstep(math.radians(40), math.radians(85), L)
    alpha, grid, bv, bf = crown(bea, 0.12, 0.1, knit, rows=30)
    pc = bv[0] + (0, 0.0, 0.12)
    pdirs, pq = mk.cube_sphere(8)
    psdf = lambda x: mk.sd_ellipsoid(x, pc, (0.2, 0.2, 0.18)) - 0.015 * _noise3(x, 30, seed=9)
    pv = pc + pdirs * mk.radial_solve(psdf, pc, pdirs, 0.5)[:, None]
    parts.append(_part("Hat.Beanie", [(bv, bf, 0), (pv, [pq], 0)], ["Hat"]))

    # fedora: pinched flat-topped crown, ribbon band, wide brim
    fed = HATS["fedora"]

    def fed_crown(A, L, base):
        return 0.22 * mk.smoothstep(math.radians(30), math.radians(80), L)
    alpha, grid, fv, ff = crown(fed, 0.2, 0.14, fed_crown)
    zmax = fv[:, 2].max()
    flat_top = zmax - 0.22
    fv[:, 2] = np.where(fv[:, 2] > flat_top, flat_top + (fv[:, 2] - flat_top) * 0.25, fv[:, 2])
    # pinch: a dent along the top centre line
    fv[:, 2] -= 0.09 * np.exp(-(fv[:, 0] / 0.18) ** 2) * mk.smoothstep(flat_top - 0.1, flat_top, fv[:, 2])
    band_pts = grid[:, -1]
    brim_v, brim_f = _brim(band_pts, alpha, width=0.5, droop=lambda a: 0.1 * np.cos(a) ** 2 - 0.06, thick=0.03)
    ribbon = _ribbon(grid, 0.14, 0.012)
    parts.append(_part("Hat.Fedora", [(fv, ff, 0), (brim_v, brim_f, 0), (ribbon[0], ribbon[1], 1)],
                       ["Hat", "Hat.Band"]))

    # bucket hat: rounded crown and a sloping brim
    buc = HATS["bucket"]
    alpha, grid, uv, uf = crown(buc, 0.2, 0.15)
    ztop = uv[:, 2].max() - 0.16
    uv[:, 2] = np.where(uv[:, 2] > ztop, ztop + (uv[:, 2] - ztop) * 0.3, uv[:, 2])
    brim_v, brim_f = _brim(grid[:, -1], alpha, width=0.36, droop=lambda a: 0.24 + 0 * a, thick=0.03)
    parts.append(_part("Hat.Bucket", [(uv, uf, 0), (brim_v, brim_f, 0)], ["Hat"]))

    # headband: a soft band over the hair above the forehead
    hb = HATS["headband"]
    a = np.linspace(-math.pi, math.pi, 72, endpoint=False)
    zc = _band_z(hb, a)
    # skull heights over a dense elevation range, to find the band's elevation per azimuth
    lats = np.linspace(-0.6, 1.4, 200)
    LA, AA = np.meshgrid(lats, a, indexing="ij")
    dd = _dir(AA, LA)
    zz = CENTRE[2] + dd[..., 2] * head.radius_at(dd.reshape(-1, 3)).reshape(LA.shape)
    rows = []
    for dz in np.linspace(-0.08, 0.08, 6):
        idx = np.argmin(np.abs(zz - (zc + dz)[None]), axis=0)
        lat = lats[idx]
        dvec = _dir(a, lat)
        rad = head.radius_at(dvec) + hb.squash + 0.05 - 0.03 * (abs(dz) / 0.08) ** 2
        rows.append(CENTRE + dvec * rad[:, None])
    band = np.stack(rows)                       # (6, 72, 3)
    hv = band.reshape(-1, 3)
    hf = _orient_out(hv, [mk.grid_quads(6, 72, wrap=True)])
    parts.append(_part("Hat.Headband", [(hv, hf, 0)], ["Hat"]))
    return parts


def _brim(ring: np.ndarray, alpha: np.ndarray, width: float, droop, thick: float):
    """A brim around a band ring: ``width`` outward, ``droop(alpha)`` downward at the edge."""
    hd = ring[:, :2] - CENTRE[:2]
    hd = hd / np.linalg.norm(hd, axis=1, keepdims=True)
    steps = np.linspace(0, 1, 7)
    layers = []
    for s_ in steps:
        pt = ring.copy()
        pt[:, :2] += hd * (width * s_ - 0.02)
        pt[:, 2] -= droop(alpha) * s_ ** 1.5 + 0.01
        layers.append(pt)
    top = np.stack(layers).reshape(-1, 3)
    bot = top - (0, 0, thick)
    n = len(top)
    cols = len(ring)
    q = mk.grid_quads(len(steps), cols, wrap=True)
    rim = np.arange(cols) + (len(steps) - 1) * cols
    rim_q = np.stack([rim, np.roll(rim, -1), np.roll(rim, -1) + n, rim + n], -1)
    v = np.concatenate([top, bot])
    f = _orient_out(v, [q, q[:, ::-1] + n, rim_q])
    return v, f


def _ribbon(grid: np.ndarray, height: float, extra: float):
    """A band around the lowest rows of a crown grid (cols, rows, 3)."""
    cols = grid.shape[0]
    z0 = grid[:, -1, 2]
    layers = []
    for f_ in np.linspace(0, 1, 4):
        target = z0 + height * f_ + 0.03
        pts = np.zeros((cols, 3))
        for c in range(3):
            pts[:, c] = [np.interp(target[j], grid[j, ::-1, 2], grid[j, ::-1, c]) for j in range(cols)]
        hd = pts[:, :2] - CENTRE[:2]
        pts[:, :2] += hd / np.linalg.norm(hd, axis=1, keepdims=True) * extra
        layers.append(pts)
    v = np.stack(layers).reshape(-1, 3)
    return v, _orient_out(v, [mk.grid_quads(4, cols, wrap=True)])


# ---- glasses -----------------------------------------------------------------------------

def _superellipse(a, b, n, m=96):
    t = np.linspace(0, TAU, m, endpoint=False)
    c, s_ = np.cos(t), np.sin(t)
    x = a * np.sign(c) * np.abs(c) ** (2 / n)
    z = b * np.sign(s_) * np.abs(s_) ** (2 / n)
    return np.stack([x, z], -1)


GLASSES = {
    # name: (outline fn(side) -> (m, 2) points around the lens centre, frame radius, frame material,
    #        lens material)
    "round": (lambda side: _superellipse(0.265, 0.255, 2.0), 0.022, "Glasses.Frame", "Glasses.Lens"),
    "rectangular": (lambda side: _superellipse(0.3, 0.2, 4.5), 0.026, "Glasses.Frame", "Glasses.Lens"),
    "sunglasses": (lambda side: _wayfarer(side), 0.034, "Glasses.Frame", "Glasses.Dark"),
    "aviators": (lambda side: _aviator(side), 0.013, "Glasses.Metal", "Glasses.Dark"),
}


def _wayfarer(side):
    p = _superellipse(0.3, 0.21, 4.0)
    top = p[:, 1] > 0
    p[:, 0] *= np.where(top, 1.0, 0.88) + 0.06 * (p[:, 0] * side > 0) * top
    p[:, 1] += 0.03 * (p[:, 0] * side) / 0.3 * top
    return p


def _aviator(side):
    p = _superellipse(0.29, 0.25, 2.6)
    low = p[:, 1] < 0
    p[:, 1] = np.where(low, p[:, 1] * (1.0 + 0.2 * (p[:, 0] * side / 0.29)), p[:, 1] * 0.82)
    p[:, 0] += 0.02 * (p[:, 1] < 0) * side
    return p


def build_glasses(head: Head) -> list[Part]:
    parts = []
    for name, (outline, fr, frame_mat, lens_mat) in GLASSES.items():
        pieces = []
        yg = float(head.face_y(EYE_X, 0.0)) - 0.24
        inner_pts = {}
        outer_pts = {}
        for side in (1, -1):
            ol = outline(side)
            wrap = math.radians(9) * side
            x = side * EYE_X + ol[:, 0]
            z = ol[:, 1] + 0.01
            y = yg + (ol[:, 0] * side) * math.sin(abs(wrap)) * 0.9
            path = np.stack([x, y, z], -1)
            fv, ff = mk.sweep(path, fr, fr * 1.1, ring=8, up=(0, -1, 0), closed=True)
            pieces.append((fv, ff, 0))
            centre = np.array([[side * EYE_X, yg + 0.004, 0.01]])
            lens = np.concatenate([centre, path + (0, 0.004, 0)])
            lf = mk.fan(0, np.arange(len(path)) + 1)
            lf = _orient_toward(lens, [lf], (0, -1, 0))
            pieces.append((lens, lf, 1))
            inner_pts[side] = path[np.argmin(ol[:, 0] * side + 2 * np.abs(ol[:, 1] - 0.04))]
            k = np.argmax(ol[:, 0] * side - 2 * np.abs(ol[:, 1] - 0.06))
            outer_pts[side] = path[k]
        # bridge arching over the nose
        a, b = inner_pts[-1], inner_pts[1]
        tb = np.linspace(0, 1, 12)
        bridge = a[None] * (1 - tb[:, None]) + b[None] * tb[:, None]
        bridge[:, 2] += 0.05 * np.sin(tb * math.pi)
        bridge[:, 1] += 0.01 * np.sin(tb * math.pi)
        bv, bf = mk.sweep(bridge, fr * 0.9, fr * 0.9, ring=8)
        pieces.append((bv, bf, 0))
        if name == "aviators":
            bridge2 = bridge.copy()
            bridge2[:, 2] += 0.1 + 0.02 * np.sin(tb * math.pi)
            pieces.append((*mk.sweep(bridge2, fr * 0.8, fr * 0.8, ring=6), 0))
        # temples back to the ears, just outside the head
        for side in (1, -1):
            o = outer_pts[side]
            tt = np.linspace(0, 1, 14)
            ys = o[1] + (0.05 - o[1]) * tt
            zs = o[2] + (0.06 - o[2]) * tt
            xs0 = o[0] + side * 0.06 * np.sin(tt * math.pi / 2)
            pts = np.stack([xs0, ys, zs], -1)
            rel = pts - CENTRE
            dd = _unit(rel)
            rr = head.radius_at(dd)
            hx = CENTRE[0] + dd[:, 0] * (rr + 0.05)
            xs = np.where(side > 0, np.maximum(xs0, hx), np.minimum(xs0, hx))
            xs[0] = o[0]
            pts = np.stack([xs, ys, zs], -1)
            tv, tf = mk.sweep(pts, fr * 0.8, fr * 0.9, ring=6)
            pieces.append((tv, tf, 0))
        parts.append(_part("Glasses." + name.title(), pieces, [frame_mat, lens_mat]))
    return parts


def _each_toward(verts, faces, direction):
    """Orient every face array separately so its normals face ``direction``."""
    return [_orient_toward(verts, [f], direction)[0] for f in faces]


def _orient_toward(verts, faces, direction):
    f0 = faces[0]
    a, b, c = verts[f0[:, 0]], verts[f0[:, 1]], verts[f0[:, 2]]
    n = np.cross(b - a, c - a).sum(0)
    if np.dot(n, direction) < 0:
        return [f[:, ::-1] for f in faces]
    return faces


# ---- facial hair -------------------------------------------------------------------------

def _face_patch(head: Head, alpha_deg, ztop_fn, zbot: float, thick_fn, cols=60, rows=22,
                hole=None):
    """A shell over the lower face between ``ztop_fn(alpha)`` and ``zbot`` (or the jaw's
    underside), optionally with an elliptic hole (cx, cz, rx, rz) around the mouth."""
    alpha = np.radians(np.linspace(-alpha_deg, alpha_deg, cols))
    lat = np.linspace(math.radians(25), math.radians(-84), 160)
    A, L = np.meshgrid(alpha, lat, indexing="ij")
    d = _dir(A, L)
    r = head.radius_at(d.reshape(-1, 3)).reshape(A.shape)
    surf = CENTRE + d * r[..., None]
    ztop = ztop_fn(alpha)
    grid = np.zeros((cols, rows, 3))
    dgrid = np.zeros((cols, rows, 3))
    for j in range(cols):
        z = surf[j, :, 2]
        seg = np.linalg.norm(np.diff(surf[j], axis=0), axis=1)
        s_ = np.concatenate([[0], np.cumsum(seg)])
        i0 = np.nonzero(z <= ztop[j])[0]
        i0 = i0[0] if len(i0) else 0
        below = np.nonzero(z <= zbot)[0]
        # follow the jaw underneath for a bit past zbot so the edge tucks in
        s0, s1 = s_[i0], s_[-1] if len(below) == 0 else min(s_[-1], s_[below[0]] + 0.25)
        ss = np.linspace(s0, s1, rows)
        for c in range(3):
            grid[j, :, c] = np.interp(ss, s_, surf[j, :, c])
            dgrid[j, :, c] = np.interp(ss, s_, d[j, :, c])
    dgrid = _unit(dgrid)
    u = np.linspace(0, 1, rows)[None].repeat(cols, 0)
    if hole is not None:
        cx, cz, hx, hz = hole
        ex = (grid[..., 0] - cx) / hx
        ez = (grid[..., 2] - cz) / hz
        e = np.hypot(ex, ez)
        inside = e < 1.0
        # snap inside vertices onto the ellipse (in x/z), then back onto the skin
        sx = cx + ex / np.maximum(e, 1e-6) * hx
        sz = cz + ez / np.maximum(e, 1e-6) * hz
        gy = head.face_y(sx, sz)
        snapped = np.stack([sx, gy, sz], -1)
        grid = np.where(inside[..., None], snapped, grid)
        dgrid = np.where(inside[..., None], _unit(snapped - CENTRE), dgrid)
        inside_flat = np.transpose(inside, (1, 0)).reshape(-1)
    t = thick_fn(np.degrees(alpha)[:, None].repeat(rows, 1), u, grid)
    out = grid + dgrid * t[..., None]
    verts = np.transpose(out, (1, 0, 2)).reshape(-1, 3)
    quads = mk.grid_quads(rows, cols)
    if hole is not None:
        quads = quads[~inside_flat[quads].all(1)]
    faces = _orient_out(verts, [quads])
    return verts, faces


def _mustache(head: Head, width=0.34, thick=0.065, droop=0.08, z0=0.1):
    n = 30
    t = np.linspace(-1, 1, n)
    x = t * width
    z = MOUTH_Z + z0 - droop * t ** 2 + 0.015 * np.exp(-(t / 0.2) ** 2)
    y = head.face_y(x, z) - 0.045
    ry = thick * (1 - 0.55 * np.abs(t) ** 1.5) * (1 - 0.3 * np.exp(-(t / 0.09) ** 2))
    return mk.sweep(np.stack([x, y, z], -1), 0.045, ry, ring=10)


def build_facial_hair(head: Head) -> list[Part]:
    parts = []

    def beard_top(alpha):
        deg = np.abs(np.degrees(alpha))
        return np.interp(deg, [0, 22, 40, 60, 78, 92, 110], [-0.74, -0.74, -0.58, -0.42, -0.12, 0.06, 0.06])

    def full_thick(T, chin):
        def f(deg, u, grid):
            top = mk.smoothstep(0.0, 0.25, u)
            low = chin * mk.smoothstep(-1.0, -1.5, grid[..., 2]) * np.exp(-(deg / 50) ** 2)
            side = 1 - mk.smoothstep(95, 110, np.abs(deg))
            return np.maximum((T * top + low) * (0.3 + 0.7 * side), 0.006) + 0.006 * np.sin(deg * 0.9)
        return f

    hole = (0.0, MOUTH_Z - 0.02, MOUTH_W + 0.07, 0.14)
    # stubble: three stacked translucent layers, each a little smaller, for a soft edge
    layers = []
    for k in range(3):
        top = np.array([-0.56, -0.58, -0.62, -0.42, -0.12, 0.06, 0.06]) - 0.04 * k
        sv, sf = _face_patch(head, 110 - 5 * k,
                             lambda a, top=top: np.interp(np.abs(np.degrees(a)), [0, 15, 30, 60, 80, 92, 110], top),
                             -1.6, lambda deg, u, g, k=k: 0.006 + 0.002 * k + 0 * u,
                             hole=(0.0, MOUTH_Z - 0.015, MOUTH_W + 0.03 + 0.025 * k, 0.085 + 0.02 * k),
                             cols=50, rows=18)
        layers.append((sv, sf, 0))
    parts.append(_part("FacialHair.Stubble", layers, ["FacialHair.Stubble"]))

    mv, mf = _mustache(head)
    parts.append(_part("FacialHair.Mustache", [(mv, mf, 0)], ["FacialHair"]))

    gv, gf = _face_patch(head, 26, lambda a: np.full_like(a, MOUTH_Z - 0.1), -1.6,
                         lambda deg, u, g: (0.05 + 0.07 * mk.smoothstep(-1.2, -1.55, g[..., 2]))
                         * (1 - mk.smoothstep(16, 26, np.abs(deg))) * mk.smoothstep(0.0, 0.2, u) + 0.005,
                         cols=24, rows=16)
    mv2, mf2 = _mustache(head, width=0.27, thick=0.045, droop=0.12)
    parts.append(_part("FacialHair.Goatee", [(gv, gf, 0), (mv2, mf2, 0)], ["FacialHair"]))

    bv, bf = _face_patch(head, 110, beard_top, -1.6, full_thick(0.035, 0.02), hole=hole)
    mv3, mf3 = _mustache(head, width=0.32, thick=0.045, droop=0.08)
    parts.append(_part("FacialHair.ShortBeard", [(bv, bf, 0), (mv3, mf3, 0)], ["FacialHair"]))

    bv, bf = _face_patch(head, 110, beard_top, -1.6, full_thick(0.08, 0.16), hole=hole)
    mv4, mf4 = _mustache(head, width=0.34, thick=0.06, droop=0.1)
    parts.append(_part("FacialHair.FullBeard", [(bv, bf, 0), (mv4, mf4, 0)], ["FacialHair"]))
    return parts


# ---- earrings ----------------------------------------------------------------------------

def build_earrings(ears: dict[int, Part]) -> list[Part]:
    parts = {"studs": [], "hoops": [], "drops": []}
    for side, ear in ears.items():
        lobe = ear.verts[np.argmin(ear.verts[:, 2] + 0.3 * np.abs(ear.verts[:, 0]))]
        lobe = lobe + (side * 0.02, -0.02, 0.03)
        dirs, q = mk.cube_sphere(5)
        parts["studs"].append((lobe + dirs * 0.055 + (side * 0.02, -0.03, 0), [q], 0))
        tv, tf = mk.torus(0.13, 0.022, 28, 8)
        rot = math.radians(-30 * side)
        # hoop in a vertical plane turned toward the camera
        tv = np.stack([tv[:, 0], -tv[:, 2], tv[:, 1]], -1)            # stand it up (x/z plane)
        cr, sr = math.cos(rot), math.sin(rot)
        tv = np.stack([tv[:, 0] * cr - tv[:, 1] * sr, tv[:, 0] * sr + tv[:, 1] * cr, tv[:, 2]], -1)
        parts["hoops"].append((tv + lobe + (side * 0.02, -0.02, -0.13), tf, 0))
        chain = np.stack([np.full(6, lobe[0]), np.full(6, lobe[1]), lobe[2] - np.linspace(0, 0.16, 6)], -1)
        cv, cf = mk.sweep(chain, 0.012, 0.012, ring=6)
        gem_c = lobe - (0, 0, 0.24)
        gsdf = lambda x, gc=gem_c: mk.sd_ellipsoid(x, gc, (0.065, 0.06, 0.09))
        gv = gem_c + dirs * mk.radial_solve(gsdf, gem_c, dirs, 0.2)[:, None]
        parts["drops"].append((cv, cf, 0))
        parts["drops"].append((gv, [q], 0))
    out = []
    for name, pieces in parts.items():
        for side in (1, -1):
            tag = "L" if side > 0 else "R"
            mine = pieces[:len(pieces) // 2] if side > 0 else pieces[len(pieces) // 2:]
            ear = ears[side]
            out.append(_part(f"Earring.{name.title()}.{tag}", mine, ["Earring"], parent=ear.name,
                             origin=ear.origin))
    return out


# ---- cheeks ------------------------------------------------------------------------------

def build_cheeks(head: Head) -> list[Part]:
    parts = []
    pieces = []
    for side in (1, -1):
        a = np.linspace(0, TAU, 32, endpoint=False)
        rings = []
        for rr in (0.0, 0.5, 1.0):
            x = side * 0.58 + 0.2 * rr * np.cos(a)
            z = -0.42 + 0.12 * rr * np.sin(a)
            rings.append(np.stack([x, head.face_y(x, z) - 0.006, z], -1))
        v = np.concatenate(rings)
        f = [mk.grid_quads(3, 32, wrap=True)]
        pieces.append((v, _orient_toward(v, f, (0, -1, 0)), 0))
    parts.append(_part("Cheeks.Blush", pieces, ["Skin.Blush"]))
    rng = np.random.default_rng(11)
    dots = []
    for side in (1, -1):
        pts = rng.normal(size=(14, 2)) * (0.13, 0.07) + (side * 0.42, -0.3)
        for (x0, z0) in pts:
            a = np.linspace(0, TAU, 8, endpoint=False)
            r_ = 0.013 * rng.uniform(0.8, 1.3)
            x = np.concatenate([[x0], x0 + r_ * np.cos(a)])
            z = np.concatenate([[z0], z0 + r_ * np.sin(a)])
            v = np.stack([x, head.face_y(x, z) - 0.005, z], -1)
            f = [mk.fan(0, np.arange(8) + 1)]
            dots.append((v, _orient_toward(v, f, (0, -1, 0)), 0))
    parts.append(_part("Cheeks.Freckles", dots, ["Skin.Freckles"]))
    return parts


# ------------------------------------------------------------------------------------------
# Materials
# ------------------------------------------------------------------------------------------

# name -> (sRGB hex, alpha, roughness, metallic). Colours driven by parameters are overwritten
# by the rig; these are the defaults a fresh build shows.
MATERIALS = {
    "Skin": ("#e9b48f", 1.0, 0.6, 0.0),
    "Skin.Blush": ("#e8707a", 0.35, 0.6, 0.0),
    "Skin.Freckles": ("#9a5a3c", 0.7, 0.6, 0.0),
    "Nose": ("#e9b48f", 1.0, 0.6, 0.0),
    "Ear.L": ("#e9b48f", 1.0, 0.6, 0.0),
    "Ear.R": ("#e9b48f", 1.0, 0.6, 0.0),
    "Neck": ("#e9b48f", 1.0, 0.6, 0.0),
    "Eye.L.White": ("#f7f5f2", 1.0, 0.2, 0.0),
    "Eye.R.White": ("#f7f5f2", 1.0, 0.2, 0.0),
    "Eye.L.Iris": ("#5a3516", 1.0, 0.2, 0.0),
    "Eye.R.Iris": ("#5a3516", 1.0, 0.2, 0.0),
    "Eye.L.Pupil": ("#151010", 1.0, 0.2, 0.0),
    "Eye.R.Pupil": ("#151010", 1.0, 0.2, 0.0),
    "Eye.L.Lash": ("#1c1412", 1.0, 0.6, 0.0),
    "Eye.R.Lash": ("#1c1412", 1.0, 0.6, 0.0),
    "Eye.L.Highlight": ("#ffffff", 1.0, 0.2, 0.0),
    "Eye.R.Highlight": ("#ffffff", 1.0, 0.2, 0.0),
    "Brow.L": ("#3b2517", 1.0, 0.8, 0.0),
    "Brow.R": ("#3b2517", 1.0, 0.8, 0.0),
    "Mouth": ("#5a1e22", 1.0, 0.6, 0.0),
    "Teeth": ("#f4f1ea", 1.0, 0.3, 0.0),
    "Lip.Upper": ("#c0706a", 1.0, 0.45, 0.0),
    "Lip.Lower": ("#c0706a", 1.0, 0.45, 0.0),
    "Hair": ("#3b2517", 1.0, 0.55, 0.0),
    "FacialHair": ("#3b2517", 1.0, 0.7, 0.0),
    "FacialHair.Stubble": ("#3b2517", 0.13, 0.8, 0.0),
    "Hat": ("#2f4a7a", 1.0, 0.7, 0.0),
    "Hat.Band": ("#22201e", 1.0, 0.6, 0.0),
    "Glasses.Frame": ("#1d1b1b", 1.0, 0.3, 0.0),
    "Glasses.Metal": ("#c9a55a", 1.0, 0.25, 1.0),
    "Glasses.Lens": ("#cfe3f0", 0.22, 0.05, 0.0),
    "Glasses.Dark": ("#151a1f", 0.93, 0.05, 0.0),
    "Earring": ("#e2b94f", 1.0, 0.25, 1.0),
    "Cloth": ("#3f6fb0", 1.0, 0.8, 0.0),
    "Cloth.Trim": ("#f1efe9", 1.0, 0.8, 0.0),
}


def _srgb_to_linear(c: float) -> float:
    return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4


def hex_linear(h: str) -> tuple[float, float, float]:
    h = h.lstrip("#")
    return tuple(_srgb_to_linear(int(h[i:i + 2], 16) / 255.0) for i in (0, 2, 4))


def make_materials() -> dict:
    import bpy
    out = {}
    for name, (hexc, alpha, rough, metal) in MATERIALS.items():
        m = bpy.data.materials.get(name) or bpy.data.materials.new(name)
        rgb = hex_linear(hexc)
        m.diffuse_color = (*rgb, alpha)
        m.roughness = rough
        m.metallic = metal
        if alpha < 1.0:
            m.blend_method = "BLEND" if hasattr(m, "blend_method") else m.blend_method
            m.surface_render_method = "BLENDED"
        tree = m.node_tree
        bsdf = tree.nodes.get("Principled BSDF") if tree else None
        if bsdf is not None:
            bsdf.inputs["Base Color"].default_value = (*rgb, 1.0)
            bsdf.inputs["Roughness"].default_value = rough
            bsdf.inputs["Metallic"].default_value = metal
            bsdf.inputs["Alpha"].default_value = alpha
        out[name] = m
    return out


# ------------------------------------------------------------------------------------------
# Assembly
# ------------------------------------------------------------------------------------------

def _face_keys(part: Part, head: Head, keyed: dict[str, Head]) -> dict[str, np.ndarray]:
    """The head's radial change for each face key, applied to the part's rest vertices."""
    world = part.verts + np.asarray(part.origin)
    rel = world - CENTRE
    d = _unit(rel)
    r0 = head.radius_at(d)
    keys = {}
    for name, h in keyed.items():
        dr = h.radius_at(d) - r0
        keys[name] = part.verts + dr[:, None] * d
    # shift keys that already exist (options) by the same field when they get combined
    return keys


def build_parts(head: Head) -> list[Part]:
    parts = [build_nose(head)]
    ears = {}
    for side in (1, -1):
        ears[side] = build_ear(head, side)
        parts += [build_eye(head, side), build_brow(head, side), ears[side]]
    parts += build_mouth(head)
    parts += build_earrings(ears)
    parts += build_glasses(head)
    parts += build_facial_hair(head)
    parts += build_hats(head)
    parts += build_cheeks(head)
    parts.append(build_neck())
    parts += build_tops()
    for key, style in HAIR_STYLES.items():
        parts.append(build_hair(head, "Hair." + key.title().replace("_", ""), style))
    for kind in BANG_STYLES:
        parts.append(build_bangs(head, "Bangs." + kind.title().replace("_", ""), kind))
    return parts


def build(pack=None, scene=None):
    """Build the stylized avatar into the current (empty) scene; returns its collection."""
    import bpy
    from mathutils import Matrix

    from ...backend.errors import UserError

    scene = scene or bpy.context.scene
    coll_name = getattr(pack, "collection", "Likeness") if pack is not None else "Likeness"
    if bpy.data.collections.get(coll_name) is not None or bpy.data.objects.get("Head") is not None:
        raise UserError(f"this scene already has an avatar ('{coll_name}'): build into an empty "
                        f"scene (bpy.ops.wm.read_homefile(use_empty=True))")
    coll = bpy.data.collections.new(coll_name)
    scene.collection.children.link(coll)

    base = HeadParams()
    head = Head(base)
    keyed = {name: Head(mod(base)) for name, mod in HEAD_KEYS.items()}
    mats = make_materials()

    # the avatar's one root (what an artist moves), at the bottom of the torso; every object
    # is under it. Parent inverses undo each parent's rest offset, so local values (and the
    # renders) are what they were when the parts had no parent.
    avatar_root = bpy.data.objects.new("Root", None)
    avatar_root.empty_display_type = "ARROWS"
    avatar_root.empty_display_size = 1.0
    avatar_root.location = ROOT
    coll.objects.link(avatar_root)
    root = bpy.data.objects.new("HeadRoot", None)
    root.empty_display_type = "PLAIN_AXES"
    root.empty_display_size = 0.3
    root.location = PIVOT
    coll.objects.link(root)
    root.parent = avatar_root
    root.matrix_parent_inverse = Matrix.Translation(ROOT).inverted()
    rest = {"Root": ROOT, "HeadRoot": PIVOT}

    head_part = build_head(head, keyed)
    # control keys on the head (no shape change of their own) that drive the hair's hat keys
    head_part.keys.update({f"hat_{name}": head_part.verts.copy() for name in HATS})
    parts = [head_part] + build_parts(head)
    objects = {"Root": avatar_root, "HeadRoot": root}
    for part in parts:
        keys = {}
        if part.follow_head:
            keys.update(_face_keys(part, head, keyed))
        else:
            keys.update({k: v for k, v in part.keys.items() if k in HEAD_KEYS})
        for k, v in part.keys.items():
            if k not in HEAD_KEYS:
                keys[k] = v
        if part.hair:
            world = part.verts + np.asarray(part.origin)
            for hat_name, hat in HATS.items():
                keys[f"hat_{hat_name}"] = squash_for_hat(head, world, hat) - np.asarray(part.origin)
        me = mk.make_mesh(part.name, part.verts, part.faces, [mats[m] for m in part.materials],
                          part.mats, smooth=part.smooth)
        ob = bpy.data.objects.new(part.name, me)
        coll.objects.link(ob)
        parent = part.parent or "Root"
        ob.parent = objects[parent]
        ob.matrix_parent_inverse = Matrix.Translation(rest[parent]).inverted()
        ob.location = part.origin
        rest[part.name] = part.origin
        mk.add_shape_keys(ob, keys)
        for k in UNSIGNED_KEYS & set(keys):
            ob.data.shape_keys.key_blocks[k].slider_min = 0.0
        objects[part.name] = ob

    # every other object's face keys follow the head's keys
    head_key = objects["Head"].data.shape_keys
    for name, ob in objects.items():
        if name == "Head" or ob.type != "MESH" or ob.data.shape_keys is None:
            continue
        for kb in ob.data.shape_keys.key_blocks:
            if kb.name in HEAD_KEYS or kb.name.startswith("hat_"):
                fc = kb.driver_add("value")
                drv = fc.driver
                drv.type = "AVERAGE"
                var = drv.variables.new()
                var.type = "SINGLE_PROP"
                var.targets[0].id_type = "KEY"
                var.targets[0].id = head_key
                var.targets[0].data_path = f'key_blocks["{kb.name}"].value'

    # the skeleton, every mesh's weights and the expression keys (stylized_rig)
    from . import stylized_rig
    stylized_rig.build(coll, objects)
    return coll
