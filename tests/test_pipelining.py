"""Pipelining: a stream of batches through a plan on two members, each member working on its own batch at once.
Models here run under hand-written two-member plans (no profile, no race); the cost model is tested on a
synthetic profile."""

import threading
import time
from pathlib import Path

import pytest
import torch

import dioe
from dioe.pipelining import PipelineClosed, group_stages

from helpers import assert_matches_eager, eager

POOLS = Path(__file__).parent / "pools"


def chain(width=64, layers=6):
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods).eval(), torch.randn(4, width)


def two_stage(model, x, standin_pool, *, second=("cpu-b", "onnxruntime")):
    """`model` (a Sequential) under a plan of two partitions: its first half on cpu (torch), the rest on `second`."""
    from dioe.build import build
    from dioe.plan import Plan, PlanPartition, PlanStage

    g = dioe.capture(model, (x,), name="chain")
    half = len(model) // 2
    where = {n.name: ("p0" if int(n.meta["dioe.module"].split(".")[0]) < half else "p1") for n in g.compute_nodes}
    parts = []
    for pid, (member, backend) in (("p0", ("cpu", "torch")), ("p1", second)):
        nodes = tuple(n for n, p in where.items() if p == pid)
        parts.append(PlanPartition(pid, (pid,), nodes, member, backend, "fp32", len(nodes), 0.0, 1.0))
    stages = tuple(PlanStage(m, (p.id,), 1.0) for m, p in zip(("cpu", second[0]), parts))
    plan = Plan("chain", g.structure_hash(), "", "throughput", tuple(parts), 1.0,
                stages=stages if second[0] != "cpu" else (PlanStage("cpu", ("p0", "p1"), 2.0),))
    return build(g, plan, standin_pool, objective="throughput")


@pytest.fixture(scope="module")
def chain_on_two(standin_pool):
    model, x = chain()
    opt = two_stage(model, x, standin_pool)
    yield model, x, opt
    opt.runtime.close()


def test_stages_group_consecutive_partitions_by_member():
    assert group_stages(["a1", "a2", "b1", "b2", "a3"], lambda s: s[0]) == [["a1", "a2"], ["b1", "b2"], ["a3"]]
    assert group_stages([], lambda s: s) == []


def test_map_and_submit_equal_sequential_calls_in_order(chain_on_two):
    model, x, opt = chain_on_two
    pipe = opt.runtime.pipeline()
    assert pipe.pipelined and [s.member for s in pipe.stages] == ["cpu", "cpu-b"]
    batches = [(x + i,) for i in range(12)]
    expected = [opt(*b) for b in batches]
    for depth in (1, 3, 8):
        got = list(opt.map(batches, depth=depth))
        assert len(got) == len(batches)
        for e, g in zip(expected, got):
            assert_matches_eager(e, g, rtol=1e-6)
    futures = [opt.submit(*b) for b in batches]
    for b, f in zip(batches, futures):
        assert_matches_eager(eager(model, b), f.result(timeout=60), rtol=1e-4)


