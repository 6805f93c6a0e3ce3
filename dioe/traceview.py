"""Reading a DIOE trace: loading it, sorting out its events, the summary behind `dioe trace summary` (busy and idle
time per member, what each idle stretch waited for, transfers, the heaviest partitions) and the critical path of a
call. `dioe.tracereport` draws the HTML report from the same reading and `dioe.traceserve` serves it.

Everything here reads the Chrome Trace JSON alone, so a trace written on another machine reads the same.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Mapping

from .errors import DIOEError
from .text import show_ms, table

GAP_MS = 0.02   # idle stretches shorter than this are scheduling noise, not waiting


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


class Events:
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
    ev = Events(data)
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


def _waited_for(e: Mapping, by_id: Mapping, copies: list[dict], ev: Events, cursor: float) -> str:
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


def _step(e: Mapping, ev: Events) -> dict:
    if e.get("cat") == "copy":
        return {"kind": "copy", "name": e["name"], "member": e["args"]["to"], "ms": round(e["dur"] / 1e3, 4),
                "bytes": e["args"].get("bytes")}
    return {"kind": "partition", "partition": e["args"]["partition"], "member": ev.member(e),
            "backend": e["args"]["backend"], "ms": round(e["dur"] / 1e3, 4)}


def _stages(ev: Events) -> list[dict]:
    return [{"stage": s["name"], "ms": round(s["dur"] / 1e3, 2)} for s in sorted(ev.stages, key=lambda s: s["ts"])]


def _profiling(ev: Events) -> dict:
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
