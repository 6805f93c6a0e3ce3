"""Backends: each compiles whole graphs and pieces of graphs to callables that match eager."""

from pathlib import Path

import pytest
import torch

import dioe
from dioe import backends
from dioe.backend import Partition
from dioe.errors import BackendError, BackendUnavailable, DIOEError
from dioe.split import run_sequential, split_graph

from helpers import assert_matches_eager, eager

AVAILABLE = [b for b in backends.names() if backends.unavailable_reason(b) is None]
# Tolerances per backend, fp32. torch eager runs the same kernels as the reference. The others reorder
# reductions (fused GEMM epilogues, different conv algorithms, OpenVINO's own kernels): across the zoo we saw
# at most 3e-6 relative to the largest output; 1e-4 leaves room for other CPUs' kernel choices.
RTOL = {"torch": 1e-6, "inductor": 1e-4, "onnxruntime": 1e-4, "openvino": 1e-4}


def whole(g, name="whole"):
    return Partition(name, g.gm, tuple(g.example_inputs))


def test_registry_names_and_unknown_backend():
    assert set(backends.names()) >= {"torch", "inductor", "onnxruntime", "openvino"}
    with pytest.raises(DIOEError, match="known backends: inductor, onnxruntime, openvino, torch"):
        backends.get("tensorrt-llm")


def test_missing_library_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "openvino" else real(n, *a))
    assert backends.unavailable_reason("openvino") == "openvino is not installed (pip install 'dioe[openvino]')"
    with pytest.raises(BackendUnavailable, match=r"dioe\[openvino\]"):
        backends.get("openvino")


@pytest.mark.parametrize("backend", AVAILABLE)
def test_whole_graph_single_partition(backend, cpu):
    model, inputs = dioe.zoo.load("tiny-bert")
    g = dioe.capture(model, inputs)
    compiled = backends.get(backend).compile(whole(g), cpu)
    assert compiled.backend == backend and compiled.member == cpu.id and compiled.precision == "fp32"
    out = g.unflatten_outputs(compiled(*g.example_inputs))
    assert_matches_eager(eager(model, inputs), out, rtol=RTOL[backend], what=backend)


class Mixed(torch.nn.Module):
    """Integer index input, a scalar tensor input, a multi-output op, and a value read by two later parts."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(50, 16)
        self.a = torch.nn.Linear(16, 16)
        self.b = torch.nn.Linear(16, 16)
        self.c = torch.nn.Linear(16, 16)

    def forward(self, ids, scale):
        h = self.emb(ids)                      # (B, T, 16) from int64 indices
        lo, hi = h.chunk(2, dim=-1)            # multi-output op
        h = torch.cat([hi, lo], -1) * scale    # scalar tensor
        a = torch.relu(self.a(h))              # `a` is read by both b and c
        return self.b(a) + a.mean(), self.c(a).sum(-1)


def _mixed():
    ids = torch.randint(0, 50, (2, 5), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    return Mixed().eval(), (ids, torch.tensor(0.5))


def _label_by_module(n):
    """emb..mul -> p_emb; a's linear and relu -> p_a; the rest (b, c, their reductions) -> p_bc."""
    names = [x.name for x in n.graph.nodes]
    i = names.index(n.name)
    return "p_emb" if i < names.index("linear") else ("p_a" if i <= names.index("relu") else "p_bc")


def test_split_runs_back_to_eager_on_torch():
    model, inputs = _mixed()
    g = dioe.capture(model, inputs)
    prog = split_graph(g.gm, _label_by_module, g.example_inputs)
    assert [p.id for p in prog.partitions] == ["p_emb", "p_a", "p_bc"]
    deps = prog.dependencies()
    assert deps["p_bc"] >= {"p_a"} and deps["p_a"] == {"p_emb"}
    a_step = next(s for s in prog.steps if s.partition == "p_a")
    readers = [s.partition for s in prog.steps if set(a_step.outputs) & set(s.inputs)]
    assert readers == ["p_bc"]
    flat = run_sequential(prog, {p.id: p.gm for p in prog.partitions}, g.example_inputs)
    assert_matches_eager(eager(model, inputs), g.unflatten_outputs(flat), rtol=1e-6)


@pytest.mark.parametrize("combo", [("onnxruntime", "torch", "openvino"), ("openvino", "onnxruntime", "torch"),
                                   ("torch", "inductor", "onnxruntime")])
