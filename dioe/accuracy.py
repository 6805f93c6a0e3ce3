"""Accuracy budgets: how close an optimized model must stay to fp32 eager, judged per held-out sample and
claimed with a one-sided confidence bound rather than a point estimate.

    >>> import torch
    >>> from dioe.accuracy import Budget, evaluate
    >>> ref = [(torch.randn(4, 10, generator=torch.Generator().manual_seed(i)),) for i in range(16)]
    >>> budget = Budget.default_for(ref[0])        # (batch, classes) logits: top-1 agreement and cosine
    >>> budget
    Budget(top1=0.9, cosine=0.999, rel_l2=None, confidence=0.95, samples=64, outputs=(0,))
    >>> report = evaluate(budget, ref, [(y * 1.01,) for (y,) in ref])
    >>> report.met, report.results[0].bound > 0.95
    (True, True)

A sample is one row of a held-out batch: 16 held-out inputs of batch 4 are 64 samples. Outputs are compared as
flat tuples (`torch.utils._pytree.tree_leaves(model(*inputs))`), one per held-out input.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from statistics import NormalDist
from typing import Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from .errors import DIOEError

# metric -> True where higher is better (the threshold is a floor), False where it is a ceiling
METRICS = {"top1": True, "cosine": True, "rel_l2": False}


def _allowed() -> str:
    return ", ".join(METRICS)


@dataclass(frozen=True, init=False)
class Budget:
    """How far a plan may drift from fp32 eager; every metric that is set must hold.

        >>> Budget(cosine=0.999)
        Budget(top1=None, cosine=0.999, rel_l2=None, confidence=0.95, samples=64, outputs=None)
        >>> Budget.parse("top1>=0.95, rel_l2<=0.02, samples=300") == Budget(top1=0.95, rel_l2=0.02, samples=300)
        True

    `Budget.default_for(outputs)` picks metrics and thresholds from what the model returns.
    """

    top1: float | None = None      # floor on the lower bound of top-1 agreement with the fp32 argmax
    cosine: float | None = None    # floor on the lower bound of the mean per-sample cosine similarity
    rel_l2: float | None = None    # ceiling on the upper bound of the mean ||ref - got|| / ||ref||
    confidence: float = 0.95       # one-sided confidence of every bound
    samples: int = 64              # held-out samples (batch rows) to judge on
    outputs: tuple[int, ...] | None = None  # flat output positions judged; None: every floating-point output

    def __init__(self, *args: Any, top1: float | None = None, cosine: float | None = None, rel_l2: float | None = None,
                 confidence: float = 0.95, samples: int = 64, outputs: Sequence[int] | None = None,
                 **unknown: Any):
        # a hand-written __init__ so that a misspelt metric is a DIOEError naming the real ones, not a TypeError
        if args:
            raise DIOEError(f"Budget takes keywords, such as Budget(cosine=0.999); got {args!r} by position")
        if unknown:
            raise DIOEError(f"unknown budget metric(s) {', '.join(map(repr, unknown))}; the metrics are "
                            f"{_allowed()} (and the options confidence, samples, outputs)")
        for name, value in (("top1", top1), ("cosine", cosine), ("rel_l2", rel_l2)):
            if value is not None:
                _check_threshold(name, value)
        if top1 is None and cosine is None and rel_l2 is None:
            raise DIOEError(f"a Budget needs at least one metric of {_allowed()}, such as Budget(cosine=0.999); "
                            "Budget.default_for(outputs) picks them from the model's output")
        if isinstance(confidence, bool) or not isinstance(confidence, (int, float)) or not 0.5 <= confidence < 1:
            raise DIOEError(f"budget confidence must be in [0.5, 1), such as 0.95; got {confidence!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 2:
            raise DIOEError(f"budget samples must be an integer >= 2 (a bound needs a spread); got {samples!r}")
        if outputs is not None:
            outputs = tuple(outputs)
            if not outputs or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in outputs):
                raise DIOEError(f"budget outputs must be flat output positions (integers >= 0); got {outputs!r}")
        for name, value in (("top1", top1), ("cosine", cosine), ("rel_l2", rel_l2), ("confidence", confidence),
                            ("samples", samples), ("outputs", outputs)):
            object.__setattr__(self, name, float(value) if name in METRICS and value is not None else value)

    def holdout_inputs(self, batch: int) -> int:
        """How many held-out inputs of `batch` rows make `samples`: the `n_holdout` of `calibration.split`.

            >>> Budget(cosine=0.999).holdout_inputs(batch=4)
            16
        """
        return -(-self.samples // max(1, batch))

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics that are set, with their thresholds."""
        return {m: getattr(self, m) for m in METRICS if getattr(self, m) is not None}

    @classmethod
    def parse(cls, text: str) -> "Budget":
        """A budget from text such as "cosine>=0.999" or "top1>=0.99, rel_l2<=0.02, samples=300" (a CLI option).

        Floors take `>=`, ceilings `<=`, options `=`; terms are separated by commas or spaces, and judged
        outputs by plus signs (`outputs=0+2`). `str(budget)` writes this form.
        """
        kw: dict[str, Any] = {}
        for term in filter(None, re.split(r"[,\s]+", text.strip())):
            m = re.fullmatch(r"([A-Za-z_][\w]*)(>=|<=|=)([^<>=]+)", term)
            if not m:
                raise DIOEError(f"budget term {term!r} is not metric>=value, rel_l2<=value or option=value; "
                                f"metrics: {_allowed()}")
            name, op, value = m.groups()
            if name in METRICS:
                want = ">=" if METRICS[name] else "<="
                if op != want:
                    raise DIOEError(f"budget term {term!r}: {name} is a {'floor' if want == '>=' else 'ceiling'}, "
                                    f"write {name}{want}{value}")
            elif name in ("confidence", "samples", "outputs"):
                if op != "=":
                    raise DIOEError(f"budget term {term!r}: write {name}={value}")
            else:
                kw[name] = value  # Budget() names the allowed ones
                continue
            try:
                kw[name] = (int(value) if name == "samples" else
                            tuple(int(i) for i in value.split("+")) if name == "outputs" else float(value))
            except ValueError:
                raise DIOEError(f"budget term {term!r}: {value!r} is not a number") from None
        return cls(**kw)

    def __str__(self) -> str:
        terms = [f"{m}{'>=' if METRICS[m] else '<='}{v:g}" for m, v in self.metrics.items()]
        terms += [f"confidence={self.confidence:g}", f"samples={self.samples}"]
        return ", ".join(terms + ([f"outputs={'+'.join(map(str, self.outputs))}"] if self.outputs else []))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["outputs"] = None if self.outputs is None else list(self.outputs)
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Budget":
        return cls(**d)

    @classmethod
    def default_for(cls, reference_outputs: Any) -> "Budget":
        """Conservative metrics for what the model returns: its eager output for one input (a tensor, tuple,
        dict or Hugging Face ModelOutput) or one sample's flat tuple of output tensors.

        - classification logits, a (batch, classes) float tensor or a ModelOutput's `logits`: top-1 agreement
          and cosine; that output alone is judged;
        - token logits, (batch, seq, vocab) or a 3-D `logits`: per-token top-1 agreement and cosine;
        - anything else (embeddings, hidden states, several unnamed outputs): cosine and relative L2 on every
          floating-point output. A bare tuple has no names, so only a single unnamed output is read by shape.

        Thresholds (one-sided 95% bounds over `samples=64` held-out rows):
        - cosine >= 0.999 on the lower bound of the mean. An int8 transformer under NNCF's default settings
          kept a worst-sample cosine of 0.9997 against fp32 on this project's probe, so 0.999 passes healthy
          int8 and fails a broken one (a wrong scale or a saturated layer shows as 0.99 or below).
        - rel_l2 <= 0.05 on the upper bound of the mean. For errors small against the output,
          rel_l2 ~ sqrt(2 (1 - cosine)), so 0.05 is the same bar as cosine 0.99875; it adds what cosine cannot
          see, a wrong scale.
        - top1 >= 0.9 on the Wilson lower bound. 64 samples cannot claim more: even with no disagreement the
          one-sided 95% bound is 0.959 (the rule of three gives 1 - 3/64 = 0.953), and claiming 0.99 needs about
          300 agreeing samples (3 / 0.01, NNCF's default subset size for the same reason). 0.9 over 64 samples
          tolerates at most 2 disagreements; raise `samples` with `top1` to ask for more.
          For token logits each sequence counts as one sample (its tokens are not independent), so the bound
          uses the number of sequences, not of tokens.

            >>> Budget.default_for(torch.zeros(1, 384, 768))   # a bare 3-D tensor is read as token logits
            Budget(top1=0.9, cosine=0.999, rel_l2=None, confidence=0.95, samples=64, outputs=(0,))
        """
        leaves = pytree.tree_flatten_with_path(reference_outputs)[0]
        floats = [(i, _leaf_name(path), t) for i, (path, t) in enumerate(leaves)
                  if isinstance(t, torch.Tensor) and t.is_floating_point()]
        if not floats:
            raise DIOEError(f"no floating-point output to judge accuracy on in {type(reference_outputs).__name__}; "
                            "set the metrics yourself: Budget(top1=..., outputs=(i,))")
        named = [f for f in floats if f[1] == "logits"]
        if named:
            logits = named[0]
        elif len(floats) == 1 and floats[0][1] is None:
            logits = floats[0]
        else:
            logits = None
        # a single score per row (shape (batch, 1)) has no argmax to agree on: judged as a value
        if logits is not None and logits[2].dim() in (2, 3) and logits[2].shape[-1] >= 2:
            return cls(top1=0.9, cosine=0.999, outputs=(logits[0],))
        return cls(cosine=0.999, rel_l2=0.05, outputs=None)


