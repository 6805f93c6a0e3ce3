"""Plans as data: summaries people read."""

from dioe.plan import Choice, Plan, PlanPartition
from dioe.text import show_ms


def _plan(runner_up=Choice("cpu0", "torch", "fp32", 0.0577)):
    return Plan("tiny", "h", "", "latency",
                (PlanPartition("p0", ("s0",), ("n0",), "cpu0", "onnxruntime", "fp32", 8, 0.0, 0.010673, 0.011126,
                               runner_up, "fastest"),), 0.010673, 0.011126, 0.0577,
                inputs=({"shape": [1, 64], "dtype": "float32", "device": "cpu"},), notes=("partitioned by dp",))


def test_a_plan_summary_shows_a_microsecond_model_in_significant_digits():
    """Two decimals of a ms read 0.01 for every engine of an 11 us model: below 1 ms a summary keeps three
    significant digits, and never an exponent."""
    text = _plan().summary()
    assert "0.0107" in text and "0.0111" in text and "torch@cpu0/fp32 0.0577 ms" in text, text
    assert "predicted 0.0107 ms, measured 0.0111 ms; torch eager 0.0577 ms (5.19x)" in text, text
    assert [show_ms(x) for x in (146.254, 6.19, 0.5, 0.0243, 1e-5, 0.0, 0.9996, 0.09996)] == \
        ["146.25", "6.19", "0.500", "0.0243", "0.0000100", "0.00", "1.00", "0.100"]
