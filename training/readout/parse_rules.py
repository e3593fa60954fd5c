"""The parse rules' thresholds, chosen on the TRAIN photos' viewed labels.

Without an attribute reader (``--attributes model``, or a reader's files missing), the photo's parse
switches on a hat or a fringe the estimator missed (``backend.predict.Predictor._photo_presence``):
a hat when the parser's hat pixels cover at least a fraction of the frame, a fringe when hair covers
at least a fraction of the forehead band (``fidelity.mask_stats``' ``fringe_fraction``). Each
threshold is the one whose rule best agrees with the viewed labels (balanced accuracy) of the 744
TRAIN photos, each parsed as a new photo would be: by a cross-fitted parser that never saw it
(``photo_parser train --fold K/3``; the shipped parser was trained on every TRAIN photo and parses
them better than any user's). The validation photos are never read here.

    python -m likeness.training.readout.parse_rules --parsers models/attributes/parser_fold_*.onnx \
        --out models/parser/parser.rules.json
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from ...backend import fidelity, realfaces
from ...backend.colour_match import PARSE_RULES_KIND, ParserModel, parse_fractions
from ...backend.errors import UserError
from ...backend.viewer import balanced_accuracy, labels_path, read_labels

# the label column each rule is judged against, and the candidate thresholds screened
RULES = {"headwear": ("hat", np.geomspace(1e-4, 0.1, 61)), "bangs": ("bangs", np.linspace(0.01, 0.95, 95))}


def held_out_stems(parser: ParserModel) -> list[str]:
    """The TRAIN stems a cross-fitted parser never saw (its report's ``held_out``)."""
    held = (parser.report or {}).get("held_out")
    if not held:
        raise UserError(f"{parser.path}: not a cross-fitted parser (its report names no held-out "
                        "TRAIN stems; export it with `photo_parser export --fold K/N`)")
    return list(held)


def measure_train(parser_paths, root=None, size: int = 256, limit: int | None = None,
                  log=print) -> dict[str, dict]:
    """stem -> the parse's fractions (``parse_fractions``) for every TRAIN photo a parser never saw
    (the first ``limit`` of each), parsed by that parser from the photo aligned as ``likeness
    create`` aligns it."""
    from ...backend.predict import prepare_photo
    train = set(realfaces.stems(root, "train"))
    out = {}
    for path in parser_paths:
        parser = ParserModel(path, "cpu", 1)
        stems = held_out_stems(parser)
        if not set(stems) <= train:
            raise UserError(f"{path}: its held-out stems are not all TRAIN photos")
        for stem in stems[:limit]:
            if stem in out:
                raise UserError(f"{stem}: held out of more than one parser")
            img = Path(root or realfaces.default_root()) / "images" / f"{stem}.jpg"
            try:
                crop = prepare_photo(img, size=size).crop
            except UserError as e:
                log(f"  {stem}: skipped ({e})")
                continue
            out[stem] = parse_fractions(parser.run(crop)[0], parser.parts)
        log(f"{Path(path).name}: {len(stems[:limit])} TRAIN photos parsed")
    return out


def choose_threshold(values, truth, candidates) -> dict:
    """The candidate whose rule ``value >= t`` has the best balanced accuracy against ``truth``
    ("yes" / "no" / None; None values and truths are skipped); among equal ones the middle."""
    pairs = [(v, t) for v, t in zip(values, truth) if v is not None and t is not None]
    v = np.array([p[0] for p in pairs], float)
    t = [p[1] for p in pairs]
    scores = np.array([balanced_accuracy(t, np.where(v >= c, "yes", "no").tolist(), ("no", "yes"))["value"]
                       for c in candidates])
    best = np.flatnonzero(scores >= scores.max() - 1e-12)
    k = int(best[len(best) // 2])
    return {"threshold": float(candidates[k]), "balanced_accuracy": float(scores[k]), "n": len(pairs),
            "positives": int(sum(x == "yes" for x in t))}


def fit(parser_paths, out=None, root=None, limit: int | None = None, log=print) -> dict:
    """Choose every rule's threshold (``RULES``) on the TRAIN photos; write them to ``out``."""
    fractions = measure_train(parser_paths, root, limit=limit, log=log)
    labels = read_labels(labels_path(root))
    stems = sorted(fractions)
    rules, report = {}, {}
    for tag, (column, candidates) in RULES.items():
        values = [fractions[s][tag] for s in stems]
        truth = [labels[s].classes[column] if s in labels else None for s in stems]
        chosen = choose_threshold(values, truth, candidates)
        now = {"headwear": fidelity.PRESENCE_THRESHOLDS["headwear"], "bangs": fidelity.FRINGE_THRESHOLD}[tag]
        mask_rule = choose_threshold(values, truth, np.array([now]))
        rules[tag] = round(chosen["threshold"], 6)
        report[tag] = {**chosen, "mask_rule_threshold": now,
                       "mask_rule_balanced_accuracy": mask_rule["balanced_accuracy"]}
        log(f"{tag}: threshold {chosen['threshold']:.4g} (TRAIN balanced accuracy "
            f"{chosen['balanced_accuracy']:.3f}, {chosen['positives']} of {chosen['n']} with the label); "
            f"the mask rule's {now:.4g}: {mask_rule['balanced_accuracy']:.3f}")
    data = {"kind": PARSE_RULES_KIND, "format": 1, "thresholds": rules,
            "chosen_on": {"photos": "TRAIN", "parsers": [Path(p).name for p in parser_paths],
                          "labels": "attributes.csv (viewed)", "report": report}}
    if out:
        Path(out).write_text(json.dumps(data, indent=1) + "\n")
        log(f"wrote {out}")
    return data


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m likeness.training.readout.parse_rules",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--parsers", nargs="+", required=True, help="cross-fitted parser .onnx files")
    ap.add_argument("--out", help="where to write the rules (beside the parser they are for: "
                    "parser.onnx -> parser.rules.json)")
    ap.add_argument("--data", help="the shared faces folder (default: ../shared/data/celebamask-hq-1k)")
    args = ap.parse_args(argv)
    try:
        fit(args.parsers, args.out, args.data)
    except UserError as err:
        print(f"parse_rules: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
