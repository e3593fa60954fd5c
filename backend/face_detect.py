"""Face detection and 5-point landmarks: MTCNN (Zhang et al. 2016) on onnxruntime + numpy.

The three networks live in ``models/mtcnn/{pnet,rnet,onet}.onnx`` (exported by
``training/readout/mtcnn_export.py`` from the MIT-licensed facenet-pytorch weights). The cascade:

1. an image pyramid (scale factor 0.709, smallest face ``min_face`` px) through the fully
   convolutional PNet gives candidate windows; NMS per scale (IoU 0.5) then across scales (0.7);
2. RNet scores and refines 24x24 crops of the squared candidates; NMS 0.7;
3. ONet scores and refines 48x48 crops and predicts the 5 landmarks, averaged with its
   prediction on the mirrored crop (measured: a quarter less roll jitter on CelebA-HQ faces);
   NMS 0.7 over the smaller area;
4. each face is turned upright by the roll of its eye line and ONet runs again on it (mirrored and
   averaged too); the landmarks are mapped back. MTCNN's landmarks lean toward upright on tilted
   heads: measured on 12 validation faces turned by 30 / 40 degrees, the roll error of the
   alignment drops from 1.2 / 2.7 to 0.6 / 0.5 degrees and the scale error from 4 % to 1 %.

Crops are taken with zero padding past the image border (as the original MTCNN), so faces cut off
by the border keep their proportions. Large photos are detected on a working copy whose longest
side is at most ``DETECT_SIDE`` (faces of a selfie are large; landmarks come from ONet's 48 px view
of the face anyway) and the results are mapped back to the photo's pixels.

Coordinates are continuous pixel coordinates of the photo: pixel (i, j) covers [j, j+1) x [i, i+1),
so its centre is (j + 0.5, i + 0.5) -- the convention of Pillow's transforms used by ``align.py``.

Landmark order (MTCNN's): left eye, right eye, nose tip, mouth left corner, mouth right corner,
where "left" means the left side of the image: for an upright face seen from the front that is the
subject's own right eye / right mouth corner.

Pure numpy + Pillow + onnxruntime: runs inside Blender. ONNX sessions are created once per process.
"""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import UserError

MODEL_DIR = Path(__file__).resolve().parent.parent / "models" / "mtcnn"
LANDMARK_NAMES = ("left_eye", "right_eye", "nose", "mouth_left", "mouth_right")

DETECT_SIDE = 1280            # longest side of the working copy the cascade runs on
MIN_FACE = 20                 # smallest face (px of the working copy) the pyramid looks for
THRESHOLDS = (0.6, 0.7, 0.8)  # PNet, RNet, ONet score thresholds
FACTOR = 0.709                # pyramid scale step (area halves every step)

_MIRROR = [1, 0, 2, 4, 3]     # landmark order seen in a mirror image: eyes and mouth corners swap

_sessions: dict[str, object] = {}
_lock = threading.Lock()


@dataclass(frozen=True)
class Face:
    """One detected face, in the photo's continuous pixel coordinates."""
    box: np.ndarray          # (4,) float: x0, y0, x1, y1
    score: float             # ONet face probability
    landmarks: np.ndarray    # (5, 2) float: x, y in LANDMARK_NAMES order

    @property
    def width(self) -> float:
        return float(self.box[2] - self.box[0])

    @property
    def height(self) -> float:
        return float(self.box[3] - self.box[1])

    @property
    def area(self) -> float:
        return self.width * self.height

    @property
    def eye_distance(self) -> float:
        return float(np.hypot(*(self.landmarks[1] - self.landmarks[0])))

    def to_json(self) -> dict:
        return {"box": [round(float(v), 2) for v in self.box], "score": round(self.score, 4),
                "landmarks": {n: [round(float(x), 2), round(float(y), 2)]
                              for n, (x, y) in zip(LANDMARK_NAMES, self.landmarks)}}


# --------------------------------------------------------------------------------------------
# ONNX sessions
# --------------------------------------------------------------------------------------------

def _model_dir() -> Path:
    return Path(os.environ.get("LIKENESS_MTCNN_DIR") or MODEL_DIR)


def _session(name: str):
    with _lock:
        sess = _sessions.get(name)
        if sess is None:
            import onnxruntime as ort
            path = _model_dir() / f"{name}.onnx"
            if not path.is_file():
                raise UserError(f"face detector model missing: {path} (re-create it with "
                                "'python -m likeness.training.readout.mtcnn_export --wheel-dir DIR')")
            opts = ort.SessionOptions()
            opts.log_severity_level = 3
            # tiny networks: two threads are plenty and leave cores to Blender / other work
            opts.intra_op_num_threads = min(2, os.cpu_count() or 1)
            opts.inter_op_num_threads = 1
            # no busy-waiting between the many small runs: measured faster on a loaded machine,
            # and it does not burn Blender's cores
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
            sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            _sessions[name] = sess
        return sess


