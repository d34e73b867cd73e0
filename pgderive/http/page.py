"""The daemon's status page (``/``): one HTML document a person reads when an alert fires.

Rendered on the server from the ``/status`` document (:meth:`~pgderive.http.server.HttpEndpoint.status`)
and the counter samples; no JavaScript (the page reloads itself every 5 s with ``<meta
http-equiv="refresh">``); sparklines are inline SVG polylines. Every value is HTML-escaped.
"""
from __future__ import annotations

import html
import time
from typing import Mapping, Sequence

__all__ = ["render_page", "sparkline"]

_CSS = """
body{font:14px/1.4 system-ui,sans-serif;margin:1.5em;color:#222}
h1{font-size:1.3em;margin:0 0 .2em} h2{font-size:1.05em;margin:1.4em 0 .4em}
table{border-collapse:collapse} td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:right}
th{background:#f4f4f4} td.l,th.l{text-align:left}
.ok{color:#176f2c;font-weight:600} .bad{color:#b00020;font-weight:600} .warn{color:#a15c00;font-weight:600}
.muted{color:#777} svg{vertical-align:middle}
"""


def _e(v: object) -> str:
    return html.escape("—" if v is None else str(v))


def _bytes(n: object) -> str:
    if not isinstance(n, (int, float)):
        return "—"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def sparkline(values: Sequence[float], width: int = 160, height: int = 28) -> str:
    """An inline SVG polyline of ``values`` (oldest first), scaled to its maximum; an empty
    string for fewer than two values."""
    if len(values) < 2:
        return ""
    top = max(values) or 1.0
    step = width / (len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 2 - (v / top) * (height - 4):.1f}" for i, v in enumerate(values))
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="throughput">'
            f'<polyline fill="none" stroke="#2a6ebb" stroke-width="1.5" points="{points}"/></svg>')


def _rates(samples: Sequence[object], pick: str, sink: str | None = None) -> list[float]:
    out: list[float] = []
    for a, b in zip(samples, samples[1:]):
        dt = getattr(b, "at") - getattr(a, "at")
        if dt <= 0:
            continue
        if sink is None:
            out.append((getattr(b, pick) - getattr(a, pick)) / dt)
        else:
            out.append((getattr(b, "ops").get(sink, 0) - getattr(a, "ops").get(sink, 0)) / dt)
    return out


