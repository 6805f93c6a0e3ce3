"""The generated `__call__` of a model whose plan is one partition on the CPU: the common case, where every
Python layer between the caller and the engine is a measurable share of a small model's time.

The source is DIOE's own, built from the plan's input specs (no user text), and sits in linecache while the
function lives, so that a traceback through it shows its lines, as torch.fx does for its generated code.
"""

from __future__ import annotations

import itertools
import linecache
import weakref
from typing import Any, Callable, Sequence

import torch

from . import tracing as _trace
from .capture import MISS

_HOT_CALLS = itertools.count()


def hot_call(specs: Sequence[tuple], direct: list, pid: str, *, one_output: bool,
             ranges: Sequence = ()) -> Callable | None:
    """The `__call__` of a model whose plan is one partition on the CPU, generated for its plan: the check of each
    positional input against `specs` ((shape, dtype, device type) each), the engine's own callable (and the
    fallback when it fails) and the output structure (`direct`: Runtime.direct), written out with no loop and no
    call between them. Each layer of the general path is a Python call, 0.1 to 0.2 us after an engine's call has
    left the caches cold: tiny-mlp's 8.1 us engine call took 9.6 us through the five layers of the general path,
    8.8 us through one generated function called by the model's __call__, and 8.6 us as that __call__. Inputs are
    positional-only parameters, so that no tuple is built for them. Any other call (another count, shape, dtype or
    device, keywords, a trace) takes the general path, which says what is wrong. The engine is read from the model
    (`_engine`), so that a replaced one is run at once and the function holds no engine or weights. None where the
    inputs do not allow it.

    `ranges` (IndexRange each): the inputs that index a table, checked with one fused min/max each (5-6 us alone
    for tiny-bert's 32 token ids); a value out of range takes the general path, which refuses it by name."""
    if any(device != "cpu" for _, _, device in specs):
        return None
    names = [f"x{i}" for i in range(len(specs))]
    scope: dict[str, Any] = {"MISS": MISS, "Tensor": torch.Tensor, "pid": pid, "tracing": _trace,
                             "aminmax": torch.aminmax}
    checks = ["more", "kwargs", "tracing._ACTIVE is not None"]
    for x, (shape, dtype, _) in zip(names, specs):
        scope[f"{x}_shape"], scope[f"{x}_dtype"] = torch.Size(shape), dtype
        # is_cpu reads a flag; x.device.type builds a device object first. A missing input is MISS: no Tensor
        checks.append(f"type({x}) is not Tensor or {x}.shape != {x}_shape or {x}.dtype is not {x}_dtype "
                      f"or not {x}.is_cpu")
    for r in ranges:
        x = names[r.position]
        # after the spec checks: x is a tensor of its shape here. Two .item() reads (about 0.5 us each) are the
        # cheapest form found: one read needs a stack of min and max first or a compare over every element, and
        # each of those costs more than the read it saves; aminmax itself is most of the check
        if torch.Size(specs[r.position][0]).numel():
            checks.append(f"not ({r.low} <= (m{x} := aminmax({x})).min.item() and m{x}.max.item() < {r.high})")
    outs = []
    for i, (computed, v) in enumerate(direct):
        if computed:
            outs.append(f"outs[{v}]")
        else:
            scope[f"k{i}"] = v
            outs.append(f"k{i}")
    args = ", ".join(names)
    packed = f"({args}{',' if len(names) == 1 else ''})"
    lines = [f"def __call__(self, {''.join(x + '=MISS, ' for x in names)}/, *more, **kwargs):",
             "    if (" + "\n            or ".join(checks) + "):",
             f"        return self._call(tuple([x for x in {packed} if x is not MISS]) + more, kwargs)",
             "    c = self._engine", "    try:", f"        outs = c.fn({args})", "    except Exception as e:",
             f"        outs = self.runtime.recover(pid, c, c.failure(e), {packed})",
             f"    return {outs[0]}" if one_output and len(outs) == 1 else
             f"    return self._rebuild(({', '.join(outs)}{',' if len(outs) == 1 else ''}))"]
    source, name = "\n".join(lines) + "\n", f"<dioe hot call {next(_HOT_CALLS)}>"
    exec(compile(source, name, "exec"), scope)  # our own source, built from the plan's specs: no user text
    hot = scope["__call__"]
    # in linecache while it lives, so that a traceback through the call shows its lines, as torch.fx does
    linecache.cache[name] = (len(source), None, source.splitlines(True), name)
    weakref.finalize(hot, linecache.cache.pop, name, None)
    return hot
