"""The engines a run measures, each built the way its users build it: torch eager, inductor, ONNX Runtime, OpenVINO
at f32 and at its default precision, and DIOE's fp32 plan; the lower-precision peers (OpenVINO int8 through NNCF's
defaults, ONNX Runtime's dynamic int8, torch's bf16 autocast) and DIOE's own choice of precision; and DIOE's
partitions called bare, for its runtime overhead. Each peer builds in a cache folder of its own (the OpenVINO peers
share one); inductor's caches too."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from .. import backends

if TYPE_CHECKING:
    from ..plan import Plan

FP32_ENGINES = ("torch", "inductor", "onnxruntime", "openvino-f32", "openvino-default", "dioe")
# each lower-precision engine, judged against fp32 eager on held-out inputs beside its latency
PRECISION_ENGINES = ("openvino-int8", "onnxruntime-int8", "torch-bf16", "dioe-auto")
ENGINES = FP32_ENGINES + PRECISION_ENGINES
DIOE = ("dioe", "dioe-auto")
_PRECISION_ORDER = ("int8", "fp16", "bf16", "fp32")   # how plan_precision orders a mixed plan's precisions
PEERS = tuple(e for e in ENGINES if e not in DIOE)
# engines called with the model's own inputs; the rest take the captured graph's flat inputs
MODEL_CALLED = ("torch", "torch-bf16") + DIOE


@dataclass(frozen=True)
class Built:
    """One engine, built: the callable to time, the precision it computes in, and for DIOE the plan it runs."""

    fn: Callable
    precision: str
    plan: Plan | None = None


def build(engine: str, model, inputs, captured, cache: Path, calibration: list[tuple] | None = None) -> Built:
    """`engine` built for the model: its callable takes the model's positional inputs (`MODEL_CALLED`) or the
    captured graph's flat inputs (the compiled peers). `calibration`, input tuples shaped like `inputs`, is what the
    int8 peers calibrate on and what DIOE's precision search splits into calibration and held-out data."""
    from ..backend import Partition
    from ..pool import ResourcePool

    if engine == "torch":
        return Built(lambda *xs: model(*xs), "fp32")
    if engine == "torch-bf16":
        def autocast(*xs):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return model(*xs)
        return Built(autocast, "bf16")
    if engine in DIOE:
        from ..pipeline import optimize

        if engine == "dioe":  # the fp32 plan, beside the fp32 peers
            opt = optimize(model, inputs, cache_dir=cache / "dioe", name=captured.name, precision="fp32")
            return Built(opt, "fp32", opt.plan)
        opt = optimize(model, inputs, cache_dir=cache / "dioe-auto", name=captured.name, precision="auto",
                       calibration=calibration)
        return Built(opt, plan_precision(opt.plan), opt.plan)
    ref = ResourcePool.discover().reference
    part = Partition("whole", captured.gm, captured.example_inputs)
    if engine in ("openvino-default", "openvino-int8"):
        be = backends.get("openvino", cache / "peers" / "openvino")
        ov_model, _ = be.convert(part)
        order = [i for _, i in part.input_order([p.get_any_name() for p in ov_model.inputs], renamed=True)]
        if engine == "openvino-int8":
            ov_model = _nncf_default(ov_model, _flat_calibration(captured, calibration), order, part)
        compiled = be.core.compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        req = compiled.create_infer_request()
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        prec = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(getattr(hint, "get_type_name", lambda: str(hint))(),
                                                                   str(hint))
        if engine == "openvino-int8":
            prec = _ov_applied(compiled, prec)

        def run(*xs):
            res = req.infer([xs[i].contiguous().numpy() for i in order], share_inputs=True)
            return tuple(torch.from_numpy(v) for v in res.values())
        return Built(run, prec)
    if engine == "onnxruntime-int8":
        return _onnxruntime_dynamic(part, cache / "peers" / "onnxruntime-int8")
    name = {"openvino-f32": "openvino"}.get(engine, engine)
    with inductor_cache(cache / "peers" / "inductor") if engine == "inductor" else contextlib.nullcontext():
        c = backends.get(name, cache / "peers" / name).compile(part, ref, "fp32", alone=True)
    if engine == "onnxruntime":
        return Built(public_onnxruntime(c.fn.session, part), "fp32")
    return Built(c, "fp32")


def plan_precision(plan: Plan) -> str:
    """One precision for a plan: its partitions' when they agree ("int8"), else their set ("int8+fp32")."""
    def rank(precision: str) -> int:   # lowest first; a precision outside the list after them
        head = precision.split("+")[0]
        return _PRECISION_ORDER.index(head) if head in _PRECISION_ORDER else len(_PRECISION_ORDER)
    return "+".join(sorted({p.precision for p in plan.partitions}, key=rank))


