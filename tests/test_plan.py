"""Plans as data: Choice values and their labels, plans that round-trip through JSON, summaries people read."""

import json
import re

import pytest

from dioe.errors import PlanError
from dioe.plan import Choice, Plan, PlanPartition
from dioe.schema import json_schema
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


# -- a plan file is checked field by field on load ----------------------------------------------------------------
def _saved(tmp_path, edit=None):
    d = json.loads(json.dumps(_plan().to_dict()))
    if edit:
        edit(d)
    path = tmp_path / "tiny.plan.json"
    path.write_text(json.dumps(d))
    return path


def _set(where, key, value):
    def edit(d):
        target = d
        for k in where:
            target = target[k]
        if value is _DELETE:
            del target[key]
        else:
            target[key] = value
    return edit


_DELETE = object()


def test_a_truncated_plan_file_is_a_plan_error_naming_the_file_and_position(tmp_path):
    path = _saved(tmp_path)
    text = path.read_text()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(PlanError, match=rf"^{re.escape(str(path))}: not valid JSON \(.*: line 1, column \d+, "
                                        r"character \d+\); expected a plan saved by DIOE$"):
        Plan.load(path)
    with pytest.raises(PlanError, match=rf"^{re.escape(str(tmp_path / 'none.json'))}: not a readable DIOE plan"):
        Plan.load(tmp_path / "none.json")


@pytest.mark.parametrize("where,key,value,message", [
    (("partitions", 0), "precision", "int3", r"partitions\[0\]\.precision: 'int3' is not one of fp32, bf16, fp16, "
                                             r"int8$"),
    (("partitions", 0), "backend", "tvm", r"partitions\[0\]\.backend: 'tvm' is not one of inductor, onnxruntime, "
                                          r"openvino, torch$"),
    (("partitions", 0, "runner_up"), "precision", "fp8", r"partitions\[0\]\.runner_up\.precision: 'fp8' is not one "
                                                         r"of fp32, bf16, fp16, int8$"),
    (("partitions", 0), "member", 3, r"partitions\[0\]\.member: expected a string, got int 3$"),
    (("partitions", 0), "ops", _DELETE, r"partitions\[0\]\.ops: missing required key; expected an integer$"),
    (("partitions", 0), "ops", "8", r"partitions\[0\]\.ops: expected an integer, got '8'$"),
    (("partitions", 0), "predicted_ms", -1.0, r"partitions\[0\]\.predicted_ms: expected a number >= 0, got -1\.0$"),
    (("partitions", 0), "measured_ms", float("nan"), r"partitions\[0\]\.measured_ms: expected a finite number, "
                                                     r"got nan$"),
    ((), "eager_ms", float("inf"), r"eager_ms: expected a finite number, got inf$"),
    (("partitions", 0), "nodes", "n0", r"partitions\[0\]\.nodes: expected a list of a string, got str 'n0'$"),
    (("partitions", 0), "nodes", [], r"partitions\[0\]\.nodes: a partition runs at least one node"),
    (("partitions", 0), "member_id", "cpu0", r"partitions\[0\]\.member_id: unknown key \(did you mean 'member'\?\)"),
    ((), "objective", "fastest", r"objective: 'fastest' is not one of latency, throughput$"),
    ((), "partitions", [], r"partitions: a plan has at least one partition"),
    ((), "model", None, r"model: expected a string, got NoneType None$"),
    (("inputs", 0), "dtype", "float33", r"inputs\[0\]\.dtype: 'float33' is not a torch dtype; expected a name "
                                        r"such as float32$"),
    (("inputs", 0), "shape", [1, -64], r"inputs\[0\]\.shape\[1\]: expected a size >= 0, got -64$"),
    (("inputs", 0), "shape", [1, 2.5], r"inputs\[0\]\.shape\[1\]: expected an integer or a string, got 2\.5$"),
    ((), "accuracy", {"met": True}, r"accuracy: has keys \['met'\]; expected \['confidence', 'met', 'results'\] and "
                                    r"optionally 'example'$"),
    ((), "accuracy", {"met": True, "confidence": 0.95, "results": [], "example": [{"metric": "cosine"}]},
     r"accuracy.example\[0\]: expected \{metric, output, value\}$"),
])
def test_a_malformed_plan_names_the_field_and_what_was_expected(tmp_path, where, key, value, message):
    path = _saved(tmp_path, _set(where, key, value))
    with pytest.raises(PlanError, match=f"^{re.escape(str(path))}: {message}"):
        Plan.load(path)
    with pytest.raises(ValueError, match=f"^plan: {message}"):   # a dict is checked the same way
        Plan.from_dict(json.loads(path.read_text()))


def test_a_plan_with_two_partitions_of_one_id_or_one_node_twice_is_refused(tmp_path):
    def twice(d):
        d["partitions"].append(dict(d["partitions"][0], nodes=["n1"]))
    with pytest.raises(PlanError, match=r"partitions\[1\]\.id: 'p0' is already the id of partitions\[0\]; expected "
                                        "unique ids$"):
        Plan.load(_saved(tmp_path, twice))

    def shared(d):
        d["partitions"].append(dict(d["partitions"][0], id="p1"))
    with pytest.raises(PlanError, match=r"partitions\[1\]\.nodes\[0\]: node 'n0' is already in partition 'p0'"):
        Plan.load(_saved(tmp_path, shared))


def test_a_saved_plan_meets_the_json_schema_its_dataclasses_describe(tmp_path):
    """The validator and the JSON Schema come from the same dataclasses: a plan DIOE saves meets the schema, and
    one the validator refuses for its type fails the schema too."""
    jsonschema = pytest.importorskip("jsonschema")
    schema = json_schema(Plan)
    jsonschema.validate(json.loads(_saved(tmp_path).read_text()), schema)
    bad = json.loads(_saved(tmp_path, _set(("partitions", 0), "ops", "8")).read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_a_model_name_never_makes_a_plan_file_outside_its_folder(tmp_path):
    from dataclasses import replace

    folder = tmp_path / "plans"
    folder.mkdir()
    for name in ("../x", "../../etc/passwd", "/abs/x", "..", "a\\..\\b", ".hidden", ""):
        path = replace(_plan(), model=name).file_in(folder)
        assert path.parent == folder and path.resolve().parent == folder.resolve(), (name, path)
        assert path.name.endswith(".plan.json") and not path.name.startswith("."), (name, path)
    assert replace(_plan(), model="bert-base").file_in(folder) == folder / "bert-base.plan.json"
