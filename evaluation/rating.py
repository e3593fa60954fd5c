"""The human-rating page and its tabulation (the method's Table 2: share of "best match" votes).

``rating.html`` is one self-contained page: for each photo its aligned face and the methods'
avatars, labelled A, B, C... in an order shuffled per photo with a fixed seed (the same page for
every rater, no position bias across photos). A click records the best match; votes stay in the
browser's localStorage (per study, so two rating pages never mix) and "Export CSV" downloads
them. ``likeness eval tabulate A.csv B.csv ...`` turns raters' exports into the preference table.

CSV columns: study, rater, photo, choice (method name), position (0-based, as shown), order
(the methods as shown, ";"-separated), time (ISO 8601).
"""
from __future__ import annotations

import csv
import hashlib
import html
import json
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..backend.errors import UserError

CSV_COLUMNS = ("study", "rater", "photo", "choice", "position", "order", "time")
THUMB = 128


def study_id(report: Mapping[str, Any], stems: Sequence[str], seed: int) -> str:
    """Names one rating page: the pack, the methods, the photos and the seed."""
    blob = json.dumps([report["pack"]["schema"], [m["name"] for m in report["methods"]],
                       list(stems), seed])
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def shuffled(names: Sequence[str], stem: str, seed: int) -> list[str]:
    order = list(names)
    random.Random(f"likeness-rating:{seed}:{stem}").shuffle(order)
    return order


# The page's script: state in localStorage under the study's key, one vote per photo.
SCRIPT = r"""
const KEY = "likeness-rating:" + DATA.study;
function load() {
  try { const s = JSON.parse(localStorage.getItem(KEY)); if (s && s.votes) return s; } catch (e) {}
  return {votes: {}, rater: ""};
}
let state = load();
if (!state.rater) {
  state.rater = "rater-" + Math.random().toString(36).slice(2, 8);
  localStorage.setItem(KEY, JSON.stringify(state));
}
function save() { localStorage.setItem(KEY, JSON.stringify(state)); refresh(); }
function refresh() {
  let n = 0;
  for (const p of DATA.photos) {
    const v = state.votes[p.id];
    if (v) n++;
    for (const b of document.querySelectorAll(`[data-photo="${CSS.escape(p.id)}"] button.avatar`))
      b.classList.toggle("chosen", !!v && b.dataset.method === v.choice);
  }
  document.getElementById("progress").textContent = `${n} of ${DATA.photos.length} photos rated`;
  document.getElementById("rater").placeholder = state.rater;
}
function vote(photo, method, position, order) {
  state.votes[photo] = {choice: method, position: position, order: order,
                        time: new Date().toISOString()};
  save();
}
function cell(x) {
  x = String(x);
  return /[",\n]/.test(x) ? '"' + x.replace(/"/g, '""') + '"' : x;
}
function csvText() {
  const lines = [DATA.columns.join(",")];
  for (const p of DATA.photos) {
    const v = state.votes[p.id];
    if (!v) continue;
    lines.push([DATA.study, state.rater, p.id, v.choice, v.position, v.order.join(";"), v.time]
               .map(cell).join(","));
  }
  return lines.join("\n") + "\n";
}
function exportCsv() {
  const blob = new Blob([csvText()], {type: "text/csv"});
  const a = document.createElement("a");
  a.href = URL.createObjectURL(blob);
  a.download = `ratings-${DATA.study}-${state.rater.replace(/[^A-Za-z0-9_-]+/g, "_")}.csv`;
  document.body.appendChild(a);
  a.click();
  setTimeout(() => { URL.revokeObjectURL(a.href); a.remove(); }, 1000);
}
function build() {
  const main = document.getElementById("photos");
  for (const p of DATA.photos) {
    const card = document.createElement("div");
    card.className = "card";
    card.dataset.photo = p.id;
    const photo = document.createElement("figure");
    photo.innerHTML = `<img src="${p.photo}" alt="photo"><figcaption>photo</figcaption>`;
    card.appendChild(photo);
    const order = p.avatars.map(a => a.method);
    p.avatars.forEach((a, i) => {
      const b = document.createElement("button");
      b.className = "avatar";
      b.dataset.method = a.method;
      b.title = "best match: " + String.fromCharCode(65 + i);
      b.innerHTML = `<img src="${a.src}" alt="avatar ${String.fromCharCode(65 + i)}"><span>${String.fromCharCode(65 + i)}</span>`;
      b.addEventListener("click", () => vote(p.id, a.method, i, order));
      card.appendChild(b);
    });
    main.appendChild(card);
  }
  // An emptied field keeps the current name (shown as the placeholder) until a new one is typed.
  const rater = document.getElementById("rater");
  rater.value = state.rater;
  rater.addEventListener("change", e => {
    const name = e.target.value.trim();
    if (name) { state.rater = name; save(); }
  });
  document.getElementById("export").addEventListener("click", exportCsv);
  document.getElementById("clear").addEventListener("click", () => {
    if (confirm("Forget every vote of this page in this browser?")) { state.votes = {}; save(); }
  });
  refresh();
}
build();
"""

