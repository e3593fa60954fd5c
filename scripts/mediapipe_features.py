"""MediaPipe's face geometry and person silhouette of every TRAIN photo, as candidate reader blocks.

    python -m venv mp && mp/bin/pip install mediapipe==0.10.21 "numpy<2" pillow
    mp/bin/python scripts/mediapipe_features.py --stems STEMS.txt --out MP.npz
    python scripts/descriptor_map_study.py score --features MP.npz --cache CACHE --blocks mesh,selfie \
        --attributes glasses,facial_hair,hair_length,hair_color,skin_tone,bangs,hat

MediaPipe 0.10.21 (Apache-2.0) is the last release that bundles its .tflite face-mesh (478 landmarks
with the irises) and selfie-segmentation models; it needs numpy < 2 and is no dependency of Likeness,
so this runs in a side environment and imports nothing of ours. ``STEMS.txt``: the TRAIN stems in the
order of the reader's cache (one per line; ``--stems`` default: every TRAIN stem, in the cache's
order, which is sorted). Blocks written:

* ``mesh``: the 478 landmarks (x, y, z) of the photo at 256 px, centred on the irises' midpoint and
  divided by their distance (1,434 values; a photo without a face found gets the others' mean);
* ``selfie``: the selfie segmentation's person probability on an 8 x 8 grid (64 values).

MediaPipe reads the shared photo itself (already aligned like the reader's crop), not the reader's
own crop: a study of whether the geometry carries what the labels say, not the inference path.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from PIL import Image

IRISES = (468, 473)
GRID = 8


def geometry(points: np.ndarray) -> np.ndarray:
    """[N, 478, 3] landmarks (NaN where no face was found) -> [N, 1434], iris-normalised."""
    eyes = points[:, IRISES, :2]
    centre = eyes.mean(1, keepdims=True)
    scale = np.linalg.norm(eyes[:, 0] - eyes[:, 1], axis=1)[:, None]
    g = points.copy()
    g[:, :, :2] = (points[:, :, :2] - centre) / scale[:, :, None]
    g[:, :, 2] = points[:, :, 2] / scale
    g = g.reshape(len(g), -1)
    return np.where(np.isnan(g), np.nanmean(g, 0), g)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared/data/celebamask-hq-1k"))
    ap.add_argument("--stems", help="TRAIN stems, one a line (default: every TRAIN stem, sorted)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    import mediapipe as mp
    root = Path(a.data)
    if a.stems:
        stems = [s.strip() for s in Path(a.stems).read_text().split() if s.strip()]
    else:
        stems = sorted(p.stem for p in (root / "images").glob("*.jpg") if p.stem[0] not in "cdef")
    if any(s[0] in "cdef" for s in stems):
        raise SystemExit("a validation stem (c-f) was given: this study reads TRAIN photos only")
    mesh = mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True)
    seg = mp.solutions.selfie_segmentation.SelfieSegmentation(model_selection=0)
    points, person = [], []
    for i, s in enumerate(stems):
        img = np.asarray(Image.open(root / "images" / f"{s}.jpg").convert("RGB").resize((256, 256)))
        found = mesh.process(img).multi_face_landmarks
        points.append(np.array([[q.x, q.y, q.z] for q in found[0].landmark], np.float32) if found
                      else np.full((478, 3), np.nan, np.float32))
        m = seg.process(img).segmentation_mask                        # [256, 256] person probability
        person.append(m.reshape(GRID, 256 // GRID, GRID, 256 // GRID).mean((1, 3)).ravel())
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(stems)} photos", flush=True)
    points = np.array(points)
    missing = int(np.isnan(points[:, 0, 0]).sum())
    np.savez(a.out, stems=np.array(stems), mesh=geometry(points), selfie=np.array(person))
    print(f"{a.out}: {len(stems)} photos, no face found on {missing}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
