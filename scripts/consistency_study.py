"""One person, two photos, one avatar: how often a changed copy of a photo gets the same avatar
options as the photo itself, against two strangers.

    python scripts/consistency_study.py [--split val] [--limit N] [--json out.json]

The shared faces hold one photo per person, so the second photo of each person is the same photo
changed the ways photos of one person differ: mirrored (the other side of the face and parting),
cropped looser (``validate --perturb loose_crop``), blurred, JPEG quality 30, warm white balance.
For every slot that shows what a viewer reads (hairstyle, fringe, facial hair, glasses, headwear)
the share of photos whose copy gets the same option, and the same share for two strangers (every
photo against every other photo of the split, original against original). Photos any version of
which finds no face are left out and counted.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

SLOTS = ("hair", "bangs", "facial_hair", "glasses", "headwear")
CHANGES = ("mirror", "loose_crop", "blur", "jpeg30", "warm")


def changed(rgb: np.ndarray, kind: str) -> np.ndarray:
    from likeness.render_engine.validate_job import perturb
    return np.ascontiguousarray(rgb[:, ::-1]) if kind == "mirror" else perturb(rgb, kind)


def study(split: str = "val", limit: int | None = None, log=print) -> dict:
    from PIL import Image
    from likeness.backend import realfaces
    from likeness.backend.errors import UserError
    from likeness.backend.models import find_model
    from likeness.backend.predict import Predictor
    from likeness.backend.schema import find_pack
    root = realfaces.default_root()
    stems = realfaces.stems(root, split)[:limit] if limit else realfaces.stems(root, split)
    pack = find_pack("default")
    pred = Predictor(pack, find_model(pack), device="cpu", threads=1)
    got: dict[str, list] = {k: [] for k in ("photo",) + CHANGES}
    skipped, t0 = [], time.perf_counter()
    for i, s in enumerate(stems):
        with Image.open(root / "images" / f"{s}.jpg") as im:
            rgb = np.asarray(im.convert("RGB"))
        try:
            slots = {k: pred.predict(rgb if k == "photo" else changed(rgb, k), name=s).vector.slots
                     for k in got}
        except UserError:
            skipped.append(s)
            continue
        for k, v in slots.items():
            got[k].append([v[n] for n in SLOTS])
        if (i + 1) % 50 == 0:
            log(f"  {i + 1}/{len(stems)} photos ({time.perf_counter() - t0:.0f} s)")
    base = np.array(got["photo"])
    n = len(base)
    same = base[:, None, :] == base[None, :, :]                    # [n, n, slots]
    off = ~np.eye(n, dtype=bool)
    rows = {"strangers": {s: round(float(same[:, :, j][off].mean()), 3) for j, s in enumerate(SLOTS)}}
    for k in CHANGES:
        a = np.array(got[k]) == base
        rows[k] = {s: round(float(a[:, j].mean()), 3) for j, s in enumerate(SLOTS)}
    return {"split": split, "photos": n, "skipped": skipped, "slots": list(SLOTS), "agreement": rows,
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "seconds": round(time.perf_counter() - t0, 1)}


def markdown(r: dict) -> str:
    head = "| second photo | " + " | ".join(r["slots"]) + " |\n|---|" + "---|" * len(r["slots"]) + "\n"
    return head + "".join(f"| {k} | " + " | ".join(f"{v[s]:.3f}" for s in r["slots"]) + " |\n"
                          for k, v in r["agreement"].items())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--split", default="val", choices=("train", "val"))
    ap.add_argument("--limit", type=int)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    r = study(args.split, args.limit)
    print(markdown(r))
    print(f"{r['photos']} photos ({len(r['skipped'])} without a face in some version), "
          f"{r['seconds']} s on {r['machine']}")
    if args.json:
        args.json.write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
