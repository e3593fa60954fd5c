"""Fidelity measures: how well an avatar matches the real photo it was made from.

One implementation for validation during training and for the evaluation harness. Both sides
are measured the same way, from a CelebAMask-HQ label map and its RGB image in the SAME aligned
frame: the photo (its parsing mask) and the avatar render (its segmentation pass).

Per image, ``mask_stats`` gives
  * presence: glasses, headwear (hat), earrings, fringe (hair over the forehead);
  * robust mean colours in CIELAB: hair, skin, lips, eyes (None when absent or too few pixels);
  * hair amount: hair pixels / frame pixels;
  * shape: face width and height, their aspect, eye area / face area, mouth width / face width,
    nose length / face height (see ``face_geometry``).
Across a set of (photo, avatar) pairs, ``compare`` scores presence by balanced accuracy, colours
by CIEDE2000 (median and 90th percentile, beside a constant predictor) and amounts and shapes
by Spearman rank correlation. ``check_targets`` holds a report against ``TARGETS``.

Avatar presence may come from the avatar's attribute tags instead of its mask
(``avatar_stats(..., vector=v)`` or ``apply_tags``): "the chosen glasses option's tag is not none".

numpy only (no scipy, no torch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from .colour import ciede2000, hex_to_lab, srgb_to_lab
from .errors import UserError
from .schema import CLASS_IDS, TAG_VOCABULARY

# ------------------------------------------------------------------------------------------------
# Classes and thresholds (fractions of the frame, so they hold at any render resolution)
# ------------------------------------------------------------------------------------------------

C = CLASS_IDS
FACE_CLASSES = (C["skin"], C["nose"], C["l_eye"], C["r_eye"], C["l_brow"], C["r_brow"],
                C["mouth"], C["u_lip"], C["l_lip"])
EYE_CLASSES = (C["l_eye"], C["r_eye"])
BROW_CLASSES = (C["l_brow"], C["r_brow"])
MOUTH_CLASSES = (C["mouth"], C["u_lip"], C["l_lip"])
LIP_CLASSES = (C["u_lip"], C["l_lip"])

# Presence: class pixels / frame pixels at or above these. On the 1,000 real masks the smallest
# glasses region is 1.6 % of the frame and the smallest hat 2.9 %; earrings run down to a few
# dozen pixels at 512 x 512, so their threshold only rejects isolated specks.
PRESENCE_THRESHOLDS = {"glasses": 2e-3, "headwear": 5e-3, "earrings": 1e-4}
PRESENCE_CLASSES = {"glasses": (C["eyeglasses"],), "headwear": (C["hat"],),
                    "earrings": (C["earring"],)}
PRESENCE = ("glasses", "headwear", "earrings", "fringe", "facial_hair")
# Avatar-side tag for each presence measure (schema TAG_VOCABULARY); present = tag is not "none".
PRESENCE_TAGS = {"glasses": "glasses", "headwear": "headwear", "earrings": "earrings",
                 "fringe": "bangs", "facial_hair": "facial_hair"}

# Facial hair: CelebAMask-HQ labels beards as skin, so the photo's pixels decide (see
# ``facial_hair_cue``). Regions in D (eye-to-mouth distance) around the face centre: the lower
# face (from just above the mouth to the chin) against the cheeks under the eyes. Thresholds
# chosen by looking at the 744 training faces sorted by each cue: a beard or moustache makes the
# lower face darker (dL, CIELAB L*), less saturated than skin (dC, chroma) and more textured
# (ratio of median |Laplacian of L*|); shadows under the chin darken too but keep skin's chroma
# and smoothness. Between the two rules the photo gets no label (None): stubble and shadows.
BEARD_LOW = (-0.45, 0.75)         # rows from mouth_y - 0.45 D to the chin; |x - centre| <= 0.75 D
BEARD_REF = (0.20, 0.55, 0.25, 0.80)  # cheeks: rows eye_y + 0.2..0.55 D, |x - centre| 0.25..0.8 D
BEARD_MIN_PIXELS = 50             # at 512 px; scaled with the frame area
BEARD_YES = ((15.0, 1.5, 1.1), (10.0, 0.0, 2.0))   # (dL >=, dC >=, texture >=): either rule
BEARD_NO = (12.0, 1.5)            # dL < and texture <: clean-shaven

# Colours: which classes, which lightness percentiles are kept (the rest are speculars, shadows,
# or for eyes the sclera), how far the region is eroded first (edge pixels mix with neighbours).
@dataclass(frozen=True)
class ColourRule:
    classes: tuple[int, ...]
    l_lo: float = 10.0
    l_hi: float = 90.0
    erode: int = 1


COLOUR_RULES = {
    "hair": ColourRule((C["hair"],), 10.0, 90.0, erode=2),
    "skin": ColourRule((C["skin"],), 10.0, 90.0, erode=2),
    "lips": ColourRule(LIP_CLASSES, 10.0, 90.0, erode=1),
    # Iris and pupil, not the white of the eye: the darker half of the eye pixels.
    "eyes": ColourRule(EYE_CLASSES, 5.0, 50.0, erode=0),
}
COLOURS = tuple(COLOUR_RULES)
MIN_COLOUR_FRACTION = 1e-4   # at least this fraction of the frame (26 px at 512^2) ...
MIN_COLOUR_PIXELS = 16       # ... and at least this many pixels, after trimming

# Fringe: a band across the forehead just above the brows (see ``fringe_band``).
FRINGE_BAND = (0.05, 0.45)   # from 0.05 D to 0.45 D above the brows, D = eye-to-mouth distance
FRINGE_THRESHOLD = 0.35      # hair pixels / band pixels at or above this: fringe
BROW_ABOVE_EYE = 0.30        # brow top above the eye line, in D, when no brow is visible (median
                             # over the training faces)

FACE_HALF_SPAN = 1.5          # face pixels count within centre +- this x D (widest real faces:
                              # about 1.3 D either side)

SHAPES = ("face_width", "face_height", "face_aspect", "eye_area_ratio", "mouth_width_ratio",
          "nose_length_ratio")
# Scale-free shape measures held to a target; width and height alone depend on how each side is
# framed (photo alignment vs avatar camera), so they are reported but not targeted.
SHAPES_TARGETED = ("face_aspect", "eye_area_ratio", "mouth_width_ratio", "nose_length_ratio")
AMOUNTS = ("hair_fraction",)


# ------------------------------------------------------------------------------------------------
# Small image helpers
# ------------------------------------------------------------------------------------------------

def _check_pair(mask: np.ndarray, rgb: np.ndarray | None) -> tuple[np.ndarray, np.ndarray | None]:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise UserError(f"label map must be 2-D (H, W), got shape {mask.shape}")
    if not np.issubdtype(mask.dtype, np.integer) or (mask.size and mask.min() < 0):
        raise UserError(f"label map must hold non-negative integer class ids, got {mask.dtype}")
    if rgb is not None:
        rgb = np.asarray(rgb)
        if rgb.ndim != 3 or rgb.shape[2] < 3 or rgb.shape[:2] != mask.shape:
            raise UserError(f"image shape {rgb.shape} does not match label map {mask.shape} "
                            f"(expected (H, W, 3))")
        rgb = rgb[..., :3]
    return mask, rgb


def _isin(mask: np.ndarray, classes: Sequence[int]) -> np.ndarray:
    return np.isin(mask, np.asarray(classes, dtype=mask.dtype))


def erode(region: np.ndarray, iterations: int = 1, square: bool = True) -> np.ndarray:
    """Binary erosion with a 3x3 square (``square=False``: the 4-neighbour cross); pixels outside
    the frame count as outside."""
    out = np.asarray(region, dtype=bool)
    steps = [(dy, dx) for dy in (0, 1, 2) for dx in (0, 1, 2) if square or dy == 1 or dx == 1]
    for _ in range(iterations):
        p = np.pad(out, 1, constant_values=False)
        h, w = out.shape
        acc = p[1:h + 1, 1:w + 1].copy()
        for dy, dx in steps:
            acc &= p[dy:dy + h, dx:dx + w]
        out = acc
    return out


def robust_colour(rgb: np.ndarray, region: np.ndarray, rule: ColourRule,
                  min_pixels: int = MIN_COLOUR_PIXELS) -> tuple[float, float, float] | None:
    """Median CIELAB colour of ``region`` after erosion and a lightness trim; None if too small.

    The region is eroded by ``rule.erode`` pixels (kept un-eroded if erosion leaves too few), the
    pixels outside the [l_lo, l_hi] percentiles of L* are dropped (speculars, deep shadows), and
    the per-channel median of the rest is returned.
    """
    region = np.asarray(region, dtype=bool)
    if region.sum() < min_pixels:
        return None
    core = erode(region, rule.erode) if rule.erode else region
    if core.sum() < min_pixels:
        core = region
    lab = srgb_to_lab(rgb[core])
    L = lab[:, 0]
    lo, hi = np.percentile(L, [rule.l_lo, rule.l_hi])
    keep = (L >= lo) & (L <= hi)
    if keep.sum() < min_pixels // 2 or keep.sum() == 0:
        keep = np.ones_like(L, dtype=bool)
    med = np.median(lab[keep], axis=0)
    return float(med[0]), float(med[1]), float(med[2])


# ------------------------------------------------------------------------------------------------
# Face geometry
# ------------------------------------------------------------------------------------------------

def _centroid(region: np.ndarray) -> tuple[float, float] | None:
    ys, xs = np.nonzero(region)
    if len(ys) == 0:
        return None
    return float(ys.mean()), float(xs.mean())


def face_geometry(mask: np.ndarray, min_pixels: int = 8) -> dict[str, Any]:
    """Landmarks and shape measures of the face region, robust to hair over the forehead.

    Face region = skin, nose, eyes, brows, mouth and lips (not ears, neck, glasses, hair).
    Anchors (pixel rows/columns, y down):
      * eye line ``eye_y`` = mean centroid row of the visible eyes (the glasses region's centroid
        when no eye is visible, e.g. sunglasses); ``eye_x`` the eye centroid columns;
      * ``mouth_y`` = centroid row of mouth + lips; ``D`` = mouth_y - eye_y;
      * ``chin_y`` = lowest face row, the median of per-column bottoms over the central columns
        (centre +- D/4);
      * ``nose_bottom`` = lowest nose row (98th percentile of nose rows).
      * ``yaw`` = (nose centroid column - eye midpoint) / interocular distance: a head-turn
        proxy for filtering (0 frontal; over the validation faces |yaw| has median 0.03 and
        90th percentile 0.13; None when an eye is hidden, as in profiles).
    Measures (None when an anchor is missing):
      * ``face_width``: 90th percentile of the per-row extents (leftmost to rightmost face pixel)
        over the rows from eye line to mouth line -- hair across the cheek rarely changes an
        extent, and the percentile picks the least occluded rows; only face pixels within
        ``FACE_HALF_SPAN * D`` of the centre count (a hand beside the face is labelled skin);
        fraction of frame width;
      * ``face_height``: chin_y - eye_y (the forehead top is where the hair starts, so it is not
        used); fraction of frame height;
      * ``face_aspect``: width / height in pixels;
      * ``eye_area_ratio``: eye pixels / (width x height box), both eyes (twice the visible one
        when one is hidden); the box, not the face pixel count, because hair over the forehead
        shrinks the pixel count;
      * ``mouth_width_ratio``: horizontal extent of mouth + lips / face width;
      * ``nose_length_ratio``: (nose_bottom - eye_y) / face height.
    """
    mask = np.asarray(mask)
    h, w = mask.shape
    g: dict[str, Any] = {k: None for k in (
        "eye_y", "eye_x", "mouth_y", "D", "brow_top", "chin_y", "nose_bottom", "centre_x", "yaw",
        *SHAPES)}

    eyes = [_centroid(mask == k) if (mask == k).sum() >= min_pixels else None for k in EYE_CLASSES]
    eyes_vis = [e for e in eyes if e is not None]
    if eyes_vis:
        g["eye_y"] = float(np.mean([e[0] for e in eyes_vis]))
        g["eye_x"] = sorted(e[1] for e in eyes_vis)
    else:
        glasses = mask == C["eyeglasses"]
        if glasses.sum() >= min_pixels:
            cy, cx = _centroid(glasses)
            g["eye_y"], g["eye_x"] = cy, [cx]
    mouth = _isin(mask, MOUTH_CLASSES)
    if mouth.sum() >= min_pixels:
        my, mx = _centroid(mouth)
        g["mouth_y"] = my
    if g["eye_y"] is None or g["mouth_y"] is None or g["mouth_y"] - g["eye_y"] <= 1:
        return g
    eye_y, D = g["eye_y"], g["mouth_y"] - g["eye_y"]
    g["D"] = D
    if len(g["eye_x"]) == 2:
        centre_x = 0.5 * (g["eye_x"][0] + g["eye_x"][1])
    else:
        nose_c = _centroid(mask == C["nose"])
        centre_x = nose_c[1] if nose_c is not None else mx
    g["centre_x"] = centre_x

    nose = mask == C["nose"]
    if len(g["eye_x"]) == 2 and nose.sum() >= min_pixels and g["eye_x"][1] - g["eye_x"][0] > 1:
        # Head-turn proxy: nose centre off the eye midpoint, in interocular distances.
        g["yaw"] = (_centroid(nose)[1] - centre_x) / (g["eye_x"][1] - g["eye_x"][0])

    brow_tops = []
    for k in BROW_CLASSES:
        ys = np.nonzero(mask == k)[0]
        if len(ys) >= min_pixels:
            brow_tops.append(float(np.percentile(ys, 5)))
    g["brow_top"] = float(np.mean(brow_tops)) if brow_tops else eye_y - BROW_ABOVE_EYE * D

    face = _isin(mask, FACE_CLASSES)
    cols = np.arange(w)
    # Ignore face-class pixels far to the side (a hand labelled skin): faces span about 2 D.
    face &= np.abs(cols - centre_x)[None, :] <= FACE_HALF_SPAN * D
    rows = np.arange(h)
    any_row = face.any(axis=1)
    left = np.where(any_row, face.argmax(axis=1), -1)
    right = np.where(any_row, w - 1 - face[:, ::-1].argmax(axis=1), -1)
    band = any_row & (rows >= eye_y) & (rows <= g["mouth_y"])
    width = None
    if band.sum() >= 3:
        width = float(np.percentile((right - left + 1)[band], 90))

    central = (cols >= centre_x - D / 4) & (cols <= centre_x + D / 4)
    any_col = face.any(axis=0)
    bottom = np.where(any_col, h - 1 - face[::-1, :].argmax(axis=0), -1)
    sel = central & any_col
    height = None
    if sel.any():
        chin_y = float(np.median(bottom[sel]))
        g["chin_y"] = chin_y
        if chin_y - eye_y > 1:
            height = chin_y - eye_y

    nose_rows = np.nonzero(mask == C["nose"])[0]
    if len(nose_rows) >= min_pixels:
        g["nose_bottom"] = float(np.percentile(nose_rows, 98))

    if width is not None:
        g["face_width"] = width / w
    if height is not None:
        g["face_height"] = height / h
    if width is not None and height is not None:
        g["face_aspect"] = width / height
        counts = [int((mask == k).sum()) for k in EYE_CLASSES]
        visible = [c for c in counts if c >= min_pixels]
        if visible:
            eye_area = sum(visible) * (2 / len(visible))
            g["eye_area_ratio"] = eye_area / (width * height)
    if width is not None and mouth.sum() >= min_pixels:
        xs = np.nonzero(mouth.any(axis=0))[0]
        g["mouth_width_ratio"] = float(xs[-1] - xs[0] + 1) / width
    if height is not None and g["nose_bottom"] is not None and g["nose_bottom"] > eye_y:
        g["nose_length_ratio"] = (g["nose_bottom"] - eye_y) / height
    return g


def fringe_band(mask: np.ndarray, geometry: Mapping[str, Any] | None = None) -> np.ndarray | None:
    """Boolean mask of the forehead band, or None when the face anchors are missing.

    Rows: from ``FRINGE_BAND[1] * D`` to ``FRINGE_BAND[0] * D`` above the top of the brows
    (estimated ``BROW_ABOVE_EYE * D`` above the eye line when the brows are hidden), D being the
    eye-to-mouth distance. That is the lower part of the forehead: without a fringe it is skin for
    most people (over the training faces the skin reaches a median 0.72 D above the brow tops,
    the lower quartile 0.6 D, and that includes the fringes), with one it is hair.
    Threshold ``FRINGE_THRESHOLD``: chosen by looking at training faces across the range of
    fractions -- below 0.25 wisps and low hairlines, 0.25-0.35 mixed, above 0.35 fringes
    (full or side-swept).
    Columns: between the two eye centres (centre +- D/2 when only one eye is visible).
    The band is not taken from the top of the skin region because that top is the hairline --
    it moves with the very fringe being measured.
    """
    g = geometry if geometry is not None else face_geometry(mask)
    if g.get("D") is None or g.get("brow_top") is None:
        return None
    h, w = np.asarray(mask).shape
    D = g["D"]
    y0 = g["brow_top"] - FRINGE_BAND[1] * D
    y1 = g["brow_top"] - FRINGE_BAND[0] * D
    if len(g["eye_x"]) == 2:
        x0, x1 = g["eye_x"]
    else:
        x0, x1 = g["centre_x"] - D / 2, g["centre_x"] + D / 2
    ys = np.arange(h)[:, None]
    xs = np.arange(w)[None, :]
    band = (ys >= y0) & (ys <= y1) & (xs >= x0) & (xs <= x1)
    return band if band.any() else None


# ------------------------------------------------------------------------------------------------
# Per-image statistics
# ------------------------------------------------------------------------------------------------

def mask_stats(mask: np.ndarray, rgb: np.ndarray | None = None) -> dict[str, Any]:
    """Every per-image measure of a label map (CelebAMask-HQ ids) and its RGB image (sRGB, uint8
    0..255 or float 0..1; optional -- without it the colours are None).

    Keys: ``glasses``, ``headwear``, ``earrings``, ``fringe`` (bool, fringe None when the face
    anchors are missing) with ``<name>_fraction``; ``hair``, ``skin``, ``lips``, ``eyes``
    (CIELAB triples or None; all None without ``rgb``); ``hair_fraction``; the shape measures of
    ``face_geometry`` (``SHAPES``) and its ``yaw``; ``frame`` (h, w); ``presence_source``
    (per presence measure: "mask").
    """
    mask, rgb = _check_pair(mask, rgb)
    h, w = mask.shape
    n = h * w
    counts = np.bincount(mask.ravel(), minlength=len(CLASS_IDS))
    s: dict[str, Any] = {"frame": (h, w), "presence_source": {}}
    for name, classes in PRESENCE_CLASSES.items():
        frac = float(sum(counts[k] for k in classes)) / n
        s[f"{name}_fraction"] = frac
        s[name] = bool(frac >= PRESENCE_THRESHOLDS[name])
        s["presence_source"][name] = "mask"

    geo = face_geometry(mask)
    band = fringe_band(mask, geo)
    if band is None:
        s["fringe_fraction"], s["fringe"] = None, None
    else:
        frac = float((mask[band] == C["hair"]).mean())
        s["fringe_fraction"], s["fringe"] = frac, bool(frac >= FRINGE_THRESHOLD)
    s["presence_source"]["fringe"] = "mask"
    s["facial_hair"] = None if rgb is None else facial_hair_cue(mask, rgb, geo)["present"]
    s["presence_source"]["facial_hair"] = "pixels"

    min_px = max(MIN_COLOUR_PIXELS, int(math.ceil(MIN_COLOUR_FRACTION * n)))
    for name, rule in COLOUR_RULES.items():
        s[name] = None if rgb is None else robust_colour(rgb, _isin(mask, rule.classes), rule,
                                                         min_px)
    s["hair_fraction"] = float(counts[C["hair"]]) / n
    for k in SHAPES:
        s[k] = geo[k]
    s["yaw"] = geo["yaw"]
    return s


def _laplacian_abs(L: np.ndarray) -> np.ndarray:
    out = np.zeros_like(L)
    out[1:-1, 1:-1] = np.abs(4 * L[1:-1, 1:-1] - L[:-2, 1:-1] - L[2:, 1:-1] - L[1:-1, :-2]
                             - L[1:-1, 2:])
    return out


def facial_hair_cue(mask: np.ndarray, rgb: np.ndarray, geometry: Mapping[str, Any] | None = None
                    ) -> dict[str, Any]:
    """Facial hair from the photo's pixels inside its skin class (the masks call beards skin).

    Returns ``dL`` (cheek minus lower-face median L*), ``dC`` (same for chroma), ``texture``
    (lower-face / cheek median |Laplacian of L*|) and ``present``: True, False or None (no
    anchors, too few skin pixels, or between the rules of ``BEARD_YES`` and ``BEARD_NO``)."""
    out: dict[str, Any] = {"dL": None, "dC": None, "texture": None, "present": None}
    g = geometry if geometry is not None else face_geometry(mask)
    if g.get("D") is None or g.get("chin_y") is None:
        return out
    h, w = mask.shape
    D, cx, ey, my, cy = g["D"], g["centre_x"], g["eye_y"], g["mouth_y"], g["chin_y"]
    ys = np.arange(h)[:, None]
    dx = np.abs(np.arange(w)[None, :] - cx)
    skin = mask == C["skin"]
    low = skin & (ys >= my + BEARD_LOW[0] * D) & (ys <= cy) & (dx <= BEARD_LOW[1] * D)
    ref = (skin & (ys >= ey + BEARD_REF[0] * D) & (ys <= ey + BEARD_REF[1] * D)
           & (dx >= BEARD_REF[2] * D) & (dx <= BEARD_REF[3] * D))
    min_px = max(8, int(BEARD_MIN_PIXELS * h * w / 512 ** 2))
    if low.sum() < min_px or ref.sum() < min_px:
        return out
    lab = srgb_to_lab(np.asarray(rgb, np.float32) / (255.0 if np.asarray(rgb).dtype == np.uint8 else 1.0))
    L = lab[..., 0]
    chroma = np.hypot(lab[..., 1], lab[..., 2])
    lap = _laplacian_abs(L)
    dL = float(np.median(L[ref]) - np.median(L[low]))
    dC = float(np.median(chroma[ref]) - np.median(chroma[low]))
    tex = float(np.median(lap[low]) / max(float(np.median(lap[ref])), 1e-3))
    yes = any(dL >= a and dC >= b and tex >= c for a, b, c in BEARD_YES)
    no = dL < BEARD_NO[0] and tex < BEARD_NO[1]
    out.update(dL=dL, dC=dC, texture=tex, present=True if yes else (False if no else None))
    return out


def presence_from_tags(vector: Any) -> dict[str, bool | None]:
    """Presence from an avatar's attribute tags: an ``AvatarVector`` (``.tag(name)``) or a mapping
    tag -> value. None where the pack has no option carrying the tag."""
    get: Callable[[str], Any] = vector.tag if hasattr(vector, "tag") else vector.get
    out: dict[str, bool | None] = {}
    for name, tag in PRESENCE_TAGS.items():
        value = get(tag)
        out[name] = None if value is None else value != "none"
    return out


def hair_length_rank(vector: Any) -> int | None:
    """Ordinal of the ``hair_length`` tag (bald 0 ... long 4), None when untagged."""
    get = vector.tag if hasattr(vector, "tag") else vector.get
    value = get("hair_length")
    order = TAG_VOCABULARY["hair_length"]
    return order.index(value) if value in order else None


def apply_tags(stats: Mapping[str, Any], vector: Any) -> dict[str, Any]:
    """A copy of ``stats`` whose presence flags come from the avatar's tags where it has them."""
    out = dict(stats)
    out["presence_source"] = dict(stats.get("presence_source", {}))
    for name, present in presence_from_tags(vector).items():
        if present is not None:
            out[name] = present
            out["presence_source"][name] = "tags"
    out["hair_length_rank"] = hair_length_rank(vector)
    return out


