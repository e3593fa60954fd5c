"""Do the descriptor's wider views (the top of the head, the whole frame) help the shipped heads?
TRAIN photos only.

    python scripts/view_study.py --reader models/attributes --cache CACHE [--json out.json]

Reader format 8 lets every head read any union of nine feature blocks (511 unions); the heads it
chose scored 0.864 on TRAIN cross-validation, but 511 candidates on 744 photos flatter the winner.
This asks the narrower question with few candidates: for each shipped head (blocks U, L2 weight
chosen among ``LAMBDAS``), U against U + crown, U + frame and U + crown + frame, scored by 5-fold
cross-validated balanced accuracy as the mean of ``SEEDS``' fold assignments, which no fit chose
anything on (the fits used 0-3). ``CACHE`` holds the format-8 features of the TRAIN photos, each
parsed by the cross-fitted parser that never saw it (``likeness train attributes --cache CACHE
--cross-fit-parsers ...``).
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

SEEDS = (100, 101, 102, 103, 104)
VIEWS = ((), ("crown",), ("frame",), ("crown", "frame"))


def score_blocks(Xs: np.ndarray, y: np.ndarray, k: int, cols: np.ndarray, seeds=SEEDS
                 ) -> tuple[float, float, list[float]]:
    """(L2 weight, its cross-validated balanced accuracy, that per fold assignment) of a head on the
    columns ``cols`` of standardised, labelled rows: the weight best on the mean over ``seeds``'
    5-fold assignments (ties: the larger)."""
    from likeness.training.readout import attributes as T
    runs = [T.choose_lambda(Xs[:, cols], y, k, T.LAMBDAS, seed=s)[1] for s in seeds]
    cv = {lam: float(np.mean([r[lam] for r in runs])) for lam in T.LAMBDAS}
    lam = max(cv, key=lambda l: (cv[l], l))
    return lam, cv[lam], [float(r[lam]) for r in runs]


def train_features(cache: Path) -> tuple[dict, np.ndarray, dict, dict]:
    """The format-8 fit's cached TRAIN features: (raw, standardised rows, block -> column mask,
    attribute -> class indices with -1 unknown); refuses a cache holding a validation photo."""
    from likeness.backend import realfaces, viewer
    from likeness.training.readout import attributes as T
    files = sorted(p for p in cache.glob("reader_raw8_xfit*.npz") if not p.stem.endswith("_flip"))
    if len(files) != 1:
        raise SystemExit(f"{cache}: expected one reader_raw8_xfit*.npz, found {[p.name for p in files]}")
    raw = T.read_raw(files[0])
    if any(realfaces.is_validation(s) for s in raw["stems"]):
        raise SystemExit(f"{files[0]} holds a validation photo")
    X = T.assemble(raw, *T.fills(raw))
    mu, sd = T.standardise(X)
    targets = T.class_targets(viewer.read_labels(viewer.labels_path(realfaces.default_root())), raw["stems"])
    return raw, (X - mu) / sd, T.feature_blocks(raw), targets


def study(reader: Path, cache: Path, log=print) -> dict:
    from likeness.backend import attributes as A
    shipped = json.loads((reader / "reader.json").read_text())["report"]["attributes"]
    raw, Xs, blocks, targets = train_features(cache)
    rows = {}
    for attr, y in targets.items():
        k = len(A.HEAD_CLASSES[attr])
        keep = y >= 0
        base = shipped[attr]["features"].split("+")
        row = {}
        for extra in VIEWS:
            names = base + [v for v in extra if v not in base]
            lam, cv, per_seed = score_blocks(Xs[keep], y[keep], k, np.any([blocks[n] for n in names], 0))
            row["+".join(("U",) + extra)] = {"blocks": "+".join(names), "lambda": lam, "cv": cv,
                                              "per_seed": per_seed}
        rows[attr] = row
        log(f"{attr:13s} " + "  ".join(f"{n} {r['cv']:.3f}" for n, r in row.items()) + f"   [U = {'+'.join(base)}]")
    seven = [a for a in rows if a != "glasses_type"]
    mean = {n: float(np.mean([rows[a][n]["cv"] for a in seven])) for n in rows[seven[0]]}
    log("mean of seven " + "  ".join(f"{n} {v:.4f}" for n, v in mean.items()))
    return {"photos": len(raw["stems"]), "seeds": list(SEEDS), "attributes": rows, "mean": mean,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reader", default="models/attributes", help="the shipped reader's folder")
    ap.add_argument("--cache", required=True, help="the --cache folder of the format-8 fit")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = study(Path(args.reader), Path(args.cache).expanduser())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
