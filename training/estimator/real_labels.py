"""Partial avatar labels for the real TRAIN photos, from their parsing masks.

The estimator learns from synthetic pairs (full labels), but is judged on real photos by what
their masks say (``render_engine.validate_job``). The 744 real training photos (never the c-f
validation stems) carry the same measures, so they can label part of the avatar vector:

* presence -> "the slot carrying the tag is not none" (``fidelity.PRESENCE_TAGS``): glasses
  (eyeglasses class >= 0.2 % of the frame), headwear (hat >= 0.5 %), earrings, fringe (hair over
  the forehead band; no label when the face anchors are missing);
* hair amount -> the ``hair_length`` tag rank (bald 0, buzz 1, short 2, medium 3, long 4), see
  ``HAIR_LENGTH_THRESHOLDS``; no label when a hat hides the hair;
* colours -> the colour parameters whose *calibrated rendered* colour (``render_engine.
  calibration``) is nearest in CIEDE2000 to the photo's measured colour: a search over the
  calibrated grid of each region (hair: hair_color x hair_red x hair_grey; skin, lips, eyes: 1-D),
  upsampled by multilinear interpolation. Near-ties (within ``COLOUR_TIE_DE00``) go to the values
  the pack's sampling distributions find most likely (no red or grey tint unless the colour needs
  it). The hair table is the one of the photo's hair-length group (the per-style offsets of the
  calibration, weighted by option weight): long styles render darker than short ones. A colour
  that is missing, or whose best match is still over ``MAX_COLOUR_RESIDUAL`` away (out of the
  engine's gamut: dyed blue hair, a mask error), gives no label. The matching itself is
  ``backend.colour_match``, shared with the Predictor's photo colours.
* facial hair -> presence of a non-none ``facial_hair`` option, from the photo's pixels
  (``fidelity.facial_hair_cue``; the masks call beards skin);
* face shape -> target values of the mask shape measures (``fidelity.SHAPES_TARGETED``) that the
  avatar's render should show, scored through a *shape surrogate* (``shape_surrogate``): a linear
  model, fitted on engine renders, from the vector (continuous values + one-hot options) to each
  measure of the render's mask (held-out R^2 0.67-0.96 on the default pack). It is linear in the
  option probabilities too, so the estimator's softmax outputs get gradients. Photo measures are
  mapped rank-preserving onto the renders' range (mean and standard deviation matched), because
  validation scores rank agreement and real faces spread differently from the engine's; photos
  turned by more than ``SHAPE_MAX_YAW`` get no shape label (a frontal avatar cannot match them).

Everything is numpy. Arrays are cached under ``<cache>/arrays/`` keyed by the photos' files, the
pack's schema, the calibration's fingerprint, the image size and the rules here.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ...backend.cache import cache_root
from ...backend import fidelity, realfaces
# The colour matching (tables, prior, search, residual limit) is the backend's: the Predictor
# reads photo colours with the same code that labels the training photos.
from ...backend import colour_match
from ...backend.colour_match import (COLOUR_TIE_DE00, MAX_COLOUR_RESIDUAL, UPSAMPLE,  # noqa: F401
                                    colour_table, groups_by_hair_length, log_prior,
                                    match_colours, variant_weights)
from ...backend.errors import UserError
from ...backend.schema import TAG_VOCABULARY, Pack

LABELS_VERSION = 2

# Hair fraction (hair pixels / frame, photo at its aligned 512 px frame) -> hair_length rank.
# Boundaries bald|buzz|short|medium|long. Chosen on the 744 train photos (quantiles p5 0.059,
# p25 0.178, p50 0.311, p75 0.449, p95 0.553; 37 photos with a hat excluded) by looking at faces
# sorted by hair fraction: under ~0.02 shaved heads, 0.02-0.05 bald crowns with hair at the sides,
# 0.05-0.10 buzz cuts and receding short hair, 0.10-0.24 short men's cuts (and hair tied back),
# 0.24-0.40 voluminous short hair, bobs and shoulder-length hair, above ~0.40 long hair over the
# shoulders. The boundaries are soft (``HAIR_SOFTNESS``): the ordinal targets
# P(rank > k) = sigmoid(log(f / t_k) / softness), so a photo near a boundary pulls both ways.
HAIR_LENGTH_THRESHOLDS = (0.035, 0.10, 0.24, 0.40)
HAIR_SOFTNESS = 0.15          # in log hair fraction: 1.5x over a boundary -> 0.94
HAIR_EPS = 1e-3

SHAPE_MAX_YAW = 0.15          # |yaw| over this: no shape label (about the 90th percentile)
SHAPE_RIDGE = 1e-2            # ridge of the surrogate's least squares
SHAPE_MIN_R2 = 0.5            # measures the surrogate predicts worse than this get no label


def _arrays_dir(cache_dir: str | os.PathLike | None) -> Path:
    return Path(cache_dir) if cache_dir else cache_root() / "arrays"


# --------------------------------------------------------------------------------------------
# Hair length
# --------------------------------------------------------------------------------------------

def split_rows(n: int, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train / held-out rows of n labelled photos: the estimator never trains on the held-out ones
    (``EstimatorConfig.real_held_out``), so they can calibrate what it says about real photos."""
    perm = np.random.default_rng(seed + 7_919).permutation(n)
    k = int(round(n * held_out)) if n > 1 else 0
    return np.sort(perm[k:]), np.sort(perm[:k])


