"""Segmenting and partitioning: the DP on chains, HEFT on DAGs, memory capacity, how segments are grouped into
partitions and how a partition's time is forecast from its segments'. Profiles here are scripted: nothing runs."""

import pytest

import dioe
from dioe.cost import Cost
from dioe.partition import (INPUT, OUTPUT, Edges, assign, call_overhead_ms, member_load, partition_groups,
                            run_as_one_ms, scale_to_measured, whole_graph_options)
from dioe.plan import Choice
from dioe.profile import LinkCost, Profile, profile_links
from dioe.segment import Segment, segment_graph
from dioe.settings import Settings
from dioe.timing import Timing

TORCH_CPU, TORCH_CPU_B = Choice("cpu", "torch"), Choice("cpu-b", "torch")
ORT_CPU, ORT_NPU = Choice("cpu", "onnxruntime"), Choice("npu", "onnxruntime")


def _timing(ms):
    return Timing(ms, ms, ms, 5)


def _seg(sid, weights=0, acts=0):
    return Segment(sid, (sid,), sid, Cost(), weights, acts)


def _diamond(nbytes=4):
    """a feeds left and right, which join."""
    return Edges({(INPUT, "a"): nbytes, ("a", "left"): nbytes, ("a", "right"): nbytes, ("left", "join"): nbytes,
                  ("right", "join"): nbytes, ("join", OUTPUT): nbytes})


def _chain(ids, nbytes):
    pairs = [(INPUT, ids[0]), *zip(ids, ids[1:]), (ids[-1], OUTPUT)]
    return Edges({p: nbytes for p in pairs})


def test_heft_puts_parallel_branches_on_different_members(standin_pool):
    segs = [_seg("a"), _seg("left"), _seg("right"), _seg("join")]
    prof = Profile("g", "f")
    for s, ms in [("a", 1), ("left", 10), ("right", 10), ("join", 1)]:
        prof.times[s] = {TORCH_CPU: _timing(ms), TORCH_CPU_B: _timing(ms * 1.1)}
    free = LinkCost(0, float("inf"))
    prof.links = {"cpu->cpu-b": free, "cpu-b->cpu": free}
    a = assign(segs, _diamond(), prof, standin_pool)
    assert a.method == "heft"
    assert {a.options["left"], a.options["right"]} == {TORCH_CPU, TORCH_CPU_B}, a.options
    assert a.predicted_ms == pytest.approx(1 + 11 + 1)


def test_dp_pays_for_copies_on_a_chain(standin_pool):
    # the npu is a bit faster per segment, but its 10 us link makes hopping there and back a loss
    segs = [_seg("s0"), _seg("s1"), _seg("s2")]
    prof = Profile("g", "f")
    prof.times = {"s0": {TORCH_CPU: _timing(1.0)},
                  "s1": {TORCH_CPU: _timing(1.0), ORT_NPU: _timing(0.95)},
                  "s2": {TORCH_CPU: _timing(1.0)}}
    prof.links = profile_links(standin_pool)
    a = assign(segs, _chain(["s0", "s1", "s2"], 1 << 20), prof, standin_pool)
    assert a.method == "dp"
    assert a.options["s1"] == TORCH_CPU, "two 1 MiB copies at 16 GB/s cost more than 0.05 ms saved"


@pytest.mark.parametrize("elsewhere, split", [(0.996, False), (0.98, True)])
def test_dp_charges_a_call_per_partition(standin_pool, elsewhere, split):
    """Segments timed alone each paid a call; run as one partition they pay one. A middle segment a little faster
    on another backend of the same member is split off only when it gains more than the call it adds."""
    segs = [_seg("s0"), _seg("s1"), _seg("s2")]
    prof = Profile("g", "f")
    prof.times = {"s0": {TORCH_CPU: _timing(1.0)},
                  "s1": {TORCH_CPU: _timing(1.0), ORT_CPU: _timing(elsewhere)},
                  "s2": {TORCH_CPU: _timing(1.0)}}
    prof.links = profile_links(standin_pool)
    a = assign(segs, _chain(["s0", "s1", "s2"], 0), prof, standin_pool)
    one_call = 3.0 - 2 * call_overhead_ms(TORCH_CPU)   # 2.9868
    assert (a.options["s1"] == ORT_CPU) == split, a
    assert a.predicted_ms == pytest.approx(2.0 + elsewhere if split else one_call), a