def test_map_overlaps_batches_across_members(chain_on_two, tmp_path):
    """While one batch runs on cpu-b, the next has already entered cpu: the stages' runs overlap in time. The trace
    shows each batch's partitions with its index and stage, and the report shows the plan's stages."""
    from dioe.tracereport import render_report
    from dioe.traceview import load_trace

    _, x, opt = chain_on_two
    with dioe.trace(tmp_path / "t.json") as tr:
        list(opt.map([(x,)] * 8, depth=4))
    page = render_report(load_trace(tmp_path / "t.json"), title="t")
    assert "Pipeline stages" in page and "predicted ms per batch" in page
    parts = [r for r in tr.records if r["kind"] == "partition"]
    assert sorted({r["call"] for r in parts}) == list(range(8)), "each batch's partitions carry its index"
    assert {(r["partition"], r["stage"]) for r in parts} == {("p0", 0), ("p1", 1)}
    assert {r["thread"] for r in parts if r["partition"] == "p0"} == {"dioe-stage-cpu"}
    assert {r["thread"] for r in parts if r["partition"] == "p1"} == {"dioe-stage-cpu-b"}
    p0 = {r["call"]: r for r in parts if r["partition"] == "p0"}
    p1 = {r["call"]: r for r in parts if r["partition"] == "p1"}
    for k in range(8):
        assert p1[k]["start"] >= p0[k]["end"], "a batch enters stage 2 after stage 1"
    # batch k+1 starts stage 1 before batch k has left stage 2, for some k: the pipeline overlapped them
    assert any(p0[k + 1]["start"] < p1[k]["end"] for k in range(7))
    calls = [r for r in tr.records if r["kind"] == "call"]
    assert len(calls) == 8 and all(r["pipelined"] for r in calls)
    data = tr.to_chrome()   # overlapping batches' call slices each on a lane of their own slot
    lanes = {(e["pid"], e["tid"]): e["args"]["name"] for e in data["traceEvents"] if e.get("name") == "thread_name"}
    slices = [e for e in data["traceEvents"] if e.get("cat") == "call"]
    assert len(slices) == 8 and all(lanes[e["pid"], e["tid"]].startswith("pipelined batches, slot") for e in slices)
    for lane in {e["tid"] for e in slices}:
        mine = sorted((e["ts"], e["ts"] + e["dur"]) for e in slices if e["tid"] == lane)
        assert all(a[1] <= b[0] + 0.01 for a, b in zip(mine, mine[1:])), "slices on one lane never overlap"


def test_a_failing_batch_fails_alone(chain_on_two):
    """A batch that fails in the first stage raises its own error in its turn; the batches after it still run.
    (A DIOEError from the engine is the call's own verdict: the runtime raises it rather than falling back.)"""
    model, x, opt = chain_on_two
    c = opt.runtime.compiled["p0"]
    original = c.fn

    def fails_on_negative(*a):
        if float(a[0].sum()) < -1e5:
            raise dioe.DIOEError("poisoned batch")
        return original(*a)
    c.fn = fails_on_negative
    try:
        batches = [(x,), (x - 1e6,), (x + 1,)]
        futures = [opt.submit(*b) for b in batches]
        assert_matches_eager(eager(model, batches[0]), futures[0].result(timeout=60), rtol=1e-4)
        with pytest.raises(dioe.DIOEError, match="poisoned batch"):
            futures[1].result(timeout=60)
        assert_matches_eager(eager(model, batches[2]), futures[2].result(timeout=60), rtol=1e-4)
        got = opt.map(batches, depth=3)
        next(got)
        with pytest.raises(dioe.DIOEError, match="poisoned batch"):
            next(got)
    finally:
        c.fn = original


def test_bad_inputs_and_depth_are_named_at_once(chain_on_two, standin_pool):
    """Inputs unlike the captured ones raise InputSpecError from submit itself, pipelined or not; a depth that is
    not a positive integer is a DIOEError naming it."""
    _, x, opt = chain_on_two
    model, y = chain(width=16, layers=2)
    one = two_stage(model, y, standin_pool, second=("cpu", "torch"))
    try:
        for o, good in ((opt, x), (one, y)):
            with pytest.raises(dioe.InputSpecError, match=r"captured shape is \[4, \d+\]"):
                o.submit(good[:, :3])
            with pytest.raises(dioe.DIOEError, match="depth must be a positive integer"):
                o.map([(good,)], depth=0)
    finally:
        one.runtime.close()


def test_close_does_not_hang(standin_pool):
    """A stage stuck past close's timeout: close returns, the stuck batch and those behind it fail with a clear
    error, and no later batch is taken."""
    model, x = chain(width=16, layers=2)
    opt = two_stage(model, x, standin_pool, second=("cpu-b", "torch"))
    c = opt.runtime.compiled["p1"]
    original, release = c.fn, threading.Event()
    c.fn = lambda *a: (release.wait(30), original(*a))[1]
    futures = [opt.submit(x) for _ in range(3)]
    t0 = time.monotonic()
    opt.runtime.pipeline().close(timeout_s=0.5)
    assert time.monotonic() - t0 < 10
    for f in futures:
        with pytest.raises(PipelineClosed, match="closed before this batch finished"):
            f.result(timeout=1)
    with pytest.raises(PipelineClosed, match="takes no more batches"):
        opt.submit(x)
    release.set()
    opt.runtime.close()