def avatar_stats(mask: np.ndarray, rgb: np.ndarray | None = None,
                 vector: Any = None) -> dict[str, Any]:
    """``mask_stats`` of an avatar render; with ``vector``, presence from its tags (issue wording:
    "the chosen glasses option's tag is not none"), falling back to the mask for untagged ones."""
    s = mask_stats(mask, rgb)
    return apply_tags(s, vector) if vector is not None else s


def constant_stats(**colours: str | Sequence[float] | None) -> dict[str, Any]:
    """Stats of a constant predictor from its colours: ``constant_stats(hair="#3b2a20",
    skin="#e0b899")``; hex strings or CIELAB triples. Keys must be in ``COLOURS``."""
    out: dict[str, Any] = {}
    for name, value in colours.items():
        if name not in COLOUR_RULES:
            raise UserError(f"unknown colour '{name}' (known: {', '.join(COLOURS)})")
        if value is None:
            out[name] = None
        elif isinstance(value, str):
            out[name] = hex_to_lab(value)
        else:
            v = tuple(float(x) for x in value)
            if len(v) != 3:
                raise UserError(f"colour '{name}': expected a CIELAB triple, got {value!r}")
            out[name] = v
    return out


# ------------------------------------------------------------------------------------------------
# Aggregate scorers
# ------------------------------------------------------------------------------------------------

