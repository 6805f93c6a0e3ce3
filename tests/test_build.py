"""Building a plan: the graph split into its partitions, each compiled for its member, and verified against eager;
a partition that fails to compile or computes something else runs on torch at the reference member instead."""

import pytest

import dioe

from helpers import assert_matches_eager, eager, five_layers, force_split


@pytest.mark.parametrize("split", [False, True], ids=["one partition", "split plan"])
def test_a_partition_that_fails_verification_runs_on_the_reference(cpu, tmp_path, monkeypatch, split):
    """ONNX Runtime made to compute wrong numbers: every partition it would run is caught against eager, named in
    a warning, and run by torch on the reference; the result is right."""
    from dioe.backends import backend_class

    cls = backend_class("onnxruntime")
    real = cls.compile_fn

    def off_by_half(self, *a, **k):
        fn, artifact = real(self, *a, **k)
        return (lambda *xs: tuple(o * 1.5 for o in fn(*xs))), artifact
    monkeypatch.setattr(cls, "compile_fn", off_by_half)
    if split:
        force_split(monkeypatch, cpu.id)
    model, x = five_layers()
    with pytest.warns(RuntimeWarning, match=rf"on onnxruntime@{cpu.id} differs from eager by .* runs on torch@"):
        opt = dioe.optimize(model, (x,), backends=["torch", "onnxruntime"] if split else ["onnxruntime"],
                            cache_dir=tmp_path)
    assert {p.backend for p in opt.plan.partitions} == {"torch"}, opt.plan.summary()
    assert_matches_eager(eager(model, (x,)), opt(x))
