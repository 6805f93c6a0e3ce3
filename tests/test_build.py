"""Building a plan: the graph split into its partitions, each compiled for its member, and verified against eager;
a partition that fails to compile or computes something else runs on torch at the reference member instead."""

import dataclasses

import pytest
import torch
import torch.fx

import dioe
from dioe.build import build, verify
from dioe.settings import Settings
from dioe.split import split_graph

from helpers import assert_matches_eager, eager, five_layers, force_split, one_partition_plan


@pytest.mark.parametrize("split", [False, True], ids=["one partition", "split plan"])
def test_a_partition_that_fails_verification_runs_on_the_reference(cpu, tmp_path, monkeypatch, split):
    """ONNX Runtime made to compute wrong numbers: every partition it would run is caught against eager, named in
    a warning, and run by torch on the reference; the result is right."""
    from dioe.backends import backend_class

    cls = backend_class("onnxruntime")
    real = cls.compile_fn

    def off_by_half(self, *a, **k):
        built = real(self, *a, **k)
        return dataclasses.replace(built, fn=lambda *xs: tuple(o * 1.5 for o in built.fn(*xs)))
    monkeypatch.setattr(cls, "compile_fn", off_by_half)
    if split:
        force_split(monkeypatch, cpu.id)
    model, x = five_layers()
    with pytest.warns(RuntimeWarning, match=rf"on onnxruntime@{cpu.id} differs from eager by .* runs on torch@"):
        opt = dioe.optimize(model, (x,), backends=["torch", "onnxruntime"] if split else ["onnxruntime"],
                            cache_dir=tmp_path, precision="fp32")
    assert {p.backend for p in opt.plan.partitions} == {"torch"}, opt.plan.summary()
    assert_matches_eager(eager(model, (x,)), opt(x))


def test_verify_holds_a_partition_to_the_settings_tolerance(cpu, tmp_path, monkeypatch):
    """An engine off by 1e-3 passes at a tolerance of 1e-2 and is caught at the default 1e-4."""
    from dioe.backends import backend_class

    cls = backend_class("onnxruntime")
    real = cls.compile_fn

    def slightly_off(self, *a, **k):
        built = real(self, *a, **k)
        return dataclasses.replace(built, fn=lambda *xs: tuple(o * (1 + 1e-3) for o in built.fn(*xs)))
    monkeypatch.setattr(cls, "compile_fn", slightly_off)
    model, x = five_layers()
    g = dioe.capture(model, (x,))
    plan = one_partition_plan(g, cpu.id, "onnxruntime")
    pool = dioe.ResourcePool.discover()
    loose = Settings(cache_dir=tmp_path, tolerance=1e-2)
    kept = verify(build(g, plan, pool, settings=loose), settings=loose)
    assert kept.runtime.compiled["p0"].backend == "onnxruntime" and kept.plan == plan
    strict = Settings(cache_dir=tmp_path)
    with pytest.warns(RuntimeWarning, match=r"partition p0 on onnxruntime@.* differs from eager by 1\.0\de-03 "
                                            r"\(> 1e-04\); it runs on torch@"):
        caught = verify(build(g, plan, pool, settings=strict), settings=strict)
    (p,) = caught.plan.partitions
    assert (p.backend, p.member) == ("torch", pool.reference.id) and p.reason.startswith("verification failed")
    assert_matches_eager(eager(model, (x,)), caught(x))


def test_a_partition_that_cannot_be_compiled_runs_on_the_reference(cpu, tmp_path):
    model, x = five_layers()
    g = dioe.capture(model, (x,))
    plan = one_partition_plan(g, cpu.id, "onnxruntime", precision="int4")
    with pytest.warns(RuntimeWarning, match=rf"does not run int4.*Partition p0 runs on torch@{cpu.id} instead"):
        opt = build(g, plan, dioe.ResourcePool.discover(), settings=Settings(cache_dir=tmp_path))
    c = opt.runtime.compiled["p0"]
    assert (c.backend, c.member, c.precision) == ("torch", cpu.id, "fp32")
    (p,) = opt.plan.partitions  # the plan says what runs, and why
    assert (p.backend, p.member, p.precision) == ("torch", cpu.id, "fp32")
    assert p.reason == f"onnxruntime@{cpu.id}/int4 failed to compile it; reference backend", p.reason
    assert_matches_eager(eager(model, (x,)), opt(x))


def test_splitting_runs_the_model_only_where_a_partition_needs_a_value_inside_it(monkeypatch):
    """A partition that reads only the graph's inputs takes them as its example inputs: no run of the graph. A
    partition that reads a value computed inside the graph gets it from one run of the graph."""
    model, x = five_layers()
    g = dioe.capture(model, (x,))
    runs, real_run = [], torch.fx.Interpreter.run
    monkeypatch.setattr(torch.fx.Interpreter, "run", lambda self, *a, **k: runs.append(a) or real_run(self, *a, **k))
    whole = split_graph(g.gm, lambda n: "p0", g.example_inputs)
    given = whole.partition("p0").example_inputs
    assert runs == [] and len(given) == len(g.example_inputs) and all(
        a is b for a, b in zip(given, g.example_inputs)), "the graph's own inputs, as they are"
    names = [n.name for n in g.compute_nodes]
    halves = split_graph(g.gm, lambda n: "a" if names.index(n.name) < len(names) // 2 else "b", g.example_inputs)
    assert len(runs) == 1
    a, b = halves.partition("a"), halves.partition("b")
    with torch.inference_mode():
        assert_matches_eager(tuple(a.gm(*a.example_inputs)), tuple(b.example_inputs), rtol=0)
