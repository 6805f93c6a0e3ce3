"""ONNX Runtime: the partition exported with torch's dynamo ONNX exporter, run by an InferenceSession with the
member descriptor's execution providers, fed torch memory without copies: numpy views on the CPU, IO binding on
other devices.

int8 is ONNX Runtime's own post-training quantization of that export, following its guidance: dynamic (int8
weights, activations quantized per call) for a partition without convolutions, static QDQ (u8 activations, s8
weights per channel, MinMax ranges from calibration data) for one with them. What runs in int8 is read back from
the session's own graph after its fusions, where a QDQ pair it could not fuse leaves a float op."""

from __future__ import annotations

import collections
import functools
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch

from ..backend import Backend, Built, Partition, decomposes, functional_variant, host_view, quiet, write_atomically
from ..cache import reuse
from ..errors import BackendError
from ..masking import guarded_partition
from ..pool import Member
from ..quantization import Calibration, CalibrationKey, applied, artifact_key, missing, u8s8_saturates

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
       torch.int32: np.int32, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}


class OnnxruntimeBackend(Backend):
    name = "onnxruntime"
    requires = ("onnxruntime", "onnx", "onnxscript")
    extra = "onnx"
    # The CPU provider has no bf16 kernels (microsoft/onnxruntime issue 19937); int8 is quantized here.
    precisions = ("fp32", "int8")
    call_overhead_us = 10.5
    color = "#8a5cc7"
    guards_masked_attention = True  # a fully padded sample: the mean of the values, not 0
    options = frozenset({"providers", "disable_cpu_ep_fallback"})

    def op_support(self):
        from torch.fx.passes.operator_support import create_op_support

        registry = _export_registry()  # the table the export will use: one build serves both

        def ok(_submodules, node) -> bool:
            t = node.target
            if not isinstance(t, torch._ops.OpOverload):
                return True  # getitem and friends
            twin = functional_variant(t)
            return any(op is not None and (registry.is_registered(op) or decomposes(op)) for op in (t, twin))
        return create_op_support(ok)

    def providers(self, member: Member) -> tuple[list, bool]:
        import onnxruntime as ort

        spec = member.descriptor.backend(self.name)
        if member.stand_in or spec is None:
            return [("CPUExecutionProvider", {})], False
        wanted = [(p.name, dict(p.options)) for p in spec.options.providers]
        have = set(ort.get_available_providers())
        missing = [n for n, _ in wanted if n not in have]
        if missing:
            raise BackendError(f"member {member.id}: execution provider(s) {', '.join(missing)} are not in this "
                               f"onnxruntime build (it has {', '.join(sorted(have))}); install the matching "
                               "onnxruntime package (onnxruntime-gpu, onnxruntime-openvino, ...)")
        return wanted, spec.options.disable_cpu_ep_fallback

    def export(self, part: Partition) -> Path:
        part = guarded_partition(part)  # what the export computes on a fully padded sample: torch's zeros
        path = onnx_file(self.cache_dir, part)
        if reuse(path, "ONNX export"):
            return path
        with _quiet():
            program = _onnx_export(part.gm, tuple(part.example_inputs), list(part.input_names))
        # Weights go to a side file, written as raw bytes: protobuf-serialising them took 3.6 s of bert-base's
        # 8 s export, raw 1.9 s.
        return write_atomically(self.cache_dir, path.name, lambda p: program.save(str(p), external_data=True))

    def quantize(self, part: Partition, src: Path, calibration: Calibration | None) -> tuple[Path, dict]:
        """`part`'s int8 model, quantized from its export `src` or read from the cache, and how it was built.
        Keyed by the recipe and, for static quantization, the calibration data."""
        import onnxruntime as ort

        static = _convolves(part)
        if static and calibration is None:
            raise BackendError(f"partition {part.id}: int8 with ONNX Runtime quantizes a partition with "
                               "convolutions statically (QDQ), which needs calibration data: pass "
                               "calibration=[input tuples shaped like its example inputs]")
        # u8 x s8 products saturate on an x86 CPU without VNNI: 7-bit weights there (ONNX Runtime's advice)
        reduce_range = u8s8_saturates()
        recipe = (f"onnxruntime {ort.__version__} "
                  + ("static QDQ u8 activations s8 weights per-channel MinMax" if static
                     else "dynamic s8 weights per-channel") + f" reduce_range={reduce_range}")
        keyed = isinstance(calibration, CalibrationKey)
        notes = {"recipe": recipe, "calibration_samples": len(calibration) if static and not keyed else 0}
        path = self.cache_dir / f"{part.digest}.{artifact_key('int8', recipe, calibration if static else None)}.onnx"
        if reuse(path, "int8 ONNX model"):
            return path, notes
        if static and keyed:
            raise missing(part, calibration, "ONNX Runtime")

        def save(out: Path):
            from onnxruntime.quantization import (CalibrationMethod, QuantFormat, QuantType, quantize_dynamic,
                                                  quantize_static)

            model = _preprocessed(part, src, out.parent / "pre.onnx")
            with quiet("", *_LOGGERS):  # the quantizer warns per tensor it skips, on the root logger
                if static:
                    quantize_static(str(model), str(out), _feeds(part, model, calibration),
                                    quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce_range,
                                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                                    calibrate_method=CalibrationMethod.MinMax, use_external_data_format=True)
                else:
                    import onnx

                    # from the pre-processed scratch file where no Gemm is rewritten: the quantizer copies a model
                    # handed over in memory through a temporary file first (bert-base: 436 MB written and read
                    # again, 3.4 s). Never from the cached export itself: the quantizer writes beside its input.
                    if model == src or any(n.op_type == "Gemm" for n in
                                           onnx.load(str(model), load_external_data=False).graph.node):
                        model = onnx.load(str(model))
                        _gemm_as_matmul(model)
                    quantize_dynamic(model if isinstance(model, onnx.ModelProto) else str(model), str(out),
                                     weight_type=QuantType.QInt8, per_channel=True, reduce_range=reduce_range,
                                     use_external_data_format=True)
        return write_atomically(self.cache_dir, path.name, save), notes

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency",
                   alone: bool = False, calibration: Calibration | None = None):
        import onnxruntime as ort

        path = self.export(part)
        notes: dict = {}
        if precision == "int8":
            path, notes = self.quantize(part, path, calibration)
        providers, no_fallback = self.providers(member)
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads(member)
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        # ORT's workers spin after a run, by default. Alone, that is worth keeping: with it, whole mobilenetv2
        # and minilm ran 19-22% faster at batch 1 and tiny-bert at batch 8 35%. In a plan of several partitions
        # the next one (often another engine) needs those cores at once.
        so.add_session_config_entry("session.intra_op.allow_spinning", "1" if alone else "0")
        if no_fallback:
            so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
        if precision != "int8":
            sess = ort.InferenceSession(str(path), so, providers=providers)
            # ONNX Runtime lowers no float op by itself on the CPU; other providers may (TF32, TensorRT's fp16)
            # and do not say so
            ran = "fp32" if sess.get_providers() == ["CPUExecutionProvider"] else ""
        else:
            sess, ran, counts = _session_read_back(path, so, providers)
            notes.update(counts)
            if ran == "fp32":
                raise BackendError(f"partition {part.id}: ONNX Runtime quantized nothing ({notes['recipe']}): its "
                                   f"session runs {counts['float_ops']} float matmul/conv ops and no int8 one")
        run = _bound_runner(sess, part, self.io_device(member))
        run.session = sess  # for whoever needs to see what was built: its providers, its options
        return Built(run, str(path), ran, notes)