STYLE = (".card{display:flex;gap:.6em;align-items:flex-start;margin:.8em 0;padding:.5em;"
         "border-bottom:1px solid #ddd}figure{margin:0;text-align:center}"
         "button.avatar{border:4px solid transparent;background:none;padding:0;cursor:pointer;"
         "text-align:center}button.avatar.chosen{border-color:#1a7f37}"
         "button.avatar span{display:block;font-weight:bold}img{display:block}"
         "#bar{position:sticky;top:0;background:#fff;padding:.5em 0;border-bottom:2px solid #888}")


def rating_page(report: Mapping[str, Any], thumbs: Sequence[Mapping[str, Any]], seed: int = 0) -> str:
    from ..backend.report_html import page
    from ..backend.visual import image_data_uri
    names = [m["name"] for m in report["methods"]]
    photos, skipped = [], []
    for t in thumbs:
        shown = [n for n in shuffled(names, t["stem"], seed) if n in t["avatars"]]
        if len(shown) < 2:                      # nothing to choose between
            skipped.append(t["stem"])
            continue
        # the photo as JPEG keeps a page of 256 photos near 10 MB; avatars stay lossless PNG
        photos.append({"id": t["stem"], "photo": image_data_uri(t["photo"], THUMB, jpeg=True),
                       "avatars": [{"method": n, "src": image_data_uri(t["avatars"][n], THUMB)}
                                   for n in shown]})
    study = study_id(report, [p["id"] for p in photos], seed)
    data = {"study": study, "columns": list(CSV_COLUMNS), "photos": photos}
    body = (f"<div id=\"bar\"><p>For each photo, click the avatar that looks most like the person. "
            f"Votes are kept in this browser; <b>Export CSV</b> saves them for "
            f"<code>likeness eval tabulate</code>. Study {html.escape(study)}, "
            f"{len(photos)} photos, {len(names)} methods in a shuffled order (seed {seed}).</p>"
            "<label>Rater <input id=\"rater\" size=\"16\"></label> "
            "<button id=\"export\">Export CSV</button> <button id=\"clear\">Clear</button> "
            "<span id=\"progress\"></span></div>"
            + (f"<p>Not shown (fewer than two avatars): {html.escape(', '.join(skipped))}</p>"
               if skipped else "")
            + "<div id=\"photos\"></div>")
    # "</" inside the JSON would end the script element early
    payload = json.dumps(data).replace("</", "<\\/")
    return page("Which avatar looks most like the person?", body, style=STYLE,
                script=f"const DATA = {payload};\n{SCRIPT}")


# ------------------------------------------------------------------------------------------------
# Tabulation
# ------------------------------------------------------------------------------------------------

