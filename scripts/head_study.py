"""Studies of the reader's heads on the cached TRAIN features (TRAIN photos only).

    python scripts/head_study.py views      --cache CACHE [--reader models/attributes] [--json out.json]
    python scripts/head_study.py confidence --cache CACHE [--reader models/attributes] [--json out.json]
    python scripts/head_study.py ordinal    --cache CACHE [--reader models/attributes] [--json out.json]

``CACHE`` holds the format-8 or -9 features of the TRAIN photos (the newest is read), each parsed by the cross-fitted parser
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

``ordinal``: do the ordered attributes (hair length short < medium < long, skin tone light < medium <
dark) gain from a cumulative-logit head (one score, two thresholds: fewer weights than a softmax
over three classes) on the shipped head's blocks?
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
    """The format-9 (else -8) fit's cached TRAIN features: (raw, standardised rows, block -> column mask,
    attribute -> class indices with -1 unknown); refuses a cache holding a validation photo."""
    from likeness.backend import realfaces, viewer
    from likeness.training.readout import attributes as T
    files = sorted(p for p in cache.glob("reader_raw[89]_xfit*.npz") if not p.stem.endswith("_flip"))
    newest = [p for p in files if p.name[10] == max(q.name[10] for q in files)] if files else []
    if len(newest) != 1:
        raise SystemExit(f"{cache}: expected one reader_raw9_xfit*.npz (or raw8), found {[p.name for p in files]}")
    files = newest
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


def out_of_fold(y: np.ndarray, seed: int, classify, folds: int = 5) -> np.ndarray:
    """Each row's class from ``classify(train_rows, test_rows)``, fitted without the row's fold."""
    perm = np.random.default_rng(seed).permutation(len(y))
    pred = np.zeros(len(y), int)
    for f in range(folds):
        te = perm[f::folds]
        pred[te] = classify(np.setdiff1d(perm, te), te)
    return pred


def cross_validated(X: np.ndarray, y: np.ndarray, k: int, lam: float, w: np.ndarray, seed: int
                    ) -> np.ndarray:
    """Each row's out-of-fold class from the weighted softmax."""
    from likeness.training.readout import attributes as T

    def classify(tr, te):
        W, b = T.fit_softmax(X[tr], y[tr], k, lam, weight=w[tr])
        return (X[te] @ W + b).argmax(1)
    return out_of_fold(y, seed, classify)


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


ORDERED = ("hair_length", "skin_tone")


def fit_ordinal(X: np.ndarray, y: np.ndarray, k: int, lam: float):
    """Class-balanced cumulative-logit regression, P(y <= j) = sigmoid(theta_j - X w), thresholds kept
    increasing: -> a function from rows [N, F] to class probabilities [N, k]."""
    import torch
    Xt, yt = torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.long)
    counts = torch.bincount(yt, minlength=k).double().clamp(min=1)
    weight = (len(yt) / (k * counts))[yt]
    w = torch.zeros(X.shape[1], dtype=torch.float64, requires_grad=True)
    t = torch.zeros(k - 1, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, t], max_iter=200, line_search_fn="strong_wolfe")

    def probs(Xn, w, t):
        theta = torch.cumsum(torch.cat([t[:1], torch.exp(t[1:])]), 0)
        c = torch.sigmoid(theta[None] - (Xn @ w)[:, None])
        edge = torch.ones(len(Xn), 1, dtype=c.dtype)
        c = torch.cat([0 * edge, c, edge], 1)
        return (c[:, 1:] - c[:, :-1]).clamp(min=1e-12)

    def closure():
        opt.zero_grad()
        p = probs(Xt, w, t)
        loss = (-torch.log(p[torch.arange(len(yt)), yt]) * weight).mean() + lam * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda Xn: probs(torch.tensor(Xn, dtype=torch.float64), w.detach(), t.detach()).numpy()


def score_ordinal(X: np.ndarray, y: np.ndarray, k: int, seeds=SEEDS) -> tuple[float, float]:
    """(L2 weight, cross-validated balanced accuracy) of the ordinal head, chosen as ``score_blocks``
    chooses the softmax's."""
    from likeness.training.readout import attributes as T
    cv = {}
    for lam in T.LAMBDAS:
        def classify(tr, te):
            return fit_ordinal(X[tr], y[tr], k, lam)(X[te]).argmax(1)
        cv[lam] = float(np.mean([T.balanced(y, out_of_fold(y, s, classify), k) for s in seeds]))
    lam = max(cv, key=lambda l: (cv[l], l))
    return lam, cv[lam]


def ordinal_study(reader: Path, cache: Path, log=print) -> dict:
    from likeness.backend import attributes as A
    shipped = json.loads((reader / "reader.json").read_text())["report"]["attributes"]
    raw, Xs, blocks, targets = train_features(cache)
    rows = {}
    for attr in ORDERED:
        y = targets[attr]
        keep, k = y >= 0, len(A.HEAD_CLASSES[attr])
        cols = np.any([blocks[n] for n in shipped[attr]["features"].split("+")], 0)
        lam_s, cv_s, _ = score_blocks(Xs[keep], y[keep], k, cols)
        lam_o, cv_o = score_ordinal(Xs[keep][:, cols], y[keep], k)
        rows[attr] = {"softmax": {"lambda": lam_s, "cv": cv_s}, "ordinal": {"lambda": lam_o, "cv": cv_o}}
        log(f"{attr:13s} softmax {cv_s:.3f} (L2 {lam_s})  ordinal {cv_o:.3f} (L2 {lam_o})")
    return {"photos": len(raw["stems"]), "seeds": list(SEEDS), "attributes": rows,
            "machine": f"{platform.machine()} {platform.processor() or ''}".strip()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("study", choices=("views", "confidence", "ordinal"))
    ap.add_argument("--reader", default="models/attributes", help="the shipped reader's folder")
    ap.add_argument("--cache", required=True, help="the --cache folder of the format-8 or -9 fit")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    run = {"views": views_study, "confidence": confidence_study, "ordinal": ordinal_study}[args.study]
    out = run(Path(args.reader), Path(args.cache).expanduser())
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