def balanced_accuracy(truth: Sequence[bool | None], pred: Sequence[bool | None]) -> dict[str, Any]:
    """Balanced accuracy of presence predictions; pairs with a None on either side are skipped.

    ``value`` = (TPR + TNR) / 2. When the truth holds one class only, ``value`` is the accuracy on
    that class and ``degenerate`` says which ("only positives" / "only negatives"); with no pairs
    ``value`` is None and ``degenerate`` "empty".
    """
    if len(truth) != len(pred):
        raise ValueError(f"{len(truth)} truths vs {len(pred)} predictions")
    pairs = [(bool(t), bool(p)) for t, p in zip(truth, pred) if t is not None and p is not None]
    tp = sum(t and p for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)
    fp = sum((not t) and p for t, p in pairs)
    tn = sum((not t) and (not p) for t, p in pairs)
    n_pos, n_neg = tp + fn, tn + fp
    tpr = tp / n_pos if n_pos else None
    tnr = tn / n_neg if n_neg else None
    if n_pos and n_neg:
        value, degenerate = (tpr + tnr) / 2, None
    elif n_pos:
        value, degenerate = tpr, "only positives"
    elif n_neg:
        value, degenerate = tnr, "only negatives"
    else:
        value, degenerate = None, "empty"
    return {"value": value, "n": len(pairs), "n_pos": n_pos, "n_neg": n_neg, "tpr": tpr,
            "tnr": tnr, "accuracy": (tp + tn) / len(pairs) if pairs else None,
            "confusion": {"tp": tp, "fn": fn, "fp": fp, "tn": tn}, "degenerate": degenerate}


