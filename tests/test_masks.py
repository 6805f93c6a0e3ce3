"""Attention masks at their edge: a fully masked row (a fully padded sample) computes torch's zeros on every
engine, and verification probes it."""

import pytest
import torch

import dioe
from dioe import backends
from dioe.backend import Partition
from dioe.masking import fully_masked_probe, guard_masked_attention, mask_inputs

from helpers import assert_matches_eager, eager

ENGINES = [b for b in ("onnxruntime", "openvino") if backends.unavailable_reason(b) is None]
RTOL = 1e-4  # the engines' fp32 tolerance against eager, as in test_backends


def _padded(mask: torch.Tensor, sample: int = 1) -> torch.Tensor:
    mask = mask.clone()
    mask[sample] = 0
    return mask


class _Attention(torch.nn.Module):
    """One attention over a mask given as an input: boolean (True attends) or additive float."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(d, 3 * d)
        self.out = torch.nn.Linear(d, d)

    def forward(self, x, mask):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


def _attention_inputs(kind: str):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    keep = torch.ones(2, 1, 5, 5, dtype=torch.bool)
    keep[0, :, :, 3:] = False          # padding: some keys masked
    keep[1, :, 2] = False              # one query row with every key masked
    if kind == "bool":
        return x, keep
    return x, torch.zeros(2, 1, 5, 5).masked_fill(~keep, float("-inf"))


@pytest.mark.parametrize("backend", ENGINES)
def test_tiny_bert_fully_masked_sample_matches_eager(backend, cpu, tmp_path):
    """A batch of two with the second sample all padding: torch gives that sample's attention zeros; ONNX Runtime
    gave the mean of the values (0.058 off), OpenVINO NaN. The example itself still matches."""
    model, (ids, mask) = dioe.zoo.load("tiny-bert", batch=2)
    g = dioe.capture(model, (ids, mask))
    compiled = backends.get(backend, tmp_path).compile(Partition("whole", g.gm, tuple(g.example_inputs)), cpu)
    for m in (mask, _padded(mask), torch.zeros_like(mask)):
        out = g.unflatten_outputs(compiled(ids, m))
        assert_matches_eager(eager(model, (ids, m)), out, rtol=RTOL, what=f"{backend}, mask {m.tolist()[1][:4]}")


@pytest.mark.parametrize("backend", ENGINES)
@pytest.mark.parametrize("kind", ["bool", "float"])
def test_fully_masked_rows_of_a_bare_attention_match_eager(backend, kind, cpu, tmp_path):
    """A boolean mask all False on a row, and an additive mask all -inf on it: torch gives zeros there."""
    model = _Attention().eval()
    inputs = _attention_inputs(kind)
    g = dioe.capture(model, inputs)
    compiled = backends.get(backend, tmp_path).compile(Partition("whole", g.gm, tuple(g.example_inputs)), cpu)
    want = eager(model, inputs)
    got = g.unflatten_outputs(compiled(*inputs))
    assert not torch.isnan(got).any()
    assert_matches_eager(want, got, rtol=RTOL, what=f"{backend}, {kind} mask")


@pytest.mark.parametrize("kind", ["bool", "float"])
def test_the_guard_is_exact_under_torch_and_shared_by_the_attentions_of_one_mask(kind):
    """The rewrite: one reduction per distinct mask, one multiply per attention, the input graph untouched, the
    result equal to the original bit for bit (fully masked rows included), and a second pass a no-op."""

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = _Attention(), _Attention()

        def forward(self, x, mask):
            return self.b(self.a(x, mask), mask)

    model = Twice().eval()
    inputs = _attention_inputs(kind)
    g = dioe.capture(model, inputs)
    before = g.gm.code
    guarded, n = guard_masked_attention(g.gm)
    assert n == 2 and g.gm.code == before
    targets = [node.target for node in guarded.graph.nodes if node.op == "call_function"]
    assert targets.count(torch.ops.aten.any.dim) == 1
    assert targets.count(torch.ops.aten.mul.Tensor) == 2
    with torch.inference_mode():
        for args in (inputs, (inputs[0], torch.ones_like(inputs[1]) if kind == "bool" else torch.zeros_like(inputs[1]))):
            for w, o in zip(g.gm(*args), guarded(*args)):
                assert torch.equal(w, o)
    assert guard_masked_attention(guarded) == (guarded, 0)
    assert guard_masked_attention(dioe.capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),)).gm)[1] == 0


def test_a_float_row_at_the_dtype_minimum_is_not_fully_masked():
    """An additive mask at finfo.min on a whole row is finite: torch averages the values there, and the guard
    leaves that row's answer as it is."""
    model = _Attention().eval()
    x, keep = _attention_inputs("bool")
    mask = torch.zeros(2, 1, 5, 5).masked_fill(~keep, torch.finfo(torch.float32).min)
    g = dioe.capture(model, (x, mask))
    guarded, n = guard_masked_attention(g.gm)
    with torch.inference_mode():
        want, got = g.gm(x, mask)[0], guarded(x, mask)[0]
    assert n == 1 and torch.equal(want, got) and want[1].abs().sum() > 0


