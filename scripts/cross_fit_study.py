"""Do the reader's heads trust the face parse more than a new photo's parse earns? TRAIN photos only.

    python scripts/cross_fit_study.py --shipped DIR --cross-fit DIR --cache CACHE [--json out.json]

(the figures in docs/results/likeness.md: ``--shipped`` a folder holding the reader.json of commit
1eaa190, fitted on the shipped parser's features; ``--cross-fit models/attributes``)

``likeness train attributes --cache CACHE`` stores the TRAIN photos' features twice: read with the
shipped parser (trained on those same photos) and, with ``--cross-fit-parsers``, each photo read
with the parser cross-fitted without it (written to ``DIR``). The parse of a photo a parser never saw
is what a user's photo gets, so both kinds of heads are scored out of fold (5 folds, three fold
assignments) on the cross-fitted features:

* ``shipped -> shipped``: heads fitted and scored on the shipped parser's features (the figure the
  shipped fit reports, flattered where a block comes from the parse);
* ``shipped -> cross-fitted``: the shipped heads' blocks and L2 weights, fitted on the shipped
  parser's features, scored on the cross-fitted ones (a new photo as the shipped reader meets it);
* ``cross-fitted -> cross-fitted``: the cross-fitted fit's own blocks and weights on its features.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

SEEDS = (10, 11, 12)        # fold assignments other than the fits' own (0-3)


def features(raw: dict) -> np.ndarray:
    from likeness.training.readout import attributes as T
    return T.assemble(raw, *T.fills(raw))


def transfer_cv(X_fit: np.ndarray, X_score: np.ndarray, y: np.ndarray, k: int, cols: np.ndarray,
                lam: float, seeds=SEEDS) -> float:
    """Balanced accuracy of heads fitted on rows of ``X_fit`` and scored on the held-out rows of
    ``X_score`` (the same photos, other features), mean over ``seeds``' 5-fold assignments; each
    fold standardises with its training rows of ``X_fit``, as a fitted reader does."""
    from likeness.training.readout import attributes as T
    keep = y >= 0
    a, b, yk = X_fit[keep][:, cols], X_score[keep][:, cols], y[keep]
    scores = []
    for seed in seeds:
        perm = np.random.default_rng(seed).permutation(len(yk))
        pred = np.zeros(len(yk), int)
        for f in range(T.FOLDS):
            te = perm[f::T.FOLDS]
            tr = np.setdiff1d(perm, te)
            mu, sd = T.standardise(a[tr])
            W, c = T.fit_softmax((a[tr] - mu) / sd, yk[tr], k, lam)
            pred[te] = (((b[te] - mu) / sd) @ W + c).argmax(1)
        scores.append(T.balanced(yk, pred, k))
    return float(np.mean(scores))


def study(shipped: Path, cross_fit: Path, cache: Path, log=print) -> dict:
    from likeness.backend import attributes as A
    from likeness.backend import realfaces, viewer
    from likeness.training.readout import attributes as T
    ship_json = json.loads((shipped / "reader.json").read_text())
    xfit_json = json.loads((cross_fit / "reader.json").read_text())
    base = f"reader_raw{A.READER_FORMAT}"
    xfit_files = sorted(p for p in cache.glob(f"{base}_xfit*.npz") if not p.stem.endswith("_flip"))
    if len(xfit_files) != 1:
        raise SystemExit(f"{cache}: expected one {base}_xfit*.npz, found {[p.name for p in xfit_files]}")
    rs, rx = T.read_raw(cache / f"{base}.npz"), T.read_raw(xfit_files[0])
    if rs["stems"] != rx["stems"] or any(realfaces.is_validation(s) for s in rs["stems"]):
        raise SystemExit("the two feature files hold different photos (or a validation photo)")
    Xs, Xx = features(rs), features(rx)
    targets = T.class_targets(viewer.read_labels(viewer.labels_path(realfaces.default_root())), rs["stems"])
    sets = T.block_subsets(T.feature_blocks(rs))
    rows = {}
    for attr, y in targets.items():
        k = len(A.HEAD_CLASSES[attr])
        s, x = ship_json["report"]["attributes"][attr], xfit_json["report"]["attributes"][attr]
        rows[attr] = {"shipped_blocks": s["features"], "cross_fit_blocks": x["features"],
                      "shipped->shipped": transfer_cv(Xs, Xs, y, k, sets[s["features"]], s["lambda"]),
                      "shipped->cross-fitted": transfer_cv(Xs, Xx, y, k, sets[s["features"]], s["lambda"]),
                      "cross-fitted->cross-fitted": transfer_cv(Xx, Xx, y, k, sets[x["features"]], x["lambda"])}
        log(f"{attr:13s} " + "  ".join(f"{c} {rows[attr][c]:.3f}" for c in
                                        ("shipped->shipped", "shipped->cross-fitted", "cross-fitted->cross-fitted"))
            + f"   [{s['features']} | {x['features']}]")
    seven = [a for a in rows if a != "glasses_type"]
    mean = {c: float(np.mean([rows[a][c] for a in seven])) for c in
            ("shipped->shipped", "shipped->cross-fitted", "cross-fitted->cross-fitted")}
    log("mean of seven " + "  ".join(f"{c} {v:.4f}" for c, v in mean.items()))
    return {"photos": len(rs["stems"]), "seeds": list(SEEDS), "attributes": rows, "mean": mean,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shipped", required=True, help="a reader fitted on the shipped parser's features")
    ap.add_argument("--cross-fit", required=True, help="the reader fitted with --cross-fit-parsers")
    ap.add_argument("--cache", required=True, help="the --cache folder both fits used")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    out = study(Path(args.shipped), Path(args.cross_fit), Path(args.cache).expanduser())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