def rankdata(x: Sequence[float]) -> np.ndarray:
    """Ranks 1..n, ties sharing the mean of the ranks they span (scipy's 'average')."""
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    starts = np.flatnonzero(np.r_[True, xs[1:] != xs[:-1]])
    counts = np.diff(np.r_[starts, n])
    avg = starts + (counts + 1) / 2.0
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = np.repeat(avg, counts)
    return ranks


def spearman(x: Sequence[float | None], y: Sequence[float | None]) -> dict[str, Any]:
    """Spearman rank correlation (Pearson on average ranks); pairs with a None are skipped.

    ``value`` None with ``degenerate`` "too few" (under 3 pairs) or "constant" (no spread on a
    side, e.g. a constant predictor).
    """
    if len(x) != len(y):
        raise ValueError(f"{len(x)} vs {len(y)} values")
    pairs = [(float(a), float(b)) for a, b in zip(x, y)
             if a is not None and b is not None and math.isfinite(a) and math.isfinite(b)]
    out: dict[str, Any] = {"value": None, "n": len(pairs), "degenerate": None}
    if len(pairs) < 3:
        out["degenerate"] = "too few"
        return out
    a, b = (rankdata(v) for v in zip(*pairs))
    a, b = a - a.mean(), b - b.mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    if den == 0:
        out["degenerate"] = "constant"
        return out
    out["value"] = float((a * b).sum() / den)
    return out


