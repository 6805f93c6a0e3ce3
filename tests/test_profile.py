"""Profiling: every segment timed on every legal choice, segments of one structure timed once."""

import dioe
import dioe.profile
from dioe.profile import Profile
from dioe.segment import segment_graph
from dioe.split import split_graph


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
