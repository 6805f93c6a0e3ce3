"""DIOE, the Dynamic Inference Optimization Engine: capture a PyTorch model, measure it on every compute
unit of the machine, and run each part on the backend and member that serves it best."""

import importlib.util as _util

if _util.find_spec(f"{__name__}.backends") is None:
    # `backends/` is installed as dioe.backends; the bare source folder has no such subpackage.
    raise ImportError(f"dioe was imported from its source folder {__path__[0]}, which lacks dioe.backends (it is "
                      "installed from backends/). Install DIOE (pip install -c constraints.txt '.[all]', or "
                      "pip install -e .) and run from outside the source tree, or use the `dioe` command.")

from . import hardware, rewrite, zoo
from .accuracy import Budget
from .optimized import Optimized
from .pipeline import load, optimize
from .capture import CapturedGraph, TensorSpec, capture
from .cost import Cost
from .drift import LiveSettings
from .live import Live
from .errors import (BackendError, BackendUnavailable, CaptureError, DescriptorError, DIOEError,
                     IndexRangeError, InputSpecError, PlanError, PoolError, RunError)
from .plan import Plan
from .prune import prune  # the function; `from dioe.prune import load_stage` still reaches the module
from .pool import Member, ResourcePool
from .settings import Settings
from .tracing import Trace, trace

__version__ = "0.1.0"

__all__ = ["BackendError", "BackendUnavailable", "Budget", "CaptureError", "CapturedGraph", "Cost", "DescriptorError",
           "DIOEError", "IndexRangeError", "InputSpecError", "Live", "LiveSettings", "Member", "Optimized", "Plan",
           "PlanError", "PoolError", "ResourcePool", "RunError", "Settings", "TensorSpec", "Trace", "capture", "hardware",
           "load", "optimize", "prune", "rewrite", "trace", "zoo"]