def colour_errors(photo: Sequence[Any], avatar: Sequence[Any]) -> dict[str, Any]:
    """CIEDE2000 between paired CIELAB colours (None on either side skipped): n, median, p90, mean."""
    if len(photo) != len(avatar):
        raise ValueError(f"{len(photo)} vs {len(avatar)} colours")
    pairs = [(p, a) for p, a in zip(photo, avatar) if p is not None and a is not None]
    out: dict[str, Any] = {"n": len(pairs), "median": None, "p90": None, "mean": None}
    if pairs:
        de = ciede2000(np.array([p for p, _ in pairs], dtype=np.float64),
                       np.array([a for _, a in pairs], dtype=np.float64))
        out.update(median=float(np.median(de)), p90=float(np.percentile(de, 90)),
                   mean=float(de.mean()))
    return out


# ------------------------------------------------------------------------------------------------
# Report
# ------------------------------------------------------------------------------------------------

def compare(photo_stats_list: Sequence[Mapping[str, Any]],
            avatar_stats_list: Sequence[Mapping[str, Any]],
            constant_stats: Mapping[str, Any] | None = None, *,
            max_abs_yaw: float | None = None) -> dict[str, Any]:
    """Score avatars against their photos (same order). ``constant_stats``: the stats of a
    constant predictor (the pack's default avatar: its render's ``mask_stats`` or
    ``constant_stats(hair=..., skin=...)``); its colours (and presence flags, when it has them)
    are scored against the same photos so the gain over it is visible.

    Report: ``n``; ``presence[name]`` (balanced_accuracy dicts, + ``constant``);
    ``colour[name]`` (colour_errors, + ``constant`` and ``ratio_median`` = model / constant);
    ``correlation[name]`` (spearman dicts, for ``AMOUNTS`` and ``SHAPES``, + ``hair_length_tag``
    when avatar stats carry the tag's rank); ``presence_source`` counts.

    ``max_abs_yaw``: shape correlations only over photos whose ``yaw`` is known and within it
    (an avatar is rendered frontal; a turned head changes the photo's 2-D proportions).
    """
    photo, avatar = list(photo_stats_list), list(avatar_stats_list)
    if len(photo) != len(avatar):
        raise UserError(f"{len(photo)} photo stats vs {len(avatar)} avatar stats: they must pair up")
    report: dict[str, Any] = {"n": len(photo), "presence": {}, "colour": {}, "correlation": {}}
    for name in PRESENCE:
        r = balanced_accuracy([p.get(name) for p in photo], [a.get(name) for a in avatar])
        if constant_stats is not None and constant_stats.get(name) is not None:
            r["constant"] = balanced_accuracy([p.get(name) for p in photo],
                                              [constant_stats[name]] * len(photo))
        report["presence"][name] = r
    for name in COLOURS:
        truth = [p.get(name) for p in photo]
        r = colour_errors(truth, [a.get(name) for a in avatar])
        r["constant"], r["ratio_median"] = None, None
        if constant_stats is not None and constant_stats.get(name) is not None:
            const = constant_stats[name]
            # Scored on the pairs the model is scored on, so the ratio compares like with like.
            kept = [t if a.get(name) is not None else None for t, a in zip(truth, avatar)]
            r["constant"] = colour_errors(kept, [const] * len(photo))
            cm = r["constant"]["median"]
            if r["median"] is not None and cm:
                r["ratio_median"] = r["median"] / cm
        report["colour"][name] = r
    for name in AMOUNTS:
        report["correlation"][name] = spearman([p.get(name) for p in photo],
                                               [a.get(name) for a in avatar])
    frontal = [max_abs_yaw is None or (p.get("yaw") is not None and abs(p["yaw"]) <= max_abs_yaw)
               for p in photo]
    report["max_abs_yaw"] = max_abs_yaw
    for name in SHAPES:
        report["correlation"][name] = spearman(
            [p.get(name) if f else None for p, f in zip(photo, frontal)],
            [a.get(name) for a in avatar])
    if any(a.get("hair_length_rank") is not None for a in avatar):
        report["correlation"]["hair_length_tag"] = spearman(
            [p.get("hair_fraction") for p in photo], [a.get("hair_length_rank") for a in avatar])
    sources: dict[str, dict[str, int]] = {}
    for a in avatar:
        for name, src in a.get("presence_source", {}).items():
            sources.setdefault(name, {}).setdefault(src, 0)
            sources[name][src] += 1
    report["presence_source"] = sources
    return report


