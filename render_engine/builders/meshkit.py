"""Small numpy toolkit for building meshes from code: signed distance shapes, radial meshing,
grids, sweeps, shape keys. Every function works on whole arrays (no per-vertex Python loops).

Conventions: world X to the subject's left, -Y toward the camera, Z up.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import numpy as np

# ------------------------------------------------------------------------------------------
# Signed distance primitives (approximate, good enough for radial meshing)
# ------------------------------------------------------------------------------------------


def sd_ellipsoid(p: np.ndarray, centre, radii) -> np.ndarray:
    """Approximate signed distance to an axis-aligned ellipsoid (bound by Quilez)."""
    cx, cy, cz = (float(c) for c in centre)
    rx, ry, rz = (float(r) for r in radii)
    x = (p[..., 0] - cx) / rx
    y = (p[..., 1] - cy) / ry
    z = (p[..., 2] - cz) / rz
    k0 = np.sqrt(x * x + y * y + z * z)
    x /= rx
    y /= ry
    z /= rz
    k1 = np.sqrt(x * x + y * y + z * z)
    return k0 * (k0 - 1.0) / np.maximum(k1, 1e-9)


def sd_capsule(p: np.ndarray, a, b, ra: float, rb: float | None = None) -> np.ndarray:
    """Capsule from a to b with radius ra at a and rb at b (linear taper)."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    rb = ra if rb is None else rb
    ba = b - a
    h = np.clip(((p - a) @ ba) / float(ba @ ba), 0.0, 1.0)
    d = np.linalg.norm(p - a - h[..., None] * ba, axis=-1)
    return d - (ra + (rb - ra) * h)


