"""Face shape read from the photo: the parse's shape measures -> the continuous sliders.

The estimator's shape sliders are its weakest link to the person (validation: face aspect Spearman
0.23), while the shipped face parser's masks measure the same ratios well (Spearman with the true
masks on the validation photos: face aspect 0.77, eye area 0.60, mouth width 0.73, nose length 0.87).
So, like colours, shape can come from the photo:

  1. the parser's part map of the aligned crop -> ``fidelity.face_geometry`` measures (the parts
     mapped to CelebAMask-HQ classes by ``colour_match.parts_to_classes``);
  2. each measure mapped rank-preserving onto the renders' range: (value - photo mean) / photo sd
     * render sd + render mean, the photo statistics from the parses of the real TRAIN photos;
  3. the sliders solved from the *shape surrogate* (``training.estimator.real_labels.shape_surrogate``: linear
     from [sliders | one-hot options | 1] to each measure on the renders' masks), options fixed at
     the chosen ones: least squares in render sds plus ``prior`` x the squared change from the
     estimator's sliders (sliders the measures do not constrain stay as estimated), clipped to [0, 1].

The table (``shape.json`` in the estimator's bundle, made by ``likeness retrain``'s ``shape`` stage,
``training.readout.photo_shape``) holds the
surrogate's weights and both statistics; a table for another pack or schema is refused. Photos turned
away (|yaw| over ``MAX_YAW``) or missing an anchor keep the estimator's sliders for that measure.

**Hair amount** (the table's optional ``hair`` entry): the estimator's hairstyle follows the photo's
hair fraction only loosely (validation Spearman 0.71), the parse's closely (0.94 against the true
masks). So the hair slot's option is re-chosen: the parse's hair fraction is mapped by quantiles
(TRAIN photos' parses -> the renders' masks) into the renders' range, each option's hair fraction is
predicted by a linear surrogate of the same kind with every other choice and slider as estimated,
and the option maximising log P_estimator(option) + log N(target; predicted, sd) wins, sd combining
the surrogate's residual with the parse's own error (``photo_sd``: parse vs true mask on the TRAIN
photos, through the map's local slope): the photo decides the amount where it is sure, the
estimator's probabilities decide among options of similar amount. In case those probabilities are
over- or underconfident on real photos, they enter at a ``temperature`` fitted on the TRAIN photos
the estimator kept aside (``training.readout.photo_shape``: the hair-length ranks of their true
masks; 1 for the shipped model).

**Hair down the sides** (the table's optional ``hair_sides`` entry): options of one hair length
can differ in what a viewer sees first, whether hair falls beside the cheeks (a jaw-length cut)
or not (a top bun, a ponytail). The entry holds each option's share of hair in the cells beside the
cheeks (``side_hair``: rows 3-5 and columns 1 and 6 of an 8 x 8 grid of the aligned frame) on the
pack's renders; an option with at least ``OPTION_DOWN`` shows hair down. The photo's parse shows hair
down where its share is at least the entry's ``photo_down``, chosen on the TRAIN photos to agree best
with their true masks (``training.readout.photo_shape.hair_sides_entry``). The hairstyle is then
chosen among the options that agree with the photo, when any of those the reader allows does.
numpy only.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import fidelity
from .errors import UserError
from .colour_match import parts_to_classes
from .schema import Pack

SHAPE_FORMAT = 1
MAX_YAW = 0.15
SIDE_GRID, SIDE_ROWS, SIDE_COLS = 8, (3, 4, 5), (1, 6)
OPTION_DOWN = 0.3


def photo_measures(labels: np.ndarray, parts: Sequence[str]) -> dict[str, float | None]:
    """The shape measures of a parsed crop (None: missing anchor, or the face turned away)."""
    g = fidelity.face_geometry(parts_to_classes(labels, parts))
    if g.get("yaw") is None or abs(g["yaw"]) > MAX_YAW:
        return {m: None for m in fidelity.SHAPES}
    return {m: g[m] for m in fidelity.SHAPES}


class ShapeMatcher:
    """The fitted table of one pack: photo measures -> sliders."""

    def __init__(self, pack: Pack, table: Mapping[str, Any], source: str = "shape table"):
        if table.get("format", 0) > SHAPE_FORMAT:
            raise UserError(f"{source}: shape-table format {table.get('format')} is newer than this "
                            f"Likeness supports ({SHAPE_FORMAT}); update Likeness")
        if table.get("pack") != pack.id or table.get("schema") != pack.schema_hash:
            raise UserError(f"{source} is for pack {table.get('pack')} schema {table.get('schema')}, "
                            f"not pack {pack.id} schema {pack.schema_hash}: refit it "
                            "(likeness retrain, or python -m likeness.training.readout.photo_shape)")
        try:
            self.measures = tuple(table["measures"])
            self.W = np.asarray(table["weights"], np.float64)           # [F, M]
            self.render_mean = np.asarray(table["render_mean"], np.float64)
            self.render_sd = np.asarray(table["render_sd"], np.float64)
            self.photo_mean = np.asarray(table["photo_mean"], np.float64)
            self.photo_sd = np.asarray(table["photo_sd"], np.float64)
            self.prior = float(table.get("prior", 0.05))
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: malformed shape table ({type(e).__name__}: {e})") from None
        M = len(self.measures)
        F = pack.n_continuous + sum(pack.slot_sizes) + 1
        if self.W.shape != (F, M) or any(a.shape != (M,) for a in (
                self.render_mean, self.render_sd, self.photo_mean, self.photo_sd)):
            raise UserError(f"{source}: shape table sizes do not fit pack {pack.id}")
        if np.any(self.render_sd <= 0) or np.any(self.photo_sd <= 0) or self.prior <= 0:
            raise UserError(f"{source}: shape table has non-positive spreads or prior")
        self.pack, self.source = pack, source
        self.hair = _hair_entry(pack, table.get("hair"), F, source)
        self.sides = _sides_entry(pack, table.get("hair_sides"), source) if self.hair else None
        if self.sides is not None and self.sides["slot"] != self.hair["slot"]:
            raise UserError(f"{source}: the hair_sides entry is for another slot than the hair entry")

    def targets(self, measured: Mapping[str, float | None]) -> np.ndarray:
        """Render-range target of each measure (NaN where the photo has none)."""
        v = np.array([np.nan if measured.get(m) is None else measured[m] for m in self.measures])
        return self.render_mean + (v - self.photo_mean) / self.photo_sd * self.render_sd

    def fit(self, cont: np.ndarray, choice: Sequence[int], measured: Mapping[str, float | None]
            ) -> tuple[np.ndarray, list[str]]:
        """(sliders, measures used): ``cont`` (normalised [0, 1]) moved toward the photo's shape."""
        cont = np.asarray(cont, np.float64)
        t = self.targets(measured)
        use = np.isfinite(t)
        if not use.any():
            return cont.astype(np.float32), []
        P = len(cont)
        onehot = [np.eye(k)[c] for k, c in zip(self.pack.slot_sizes, choice)]
        fixed = np.concatenate([*onehot, [1.0]]) @ self.W[P:]                 # [M]
        A = self.W[:P, use].T / self.render_sd[use, None]                     # [m, P], in sds
        r = (t[use] - fixed[use]) / self.render_sd[use]
        x = np.linalg.solve(A.T @ A + self.prior * np.eye(P), A.T @ r + self.prior * cont)
        return np.clip(x, 0.0, 1.0).astype(np.float32), [m for m, u in zip(self.measures, use) if u]

    def choose_hair(self, cont: np.ndarray, choice: Sequence[int], probs: Sequence[np.ndarray],
                    hair_fraction: float | None, allowed: Mapping[int, np.ndarray] | None = None,
                    side_share: float | None = None) -> tuple[list[int], bool]:
        """(choice, changed): the hair slot's option re-chosen for the photo's hair fraction
        (parse pixels / frame) and, with a ``hair_sides`` entry, its hair beside the cheeks
        (``side_share``: ``side_hair`` of the parse); unchanged without a hair table or a measure.
        ``allowed``: slot index -> mask of the options the choice may take (the attribute
        reader's hair length)."""
        choice = list(choice)
        if self.hair is None or hair_fraction is None or not np.isfinite(hair_fraction):
            return choice, False
        h = self.hair
        t = float(np.interp(hair_fraction, h["photo_q"], h["render_q"]))
        # the parse's own error (photo units, measured on TRAIN photos) through the map's local slope
        i = int(np.clip(np.searchsorted(h["photo_q"], hair_fraction), 1, len(h["photo_q"]) - 1))
        dq = h["photo_q"][i] - h["photo_q"][i - 1]
        slope = (h["render_q"][i] - h["render_q"][i - 1]) / dq if dq > 0 else 0.0
        sd = float(np.hypot(h["sd"], slope * h["photo_sd"]))
        P = len(cont)
        onehot = [np.eye(k)[c] for k, c in zip(self.pack.slot_sizes, choice)]
        x = np.concatenate([np.asarray(cont, np.float64), *onehot, [1.0]])
        k, start = h["slot"], P + sum(self.pack.slot_sizes[:h["slot"]])
        base = x @ h["w"] - h["w"][start + choice[k]]          # every feature but the hair option
        pred = base + h["w"][start:start + self.pack.slot_sizes[k]]
        score = np.log(np.clip(np.asarray(probs[k], np.float64), 1e-6, 1.0)) / h["temperature"] \
            - 0.5 * ((t - pred) / sd) ** 2
        if allowed is not None and k in allowed and np.any(allowed[k]):
            score = np.where(allowed[k], score, -np.inf)
        if self.sides is not None and side_share is not None and np.isfinite(side_share):
            agree = self.sides["down"] == (side_share >= self.sides["photo_down"])
            if np.any(agree & np.isfinite(score)):
                score = np.where(agree, score, -np.inf)
        best = int(np.argmax(score))
        changed = best != choice[k]
        choice[k] = best
        return choice, changed


