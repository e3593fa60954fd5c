"""The viewer's yardstick: what someone who sees the photo and the avatar says each one shows.

Photos are labelled by viewing them (``attributes.csv`` beside the shared faces, guide in its
``LABELING.md``). An avatar is read the way a viewer reads it, pack-independently:

* glasses, facial hair, hair length, fringe and hat from what its chosen options show: their tags
  (``TAG_READING``), so any pack whose options carry these tags is judged;
* hair colour and skin tone from its **render**: the robust colour of the pixels its mask calls hair
  or skin (``fidelity.robust_colour``), put into a category by ``ColourCategories``, one rule fitted on
  the TRAIN photos' own colours and labels (``training.readout.attributes.fit_colour_rule``) and applied unchanged to photos
  and renders.

Classes (``ATTRIBUTES``) merge the guide's finer labels where an avatar's options cannot be told
apart by a viewer at thumbnail size (bald and buzz are short hair; any facial hair is facial hair;
eyeglasses and sunglasses are glasses, with the type reported beside). ``unknown`` labels are skipped;
an avatar that shows nothing to read (a bald avatar has no hair colour) counts as a miss.

Scores: per attribute the balanced accuracy (mean per-class recall over the classes the labels
hold), their mean over the seven, for all labels and for the high-confidence ones, and a paired
bootstrap of two models' differences on the same photos. numpy only.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from . import fidelity
from .errors import UserError, read_json

ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "glasses": ("none", "any"),
    "facial_hair": ("none", "any"),
    "hair_length": ("short", "medium", "long"),
    "hair_color": ("black", "brown", "blonde", "red", "gray"),
    "skin_tone": ("light", "medium", "dark"),
    "bangs": ("no", "yes"),
    "hat": ("no", "yes"),
}
GLASSES_TYPES = ("none", "eyeglasses", "sunglasses")

# The guide's labels -> the classes above (labels not listed, e.g. "unknown", "other": skipped).
LABEL_CLASSES: dict[str, dict[str, str]] = {
    "glasses": {"none": "none", "eyeglasses": "any", "sunglasses": "any"},
    "facial_hair": {"none": "none", "stubble": "any", "mustache": "any", "goatee": "any",
                    "beard": "any"},
    "hair_length": {"bald": "short", "buzz": "short", "short": "short", "medium": "medium",
                    "long": "long"},
    "hair_color": {c: c for c in ATTRIBUTES["hair_color"]},
    "skin_tone": {c: c for c in ATTRIBUTES["skin_tone"]},
    "bangs": {"no": "no", "yes": "yes"},
    "hat": {"no": "no", "yes": "yes"},
}

# Attributes read from option tags: attribute -> (tag, tag value -> class).
TAG_READING: dict[str, tuple[str, dict[str, str]]] = {
    "glasses": ("glasses", {"none": "none", "eyeglasses": "any", "sunglasses": "any"}),
    "facial_hair": ("facial_hair", {"none": "none", "stubble": "any", "mustache": "any",
                                    "goatee": "any", "beard": "any"}),
    "hair_length": ("hair_length", LABEL_CLASSES["hair_length"]),
    "bangs": ("bangs", {"none": "no", "bangs": "yes"}),
    "hat": ("headwear", {"none": "no", "hat": "yes"}),
}
# Attributes read from the render's colours: attribute -> fidelity colour region.
COLOUR_READING: dict[str, str] = {"hair_color": "hair", "skin_tone": "skin"}

COLOUR_RULE_FORMAT = 1
COLOUR_RULE_KIND = "likeness.colour_categories"


def labels_path(root: str | os.PathLike | None = None) -> Path:
    from .realfaces import default_root
    return Path(root or default_root()) / "attributes.csv"


@dataclass(frozen=True)
class Labels:
    """One photo's viewed labels in ``ATTRIBUTES`` classes (None: unknown or not labelled)."""
    classes: dict[str, str | None]
    glasses_type: str | None
    confident: bool


def read_labels(path: str | os.PathLike) -> dict[str, Labels]:
    """``attributes.csv`` -> stem -> ``Labels``; a clear error for a file that is not one."""
    path = Path(path)
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except FileNotFoundError:
        raise UserError(f"viewed labels not found: {path}") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"{path}: unreadable labels ({type(e).__name__}: {e})") from None
    need = {"stem", "confidence", *ATTRIBUTES}
    if not rows or need - set(rows[0]):
        raise UserError(f"{path}: expected columns {sorted(need)}")
    out = {}
    for r in rows:
        g = r["glasses"].strip().lower()
        out[r["stem"]] = Labels(
            {a: LABEL_CLASSES[a].get(r[a].strip().lower()) for a in ATTRIBUTES},
            g if g in GLASSES_TYPES else None, r["confidence"].strip().lower() == "high")
    return out