def _check_threshold(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DIOEError(f"budget {name} must be a number; got {value!r}")
    if name == "rel_l2" and value <= 0:
        raise DIOEError(f"budget rel_l2 is a ceiling on relative error and must be > 0, such as 0.02; got {value}")
    if name != "rel_l2" and not 0 < value <= 1:
        raise DIOEError(f"budget {name} must be in (0, 1], such as {0.99 if name == 'top1' else 0.999}; got {value}")


def _leaf_name(path: tuple) -> str | None:
    """The field or key an output leaf sits under (`logits` in a ModelOutput or dict); None in a bare tuple."""
    last = path[-1] if path else None
    if isinstance(last, pytree.MappingKey):
        return str(last.key)
    return last.name if isinstance(last, pytree.GetAttrKey) else None


# -- bounds -----------------------------------------------------------------------------------------------------
def wilson_lower(successes: float, n: int, confidence: float) -> float:
    """One-sided Wilson lower bound of a rate seen as `successes` out of `n`.

        >>> round(wilson_lower(64, 64, 0.95), 4)    # no failure in 64: the rate is above 0.959, at 95%
        0.9594
    """
    if n <= 0:
        return 0.0
    z = NormalDist().inv_cdf(confidence)
    p = successes / n
    centre = p + z * z / (2 * n)
    margin = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - margin) / (1 + z * z / n))


