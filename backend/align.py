"""FFHQ-style face alignment into the CelebAMask-HQ frame.

Every face the estimator sees -- the real training photos and a user's selfie -- is brought into
one canonical frame: the frame of the CelebAMask-HQ aligned images, so both live in the same frame.
The photo -> crop map is a similarity transform (rotation, uniform scale, translation) computed
from the 5 MTCNN landmarks in one of two ways:

``method="celebahq"`` (default)
    CelebA-HQ's own recipe (Karras et al. 2018, appendix C; FFHQ uses the same one): the frame's
    centre is the eyes' midpoint moved 0.1 of the way to the mouth; its orientation averages the
    eye line and the perpendicular of the eye-to-mouth line; its size is
    max(2.0 x eye distance, 1.8 x eye-to-mouth distance). Calibrated with ``FRAME_*`` (where that
    frame lands in the aligned train faces when computed from our detector's landmarks).
``method="template"``
    Least squares (Umeyama 1991) of the 5 landmarks onto ``TEMPLATE``, the mean MTCNN landmarks of
    the CelebAMask-HQ train faces in normalised [0, 1] coordinates.

Both sets of constants are data, ``models/alignment/alignment.json`` (``read_alignment``), measured
and written by ``scripts/calibrate_alignment.py --write``, which also measures how close to the
identity aligning the already aligned faces comes (``RESIDUAL``). The recipe wins:
it uses the mouth centre, not the corners that move with a smile, and its max() rule is exactly
how the training frames were made (residuals below).

The crop is sampled with bicubic interpolation from a copy reduced by an integer box filter and
rendered at twice the size then downsampled (Lanczos), so strong downscaling does not alias. Parts
of the frame outside the photo are filled as FFHQ/CelebA-HQ did: a reflection of the photo,
blurred and faded to its median colour away from the border.

Coordinates are continuous pixel coordinates (pixel centres at +0.5), in the photo and in the crop.
Pure numpy + Pillow: runs inside Blender.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from .errors import UserError, read_json

METHODS = ("celebahq", "template")
ALIGNMENT_FILE = Path(__file__).resolve().parent.parent / "models" / "alignment" / "alignment.json"
ALIGNMENT_KIND, ALIGNMENT_FORMAT = "likeness.alignment", 1

# CelebA-HQ's recipe (its definition, not a measurement).
RECIPE_EYE, RECIPE_MOUTH, RECIPE_SHIFT = 2.0, 1.8, 0.1


def read_alignment(path: str | os.PathLike = ALIGNMENT_FILE) -> dict:
    """The measured constants (``models/alignment/alignment.json``):

    ``template``  the mean MTCNN landmarks of the CelebAMask-HQ train split in [0, 1] coordinates of
                  the aligned frame (left eye, right eye, nose, mouth left, mouth right);
    ``frame``     where the recipe's frame lands in the aligned train faces when computed from MTCNN
                  landmarks: normalised ``centre``, ``half`` side, ``angle_deg``;
    ``residual``  aligning the already aligned faces (should be the identity), per method and split:
                  mean |scale - 1|, mean |rotation| in degrees, mean shift of the frame centre
                  (fraction of the frame)."""
    data = read_json(path, "the alignment constants")
    if data.get("kind") != ALIGNMENT_KIND or data.get("format") != ALIGNMENT_FORMAT:
        raise UserError(f"{path}: not alignment constants of format {ALIGNMENT_FORMAT} "
                        f"(kind {data.get('kind')!r}, format {data.get('format')!r})")
    return data


def write_alignment(template, frame, residual: dict, detected: tuple[int, int],
                    path: str | os.PathLike = ALIGNMENT_FILE) -> Path:
    """Store measured constants (``scripts/calibrate_alignment.py --write``): ``frame`` is
    ((cx, cy), half, angle_deg), ``residual`` {method: {split: {scale, rotation_deg, translation}}},
    ``detected`` (train faces detected, train faces)."""
    (cx, cy), half, angle = frame
    keep = ("scale", "rotation_deg", "translation")
    data = {"kind": ALIGNMENT_KIND, "format": ALIGNMENT_FORMAT,
            "about": "where MTCNN's landmarks of the CelebAMask-HQ TRAIN faces land in their aligned "
                     "frame; read by backend/align.py, measured by scripts/calibrate_alignment.py --write",
            "detected": {"train": int(detected[0]), "of": int(detected[1])},
            "template": [[round(float(x), 5), round(float(y), 5)] for x, y in np.asarray(template)],
            "frame": {"centre": [round(float(cx), 5), round(float(cy), 5)],
                      "half": round(float(half), 5), "angle_deg": round(float(angle), 4)},
            "residual": {m: {s: {k: round(float(r[k]), 4) for k in keep} for s, r in splits.items()}
                         for m, splits in residual.items()}}
    text = json.dumps(data, indent=1)
    text = re.sub(r"\[\s+(-?[\d.]+),\s+(-?[\d.]+)\s+\]", r"[\1, \2]", text)     # a point on one line
    path = Path(path)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path)
    return path


_CONSTANTS = read_alignment()
TEMPLATE = np.array(_CONSTANTS["template"], dtype=np.float64)
FRAME_CENTRE = tuple(_CONSTANTS["frame"]["centre"])
FRAME_HALF = float(_CONSTANTS["frame"]["half"])
FRAME_ANGLE_DEG = float(_CONSTANTS["frame"]["angle_deg"])
RESIDUAL = _CONSTANTS["residual"]


@dataclass(frozen=True)
class AlignedFace:
    crop: np.ndarray       # uint8 size x size x 3
    matrix: np.ndarray     # 2x3 affine: photo (x, y, 1) -> crop (x, y)
    landmarks: np.ndarray  # (5, 2) landmarks in crop coordinates
    size: int

    @property
    def inverse(self) -> np.ndarray:
        """2x3 affine: crop -> photo."""
        return invert(self.matrix)


def umeyama(src: np.ndarray, dst: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Least-squares similarity transform (2x3) taking points ``src`` (N, 2) onto ``dst`` (N, 2)."""
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    w = np.ones(len(src)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    mu_s = w @ src
    mu_d = w @ dst
    s0 = src - mu_s
    d0 = dst - mu_d
    var_s = float(w @ (s0 ** 2).sum(axis=1))
    cov = (d0 * w[:, None]).T @ s0
    U, S, Vt = np.linalg.svd(cov)
    D = np.eye(2)
    if np.linalg.det(U) * np.linalg.det(Vt) < 0:
        D[1, 1] = -1
    R = U @ D @ Vt
    scale = float(np.trace(np.diag(S) @ D) / var_s) if var_s > 0 else 1.0
    t = mu_d - scale * R @ mu_s
    return np.hstack([scale * R, t[:, None]])


def invert(m: np.ndarray) -> np.ndarray:
    """Inverse of a 2x3 affine map (closed form: no LAPACK call, whose thread start-up costs ms)."""
    (a, b, c), (d, e, f) = np.asarray(m, dtype=np.float64)
    det = a * e - b * d
    if det == 0:
        raise ValueError("singular affine map")
    ai = np.array([[e, -b], [-d, a]]) / det
    return np.hstack([ai, (-ai @ np.array([c, f]))[:, None]])


def apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def similarity_params(m: np.ndarray) -> tuple[float, float, np.ndarray]:
    """(scale, rotation in degrees, translation) of a similarity 2x3 matrix."""
    scale = float(math.hypot(m[0, 0], m[1, 0]))
    rotation = math.degrees(math.atan2(m[1, 0], m[0, 0]))
    return scale, rotation, m[:, 2].copy()


def recipe_frame(landmarks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """CelebA-HQ's oriented crop from 5 landmarks: (centre, half-side vector along the x axis)."""
    lm = np.asarray(landmarks, dtype=np.float64)
    eye_avg = (lm[0] + lm[1]) * 0.5
    mouth_avg = (lm[3] + lm[4]) * 0.5
    eye_to_eye = lm[1] - lm[0]
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.array([-eye_to_mouth[1], eye_to_mouth[0]])   # minus rot90(eye_to_mouth)
    norm = float(np.hypot(*x))
    if norm == 0:
        raise ValueError("degenerate landmarks")
    x = x / norm * max(np.hypot(*eye_to_eye) * RECIPE_EYE, np.hypot(*eye_to_mouth) * RECIPE_MOUTH)
    return eye_avg + eye_to_mouth * RECIPE_SHIFT, x


def estimate_transform(landmarks: np.ndarray, size: int, method: str = "celebahq",
                       template: np.ndarray | None = None,
                       frame: tuple[tuple[float, float], float, float] | None = None,
                       weights: np.ndarray | None = None) -> np.ndarray:
    """The 2x3 similarity photo -> crop of side ``size`` (``template``/``frame`` override the
    calibration constants, for the calibration script)."""
    if method == "template":
        t = TEMPLATE if template is None else np.asarray(template)
        return umeyama(np.asarray(landmarks, dtype=np.float64), t * size, weights)
    if method != "celebahq":
        raise ValueError(f"unknown alignment method '{method}' ({', '.join(METHODS)})")
    centre, half, angle = frame or (FRAME_CENTRE, FRAME_HALF, FRAME_ANGLE_DEG)
    c, x = recipe_frame(landmarks)
    scale = size * half / float(np.hypot(*x))
    theta = math.radians(angle) - math.atan2(x[1], x[0])
    A = scale * np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    t = size * np.asarray(centre, dtype=np.float64) - A @ c
    return np.hstack([A, t[:, None]])


def _fill_outside(region: np.ndarray, pads: tuple[int, int, int, int], outside: float,
                  qsize: float) -> np.ndarray:
    """Reflect-pad (left, top, right, bottom), blurred and faded to the median away from the photo
    (the FFHQ recipe), so out-of-photo parts of the frame look like the training photos'.
    ``outside``: how far the frame itself reaches past the photo (the pads add a kernel margin)."""
    left, top, right, bottom = pads
    mode = "reflect" if min(region.shape[:2]) > 1 else "edge"
    img = np.pad(region.astype(np.float32), ((top, bottom), (left, right), (0, 0)), mode)
    if outside < max(2.0, 0.02 * qsize):
        return img   # a sliver (or only the kernel margin): plain reflection is right
    h, w = img.shape[:2]
    y = np.arange(h, dtype=np.float32)[:, None]
    x = np.arange(w, dtype=np.float32)[None, :]
    big = 1e9
    fx = np.minimum(x / left if left else big, (w - 1 - x) / right if right else big)
    fy = np.minimum(y / top if top else big, (h - 1 - y) / bottom if bottom else big)
    mask = np.maximum(1.0 - fx, 1.0 - fy)[..., None]
    radius = max(0.5, qsize * 0.02)
    blur = np.asarray(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(radius)), dtype=np.float32)
    img += (blur - img) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
    median = np.median(region.reshape(-1, 3), axis=0).astype(np.float32)
    img += (median - img) * np.clip(mask, 0.0, 1.0)
    return img


def warp(rgb: np.ndarray, matrix: np.ndarray, size: int) -> np.ndarray:
    """Sample the ``size`` x ``size`` crop that the 2x3 ``matrix`` (photo -> crop) defines."""
    H, W = rgb.shape[:2]
    scale = math.sqrt(abs(matrix[0, 0] * matrix[1, 1] - matrix[0, 1] * matrix[1, 0]))
    ss = 2 if scale < 1.0 else 1                  # render supersampled when shrinking
    eff = scale * ss
    r = max(1, math.ceil(1.0 / eff - 1e-6)) if eff < 1.0 else 1   # integer box pre-reduction
    inv = invert(matrix)
    corners = apply(inv, np.array([[0, 0], [size, 0], [0, size], [size, size]], dtype=np.float64))
    margin = 4 * r + 4
    fx0, fy0 = np.floor(corners.min(axis=0)).astype(int) - margin
    fx1, fy1 = np.ceil(corners.max(axis=0)).astype(int) + margin
    # the part of the footprint inside the photo (at least one pixel), reduced by r
    ix0, iy0 = int(np.clip(fx0, 0, W - 1)), int(np.clip(fy0, 0, H - 1))
    ix1, iy1 = int(np.clip(fx1, ix0 + 1, W)), int(np.clip(fy1, iy0 + 1, H))
    region = Image.fromarray(np.ascontiguousarray(rgb[iy0:iy1, ix0:ix1]))
    if r > 1:
        region = region.reduce(r)
    # reduced coordinates: q = (p - i0) / r; pad what the footprint needs beyond the photo
    pads = (max(0, math.ceil((ix0 - fx0) / r)), max(0, math.ceil((iy0 - fy0) / r)),
            max(0, math.ceil((fx1 - ix1) / r)), max(0, math.ceil((fy1 - iy1) / r)))
    ox, oy = ix0, iy0
    if any(pads):
        lo, hi = corners.min(axis=0), corners.max(axis=0)
        outside = max(0.0, -lo[0], -lo[1], hi[0] - W, hi[1] - H) / r
        arr = _fill_outside(np.asarray(region), pads, outside, qsize=size / scale / r)
        region = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8))
        ox -= pads[0] * r
        oy -= pads[1] * r
    # crop_render = ss * M (r * q + o)
    to_photo = np.array([[r, 0, ox], [0, r, oy], [0, 0, 1]], dtype=np.float64)
    m = ss * (np.vstack([matrix, [0, 0, 1]]) @ to_photo)[:2]
    data = invert(m).reshape(-1)
    out = region.transform((size * ss, size * ss), Image.Transform.AFFINE, tuple(data),
                           resample=Image.Resampling.BICUBIC)
    if ss > 1:
        out = out.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(out, dtype=np.uint8)


def align_face(rgb: np.ndarray, face, size: int = 256, method: str = "celebahq") -> AlignedFace:
    """Crop ``face`` (a ``face_detect.Face`` or a (5, 2) landmark array) into the canonical frame."""
    landmarks = np.asarray(getattr(face, "landmarks", face), dtype=np.float64)
    if landmarks.shape != (5, 2):
        raise ValueError(f"align_face needs 5 (x, y) landmarks, got shape {landmarks.shape}")
    m = estimate_transform(landmarks, size, method)
    crop = warp(np.asarray(rgb), m, size)
    return AlignedFace(crop=crop, matrix=m, landmarks=apply(m, landmarks), size=size)