# Heavy ops in a session's graph after its fusions: quantized, and left in float.
_INT8_OPS = frozenset({"QLinearConv", "QLinearMatMul", "QGemm", "MatMulInteger", "MatMulIntegerToFloat",
                       "DynamicQuantizeMatMul", "ConvInteger", "QAttention", "QLinearConvTranspose",
                       "DynamicQuantizeLSTM"})
_FLOAT_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm", "FusedConv", "FusedMatMul", "FusedGemm",
                        "NhwcFusedConv", "Attention", "MultiHeadAttention", "LSTM", "GRU", "RNN"})
_QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear"})


def _session_read_back(path: Path, so, providers) -> tuple:
    """A session for the int8 model at `path`, with what it runs: its graph after its own fusions, saved once as
    it is built (graph only; weights to a side file) and counted. Returns (session, applied, counts)."""
    import onnx
    import onnxruntime as ort

    scratch = Path(tempfile.mkdtemp(prefix="dioe-ort-"))
    try:
        so.optimized_model_filepath = str(scratch / "session.onnx")
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "weights.bin")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        sess = ort.InferenceSession(str(path), so, providers=providers)
        ops = collections.Counter(n.op_type for n in onnx.load(str(scratch / "session.onnx"),
                                                                   load_external_data=False).graph.node)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    int8 = {k: v for k, v in ops.items() if k in _INT8_OPS}
    kept = {k: v for k, v in ops.items() if k in _FLOAT_OPS}
    counts = {"quantized_ops": sum(int8.values()), "float_ops": sum(kept.values()),
              "qdq_ops": sum(v for k, v in ops.items() if k in _QDQ_OPS), "quantized_op_types": int8,
              "float_op_types": kept}
    return sess, applied("int8", "fp32", lowered=counts["quantized_ops"], kept=counts["float_ops"]), counts


