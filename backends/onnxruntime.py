"""ONNX Runtime: the partition exported with torch's dynamo ONNX exporter, run by an InferenceSession with the
member descriptor's execution providers, fed torch memory without copies: numpy views on the CPU, IO binding on
other devices."""

from __future__ import annotations

import contextlib
import functools
import io
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..backend import Backend, Partition, decomposes, functional_variant, host_view
from ..cache import touch
from ..errors import BackendError
from ..pool import Member

_NP = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64, torch.int64: np.int64,
       torch.int32: np.int32, torch.int8: np.int8, torch.uint8: np.uint8, torch.bool: np.bool_}


class OnnxruntimeBackend(Backend):
    name = "onnxruntime"
    requires = ("onnxruntime", "onnx", "onnxscript")
    extra = "onnx"
    call_overhead_us = 10.5
    color = "#8a5cc7"
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
        path = onnx_file(self.cache_dir, part)
        if path.exists():
            touch(path)
            return path
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        with _quiet():
            program = _onnx_export(part.gm, tuple(part.example_inputs), list(part.input_names))
        # Weights go to a side file, written as raw bytes: protobuf-serialising them took 3.6 s of bert-base's
        # 8 s export, raw 1.9 s. Both files are written in a scratch folder and the model moved in last, so a
        # crash never leaves a model without its weights in the cache.
        scratch = Path(tempfile.mkdtemp(prefix=f"{part.digest}.", dir=self.cache_dir))
        try:
            program.save(str(scratch / path.name), external_data=True)
            for f in sorted(scratch.iterdir(), key=lambda f: f.name == path.name):
                f.replace(self.cache_dir / f.name)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return path

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency",
                   alone: bool = False):
        import onnxruntime as ort

        path = self.export(part)
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
        sess = ort.InferenceSession(str(path), so, providers=providers)
        run = _bound_runner(sess, part, self.io_device(member))
        run.session = sess  # for whoever needs to see what was built: its providers, its options
        return run, str(path)


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


@contextlib.contextmanager
def _quiet():
    """The exporter prints progress and warns about torchvision ops; DIOE reports what matters itself."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.onnx._internal.exporter._registration",
                                              "onnxscript", "onnx_ir", "onnxscript.optimizer")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)
