"""Capture: any nn.Module to a flat, annotated ATen-level FX graph, via torch.export (non-strict).

    >>> import torch, dioe
    >>> g = dioe.capture(torch.nn.Linear(4, 2), (torch.randn(3, 4),))
    >>> [n.target for n in g.gm.graph.nodes if n.op == "call_function"]
    [<OpOverload(op='aten.linear', overload='default')>]
    >>> g.gm.graph.find_nodes(op="call_function")[0].meta["dioe.cost"].flops
    48

The graph takes the model's inputs flattened (pytree leaves, kwargs in the captured order) and returns a
tuple of flattened outputs; `CapturedGraph.__call__` restores the original structure (a Hugging Face
ModelOutput comes back as that ModelOutput). Every node carries under `node.meta`:
  "dioe.tensor"  TensorSpec (or a tuple of them) of its output
  "dioe.cost"    Cost: FLOPs and bytes moved
  "dioe.module"  the nn.Module path it came from ("encoder.layer.0.attention.self.query")
"""

from __future__ import annotations

import copy
import hashlib
import re
import traceback
import warnings
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch import fx

from .cost import Cost, node_cost
from .errors import CaptureError, InputSpecError
from .guard import check_ranges, index_ranges

# What a hot-path call returns when it does not take the call: the caller goes the long way instead
MISS = object()


@dataclass(frozen=True)
class TensorSpec:
    """Shape, dtype and device of a tensor; dynamic dimensions are named by their symbol (s0, s1)."""

    shape: tuple[int | str, ...]
    dtype: str
    device: str = "cpu"

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorSpec":
        shape = tuple(int(s) if isinstance(s, int) else str(s) for s in t.shape)  # SymInt -> "s0"
        return cls(shape, str(t.dtype).removeprefix("torch."), t.device.type)

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s if isinstance(s, int) else 1
        return n * torch.empty((), dtype=self.torch_dtype).element_size()

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(map(str, self.shape))}]"

    def to_dict(self) -> dict:
        return {"shape": list(self.shape), "dtype": self.dtype, "device": self.device}

    @classmethod
    def from_dict(cls, d: Mapping) -> "TensorSpec":
        return cls(tuple(d["shape"]), d["dtype"], d.get("device", "cpu"))


def _spec_of(val: Any) -> TensorSpec | tuple | None:
    if isinstance(val, torch.Tensor):
        return TensorSpec.of(val)
    if isinstance(val, (list, tuple)):
        return tuple(_spec_of(v) for v in val)
    return None


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    # strict-mode exports spell paths as L['self'].encoder.layer[0]; normalise to encoder.layer.0
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path).replace("_modules['", "").replace("']", "")


def _val(node: Any, gm: fx.GraphModule) -> Any:
    if isinstance(node, fx.Node):
        if "val" in node.meta:
            return node.meta["val"]
        if node.op == "get_attr":
            return fetch_attr(gm, node.target)
        return None
    if isinstance(node, (list, tuple)):
        return type(node)(_val(n, gm) for n in node)
    return node


def fetch_attr(gm: torch.nn.Module, target: str) -> Any:
    """The module attribute a get_attr node names by its dotted path."""
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def annotate(gm: fx.GraphModule) -> fx.GraphModule:
    """Write "dioe.tensor", "dioe.cost" and "dioe.module" into every node's meta. Returns `gm`."""
    for node in gm.graph.nodes:
        try:
            out = _val(node, gm)
            node.meta["dioe.tensor"] = _spec_of(out)
            args = tuple(_val(a, gm) for a in node.args)
            node.meta["dioe.cost"] = node_cost(node, args, out)
            node.meta["dioe.module"] = _module_path(node)
        except Exception as e:  # name the pass and the node, as torch.fx does
            raise CaptureError(f"annotate: while processing {node.format_node()}: {e}") from e
    return gm