def _run(name: str, x: np.ndarray) -> list[np.ndarray]:
    return _session(name).run(None, {"input": x})


# --------------------------------------------------------------------------------------------
# Box utilities (boxes are (N, >=5) arrays: x1, y1, x2, y2, score, ...; MTCNN's 1-based corners)
# --------------------------------------------------------------------------------------------

def nms(boxes: np.ndarray, scores: np.ndarray, threshold: float, mode: str = "union") -> np.ndarray:
    """Greedy non-maximum suppression; indices of the kept boxes, best first."""
    if len(boxes) == 0:
        return np.zeros(0, dtype=np.int64)
    x1, y1, x2, y2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (x2 - x1 + 1) * (y2 - y1 + 1)
    order = np.argsort(-scores, kind="stable")
    keep = []
    while order.size:
        i = order[0]
        keep.append(i)
        rest = order[1:]
        w = np.maximum(0.0, np.minimum(x2[i], x2[rest]) - np.maximum(x1[i], x1[rest]) + 1)
        h = np.maximum(0.0, np.minimum(y2[i], y2[rest]) - np.maximum(y1[i], y1[rest]) + 1)
        inter = w * h
        if mode == "min":
            overlap = inter / np.minimum(area[i], area[rest])
        else:
            overlap = inter / (area[i] + area[rest] - inter)
        order = rest[overlap <= threshold]
    return np.asarray(keep, dtype=np.int64)


def _square(boxes: np.ndarray) -> np.ndarray:
    """Grow boxes to squares around their centres (MTCNN's ``rerec``)."""
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    side = np.maximum(w, h)
    out[:, 0] = boxes[:, 0] + w * 0.5 - side * 0.5
    out[:, 1] = boxes[:, 1] + h * 0.5 - side * 0.5
    out[:, 2] = out[:, 0] + side
    out[:, 3] = out[:, 1] + side
    return out


def _regress(boxes: np.ndarray, reg: np.ndarray) -> np.ndarray:
    out = boxes.copy()
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    out[:, 0:4] = boxes[:, 0:4] + reg * np.stack([w, h, w, h], axis=1)
    return out


