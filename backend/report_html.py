"""Render fidelity reports (``fidelity.compare``) as markdown tables or small HTML pages.

One report (``likeness validate``) or several side by side, one column per method
(``likeness eval``: ``comparison_rows``); ``html_table`` and ``page`` are the shared page parts.
"""
from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

import numpy as np

from .fidelity import AMOUNTS, COLOURS, PRESENCE, SHAPES, check_targets


def json_default(o: Any):
    """``json.dumps(default=...)`` for report data: numpy scalars and arrays as Python values,
    anything else (paths) as text."""
    if isinstance(o, (np.generic, np.ndarray)):
        return o.tolist()
    return str(o)


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


fmt = _f     # public: a value as report text ("–" for None, fixed digits for floats)


def rows(report: Mapping[str, Any]) -> list[tuple[str, str, str, str, str]]:
    """(measure, value, n, constant predictor, note) per line of the report."""
    out = []
    for name in PRESENCE:
        r = report.get("presence", {}).get(name)
        if not r:
            continue
        note = f"pos {r['n_pos']} / neg {r['n_neg']}; TPR {_f(r['tpr'])}, TNR {_f(r['tnr'])}"
        if r.get("degenerate"):
            note += f"; degenerate: {r['degenerate']}"
        const = r.get("constant", {}).get("value") if r.get("constant") else None
        out.append((f"{name}: balanced accuracy", _f(r["value"]), str(r["n"]), _f(const), note))
    for name in COLOURS:
        r = report.get("colour", {}).get(name)
        if not r:
            continue
        c = r.get("constant") or {}
        out.append((f"{name} colour: ΔE00 median", _f(r["median"], 2), str(r["n"]),
                    _f(c.get("median"), 2),
                    f"p90 {_f(r['p90'], 2)} (constant {_f(c.get('p90'), 2)}); "
                    f"ratio {_f(r.get('ratio_median'))}"))
    for name in (*AMOUNTS, *SHAPES, "hair_length_tag"):
        r = report.get("correlation", {}).get(name)
        if not r:
            continue
        out.append((f"{name}: Spearman", _f(r["value"]), str(r["n"]), "",
                    f"degenerate: {r['degenerate']}" if r.get("degenerate") else ""))
    return out


def _targets(report: Mapping[str, Any]) -> list[tuple[str, str, str, str]]:
    return [(name, _f(value), target, "pass" if ok else "FAIL")
            for name, value, target, ok in check_targets(report)]


def _md_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    esc = [[str(c).replace("|", "\\|") for c in row] for row in body]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in esc]
    return "\n".join(lines)


def to_markdown(report: Mapping[str, Any], targets: bool = True) -> str:
    parts = [f"Pairs: {report.get('n', 0)}", "",
             _md_table(("measure", "value", "n", "constant", "note"), rows(report))]
    if targets:
        parts += ["", _md_table(("target", "value", "required", "result"), _targets(report))]
    return "\n".join(parts) + "\n"


def html_table(head: Sequence[str], body: Sequence[Sequence[str]], raw: bool = False) -> str:
    """An HTML table; rows whose last cell is "FAIL" are marked. ``raw``: cells are HTML already."""
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = []
    for row in body:
        cls = ' class="fail"' if row and row[-1] == "FAIL" else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{c if raw else html.escape(str(c))}</td>"
                                          for c in row) + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


_html_table = html_table

STYLE = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
         "td,th{border:1px solid #bbb;padding:.3em .6em;text-align:left;vertical-align:top}"
         "td{overflow-wrap:anywhere}th{white-space:nowrap}"
         "th{background:#eee}tr.fail td{background:#fdd}")


def page(title: str, body: str, style: str = "", script: str = "") -> str:
    """A self-contained HTML page: inline CSS (the shared ``STYLE`` + ``style``), optional script."""
    js = f"<script>{script}</script>" if script else ""
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{STYLE}{style}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{body}{js}</body></html>\n")


def to_html(report: Mapping[str, Any], title: str = "Likeness fidelity on real photos") -> str:
    """A self-contained HTML page (inline CSS, no scripts)."""
    return page(title, f"<p>Pairs: {report.get('n', 0)}</p>"
                + html_table(("measure", "value", "n", "constant", "note"), rows(report))
                + "<h2>Targets</h2>"
                + html_table(("target", "value", "required", "result"), _targets(report)))


def comparison_rows(reports: Mapping[str, Mapping[str, Any]]
                    ) -> tuple[list[str], list[list[str]]]:
    """Several methods' fidelity reports side by side: (header, rows) with one value column per
    method, then the constant predictor (the pack's default avatar) and each method's pair count."""
    names = list(reports)
    per = {name: {r[0]: r for r in rows(rep)} for name, rep in reports.items()}
    measures = list(dict.fromkeys(m for name in names for m in per[name]))
    body = []
    for m in measures:
        cells = [per[name].get(m) for name in names]
        const = next((c[3] for c in cells if c is not None and c[3]), "")
        body.append([m, *[c[1] if c else "–" for c in cells], const,
                     " / ".join(c[2] if c else "–" for c in cells)])
    return ["measure", *names, "constant", "n"], body


def comparison_targets(reports: Mapping[str, Mapping[str, Any]]
                       ) -> tuple[list[str], list[list[str]]]:
    """Targets side by side: (header, rows) with each method's value and pass/FAIL."""
    names = list(reports)
    per = {name: _targets(rep) for name, rep in reports.items()}
    body = []
    for i, (target, _, required, _) in enumerate(per[names[0]] if names else []):
        body.append([target, required,
                     *[f"{per[n][i][1]} ({per[n][i][3]})" for n in names]])
    return ["target", "required", *names], body
