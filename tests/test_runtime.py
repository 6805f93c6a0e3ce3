"""Running an optimized model: the generated hot call, input checks, run-time fallback when an engine fails, and
partitions on two members running at once. Models here are built under hand-written plans: no profile, no race."""

import copy
import gc
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import dioe

from helpers import DictAndTuple, assert_matches_eager, branches_on_two_members, eager, one_partition


def test_runtime_failure_falls_back_and_loses_no_call(tiny_bert_on_standins):
    """An engine that fails: each call is retried once, then runs on torch; after three such calls the breaker
    opens and calls go to torch directly; once the engine works again, probes pass and it takes the calls back."""
    model, inputs, opt = tiny_bert_on_standins
    pid = opt.plan.partitions[-1].id
    compiled = opt.runtime.compiled[pid]
    original, engine = compiled.fn, []

    def broken(*a):
        engine.append(a)
        raise RuntimeError("device lost")
    opt.runtime.configure_breakers(failures=3, cooldown_calls=4, cooldown_s=3600, probes=2)
    compiled.fn = broken
    try:
        with pytest.warns(RuntimeWarning, match=rf"partition {pid}.*device lost.*torch@cpu"):
            out = opt(*inputs)
        assert_matches_eager(eager(model, inputs), out, rtol=1e-4)
        assert "device lost" in opt.stats["fallbacks"][pid] and opt.stats["fallback_calls"] == 1
        assert len(engine) == 2 and opt.stats["retries"] == 1, "one retry on the same engine"
        for _ in range(2):
            assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)
        assert opt.stats["breakers"][pid]["state"] == "open" and len(engine) == 6
        for _ in range(4):   # the cool-down: the engine is left alone
            assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)
        assert len(engine) == 6 and opt.runtime.compiled[pid].backend == "torch"
        assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)   # a probe: it fails, open again
        assert len(engine) == 7 and opt.stats["breakers"][pid]["state"] == "open"
        compiled.fn = original   # the fault is over
        for _ in range(4 + 2):   # another cool-down, then two probes that pass
            assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)
        assert opt.stats["breakers"][pid] == {"state": "closed", "opened": 2, "closed": 1, "fallback_calls": 12}
        assert opt.runtime.compiled[pid] is compiled, "the planned engine runs the calls again"
    finally:  # the engine and breakers back as they were, for the other tests of this shared model
        compiled.fn = original
        opt.runtime.configure_breakers()


def test_wrong_input_shape_names_the_captured_one(tiny_bert_on_standins):
    _, inputs, opt = tiny_bert_on_standins
    with pytest.raises(dioe.InputSpecError, match=r"captured shape is \[1, 32\]"):
        opt(inputs[0][:, :16], inputs[1][:, :16])


def test_a_one_partition_plan_keeps_structure_and_falls_back(cpu):
    m, x, y = DictAndTuple().eval(), torch.randn(4, 8), torch.randn(4, 8)
    opt = one_partition(m, (x, y), cpu, "onnxruntime")
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
    assert opt.stats["fallback_calls"] == 1 and opt.stats["breakers"]["p0"]["state"] == "closed"


def test_a_one_partition_plan_on_the_cpu_takes_the_hot_path(cpu, monkeypatch):
    """The common call skips the general path (input flattening, Runtime.run, output unflattening); any other call
    takes it, and still gets its error. An engine that fails is retried once, then the call falls back."""
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    opt = one_partition(m, (x,), cpu, "onnxruntime")
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
    assert len(engine) == 5, "the failed engine is retried once"
    assert opt.stats["fallback_calls"] == 1 and opt.stats["retries"] == 1 and len(long_way) == 1
    monkeypatch.setattr(compiled, "fn", lambda *a: engine.append(a) or real_fn(*a))
    assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)   # one failure opens no breaker: the engine runs it
    assert len(engine) == 6 and len(long_way) == 1 and opt.stats["fallback_calls"] == 1


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
    opt = one_partition(m, (x, y), cpu, "torch")
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
    opt_a, opt_b = one_partition(a, (x,), cpu, "torch"), one_partition(b, (y,), cpu, "torch")
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

    # calls that fail together on one engine, from two threads, build one fallback and both get the right result
    both_in = threading.Barrier(2)

    def lost(*args):
        both_in.wait(timeout=30)
        raise RuntimeError("engine lost")
    replacement.fn = lost
    with pytest.warns(RuntimeWarning, match="engine lost"), ThreadPoolExecutor(2) as pool:
        outs = list(pool.map(lambda _: opt_a(x), range(2)))
    for out in outs:
        assert_matches_eager(eager(a, (x,)), out, rtol=1e-5)
    assert len(opt_a.runtime._fallback_engines) == 1 and opt_a.stats["fallback_calls"] == 2, opt_a.stats
    assert opt_a.stats["retries"] == 2

    # nothing but the model holds its runtime (and engines): a model let go is freed at once
    gc.disable()
    try:
        gone = weakref.ref(opt_b.runtime)
        del opt_b
        assert gone() is None, "the runtime outlived its model"
    finally:
        gc.enable()


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
