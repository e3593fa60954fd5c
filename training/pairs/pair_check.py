"""Pair check: does the realistic face show what its avatar vector says? (beyond the papers)

A pair (G_real(w*), vector) is only as good as the two generators' agreement. Ours are trained on 744
real faces, few of which wear glasses (40) or a hat (37), so G_real rarely draws them: inverting a
render with a hat gives a latent whose realistic face usually has none, yet the pair still says
"hat". Trained on such pairs the estimator learns that faces without hats wear hats, and the reverse.

The same holds for hair: G_real draws mostly long hair, so a short-haired render's face often has
long hair. The shipped face parser (``models/parser/parser.onnx``, trained on real photos) reads
every realistic face; what it can see -- glasses and headwear (``colour_match.PARSE_PRESENCE``), the
hair-length rank (the real labels' hair-fraction thresholds; two ranks apart is a contradiction,
one is within their soft boundaries) and the fringe (hair over the forehead band) -- is measured by
the rules the validation applies to true masks and compared with the vector's tags. Where they
disagree that slot's label becomes ``UNKNOWN`` (left out of the loss; every other slot and the
sliders keep training). The pairs folder keeps the vectors' labels in ``discrete_vector.npy`` and
the counts in ``check.json``. Renders (the baseline) need no check: their labels are exact.
Semantically augmented copies change background, hair and (slightly) glasses codes only, so one
face per group (the unaugmented one) is read and its verdict holds for the whole group: 11 times
fewer parses (the parser reads ~22-90 faces/s on this CPU); when hair was augmented, the hair and
fringe verdicts hold for the unaugmented face only.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ...backend import fidelity
from ...backend.colour_match import PARSE_PRESENCE, ParserModel, parse_fringe, parse_shows
from ...backend.errors import UserError
from ...backend.progress import Progress
from ...backend.schema import Pack
from ..estimator.paired_set import UNKNOWN
from ..estimator.real_labels import hair_rank_of_fraction, loss_spec

HAIR_RANK_GAP = 2
CHECKS = ("glasses", "headwear", "hair_length", "fringe")     # what the parser can check

def check_pairs(pairs: str | os.PathLike, pack: Pack, parser_path: str | os.PathLike,
                batch: int = 256, progress: bool = True, log=print,
                labels: Sequence[str] = CHECKS) -> dict:
    """Mark contradicted labels of a paired set UNKNOWN (idempotent); returns the counts.
    ``labels``: which of ``CHECKS`` to check (the others keep the vector's label)."""
    unknown = [name for name in labels if name not in CHECKS]
    if unknown or not labels:
        raise UserError(f"pair check labels {list(labels)}: choose from {', '.join(CHECKS)}")
    folder = Path(pairs)
    images = np.load(folder / "images.npy", mmap_mode="r")
    original = folder / "discrete_vector.npy"
    if not original.is_file():
        tmp = folder / "discrete_vector.tmp.npy"
        np.save(tmp, np.load(folder / "discrete.npy"))
        os.replace(tmp, original)
    which, labels = labels, np.load(original)
    if labels.shape != (len(images), len(pack.slots)):
        raise UserError(f"{folder}: labels {labels.shape} do not fit {len(images)} images and pack "
                        f"'{pack.id}' ({len(pack.slots)} slots)")
    parser = ParserModel(parser_path, device="cpu", threads=1)
    groups_path = folder / "groups.npy"
    groups = np.load(groups_path) if groups_path.is_file() else np.arange(len(images))
    if len(groups) != len(images):
        raise UserError(f"{folder}: {len(groups)} group ids for {len(images)} images")
    # the first image of each group (synthesize_pairs writes the unaugmented face first)
    _, first, inverse = np.unique(groups, return_index=True, return_inverse=True)
    checks = [c for c in _checks(pack, parser.parts) if c.name in which]
    if not checks:
        raise UserError(f"pack '{pack.id}' has no slot the parser can check ({', '.join(which)})")
    # Hair augmentation redraws hair within a group: then the unaugmented face's hair verdict holds
    # for that face only.
    hair_augmented = _hair_augmented(folder)
    out = labels.copy()
    counts = {}
    t0 = time.monotonic()
    face = np.full((len(first), len(checks)), -1, np.int64)   # per group: what its face shows
    bar = Progress(len(first), "pair check", enabled=progress)
    for start in range(0, len(first), batch):
        rows = first[start:start + batch]
        parts = parser.run(np.asarray(images[np.sort(rows)])[np.argsort(np.argsort(rows))])
        for j, c in enumerate(checks):
            face[start:start + len(rows), j] = c.read(parts, parser.parts)
        bar.update(len(rows))
    bar.close()
    is_first = np.zeros(len(images), bool)
    is_first[first] = True
    for j, c in enumerate(checks):
        shows, vec = face[inverse, j], c.label_value[labels[:, c.slot]]
        known = (shows >= 0) & (vec >= 0)
        if c.name in ("hair_length", "fringe") and hair_augmented:
            known &= is_first
        bad = known & c.contradicts(shows, vec)
        out[bad, c.slot] = UNKNOWN
        if c.name == "hair_length":
            kinds = {"vector_shorter": bad & (vec < shows), "vector_longer": bad & (vec > shows)}
        else:
            kinds = {"vector_yes_face_no": bad & (vec == 1), "vector_no_face_yes": bad & (vec == 0)}
        counts[c.name] = {"agree": int((known & ~bad).sum()),
                          **{k: int(v.sum()) for k, v in kinds.items()},
                          "unchecked": int((~known).sum())}
    tmp = folder / "discrete.tmp.npy"
    np.save(tmp, out)
    os.replace(tmp, folder / "discrete.npy")
    summary = {"pairs": int(len(images)), "faces_read": int(len(first)), "parser": str(parser_path),
               "checks": counts,
               "seconds": round(time.monotonic() - t0, 1)}
    (folder / "check.json").write_text(json.dumps(summary, indent=1))
    log("pair check: " + "; ".join(
        f"{t}: " + ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in c.items())
        for t, c in counts.items()))
    return summary


