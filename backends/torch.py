"""torch eager on whichever torch device the member has (cpu, cuda, mlu, npu, xpu, mps): one implementation."""

from __future__ import annotations

import copy

import torch

from ..backend import Backend, Partition, float_precision_dtype
from ..pool import Member


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32", "bf16", "fp16")
    call_overhead_us = 3.0

    def member_reason(self, member: Member) -> str | None:
        if member.device is None and not member.stand_in:
            return "torch cannot drive this device"
        return super().member_reason(member)

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency"):
        device = torch.device(self.io_device(member))
        low = float_precision_dtype(precision)
        gm = part.gm
        if device.type != "cpu" or low is not None:
            gm = copy.deepcopy(gm)  # keep the caller's CPU fp32 weights untouched
            gm.to(device)
            if low is not None:
                gm.to(low)
        gm.eval()
        if low is None:
            def run(*inputs):
                with torch.inference_mode():
                    return gm(*inputs)
            return run, ""
        return _cast_io(gm, low), ""


def _cast_io(gm, low: torch.dtype):
    """Run `gm` with weights in `low`, casting float inputs down and float outputs back to fp32."""
    def run(*inputs):
        with torch.inference_mode():
            xs = [x.to(low) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
            outs = gm(*xs)
            return tuple(o.float() if isinstance(o, torch.Tensor) and o.dtype == low else o for o in outs)
    return run
