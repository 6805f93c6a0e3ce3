"""Attention masks at their edge: a query row whose every key is masked (a fully padded sample in a batch).

torch defines that row's attention output as zeros: `scaled_dot_product_attention` with a boolean mask that is
all False on a row, or a float mask that is all -inf on it, returns 0 there. The engines do not: OpenVINO's
fused attention returns NaN for the row, ONNX Runtime the mean of the values (tiny-bert's padded sample came
back 0.058 off). Two pieces keep them to torch's answer:

- `guard_masked_attention` rewrites each attention with a mask, for the engines that need it, so that no row
  reaches the engine fully masked (such a row is unmasked instead, and its output multiplied by 0 after). Every
  other row computes what it did: the rewrite adds a reduction over the mask, shared by the attentions that read
  it, and one multiply per attention.
- `fully_masked_probe` makes verification see it: the example inputs with one sample's attention mask all 0, for
  a model whose input looks like an attention mask. The example inputs alone (all ones, usually) cannot.

    >>> gm, n = guard_masked_attention(captured.gm)        # doctest: +SKIP
    >>> n                                                   # doctest: +SKIP
    2
"""

from __future__ import annotations

import weakref
from typing import Sequence

import torch
from torch import fx

aten = torch.ops.aten
_SDPA = aten.scaled_dot_product_attention.default
_MASK_ARG = 3  # attn_mask's position in scaled_dot_product_attention(query, key, value, attn_mask, ...)
_TAG = "dioe.masked_attention"  # the version of the rewrite, in the digest of a partition it changed


def _mask_of(node: fx.Node) -> fx.Node | None:
    if node.op != "call_function" or node.target is not _SDPA:
        return None
    mask = node.args[_MASK_ARG] if len(node.args) > _MASK_ARG else node.kwargs.get("attn_mask")
    return mask if isinstance(mask, fx.Node) else None


def _dtype(node: fx.Node) -> torch.dtype | None:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.dtype
    spec = node.meta.get("dioe.tensor")
    return getattr(spec, "torch_dtype", None)


