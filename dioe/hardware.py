"""Hardware descriptors: what one class of device can run, in which precisions, how big and how fast it is.

A descriptor is a YAML file (the shipped ones live in the package's `hardware/` folder) loaded into one
frozen `Descriptor`. Unknown keys, wrong types, bad enum values, sizes that are not positive, numbers that are not
finite and unsafe YAML (tags, recursive or bomb aliases, non-UTF-8 text; see `dioe.yamlfile`) are errors naming
the file, line and key:

    >>> import dioe
    >>> d = dioe.hardware.load("x86-64-avx512")          # a shipped descriptor, by name
    >>> d.kind, d.backend_names()[:2]
    ('cpu', ('openvino', 'onnxruntime'))
    >>> dioe.hardware.load("./my-accelerator.yaml")      # or a file of your own  # doctest: +SKIP
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Mapping

from . import yamlfile
from .backends import names as backend_names
from .errors import DescriptorError
from .schema import LineMap, build, json_schema, spec

SCHEMA_VERSION = 1

Kind = Literal["cpu", "gpu", "npu"]
Precision = Literal["fp32", "tf32", "bf16", "fp16", "fp8", "int8", "int4"]
TorchDevice = Literal["cpu", "cuda", "mlu", "npu", "xpu", "mps", "hpu"]
BackendName = Literal[backend_names()]   # one per file in backends/
TilingStrategy = Literal["auto", "none", "cache_blocked", "tensor_core"]


@dataclass(frozen=True)
class Match:
    """How a live device is recognised as one of this descriptor's class."""

    torch_device: TorchDevice | None = field(default=None, metadata=spec(
        doc="torch device type that drives it (cpu, cuda, mlu, npu, xpu, mps); null when torch cannot"))
    torch_plugin: str | None = field(default=None, metadata=spec(
        doc="Python module that registers the device with torch (torch_mlu, torch_npu)"))
    openvino_device: str | None = field(default=None, metadata=spec(
        doc="OpenVINO device name that finds it (CPU, GPU, NPU)"))
    name_pattern: str = field(default="*", metadata=spec(
        doc="glob matched case-insensitively against the device's name (CPU brand, GPU product name)"))
    isa_flags: tuple[str, ...] = field(default=(), metadata=spec(
        doc="CPU flags from /proc/cpuinfo that must all be present (avx512f, amx_tile, asimd, ...)"))
    machine: tuple[str, ...] = field(default=(), metadata=spec(
        doc="platform.machine() values it runs on (x86_64, aarch64); empty means any"))


@dataclass(frozen=True)
class Provider:
    """One ONNX Runtime execution provider with its options, in priority order."""

    name: str = field(metadata=spec(doc="execution provider, e.g. CUDAExecutionProvider"))
    options: Mapping[str, Any] = field(default_factory=dict, metadata=spec(doc="provider options"))


@dataclass(frozen=True)
class BackendOptions:
    """Options for one backend. Each backend reads the keys it knows; the others must stay unset."""

    providers: tuple[Provider, ...] = field(default=(), metadata=spec(
        doc="onnxruntime: execution providers in priority order"))
    disable_cpu_ep_fallback: bool = field(default=False, metadata=spec(
        doc="onnxruntime: fail instead of silently running unsupported nodes on the CPU provider"))
    device: str | None = field(default=None, metadata=spec(
        doc="openvino: device name (CPU, GPU.0, NPU); torch/inductor: device override"))
    mode: str | None = field(default=None, metadata=spec(doc="inductor: torch.compile mode"))
    config: Mapping[str, Any] = field(default_factory=dict, metadata=spec(
        doc="openvino: extra compile properties"))