def test_a_member_with_two_stages_runs_both_in_its_thread(standin_pool):
    """Branches: left on cpu, right on cpu-b, head on cpu again. Three stages, two threads; cpu's runs its first
    and its last stage, and a stream of batches still comes out as sequential calls do, in order."""
    from helpers import branches_on_two_members

    model, x, opt = branches_on_two_members(standin_pool)
    try:
        pipe = opt.runtime.pipeline()
        assert [s.member for s in pipe.stages] == ["cpu", "cpu-b", "cpu"]
        batches = [(x * (i + 1),) for i in range(5)]
        for b, out in zip(batches, opt.map(batches, depth=3)):
            assert_matches_eager(eager(model, b), out, rtol=1e-4)
        assert {t.name for t in pipe._threads} == {"dioe-stage-cpu", "dioe-stage-cpu-b"}
    finally:
        opt.runtime.close()


def test_one_member_plan_runs_submit_and_map_in_order(standin_pool):
    model, x = chain(width=16, layers=2)
    opt = two_stage(model, x, standin_pool, second=("cpu", "torch"))
    try:
        assert not opt.runtime.pipeline().pipelined
        batches = [(x * i,) for i in range(4)]
        for b, out in zip(batches, opt.map(batches)):
            assert_matches_eager(eager(model, b), out, rtol=1e-5)
        assert_matches_eager(eager(model, (x,)), opt.submit(x).result(), rtol=1e-5)
    finally:
        opt.runtime.close()


# -- the throughput cost model, on scripted profiles: nothing runs ---------------------------------------------------
def _scripted(standin_pool, times, nbytes=0, gbps=float("inf")):
    """Segments s0..sN-1 in a chain, each timed on torch at cpu and cpu-b as `times` gives, and a link."""
    from dioe.cost import Cost
    from dioe.partition import INPUT, OUTPUT, Edges
    from dioe.plan import Choice
    from dioe.profile import LinkCost, Profile
    from dioe.segment import Segment
    from dioe.timing import Timing

    ids = [f"s{i}" for i in range(len(times))]
    segs = [Segment(s, (s,), s, Cost(), 0, 0) for s in ids]
    prof = Profile("g", "f")
    a, b = Choice("cpu", "torch"), Choice("cpu-b", "torch")
    prof.times = {s: {a: Timing(ta, ta, ta, 5), b: Timing(tb, tb, tb, 5)} for s, (ta, tb) in zip(ids, times)}
    link = LinkCost(0.0, gbps)
    prof.links = {"cpu->cpu-b": link, "cpu-b->cpu": link, "cpu->npu": link, "npu->cpu": link,
                  "cpu-b->npu": link, "npu->cpu-b": link}
    pairs = [(INPUT, ids[0]), *zip(ids, ids[1:]), (ids[-1], OUTPUT)]
    return segs, Edges({p: nbytes for p in pairs}), prof, a, b


def test_throughput_planner_balances_two_members(standin_pool):
    """Eight equal segments on two equal members: latency keeps one member (a split only adds copies); throughput
    cuts them four and four, halving the bottleneck."""
    from dioe.bottleneck import bottleneck_ms, stage_loads
    from dioe.partition import assign

    segs, edges, prof, a, b = _scripted(standin_pool, [(1.0, 1.0)] * 8)
    lat = assign(segs, edges, prof, standin_pool)
    assert len({o.member for o in lat.options.values()}) == 1
    thr = assign(segs, edges, prof, standin_pool, objective="throughput")
    assert thr.method == "pipeline dp"
    members = [thr.options[s.id].member for s in segs]
    assert members[:4] == [members[0]] * 4 and members[4:] == [members[4]] * 4 and members[0] != members[4]
    options = {s: {o: t.median_ms for o, t in prof.times[s].items()} for s in prof.times}
    loads = stage_loads(segs, edges, thr.options, options, prof, "cpu")
    whole = stage_loads(segs, edges, lat.options, options, prof, "cpu")
    assert [len(ld.segments) for ld in loads] == [4, 4]
    assert bottleneck_ms(loads) == pytest.approx(bottleneck_ms(whole) / 2, rel=0.02)