def guard_masked_attention(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    """`gm` with every masked `scaled_dot_product_attention` computing torch's zeros on a fully masked row in a
    way every engine computes alike, and how many it rewrote; `gm` itself where none. The result is a new
    GraphModule over the same weights (none copied); `gm` is left as it was. For each distinct mask `m`:

        keep = any(m, -1, keepdim)            # (..., L, 1): the row attends to some key
        m'   = m | ~keep                      # bool: a fully masked row attends to every key instead
        m'   = where(keep, m, 0)              # float: its -inf row becomes 0 instead

    and each attention reading `m` reads `m'`, its output multiplied by `keep`. Where `keep` is true, `m'` is `m`
    and the product is exact; where false, torch's output is 0, and so is the product (the attention is finite,
    since no row is left fully masked). A float row all at finfo.min is not masked in torch's terms (it gives
    the mean of the values) and stays as it is."""
    if gm.meta.get(_TAG) or not any(_mask_of(n) is not None and _dtype(_mask_of(n)) is not None for n in gm.graph.nodes):
        return gm, 0
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    guards: dict[fx.Node, tuple[fx.Node, fx.Node]] = {}  # mask (new graph) -> (guarded mask, keep as a factor)
    rewritten = 0
    for node in gm.graph.nodes:
        if node.op == "output":
            graph.output(fx.map_arg(node.args[0], env.__getitem__))
            continue
        mask = _mask_of(node)
        dtype, out_dtype = (_dtype(mask), _dtype(node)) if mask is not None else (None, None)
        if dtype is None or out_dtype is None:
            env[node] = graph.node_copy(node, env.__getitem__)
            continue
        m = env[mask]
        if m not in guards:  # built once, where the first attention reading it is
            guards[m] = _guard(graph, m, dtype, out_dtype)
        guarded, factor = guards[m]
        attention = graph.node_copy(node, lambda a: guarded if a is mask else env[a])
        product = graph.call_function(aten.mul.Tensor, (attention, factor))
        product.meta = dict(node.meta)  # same shape and dtype: where the attention's output leaves, this does
        env[node] = product
        rewritten += 1
    if not rewritten:
        return gm, 0
    graph.lint()
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.meta[_TAG] = 1  # guarded once: a second pass would guard the guard
    return out, rewritten


def _guard(graph: fx.Graph, m: fx.Node, dtype: torch.dtype, out_dtype: torch.dtype) -> tuple[fx.Node, fx.Node]:
    """Nodes after mask `m`: the mask with no fully masked row, and the factor (0 or 1, in the attention's
    dtype) that zeroes those rows' outputs, appended to `graph`."""
    call = graph.call_function
    if dtype == torch.bool:
        keep = call(aten.any.dim, (m, -1, True))                                   # (..., L, 1)
        guarded = call(aten.logical_or.default, (m, call(aten.logical_not.default, (keep,))))
    else:
        attends = call(aten.gt.Scalar, (m, float("-inf")))
        keep = call(aten.any.dim, (attends, -1, True))                             # (..., L, 1)
        guarded = call(aten.where.ScalarOther, (keep, m, 0.0))
    factor = call(aten._to_copy.default, (keep,), {"dtype": out_dtype})
    return guarded, factor


def guarded_partition(part):
    """`part` (a backend's `Partition`) with its masked attention guarded (`guard_masked_attention`), or `part`
    itself where it has none. The new partition's digest is the old one's with the rewrite named in it, so an
    artifact exported before the rewrite is never read back for it, and its weights are not hashed again. A
    partition guarded already comes back as it is."""
    import hashlib

    gm, n = guard_masked_attention(part.gm)
    if not n:
        return part
    new = type(part)(part.id, gm, part.example_inputs)
    new.__dict__["digest"] = hashlib.blake2b(f"{part.digest}:{_TAG}:1".encode(), digest_size=16).hexdigest()
    return new


# -- verification's probe ------------------------------------------------------------------------------------

def _reaches_attention_mask(node: fx.Node) -> bool:
    """Whether `node`'s value flows into the mask argument of an attention."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for user in n.users:
            if _mask_of(user) is n:
                return True
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return False


def mask_inputs(gm: fx.GraphModule, example_inputs: Sequence) -> list[int]:
    """Positions of the graph inputs that are attention masks of 0s and 1s: an integer or boolean tensor whose
    example holds only 0 and 1, named like a mask ("attention_mask", "padding_mask", ...) or flowing into an
    attention's mask argument."""
    found = []
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for i, (node, x) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(x, torch.Tensor) or x.is_floating_point() or x.is_complex() or not x.numel():
            continue
        if not bool(((x == 0) | (x == 1)).all()):
            continue
        if "mask" in node.name.lower() or _reaches_attention_mask(node):
            found.append(i)
    return found


def fully_masked_probe(gm: fx.GraphModule, example_inputs: Sequence) -> tuple[list, str] | None:
    """The example inputs with the first sample of each attention mask input all 0 (the whole mask, where it
    has no batch dimension), and a line saying so; None for a model without such an input."""
    found = mask_inputs(gm, example_inputs)
    if not found:
        return None
    probe = list(example_inputs)
    names = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
    for i in found:
        x = probe[i].clone()
        if x.dim() >= 2:
            x[0] = 0
        else:
            x.zero_()
        probe[i] = x
    return probe, f"a fully masked attention row ({', '.join(names[i] for i in found)} of sample 0 all 0)"


_REFERENCE: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def probe_reference(captured) -> tuple[list, str, tuple] | None:
    """`fully_masked_probe` of a captured graph with the graph's own outputs on it, computed once per captured
    graph (an optimize verifies the plan and each of its rivals); None without a mask input."""
    if captured not in _REFERENCE:
        found = fully_masked_probe(captured.gm, captured.example_inputs)
        if found is not None:
            with torch.inference_mode():
                found = (*found, tuple(captured.gm(*found[0])))
        _REFERENCE[captured] = found
    return _REFERENCE[captured]
