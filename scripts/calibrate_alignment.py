"""Measure the alignment constants (``models/alignment/alignment.json``, read by ``backend/align.py``)
from the CelebAMask-HQ faces.

Runs the MTCNN detector on the shared CelebAMask-HQ subset (read in place, never copied), takes the
mean landmark positions of the TRAIN split in normalised [0, 1] coordinates of the aligned frame,
and measures how close to the identity the alignment of the already aligned faces is (train and
held-out val split): mean |scale - 1|, mean |rotation|, mean displacement of the frame centre (in
fractions of the frame). Also reports the detection rate over all 1,000 faces and, for reference,
the eye and mouth centroids of the parsing masks.

    python scripts/calibrate_alignment.py            # print the numbers and the constants
    python scripts/calibrate_alignment.py --write    # also store them in models/alignment/alignment.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from likeness.backend import align, realfaces
from likeness.backend.face_detect import detect_faces

MASK_REF = {"l_eye": 4, "r_eye": 5, "mouth": (10, 11, 12)}


def detect_all(root, stems: list[str]) -> dict[str, dict]:
    out = {}
    t0 = time.perf_counter()
    for i, stem in enumerate(stems):
        rgb, mask = realfaces.load_pair(stem, root)
        faces = detect_faces(rgb)
        rec = {"n": len(faces), "size": rgb.shape[:2],
               "others": [(f.score, f.area / faces[0].area) for f in faces[1:]]}
        if faces:
            rec["landmarks"] = faces[0].landmarks / np.array([rgb.shape[1], rgb.shape[0]])
            rec["score"] = faces[0].score
        cents = []
        for cls in MASK_REF.values():
            ys, xs = np.nonzero(np.isin(mask, cls))
            cents.append([(xs.mean() + 0.5) / mask.shape[1], (ys.mean() + 0.5) / mask.shape[0]]
                         if len(xs) else [np.nan, np.nan])
        rec["mask"] = np.array(cents)
        out[stem] = rec
        if (i + 1) % 100 == 0:
            print(f"  {i + 1}/{len(stems)} faces, {(time.perf_counter() - t0) / (i + 1) * 1000:.0f} ms each",
                  file=sys.stderr)
    return out


def frame_calibration(recs: list[dict]) -> tuple[tuple[float, float], float, float]:
    """Where CelebA-HQ's recipe frame (from our landmarks) lands in the aligned faces, on average."""
    cs, halves, angles = [], [], []
    for r in recs:
        c, x = align.recipe_frame(r["landmarks"])
        cs.append(c)
        halves.append(float(np.hypot(*x)))
        angles.append(float(np.degrees(np.arctan2(x[1], x[0]))))
    c = np.mean(cs, axis=0)
    return (float(c[0]), float(c[1])), float(np.mean(halves)), float(np.mean(angles))


def residuals(recs: list[dict], method: str, template, frame) -> dict[str, float]:
    """Mean deviation from the identity of aligning aligned faces (frame side = 1)."""
    s_err, r_err, t_err = [], [], []
    for r in recs:
        m = align.estimate_transform(r["landmarks"], 1, method, template=template, frame=frame)
        s, rot, _ = align.similarity_params(m)
        centre = align.apply(m, np.array([[0.5, 0.5]]))[0]
        s_err.append(abs(s - 1))
        r_err.append(abs(rot))
        t_err.append(float(np.hypot(*(centre - 0.5))))
    return {"scale": float(np.mean(s_err)), "rotation_deg": float(np.mean(r_err)),
            "translation": float(np.mean(t_err)),
            "scale_p95": float(np.percentile(s_err, 95)), "rotation_p95": float(np.percentile(r_err, 95)),
            "translation_p95": float(np.percentile(t_err, 95))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", help="CelebAMask-HQ 1k folder (default: the shared data)")
    ap.add_argument("--write", action="store_true", help="store the constants in "
                    "models/alignment/alignment.json (what backend/align.py reads)")
    ap.add_argument("--json", help="also save the measured numbers (no image data) to this file")
    ap.add_argument("--cache", help="keep the detected landmarks (numbers only) in this .npz "
                                    "outside the repository and reuse them on the next run")
    args = ap.parse_args(argv)

    train, val = realfaces.stems(args.root, "train"), realfaces.stems(args.root, "val")
    print(f"detecting faces on {len(train)} train + {len(val)} val images ...", file=sys.stderr)
    t0 = time.perf_counter()
    if args.cache and Path(args.cache).is_file():
        recs = np.load(args.cache, allow_pickle=True)["recs"].item()
    else:
        recs = detect_all(args.root, train + val)
        if args.cache:
            np.savez(args.cache, recs=np.array(recs, dtype=object))
    dt = time.perf_counter() - t0
    counts = np.array([r["n"] for r in recs.values()])
    print(f"detection over {len(counts)} faces ({dt / len(counts) * 1000:.0f} ms each): "
          f"exactly one face {np.mean(counts == 1):.1%}, at least one {np.mean(counts >= 1):.1%}, "
          f"none {np.sum(counts == 0)}, several {np.sum(counts > 1)}")
    missed = [s for s, r in recs.items() if r["n"] == 0]
    if missed:
        print(f"  no face: {', '.join(missed)}")

    tr = [recs[s] for s in train if recs[s]["n"]]
    va = [recs[s] for s in val if recs[s]["n"]]
    template = np.mean([r["landmarks"] for r in tr], axis=0)
    print("\nTEMPLATE (mean train landmarks, [0, 1]):")
    for name, (x, y) in zip(("left eye", "right eye", "nose", "mouth left", "mouth right"), template):
        print(f"  {name:12s} ({x:.4f}, {y:.4f})")
    mask = np.nanmean([r["mask"] for r in tr], axis=0)
    print("mask centroids (reference): eyes ({:.3f}, {:.3f}) ({:.3f}, {:.3f}), mouth ({:.3f}, {:.3f})".format(
        *mask.reshape(-1)))
    print("template eyes' midpoint ({:.3f}, {:.3f}); mouth corners' midpoint ({:.3f}, {:.3f})".format(
        *template[:2].mean(axis=0), *template[3:].mean(axis=0)))

    frame = frame_calibration(tr)
    print("recipe frame in the aligned train faces: centre ({:.4f}, {:.4f}), half side {:.4f}, "
          "angle {:.3f} deg".format(*frame[0], frame[1], frame[2]))

    print("\nresidual of aligning the aligned faces (identity = 0): mean (95th percentile)")
    results = {}
    for method in align.METHODS:
        res = {"train": residuals(tr, method, template, frame), "val": residuals(va, method, template, frame)}
        results[method] = res
        print(f"  {method}:")
        for split in ("train", "val"):
            r = res[split]
            print(f"    {split:5s}: |scale-1| {r['scale']:.4f} ({r['scale_p95']:.4f}), "
                  f"|rotation| {r['rotation_deg']:.3f} deg ({r['rotation_p95']:.3f}), "
                  f"centre shift {r['translation']:.4f} ({r['translation_p95']:.4f}) of the frame")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "template": template.tolist(), "detected_train": len(tr), "train": len(train),
            "frame": frame,
            "detection": {"one": int(np.sum(counts == 1)), "none": int(np.sum(counts == 0)),
                          "several": int(np.sum(counts > 1))}, "residual": results}, indent=2))
    if args.write:
        print(f"wrote {align.write_alignment(template, frame, results, (len(tr), len(train)))}")
    else:
        print(f"\n(run with --write to store them in {align.ALIGNMENT_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
