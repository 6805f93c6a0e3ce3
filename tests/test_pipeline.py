"""`dioe.optimize` and `dioe.load` end to end: outputs match eager in structure and value, plans save and load,
bad arguments get clear errors, and the torch.compile backend."""

import warnings

import pytest
import torch

import dioe
import dioe.pipeline
from dioe.plan import Plan

from helpers import DictAndTuple, assert_matches_eager, eager


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
    assert path == tmp_path / f"{p.model}.plan.json" and Plan.load(path) == p

    def no_profiling(*a, **k):
        raise AssertionError("load() must not profile")
    monkeypatch.setattr(dioe.pipeline, "profile_segments", no_profiling)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # the plan was made for this very pool: no warning
        again = dioe.load(path, model, hardware=standin_pool)
    assert_matches_eager(eager(model, inputs), again(*inputs), rtol=1e-4)
    assert again.plan == p and "p0" in p.summary()


def test_dict_and_tuple_outputs(cpu):
    m, x, y = DictAndTuple().eval(), torch.randn(4, 8), torch.randn(4, 8)
    opt = dioe.optimize(m, (x, y), backends=["torch", "onnxruntime"])
    assert_matches_eager(eager(m, (x, y)), opt(x, y), rtol=1e-4)


def test_unknown_backend_and_objective():
    m, x = torch.nn.Linear(2, 2), torch.randn(1, 2)
    with pytest.raises(dioe.DIOEError, match=r"unknown backend\(s\) \['tvm'\]; known: .*onnxruntime"):
        dioe.optimize(m, (x,), backends=["tvm"])
    with pytest.raises(dioe.DIOEError, match="objective must be 'latency' or 'throughput', got 'fastest'"):
        dioe.optimize(m, (x,), objective="fastest")


def test_torch_compile_backend(cpu):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 8)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="dioe", dynamic=False)
    with torch.inference_mode():
        out = compiled(x)
    assert_matches_eager(eager(m, (x,)), out, rtol=1e-4)