def _crops(im: Image.Image, boxes: np.ndarray, size: int) -> np.ndarray:
    """Normalised NCHW float32 crops of integer boxes, zero-padded past the border."""
    b = np.trunc(boxes[:, :4]).astype(np.int64)
    out = np.empty((len(b), size, size, 3), dtype=np.uint8)
    W, H = im.size
    for k, (x1, y1, x2, y2) in enumerate(b):
        region = (int(x1) - 1, int(y1) - 1, int(x2), int(y2))   # 1-based inclusive -> [x0, x1)
        if region[0] >= 0 and region[1] >= 0 and region[2] <= W and region[3] <= H:
            patch = im.resize((size, size), Image.Resampling.BILINEAR, box=region, reducing_gap=2.0)
        else:
            patch = im.crop(region).resize((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
        out[k] = np.asarray(patch)
    return _normalise(out)


def _normalise(batch_hwc: np.ndarray) -> np.ndarray:
    x = batch_hwc.astype(np.float32)
    x -= 127.5
    x *= 0.0078125
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


# --------------------------------------------------------------------------------------------
# The cascade
# --------------------------------------------------------------------------------------------

def _stage1(im: Image.Image, min_face: float, threshold: float, factor: float) -> np.ndarray:
    W, H = im.size
    m = 12.0 / min_face
    minl = min(H, W) * m
    scale = m
    found = []
    while minl >= 12:
        hs, ws = int(H * scale + 1), int(W * scale + 1)
        level = np.asarray(im.resize((ws, hs), Image.Resampling.BILINEAR, reducing_gap=3.0))[None]
        reg, prob = _run("pnet", _normalise(level))
        p = prob[0, 1]
        ys, xs = np.nonzero(p >= threshold)
        if len(ys):
            score = p[ys, xs]
            q1x = np.floor((2 * xs + 1) / scale)
            q1y = np.floor((2 * ys + 1) / scale)
            q2x = np.floor((2 * xs + 12) / scale)
            q2y = np.floor((2 * ys + 12) / scale)
            r = reg[0][:, ys, xs].T
            b = np.column_stack([q1x, q1y, q2x, q2y, score, r]).astype(np.float64)
            found.append(b[nms(b, b[:, 4], 0.5)])
        scale *= factor
        minl *= factor
    if not found:
        return np.zeros((0, 5))
    boxes = np.concatenate(found)
    boxes = boxes[nms(boxes, boxes[:, 4], 0.7)]
    w = boxes[:, 2] - boxes[:, 0]
    h = boxes[:, 3] - boxes[:, 1]
    refined = boxes[:, 0:4] + boxes[:, 5:9] * np.stack([w, h, w, h], axis=1)
    return _square(np.column_stack([refined, boxes[:, 4]]))


def _cascade(im: Image.Image, min_face: float, thresholds, factor: float):
    boxes = _stage1(im, min_face, thresholds[0], factor)
    if len(boxes) == 0:
        return np.zeros((0, 5)), np.zeros((0, 5, 2))
    # stage 2: RNet
    reg, prob = _run("rnet", _crops(im, boxes, 24))
    ok = prob[:, 1] > thresholds[1]
    boxes = np.column_stack([boxes[ok, :4], prob[ok, 1]])
    reg = reg[ok]
    keep = nms(boxes, boxes[:, 4], 0.7)
    boxes = _square(_regress(boxes[keep], reg[keep]))
    if len(boxes) == 0:
        return np.zeros((0, 5)), np.zeros((0, 5, 2))
    # stage 3: ONet, on the crops and their mirror images (landmarks averaged: less jitter)
    crops = _crops(im, boxes, 48)
    n = len(crops)
    reg, pts, prob = _run("onet", np.concatenate([crops, crops[..., ::-1]]))
    mirrored = pts[n:]
    reg, pts, prob = reg[:n], pts[:n], prob[:n]
    flip_x = 1.0 - mirrored[:, 0:5][:, _MIRROR]
    flip_y = mirrored[:, 5:10][:, _MIRROR]
    pts = 0.5 * (pts + np.concatenate([flip_x, flip_y], axis=1))
    ok = prob[:, 1] > thresholds[2]
    boxes = np.column_stack([np.trunc(boxes[ok, :4]), prob[ok, 1]])
    reg, pts = reg[ok], pts[ok]
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    # landmarks relative to the crop [x1-1, x2] (continuous coordinates)
    lx = (boxes[:, 0] - 1)[:, None] + w[:, None] * pts[:, 0:5]
    ly = (boxes[:, 1] - 1)[:, None] + h[:, None] * pts[:, 5:10]
    landmarks = np.stack([lx, ly], axis=2)
    boxes = _regress(boxes, reg)
    keep = nms(boxes, boxes[:, 4], 0.7, mode="min")
    boxes, landmarks = boxes[keep], landmarks[keep]
    # 1-based inclusive corners -> continuous [x0, x1)
    boxes[:, 0:2] -= 1
    return boxes, landmarks


def _onet_landmarks(patches: np.ndarray) -> np.ndarray:
    """ONet landmarks (N, 5, 2) in [0, 1] patch coordinates, averaged with the mirrored patches."""
    x = _normalise(patches)
    n = len(x)
    _, pts, _ = _run("onet", np.concatenate([x, x[..., ::-1]]))
    direct, mirrored = pts[:n], pts[n:]
    mx = 1.0 - mirrored[:, 0:5][:, _MIRROR]
    my = mirrored[:, 5:10][:, _MIRROR]
    return 0.5 * (np.stack([direct[:, 0:5], direct[:, 5:10]], axis=2) + np.stack([mx, my], axis=2))


def _refine_landmarks(im: Image.Image, boxes: np.ndarray, landmarks: np.ndarray) -> np.ndarray:
    """Run ONet again on each face turned upright (by the roll of its eye line).

    MTCNN was trained on mostly upright faces; on a tilted head its landmarks lean toward upright
    (measured: 4 degrees of roll error at 25 degrees of tilt). Turning the face upright first and
    mapping the landmarks back removes most of that bias. Boxes: continuous [x0, y0, x1, y1].
    """
    S = 48
    work = 2 * S                         # rotate at twice the resolution, then downsample
    out = landmarks.copy()
    patches, maps = [], []
    for b, lm in zip(boxes, landmarks):
        d = lm[1] - lm[0]
        roll = math.atan2(d[1], d[0])
        side = float(max(b[2] - b[0], b[3] - b[1]))
        if side < 4:
            patches.append(None)
            maps.append(None)
            continue
        c = np.array([(b[0] + b[2]) / 2, (b[1] + b[3]) / 2])
        cs, sn = math.cos(roll), math.sin(roll)
        ext = side / 2 * (abs(cs) + abs(sn)) + 2
        x0, y0 = math.floor(c[0] - ext), math.floor(c[1] - ext)
        x1, y1 = math.ceil(c[0] + ext), math.ceil(c[1] + ext)
        # the axis-aligned region around the turned square, resampled so the face is `work` px
        k = work / side
        T = (max(1, round((x1 - x0) * k)), max(1, round((y1 - y0) * k)))
        region = im.crop((x0, y0, x1, y1)).resize(T, Image.Resampling.BILINEAR)
        kx, ky = T[0] / (x1 - x0), T[1] / (y1 - y0)
        # patch (work x work) -> region pixels: q = ctr + R(roll) (u - work/2), in region units
        ctr = np.array([(c[0] - x0) * kx, (c[1] - y0) * ky])
        A = np.array([[cs, -sn], [sn, cs]])
        off = ctr - A @ np.array([work / 2, work / 2])
        patch = region.transform((work, work), Image.Transform.AFFINE,
                                 (A[0, 0], A[0, 1], off[0], A[1, 0], A[1, 1], off[1]),
                                 resample=Image.Resampling.BILINEAR)
        patches.append(np.asarray(patch.resize((S, S), Image.Resampling.BILINEAR)))
        # patch [0,1] coords -> photo: p = c + R(roll) (side * (v - 0.5))
        maps.append((c, A, side))
    idx = [i for i, p in enumerate(patches) if p is not None]
    if not idx:
        return out
    pts = _onet_landmarks(np.stack([patches[i] for i in idx]))
    for j, i in enumerate(idx):
        c, A, side = maps[i]
        out[i] = c + (side * (pts[j] - 0.5)) @ A.T
    return out


def _detect_upright(rgb: np.ndarray, min_face: float, thresholds, factor: float,
                    detect_side: int, refine: bool = True) -> list[Face]:
    H, W = rgb.shape[:2]
    im = Image.fromarray(rgb)
    k = 1.0
    if max(H, W) > detect_side:
        k = detect_side / max(H, W)
        im = im.resize((max(1, round(W * k)), max(1, round(H * k))), Image.Resampling.BILINEAR,
                        reducing_gap=1.0)   # integer box reduction first: fast
        kx, ky = im.width / W, im.height / H
    else:
        kx = ky = 1.0
    boxes, landmarks = _cascade(im, max(12.0, float(min_face)), thresholds, factor)
    if refine and len(boxes):
        landmarks = _refine_landmarks(im, boxes, landmarks)
    faces = []
    for b, lm in zip(boxes, landmarks):
        box = np.array([b[0] / kx, b[1] / ky, b[2] / kx, b[3] / ky])
        pts = lm / np.array([kx, ky])
        faces.append(Face(box=box, score=float(b[4]), landmarks=pts))
    return faces


def _rotate_back(faces: list[Face], k: int, H: int, W: int) -> list[Face]:
    """Map faces found on ``np.rot90(rgb, k)`` back to the original HxW image."""
    out = []
    for f in faces:
        def back(pts: np.ndarray) -> np.ndarray:
            x, y = pts[:, 0], pts[:, 1]
            if k == 1:       # rot90 ccw: (x', y') = (y, W - x)
                return np.stack([W - y, x], axis=1)
            if k == 2:
                return np.stack([W - x, H - y], axis=1)
            return np.stack([y, H - x], axis=1)   # k == 3
        corners = back(f.box.reshape(2, 2))
        box = np.concatenate([corners.min(axis=0), corners.max(axis=0)])
        out.append(Face(box=box, score=f.score, landmarks=back(f.landmarks)))
    return out


def detect_faces(rgb: np.ndarray, *, min_face: float = MIN_FACE, thresholds=THRESHOLDS,
                 factor: float = FACTOR, detect_side: int = DETECT_SIDE,
                 try_rotations: bool = False) -> list[Face]:
    """All faces in an RGB uint8 HxWx3 photo, largest first.

    ``min_face`` is in pixels of the working copy (longest side ``detect_side``). With
    ``try_rotations``, a photo with no upright face is searched again turned by 90, 270 and 180
    degrees (photos whose orientation tag was lost); landmarks are mapped back to the photo, so
    ``align.py`` straightens the face whatever its roll.
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"detect_faces expects uint8 HxWx3 RGB, got {rgb.dtype} {rgb.shape}")
    H, W = rgb.shape[:2]
    if min(H, W) < 12:
        return []
    faces = _detect_upright(rgb, min_face, thresholds, factor, detect_side)
    if not faces and try_rotations:
        for k in (1, 3, 2):
            turned = np.ascontiguousarray(np.rot90(rgb, k))
            faces = _detect_upright(turned, min_face, thresholds, factor, detect_side)
            if faces:
                faces = _rotate_back(faces, k, H, W)
                break
    faces.sort(key=lambda f: f.area, reverse=True)
    return faces