@dataclass(frozen=True)
class Target:
    name: str
    path: tuple[str, ...]       # keys into the report
    op: str                     # ">=" or "<="
    threshold: float
    label: str = ""

    def describe(self) -> str:
        return f"{self.op} {self.threshold:.4g}"


TARGETS: tuple[Target, ...] = (
    Target("glasses_balanced_accuracy", ("presence", "glasses", "value"), ">=", 0.85,
           "glasses: balanced accuracy"),
    Target("headwear_balanced_accuracy", ("presence", "headwear", "value"), ">=", 0.80,
           "headwear: balanced accuracy"),
    Target("fringe_balanced_accuracy", ("presence", "fringe", "value"), ">=", 0.75,
           "fringe: balanced accuracy"),
    Target("hair_colour_median_de00", ("colour", "hair", "median"), "<=", 10.0,
           "hair colour: median CIEDE2000"),
    Target("hair_colour_vs_constant", ("colour", "hair", "ratio_median"), "<=", 2 / 3,
           "hair colour: median / constant predictor's"),
    Target("skin_colour_median_de00", ("colour", "skin", "median"), "<=", 8.0,
           "skin colour: median CIEDE2000"),
    Target("skin_colour_vs_constant", ("colour", "skin", "ratio_median"), "<=", 2 / 3,
           "skin colour: median / constant predictor's"),
    Target("hair_amount_spearman", ("correlation", "hair_fraction", "value"), ">=", 0.6,
           "hair amount: Spearman"),
    *(Target(f"{m}_spearman", ("correlation", m, "value"), ">=", 0.3, f"{m}: Spearman")
      for m in SHAPES_TARGETED),
)


