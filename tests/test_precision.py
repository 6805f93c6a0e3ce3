"""Lower precisions per engine: int8 (ONNX Runtime dynamic or static QDQ, OpenVINO with NNCF) and bf16 (torch
autocast, OpenVINO's hint), each matching fp32 eager within a stated tolerance, with the precision read back
from the engine and int8 artifacts keyed by their calibration data."""

import importlib.util
import platform
import textwrap

import pytest
import torch

import dioe
from dioe import backends
from dioe.backend import Partition
from dioe.errors import BackendError

from helpers import eager

AVAILABLE = [b for b in ("onnxruntime", "openvino") if backends.unavailable_reason(b) is None]
# Inductor's int8 goes through torchao's PT2E quantizer
INT8 = AVAILABLE + (["inductor"] if importlib.util.find_spec("torchao") and platform.machine() in ("x86_64", "AMD64")
                    else [])
needs_int8_engine = pytest.mark.skipif(not AVAILABLE, reason="needs onnxruntime or openvino")

# Tolerances against fp32 eager, per output and per evaluation input: cosine similarity, and the largest
# absolute error relative to the output's largest magnitude. Seen over 16 inputs on an AVX2 CPU without VNNI
# (7-bit weights there): int8 cosine >= 0.996 and relative error <= 0.14 for tiny-mlp on OpenVINO (static
# per-tensor activation ranges on a small random-weight model), >= 0.9998 and <= 0.025 for the rest; bf16
# (torch autocast, tiny-bert) >= 0.99999 and <= 0.005. OpenVINO's bf16 runs every float op in bf16 and could not
# run here (no bf16 on this CPU): it gets the 0.05 that test_backends allows it. On an AVX-512 CPU with VNNI,
# OpenVINO also runs tiny-bert's attention in int8, and its pooled output's cosine fell to 0.9900 on one input
# (relative error 0.18), hence 0.98 for that pair.
MIN_COSINE = 0.99
MIN_COSINE_INT8 = {("openvino", "tiny-bert"): 0.98}
MAX_REL = {"int8": 0.2, "bf16": 0.05}
# What each engine reports running, per model: tiny-bert's attention (activation x activation matmuls) stays
# float in both engines, so its partition runs a mix.
APPLIED_INT8 = {"tiny-mlp": "int8", "conv": "int8", "tiny-bert": "int8+fp32"}
# OpenVINO's CPU plugin picks the kernel of tiny-bert's fused attention per ISA: f32 on AVX2, int8 where AVX-512
# has VNNI (NNCF's transformer mode quantizes the attention's matmul inputs, and that kernel consumes them)
APPLIED_INT8_EITHER = {("openvino", "tiny-bert"): {"int8+fp32", "int8"}}


class ConvNet(torch.nn.Module):
    """Convolutions, batch norm, a pooled linear head: what static int8 is for."""

    def __init__(self):
        super().__init__()
        self.c1, self.bn = torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.BatchNorm2d(16)
        self.c2 = torch.nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.c2(torch.relu(self.bn(self.c1(x)))))  # (B, 32, 16, 16)
        return self.head(x.mean((2, 3)))


def _model(name):
    if name == "conv":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return ConvNet().eval(), (torch.randn(2, 3, 32, 32),)
    if name == "tiny-mlp":
        return dioe.zoo.load("tiny-mlp", batch=4)
    return dioe.zoo.load("tiny-bert", size="small")


def _partition(name):
    """(model, captured graph, whole-graph partition) of a test model."""
    model, example = _model(name)
    g = dioe.capture(model, example)
    return model, g, Partition(name, g.gm, tuple(g.example_inputs))