def smin(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    """Polynomial smooth minimum (smooth union) with blend width k."""
    if k <= 0:
        return np.minimum(a, b)
    h = np.clip(0.5 + 0.5 * (b - a) / k, 0.0, 1.0)
    return b + (a - b) * h - k * h * (1.0 - h)


def smax(a: np.ndarray, b: np.ndarray, k: float) -> np.ndarray:
    return -smin(-a, -b, k)


def smoothstep(e0: float, e1: float, x) -> np.ndarray:
    t = np.clip((np.asarray(x, float) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


# ------------------------------------------------------------------------------------------
# Topology helpers
# ------------------------------------------------------------------------------------------


def grid_quads(rows: int, cols: int, wrap: bool = False, offset: int = 0) -> np.ndarray:
    """Quads of a rows x cols vertex grid (row-major). ``wrap`` closes the columns into a ring."""
    c = cols if wrap else cols - 1
    i, j = np.meshgrid(np.arange(rows - 1), np.arange(c), indexing="ij")
    j1 = (j + 1) % cols
    a = i * cols + j
    b = i * cols + j1
    quads = np.stack([a, b, b + cols, a + cols], axis=-1).reshape(-1, 4)
    return quads + offset


def fan(center: int, ring: np.ndarray, reverse: bool = False) -> np.ndarray:
    """Triangles from one vertex to a closed ring of vertex indices."""
    ring = np.asarray(ring)
    nxt = np.roll(ring, -1)
    tris = np.stack([np.full_like(ring, center), ring, nxt], axis=-1)
    return tris[:, ::-1] if reverse else tris


def cube_sphere(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit directions and quads of a subdivided cube projected onto the sphere (no poles)."""
    t = np.tan(np.linspace(-1.0, 1.0, n + 1) * math.pi / 4.0)
    u, v = np.meshgrid(t, t, indexing="ij")
    one = np.ones_like(u)
    faces = [
        np.stack([one, u, v], -1), np.stack([-one, v, u], -1),
        np.stack([v, one, u], -1), np.stack([u, -one, v], -1),
        np.stack([u, v, one], -1), np.stack([v, u, -one], -1),
    ]
    pts = np.concatenate([f.reshape(-1, 3) for f in faces])
    quads = np.concatenate([grid_quads(n + 1, n + 1, offset=k * (n + 1) ** 2) for k in range(6)])
    key = np.round(pts * 1e5).astype(np.int64)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    inverse = inverse.reshape(-1)
    dirs = pts[first]
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    quads = inverse[quads]
    # orient outward
    a, b, c = dirs[quads[:, 0]], dirs[quads[:, 1]], dirs[quads[:, 2]]
    flip = np.einsum("ij,ij->i", np.cross(b - a, c - a), a) < 0
    quads[flip] = quads[flip][:, ::-1]
    return dirs, quads


def radial_solve(sdf: Callable[[np.ndarray], np.ndarray], centre, dirs: np.ndarray,
                 rmax: float, iters: int = 22) -> np.ndarray:
    """Distance along each ray from ``centre`` to the sdf's zero crossing (bisection)."""
    centre = np.asarray(centre, float)
    lo = np.zeros(len(dirs))
    hi = np.full(len(dirs), float(rmax))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        inside = sdf(centre + dirs * mid[:, None]) < 0.0
        lo = np.where(inside, mid, lo)
        hi = np.where(inside, hi, mid)
    return 0.5 * (lo + hi)


def depth_solve(sdf: Callable[[np.ndarray], np.ndarray], xz: np.ndarray, y_front: float,
                y_back: float, iters: int = 22) -> np.ndarray:
    """y of the first surface hit by rays travelling +Y through points (x, z)."""
    lo = np.full(len(xz), float(y_front))
    hi = np.full(len(xz), float(y_back))
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        p = np.stack([xz[:, 0], mid, xz[:, 1]], -1)
        inside = sdf(p) < 0.0
        hi = np.where(inside, mid, hi)
        lo = np.where(inside, lo, mid)
    return 0.5 * (lo + hi)


def sweep(path: np.ndarray, rx, ry, ring: int = 12, up=(0.0, 0.0, 1.0),
          caps: bool = True, closed: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
    """A tube along ``path`` (N,3) with elliptic sections: ``rx`` along the side vector
    (tangent x up), ``ry`` along the section's up vector. Radii are scalars or (N,) arrays.
    Returns vertices and face arrays; with ``caps`` the ends are closed by fans; ``closed``
    joins the last section to the first (a ring)."""
    path = np.asarray(path, float)
    n = len(path)
    rx = np.broadcast_to(np.asarray(rx, float), (n,))
    ry = np.broadcast_to(np.asarray(ry, float), (n,))
    if closed:
        tan = np.roll(path, -1, axis=0) - np.roll(path, 1, axis=0)
    else:
        tan = np.gradient(path, axis=0)
    tan /= np.maximum(np.linalg.norm(tan, axis=1, keepdims=True), 1e-12)
    upv = np.broadcast_to(np.asarray(up, float), (n, 3))
    side = np.cross(tan, upv)
    side /= np.maximum(np.linalg.norm(side, axis=1, keepdims=True), 1e-12)
    nrm = np.cross(side, tan)
    ang = np.linspace(0.0, 2.0 * math.pi, ring, endpoint=False)
    ca, sa = np.cos(ang), np.sin(ang)
    verts = (path[:, None, :] + side[:, None, :] * (rx[:, None, None] * ca[None, :, None])
             + nrm[:, None, :] * (ry[:, None, None] * sa[None, :, None])).reshape(-1, 3)
    faces = [grid_quads(n, ring, wrap=True)]
    if closed:
        i = np.arange(ring)
        last = (n - 1) * ring
        faces.append(np.stack([last + i, last + (i + 1) % ring, (i + 1) % ring, i], -1))
    elif caps:
        verts = np.concatenate([verts, path[:1], path[-1:]])
        c0, c1 = n * ring, n * ring + 1
        faces.append(fan(c0, np.arange(ring), reverse=False))
        faces.append(fan(c1, np.arange(ring) + (n - 1) * ring, reverse=True))
    # orient so normals point outward (check first quad)
    q = faces[0][0]
    a, b, c = verts[q[0]], verts[q[1]], verts[q[2]]
    if np.dot(np.cross(b - a, c - a), a - path[0]) < 0:
        faces = [f[:, ::-1] for f in faces]
    return verts, faces


def torus(R: float, r: float, major: int = 32, minor: int = 10,
          rz: float | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Torus in the XY plane around the Z axis (``rz`` flattens the tube vertically)."""
    a = np.linspace(0, 2 * math.pi, major, endpoint=False)
    b = np.linspace(0, 2 * math.pi, minor, endpoint=False)
    A, B = np.meshgrid(a, b, indexing="ij")
    rz = r if rz is None else rz
    x = (R + r * np.cos(B)) * np.cos(A)
    y = (R + r * np.cos(B)) * np.sin(A)
    z = rz * np.sin(B)
    verts = np.stack([x, y, z], -1).reshape(-1, 3)
    faces = grid_quads(major, minor, wrap=True)
    # wrap the major direction as well
    i = np.arange(minor)
    last = (major - 1) * minor
    j1 = (i + 1) % minor
    extra = np.stack([last + i, last + j1, j1, i], -1)
    return verts, [faces[:, ::-1], extra[:, ::-1]]          # normals point out of the tube


def merge(parts: Iterable[tuple[np.ndarray, Sequence[np.ndarray], int]]):
    """Concatenate (verts, faces, material_index) parts into one vertex array, a list of face
    arrays and the per-face material indices (in the same order as the face arrays)."""
    verts, faces, mats = [], [], []
    off = 0
    for v, fs, m in parts:
        verts.append(np.asarray(v, float))
        for f in fs:
            f = np.asarray(f)
            if len(f) == 0:
                continue
            faces.append(f + off)
            mats.append(np.full(len(f), m, np.int32))
        off += len(v)
    return np.concatenate(verts), faces, np.concatenate(mats)


# ------------------------------------------------------------------------------------------
# Blender side
# ------------------------------------------------------------------------------------------


def make_mesh(name: str, verts: np.ndarray, faces: Sequence[np.ndarray], materials=(),
              face_mats: np.ndarray | None = None, smooth: bool = True):
    """A bpy mesh from vertices and a list of (K, 3) / (K, 4) face index arrays."""
    import bpy

    faces = [np.asarray(f, np.int64) for f in faces if len(f)]
    sizes = np.concatenate([np.full(len(f), f.shape[1], np.int32) for f in faces])
    loops = np.concatenate([f.ravel() for f in faces]).astype(np.int32)
    starts = np.zeros(len(sizes), np.int32)
    starts[1:] = np.cumsum(sizes)[:-1]
    me = bpy.data.meshes.new(name)
    me.vertices.add(len(verts))
    me.vertices.foreach_set("co", np.asarray(verts, np.float32).ravel())
    me.loops.add(len(loops))
    me.loops.foreach_set("vertex_index", loops)
    me.polygons.add(len(sizes))
    me.polygons.foreach_set("loop_start", starts)
    me.update(calc_edges=True)
    for m in materials:
        me.materials.append(m)
    if face_mats is not None and len(materials) > 1:
        me.polygons.foreach_set("material_index", np.asarray(face_mats, np.int32))
    if smooth:
        me.shade_smooth()
    else:
        me.shade_flat()
    return me


def add_shape_keys(obj, keys: dict[str, np.ndarray], slider=(-1.0, 1.0)) -> None:
    """Add a Basis and one relative shape key per entry (positions in object space)."""
    if not keys:
        return
    if obj.data.shape_keys is None:
        obj.shape_key_add(name="Basis", from_mix=False)
    for name, co in keys.items():
        kb = obj.shape_key_add(name=name, from_mix=False)
        kb.data.foreach_set("co", np.asarray(co, np.float32).ravel())
        kb.slider_min, kb.slider_max = slider
        kb.value = 0.0


def vertex_positions(obj) -> np.ndarray:
    co = np.zeros(len(obj.data.vertices) * 3, np.float32)
    obj.data.vertices.foreach_get("co", co)
    return co.reshape(-1, 3).astype(float)
