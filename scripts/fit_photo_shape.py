#!/usr/bin/env python
"""Fit the table that reads face shape from the photo (``backend/shape_match.py``): shape.json.

    python scripts/fit_photo_shape.py --renders DATASET [--pack default] [--model M]
        [--out DIR_OF_M/shape.json] [--prior 0.05] [--limit N]

The shape surrogate is fitted on the render dataset's masks (``training.estimator.real_labels.shape_surrogate``,
cached), and a second one for the hair fraction (the table's ``hair`` entry: the hairstyle follows
the photo's hair amount; ``--no-hair`` leaves it out); the photo statistics are the shape measures of
the shipped face parser's parses of the real TRAIN photos (never a validation stem), aligned by the same detector and at the same crop size as
the estimator ``--model`` sees, so a photo at run time is measured exactly like them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np



def photo_statistics(root: Path, size: int, parser, limit: int | None = None) -> dict:
    from likeness.backend import realfaces
    from likeness.backend.errors import UserError
    from likeness.backend.predict import prepare_photo
    from likeness.backend.shape_match import photo_hair_fraction, photo_measures
    stems = realfaces.stems(root, "train")[:limit] if limit else realfaces.stems(root, "train")
    rows, failed = [], 0
    for s in stems:
        try:
            prep = prepare_photo(str(root / "images" / f"{s}.jpg"), size=size)
        except UserError:
            failed += 1
            continue
        parts = parser.run(prep.crop[None])[0]
        rows.append({**photo_measures(parts, parser.parts),
                     "hair_fraction": photo_hair_fraction(parts, parser.parts)})
    return {"rows": rows, "photos": len(stems), "failed": failed}


QUANTILES = np.linspace(0.0, 1.0, 21)


def parse_error_sd(parser) -> float:
    """Residual sd of the TRAIN photos' true hair fraction regressed on their parse's (both in the
    photos' own frame): how far the parse's hair amount is from the truth."""
    from likeness.backend import fidelity, realfaces
    from likeness.backend.shape_match import photo_hair_fraction
    root = realfaces.default_root()
    pairs = []
    for s in realfaces.stems(root, "train"):
        img, mask = realfaces.load_pair(s, root)
        pairs.append((photo_hair_fraction(parser.run(img[None])[0], parser.parts),
                      (mask == fidelity.C["hair"]).mean()))
    x, y = np.asarray(pairs, np.float64).T
    A = np.stack([x, np.ones_like(x)], 1)
    return float((y - A @ np.linalg.lstsq(A, y, rcond=None)[0]).std())


MIN_NLL_GAIN = 0.01                                 # nats per photo
TEMPERATURES = sorted({1.0, *np.round(np.geomspace(0.5, 20.0, 41), 3).tolist()})


def hair_temperature(pack, model, slot: str) -> dict:
    """The estimator's hairstyle probabilities may be over- or underconfident on real photos (an
    afro at 0.999 for a short rounded cut): fit the temperature T of P(hair length) = sum over the styles of a
    length of softmax(log P / T) that best predicts the hair-length rank of the TRAIN photos the
    estimator never trained on (its ``real_held_out`` share), ranked from their true masks."""
    from likeness.backend import fidelity, realfaces
    from likeness.backend.contract import read_info
    from likeness.backend.predict import Predictor
    from likeness.backend.schema import TAG_VOCABULARY
    from likeness.training.estimator.real_labels import hair_rank_of_fraction, split_rows
    report = read_info(model).report or {}
    est = report.get("estimator") or {}
    if not est.get("real_held_out") or not (report.get("real_labels") or {}).get("used"):
        return {"temperature": 1.0, "why": "the estimator kept no real photos aside"}
    root = realfaces.default_root()
    stems = realfaces.stems(root, "train")
    held = [stems[i] for i in split_rows(len(stems), est["real_held_out"], est.get("seed", 0))[1]]
    k = [s.name for s in pack.slots].index(slot)
    order = TAG_VOCABULARY["hair_length"]
    group = np.array([order.index(o.tags["hair_length"]) for o in pack.slots[k].options])
    pred = Predictor(pack, model, device="cpu", threads=1, colours="model", shape="model")
    results = pred.predict_many([str(root / "images" / f"{s}.jpg") for s in held])
    logp, rank = [], []
    for s, r in zip(held, results):
        mask = realfaces.load_pair(s, root)[1]
        if not hasattr(r, "probabilities") or fidelity.mask_stats(mask)["headwear"]:
            continue                                       # detection failure, or a hat hides the hair
        p = np.array([r.probabilities[slot][o.id] for o in pack.slots[k].options], np.float64)
        logp.append(np.log(np.clip(p, 1e-12, 1.0)))
        rank.append(int(hair_rank_of_fraction((mask == fidelity.C["hair"]).mean())))
    logp, rank = np.asarray(logp), np.asarray(rank)
    nll = {}
    for T in TEMPERATURES:
        z = logp / T
        q = np.exp(z - z.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        g = np.stack([q[:, group == j].sum(1) for j in range(len(order))], 1)
        nll[float(T)] = float(-np.log(np.clip(g[np.arange(len(rank)), rank], 1e-12, 1.0)).mean())
    best = min(nll, key=nll.get)
    if nll[1.0] - nll[best] < MIN_NLL_GAIN:        # 73 photos: keep the estimator as it is unless
        best = 1.0                                  # they clearly say otherwise
    return {"temperature": best, "photos": len(rank), "nll_at_1": round(nll[1.0], 3),
            "nll": round(nll[best], 3)}


def hair_entry(pack, renders, rows, parser, model) -> dict | None:
    """The hair fraction's surrogate on the renders and the quantile map photo parse -> render mask
    for the pack's hairstyle slot (the one whose options carry a ``hair_length`` tag; None: none)."""
    from likeness.training.estimator.real_labels import shape_surrogate
    slots = pack.slots_with_tag("hair_length")
    if not slots:
        print("no slot with hair_length tags: the hairstyle stays the estimator's (no hair entry)")
        return None
    sur = shape_surrogate(pack, renders, measures=("hair_fraction",), log=print)
    photo = np.array([r["hair_fraction"] for r in rows if r.get("hair_fraction") is not None])
    renders_y = render_hair_fractions(pack, renders)
    temp = hair_temperature(pack, model, slots[0])
    print(f"hair temperature: {temp}")
    return {"slot": slots[0], "weights": [w[0] for w in sur["weights"]],
            "temperature": temp.pop("temperature"), "temperature_fit": temp,
            "resid_sd": sur["resid_sd"][0], "r2": sur["r2"][0], "photo_sd": parse_error_sd(parser),
            "photo_quantiles": np.quantile(photo, QUANTILES).tolist(),
            "render_quantiles": np.quantile(renders_y, QUANTILES).tolist()}