def hair_rank_of_fraction(fraction: float | np.ndarray) -> np.ndarray:
    """Hard hair_length rank (0 bald ... 4 long) of photo hair fractions."""
    f = np.asarray(fraction, dtype=np.float64)
    return np.searchsorted(np.asarray(HAIR_LENGTH_THRESHOLDS), f, side="right").astype(np.int64)


def hair_cumulative_targets(fraction: float | np.ndarray) -> np.ndarray:
    """Soft ordinal targets [..., 4]: P(rank > k) for k = 0..3."""
    f = np.asarray(fraction, dtype=np.float64)[..., None]
    t = np.asarray(HAIR_LENGTH_THRESHOLDS)
    z = (np.log(f + HAIR_EPS) - np.log(t + HAIR_EPS)) / HAIR_SOFTNESS
    return (1.0 / (1.0 + np.exp(-z))).astype(np.float32)


# --------------------------------------------------------------------------------------------
# What the labels mean for a pack's outputs (used by the loss)
# --------------------------------------------------------------------------------------------

def loss_spec(pack: Pack, colour_params: Sequence[str] = ()) -> dict[str, Any]:
    """How the labels meet the estimator's outputs:

    ``presence``: [(name, slot index, bool mask of the slot's options whose tag is not none)] for
    each ``fidelity.PRESENCE`` measure the pack has a tagged slot for; ``hair``: (slot index,
    int rank per option, -1 untagged) or None; ``colour_index``: continuous column of each colour
    parameter."""
    presence = []
    for name in fidelity.PRESENCE:
        tag = fidelity.PRESENCE_TAGS[name]
        slots = pack.slots_with_tag(tag)
        if not slots:
            continue
        k = pack.slot_names.index(slots[0])
        s = pack.slots[k]
        not_none = np.array([o.tags.get(tag, "none") != "none" for o in s.options])
        presence.append((name, k, not_none))
    hair = None
    slots = pack.slots_with_tag("hair_length")
    if slots:
        k = pack.slot_names.index(slots[0])
        order = TAG_VOCABULARY["hair_length"]
        ranks = np.array([order.index(o.tags["hair_length"]) if o.tags.get("hair_length") in order
                          else -1 for o in pack.slots[k].options], np.int64)
        hair = (k, ranks)
    return {"presence": presence, "hair": hair,
            "colour_index": np.array([pack.param_names.index(n) for n in colour_params], np.int64)}


# --------------------------------------------------------------------------------------------
# The shape surrogate: vector -> mask shape measures of its render, linear, fitted on renders
# --------------------------------------------------------------------------------------------

def vector_features(pack: Pack, cont: Sequence[float], choice: Sequence[int]) -> np.ndarray:
    """[continuous (normalised) | one-hot options of every slot | 1]: the surrogate's input."""
    onehot = [np.eye(k, dtype=np.float64)[c] for k, c in zip(pack.slot_sizes, choice)]
    return np.concatenate([np.asarray(cont, np.float64), *onehot, [1.0]])


