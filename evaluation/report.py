"""The evaluation's outputs: report.json (everything), report.html (self-contained: tables and a
Figure-6-style grid, photo | each method's avatar), and rating.html (``evaluation.rating``).

Tables and the page skeleton come from ``backend.report_html``, shared with ``likeness validate``.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..backend.report_html import (comparison_rows, comparison_targets, fmt, html_table,
                                   json_default, page)
from ..backend.visual import image_data_uri

GRID_PHOTOS = 48        # rows of the report's picture grid (the rating page shows every photo)
GRID_THUMB = 96         # px


def write_reports(out: Path, report: Mapping[str, Any], thumbs: Sequence[Mapping[str, Any]],
                  seed: int = 0) -> None:
    from ..render_engine.dataset import atomic_write
    from .rating import rating_page
    atomic_write(out / "report.json", json.dumps(report, indent=2, default=json_default).encode())
    atomic_write(out / "report.html", to_html(report, thumbs).encode())
    atomic_write(out / "rating.html", rating_page(report, thumbs, seed).encode())


def _p(text: str) -> str:
    return f"<p>{html.escape(text)}</p>"


def _provenance(r: Mapping[str, Any]) -> str:
    d, hw, c = r["data"], r["hardware"], r["counts"]
    data = f"{d['photos']} photos from {d['source']}"
    if d.get("source") == "val":
        data += f" ({d['root']}, validation split: {d['rule']}; {d['licence']})"
    if d.get("limit"):
        data += f", the first {d['photos']} of {d['available']}"
    la = hw.get("load_average")
    return (_p(f"Data: {data}. Parsing masks: {d.get('masks')}.")
            + _p(f"Pack: {r['pack']['id']} {r['pack']['version']} (schema {r['pack']['schema']}).")
            + _p(f"Hardware: {hw['machine']}; {hw['threads']} thread(s) per method"
                 + (f"; load average {la[0]:.2f} / {la[1]:.2f} / {la[2]:.2f} at the end (a shared machine "
                    "slows every method alike)" if la else "") + ".")
            + _p((f"Face detection {r['align']['detection']}: {c['detected']} of {c['photos']} images "
                  f"read ({c['failed']} unreadable or not square, listed below)"
                  if r["align"].get("detection_skipped") else
                  f"Faces: {c['detected']} of {c['photos']} photos detected and aligned "
                  f"({c['failed']} without a usable face, listed below)")
                 + f"; {c['method_failures']} method failures. Created {r['created']}, "
                 f"{r['seconds_total']:.1f} s in all."))


def _methods_table(r: Mapping[str, Any]) -> str:
    body = [[m["name"], m["spec"], m.get("path", ""), m.get("sha256", ""), fmt(m["load_seconds"], 2)]
            for m in r["methods"]]
    return html_table(("method", "spec", "model", "sha256 (16)", "load s"), body)


def _speed_table(r: Mapping[str, Any]) -> str:
    body = []
    for name, s in r["speed"].items():
        sp = s["seconds_per_photo"]
        body.append([name, str(s["photos"]), fmt(sp["median"], 4), fmt(sp["mean"], 4),
                     fmt(s["images_per_s"], 1), fmt(s.get("images_per_s_with_detection"), 1)])
    a, rd = r["align"]["seconds"], r["render"]["seconds"]
    return (html_table(("method", "photos", "median s / photo", "mean s / photo", "images/s",
                        "images/s incl. detect + align"), body)
            + _p(f"Batch 1, after one untimed warm-up call per method. Shared by every method: load + "
                 f"detect + align at {r['align']['size']} px, median {fmt(a['median'], 3)} s a photo; "
                 f"the engine's render ({r['render']['engine']}, {r['render']['resolution']} px), median "
                 f"{fmt(rd['median'], 3)} s an avatar (not part of any method's time)."))


def _truth_section(t: Mapping[str, Any]) -> str:
    if "skipped" in t:
        return _p(t["skipped"])
    rows_ = {**t["methods"], "constant (pack default)": t["constant"]}
    body = []
    for name, m in rows_.items():
        if not m.get("n"):
            body.append([name, "0", "–", "–", "–", "–"])
            continue
        body.append([name, str(m["n"]), fmt(m["slot_accuracy"]["mean"]), fmt(m["l1"]["mean"]),
                     fmt(m["mask_iou"]["mean"]), fmt(m["lpips"]["mean"])])
    out = html_table(("method", "photos", "slot accuracy (mean over slots)", "continuous L1",
                      "mask IoU (mean over parts)", "LPIPS"), body)
    lp = t["lpips"]
    out += _p(lp["note"] if lp["status"] == "skipped" else f"LPIPS measured: {lp['note']}")
    out += _p(t["l1_note"] + "; " + t["iou_note"] + ".")
    if t.get("photos_without_truth"):
        out += _p(f"No true vector in {t['dir']} for {len(t['photos_without_truth'])} photo(s), not "
                  "measured here: " + ", ".join(t["photos_without_truth"]))
    slots = list(dict.fromkeys(s for m in rows_.values() if m.get("n") for s in m["slot_accuracy"]["per_slot"]))
    if slots:
        body = [[s, *[fmt(m["slot_accuracy"]["per_slot"].get(s)) if m.get("n") else "–"
                      for m in rows_.values()]] for s in slots]
        out += "<h3>Accuracy per slot</h3>" + html_table(("slot", *rows_), body)
    return out


def _fidelity_section(f: Mapping[str, Any]) -> str:
    if "skipped" in f:
        return _p(f["skipped"])
    measured = {n: rep for n, rep in f["methods"].items() if "skipped" not in rep}
    out = _p(f"{f['n_photos']} photos measured by {f['photos_measured_by']}; each avatar by its render's "
             "mask (presence from its option tags), as in likeness validate. 'constant' is the pack's "
             "default avatar for every photo.")
    out += "".join(_p(f"{n}: {rep['skipped']}") for n, rep in f["methods"].items() if "skipped" in rep)
    if measured:
        head, body = comparison_rows(measured)
        out += html_table(head, body)
        head, body = comparison_targets(measured)
        out += "<h3>Targets</h3>" + html_table(head, body)
    return out


def _failures_section(r: Mapping[str, Any]) -> str:
    out = ""
    if r["failures"]:
        out += html_table(("photo", "file", "why no face"), [[f["stem"], f["photo"], f["error"]]
                                                              for f in r["failures"]])
    else:
        out += _p("Every photo gave a usable face.")
    if r["method_failures"]:
        out += html_table(("photo", "method", "error"), [[f["stem"], f["method"], f["error"]]
                                                         for f in r["method_failures"]])
    return out


def _grid(r: Mapping[str, Any], thumbs: Sequence[Mapping[str, Any]]) -> str:
    names = [m["name"] for m in r["methods"]]
    has_truth = any("truth" in t for t in thumbs)
    head = ["photo", *names] + (["truth"] if has_truth else [])
    body = []
    for t in thumbs[:GRID_PHOTOS]:
        def img(a, alt):
            if a is None:
                return "–"
            return f'<img src="{image_data_uri(a, GRID_THUMB)}" alt="{html.escape(alt)}" width="{GRID_THUMB}">'
        cells = [img(t["photo"], t["stem"]) + f"<br>{html.escape(t['stem'])}"]
        cells += [img(t["avatars"].get(n), n) for n in names]
        if has_truth:
            cells.append(img(t.get("truth"), "truth"))
        body.append(cells)
    note = (_p(f"The first {GRID_PHOTOS} of {len(thumbs)} photos; every render is in renders/.")
            if len(thumbs) > GRID_PHOTOS else "")
    return html_table(head, body, raw=True) + note


def _viewer_section(v: Mapping[str, Any]) -> str:
    """Per method the balanced accuracy of each viewed attribute and their mean (the headline),
    with the paired bootstrap against the first method."""
    from ..backend.viewer import ATTRIBUTES
    if "skipped" in v or not v:
        return _p(v.get("skipped", "no method produced an avatar for a labelled photo"))
    head = ["method", *ATTRIBUTES, "mean", "photos"]
    fmt = lambda x: "n/a" if x is None else f"{x:.3f}"
    body = []
    for name, e in v.items():
        row = [html.escape(name)]
        against = next((d for k, d in e.items() if k.startswith("against_")), None)
        for a in [*ATTRIBUTES, "mean"]:
            val = e["mean"] if a == "mean" else e["attributes"][a]["value"]
            cell = fmt(val)
            if against and against[a]["diff"] is not None:
                cell += f" ({against[a]['diff']:+.3f} [{fmt(against[a]['low'])}, {fmt(against[a]['high'])}])"
            row.append(cell)
        row.append(str(e["photos"]))
        body.append(row)
    return (html_table(head, body, raw=True)
            + _p("Balanced accuracy between each photo's viewed label and the avatar as a viewer reads "
                 "it (option tags; hair and skin colour from the render), in brackets the difference "
                 "from the first method with its 95 % paired bootstrap interval."))


def to_html(r: Mapping[str, Any], thumbs: Sequence[Mapping[str, Any]]) -> str:
    body = (_provenance(r)
            + "<h2>The viewer's yardstick</h2>" + _viewer_section(r.get("viewer") or {})
            + "<h2>Methods</h2>" + _methods_table(r)
            + "<h2>Speed</h2>" + _speed_table(r)
            + "<h2>Against true vectors</h2>" + _truth_section(r["truth"])
            + "<h2>Fidelity to the photo (label-free)</h2>" + _fidelity_section(r["fidelity"])
            + "<h2>Failures</h2>" + _failures_section(r)
            + "<h2>Photos and avatars</h2>" + _grid(r, thumbs)
            + _p("Human rating: open rating.html beside this report."))
    return page("Likeness evaluation", body, style="img{image-rendering:auto;display:block}")
