"""Accuracy budgets: per-sample metrics on hand-built outputs, their confidence bounds, budget errors, the default
metrics per output kind, and the report's JSON round trip."""

import dataclasses
import json
import math
import re

import pytest
import torch

from dioe import Budget, DIOEError
from dioe.accuracy import AccuracyReport, evaluate, mean_bound, t_quantile, wilson_lower


def logits(n_inputs=16, batch=4, classes=10, seed=0):
    """Held-out outputs of a classifier: one flat tuple per input, each a (batch, classes) tensor."""
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, classes, generator=g),) for _ in range(n_inputs)]


def flip_argmax(rows: torch.Tensor, which) -> torch.Tensor:
    """The same logits with the argmax of each row in `which` moved to another class."""
    out = rows.clone()
    for i in which:
        out[i, (out[i].argmax() + 1) % out.shape[1]] = out[i].max() + 1
    return out


def result(report, metric, output=0):
    return next(r for r in report.results if r.metric == metric and r.output == output)


# -- metrics ----------------------------------------------------------------------------------------------------
def test_identical_outputs_are_perfect():
    ref = logits()
    report = evaluate(Budget(top1=0.9, cosine=0.999, rel_l2=0.05), ref, [(y.clone(),) for (y,) in ref])
    assert report.met
    top1, cos, rel = (result(report, m) for m in ("top1", "cosine", "rel_l2"))
    assert (top1.value, top1.worst, top1.samples, top1.items) == (1.0, 1.0, 64, 64)
    assert cos.value == pytest.approx(1.0) and cos.bound == pytest.approx(1.0) and cos.worst == pytest.approx(1.0)
    assert rel.value == 0.0 and rel.bound == 0.0 and rel.worst == 0.0


def test_a_flipped_argmax_is_counted_and_the_bound_decides():
    ref = logits()
    two = [(flip_argmax(y, [0, 1]) if i == 3 else y,) for i, (y,) in enumerate(ref)]  # 2 of 64 rows disagree
    r = result(evaluate(Budget(top1=0.9), ref, two), "top1")
    assert (r.value, r.worst, r.items) == (62 / 64, 0.0, 64)
    assert r.bound == pytest.approx(wilson_lower(62, 64, 0.95)) and r.met  # 0.910 >= 0.9
    three = [(flip_argmax(y, [0, 1, 2]) if i == 3 else y,) for i, (y,) in enumerate(ref)]
    assert not evaluate(Budget(top1=0.9), ref, three).met               # 0.888 < 0.9: one more flip fails


def test_per_token_agreement_counts_tokens_and_bounds_on_sequences():
    g = torch.Generator().manual_seed(0)
    ref = [(torch.randn(2, 8, 50, generator=g),) for _ in range(32)]   # 64 sequences of 8 tokens
    got = [(y.clone(),) for (y,) in ref]
    got[0][0][1, 3, (ref[0][0][1, 3].argmax() + 1) % 50] = 100.0       # one token of one sequence flips
    r = result(evaluate(Budget(top1=0.9), ref, got), "top1")
    assert (r.items, r.samples) == (512, 64)
    assert r.value == pytest.approx(511 / 512) and r.worst == pytest.approx(7 / 8)
    assert r.bound == pytest.approx(wilson_lower(64 * 511 / 512, 64, 0.95))  # sequences, not tokens, count


def test_cosine_and_relative_l2_of_scaled_and_perturbed_outputs():
    ref = logits(batch=8, classes=256)
    scaled = [(2 * y,) for (y,) in ref]
    report = evaluate(Budget(cosine=0.999, rel_l2=0.05), ref, scaled)
    assert result(report, "cosine").value == pytest.approx(1.0)  # cosine cannot see a scale
    assert result(report, "rel_l2").value == pytest.approx(1.0) and not report.met  # relative L2 can
    g = torch.Generator().manual_seed(1)
    eps = 0.01
    noisy = [(y + eps * y.norm(dim=1, keepdim=True) / 16 * torch.randn(y.shape, generator=g),) for (y,) in ref]
    report = evaluate(Budget(cosine=0.999, rel_l2=0.05), ref, noisy)
    cos, rel = result(report, "cosine"), result(report, "rel_l2")
    assert rel.value == pytest.approx(eps, rel=0.2)                    # noise of 1% of each row's norm
    assert cos.value == pytest.approx(1 / math.sqrt(1 + eps ** 2), abs=2e-5)
    assert cos.bound <= cos.value and cos.worst <= cos.value and rel.bound >= rel.value and rel.worst >= rel.value
    assert report.met