def test_mask_inputs_are_found_by_name_or_by_where_they_flow():
    """tiny-bert's attention_mask is found (input_ids is no 0/1 tensor); an unnamed 0/1 input reaching an
    attention's mask is found; a 0/1 input that reaches no mask and has another name is not."""
    model, (ids, mask) = dioe.zoo.load("tiny-bert", batch=2)
    g = dioe.capture(model, (ids, mask))
    assert mask_inputs(g.gm, g.example_inputs) == [1]
    probe, what = fully_masked_probe(g.gm, g.example_inputs)
    assert probe[0] is g.example_inputs[0] and probe[1][0].eq(0).all() and probe[1][1].eq(1).all()
    assert "attention_mask" in what and g.example_inputs[1].eq(1).all()  # the example is left as it was

    x, keep = _attention_inputs("bool")
    flows = dioe.capture(_Attention().eval(), (x, keep.to(torch.long) > 0))
    assert mask_inputs(flows.gm, flows.example_inputs) == [1]

    class Gate(torch.nn.Module):
        def forward(self, x, flags):
            return x * flags

    gated = dioe.capture(Gate(), (torch.randn(2, 3), torch.ones(2, 3, dtype=torch.long)))
    assert mask_inputs(gated.gm, gated.example_inputs) == []
    assert fully_masked_probe(gated.gm, gated.example_inputs) is None


@pytest.mark.skipif("onnxruntime" not in ENGINES, reason="needs onnxruntime")
def test_verification_probes_a_fully_masked_sample(cpu, tmp_path, monkeypatch):
    """With the guard taken away, ONNX Runtime passes on tiny-bert's all-ones example and misses on the probe
    with a fully padded sample: verification catches it, says so in a warning and in the plan, and the result is
    right."""
    from dioe.build import build, verify
    from dioe.settings import Settings

    from helpers import one_partition_plan

    import dioe.backends.onnxruntime as ort_backend

    monkeypatch.setattr(ort_backend.OnnxruntimeBackend, "guards_masked_attention", False)
    monkeypatch.setattr(ort_backend, "guarded_partition", lambda part: part)
    model, (ids, mask) = dioe.zoo.load("tiny-bert", batch=2)
    g = dioe.capture(model, (ids, mask))
    settings = Settings(cache_dir=tmp_path)
    pool = dioe.ResourcePool.discover()
    with pytest.warns(RuntimeWarning, match=r"differs from eager by .* on a fully masked attention row "
                                            r"\(attention_mask of sample 0 all 0\); it runs on torch@"):
        opt = verify(build(g, one_partition_plan(g, cpu.id, "onnxruntime"), pool, settings=settings),
                     settings=settings)
    (p,) = opt.plan.partitions
    assert p.backend == "torch" and p.reason.startswith("verification failed on a fully masked attention row")
    padded = _padded(mask)
    assert_matches_eager(eager(model, (ids, padded)), opt(ids, padded), rtol=1e-5)


@pytest.mark.parametrize("backend", ENGINES)
def test_optimize_keeps_the_engine_for_a_model_with_a_mask(backend, tmp_path):
    """With the guard, the engine passes the probe: optimize keeps it, and a padded batch matches eager."""
    model, (ids, mask) = dioe.zoo.load("tiny-bert", batch=2)
    opt = dioe.optimize(model, (ids, mask), backends=[backend], precision="fp32", cache_dir=tmp_path)
    assert all(p.backend in (backend, "torch") for p in opt.plan.partitions)
    assert not any(p.reason.startswith("verification failed") for p in opt.plan.partitions), opt.plan.summary()
    padded = _padded(mask)
    assert_matches_eager(eager(model, (ids, padded)), opt(ids, padded), rtol=RTOL, what=backend)
