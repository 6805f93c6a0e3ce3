"""Request and response bodies: JSON in the KServe v2 / Triton inference protocol's form, and a binary body of
named tensors in the safetensors format (no pickle: a body is data, never code).

    {"inputs": [{"name": "input_ids", "shape": [1, 8], "datatype": "INT64", "data": [101, ...]}, ...]}
"""

from __future__ import annotations

import json
import math
from typing import Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from ..errors import DIOEError

DATATYPES = {"FP32": torch.float32, "FP64": torch.float64, "FP16": torch.float16, "BF16": torch.bfloat16,
             "INT64": torch.int64, "INT32": torch.int32, "INT16": torch.int16, "INT8": torch.int8,
             "UINT8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DATATYPES.items()}
BINARY = "application/octet-stream"


class BodyError(DIOEError, ValueError):
    """A request body that cannot be read as the model's inputs; the message says what was expected."""


def decode_json(body: bytes, input_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BodyError(f"the body is not valid JSON ({e}); expected {{\"inputs\": [{{\"name\", \"shape\", "
                        "\"datatype\", \"data\"}, ...]}") from None
    items = doc.get("inputs") if isinstance(doc, dict) else None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise BodyError("expected a JSON object with a list \"inputs\" of {\"name\", \"shape\", \"datatype\", "
                        "\"data\"} objects")
    tensors = {}
    for k, item in enumerate(items):
        name = item.get("name", input_names[k] if k < len(input_names) else f"#{k}")
        shape, dtype, data = item.get("shape"), item.get("datatype"), item.get("data")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise BodyError(f"input {name!r}: \"shape\" must be a list of non-negative integers, got {shape!r}")
        if dtype not in DATATYPES:
            raise BodyError(f"input {name!r}: \"datatype\" must be one of {', '.join(DATATYPES)}, got {dtype!r}")
        flat = _flatten(data)
        if flat is None or len(flat) != math.prod(shape):
            raise BodyError(f"input {name!r}: \"data\" must hold {math.prod(shape)} numbers for shape {shape}, got "
                            f"{'something else' if flat is None else len(flat)}")
        try:
            tensors[name] = torch.tensor(flat, dtype=DATATYPES[dtype]).reshape(shape)
        except (TypeError, ValueError, RuntimeError, OverflowError) as e:
            raise BodyError(f"input {name!r}: \"data\" is not {dtype}: {e}") from None
    return order(tensors, input_names)


def decode_binary(body: bytes, input_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(body)
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise BodyError(f"the binary body is not a safetensors file of named tensors ({e})") from None
    return order(tensors, input_names)


def order(tensors: Mapping[str, torch.Tensor], input_names: Sequence[str]) -> tuple[torch.Tensor, ...]:
    """The tensors in the model's input order, by name; all named, none unknown."""
    if set(tensors) != set(input_names):
        raise BodyError(f"the model's inputs are {list(input_names)}; the body has {list(tensors)}")
    return tuple(tensors[n] for n in input_names)


def named_outputs(out: Any) -> list[tuple[str, torch.Tensor]]:
    """The model's outputs as (name, tensor): a mapping's keys, or output_0, output_1, ..."""
    if isinstance(out, torch.Tensor):
        return [("output_0", out)]
    if isinstance(out, Mapping) and all(isinstance(v, torch.Tensor) for v in out.values()):
        return list(out.items())
    return [(f"output_{i}", t) for i, t in enumerate(x for x in pytree.tree_leaves(out) if isinstance(x, torch.Tensor))]


def encode_json(model: str, out: Any) -> dict:
    return {"model_name": model, "outputs": [
        {"name": n, "shape": list(t.shape), "datatype": NAMES.get(t.dtype, str(t.dtype)),
         "data": t.detach().float().flatten().tolist() if t.dtype == torch.bfloat16 else t.detach().flatten().tolist()}
        for n, t in named_outputs(out)]}


def encode_binary(out: Any) -> bytes:
    from safetensors.torch import save

    return save({n: t.detach().contiguous() for n, t in named_outputs(out)})


def encode_inputs_json(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> bytes:
    """A request body for `inputs` (what a client, the load generator, sends)."""
    return json.dumps({"inputs": [{"name": n, "shape": list(t.shape), "datatype": NAMES[t.dtype],
                                   "data": t.flatten().tolist()} for n, t in zip(names, inputs)]}).encode()


def encode_inputs_binary(names: Sequence[str], inputs: Sequence[torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({n: t.contiguous() for n, t in zip(names, inputs)})


def decode_outputs_binary(body: bytes) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(body)


def _flatten(data: Any) -> list | None:
    if not isinstance(data, list):
        return None
    if data and isinstance(data[0], list):
        out = []
        for d in data:
            f = _flatten(d)
            if f is None:
                return None
            out.extend(f)
        return out
    return data
