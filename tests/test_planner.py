"""Plans from assignments: a split that would not pay is replaced by one engine over the whole graph before
anything is compiled."""

import dataclasses

import pytest

import dioe
import dioe.build
import dioe.partition
from dioe.plan import Choice

from helpers import assert_matches_eager, eager, five_layers


@pytest.mark.parametrize("gain, built", [(0.02, False), (0.10, True)])
def test_a_split_predicted_to_gain_little_is_not_built(cpu, tmp_path, monkeypatch, gain, built):
    """A split plan predicted within split_margin of the best whole-graph option is replaced by that option
    before anything is compiled; one predicted clearly ahead is built and raced."""
    real_assign, real_build = dioe.partition.assign, dioe.build.build
    whole = {}

    def split(segments, edges, profile, pool):
        got = real_assign(segments, edges, profile, pool)
        whole["option"], ms = dioe.partition.whole_graph_options(segments, profile, pool)[0]
        opts = {s.id: Choice(cpu.id, "torch" if i % 2 else "onnxruntime") for i, s in enumerate(segments)}
        return dataclasses.replace(got, options=opts, predicted_ms=ms * (1 - gain))
    compiled = []
    monkeypatch.setattr(dioe.partition, "assign", split)
    monkeypatch.setattr(dioe.build, "build",
                        lambda c, plan, *a, **k: compiled.append(plan) or real_build(c, plan, *a, **k))
    model, x = five_layers()
    opt = dioe.optimize(model, (x,), backends=["torch", "onnxruntime"], cache_dir=tmp_path)
    first = compiled[0]
    if built:
        assert len(first.partitions) > 1, first.summary()
    else:
        assert [p.choice.option() for p in first.partitions] == [whole["option"]], first.summary()
        assert any("so it was not built" in n for n in first.notes), first.notes
        assert all(len(p.partitions) == 1 for p in compiled), \
            "no split plan is compiled:\n" + "\n".join(p.summary() for p in compiled if len(p.partitions) > 1)
    assert_matches_eager(eager(model, (x,)), opt(x))