def _flat_calibration(captured, calibration: list[tuple] | None) -> list[tuple]:
    if not calibration:
        raise ValueError("the int8 peers need calibration inputs")
    return [tuple(captured.flatten_inputs(tuple(item), {})) for item in calibration]


def _nncf_default(ov_model, calibration: list[tuple], order: list[int], part):
    """The OpenVINO model quantized as NNCF's documentation does it: `nncf.quantize` with its default settings on
    the given samples, and `model_type=TRANSFORMER` for a model with attention, as that documentation asks (without
    it NNCF fails on BERT's embedding gathers); nothing tuned for this CPU, as DIOE's own OpenVINO engine is."""
    import nncf

    from ..backend import quiet
    from ..backends.openvino import has_attention

    transformer = has_attention(part) or (part.calls("softmax") and part.calls("matmul", "bmm"))
    dataset = nncf.Dataset(calibration, lambda sample: [sample[i].contiguous().numpy() for i in order])
    with quiet("nncf"):
        return nncf.quantize(ov_model, dataset, subset_size=len(calibration),
                             model_type=nncf.ModelType.TRANSFORMER if transformer else None)


def _ov_applied(compiled, hint: str) -> str:
    """The precision an OpenVINO int8 model runs, read back from its runtime graph: "int8" when some layer
    executes in u8/i8."""
    try:
        types = {op.get_rt_info()["runtimePrecision"].astype(str) for op in compiled.get_runtime_model().get_ops()
                 if "runtimePrecision" in op.get_rt_info()}
    except Exception:  # a runtime graph without the field: say what the model was built as
        return "int8"
    return "int8" if types & {"u8", "i8"} else hint


def _onnxruntime_dynamic(part, folder: Path) -> Built:
    """ONNX Runtime's dynamic int8 as its documentation writes it: `quantize_dynamic` with default settings on the
    exported model, then an `InferenceSession` with default options."""
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import quantize_dynamic

    from ..backend import quiet

    src = backends.get("onnxruntime", folder / "export").export(part)
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / "model.int8.onnx"
    with quiet(""):
        quantize_dynamic(str(src), str(out), use_external_data_format=True)
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    kinds = {n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node}
    return Built(public_onnxruntime(sess, part), "int8" if kinds & {"MatMulInteger", "DynamicQuantizeLinear",
                                                                   "ConvInteger", "QLinearMatMul"} else "fp32")


PARTS = "dioe partitions"  # DIOE's partitions called bare, timed beside DIOE at batch 1: its runtime overhead


def partitions_call(opt) -> Callable:
    """One call of each of an optimized model's partitions in turn, on the engine's own callable (below DIOE's
    error handling) and on inputs prepared beforehand, then a wait for every accelerator used: the sum of its
    partitions' times. DIOE's latency exceeds it by its runtime overhead (input checks, handing values between
    partitions and members, the output structure); for a plan whose partitions run at the same time on different
    members the sum exceeds the critical path, and the overhead can come out below zero."""
    calls, devices = [], set()
    for step in opt.program.steps:
        c = opt.runtime.compiled[step.partition]
        xs = backends.get(c.backend).to_io(opt.program.partition(step.partition).example_inputs,
                                           opt.runtime.pool[c.member])
        calls.append((c.fn, xs))
        if not c.io_device.startswith("cpu"):
            devices.add(c.io_device.split(":")[0])
    # an engine on an accelerator returns before its kernels finish; DIOE's call waits for them (it hands the
    # outputs back on the CPU), so the bare call waits too
    syncs = [m.synchronize for m in (getattr(torch, d, None) for d in sorted(devices))
             if callable(getattr(m, "synchronize", None))]

    def run():
        for fn, xs in calls:
            fn(*xs)
        for sync in syncs:
            sync()
    return run


def public_onnxruntime(sess, part) -> Callable:
    """The ONNX Runtime peer's call, as its documentation writes it: `InferenceSession.run` on numpy views of the
    inputs, the outputs wrapped by torch.from_numpy. The session is the one DIOE's backend builds (same ONNX file,
    same options), but DIOE calls it below that Python method, which re-checks the feed on every call."""
    feed = part.input_order([p.name for p in sess.get_inputs()])

    def run(*xs):
        return tuple(torch.from_numpy(o) for o in sess.run(None, {name: xs[i].numpy() for name, i in feed}))
    return run


@contextlib.contextmanager
def inductor_cache(folder: Path):
    """Inductor's on-disk caches (compiled graphs and kernels) in a folder of this run's own: by default they
    outlive the process, and a warm one cut resnet50's compile from 31.6 s to 2.8 s between two runs."""
    try:  # torch's own switch also clears the in-memory caches
        from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir
    except ImportError:
        temporary_cache_dir = None
    if temporary_cache_dir is not None:
        with temporary_cache_dir(str(folder)):
            yield
        return
    old = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = old
