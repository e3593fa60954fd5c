#!/usr/bin/env python
"""The ablation on real photos (the method's Table 3): one `likeness retrain` work folder per row,
each row's estimator judged alone on the 256 validation photos, one markdown table.

    python scripts/ablation_table.py --row baseline=WORK1 --row "+ domain"=WORK2 --row "+ aug"=WORK3
        [--pack default] [--out ablation.md] [--limit N]

Rows come from e.g. ``likeness retrain --baseline``, ``--no-augment`` and the full run, with the same
``--set estimator_epochs=... estimator_epoch_images=...`` budget. Each model is validated with
colours and shape from the estimator (``--colours model --shape model``: reading them from the photo
would make the rows' colour and shape figures identical), into WORK/validate_estimator/ (reused when
it is there for the same model file). A second table gives each row's difference from the first row
with a 95 % paired bootstrap interval over the photos (``fidelity.paired_bootstrap``), so chance
differences on a 256-photo split are not read as findings.
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
    if (rep_path.is_file() and key_path.is_file() and key_path.read_text() == key
            and (out / "stats.json").is_file()):
        return json.loads(rep_path.read_text())
    rep = validate(str(model), pack, str(out), limit=limit, colours="model", shape="model",
                   log=lambda s: print(s, file=sys.stderr))
    key_path.write_text(key)
    return rep


def format_table(rows: list[tuple[str, dict]], extra: dict[str, dict[str, str]] | None = None) -> str:
    """Markdown: one row per (label, validation report), the best value of each column in bold;
    ``extra`` adds columns per label (e.g. training cost)."""
    extra = extra or {}
    extra_cols = list(dict.fromkeys(k for cols in extra.values() for k in cols))
    values = [{t["name"]: t["value"] for t in rep["targets"]} for _, rep in rows]
    lines = ["| row | " + " | ".join([c for c, _ in COLUMNS] + extra_cols) + " | targets met |",
             "|---|" + "---|" * (len(COLUMNS) + len(extra_cols) + 1)]
    for (label, rep), vals in zip(rows, values):
        cells = []
        for _, key in COLUMNS:
            v = vals.get(key)
            best = [r.get(key) for r in values if r.get(key) is not None]
            top = (min(best) if key in LOWER_IS_BETTER else max(best)) if best else None
            cell = "n/a" if v is None else f"{v:.3f}" if "de00" not in key else f"{v:.2f}"
            cells.append(f"**{cell}**" if v is not None and v == top and len(rows) > 1 else cell)
        cells += [extra.get(label, {}).get(c, "") for c in extra_cols]
        met = sum(t["passed"] for t in rep["targets"])
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {met} of {len(rep['targets'])} |")
    return "\n".join(lines) + "\n"


def versus_table(rows: list[tuple[str, Path]], resamples: int = 500) -> str:
    """Markdown: each row against the first, per column: the difference with its 95 % paired
    bootstrap interval over the validation photos; bold where the interval excludes 0."""
    from likeness.backend import fidelity
    from likeness.render_engine.validate_job import read_stats
    (base_label, base_dir), others = rows[0], rows[1:]
    base = read_stats(base_dir / "stats.json")
    lines = [f"| vs {base_label} | " + " | ".join(c for c, _ in COLUMNS) + " |",
             "|---|" + "---|" * len(COLUMNS)]
    for label, folder in others:
        st = read_stats(folder / "stats.json")
        if st["stems"] != base["stems"]:
            raise SystemExit(f"{label}: validated on other photos than {base_label}; "
                             "use the same --limit")
        res = fidelity.paired_bootstrap(base["photo"], base["avatar"], st["avatar"],
                                        base["constant"], resamples=resamples)
        cells = []
        for _, key in COLUMNS:
            r = res[key]
            if r["diff"] is None or r["lo"] is None:
                cells.append("n/a")
                continue
            cell = f"{r['diff']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]"
            cells.append(f"**{cell}**" if r["lo"] > 0 or r["hi"] < 0 else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--row", action="append", required=True, metavar="LABEL=WORK")
    ap.add_argument("--pack", default="default")
    ap.add_argument("--out", help="also write the table here")
    ap.add_argument("--limit", type=int)
    ap.add_argument("--bootstrap", type=int, default=500, metavar="N",
                    help="paired bootstrap draws for the second table (each row against the "
                         "first; 0: no second table)")
    args = ap.parse_args(argv)
    rows, folders = [], []
    for item in args.row:
        label, sep, work = item.partition("=")
        if not sep:
            ap.error(f"--row {item}: expected LABEL=WORK")
        work = Path(work).expanduser()
        rows.append((label, row_report(work, args.pack, args.limit)))
        folders.append((label, work / "validate_estimator"))
    table = format_table(rows)
    if args.bootstrap and len(rows) > 1:
        table += ("\nEach row minus the first, with its 95 % paired bootstrap interval over the "
                  f"validation photos ({args.bootstrap} draws; bold: the interval excludes 0; "
                  "colour errors: negative is better):\n\n" + versus_table(folders, args.bootstrap))
    print(table)
    if args.out:
        Path(args.out).write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