# --------------------------------------------------------------------------------------------
# Colour -> category
# --------------------------------------------------------------------------------------------

def colour_features(lab: np.ndarray) -> np.ndarray:
    """CIELAB [..., 3] -> the rule's features [..., 6]: L, a, b, chroma and the hue direction
    scaled by chroma up to 10 (hue is meaningless for grey pixels)."""
    lab = np.asarray(lab, np.float64)
    L, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    c = np.hypot(a, b)
    h = np.arctan2(b, a)
    s = np.minimum(c, 10.0) / 10.0
    return np.stack([L, a, b, c, np.cos(h) * s, np.sin(h) * s], -1)


class ColourCategories:
    """A fitted multinomial logistic rule per colour attribute: CIELAB -> class probabilities."""

    def __init__(self, data: Mapping[str, Any], source: str = "colour rule"):
        if data.get("kind") != COLOUR_RULE_KIND or int(data.get("format", 0)) > COLOUR_RULE_FORMAT:
            raise UserError(f"{source}: not a Likeness colour-category rule (format "
                            f"{COLOUR_RULE_FORMAT})")
        self.source, self.data = source, dict(data)
        self.rules = {}
        try:
            for attr, e in data["attributes"].items():
                classes = tuple(e["classes"])
                if attr not in COLOUR_READING or classes != ATTRIBUTES[attr]:
                    raise ValueError(f"attribute {attr} with classes {classes}")
                W, b = np.asarray(e["W"], np.float64), np.asarray(e["b"], np.float64)
                mu, sd = np.asarray(e["mean"], np.float64), np.asarray(e["std"], np.float64)
                if W.shape != (len(mu), len(classes)) or b.shape != (len(classes),) or sd.shape != mu.shape:
                    raise ValueError(f"{attr}: weight shapes")
                self.rules[attr] = (W, b, mu, sd)
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: malformed colour rule ({e})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ColourCategories":
        return cls(read_json(path, "colour rule"), str(path))

    def probabilities(self, attr: str, lab: np.ndarray) -> np.ndarray:
        """CIELAB [..., 3] -> probabilities [..., n_classes] of ``ATTRIBUTES[attr]``."""
        W, b, mu, sd = self.rules[attr]
        z = ((colour_features(lab) - mu) / sd) @ W + b
        z = np.exp(z - z.max(-1, keepdims=True))
        return z / z.sum(-1, keepdims=True)

    def classify(self, attr: str, lab: Sequence[float] | None) -> str | None:
        if lab is None:
            return None
        return ATTRIBUTES[attr][int(np.argmax(self.probabilities(attr, np.asarray(lab))))]


def default_colour_rule() -> ColourCategories:
    from .models import SHIPPED
    return ColourCategories.load(SHIPPED / "attributes" / "colour_rule.json")


# --------------------------------------------------------------------------------------------
# Reading an avatar
# --------------------------------------------------------------------------------------------

def read_tags(vector) -> dict[str, str | None]:
    """The tag-read attributes of an avatar vector (None: no option of the pack carries the tag)."""
    pack = vector.pack
    out: dict[str, str | None] = {}
    for attr, (tag, classes) in TAG_READING.items():
        value = None
        for slot in pack.slots_with_tag(tag):
            v = pack.tag_of(slot, vector.slots[slot], tag)
            if v is not None:
                value = v
                break
        out[attr] = classes.get(value) if value is not None else None
    g = next((pack.tag_of(s, vector.slots[s], "glasses") for s in pack.slots_with_tag("glasses")),
             None)
    out["glasses_type"] = g if g in GLASSES_TYPES else None
    return out


def region_colour(rgb: np.ndarray, mask: np.ndarray, region: str) -> tuple | None:
    """Robust CIELAB colour of a fidelity colour region of an image and its class-id mask."""
    rule = fidelity.COLOUR_RULES[region]
    n = mask.shape[0] * mask.shape[1]
    min_px = max(fidelity.MIN_COLOUR_PIXELS, int(math.ceil(fidelity.MIN_COLOUR_FRACTION * n)))
    return fidelity.robust_colour(rgb, np.isin(mask, rule.classes), rule, min_px)


def read_avatar(vector, rgb: np.ndarray, mask: np.ndarray,
                rule: ColourCategories) -> dict[str, str | None]:
    """What a viewer reads from an avatar: its tags and its render's colours."""
    out = read_tags(vector)
    for attr, region in COLOUR_READING.items():
        out[attr] = rule.classify(attr, region_colour(rgb, mask, region))
    return out