def _convolves(part: Partition) -> bool:
    return part.calls("convolution", "conv1d", "conv2d", "conv3d", "conv_transpose")


def _preprocessed(part: Partition, src: Path, out: Path) -> Path:
    """`src` after ONNX Runtime's quantization pre-processing (shape inference, then its basic graph
    optimizations), which its quantizer asks for; `src` itself, loudly, where that fails. The export's shapes are
    static, so ONNX's own shape inference knows them all: ONNX Runtime's symbolic one, meant for dynamic shapes,
    is skipped (it failed on bert-base's export, after 4-8 s, and the model was then quantized without the
    optimizations)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with quiet("", *_LOGGERS):
            quant_pre_process(str(src), str(out), skip_symbolic_shape=True, save_as_external_data=True,
                              all_tensors_to_one_file=True, external_data_location=f"{out.name}.data")
        return out
    except Exception as e:
        warnings.warn(f"dioe: ONNX Runtime's quantization pre-processing failed on partition {part.id} "
                      f"({type(e).__name__}: {str(e)[:200]}); quantizing its export as it is, where some ops may "
                      "stay float", RuntimeWarning)
        return src


def _feeds(part: Partition, model: Path, calibration: Calibration):
    """ONNX Runtime's calibration reader over `calibration`, fed by input name."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader

    graph = onnx.load(str(model), load_external_data=False).graph
    weights = {i.name for i in graph.initializer}
    order = part.input_order([i.name for i in graph.input if i.name not in weights])

    class Feeds(CalibrationDataReader):
        def __init__(self):
            self.samples = iter(calibration)

        def get_next(self):
            sample = next(self.samples, None)
            return None if sample is None else {name: host_view(sample[i]) for name, i in order}

        def __len__(self):
            return len(calibration)
    return Feeds()


def _gemm_as_matmul(model) -> int:
    """Rewrite each Gemm with constant weights (a linear layer on 2-D input) as MatMul then Add, in place, and
    return how many. ONNX Runtime's dynamic quantizer has no entry for Gemm (its IntegerOps cover MatMul, Conv,
    Attention, Gather, ...): tiny-mlp's five linear layers, all Gemm, stayed fp32. Done after pre-processing,
    whose basic optimizations fuse MatMul + Add on 2-D input back into Gemm."""
    from onnx import helper, numpy_helper

    weights = {i.name: i for i in model.graph.initializer}
    nodes, rewritten = [], 0
    for node in model.graph.node:
        a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
        if (node.op_type != "Gemm" or node.input[1] not in weights or a.get("transA", 0)
                or a.get("alpha", 1.0) != 1.0 or a.get("beta", 1.0) != 1.0):
            nodes.append(node)
            continue
        b = node.input[1]
        if a.get("transB", 0):
            t = numpy_helper.from_array(np.ascontiguousarray(numpy_helper.to_array(weights[b]).T), f"{b}.T")
            if t.name not in weights:
                model.graph.initializer.append(t)
                weights[t.name] = t
            b = t.name
        bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}.matmul" if bias else node.output[0]
        nodes.append(helper.make_node("MatMul", [node.input[0], b], [product], name=f"{node.name}.matmul"))
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [node.output[0]], name=f"{node.name}.bias"))
        rewritten += 1
    if rewritten:
        used = {i for n in nodes for i in n.input}
        del model.graph.node[:]
        model.graph.node.extend(nodes)
        kept = [w for w in model.graph.initializer if w.name in used or w.name in {o.name for o in model.graph.output}]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return rewritten