def read_ratings(paths: Sequence[str | Path]) -> list[dict[str, str]]:
    rows = []
    for path in paths:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"{path}: no such ratings file")
        with open(p, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            missing = [c for c in ("study", "rater", "photo", "choice", "order") if c not in (reader.fieldnames or [])]
            if missing:
                raise UserError(f"{path}: not a rating export (missing column {', '.join(missing)}; "
                                f"expected {','.join(CSV_COLUMNS)})")
            rows += [dict(r, file=str(p)) for r in reader]
    return rows


def tabulate(rows: Sequence[Mapping[str, str]], draws: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Votes per method, their share and its 95 % interval. A rater's later vote on a photo replaces
    an earlier one (the same rater exporting twice is counted once).

    The interval resamples photos and raters at once (each drawn with replacement, every vote of a
    drawn rater on a drawn photo kept): votes on one photo share its difficulty and one rater's share
    a taste, so treating the votes as independent would make the interval too narrow."""
    studies = sorted({r["study"] for r in rows})
    if len(studies) > 1:
        raise UserError(f"the ratings come from {len(studies)} different rating pages ({', '.join(studies)}): "
                        "tabulate one page's exports at a time")
    latest: dict[tuple[str, str], Mapping[str, str]] = {}
    for r in rows:
        key = (r["rater"], r["photo"])
        if key not in latest or r.get("time", "") >= latest[key].get("time", ""):
            latest[key] = r
    methods: list[str] = []
    for r in latest.values():
        for m in r["order"].split(";"):
            if m and m not in methods:
                methods.append(m)
    for r in latest.values():
        if r["choice"] not in methods:
            methods.append(r["choice"])
    methods.sort()
    votes = {m: 0 for m in methods}
    for r in latest.values():
        votes[r["choice"]] += 1
    total = sum(votes.values())
    raters = sorted({k[0] for k in latest})
    photos = sorted({k[1] for k in latest})
    # counts[rater, photo, method]: 1 where that rater chose that method for that photo
    counts = np.zeros((len(raters), len(photos), len(methods)))
    ri, pi, mi = ({v: i for i, v in enumerate(x)} for x in (raters, photos, methods))
    for (rater, photo), r in latest.items():
        counts[ri[rater], pi[photo], mi[r["choice"]]] = 1
    intervals = {m: None for m in methods}
    if total and draws > 0:
        rng = np.random.default_rng(seed)
        shares = []
        for _ in range(draws):
            a = np.bincount(rng.integers(0, len(raters), len(raters)), minlength=len(raters))
            b = np.bincount(rng.integers(0, len(photos), len(photos)), minlength=len(photos))
            v = np.einsum("r,p,rpm->m", a, b, counts)
            if v.sum():
                shares.append(v / v.sum())
        lo, hi = np.percentile(np.array(shares), [2.5, 97.5], axis=0)
        intervals = {m: [float(lo[i]), float(hi[i])] for i, m in enumerate(methods)}
    return {"study": studies[0] if studies else None, "votes": total,
            "raters": len(raters), "photos": len(photos),
            "interval": f"95 %, {draws} draws resampling photos and raters",
            "methods": [{"method": m, "votes": votes[m], "share": votes[m] / total if total else None,
                         "share_95": intervals[m]}
                        for m in sorted(methods, key=lambda m: -votes[m])]}


def to_markdown(table: Mapping[str, Any]) -> str:
    lines = [f"Preference (share of 'best match' votes): {table['votes']} votes by {table['raters']} "
             f"rater(s) on {table['photos']} photo(s), study {table['study']}", "",
             "| method | votes | share | 95 % interval (photos and raters resampled) |", "|---|---|---|---|"]
    for m in table["methods"]:
        share = "–" if m["share"] is None else f"{100 * m['share']:.1f} %"
        ci = "–" if not m.get("share_95") else f"{100 * m['share_95'][0]:.1f}–{100 * m['share_95'][1]:.1f} %"
        lines.append(f"| {m['method']} | {m['votes']} | {share} | {ci} |")
    return "\n".join(lines) + "\n"


def cli_tabulate(args) -> int:
    table = tabulate(read_ratings(args.ratings))
    text = json.dumps(table, indent=2) if args.json else to_markdown(table)
    if args.out:
        Path(args.out).write_text(text)
    print(text, end="")
    return 0 if table["votes"] else 1
