"""Backend registry, derived from the files in this folder: `<name>.py` holds `<Name>Backend`.

Importing this package imports no backend library: `import onnxruntime` and `import openvino` happen inside
their backend's methods, so a missing extra is one clear message, never an import failure of DIOE.

    >>> from dioe import backends
    >>> backends.names()
    ('inductor', 'onnxruntime', 'openvino', 'torch')
    >>> backends.unavailable_reason("openvino")   # None when installed  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

_EXTRA: dict[str, type] = {}  # backends registered from outside this folder


def names() -> tuple[str, ...]:
    """Every known backend, installed or not."""
    here = [m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")]
    return tuple(sorted(set(here) | set(_EXTRA)))


def register(cls: type) -> type:
    """Class decorator for a backend defined outside this folder."""
    _EXTRA[cls.name] = cls
    return cls


def backend_class(name: str) -> type:
    if name in _EXTRA:
        return _EXTRA[name]
    if name not in names():
        from ..errors import DIOEError

        raise DIOEError(f"unknown backend {name!r}; known backends: {', '.join(names())}")
    from ..backend import Backend

    module = importlib.import_module(f"{__name__}.{name}")
    found = [c for c in vars(module).values()
             if isinstance(c, type) and issubclass(c, Backend) and c is not Backend and c.name == name]
    return found[0]


def unavailable_reason(name: str) -> str | None:
    """Why backend `name` cannot be used on this machine (a missing library and its extra), or None."""
    cls = backend_class(name)
    for mod in cls.requires:
        if importlib.util.find_spec(mod) is None:
            return f"{mod} is not installed (pip install 'dioe[{cls.extra}]')"
    return None


_INSTANCES: dict[tuple, object] = {}


def get(name: str, cache_dir=None):
    """The backend instance for `name`; raises BackendUnavailable naming the extra when not installed."""
    reason = unavailable_reason(name)
    if reason:
        from ..errors import BackendUnavailable

        raise BackendUnavailable(f"backend {name!r} is unavailable: {reason}")
    key = (name, str(cache_dir))
    if key not in _INSTANCES:
        _INSTANCES[key] = backend_class(name)(cache_dir=cache_dir)
    return _INSTANCES[key]
