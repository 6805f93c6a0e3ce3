"""The optimizer and runtime: plans, placement rules, concurrency, fallback, verification, reload."""

import copy
import gc
import threading
import warnings
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import dioe
from dioe.api import _build
from dioe.partition import INPUT, OUTPUT, Edges, assign, member_load
from dioe.plan import Choice, Plan, PlanPartition, show_ms
from dioe.profile import Profile, Timing
from dioe.segment import Segment, segment_graph
from dioe.cost import Cost

from helpers import assert_matches_eager, branches_on_two_members, eager

FAST = ["torch", "onnxruntime"]


def _one_partition(model, inputs, member, backend):
    """`model` built under a plan of one partition on `member` and `backend`, with no profiling or race."""
    g = dioe.capture(model, inputs)
    nodes = tuple(n.name for n in g.compute_nodes)
    plan = Plan("M", g.structure_hash(), "", "latency",
                (PlanPartition("p0", ("p0",), nodes, member.id, backend, "fp32", len(nodes), 0.0, 1.0),), 1.0)
    return _build(g, plan, dioe.ResourcePool.discover(), None, "latency")


def _force_split(monkeypatch, member_id):
    """Make optimize() plan segments alternately on onnxruntime and torch: a plan of several partitions."""
    import dataclasses
    import dioe.api

    real_assign = dioe.api.assign

    def split(segments, edges, profile, pool):
        got = real_assign(segments, edges, profile, pool)
        opts = {s.id: ("torch@%s/fp32" if i % 2 else "onnxruntime@%s/fp32") % member_id
                for i, s in enumerate(segments)}
        # predicted well ahead of any one engine over the whole graph, so that it is built and raced: at most
        # half the best whole-graph option, not just half the assignment's own sum. On a busy machine the live
        # profile once put ONNX Runtime's whole graph below that, so the split was never built and had no such
        # rival.
        best = min((ms for _, ms in dioe.api.whole_graph_options(segments, profile, pool)), default=got.predicted_ms)
        return dataclasses.replace(got, options=opts, predicted_ms=min(got.predicted_ms, best) / 2)
    monkeypatch.setattr(dioe.api, "assign", split)


def _five_layers():
    return torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 64),
                               torch.nn.GELU(), torch.nn.Linear(64, 8)).eval(), torch.randn(4, 32)


@pytest.fixture(scope="module")
def tiny_bert_on_standins(standin_pool):
    model, inputs = dioe.zoo.load("tiny-bert")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = dioe.optimize(model, inputs, hardware=standin_pool, backends=FAST)
    return model, inputs, opt


def test_denied_ops_never_land_on_the_member(tiny_bert_on_standins):
    _, _, opt = tiny_bert_on_standins
    for p in opt.plan.partitions:
        if p.member == "npu":
            part = opt.program.partition(p.id)
            ops = {str(n.target) for n in part.gm.graph.nodes if n.op == "call_function"}
            assert not any("embedding" in o for o in ops), p


def test_optimized_matches_eager_with_structure(tiny_bert_on_standins):
    model, inputs, opt = tiny_bert_on_standins
    assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)
    assert opt.plan.measured_ms is not None and opt.plan.eager_ms is not None
    for p in opt.plan.partitions:
        assert p.measured_ms is not None and p.reason


def test_plan_round_trips_and_reloads_without_profiling(tiny_bert_on_standins, tmp_path, standin_pool, monkeypatch):
    model, inputs, opt = tiny_bert_on_standins
    p = opt.plan
    assert Plan.from_dict(p.to_dict()) == p
    path = opt.save(tmp_path)
    assert Plan.load(path) == p

    def no_profiling(*a, **k):
        raise AssertionError("load() must not profile")
    monkeypatch.setattr(dioe.api, "profile_segments", no_profiling)
    again = dioe.load(path, model, hardware=standin_pool)
    assert_matches_eager(eager(model, inputs), again(*inputs), rtol=1e-4)
    assert "p0" in p.summary()


def test_dict_and_tuple_outputs(cpu):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x):
            h = torch.relu(self.a(x))
            return {"logits": self.b(h), "extra": (h.mean(), [h * 2])}

    m, x = M().eval(), torch.randn(4, 8)
    opt = dioe.optimize(m, (x,), backends=FAST)
    assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)


def test_runtime_failure_falls_back_and_loses_no_call(tiny_bert_on_standins):
    model, inputs, opt = tiny_bert_on_standins
    pid = opt.plan.partitions[-1].id
    compiled = opt.runtime.compiled[pid]
    original = compiled.fn

    def broken(*a):
        raise RuntimeError("device lost")
    compiled.fn = broken
    try:
        with pytest.warns(RuntimeWarning, match=rf"partition {pid}.*device lost.*torch@cpu"):
            out = opt(*inputs)
        assert_matches_eager(eager(model, inputs), out, rtol=1e-4)
        assert "device lost" in opt.stats["fallbacks"][pid] and opt.stats["fallback_calls"] == 1
        opt(*inputs)  # later calls go straight to the reference
        assert opt.stats["fallback_calls"] == 1
    finally:
        compiled.fn = original


