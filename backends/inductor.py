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
from ..integrity import discard
from ..errors import BackendError
from ..pool import Member
from ..quantization import Calibration, CalibrationKey, applied, artifact_key, missing, u8s8_saturates

_CODEGEN_DEVICES = ("cpu", "cuda", "xpu")  # device types Inductor generates code for
# what PT2E lowers to int8, and its quantize nodes: the counts `applied` reads back
_HEAVY = ("aten.linear.default", "aten.conv2d.default", "aten.conv1d.default", "aten.matmul.default",
          "aten.mm.default", "aten.bmm.default", "aten.addmm.default", "aten.baddbmm.default",
          "aten.scaled_dot_product_attention.default")   # attention stays float: activation by activation
_DEQUANT_WEIGHT = "quantized_decomposed.dequantize_per_channel.default"
# Inductor's counters of the int8 linear and convolution patterns it lowered to oneDNN while compiling
_INT8_MATCHES = ("qlinear_weight_prepack_matcher_count", "qconv_weight_prepack_matcher_count")
_FORMAT = 1   # of the cached qparams file


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

    @classmethod
    def precision_reason(cls, member: Member, precision: str) -> str | None:
        if precision == "int8" and not _x86_cpu(member):
            return "int8 with Inductor goes through PT2E's X86InductorQuantizer, which targets x86 CPUs"
        return None

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency",
                   alone: bool = False, calibration: Calibration | None = None):
        device = self.io_device(member)
        spec = member.descriptor.backend(self.name)
        mode = spec.options.mode if spec else None
        notes: dict = {}
        if precision == "int8":
            why = self.precision_reason(member, precision)
            if why:
                raise BackendError(f"partition {part.id}: {why}; member {member.id} computes on {device} "
                                   f"({platform.machine()})")
            gm, notes = self.quantized(part, calibration)
            low, artifact = None, notes.pop("artifact")
        else:
            gm, low = placed_module(part, device, precision)
            # Inductor compiles the graph with its weights and float inputs cast to `low`: every float op runs in it
            artifact = ""
        body = cast_io(torch.compile(gm, backend="inductor", dynamic=False, fullgraph=True, mode=mode), low)
        if precision == "int8":
            import torch._inductor.config as inductor_config

            def run(*inputs):
                # freezing folds the weights into the graph, so that Inductor's int8 patterns match them. Set
                # around every call (the setting is per thread), so that a recompile in a serving thread keeps it.
                # The FX graph cache is off: a cached graph skips the matchers whose counts say what runs int8.
                with torch.inference_mode(), inductor_config.patch(freezing=True, fx_graph_cache=False):
                    return body(*inputs)
        else:
            def run(*inputs):
                with torch.inference_mode():
                    return body(*inputs)

        # compile now, so that compile time is not charged to the first request
        from torch._dynamo.utils import counters

        before = sum(counters["inductor"][k] for k in _INT8_MATCHES)
        with warnings.catch_warnings():
            # its int8 lowering copies zero points with torch.tensor(tensor), which torch itself warns about
            warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
            run(*[x.to(device) if isinstance(x, torch.Tensor) else x for x in part.example_inputs])
        if precision != "int8":
            return Built(run, artifact, {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[low])
        lowered = sum(counters["inductor"][k] for k in _INT8_MATCHES) - before
        notes.update(quantized_ops=lowered, float_ops=max(0, notes["heavy_ops"] - lowered))
        if not lowered:
            raise BackendError(f"partition {part.id}: PT2E quantized nothing that Inductor lowered to int8 "
                               f"({notes['recipe']}; {notes['heavy_ops']} matmul/conv/attention ops, "
                               f"{notes['dequantized_weights']} with weights quantized)")
        return Built(run, artifact, applied("int8", "fp32", lowered=lowered, kept=notes["float_ops"]), notes)

    def quantized(self, part: Partition, calibration: Calibration | CalibrationKey | None):
        """`part` quantized by PT2E for x86 (see the module docstring): the converted module and notes (the
        recipe, the graph's heavy ops and those with quantized weights, the qparams file as "artifact")."""
        if calibration is None:
            raise BackendError(f"partition {part.id}: int8 with Inductor quantizes statically, which needs "
                               "calibration data: pass calibration=[input tuples shaped like its example inputs]")
        try:
            with quiet("torchao", "torch.utils._pytree"):   # it reports the GPU kernels it cannot load here
                import torchao
                import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as x86
                from torchao.quantization.pt2e import UniformQuantizationObserverBase
                from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
        except ImportError as e:
            raise BackendError(f"partition {part.id}: int8 with Inductor needs torchao ({e}); install "
                               "dioe[inductor]") from e
        # u8 x s8 products saturate on an x86 CPU without VNNI: torchao's answer is 7-bit activations
        reduce_range = u8s8_saturates()
        # the torch version too: the observers' order follows the export, which a torch release may change
        recipe = (f"torchao {torchao.__version__} torch {torch.__version__} pt2e X86InductorQuantizer static u8 "
                  f"per-tensor activations s8 per-channel weights reduce_range={reduce_range} qparams v{_FORMAT}")
        keyed = isinstance(calibration, CalibrationKey)
        path = self.cache_dir / f"{part.digest}.{artifact_key('int8', recipe, calibration)}.qparams.json"
        cached = reuse(path, "int8 quantization parameters")
        if keyed and not cached:
            raise missing(part, calibration, "Inductor")
        quantizer = x86.X86InductorQuantizer().set_global(
            x86.get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
        # export traces with autograd on, which refuses inference tensors: a partition past the first gets its
        # example inputs from the graph before it, computed in inference mode
        with quiet("torch.utils._pytree"), torch.inference_mode(False):
            example = tuple(x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x
                            for x in part.example_inputs)
            exported = torch.export.export(part.gm, example, strict=False).module()
            prepared = prepare_pt2e(exported, quantizer)
        observers = _observers(prepared, UniformQuantizationObserverBase)
        qparams = json.loads(path.read_text()) if cached else None
        if qparams is not None and not _fits(qparams, observers):
            if keyed:
                raise BackendError(f"partition {part.id}: the cached int8 parameters {path.name} do not fit this "
                                   "graph's observers; optimize again to recalibrate")
            discard(path)
            qparams = None
        if qparams is None:
            with torch.no_grad():
                for item in calibration:
                    prepared(*item)
            qparams = {name: {"observes": observes, **_qparams(o)} for name, (observes, o) in observers.items()}
            write_atomically(self.cache_dir, path.name, lambda p: Path(p).write_text(json.dumps(qparams)))
        # convert from the stored values, calibrated now or loaded: a reload builds the very model judged
        for name, (_, o) in observers.items():
            o.calculate_qparams = _pinned(qparams[name])
        converted = convert_pt2e(prepared)
        return converted, {"recipe": recipe, "calibration_samples": 0 if cached else len(calibration),
                           **_heavy_ops(converted), "read_from": "Inductor's int8 pattern matches while compiling",
                           "artifact": str(path)}


def _x86_cpu(member: Member) -> bool:
    """Whether `member` computes on this machine's CPU (a stand-in does), and that CPU is x86."""
    on_cpu = member.stand_in or torch.device(member.device or "cpu").type == "cpu"
    return on_cpu and platform.machine() in ("x86_64", "AMD64")


def _observers(prepared: torch.fx.GraphModule, base) -> dict:
    """Each calibrating observer by module name, with what it observes: the node it reads, and the op reading
    it. The names are positions in the graph; what they observe says whether cached values belong to them."""
    mods = dict(prepared.named_modules())
    out = {}
    for n in prepared.graph.nodes:
        if n.op == "call_module" and isinstance(mods.get(n.target), base):
            src = n.args[0].name if n.args and isinstance(n.args[0], torch.fx.Node) else ""
            users = ",".join(sorted(str(u.target) for u in n.users))
            out[n.target] = (f"{src} -> {users}", mods[n.target])
    return out


def _fits(qparams: dict, observers: dict) -> bool:
    """Whether cached `qparams` were calibrated for these observers: the same ones, observing the same nodes."""
    return set(qparams) == set(observers) and all(
        isinstance(qparams[k], dict) and qparams[k].get("observes") == observes for k, (observes, _) in
        observers.items())


def _qparams(observer) -> dict:
    scale, zero_point = observer.calculate_qparams()
    return {"shape": list(scale.shape), "scale": scale.flatten().tolist(), "scale_dtype": str(scale.dtype),
            "zero_point": zero_point.flatten().tolist(), "zero_point_dtype": str(zero_point.dtype)}


def _pinned(q: dict):
    dtype = {str(d): d for d in (torch.float32, torch.float64, torch.int32, torch.int64)}
    scale = torch.tensor(q["scale"], dtype=dtype[q["scale_dtype"]]).reshape(q["shape"])
    zero_point = torch.tensor(q["zero_point"], dtype=dtype[q["zero_point_dtype"]]).reshape(q["shape"])
    return lambda: (scale, zero_point)


def _heavy_ops(gm: torch.fx.GraphModule) -> dict:
    """The converted graph's heavy ops, and those whose weight comes through a per-channel dequantize (what
    Inductor's int8 patterns can take)."""
    heavy = dequantized = 0
    for n in gm.graph.nodes:
        if n.op == "call_function" and str(n.target) in _HEAVY:
            heavy += 1
            dequantized += any(isinstance(a, torch.fx.Node) and str(a.target) == _DEQUANT_WEIGHT for a in n.args)
    return {"heavy_ops": heavy, "dequantized_weights": dequantized}
