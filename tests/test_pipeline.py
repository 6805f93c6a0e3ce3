"""`dioe.optimize` and `dioe.load` end to end: outputs match eager in structure and value, plans save and load
(also plans saved by the previous version), bad arguments get clear errors, and the torch.compile backend."""

import re
import warnings
from pathlib import Path

import pytest
import torch

import dioe
import dioe.pipeline
from dioe.plan import Plan

from helpers import DictAndTuple, assert_matches_eager, eager, one_partition_plan

DATA = Path(__file__).parent / "data"


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


def test_load_warns_for_a_plan_made_for_another_pool(cpu, tmp_path):
    """A plan runs where it was not made, as planned, with a warning that names both pools."""
    m, x, y = DictAndTuple().eval(), torch.randn(4, 8), torch.randn(4, 8)
    g = dioe.capture(m, (x, y), name="DictAndTuple")
    pool = dioe.ResourcePool.discover()
    here, elsewhere = tmp_path / "here.plan.json", tmp_path / "elsewhere.plan.json"
    one_partition_plan(g, cpu.id, "torch", fingerprint=pool.fingerprint()).save(here)
    one_partition_plan(g, cpu.id, "torch", fingerprint="another machine|x86_64|64").save(elsewhere)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        assert_matches_eager(eager(m, (x, y)), dioe.load(here, m, hardware=pool)(x, y))
    with pytest.warns(RuntimeWarning, match=r"made for another pool \(another machine\|x86_64\|64, this one is "):
        opt = dioe.load(elsewhere, m, hardware=pool)
    assert_matches_eager(eager(m, (x, y)), opt(x, y))


def test_a_plan_saved_by_the_previous_version_loads_and_runs():
    """tests/data holds a plan that DIOE saved before options became Choice values (c9bc04c): tiny-mlp on
    onnxruntime, on the machine that saved it. It loads, with the warning for another pool where this pool differs,
    and runs as eager does."""
    path = DATA / "tiny-mlp.c9bc04c.plan.json"
    plan = Plan.load(path)
    assert plan.partitions[0].runner_up.label() == "torch@cpu0/fp32", "it keeps its runner-up as a Choice"
    model, inputs = dioe.zoo.load("tiny-mlp")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RuntimeWarning)
        opt = dioe.load(path, model)
    for w in caught:
        assert not issubclass(w.category, RuntimeWarning) or "made for another pool" in str(w.message), w.message
    assert opt.plan == plan
    assert [(c.member, c.backend) for c in opt.runtime.compiled.values()] == [("cpu0", "onnxruntime")]
    assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)


def test_dict_and_tuple_outputs(cpu):
    m, x, y = DictAndTuple().eval(), torch.randn(4, 8), torch.randn(4, 8)
    opt = dioe.optimize(m, (x, y), backends=["torch", "onnxruntime"], precision="fp32")
    assert_matches_eager(eager(m, (x, y)), opt(x, y), rtol=1e-4)


def test_unknown_backend_and_objective():
    m, x = torch.nn.Linear(2, 2), torch.randn(1, 2)
    with pytest.raises(dioe.DIOEError, match=r"unknown backend\(s\) \['tvm'\]; known: .*onnxruntime"):
        dioe.optimize(m, (x,), backends=["tvm"], precision="fp32")
    with pytest.raises(dioe.DIOEError, match="objective must be 'latency' or 'throughput', got 'fastest'"):
        dioe.optimize(m, (x,), objective="fastest", precision="fp32")


def test_torch_compile_backend(cpu):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)).eval()
    x = torch.randn(2, 8)
    torch._dynamo.reset()
    compiled = torch.compile(m, backend="dioe", dynamic=False)
    with torch.inference_mode():
        out = compiled(x)
    assert_matches_eager(eager(m, (x,)), out, rtol=1e-4)


def test_zoo_load_leaves_the_callers_random_stream_alone():
    """zoo.load seeds its own weights (the same every time) without reseeding the caller's generator."""
    torch.manual_seed(1234)
    expected = torch.rand(3)
    torch.manual_seed(1234)
    first, _ = dioe.zoo.load("tiny-mlp")
    assert torch.equal(torch.rand(3), expected), "zoo.load moved or reseeded the caller's random stream"
    state = torch.get_rng_state()
    second, _ = dioe.zoo.load("tiny-mlp")
    assert torch.equal(torch.get_rng_state(), state)
    for a, b in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(a, b), "seeded weights are the same every time"


def test_saving_to_a_folder_keeps_the_plan_inside_it_whatever_the_model_is_called(cpu, tmp_path):
    """The model's name makes the plan's file name: `../x` or an absolute path must not write outside the folder."""
    from dioe.build import build

    m, x = torch.nn.Linear(4, 2).eval(), torch.randn(1, 4)
    folder = tmp_path / "plans"
    for name in ("../escaped", str(tmp_path / "abs"), "..", "a/../../b"):
        g = dioe.capture(m, (x,), name=name)
        opt = build(g, one_partition_plan(g, cpu.id, "torch"), dioe.ResourcePool.discover(), objective="latency")
        path = opt.save(folder)
        assert path.resolve().parent == folder.resolve() and path.exists(), (name, path)
        assert Plan.load(path).model == name, "the plan keeps the name; only its file name is made safe"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plans"], "nothing was written beside the folder"