def mask_measures(mask: np.ndarray) -> dict[str, float | None]:
    """What a surrogate can model on a mask: ``fidelity.face_geometry`` and the hair fraction."""
    g = dict(fidelity.face_geometry(mask))
    g["hair_fraction"] = float((np.asarray(mask) == fidelity.C["hair"]).mean())
    return g


def shape_surrogate(pack: Pack, renders: str | os.PathLike, limit: int = 3000, *,
                    cache: bool = True, cache_dir: str | os.PathLike | None = None,
                    log: Callable[[str], Any] = lambda s: None,
                    measures: Sequence[str] = fidelity.SHAPES_TARGETED) -> dict[str, Any]:
    """Fit, on an engine render dataset (``likeness render``: masks/, vectors/), a linear model
    from ``vector_features`` to each of ``measures`` (``mask_measures``) on the render's mask.
    Plain JSON: ``measures``, ``weights`` [F][M], render ``mean`` / ``sd`` per measure, held-out
    ``r2`` and residual ``resid_sd`` (fit on 80 %, scored on 20 %, then refitted on all), ``n``."""
    from PIL import Image
    root = Path(renders)
    names = sorted(p.stem for p in (root / "masks").glob("*.png"))[:limit]
    names = [n for n in names if (root / "vectors" / f"{n}.json").is_file()]
    if len(names) < 50:
        raise UserError(f"{root}: {len(names)} rendered samples with masks and vectors; the shape "
                        "surrogate needs at least 50 (render more with `likeness render`)")
    measures = tuple(measures)
    key_parts = [pack.id, pack.schema_hash, names[0], names[-1], len(names), SHAPE_RIDGE]
    if measures != fidelity.SHAPES_TARGETED:
        key_parts.append(list(measures))
    h = hashlib.sha256(json.dumps(key_parts).encode())
    for f in (root / "manifest.json", Path(fidelity.__file__), Path(__file__)):
        if f.is_file():
            h.update(f.read_bytes())
    key = h.hexdigest()[:20]
    path = _arrays_dir(cache_dir) / f"shapesurrogate-{pack.id}-{key}.json"
    if cache and path.is_file():
        return json.loads(path.read_text())
    t0 = time.monotonic()
    X, Y = [], []
    for n in names:
        data = json.loads((root / "vectors" / f"{n}.json").read_text())
        vec = pack.vector_from_json(data.get("vector", data))
        with Image.open(root / "masks" / f"{n}.png") as im:
            g = mask_measures(np.asarray(im))
        X.append(vector_features(pack, *vec.to_arrays()))
        Y.append([np.nan if g[m] is None else g[m] for m in measures])
    X, Y = np.asarray(X), np.asarray(Y, np.float64)
    ridge = SHAPE_RIDGE * np.eye(X.shape[1])
    ridge[-1, -1] = 0.0                                        # the intercept is not shrunk
    weights = np.zeros((X.shape[1], len(measures)))
    r2, mean, sd, resid_sd = [], [], [], []
    for j in range(len(measures)):
        ok = np.isfinite(Y[:, j])
        x, y = X[ok], Y[ok, j]
        cut = int(0.8 * len(y))
        w = np.linalg.solve(x[:cut].T @ x[:cut] + ridge, x[:cut].T @ y[:cut])
        res = y[cut:] - x[cut:] @ w
        r2.append(float(1 - (res ** 2).sum() / max(((y[cut:] - y[cut:].mean()) ** 2).sum(), 1e-12)))
        resid_sd.append(float(res.std()))
        weights[:, j] = np.linalg.solve(x.T @ x + ridge, x.T @ y)
        mean.append(float(y.mean()))
        sd.append(float(y.std()))
    out = {"pack": pack.id, "schema": pack.schema_hash, "measures": list(measures),
           "weights": weights.tolist(), "mean": mean, "sd": sd, "r2": r2, "resid_sd": resid_sd,
           "n": len(names),
           "renders": str(root), "fingerprint": key}
    log(f"shape surrogate: {len(names)} renders in {time.monotonic() - t0:.0f} s, held-out R^2 "
        + ", ".join(f"{m} {r:.2f}" for m, r in zip(measures, r2)))
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, path)
    return out


