"""Calibration data: the inputs int8 ranges are fitted on, and a disjoint held-out set the accuracy budget is
judged on. Real data when the caller gives it; otherwise inputs generated from the example's shapes and values,
with a warning, since ranges fitted to noise can miss real activations.

    >>> import torch
    >>> from dioe import calibration
    >>> example = (torch.randn(2, 16),)
    >>> data = [(torch.randn(2, 16),) for _ in range(40)]
    >>> s = calibration.split(data, example, n_calibrate=32, n_holdout=8)
    >>> len(s.calibrate), len(s.holdout), s.source
    (32, 8, 'given')
    >>> calibration.fingerprint(s.calibrate) == calibration.fingerprint(list(s.calibrate))
    True
"""

from __future__ import annotations

import hashlib
import random
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Literal, Sequence

import torch

from .capture import TensorSpec
from .errors import DIOEError, InputSpecError

Calibration = Iterable | Callable[[], Iterable] | None


@dataclass(frozen=True)
class Samples:
    """Inputs to calibrate on and held-out inputs to judge on; no held-out item equals a calibration item."""

    calibrate: list[tuple]
    holdout: list[tuple]
    source: Literal["given", "generated", "live"]   # "live": sampled from served calls


def split(calibration: Calibration, example_inputs: Sequence | torch.Tensor, *, n_calibrate: int, n_holdout: int,
          seed: int = 0) -> Samples:
    """Take `n_calibrate + n_holdout` distinct items and deal them, shuffled by `seed`, into the two sets.

    `calibration` is None (inputs are generated from `example_inputs`, with a warning), an iterable of input
    tuples shaped like `example_inputs` (a lone tensor is a tuple of one), or a zero-argument callable returning
    one. An iterable is read only as far as needed, so a large data loader is not drained: give it in a random
    order. Items repeated in the data count once.

        >>> s = split(None, (torch.randint(0, 100, (1, 8)),), n_calibrate=4, n_holdout=2)  # doctest: +SKIP
        UserWarning: DIOE calibrates on inputs generated from the example's shapes ...
    """
    example = _as_tuple(example_inputs)
    for name, n in (("n_calibrate", n_calibrate), ("n_holdout", n_holdout)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise DIOEError(f"{name} must be an integer >= 0; got {n!r}")
    need = n_calibrate + n_holdout
    if calibration is None:
        source = "generated"
        items: Iterable = generate(example, n=need, seed=seed)
        warnings.warn("DIOE calibrates on inputs generated from the example's shapes and value ranges (uniform "
                      "token ids, noise): int8 ranges fitted to them can miss real activations and cost accuracy. "
                      "Pass real inputs: dioe.optimize(..., calibration=[inputs, ...]).", UserWarning, stacklevel=2)
    else:
        source = "given"
        items = calibration() if callable(calibration) else calibration
    distinct: dict[str, tuple] = {}
    given = 0
    for i, item in enumerate(items if need else ()):
        item = _check(i, item, example)
        given += 1
        distinct.setdefault(digest(item), item)
        if len(distinct) == need:
            break
    if len(distinct) < need:
        what = ("the example's inputs are constant, so generated inputs repeat; pass calibration=[...]"
                if source == "generated" else "pass more data, or ask for fewer")
        raise DIOEError(f"calibration data has {len(distinct)} distinct item(s) ({given} given); {need} needed "
                        f"({n_calibrate} to calibrate + {n_holdout} held out): {what}")
    chosen = list(distinct.values())
    random.Random(seed).shuffle(chosen)  # a data set sorted by class must not put one class in the held-out set
    return Samples(calibrate=chosen[n_holdout:], holdout=chosen[:n_holdout], source=source)


def generate(example_inputs: Sequence | torch.Tensor, *, n: int, seed: int = 0) -> list[tuple]:
    """`n` input tuples shaped like `example_inputs`, drawn deterministically from `seed`.

    Integer tensors (token ids) are uniform in [0, max(example) + 1); a tensor whose example values are all 0
    or 1 is a mask and stays one, each row a prefix of ones of random length (all zeros stays all zeros: token
    type ids); float tensors are normal with the example's mean and standard deviation; other values are kept.

        >>> [x.shape for x in generate((torch.zeros(2, 3),), n=1)[0]]
        [torch.Size([2, 3])]
    """
    example = _as_tuple(example_inputs)
    g = torch.Generator().manual_seed(seed)
    return [tuple(_draw(x, g) for x in example) for _ in range(n)]


def _draw(x: Any, g: torch.Generator) -> Any:
    if not isinstance(x, torch.Tensor):
        return x
    ex = x.detach().cpu()
    if ex.dim() == 0 or ex.numel() == 0 or ex.is_complex():
        return x.clone()  # a scalar input is a setting, not data
    if ex.is_floating_point():
        f = ex.double()
        std = f.std().item() if f.numel() > 1 else 0.0
        out = torch.randn(ex.shape, generator=g, dtype=torch.float64) * std + f.mean().item()
    elif ex.dtype == torch.bool or ((ex == 0) | (ex == 1)).all():
        if not ex.any():
            return x.clone()
        lengths = torch.randint(1, ex.shape[-1] + 1, (*ex.shape[:-1], 1), generator=g)
        out = torch.arange(ex.shape[-1]) < lengths  # (..., L): each row a prefix of ones
    else:
        low, high = min(0, int(ex.min())), int(ex.max()) + 1
        out = torch.randint(low, high, ex.shape, generator=g, dtype=torch.int64)
    return out.to(dtype=x.dtype, device=x.device)


def fingerprint(items: Sequence[tuple]) -> str:
    """A stable hash of input tuples (count, order, shapes, dtypes and bytes): the key of int8 artifacts
    calibrated on them.

        >>> fingerprint([(torch.zeros(2),)]) == fingerprint([(torch.zeros(2),)])
        True
    """
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{len(items)} items;".encode())
    for item in items:
        h.update(digest(_as_tuple(item)).encode())
    return h.hexdigest()


def digest(item: tuple) -> str:
    """The content hash of one input tuple: equal tensors (shape, dtype, values) give equal digests."""
    h = hashlib.blake2b(digest_size=16)
    for x in item:
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().contiguous()
            h.update(f"{TensorSpec.of(x)};".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().tobytes() if x.numel() else b"")
        else:
            h.update(f"{type(x).__name__}:{x!r};".encode())
    return h.hexdigest()


def _as_tuple(x: Any) -> tuple:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def _spec_text(example: tuple) -> str:
    return "(" + ", ".join(str(TensorSpec.of(x)) if isinstance(x, torch.Tensor) else repr(x) for x in example) + ")"


def _check(i: int, item: Any, example: tuple) -> tuple:
    """`item` as a tuple, or an InputSpecError naming the item, what is wrong and the captured spec."""
    if isinstance(item, dict):
        raise InputSpecError(f"calibration item {i} is a dict; items are tuples of positional inputs like the "
                             f"example {_spec_text(example)}")
    item = _as_tuple(item)
    where = f"calibration item {i}"
    if len(item) != len(example):
        raise InputSpecError(f"{where} has {len(item)} input(s); expected {len(example)} like the example "
                             f"{_spec_text(example)}")
    for j, (x, want) in enumerate(zip(item, example)):
        if not isinstance(want, torch.Tensor):
            if x != want:
                raise InputSpecError(f"{where}: input {j} is {x!r}; the example has the constant {want!r}")
            continue
        if not isinstance(x, torch.Tensor):
            raise InputSpecError(f"{where}: input {j} is a {type(x).__name__}; expected a tensor "
                                 f"{TensorSpec.of(want)} (example {_spec_text(example)})")
        if x.shape != want.shape or x.dtype != want.dtype:
            raise InputSpecError(f"{where}: input {j} is {TensorSpec.of(x)}; expected {TensorSpec.of(want)} "
                                 f"(example {_spec_text(example)})")
    return item


__all__ = ["Samples", "digest", "fingerprint", "generate", "split"]
