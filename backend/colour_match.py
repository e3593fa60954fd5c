"""Colours read from the photo: face parser -> region colours -> the pack's colour parameters.

Matching (shared with ``training.estimator.real_labels``, which labels the real training photos with it):
a measured CIELAB colour goes to the grid point of the pack's *colour calibration* (what each
colour-parameter value renders as, measured in Blender by ``render_engine.calibration``; plain
JSON here) nearest in CIEDE2000, searched over the calibrated grid of its region (hair:
hair_color x hair_red x hair_grey; skin, lips, eyes: 1-D) upsampled by multilinear
interpolation. Near-ties (within ``COLOUR_TIE_DE00``) go to the values the pack's sampling
distributions find most likely. The hair table is the chosen style's own (the calibration's offset
for that option: a curly style's shading renders darker than a bob's), or a hair-length group's
(the styles' offsets weighted by option weight) where the style is not calibrated or not yet
chosen (the real training photos' labels). A best match further than ``MAX_COLOUR_RESIDUAL`` (out of the engine's gamut: dyed blue
hair, a parsing error) is not used.

Photo side: a small face parser (ONNX, ``models/parser/parser.onnx``, trained by
``training.readout.photo_parser``; a retrain may fine-tune it into the pack's bundle) labels the aligned crop with its parts; each colour region
(``REGION_PARTS``: the parser's parts standing for the CelebAMask-HQ classes of
``fidelity.COLOUR_RULES``) is measured with ``fidelity.robust_colour`` under the same rules the
validation applies to true masks. The parser's metadata names the regions worth reading from the
photo (``likeness.colour_regions``, chosen on the validation photos); the others keep the
estimator's values.

numpy + onnxruntime only: runs inside Blender.
"""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import fidelity
from .colour import ciede2000
from .errors import UserError, read_json
from .schema import CLASS_IDS, Pack
from .viewer import ATTRIBUTES

COLOUR_TIE_DE00 = 1.0         # matches within this of the best count as ties (prior decides)
# A prediction takes the nearest calibrated colour: the prior's tie-break keeps *training labels*
# from red or grey tints the colour barely needs, but costs a prediction up to the tie in dE00
# (validation medians, calibration table: skin 5.9 -> 5.0, hair 3.8 -> 3.1 with no tie).
PHOTO_TIE_DE00 = 0.0
# Photo colours are measured on an aligned crop of this size (the parser's 128 px labels scaled up):
# at 128 px the lightness trims and erosion see too few pixels (skin measured 1.35 dE00 from the
# true-mask colour at 128 px, 0.53 at 256, 0.40 at 512 for 3x the time).
COLOUR_CROP = 256
MAX_COLOUR_RESIDUAL = 20.0    # best match further than this: the colour is not used
CATEGORY_MIN_P = 0.6          # engine colours a colour rule reads as a class with this confidence
UPSAMPLE = 4                  # grid refinement factor per axis for the search
BETA_CLIP = 0.005             # beta log-densities are evaluated on [clip, 1 - clip]

# Parser metadata (values are strings, like the estimator's in ``contract``).
PARSER_KIND_KEY, PARSER_KIND = "likeness.kind", "face_parser"
KEY_FORMAT = "likeness.format_version"
PARSER_FORMAT = 1
KEY_INPUT_SIZE = "likeness.input_size"
KEY_MEAN, KEY_STD = "likeness.mean", "likeness.std"
KEY_PARTS = "likeness.parts"              # JSON list: output channel -> part name
KEY_LICENCE = "likeness.licence"
KEY_REGIONS = "likeness.colour_regions"   # JSON list: the regions read from the photo by default
KEY_REPORT = "likeness.report"
PARSER_INPUT, PARSER_OUTPUT = "input", "logits"

# Colour region -> the parser parts standing for its CelebAMask-HQ classes. The parser merges
# mouth interior and lips into "mouth" and both eyes into "eyes"; the lightness trims of
# ``fidelity.COLOUR_RULES`` drop most teeth and mouth shadow.
REGION_PARTS = {"hair": ("hair",), "skin": ("face",), "lips": ("mouth",), "eyes": ("eyes",)}
SOURCES = ("photo", "model")


# --------------------------------------------------------------------------------------------
# Calibrated colour tables and the search
# --------------------------------------------------------------------------------------------

