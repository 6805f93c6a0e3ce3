"""Profiling: every segment timed on every legal choice, segments of one structure timed once, and profiles that
keep their Choice keys through JSON."""

import json

import pytest
import torch

import dioe
import dioe.profile
from dioe.errors import BackendError
from dioe.plan import Choice
from dioe.profile import LinkCost, Profile
from dioe.segment import segment_graph
from dioe.split import split_graph
from dioe.timing import Timing


def test_layers_of_one_structure_are_timed_once(pool, tmp_path, monkeypatch):
    model, inputs = dioe.zoo.load("bert-base", size="small")
    g = dioe.capture(model, inputs)
    segs = segment_graph(g.gm)
    where = {n: s.id for s in segs for n in s.nodes}
    parts = split_graph(g.gm, lambda node: where[node.name], g.example_inputs).partitions
    groups: dict[str, list] = {}
    for p in parts:
        groups.setdefault(p.structure, []).append(p)
    twins = max(groups.values(), key=len)
    assert len(twins) >= 2 and all(".layer." in p.id for p in twins), [p.id for p in parts]
    assert len({p.digest for p in twins}) == len(twins), "their weights still tell their artifacts apart"
    timed = []
    real = dioe.profile.measure
    monkeypatch.setattr(dioe.profile, "measure", lambda fn, xs, **k: timed.append(fn) or real(fn, xs, **k))
    prof = dioe.profile.profile_segments(parts, segs, pool, ["torch"], graph_hash=g.structure_hash(),
                                         cache_dir=tmp_path, progress=False)
    assert len(timed) == len(groups) < len(parts)
    sid = {p.id: s.id for s, p in zip(segs, parts)}
    for p in twins[1:]:
        assert prof.same_as[sid[p.id]] == sid[twins[0].id]
        assert prof.times[sid[p.id]] == prof.times[sid[twins[0].id]]
    assert Profile.from_dict(prof.to_dict()).same_as == prof.same_as


def test_a_profile_round_trips_through_json_with_choice_keys():
    prof = Profile("g", "f", seconds=1.5, same_as={"s2": "s1"})
    ort, ov = Choice("cpu0", "onnxruntime"), Choice("npu", "openvino", "fp16")
    prof.times = {"s0": {ort: Timing(1.0, 0.9, 1.1, 5), ov: Timing(0.5, 0.4, 0.6, 7)},
                  "s1": {ort: Timing(2.0, 2.0, 2.0, 3)}, "s2": {ort: Timing(2.0, 2.0, 2.0, 3)}}
    prof.failures = {"s1": {ov: "2 node(s) not supported, first aten.embedding.default"}}
    prof.links = {"cpu0->npu": LinkCost(10.0, 16.0, "descriptor")}
    d = json.loads(json.dumps(prof.to_dict()))
    assert d["times"]["s0"]["openvino@npu/fp16"] == {"median_ms": 0.5, "p25_ms": 0.4, "p75_ms": 0.6, "runs": 7}
    assert set(d["failures"]["s1"]) == {"openvino@npu/fp16"}, "labels in JSON"
    back = Profile.from_dict(d)
    assert back == prof
    assert all(type(o) is Choice for opts in back.times.values() for o in opts), back.times
    assert back.times["s0"][Choice("npu", "openvino", "fp16", predicted_ms=9.0)].runs == 7, \
        "a Choice carrying a time finds the same entry"


def _small_job():
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4)).eval()
    g = dioe.capture(model, (torch.randn(2, 16),))
    segs = segment_graph(g.gm)
    where = {n: s.id for s in segs for n in s.nodes}
    return g, segs, split_graph(g.gm, lambda node: where[node.name], g.example_inputs).partitions


def _profile(pool, tmp_path, g, segs, parts):
    return dioe.profile.profile_segments(parts, segs, pool, ["torch"], graph_hash=g.structure_hash(),
                                         cache_dir=tmp_path, progress=False)


def test_a_damaged_profile_is_deleted_with_a_warning_and_measured_again(pool, tmp_path, monkeypatch):
    g, segs, parts = _small_job()
    _profile(pool, tmp_path, g, segs, parts)
    (path,) = (tmp_path / "profiles").glob("*.json")
    d = json.loads(path.read_text())
    sid = next(iter(d["times"]))
    for t in d["times"][sid].values():
        t["median_ms"] = 1e9  # valid JSON, wrong content: it would steer every plan away from this option
    path.write_text(json.dumps(d))
    timed = []
    real = dioe.profile.measure
    monkeypatch.setattr(dioe.profile, "measure", lambda fn, xs, **k: timed.append(fn) or real(fn, xs, **k))
    with pytest.warns(RuntimeWarning, match=r"cached profile .* is damaged: its sha256 differs .* computing it again"):
        prof = _profile(pool, tmp_path, g, segs, parts)
    assert timed, "measured again"
    assert all(t.median_ms < 1e9 for t in prof.times[sid].values())
    assert json.loads(path.read_text())["times"][sid] != d["times"][sid], "the new profile replaced it"


def test_a_failure_while_timing_is_retried_once_and_never_cached(pool, tmp_path, monkeypatch):
    g, segs, parts = _small_job()
    real = dioe.profile.measure
    calls = []

    def flaky(fn, xs, **k):  # the first call of every option fails, as a passing condition would make it
        calls.append(fn)
        if len(calls) % 2:
            raise BackendError("partition x on member cpu0 with backend torch (fp32) failed: out of memory")
        return real(fn, xs, **k)
    monkeypatch.setattr(dioe.profile, "measure", flaky)
    prof = _profile(pool, tmp_path, g, segs, parts)
    assert not any(prof.failures.values()) and all(prof.times.values()), "the retry measured each option"

    def broken(fn, xs, **k):
        raise BackendError("partition x on member cpu0 with backend torch (fp32) failed: out of memory")
    monkeypatch.setattr(dioe.profile, "measure", broken)
    with pytest.warns(RuntimeWarning, match=r"failed twice while timed.*the profile is not cached"):
        prof = dioe.profile.profile_segments(parts, segs, pool, ["torch"], graph_hash=g.structure_hash(),
                                             cache_dir=tmp_path / "other", progress=False)
    assert all("out of memory" in why for f in prof.failures.values() for why in f.values()) and prof.failures
    assert not list((tmp_path / "other" / "profiles").glob("*.json")), "nothing cached: measured again next time"