def shape_targets(stats: Sequence[Mapping[str, Any]], surrogate: Mapping[str, Any]
                  ) -> tuple[tuple[str, ...], np.ndarray, np.ndarray, dict]:
    """Per photo, the render measure its avatar should show for each measure the surrogate
    predicts well (R^2 >= ``SHAPE_MIN_R2``): the photo's measure mapped onto the renders' mean
    and standard deviation (rank-preserving). Returns (names, target [N, M], valid [N, M], the
    surrogate's columns for those names)."""
    keep = [j for j, r in enumerate(surrogate["r2"]) if r >= SHAPE_MIN_R2]
    names = tuple(surrogate["measures"][j] for j in keep)
    n = len(stats)
    target = np.zeros((n, len(keep)), np.float32)
    valid = np.zeros((n, len(keep)), bool)
    for c, j in enumerate(keep):
        m = names[c]
        vals = np.array([np.nan if st.get(m) is None else st[m] for st in stats], np.float64)
        frontal = np.array([st.get("yaw") is not None and abs(st["yaw"]) <= SHAPE_MAX_YAW
                            for st in stats])
        ok = np.isfinite(vals) & frontal
        if ok.sum() < 10:
            continue
        mu, sd = vals[ok].mean(), max(vals[ok].std(), 1e-9)
        target[ok, c] = surrogate["mean"][j] + (vals[ok] - mu) / sd * surrogate["sd"][j]
        valid[ok, c] = True
    W = np.asarray(surrogate["weights"], np.float64)[:, keep]
    cols = {"measures": list(names), "weights": W.tolist(),
            "sd": [surrogate["sd"][j] for j in keep], "r2": [surrogate["r2"][j] for j in keep],
            "fingerprint": surrogate.get("fingerprint")}
    return names, target, valid, cols


# --------------------------------------------------------------------------------------------
# The labels
# --------------------------------------------------------------------------------------------