def render_hair_fractions(pack, renders, limit: int = 3000) -> np.ndarray:
    """Hair fraction of the renders without headwear (the pack puts hats on far more renders than
    people wear; a hat hides the hair, so those renders would skew the map)."""
    import json
    from PIL import Image
    from likeness.training.estimator.real_labels import mask_measures
    root = Path(renders)
    hats = [i for i, s in enumerate(pack.slots) if any("headwear" in o.tags for o in s.options)]
    out = []
    for m in sorted((root / "masks").glob("*.png"))[:limit]:
        vec = root / "vectors" / f"{m.stem}.json"
        if not vec.is_file():
            continue
        data = json.loads(vec.read_text())
        _, choice = pack.vector_from_json(data.get("vector", data)).to_arrays()
        if any(pack.slots[i].options[choice[i]].tags.get("headwear", "none") != "none" for i in hats):
            continue
        with Image.open(m) as im:
            out.append(mask_measures(np.asarray(im))["hair_fraction"])
    return np.asarray(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--renders", required=True, help="engine render dataset of the pack")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--model", help="the estimator (default: the pack's installed or shipped one)")
    ap.add_argument("--out", help="default: shape.json beside the estimator")
    ap.add_argument("--prior", type=float, default=0.05, help="weight of staying near the "
                    "estimator's sliders (per slider, against squared render sds)")
    ap.add_argument("--limit", type=int, help="first N TRAIN photos")
    ap.add_argument("--no-hair", action="store_true", help="no hair entry (the estimator's hairstyle)")
    args = ap.parse_args(argv)

    from likeness.backend import models, realfaces
    from likeness.backend.colour_match import ParserModel
    from likeness.backend.contract import load_model
    from likeness.backend.schema import find_pack
    from likeness.training.estimator.real_labels import shape_surrogate
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
    hair = None if args.no_hair else hair_entry(pack, args.renders, stats["rows"], parser, model)
    if hair is not None:
        table["fitted"]["hair_r2"] = hair.pop("r2")
        table["hair"] = hair
    out = Path(args.out) if args.out else model.parent / "shape.json"
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(json.dumps({"out": str(out), **table["fitted"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