@dataclass(frozen=True)
class BackendSpec:
    """A backend this device can be driven by, with its options."""

    name: BackendName = field(metadata=spec(doc="backend name"))
    options: BackendOptions = field(default_factory=BackendOptions)

    def _validate(self, where: LineMap, path: tuple) -> None:
        from .backends import backend_class  # the backend's own file says which options it reads

        default, known = BackendOptions(), backend_class(self.name).options
        for key in BackendOptions.__dataclass_fields__:
            if getattr(self.options, key) != getattr(default, key) and key not in known:
                raise where.error(path + ("options", key), f"not an option of backend {self.name!r}; "
                                  f"expected one of: {', '.join(sorted(known)) or 'none'}")
        if self.name == "onnxruntime" and not self.options.providers:
            raise where.error(path + ("options",), "expected a 'providers' list for onnxruntime, "
                              "e.g. [{name: CPUExecutionProvider}]")


@dataclass(frozen=True)
class Memory:
    """Device memory. A null capacity means 'read it from the live device' (host RAM for CPUs)."""

    capacity_gb: float | None = field(default=None, metadata=spec(gt=0, doc="GiB usable by DIOE; null = live"))
    bandwidth_gbps: float = field(default=50.0, metadata=spec(gt=0, doc="peak memory bandwidth, GB/s"))


@dataclass(frozen=True)
class Link:
    """The link between this device and host memory (PCIe, NVLink-C2C, unified memory)."""

    bandwidth_gbps: float = field(metadata=spec(gt=0, doc="one-direction bandwidth, GB/s"))
    latency_us: float = field(default=0.0, metadata=spec(ge=0, doc="fixed cost of one transfer, µs"))


@dataclass(frozen=True)
class OpRules:
    """Which ATen ops may run here, by name with shell wildcards (aten.linear*, aten.*conv*)."""

    allow: tuple[str, ...] = field(default=("*",), metadata=spec(doc="ops that may run; '*' for all"))
    deny: tuple[str, ...] = field(default=(), metadata=spec(doc="ops that must not run, even if allowed"))
    dtypes: tuple[str, ...] = field(default=(), metadata=spec(
        doc="tensor dtypes the device accepts (float32, int64, ...); empty means any"))

    def permits(self, op_name: str) -> bool:
        """True when `op_name` (like 'aten.linear.default') is allowed and not denied."""
        names = {op_name, op_name.rsplit(".", 1)[0]} if op_name.count(".") >= 2 else {op_name}
        hit = lambda pats: any(fnmatch.fnmatchcase(n, p) for n in names for p in pats)  # noqa: E731
        return hit(self.allow) and not hit(self.deny)


@dataclass(frozen=True)
class OptimizerOptions:
    """Hints for the optimizer about this device."""

    kernel_fusion: bool = field(default=True, metadata=spec(doc="backends may fuse kernels here"))
    tiling_strategy: TilingStrategy = field(default="auto", metadata=spec(doc="tiling the backends aim for"))
    threads: int | None = field(default=None, metadata=spec(gt=0, doc="CPU threads to use; null = all cores"))