def test_throughput_planner_follows_the_members_speeds(standin_pool):
    """cpu-b twice as slow: the balanced cut gives it a third of the work, not half."""
    from dioe.partition import assign

    segs, edges, prof, a, b = _scripted(standin_pool, [(1.0, 2.0)] * 9)
    thr = assign(segs, edges, prof, standin_pool, objective="throughput")
    got = [thr.options[s.id] for s in segs]
    assert got in ([a] * 6 + [b] * 3, [b] * 3 + [a] * 6), got


def test_throughput_planner_counts_copies(standin_pool):
    """A slow link: each copy costs more than a stage saves, so one member runs everything."""
    from dioe.partition import assign

    segs, edges, prof, a, b = _scripted(standin_pool, [(1.0, 1.0)] * 4, nbytes=1 << 20, gbps=0.1)
    thr = assign(segs, edges, prof, standin_pool, objective="throughput")
    assert len({o.member for o in thr.options.values()}) == 1


def test_plan_records_stages_and_old_plans_load():
    from dioe.plan import Plan, PlanPartition, PlanStage

    parts = tuple(PlanPartition(p, (p,), (f"n{p}",), m, "torch", "fp32", 1, 0.0, 1.0)
                  for p, m in (("p0", "cpu"), ("p1", "cpu"), ("p2", "cpu-b")))
    plan = Plan("m", "h", "f", "throughput", parts, 3.0,
                stages=(PlanStage("cpu", ("p0", "p1"), 2.0), PlanStage("cpu-b", ("p2",), 1.5)))
    assert Plan.from_dict(plan.to_dict()) == plan
    assert plan.bottleneck_ms == 2.0
    assert "pipeline stages: cpu [p0, p1] 2" in plan.summary() and "a batch every 2" in plan.summary()
    old = plan.to_dict()
    del old["stages"]
    assert Plan.from_dict(old).stages == ()
    bad = plan.to_dict()
    bad["stages"][1]["partitions"] = ["p9"]
    with pytest.raises(dioe.PlanError, match=r"stages\[1\]\.partitions\[0\]: 'p9' is not a partition"):
        Plan.from_dict(bad)


def test_the_batcher_pipelines_batches_of_a_staged_plan(chain_on_two):
    """Served through the batcher, a plan on two members runs its batches in the members' stage threads, each
    request gets its own rows back, and a failing batch fails only its requests."""
    from concurrent.futures import ThreadPoolExecutor

    from dioe.serve import Batcher

    model, x, opt = chain_on_two
    engines = {pid: opt.runtime.compiled[pid] for pid in ("p0", "p1")}
    originals = {pid: c.fn for pid, c in engines.items()}
    threads = set()

    def where(pid):
        def run(*a):
            threads.add((pid, threading.current_thread().name))
            if float(a[0].abs().max()) > 1e5:
                raise dioe.DIOEError("poisoned request")
            return originals[pid](*a)
        return run
    rows = [x[i % 4:i % 4 + 1] + i for i in range(16)]
    try:
        for pid, c in engines.items():
            c.fn = where(pid)
        with Batcher(opt, max_batch_size=4, preferred_batch_sizes=(4,), max_queue_delay_ms=5) as b:
            with ThreadPoolExecutor(8) as pool:
                outs = list(pool.map(lambda r: b(r), rows))
            poisoned = b.submit(x[:1] + 1e6)
            fine = b.submit(x[:1])
            with pytest.raises(dioe.DIOEError, match="poisoned request"):
                poisoned.result(timeout=60)
            assert_matches_eager(eager(model, (x[:1],)), fine.result(timeout=60), rtol=1e-4)
    finally:
        for pid, c in engines.items():
            c.fn = originals[pid]
    for r, out in zip(rows, outs):
        assert_matches_eager(eager(model, (r,)), out, rtol=1e-4)
    assert threads == {("p0", "dioe-stage-cpu"), ("p1", "dioe-stage-cpu-b")}, threads


