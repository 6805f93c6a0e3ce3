"""The small face every backend shows: which nodes it supports, compile a partition for a member, run it.

A backend lives in one file under `dioe/backends/` and subclasses `Backend`:

    class MyBackend(Backend):
        name = "mine"
        requires = ("mylib",)          # imported inside the file only; missing -> reported, not raised
        extra = "mine"                 # pip install 'dioe[mine]' brings it
        def compile_fn(self, part, member, precision, *, calibration=None, **_):
            ...                        # -> Built(callable(*tensors) -> tuple of tensors, artifact, applied)

    >>> from dioe.backends import get
    >>> get("torch").name
    'torch'
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import io
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Sequence

import torch
from torch import fx
from torch.fx.passes.operator_support import OperatorSupportBase, chain

from .capture import fetch_attr
from . import integrity
from .errors import BackendError
from .files import FILE_MODE, private_dir
from .masking import guarded_partition
from .pool import Member
from .quantization import Calibration, check_calibration
from .settings import env_cache_dir

Fn = Callable[..., tuple]


@dataclass(eq=False)
class Partition:
    """A piece of the graph to compile: a GraphModule from flat tensors to a tuple of tensors."""

    id: str
    gm: fx.GraphModule
    example_inputs: tuple

    @functools.cached_property
    def input_names(self) -> tuple[str, ...]:
        """The graph's placeholders, in the order its callables take their inputs."""
        return tuple(n.name for n in self.gm.graph.nodes if n.op == "placeholder")

    def input_order(self, engine_inputs: Sequence[str], *, renamed: bool = False) -> list[tuple[str, int]]:
        """For each input of an engine's compiled model, its name and the position of the partition's input it
        takes: the one of the same name. With `renamed` (a converter that may rename inputs but keeps them all,
        in order), an unknown name takes the one at its own position; without, it is an error."""
        names = self.input_names
        unknown = [n for n in engine_inputs if n not in names]
        if unknown and not renamed:
            raise ValueError(f"partition {self.id}: the engine's inputs {unknown} are none of the partition's "
                             f"inputs {list(names)}")
        return [(n, names.index(n) if n in names else i) for i, n in enumerate(engine_inputs)]

    @functools.cached_property
    def digest(self) -> str:
        """Hash of the code, input specs and weight bytes: the key of on-disk compiled artifacts. SHA-256 (cut to
        128 bits), read from the weights in place: most current x86 and ARM CPUs hash it in hardware, at twice
        BLAKE2's speed, and a warm optimize of a large model hashes every weight once."""
        h = hashlib.sha256()
        h.update(self.gm.code.encode())
        for x in self.example_inputs:
            h.update(f"{tuple(x.shape)}:{x.dtype}".encode() if isinstance(x, torch.Tensor) else repr(x).encode())
        seen = set()
        for name, t in list(self.gm.named_parameters()) + list(self.gm.named_buffers()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
            if id(t) not in seen:
                seen.add(id(t))
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy() if t.numel() else b"")
        return h.hexdigest()[:32]

    @functools.cached_property
    def structure(self) -> str:
        """Hash of what the partition computes, up to node names and weight values: the twelve layers of a
        transformer share one, so timing one layer times them all. Ops, their wiring and arguments, and the
        shape and dtype of every input and weight are in it."""
        index: dict[fx.Node, int] = {}

        def enc(a) -> str:
            if isinstance(a, fx.Node):
                return f"%{index[a]}"
            if isinstance(a, (list, tuple)):
                return "(" + ",".join(enc(x) for x in a) + ")"
            if isinstance(a, dict):
                return "{" + ",".join(f"{k}={enc(v)}" for k, v in a.items()) + "}"
            return repr(a)

        h = hashlib.blake2b(digest_size=16)
        inputs = iter(self.example_inputs)
        for i, n in enumerate(self.gm.graph.nodes):
            index[n] = i
            if n.op == "placeholder":
                x = next(inputs, None)
                what = _spec(x)
            elif n.op == "get_attr":
                what = _spec(fetch_attr(self.gm, n.target))
            else:
                what = f"{n.target}{enc(n.args)}{enc(n.kwargs)}"
            h.update(f"{n.op}:{what};".encode())
        return h.hexdigest()

    @property
    def output_specs(self) -> list:
        out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        return [a.meta.get("dioe.tensor") if isinstance(a, fx.Node) else None for a in out.args[0]]

    @property
    def op_count(self) -> int:
        return sum(1 for n in self.gm.graph.nodes if n.op == "call_function")

    def calls(self, *fragments: str) -> bool:
        """Whether it calls an op whose name contains one of `fragments` ("convolution", "softmax", ...)."""
        return any(n.op == "call_function" and any(f in str(n.target) for f in fragments)
                   for n in self.gm.graph.nodes)