def remove_inference_noops(gm: fx.GraphModule) -> fx.GraphModule:
    """Drop ops that do nothing in eval mode (dropout with train=False), so no backend pays a call for them,
    and export's input-guard submodule: CapturedGraph checks inputs itself, with clearer messages."""
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn":
            gm.graph.erase_node(node)
            continue
        if node.op == "call_function" and node.target is torch.ops.aten._assert_tensor_metadata.default:
            gm.graph.erase_node(node)  # export's dtype asserts: no backend but torch can run them
            continue
        if node.op == "call_function" and node.target is torch.ops.aten.dropout.default:
            train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train", False)
            if not train:
                node.replace_all_uses_with(node.args[0])
                gm.graph.erase_node(node)
    gm.graph.eliminate_dead_code()
    if hasattr(gm, "_guards_fn"):
        delattr(gm, "_guards_fn")
    gm.recompile()
    return gm


def _output_rebuilder(spec: pytree.TreeSpec):
    """A faster twin of `tree_unflatten(flat, spec)` for the common output structures (one tensor, a flat tuple or
    list, a Hugging Face ModelOutput of tensors), or None. A ModelOutput built through its constructor took 18 us a
    call (its __post_init__ checks every field), 6% of tiny-bert's 0.3 ms; built field by field, 2 us. The twin is
    kept only if it builds what tree_unflatten builds from the same leaves: same type, items and attributes."""
    n = spec.num_leaves
    kids_are_leaves = all(spec.child(i).is_leaf() for i in range(spec.num_children)) if not spec.is_leaf() else True
    if spec.is_leaf():
        def fast(flat):
            return flat[0]
    elif spec.type in (tuple, list) and kids_are_leaves:
        fast = spec.type
    elif kids_are_leaves and isinstance(spec.type, type) and issubclass(spec.type, OrderedDict) \
            and hasattr(spec.type, "__dataclass_fields__") and isinstance(spec.context, (list, tuple)) \
            and all(isinstance(k, str) for k in spec.context):
        cls, keys = spec.type, tuple(spec.context)
        unset = {name: None for name in cls.__dataclass_fields__}
        # The item and the attribute are written with OrderedDict's and object's own setters: ModelOutput's
        # __setitem__ writes both through name checks, 4.5 us a call for tiny-bert's two fields.
        set_item = OrderedDict.__setitem__

        def fast(flat):
            out = cls.__new__(cls)
            attrs = dict(unset)
            for k, v in zip(keys, flat):
                if v is not None:
                    set_item(out, k, v)
                    attrs[k] = v
            out.__dict__.update(attrs)
            return out
    else:
        return None
    probe = [torch.zeros(1) for _ in range(n)]
    try:
        want, got = pytree.tree_unflatten(list(probe), spec), fast(list(probe))
        same = type(want) is type(got) and (
            [id(x) for x in want] == [id(x) for x in got] if isinstance(want, (tuple, list)) else
            want is got if isinstance(want, torch.Tensor) else
            [(k, id(v)) for k, v in want.items()] == [(k, id(v)) for k, v in got.items()]
            and {k: id(v) for k, v in vars(want).items()} == {k: id(v) for k, v in vars(got).items()})
    except Exception:  # a structure this twin does not know: tree_unflatten builds it
        return None
    return fast if same else None


def _fast_check(specs: tuple):
    """Whether positional arguments are tensors of `specs` ((shape, dtype, device type) each): flatten_inputs'
    check of the common call (the generated hot call writes the same checks out inline)."""
    count, tensor = len(specs), torch.Tensor

    def fits(args: tuple) -> bool:
        if len(args) != count:
            return False
        for x, (shape, dtype, device) in zip(args, specs):
            # is_cpu reads a flag; x.device.type builds a device object first (1 us of a 2 us check)
            if type(x) is not tensor or x.shape != shape or x.dtype != dtype or \
                    (not x.is_cpu if device == "cpu" else x.device.type != device):
                return False
        return True
    return fits


