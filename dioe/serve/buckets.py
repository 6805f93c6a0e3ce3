"""Buckets: one plan per (batch size, sequence length), and the stacking, padding and splitting of requests around
them. A DIOE plan is built for fixed shapes, so a batch of requests is padded up to the nearest bucket, run under
that bucket's plan, and cut back into each request's own rows (and sequence length).

Both the in-process `Batcher` and the Ray Serve replicas run their batches through `Buckets.run`.

    >>> buckets = Buckets(opt, model=model, max_batch_size=8)          # doctest: +SKIP
    >>> outs = buckets.run([(ids_a, mask_a), (ids_b, mask_b)])          # one output per request, in order
"""

from __future__ import annotations

import math
import threading
import warnings
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import DIOEError, InputSpecError
from ..runtime import Runtime
from ..settings import Settings


@dataclass(frozen=True, order=True)
class Bucket:
    batch: int
    seq: int | None = None   # the padded sequence length, for models with token inputs


def batch_buckets(max_batch_size: int, preferred: Sequence[int] = ()) -> tuple[int, ...]:
    """The batch sizes that get a plan: the preferred ones and the maximum; without preferred sizes, powers of two
    up to the maximum (so a batch is never padded to more than twice its rows)."""
    if not isinstance(max_batch_size, int) or max_batch_size < 1:
        raise DIOEError(f"max_batch_size must be a positive integer, got {max_batch_size!r}")
    bad = [b for b in preferred if not isinstance(b, int) or not 1 <= b <= max_batch_size]
    if bad:
        raise DIOEError(f"preferred_batch_sizes must be integers from 1 to max_batch_size ({max_batch_size}); "
                        f"got {bad}")
    sizes = set(preferred) if preferred else {1 << i for i in range(max_batch_size.bit_length())}
    return tuple(sorted(b for b in sizes | {max_batch_size} if b <= max_batch_size))


