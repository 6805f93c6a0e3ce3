"""torch.compile (Inductor) of one partition; its compile time is recorded on the Compiled result.

int8 goes through PT2E, as PyTorch documents it for x86 CPUs: torchao's `X86InductorQuantizer` (static u8
activations per tensor, s8 weights per channel) on the partition's exported graph, calibrated, converted, and
compiled by Inductor with freezing on, which lowers the quantize/dequantize patterns to oneDNN's int8 kernels. The
scales and zero points calibration found are cached as JSON (keyed by the recipe and the calibration data), so a
saved plan reloads into the same int8 model without its calibration data.
"""

from __future__ import annotations

import json
import platform
import warnings
from pathlib import Path

import torch

from ..backend import Backend, Built, Partition, cast_io, placed_module, quiet, write_atomically
from ..cache import reuse
from ..errors import BackendError
from ..pool import Member
from ..quantization import Calibration, CalibrationKey, applied, artifact_key, missing, u8s8_saturates

_CODEGEN_DEVICES = ("cpu", "cuda", "xpu")  # device types Inductor generates code for
# what PT2E lowers to int8, and its quantize nodes: the counts `applied` reads back
_HEAVY = ("aten.linear.default", "aten.conv2d.default", "aten.conv1d.default", "aten.matmul.default",
          "aten.mm.default", "aten.bmm.default", "aten.addmm.default", "aten.baddbmm.default",
          "aten.scaled_dot_product_attention.default")   # attention stays float: activation by activation
_DEQUANT_WEIGHT = "quantized_decomposed.dequantize_per_channel.default"


class InductorBackend(Backend):
    name = "inductor"
    precisions = ("fp32", "bf16", "fp16", "int8")   # int8: x86 CPUs, through PT2E (see the module docstring)
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
        notes: dict = {}
        if precision == "int8":
            gm, notes = self.quantized(part, device, calibration)
            low, ran = None, applied("int8", "fp32", lowered=notes["quantized_ops"], kept=notes["float_ops"])
            artifact = notes.pop("artifact")
        else:
            gm, low = placed_module(part, device, precision)
            # Inductor compiles the graph with its weights and float inputs cast to `low`: every float op runs in it
            ran, artifact = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[low], ""
        spec = member.descriptor.backend(self.name)
        compiled = torch.compile(gm, backend="inductor", dynamic=False, fullgraph=True,
                                 mode=spec.options.mode if spec else None)
        body = cast_io(compiled, low)

        def run(*inputs):
            with torch.inference_mode():
                return body(*inputs)

        # compile now, so that compile time is not charged to the first request; int8 with freezing, which folds
        # the weights into the graph and lets Inductor match its int8 patterns
        import torch._inductor.config as inductor_config

        with inductor_config.patch(freezing=precision == "int8"), warnings.catch_warnings():
            # its int8 lowering copies zero points with torch.tensor(tensor), which torch itself warns about
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            run(*[x.to(device) if isinstance(x, torch.Tensor) else x for x in part.example_inputs])
        return Built(run, artifact, ran, notes)

    def quantized(self, part: Partition, device: str, calibration: Calibration | CalibrationKey | None):
        """`part` quantized by PT2E for x86 (see the module docstring): the converted module and notes (the
        recipe, counts of what runs in int8, the qparams file as "artifact")."""
        if torch.device(device).type != "cpu" or platform.machine() not in ("x86_64", "AMD64"):
            raise BackendError(f"partition {part.id}: int8 with Inductor goes through PT2E's X86InductorQuantizer, "
                               f"which targets x86 CPUs; this member computes on {device} ({platform.machine()})")
        if calibration is None:
            raise BackendError(f"partition {part.id}: int8 with Inductor quantizes statically, which needs "
                               "calibration data: pass calibration=[input tuples shaped like its example inputs]")
        try:
            with quiet("torchao", "torch.utils._pytree"):   # it reports the GPU kernels it cannot load here
                import torchao
                import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        except ImportError as e:
            raise BackendError(f"partition {part.id}: int8 with Inductor needs torchao ({e}); install "
                               "dioe[inductor]") from e
        # u8 x s8 products saturate on an x86 CPU without VNNI: 7-bit activations there, as ONNX Runtime's answer
        reduce_range = u8s8_saturates()
        recipe = (f"torchao {torchao.__version__} pt2e X86InductorQuantizer static u8 per-tensor activations "
                  f"s8 per-channel weights reduce_range={reduce_range}")
        keyed = isinstance(calibration, CalibrationKey)
        path = self.cache_dir / f"{part.digest}.{artifact_key('int8', recipe, calibration)}.qparams.json"
        quantizer = x86.X86InductorQuantizer().set_global(
            x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
        with quiet("torch.utils._pytree"):
            exported = torch.export.export(part.gm, tuple(part.example_inputs), strict=False).module()
            prepared = prepare_pt2e(exported, quantizer)
        observers = {n: m for n, m in prepared.named_modules() if hasattr(m, "calculate_qparams")}
        if reuse(path, "int8 quantization parameters"):
            qparams = json.loads(path.read_text())
            if set(qparams) != set(observers):
                raise BackendError(f"partition {part.id}: the cached int8 parameters {path.name} name other "
                                   "observers than this graph has; clear the cache")
        elif keyed:
            raise missing(part, calibration, "Inductor")
        else:
            with torch.no_grad():
                for item in calibration:
                    prepared(*item)
            qparams = {n: _qparams(o) for n, o in observers.items()}
            write_atomically(self.cache_dir, path.name, lambda p: Path(p).write_text(json.dumps(qparams)))
        # convert from the stored values, calibrated now or loaded: a reload builds the very model judged
        for n, o in observers.items():
            o.calculate_qparams = _pinned(qparams[n])
        converted = convert_pt2e(prepared)
        counts = _int8_counts(converted)
        if not counts["quantized_ops"]:
            raise BackendError(f"partition {part.id}: PT2E quantized nothing that Inductor runs in int8 ({recipe}; "
                               f"{counts['float_ops']} float matmul/conv ops)")
        return converted, {"recipe": recipe, "calibration_samples": 0 if keyed else len(calibration), **counts,
                           "read_from": "the converted graph: heavy ops whose weight is dequantized per channel, "
                                        "the pattern Inductor lowers to int8", "artifact": str(path)}


def _qparams(observer) -> dict:
    scale, zero_point = observer.calculate_qparams()
    return {"shape": list(scale.shape), "scale": scale.flatten().tolist(), "scale_dtype": str(scale.dtype),
            "zero_point": zero_point.flatten().tolist(), "zero_point_dtype": str(zero_point.dtype)}


def _pinned(q: dict):
    dtype = {str(d): d for d in (torch.float32, torch.float64, torch.int32, torch.int64)}
    scale = torch.tensor(q["scale"], dtype=dtype[q["scale_dtype"]]).reshape(q["shape"])
    zero_point = torch.tensor(q["zero_point"], dtype=dtype[q["zero_point_dtype"]]).reshape(q["shape"])
    return lambda: (scale, zero_point)


def _int8_counts(gm: torch.fx.GraphModule) -> dict:
    """Heavy ops whose weight comes through a per-channel dequantize (what Inductor runs in int8) and the rest."""
    lowered = kept = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target) in _HEAVY:
            fed = any(isinstance(a, torch.fx.Node) and str(a.target) == _DEQUANT_WEIGHT for a in n.args)
            lowered, kept = lowered + fed, kept + (not fed)
    return {"quantized_ops": lowered, "float_ops": kept}