@dataclass
class RealLabels:
    """Real photos with partial labels. Row i of every array is ``stems[i]``.

    images uint8 [N, S, S, 3]; presence / presence_valid [N, P] (``presence_names``);
    hair_fraction [N], hair_rank [N] (-1 = no label), hair_cum [N, 4] soft P(rank > k),
    hair_valid [N]; colour_target [N, C] in normalised units, colour_valid [N, C]
    (``colour_params``, ``colour_regions``); photo_lab / matched_lab [N, R, 3] (NaN = none),
    residual [N, R] dE00 of the match (``regions``); shape_target / shape_valid [N, M] the render
    measures the avatar should show (``shape_names``, scored through the shape surrogate)."""
    stems: list[str]
    images: np.ndarray
    presence_names: tuple[str, ...]
    presence: np.ndarray
    presence_valid: np.ndarray
    hair_fraction: np.ndarray
    hair_rank: np.ndarray
    hair_cum: np.ndarray
    hair_valid: np.ndarray
    colour_params: tuple[str, ...]
    colour_regions: tuple[str, ...]
    colour_target: np.ndarray
    colour_valid: np.ndarray
    regions: tuple[str, ...]
    photo_lab: np.ndarray
    matched_lab: np.ndarray
    residual: np.ndarray
    shape_names: tuple[str, ...] = ()
    shape_target: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    shape_valid: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), bool))
    key: str = ""
    info: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.stems)

    def content_key(self) -> str:
        """A digest of what the labels say (every array and name, not the code that made them):
        a code edit that leaves the labels as they were keeps a training run on them resumable."""
        h = hashlib.sha256()
        for f in fields(self):
            if f.name in ("key", "info"):
                continue
            value = getattr(self, f.name)
            if isinstance(value, np.ndarray):
                h.update(f"{f.name}{value.dtype}{value.shape}".encode())
                h.update(np.ascontiguousarray(value).tobytes())
            else:
                h.update(json.dumps([f.name, list(value)]).encode())
        return h.hexdigest()[:20]

    @property
    def size(self) -> int:
        return int(self.images.shape[1])

    def split(self, held_out: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """Train / held-out rows of these (already training-split) photos."""
        return split_rows(len(self), held_out, seed)

    def positive_fraction(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Per presence measure, the fraction of valid labels that are positive."""
        rows = np.arange(len(self)) if rows is None else rows
        v = self.presence_valid[rows]
        return (self.presence[rows] * v).sum(0) / np.maximum(v.sum(0), 1)

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"n": len(self), "size": self.size, "presence": {}, "colour": {}}
        for j, name in enumerate(self.presence_names):
            v = self.presence_valid[:, j]
            out["presence"][name] = {"valid": int(v.sum()), "positive": int(self.presence[v, j].sum())}
        order = TAG_VOCABULARY["hair_length"]
        ranks = self.hair_rank[self.hair_valid]
        out["hair_length"] = {order[r]: int((ranks == r).sum()) for r in range(len(order))}
        out["hair_length"]["no label"] = int((~self.hair_valid).sum())
        for j, name in enumerate(self.colour_params):
            v = self.colour_valid[:, j]
            t = self.colour_target[v, j]
            out["colour"][name] = {
                "valid": int(v.sum()),
                "percentiles_5_25_50_75_95": np.percentile(t, [5, 25, 50, 75, 95]).round(3).tolist()
                if len(t) else None}
        out["residual_de00"] = {}
        for r, name in enumerate(self.regions):
            res = self.residual[:, r]
            res = res[np.isfinite(res)]
            out["residual_de00"][name] = {
                "n": int(len(res)),
                "median": float(np.median(res)) if len(res) else None,
                "p90": float(np.percentile(res, 90)) if len(res) else None,
                f"over_{MAX_COLOUR_RESIDUAL:g}": int((res > MAX_COLOUR_RESIDUAL).sum())}
        return out


def file_sig(root: Path, stems: Sequence[str]) -> str:
    h = hashlib.sha256()
    for s in stems:
        for p in (root / "images" / f"{s}.jpg", root / "masks" / f"{s}.png"):
            st = p.stat()
            h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:20]


def _decode_image(path: Path, size: int) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        im.draft("RGB", (size, size))
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.LANCZOS)
        return np.asarray(im, dtype=np.uint8)


def photo_stats(root: Path, stems: Sequence[str], cache: bool = True,
                log: Callable[[str], Any] = lambda s: None,
                cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """``fidelity.mask_stats`` of every photo at its own resolution (what validation measures),
    cached as JSON (numbers only, no pixels)."""
    h = hashlib.sha256()
    h.update(file_sig(root, stems).encode())
    h.update(Path(fidelity.__file__).read_bytes())
    path = _arrays_dir(cache_dir) / f"realstats-{len(stems)}-{h.hexdigest()[:20]}.json"
    if cache and path.is_file():
        return json.loads(path.read_text())
    t0 = time.monotonic()
    keep = (*fidelity.PRESENCE, "hair_fraction", *fidelity.COLOURS, *fidelity.SHAPES, "yaw")
    out = []
    for s in stems:
        rgb, mask = realfaces.load_pair(s, root)
        st = fidelity.mask_stats(mask, rgb)
        out.append({k: (list(st[k]) if isinstance(st[k], tuple) else st[k]) for k in keep})
    log(f"real labels: measured {len(stems)} photo masks in {time.monotonic() - t0:.0f} s")
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(out))
        os.replace(tmp, path)
    return out


def photo_images(root: Path, stems: Sequence[str], size: int, cache: bool = True,
                 cache_dir: str | os.PathLike | None = None) -> np.ndarray:
    """uint8 [N, size, size, 3], cached as a memory-mappable .npy."""
    path = _arrays_dir(cache_dir) / f"realimg-{size}-{len(stems)}-{file_sig(root, stems)}.npy"
    if cache and path.is_file():
        return np.load(path, mmap_mode="r")
    imgs = np.stack([_decode_image(root / "images" / f"{s}.jpg", size) for s in stems]) \
        if stems else np.zeros((0, size, size, 3), np.uint8)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.stem + f".tmp{os.getpid()}.npy")
        np.save(tmp, imgs)
        os.replace(tmp, path)
        return np.load(path, mmap_mode="r")
    return imgs


def _labels_key(pack: Pack, calibration: Mapping[str, Any], root: Path, stems: Sequence[str],
                size: int, shapes_key: str | None = None) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([LABELS_VERSION, pack.id, pack.schema_hash, calibration.get("fingerprint"),
                         shapes_key, size, HAIR_LENGTH_THRESHOLDS, HAIR_SOFTNESS, COLOUR_TIE_DE00,
                         MAX_COLOUR_RESIDUAL, UPSAMPLE]).encode())
    h.update(file_sig(root, stems).encode())
    h.update(Path(__file__).read_bytes())
    h.update(Path(fidelity.__file__).read_bytes())
    h.update(Path(colour_match.__file__).read_bytes())
    return h.hexdigest()[:20]


def real_partial_labels(pack: Pack, calibration: Mapping[str, Any], split: str = "train",
                        size: int = 128, *, root: str | os.PathLike | None = None,
                        limit: int | None = None, stems: Sequence[str] | None = None,
                        cache: bool = True, cache_dir: str | os.PathLike | None = None,
                        shapes: Mapping[str, Any] | None = None,
                        log: Callable[[str], Any] = lambda s: None) -> RealLabels:
    """Partial labels of the real training photos for ``pack`` (see the module notes).

    ``calibration``: ``render_engine.calibration.calibrate_colours(pack)`` (plain JSON; made in
    Blender, used here without it). ``split`` must be "train": the validation photos are never
    labelled for training. ``limit``: the first N training photos only; ``stems``: these
    training photos only (tests). ``cache_dir``: where the arrays go (default
    ``<cache>/arrays``). ``shapes``: a ``shape_surrogate`` of the pack; without it, no shape
    labels."""
    if split != "train":
        raise UserError(f"real labels are for training: split must be 'train', not '{split}' "
                        "(the validation photos, stems c-f, are never trained on)")
    if shapes is not None and (shapes.get("pack") != pack.id or shapes.get("schema") != pack.schema_hash):
        raise UserError(f"the shape surrogate is for pack '{shapes.get('pack')}' schema "
                        f"{shapes.get('schema')}, not '{pack.id}' {pack.schema_hash}: refit it "
                        "(training.estimator.real_labels.shape_surrogate)")
    colour_match.check_calibration(calibration, pack)
    root = Path(root) if root else realfaces.default_root()
    train = realfaces.stems(root, split="train")
    if stems is not None:
        stems = list(stems)
        bad = [s for s in stems if realfaces.is_validation(s) or s not in set(train)]
        if bad:
            raise UserError(f"not real training photos: {', '.join(bad[:5])} (validation stems "
                            "c-f are never labelled for training)")
    else:
        stems = train
    if limit:
        stems = stems[:limit]
    if any(realfaces.is_validation(s) for s in stems):          # the split rule, enforced twice
        raise UserError("a validation photo reached the real training labels")
    if not stems:
        raise UserError(f"no real training photos in {root}")
    key = _labels_key(pack, calibration, root, stems, size,
                      shapes.get("fingerprint") if shapes is not None else None)
    lab_path = _arrays_dir(cache_dir) / f"reallabels-{pack.id}-{size}-{key}.npz"
    images = photo_images(root, stems, size, cache, cache_dir)
    if cache and lab_path.is_file():
        z = np.load(lab_path, allow_pickle=False)
        meta = json.loads(str(z["meta"]))
        if meta["stems"] == list(stems):
            return RealLabels(stems=list(stems), images=images,
                              **{k: tuple(meta[k]) for k in ("presence_names", "colour_params",
                                                             "colour_regions", "regions",
                                                             "shape_names")},
                              **{k: z[k] for k in z.files if k != "meta"}, key=key,
                              info=meta["info"])
    t0 = time.monotonic()
    stats = photo_stats(root, stems, cache, log, cache_dir)
    n = len(stems)
    spec = loss_spec(pack)

    # presence
    names = tuple(p[0] for p in spec["presence"])
    presence = np.zeros((n, len(names)), np.float32)
    pvalid = np.zeros((n, len(names)), bool)
    for i, st in enumerate(stats):
        for j, name in enumerate(names):
            if st.get(name) is not None:
                presence[i, j] = float(bool(st[name]))
                pvalid[i, j] = True

    # hair amount
    frac = np.array([st["hair_fraction"] for st in stats], np.float64)
    hat = np.array([bool(st.get("headwear")) for st in stats])
    hvalid = ~hat & np.isfinite(frac)
    hrank = np.where(hvalid, hair_rank_of_fraction(np.nan_to_num(frac)), -1)
    hcum = hair_cumulative_targets(np.nan_to_num(frac))

    # colours
    regions = tuple(r for r in fidelity.COLOURS if r in calibration["regions"])
    cparams: list[str] = []
    cregions: list[str] = []
    for r in regions:
        for name in calibration["regions"][r]["params"]:
            cparams.append(name)
            cregions.append(r)
    ctarget = np.zeros((n, len(cparams)), np.float32)
    cvalid = np.zeros((n, len(cparams)), bool)
    photo_lab = np.full((n, len(regions), 3), np.nan, np.float32)
    matched = np.full((n, len(regions), 3), np.nan, np.float32)
    residual = np.full((n, len(regions)), np.nan, np.float32)
    order = TAG_VOCABULARY["hair_length"]
    for ri, r in enumerate(regions):
        have = np.array([st.get(r) is not None for st in stats])
        if not have.any():
            continue
        lab = np.array([st[r] if st.get(r) is not None else (0.0, 0.0, 0.0) for st in stats])
        photo_lab[have, ri] = lab[have]
        # which table each photo is matched on: by hair-length group when the region's variant
        # slot is tagged with it, else one table mixing every option by its weight
        groups = np.full(n, -1)
        if groups_by_hair_length(pack, calibration, r):
            groups = np.where(hvalid, hrank, -1)
        for g in np.unique(groups):
            rows = np.nonzero(have & (groups == g))[0]
            if not len(rows):
                continue
            weights = variant_weights(pack, calibration, r, order[g] if g >= 0 else None)
            params, axes, table = colour_table(calibration, r, option_weights=weights)
            prior = log_prior(pack, params, axes)
            idx, de = match_colours(lab[rows], table, prior)
            grid_idx = np.unravel_index(idx, table.shape[:-1])
            matched[rows, ri] = table.reshape(-1, 3)[idx]
            residual[rows, ri] = de
            ok = de <= MAX_COLOUR_RESIDUAL
            for k, name in enumerate(params):
                j = cparams.index(name)
                ctarget[rows, j] = axes[k][grid_idx[k]]
                cvalid[rows, j] = ok
    # face shape, through the surrogate
    snames: tuple[str, ...] = ()
    starget = np.zeros((n, 0), np.float32)
    svalid = np.zeros((n, 0), bool)
    info = {"seconds": 0.0, "root": str(root), "calibration": calibration.get("fingerprint"),
            "thresholds": list(HAIR_LENGTH_THRESHOLDS)}
    if shapes is not None:
        snames, starget, svalid, info["shape_surrogate"] = shape_targets(stats, shapes)
    info["seconds"] = round(time.monotonic() - t0, 1)
    labels = RealLabels(
        stems=list(stems), images=images, presence_names=names, presence=presence,
        presence_valid=pvalid, hair_fraction=frac.astype(np.float32), hair_rank=hrank.astype(np.int64),
        hair_cum=hcum, hair_valid=hvalid, colour_params=tuple(cparams),
        colour_regions=tuple(cregions), colour_target=ctarget, colour_valid=cvalid,
        regions=regions, photo_lab=photo_lab, matched_lab=matched, residual=residual,
        shape_names=snames, shape_target=starget, shape_valid=svalid, key=key, info=info)
    log(f"real labels: {n} photos labelled in {info['seconds']} s")
    if cache:
        meta = {"stems": list(stems), "presence_names": list(names), "colour_params": cparams,
                "colour_regions": cregions, "regions": list(regions), "shape_names": list(snames),
                "info": info}
        arrays = {k: getattr(labels, k) for k in (
            "presence", "presence_valid", "hair_fraction", "hair_rank", "hair_cum", "hair_valid",
            "colour_target", "colour_valid", "photo_lab", "matched_lab", "residual",
            "shape_target", "shape_valid")}
        lab_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = lab_path.with_name(lab_path.stem + f".tmp{os.getpid()}.npz")
        np.savez(tmp, meta=np.array(json.dumps(meta)), **arrays)
        os.replace(tmp, lab_path)
    return labels