@dataclass(eq=False)
class Compiled:
    """A partition compiled for one member by one backend. Call it with tensors on `io_device`."""

    fn: Fn
    partition_id: str
    backend: str
    member: str
    precision: str
    io_device: str
    compile_s: float
    artifact: str = ""  # where the backend cached what it built, if on disk
    notes: dict = field(default_factory=dict)  # what the engine reported building: counts of quantized ops, ...
    # The precision the engine reports running, read back from it: "int8", "bf16", "fp32", or a mix such as
    # "int8+fp32" (quantized matmuls, float attention). "" where a backend cannot say (one written before
    # backends reported it).
    applied: str = ""

    def __call__(self, *inputs):
        try:
            return self.fn(*inputs)
        except Exception as e:
            raise self.failure(e) from e

    def failure(self, error: Exception) -> BackendError:
        """What a failed call of `fn` raises: the engine's error, naming this partition, member and backend."""
        err = BackendError(f"partition {self.partition_id} on member {self.member} with backend {self.backend} "
                           f"({self.precision}) failed: {type(error).__name__}: {error}")
        err.__cause__ = error
        return err


@dataclass(frozen=True)
class Built:
    """What `Backend.compile_fn` returns: the callable, and what the engine says it built."""

    fn: Fn
    artifact: str = ""   # the on-disk artifact it runs, "" if none
    applied: str = ""    # the precision the engine reports running (see `Compiled.applied`)
    notes: dict = field(default_factory=dict)


