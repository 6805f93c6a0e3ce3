"""What the backends share to run a partition in lower precision: checking calibration data, naming the artifacts
it builds, the CPU trait that changes how int8 must be quantized, and how a precision read back from an engine
is written.

    >>> from dioe.quantization import artifact_key, applied
    >>> artifact_key("int8", "dynamic")
    'int8.0906bb88ff30d69f'
    >>> applied("int8", "fp32", lowered=12, kept=4)
    'int8+fp32'
"""

from __future__ import annotations

import functools
import hashlib
from typing import TYPE_CHECKING, Sequence

import torch

from .calibration import _check, fingerprint
from .devices import CpuInfo
from .errors import BackendError, InputSpecError

if TYPE_CHECKING:
    from .backend import Partition

# Inputs for calibrating a partition: tuples shaped like its example inputs, on the CPU.
Calibration = Sequence[tuple]


def check_calibration(part: Partition, calibration: Calibration | CalibrationKey) -> tuple[tuple, ...] | CalibrationKey:
    """`calibration` as a tuple of input tuples, each checked against the partition's example inputs as
    `dioe.calibration` checks a model's (count, shapes, dtypes, constants), and on the CPU: an engine's
    calibration fails far from the cause (a shape error inside an observer) on a sample that does not fit, and
    the static-shape artifacts it builds fit only these shapes."""
    if isinstance(calibration, CalibrationKey):
        return calibration
    samples = []
    for i, item in enumerate(calibration):
        try:
            item = _check(i, item, tuple(part.example_inputs))
        except InputSpecError as e:
            raise BackendError(f"partition {part.id}: {e}") from None
        off = [j for j, x in enumerate(item) if isinstance(x, torch.Tensor) and x.device.type != "cpu"]
        if off:
            raise BackendError(f"partition {part.id}: calibration item {i}, input {off[0]} is on "
                               f"{item[off[0]].device}; calibration data lives on the CPU")
        samples.append(item)
    if not samples:
        raise BackendError(f"partition {part.id}: calibration is empty; pass at least one input tuple")
    return tuple(samples)


def artifact_key(precision: str, recipe: str, calibration: Calibration | CalibrationKey | None = None) -> str:
    """The part of an artifact's file name after the partition digest: the precision, then a hash of how it was
    built (`recipe`: the library, its settings) and of the calibration data (`dioe.calibration.fingerprint`, or
    that fingerprint itself as a `CalibrationKey`), so that an int8 model is never reused for another calibration
    set or recipe (one built without the saturation fix must not be read on a CPU that needs it), nor confused
    with the fp32 export of the same digest."""
    h = hashlib.blake2b(recipe.encode(), digest_size=8)
    if calibration is not None:
        h.update((calibration if isinstance(calibration, CalibrationKey) else fingerprint(list(calibration))).encode())
    return f"{precision}.{h.hexdigest()}"


class CalibrationKey(str):
    """The fingerprint of calibration data a plan was built on, standing in for the data when a saved plan is
    loaded: an engine reuses the artifact it keys and, finding none, says so rather than calibrating anew."""


def missing(part: Partition, key: CalibrationKey, engine: str) -> BackendError:
    """The error for a plan's int8 artifact that is no longer in the cache."""
    return BackendError(f"partition {part.id}: the {engine} int8 model this plan was calibrated for "
                        f"(calibration {key}) is not in the cache (cleared, another cache folder, or keyed anew by a newer "
                        "DIOE); optimize again to rebuild it")


@functools.cache
def u8s8_saturates() -> bool:
    """Whether this x86 CPU lacks an int8 dot-product instruction (AVX-512 VNNI, AVX-VNNI, AMX-INT8). Without
    one, engines multiply u8 activations by s8 weights with VPMADDUBSW, whose 16-bit pairwise sums saturate;
    ONNX Runtime's answer is `reduce_range` (7-bit weights), NNCF's `overflow_fix`. On an AVX2 EPYC, NNCF's
    default (the fix on the first layer only) gave tiny-mlp a worst cosine of 0.949 against fp32 over 16
    inputs, the fix on every layer 0.997."""
    cpu = CpuInfo.read()
    return cpu.machine in ("x86_64", "AMD64") and not cpu.flags & {"avx512_vnni", "avx_vnni", "amx_int8"}


def applied(low: str, rest: str, *, lowered: int, kept: int) -> str:
    """The precision an engine runs, from its own count of heavy ops (matmuls, convolutions, attention) in the
    low precision (`lowered`) and in the rest (`kept`): "int8", or "int8+fp32" for a mix; `rest` when none is
    lowered. The caller decides whether that is an error."""
    if not lowered:
        return rest
    return low if not kept else f"{low}+{rest}"