class CapturedGraph:
    """A captured model: a flat ATen GraphModule plus what is needed to call it like the original."""

    def __init__(self, gm: fx.GraphModule, exported: torch.export.ExportedProgram, flat_examples: Sequence,
                 name: str = "model"):
        self.gm = gm
        self.exported = exported
        self.name = name
        self.in_spec = exported.call_spec.in_spec
        self.out_spec = exported.call_spec.out_spec
        self.placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        self.example_inputs = tuple(flat_examples)
        self.input_specs = tuple(_spec_of(n.meta.get("val")) if isinstance(n.meta.get("val"), torch.Tensor)
                                 else None for n in self.placeholders)
        self.input_names = tuple(n.name for n in self.placeholders)
        # what eager's embedding, gather and indexing ops refuse, refused before any engine reads past its table
        self.index_ranges = index_ranges(gm)
        self._positional_specs = self._static_positional_specs()
        self._fits = _fast_check(self._positional_specs) if self._positional_specs is not None else None
        self._rebuild = _output_rebuilder(self.out_spec)
        self._reference = None

    def reference_outputs(self) -> tuple:
        """The captured graph's own outputs on its example inputs: what every plan and rival is verified against,
        computed once (an eager call of vit-base at batch 8 takes 2 s, and an optimize verifies up to four
        candidates)."""
        if self._reference is None:
            with torch.inference_mode():
                self._reference = tuple(self.gm(*self.example_inputs))
        return self._reference

    def _static_positional_specs(self) -> tuple | None:
        """(shape, dtype, device type) of each input when all are positional tensors of static shape, else None."""
        args = _child(self.in_spec, 0)
        if _kwarg_names(self.in_spec) or args.num_children != len(self.input_specs) or \
                not all(_child(args, i).is_leaf() for i in range(args.num_children)):
            return None
        if any(s is None or not all(isinstance(d, int) for d in s.shape) for s in self.input_specs):
            return None
        return tuple((torch.Size(s.shape), s.torch_dtype, s.device) for s in self.input_specs)

    # -- calling --------------------------------------------------------------------------------------------
    def flatten_inputs(self, args: tuple, kwargs: Mapping | None = None) -> list:
        """Check inputs against the captured spec and flatten them; a clear error names any mismatch."""
        if self._fits is not None and not kwargs and self._fits(args):
            # the hot path: positional tensors of the captured static shapes; anything else takes the long way,
            # which names what is wrong
            if self.index_ranges:
                check_ranges(self.index_ranges, args)
            return list(args)
        kwargs = dict(kwargs or {})
        expected_kw = _kwarg_names(self.in_spec)
        if set(kwargs) != set(expected_kw):
            raise InputSpecError(f"{self.name}: expected keyword inputs {expected_kw}, got {sorted(kwargs)}")
        kwargs = {k: kwargs[k] for k in expected_kw}
        flat, spec = pytree.tree_flatten((tuple(args), kwargs))
        if spec != self.in_spec:
            want = _child(self.in_spec, 0)
            if len(args) == want.num_children:  # the right count: name the first argument of the wrong kind
                for i, a in enumerate(args):
                    if pytree.tree_flatten(a)[1] != _child(want, i):
                        raise InputSpecError(f"{self.name}: positional input {i} is a {type(a).__name__}, not "
                                             f"what was captured; expected {self._expected_text()}")
            raise InputSpecError(f"{self.name}: expected {want.num_children} positional input(s) "
                                 f"{self._expected_text()}, got {len(args)}")
        for i, (x, want, name) in enumerate(zip(flat, self.input_specs, self.input_names)):
            if want is None:
                ex = self.example_inputs[i]
                if not isinstance(x, torch.Tensor) and x != ex:
                    raise InputSpecError(f"{self.name}: input {name!r} was captured as the constant {ex!r}; "
                                         f"got {x!r}. Capture again with the new value.")
                continue
            if not isinstance(x, torch.Tensor):
                raise InputSpecError(f"{self.name}: input {name!r} expected a tensor {want}, got "
                                     f"{type(x).__name__}")
            self._check_tensor(name, x, want)
        check_ranges(self.index_ranges, flat)
        return flat

    def _check_tensor(self, name: str, x: torch.Tensor, want: TensorSpec) -> None:
        got = TensorSpec.of(x)
        bad_shape = len(got.shape) != len(want.shape) or any(
            isinstance(w, int) and w != g for w, g in zip(want.shape, got.shape))
        if bad_shape:
            hint = "" if any(isinstance(w, str) for w in want.shape) else \
                " (capture with dynamic_shapes to accept other shapes)"
            raise InputSpecError(f"{self.name}: input {name!r} has shape {list(got.shape)}, captured shape is "
                                 f"{list(want.shape)}{hint}")
        if got.dtype != want.dtype:
            raise InputSpecError(f"{self.name}: input {name!r} has dtype {got.dtype}, captured dtype is "
                                 f"{want.dtype}")
        if got.device != want.device:
            raise InputSpecError(f"{self.name}: input {name!r} is on {got.device}, captured on {want.device}")

    def _expected_text(self) -> str:
        return "(" + ", ".join(f"{n}: {s}" for n, s in zip(self.input_names, self.input_specs)) + ")"

    def hot_io(self) -> tuple[tuple, Callable[[Sequence], Any], bool] | None:
        """What a hot path needs to take the common call (positional tensors of the captured static shapes)
        without `flatten_inputs` and `unflatten_outputs`: each input's (shape, dtype, device type), a function
        building the output structure from the flat outputs, and whether the output is one tensor. None where the
        captured inputs are not all such tensors."""
        specs = self._positional_specs
        if specs is None:
            return None
        return specs, self._rebuild or self.unflatten_outputs, self.out_spec.is_leaf()

    def unflatten_outputs(self, flat: Sequence) -> Any:
        if self._rebuild is not None:
            return self._rebuild(flat)
        return pytree.tree_unflatten(list(flat), self.out_spec)

    def __call__(self, *args, **kwargs) -> Any:
        flat = self.flatten_inputs(args, kwargs)
        with torch.inference_mode():
            return self.unflatten_outputs(self.gm(*flat))

    # -- facts ----------------------------------------------------------------------------------------------
    @property
    def compute_nodes(self) -> list[fx.Node]:
        return [n for n in self.gm.graph.nodes if n.op == "call_function"]

    def total_cost(self) -> Cost:
        total = Cost()
        for n in self.compute_nodes:
            total = total + n.meta.get("dioe.cost", Cost())
        return total

    def parameter_bytes(self) -> int:
        seen = {id(t): t for t in list(self.gm.parameters()) + list(self.gm.buffers())}
        return sum(t.numel() * t.element_size() for t in seen.values())

    def structure_hash(self) -> str:
        """Changes when the graph's code or any input/parameter shape or dtype does (not with weight values)."""
        h = hashlib.blake2b(digest_size=12)
        h.update(self.gm.code.encode())
        for s in self.input_specs:
            h.update(str(s).encode())
        for name, t in list(self.gm.named_parameters()) + list(self.gm.named_buffers()):
            h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        return h.hexdigest()

    def summary(self, top: int = 10) -> dict:
        """Op counts, each op type's share of FLOPs, and the heaviest single nodes."""
        counts: Counter = Counter()
        flops: Counter = Counter()
        for n in self.compute_nodes:
            op = str(n.target).removesuffix(".default")
            counts[op] += 1
            flops[op] += n.meta["dioe.cost"].flops
        total = self.total_cost()
        heavy = sorted(self.compute_nodes, key=lambda n: -n.meta["dioe.cost"].flops)[:top]
        return {
            "model": self.name,
            "inputs": {n: str(s) for n, s in zip(self.input_names, self.input_specs)},
            "nodes": len(self.compute_nodes),
            "parameters_bytes": self.parameter_bytes(),
            "gflops": total.flops / 1e9,
            "gbytes_moved": total.bytes / 1e9,
            "ops": [{"op": op, "count": c, "flops_share": flops[op] / max(total.flops, 1)}
                    for op, c in sorted(counts.items(), key=lambda kv: (-flops[kv[0]], -kv[1]))],
            "heaviest": [{"node": n.name, "op": str(n.target).removesuffix(".default"),
                          "module": n.meta["dioe.module"], "shape": str(n.meta["dioe.tensor"]),
                          "gflops": n.meta["dioe.cost"].flops / 1e9} for n in heavy],
        }


