"""Segments: the units the optimizer profiles and places. Contiguous runs of the graph's topological order,
cut where the nn.Module path changes, so a segment is a layer or block and never a single tiny op.

    >>> segs = segment_graph(captured.gm)                   # doctest: +SKIP
    >>> [s.id for s in segs][:3]                            # doctest: +SKIP
    ['s00:embeddings', 's01:encoder.layer.0', 's02:encoder.layer.1']

Contiguous runs of a topological order can never feed each other in a cycle, which keeps every labelling
the partitioner makes legal by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import fx

from .cost import Cost
from .settings import Settings



@dataclass(frozen=True)
class Segment:
    id: str
    nodes: tuple[str, ...]          # node names, in graph order
    module: str                     # common module prefix
    cost: Cost
    weight_bytes: int               # parameters and buffers it reads
    activation_bytes: int           # outputs it produces


def _compute_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function"]


def _work(c: Cost) -> float:
    return c.flops + 16.0 * c.bytes  # memory traffic matters on the CPU: ~16 FLOPs per byte at the roofline knee


def _runs(nodes: list[fx.Node], depth: int) -> list[list[fx.Node]]:
    runs: list[list[fx.Node]] = []
    key_prev = None
    for n in nodes:
        path = n.meta.get("dioe.module", "")
        key = ".".join(path.split(".")[:depth]) if path else None
        if _is_getitem(n) or key is None:
            key = key_prev  # getitems follow their producer; module-less ops stay with the current run
        if runs and key == key_prev:
            runs[-1].append(n)
        else:
            runs.append([n])
        key_prev = key
    return runs


def _is_getitem(n: fx.Node) -> bool:
    return getattr(n.target, "__name__", "") == "getitem"


def segment_graph(gm: fx.GraphModule, *, target: int = Settings.segment_target,
                  max_segments: int = Settings.segment_max,
                  min_share: float = Settings.segment_min_share) -> list[Segment]:
    """Cut `gm` (annotated by capture) into segments; see the module docstring. The sizes are `Settings`'s
    segment knobs."""
    nodes = _compute_nodes(gm)
    if not nodes:
        return []
    best = [nodes]
    for depth in range(1, 10):
        runs = _runs(nodes, depth)
        if len(runs) > max_segments:
            break
        best = runs
        if len(runs) >= target:
            break
    runs = _fold_small(best, min_share)
    while len(runs) > max_segments:
        runs = _merge_smallest_pair(runs)
    return [_segment(i, r, gm) for i, r in enumerate(runs)]


def _run_work(run: list[fx.Node]) -> float:
    total = Cost()
    for n in run:
        total = total + n.meta.get("dioe.cost", Cost())
    return _work(total)


def _fold_small(runs: list[list[fx.Node]], min_share: float) -> list[list[fx.Node]]:
    total = sum(_run_work(r) for r in runs) or 1.0
    out: list[list[fx.Node]] = []
    pending: list[fx.Node] = []  # small runs waiting for the next big one (joins belong with what follows)
    for r in runs:
        if _run_work(r) / total < min_share:
            pending.extend(r)
            continue
        out.append(pending + r)
        pending = []
    if pending:
        if out:
            out[-1].extend(pending)
        else:
            out.append(pending)
    return out


def _merge_smallest_pair(runs: list[list[fx.Node]]) -> list[list[fx.Node]]:
    i = min(range(len(runs) - 1), key=lambda k: _run_work(runs[k]) + _run_work(runs[k + 1]))
    return runs[:i] + [runs[i] + runs[i + 1]] + runs[i + 2:]


def _segment(i: int, run: list[fx.Node], gm: fx.GraphModule) -> Segment:
    paths = [n.meta.get("dioe.module", "") for n in run if n.meta.get("dioe.module")]
    prefix = _common_prefix(paths) if paths else ""
    cost = Cost()
    weights = 0
    seen: set[str] = set()
    for n in run:
        cost = cost + n.meta.get("dioe.cost", Cost())
        for a in n.all_input_nodes:
            if a.op == "get_attr" and a.target not in seen:
                seen.add(a.target)
                spec = a.meta.get("dioe.tensor")
                weights += spec.nbytes if spec is not None and not isinstance(spec, tuple) else 0
    acts = sum(s.nbytes for n in run for s in _specs(n.meta.get("dioe.tensor")))
    return Segment(f"s{i:02d}:{prefix or 'graph'}", tuple(n.name for n in run), prefix, cost, weights, acts)


def _specs(s) -> list:
    if s is None:
        return []
    return [x for x in s if x is not None] if isinstance(s, tuple) else [s]


def _common_prefix(paths: list[str]) -> str:
    parts = [p.split(".") for p in paths]
    out = []
    for level in zip(*parts):
        if len(set(level)) != 1:
            break
        out.append(level[0])
    return ".".join(out)