def _lookup(report: Mapping[str, Any], path: Sequence[str]) -> Any:
    cur: Any = report
    for key in path:
        if not isinstance(cur, Mapping) or key not in cur:
            return None
        cur = cur[key]
    return cur


def check_targets(report: Mapping[str, Any],
                  targets: Iterable[Target] = TARGETS) -> list[tuple[str, float | None, str, bool]]:
    """(name, value, target as text such as ">= 0.85", passed) per target. A value that could not
    be measured (None: no pairs, no constant predictor given) does not pass."""
    out = []
    for t in targets:
        value = _lookup(report, t.path)
        if value is None or not math.isfinite(value):
            passed = False
        elif t.op == ">=":
            passed = value >= t.threshold
        else:
            passed = value <= t.threshold
        out.append((t.name, value, t.describe(), bool(passed)))
    return out


def paired_bootstrap(photo_stats_list: Sequence[Mapping[str, Any]],
                     avatar_a: Sequence[Mapping[str, Any]], avatar_b: Sequence[Mapping[str, Any]],
                     constant_stats: Mapping[str, Any] | None = None, *, resamples: int = 500,
                     seed: int = 0, targets: Iterable[Target] = TARGETS) -> dict[str, dict]:
    """Is model B better than model A on the same photos, or is it noise? Per target: the
    difference B - A on all photos, its 95 % percentile interval over ``resamples`` paired
    bootstrap draws of the photos (both models scored on the same draw) and ``p_better``, the
    share of draws in which B beats A (lower is better for the colour errors).

    The validation split has 256 photos and only ~20 wear glasses or a hat, so a difference of a
    few points in a balanced accuracy can be chance: ablation tables say which ones are not.
    """
    photo, a, b = list(photo_stats_list), list(avatar_a), list(avatar_b)
    if not (len(photo) == len(a) == len(b)):
        raise UserError(f"{len(photo)} photos, {len(a)} and {len(b)} avatars: they must pair up")
    targets = list(targets)

    def values(idx) -> tuple[list, list]:
        pa = [photo[i] for i in idx]
        ra = check_targets(compare(pa, [a[i] for i in idx], constant_stats), targets)
        rb = check_targets(compare(pa, [b[i] for i in idx], constant_stats), targets)
        return [v for _, v, _, _ in ra], [v for _, v, _, _ in rb]

    base_a, base_b = values(range(len(photo)))
    rng = np.random.default_rng(seed)
    diffs = np.full((resamples, len(targets)), np.nan)
    for r in range(resamples):
        va, vb = values(rng.integers(0, len(photo), len(photo)))
        diffs[r] = [np.nan if x is None or y is None else y - x for x, y in zip(va, vb)]
    out = {}
    for j, t in enumerate(targets):
        d = diffs[:, j][np.isfinite(diffs[:, j])]
        full = None if base_a[j] is None or base_b[j] is None else base_b[j] - base_a[j]
        sign = -1.0 if t.op == "<=" else 1.0
        out[t.name] = {"a": base_a[j], "b": base_b[j], "diff": full,
                       "lo": float(np.percentile(d, 2.5)) if len(d) else None,
                       "hi": float(np.percentile(d, 97.5)) if len(d) else None,
                       "p_better": float((sign * d > 0).mean()) if len(d) else None}
    return out
