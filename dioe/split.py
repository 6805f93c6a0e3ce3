"""Split a captured graph into partitions by a label per node, and run the pieces in dependency order.

    >>> import torch, dioe
    >>> g = dioe.capture(dioe.zoo.TinyMLP(), (torch.randn(2, 64),))
    >>> prog = split_graph(g.gm, lambda n: "left" if "left" in n.meta["dioe.module"] else "rest")
    >>> [p.id for p in prog.partitions]
    ['rest', 'left']        # doctest: +SKIP

Each partition is a GraphModule from flat tensors to a tuple of tensors that shares the original weights.
A `Program` says which values each partition reads and writes; `run_sequential` is the reference executor.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import fx

from .backend import Partition
from .errors import DIOEError


@dataclass(frozen=True)
class Step:
    """One partition run: reads `inputs` and writes `outputs` (value names of the original graph)."""

    partition: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]


@dataclass
class Program:
    """Partitions in a valid execution order, with the graph's inputs and outputs by value name."""

    partitions: list[Partition]
    steps: list[Step]
    graph_inputs: tuple[str, ...]
    graph_outputs: tuple[str | None, ...]  # None for an output that is a constant, given in `constants`
    constants: dict[int, object]

    def partition(self, pid: str) -> Partition:
        return next(p for p in self.partitions if p.id == pid)

    def dependencies(self) -> dict[str, set[str]]:
        """partition -> the partitions whose outputs it reads."""
        producer = {v: s.partition for s in self.steps for v in s.outputs}
        return {s.partition: {producer[v] for v in s.inputs if v in producer} for s in self.steps}


def split_graph(gm: fx.GraphModule, label: Callable[[fx.Node], str] | Mapping[str, str],
                example_inputs: Sequence | None = None) -> Program:
    """Cut `gm` into one partition per distinct label of its call_function nodes.

    `label` maps a node (or a node name, when a dict) to a partition id. Nodes that do not compute
    (getitem of a multi-output op) follow their producer. The partitions must form a DAG; a labelling
    that makes two partitions feed each other raises DIOEError naming them.
    """
    get = (lambda n: label[n.name]) if isinstance(label, Mapping) else label
    labels: dict[fx.Node, str] = {}
    order: list[str] = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target.__name__ == "getitem" if hasattr(n.target, "__name__") else False:
            labels[n] = labels[n.args[0]]  # stay with the multi-output producer
        else:
            labels[n] = get(n)
        if labels[n] not in order:
            order.append(labels[n])

    _check_acyclic(gm, labels)
    members: dict[str, list[fx.Node]] = defaultdict(list)
    for n in gm.graph.nodes:
        if n in labels:
            members[labels[n]].append(n)

    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    graph_outputs = list(out_node.args[0])
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    cuts = {}
    for pid in _topo_partitions(order, members, labels):
        inside = set(members[pid])
        inputs: list[fx.Node] = []
        for n in members[pid]:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr" and a not in inputs:
                    inputs.append(a)
        cuts[pid] = inputs
    values = example_values(gm, example_inputs, {a for ins in cuts.values() for a in ins}) \
        if example_inputs is not None else None

    partitions, steps = [], []
    for pid, inputs in cuts.items():
        nodes = members[pid]
        inside = set(nodes)
        outputs = [n for n in nodes if any(u not in inside for u in n.users)]
        sub = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for a in inputs:
            env[a] = sub.placeholder(a.name)
            env[a].meta = dict(a.meta)
        for n in nodes:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in env:
                    env[a] = sub.get_attr(a.target)
                    env[a].meta = dict(a.meta)
            env[n] = sub.node_copy(n, lambda x: env[x])
        sub.output(tuple(env[o] for o in outputs))
        sub_gm = fx.GraphModule(gm, sub, class_name=f"Partition_{pid}")
        examples = tuple(values[a] for a in inputs) if values is not None else ()
        partitions.append(Partition(pid, sub_gm, examples))
        steps.append(Step(pid, tuple(a.name for a in inputs), tuple(o.name for o in outputs)))

    constants = {i: o for i, o in enumerate(graph_outputs) if not isinstance(o, fx.Node)}
    return Program(partitions, steps, tuple(p.name for p in placeholders),
                   tuple(o.name if isinstance(o, fx.Node) else None for o in graph_outputs), constants)


def _check_acyclic(gm: fx.GraphModule, labels: Mapping[fx.Node, str]) -> None:
    deps: dict[str, set[str]] = defaultdict(set)
    for n, lab in labels.items():
        for a in n.all_input_nodes:
            if a in labels and labels[a] != lab:
                deps[lab].add(labels[a])
    state: dict[str, int] = {}

    def visit(p: str, path: list[str]) -> None:
        if state.get(p) == 1:
            cycle = path[path.index(p):] + [p]
            raise DIOEError(f"split: partitions {' -> '.join(cycle)} depend on each other in a cycle; "
                            "a partition must not both feed and read another")
        if state.get(p) == 2:
            return
        state[p] = 1
        for q in deps[p]:
            visit(q, path + [p])
        state[p] = 2

    for p in set(labels.values()):
        visit(p, [])


def _topo_partitions(order: list[str], members: Mapping[str, list[fx.Node]],
                     labels: Mapping[fx.Node, str]) -> list[str]:
    deps = {p: {labels[a] for n in members[p] for a in n.all_input_nodes if a in labels and labels[a] != p}
            for p in order}
    done: list[str] = []
    while len(done) < len(order):
        ready = [p for p in order if p not in done and deps[p] <= set(done)]
        done.append(ready[0])
    return done


def example_values(gm: fx.GraphModule, example_inputs: Sequence, wanted: set) -> dict[fx.Node, object]:
    """The values of the `wanted` nodes for real inputs: the graph's own inputs where those are all it needs (a
    plan of one partition, the usual case), else one run of the graph keeping only those values."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values: dict[fx.Node, object] = dict(zip(placeholders, example_inputs))
    if wanted <= set(values):
        return values

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n in wanted:
                values[n] = out
            return out

    with torch.inference_mode():
        Recorder(gm).run(*example_inputs)
    return values


def run_sequential(program: Program, fns: Mapping[str, Callable], inputs: Sequence) -> tuple:
    """Run `program` step by step with one callable per partition id; returns the flat graph outputs."""
    env = dict(zip(program.graph_inputs, inputs))
    for step in program.steps:
        outs = fns[step.partition](*[env[v] for v in step.inputs])
        env.update(zip(step.outputs, outs))
    return tuple(env[v] if v is not None else program.constants[i] for i, v in enumerate(program.graph_outputs))