def _bound_runner(sess, part: Partition, device: str):
    """A callable feeding torch tensors to `sess` without copies and returning its outputs as torch tensors."""
    feed = part.input_order([x.name for x in sess.get_inputs()])
    out_names = [o.name for o in sess.get_outputs()]
    specs = part.output_specs
    static = all(s is not None and not isinstance(s, tuple) and all(isinstance(d, int) for d in s.shape)
                 and s.torch_dtype in _NP for s in specs)
    dev = torch.device(device)
    dev_type, dev_id = dev.type, dev.index or 0
    numpy_io = all(x.dtype in _NP for x in part.example_inputs if isinstance(x, torch.Tensor))
    if dev_type == "cpu" and numpy_io:
        # On the CPU, numpy views of the inputs and ONNX Runtime's own output arrays are copy-free too, and cost
        # 11 us a call against IO binding's 19 us (an 8-op MLP): a binding is rebuilt and every buffer bound on
        # each call. Inputs are on the CPU already (the contract of io_device), and so are the outputs.
        session_run = _session_run(sess)
        from_numpy = torch.from_numpy

        def run_cpu(*inputs):
            return tuple([from_numpy(o) for o in session_run(out_names, {name: host_view(inputs[i])
                                                                         for name, i in feed})])
        return run_cpu
    if not static:  # outputs of unknown shape, on any other device: through host memory
        def run_plain(*inputs):
            outs = sess.run(out_names, {name: host_view(inputs[i].cpu()) for name, i in feed})
            return tuple(torch.from_numpy(o).to(dev) for o in outs)
        return run_plain

    shapes = [(list(s.shape), s.torch_dtype) for s in specs]

    def run(*inputs):
        binding = sess.io_binding()
        keep = []
        for name, i in feed:
            x = inputs[i].contiguous()
            keep.append(x)
            binding.bind_input(name, dev_type, dev_id, _NP[x.dtype], list(x.shape), x.data_ptr())
        outs = [torch.empty(shape, dtype=dtype, device=dev) for shape, dtype in shapes]
        for name, o in zip(out_names, outs):
            binding.bind_output(name, dev_type, dev_id, _NP[o.dtype], list(o.shape), o.data_ptr())
        sess.run_with_iobinding(binding)
        return tuple(outs)
    return run


def _session_run(sess):
    """`run(output_names, feed)` of the session's C++ object, below InferenceSession.run's Python checks: that
    every graph input is fed (true here by construction), that no OrtValue in the feed belongs to another session
    (the feed holds numpy arrays only), and a retry on the CPU provider when another provider fails. Called
    alternately with the public method on one session, tiny-mlp's call took 24.4 us against 30.0 (the median of
    4000 pairs differed by 5.4 us). The public method for a session with other providers than the CPU's (its
    retry is worth keeping), where the inner object is missing, or where its call does not take these arguments
    (it is not public API)."""
    inner = getattr(sess, "_sess", None)
    if sess.get_providers() != ["CPUExecutionProvider"] or not callable(getattr(inner, "run", None)):
        return sess.run

    def run(output_names, feed):
        try:
            return inner.run(output_names, feed, None)
        except TypeError:  # another ONNX Runtime's inner signature: the public method, which knows it
            return sess.run(output_names, feed)
    return run


def onnx_file(cache_dir: Path, part: Partition) -> Path:
    """Where this backend keeps `part`'s ONNX export in its cache folder: written whole, or not at all. The
    OpenVINO backend reads it from there too, when it is there."""
    return cache_dir / f"{part.digest}.onnx"


