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
Converting bert-base that way took 4.9 s against 2.4.

bf16 and fp16 are OpenVINO's inference-precision hint; a hint, so the precision is read back from the compiled
model, and a CPU without bf16 (an AVX2 one: OpenVINO neither refuses nor emulates there, it runs f32 and reports
f32) is an error, not a silent fp32 run. int8 is NNCF post-training quantization of the converted model,
calibrated on the caller's inputs; what runs in int8 is read back from the compiled model's runtime graph."""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import json
import signal
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
import weakref
from pathlib import Path

import torch

from .. import cores
from ..backend import Backend, Built, Partition, decomposes, host_view, write_atomically
from ..cache import reuse, touch
from ..errors import BackendError
from ..files import private_dir, write_text
from ..integrity import check_folder, mark, seal_folder
from ..masking import guarded_partition
from ..pool import Member
from ..quantization import (Calibration, CalibrationKey, applied, artifact_key, check_calibration, missing,
                            u8s8_saturates)
from ..settings import openvino_telemetry

_HINT = {"fp32": "f32", "bf16": "bf16", "fp16": "f16"}
_PRECISION = {v: k for k, v in _HINT.items()}
# Runtime layers that do the heavy work, by the CPU plugin's names: their runtime precision is what "int8" means.
_HEAVY = frozenset({"FullyConnected", "Convolution", "GroupConvolution", "Deconvolution", "MatMul",
                    "ScaledDotProductAttention", "ScaledDotProductAttentionWithKVCache", "RNNSeq", "RNNCell"})
# The same ops in the model before the plugin compiles it, by OpenVINO's op type names.
_HEAVY_MODEL = frozenset({"MatMul", "Convolution", "GroupConvolution", "ConvolutionBackpropData",
                          "GroupConvolutionBackpropData", "ScaledDotProductAttention"})
_CONVERTING = threading.Lock()
_BLOB_FOLDERS = threading.Lock()
_BLOB_LOCKS: dict[str, threading.Lock] = {}  # blob folder -> the lock held from its check to its seal
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
    precisions = ("fp32", "bf16", "fp16", "int8")
    call_overhead_us = 75.0
    color = "#2e9d6b"
    guards_masked_attention = True  # a fully padded sample: NaN, not 0
    options = frozenset({"device", "config"})

    def __init__(self, cache_dir=None):
        super().__init__(cache_dir)
        self._core = None
        self._pending: dict[str, _NncfChild] = {}   # int8 IR path -> NNCF running for it (`prepare`)
        self._pending_lock = threading.Lock()      # one instance serves every optimize in the process

    @property
    def core(self):
        if self._core is None:
            import openvino as ov

            self._core = ov.Core()
            mark(self.cache_dir.parent)
        return self._core

    def blob_folder(self, xml: str):
        """OpenVINO's own compiled-blob cache (its CACHE_DIR) for the model at `xml`: a folder per IR, so that
        the blobs checked before a compile are only those it may load. OpenVINO writes its blobs with the
        process's umask: an owner-only folder keeps them the owner's."""
        blobs = private_dir(self.cache_dir / "blobs")
        return private_dir(blobs / Path(xml).name.removesuffix(".xml"))

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

        part = guarded_partition(part)  # what the model computes on a fully padded sample: torch's zeros
        attention = has_attention(part)
        from .onnxruntime import OnnxruntimeBackend, onnx_file

        onnx = onnx_file(self.cache_dir.parent / OnnxruntimeBackend.name, part)

        def from_onnx():
            with _converting():
                return ov.convert_model(str(onnx))

        def from_torch():
            # plain copies of the examples: a segment's inputs were recorded under inference mode, and OpenVINO's
            # frontend re-runs the program outside it, where an in-place op on one (a residual add_) is refused
            args = tuple(x.clone() if isinstance(x, torch.Tensor) and x.is_inference() else x
                         for x in part.example_inputs)
            with torch.no_grad():
                ep = torch.export.export(part.gm, args, strict=False)
            with _converting():
                return ov.convert_model(ep)
        # the preferred frontend first; an op one frontend lacks, the other may have. Each one's conversion is
        # cached under its own name, read back in the same order.
        # an ONNX file is read only when intact: a damaged one would be converted, and sealed, as it is
        have_onnx = reuse(onnx, "ONNX export")
        routes = [("torch", from_torch), ("onnx", from_onnx)]
        if not attention and have_onnx:
            routes.reverse()
        for frontend, _ in routes:
            xml = self.cache_dir / f"{part.digest}.{frontend}.xml"
            if reuse(xml, "OpenVINO IR"):
                return self.core.read_model(str(xml)), str(xml)
        failed: list[Exception] = []
        for frontend, route in routes:
            if route is from_onnx and not have_onnx:
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
        xml = write_atomically(self.cache_dir, f"{part.digest}.{frontend}.xml",
                               lambda p: ov.save_model(model, str(p), compress_to_fp16=False))  # fp32 stays fp32
        return model, str(xml)

    def prepare(self, part: Partition, member: Member, precision: str = "fp32", *, calibration=None) -> str | None:
        """int8: start NNCF on `part` in its own process now; `quantize` collects it. NNCF spends its time in
        OpenVINO's inference and in its own graph work, and the candidates built meanwhile overlap it. The token
        is the int8 IR's path."""
        if precision != "int8" or calibration is None or isinstance(calibration, CalibrationKey):
            return None
        try:
            part = guarded_partition(part)  # as `compile` hands it over
            xml, job, _ = self._nncf_job(part, member, check_calibration(part, calibration))
            if job is None:
                return None
            with self._pending_lock:
                if str(xml) not in self._pending:
                    self._pending[str(xml)] = _NncfChild(part, *job)
            return str(xml)
        except Exception:  # noqa: BLE001 - compile meets the same failure and reports it
            return None

    def release_prepared(self, token: str) -> None:
        with self._pending_lock:
            child = self._pending.pop(token, None)
        if child is not None:
            child.close()

    def _nncf_job(self, part: Partition, member: Member, calibration: Calibration | CalibrationKey | None):
        """The path of `part`'s int8 IR, with NNCF's job and samples for building it, or None where the cache has
        it (or, `calibration` being a key, where it cannot be built); and how it is built (`notes`)."""
        if calibration is None:
            raise BackendError(f"partition {part.id}: int8 with OpenVINO is NNCF post-training quantization, "
                               "which needs calibration data: pass calibration=[input tuples shaped like its "
                               "example inputs]")
        import nncf

        device = self.ov_device(member).split(".")[0]
        target = getattr(nncf.TargetDevice, device, nncf.TargetDevice.ANY)
        # SmoothQuant and symmetric activation x activation matmuls: NNCF's settings for transformers
        transformer = has_attention(part) or (part.calls("softmax") and part.calls("matmul", "bmm"))
        model_type = nncf.ModelType.TRANSFORMER if transformer else None
        advanced = {"overflow_fix": False, "smooth_quant_off": False}
        if device == "CPU" and u8s8_saturates():
            # NNCF's default fixes saturation on the first layer only; a CPU without VNNI needs it on every
            # one. It quantizes weights to 7 bits, and SmoothQuant (which moves activation outliers into the
            # weights) then costs more than it saves: without it, tiny-bert's worst pooler cosine over 16
            # inputs rose from 0.976 to 0.999, minilm's on padded sentences from 0.62 to 0.85 (and moved
            # 0.981 -> 0.977 on unpadded random tokens).
            advanced["overflow_fix"] = True
            advanced["smooth_quant_off"] = transformer
        recipe = (f"nncf {nncf.__version__} model_type={model_type.value if model_type else 'default'} "
                  f"target={target.value} overflow_fix={'enable' if advanced['overflow_fix'] else 'default'} "
                  f"smooth_quant={'off' if advanced['smooth_quant_off'] else 'default'}")
        keyed = isinstance(calibration, CalibrationKey)
        notes = {"recipe": recipe, "calibration_samples": 0 if keyed else len(calibration)}
        xml = self.cache_dir / f"{part.digest}.{artifact_key('int8', recipe, calibration)}.xml"
        if reuse(xml, "int8 OpenVINO IR"):
            return xml, None, notes
        if keyed:
            raise missing(part, calibration, "OpenVINO")
        model, fp32_xml = self.convert(part)
        order = [i for _, i in part.input_order([p.get_any_name() for p in model.inputs], renamed=True)]
        samples = [[host_view(sample[i]) for i in order] for sample in calibration]
        job = {"model": fp32_xml, "model_type": model_type.value if model_type else None, "target": target.value,
               **advanced}
        return xml, (job, samples), notes

    def quantize(self, part: Partition, member: Member, calibration: Calibration | None):
        """`part`'s converted model quantized to int8 by NNCF (collected from `prepare` where it started it), or
        read from the cache, with its IR's path and how it was built. Keyed by the recipe and the calibration
        data."""
        xml, job, notes = self._nncf_job(part, member, calibration)
        with self._pending_lock:
            child = self._pending.pop(str(xml), None)
        if job is None and child is not None:   # another build cached it meanwhile
            child.close()
        elif job is not None:
            child = child or _NncfChild(part, *job)
            try:
                write_atomically(self.cache_dir, xml.name, child.collect)
            finally:
                child.close()
        return self.core.read_model(str(xml)), str(xml), notes

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency",
                   alone: bool = False, calibration: Calibration | None = None):
        notes: dict = {}
        if precision == "int8":
            model, xml, notes = self.quantize(part, member, calibration)
        else:
            model, xml = self.convert(part)
        device = self.ov_device(member)
        # int8: the ops NNCF left in float (softmax, normalization, attention) run in f32, the accurate choice
        config = {"INFERENCE_PRECISION_HINT": _HINT["fp32" if precision == "int8" else precision],
                  "PERFORMANCE_HINT": "THROUGHPUT" if objective == "throughput" else "LATENCY"}
        if device.startswith("CPU"):
            config["INFERENCE_NUM_THREADS"] = self.threads(member)
            if self.threads(member) < cores.usable_cores():
                # OpenVINO pins its threads to the first cores of the process's mask: two processes each given
                # a share of the cores (Ray replicas with one thread each) would all run on core 0, at half speed
                config["ENABLE_CPU_PINNING"] = False
        spec = member.descriptor.backend(self.name)
        if spec:
            config.update({k: v for k, v in spec.options.config.items()})
        blobs = self.blob_folder(xml)
        # OpenVINO compiles again over a truncated blob but loads one with flipped weights and runs them: each
        # blob is sealed once written, and one that no longer matches its seal is deleted before OpenVINO looks
        with _blob_lock(blobs):
            check_folder(blobs, "OpenVINO compiled blob")
            compiled = self.core.compile_model(model, device, {"CACHE_DIR": str(blobs), **config})
            _owner_only(blobs)
            seal_folder(blobs)
        touch(blobs)  # OpenVINO does not touch a blob it reuses: the folder's time says when it was last used
        if device.startswith("CPU"):
            notes["cpu_pinning"] = bool(compiled.get_property("ENABLE_CPU_PINNING"))   # read back, not assumed
        ran = _float_precision(compiled)
        if precision in ("bf16", "fp16") and ran != precision:
            caps = self.core.get_property(device, "OPTIMIZATION_CAPABILITIES")
            why = (f"member {member.id}'s descriptor sets INFERENCE_PRECISION_HINT" if spec and
                   "INFERENCE_PRECISION_HINT" in spec.options.config else f"this device has no {precision} support")
            raise BackendError(f"partition {part.id}: OpenVINO on {device} was asked for {precision} and runs "
                               f"{ran} (its inference precision read back; {device} lists "
                               f"{', '.join(map(str, caps))}): {why}")
        if precision == "int8":
            notes.update(_int8_counts(compiled, model))
            ran = applied("int8", ran, lowered=notes["quantized_ops"], kept=notes["float_ops"])
            if not notes["quantized_ops"]:
                raise BackendError(f"partition {part.id}: NNCF quantized nothing that OpenVINO runs in int8 on "
                                   f"{device} ({notes['recipe']}; {notes['fake_quantize']} FakeQuantize ops in "
                                   f"the model, {notes['float_ops']} float matmul/conv layers run)")
        order = [i for _, i in part.input_order([p.get_any_name() for p in compiled.inputs], renamed=True)]
        local = threading.local()  # an infer request per calling thread, reused across calls

        def run(*xs):
            req = getattr(local, "req", None)
            if req is None:
                req = local.req = compiled.create_infer_request()
            res = req.infer([host_view(xs[i]) for i in order], share_inputs=True)
            return tuple(torch.from_numpy(v) for v in res.values())
        return Built(run, xml, ran, notes)


