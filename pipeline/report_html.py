"""The run report's HTML: one self-contained page (inline CSS, images as data URIs, no script).

Everything that comes from the data (keys, shard names, messages, labels, manifest values) is
HTML-escaped here, in :func:`_e`, and nowhere else: keys and dead-letter messages come from
hostile inputs.
"""
from __future__ import annotations

import html
import math
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0;color:#1f2328;background:#f6f8fa}
main{max-width:1240px;margin:0 auto;padding:20px 24px 40px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px;border-bottom:1px solid #d0d7de;padding-bottom:4px}
.sub{color:#57606a;word-break:break-all}
.cards{display:grid;grid-template-columns:repeat(auto-fill,minmax(190px,1fr));gap:10px;margin-top:14px}
.card{background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:10px 12px}
.card .k{color:#57606a;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:22px;font-weight:600;word-break:break-all}.card .v.small{font-size:14px}
.card .p{color:#9a6700;font-size:12px;overflow-wrap:anywhere}.card.wide{grid-column:span 2}
.bad{color:#cf222e}.good{color:#1a7f37}.warn{color:#9a6700}.muted{color:#57606a}
.notes{background:#fff8c5;border:1px solid #d4a72c;border-radius:8px;padding:8px 12px;margin-top:12px}
.figs{display:grid;grid-template-columns:repeat(2,1fr);gap:12px}
.figs figure{margin:0;background:#fff;border:1px solid #d0d7de;border-radius:8px;padding:6px}
.figs img{width:100%;height:auto;display:block}
.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(112px,1fr));gap:8px}
.tile{background:#fff;border:1px solid #d0d7de;border-radius:6px;padding:5px;font-size:11px;overflow:hidden}
.tile img{width:100%;aspect-ratio:1;image-rendering:pixelated;display:block;background:#eaeef2}
.tile .missing{width:100%;aspect-ratio:1;background:#eaeef2;display:flex;align-items:center;justify-content:center;color:#57606a}
.tile .key{font-family:ui-monospace,monospace;white-space:nowrap;overflow:hidden;text-overflow:ellipsis}
table{border-collapse:collapse;width:100%;background:#fff;font-size:13px}
th,td{border:1px solid #d0d7de;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#eaeef2}td.mono{font-family:ui-monospace,monospace;word-break:break-all}
footer{color:#57606a;margin-top:30px;font-size:12px}
"""


def _e(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(v: Any, digits: int = 0) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "–"
    return f"{v:,.{digits}f}" if isinstance(v, (int, float)) else str(v)


def _pct(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}%"


def _card(label: str, value: str, prev: str | None = None, cls: str = "", note: str = "") -> str:
    p = f'<div class="p">previous: {prev}</div>' if prev is not None else ""
    n = f'<div class="p">{note}</div>' if note else ""
    return (f'<div class="card{" wide" if "wide" in cls else ""}"><div class="k">{_e(label)}</div>'
            f'<div class="v {cls}">{value}</div>{n}{p}</div>')


def headline_cards(h: dict[str, Any], prev: dict[str, Any] | None) -> str:
    def pv(key: str, fmt=lambda v: _e(_num(v))) -> str | None:
        return fmt(prev.get(key)) if prev is not None else None

    lo, hi = h["rate_ci"]
    cls = "bad" if h["rate_verdict"] in ("above expected", "below expected") else "good"
    rate_note = (f'95% Wilson CI {_pct(lo)}–{_pct(hi)} vs expected {_pct(h["expected_rate"])} '
                 f'(1 − threshold quantile): <span class="{cls}">{_e(h["rate_verdict"] or "no threshold")}</span>')
    cards = [
        _card("images in", _e(_num(h["images_in"])), pv("images_in")),
        _card("rows", _e(_num(h["rows"])), pv("rows")),
        _card("dead letters", _e(_num(h["dead_letters"])), pv("dead_letters"), "bad" if h["dead_letters"] else ""),
        _card("flagged", f'{_e(_num(h["flagged"]))} <span class="small">({_pct(h["flagged_rate"])})</span>',
              pv("flagged_rate", _pct), "wide", rate_note),
        _card("wall time", f'{_e(_num(h["seconds"], 1))} s', pv("seconds", lambda v: f"{_num(v, 1)} s")),
        _card("throughput", f'{_e(_num(h["images_per_s"], 1))} img/s',
              pv("images_per_s", lambda v: f"{_num(v, 1)} img/s")),
        _card("run date", _e(h["run_date"]), pv("run_date", _e), "small"),
        _card("runner", _e(h["runner"]), None, "small",
              f'{_e(h["worker_processes"])} worker processes, {_e(h["shards"])} shards'),
        _card("score", _e(h["score"]), None, "small",
              "reconciled" if h["reconciled"] else '<span class="bad">NOT reconciled</span>'),
        _card("model_id", _e(h["model_id"]), pv("model_id", _e), "small"),
        _card("calibration id", _e(h["calibration"]), pv("calibration", _e), "small"),
    ]
    return f'<section class="cards" id="headline">{"".join(cards)}</section>'


def drift_table(drift: dict[str, Any]) -> str:
    """The manifest's ``drift`` section (pipeline.drift): one row per statistic and test."""
    rows = list(_drift_rows(drift))
    if not rows:
        return ""
    body = "".join(f"<tr><td>{_e(n)}</td><td>{_e(_fmt(v))}</td><td>{_e(t)}</td>"
                   f'<td class="{_verdict_class(d)}">{_e(d)}</td></tr>' for n, v, t, d in rows)
    overall = drift.get("verdict")
    return (f'<h2 id="drift">Drift: <span class="{_verdict_class(overall)}">{_e(overall)}</span></h2>'
            "<table><tr><th>statistic</th><th>value</th><th>threshold</th>"
            f"<th>verdict</th></tr>{body}</table>")


# (value key, its verdict key, kind of threshold) of the tests pipeline.drift reports per statistic
_TESTS = (("p_value", "verdict", "p"), ("ks_p", "ks_verdict", "p"), ("psi", "psi_verdict", "psi"))
_TEST_NAMES = {"p_value": "p-value", "ks_p": "KS p-value", "psi": "PSI"}


def _drift_rows(drift: dict[str, Any]):
    t = drift.get("thresholds") or {}
    limits = {"p": f"fail < {_fmt(t.get('p_fail'))}, warn < {_fmt(t.get('p_warn'))}",
              "psi": f"warn ≥ {_fmt(t.get('psi_warn'))}, fail ≥ {_fmt(t.get('psi_fail'))}"}
    for name, stat in drift.items():
        if not isinstance(stat, dict) or "verdict" not in stat:
            continue
        if stat["verdict"] == "skipped":
            yield name, None, "", f"skipped: {stat.get('reason', '')}"
            continue
        tests = [(k, v, kind) for k, v, kind in _TESTS if k in stat and v in stat]
        for key, verdict_key, kind in tests:
            yield f"{name} {_TEST_NAMES[key]}", stat[key], limits[kind], stat[verdict_key]
        if not tests:  # a statistic this page does not know yet: its verdict alone
            yield name, stat.get("value"), "", stat["verdict"]


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def _verdict_class(verdict: Any) -> str:
    text = str(verdict).lower()
    if text.startswith("skipped"):
        return "muted"
    return "bad" if text.startswith("fail") else "warn" if text.startswith("warn") else "good"


def tile_grid(tiles: list[dict[str, Any]], grid_id: str) -> str:
    """Thumbnail tiles: dicts with ``uri`` (or None), ``key``, ``member``, ``label``, ``score``, ``percentile``."""
    cells = []
    for t in tiles:
        img = (f'<img src="{_e(t["uri"])}" alt="{_e(t["member"])}">' if t.get("uri")
               else '<div class="missing">no image</div>')
        label = "–" if t.get("label") is None else _e(t["label"])
        cells.append(f'<div class="tile" title="{_e(t["key"])}">{img}<div class="key">{_e(t["member"])}</div>'
                     f'<div class="key">{_e(t.get("source", ""))}</div>'
                     f'<div>label {label} · score {_e(_fmt(t.get("score")))}</div>'
                     f'<div>pct {_e(_fmt(t.get("percentile")))}</div></div>')
    return f'<div class="grid" id="{_e(grid_id)}">{"".join(cells) or "<p>none</p>"}</div>'


def dead_letter_table(letters: list[dict[str, Any]], total: int) -> str:
    if not letters:
        return '<p id="dead-letters">No dead letters.</p>'
    body = "".join(f'<tr><td>{_e(d["error_type"])}</td><td>{_e(d["stage"])}</td><td class="mono">{_e(d["key"])}</td>'
                   f'<td class="mono">{_e(d["message"])}</td></tr>' for d in letters)
    more = f"<p>First {len(letters)} of {total:,}, by type.</p>" if total > len(letters) else ""
    return (f'{more}<table id="dead-letters"><tr><th>error_type</th><th>stage</th><th>key</th><th>message</th></tr>'
            f"{body}</table>")


def page(title: str, subtitle: str, notes: list[str], sections: list[tuple[str, str]], footer: str) -> str:
    """The whole document. ``sections`` are (heading, HTML already escaped by the helpers above)."""
    note_html = ("<div class=\"notes\">" + "<br>".join(_e(n) for n in notes) + "</div>") if notes else ""
    body = "".join((f"<h2>{_e(h)}</h2>" if h else "") + s for h, s in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; img-src data:; "
            "style-src 'unsafe-inline'\">"
            f"<title>{_e(title)}</title><style>{CSS}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><div class=\"sub\">{_e(subtitle)}</div>{note_html}{body}"
            f"<footer>{_e(footer)}</footer></main></body></html>\n")
