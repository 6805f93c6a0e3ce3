"""Index checks: the ranges eager enforces on a model's integer inputs, found in the captured graph and checked
before any engine runs.

Eager raises `IndexError` for a token id of -1 or of the vocabulary's size; an exported engine reads whatever
memory the id lands on (ONNX Runtime wraps -1 to the last row, OpenVINO returns finite values for ids far out of
range). So for each graph input that reaches the index argument of an embedding, index_select, gather or index
op unchanged (through views, reshapes, expands and widening casts only), the valid range is recorded, and a call
outside it is refused with eager's kind of error, whatever engine would have run it.

    >>> import torch, dioe
    >>> emb = torch.nn.Embedding(10, 4)
    >>> g = dioe.capture(emb, (torch.tensor([1, 2]),))
    >>> index_ranges(g.gm)
    (IndexRange(position=0, name='input_1', low=0, high=10),)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import fx

from .errors import IndexRangeError

aten = torch.ops.aten


@dataclass(frozen=True)
class IndexRange:
    """Graph input `position` (`name`) must hold values in [low, high)."""

    position: int
    name: str
    low: int
    high: int

    def check(self, x: torch.Tensor) -> None:
        """Raise IndexRangeError when `x` holds a value outside [low, high): one fused min/max over it."""
        if x.numel() == 0:
            return
        lo, hi = torch.aminmax(x)
        lo, hi = lo.item(), hi.item()
        if lo < self.low or hi >= self.high:
            bad = lo if lo < self.low else hi
            raise IndexRangeError(f"input {self.name!r} holds {bad}, outside the valid range [{self.low}, "
                                  f"{self.high}) of the ops it indexes (eager raises IndexError: index out of "
                                  f"range)")


# ops that pass every element of their input on, in some shape: a value out of range before is one after
_KEEPS_VALUES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
                 aten.unsqueeze.default, aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default,
                 aten.permute.default, aten.transpose.int, aten.t.default, aten.flatten.using_ints,
                 aten.contiguous.default, aten.clone.default, aten.alias.default}
_CASTS = {aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default}
_INT_WIDTH = {torch.int8: 8, torch.uint8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 64}


def index_ranges(gm: fx.GraphModule) -> tuple[IndexRange, ...]:
    """The range eager accepts for each input of `gm` that reaches an index argument unchanged, intersected over
    every index op it reaches; inputs that reach none are not listed."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found: dict[int, tuple[int, int]] = {}
    for pos, ph in enumerate(placeholders):
        if _dtype(ph) not in _INT_WIDTH:
            continue
        for lo, hi in _uses(ph):
            old = found.get(pos)
            found[pos] = (lo, hi) if old is None else (max(old[0], lo), min(old[1], hi))
    return tuple(IndexRange(pos, placeholders[pos].name, lo, hi) for pos, (lo, hi) in sorted(found.items()))


def check_ranges(ranges: Sequence[IndexRange], flat: Sequence) -> None:
    """Check the flat inputs of a call against `ranges`; the first one out of range raises IndexRangeError."""
    for r in ranges:
        x = flat[r.position]
        if isinstance(x, torch.Tensor):
            r.check(x)


def _uses(node: fx.Node):
    """(low, high) for each index argument `node`'s values reach through value-keeping ops."""
    for user in node.users:
        if user.op != "call_function":
            continue
        t = user.target
        if t in _KEEPS_VALUES and user.args and user.args[0] is node or \
                t in _CASTS and user.args and user.args[0] is node and _widens(node, user):
            yield from _uses(user)
        elif t is aten.embedding.default and len(user.args) > 1 and user.args[1] is node:
            n = _size(user.args[0], 0)
            if n is not None:
                yield 0, n
        elif t in (aten.index_select.default, aten.gather.default) and len(user.args) > 2 and user.args[2] is node:
            n = _size(user.args[0], user.args[1])
            if n is not None:
                yield 0, n
        elif t is aten.index.Tensor and len(user.args) > 1:
            for dim, idx in enumerate(user.args[1]):
                if idx is node:
                    n = _size(user.args[0], dim)
                    if n is not None:
                        yield -n, n  # advanced indexing counts from the end, as Python does


def _dtype(node) -> torch.dtype | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return val.dtype if isinstance(val, torch.Tensor) else None


def _widens(src: fx.Node, cast: fx.Node) -> bool:
    """An integer cast that loses no value (a narrowing one wraps large ids into range, as eager would see them)."""
    a, b = _dtype(src), _dtype(cast)
    return a in _INT_WIDTH and b in _INT_WIDTH and _INT_WIDTH[b] >= _INT_WIDTH[a] and \
        (a is not torch.uint8 or b is not torch.int8)


def _size(node, dim) -> int | None:
    """The static size of `node`'s value along `dim`, or None (a dynamic size is not checked here)."""
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    if val is None and isinstance(node, fx.Node) and node.op == "get_attr":
        from .capture import fetch_attr
        val = fetch_attr(node.graph.owning_module, node.target)
    if not isinstance(val, torch.Tensor) or not isinstance(dim, int) or not -val.dim() <= dim < val.dim():
        return None
    size = val.shape[dim]
    return size if isinstance(size, int) else None
