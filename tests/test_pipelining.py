"""Pipelining: a stream of batches through a plan on two members, each member working on its own batch at once.
Models here run under hand-written two-member plans (no profile, no race); the cost model is tested on a
synthetic profile."""

import threading
import time

import pytest
import torch

import dioe
from dioe.pipelining import PipelineClosed, group_stages

from helpers import assert_matches_eager, eager


def chain(width=64, layers=6):
    torch.manual_seed(0)
    mods = []
    for _ in range(layers):
        mods += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*mods).eval(), torch.randn(4, width)


def two_stage(model, x, standin_pool, *, second=("cpu-b", "onnxruntime")):
    """`model` (a Sequential) under a plan of two partitions: its first half on cpu (torch), the rest on `second`."""
    from dioe.build import build
    from dioe.plan import Plan, PlanPartition

    g = dioe.capture(model, (x,), name="chain")
    half = len(model) // 2
    where = {n.name: ("p0" if int(n.meta["dioe.module"].split(".")[0]) < half else "p1") for n in g.compute_nodes}
    parts = []
    for pid, (member, backend) in (("p0", ("cpu", "torch")), ("p1", second)):
        nodes = tuple(n for n, p in where.items() if p == pid)
        parts.append(PlanPartition(pid, (pid,), nodes, member, backend, "fp32", len(nodes), 0.0, 1.0))
    plan = Plan("chain", g.structure_hash(), "", "throughput", tuple(parts), 1.0)
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


def test_map_overlaps_batches_across_members(chain_on_two):
    """While one batch runs on cpu-b, the next has already entered cpu: the stages' runs overlap in time."""
    _, x, opt = chain_on_two
    with dioe.trace() as tr:
        list(opt.map([(x,)] * 8, depth=4))
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
