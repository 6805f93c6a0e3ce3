"""The trace report behind `dioe trace report`: one self-contained HTML page with the timeline of a selection of
calls per member, the summary's tables, the critical path and the plan; and the palette that every picture DIOE
draws shares (the report's timeline and legend, and the bench chart).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Mapping

from .files import write_text
from .text import show_ms
from .traceview import Events, critical_path, load_trace, summarize

# One palette for every picture DIOE draws: the report's timeline and legend, and the bench chart.
COPY_COLOR = "#9aa3b2"       # transfers between members


def backend_colors() -> dict[str, str]:
    """Each backend's colour, as its own file declares it, and the copies'."""
    from . import backends

    return {**{b: backends.backend_class(b).color for b in backends.names()}, "copy": COPY_COLOR}


CRITICAL_COLOR = "#c0262d"  # the critical path's outline, and DIOE itself in the bench chart


# -- the HTML report ----------------------------------------------------------------------------------------------
REPORT_CALLS = 40   # calls embedded in the report's timeline picker; the summary covers all of them


def report_data(data: Mapping, summary: Mapping) -> dict:
    """What the report's timeline draws: lanes per member, and for a selection of calls their slices (times in ms
    from the call's start), flows and critical path."""
    ev = Events(data)
    members = []
    lanes_of: dict[int, list] = {}
    for (pid, tid), name in sorted(ev.thread.items()):
        lanes_of.setdefault(pid, []).append({"tid": tid, "name": name})
    for m, pid in sorted(ev.member_pid.items(), key=lambda kv: kv[1]):
        lanes = [ln for ln in lanes_of.get(pid, []) if not ln["name"].startswith("profiling")]
        members.append({"id": m, "label": ev.process.get(pid, m), "pid": pid, "lanes": lanes})
    ordered = sorted(ev.calls, key=lambda c: c["dur"])
    picks = {}
    if ordered:
        picks = {"median": ordered[len(ordered) // 2]["args"]["call"], "slowest": ordered[-1]["args"]["call"],
                 "fastest": ordered[0]["args"]["call"], "first": ev.calls[0]["args"]["call"]}
    chosen = list(dict.fromkeys(list(picks.values()) + [c["args"]["call"] for c in ev.calls]))[:REPORT_CALLS]
    calls = []
    by_k = {c["args"]["call"]: c for c in ev.calls}
    for k in sorted(chosen):
        call = by_k[k]
        parts, copies = ev.by_call.get(k, []), ev.copies_by_call.get(k, [])
        crit = {id(e) for e in critical_path(parts, copies)}
        slices, index = [], {}
        for e in sorted(parts + copies, key=lambda e: e["ts"]):
            a = e["args"]
            index[("c", a["value"], a["consumer"]) if e["cat"] == "copy" else ("p", a["partition"])] = len(slices)
            tip = (f"{e['name']}\n{e['dur'] / 1e3:.3f} ms" +
                   (f"\n{a.get('ops')} ops, {a.get('precision')}"
                    f"\nin {a.get('bytes_in', 0)} B, out {a.get('bytes_out', 0)} B"
                    if e["cat"] == "partition" else f"\n{a.get('bytes')} B {a.get('from')} → {a.get('to')}"))
            slices.append({"pid": e["pid"], "tid": e["tid"], "t": round((e["ts"] - call["ts"]) / 1e3, 4),
                           "d": round(e["dur"] / 1e3, 4), "label": a.get("partition") or e["name"],
                           "backend": a.get("backend", "copy"), "critical": id(e) in crit, "tip": tip,
                           "fallback": bool(a.get("fallback"))})
        flows = []
        for e in parts:
            me = index[("p", e["args"]["partition"])]
            for d in e["args"].get("deps", ()):
                if ("p", d) in index and slices[index[("p", d)]]["pid"] != e["pid"]:
                    flows.append([index[("p", d)], me])
        for c in copies:
            ci = index[("c", c["args"]["value"], c["args"]["consumer"])]
            if ("p", c["args"]["producer"]) in index:
                flows.append([index[("p", c["args"]["producer"])], ci])
            flows.append([ci, index[("p", c["args"]["consumer"])]])
        calls.append({"call": k, "ms": round(call["dur"] / 1e3, 4), "slices": slices, "flows": flows})
    return {"members": members, "calls": calls, "picks": picks}


def _asset(name: str) -> str:
    from importlib import resources

    return resources.files("dioe").joinpath("assets", name).read_text(encoding="utf-8")


def _table(rows, header, numeric=()) -> str:
    """An HTML table; every cell is escaped here, since any of them may come from the trace file."""
    e = html.escape
    th = "".join(f"<th>{e(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{e(str(c))}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def _script_json(value) -> str:
    """JSON safe inside a <script> element: no `<`, `>` or `&` at all, so no text in the trace can close the
    element or open a comment that swallows the page."""
    return json.dumps(value).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_report(data: Mapping, *, title: str | None = None) -> str:
    """One self-contained HTML page: the timeline per member, the summary tables, the critical path and the plan.
    It loads nothing from the network. Every value it takes from the trace is escaped: a trace is a file anyone
    may have written, and the page runs script."""
    s = summarize(data)
    rd = report_data(data, s)

    def e(value) -> str:
        return html.escape(str(value))
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title or 'DIOE trace report')}</title>"
             f"<style>:root{{--critical:{CRITICAL_COLOR}}}\n{_asset('report.css')}</style></head><body>"]
    parts.append(f"<h1>{e(title or 'DIOE trace report')}</h1>")
    if s.get("calls"):
        lat = s["latency_ms"]
        parts.append(f"<p class=lead>{e(s['calls'])} call(s) of {e(', '.join(map(str, s['models'])))}; median "
                     f"latency <b>{e(show_ms(lat['median']))} ms</b> (min {e(show_ms(lat['min']))}, max "
                     f"{e(show_ms(lat['max']))}). "
                     "Each coloured bar is "
                     "one partition of the model running on one member of the pool; bars outlined in red form the "
                     "critical path, the chain of work that decided when the call finished. Arrows show data "
                     "passed between members. Hover a bar for its details.</p>")
    else:
        parts.append(f"<p class=lead>{e(s.get('note', ''))}</p>")
    legend = "".join(f"<span><i style='background:{e(c)}'></i>{e(b)}</span>" for b, c in backend_colors().items())
    parts.append("<section id=timeline-section><h2>Timeline of one call</h2>"
                 "<div id=controls><label>call: <select id=call></select></label> <span id=call-ms></span></div>"
                 f"<div class=legend>{legend}<span><i style='background:#fff;border:2px solid {CRITICAL_COLOR}'></i>"
                 "critical path</span></div>"
                 "<svg id=timeline xmlns='http://www.w3.org/2000/svg' width=900 height=60></svg></section>")
    if s.get("calls"):
        rows = [[m, f"{100 * i['busy_share']:.1f}%", show_ms(i['busy_ms']), show_ms(i['idle_ms']), i["runs"]]
                for m, i in s["members"].items()]
        parts.append("<h2>Members: busy and idle</h2>" +
                     _table(rows, ["member", "busy", "busy ms", "idle ms", "partition runs"], numeric=(1, 2, 3, 4)))
        waits = [[m, why, f"{w['per_call_ms']:.3f}", w["count"]] for m, i in s["members"].items()
                 for why, w in i["waits"].items()]
        if waits:
            parts.append("<h2>What each member waited for</h2>" +
                         _table(waits, ["member", "idle while waiting for", "ms per call", "gaps"], numeric=(2, 3)))
        t = s["transfers"]
        parts.append(f"<p>Transfers: {e(t['count'])} copies, {e(show_ms(t['total_ms']))} ms, "
                     f"{100 * t['share']:.1f}% of the time inside calls ({e(t['bytes'])} bytes).</p>")
        cp = s["critical_path"]
        rows = [[i + 1, x.get("partition") or x["name"], x["member"], x.get("backend", "copy"),
                 f"{x['ms']:.3f}"] for i, x in enumerate(cp["steps"])]
        parts.append(f"<h2 class=crit>Critical path of the median call (#{e(cp['call'])}, "
                     f"{e(show_ms(cp['call_ms']))} ms)</h2>" +
                     _table(rows, ["step", "partition", "member", "backend", "ms"], numeric=(4,)))
        rows = [[h["partition"], h["member"], h["backend"], h["ops"], h["runs"], f"{h['median_ms']:.3f}",
                 f"{100 * h['share_of_busy']:.1f}%"] for h in s["heaviest"]]
        parts.append("<h2>Heaviest partitions</h2>" +
                     _table(rows, ["partition", "member", "backend", "ops", "runs", "median ms", "share of busy"],
                            numeric=(3, 4, 5, 6)))
    for plan in rd_plans(data):
        rows = [[p["id"], p["member"], p["backend"], p["precision"], p["ops"], show_ms(p["predicted_ms"]),
                 "-" if p.get("measured_ms") is None else show_ms(p["measured_ms"]),
                 f"{p['runner_up']['backend']}@{p['runner_up']['member']} "
                 f"{show_ms(p['runner_up']['predicted_ms'])} ms" if p.get("runner_up") else "-",
                 p.get("reason", "")] for p in plan["partitions"]]
        notes = "".join(f"<li>{e(n)}</li>" for n in plan.get("notes", ()))
        stages = plan.get("stages") or ()   # absent from traces written before plans recorded them
        staged = ("<h3>Pipeline stages</h3>" + _table(
            [[i, st["member"], ", ".join(st["partitions"]), show_ms(st["predicted_ms"])] for i, st in
             enumerate(stages)], ["stage", "member", "partitions", "predicted ms per batch"], numeric=(3,))
                  if len(stages) > 1 else "")
        parts.append(f"<h2>Plan for {e(plan['model'])} (objective {e(plan['objective'])})</h2>" +
                     _table(rows, ["partition", "member", "backend", "precision", "ops", "predicted ms", "measured ms",
                                   "runner-up", "why"], numeric=(4, 5, 6)) + staged +
                     (f"<ul>{notes}</ul>" if notes else ""))
    if s.get("stages"):
        rows = [[x["stage"], f"{x['ms'] / 1e3:.2f}"] for x in s["stages"]]
        parts.append("<h2>Optimize stages</h2>" + _table(rows, ["stage", "seconds"], numeric=(1,)))
    data_json = _script_json({**rd, "colors": backend_colors(), "critical": CRITICAL_COLOR})
    parts.append(f"<script type='application/json' id=dioe-data>{data_json}</script>"
                 f"<script>{_asset('report.js')}</script>")
    parts.append("<p style='color:#8a93a3;margin-top:30px'>Written by <code>dioe trace report</code>. "
                 "The same trace opens in Perfetto UI or chrome://tracing, or with <code>dioe trace view</code>.</p>")
    parts.append("</body></html>")
    return "".join(parts)


def rd_plans(data: Mapping) -> list[dict]:
    return list((data.get("otherData") or {}).get("plans") or [])


def write_report(trace_path: str | Path, out: str | Path) -> Path:
    data = load_trace(trace_path)
    return write_text(out, render_report(data, title=f"DIOE trace report: {Path(trace_path).name}"))
