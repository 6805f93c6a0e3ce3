"""torch.compile (Inductor) of one partition; its compile time is recorded on the Compiled result."""

from __future__ import annotations

import torch

from ..backend import Backend, Built, Partition, cast_io, placed_module
from ..pool import Member
from ..quantization import Calibration

_CODEGEN_DEVICES = ("cpu", "cuda", "xpu")  # device types Inductor generates code for


class InductorBackend(Backend):
    name = "inductor"
    precisions = ("fp32", "bf16", "fp16")
    call_overhead_us = 32.0
    color = "#d9822b"
    options = frozenset({"device", "mode"})
    needs_torch_device = True
    thread_budget = False   # its generated kernels run on torch's one intra-op pool per process

    def member_reason(self, member: Member) -> str | None:
        dev = self.io_device(member) if (member.device or member.stand_in) else None
        if dev is None or dev.split(":")[0] not in _CODEGEN_DEVICES:
            return f"Inductor generates code only for {', '.join(_CODEGEN_DEVICES)}"
        return super().member_reason(member)

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency",
                   alone: bool = False, calibration: Calibration | None = None):
        device = self.io_device(member)
        gm, low = placed_module(part, device, precision)
        spec = member.descriptor.backend(self.name)
        compiled = torch.compile(gm, backend="inductor", dynamic=False, fullgraph=True,
                                 mode=spec.options.mode if spec else None)
        body = cast_io(compiled, low)

        def run(*inputs):
            with torch.inference_mode():
                return body(*inputs)

        # compile now, so that compile time is not charged to the first request
        run(*[x.to(device) if isinstance(x, torch.Tensor) else x for x in part.example_inputs])
        # Inductor compiles the graph with its weights and float inputs cast to `low`: every float op runs in it
        return Built(run, "", {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[low])