@dataclass(frozen=True)
class Descriptor:
    """One class of device: identity, how to find it, how to drive it, and its published figures."""

    name: str = field(metadata=spec(doc="unique descriptor name, e.g. nvidia-h100-80gb"))
    kind: Kind = field(metadata=spec(doc="device class"))
    vendor: str = field(metadata=spec(doc="vendor"))
    architecture: str = field(metadata=spec(doc="microarchitecture, e.g. Hopper, Sapphire Rapids"))
    match: Match = field(metadata=spec(doc="how a live device is recognised"))
    backends: tuple[BackendSpec, ...] = field(metadata=spec(doc="backends in preference order"))
    precisions: tuple[Precision, ...] = field(metadata=spec(doc="precisions it computes in"))
    memory: Memory = field(metadata=spec(doc="device memory"))
    peak_tflops: Mapping[Precision, float] = field(metadata=spec(gt=0, doc="dense peak per precision, TFLOP/s"))
    link: Link = field(metadata=spec(doc="link to host memory"))
    schema_version: int = field(default=SCHEMA_VERSION, metadata=spec(doc="descriptor format version"))
    description: str = field(default="", metadata=spec(doc="one line for humans"))
    ops: OpRules = field(default_factory=OpRules)
    optimizer: OptimizerOptions = field(default_factory=OptimizerOptions)
    sources: tuple[str, ...] = field(default=(), metadata=spec(doc="where the figures come from"))
    path: str = field(default="", init=False, compare=False)

    def _validate(self, where: LineMap, path: tuple) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise where.error(path + ("schema_version",),
                              f"expected {SCHEMA_VERSION}; this DIOE reads descriptor format {SCHEMA_VERSION}")
        if not self.backends:
            raise where.error(path + ("backends",), "expected at least one backend")
        seen = set()
        for i, b in enumerate(self.backends):
            if b.name in seen:
                raise where.error(path + ("backends", i, "name"),
                                  f"expected each backend once; {b.name!r} is listed twice")
            seen.add(b.name)
        for p in self.peak_tflops:
            if p not in self.precisions:
                raise where.error(path + ("peak_tflops", p), f"expected a precision listed in precisions "
                                  f"{list(self.precisions)}; {p!r} is not")
        if self.match.torch_device is None and self.match.openvino_device is None:
            raise where.error(path + ("match",), "expected torch_device or openvino_device, to find the device by")

    def backend_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.backends)

    def backend(self, name: str) -> BackendSpec | None:
        return next((b for b in self.backends if b.name == name), None)


def _shipped_dir() -> Path:
    """The folder of shipped descriptors (the repo's hardware/, installed as the data package dioe.descriptors)."""
    return Path(str(resources.files("dioe.descriptors")))


def shipped() -> dict[str, Path]:
    """Names of the shipped descriptors and their files."""
    return {p.stem: p for p in sorted(_shipped_dir().glob("*.yaml"))}


def resolve(name_or_path: str | Path) -> Path:
    """A shipped descriptor's name, or a path to a YAML file, to a path."""
    if not isinstance(name_or_path, (str, Path)):
        raise DescriptorError(repr(name_or_path), None, "", "expected a shipped descriptor name or a path to a "
                              f"YAML file, got {type(name_or_path).__name__}")
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise DescriptorError(str(p), None, "", "no such file")
        return p
    table = shipped()
    if str(name_or_path) not in table:
        raise DescriptorError(str(name_or_path), None, "", "not a file and not a shipped descriptor; shipped: "
                              + ", ".join(table))
    return table[str(name_or_path)]


def parse(text: str, file: str = "<string>") -> Descriptor:
    """Validate YAML text as a descriptor. `file` is only used in error messages."""
    return from_document(*yamlfile.parse(text, file))


def load(name_or_path: str | Path) -> Descriptor:
    """Load a descriptor by shipped name (`x86-64-avx512`) or by path."""
    return from_document(*yamlfile.read(resolve(name_or_path)))


def from_document(data: Any, where: LineMap) -> Descriptor:
    """A descriptor from a document `dioe.yamlfile` read (pool files read theirs once to tell which they are)."""
    d = build(Descriptor, data, where)
    object.__setattr__(d, "path", where.file)
    return d


def load_all() -> list[Descriptor]:
    """Every shipped descriptor."""
    return [load(p) for p in shipped().values()]


def descriptor_json_schema() -> dict:
    """The JSON Schema of the descriptor format, as shipped in hardware/descriptor.schema.json."""
    out = {"$schema": "https://json-schema.org/draft/2020-12/schema",
           "$id": "https://dioe.dev/schema/descriptor-v1.json",
           "title": "DIOE hardware descriptor"}
    out.update(json_schema(Descriptor))
    return out


def write_json_schema(path: str | Path) -> None:
    Path(path).write_text(json.dumps(descriptor_json_schema(), indent=2) + "\n", encoding="utf-8")