class Buckets:
    """The plans of one model, one per bucket, built with `dioe.optimize` on first use (or ahead, by `build`),
    and the batching of requests around them.

    Every input carries the batch on dimension 0. Integer inputs of rank 2 or more (token ids, attention masks)
    carry a sequence on dimension 1: requests up to the longest of `sequence_buckets` (by default the example's
    length) are padded with zeros, a zero attention mask hiding the padding, and outputs of rank 3 or more whose
    dimension 1 is the bucket's length are cut back to the request's."""

    def __init__(self, opt, *, model: torch.nn.Module | None = None, max_batch_size: int = 8,
                 preferred_batch_sizes: Sequence[int] = (), sequence_buckets: Sequence[int] | None = None,
                 optimize_options: Mapping[str, Any] | None = None):
        cap = opt.captured
        self.name, self.model, self.captured = cap.name, model, cap
        self.specs = cap.input_specs
        if not self.specs or any(s is None or not s.shape or not all(isinstance(d, int) for d in s.shape)
                                 for s in self.specs):
            raise DIOEError(f"{self.name}: batching needs every input to be a tensor of static shape with a batch "
                            f"dimension; the captured inputs are {cap._expected_text()}")
        self.input_names = cap.input_names
        self.max_batch_size = max_batch_size
        self.batch_sizes = batch_buckets(max_batch_size, tuple(preferred_batch_sizes))
        self.seq_inputs = tuple(i for i, s in enumerate(self.specs)
                                if not s.torch_dtype.is_floating_point and len(s.shape) >= 2)
        lengths = {self.specs[i].shape[1] for i in self.seq_inputs}
        if len(lengths) > 1:
            raise DIOEError(f"{self.name}: token inputs have different sequence lengths {sorted(lengths)}; "
                            "the batcher pads one sequence dimension shared by all of them")
        if self.seq_inputs:
            self.seq_buckets = tuple(sorted(set(sequence_buckets or lengths)))
            if any(not isinstance(t, int) or t < 1 for t in self.seq_buckets):
                raise DIOEError(f"sequence_buckets must be positive integers, got {list(self.seq_buckets)}")
        elif sequence_buckets:
            raise DIOEError(f"{self.name} has no token inputs (integer, rank 2 or more) with a sequence to pad; "
                            f"sequence_buckets={list(sequence_buckets)} does not apply")
        else:
            self.seq_buckets = ()
        self.options = dict(optimize_options or {})
        self.options.setdefault("hardware", opt.runtime.pool)
        self.options.setdefault("precision", "live" if hasattr(opt, "live") else "fp32" if all(
            p.precision == "fp32" for p in opt.plan.partitions) else "auto")
        self.options.setdefault("name", self.name)
        own = Bucket(self.specs[0].shape[0], next(iter(lengths)) if lengths else None)
        self._plans: dict[Bucket, Any] = {own: opt}
        self.sources: dict[Bucket, str] = {own: "given"}   # where each bucket's plan came from
        self._lock = threading.Lock()
        self._rows: list[tuple] | None = None   # the given calibration data, one row each (`calibration_for`)
        self._failed: dict[Bucket, str] = {}     # buckets whose optimize failed, and why
        self._chunks: dict[tuple, list[int]] = {}   # `chunk_sizes`, by rows and the buckets' times

    # -- requests ----------------------------------------------------------------------------------------------
    def check(self, inputs: Sequence) -> tuple[int, int | None]:
        """Validate one request's inputs; returns its (rows, sequence length). A clear error names what is wrong."""
        if not isinstance(inputs, (tuple, list)) or len(inputs) != len(self.specs):
            got = len(inputs) if isinstance(inputs, (tuple, list)) else type(inputs).__name__
            raise InputSpecError(f"{self.name}: expected {len(self.specs)} input(s) {self._expected()}, got {got}")
        rows = seq = None
        for i, (x, want, name) in enumerate(zip(inputs, self.specs, self.input_names)):
            if not isinstance(x, torch.Tensor):
                raise InputSpecError(f"{self.name}: input {name!r} must be a tensor, got {type(x).__name__}")
            if x.dtype != want.torch_dtype:
                raise InputSpecError(f"{self.name}: input {name!r} has dtype {str(x.dtype)[6:]}, expected "
                                     f"{want.dtype}")
            rest = list(want.shape[1:])
            got = list(x.shape[1:])
            if i in self.seq_inputs and x.dim() == len(want.shape):
                rest[0] = got[0] if 1 <= got[0] <= self.seq_buckets[-1] else f"1..{self.seq_buckets[-1]}"
            if x.dim() != len(want.shape) or got != rest:
                raise InputSpecError(f"{self.name}: input {name!r} has shape {list(x.shape)}, expected "
                                     f"[batch, {', '.join(map(str, rest))}]")
            if rows is None:
                rows = x.shape[0]
            elif x.shape[0] != rows:
                raise InputSpecError(f"{self.name}: inputs disagree on the batch: {name!r} has {x.shape[0]} "
                                     f"row(s), the first input {rows}")
            if i in self.seq_inputs:
                if seq is not None and x.shape[1] != seq:
                    raise InputSpecError(f"{self.name}: token inputs disagree on the sequence length "
                                         f"({seq} and {x.shape[1]} for {name!r})")
                seq = x.shape[1]
        if not 1 <= rows <= self.max_batch_size:
            raise InputSpecError(f"{self.name}: a request holds {rows} row(s); expected 1 to max_batch_size "
                                 f"({self.max_batch_size})")
        return rows, seq

    def _expected(self) -> str:
        return "(" + ", ".join(f"{n}: {s}" for n, s in zip(self.input_names, self.specs)) + ")"

    def bucket_for(self, rows: int, seq: int | None) -> Bucket:
        batch = next(b for b in self.batch_sizes if b >= rows)
        return Bucket(batch, None if seq is None else next(t for t in self.seq_buckets if t >= seq))

    def longest(self, batch: int) -> Bucket:
        """The bucket of `batch` rows at the longest sequence bucket (what a batch of full-length requests runs)."""
        return self.bucket_for(batch, self.seq_buckets[-1] if self.seq_buckets else None)

    def rows_to_take(self, rows: int) -> int:
        """How many of `rows` queued rows to batch now: all of them, or only as many as fill the largest bucket
        below where that bucket's plan runs at least as many rows per second as the padded one would (12 rows
        padded to a plan for 16 pay for 16; on a CPU whose time per row hardly falls with the batch, 8 now and 4
        next cost less). Decided on the plans' measured times, so only between buckets already built."""
        up = self.longest(rows)
        down = max((b for b in self.batch_sizes if b <= rows), default=None)
        if up.batch == rows or down is None:
            return rows
        t_up, t_down = self._measured_ms(up), self._measured_ms(Bucket(down, up.seq))
        if t_up is None or t_down is None:
            return rows
        return down if down / t_down >= rows / t_up else rows

    def chunk_sizes(self, rows: int) -> list[int]:
        """How to run `rows` rows that must all be answered now (what Ray Serve's `@serve.batch` hands a replica):
        as chunks of at most max_batch_size rows, or as the chunks whose bucket plans take the least time in all,
        where that saves more than the split margin of it. 5 rows padded to a plan for 8 pay for 8; where time
        grows with the rows, plans for 4 and 1 take less. Decided on the plans' measured times, so only between
        buckets already built."""
        times = tuple(self._measured_ms(self.longest(k)) for k in range(1, self.max_batch_size + 1))
        key = (rows, times)   # a live plan's promotion changes its time, not the buckets
        got = self._chunks.get(key)
        if got is None:
            got = self._chunks[key] = self._least_time(rows, dict(enumerate(times, start=1)))
        return list(got)

    def _least_time(self, rows: int, times: dict[int, float | None]) -> list[int]:
        default = [min(self.max_batch_size, rows - i) for i in range(0, rows, self.max_batch_size)]
        if any(times[k] is None for k in default):
            return default
        # best[n]: the least time for n rows (rounded, so that sums equal but for float error tie), in the fewest
        # chunks of those that take it, and the chunks; inf where n rows cannot be made of built buckets
        best: list[tuple[float, int, list[int]]] = [(0.0, 0, [])]
        for n in range(1, rows + 1):
            best.append(min(((round(best[n - k][0] + times[k], 9), best[n - k][1] + 1, best[n - k][2] + [k])
                             for k in range(1, min(n, self.max_batch_size) + 1)
                             if times[k] is not None and best[n - k][0] < math.inf), default=(math.inf, 0, [])))
        took, _, chunks = best[rows]
        margin = (self.options.get("settings") or Settings()).split_margin
        return sorted(chunks, reverse=True) if took < (1 - margin) * sum(times[k] for k in default) else default

    def _measured_ms(self, bucket: Bucket) -> float | None:
        opt = self._plans.get(bucket)
        if opt is None:
            return None
        ms = opt.plan.measured_ms or opt.plan.predicted_ms
        return ms if ms > 0 else None

    # -- plans -------------------------------------------------------------------------------------------------
    def plan(self, bucket: Bucket):
        """The optimized model of `bucket`, built on first use with `dioe.optimize` on inputs like the example's."""
        opt = self._plans.get(bucket)
        if opt is not None:
            return opt
        with self._lock:  # one build per bucket, however many threads ask
            if bucket in self._failed:   # not optimized again for every batch that asks: its requests run alone
                raise DIOEError(self._failed[bucket])
            if bucket not in self._plans:
                where = f"bucket batch={bucket.batch}{'' if bucket.seq is None else f', seq={bucket.seq}'}"
                if self.model is None:
                    raise DIOEError(f"{self.name}: {where} needs a plan of its own, and building one needs the "
                                    "model: pass model= to the batcher")
                from ..pipeline import optimize

                options = self.options
                try:
                    if options.get("calibration") is not None:
                        options = {**options, "calibration": self.calibration_for(bucket)}
                    self._plans[bucket] = optimize(self.model, self.examples(bucket), **options)
                except DIOEError as e:
                    self._failed[bucket] = f"{self.name}: {where} has no plan: its optimize failed: {e}"
                    raise DIOEError(self._failed[bucket]) from e
                self.sources[bucket] = "optimized"
            return self._plans[bucket]

    def build(self, buckets: Sequence[Bucket] | None = None) -> None:
        """Build the plans of `buckets` now (default: every batch size at the longest sequence bucket)."""
        for b in buckets or [self.longest(n) for n in self.batch_sizes]:
            self.plan(b)

    def save(self, folder: str | Path, buckets: Sequence[Bucket] | None = None) -> list[Path]:
        """Write the plans of `buckets` (default: every built one) into `folder`, one `b<batch>[-s<seq>].plan.json`
        each, for `load` in another process on this machine: a Ray replica loads them in seconds, where building
        one is an optimize."""
        folder = Path(folder)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise DIOEError(f"{folder}: cannot write bucket plans there ({e.strerror or e})") from None
        return [self._plans[b].save(folder / plan_file(b)) for b in (self.built if buckets is None else buckets)]

    def load(self, folder: str | Path, **load_options) -> tuple[Bucket, ...]:
        """Take the plans that `save` wrote into `folder` for this batcher's buckets (each batch size at each
        sequence bucket), each through `dioe.load` (checked against eager on one call) on this batcher's pool
        unless `load_options` name another. A plan made on another machine is passed over, with a warning, and its
        bucket optimized here when first needed, as is a bucket with no plan in `folder`. Returns the buckets
        loaded; `sources` says where each plan came from."""
        from ..pipeline import _pool, load
        from ..plan import Plan

        folder = Path(folder)
        if not folder.is_dir():
            raise DIOEError(f"{folder}: no folder of bucket plans there (Buckets.save writes one)")
        if self.model is None:
            raise DIOEError(f"{self.name}: loading bucket plans needs the model: pass model= to the batcher")
        if self.options.get("precision") == "live":
            raise DIOEError(f"{self.name}: a live batcher's buckets adapt from their own optimize; saved plans would "
                            "stop them adapting (save and load them with precision='auto' or a fixed precision)")
        for key in ("hardware", "settings", "cache_dir"):
            if key in self.options:
                load_options.setdefault(key, self.options[key])
        pool = load_options["hardware"] = _pool(load_options["hardware"])
        got = []
        for bucket in [Bucket(b, t) for b in self.batch_sizes for t in (self.seq_buckets or (None,))]:
            path = folder / plan_file(bucket)
            if bucket in self._plans or not path.is_file():
                continue
            made_for = Plan.load(path).pool_fingerprint
            if not pool.same_machine(made_for):
                warnings.warn(f"dioe: {path} was made on another machine ({made_for}); this one "
                              f"({pool.fingerprint()}) optimizes that bucket for itself", RuntimeWarning, stacklevel=2)
                continue
            opt = load(path, self.model, **load_options)
            specs = opt.captured.input_specs
            found = Bucket(specs[0].shape[0], specs[self.seq_inputs[0]].shape[1] if self.seq_inputs else None)
            if found != bucket:
                opt.runtime.close()
                raise DIOEError(f"{path}: the plan is for batch={found.batch}, seq={found.seq}, where its file name "
                                f"says batch={bucket.batch}, seq={bucket.seq}")
            with self._lock:
                kept = self._plans.setdefault(bucket, opt) is opt   # not if a caller's build got there first
                if kept:
                    self.sources[bucket] = f"loaded from {path}"
            if kept:
                got.append(bucket)
            else:
                opt.runtime.close()
        return tuple(got)

    def describe(self) -> list[dict]:
        """Each built bucket: its batch and sequence length, what its plan runs (each engine and precision, in
        partition order) and where the plan came from (`sources`)."""
        return [{"batch": b.batch, "seq": b.seq, "source": self.sources.get(b, ""),
                 "engines": engines(self._plans[b].plan)} for b in self.built]

    @property
    def built(self) -> tuple[Bucket, ...]:
        return tuple(sorted(self._plans, key=lambda b: (b.batch, b.seq or 0)))

    def fallbacks(self) -> int:
        """Run-time engine fallbacks over every bucket's plan so far."""
        return sum(o.stats["fallback_calls"] for o in list(self._plans.values()))

    def calibration_for(self, bucket: Bucket) -> list[tuple]:
        """The calibration data given in `optimize_options` (inputs shaped like the example's), rebatched to
        `bucket`: its rows, in order, dealt into inputs of `bucket.batch` rows, token inputs padded (or cut) to
        the bucket's length. Each bucket's plan is then calibrated and judged on the same data, row for row; a
        batch of 16 needs 16 times as many rows per input, so a short data set fails that bucket's optimize
        with an error that says how many inputs it needs."""
        if self._rows is None:
            given = self.options["calibration"]
            self._rows = []
            for item in (given() if callable(given) else given):
                item = tuple(item) if isinstance(item, (tuple, list)) else (item,)
                if len(item) != len(self.specs) or not all(isinstance(x, torch.Tensor) and x.dim() for x in item):
                    raise InputSpecError(f"{self.name}: calibration items must be tuples of {len(self.specs)} "
                                         f"tensor(s) shaped like {self._expected()}")
                self._rows += [tuple(x[r:r + 1] for x in item) for r in range(item[0].shape[0])]
        out = []
        for start in range(0, len(self._rows) - bucket.batch + 1, bucket.batch):
            rows = self._rows[start:start + bucket.batch]
            out.append(tuple(torch.cat([_pad_seq(r[i][:, :bucket.seq], bucket.seq) if i in self.seq_inputs else r[i]
                                        for r in rows]) for i in range(len(self.specs))))
        return out

    def examples(self, bucket: Bucket) -> tuple[torch.Tensor, ...]:
        """Inputs like the captured example's, at `bucket`'s batch and sequence length."""
        out = []
        for i, ex in enumerate(self.captured.example_inputs):
            x = ex[:1].expand(bucket.batch, *ex.shape[1:])
            if i in self.seq_inputs:
                x = _pad_seq(x[:, :bucket.seq], bucket.seq)
            out.append(x.contiguous())
        return tuple(out)

    # -- batches -----------------------------------------------------------------------------------------------
    def run(self, requests: Sequence[Sequence[torch.Tensor]], shapes: Sequence[tuple] | None = None) -> list:
        """Run requests (each a tuple of input tensors, checked by `check`) as one batch; returns each request's
        outputs, structured like the model's, in order."""
        return self.submit(requests, shapes).result()

    def submit(self, requests: Sequence[Sequence[torch.Tensor]], shapes: Sequence[tuple] | None = None) -> Future:
        """`run` as a Future. A bucket whose plan has stages on several members takes the batch into its pipeline
        and returns at once, so the next batch can enter the first stage while this one is in the second; any
        other runs the batch now, in the caller's thread."""
        shapes = list(shapes) if shapes is not None else [self.check(r) for r in requests]
        rows = sum(r for r, _ in shapes)
        seqs = [s for _, s in shapes if s is not None]
        bucket = self.bucket_for(rows, max(seqs) if seqs else None)
        if rows > bucket.batch:
            raise DIOEError(f"{self.name}: a batch of {rows} rows exceeds max_batch_size ({self.max_batch_size})")
        opt = self.plan(bucket)
        flat = []
        for i in range(len(self.specs)):
            parts = [r[i] if i not in self.seq_inputs else _pad_seq(r[i], bucket.seq) for r in requests]
            if rows < bucket.batch:  # the pad rows repeat a real one, so no engine sees values it never saw
                parts.append(parts[-1][-1:].expand(bucket.batch - rows, *parts[-1].shape[1:]))
            flat.append(torch.cat(parts) if len(parts) > 1 else parts[0])  # (bucket.batch, ...)
        out: Future = Future()

        def split(outs) -> None:
            rows_of = [k for k, _ in shapes]
            pad = bucket.batch - sum(rows_of)
            # One copy of each batched output per batch, cut into a view per request: the copy frees the engine's
            # buffers for the next batch, and one copy costs far less than one per request (16 small copies were a
            # quarter of tiny-bert's batch). A request's view keeps the batch's copy alive while it is held.
            pieces = [o.clone().split(rows_of + [pad] * bool(pad))
                      if isinstance(o, torch.Tensor) and o.dim() and o.shape[0] == bucket.batch else None
                      for o in outs]
            results = []
            for j, (_, seq) in enumerate(shapes):
                mine = [o if p is None else self._cut_seq(p[j], bucket, seq) for o, p in zip(outs, pieces)]
                results.append(self.captured.unflatten_outputs(mine))
            out.set_result(results)

        # a plain runtime whose plan spans members streams the batch through its pipeline; a live model's runtime
        # runs it through the live model, which times, samples and swaps plans between calls
        rt = opt.runtime
        pipe = rt.pipeline() if type(rt) is Runtime and len({c.member for c in rt.compiled.values()}) > 1 else None
        if pipe is None or not pipe.pipelined:
            split(rt.run(flat))
            return out

        def done(f: Future) -> None:
            try:
                split(f.result())
            except Exception as e:  # noqa: BLE001 -- the batch's error, for the batcher to answer its requests
                out.set_exception(e)
        pipe.submit(flat).add_done_callback(done)
        return out

    @staticmethod
    def _cut_seq(o: torch.Tensor, bucket: Bucket, seq: int | None) -> torch.Tensor:
        """A request's rows cut back from the bucket's sequence length to its own."""
        if seq is not None and seq != bucket.seq and o.dim() >= 3 and o.shape[1] == bucket.seq:
            return o[:, :seq]
        return o


def engines(plan) -> str:
    """What a plan runs: each distinct engine and precision, in partition order ("openvino int8, openvino bf16")."""
    return ", ".join(dict.fromkeys(f"{p.backend} {p.precision}" for p in plan.partitions))


def plan_file(bucket: Bucket) -> str:
    """The file name of `bucket`'s plan in a folder written by `Buckets.save`."""
    return f"b{bucket.batch}{'' if bucket.seq is None else f'-s{bucket.seq}'}.plan.json"


def _pad_seq(x: torch.Tensor, length: int) -> torch.Tensor:
    """Zero-pad dimension 1 of `x` to `length` (token id 0 is padding, and a mask of 0 hides it)."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros(x.shape[0], length - x.shape[1], *x.shape[2:])
    return torch.cat([x, pad], dim=1)