def test_three_partitions_on_different_backends(combo, cpu):
    if any(b not in AVAILABLE for b in combo):
        pytest.skip(f"needs {combo}")
    model, inputs = _mixed()
    g = dioe.capture(model, inputs)
    prog = split_graph(g.gm, _label_by_module, g.example_inputs)
    fns = {p.id: backends.get(b).compile(p, cpu) for p, b in zip(prog.partitions, combo)}
    flat = run_sequential(prog, fns, g.example_inputs)
    assert_matches_eager(eager(model, inputs), g.unflatten_outputs(flat), rtol=1e-4, what=str(combo))


def test_cyclic_labelling_is_rejected():
    model, inputs = _mixed()
    g = dioe.capture(model, inputs)
    order = [n.name for n in g.compute_nodes]
    # alternate labels along a chain: x -> y -> x is a cycle between the two partitions
    labels = {name: ("x" if i % 2 == 0 else "y") for i, name in enumerate(order)}
    with pytest.raises(DIOEError, match="cycle"):
        split_graph(g.gm, labels)


def test_descriptor_op_rules_narrow_backend_support(standin_pool):
    npu = standin_pool["npu"]
    g = dioe.capture(*_mixed())
    support = backends.get("onnxruntime").supports(npu)
    by_op = {str(n.target): support.is_node_supported({}, n) for n in g.compute_nodes}
    assert by_op["aten.linear.default"] is True
    assert by_op["aten.embedding.default"] is False  # denied by the stand-in's descriptor
    assert by_op["aten.cat.default"] is False         # not in its allow list


def test_runtime_failure_names_partition_member_and_backend(cpu):
    g = dioe.capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    compiled = backends.get("torch").compile(Partition("p7", g.gm, tuple(g.example_inputs)), cpu)
    with pytest.raises(BackendError, match=rf"partition p7 on member {cpu.id} with backend torch"):
        compiled(torch.randn(2, 5))


def test_precision_the_member_lacks_is_refused(cpu):
    g = dioe.capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(BackendError, match="does not run int4"):
        backends.get("torch").compile(whole(g), cpu, "int4")


@pytest.mark.skipif("onnxruntime" not in AVAILABLE, reason="needs onnxruntime")
def test_onnx_export_is_cached_on_disk(cpu):
    g = dioe.capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    be = backends.get("onnxruntime")
    first = be.compile(whole(g), cpu)
    again = be.compile(whole(g), cpu)
    assert first.artifact == again.artifact and first.artifact.endswith(".onnx")
    assert again.compile_s < first.compile_s


@pytest.mark.skipif("onnxruntime" not in AVAILABLE, reason="needs onnxruntime")
def test_onnxruntime_workers_spin_only_when_the_partition_runs_alone(cpu):
    g = dioe.capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    be = backends.get("onnxruntime")

    def spinning(compiled):
        return compiled.fn.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")
    assert spinning(be.compile(whole(g), cpu, alone=True)) == "1"
    assert spinning(be.compile(whole(g), cpu)) == "0"


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="needs openvino")
def test_openvino_leaves_threads_unpinned_on_a_share_of_the_cores(cpu, monkeypatch):
    """OpenVINO pins its threads to the first cores of the process's mask: one-thread processes beside each other
    (Ray replicas) would all share core 0. A member given fewer threads than the process has cores runs unpinned,
    as OpenVINO reads it back."""
    from dataclasses import replace

    from dioe import cores

    monkeypatch.setattr(cores, "usable_cores", lambda: 4)
    g = dioe.capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    be = backends.get("openvino")
    share = be.compile(whole(g), replace(cpu, threads=1))
    assert share.notes["cpu_pinning"] is False, share.notes
    assert_matches_eager(eager(g.gm, g.example_inputs), share(*g.example_inputs), rtol=RTOL["openvino"])