def _hair_entry(pack: Pack, entry, F: int, source: str) -> dict | None:
    """The table's optional hair entry, checked (None: the table has none)."""
    if entry is None:
        return None
    try:
        slot = [s.name for s in pack.slots].index(entry["slot"])
        out = {"slot": slot, "w": np.asarray(entry["weights"], np.float64),
               "sd": float(entry["resid_sd"]), "photo_sd": float(entry.get("photo_sd", 0.0)),
               "temperature": float(entry.get("temperature", 1.0)),
               "photo_q": np.asarray(entry["photo_quantiles"], np.float64),
               "render_q": np.asarray(entry["render_quantiles"], np.float64)}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: malformed hair entry ({type(e).__name__}: {e})") from None
    if (out["w"].shape != (F,) or out["sd"] <= 0 or out["photo_sd"] < 0 or out["temperature"] <= 0
            or out["photo_q"].shape != out["render_q"].shape
            or len(out["photo_q"]) < 2 or np.any(np.diff(out["photo_q"]) < 0)):
        raise UserError(f"{source}: hair entry sizes or quantiles do not fit pack {pack.id}")
    return out


def _sides_entry(pack: Pack, entry, source: str) -> dict | None:
    """The table's optional ``hair_sides`` entry, checked (None: the table has none)."""
    if entry is None:
        return None
    try:
        k = [s.name for s in pack.slots].index(entry["slot"])
        share = np.array([float(entry["options"][o.id]) for o in pack.slots[k].options])
        photo_down = float(entry["photo_down"])
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{source}: malformed hair_sides entry ({type(e).__name__}: {e})") from None
    if not (0.0 <= photo_down <= 1.0) or np.any((share < 0) | (share > 1)):
        raise UserError(f"{source}: hair_sides entry shares outside [0, 1]")
    return {"slot": k, "down": share >= OPTION_DOWN, "photo_down": photo_down}