def test_a_partition_never_holds_back_a_branch_on_another_member():
    """Neighbours with the same option share a partition unless that makes a consumer on another member wait for
    a segment it does not need: left joining a's partition would hold right (on cpu-b) back until left ends."""
    segs = [_seg("a"), _seg("left"), _seg("right"), _seg("join")]

    def groups(segments, where, edges):
        return [[s.id for s in g] for g in partition_groups(segments, where, edges)]

    two = {"a": TORCH_CPU, "left": TORCH_CPU, "right": TORCH_CPU_B, "join": TORCH_CPU}
    assert groups(segs, two, _diamond()) == [["a"], ["left"], ["right"], ["join"]]
    one = dict.fromkeys(two, TORCH_CPU)  # one member runs them in turn anyway: one call
    assert groups(segs, one, _diamond()) == [["a", "left", "right", "join"]]
    chain = Edges({(INPUT, "a"): 4, ("a", "left"): 4, ("left", "right"): 4, ("a", "join"): 4, ("right", "join"): 4,
                   ("join", OUTPUT): 4})  # join needs right, which needs left: holding join back costs nothing
    assert groups(segs, two, chain) == [["a", "left"], ["right"], ["join"]]
    # s needs w, on cpu-b; x does not: were s to join x's partition, x would wait for w as well
    segs = [_seg("w"), _seg("x"), _seg("s")]
    late = Edges({(INPUT, "w"): 4, (INPUT, "x"): 4, ("w", "s"): 4, ("x", "s"): 4, ("s", OUTPUT): 4})
    where = {"w": TORCH_CPU_B, "x": TORCH_CPU, "s": TORCH_CPU}
    assert groups(segs, where, late) == [["w"], ["x"], ["s"]]


def test_replanning_scales_segments_to_what_their_partition_measured():
    """Segment times scaled by one factor, forecast again as one call, come to the partition's measured time,
    also where segments are short enough that the floor of half their time applies."""
    for times, measured in [([0.005] * 3, 0.03), ([1.0] * 3, 2.5), ([10.0, 10.0], 25.0)]:
        k = scale_to_measured(measured, times, ORT_CPU)
        assert run_as_one_ms([k * t for t in times], ORT_CPU) == pytest.approx(measured), (times, k)


def test_capacity_is_never_exceeded(standin_pool):
    npu = standin_pool["npu"]
    segs = [_seg(f"s{i}", weights=npu.memory_bytes // 3, acts=1024) for i in range(6)]
    prof = Profile("g", "f")
    prof.times = {s.id: {ORT_NPU: _timing(0.1), TORCH_CPU: _timing(1.0)} for s in segs}
    prof.links = profile_links(standin_pool)
    a = assign(segs, _chain([s.id for s in segs], 0), prof, standin_pool)
    load = member_load(segs, a.options)
    assert load["npu"] <= npu.memory_bytes
    assert sum(1 for o in a.options.values() if o.member == "npu") == 2  # as much as fits, no more
    assert a.moved_for_capacity


def test_whole_graph_rivals_are_one_call_and_fit_their_member(standin_pool):
    from dioe.backends import backend_class

    npu = standin_pool["npu"]
    segs = [_seg(f"s{i}", weights=npu.memory_bytes // 3, acts=1024) for i in range(4)]
    prof = Profile("g", "f")
    prof.times = {s.id: {ORT_NPU: _timing(0.1), TORCH_CPU: _timing(2.0), ORT_CPU: _timing(1.0)} for s in segs}
    ranked = whole_graph_options(segs, prof, standin_pool)
    assert [o for o, _ in ranked] == [ORT_CPU, TORCH_CPU], "4/3 of the npu's memory"
    # one call instead of four: three per-call overheads fewer than the sum of the segments
    overhead = backend_class("onnxruntime").call_overhead_us / 1e3
    assert dict(ranked)[ORT_CPU] == pytest.approx(4 * 1.0 - 3 * overhead)


def test_segments_are_coarse(cpu):
    model, inputs = dioe.zoo.load("bert-base", size="small")
    g = dioe.capture(model, inputs)
    segs = segment_graph(g.gm)
    assert 2 <= len(segs) <= Settings().segment_max
    assert sum(len(s.nodes) for s in segs) == len(g.compute_nodes)
