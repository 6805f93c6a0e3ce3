"""torch eager on whichever torch device the member has (cpu, cuda, mlu, npu, xpu, mps): one implementation."""

from __future__ import annotations

import torch

from ..backend import Backend, Partition, cast_io, placed_module
from ..pool import Member


class TorchBackend(Backend):
    name = "torch"
    precisions = ("fp32", "bf16", "fp16")
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
                   alone: bool = False):
        gm, low = placed_module(part, self.io_device(member), precision)
        body = cast_io(gm, low)

        def run(*inputs):
            with torch.inference_mode():
                return body(*inputs)
        return run, ""