def test_a_non_finite_candidate_fails_every_metric():
    ref = logits()
    bad = [(torch.full_like(y, float("nan")),) if i == 0 else (y,) for i, (y,) in enumerate(ref)]
    report = evaluate(Budget(top1=0.5, cosine=0.5, rel_l2=10.0), ref, bad)
    assert result(report, "cosine").worst == -1.0 and result(report, "rel_l2").bound == math.inf
    assert result(report, "top1").value == 60 / 64 and not report.met


def test_every_floating_output_is_judged_unless_the_budget_names_them():
    ref = [(torch.randn(2, 4, 8), torch.arange(2), torch.randn(2, 8)) for _ in range(4)]
    got = [(a, b, c * 3) for a, b, c in ref]
    report = evaluate(Budget(rel_l2=0.05), ref, got)
    assert [r.output for r in report.results] == [0, 2] and not report.met
    assert report.summary().startswith("output 2 rel_l2 2 ")             # the binding output is shown
    assert evaluate(Budget(rel_l2=0.05, outputs=(0,)), ref, got).met


def test_mismatched_outputs_are_clear_errors():
    ref = logits(n_inputs=2)
    with pytest.raises(DIOEError, match="held-out input 1, output 0: candidate shape \\[4, 9\\]"):
        evaluate(Budget(cosine=0.9), ref, [ref[0], (torch.zeros(4, 9),)])
    with pytest.raises(DIOEError, match="2 reference and 1 candidate"):
        evaluate(Budget(cosine=0.9), ref, ref[:1])
    with pytest.raises(DIOEError, match="top-1 agreement needs class scores"):
        evaluate(Budget(top1=0.9), [(torch.zeros(4, 1),)], [(torch.zeros(4, 1),)])


# -- bounds -----------------------------------------------------------------------------------------------------
def test_wilson_bound_matches_known_values_and_tightens_with_n():
    assert wilson_lower(64, 64, 0.95) == pytest.approx(0.9594, abs=1e-4)   # one-sided 95%
    assert wilson_lower(64, 64, 0.975) == pytest.approx(0.9434, abs=1e-4)  # = the two-sided 95% interval's low end
    assert 1 - wilson_lower(300, 300, 0.95) < 0.01 < 1 - wilson_lower(250, 250, 0.95)  # ~ the rule of three
    bounds = [wilson_lower(n, n, 0.95) for n in (8, 16, 64, 300, 1000)]
    assert bounds == sorted(bounds) and all(b < 1 for b in bounds)
    assert all(wilson_lower(0.9 * n, n, 0.95) < 0.9 for n in (10, 100, 1000))  # below the point estimate


def test_wilson_bound_covers_the_true_rate():
    g = torch.Generator().manual_seed(0)
    hits = (torch.rand(4000, 64, generator=g) < 0.95).sum(1).tolist()
    covered = sum(wilson_lower(k, 64, 0.95) <= 0.95 for k in hits) / len(hits)
    assert covered >= 0.93                                               # nominal 0.95


def test_t_quantile_and_mean_bound():
    assert t_quantile(0.95, 1) == pytest.approx(6.3138, abs=1e-4)
    assert t_quantile(0.95, 5) == pytest.approx(2.0150, abs=1e-4)
    assert t_quantile(0.975, 10) == pytest.approx(2.2281, abs=1e-4)
    assert t_quantile(0.95, 63) == pytest.approx(1.6694, abs=1e-4)
    values = [0.9995, 0.9990, 0.9999, 0.9985]
    widths = [mean(values * k) - mean_bound(values * k, 0.95, upper=False) for k in (1, 4, 16)]
    assert widths[0] > widths[1] > widths[2] > 0
    assert mean_bound(values, 0.95, upper=True) > mean(values)
    assert mean_bound([0.5], 0.95, upper=False) == -math.inf             # one sample supports no claim


def mean(v):
    return sum(v) / len(v)


# -- budgets ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [lambda: Budget(**{"bogus": 1}), lambda: Budget.parse("bogus>=0.9"),
                                  lambda: Budget.parse("cosine>=0.999, top5>=0.9")])
def test_an_unknown_metric_names_the_allowed_ones(make):
    with pytest.raises(DIOEError, match="top1, cosine, rel_l2"):
        make()


@pytest.mark.parametrize("kw, words", [
    ({"cosine": 1.5}, "cosine must be in \\(0, 1\\]"), ({"cosine": 0}, "cosine must be in"),
    ({"top1": 0.0}, "top1 must be in"), ({"top1": 1.01}, "top1 must be in"),
    ({"rel_l2": 0}, "rel_l2 .* must be > 0"), ({"rel_l2": -0.1}, "must be > 0"),
    ({"cosine": float("nan")}, "must be a number"), ({"cosine": "high"}, "must be a number"),
    ({}, "at least one metric"), ({"cosine": 0.9, "confidence": 1.0}, "confidence must be in"),
    ({"cosine": 0.9, "samples": 1}, "samples must be an integer >= 2")])