def side_hair(hair: np.ndarray) -> float:
    """Share of hair in the cells beside the cheeks (``SIDE_ROWS`` x ``SIDE_COLS`` of a
    ``SIDE_GRID`` grid) of a boolean hair mask [H, W] of the aligned frame."""
    m = np.asarray(hair, np.float64)
    rows = np.array_split(np.arange(m.shape[0]), SIDE_GRID)
    cols = np.array_split(np.arange(m.shape[1]), SIDE_GRID)
    return float(np.mean([m[np.ix_(rows[r], cols[c])].mean() for r in SIDE_ROWS for c in SIDE_COLS]))


def photo_side_hair(labels: np.ndarray, parts: Sequence[str]) -> float | None:
    """``side_hair`` of the parse (None: the parser has no hair part)."""
    return side_hair(np.asarray(labels) == parts.index("hair")) if "hair" in parts else None


def photo_hair_fraction(labels: np.ndarray, parts: Sequence[str]) -> float | None:
    """Share of the aligned frame the parse calls hair (None: the parser has no hair part)."""
    return float((np.asarray(labels) == parts.index("hair")).mean()) if "hair" in parts else None


def load_shape_table(path: str | os.PathLike, pack: Pack) -> ShapeMatcher:
    try:
        table = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable shape table ({type(e).__name__}: {e})") from None
    return ShapeMatcher(pack, table, str(path))
