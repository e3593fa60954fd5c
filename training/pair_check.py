"""Pair check: does the realistic face show what its avatar vector says? (beyond the papers)

A pair (G_real(w*), vector) is only as good as the two generators' agreement. Ours are trained on 744
real faces, few of which wear glasses (40) or a hat (37), so G_real rarely draws them: inverting a
render with a hat gives a latent whose realistic face usually has none, yet the pair still says
"hat". Trained on such pairs the estimator learns that faces without hats wear hats, and the reverse.

The shipped face parser (``models/parser/parser.onnx``, trained on real photos) reads every realistic
face; for each presence it can see (``colour_match.PARSE_PRESENCE``: glasses, headwear) the face's answer, by the same
pixel rule the validation applies to true masks, is compared with the vector's tag. Where they
disagree that slot's label becomes ``UNKNOWN`` (left out of the loss; every other slot and the
sliders keep training). The pairs folder keeps the vectors' labels in ``discrete_vector.npy`` and
the counts in ``check.json``. Renders (the baseline) need no check: their labels are exact.
Semantically augmented copies change background, hair and (slightly) glasses codes only, so one
face per group (the unaugmented one) is read and its verdict holds for the whole group: 11 times
fewer parses (the parser reads ~22-90 faces/s on this CPU).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np

from ..backend.colour_match import PARSE_PRESENCE, ParserModel, parse_shows
from ..backend.errors import UserError
from ..backend.progress import Progress
from ..backend.schema import Pack
from .estimator import UNKNOWN

def check_pairs(pairs: str | os.PathLike, pack: Pack, parser_path: str | os.PathLike,
                batch: int = 256, progress: bool = True, log=print) -> dict:
    """Mark contradicted presence labels of a paired set UNKNOWN (idempotent); returns the counts."""
    folder = Path(pairs)
    images = np.load(folder / "images.npy", mmap_mode="r")
    original = folder / "discrete_vector.npy"
    if not original.is_file():
        tmp = folder / "discrete_vector.tmp.npy"
        np.save(tmp, np.load(folder / "discrete.npy"))
        os.replace(tmp, original)
    labels = np.load(original)
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
    slots = []
    for k, slot in enumerate(pack.slots):
        for tag, (part, _) in PARSE_PRESENCE.items():
            if part in parser.parts and any(tag in o.tags for o in slot.options):
                present = np.array([o.tags.get(tag, "none") != "none" for o in slot.options])
                slots.append((k, tag, present))
    if not slots:
        raise UserError(f"pack '{pack.id}' has no slot the parser can check ({', '.join(PARSE_PRESENCE)})")
    out = labels.copy()
    counts = {tag: {"agree": 0, "vector_yes_face_no": 0, "vector_no_face_yes": 0}
              for _, tag, _ in slots}
    t0 = time.monotonic()
    face = np.zeros((len(first), len(slots)), bool)          # per group: what its face shows
    bar = Progress(len(first), "pair check", enabled=progress)
    for start in range(0, len(first), batch):
        rows = first[start:start + batch]
        parts = parser.run(np.asarray(images[np.sort(rows)])[np.argsort(np.argsort(rows))])
        for j, (_, tag, _) in enumerate(slots):
            face[start:start + len(rows), j] = parse_shows(parts, parser.parts, tag)
        bar.update(len(rows))
    bar.close()
    for j, (k, tag, present) in enumerate(slots):
        shows, vec = face[inverse, j], present[labels[:, k]]
        bad = shows != vec
        out[bad, k] = UNKNOWN
        c = counts[tag]
        c["agree"] += int((~bad).sum())
        c["vector_yes_face_no"] += int((vec & ~shows).sum())
        c["vector_no_face_yes"] += int((~vec & shows).sum())
    tmp = folder / "discrete.tmp.npy"
    np.save(tmp, out)
    os.replace(tmp, folder / "discrete.npy")
    summary = {"pairs": int(len(images)), "faces_read": int(len(first)), "parser": str(parser_path),
               "checks": counts,
               "seconds": round(time.monotonic() - t0, 1)}
    (folder / "check.json").write_text(json.dumps(summary, indent=1))
    log("pair check: " + "; ".join(
        f"{t}: {c['agree']} agree, vector yes / face no {c['vector_yes_face_no']}, "
        f"vector no / face yes {c['vector_no_face_yes']}" for t, c in counts.items()))
    return summary