def _samples(example_inputs, n, seed):
    """`n` input tuples like `example_inputs`: normal floats, token ids below 1000 (tiny-bert's vocabulary),
    attention masks of ones."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        out.append(tuple(torch.randn(x.shape, generator=g) if x.is_floating_point()
                         else torch.ones_like(x) if x.max() <= 1
                         else torch.randint(0, 1000, x.shape, generator=g, dtype=x.dtype)
                         for x in example_inputs))
    return out


@pytest.fixture(scope="module")
def member(tmp_path_factory):
    """A stand-in CPU member whose descriptor lists bf16 and int8 (this machine's own may list neither): it
    executes on this CPU, so what an engine cannot run here shows as the engine's own answer."""
    folder = tmp_path_factory.mktemp("pool")
    (folder / "cpu-lowp.yaml").write_text(textwrap.dedent("""\
        schema_version: 1
        name: cpu-lowp
        description: this CPU, declared to compute in bf16 and int8 too
        kind: cpu
        vendor: test
        architecture: stand-in
        match: {torch_device: cpu, openvino_device: CPU}
        backends:
          - {name: openvino, options: {device: CPU}}
          - {name: onnxruntime, options: {providers: [{name: CPUExecutionProvider}]}}
          - {name: torch}
          - {name: inductor}
        precisions: [fp32, bf16, int8]
        memory: {capacity_gb: null, bandwidth_gbps: 25}
        peak_tflops: {fp32: 0.2, bf16: 0.2, int8: 0.4}
        link: {bandwidth_gbps: 25, latency_us: 0.5}
        """))
    (folder / "pool.yaml").write_text("pool:\n  - {id: lowp, descriptor: cpu-lowp.yaml, stand_in: true}\n")
    m = dioe.ResourcePool.discover(folder / "pool.yaml")["lowp"]
    assert set(m.descriptor.precisions) == {"fp32", "bf16", "int8"}
    return m


def _check_against_eager(name, model, compiled, g, inputs, precision, min_cosine=MIN_COSINE):
    for k, x in enumerate(inputs):
        expected = eager(model, x)
        got = g.unflatten_outputs(compiled(*x))
        for i, (e, a) in enumerate(zip(torch.utils._pytree.tree_leaves(expected),
                                       torch.utils._pytree.tree_leaves(got))):
            assert a.shape == e.shape and a.dtype == e.dtype, f"{name} output {i}: {a.dtype}{list(a.shape)}"
            e, a = e.double().flatten(), a.double().flatten()
            cos = torch.nn.functional.cosine_similarity(e, a, dim=0).item()
            rel = ((a - e).abs().max() / e.abs().max()).item()
            assert cos >= min_cosine and rel <= MAX_REL[precision], \
                f"{name} {precision}, input {k}, output {i}: cosine {cos:.5f}, relative error {rel:.3f}"


@needs_int8_engine
@pytest.mark.parametrize("name", ["tiny-mlp", "conv", "tiny-bert"])
@pytest.mark.parametrize("backend", INT8)
def test_int8_matches_fp32_and_says_what_it_quantized(backend, name, member):
    model, g, part = _partition(name)
    compiled = backends.get(backend).compile(part, member, "int8", calibration=_samples(g.example_inputs, 8, 1))
    want = APPLIED_INT8_EITHER.get((backend, name), {APPLIED_INT8[name]})
    assert compiled.precision == "int8" and compiled.applied in want, compiled.notes
    assert compiled.notes["quantized_ops"] > 0, compiled.notes
    assert ".int8." in compiled.artifact, compiled.artifact
    _check_against_eager(name, model, compiled, g, _samples(g.example_inputs, 4, 2), "int8",
                         MIN_COSINE_INT8.get((backend, name), MIN_COSINE))


@needs_int8_engine
def test_int8_that_needs_calibration_says_so(member):
    conv = _partition("conv")[2]
    for backend in INT8:
        with pytest.raises(BackendError, match="needs calibration data: pass calibration="):
            backends.get(backend).compile(conv, member, "int8")
    if "onnxruntime" in AVAILABLE:  # dynamic int8 calibrates nothing: no convolutions, no calibration needed
        mlp = _partition("tiny-mlp")[2]
        assert backends.get("onnxruntime").compile(mlp, member, "int8").applied == "int8"
    x = conv.example_inputs[0]
    with pytest.raises(BackendError, match=r"partition conv: calibration item 1: input 0 is float32\[1, 3, 32, 32\]; "
                                           r"expected float32\[2, 3, 32, 32\]"):
        backends.get(AVAILABLE[0]).compile(conv, member, "int8", calibration=[(x,), (x[:1],)])


class Pointwise(torch.nn.Module):
    """No matmul, no convolution: nothing an int8 engine quantizes."""

    def forward(self, x):
        return torch.relu(x) + 1


@needs_int8_engine
@pytest.mark.parametrize("backend", INT8)
def test_int8_that_quantizes_nothing_is_an_error(backend, member):
    x = torch.randn(4, 8)
    g = dioe.capture(Pointwise(), (x,))
    with pytest.raises(BackendError, match="quantized nothing"):
        backends.get(backend).compile(Partition("pw", g.gm, (x,)), member, "int8", calibration=[(x,), (x + 1,)])


@needs_int8_engine
@pytest.mark.parametrize("backend", AVAILABLE)
def test_int8_artifact_is_reused_for_the_same_calibration_only(backend, member, tmp_path, monkeypatch):
    if backend == "onnxruntime":  # static quantization: the one that reads calibration data
        import onnxruntime.quantization as library
        name, fn = "conv", "quantize_static"
    else:  # NNCF runs in a child process, which this class starts
        import dioe.backends.openvino as library
        name, fn = "tiny-mlp", "_NncfChild"
    real, calls = getattr(library, fn), []
    monkeypatch.setattr(library, fn, lambda *a, **k: calls.append(1) or real(*a, **k))
    _, g, part = _partition(name)
    be = backends.get(backend, tmp_path)
    first = be.compile(part, member, "int8", calibration=_samples(g.example_inputs, 4, 1))
    again = be.compile(part, member, "int8", calibration=_samples(g.example_inputs, 4, 1))
    other = be.compile(part, member, "int8", calibration=_samples(g.example_inputs, 4, 3))
    assert len(calls) == 2, "the same calibration must reuse the artifact, another must quantize anew"
    assert first.artifact == again.artifact != other.artifact
    fp32 = be.compile(part, member, "fp32")
    assert fp32.applied == "fp32" and ".int8." not in fp32.artifact
    # OpenVINO's blob folders are named for their IR; a scratch folder sits beside the files it was written for
    assert not [p for p in tmp_path.rglob("*") if p.is_dir() and p.name.startswith(part.digest)
                and "blobs" not in p.relative_to(tmp_path).parts], "a scratch folder was left behind"


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="needs openvino")
def test_nncf_started_ahead_is_collected_by_compile_and_stopped_when_nobody_collects_it(member, tmp_path,
                                                                                        monkeypatch):
    """`prepare` starts NNCF in its own process and returns; the compile that follows collects that very child
    (no second one), and what no compile collects is stopped, its scratch folder removed."""
    import dioe.backends.openvino as library

    real, children = library._NncfChild, []
    monkeypatch.setattr(library, "_NncfChild", lambda *a, **k: children.append(real(*a, **k)) or children[-1])
    _, g, part = _partition("tiny-mlp")
    be = backends.get("openvino", tmp_path)
    calib = _samples(g.example_inputs, 4, 1)
    assert be.prepare(part, member, "int8", calibration=calib) and len(children) == 1
    assert not be.prepare(part, member, "fp32") and not be.prepare(part, member, "int8"), \
        "nothing to start without calibration, or at fp32"
    compiled = be.compile(part, member, "int8", calibration=calib)
    assert len(children) == 1 and compiled.applied.startswith("int8"), (len(children), compiled.applied)
    assert not children[0].tmp.exists()
    # the same calibration again: the artifact is cached, so there is nothing to start
    assert not be.prepare(part, member, "int8", calibration=calib) and len(children) == 1
    token = be.prepare(part, member, "int8", calibration=_samples(g.example_inputs, 4, 2))
    assert token and len(children) == 2
    be.release_prepared(token)
    assert children[1].proc.poll() is not None and not children[1].tmp.exists()