def _torch_plan_file(tmp_path, cpu):
    """A plan of tiny-mlp on torch, saved; and the model."""
    model, inputs = dioe.zoo.load("tiny-mlp")
    g = dioe.capture(model, inputs, name="TinyMLP")
    path = tmp_path / "tiny-mlp.plan.json"
    one_partition_plan(g, cpu.id, "torch", fingerprint=dioe.ResourcePool.discover().fingerprint()).save(path)
    return path, g.structure_hash()


def test_loading_a_plan_with_another_model_names_the_plans_model_and_both_graphs(cpu, tmp_path):
    """A plan for another model is refused with the model it was built for, before any capture error that inputs
    meant for that model would raise deep inside this one."""
    from dataclasses import replace

    path, graph = _torch_plan_file(tmp_path, cpu)
    bert, _ = dioe.zoo.load("tiny-bert")
    with pytest.raises(dioe.DIOEError, match=rf"^{re.escape(str(path))}: this plan was built for TinyMLP \(graph "
                                             rf"{graph}, inputs float32\[1, 64\]\); the model given, BertModel, "
                                             r"could not be captured with inputs like the plan's \(.*\)\. Load the "
                                             r"plan with the model it was built for, or optimize BertModel again\.$"):
        dioe.load(path, bert)
    no_tensor = tmp_path / "no-tensor.plan.json"
    replace(Plan.load(path), inputs=({},)).save(no_tensor)
    with pytest.raises(dioe.DIOEError, match=r"no-tensor\.plan\.json: the plan's input 0 is not a tensor, so no "
                                             r"input like it can be made up; pass the model's example inputs"):
        dioe.load(no_tensor, bert)
    other = torch.nn.Linear(64, 3).eval()   # takes the plan's inputs, but is another graph
    other_graph = dioe.capture(other, (torch.randn(1, 64),)).structure_hash()
    with pytest.raises(dioe.DIOEError, match=rf"this plan was built for TinyMLP \(graph {graph}, .*\); the model "
                                             rf"given, Linear, captures to graph {other_graph} \(1 ops\)"):
        dioe.load(path, other)


