#!/usr/bin/env python
"""The method comparison (the method's Table 1 on real photos) from one `likeness eval` folder:
every method on the same photos, each against a reference method (the shipped model) with 95 %
paired bootstrap intervals over the photos, and a photo | avatar-per-method sheet (Figure 6).

    likeness eval --photos val --methods default,onnx:RUN/model.onnx=swiftavatar,... --out EVAL
    python scripts/compare_methods.py EVAL [--reference default] [--out table.md]
        [--sheet sheet.png --sheet-photos 24] [--draws 1000] [--mask-draws 500]

Tables (markdown, printed and written to --out):
  1. the viewer's yardstick per attribute and its mean (``backend.viewer``, the photos' viewed labels),
     each method's mean minus the reference's with its interval, and speed (the method alone, batch 1,
     after a warm-up call, the eval's threads: its ``report.json``);
  2. each attribute minus the reference's, with intervals (``viewer.paired_bootstrap``);
  3. the mask measures (``backend.fidelity``: presence, colour ΔE00, Spearman of amounts and shape),
     the columns of the ablation table (``evaluation.ablation.COLUMNS``);
  4. each mask measure minus the reference's, with intervals (``fidelity.paired_bootstrap``);
  5. how much each method's avatars vary over the photos (``variety``): distinct option sets, the
     most common hairstyle's share, the sliders' spread. A method that answers every photo alike
     scores the class-blind floor however good its mean avatar is;
  6. how often each method's avatars show what the labels say the photos show (``shown``): glasses,
     facial hair, a hat, a fringe, long hair, black hair: a method can miss by showing too much as
     well as too little.
All six use only the photos on which every method gave an avatar, so the rows are paired. The mask
measures are recomputed from the eval folder's own renders, masks and vectors (lossless PNGs, the
same ``fidelity.avatar_stats`` as the eval) and the photos' CelebAMask-HQ masks; bold: the interval
excludes 0.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ATTR_LABELS = {"glasses": "glasses", "facial_hair": "facial hair", "hair_length": "hair length",
               "hair_color": "hair colour", "skin_tone": "skin tone", "bangs": "fringe", "hat": "hat"}


def load_report(folder: Path) -> dict:
    path = Path(folder) / "report.json"
    if not path.is_file():
        raise SystemExit(f"{folder}: no report.json (run `likeness eval ... --out {folder}` first)")
    return json.loads(path.read_text())


def common_stems(report: dict, names: list[str]) -> list[str]:
    """Photos on which every method gave an avatar (the rows are then paired)."""
    return [rec["stem"] for rec in report["per_photo"] if all(n in rec["methods"] for n in names)]


def _interval(d: dict, lo: str, hi: str, digits: int = 3) -> str:
    if d.get("diff") is None or d.get(lo) is None:
        return "n/a"
    cell = f"{d['diff']:+.{digits}f} [{d[lo]:+.{digits}f}, {d[hi]:+.{digits}f}]"
    return f"**{cell}**" if d[lo] > 0 or d[hi] < 0 else cell


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def yardstick(report: dict, names: list[str], ref: str, stems: list[str], draws: int, seed: int = 0
              ) -> dict:
    """name -> {"score": viewer.score, "vs": viewer.paired_bootstrap(name - ref)} on ``stems``."""
    from likeness.backend import viewer
    root = report["data"].get("root")
    path = viewer.labels_path(root)
    if not path.is_file():
        return {}
    labels = viewer.read_labels(path)
    by_stem = {rec["stem"]: rec for rec in report["per_photo"]}
    stems = [s for s in stems if s in labels
             and all("viewer_reading" in by_stem[s]["methods"][n] for n in names)]
    lab = [labels[s] for s in stems]
    reads = {n: [by_stem[s]["methods"][n]["viewer_reading"] for s in stems] for n in names}
    out = {}
    for n in names:
        out[n] = {"score": viewer.score(lab, reads[n]), "photos": len(stems)}
        if n != ref:
            out[n]["vs"] = viewer.paired_bootstrap(lab, reads[n], reads[ref], draws=draws, seed=seed)
    return out


def _png(path: Path) -> np.ndarray:
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im)


def mask_stats(folder: Path, report: dict, names: list[str], stems: list[str]) -> tuple[list, dict]:
    """(photo stats, name -> avatar stats) on ``stems``, from the photos' masks and the eval's files."""
    from likeness.backend import fidelity, realfaces
    from likeness.backend.schema import find_pack
    root = report["data"].get("root")
    pack = find_pack(report["pack"]["id"])
    by_stem = {rec["stem"]: rec for rec in report["per_photo"]}
    photo = []
    for s in stems:
        rgb, mask = realfaces.load_pair(s, root)
        photo.append(fidelity.mask_stats(mask, rgb))
    avatar = {}
    for n in names:
        rows = []
        for s in stems:
            m = by_stem[s]["methods"][n]
            render = Path(folder) / m["render"]                      # renders/<method>/<stem>.png
            mask = Path(folder) / "masks" / Path(m["render"]).relative_to("renders")
            vec = pack.vector_from_json((Path(folder) / m["vector"]).read_text())
            rows.append(fidelity.avatar_stats(_png(mask), _png(render)[..., :3], vector=vec))
        avatar[n] = rows
    return photo, avatar


def variety(folder: Path, report: dict, names: list[str], stems: list[str]) -> dict[str, dict]:
    """name -> {"option_sets": distinct option combinations, "top_hair": the most common hair
    option's share, "slider_sd": the continuous parameters' standard deviation over the photos
    (each normalised to its [0, 1] range), averaged} on ``stems``."""
    from collections import Counter
    from likeness.backend.schema import find_pack
    pack = find_pack(report["pack"]["id"])
    by_stem = {rec["stem"]: rec for rec in report["per_photo"]}
    hair = pack.slot_names.index("hair") if "hair" in pack.slot_names else None
    out = {}
    for n in names:
        arrays = [pack.vector_from_json((Path(folder) / by_stem[s]["methods"][n]["vector"]).read_text()
                                        ).to_arrays() for s in stems]
        sliders = np.array([c for c, _ in arrays], float)
        options = [tuple(d) for _, d in arrays]
        top = Counter(d[hair] for d in options).most_common(1)[0][1] / len(options) if hair is not None else None
        out[n] = {"option_sets": len(set(options)), "top_hair": top,
                  "slider_sd": float(sliders.std(0).mean()) if sliders.size else None}
    return out


SHOWN = (("glasses", "any"), ("facial_hair", "any"), ("hat", "yes"), ("bangs", "yes"),
         ("hair_length", "long"), ("hair_color", "black"))


def shown(report: dict, names: list[str], stems: list[str]) -> dict[str, dict[str, float | None]]:
    """"labels" and each name -> attribute=class -> the share of ``stems`` showing it (``SHOWN``),
    over the photos whose label is known (the avatar's reading: what a viewer reads in it)."""
    from likeness.backend import viewer
    path = viewer.labels_path(report["data"].get("root"))
    if not path.is_file():
        return {}
    labels = viewer.read_labels(path)
    by_stem = {rec["stem"]: rec for rec in report["per_photo"]}
    out: dict[str, dict[str, float | None]] = {"labels": {}, **{n: {} for n in names}}
    for attr, cls in SHOWN:
        known = [s for s in stems if s in labels and labels[s].classes.get(attr) is not None]
        key = f"{attr}={cls}"
        out["labels"][key] = float(np.mean([labels[s].classes[attr] == cls for s in known])) if known else None
        for n in names:
            reads = [by_stem[s]["methods"][n].get("viewer_reading", {}).get(attr) for s in known]
            out[n][key] = float(np.mean([r == cls for r in reads])) if known else None
    return out


def has_masks(report: dict, stems: list[str]) -> bool:
    root = report["data"].get("root")
    return bool(stems) and root is not None and all(
        (Path(root) / "masks" / f"{s}.png").is_file() for s in stems)


def speed_ms(report: dict, name: str) -> str:
    sp = report.get("speed", {}).get(name, {}).get("seconds_per_photo", {})
    if sp.get("median") is None:
        return "n/a"
    med = sp["median"] * 1000
    return f"{med:.1f}" if med < 100 else f"{med:,.0f}"


def tables(folder: Path, ref: str | None = None, labels: dict[str, str] | None = None,
           draws: int = 1000, mask_draws: int = 500) -> tuple[str, dict]:
    """(markdown, the numbers behind it) for the eval folder."""
    from likeness.backend import fidelity
    from likeness.evaluation.ablation import COLUMNS, LOWER_IS_BETTER
    report = load_report(folder)
    names = [m["name"] for m in report["methods"]]
    if not names:
        raise SystemExit(f"{folder}: the report has no methods")
    ref = ref or ("default" if "default" in names else names[0])
    if ref not in names:
        raise SystemExit(f"--reference {ref}: not a method of the report ({', '.join(names)})")
    labels = {n: (labels or {}).get(n, n) for n in names}
    stems = common_stems(report, names)
    hw = report.get("hardware", {})
    lines = [f"{len(stems)} photos on which every method gave an avatar "
             f"({report['counts']['detected']} of {report['counts']['photos']} with a usable face); "
             f"reference: {labels[ref]}; speed on {hw.get('machine')}, {hw.get('threads')} thread(s).", ""]
    numbers: dict = {"photos": stems, "reference": ref, "yardstick": {}, "masks": {}}

    ys = yardstick(report, names, ref, stems, draws) if stems else {}
    if ys:
        attrs = list(ATTR_LABELS)
        lines += ["| method | " + " | ".join(ATTR_LABELS[a] for a in attrs)
                  + f" | mean | mean − {labels[ref]} [95 %] | ms / photo |",
                  "|---|" + "---|" * (len(attrs) + 3)]
        for n in names:
            sc = ys[n]["score"]
            cells = [_fmt(sc["attributes"][a]["value"]) for a in attrs] + [_fmt(sc["mean"])]
            cells.append(_interval(ys[n]["vs"]["mean"], "low", "high") if n != ref else "(reference)")
            cells.append(speed_ms(report, n))
            lines.append(f"| {labels[n]} | " + " | ".join(cells) + " |")
            numbers["yardstick"][n] = {"attributes": {a: sc["attributes"][a]["value"] for a in attrs},
                                       "mean": sc["mean"], "vs": ys[n].get("vs")}
        others = [n for n in names if n != ref]
        if others:
            lines += ["", f"Each attribute minus {labels[ref]}'s ({draws} paired bootstrap draws of the "
                      "photos; bold: the interval excludes 0):", "",
                      f"| vs {labels[ref]} | " + " | ".join(ATTR_LABELS[a] for a in attrs) + " |",
                      "|---|" + "---|" * len(attrs)]
            for n in others:
                lines.append(f"| {labels[n]} | " + " | ".join(
                    _interval(ys[n]["vs"][a], "low", "high") for a in attrs) + " |")
    else:
        lines.append("(no viewer's yardstick: the photos carry no viewed labels)")

    if has_masks(report, stems):
        photo, avatar = mask_stats(folder, report, names, stems)
        vals = {}
        for n in names:
            rep = fidelity.compare(photo, avatar[n])
            vals[n] = {t: v for t, v, _, _ in fidelity.check_targets(rep)}
        numbers["masks"] = vals
        lines += ["", "Mask measures (the photos' CelebAMask-HQ masks against the avatars' renders; colour "
                  "ΔE00 lower is better, the rest higher; bold: a column's best):", "",
                  "| method | " + " | ".join(c for c, _ in COLUMNS) + " |", "|---|" + "---|" * len(COLUMNS)]
        for n in names:
            cells = []
            for _, key in COLUMNS:
                v = vals[n].get(key)
                col = [vals[m].get(key) for m in names if vals[m].get(key) is not None]
                top = (min(col) if key in LOWER_IS_BETTER else max(col)) if col else None
                cell = _fmt(v, 2 if "de00" in key else 3)
                cells.append(f"**{cell}**" if v is not None and v == top and len(names) > 1 else cell)
            lines.append(f"| {labels[n]} | " + " | ".join(cells) + " |")
        others = [n for n in names if n != ref]
        if others and mask_draws:
            lines += ["", f"Each mask measure minus {labels[ref]}'s ({mask_draws} paired bootstrap draws; "
                      "bold: the interval excludes 0; colour errors: negative is better):", "",
                      f"| vs {labels[ref]} | " + " | ".join(c for c, _ in COLUMNS) + " |",
                      "|---|" + "---|" * len(COLUMNS)]
            for n in others:
                res = fidelity.paired_bootstrap(photo, avatar[ref], avatar[n], None, resamples=mask_draws)
                numbers["masks"][n]["vs"] = {k: res[k] for _, k in COLUMNS}
                lines.append(f"| {labels[n]} | " + " | ".join(
                    _interval(res[k], "lo", "hi", 2 if "de00" in k else 3) for _, k in COLUMNS) + " |")
    else:
        lines += ["", "(no mask measures: the photos come without CelebAMask-HQ masks)"]
    if stems:
        var = variety(folder, report, names, stems)
        numbers["variety"] = var
        lines += ["", f"How much the avatars vary over the {len(stems)} photos:", "",
                  "| method | distinct option sets | most common hairstyle | slider spread (SD, 0-1 range) |",
                  "|---|---|---|---|"]
        for n in names:
            v = var[n]
            lines.append(f"| {labels[n]} | {v['option_sets']} | {_fmt(v['top_hair'], 2)} | "
                         f"{_fmt(v['slider_sd'])} |")
    rates = shown(report, names, stems) if stems else {}
    if rates:
        numbers["shown"] = rates
        keys = list(rates["labels"])
        lines += ["", "How often the avatars show what the labels say the photos show (share of the photos "
                  "whose label is known):", "", "| | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        for n in ["labels"] + names:
            lines.append(f"| {'the viewed labels' if n == 'labels' else labels[n]} | "
                         + " | ".join(_fmt(rates[n][k], 2) for k in keys) + " |")
    return "\n".join(lines) + "\n", numbers


def sheet(folder: Path, out: Path, n: int = 24, size: int = 128) -> list[str]:
    """Figure 6: one row per photo (the first ``n`` on which every method gave an avatar): the aligned
    photo, then each method's render in the report's order. Returns the stems shown."""
    from likeness.backend.png import encode_png
    from likeness.backend.visual import grid, resize_square
    report = load_report(folder)
    names = [m["name"] for m in report["methods"]]
    by_stem = {rec["stem"]: rec for rec in report["per_photo"]}
    stems = common_stems(report, names)[:n]
    if not stems:
        raise SystemExit(f"{folder}: no photo on which every method gave an avatar")
    tiles = []
    for s in stems:
        rec = by_stem[s]
        tiles.append(resize_square(_png(Path(folder) / rec["crop"])[..., :3], size))
        tiles += [resize_square(_png(Path(folder) / rec["methods"][m]["render"])[..., :3], size) for m in names]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_bytes(encode_png(grid(tiles, columns=1 + len(names))))
    return stems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("eval_dir", type=Path, help="a `likeness eval --out` folder")
    ap.add_argument("--reference", help="the method every row is compared with (default: 'default', "
                                        "else the first)")
    ap.add_argument("--label", action="append", default=[], metavar="NAME=LABEL",
                    help="a row label for a method name")
    ap.add_argument("--draws", type=int, default=1000, help="paired bootstrap draws (yardstick)")
    ap.add_argument("--mask-draws", type=int, default=500, help="paired bootstrap draws (mask measures)")
    ap.add_argument("--out", type=Path, help="also write the tables here")
    ap.add_argument("--json", type=Path, help="the numbers behind the tables")
    ap.add_argument("--sheet", type=Path, help="write the photo | avatar-per-method sheet here (PNG)")
    ap.add_argument("--sheet-photos", type=int, default=24)
    args = ap.parse_args(argv)
    labels = {}
    for item in args.label:
        name, sep, label = item.partition("=")
        if not sep:
            ap.error(f"--label {item}: expected NAME=LABEL")
        labels[name] = label
    text, numbers = tables(args.eval_dir, args.reference, labels, args.draws, args.mask_draws)
    if args.sheet:
        shown = sheet(args.eval_dir, args.sheet, args.sheet_photos)
        names = [labels.get(m["name"], m["name"]) for m in load_report(args.eval_dir)["methods"]]
        text += (f"\nSheet {args.sheet}: {len(shown)} photos, columns photo | " + " | ".join(names) + "\n")
    print(text)
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
