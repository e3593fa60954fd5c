#!/usr/bin/env python
"""Fit the table that reads face shape from the photo (``backend/shape_match.py``): shape.json.

    python scripts/fit_photo_shape.py --renders DATASET [--pack default] [--model M]
        [--out DIR_OF_M/shape.json] [--prior 0.05] [--limit N]

The shape surrogate is fitted on the render dataset's masks (``training.real_labels.shape_surrogate``,
cached); the photo statistics are the shape measures of the shipped face parser's parses of the real
TRAIN photos (never a validation stem), aligned by the same detector and at the same crop size as
the estimator ``--model`` sees, so a photo at run time is measured exactly like them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

try:
    import likeness  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))


def photo_statistics(root: Path, size: int, parser, limit: int | None = None) -> dict:
    from likeness.backend import realfaces
    from likeness.backend.errors import UserError
    from likeness.backend.predict import prepare_photo
    from likeness.backend.shape_match import photo_measures
    stems = realfaces.stems(root, "train")[:limit] if limit else realfaces.stems(root, "train")
    rows, failed = [], 0
    for s in stems:
        try:
            prep = prepare_photo(str(root / "images" / f"{s}.jpg"), size=size)
        except UserError:
            failed += 1
            continue
        rows.append(photo_measures(parser.run(prep.crop[None])[0], parser.parts))
    return {"rows": rows, "photos": len(stems), "failed": failed}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--renders", required=True, help="engine render dataset of the pack")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--model", help="the estimator (default: the pack's installed or shipped one)")
    ap.add_argument("--out", help="default: shape.json beside the estimator")
    ap.add_argument("--prior", type=float, default=0.05, help="weight of staying near the "
                    "estimator's sliders (per slider, against squared render sds)")
    ap.add_argument("--limit", type=int, help="first N TRAIN photos")
    args = ap.parse_args(argv)

    from likeness.backend import models, realfaces
    from likeness.backend.colour_match import ParserModel
    from likeness.backend.contract import load_model
    from likeness.backend.schema import find_pack
    from likeness.training.real_labels import shape_surrogate
    pack = find_pack(args.pack)
    model = Path(args.model) if args.model else models.find_model(pack)
    size = load_model(model, pack, device="cpu").input_size
    parser_path = models.find_parser()
    if parser_path is None:
        print("fit_photo_shape: no face parser (models/parser/parser.onnx)", file=sys.stderr)
        return 1
    parser = ParserModel(parser_path, device="cpu")
    t0 = time.time()
    sur = shape_surrogate(pack, args.renders, log=print)
    stats = photo_statistics(realfaces.default_root(), size, parser, args.limit)
    measures = sur["measures"]
    vals = np.array([[np.nan if r.get(m) is None else r[m] for m in measures] for r in stats["rows"]])
    ok = np.isfinite(vals)
    table = {
        "format": 1, "pack": pack.id, "schema": pack.schema_hash, "measures": measures,
        "weights": sur["weights"], "render_mean": sur["mean"], "render_sd": sur["sd"],
        "photo_mean": [float(vals[ok[:, j], j].mean()) for j in range(len(measures))],
        "photo_sd": [float(vals[ok[:, j], j].std()) for j in range(len(measures))],
        "prior": args.prior,
        "fitted": {"surrogate_r2": sur["r2"], "renders": sur["n"],
                   "photos": stats["photos"], "detection_failures": stats["failed"],
                   "measured": {m: int(ok[:, j].sum()) for j, m in enumerate(measures)},
                   "crop_size": size, "parser": parser_path.name,
                   "split": "TRAIN (stems not c-f)", "seconds": round(time.time() - t0, 1)},
    }
    out = Path(args.out) if args.out else model.parent / "shape.json"
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({"out": str(out), **table["fitted"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
