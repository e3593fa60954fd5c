"""Render a fidelity report (``fidelity.compare``) as a markdown table or a small HTML page."""
from __future__ import annotations

import html
from typing import Any, Mapping, Sequence

from .fidelity import AMOUNTS, COLOURS, PRESENCE, SHAPES, check_targets


def _f(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


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


def _html_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    trs = []
    for row in body:
        cls = ' class="fail"' if row and row[-1] == "FAIL" else ""
        trs.append(f"<tr{cls}>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row)
                   + "</tr>")
    return f"<table><thead><tr>{th}</tr></thead><tbody>{''.join(trs)}</tbody></table>"


def to_html(report: Mapping[str, Any], title: str = "Likeness fidelity on real photos") -> str:
    """A self-contained HTML page (inline CSS, no scripts)."""
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #bbb;padding:.3em .6em;text-align:left}"
             "th{background:#eee}tr.fail td{background:#fdd}")
    return ("<!DOCTYPE html><html><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{style}</style></head><body>"
            f"<h1>{html.escape(title)}</h1><p>Pairs: {report.get('n', 0)}</p>"
            + _html_table(("measure", "value", "n", "constant", "note"), rows(report))
            + "<h2>Targets</h2>"
            + _html_table(("target", "value", "required", "result"), _targets(report))
            + "</body></html>\n")