def test_a_one_partition_plan_keeps_structure_and_falls_back(cpu):
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 8), torch.nn.Linear(8, 2)

        def forward(self, x, y):
            h = torch.relu(self.a(x)) + y
            return {"logits": self.b(h), "extra": (h.mean(), [h * 2])}

    m, x, y = M().eval(), torch.randn(4, 8), torch.randn(4, 8)
    opt = _one_partition(m, (x, y), cpu, "onnxruntime")
    assert opt.runtime.direct is not None, "one partition over the graph's inputs takes the direct path"
    options = opt.runtime.compiled["p0"].fn.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1", "alone, its workers spin"
    assert_matches_eager(eager(m, (x, y)), opt(x, y), rtol=1e-4)
    with pytest.raises(dioe.InputSpecError, match=r"captured shape is \[4, 8\]"):
        opt(x, y[:2])

    def broken(*a):
        raise RuntimeError("session lost")
    opt.runtime.compiled["p0"].fn = broken
    with pytest.warns(RuntimeWarning, match="partition p0.*session lost.*torch@"):
        out = opt(x, y)
    assert_matches_eager(eager(m, (x, y)), out, rtol=1e-4)
    assert opt.stats["fallback_calls"] == 1 and opt.runtime.compiled["p0"].backend == "torch"


def test_a_one_partition_plan_on_the_cpu_takes_the_hot_path(cpu, monkeypatch):
    """The common call skips the general path (input flattening, Runtime.run, output unflattening); any other call
    takes it, and still gets its error. An engine that fails is called once, and falls back."""
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    opt = _one_partition(m, (x,), cpu, "onnxruntime")
    assert opt._hot is not None
    long_way, engine = [], []
    real_run, compiled = opt.runtime.run, opt.runtime.compiled["p0"]
    real_fn = compiled.fn
    monkeypatch.setattr(opt.runtime, "run", lambda *a, **k: long_way.append(a) or real_run(*a, **k))
    monkeypatch.setattr(compiled, "fn", lambda *a: engine.append(a) or real_fn(*a))
    assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)
    assert not long_way and len(engine) == 1, "the hot path ran the call"
    assert_matches_eager(eager(m, (x,)), opt(x.requires_grad_()), rtol=1e-4)   # numpy() needs it detached
    x.requires_grad_(False)
    assert len(engine) == 2 and not opt.stats["fallback_calls"]
    with pytest.raises(dioe.InputSpecError, match=r"dtype float64, captured dtype is float32"):
        opt(x.double())
    with pytest.raises(dioe.InputSpecError, match=r"expected 1 positional input"):
        opt(x, x)
    assert len(engine) == 2, "a bad call is refused before it reaches the engine"
    with dioe.trace():   # a trace records the call's partitions: the long way
        assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)
    assert len(long_way) == 1 and len(engine) == 3

    def broken(*a):
        engine.append(a)
        raise RuntimeError("session lost")
    monkeypatch.setattr(compiled, "fn", broken)
    with pytest.warns(RuntimeWarning, match="partition p0.*session lost.*torch@"):
        assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)
    assert len(engine) == 4, "the failed engine is not called a second time"
    assert opt.stats["fallback_calls"] == 1 and len(long_way) == 1
    assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)   # the reference now, still on the hot path
    assert len(engine) == 4 and len(long_way) == 1


def test_the_hot_call_checks_each_input_and_keeps_constant_outputs(cpu, monkeypatch):
    """The generated hot call of a plan with two inputs and a constant among its outputs: each input is checked
    (a wrong second one is refused and named by the long way), the constant comes back in its place."""
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 8)

        def forward(self, x, y):
            return self.a(x) + y, 3

    m, x, y = M().eval(), torch.randn(4, 8), torch.randn(4, 8)
    opt = _one_partition(m, (x, y), cpu, "torch")
    assert opt.runtime.direct == [(True, 0), (False, 3)] and opt._hot is not None
    long_way, real_run = [], opt.runtime.run
    monkeypatch.setattr(opt.runtime, "run", lambda *a, **k: long_way.append(a) or real_run(*a, **k))
    out = opt(x, y)
    assert type(out) is tuple and out[1] == 3 and not long_way, "the hot path ran the call"
    assert_matches_eager(eager(m, (x, y)), out, rtol=1e-5)
    with pytest.raises(dioe.InputSpecError, match=r"input 'y' has dtype int64, captured dtype is float32"):
        opt(x, y.long())
    with pytest.raises(dioe.InputSpecError, match=r"input 'y' has shape \[4, 7\], captured shape is \[4, 8\]"):
        opt(x, y[:, :7])
    with pytest.raises(dioe.InputSpecError, match=r"expected 2 positional input"):
        opt(x)
    assert not long_way, "bad calls are refused by the input check, before any partition runs"


