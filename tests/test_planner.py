"""Plans from assignments: segments grouped into partitions on legal members only, and a split that would not pay
replaced by one engine over the whole graph before anything is compiled."""

import copy
import dataclasses

import pytest

import dioe
import dioe.build
import dioe.partition
from dioe.plan import Choice
from dioe.planner import Job, edges_of, make_plan
from dioe.profile import profile_segments
from dioe.segment import segment_graph
from dioe.settings import Settings
from dioe.split import split_graph

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
    opt = dioe.optimize(model, (x,), backends=["torch", "onnxruntime"], cache_dir=tmp_path, precision="fp32")
    first = compiled[0]
    if built:
        assert len(first.partitions) > 1, first.summary()
    else:
        assert [p.choice.option() for p in first.partitions] == [whole["option"]], first.summary()
        assert any("so it was not built" in n for n in first.notes), first.notes
        assert all(len(p.partitions) == 1 for p in compiled), \
            "no split plan is compiled:\n" + "\n".join(p.summary() for p in compiled if len(p.partitions) > 1)
    assert_matches_eager(eager(model, (x,)), opt(x))


def test_denied_ops_never_land_on_the_member(standin_pool):
    """The stand-in npu denies embeddings. Made to look ten times faster than the cpu for every segment it may
    run, it gets partitions of tiny-bert, and none of them holds an embedding: those segments were never timed
    there, and the plan and the model built from it keep them elsewhere."""
    model, inputs = dioe.zoo.load("tiny-bert")
    captured = dioe.capture(model, inputs, name="BertModel")
    settings = Settings()
    segments = segment_graph(captured.gm)
    where = {n: s.id for s in segments for n in s.nodes}
    program = split_graph(captured.gm, lambda node: where[node.name], captured.example_inputs)
    profile = profile_segments(program.partitions, segments, standin_pool, ["torch", "onnxruntime"],
                               graph_hash=captured.structure_hash(), cache_dir=settings.cache_dir, progress=False)
    target = {n.name: str(n.target) for n in captured.compute_nodes}
    embeds = {s.id for s in segments if any("embedding" in target[n] for n in s.nodes)}
    assert embeds, "tiny-bert has embeddings"
    npu = Choice("npu", "onnxruntime")
    for sid in embeds:
        assert npu not in profile.times[sid] and npu in profile.failures[sid], profile.failures[sid]
    fast = copy.deepcopy(profile)
    for times in fast.times.values():
        for o, t in times.items():
            if o.member == "npu":
                times[o] = type(t)(t.median_ms / 10, t.p25_ms / 10, t.p75_ms / 10, t.runs)
    job = Job(captured, tuple(segments), edges_of(program, captured), fast, standin_pool, "latency", True, settings)
    plan = make_plan(job, dioe.partition.assign(job.segments, job.edges, fast, standin_pool))
    on_npu = [p for p in plan.partitions if p.member == "npu"]
    assert on_npu, plan.summary()
    for p in on_npu:
        assert not set(p.segments) & embeds and not any("embedding" in target[n] for n in p.nodes), p
    opt = dioe.build.build(captured, plan, standin_pool, settings=settings)
    for p in on_npu:
        c, part = opt.runtime.compiled[p.id], opt.program.partition(p.id)
        assert (c.member, c.backend) == ("npu", "onnxruntime"), c
        ops = {str(n.target) for n in part.gm.graph.nodes if n.op == "call_function"}
        assert not any("embedding" in o for o in ops), (p.id, ops)
    assert_matches_eager(eager(model, inputs), opt(*inputs), rtol=1e-4)
    opt.runtime.close()
