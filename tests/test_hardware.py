"""Hardware descriptors: every shipped one loads; broken ones fail naming file, line and key."""

import json
from pathlib import Path

import pytest

import dioe
from dioe import hardware
from dioe.errors import DescriptorError

BASE = (Path(hardware.shipped()["x86-64-avx512"])).read_text()


def test_every_shipped_descriptor_loads():
    loaded = hardware.load_all()
    names = [d.name for d in loaded]
    assert len(names) == len(set(names)), "descriptor names must be unique"
    for d in loaded:
        assert Path(d.path).stem == d.name, f"{d.path}: file name and name: field differ"
        assert d.sources, f"{d.name}: a shipped descriptor names the sources of its figures"
        assert set(d.peak_tflops) <= set(d.precisions)


def test_shipped_set_covers_the_required_device_classes():
    names = set(hardware.shipped())
    required = {"x86-64-avx512", "x86-64-avx2", "x86-64-amx", "arm64-cortex-a76-rpi5", "arm64-graviton3",
                "nvidia-a100-80gb", "nvidia-h100-80gb", "nvidia-rtx-4090", "nvidia-jetson-agx-orin",
                "cambricon-mlu370-x8", "huawei-ascend-910b", "intel-core-ultra-npu"}
    assert required <= names, f"missing: {sorted(required - names)}"
    assert hardware.load("cambricon-mlu370-x8").match.torch_device == "mlu"
    assert hardware.load("huawei-ascend-910b").match.torch_plugin == "torch_npu"


def test_shipped_json_schema_is_current_and_validates_every_descriptor():
    jsonschema = pytest.importorskip("jsonschema")
    import yaml

    shipped = json.loads((Path(hardware._shipped_dir()) / "descriptor.schema.json").read_text())
    assert shipped == hardware.descriptor_json_schema(), \
        "hardware/descriptor.schema.json is stale: run `dioe descriptor schema > hardware/descriptor.schema.json`"
    for path in hardware.shipped().values():
        jsonschema.validate(yaml.safe_load(path.read_text()), shipped)


# (case, text to find, replacement, the key the error must name)
BROKEN = [
    ("unknown top-level key", "kind: cpu", "kind: cpu\nflavour: spicy", "flavour"),
    ("typo in nested key", "  bandwidth_gbps: 204.8\npeak", "  bandwith_gbps: 204.8\npeak", "memory.bandwith_gbps"),
    ("wrong type for name", "name: x86-64-avx512", "name: [a, b]", "name"),
    ("bad kind enum", "kind: cpu", "kind: tpu", "kind"),
    ("negative capacity", "  capacity_gb: null", "  capacity_gb: -4", "memory.capacity_gb"),
    ("zero bandwidth", "  bandwidth_gbps: 204.8\npeak", "  bandwidth_gbps: 0\npeak", "memory.bandwidth_gbps"),
    ("negative latency", "latency_us: 0.5", "latency_us: -1", "link.latency_us"),
    ("string for number", "  fp32: 5.9", "  fp32: fast", "peak_tflops.fp32"),
    ("bool for number", "  fp32: 5.9", "  fp32: true", "peak_tflops.fp32"),
    ("unknown precision", "precisions: [fp32, bf16, int8]", "precisions: [fp32, bf16, int8, fp64]", "precisions[3]"),
    ("peak for unlisted precision", "  int8: 23.6", "  int8: 23.6\n  fp16: 40", "peak_tflops.fp16"),
    ("unknown backend", "  - name: torch", "  - name: tensorflow", "backends[3].name"),
    ("duplicate backend", "  - name: torch", "  - name: inductor", "backends[3].name"),
    ("option of another backend", "    options: {device: CPU}", "    options: {device: CPU, mode: max-autotune}",
     "backends[0].options.mode"),
    ("onnxruntime without providers", "      providers: [{name: CPUExecutionProvider}]",
     "      disable_cpu_ep_fallback: true", "backends[1].options"),
    ("provider without name", "[{name: CPUExecutionProvider}]", "[{options: {}}]",
     "backends[1].options.providers[0].name"),
    ("missing required field", "vendor: generic\n", "", "vendor"),
    ("bad tiling enum", "tiling_strategy: cache_blocked", "tiling_strategy: diagonal", "optimizer.tiling_strategy"),
    ("kernel_fusion not bool", "kernel_fusion: true", "kernel_fusion: maybe", "optimizer.kernel_fusion"),
    ("bad torch device", "  torch_device: cpu", "  torch_device: tpu", "match.torch_device"),
    ("isa flags not a list", "isa_flags: [avx512f, avx512bw, avx512vl]", "isa_flags: avx512f", "match.isa_flags"),
    ("ops allow not a list", "  allow: [\"*\"]", "  allow: 7", "ops.allow"),
    ("unknown ops key", "  allow: [\"*\"]", "  allow: [\"*\"]\n  permit: []", "ops.permit"),
    ("wrong schema version", "schema_version: 1", "schema_version: 2", "schema_version"),
    ("duplicate key", "kind: cpu", "kind: cpu\nkind: gpu", "kind"),
    ("negative threads", "  kernel_fusion: true", "  kernel_fusion: true\n  threads: -2", "optimizer.threads"),
    ("backends empty", "backends:\n  - name: openvino\n    options: {device: CPU}\n  - name: onnxruntime\n"
     "    options:\n      providers: [{name: CPUExecutionProvider}]\n  - name: inductor\n  - name: torch\n",
     "backends: []\n", "backends"),
]


@pytest.mark.parametrize("case,find,replace,key", BROKEN, ids=[b[0] for b in BROKEN])
def test_broken_descriptor_names_file_line_and_key(tmp_path, case, find, replace, key):
    assert find in BASE, f"test setup: {find!r} not in the base descriptor"
    text = BASE.replace(find, replace, 1)
    path = tmp_path / "broken.yaml"
    path.write_text(text)
    with pytest.raises(DescriptorError) as info:
        hardware.load(path)
    e = info.value
    assert e.file == str(path)
    assert e.key == key, f"{case}: error names key {e.key!r}: {e}"
    assert e.line is not None and 1 <= e.line <= text.count("\n") + 1
    # the line points at the offending key (or its mapping, for missing keys)
    first_changed = next((i + 1 for i, (a, b) in enumerate(zip(BASE.splitlines(), text.splitlines())) if a != b), None)
    if replace and case not in ("missing required field", "backends empty"):
        assert abs(e.line - first_changed) <= 2, f"{case}: line {e.line}, change at {first_changed}: {e}"
    msg = str(e)
    assert str(path) in msg and f":{e.line}:" in msg and key in msg and "expected" in msg, msg


def test_invalid_yaml_syntax_names_the_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("name: x\nkind: [cpu\n")
    with pytest.raises(DescriptorError, match=r"bad\.yaml:\d+: .*not valid YAML"):
        hardware.load(p)


def test_unknown_shipped_name_lists_the_shipped_ones():
    with pytest.raises(DescriptorError, match="shipped: .*x86-64-avx512"):
        hardware.load("no-such-device")


def test_op_rules_wildcards():
    rules = hardware.OpRules(allow=("aten.linear*", "aten.add.*"), deny=("aten.add.Scalar",))
    assert rules.permits("aten.linear.default")
    assert rules.permits("aten.add.Tensor")
    assert not rules.permits("aten.add.Scalar")
    assert not rules.permits("aten.conv2d.default")


def test_user_descriptor_by_path(tmp_path):
    p = tmp_path / "mine.yaml"
    p.write_text(BASE.replace("name: x86-64-avx512", "name: my-cpu"))
    assert dioe.hardware.load(p).name == "my-cpu"