@pytest.mark.parametrize("backend", [b for b in ("onnxruntime", "openvino") if b in AVAILABLE])
def test_numpy_fed_engines_take_inputs_that_require_grad(backend, cpu):
    """An input computed outside no_grad reaches the engine as it is: numpy() refuses it unless detached, and a
    refusal would send the partition to the reference for good."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU()).eval()
    g = dioe.capture(model, (torch.randn(2, 4),))
    compiled = backends.get(backend).compile(whole(g), cpu)
    x = torch.randn(2, 4, requires_grad=True)
    (out,) = compiled(x * 2)
    assert torch.allclose(out, model(x * 2).detach(), atol=1e-5)


class _TwoInputs(torch.nn.Module):
    def forward(self, a, b):
        return a * 2 - b


def test_engine_inputs_map_to_the_partitions_by_name():
    """An engine may list its inputs in another order; a converter that renames them (OpenVINO's, from torch)
    keeps their order. An unknown name where no renaming is expected is an error that names both lists."""
    g = dioe.capture(_TwoInputs(), (torch.randn(3), torch.randn(3)))
    part = whole(g)
    a, b = part.input_names
    assert part.input_order([b, a]) == [(b, 1), (a, 0)]
    assert part.input_order(["x0", b], renamed=True) == [("x0", 0), (b, 1)]
    with pytest.raises(ValueError, match=r"the engine's inputs \['x0'\] are none of the partition's inputs"):
        part.input_order(["x0", b])


@pytest.mark.parametrize("backend", [b for b in ("onnxruntime", "openvino") if b in AVAILABLE])
def test_engines_feed_each_input_to_its_own_name(backend, cpu):
    """Two inputs of one shape and dtype: a feed that swapped them would still run, and be wrong."""
    g = dioe.capture(_TwoInputs(), (torch.randn(3), torch.randn(3)))
    compiled = backends.get(backend).compile(whole(g), cpu)
    x, y = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([10.0, 20.0, 30.0])
    assert torch.allclose(compiled(x, y)[0], x * 2 - y)


@pytest.mark.skipif("onnxruntime" not in AVAILABLE, reason="needs onnxruntime")
def test_onnxruntime_on_the_cpu_calls_below_the_public_run(cpu, monkeypatch):
    """DIOE's feed is right by construction: the public InferenceSession.run, which re-checks it on every call,
    is left to sessions with other providers (for their retry on the CPU's) and to the bench's peer."""
    import onnxruntime

    public, run = [], onnxruntime.InferenceSession.run
    monkeypatch.setattr(onnxruntime.InferenceSession, "run",
                        lambda self, *a, **k: public.append(a) or run(self, *a, **k))
    model = torch.nn.Linear(4, 4).eval()
    g = dioe.capture(model, (torch.randn(2, 4),))
    compiled = backends.get("onnxruntime").compile(whole(g), cpu, alone=True)
    x = torch.randn(2, 4)
    assert torch.allclose(compiled(x)[0], model(x).detach(), atol=1e-5)
    assert not public


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="needs openvino")
def test_nncf_runs_in_its_own_process_so_its_failure_costs_the_int8_candidate_not_the_caller(cpu, tmp_path):
    from dioe.backends.openvino import _NncfChild
    from dioe.calibration import generate

    model, inputs = dioe.zoo.load("tiny-bert", batch=8)
    g = dioe.capture(model, inputs)
    calibration = generate(g.example_inputs, n=8)
    # a job that fails in the child: reported with the child's exit and its last words
    with pytest.raises(BackendError, match=r"partition whole: NNCF's int8 quantization failed in its own process "
                                           r"\(exit status 1; .*missing\.xml"):
        child = _NncfChild(whole(g), {"model": str(tmp_path / "missing.xml"), "model_type": None, "target": "CPU",
                                      "overflow_fix": False, "smooth_quant_off": False}, [])
        try:
            child.collect(tmp_path / "q.xml")
        finally:
            child.close()
    assert not child.tmp.exists(), "the child's scratch folder was left behind"
    # tiny-bert at batch 8: OpenVINO crashes in NNCF's statistics pass on some CPUs (SIGSEGV on AVX2 without VNNI),
    # which took the whole process down when NNCF ran in it; either way this process goes on
    try:
        compiled = backends.get("openvino", tmp_path).compile(whole(g), cpu, "int8", calibration=calibration)
    except BackendError as e:
        assert "failed in its own process" in str(e), str(e)
    else:
        assert compiled.precision.startswith("int8"), compiled.precision
        out = g.unflatten_outputs(compiled(*g.example_inputs))
        ref = eager(model, inputs)
        assert torch.nn.functional.cosine_similarity(out.last_hidden_state.flatten(1),
                                                     ref.last_hidden_state.flatten(1)).min() > 0.9


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="needs openvino")
def test_openvino_precision_is_explicit(cpu):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.GELU(), torch.nn.Linear(256, 256))
    x = torch.randn(4, 256)
    g = dioe.capture(m, (x,))
    be = backends.get("openvino")
    f32 = be.compile(whole(g), cpu, "fp32")(x)[0]
    ref = eager(m, (x,))
    assert (f32 - ref).abs().max() / ref.abs().max() < 1e-5
    if "bf16" in cpu.descriptor.precisions:
        bf16 = be.compile(whole(g), cpu, "bf16")(x)[0]
        assert (bf16 - ref).abs().max() / ref.abs().max() < 5e-2


@pytest.mark.models
@pytest.mark.parametrize("backend", AVAILABLE)
@pytest.mark.parametrize("name", ["bert-base", "resnet50", "gpt2", "vit-base", "mobilenetv2", "minilm"])
def test_zoo_model_whole_graph_per_backend(name, backend, cpu, zoo_size):
    model, inputs = dioe.zoo.load(name, size=zoo_size)
    g = dioe.capture(model, inputs, name=name)
    compiled = backends.get(backend).compile(whole(g, name), cpu)
    out = g.unflatten_outputs(compiled(*g.example_inputs))
    assert_matches_eager(eager(model, inputs), out, rtol=RTOL[backend], what=f"{name}/{backend}")


class _Residual(torch.nn.Module):
    """ResNet's residual `+=`: an in-place add_ in the captured graph."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(8, 8)

    def forward(self, x):
        y = self.fc(x)
        y += x
        return torch.relu(y)


@pytest.mark.skipif("onnxruntime" not in AVAILABLE, reason="needs onnxruntime")
def test_in_place_ops_are_legal_where_their_functional_twin_is(cpu):
    model = _Residual().eval()
    g = dioe.capture(model, (torch.randn(2, 8),))
    inplace = [n for n in g.compute_nodes if str(n.target) == "aten.add_.Tensor"]
    assert inplace, "the captured graph should keep the in-place add"
    support = backends.get("onnxruntime").supports(cpu)
    assert all(support.is_node_supported({}, n) for n in inplace)
    compiled = backends.get("onnxruntime").compile(whole(g), cpu)
    x = torch.randn(2, 8)
    assert_matches_eager(eager(model, (x,)), g.unflatten_outputs(compiled(x)), rtol=RTOL["onnxruntime"],
                         what="onnxruntime, in-place add")


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="needs openvino")
def test_openvino_compiles_a_partition_that_adds_in_place_to_its_input(cpu, tmp_path):
    # a segment boundary inside a residual block: the second partition's input, recorded under inference mode
    # when the graph was split, is what its add_ updates in place
    model = _Residual().eval()
    g = dioe.capture(model, (torch.randn(2, 8),))
    names = [n.name for n in g.gm.graph.nodes]
    add = next(n.name for n in g.compute_nodes if str(n.target) == "aten.add_.Tensor")
    prog = split_graph(g.gm, lambda n: "p_fc" if names.index(n.name) < names.index(add) else "p_add",
                       g.example_inputs)
    fns = {p.id: backends.get("openvino" if p.id == "p_add" else "torch", tmp_path).compile(p, cpu)
           for p in prog.partitions}
    x = torch.randn(2, 8)
    assert_matches_eager(eager(model, (x,)), g.unflatten_outputs(run_sequential(prog, fns, (x,))),
                         rtol=RTOL["openvino"], what="openvino, add_ on a partition input")


@pytest.mark.skipif(not {"onnxruntime", "openvino"} <= set(AVAILABLE), reason="needs onnxruntime and openvino")
def test_openvino_converts_from_the_onnx_file_onnxruntime_exported(cpu, tmp_path, monkeypatch):
    model, inputs = _mixed()
    g = dioe.capture(model, inputs)
    backends.get("onnxruntime", tmp_path).compile(whole(g), cpu)

    def no_export(*a, **k):
        raise AssertionError("OpenVINO exported the partition again instead of reading the ONNX file")
    monkeypatch.setattr(torch.export, "export", no_export)
    compiled = backends.get("openvino", tmp_path).compile(whole(g), cpu)
    assert_matches_eager(eager(model, inputs), g.unflatten_outputs(compiled(*g.example_inputs)),
                         rtol=RTOL["openvino"], what="openvino from onnx")


class _Attention(torch.nn.Module):
    def __init__(self, d=16, heads=2):
        super().__init__()
        self.qkv, self.out, self.heads = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d), heads

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = (y.view(b, t, self.heads, d // self.heads).transpose(1, 2) for y in self.qkv(x).chunk(3, -1))
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return self.out(y.transpose(1, 2).reshape(b, t, d))


@pytest.mark.skipif(not {"onnxruntime", "openvino"} <= set(AVAILABLE), reason="needs onnxruntime and openvino")
def test_openvino_keeps_attention_fused_even_where_an_onnx_file_exists(cpu, tmp_path, monkeypatch):
    """The ONNX export writes attention out op by op, which OpenVINO does not fuse back: a partition with aten's
    attention goes through OpenVINO's PyTorch frontend, which keeps it one op; through the ONNX file where that
    frontend fails."""
    from dioe.backends.openvino import has_attention

    model = _Attention().eval()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    inputs = (torch.randn(2, 5, 16), mask)
    g = dioe.capture(model, inputs)
    assert has_attention(whole(g)) and not has_attention(whole(dioe.capture(*_mixed())))
    backends.get("onnxruntime", tmp_path).compile(whole(g), cpu)   # the ONNX file OpenVINO would read
    ov_model, xml = backends.get("openvino", tmp_path).convert(whole(g))
    ops = {op.get_type_name() for op in ov_model.get_ops()}
    assert "ScaledDotProductAttention" in ops and "Softmax" not in ops, sorted(ops)
    compiled = backends.get("openvino", tmp_path).compile(whole(g), cpu)
    assert_matches_eager(eager(model, inputs), g.unflatten_outputs(compiled(*g.example_inputs)),
                         rtol=RTOL["openvino"], what="openvino, attention")

    def no_export(*a, **k):
        raise RuntimeError("an op the PyTorch frontend cannot take")
    Path(xml).unlink()
    monkeypatch.setattr(torch.export, "export", no_export)   # then the ONNX file is the way in
    with pytest.warns(RuntimeWarning, match=r"PyTorch frontend could not convert partition whole .*ONNX file"):
        ov_model, from_file = backends.get("openvino", tmp_path).convert(whole(g))
    assert "Softmax" in {op.get_type_name() for op in ov_model.get_ops()} and from_file != xml


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="needs openvino")
@pytest.mark.parametrize("keep", [False, True])
def test_openvino_conversions_decline_its_telemetry_unless_asked(cpu, tmp_path, monkeypatch, keep):
    """DIOE's conversions run with OpenVINO's own telemetry stub in its converter, and put the real package back
    after; DIOE_OPENVINO_TELEMETRY=1 leaves OpenVINO's telemetry as it is."""
    import importlib

    import openvino as ov

    # every module of the converter that reaches the telemetry package, as `tm`
    users = [importlib.import_module(f"openvino.tools.ovc.{m}") for m in ("convert_impl", "telemetry_utils", "utils")]
    if keep:
        monkeypatch.setenv("DIOE_OPENVINO_TELEMETRY", "1")
    before, seen, real = [m.tm for m in users], [], ov.convert_model

    def spy(*a, **k):
        seen.append([m.tm.__name__ for m in users])
        return real(*a, **k)
    monkeypatch.setattr(ov, "convert_model", spy)
    model, inputs = _mixed()
    g = dioe.capture(model, inputs)
    compiled = backends.get("openvino", tmp_path).compile(whole(g), cpu)
    want = [t.__name__ for t in before] if keep else ["openvino.tools.ovc.telemetry_stub"] * len(users)
    assert seen == [want], seen
    assert [m.tm for m in users] == before
    assert_matches_eager(eager(model, inputs), g.unflatten_outputs(compiled(*g.example_inputs)),
                         rtol=RTOL["openvino"], what="openvino, telemetry declined")


@pytest.mark.skipif("onnxruntime" not in AVAILABLE, reason="needs onnxruntime")
def test_onnx_export_with_the_cached_table_matches_torch_onnx_export():
    """Ours is torch.onnx.export's graph, built with a translation table kept across calls, then the light
    optimizer (no pattern rewrites): the public export put through the same passes is the same graph."""
    from dioe.backends.onnxruntime import _light_passes, _onnx_export, _quiet

    g = dioe.capture(*_mixed())
    names = [n.name for n in g.gm.graph.nodes if n.op == "placeholder"]

    def graph(program):
        gp = program.model_proto.graph
        for t in gp.initializer:
            t.ClearField("raw_data")
            t.ClearField("external_data")
        for n in gp.node:
            n.ClearField("metadata_props")  # source locations
        return gp.SerializeToString(), [(o.domain, o.version) for o in program.model_proto.opset_import]
    with _quiet():
        public = torch.onnx.export(g.gm, tuple(g.example_inputs), dynamo=True, input_names=names, optimize=False,
                                   verbose=False)
        ours = _onnx_export(g.gm, tuple(g.example_inputs), names)
    assert _light_passes() is not None, "onnxscript's optimizer passes moved: exports take the slow full optimizer"
    _light_passes()(public.model)
    assert graph(ours) == graph(public)
