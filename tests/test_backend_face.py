"""MTCNN detection (onnxruntime) and alignment on real photos.

Real faces are the shared CelebAMask-HQ subset, read in place (never copied), and the public-domain
astronaut portrait shipped by scikit-image.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from likeness.backend import align, realfaces
from likeness.backend.face_detect import Face, detect_faces, nms

try:
    STEMS = realfaces.stems(split="all")
except Exception:  # the shared data is missing on this machine
    STEMS = []

needs_faces = pytest.mark.skipif(not STEMS, reason="shared CelebAMask-HQ data not found")


def _real(i: int) -> np.ndarray:
    return realfaces.load_pair(STEMS[i])[0]


def _astronaut() -> np.ndarray:
    skimage_data = pytest.importorskip("skimage.data")
    return skimage_data.astronaut()


def _plausible(face: Face):
    lm = face.landmarks
    le, re_, nose, ml, mr = lm
    x0, y0, x1, y1 = face.box
    assert np.all((lm[:, 0] > x0) & (lm[:, 0] < x1) & (lm[:, 1] > y0) & (lm[:, 1] < y1))
    assert le[0] < re_[0] and ml[0] < mr[0]                      # image-left first
    assert max(le[1], re_[1]) < nose[1] < min(ml[1], mr[1])      # eyes above nose above mouth
    assert 0.25 < face.eye_distance / face.width < 0.6
    assert face.score > 0.9


@needs_faces
@pytest.mark.parametrize("index", [0, 1, 2, len(STEMS) - 1] if STEMS else [0])
def test_one_face_on_real_photos(index):
    rgb = _real(index)
    faces = detect_faces(rgb)
    assert len(faces) == 1
    _plausible(faces[0])
    # the photos are aligned: landmarks sit near the template
    norm = faces[0].landmarks / np.array([rgb.shape[1], rgb.shape[0]])
    assert np.abs(norm - align.TEMPLATE).max() < 0.08


def test_astronaut():
    rgb = _astronaut()
    faces = detect_faces(rgb)
    assert len(faces) == 1
    f = faces[0]
    _plausible(f)
    # her face is in the upper middle of the 512x512 picture, ~45 px between the eyes
    cx, cy = f.landmarks[:, 0].mean(), f.landmarks[:, 1].mean()
    assert 180 < cx < 270 and 80 < cy < 160
    assert 30 < f.eye_distance < 60


@pytest.mark.parametrize("kind", ["blank", "noise", "gradient"])
def test_no_face(kind):
    rng = np.random.default_rng(7)
    if kind == "blank":
        rgb = np.full((480, 640, 3), 200, np.uint8)
    elif kind == "noise":
        rgb = rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)
    else:
        y, x = np.mgrid[0:480, 0:640]
        rgb = np.stack([x * 255 // 639, y * 255 // 479, (x + y) % 256], -1).astype(np.uint8)
    assert detect_faces(rgb) == []
    assert detect_faces(rgb, try_rotations=True) == []
    assert detect_faces(np.zeros((8, 8, 3), np.uint8)) == []


def test_nms():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60], [0, 0, 4, 4]], float)
    scores = np.array([0.9, 0.95, 0.5, 0.8])
    assert nms(boxes, scores, 0.5).tolist() == [1, 3, 2]          # best first
    assert nms(boxes, scores, 0.5, mode="min").tolist() == [1, 2]   # box 3 lies inside box 1
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.5).tolist() == []


@needs_faces
def test_aligning_an_aligned_face_is_near_identity():
    for i in (0, 5):
        rgb = _real(i)
        face = detect_faces(rgb)[0]
        a = align.align_face(rgb, face, size=rgb.shape[0])
        s, rot, _ = align.similarity_params(a.matrix)
        centre = align.apply(a.matrix, np.array([[256.0, 256.0]]))[0]
        assert abs(s - 1) < 0.1 and abs(rot) < 3.0
        assert np.hypot(*(centre - 256)) < 0.03 * 512
        assert a.crop.shape == (512, 512, 3) and a.crop.dtype == np.uint8
        # the crop shows the same picture: strongly correlated with the original
        corr = np.corrcoef(a.crop[128:384, 128:384].ravel(), rgb[128:384, 128:384].ravel())[0, 1]
        assert corr > 0.8
        np.testing.assert_allclose(a.landmarks, align.apply(a.matrix, face.landmarks))


def test_warp_identity_is_exact():
    rgb = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    identity = np.array([[1.0, 0, 0], [0, 1.0, 0]])
    np.testing.assert_array_equal(align.warp(rgb, identity, 64), rgb)
    shift = np.array([[1.0, 0, -3], [0, 1.0, -5]])
    np.testing.assert_array_equal(align.warp(rgb, shift, 32), rgb[5:37, 3:35])


def test_umeyama_recovers_a_similarity():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, (5, 2))
    th = math.radians(23)
    m = np.array([[1.7 * math.cos(th), -1.7 * math.sin(th), 12.0], [1.7 * math.sin(th), 1.7 * math.cos(th), -4.0]])
    est = align.umeyama(src, align.apply(m, src))
    np.testing.assert_allclose(est, m, atol=1e-9)
    np.testing.assert_allclose(align.invert(est) @ np.vstack([est, [0, 0, 1]]), np.hstack([np.eye(2), np.zeros((2, 1))]),
                               atol=1e-9)


def _similarity(angle_deg: float, scale: float, centre_from, centre_to) -> np.ndarray:
    th = math.radians(angle_deg)
    A = scale * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    return np.hstack([A, (np.asarray(centre_to) - A @ np.asarray(centre_from))[:, None]])


@needs_faces
@pytest.mark.parametrize("angle,scale", [(18.0, 0.7), (-25.0, 1.6)])
def test_rotated_scaled_photo_aligns_back(angle, scale):
    rgb = _real(3)
    ref = align.align_face(rgb, detect_faces(rgb)[0], size=256)
    # place the photo rotated and scaled on a larger grey canvas
    W, H = 1100, 900
    k = _similarity(angle, scale, (256, 256), (W / 2, H / 2))
    canvas = Image.fromarray(rgb).transform((W, H), Image.Transform.AFFINE,
                                            tuple(align.invert(k).reshape(-1)), Image.Resampling.BICUBIC,
                                            fillcolor=(128, 128, 128))
    photo = np.asarray(canvas)
    faces = detect_faces(photo)
    assert len(faces) >= 1
    got = align.align_face(photo, faces[0], size=256)
    # the composite original -> canvas -> crop should match original -> crop
    composite = got.matrix @ np.vstack([k, [0, 0, 1]])
    s_ratio = align.similarity_params(composite)[0] / align.similarity_params(ref.matrix)[0]
    d_rot = align.similarity_params(composite)[1] - align.similarity_params(ref.matrix)[1]
    centre = np.array([[256.0, 256.0]])
    shift = np.hypot(*(align.apply(composite, centre) - align.apply(ref.matrix, centre))[0])
    assert abs(s_ratio - 1) < 0.06
    assert abs(d_rot) < 2.5
    assert shift < 0.03 * 256
    diff = np.abs(got.crop[64:192, 64:192].astype(int) - ref.crop[64:192, 64:192]).mean()
    assert diff < 14


def test_photo_turned_90_degrees_is_found_with_rotations():
    rgb = _astronaut()
    upright = detect_faces(rgb)[0]
    turned = np.ascontiguousarray(np.rot90(rgb, 1))       # counter-clockwise, as a lost EXIF tag
    faces = detect_faces(turned, try_rotations=True)
    assert len(faces) >= 1
    f = faces[0]
    # the upright landmarks, carried into the turned picture: (x, y) -> (y, W - x)
    W = rgb.shape[1]
    want = np.stack([upright.landmarks[:, 1], W - upright.landmarks[:, 0]], axis=1)
    assert np.abs(f.landmarks - want).max() < 6
    a = align.align_face(turned, f, size=128)
    b = align.align_face(rgb, upright, size=128)
    assert np.abs(a.crop.astype(int) - b.crop).mean() < 8


def test_large_photo_consistent_with_small():
    """A 3072 px upscaled portrait: detection on a working copy, antialiased alignment."""
    rgb = _astronaut()
    big = np.asarray(Image.fromarray(rgb).resize((3072, 3072), Image.Resampling.BICUBIC))
    small_face, big_face = detect_faces(rgb)[0], detect_faces(big)[0]
    assert np.abs(big_face.landmarks / 6 - small_face.landmarks).max() < 4
    a = align.align_face(big, big_face, size=128)
    b = align.align_face(rgb, small_face, size=128)
    assert np.abs(a.crop.astype(int) - b.crop).mean() < 8


def test_out_of_frame_parts_are_filled_not_black():
    rgb = _astronaut()
    face = detect_faces(rgb)[0]
    a = align.align_face(rgb[:150], face, size=128)     # the photo ends just under her chin
    bottom = a.crop[-10:]
    assert bottom.mean() > 20                            # filled from the photo, no black band