def render_page(status: Mapping[str, object], samples: Sequence[object], every: float) -> str:
    """The page for ``status`` (the ``/status`` document) and the counter ``samples`` (taken
    every ``every`` seconds, oldest first), as an HTML string."""
    d = status.get("daemon")
    daemon: Mapping[str, object] = d if isinstance(d, Mapping) else {}
    healthy, ready = daemon.get("healthy"), daemon.get("ready")
    slot = daemon.get("slot") if isinstance(daemon.get("slot"), Mapping) else {}
    assert isinstance(slot, Mapping)
    sinks = daemon.get("sinks") if isinstance(daemon.get("sinks"), Mapping) else {}
    assert isinstance(sinks, Mapping)
    views = daemon.get("views") if isinstance(daemon.get("views"), list) else []
    assert isinstance(views, list)
    span = max(0, len(samples) - 1) * every
    window = f"{span:.0f} s" if span < 120 else f"{span / 60:.0f} min"
    tx_rates = _rates(samples, "changes")
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        '<meta http-equiv="refresh" content="5"><title>pgderive — ', _e(slot.get("name")), "</title>",
        "<style>", _CSS, "</style></head><body>",
        "<h1>pgderive <span class=muted>slot ", _e(slot.get("name")), "</span></h1>",
        "<p>", f'<span class="{"ok" if healthy else "bad"}">{"healthy" if healthy else "unhealthy"}</span> · ',
        f'<span class="{"ok" if ready else "warn"}">{"ready" if ready else "not ready"}</span> · ',
        "phase ", _e(daemon.get("phase")), " · up ", _e(daemon.get("uptime_seconds")), " s · ",
        _e(daemon.get("transactions")), " transactions, ", _e(daemon.get("changes")), " changes read</p>",
    ]
    problems = [*(daemon.get("problems") or []), *(daemon.get("not_ready") or [])]  # type: ignore[misc]
    if problems:
        parts.append("<ul>" + "".join(f'<li class="bad">{_e(p)}</li>' for p in dict.fromkeys(problems)) + "</ul>")
    parts += [
        "<h2>Slot</h2><table><tr><th class=l>slot</th><th>active</th><th>confirmed LSN</th><th>current WAL</th>"
        "<th>lag</th><th>retained WAL</th></tr>",
        "<tr><td class=l>", _e(slot.get("name")), "</td><td>",
        _e(None if slot.get("active") is None else "yes" if slot.get("active") else "no"), "</td><td>",
        _e(slot.get("confirmed_lsn")), "</td><td>", _e(slot.get("current_wal_lsn")), "</td><td>",
        _bytes(slot.get("lag_bytes")), "</td><td>", _bytes(slot.get("retained_wal_bytes")), "</td></tr></table>",
    ]
    if slot.get("source_error"):
        parts.append(f'<p class="bad">source: {_e(slot.get("source_error"))}</p>')
    parts.append(f"<p>changes/s over the last {window} {sparkline(tx_rates)} "
                 f"<span class=muted>now {tx_rates[-1] if tx_rates else 0:.0f}/s</span></p>")
    # Records and checkpoints come from `pgderive status` (the sinks), when it could be asked.
    facts = status.get("status")
    in_sinks: dict[str, Mapping[str, object]] = {}
    if isinstance(facts, Mapping) and isinstance(facts.get("views"), list):
        in_sinks = {str(f.get("name")): f for f in facts["views"] if isinstance(f, Mapping)}
    parts.append("<h2>Views</h2><table><tr><th class=l>view</th><th class=l>sink</th><th>lag s</th><th>ops</th>"
                 "<th>dead letters</th><th>records</th><th>checkpoint</th><th class=l>load</th></tr>")
    for v in views:
        if not isinstance(v, Mapping):
            continue
        fact = in_sinks.get(str(v.get("name")), {})
        load = v.get("load")
        load_text = "—"
        if isinstance(load, Mapping):
            total = load.get("rows_total")
            load_text = f"{load.get('kind')} {load.get('phase')}: {load.get('rows')} of ~{total if total is not None else '?'} rows"
        dead = v.get("dead_letters") or 0
        parts += ["<tr><td class=l>", _e(v.get("name")), "</td><td class=l>", _e(v.get("sink")), "</td><td>",
                  _e(v.get("lag_seconds")), "</td><td>", _e(v.get("ops")), f'</td><td class="{"bad" if dead else ""}">',
                  _e(dead), "</td><td>", _e(fact.get("records")), "</td><td>", _e(fact.get("checkpoint_lsn")),
                  "</td><td class=l>", _e(load_text), "</td></tr>"]
    parts.append("</table><h2>Sinks</h2><table><tr><th class=l>sink</th><th class=l>type</th><th>lag s</th>"
                 "<th>p50 ms</th><th>p99 ms</th><th>ops</th><th>retries</th><th>errors</th>"
                 "<th class=l>ops/s</th></tr>")
    for name, s in sinks.items():
        if not isinstance(s, Mapping):
            continue
        rates = _rates(samples, "ops", str(name))
        in_flight = s.get("in_flight_seconds")
        cls = "bad" if isinstance(in_flight, (int, float)) and in_flight > 10 else ""
        parts += [f'<tr><td class="l {cls}">', _e(name), "</td><td class=l>", _e(s.get("type")), "</td><td>",
                  _e(s.get("lag_seconds")), "</td><td>", _e(s.get("lag_p50_ms")), "</td><td>",
                  _e(s.get("lag_p99_ms")), "</td><td>", _e(s.get("ops")), "</td><td>", _e(s.get("retries")),
                  "</td><td>", _e(s.get("errors")), "</td><td class=l>", sparkline(rates), "</td></tr>"]
    parts.append("</table>")
    if "status_error" in status:
        parts.append(f'<p class="bad">pgderive status: {_e(status.get("status_error"))}</p>')
    parts.append(f'<p class=muted>rendered {time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())} · '
                 '<a href="/metrics">/metrics</a> · <a href="/status">/status</a> · <a href="/healthz">/healthz</a> · '
                 '<a href="/readyz">/readyz</a></p></body></html>')
    return "".join(str(p) for p in parts)
