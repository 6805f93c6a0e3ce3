"""This machine's compute devices as they are found live: the CPU (name, ISA flags, cores) and how well a CPU
descriptor describes it, NVIDIA GPUs (NVML, else torch.cuda), PrivateUse1-style torch devices (mlu, npu, xpu, ...)
and OpenVINO devices. Each probe returns what it found, or nothing and why; `dioe.pool` matches the findings to
descriptors and makes pool members of them.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import psutil

from .cores import usable_cores
from .hardware import Descriptor

# ARM does not print a model name; /proc/cpuinfo gives the core's part number instead.
_ARM_PARTS = {"0xd03": "Cortex-A53", "0xd05": "Cortex-A55", "0xd07": "Cortex-A57", "0xd08": "Cortex-A72",
              "0xd0a": "Cortex-A75", "0xd0b": "Cortex-A76", "0xd0d": "Cortex-A77", "0xd41": "Cortex-A78",
              "0xd0c": "Neoverse-N1", "0xd40": "Neoverse-V1", "0xd49": "Neoverse-N2", "0xd4f": "Neoverse-V2",
              "0xd42": "Cortex-A78AE", "0xd4b": "Cortex-A78C"}


@dataclass(frozen=True)
class CpuInfo:
    name: str
    machine: str
    flags: frozenset[str]
    physical_cores: int
    logical_cores: int
    usable_cores: int  # what this process may run on (affinity / cgroup), the real thread budget

    @classmethod
    def read(cls) -> "CpuInfo":
        name, flags = platform.processor() or platform.machine(), set()
        try:
            text = Path("/proc/cpuinfo").read_text()
        except OSError:
            text = ""
        for line in text.splitlines():
            key, _, value = line.partition(":")
            key, value = key.strip(), value.strip()
            if key == "model name" and value:
                name = value
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
            elif key == "CPU part" and value in _ARM_PARTS and not name.startswith("ARM"):
                name = f"ARM {_ARM_PARTS[value]}"
        logical = psutil.cpu_count(logical=True) or 1
        return cls(name=name, machine=platform.machine(), flags=frozenset(flags),
                   physical_cores=psutil.cpu_count(logical=False) or logical, logical_cores=logical,
                   usable_cores=usable_cores())


def cpu_score(d: Descriptor, cpu: CpuInfo) -> int | None:
    """How specifically `d` describes this CPU (more required flags = more specific), None if it does not."""
    m = d.match
    if d.kind != "cpu" or m.torch_device != "cpu":
        return None
    if m.machine and cpu.machine not in m.machine:
        return None
    if not fnmatch.fnmatch(cpu.name.lower(), m.name_pattern.lower()):
        return None
    if not set(m.isa_flags) <= cpu.flags:
        return None
    return len(m.isa_flags) * 10 + (m.name_pattern != "*") * 100


def match_cpu(cpu: CpuInfo, candidates: Iterable[Descriptor]) -> Descriptor | None:
    scored = [(s, d.name, d) for d in candidates if (s := cpu_score(d, cpu)) is not None]
    return max(scored, key=lambda t: (t[0], t[1]))[2] if scored else None


def _nvml_gpus() -> tuple[list[dict], str]:
    """NVIDIA GPUs as pynvml sees them, or an empty list and why."""
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed (pip install 'dioe[gpu]')"
    try:
        pynvml.nvmlInit()
    except Exception as e:  # NVMLError_LibraryNotFound, DriverNotLoaded, ...
        return [], f"no NVIDIA driver ({type(e).__name__})"
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        h = pynvml.nvmlDeviceGetHandleByIndex(i)
        name = pynvml.nvmlDeviceGetName(h)
        out.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                    "memory": pynvml.nvmlDeviceGetMemoryInfo(h).total})
    return out, "" if out else "pynvml found no NVIDIA GPU"


def cuda_devices() -> tuple[list[dict], str]:
    gpus, why = _nvml_gpus()
    if not gpus:
        import torch

        if torch.cuda.is_available():  # Jetson and some containers have CUDA without NVML
            gpus = [{"index": i, "name": torch.cuda.get_device_name(i),
                     "memory": torch.cuda.get_device_properties(i).total_memory}
                    for i in range(torch.cuda.device_count())]
            why = ""
    elif not _torch_cuda_ok():
        why = "an NVIDIA GPU is present but this torch build has no CUDA"
        return [], why
    return gpus, why


def _torch_cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def plugin_devices(device_type: str, plugin: str | None) -> tuple[int, str]:
    """Count of a PrivateUse1-style device (mlu, npu, xpu, mps) and, when zero, why."""
    import torch

    if plugin:
        if importlib.util.find_spec(plugin) is None:
            return 0, f"{plugin} is not installed"
        try:
            importlib.import_module(plugin)
        except Exception as e:
            return 0, f"{plugin} failed to import: {e}"
    mod = getattr(torch, device_type, None)
    if mod is None or not hasattr(mod, "is_available"):
        return 0, f"torch has no '{device_type}' device module"
    if not mod.is_available():
        return 0, f"torch.{device_type}.is_available() is False"
    count = getattr(mod, "device_count", lambda: 1)()
    return count, "" if count else f"torch.{device_type} reports no device"


def openvino_devices() -> tuple[list[str], str]:
    if importlib.util.find_spec("openvino") is None:
        return [], "openvino is not installed (pip install 'dioe[openvino]')"
    import openvino

    return list(openvino.Core().available_devices), ""
