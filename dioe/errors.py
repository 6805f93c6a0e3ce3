"""Every error DIOE raises on purpose derives from DIOEError, so callers can catch ours and not a backend's."""

from __future__ import annotations


class DIOEError(Exception):
    """Base class of the errors DIOE raises on purpose."""


class DescriptorError(DIOEError, ValueError):
    """A hardware descriptor or pool file is malformed.

    Carries the file, the 1-based line, the dotted key and what was expected, so an editor can jump to it.
    """

    def __init__(self, file: str, line: int | None, key: str, message: str):
        self.file, self.line, self.key, self.message = file, line, key, message
        where = f"{file}:{line}" if line else file
        super().__init__(f"{where}: {key or '<document>'}: {message}")


class PlanError(DIOEError, ValueError):
    """A saved plan is unreadable or malformed: names the file (or "plan" for a dict), the field's dotted path and
    what was expected there."""

    def __init__(self, file: str, key: str, message: str):
        self.file, self.key, self.message = file, key, message
        super().__init__(f"{file}: {key}: {message}" if key else f"{file}: {message}")


class CaptureError(DIOEError, RuntimeError):
    """torch.export could not capture the model; the message names the construct and what to try."""


class InputSpecError(DIOEError, TypeError):
    """Inputs at call time do not match the captured spec (count, shape, dtype or device)."""


class BackendUnavailable(DIOEError, ImportError):
    """A backend's library is not installed; the message names the extra that brings it."""


class BackendError(DIOEError, RuntimeError):
    """A backend failed while compiling or running a partition; names the partition, member and backend."""


class PoolError(DIOEError, RuntimeError):
    """The resource pool could not be built as asked (no member left, unknown member id, ...)."""


class IndexRangeError(DIOEError, IndexError):
    """An integer input holds a value outside the range the ops it indexes accept, where eager raises IndexError
    (an embedding's `index out of range in self`); names the input, the value and the range."""


class RunError(DIOEError, RuntimeError):
    """A call failed on its partition's engine and on the torch fallback too (eager refuses the inputs, or the
    fallback failed as well); names the partition and both errors."""
