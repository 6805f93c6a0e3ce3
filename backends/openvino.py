"""OpenVINO: the partition converted with openvino.convert_model and compiled for the member's OpenVINO device.
Precision is always explicit: OpenVINO's CPU default is bf16 where the CPU has it.

convert_model reads the partition from torch.export, or from the ONNX file the ONNX Runtime backend already
exported for the same partition in the same cache: the ONNX frontend took 0.4 s where the PyTorch one took 4.3 s
(mobilenetv2; bert-base 2.2 s against 5.8 s), and the compiled models ran alike (mobilenetv2, resnet50,
bert-base, gpt2 at batch 1 within 3% of each other, either way round, outputs within 6e-6).

Except for a partition with attention: the PyTorch frontend keeps aten's scaled_dot_product_attention as
OpenVINO's own ScaledDotProductAttention, one fused kernel, where the ONNX export writes it out (MatMul,
Softmax, a NaN guard for fully masked rows, Select), which OpenVINO does not fuse back. Side by side on the
whole graph: tiny-bert at batch 8 0.433 against 0.480 ms, minilm 63.9 against 67.3 ms at batch 8 and 9.67
against 9.85 ms at batch 1; bert-base and vit-base at batch 1 tied (69.0 against 68.8 ms, 99.6 against 99.7).
Converting bert-base that way took 4.9 s against 2.4."""

from __future__ import annotations

import contextlib
import threading
import warnings

import torch

from ..backend import Backend, Partition, decomposes, host_view
from ..cache import touch
from ..pool import Member
from ..settings import openvino_telemetry

_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_CONVERTING = threading.Lock()
# the modules of OpenVINO's converter that reach its telemetry package, each through its global `tm`
_TELEMETRY_USERS = ("convert_impl", "telemetry_utils", "utils")


@contextlib.contextmanager
def _converting():
    """One conversion at a time, with OpenVINO's usage telemetry declined for it. convert_model re-initialises
    that telemetry on every call (a consent check, a stats file under the home folder, a thread that posts events
    to an analytics service): 0.57 s of a small MLP's 1.05 s conversion on a machine without a route out, with
    the posting threads left to compete with the next timing runs. A profile converts once per distinct segment.
    For the calls it makes, DIOE swaps in the stub that OpenVINO itself uses when its telemetry package is absent;
    DIOE_OPENVINO_TELEMETRY=1 leaves OpenVINO's telemetry as it is."""
    with _CONVERTING:
        if openvino_telemetry():
            yield
            return
        import importlib

        swapped = []
        try:
            try:
                stub = importlib.import_module("openvino.tools.ovc.telemetry_stub")
                modules = [importlib.import_module(f"openvino.tools.ovc.{name}") for name in _TELEMETRY_USERS]
            except ImportError:  # an OpenVINO laid out otherwise: its converter as it is
                modules = []
            for module in modules:
                if hasattr(module, "tm"):
                    swapped.append((module, module.tm))
                    module.tm = stub
            yield
        finally:
            for module, tm in swapped:
                module.tm = tm


class OpenvinoBackend(Backend):
    name = "openvino"
    requires = ("openvino",)
    extra = "openvino"
    precisions = ("fp32", "bf16", "fp16")
    call_overhead_us = 75.0
    color = "#2e9d6b"
    options = frozenset({"device", "config"})

    def __init__(self, cache_dir=None):
        super().__init__(cache_dir)
        self._core = None

    @property
    def core(self):
        if self._core is None:
            import openvino as ov

            self._core = ov.Core()
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            self._core.set_property({"CACHE_DIR": str(self.cache_dir / "blobs")})  # OpenVINO's own blob cache
        return self._core

    def op_support(self):
        from openvino.frontend.pytorch.torchdynamo.op_support import OperatorSupport
        from torch.fx.passes.operator_support import create_op_support

        table = OperatorSupport({})

        def ok(submodules, node) -> bool:
            t = node.target
            if not isinstance(t, torch._ops.OpOverload):
                return True
            return table.is_node_supported(submodules, node) or decomposes(t)
        return create_op_support(ok)

    def ov_device(self, member: Member) -> str:
        spec = member.descriptor.backend(self.name)
        if member.stand_in:
            return "CPU"
        return (spec.options.device if spec and spec.options.device else member.descriptor.match.openvino_device
                or "CPU")

    def convert(self, part: Partition):
        import openvino as ov

        attention = has_attention(part)
        from .onnxruntime import OnnxruntimeBackend, onnx_file

        onnx = onnx_file(self.cache_dir.parent / OnnxruntimeBackend.name, part)

        def from_onnx():
            with _converting():
                return ov.convert_model(str(onnx))

        def from_torch():
            with torch.no_grad():
                ep = torch.export.export(part.gm, tuple(part.example_inputs), strict=False)
            with _converting():
                return ov.convert_model(ep)
        # the preferred frontend first; an op one frontend lacks, the other may have. Each one's conversion is
        # cached under its own name, read back in the same order.
        routes = [("torch", from_torch), ("onnx", from_onnx)]
        if not attention and onnx.exists():
            routes.reverse()
        for frontend, _ in routes:
            xml = self.cache_dir / f"{part.digest}.{frontend}.xml"
            if xml.exists():
                touch(xml)
                return self.core.read_model(str(xml)), str(xml)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        failed: list[Exception] = []
        for frontend, route in routes:
            if route is from_onnx and not onnx.exists():
                continue
            try:
                model = route()
                break
            except Exception as e:
                failed.append(e)
        else:
            raise failed[-1] from (failed[0] if len(failed) > 1 else None)
        if failed and attention:
            warnings.warn(f"dioe: OpenVINO's PyTorch frontend could not convert partition {part.id} "
                          f"({type(failed[0]).__name__}: {str(failed[0])[:200]}); converted from its ONNX file, "
                          f"where attention runs op by op", RuntimeWarning)
        xml = self.cache_dir / f"{part.digest}.{frontend}.xml"
        ov.save_model(model, str(xml), compress_to_fp16=False)  # fp32 weights stay fp32
        return model, str(xml)

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency",
                   alone: bool = False):
        model, xml = self.convert(part)
        device = self.ov_device(member)
        config = {"INFERENCE_PRECISION_HINT": _HINT[precision],
                  "PERFORMANCE_HINT": "THROUGHPUT" if objective == "throughput" else "LATENCY"}
        if device.startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = self.threads(member)
        spec = member.descriptor.backend(self.name)
        if spec:
            config.update({k: v for k, v in spec.options.config.items()})
        compiled = self.core.compile_model(model, device, config)
        order = [i for _, i in part.input_order([p.get_any_name() for p in compiled.inputs], renamed=True)]
        local = threading.local()  # an infer request per calling thread, reused across calls

        def run(*xs):
            req = getattr(local, "req", None)
            if req is None:
                req = local.req = compiled.create_infer_request()
            res = req.infer([host_view(xs[i]) for i in order], share_inputs=True)
            return tuple(torch.from_numpy(v) for v in res.values())
        return run, xml


def has_attention(part: Partition) -> bool:
    """Whether the partition calls one of aten's scaled-dot-product attention ops (the math one, or a fused
    kernel's op, as torch.export leaves them): the PyTorch frontend converts it to one fused op."""
    return any(n.op == "call_function" and "scaled_dot_product" in str(n.target) for n in part.gm.graph.nodes)
