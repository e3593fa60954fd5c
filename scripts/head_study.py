"""Studies of the reader's heads on the cached TRAIN features (TRAIN photos only).

    python scripts/head_study.py views      --cache CACHE [--reader models/attributes] [--json out.json]
    python scripts/head_study.py confidence --cache CACHE [--reader models/attributes] [--json out.json]

``CACHE`` holds the format-8 features of the TRAIN photos, each parsed by the cross-fitted parser
that never saw it (``likeness train attributes --cache CACHE --cross-fit-parsers ...``). Every
score is 5-fold cross-validated balanced accuracy, the mean over ``SEEDS``' fold assignments, which
no fit chose anything on (the fits used 0-3), with the L2 weight chosen among ``LAMBDAS``.

``views``: do the descriptor's wider views (the top of the head, the whole frame) help the shipped
heads? Reader format 8 lets every head read any union of nine feature blocks (511 unions); the heads
it chose scored 0.864 on TRAIN cross-validation, but 511 candidates on 744 photos flatter the
winner. This asks the narrower question with few candidates: for each shipped head (blocks U), U
against U + crown, U + frame and U + crown + frame.

``confidence``: do the heads gain when the labels a viewer was unsure of weigh less in their fit?
``attributes.csv`` marks each photo's labels high or low confidence; each shipped head is fitted
with the low-confidence photos' loss weighted by each of ``WEIGHTS`` and scored, as validation
scores, on all labels.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

SEEDS = (100, 101, 102, 103, 104)
WEIGHTS = (1.0, 0.5, 0.25)
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


def views_study(reader: Path, cache: Path, log=print) -> dict:
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


def fit_weighted(X: np.ndarray, y: np.ndarray, k: int, lam: float, w: np.ndarray
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``training.readout.attributes.fit_softmax`` with each row's loss also weighted by ``w``
    (classes balanced on the weighted counts)."""
    import torch
    Xt, yt, wt = (torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.long),
                  torch.tensor(w, dtype=torch.float64))
    counts = torch.zeros(k, dtype=torch.float64).index_add_(0, yt, wt).clamp(min=1e-9)
    weight = (wt.sum() / (k * counts))[yt] * wt
    W = torch.zeros(X.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(Xt @ W + b, yt, reduction="none")
        loss = (ce * weight).sum() / len(yt) + lam * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def cross_validated(X: np.ndarray, y: np.ndarray, k: int, lam: float, w: np.ndarray, seed: int,
                    folds: int = 5) -> np.ndarray:
    """Each row's out-of-fold class."""
    perm = np.random.default_rng(seed).permutation(len(y))
    pred = np.zeros(len(y), int)
    for f in range(folds):
        te = perm[f::folds]
        tr = np.setdiff1d(perm, te)
        W, b = fit_weighted(X[tr], y[tr], k, lam, w[tr])
        pred[te] = (X[te] @ W + b).argmax(1)
    return pred


def score_weighting(X: np.ndarray, y: np.ndarray, k: int, confident: np.ndarray, low: float,
                    seeds=SEEDS) -> dict:
    """The L2 weight best on the mean over ``seeds`` (ties: the larger) with low-confidence rows
    weighted ``low``: its balanced accuracy on all rows and on the confident ones."""
    from likeness.training.readout import attributes as T
    w = np.where(confident, 1.0, low)
    best = None
    for lam in T.LAMBDAS:
        preds = [cross_validated(X, y, k, lam, w, s) for s in seeds]
        cv = float(np.mean([T.balanced(y, p, k) for p in preds]))
        hi = float(np.mean([T.balanced(y[confident], p[confident], k) for p in preds]))
        if best is None or cv > best["cv"] + 1e-9 or (abs(cv - best["cv"]) <= 1e-9 and lam > best["lambda"]):
            best = {"lambda": lam, "cv": cv, "cv_confident": hi}
    return best


def confidence_study(reader: Path, cache: Path, weights=WEIGHTS, log=print) -> dict:
    from likeness.backend import attributes as A
    from likeness.backend import realfaces, viewer
    shipped = json.loads((reader / "reader.json").read_text())["report"]["attributes"]
    raw, Xs, blocks, targets = train_features(cache)
    labels = viewer.read_labels(viewer.labels_path(realfaces.default_root()))
    confident = np.array([labels[s].confident for s in raw["stems"]])
    rows = {}
    for attr, y in targets.items():
        keep = y >= 0
        cols = np.any([blocks[n] for n in shipped[attr]["features"].split("+")], 0)
        row = {str(w): score_weighting(Xs[keep][:, cols], y[keep], len(A.HEAD_CLASSES[attr]),
                                       confident[keep], w) for w in weights}
        rows[attr] = row
        log(f"{attr:13s} " + "  ".join(f"low x{w} {r['cv']:.3f} (confident {r['cv_confident']:.3f})"
                                       for w, r in row.items()))
    seven = [a for a in rows if a != "glasses_type"]
    mean = {w: float(np.mean([rows[a][w]["cv"] for a in seven])) for w in rows[seven[0]]}
    log("mean of seven " + "  ".join(f"low x{w} {v:.4f}" for w, v in mean.items()))
    return {"photos": len(raw["stems"]), "low_confidence": int((~confident).sum()),
            "seeds": list(SEEDS), "attributes": rows, "mean": mean,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=("views", "confidence"))
    ap.add_argument("--reader", default="models/attributes", help="the shipped reader's folder")
    ap.add_argument("--cache", required=True, help="the --cache folder of the format-8 fit")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    run = views_study if args.study == "views" else confidence_study
    out = run(Path(args.reader), Path(args.cache).expanduser())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