def _spec(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"{tuple(x.shape)}:{x.dtype}:{x.device.type}"
    return repr(x)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """Where compiled artifacts and profiles live: cache_dir, else $DIOE_CACHE_DIR, else ~/.cache/dioe. Made
    owner-only and marked as DIOE's where DIOE creates it (`integrity.mark`)."""
    path = Path(cache_dir) if cache_dir is not None else env_cache_dir()
    return integrity.mark(path)


class DescriptorSupport(OperatorSupportBase):
    """What the member's descriptor allows: op allow/deny lists and tensor dtypes."""

    def __init__(self, member: Member):
        self.rules = member.descriptor.ops

    def is_node_supported(self, submodules, node: fx.Node) -> bool:
        if node.op != "call_function":
            return True
        if not self.rules.permits(_op_name(node)):
            return False
        if self.rules.dtypes:
            for t in _node_specs(node):
                if t.dtype not in self.rules.dtypes:
                    return False
        return True


def _op_name(node: fx.Node) -> str:
    t = node.target
    return str(t) if isinstance(t, torch._ops.OpOverload) else getattr(t, "__name__", str(t))


def _node_specs(node: fx.Node) -> list:
    specs = []
    for n in [node, *node.all_input_nodes]:
        s = n.meta.get("dioe.tensor")
        specs.extend(s if isinstance(s, tuple) else [s])
    return [s for s in specs if s is not None]


@functools.cache
def decomposes(op) -> bool:
    """True when export-time decomposition turns `op` into other ATen ops (linear -> addmm, ...). Cached per op:
    each lookup in torch's decomposition table rebuilt it (0.25 s), and support checks ask once per node."""
    if not isinstance(op, torch._ops.OpOverload):
        return False
    return op in _core_decompositions() or torch._C._dispatch_has_kernel_for_dispatch_key(
        op.name(), "CompositeImplicitAutograd")


@functools.cache
def _core_decompositions() -> frozenset:
    from torch._decomp import core_aten_decompositions

    return frozenset(core_aten_decompositions().keys())


def functional_variant(op) -> torch._ops.OpOverload | None:
    """The out-of-place twin of an in-place ATen op (add_.Tensor -> add.Tensor), or None. Exporters functionalize
    a graph before lowering it, so a backend that runs the twin runs the in-place op too (ResNet's residual
    `+=` is an add_ in the captured graph)."""
    if not isinstance(op, torch._ops.OpOverload) or not op._schema.is_mutable:
        return None
    name = op._schema.name.split("::")[-1]
    if not name.endswith("_") or name.endswith("__"):
        return None
    packet = getattr(getattr(torch.ops, op.namespace), name[:-1], None)
    return getattr(packet, op._overloadname, None) if packet is not None else None


class Backend:
    """Base of all backends. Subclasses set the class attributes and implement `compile_fn`."""

    name: ClassVar[str] = ""
    requires: ClassVar[tuple[str, ...]] = ()       # Python modules it imports (lazily, in its own file)
    extra: ClassVar[str | None] = None              # pip extra that installs them
    precisions: ClassVar[tuple[str, ...]] = ("fp32",)
    call_overhead_us: ClassVar[float] = 5.0         # prior for the cost model; profiling replaces it
    # What the rest of DIOE reads from the backend, so that a new backend is this one file:
    color: ClassVar[str] = "#888888"                # its colour in traces, reports and bench charts
    options: ClassVar[frozenset[str]] = frozenset()  # keys of a descriptor's `backends: - options:` it reads
    needs_torch_device: ClassVar[bool] = False      # it runs through a torch device: none, none to drive
    # Whether it keeps to a member's thread budget (`Member.threads`). One that does not runs on a process-wide
    # pool (torch's intra-op threads), and plans say so for the members that set a budget.
    thread_budget: ClassVar[bool] = True
    # Whether its engine computes a fully masked attention row otherwise than torch (NaN, or the mean of the
    # values, where torch gives 0): its partitions are compiled with their attention guarded (`dioe.masking`).
    guards_masked_attention: ClassVar[bool] = False

    def __init__(self, cache_dir: str | os.PathLike | None = None):
        # its own folder of the cache, made when it first writes there: a backend that caches nothing makes none
        self.cache_dir = (Path(cache_dir) if cache_dir is not None else env_cache_dir()) / self.name

    # -- capability -----------------------------------------------------------------------------------------
    def member_reason(self, member: Member) -> str | None:
        """Why this backend cannot drive `member` at all, or None when it can."""
        if self.name not in member.backends:
            return member.unavailable.get(self.name, f"{self.name} is not among {member.id}'s backends")
        return None

    @classmethod
    def precision_reason(cls, member: Member, precision: str) -> str | None:
        """Why this backend cannot run `precision` (one of its `precisions`) on `member`, or None when it can: the
        precision search leaves such pairs out rather than build a candidate bound to fail."""
        return None

    def op_support(self) -> OperatorSupportBase | None:
        """The backend's own knowledge of which nodes it can run; None means all of them."""
        return None

    def supports(self, member: Member) -> OperatorSupportBase:
        """Nodes this backend may run on `member`: its own support, narrowed by the member's descriptor."""
        own = self.op_support()
        return chain(DescriptorSupport(member), own) if own is not None else DescriptorSupport(member)

    def io_device(self, member: Member) -> str:
        """Device of the tensors the compiled callable takes and returns."""
        return "cpu" if member.stand_in or member.device is None else member.device

    # -- compiling ------------------------------------------------------------------------------------------
    def compile(self, part: Partition, member: Member, precision: str = "fp32", *,
                objective: str = "latency", alone: bool = False,
                calibration: Calibration | None = None) -> Compiled:
        """Compile `part` for `member` in `precision`; errors name the partition, member and backend. `alone`:
        nothing else runs on the machine's cores between this partition's calls (it is the plan's only
        partition, or a peer timed on its own), so its engine may keep its workers spinning between calls, as
        engines do by default; in a plan of several partitions the next one needs those cores at once.
        `calibration`: input tuples for `part`, shaped like its example inputs, for the precisions that
        calibrate (static int8); a backend that needs them and gets none says so. `Compiled.applied` is the
        precision the engine reports running.

            >>> c = backends.get("onnxruntime").compile(part, member, "int8", calibration=[(x,) for x in xs])
            ... # doctest: +SKIP
            >>> c.applied, c.notes["quantized_ops"]                 # doctest: +SKIP
            ('int8+fp32', 12)
        """
        if precision not in self.precisions:
            raise BackendError(f"backend {self.name} does not run {precision} (it runs "
                               f"{', '.join(self.precisions)}); partition {part.id}, member {member.id}")
        if precision not in member.descriptor.precisions:
            raise BackendError(f"member {member.id} ({member.descriptor.name}) does not compute in {precision}; "
                               f"it lists {', '.join(member.descriptor.precisions)}")
        reason = self.member_reason(member)
        if reason:
            raise BackendError(f"backend {self.name} cannot drive member {member.id}: {reason}")
        # passed on only when given, so that a backend written before calibration existed compiles as it did
        extra = {} if calibration is None else {"calibration": check_calibration(part, calibration)}
        start = time.perf_counter()
        if self.guards_masked_attention:
            part = guarded_partition(part)
        try:
            built = self.compile_fn(part, member, precision, objective=objective, alone=alone, **extra)
        except BackendError:
            raise
        except Exception as e:
            raise BackendError(f"partition {part.id}: backend {self.name} failed to compile it for member "
                               f"{member.id} ({precision}): {type(e).__name__}: {str(e)[:2000]}") from e
        if not isinstance(built, Built):  # (fn, artifact), from a backend that does not read precision back
            built = Built(*built)
        return Compiled(built.fn, part.id, self.name, member.id, precision, self.io_device(member),
                        time.perf_counter() - start, built.artifact, dict(built.notes), built.applied)

    def prepare(self, part: Partition, member: Member, precision: str = "fp32", *,
                calibration: Calibration | None = None) -> str | None:
        """Start the slow part of a `compile` to come that can run in a process of its own, so that other work
        overlaps it; `compile` of the same partition, precision and calibration collects it. A token for what it
        started (for `release_prepared`), or None. Never raises: where starting fails, `compile` does the work
        itself and says what failed."""
        return None

    def release_prepared(self, token: str) -> None:
        """Stop what `prepare` started under `token`, if no `compile` collected it."""

    def compile_fn(self, part: Partition, member: Member, precision: str, *, objective: str = "latency",
                   alone: bool = False, calibration: Calibration | None = None) -> Built | tuple[Fn, str]:
        """Build the callable; return a `Built`: it, the path of any on-disk artifact ("" if none) and the
        precision the engine reports running. `calibration` comes checked (`check_calibration`), or None."""
        raise NotImplementedError

    def threads(self, member: Member) -> int:
        return member.threads or os.cpu_count() or 1

    def to_io(self, tensors: Sequence[torch.Tensor], member: Member) -> list[torch.Tensor]:
        """Move tensors to where this backend's compiled callables take them."""
        dev = self.io_device(member)
        return [t.to(dev, non_blocking=True) if isinstance(t, torch.Tensor) and t.device.type != dev.split(":")[0]
                else t for t in tensors]


def write_atomically(folder: Path, name: str, save: Callable[[Path], None]) -> Path:
    """Write artifact `name` into `folder` whole or not at all, owner-only, sealed, and return its path. `save(path)`
    writes it into a private scratch folder beside, with any side files named after it (`x.onnx.data`, `x.bin` for
    `x.xml`) and any scratch files of its own named otherwise. Engines write their files with the process's
    umask, so each is made owner-only before it moves in; the side files are moved in first, `name` after them,
    and its manifest (`integrity.seal`) last: a crash leaves an unsealed artifact, which reuse deletes and builds
    again. The scratch folder is named after the digest that starts `name`, so the cache counts it to that
    partition until it is gone."""
    integrity.mark(folder.parent)  # the cache root, a backend's folder's parent: marked where DIOE creates it
    private_dir(folder)
    stem = Path(name).stem
    scratch = Path(tempfile.mkdtemp(prefix=f"{name.split('.', 1)[0]}.", dir=folder))  # mkdtemp: mode 0700
    try:
        save(scratch / name)
        ours = [f for f in scratch.iterdir() if f.is_file() and f.name.startswith(stem)]
        if not any(f.name == name for f in ours):
            raise BackendError(f"the engine wrote no {name} (it wrote {sorted(f.name for f in ours)})")
        for f in ours:
            os.chmod(f, FILE_MODE)
        # hashed here, before the move: another process that finds the files unsealed meanwhile deletes them,
        # and this one still seals what it wrote (which then fails the check, and is built again)
        entries = integrity.fingerprints(ours)
        integrity.seal_path(folder / name).unlink(missing_ok=True)  # an older seal would vouch for other files
        for f in sorted(ours, key=lambda f: f.name == name):
            f.replace(folder / f.name)
        integrity.seal(folder / name, [folder / f.name for f in ours], entries=entries)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return folder / name


@contextlib.contextmanager
def quiet(*loggers: str):
    """Silence a library's progress output and chatter for a call: the named loggers (the root logger for "")
    and stdout/stderr. Exporters and quantizers print progress bars and warn per tensor; DIOE reports what
    matters itself."""
    found = [logging.getLogger(n) for n in loggers]
    levels = [lg.level for lg in found]
    for lg in found:
        lg.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        for lg, lvl in zip(found, levels):
            lg.setLevel(lvl)


def host_view(x: torch.Tensor):
    """A numpy view of a CPU tensor, for engines fed numpy: no copy where it is contiguous. One that requires grad
    (an input computed outside no_grad) is detached first, since numpy() refuses it."""
    return (x.detach() if x.requires_grad else x).contiguous().numpy()


def float_precision_dtype(precision: str) -> torch.dtype | None:
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)


def placed_module(part: Partition, device: str, precision: str) -> tuple[fx.GraphModule, torch.dtype | None]:
    """The partition's module on `device` with weights in `precision`. A copy only when something changes,
    so the caller's CPU fp32 weights stay untouched and a CPU fp32 placement costs no memory."""
    low = float_precision_dtype(precision)
    gm = part.gm
    if torch.device(device).type != "cpu" or low is not None:
        gm = copy.deepcopy(gm).to(device)
        if low is not None:
            gm.to(low)
    return gm.eval(), low


def cast_io(fn: Fn, low: torch.dtype | None) -> Fn:
    """Wrap `fn` so float inputs go in as `low` and `low` outputs come back as fp32; identity when low is None."""
    if low is None:
        return fn

    def run(*inputs):
        xs = [x.to(low) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in inputs]
        return tuple(o.float() if isinstance(o, torch.Tensor) and o.dtype == low else o for o in fn(*xs))
    return run
