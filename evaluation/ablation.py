"""The ablation tables on real photos (the method's Table 3): each row a `likeness retrain` work
folder whose estimator is judged alone on the validation photos (``row_report``), one markdown
table of the rows (``format_table``) and one of each row's difference from the first with a 95 %
paired bootstrap interval over the photos (``versus_table``). Used by ``scripts/ablation_table.py``
and ``scripts/input_size_study.py``.
"""
from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

COLUMNS = [("glasses", "glasses_balanced_accuracy"), ("headwear", "headwear_balanced_accuracy"),
           ("fringe", "fringe_balanced_accuracy"), ("hair ΔE00", "hair_colour_median_de00"),
           ("skin ΔE00", "skin_colour_median_de00"), ("hair amount", "hair_amount_spearman"),
           ("face aspect", "face_aspect_spearman"), ("eye area", "eye_area_ratio_spearman"),
           ("mouth width", "mouth_width_ratio_spearman"), ("nose length", "nose_length_ratio_spearman")]
LOWER_IS_BETTER = {"hair_colour_median_de00", "skin_colour_median_de00"}


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def row_report(work: Path, pack: str, limit: int | None) -> dict:
    from ..render_engine.validate_job import validate
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
    from ..backend import fidelity
    from ..render_engine.validate_job import read_stats
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
