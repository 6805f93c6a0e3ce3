"""The engines a run measures, each built the way its users build it: torch eager, inductor, ONNX Runtime, OpenVINO
at f32 and at its default precision, and DIOE's plan; and DIOE's partitions called bare, for its runtime overhead.
Each peer builds in a cache folder of its own (the two OpenVINO peers share one); inductor's caches too."""

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

ENGINES = ("torch", "inductor", "onnxruntime", "openvino-f32", "openvino-default", "dioe")
PEERS = ENGINES[:-1]


@dataclass(frozen=True)
class Built:
    """One engine, built: the callable to time, the precision it computes in, and for DIOE the plan it runs."""

    fn: Callable
    precision: str
    plan: Plan | None = None


def build(engine: str, model, inputs, captured, cache: Path) -> Built:
    """`engine` built for the model: its callable takes the model's positional inputs (torch, DIOE) or the captured
    graph's flat inputs (the compiled peers)."""
    from ..backend import Partition
    from ..pool import ResourcePool

    if engine == "torch":
        return Built(lambda *xs: model(*xs), "fp32")
    if engine == "dioe":
        from ..pipeline import optimize

        # the fp32 plan, beside the fp32 peers; lower precisions need their accuracy beside their latency
        opt = optimize(model, inputs, cache_dir=cache / "dioe", name=captured.name, precision="fp32")
        return Built(opt, "fp32", opt.plan)
    ref = ResourcePool.discover().reference
    part = Partition("whole", captured.gm, captured.example_inputs)
    if engine == "openvino-default":
        be = backends.get("openvino", cache / "peers" / "openvino")
        ov_model, _ = be.convert(part)
        compiled = be.core.compile_model(ov_model, "CPU", {"PERFORMANCE_HINT": "LATENCY"})
        req = compiled.create_infer_request()
        order = [i for _, i in part.input_order([p.get_any_name() for p in compiled.inputs], renamed=True)]
        hint = compiled.get_property("INFERENCE_PRECISION_HINT")
        prec = {"f32": "fp32", "bf16": "bf16", "f16": "fp16"}.get(getattr(hint, "get_type_name", lambda: str(hint))(),
                                                                   str(hint))

        def run(*xs):
            res = req.infer([xs[i].contiguous().numpy() for i in order], share_inputs=True)
            return tuple(torch.from_numpy(v) for v in res.values())
        return Built(run, prec)
    name = {"openvino-f32": "openvino"}.get(engine, engine)
    with inductor_cache(cache / "peers" / "inductor") if engine == "inductor" else contextlib.nullcontext():
        c = backends.get(name, cache / "peers" / name).compile(part, ref, "fp32", alone=True)
    if engine == "onnxruntime":
        return Built(public_onnxruntime(c.fn.session, part), "fp32")
    return Built(c, "fp32")


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
