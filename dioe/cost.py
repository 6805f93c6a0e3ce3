"""Static cost estimates per ATen node: floating-point operations and bytes moved.

These are priors for the optimizer before anything is measured, and the denominator of "achieved GFLOP/s"
in benchmarks. FLOPs count a multiply-add as two; bytes count every tensor read and written once (the
lower bound a fused kernel could reach), and views move nothing.

    >>> Cost(flops=2, bytes_read=8) + Cost(flops=1, bytes_written=4)
    Cost(flops=3, bytes_read=8, bytes_written=4)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import fx

aten = torch.ops.aten


@dataclass(frozen=True)
class Cost:
    flops: int = 0
    bytes_read: int = 0
    bytes_written: int = 0

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops + other.flops, self.bytes_read + other.bytes_read,
                    self.bytes_written + other.bytes_written)

    @property
    def bytes(self) -> int:
        return self.bytes_read + self.bytes_written


def _numel(shape) -> int:
    return int(math.prod(int(s) for s in shape))


def _shape(x: Any) -> tuple[int, ...] | None:
    return tuple(x.shape) if isinstance(x, torch.Tensor) else None


def _linear(args, out) -> int:
    x, w = _shape(args[0]), _shape(args[1])
    return 2 * _numel(x[:-1]) * w[0] * w[1]


def _matmul(args, out) -> int:
    k = _shape(args[0])[-1]
    return 2 * _numel(_shape(out)) * k


def _addmm(args, out) -> int:
    a, b = _shape(args[1]), _shape(args[2])
    return 2 * a[0] * a[1] * b[1]


def _baddbmm(args, out) -> int:
    a = _shape(args[1])
    return 2 * _numel(_shape(out)) * a[-1]


def _conv(args, out) -> int:
    w = _shape(args[1])  # (C_out, C_in / groups, *kernel)
    return 2 * _numel(_shape(out)) * _numel(w[1:])


def _sdpa(args, out) -> int:
    q, k = _shape(args[0]), _shape(args[1])  # (B, H, L, E), (B, H, S, E)
    b_h_l = _numel(q[:-1])
    return 2 * b_h_l * k[-2] * q[-1] * 2  # QK^T and PV


_FLOPS: dict[Any, Callable] = {
    aten.linear: _linear, aten.matmul: _matmul, aten.mm: _matmul, aten.bmm: _matmul,
    aten.addmm: _addmm, aten.baddbmm: _baddbmm,
    aten.conv1d: _conv, aten.conv2d: _conv, aten.conv3d: _conv, aten.convolution: _conv,
    aten._convolution: _conv, aten.conv_transpose2d: _conv,
    aten.scaled_dot_product_attention: _sdpa,
}
# Normalisations cost a handful of operations per element (mean, variance, scale, shift).
_PER_ELEMENT = {aten.layer_norm: 5, aten.native_layer_norm: 5, aten.batch_norm: 2, aten.group_norm: 5,
                aten._native_batch_norm_legit_no_training: 2, aten.softmax: 5, aten._softmax: 5,
                aten.gelu: 8, aten.silu: 4, aten.tanh: 4}
_VIEWS = {aten.view, aten._unsafe_view, aten.reshape, aten.permute, aten.transpose, aten.t, aten.expand,
          aten.unsqueeze, aten.squeeze, aten.slice, aten.select, aten.alias, aten.flatten, aten.unflatten,
          aten.split, aten.chunk, aten.unbind, aten.detach, aten.dropout, aten.contiguous,
          aten._assert_tensor_metadata, aten.sym_size, aten.lift_fresh_copy}


def _tensors(x: Any) -> list[torch.Tensor]:
    out: list[torch.Tensor] = []
    torch.utils._pytree.tree_map(lambda t: out.append(t) if isinstance(t, torch.Tensor) else None, x)
    return out


def _nbytes(t: torch.Tensor) -> int:
    return _numel(t.shape) * t.element_size()


def node_cost(node: fx.Node, args: tuple, out: Any) -> Cost:
    """Estimate one call_function node, given its arguments and output as (fake or real) tensors."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return Cost()
    packet = node.target.overloadpacket
    outs = _tensors(out)
    if packet in _VIEWS:
        return Cost()
    read = sum(_nbytes(t) for t in _tensors(args))
    written = sum(_nbytes(t) for t in outs)
    if packet in _FLOPS:
        try:
            flops = _FLOPS[packet](args, outs[0] if outs else None)
        except (TypeError, IndexError, AttributeError):
            flops = 0
    else:
        per = _PER_ELEMENT.get(packet, 1)
        flops = per * sum(_numel(t.shape) for t in outs if t.is_floating_point())
    return Cost(int(flops), int(read), int(written))