@pytest.mark.models
def test_optimize_for_throughput_records_stages_and_maps_like_eager(tmp_path, monkeypatch):
    """optimize(objective="throughput") on two one-thread members: the partitioner's plan (before the race) cuts
    equal layers into two stages, one per member; whatever the race keeps (on a busy machine, often one engine
    over the whole graph), the plan says its stages and `map` gives eager's outputs in order."""
    import dataclasses

    real_build, built = dioe.build.build, []
    model, x = chain(width=256, layers=8)
    pool = dioe.ResourcePool.discover(POOLS / "standin-pair.yaml")
    monkeypatch.setattr(dioe.build, "build",
                        lambda c, plan, *a, **k: built.append(plan) or real_build(c, plan, *a, **k))
    opt = dioe.optimize(model, (x,), hardware=pool, backends=["onnxruntime"], objective="throughput",
                        cache_dir=tmp_path, precision="fp32")
    first = built[0]
    assert first.objective == "throughput" and "partitioned by pipeline dp" in first.notes
    # one stage per member, each predicted near half the work: eight layers of 0.5 MFLOP outweigh a call's cost
    assert [s.member for s in first.stages] in (["cpu", "cpu-b"], ["cpu-b", "cpu"]), first.summary()
    assert max(s.predicted_ms for s in first.stages) < 0.75 * sum(s.predicted_ms for s in first.stages)
    assert "pipeline stages:" in first.summary()
    assert [p for s in opt.plan.stages for p in s.partitions] == [p.id for p in opt.plan.partitions]
    assert dioe.Plan.from_dict(dataclasses.asdict(opt.plan)) == opt.plan
    batches = [(x + i,) for i in range(6)]
    for b, out in zip(batches, opt.map(batches, depth=3)):
        assert_matches_eager(eager(model, b), out, rtol=1e-4)
    opt.runtime.close()


def test_pipeline_dp_finds_the_least_bottleneck_of_every_cut(standin_pool):
    """On a chain with random times on three members of three backends each, the DP's bottleneck equals the best
    of every cut into at most three stages on distinct members (by brute force)."""
    import itertools
    import random

    from dioe.bottleneck import bottleneck_ms, pipeline_dp, stage_loads
    from dioe.cost import Cost
    from dioe.partition import INPUT, OUTPUT, Edges
    from dioe.plan import Choice
    from dioe.profile import LinkCost, Profile
    from dioe.segment import Segment
    from dioe.timing import Timing

    rng = random.Random(7)
    n, members = 7, ("cpu", "cpu-b", "npu")
    ids = [f"s{i}" for i in range(n)]
    segs = [Segment(s, (s,), s, Cost(), 0, 0) for s in ids]
    opts = [Choice(m, b) for m in members for b in ("torch", "onnxruntime", "openvino")]
    prof = Profile("g", "f")
    prof.times = {s: {o: Timing(t, t, t, 5) for o in opts for t in [rng.uniform(0.5, 2.0)]} for s in ids}
    prof.links = {f"{a}->{b}": LinkCost(10.0, 16.0) for a in members for b in members if a != b}
    edges = Edges({p: 1 << 16 for p in [(INPUT, ids[0]), *zip(ids, ids[1:]), (ids[-1], OUTPUT)]})
    options = {s: {o: t.median_ms for o, t in prof.times[s].items()} for s in ids}
    got = bottleneck_ms(stage_loads(segs, edges, pipeline_dp(segs, edges, options, prof, "cpu"), options, prof, "cpu"))
    best = float("inf")
    cuts = itertools.chain([()], ((a,) for a in range(1, n)), itertools.combinations(range(1, n), 2))
    for cut in cuts:
        ends = [0, *cut, n]
        for picks in itertools.product(opts, repeat=len(ends) - 1):
            if len({o.member for o in picks}) == len(picks):
                chosen = {s.id: picks[i] for i in range(len(picks)) for s in segs[ends[i]:ends[i + 1]]}
                best = min(best, bottleneck_ms(stage_loads(segs, edges, chosen, options, prof, "cpu")))
    assert got == pytest.approx(best)
