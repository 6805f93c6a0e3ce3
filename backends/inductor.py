"""torch.compile (Inductor) of one partition; its compile time is recorded on the Compiled result."""

from __future__ import annotations

import copy

import torch

from ..backend import Backend, Partition, float_precision_dtype
from ..pool import Member

_CODEGEN_DEVICES = ("cpu", "cuda", "xpu")  # device types Inductor generates code for


class InductorBackend(Backend):
    name = "inductor"
    precisions = ("fp32", "bf16", "fp16")
    call_overhead_us = 15.0

    def member_reason(self, member: Member) -> str | None:
        dev = self.io_device(member) if (member.device or member.stand_in) else None
        if dev is None or dev.split(":")[0] not in _CODEGEN_DEVICES:
            return f"Inductor generates code only for {', '.join(_CODEGEN_DEVICES)}"
        return super().member_reason(member)

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency"):
        device = torch.device(self.io_device(member))
        low = float_precision_dtype(precision)
        gm = part.gm
        if device.type != "cpu" or low is not None:
            gm = copy.deepcopy(gm).to(device)
            if low is not None:
                gm.to(low)
        spec = member.descriptor.backend(self.name)
        mode = spec.options.mode if spec else None
        compiled = torch.compile(gm, backend="inductor", dynamic=False, mode=mode, fullgraph=True)
        examples = [x.to(device) if isinstance(x, torch.Tensor) else x for x in part.example_inputs]
        if low is not None:
            examples = [x.to(low) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                        for x in examples]

        def run(*inputs):
            with torch.inference_mode():
                if low is not None:
                    inputs = [x.to(low) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                              for x in inputs]
                    return tuple(o.float() if isinstance(o, torch.Tensor) and o.dtype == low else o
                                 for o in compiled(*inputs))
                return compiled(*inputs)

        run(*examples)  # compile now, so that compile time is not charged to the first request
        return run, ""