def test_each_model_has_its_own_hot_call(cpu, monkeypatch):
    """The hot call is the instance's own __call__: two models optimized in one process keep theirs, a call by
    keyword goes the general path (even one named as the hot call's parameters), and an engine replaced after the
    call was generated is the one the hot call runs, once however many calls fail on the one before."""
    class Named(torch.nn.Module):
        def forward(self, features):
            return features.relu() * 2

    a, b = torch.nn.Linear(8, 3).eval(), Named().eval()
    x, y = torch.randn(2, 8), torch.randn(5)
    opt_a, opt_b = _one_partition(a, (x,), cpu, "torch"), _one_partition(b, (y,), cpu, "torch")
    assert type(opt_a) is not type(opt_b) and isinstance(opt_a, dioe.Optimized), "one class per instance"
    assert_matches_eager(eager(a, (x,)), opt_a(x), rtol=1e-5)
    assert_matches_eager(eager(b, (y,)), opt_b(y), rtol=1e-5)
    with pytest.raises(dioe.InputSpecError, match=r"expected keyword inputs \[\], got \['features'\]"):
        opt_b(features=y)   # captured positionally: the general path says so, the hot call does not bind it
    with pytest.raises(dioe.InputSpecError, match=r"got \['x0'\]"):
        opt_b(y, x0=y)

    engine = []
    replacement = copy.copy(opt_a.runtime.compiled["p0"])
    replacement.fn = lambda *args: engine.append(args) or (torch.zeros(2, 3),)
    opt_a.runtime.replace("p0", replacement)
    assert torch.equal(opt_a(x), torch.zeros(2, 3)) and len(engine) == 1, "the hot call runs the new engine"

    # calls that fail together on one engine, from two threads, replace it once and both get the right result
    both_in = threading.Barrier(2)

    def lost(*args):
        both_in.wait(timeout=30)
        raise RuntimeError("engine lost")
    replacement.fn = lost
    replaced, real_replace = [], opt_a.runtime.replace
    monkeypatch.setattr(opt_a.runtime, "replace", lambda *a: replaced.append(a) or real_replace(*a))
    with pytest.warns(RuntimeWarning, match="engine lost"), ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: opt_a(x), range(2)))
    for out in outs:
        assert_matches_eager(eager(a, (x,)), out, rtol=1e-5)
    assert len(replaced) == 1 and opt_a.stats["fallback_calls"] == 2, (replaced, opt_a.stats)

    # nothing but the model holds its runtime (and engines): a model let go is freed at once
    gc.disable()
    try:
        gone = weakref.ref(opt_b.runtime)
        del opt_b
        assert gone() is None, "the runtime outlived its model"
    finally:
        gc.enable()


def test_wrong_input_shape_names_the_captured_one(tiny_bert_on_standins):
    _, inputs, opt = tiny_bert_on_standins
    with pytest.raises(dioe.InputSpecError, match=r"captured shape is \[1, 32\]"):
        opt(inputs[0][:, :16], inputs[1][:, :16])


def test_parallel_branches_run_concurrently_on_two_members(standin_pool):
    m, x, opt = branches_on_two_members(standin_pool)
    assert opt.runtime.concurrent
    with dioe.trace() as rec:
        for _ in range(3):
            out = opt(x)
    assert_matches_eager(eager(m, (x,)), out, rtol=1e-4)
    runs = [e for e in rec.records if e["kind"] == "partition"]
    lefts = [e for e in runs if e["partition"] == "left"]
    rights = [e for e in runs if e["partition"] == "right"]
    overlaps = [min(l_["end"], r["end"]) - max(l_["start"], r["start"]) for l_, r in zip(lefts, rights)]
    assert max(overlaps) > 0, f"left and right never overlapped: {overlaps}"
    assert {e["thread"].split("_")[0] for e in lefts} != {e["thread"].split("_")[0] for e in rights}
    opt.runtime.close()


def test_torch_compile_backend(cpu):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 8)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="dioe", dynamic=False)
    with torch.inference_mode():
        out = compiled(x)
    assert_matches_eager(eager(m, (x,)), out, rtol=1e-4)


def test_unknown_backend_and_objective():
    m, x = torch.nn.Linear(2, 2), torch.randn(1, 2)
    with pytest.raises(dioe.DIOEError, match="unknown backend"):
        dioe.optimize(m, (x,), backends=["tvm"])
    with pytest.raises(dioe.DIOEError, match="objective"):
        dioe.optimize(m, (x,), objective="fastest")