def _blob_lock(folder) -> threading.Lock:
    """One compile at a time per blob folder in this process, so that no thread deletes as unsealed a blob that
    another has just written and not yet sealed."""
    with _BLOB_FOLDERS:
        return _BLOB_LOCKS.setdefault(str(folder), threading.Lock())


def _owner_only(folder) -> None:
    """OpenVINO writes its compiled blobs itself, readable by the group (0440): take the group's and others' bits
    away, as DIOE's own files have none, and keep the owner's (read-only, as OpenVINO made them)."""
    for blob in folder.iterdir() if folder.is_dir() else ():
        try:
            mode = blob.stat().st_mode
            if blob.is_file() and mode & 0o077:
                blob.chmod(mode & 0o700)
        except OSError:
            pass  # removed meanwhile, or another user's shared cache: it is read as it is


def _float_precision(compiled) -> str:
    """The precision a compiled model runs its float ops in, as the plugin reports it ("fp32", "bf16", "fp16")."""
    got = compiled.get_property("INFERENCE_PRECISION_HINT")
    name = got.to_string() if hasattr(got, "to_string") else str(got)
    return _PRECISION.get(name, name)


def _int8_counts(compiled, model) -> dict:
    """How many heavy layers the compiled model runs in int8 and how many in float, from its runtime graph (each
    layer's runtime precision), with the types of the int8 ones and the FakeQuantize ops NNCF put in `model`.
    Where a device's runtime graph does not say, the FakeQuantize ops stand for what is quantized."""
    int8, kept, said = collections.Counter(), collections.Counter(), False
    # the model's own heavy ops by name: a Subgraph names the layers it fused, and on AVX-512 the CPU plugin fuses
    # whole chains of small int8 matmuls into one
    heavy = {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() in _HEAVY_MODEL}
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        if "layerType" not in info or "runtimePrecision" not in info:
            continue
        said = True
        layer, precision = info["layerType"].astype(str), info["runtimePrecision"].astype(str)
        n = 1
        if layer == "Subgraph":
            # A kernel the CPU plugin generated for fused ops: attention left in float lands in one (tiny-bert:
            # Transpose, Softmax and ScaledDotProductAttention), reported "u8" for its mask input while its
            # kernel, named in primitiveType ("jit_avx2_f32"), runs f32; on AVX-512, a chain of int8 matmuls
            # ("jit_avx512_i8"). It counts as many heavy layers as it fused.
            names = info["originalLayersNames"].astype(str)
            n = sum(x in heavy for x in names.split(","))
            if not n and not any(k in names for k in ("MatMul", "DotProductAttention")):
                continue
            precision = info["primitiveType"].astype(str).rsplit("_", 1)[-1].lower()
        elif layer not in _HEAVY:
            continue
        (int8 if precision in ("i8", "u8") else kept)[layer] += max(n, 1)
    fq = sum(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    counts = {"quantized_ops": sum(int8.values()), "float_ops": sum(kept.values()), "quantized_op_types": dict(int8),
              "float_op_types": dict(kept), "fake_quantize": fq}
    if not said:
        counts.update(quantized_ops=fq, read_from="the model's FakeQuantize ops: the runtime graph has no precisions")
    return counts


def has_attention(part: Partition) -> bool:
    """Whether the partition calls one of aten's scaled-dot-product attention ops (the math one, or a fused
    kernel's op, as torch.export leaves them): the PyTorch frontend converts it to one fused op."""
    return part.calls("scaled_dot_product")


# NNCF calibrates on a few hundred samples at most: minutes even for a large model on a small CPU. A child still
# running after this long is stuck, and would hold `optimize` (or a live model's background thread) with it.
NNCF_TIMEOUT_S = 1800


class _NncfChild:
    """NNCF run on `job` (the fp32 IR and NNCF's settings) with `samples` in a child process (`dioe.nncf_worker`),
    started at once; `collect(out)` waits for it and moves the int8 IR it wrote to `out`. NNCF compiles the model
    to collect statistics, and OpenVINO can crash the process there: a child that dies costs this partition its
    int8 candidate, with the reason, and nothing else. `close()` stops it and removes its scratch folder."""

    def __init__(self, part: Partition, job: dict, samples: list):
        self.part_id = part.id
        self.tmp = Path(tempfile.mkdtemp(prefix="dioe-nncf."))  # owner-only where the OS has modes
        self.out = self.tmp / "int8.xml"
        self.started = time.monotonic()
        try:
            self._start(job, samples)
        except BaseException:   # the samples written so far are the caller's data: none stays behind
            shutil.rmtree(self.tmp, ignore_errors=True)
            raise
        # a child nobody collects (its optimize failed on the way) is stopped at the latest when this process ends
        self._stop = weakref.finalize(self, _stop_child, self.proc, self.log, self.tmp)

    def _start(self, job: dict, samples: list) -> None:
        import numpy as np

        files = []
        for k, sample in enumerate(samples):
            files.append([])
            for j, x in enumerate(sample):
                path = self.tmp / f"s{k}.{j}.npy"
                np.save(path, np.ascontiguousarray(x), allow_pickle=False)
                files[-1].append(str(path))
        job_file = self.tmp / "job.json"
        write_text(job_file, json.dumps({**job, "samples": files, "out": str(self.out)}))
        worker = importlib.util.find_spec("dioe.nncf_worker").origin
        # its words go to a file: a pipe nobody reads while the caller builds other things would fill and stall it
        self.log = open(self.tmp / "child.log", "w+", encoding="utf-8")
        try:
            # run as a file, from the scratch folder: neither dioe's folder nor the caller's is on the child's path
            self.proc = subprocess.Popen([sys.executable, "-c", "import runpy, sys; sys.argv = sys.argv[1:]; "
                                          "runpy.run_path(sys.argv[0], run_name='__main__')", worker, str(job_file)],
                                         cwd=self.tmp, stdout=self.log, stderr=subprocess.STDOUT, text=True)
        except BaseException:
            self.log.close()
            raise

    def collect(self, out: Path) -> None:
        try:
            rc = self.proc.wait(timeout=max(1.0, NNCF_TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            raise BackendError(f"partition {self.part_id}: NNCF's int8 quantization did not finish in its own "
                               f"process within {NNCF_TIMEOUT_S} s; this partition has no OpenVINO int8 "
                               "candidate") from None
        if rc != 0:
            how = f"killed by {signal.Signals(-rc).name}" if rc < 0 and -rc in signal.valid_signals() else \
                f"exit status {rc}"
            self.log.seek(0)
            last = " | ".join(line.strip() for line in self.log.read().strip().splitlines()[-3:]) or "no message"
            raise BackendError(f"partition {self.part_id}: NNCF's int8 quantization failed in its own process "
                               f"({how}; {last[:400]}); this partition has no OpenVINO int8 candidate")
        shutil.move(self.out.with_suffix(".bin"), out.with_suffix(".bin"))
        shutil.move(self.out, out)

    def close(self) -> None:
        self._stop()


def _stop_child(proc: subprocess.Popen, log, tmp: Path) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    log.close()
    shutil.rmtree(tmp, ignore_errors=True)
