"""Plans as data: Choice values and their labels, plans that round-trip through JSON, summaries people read."""

import json
import re

import pytest

from dioe.plan import Choice, Plan, PlanPartition
from dioe.text import fmt_bytes, show_ms, table


def _plan(runner_up=Choice("cpu0", "torch", "fp32", 0.0577)):
    return Plan("tiny", "h", "", "latency",
                (PlanPartition("p0", ("s0",), ("n0",), "cpu0", "onnxruntime", "fp32", 8, 0.0, 0.010673, 0.011126,
                               runner_up, "fastest"),), 0.010673, 0.011126, 0.0577,
                inputs=({"shape": [1, 64], "dtype": "float32", "device": "cpu"},), notes=("partitioned by dp",))


def test_a_choice_label_parses_back_to_the_same_choice():
    for c in [Choice("cpu0", "openvino"), Choice("npu", "onnxruntime", "fp16"), Choice("gpu/0", "torch", "bf16")]:
        assert Choice.parse(c.label()) == c and Choice.parse(str(c)).label() == c.label(), c
    c = Choice.parse("openvino@cpu0/fp32")
    assert (c.member, c.backend, c.precision, c.predicted_ms) == ("cpu0", "openvino", "fp32", 0.0)
    # a time takes no part in equality, hashing or order: the same option whatever it carries
    timed = Choice("cpu0", "openvino", "fp32", predicted_ms=3.0)
    assert timed == c and hash(timed) == hash(c) and {timed: 1}[c] == 1 and timed.option().predicted_ms == 0.0
    assert sorted([Choice("cpu1", "torch"), Choice("cpu0", "torch"), Choice("cpu0", "openvino")]) == \
        [Choice("cpu0", "openvino"), Choice("cpu0", "torch"), Choice("cpu1", "torch")]


@pytest.mark.parametrize("label", ["openvino", "openvino@cpu0", "@cpu0/fp32", "openvino@/fp32", "openvino@cpu0/",
                                   "cpu0/fp32", ""])
def test_a_bad_choice_label_says_what_a_label_looks_like(label):
    with pytest.raises(ValueError, match=f"^{re.escape(repr(label))} is not an option label; expected "
                                         "backend@member/precision, such as openvino@cpu0/fp32$"):
        Choice.parse(label)


def test_a_plan_round_trips_through_json(tmp_path):
    p = _plan()
    d = p.to_dict()
    assert Plan.from_dict(d) == p and Plan.from_dict(d).to_dict() == d
    assert d["partitions"][0]["runner_up"] == {"member": "cpu0", "backend": "torch", "precision": "fp32",
                                               "predicted_ms": 0.0577}, "the runner-up keeps its forecast"
    p.save(tmp_path / "tiny.plan.json")
    again = Plan.load(tmp_path / "tiny.plan.json")
    assert again == p and again.to_dict() == d and again.partitions[0].runner_up.predicted_ms == 0.0577
    assert json.loads((tmp_path / "tiny.plan.json").read_text()) == json.loads(json.dumps(d))
    none = _plan(runner_up=None)
    assert Plan.from_dict(none.to_dict()) == none and none.to_dict()["partitions"][0]["runner_up"] is None
    with pytest.raises(ValueError, match="plan format version 99; this DIOE reads version 1"):
        Plan.from_dict({**d, "version": 99})


def test_a_plan_summary_shows_a_microsecond_model_in_significant_digits():
    """Two decimals of a ms read 0.01 for every engine of an 11 us model: below 1 ms a summary keeps three
    significant digits, and never an exponent."""
    text = _plan().summary()
    assert "0.0107" in text and "0.0111" in text and "torch@cpu0/fp32 0.0577 ms" in text, text
    assert "predicted 0.0107 ms, measured 0.0111 ms; torch eager 0.0577 ms (5.19x)" in text, text
    assert [show_ms(x) for x in (146.254, 6.19, 0.5, 0.0243, 1e-5, 0.0, 0.9996, 0.09996)] == \
        ["146.25", "6.19", "0.500", "0.0243", "0.0000100", "0.00", "1.00", "0.100"]


def test_byte_counts_and_tables_read_as_people_write_them():
    assert [fmt_bytes(n) for n in (None, 512, 3 * 2 ** 20, 2 ** 50)] == ["-", "512 B", "3.0 MiB", "1024.0 TiB"]
    assert table([["a", "1"], ["bbb", "22"]], ["x", "yy"]).splitlines() == ["x    yy", "---  --", "a    1", "bbb  22"]