def capture(model: torch.nn.Module, example_inputs: Any, example_kwargs: Mapping | None = None,
            dynamic_shapes: Any = None, *, name: str | None = None) -> CapturedGraph:
    """Capture `model` called as `model(*example_inputs, **example_kwargs)` into a CapturedGraph."""
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"expected a torch.nn.Module, got {type(model).__name__}")
    args = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    kwargs = dict(example_kwargs or {})
    model = model.eval()
    try:
        with torch.no_grad():
            exported = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
    except Exception as e:
        raise CaptureError(_explain_export_failure(model, e)) from e

    unlifted = exported.module()
    with warnings.catch_warnings():  # torch's own TreeSpec pickling warns about its deprecated LeafSpec
        warnings.simplefilter("ignore", FutureWarning)
        graph = copy.deepcopy(unlifted.graph)
    graph._codegen = fx.graph.CodeGen()  # plain flat signature: no pytree handling, no input-check hooks
    for node in graph.nodes:
        if node.op == "output":
            node.args = (tuple(node.args[0]),)
    gm = fx.GraphModule(unlifted, graph)
    gm.eval()
    remove_inference_noops(gm)
    annotate(gm)
    flat = pytree.tree_leaves((args, {k: kwargs[k] for k in _kwarg_names(exported.call_spec.in_spec)}))
    return CapturedGraph(gm, exported, flat, name=name or type(model).__name__)