def _interp_axis(values: np.ndarray, axis_pts: np.ndarray, fine: np.ndarray, axis: int) -> np.ndarray:
    pos = np.interp(fine, axis_pts, np.arange(len(axis_pts), dtype=np.float64))
    i0 = np.clip(np.floor(pos).astype(np.int64), 0, max(len(axis_pts) - 2, 0))
    i1 = np.minimum(i0 + 1, len(axis_pts) - 1)
    t = (pos - i0).reshape([-1 if d == axis else 1 for d in range(values.ndim)])
    return np.take(values, i0, axis=axis) * (1 - t) + np.take(values, i1, axis=axis) * t


def colour_table(calibration: Mapping[str, Any], region: str, *,
                 option_weights: Mapping[str, float] | None = None,
                 upsample: int = UPSAMPLE) -> tuple[list[str], list[np.ndarray], np.ndarray]:
    """(params, fine axes, Lab [n1, ..., nk, 3]) of a calibrated region.

    ``option_weights``: mix the variant slot's per-option offsets with these weights (options
    the calibration has no colour for are skipped); None = the default avatar's own table."""
    e = calibration["regions"][region]
    axes = [np.asarray(a, np.float64) for a in e["axes"]]
    lab = np.asarray(e["lab"], np.float64)
    var = e.get("variants")
    if option_weights is not None and var:
        opts = {k: v for k, v in var["options"].items() if option_weights.get(k, 0) > 0}
        if opts:
            w = np.array([option_weights[k] for k in opts], np.float64)
            off = np.stack([np.asarray(v["offset"], np.float64) for v in opts.values()])
            mean_off = (w[:, None, None] * off).sum(0) / w.sum()       # [n_stops, 3]
            k = e["params"].index(var["param"])
            vaxis = np.asarray(var["axis"], np.float64)
            along = np.stack([np.interp(axes[k], vaxis, mean_off[:, c]) for c in range(3)], -1)
            shape = [1] * (lab.ndim - 1) + [3]
            shape[k] = len(axes[k])
            lab = lab + along.reshape(shape)
    fine_axes = []
    for k, a in enumerate(axes):
        fine = np.linspace(0.0, 1.0, (len(a) - 1) * upsample + 1) if len(a) > 1 else a
        lab = _interp_axis(lab, a, fine, k)
        fine_axes.append(fine)
    return list(e["params"]), fine_axes, lab


def log_prior(pack: Pack, params: Sequence[str], axes: Sequence[np.ndarray]) -> np.ndarray:
    """Log density of the pack's sampling distribution at every grid point (up to constants)."""
    out = np.zeros([len(a) for a in axes])
    for k, (name, u) in enumerate(zip(params, axes)):
        p = pack.parameter(name)
        if p.distribution == "beta":
            uc = np.clip(u, BETA_CLIP, 1 - BETA_CLIP)
            lp = ((p.alpha or 1.0) - 1) * np.log(uc) + ((p.beta or 1.0) - 1) * np.log1p(-uc)
        elif p.distribution == "normal":
            x = p.denormalize(u)
            mean = p.default if p.mean is None else p.mean
            std = (p.max - p.min) / 4 if p.std is None else p.std
            lp = -0.5 * ((x - mean) / std) ** 2
        else:
            lp = np.zeros_like(u)
        out = out + lp.reshape([-1 if d == k else 1 for d in range(len(axes))])
    return out


