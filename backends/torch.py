"""torch eager on whichever torch device the member has (cpu, cuda, mlu, npu, xpu, mps): one implementation.

bf16 runs under torch.autocast around the fp32 graph, as PyTorch recommends for inference: matmuls, linear
layers, convolutions and attention in bf16, softmax, normalization and reductions where autocast keeps them
(fp32), where casting the whole module would run every op in bf16. What ran in bf16 is read back from one call
at compile time, op by op, as torch dispatched it. fp16 casts the module, as before."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import fx
from torch.utils._python_dispatch import TorchDispatchMode

from ..backend import Backend, Built, Partition, cast_io, placed_module
from ..capture import fetch_attr
from ..pool import Member
from ..quantization import Calibration, applied

# The heavy ops of torch's autocast lower-precision lists (CPU and CUDA): these run in bf16 under autocast.
_LOWERED = frozenset({"linear", "addmm", "mm", "bmm", "matmul", "baddbmm", "addbmm", "conv1d", "conv2d",
                      "conv3d", "convolution", "_convolution", "conv_transpose1d", "conv_transpose2d",
                      "conv_transpose3d", "scaled_dot_product_attention"})
_NAMES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32", "bf16", "fp16")  # fp16 where the member's descriptor lists it (a GPU's)
    call_overhead_us = 6.6
    color = "#4f7fd9"
    options = frozenset({"device"})
    needs_torch_device = True
    thread_budget = False   # torch's intra-op pool is one per process (torch.set_num_threads)

    def member_reason(self, member: Member) -> str | None:
        if member.device is None and not member.stand_in:
            return "torch cannot drive this device"
        return super().member_reason(member)

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency",
                   alone: bool = False, calibration: Calibration | None = None):
        device = self.io_device(member)
        kind = torch.device(device).type
        if precision == "bf16":
            if torch.amp.is_autocast_available(kind):
                run = _autocast_runner(part, device, torch.bfloat16)
                return Built(run, "", *_read_back(run, part, device, torch.bfloat16))
            warnings.warn(f"dioe: torch has no autocast for device {kind}; partition {part.id} runs in bf16 by "
                          "casting its weights and inputs, so softmax and normalization run in bf16 too, where "
                          "autocast would keep them fp32", RuntimeWarning)
        gm, low = placed_module(part, device, precision)
        body = cast_io(gm, low)

        # no_grad, not inference_mode: an inference tensor refuses in-place edits outside inference mode, and the
        # caller owns these outputs (a model that fell back to torch would otherwise break `out.add_(1)`)
        def run(*inputs):
            with torch.no_grad():
                return body(*inputs)
        if low is None:  # the captured graph, as it is
            return Built(run, "", "fp32")
        return Built(run, "", *_read_back(run, part, device, low))


def _autocast_runner(part: Partition, device: str, low: torch.dtype):
    """A callable running the partition under autocast to `low`, with float outputs back in their captured
    dtype (autocast leaves a linear layer's output in `low`)."""
    gm = _lowered_weights(part, device, low)
    kind = torch.device(device).type
    specs = part.output_specs
    restore = [s.torch_dtype if s is not None and not isinstance(s, tuple) else torch.float32 for s in specs]

    def run(*inputs):
        with torch.no_grad(), torch.autocast(kind, dtype=low):  # ordinary outputs: see compile_fn
            outs = gm(*inputs)
        return tuple(o.to(want) if isinstance(o, torch.Tensor) and o.dtype == low and want != low else o
                     for o, want in zip(outs, restore))
    return run


def _lowered_weights(part: Partition, device: str, low: torch.dtype) -> fx.GraphModule:
    """The partition's graph over its own weights, on `device`, except that a weight read only by ops autocast
    lowers is held in `low` already. Autocast caches its casts within one call only: every call would otherwise
    read minilm's 90 MB of fp32 linear weights to cast them again. On an AVX2 CPU, where bf16 is emulated and
    minilm took 298 ms against 304 ms that way (fp32: 74 ms), that is small; with native bf16 it is a larger
    share of a call. The caller's module keeps its fp32 weights; on the CPU, those not cast here are shared."""
    gm = part.gm
    only_lowered: dict[str, bool] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            ok = all(u.op == "call_function" and _packet(u.target) in _LOWERED for u in n.users)
            only_lowered[n.target] = only_lowered.get(n.target, True) and ok
    attrs: dict = {}
    for n in gm.graph.nodes:
        if n.op in ("get_attr", "call_module") and n.target not in attrs:
            value = fetch_attr(gm, n.target)
            if isinstance(value, torch.Tensor) and value.dtype == torch.float32 and only_lowered.get(n.target):
                value = value.detach().to(device, low)
            elif isinstance(value, (torch.Tensor, torch.nn.Module)):
                value = value.to(device)
            attrs[n.target] = value
    return fx.GraphModule(attrs, copy.deepcopy(gm.graph)).eval()


def _packet(target) -> str:
    return target.overloadpacket.__name__ if isinstance(target, torch._ops.OpOverload) else ""


class _HeavyOps(TorchDispatchMode):
    """Counts the heavy ops torch dispatches, by the dtype of their first float input."""

    def __init__(self):
        super().__init__()
        self.dtypes: dict[torch.dtype, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _packet(func) in _LOWERED:
            first = next((a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None)
            if first is not None:
                self.dtypes[first.dtype] = self.dtypes.get(first.dtype, 0) + 1
        return func(*args, **(kwargs or {}))


def _read_back(run, part: Partition, device: str, low: torch.dtype) -> tuple[str, dict]:
    """What `run` computes its heavy ops in, from one call on the example inputs: "bf16", "bf16+fp32" for a
    mix, "fp32" when the partition has none to lower; with the counts."""
    with _HeavyOps() as seen:
        run(*[x.to(device) if isinstance(x, torch.Tensor) else x for x in part.example_inputs])
    lowered = seen.dtypes.get(low, 0)
    kept = sum(n for dtype, n in seen.dtypes.items() if dtype != low)
    notes = {"lowered_ops": lowered, "float_ops": kept,
             "op_dtypes": {_NAMES.get(d, str(d)): n for d, n in seen.dtypes.items()}}
    return applied(_NAMES[low], "fp32", lowered=lowered, kept=kept), notes