# --------------------------------------------------------------------------------------------
# Scores
# --------------------------------------------------------------------------------------------

def balanced_accuracy(truth: Sequence[str | None], pred: Sequence[str | None],
                      classes: Sequence[str]) -> dict[str, Any]:
    """Mean recall over the classes present in ``truth`` (None truths skipped; a None prediction
    is a miss). Returns value (None without any label), n, per-class recall and counts."""
    t = np.array([x if x is not None else "" for x in truth], object)
    p = np.array([x if x is not None else "" for x in pred], object)
    known = t != ""
    per, counts = {}, {}
    for c in classes:
        sel = known & (t == c)
        counts[c] = int(sel.sum())
        if sel.any():
            per[c] = float(np.mean(p[sel] == c))
    return {"value": float(np.mean(list(per.values()))) if per else None, "n": int(known.sum()),
            "recall": per, "counts": counts}


def score(labels: Sequence[Labels], readings: Sequence[Mapping[str, str | None]]) -> dict[str, Any]:
    """The yardstick over paired (photo labels, avatar reading) lists: per attribute and mean, for
    all labels and the high-confidence ones, and the glasses type (none / eyeglasses / sunglasses)."""
    if len(labels) != len(readings):
        raise ValueError("labels and readings differ in length")

    def one(idx) -> dict[str, Any]:
        res = {a: balanced_accuracy([labels[i].classes[a] for i in idx],
                                    [readings[i].get(a) for i in idx], cls)
               for a, cls in ATTRIBUTES.items()}
        vals = [r["value"] for r in res.values()]
        return {"attributes": res,
                "mean": float(np.mean(vals)) if all(v is not None for v in vals) else None}

    all_idx = list(range(len(labels)))
    out = one(all_idx)
    out["photos"] = len(labels)
    out["high_confidence"] = one([i for i in all_idx if labels[i].confident])
    out["high_confidence"]["photos"] = sum(labels[i].confident for i in all_idx)
    out["glasses_type"] = balanced_accuracy([l.glasses_type for l in labels],
                                            [r.get("glasses_type") for r in readings], GLASSES_TYPES)
    return out


