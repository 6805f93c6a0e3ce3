"""Bad requests and faulty engines: what eager refuses is refused with eager's kind of error, a transient fault
costs a retry or a few calls on the fallback and never the engine, and no call is lost."""

import pytest
import torch

import dioe

from helpers import assert_matches_eager, eager, one_partition


@pytest.fixture(scope="module")
def tiny_bert():
    return dioe.zoo.load("tiny-bert")


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_out_of_range_token_ids_are_refused_like_eager(tiny_bert, cpu, backend):
    """ONNX Runtime answered id -1 with id 999's row, OpenVINO answered every id with finite values: the input
    check refuses them before the engine runs, on the hot path and on the general one (a trace takes it)."""
    model, (ids, mask) = tiny_bert
    opt = one_partition(model, (ids, mask), cpu, backend)
    assert opt._hot is not None
    assert_matches_eager(eager(model, (ids, mask)), opt(ids, mask), rtol=1e-4)
    for bad in (-1, 1000, 2 ** 40):
        wrong = ids.clone()
        wrong[0, 5] = bad
        with pytest.raises(IndexError, match="index out of range"):
            eager(model, (wrong, mask))
        want = rf"input 'input_ids' holds {bad}, outside the valid range \[0, 1000\)"
        with pytest.raises(dioe.IndexRangeError, match=want):
            opt(wrong, mask)
        with pytest.raises(IndexError, match=want), dioe.trace():
            opt(wrong, mask)
    assert not opt.stats["fallback_calls"] and not opt.stats["retries"]
    assert opt.captured.index_ranges[0].high == 1000


def test_index_ranges_follow_views_and_widening_casts_only():
    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.table = torch.nn.Embedding(7, 3), torch.randn(5, 3)

        def forward(self, a, b, c):
            return self.emb(a.view(-1).long()), self.table[b.unsqueeze(0)], self.table[c + 0]

    g = dioe.capture(M().eval(), (torch.tensor([1, 2], dtype=torch.int32), torch.tensor([0]), torch.tensor([1])))
    ranges = {r.name: (r.low, r.high) for r in g.index_ranges}
    # c reaches its index through arithmetic: no range is derived, and the engine or eager says what is wrong
    assert ranges == {"a": (0, 7), "b": (-5, 5)}


def test_a_transient_fault_costs_one_retry_not_the_engine(cpu):
    m = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2)).eval()
    x = torch.randn(4, 8)
    opt = one_partition(m, (x,), cpu, "onnxruntime")
    compiled = opt.runtime.compiled["p0"]
    real, faults = compiled.fn, [1]

    def flaky(*a):
        if faults:
            faults.pop()
            raise RuntimeError("device busy")
        return real(*a)
    compiled.fn = flaky
    for _ in range(3):
        assert_matches_eager(eager(m, (x,)), opt(x), rtol=1e-4)
    assert opt.runtime.compiled["p0"] is compiled and opt.stats["fallback_calls"] == 0
    assert opt.stats["retries"] == 1 and opt.stats["breakers"]["p0"]["state"] == "closed"


def test_a_request_eager_refuses_never_demotes_the_engine(cpu):
    """An index computed inside the graph escapes the input check: ONNX Runtime's Gather refuses it, and so does
    the torch fallback. The caller gets one error naming both; the engine keeps its calls."""
    class Lookup(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.table = torch.randn(5, 3)

        def forward(self, i):
            return self.table[i * 2]

    m, i = Lookup().eval(), torch.tensor([1, 2])
    opt = one_partition(m, (i,), cpu, "onnxruntime")
    for _ in range(5):   # more than the breaker's failures in a row
        with pytest.raises(dioe.RunError, match=rf"partition p0 .*onnxruntime.*and torch@{cpu.id}, its fallback, "
                                                r"failed on this call too \(IndexError"):
            opt(torch.tensor([1, 7]))
    assert opt.runtime.compiled["p0"].backend == "onnxruntime" and not opt.stats["fallback_calls"]
    assert opt.stats["breakers"]["p0"]["state"] == "closed" and not opt.captured.index_ranges
    assert_matches_eager(eager(m, (i,)), opt(i), rtol=1e-5)


def test_torch_outputs_take_in_place_edits(cpu):
    """Outputs of the torch engine, and of the torch fallback, are ordinary tensors the caller may edit."""
    m, x = torch.nn.Linear(8, 3).eval(), torch.randn(2, 8)
    want = eager(m, (x,)) + 1
    out = one_partition(m, (x,), cpu, "torch")(x)
    assert not out.is_inference()
    assert_matches_eager(want, out.add_(1), rtol=1e-5)
    opt = one_partition(m, (x,), cpu, "onnxruntime")

    def lost(*a):
        raise RuntimeError("session lost")
    opt.runtime.compiled["p0"].fn = lost
    with pytest.warns(RuntimeWarning, match="session lost"):
        out = opt(x)
    assert opt.stats["fallback_calls"] == 1
    assert_matches_eager(want, out.add_(1), rtol=1e-5)