def _child(spec: pytree.TreeSpec, i: int) -> pytree.TreeSpec:
    # TreeSpec.child() is new in torch 2.12; children_specs works before and warns after
    return spec.child(i) if hasattr(spec, "child") else spec.children_specs[i]


def _kwarg_names(in_spec: pytree.TreeSpec) -> list[str]:
    """Keyword input names, in the order torch.export flattened them."""
    return list(_child(in_spec, 1).context) if in_spec.num_children > 1 else []


def _explain_export_failure(model: torch.nn.Module, e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    where = _user_frame(e)
    what = f"torch.export could not capture {type(model).__name__}" + (f" at {where}" if where else "")
    first = text.strip().splitlines()[0][:400]
    if re.search(r"Cache|past_key_values", text):
        return (f"{what}: the model returns a cache object ({first}). Try use_cache=False "
                "(model.config.use_cache = False) so it returns plain tensors.")
    if re.search(r"data.dependent|GuardOnDataDependent|Could not guard on data-dependent", text):
        return (f"{what}: control flow depends on tensor values ({first}). Make the branch static, "
                "use torch.cond, or capture with the inputs that select the path you need.")
    if re.search(r"not.*(pytree|flatten)|Unsupported.*(output|input) type", text, re.I):
        return (f"{what}: an input or output type is not a pytree ({first}). Register it with "
                "torch.utils._pytree.register_pytree_node or return tensors.")
    if re.search(r"Constraints violated|dynamic_shapes", text):
        return f"{what}: the dynamic_shapes do not hold for this model ({first})."
    return f"{what}: {first}"


def _user_frame(e: BaseException) -> str:
    """The innermost traceback frame outside torch: the model code that tripped the export."""
    frames = traceback.extract_tb(e.__traceback__)
    mine = [f for f in frames if "/torch/" not in f.filename and "/dioe/" not in f.filename]
    if not mine:
        return ""
    f = mine[-1]
    return f"{f.filename.rsplit('site-packages/', 1)[-1]}:{f.lineno} ({f.name}: {f.line})"