def match_colours(photo_lab: np.ndarray, table_lab: np.ndarray, prior: np.ndarray,
                  tie: float = COLOUR_TIE_DE00, chunk: int = 16,
                  allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """For each photo colour [N, 3]: (flat index of the chosen grid point, its dE00).

    The chosen point is the most probable (``prior``) among those within ``tie`` of the best;
    only points of ``allowed`` (flat mask) are considered when it is given."""
    flat = table_lab.reshape(-1, 3)
    pr = prior.reshape(-1)
    best = np.zeros(len(photo_lab), np.int64)
    de_best = np.zeros(len(photo_lab))
    for s in range(0, len(photo_lab), chunk):
        de = ciede2000(photo_lab[s:s + chunk, None, :], flat[None, :, :])      # [c, M]
        if allowed is not None and allowed.any():
            de = np.where(allowed[None, :], de, np.inf)
        m = de.min(axis=1, keepdims=True)
        score = np.where(de <= m + tie, pr[None, :], -np.inf)
        idx = score.argmax(axis=1)
        best[s:s + chunk] = idx
        de_best[s:s + chunk] = de[np.arange(len(idx)), idx]
    return best, de_best


def variant_weights(pack: Pack, calibration: Mapping[str, Any], region: str,
                    hair_length: str | None = None) -> dict[str, float] | None:
    """Option weights that mix the region's per-style offsets (None: the region has none): the
    options of the variant slot tagged with ``hair_length`` when given and any are, else all."""
    var = calibration["regions"][region].get("variants")
    if not var:
        return None
    slot = pack.slot(var["slot"])
    every = {o.id: o.weight for o in slot.options if o.id in var["options"]}
    if hair_length is None:
        return every
    group = {o.id: o.weight for o in slot.options
             if o.id in var["options"] and o.tags.get("hair_length") == hair_length}
    return group or every


def groups_by_hair_length(pack: Pack, calibration: Mapping[str, Any], region: str) -> bool:
    """Whether the region's variant slot carries ``hair_length`` tags (its table then depends on
    the hair-length group)."""
    var = calibration["regions"][region].get("variants")
    return bool(var) and any(o.tags.get("hair_length") for o in pack.slot(var["slot"]).options)


# --------------------------------------------------------------------------------------------
# Calibrations as files
# --------------------------------------------------------------------------------------------

def check_calibration(calibration: Any, pack: Pack, source: str = "the colour calibration") -> None:
    """Refuse a calibration that is not one, or was made for another pack or schema."""
    if not isinstance(calibration, Mapping) or not isinstance(calibration.get("regions"), Mapping):
        raise UserError(f"{source} is not a colour calibration (no 'regions'; write one with "
                        "render_engine.calibration.calibrate_colours)")
    if calibration.get("pack") != pack.id or calibration.get("schema") != pack.schema_hash:
        raise UserError(f"{source} is for pack '{calibration.get('pack')}' schema "
                        f"{calibration.get('schema')}, not '{pack.id}' {pack.schema_hash}: "
                        "recalibrate (render_engine.calibration.calibrate_colours)")
    for region, e in calibration["regions"].items():
        unknown = [p for p in e.get("params", []) if p not in pack.param_names]
        if region not in fidelity.COLOUR_RULES or unknown:
            raise UserError(f"{source}: region '{region}' or its parameters {unknown} are unknown "
                            f"to pack '{pack.id}'; recalibrate")


def load_calibration(path: str | os.PathLike, pack: Pack) -> dict:
    """A calibration JSON file, checked against ``pack``."""
    path = Path(path)
    data = read_json(path, "colour calibration")
    check_calibration(data, pack, str(path))
    return data


@dataclass(frozen=True)
class Match:
    params: dict[str, float]          # parameter -> normalised value of the chosen grid point
    lab: tuple[float, float, float]   # its calibrated (rendered) colour
    residual: float                   # dE00 between the measured colour and ``lab``


OPTION_GROUP = "option:"


class ColourMatcher:
    """A pack's calibrated colour tables, built once per (region, hairstyle or hair-length group)."""

    def __init__(self, pack: Pack, calibration: Mapping[str, Any], source: str = "the colour calibration"):
        check_calibration(calibration, pack, source)
        self.pack, self.calibration = pack, calibration
        self.regions = tuple(r for r in fidelity.COLOURS if r in calibration["regions"])
        self._tables: dict[tuple[str, str | None], tuple] = {}
        self._categories: dict[tuple, np.ndarray] = {}

    def group(self, region: str, slots: Mapping[str, str]) -> str | None:
        """The avatar's option in the region's variant slot, as ``"option:<id>"`` where the
        calibration rendered it (its colours are that style's render), else its hair-length group."""
        var = self.calibration["regions"][region].get("variants")
        if var and var["slot"] in slots and slots[var["slot"]] in var["options"]:
            return OPTION_GROUP + slots[var["slot"]]
        if not groups_by_hair_length(self.pack, self.calibration, region):
            return None
        slot = self.calibration["regions"][region]["variants"]["slot"]
        return self.pack.tag_of(slot, slots[slot], "hair_length") if slot in slots else None

    def table(self, region: str, group: str | None = None):
        key = (region, group)
        if key not in self._tables:
            if group is not None and group.startswith(OPTION_GROUP):
                weights = {group[len(OPTION_GROUP):]: 1.0}
            else:
                weights = variant_weights(self.pack, self.calibration, region, group)
            params, axes, lab = colour_table(self.calibration, region, option_weights=weights)
            self._tables[key] = (params, axes, lab, log_prior(self.pack, params, axes))
        return self._tables[key]

    def in_category(self, region: str, group: str | None, rule, attr: str, cls: str) -> np.ndarray:
        """Mask over the region's table: the engine colours the colour rule reads as ``cls``, with
        probability at least ``CATEGORY_MIN_P`` where any reach it (a render's measured colour
        strays a little from its calibrated one), else those it reads as ``cls`` at all."""
        key = (region, group, attr, cls)
        if key not in self._categories:
            table = self.table(region, group)[2]
            p = rule.probabilities(attr, table.reshape(-1, 3))
            k = ATTRIBUTES[attr].index(cls)
            sure = p[:, k] >= CATEGORY_MIN_P
            self._categories[key] = sure if sure.any() else p.argmax(1) == k
        return self._categories[key]

    def match(self, region: str, lab: Sequence[float], group: str | None = None,
              tie: float = COLOUR_TIE_DE00, allowed: np.ndarray | None = None) -> Match:
        """The calibrated colour nearest ``lab``; among ``allowed`` (flat table mask) when given."""
        params, axes, table, prior = self.table(region, group)
        idx, de = match_colours(np.asarray([lab], np.float64), table, prior, tie=tie,
                                allowed=allowed)
        grid = np.unravel_index(int(idx[0]), table.shape[:-1])
        return Match({n: float(axes[k][grid[k]]) for k, n in enumerate(params)},
                     tuple(float(v) for v in table.reshape(-1, 3)[idx[0]]), float(de[0]))


# --------------------------------------------------------------------------------------------
# The face parser (ONNX)
# --------------------------------------------------------------------------------------------

class ParserModel:
    """A face parser ONNX file: aligned uint8 crops -> part-id maps at the crops' size."""

    def __init__(self, path: str | os.PathLike, device: str = "auto", threads: int = 0):
        from .contract import _open_session, choose_providers
        self.path = Path(path)
        self.session = _open_session(self.path, choose_providers(device), threads)
        meta = dict(self.session.get_modelmeta().custom_metadata_map)
        name = self.path.name
        if meta.get(PARSER_KIND_KEY) != PARSER_KIND:
            raise UserError(f"{self.path}: not a Likeness face parser (metadata {PARSER_KIND_KEY} "
                            f"is {meta.get(PARSER_KIND_KEY)!r}, expected '{PARSER_KIND}')")
        try:
            version = int(meta[KEY_FORMAT])
            self.input_size = int(meta[KEY_INPUT_SIZE])
            mean = np.asarray(json.loads(meta[KEY_MEAN]), np.float32)
            std = np.asarray(json.loads(meta[KEY_STD]), np.float32)
            self.parts = tuple(json.loads(meta[KEY_PARTS]))
            self.regions = tuple(json.loads(meta.get(KEY_REGIONS, json.dumps(list(REGION_PARTS)))))
            self.report = json.loads(meta[KEY_REPORT]) if KEY_REPORT in meta else None
        except (KeyError, ValueError, TypeError) as e:
            raise UserError(f"{self.path}: malformed face-parser metadata ({type(e).__name__}: {e})") from None
        self.licence = meta.get(KEY_LICENCE, "")
        if version > PARSER_FORMAT:
            raise UserError(f"{name}: face-parser format {version} is newer than this Likeness "
                            f"supports ({PARSER_FORMAT}); update Likeness")
        if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0) or self.input_size < 16:
            raise UserError(f"{self.path}: malformed face-parser metadata (input_size, mean or std)")
        missing = sorted({p for ps in REGION_PARTS.values() for p in ps} - set(self.parts))
        unknown = [r for r in self.regions if r not in REGION_PARTS]
        if missing or unknown:
            raise UserError(f"{name}: the parser lacks parts {missing} or names unknown colour "
                            f"regions {unknown}")
        outs = {o.name: o.shape for o in self.session.get_outputs()}
        if PARSER_OUTPUT not in outs or outs[PARSER_OUTPUT][1] != len(self.parts):
            raise UserError(f"{name}: expected an output '{PARSER_OUTPUT}' with {len(self.parts)} "
                            f"part channels, got {outs}")
        self._scale = (1.0 / (255.0 * std)).astype(np.float32)
        self._shift = (-mean / std).astype(np.float32)
        self.rules = load_parse_rules(self.path)    # the parse rules' thresholds chosen for it

    def run(self, crops: np.ndarray) -> np.ndarray:
        """uint8 [N, H, W, 3] (or one [H, W, 3]) -> uint8 part ids [N, H, W]."""
        return self.run_soft(crops, ())[0]

    def run_soft(self, crops: np.ndarray, soft_parts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """(part ids [N, H, W] as ``run``, the probabilities of ``soft_parts`` [N, k, S, S] at the
        parser's input size S): what the parse is unsure of (thin eyeglass frames, a cap's brim)
        stays visible where the part ids show only the likeliest part."""
        from PIL import Image
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        n, h, w = crops.shape[:3]
        S = self.input_size
        x = crops if (h, w) == (S, S) else np.stack([np.asarray(Image.fromarray(c).resize(
            (S, S), Image.Resampling.BILINEAR)) for c in crops])
        x = (x.astype(np.float32) * self._scale + self._shift).transpose(0, 3, 1, 2)
        logits = self.session.run([PARSER_OUTPUT], {PARSER_INPUT: np.ascontiguousarray(x)})[0]
        labels = logits.argmax(1).astype(np.uint8)
        if (h, w) != (S, S):   # back to the crop's pixels, where the colours are measured
            labels = np.stack([np.asarray(Image.fromarray(m).resize((w, h), Image.Resampling.NEAREST))
                               for m in labels])
        soft = np.zeros((n, len(soft_parts), S, S), np.float32)
        if len(soft_parts):
            e = np.exp(logits - logits.max(1, keepdims=True))
            e /= e.sum(1, keepdims=True)
            for j, part in enumerate(soft_parts):
                if part in self.parts:
                    soft[:, j] = e[:, self.parts.index(part)]
        return labels, soft


# Presence a parse can show: tag -> (parser part, fidelity presence measure whose pixel rule decides).
PARSE_PRESENCE = {"glasses": ("eyeglasses", "glasses"), "headwear": ("hat", "headwear")}


def parse_shows(labels: np.ndarray, parts: Sequence[str], tag: str,
                threshold: float | None = None) -> np.ndarray:
    """Whether parsed crops (part ids [..., H, W]) show ``tag`` (``PARSE_PRESENCE``): the part's
    share of the frame at least ``threshold`` (default: the pixel rule validation applies to true
    masks); False when the parser has no such part."""
    part, measure = PARSE_PRESENCE[tag]
    labels = np.asarray(labels)
    if part not in parts:
        return np.zeros(labels.shape[:-2], bool)
    frac = (labels == parts.index(part)).mean(axis=(-2, -1))
    return frac >= (fidelity.PRESENCE_THRESHOLDS[measure] if threshold is None else threshold)


def parse_fringe(labels: np.ndarray, parts: Sequence[str], threshold: float | None = None) -> np.ndarray:
    """Whether hair covers each parsed crop's forehead band (part ids [N, H, W]) by at least
    ``threshold`` (default: the rule validation applies to true masks): 1 yes, 0 no, -1 unknown
    (no face anchors, or a hat)."""
    classes = parts_to_classes(np.asarray(labels), parts)
    limit = fidelity.FRINGE_THRESHOLD if threshold is None else threshold
    out = np.full(len(classes), -1, np.int64)
    for i, mask in enumerate(classes):
        st = fidelity.mask_stats(mask)
        if st["fringe"] is not None and not st["headwear"]:
            out[i] = int(st["fringe_fraction"] >= limit)
    return out


def parse_fractions(labels: np.ndarray, parts: Sequence[str]) -> dict[str, float | None]:
    """One parsed crop's measures behind the parse rules: the hat part's share of the frame
    ("headwear") and hair's share of the forehead band ("bangs"; None where ``parse_fringe`` is
    unknown)."""
    labels = np.asarray(labels)
    hat = float((labels == parts.index("hat")).mean()) if "hat" in parts else 0.0
    st = fidelity.mask_stats(parts_to_classes(labels, parts))
    band = st["fringe_fraction"] if st["fringe"] is not None and not st["headwear"] else None
    return {"headwear": hat, "bangs": band}


# Thresholds of the parse rules chosen for one parser (``training.readout.parse_rules``): a file
# beside it named after it, ``<parser stem>.rules.json``.
PARSE_RULES_KIND = "likeness.parse_rules"


def load_parse_rules(parser_path: str | os.PathLike) -> dict[str, float]:
    """tag -> threshold from the rules file beside a parser ({} when it has none: the mask rules)."""
    path = Path(parser_path).with_suffix(".rules.json")
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("kind") != PARSE_RULES_KIND:
            raise ValueError(f"kind {data.get('kind')!r}, expected {PARSE_RULES_KIND!r}")
        rules = {str(k): float(v) for k, v in data["thresholds"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise UserError(f"{path}: malformed parse rules ({type(e).__name__}: {e})") from None
    unknown = sorted(set(rules) - {"headwear", "bangs"})
    if unknown or any(not 0.0 < v < 1.0 for v in rules.values()):
        raise UserError(f"{path}: parse rules need thresholds in (0, 1) for headwear and bangs only, "
                        f"got {rules}")
    return rules


def parts_to_classes(labels: np.ndarray, parts: Sequence[str]) -> np.ndarray:
    """A parser's part-id map (part names ``parts``, as ``training.common.parts.PARTS``) -> CelebAMask-HQ
    class ids, so ``fidelity`` can measure it. Merged pairs (eyes, brows, ears) are split at the
    face's centre column; the mouth part becomes upper lip (its colour is the lip colour); earrings
    cannot be told apart from ears (callers treat their presence as unknown)."""
    simple = {"background": "background", "face": "skin", "nose": "nose", "mouth": "u_lip",
              "hair": "hair", "neck": "neck", "cloth": "cloth", "eyeglasses": "eyeglasses",
              "hat": "hat"}
    pairs = {"eyes": ("l_eye", "r_eye"), "brows": ("l_brow", "r_brow"), "ears": ("l_ear", "r_ear")}
    unknown = [p for p in parts if p not in simple and p not in pairs]
    if unknown:
        raise UserError(f"parser parts {unknown} have no face class")
    labels = np.asarray(labels)
    out = np.zeros(labels.shape, np.uint8)
    for part, cls in simple.items():
        if part in parts:
            out[labels == parts.index(part)] = CLASS_IDS[cls]
    face = np.nonzero(labels == parts.index("face"))[1] if "face" in parts else ()
    centre = float(np.mean(face)) if len(face) else labels.shape[1] / 2
    left = np.arange(labels.shape[1])[None, :] < centre
    for part, (l, r) in pairs.items():
        if part in parts:
            sel = labels == parts.index(part)
            out[sel & left] = CLASS_IDS[l]
            out[sel & ~left] = CLASS_IDS[r]
    return out


def measure_regions(crop: np.ndarray, labels: np.ndarray, parts: Sequence[str],
                    regions: Sequence[str] = tuple(REGION_PARTS)) -> dict[str, tuple | None]:
    """Robust CIELAB colour of each region of a parsed crop (None: too few pixels), with the
    rules and minimum size validation uses on true masks. ``labels`` are scaled (nearest) to the
    crop when their sizes differ; the minimum size holds at the labels' own resolution (a region
    of 4 parser pixels is not 64 pixels of evidence on a crop twice as large)."""
    h, w = crop.shape[:2]
    lh, lw = labels.shape
    min_px = max(fidelity.MIN_COLOUR_PIXELS, int(math.ceil(fidelity.MIN_COLOUR_FRACTION * lh * lw)))
    scale = h * w / (lh * lw)
    if (lh, lw) != (h, w):
        from PIL import Image
        big = np.asarray(Image.fromarray(np.asarray(labels, np.uint8)).resize(
            (w, h), Image.Resampling.NEAREST))
    else:
        big = labels
    out = {}
    for r in regions:
        ids = [parts.index(p) for p in REGION_PARTS[r]]
        if np.isin(labels, ids).sum() < min_px:
            out[r] = None
            continue
        out[r] = fidelity.robust_colour(crop, np.isin(big, ids), fidelity.COLOUR_RULES[r],
                                        int(math.ceil(min_px * scale)))
    return out


# --------------------------------------------------------------------------------------------
# Photo colours for a prediction
# --------------------------------------------------------------------------------------------

@dataclass
class RegionColour:
    """Where one region's colour parameters came from, for the prediction's JSON."""
    source: str                                   # "photo" or "model"
    params: dict[str, float]                      # normalised values applied
    model_params: dict[str, float] = field(default_factory=dict)   # the estimator's values
    measured: tuple[float, float, float] | None = None             # photo colour (CIELAB)
    matched: tuple[float, float, float] | None = None              # calibrated colour chosen
    residual: float | None = None
    why: str = ""                                 # why the model's values were kept

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"source": self.source,
                               "params": {k: round(v, 4) for k, v in self.params.items()}}
        if self.source == "photo":
            out["model_params"] = {k: round(v, 4) for k, v in self.model_params.items()}
        if self.measured is not None:
            out["photo_lab"] = [round(v, 2) for v in self.measured]
        if self.matched is not None:
            out["matched_lab"] = [round(v, 2) for v in self.matched]
            out["residual_de00"] = round(self.residual, 2)
        if self.why:
            out["why"] = self.why
        return out


class PhotoColours:
    """Parser + calibration of one pack: overrides the estimator's colour parameters with the
    photo's measured colours, region by region (``regions``; default the parser's choice)."""

    def __init__(self, pack: Pack, parser: ParserModel, matcher: ColourMatcher,
                 regions: Sequence[str] | None = None):
        self.pack, self.parser, self.matcher = pack, parser, matcher
        regions = tuple(parser.regions if regions is None else regions)
        unknown = [r for r in regions if r not in REGION_PARTS]
        if unknown:
            raise UserError(f"unknown colour regions {unknown} (known: {', '.join(REGION_PARTS)})")
        self.regions = tuple(r for r in regions if r in matcher.regions)
        self.all_regions = matcher.regions            # every calibrated region gets a record

    def apply(self, crop: np.ndarray, labels: np.ndarray, cont: np.ndarray,
              slots: Mapping[str, str], measured: Mapping[str, Any] | None = None,
              categories: Mapping[str, tuple] | None = None) -> dict[str, RegionColour]:
        """Override ``cont`` (normalised, pack order; modified in place) for the photo regions.
        ``crop``: the aligned face to measure (any size, ideally ``COLOUR_CROP``); ``labels``: the
        parser's part map of it; ``slots``: the avatar's options (the hair table's group);
        ``measured``: the regions' colours when already measured; ``categories``: region ->
        (``viewer.ColourCategories``, attribute, class): match only engine colours the rule reads
        as that class (the attribute reader's), so the render shows what a viewer sees."""
        names = self.pack.param_names
        if measured is None:
            measured = measure_regions(crop, labels, self.parser.parts, self.regions)
        out = {}
        for r in self.all_regions:
            params = self.matcher.calibration["regions"][r]["params"]
            model = {p: float(cont[names.index(p)]) for p in params}
            if r not in self.regions:
                out[r] = RegionColour("model", model, why="region not read from photos")
                continue
            lab = measured[r]
            if lab is None:
                out[r] = RegionColour("model", model, why="region too small in the photo")
                continue
            group = self.matcher.group(r, slots)
            allowed = None
            if categories and r in categories:
                allowed = self.matcher.in_category(r, group, *categories[r])
            m = self.matcher.match(r, lab, group, tie=PHOTO_TIE_DE00, allowed=allowed)
            if m.residual > MAX_COLOUR_RESIDUAL and allowed is None:
                out[r] = RegionColour("model", model, measured=lab, matched=m.lab, residual=m.residual,
                                      why=f"no engine colour within {MAX_COLOUR_RESIDUAL:g} dE00")
                continue
            for p, u in m.params.items():
                cont[names.index(p)] = u
            out[r] = RegionColour("photo", dict(m.params), model, lab, m.lab, m.residual)
        return out