def t_quantile(p: float, df: int) -> float:
    """Student's t quantile for an integer `df`, exact: bisection on the closed-form CDF (Abramowitz and Stegun
    26.7.3-4), so that small samples get their wide bound without scipy.

        >>> round(t_quantile(0.95, 63), 4), round(t_quantile(0.95, 1), 4)
        (1.6694, 6.3138)
    """
    if p <= 0.5:
        return -t_quantile(1 - p, df) if p < 0.5 else 0.0
    lo, hi = 0.0, 1.0
    while _t_cdf(hi, df) < p:
        lo, hi = hi, hi * 2
    for _ in range(80):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if _t_cdf(mid, df) < p else (lo, mid)
    return hi  # the upper end: a bound built on it is never narrower than the exact one


def _t_cdf(t: float, df: int) -> float:
    theta = math.atan(t / math.sqrt(df))
    c2, s = math.cos(theta) ** 2, math.sin(theta)
    if df % 2:  # odd: (2/pi) (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, series = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= c2 * (2 * k) / (2 * k + 1)
            series += term
        a = 2 / math.pi * (theta + s * math.cos(theta) * series)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, series = 1.0, 1.0
        for k in range(1, df // 2):
            term *= c2 * (2 * k - 1) / (2 * k)
            series += term
        a = s * series
    return (1 + a) / 2


def mean_bound(values: Sequence[float], confidence: float, *, upper: bool) -> float:
    """One-sided t bound of the mean of `values` (lower unless `upper`); infinite where it cannot be had: fewer
    than two values, or a non-finite one."""
    n = len(values)
    if n < 2 or not all(math.isfinite(v) for v in values):
        return math.inf if upper else -math.inf
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return mean + half if upper else mean - half


# -- per-sample comparison --------------------------------------------------------------------------------------
def _rows(t: torch.Tensor) -> torch.Tensor:
    """(samples, ...) in float64: dim 0 is the batch; a tensor of one dimension or none is one sample."""
    t = t.detach().to("cpu", torch.float64)
    return t.unsqueeze(0) if t.dim() < 2 else t


def cosine(ref: torch.Tensor, got: torch.Tensor) -> list[float]:
    """Cosine similarity of each flattened row; 1 where both rows are zero, -1 where a value is not finite."""
    r, g = (x.reshape(x.shape[0], -1) for x in (_rows(ref), _rows(got)))
    nr, ng = r.norm(dim=1), g.norm(dim=1)
    cos = (r * g).sum(1) / (nr * ng)
    cos = torch.where((nr == 0) & (ng == 0), 1.0, torch.where((nr == 0) | (ng == 0), 0.0, cos))
    return [v if math.isfinite(v) else -1.0 for v in cos.clamp(-1, 1).tolist()]


def rel_l2(ref: torch.Tensor, got: torch.Tensor) -> list[float]:
    """||ref - got|| / ||ref|| of each flattened row; 0 where both are zero, inf where ref alone is."""
    r, g = (x.reshape(x.shape[0], -1) for x in (_rows(ref), _rows(got)))
    err, nr = (r - g).norm(dim=1), r.norm(dim=1)
    out = torch.where(err == 0, 0.0, err / nr)
    return [v if math.isfinite(v) else math.inf for v in out.tolist()]


def top1(ref: torch.Tensor, got: torch.Tensor) -> list[tuple[int, int]]:
    """(agreeing, compared) argmaxes over the last dimension for each row: one per row of (batch, classes)
    logits, one per token of (batch, seq, vocab) logits."""
    r, g = _rows(ref), _rows(got)
    if r.shape[-1] < 2:
        raise DIOEError(f"top-1 agreement needs class scores in the last dimension; the output has shape "
                        f"{list(ref.shape)}")
    same = (r.argmax(-1) == g.argmax(-1)) & torch.isfinite(g).all(-1)
    same = same.reshape(same.shape[0], -1)
    return [(int(k), same.shape[1]) for k in same.sum(1).tolist()]


PER_SAMPLE = {"top1": top1, "cosine": cosine, "rel_l2": rel_l2}  # metric -> its per-sample values


@dataclass(frozen=True)
class MetricResult:
    """One metric on one output, over every held-out sample."""

    metric: str
    output: int          # flat output position
    value: float         # point estimate: the agreement rate, or the mean over samples
    bound: float         # one-sided bound at the report's confidence, on the side the threshold guards
    worst: float         # the worst single sample
    threshold: float
    samples: int
    items: int           # what was compared: tokens for per-token top-1, else samples
    met: bool

    @property
    def margin(self) -> float:
        """How far inside the threshold the bound lies (negative: violated), in the metric's units."""
        return self.bound - self.threshold if METRICS[self.metric] else self.threshold - self.bound

    def summary(self, confidence: float) -> str:
        side = ">=" if METRICS[self.metric] else "<="
        return (f"{self.metric} {_show(self.value, 5)} ({side} {_show(self.bound, 5)} at {confidence:.0%}, "
                f"n={self.samples}, worst {_show(self.worst, 4)}) vs {self.threshold:g}: "
                f"{'met' if self.met else 'NOT met'}")


def _show(x: float, digits: int) -> str:
    """`x` to `digits` significant digits, or as many decimals as it takes not to print 1 for 0.999996; 1 within
    1e-9 is rounding in the comparison itself and prints as 1."""
    text = f"{x:.{digits}g}"
    if 1e-9 < 1 - x and float(text) == 1:
        text = f"{x:.{1 - math.floor(math.log10(1 - x))}f}"
    return text


@dataclass(frozen=True)
class AccuracyReport:
    """Every (metric, output) the budget asked for, measured against fp32 eager; `met` when all hold.

        >>> AccuracyReport.from_dict(report.to_dict()) == report       # doctest: +SKIP
        True
    """

    results: tuple[MetricResult, ...]
    confidence: float

    @property
    def met(self) -> bool:
        return all(r.met for r in self.results)

    def summary(self) -> str:
        """One line: per metric, the output closest to failing, e.g. "cosine 0.99991 (>= 0.99987 at 95%, n=64,
        worst 0.9996) vs 0.999: met"."""
        binding: dict[str, MetricResult] = {}
        for r in self.results:
            if r.metric not in binding or r.margin < binding[r.metric].margin:
                binding[r.metric] = r
        several = len({r.output for r in self.results}) > 1
        return "; ".join((f"output {r.output} " if several else "") + r.summary(self.confidence)
                         for r in binding.values())

    def to_dict(self) -> dict:
        return {"met": self.met, "confidence": self.confidence, "results": [asdict(r) for r in self.results]}

    @classmethod
    def from_dict(cls, d: Mapping) -> "AccuracyReport":
        known = {f.name for f in fields(MetricResult)}
        for r in d["results"]:
            if set(r) != known:
                raise DIOEError(f"accuracy report result has keys {sorted(r)}; expected {sorted(known)}")
        return cls(tuple(MetricResult(**r) for r in d["results"]), d["confidence"])  # `met` is derived


def evaluate(budget: Budget, reference: Sequence, candidate: Sequence) -> AccuracyReport:
    """Judge `candidate` outputs against fp32 eager `reference` outputs under `budget`.

    Both are sequences with one flat tuple of output tensors per held-out input (a lone tensor is taken as a
    tuple of one); each batch row is a sample. The report says how many samples it judged; gathering
    `budget.samples` of them is the caller's part (`budget.holdout_inputs(batch)` held-out inputs).

        >>> ref = [(torch.eye(8),)] * 8
        >>> evaluate(Budget(top1=0.9), ref, ref).summary()
        'top1 1 (>= 0.95944 at 95%, n=64, worst 1) vs 0.9: met'
    """
    reference = [r if isinstance(r, (tuple, list)) else (r,) for r in reference]
    candidate = [c if isinstance(c, (tuple, list)) else (c,) for c in candidate]
    if not reference or len(reference) != len(candidate):
        raise DIOEError(f"evaluate needs one candidate output per reference output and at least one; got "
                        f"{len(reference)} reference and {len(candidate)} candidate")
    outputs = budget.outputs if budget.outputs is not None else tuple(
        i for i, t in enumerate(reference[0]) if isinstance(t, torch.Tensor) and t.is_floating_point())
    if not outputs:
        raise DIOEError("the reference has no floating-point output to judge; name one with Budget(outputs=...)")
    results = []
    for j in outputs:
        per = {m: [] for m in budget.metrics}
        for i, (ref, got) in enumerate(zip(reference, candidate)):
            r, g = _pair(i, j, ref, got)
            for m in per:
                per[m] += PER_SAMPLE[m](r, g)
        results += [_result(m, j, vals, budget.metrics[m], budget.confidence) for m, vals in per.items()]
    return AccuracyReport(tuple(results), budget.confidence)


def _pair(i: int, j: int, ref: Sequence, got: Sequence) -> tuple[torch.Tensor, torch.Tensor]:
    where = f"held-out input {i}, output {j}"
    if len(ref) != len(got) or j >= len(ref):
        raise DIOEError(f"{where}: reference has {len(ref)} output(s), candidate {len(got)}")
    r, g = ref[j], got[j]
    if not (isinstance(r, torch.Tensor) and isinstance(g, torch.Tensor)):
        raise DIOEError(f"{where}: expected tensors, got {type(r).__name__} and {type(g).__name__}")
    if r.shape != g.shape:
        raise DIOEError(f"{where}: candidate shape {list(g.shape)} != reference shape {list(r.shape)}")
    return r, g


def _result(metric: str, output: int, values: list, threshold: float, confidence: float) -> MetricResult:
    n = len(values)
    if metric == "top1":
        agree, items = sum(a for a, _ in values), sum(c for _, c in values)
        value = agree / items
        # each sample counts once in the bound: the tokens of one sequence fail together, not independently
        bound = wilson_lower(value * n, n, confidence)
        worst = min(a / c for a, c in values)
        return MetricResult(metric, output, value, bound, worst, threshold, n, items, bound >= threshold)
    finite = all(math.isfinite(v) for v in values)
    value = sum(values) / n if finite else math.inf
    if metric == "cosine":
        bound = max(-1.0, mean_bound(values, confidence, upper=False))
        return MetricResult(metric, output, value, bound, min(values), threshold, n, n, bound >= threshold)
    bound = mean_bound(values, confidence, upper=True)
    return MetricResult(metric, output, value, bound, max(values), threshold, n, n, bound <= threshold)


__all__ = ["AccuracyReport", "Budget", "METRICS", "MetricResult", "PER_SAMPLE", "cosine", "evaluate", "mean_bound",
           "rel_l2", "t_quantile", "top1", "wilson_lower"]