def test_invalid_budgets_are_clear_errors(kw, words):
    with pytest.raises(DIOEError, match=words):
        Budget(**kw)


def test_budget_text_round_trips_and_checks_direction():
    b = Budget.parse("top1>=0.95, rel_l2<=0.02 samples=300 confidence=0.9")
    assert b == Budget(top1=0.95, rel_l2=0.02, samples=300, confidence=0.9)
    assert Budget.parse(str(b)) == b and Budget.from_dict(json.loads(json.dumps(b.to_dict()))) == b
    judged = Budget(cosine=0.999, outputs=(0, 2))
    assert str(judged) == "cosine>=0.999, confidence=0.95, samples=64, outputs=0+2"
    assert Budget.parse(str(judged)) == judged
    assert dataclasses.replace(judged, samples=300).samples == 300
    with pytest.raises(DIOEError, match="cosine is a floor, write cosine>=0.9"):
        Budget.parse("cosine<=0.9")
    with pytest.raises(DIOEError, match="not a number"):
        Budget.parse("cosine>=high")


def test_default_metrics_follow_the_output_kind():
    assert Budget.default_for(torch.zeros(2, 10)) == Budget(top1=0.9, cosine=0.999, outputs=(0,))
    assert Budget.default_for((torch.zeros(2, 16, 100),)).metrics == {"top1": 0.9, "cosine": 0.999}
    assert Budget.default_for(torch.zeros(2, 3, 8, 8)) == Budget(cosine=0.999, rel_l2=0.05)
    unnamed = (torch.zeros(1, 32, 64), torch.zeros(1, 64))  # a tuple of hidden states: no name says logits
    assert Budget.default_for(unnamed) == Budget(cosine=0.999, rel_l2=0.05)
    named = {"hidden": torch.zeros(1, 64), "logits": torch.zeros(1, 5)}
    assert Budget.default_for(named) == Budget(top1=0.9, cosine=0.999, outputs=(1,))
    with pytest.raises(DIOEError, match="no floating-point output"):
        Budget.default_for((torch.arange(3),))


def test_default_metrics_read_hugging_face_outputs():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    cls = outputs.SequenceClassifierOutput(logits=torch.zeros(2, 3))
    assert Budget.default_for(cls).metrics == {"top1": 0.9, "cosine": 0.999}
    lm = outputs.CausalLMOutputWithPast(logits=torch.zeros(1, 16, 100), hidden_states=(torch.zeros(1, 16, 8),))
    assert Budget.default_for(lm).outputs == (0,)
    hidden = outputs.BaseModelOutputWithPooling(last_hidden_state=torch.zeros(1, 32, 64),
                                                pooler_output=torch.zeros(1, 64))  # tiny-bert's output
    assert Budget.default_for(hidden) == Budget(cosine=0.999, rel_l2=0.05)


# -- report -----------------------------------------------------------------------------------------------------
def test_report_round_trips_through_json():
    ref = logits()
    got = [(flip_argmax(y, [0]) * 1.001,) for (y,) in ref]
    got[5] = (torch.full_like(ref[5][0], float("inf")),)                # an infinite bound must survive too
    report = evaluate(Budget(top1=0.5, cosine=0.999, rel_l2=0.05), ref, got)
    back = AccuracyReport.from_dict(json.loads(json.dumps(report.to_dict())))
    assert back == report and back.met == report.met == report.to_dict()["met"]
    with pytest.raises(DIOEError, match="expected"):
        AccuracyReport.from_dict({"confidence": 0.95, "results": [{"metric": "cosine"}]})


def test_summary_is_one_readable_line():
    ref = logits(batch=8, classes=256)
    g = torch.Generator().manual_seed(2)
    got = [(y + 0.01 * torch.randn(y.shape, generator=g),) for (y,) in ref]
    line = evaluate(Budget(cosine=0.999), ref, got).summary()
    assert re.fullmatch(r"cosine 0\.9999\d \(>= 0\.9999\d at 95%, n=128, worst 0\.999\d+\) vs 0\.999: met", line)
    near_one = evaluate(Budget(cosine=0.999), ref, [(y + 1e-4 * torch.randn(y.shape, generator=g),) for (y,) in ref])
    assert "worst 1)" not in near_one.summary() and "worst 0.99999" in near_one.summary()  # 1 only when it is 1
    same = evaluate(Budget(cosine=0.999), ref, [(y * 1.001,) for (y,) in ref])    # 1 up to float64 rounding
    assert same.summary() == "cosine 1 (>= 1 at 95%, n=128, worst 1) vs 0.999: met"
    assert "\n" not in evaluate(Budget.default_for(ref[0]), ref, got).summary()