def paired_bootstrap(labels: Sequence[Labels], a: Sequence[Mapping], b: Sequence[Mapping],
                     draws: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Differences (a - b) of the yardstick per attribute and of the mean, with 95 % intervals
    from resampling the photos (the same draw for both models)."""
    n = len(labels)
    if not (n == len(a) == len(b)) or n == 0:
        raise ValueError("paired_bootstrap needs equally long, non-empty lists")
    keys = list(ATTRIBUTES) + ["mean"]

    def values(idx, reads):
        s = score([labels[i] for i in idx], [reads[i] for i in idx])
        return [s["attributes"][k]["value"] if k != "mean" else s["mean"] for k in keys]

    full = np.array(values(range(n), a), float) - np.array(values(range(n), b), float)
    rng = np.random.default_rng(seed)
    diffs = []
    for _ in range(draws):
        idx = rng.integers(0, n, n)
        va, vb = values(idx, a), values(idx, b)
        diffs.append([np.nan if x is None or y is None else x - y for x, y in zip(va, vb)])
    d = np.array(diffs, float)
    out = {}
    for k, name in enumerate(keys):
        col = d[:, k][np.isfinite(d[:, k])]
        out[name] = {"diff": None if not np.isfinite(full[k]) else float(full[k]),
                     "low": float(np.percentile(col, 2.5)) if len(col) else None,
                     "high": float(np.percentile(col, 97.5)) if len(col) else None}
    return out


def summary_rows(report: Mapping[str, Any]) -> list[tuple[str, float | None, int]]:
    """(attribute, balanced accuracy, labelled photos) rows of a ``score`` report, mean last."""
    rows = [(a, r["value"], r["n"]) for a, r in report["attributes"].items()]
    return rows + [("mean", report["mean"], report["photos"])]


# --------------------------------------------------------------------------------------------
# Targets, comparisons, reports
# --------------------------------------------------------------------------------------------

TARGET_EACH, TARGET_MEAN = 0.75, 0.85


def check_targets(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The default model's targets on the validation photos: every attribute >= TARGET_EACH, the
    mean >= TARGET_MEAN."""
    out = [{"name": a, "value": r["value"], "target": f">= {TARGET_EACH}",
            "passed": r["value"] is not None and r["value"] >= TARGET_EACH}
           for a, r in report["attributes"].items()]
    m = report["mean"]
    out.append({"name": "mean", "value": m, "target": f">= {TARGET_MEAN}",
                "passed": m is not None and m >= TARGET_MEAN})
    return out


def compare_with(path: str | os.PathLike, stems: Sequence[str], labels: Sequence[Labels],
                 readings: Sequence[Mapping]) -> dict[str, Any]:
    """Paired bootstrap of these readings against another validate run's ``viewer.json``, on the
    photos both judged."""
    path = Path(path)
    try:
        other = json.loads(path.read_text())
        theirs = dict(zip(other["stems"], other["readings"]))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a validate run's viewer.json ({type(e).__name__}: {e})") from None
    idx = [i for i, s in enumerate(stems) if s in theirs]
    if not idx:
        raise UserError(f"{path}: no photo in common with this run")
    boot = paired_bootstrap([labels[i] for i in idx], [readings[i] for i in idx],
                            [theirs[stems[i]] for i in idx])
    return {"against": other.get("model", str(path)), "photos": len(idx), "differences": boot}


def format_summary(report: Mapping[str, Any]) -> str:
    parts = [f"{a} {r['value']:.3f}" if r["value"] is not None else f"{a} n/a"
             for a, r in report["attributes"].items()]
    mean = "n/a" if report["mean"] is None else f"{report['mean']:.3f}"
    return f"viewer's yardstick (balanced accuracy): mean {mean}; " + ", ".join(parts)


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"


def to_markdown(report: Mapping[str, Any], compare: Mapping[str, Any] | None = None) -> str:
    """The yardstick table: per attribute all labels, high-confidence labels, counts, target."""
    hc = report["high_confidence"]
    lines = ["## The viewer's yardstick", "",
             f"Balanced accuracy between each photo's viewed label and the avatar as a viewer reads it "
             f"(tags of its options; hair and skin colour from its render through "
             f"`{Path(str(report.get('colour_rule', 'colour_rule.json'))).name}`), "
             f"{report['photos']} photos ({hc['photos']} high-confidence).", "",
             "| attribute | all labels | high confidence | labelled | target |",
             "|---|---|---|---|---|"]
    targets = {t["name"]: t for t in report.get("targets", [])}
    for a, r in report["attributes"].items():
        t = targets.get(a)
        mark = "" if t is None else (" (met)" if t["passed"] else " (missed)")
        lines.append(f"| {a} | {_f(r['value'])} | {_f(hc['attributes'][a]['value'])} | {r['n']} | "
                     f"{t['target'] + mark if t else ''} |")
    t = targets.get("mean")
    lines.append(f"| **mean** | **{_f(report['mean'])}** | {_f(hc['mean'])} | | "
                 f"{t['target'] + (' (met)' if t['passed'] else ' (missed)') if t else ''} |")
    g = report["glasses_type"]
    lines += ["", f"Glasses type (none / eyeglasses / sunglasses): {_f(g['value'])}; recall "
              + ", ".join(f"{c} {v:.2f}" for c, v in g["recall"].items())]
    if compare:
        lines += ["", f"Against `{Path(str(compare['against'])).name}` on {compare['photos']} photos "
                  "(difference, 95 % paired bootstrap interval):", "",
                  "| attribute | difference | interval |", "|---|---|---|"]
        for a, d in compare["differences"].items():
            lines.append(f"| {a} | {_f(d['diff'])} | [{_f(d['low'])}, {_f(d['high'])}] |")
    return "\n".join(lines)


SHORT = {"glasses": "gl", "facial_hair": "fh", "hair_length": "len", "hair_color": "hc",
         "skin_tone": "sk", "bangs": "fr", "hat": "hat"}


def sheet_tile(photo: np.ndarray, avatar: np.ndarray, labels: Labels,
               reading: Mapping[str, str | None], size: int = 128) -> np.ndarray:
    """A Figure-6-style tile: photo | avatar, under them each attribute as label / avatar's reading
    (red where they differ)."""
    from PIL import Image, ImageDraw
    from .visual import resize_square
    lines = len(ATTRIBUTES)
    tile = Image.new("RGB", (2 * size, size + 11 * lines + 4), "white")
    tile.paste(Image.fromarray(resize_square(photo, size)), (0, 0))
    tile.paste(Image.fromarray(resize_square(avatar, size)), (size, 0))
    draw = ImageDraw.Draw(tile)
    for k, a in enumerate(ATTRIBUTES):
        want, got = labels.classes[a], reading.get(a)
        colour = (0, 0, 0) if want is None or want == got else (200, 0, 0)
        draw.text((3, size + 2 + 11 * k), f"{SHORT[a]}: {want or '?'} / {got or '-'}", fill=colour)
    return np.asarray(tile)