@pytest.mark.skipif("inductor" not in INT8, reason="needs torchao")
def test_inductor_int8_keeps_its_calibrated_parameters_and_reloads_them_by_key(member, tmp_path, monkeypatch):
    """PT2E's scales and zero points are cached by the calibration's fingerprint: the same calibration reuses
    them without calibrating, the key alone (a saved plan's) rebuilds the very same int8 model, and a key with
    nothing cached says so."""
    import dioe.backends.inductor as library
    from dioe.calibration import fingerprint
    from dioe.quantization import CalibrationKey

    real, calls = library._qparams, []
    monkeypatch.setattr(library, "_qparams", lambda o: calls.append(1) or real(o))
    _, g, part = _partition("conv")
    be = backends.get("inductor", tmp_path)
    calib = _samples(g.example_inputs, 4, 1)
    first = be.compile(part, member, "int8", calibration=calib)
    n = len(calls)
    again = be.compile(part, member, "int8", calibration=calib)
    keyed = be.compile(part, member, "int8", calibration=CalibrationKey(fingerprint([list(x) for x in calib])))
    assert n > 0 and len(calls) == n, "the same calibration, or its key, must not calibrate again"
    assert first.artifact == again.artifact == keyed.artifact and first.artifact.endswith(".qparams.json")
    x = _samples(g.example_inputs, 1, 5)[0]
    torch.testing.assert_close(keyed(*x), first(*x), rtol=0, atol=0)
    assert first.notes["calibration_samples"] == 4 and again.notes["calibration_samples"] == 0
    other = be.compile(part, member, "int8", calibration=_samples(g.example_inputs, 4, 3))
    assert len(calls) > n and other.artifact != first.artifact, "other calibration data must calibrate anew"
    # what Inductor lowered to int8 is counted while it compiles, not assumed from the graph
    assert first.notes["quantized_ops"] == 3 and first.notes["float_ops"] == 0, first.notes
    with pytest.raises(BackendError, match="Inductor int8 model this plan was calibrated for .* is not in the cache"):
        backends.get("inductor", tmp_path / "empty").compile(part, member, "int8", calibration=CalibrationKey("0" * 16))