def _corrupt_onnx_weights(cache: Path) -> None:
    """Overwrite the weights of every cached ONNX export with 1.0f and seal them again: the files pass the cache's
    integrity check and compute another function, as an engine that miscomputes would; only the call checked
    against eager can tell."""
    from dioe import integrity

    data = list(cache.rglob("*.onnx.data"))
    assert data, f"no ONNX weights under {cache}"
    for f in data:
        n = f.stat().st_size
        f.write_bytes(b"\x00\x00\x80\x3f" * (n // 4) + b"\x00" * (n % 4))
        main = f.with_name(f.name[:-len(".data")])
        integrity.seal(main, [f])


def test_load_checks_one_call_against_eager_and_falls_back_loudly(cpu, tmp_path):
    """A plan whose engine computes something else (its weights changed and sealed again) loads with a warning, runs its
    partition on torch so the values are eager's, and its plan says torch and why; strict=True refuses it."""
    from dioe.build import build
    from dioe.settings import Settings

    model, inputs = dioe.zoo.load("tiny-mlp")
    g = dioe.capture(model, inputs, name="TinyMLP")
    pool = dioe.ResourcePool.discover()
    cache = tmp_path / "cache"
    plan = one_partition_plan(g, cpu.id, "onnxruntime", fingerprint=pool.fingerprint())
    build(g, plan, pool, settings=Settings(cache_dir=cache), objective="latency")   # fills the cache
    path = tmp_path / "tiny-mlp.plan.json"
    plan.save(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # an intact artifact: no fallback, no warning
        sound = dioe.load(path, model, hardware=pool, cache_dir=cache)
    assert [(p.backend, p.reason) for p in sound.plan.partitions] == [("onnxruntime", "")]
    _corrupt_onnx_weights(cache)
    with pytest.warns(RuntimeWarning, match=r"p0 .*onnxruntime.*runs on torch"):
        opt = dioe.load(path, model, hardware=pool, cache_dir=cache)   # checked on inputs like the plan's
    assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)
    (p,) = opt.plan.partitions
    assert (p.member, p.backend, p.precision) == (pool.reference.id, "torch", "fp32") and p.reason, p
    assert [(c.member, c.backend) for c in opt.runtime.compiled.values()] == [(pool.reference.id, "torch")]
    with pytest.raises(dioe.DIOEError, match=r"p0.*onnxruntime.*strict: no fallback to torch"):
        dioe.load(path, model, inputs, hardware=pool, cache_dir=cache, strict=True)


def test_load_judges_a_partition_below_fp32_by_the_plans_accuracy(tmp_path):
    """A partition below fp32 (bf16 on a stand-in member) is not held to fp32's tolerance but to the plan's accuracy
    report: within it, it runs as planned; a report it cannot meet sends it to torch fp32, with a warning and the
    plan saying so."""
    from dataclasses import replace

    m, x = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU(), torch.nn.Linear(64, 16)).eval(), \
        torch.randn(8, 64)
    g = dioe.capture(m, (x,), name="bf16-mlp")
    from conftest import POOLS

    pool = dioe.ResourcePool.discover(POOLS / "standin-lowp.yaml")
    fp32 = one_partition_plan(g, "bf16", "torch", fingerprint=pool.fingerprint())
    bf16 = replace(fp32, partitions=(replace(fp32.partitions[0], precision="bf16"),))

    def report(threshold):
        return {"met": True, "confidence": 0.95, "results": [
            {"metric": "cosine", "output": 0, "value": 0.99999, "bound": 0.99999, "worst": threshold,
             "threshold": threshold, "samples": 64, "items": 64, "met": True}]}
    loose, tight = tmp_path / "loose.plan.json", tmp_path / "tight.plan.json"
    replace(bf16, accuracy=report(0.99)).save(loose)
    replace(bf16, accuracy=report(0.9999999999)).save(tight)   # bf16 keeps 8 bits: this it cannot meet
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        opt = dioe.load(loose, m, (x,), hardware=pool, cache_dir=tmp_path)
    assert opt.plan.partitions[0].precision == "bf16" and opt.runtime.compiled["p0"].precision == "bf16"
    with pytest.warns(RuntimeWarning, match=r"p0 below fp32 miss the plan's accuracy against eager: cosine of "
                                            r"output 0 0\.\d+ < 0\.99999999\d+"):
        opt = dioe.load(tight, m, (x,), hardware=pool, cache_dir=tmp_path)
    (p,) = opt.plan.partitions
    assert (p.member, p.backend, p.precision, p.reason) == (pool.reference.id, "torch", "fp32",
                                                            dioe.reload.LOW_REASON)
    assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)
    with pytest.raises(dioe.DIOEError, match="miss the plan's accuracy.*strict: no fallback to torch"):
        dioe.load(tight, m, (x,), hardware=pool, cache_dir=tmp_path, strict=True)

    # the check's one input may fall past the worst judged sample, up to WORST_SLACK times its error
    from dioe.accuracy import Budget, evaluate
    from dioe.reload import WORST_SLACK

    as_bf16 = dioe.load(loose, m, (x,), hardware=pool, cache_dir=tmp_path)
    with torch.inference_mode():
        v = evaluate(Budget(cosine=0.5), [g.reference_outputs()], [tuple(as_bf16.runtime.run([x]))])
    err = 1 - v.results[0].value
    assert err > 0
    for share, kept in ((1.2 / WORST_SLACK, True), (0.8 / WORST_SLACK, False)):
        worst = 1 - share * err   # the slack allows WORST_SLACK x share x err: 1.2 err, then 0.8 err
        path = tmp_path / f"worst-{share}.plan.json"
        replace(bf16, accuracy={**report(1 - 1e-12), "results": [
            {**report(1 - 1e-12)["results"][0], "worst": worst}]}).save(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            got = dioe.load(path, m, (x,), hardware=pool, cache_dir=tmp_path)
        assert (got.plan.partitions[0].precision == "bf16") == kept, (share, err, got.plan.summary())
    # a plan records its agreement on the inputs a load given none makes up (`accuracy.example`): inputs unlike the
    # held-out ones, worse than their worst, still load where the engine gives what it gave then
    made = dioe.reload.example_inputs_for(bf16)
    with torch.inference_mode():   # relative L2, which a float32 cosine of bf16 outputs does not round away
        l2 = evaluate(Budget(rel_l2=1.0), [tuple(g.gm(*made))], [tuple(as_bf16.runtime.run(list(made)))]).results[0].value
    assert l2 > 0
    tight = {"met": True, "confidence": 0.95, "results": [
        {"metric": "rel_l2", "output": 0, "value": 1e-12, "bound": 1e-12, "worst": 1e-12, "threshold": 1e-12,
         "samples": 64, "items": 64, "met": True}]}
    for share, given, kept in ((1.2 / WORST_SLACK, None, True), (0.8 / WORST_SLACK, None, False),
                               (1.2 / WORST_SLACK, (x,), False)):   # other inputs: what was recorded does not apply
        path = tmp_path / f"example-{share}-{given is None}.plan.json"
        replace(bf16, accuracy={**tight, "example": [{"metric": "rel_l2", "output": 0,
                                                      "value": share * l2}]}).save(path)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            loaded = dioe.load(path, m, given, hardware=pool, cache_dir=tmp_path)
        assert (loaded.plan.partitions[0].precision == "bf16") == kept, (share, given, l2, loaded.plan.summary())

