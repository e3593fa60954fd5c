"""The pack's table that reads face shape and hair amount from the photo (``backend/shape_match.py``):
``shape.json``, made by the ``shape`` stage of ``likeness retrain`` (and ``python -m
likeness.training.readout.photo_shape`` for an estimator made elsewhere).

    python -m likeness.training.readout.photo_shape --renders DATASET --model M.onnx [--pack default]
        [--parser parser.onnx] [--out DIR_OF_M/shape.json] [--prior 0.05] [--limit N] [--no-hair]

The shape surrogate is fitted on the render dataset's masks (``training.estimator.real_labels.
shape_surrogate``, cached), and a second one for the hair fraction (the table's ``hair`` entry: the
hairstyle follows the photo's hair amount; ``hair=False`` leaves it out); the photo statistics are the
shape measures of the face parser's parses of the real TRAIN photos (never a validation stem),
aligned by the same detector and at the same crop size as the estimator sees, so a photo at run time
is measured exactly like them. The parser is the one the backend reads the pack with (the
``photo_parser`` stage's: by default the shipped ``models/parser/parser.onnx``).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from ...backend.errors import UserError

QUANTILES = np.linspace(0.0, 1.0, 21)
MIN_NLL_GAIN = 0.01                                 # nats per photo
TEMPERATURES = sorted({1.0, *np.round(np.geomspace(0.5, 20.0, 41), 3).tolist()})
MIN_PHOTOS = 10


class TooFewMeasures(UserError):
    """Too few TRAIN photos could be measured (e.g. an estimator input too small for the parse to
    find the face's anchors): no table can be fitted."""


def _train_stems(root: Path, limit: int | None) -> list[str]:
    from ...backend import realfaces
    stems = realfaces.stems(root, "train")
    return stems[:limit] if limit else stems


def photo_statistics(root: Path, size: int, parser, limit: int | None = None) -> dict:
    """The shape measures, hair fraction and hair beside the cheeks of each TRAIN photo's parse,
    aligned as the backend aligns a photo for an estimator of input ``size``; beside them the hair
    beside the cheeks of its true mask in the same frame (``true_side_hair``, None under a hat)."""
    from ...backend import fidelity, realfaces
    from ...backend.align import warp
    from ...backend.predict import prepare_photo
    from ...backend.shape_match import photo_hair_fraction, photo_measures, photo_side_hair, side_hair
    stems = _train_stems(root, limit)
    rows, failed = [], 0
    for s in stems:
        rgb, mask = realfaces.load_pair(s, root)
        try:
            prep = prepare_photo(rgb, s, size=size)
        except UserError:
            failed += 1
            continue
        parts = parser.run(prep.crop[None])[0]
        true = None
        if not fidelity.mask_stats(mask)["headwear"]:
            hair = np.repeat(((mask == fidelity.C["hair"]) * 255).astype(np.uint8)[..., None], 3, 2)
            true = side_hair(warp(hair, prep.aligned.matrix, size)[..., 0] >= 128)
        rows.append({**photo_measures(parts, parser.parts),
                     "hair_fraction": photo_hair_fraction(parts, parser.parts),
                     "side_hair": photo_side_hair(parts, parser.parts), "true_side_hair": true})
    return {"rows": rows, "photos": len(stems), "failed": failed}


def parse_error_sd(parser, root: Path, limit: int | None = None) -> float:
    """Residual sd of the TRAIN photos' true hair fraction regressed on their parse's (both in the
    photos' own frame): how far the parse's hair amount is from the truth."""
    from ...backend import fidelity, realfaces
    from ...backend.shape_match import photo_hair_fraction
    pairs = []
    for s in _train_stems(root, limit):
        img, mask = realfaces.load_pair(s, root)
        pairs.append((photo_hair_fraction(parser.run(img[None])[0], parser.parts),
                      (mask == fidelity.C["hair"]).mean()))
    x, y = np.asarray(pairs, np.float64).T
    A = np.stack([x, np.ones_like(x)], 1)
    return float((y - A @ np.linalg.lstsq(A, y, rcond=None)[0]).std())


def hair_temperature(pack, model, slot: str, root: Path) -> dict:
    """The estimator's hairstyle probabilities may be over- or underconfident on real photos (an
    afro at 0.999 for a short rounded cut): fit the temperature T of P(hair length) = sum over the
    styles of a length of softmax(log P / T) that best predicts the hair-length rank of the TRAIN
    photos the estimator never trained on (its ``real_held_out`` share), ranked from their true
    masks."""
    from ...backend import fidelity, realfaces
    from ...backend.contract import read_info
    from ...backend.predict import Predictor
    from ...backend.schema import TAG_VOCABULARY
    from ..estimator.real_labels import hair_rank_of_fraction, split_rows
    report = read_info(model).report or {}
    est = report.get("estimator") or {}
    if not est.get("real_held_out") or not (report.get("real_labels") or {}).get("used"):
        return {"temperature": 1.0, "why": "the estimator kept no real photos aside"}
    photos = (report.get("real_labels") or {}).get("photos")
    stems = realfaces.stems(root, "train")[:photos] if photos else realfaces.stems(root, "train")
    held = [stems[i] for i in split_rows(len(stems), est["real_held_out"], est.get("seed", 0))[1]]
    k = [s.name for s in pack.slots].index(slot)
    order = TAG_VOCABULARY["hair_length"]
    group = np.array([order.index(o.tags["hair_length"]) for o in pack.slots[k].options])
    pred = Predictor(pack, model, device="cpu", threads=1, colours="model", shape="model",
                     attributes="model")
    results = pred.predict_many([str(root / "images" / f"{s}.jpg") for s in held])
    logp, rank = [], []
    for s, r in zip(held, results):
        mask = realfaces.load_pair(s, root)[1]
        if not hasattr(r, "probabilities") or fidelity.mask_stats(mask)["headwear"]:
            continue                                       # detection failure, or a hat hides the hair
        p = np.array([r.probabilities[slot][o.id] for o in pack.slots[k].options], np.float64)
        logp.append(np.log(np.clip(p, 1e-12, 1.0)))
        rank.append(int(hair_rank_of_fraction((mask == fidelity.C["hair"]).mean())))
    if not rank:
        return {"temperature": 1.0, "why": "no held-out photo to fit it on"}
    logp, rank = np.asarray(logp), np.asarray(rank)
    nll = {}
    for T in TEMPERATURES:
        z = logp / T
        q = np.exp(z - z.max(1, keepdims=True))
        q /= q.sum(1, keepdims=True)
        g = np.stack([q[:, group == j].sum(1) for j in range(len(order))], 1)
        nll[float(T)] = float(-np.log(np.clip(g[np.arange(len(rank)), rank], 1e-12, 1.0)).mean())
    best = min(nll, key=nll.get)
    if nll[1.0] - nll[best] < MIN_NLL_GAIN:        # few photos: keep the estimator as it is unless
        best = 1.0                                  # they clearly say otherwise
    return {"temperature": best, "photos": len(rank), "nll_at_1": round(nll[1.0], 3),
            "nll": round(nll[best], 3)}


def bare_renders(pack, renders, limit: int = 3000):
    """(option indices, mask) of the first ``limit`` renders without headwear (the pack puts hats
    on far more renders than people wear; a hat hides the hair, so those renders would skew the
    hair's statistics)."""
    from PIL import Image
    root = Path(renders)
    hats = [i for i, s in enumerate(pack.slots) if any("headwear" in o.tags for o in s.options)]
    for m in sorted((root / "masks").glob("*.png"))[:limit]:
        vec = root / "vectors" / f"{m.stem}.json"
        if not vec.is_file():
            continue
        data = json.loads(vec.read_text())
        _, choice = pack.vector_from_json(data.get("vector", data)).to_arrays()
        if any(pack.slots[i].options[choice[i]].tags.get("headwear", "none") != "none" for i in hats):
            continue
        with Image.open(m) as im:
            yield choice, np.asarray(im)


def render_hair_fractions(pack, renders, limit: int = 3000) -> np.ndarray:
    """Hair fraction of the renders without headwear."""
    from ..estimator.real_labels import mask_measures
    return np.asarray([mask_measures(mask)["hair_fraction"] for _, mask in bare_renders(pack, renders, limit)])


def hair_entry(pack, renders, rows, parser, model, root: Path, limit: int | None = None,
               log=print) -> dict | None:
    """The hair fraction's surrogate on the renders and the quantile map photo parse -> render mask
    for the pack's hairstyle slot (the one whose options carry a ``hair_length`` tag; None: none)."""
    from ..estimator.real_labels import shape_surrogate
    slots = pack.slots_with_tag("hair_length")
    if not slots:
        log("no slot with hair_length tags: the hairstyle stays the estimator's (no hair entry)")
        return None
    sur = shape_surrogate(pack, renders, measures=("hair_fraction",), log=log)
    photo = np.array([r["hair_fraction"] for r in rows if r.get("hair_fraction") is not None])
    renders_y = render_hair_fractions(pack, renders)
    if len(photo) < MIN_PHOTOS or len(renders_y) < MIN_PHOTOS:
        log(f"hair entry skipped: {len(photo)} parsed photos, {len(renders_y)} renders without a hat")
        return None
    temp = hair_temperature(pack, model, slots[0], root)
    log(f"hair temperature: {temp}")
    return {"slot": slots[0], "weights": [w[0] for w in sur["weights"]],
            "temperature": temp.pop("temperature"), "temperature_fit": temp,
            "resid_sd": sur["resid_sd"][0], "r2": sur["r2"][0],
            "photo_sd": parse_error_sd(parser, root, limit),
            "photo_quantiles": np.quantile(photo, QUANTILES).tolist(),
            "render_quantiles": np.quantile(renders_y, QUANTILES).tolist()}


SIDE_THRESHOLDS = np.round(np.arange(0.05, 0.61, 0.025), 3)


def render_side_hair(pack, renders, slot: str, limit: int = 3000) -> dict[str, float]:
    """Option id -> mean ``side_hair`` of the hair slot's renders without headwear."""
    from ...backend.fidelity import C
    from ...backend.shape_match import side_hair
    k = [s.name for s in pack.slots].index(slot)
    shares: dict[str, list] = {}
    for choice, mask in bare_renders(pack, renders, limit):
        shares.setdefault(pack.slots[k].options[choice[k]].id, []).append(side_hair(mask == C["hair"]))
    return {o: float(np.mean(v)) for o, v in shares.items()}


def hair_sides_entry(pack, renders, rows, slot: str, log=print) -> dict | None:
    """The ``hair_sides`` entry: each hair option's hair beside the cheeks on the renders, and the
    parse's threshold for "hair down" that agrees best (balanced accuracy) with the TRAIN photos'
    true masks, where a true mask shows hair down from ``OPTION_DOWN``, the options' own rule."""
    from ...backend.shape_match import OPTION_DOWN
    shares = render_side_hair(pack, renders, slot)
    k = [s.name for s in pack.slots].index(slot)
    missing = [o.id for o in pack.slots[k].options if o.id not in shares]
    pairs = np.array([(r["side_hair"], r["true_side_hair"]) for r in rows
                      if r.get("side_hair") is not None and r.get("true_side_hair") is not None])
    if missing or len(pairs) < MIN_PHOTOS:
        log(f"hair_sides entry skipped: {len(pairs)} TRAIN photos measured, no render without "
            f"headwear shows {', '.join(missing) or '-'}")
        return None
    down = pairs[:, 1] >= OPTION_DOWN
    if down.all() or not down.any():
        log("hair_sides entry skipped: the TRAIN photos' true masks show hair down for all or none")
        return None
    score = {float(t): float(np.mean([np.mean(pairs[down, 0] >= t), np.mean(pairs[~down, 0] < t)]))
             for t in SIDE_THRESHOLDS}
    t = max(score, key=score.get)
    log(f"hair down the sides: parse threshold {t:g} (balanced accuracy against the true masks "
        f"{score[t]:.3f}, {len(pairs)} TRAIN photos, {int(down.sum())} with hair down)")
    return {"slot": slot, "options": {o: round(v, 4) for o, v in shares.items()}, "photo_down": t,
            "fit": {"photos": len(pairs), "hair_down": int(down.sum()),
                    "balanced_accuracy": round(score[t], 4), "split": "TRAIN (stems not c-f)"}}


def fit_shape_table(pack, renders, model, parser_path, *, prior: float = 0.05,
                    limit: int | None = None, hair: bool = True, root=None, log=print) -> dict:
    """The shape table of ``pack`` for the estimator ``model`` (its input size, and its held-out
    photos for the hair temperature), read with the parser ``parser_path``, from the renders
    ``renders`` and the first ``limit`` (None: all) real TRAIN photos of ``root`` (default: the
    shared faces). Plain JSON, what ``backend.shape_match.load_shape_table`` reads."""
    from ...backend import realfaces
    from ...backend.colour_match import ParserModel
    from ...backend.contract import load_model
    from ..estimator.real_labels import shape_surrogate
    root = Path(root) if root else realfaces.default_root()
    if not (root / "images").is_dir():
        raise UserError(f"no shared real faces at {root} (set LIKENESS_CELEBAMASK): the shape table "
                        "is fitted on the TRAIN photos")
    size = load_model(model, pack, device="cpu").input_size
    parser = ParserModel(parser_path, device="cpu", threads=1)
    t0 = time.time()
    sur = shape_surrogate(pack, renders, log=log)
    stats = photo_statistics(root, size, parser, limit)
    measures = sur["measures"]
    vals = np.array([[np.nan if r.get(m) is None else r[m] for m in measures] for r in stats["rows"]])
    ok = np.isfinite(vals) if len(vals) else np.zeros((0, len(measures)), bool)
    if len(vals) < MIN_PHOTOS or (ok.sum(0) < MIN_PHOTOS).any():
        raise TooFewMeasures(f"the shape table needs at least {MIN_PHOTOS} parsed TRAIN photos per measure; "
                             f"{len(vals)} of {stats['photos']} were aligned at {size} px "
                             f"({dict(zip(measures, ok.sum(0).tolist()))} measured)")
    table = {
        "format": 1, "pack": pack.id, "schema": pack.schema_hash, "measures": measures,
        "weights": sur["weights"], "render_mean": sur["mean"], "render_sd": sur["sd"],
        "photo_mean": [float(vals[ok[:, j], j].mean()) for j in range(len(measures))],
        "photo_sd": [float(vals[ok[:, j], j].std()) for j in range(len(measures))],
        "prior": prior,
        "fitted": {"surrogate_r2": sur["r2"], "renders": sur["n"],
                   "photos": stats["photos"], "detection_failures": stats["failed"],
                   "measured": {m: int(ok[:, j].sum()) for j, m in enumerate(measures)},
                   "crop_size": size, "parser": Path(parser_path).name,
                   "split": "TRAIN (stems not c-f)", "seconds": round(time.time() - t0, 1)},
    }
    entry = hair_entry(pack, renders, stats["rows"], parser, model, root, limit, log) if hair else None
    if entry is not None:
        table["fitted"]["hair_r2"] = entry.pop("r2")
        table["hair"] = entry
        sides = hair_sides_entry(pack, renders, stats["rows"], entry["slot"], log)
        if sides is not None:
            table["hair_sides"] = sides
    table["fitted"]["seconds"] = round(time.time() - t0, 1)
    return table


def write_table(table: dict, out: str | os.PathLike) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--renders", required=True, help="engine render dataset of the pack")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--model", help="the estimator (default: the pack's installed or shipped one)")
    ap.add_argument("--parser", help="the face parser (default: the one the backend finds)")
    ap.add_argument("--out", help="default: shape.json beside the estimator")
    ap.add_argument("--prior", type=float, default=0.05, help="weight of staying near the "
                    "estimator's sliders (per slider, against squared render sds)")
    ap.add_argument("--limit", type=int, help="first N TRAIN photos")
    ap.add_argument("--no-hair", action="store_true", help="no hair entry (the estimator's hairstyle)")
    args = ap.parse_args(argv)

    from ...backend import models
    from ...backend.schema import find_pack
    try:
        pack = find_pack(args.pack)
        model = Path(args.model) if args.model else models.find_model(pack)
        parser = Path(args.parser) if args.parser else models.find_parser(pack, model)
        if parser is None:
            raise UserError("no face parser (models/parser/parser.onnx)")
        table = fit_shape_table(pack, args.renders, model, parser, prior=args.prior, limit=args.limit,
                                hair=not args.no_hair)
        out = write_table(table, args.out or model.parent / "shape.json")
    except UserError as err:
        print(f"photo_shape: error: {err}", file=sys.stderr)
        return 1
    print(json.dumps({"out": str(out), **table["fitted"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