def test_inductor_int8_is_left_out_where_pt2e_cannot_run_it():
    from types import SimpleNamespace

    from dioe.backends.inductor import InductorBackend
    gpu = SimpleNamespace(stand_in=False, device="cuda:0")
    assert "x86 CPUs" in InductorBackend.precision_reason(gpu, "int8")
    assert InductorBackend.precision_reason(gpu, "fp16") is None


def test_torch_bf16_runs_under_autocast_and_reads_back_what_ran(member):
    model, g, part = _partition("tiny-bert")
    compiled = backends.get("torch").compile(part, member, "bf16")
    # every linear layer and the attention in bf16; layer norms and softmax are not heavy ops, autocast keeps them
    assert compiled.applied == "bf16" and compiled.notes["lowered_ops"] > 0, compiled.notes
    _check_against_eager("tiny-bert", model, compiled, g, _samples(g.example_inputs, 4, 2), "bf16")
    assert all(p.dtype == torch.float32 for p in g.gm.parameters()), "the caller's weights must stay fp32"

    x = torch.randn(4, 8)
    g = dioe.capture(Pointwise(), (x,))
    compiled = backends.get("torch").compile(Partition("pw", g.gm, (x,)), member, "bf16")
    assert compiled.applied == "fp32", "nothing for autocast to lower: it runs fp32 and must say so"


@pytest.mark.skipif("openvino" not in AVAILABLE, reason="needs openvino")
def test_openvino_bf16_is_read_back_not_assumed(member):
    model, g, part = _partition("tiny-mlp")
    try:
        compiled = backends.get("openvino").compile(part, member, "bf16")
    except BackendError as e:
        # An AVX2 CPU: OpenVINO neither refuses the hint nor emulates bf16, it runs f32 and says so.
        assert "was asked for bf16 and runs fp32" in str(e), e
        pytest.skip(f"this CPU has no bf16 for OpenVINO, which runs fp32 when asked: {e}")
    assert compiled.applied == "bf16"
    _check_against_eager("tiny-mlp", model, compiled, g, _samples(g.example_inputs, 4, 2), "bf16")


def test_precisions_are_the_engines_own(member):
    part = _partition("tiny-mlp")[2]
    if "onnxruntime" in AVAILABLE:
        with pytest.raises(BackendError, match="does not run bf16"):  # no bf16 kernels on its CPU provider
            backends.get("onnxruntime").compile(part, member, "bf16")
    with pytest.raises(BackendError, match="does not run int8"):
        backends.get("torch").compile(part, member, "int8")
    for backend in ["torch", *AVAILABLE]:  # without calibration, fp32 compiles as it always did
        assert backends.get(backend).compile(part, member).applied == "fp32"