@functools.cache
def _torchlib_registry(opset: int | None = None):
    """torch's table of ONNX translations, built once per opset: building it takes a second."""
    from torch.onnx._internal.exporter import _registration

    with _quiet():
        return (_registration.ONNXRegistry.from_torchlib() if opset is None
                else _registration.ONNXRegistry.from_torchlib(opset_version=opset))


def _export_registry():
    """The translation table `_onnx_export` exports with: at the exporter's opset or the table's floor,
    whichever is higher; torchlib's default where the exporter's internals are not the expected ones."""
    found = _exporter()
    return _torchlib_registry(max(found[1], found[2]) if found else None)


@functools.cache
def _exporter():
    """torch's exporter function under torch.onnx.export and the opsets that function uses (its own, and the
    table's floor), when the function takes a prepared table; else None."""
    try:
        import inspect

        from torch.onnx import _constants as public
        from torch.onnx._internal.exporter import _constants, _core

        wanted = {"registry", "input_names", "optimize", "opset_version", "verbose"}
        if wanted <= set(inspect.signature(_core.export).parameters):
            return _core.export, public.ONNX_DEFAULT_OPSET, _constants.TORCHLIB_OPSET
    except (ImportError, AttributeError, ValueError, TypeError):
        pass
    return None


def _onnx_export(gm, args: tuple, names: list[str]):
    """torch.onnx.export(gm, args, dynamo=True) with the same opset and translation table, built once per process
    (the public function rebuilds the table on every call, 1.15 s of a small partition's 1.8 s export, and a
    profile exports one partition per distinct segment), then `_light_passes`. Where torch's exporter internals
    are not the ones this was written against, the public function runs instead, with its full optimizer."""
    found = _exporter()
    # Under no_grad: a captured graph's weights are inference tensors, which the exporter's first capture,
    # torch.export(strict=False), refuses to trace with grad on; it then fell back to a strict (dynamo) export,
    # 2.7 s a segment on resnet50 where the non-strict one takes 0.1 s.
    with torch.no_grad():
        if found is None:
            return torch.onnx.export(gm, args, dynamo=True, input_names=names, optimize=True, verbose=False)
        export, opset, _ = found
        program = export(gm, args, None, registry=_export_registry(), input_names=names, optimize=False,
                         verbose=False, opset_version=opset)
    passes = _light_passes()
    if passes is None:
        program.optimize()
    else:
        passes(program.model)
    return program


@functools.cache
def _light_passes():
    """onnxscript's optimizer without its pattern-rewrite rules: inline, fold constants, drop what is unused,
    lift constants to initializers, merge duplicates. The rewrite rules matched tens of thousands of candidate
    sites on bert-base and took 3 s of its 10.6 s whole-graph export (9 of 17 s on gpt2), and both engines
    fuse those patterns themselves: exported either way, bert-base, gpt2 and mobilenetv2 ran within noise of
    each other on ONNX Runtime and on OpenVINO. None where onnxscript lacks these passes."""
    try:
        import onnx_ir as ir
        import onnx_ir.passes.common as common
        from onnxscript.optimizer import fold_constants

        class FoldConstants(ir.passes.InPlacePass):
            def call(self, model):
                fold_constants(model)
                return ir.passes.PassResult(model, modified=True)

        return ir.passes.Sequential(
            common.InlinePass(), FoldConstants(), common.RemoveUnusedNodesPass(), common.RemoveUnusedFunctionsPass(),
            common.RemoveUnusedOpsetsPass(), common.LiftConstantsToInitializersPass(lift_all_constants=True,
                                                                                   size_limit=0),
            common.DeduplicateInitializersPass(), common.CommonSubexpressionEliminationPass(),
            common.OutputFixPass(), common.NameFixPass())
    except (ImportError, AttributeError, TypeError):
        return None


_LOGGERS = ("torch.onnx", "torch.onnx._internal.exporter._registration", "onnxscript", "onnx_ir",
            "onnxscript.optimizer")


def _quiet():
    """The exporter prints progress and warns about torchvision ops; DIOE reports what matters itself."""
    return quiet(*_LOGGERS)
