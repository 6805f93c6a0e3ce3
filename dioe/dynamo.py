"""`torch.compile(model, backend="dioe")`: each graph dynamo hands over (one per graph break) is optimized
on its own. Registered through the `torch_dynamo_backends` entry point, so no import is needed.

    >>> compiled = torch.compile(model, backend="dioe")     # doctest: +SKIP
    >>> compiled = torch.compile(model, backend="dioe", options={"backends": ["onnxruntime"]})  # doctest: +SKIP
"""

from __future__ import annotations

import torch

from .pipeline import optimize


def dioe_backend(gm: torch.fx.GraphModule, example_inputs, **options):
    """Dynamo backend: optimize `gm` for this machine and return a callable with gm's calling convention."""
    if any(not isinstance(x, torch.Tensor) for x in example_inputs):
        # symbolic sizes (dynamic=True) are not captured yet: run that graph as it is, and say so
        import warnings

        warnings.warn("dioe: a graph with symbolic sizes runs uncompiled; use torch.compile(..., dynamic=False)",
                      RuntimeWarning)
        return gm.forward
    opt = optimize(gm, tuple(example_inputs), progress=False, name=f"dynamo_{id(gm):x}", **options)

    def run(*args):
        out = opt(*args)
        return out
    run.dioe = opt  # reachable for inspection: compiled_fn.dioe.plan
    return run
