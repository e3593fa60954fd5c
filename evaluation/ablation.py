"""The ablation tables on real photos (the method's Table 3): each row a `likeness retrain` work
folder whose estimator is judged alone on the validation photos (``row_report``), one markdown
table of the rows (``format_table``) and one of each row's difference from the first with a 95 %
paired bootstrap interval over the photos (``versus_table``). The same rows on the viewer's
yardstick (``yardstick_table``): each estimator alone, and with the real-face prior (the attribute
reader, colours and shape from the photo) on top. Used by ``scripts/ablation_table.py`` and
``scripts/input_size_study.py``.
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


# How a row's estimator is judged: alone (every option, slider and colour its own: the paper's
# setting) or with the real-face prior on top (the attribute reader, colours and shape from the
# photo: what `likeness create` gives with that estimator).
MODES = {"alone": {"colours": "model", "shape": "model", "attributes": "model"},
         "prior": {"colours": None, "shape": None, "attributes": None}}
FOLDERS = {"alone": "validate_estimator", "prior": "validate_prior"}


def row_model(work: Path) -> Path:
    """A row's estimator: WORK/model.onnx of a retrain work folder, or an .onnx file itself."""
    model = work if work.suffix == ".onnx" else work / "model.onnx"
    if not model.is_file():
        raise SystemExit(f"{work}: no model.onnx (finish its `likeness retrain` first)")
    return model


def row_folder(work: Path, mode: str = "alone") -> Path:
    """Where a row's validation goes: inside its work folder, or for a bare .onnx (e.g. the shipped
    model) a cache folder named by the file's content."""
    if work.suffix != ".onnx":
        return work / FOLDERS[mode]
    return (Path.home() / ".cache" / "likeness" / "ablation" / sha(work)[:16]) / FOLDERS[mode]


def row_report(work: Path, pack: str, limit: int | None, mode: str = "alone") -> dict:
    """The validation report of a row's estimator judged ``mode`` (reused when the folder holds one
    of the same model file, photo limit and mode)."""
    from ..render_engine.validate_job import validate
    model = row_model(work)
    out = row_folder(work, mode)
    rep_path, key_path = out / "report.json", out / "model.sha256"
    key = f"{sha(model)} {limit} {mode}"
    if (rep_path.is_file() and key_path.is_file() and key_path.read_text() == key
            and (out / "stats.json").is_file() and (out / "viewer.json").is_file()):
        return json.loads(rep_path.read_text())
    out.mkdir(parents=True, exist_ok=True)
    rep = validate(str(model), pack, str(out), limit=limit, log=lambda s: print(s, file=sys.stderr),
                   **MODES[mode])
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


def yardstick_table(rows: list[tuple[str, dict, Path]], groups: list[str] | None = None) -> str:
    """Markdown: one row per (label, validation report, its folder) on the viewer's yardstick (per
    attribute, mean, high-confidence mean, glasses type), each row's mean against the first row of
    its group (``groups``, one name per row; default: one group) with its 95 % paired bootstrap
    interval over the photos both judged (2,000 draws)."""
    from ..backend import realfaces, viewer
    attrs = list(viewer.ATTRIBUTES)
    labels = viewer.read_labels(viewer.labels_path(realfaces.default_root()))
    lines = ["| row | " + " | ".join(attrs) + " | **mean** | high-conf. mean | glasses type | "
             "mean vs first row |", "|---|" + "---|" * (len(attrs) + 4)]
    firsts: dict[str, Path] = {}
    for (label, rep, folder), group in zip(rows, groups or [""] * len(rows)):
        v = rep.get("viewer")
        if not v:
            raise SystemExit(f"{label}: its validation has no viewer's yardstick (labels missing?)")
        cells = [_f(v["attributes"][a]["value"]) for a in attrs]
        cells += [f"**{_f(v['mean'])}**", _f(v["high_confidence"]["mean"]),
                  _f(v["glasses_type"]["value"])]
        mine = json.loads((folder / "viewer.json").read_text())
        if group not in firsts:
            firsts[group] = folder
            cells.append("")
        else:
            judged = [(s, r) for s, r in zip(mine["stems"], mine["readings"]) if s in labels]
            cmp = viewer.compare_with(firsts[group] / "viewer.json", [s for s, _ in judged],
                                      [labels[s] for s, _ in judged], [r for _, r in judged])
            d = cmp["differences"]["mean"]
            cell = f"{d['diff']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]"
            cells.append(f"**{cell}**" if d["low"] > 0 or d["high"] < 0 else cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _f(v) -> str:
    return "n/a" if v is None else f"{v:.3f}"
