"""The resource pool: live discovery, descriptor matching, absent members with reasons, pool files, telemetry."""

import os
import platform
import threading
import time

import pytest

import dioe
from dioe.errors import DescriptorError, PoolError
from dioe.devices import CpuInfo, match_cpu
from dioe.pool import ResourcePool

from conftest import POOLS


def test_auto_discovery_finds_this_cpu(pool):
    cpu = pool.reference
    assert cpu.device == "cpu" and cpu.present and not cpu.stand_in
    assert cpu.descriptor.kind == "cpu"
    if platform.machine() in ("x86_64", "AMD64"):
        assert cpu.descriptor.name.startswith("x86-64"), cpu.descriptor.name
    assert cpu.threads >= 1 and cpu.memory_bytes > 0
    assert "torch" in cpu.backends


def test_most_specific_cpu_descriptor_wins():
    info = CpuInfo(name="Test CPU", machine="x86_64", flags=frozenset({"avx2", "fma", "avx512f", "avx512bw",
                   "avx512vl", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"}), physical_cores=4,
                   logical_cores=8, usable_cores=8)
    assert match_cpu(info, dioe.hardware.load_all()).name == "x86-64-amx"
    avx2_only = CpuInfo("Old CPU", "x86_64", frozenset({"avx2", "fma"}), 4, 4, 4)
    assert match_cpu(avx2_only, dioe.hardware.load_all()).name == "x86-64-avx2"
    pi = CpuInfo("ARM Cortex-A76", "aarch64", frozenset({"asimd", "asimddp", "fp"}), 4, 4, 4)
    assert match_cpu(pi, dioe.hardware.load_all()).name == "arm64-cortex-a76-rpi5"


def test_absent_devices_are_listed_with_a_reason(pool):
    absent = {m.descriptor.name: m.reason for m in pool.absent}
    if "cambricon-mlu370-x8" in absent:  # on a machine without torch_mlu
        assert "torch_mlu is not installed" in absent["cambricon-mlu370-x8"]
    if "huawei-ascend-910b" in absent:
        assert "torch_npu" in absent["huawei-ascend-910b"]
    for m in pool.absent:
        assert not m.present and m.reason


def test_explicit_descriptor_of_absent_device_is_reported_not_dropped():
    pool = ResourcePool.discover(["cambricon-mlu370-x8"] + (["x86-64-avx2"] if platform.machine() == "x86_64" else []))
    mlu = [m for m in pool.absent if m.descriptor.name == "cambricon-mlu370-x8"]
    assert mlu and "torch_mlu" in mlu[0].reason


def test_pool_file_with_stand_ins(standin_pool):
    ids = [m.id for m in standin_pool]
    assert ids == ["cpu", "cpu-b", "npu"]
    npu = standin_pool["npu"]
    assert npu.stand_in and npu.device == "cpu" and npu.kind == "npu"
    assert npu.memory_bytes == int(0.25 * 1024 ** 3)
    assert npu.backends == ("onnxruntime",)
    assert set(standin_pool["cpu-b"].backends) <= {"torch", "onnxruntime"}
    assert standin_pool.reference.id == "cpu"
    assert "stand-in" in npu.describe()


def test_unknown_member_id_lists_members(standin_pool):
    with pytest.raises(PoolError, match="members: cpu, cpu-b, npu"):
        standin_pool["gpu"]


def test_bad_pool_file_names_file_line_and_key(tmp_path):
    p = tmp_path / "pool.yaml"
    p.write_text("pool:\n  - id: a\n    descriptor: auto\n    thread: 2\n")
    with pytest.raises(DescriptorError) as info:
        ResourcePool.discover(p)
    assert info.value.line == 4 and info.value.key == "pool[0].thread" and str(p) in str(info.value)


def test_pool_file_backend_not_in_descriptor(tmp_path):
    p = tmp_path / "pool.yaml"
    p.write_text("pool:\n  - id: a\n    descriptor: auto\n    backends: [openvino]\n"
                 "  - id: n\n    descriptor: " + str(POOLS / "standin-npu.yaml") + "\n    stand_in: true\n"
                 "    backends: [torch]\n")
    with pytest.raises(DescriptorError, match=r"pool\[1\]\.backends.*not among"):
        ResourcePool.discover(p)


def test_duplicate_member_ids_are_rejected(tmp_path):
    p = tmp_path / "pool.yaml"
    p.write_text("pool:\n  - {id: a, descriptor: auto}\n  - {id: a, descriptor: auto, stand_in: true}\n")
    with pytest.raises(PoolError, match="unique"):
        ResourcePool.discover(p)


def test_telemetry_samples_in_background_without_blocking(standin_pool):
    standin_pool.start_telemetry(interval_s=0.05)
    try:
        start = time.perf_counter()
        s = standin_pool.telemetry("cpu")
        assert time.perf_counter() - start < 0.5
        assert s.memory_total_bytes and s.memory_used_bytes is not None
        first = s.time
        time.sleep(0.3)
        assert standin_pool.telemetry("cpu").time > first, "the sampler thread should refresh readings"
        assert any(t.name == "dioe-telemetry" for t in threading.enumerate())
    finally:
        standin_pool.stop_telemetry()
    assert not any(t.name == "dioe-telemetry" for t in threading.enumerate())


def test_pool_json_view(pool):
    d = pool.to_dict()
    assert d["members"][0]["id"] == pool.members[0].id
    assert isinstance(d["absent"], list)


def test_pool_file_pins_members_to_cores(tmp_path):
    if not {0, 1} <= os.sched_getaffinity(0):
        pytest.skip("needs cores 0 and 1")
    pool = ResourcePool.discover(POOLS / "standin-cores.yaml")
    assert [(m.id, m.cores, m.threads) for m in pool.members] == [("a", (0,), 1), ("b", (1,), 1)]
    assert pool.to_dict()["members"][0]["cores"] == [0]
    assert set(pool.telemetry()) == {"a", "b"}


@pytest.mark.parametrize("cores, message", [
    ("[9999]", r"pool\[0\]\.cores.*core\(s\) \[9999\] are not among the cores"),
    ("[]", r"pool\[0\]\.cores.*at least one core"),
    ("[0, 0]", r"pool\[0\]\.cores.*named twice"),
    ("zero", r"pool\[0\]\.cores.*expected a list of"),
])
def test_pool_file_bad_cores_name_file_line_and_key(tmp_path, cores, message):
    p = tmp_path / "pool.yaml"
    p.write_text(f"pool:\n  - id: a\n    descriptor: auto\n    cores: {cores}\n")
    with pytest.raises(DescriptorError, match=message) as info:
        ResourcePool.discover(p)
    assert info.value.line == 4 and str(p) in str(info.value)


def test_a_thread_budget_is_a_share_of_the_same_machine_and_anything_else_is_another():
    from dioe.pool import _without_threads

    pool = dioe.ResourcePool.discover()
    assert pool.same_machine(pool.with_threads(1).fingerprint()) and pool.with_threads(1).same_machine(
        pool.fingerprint())
    other = pool.fingerprint().split("|")
    assert not pool.same_machine("|".join(["another CPU"] + other[1:]))
    assert not pool.same_machine("|".join(other[:2] + [str(int(other[2]) + 64)] + other[3:]))   # more cores
    base = "CPU|x86_64|2|2.13.0|cpu0=x86-64/Vendor 9/4 Model/{}/openvino,torch"
    assert _without_threads(base.format(2)) == _without_threads(base.format(1))   # a slash in the name
    assert _without_threads(base.format(2)) != _without_threads(base.format(1).replace("openvino,", ""))
