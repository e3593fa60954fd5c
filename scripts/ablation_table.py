#!/usr/bin/env python
"""The ablation on real photos (the method's Table 3): one `likeness retrain` work folder per row,
each row's estimator judged alone on the 256 validation photos, one markdown table.

    python scripts/ablation_table.py --row baseline=WORK1 --row "+ domain"=WORK2 --row "+ aug"=WORK3
        [--pack default] [--out ablation.md] [--limit N]

Rows come from e.g. ``likeness retrain --baseline``, ``--no-augment`` and the full run, with the same
``--set estimator_epochs=... estimator_epoch_images=...`` budget. Each model is validated with
colours and shape from the estimator (``--colours model --shape model``: reading them from the photo
would make the rows' colour and shape figures identical), into WORK/validate_estimator/ (reused when
it is there for the same model file).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

try:
    import likeness  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

COLUMNS = [("glasses", "glasses_balanced_accuracy"), ("headwear", "headwear_balanced_accuracy"),
           ("fringe", "fringe_balanced_accuracy"), ("hair ΔE00", "hair_colour_median_de00"),
           ("skin ΔE00", "skin_colour_median_de00"), ("hair amount", "hair_amount_spearman"),
           ("face aspect", "face_aspect_spearman"), ("eye area", "eye_area_ratio_spearman"),
           ("mouth width", "mouth_width_ratio_spearman"), ("nose length", "nose_length_ratio_spearman")]
LOWER_IS_BETTER = {"hair_colour_median_de00", "skin_colour_median_de00"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def row_report(work: Path, pack: str, limit: int | None) -> dict:
    from likeness.render_engine.validate_job import validate
    model = work / "model.onnx"
    if not model.is_file():
        raise SystemExit(f"{work}: no model.onnx (finish its `likeness retrain` first)")
    out = work / "validate_estimator"
    rep_path, key_path = out / "report.json", out / "model.sha256"
    key = f"{sha(model)} {limit}"
    if rep_path.is_file() and key_path.is_file() and key_path.read_text() == key:
        return json.loads(rep_path.read_text())
    rep = validate(str(model), pack, str(out), limit=limit, colours="model", shape="model",
                   log=lambda s: print(s, file=sys.stderr))
    key_path.write_text(key)
    return rep


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=WORK")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--limit", type=int)
    args = ap.parse_args(argv)
    rows = []
    for item in args.row:
        label, sep, work = item.partition("=")
        if not sep:
            ap.error(f"--row {item}: expected LABEL=WORK")
        rep = row_report(Path(work).expanduser(), args.pack, args.limit)
        values = {t["name"]: t["value"] for t in rep["targets"]}
        rows.append((label, values, sum(t["passed"] for t in rep["targets"]), len(rep["targets"])))
    lines = ["| row | " + " | ".join(c for c, _ in COLUMNS) + " | targets met |",
             "|---|" + "---|" * (len(COLUMNS) + 1)]
    for label, values, met, n in rows:
        cells = []
        for _, key in COLUMNS:
            v = values.get(key)
            best = [r[1].get(key) for r in rows if r[1].get(key) is not None]
            top = (min(best) if key in LOWER_IS_BETTER else max(best)) if best else None
            cell = "n/a" if v is None else f"{v:.3f}" if "de00" not in key else f"{v:.2f}"
            cells.append(f"**{cell}**" if v is not None and v == top and len(rows) > 1 else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {met} of {n} |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