@dataclass(frozen=True)
class _Check:
    """One label the parser can check: ``read`` gives each parsed face's value (-1 unknown),
    ``label_value`` each option's value (-1 untagged), ``contradicts`` compares them."""
    name: str
    slot: int
    label_value: np.ndarray
    read: Callable[[np.ndarray, Sequence[str]], np.ndarray]
    contradicts: Callable[[np.ndarray, np.ndarray], np.ndarray]


def _checks(pack: Pack, parts: Sequence[str]) -> list[_Check]:
    out = []
    differ = lambda a, b: a != b
    for k, slot in enumerate(pack.slots):
        for tag, (part, _) in PARSE_PRESENCE.items():
            if part in parts and any(tag in o.tags for o in slot.options):
                present = np.array([o.tags.get(tag, "none") != "none" for o in slot.options], np.int64)
                out.append(_Check(tag, k, present,
                                  lambda p, names, tag=tag: parse_shows(p, names, tag).astype(np.int64),
                                  differ))
    if "hair" not in parts:
        return out
    spec = loss_spec(pack)
    if spec["hair"] is not None:
        k, ranks = spec["hair"]
        # two ranks apart (short vs long, buzz vs medium): one rank is within the soft boundaries
        out.append(_Check("hair_length", k, ranks, _read_hair_rank,
                          lambda a, b: np.abs(a - b) >= HAIR_RANK_GAP))
    bangs = pack.slots_with_tag(fidelity.PRESENCE_TAGS["fringe"])
    if bangs:
        k = pack.slot_names.index(bangs[0])
        tag = fidelity.PRESENCE_TAGS["fringe"]
        present = np.array([-1 if tag not in o.tags else int(o.tags[tag] != "none")
                            for o in pack.slots[k].options], np.int64)
        out.append(_Check("fringe", k, present, parse_fringe, differ))
    return out


def _read_hair_rank(parts: np.ndarray, names: Sequence[str]) -> np.ndarray:
    """hair_length rank of each parsed face (the real labels' thresholds); -1 under a hat."""
    frac = (parts == names.index("hair")).mean(axis=(1, 2))
    rank = hair_rank_of_fraction(frac)
    if "hat" in names:
        rank[parse_shows(parts, names, "headwear")] = -1
    return rank


def _hair_augmented(folder: Path) -> bool:
    man = folder / "manifest.json"
    if not man.is_file():
        return False
    lambdas = json.loads(man.read_text()).get("aug_lambdas") or []
    return any(part == "hair" and float(lam) > 0 for part, lam in lambdas)
