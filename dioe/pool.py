"""The resource pool: the compute units of this machine, found live and matched to hardware descriptors.

    >>> import dioe
    >>> pool = dioe.ResourcePool.discover()                  # this machine, matched to shipped descriptors
    >>> [m.id for m in pool.members]                          # doctest: +SKIP
    ['cpu0']
    >>> pool = dioe.ResourcePool.discover("tests/pools/standin.yaml")  # stand-in members, see below  # doctest: +SKIP

A pool file (YAML with a top-level `pool:` list) declares members by hand. A member marked `stand_in: true`
obeys its descriptor (op lists, dtypes, backends, memory) but executes on this machine's CPU; tests use
stand-ins to exercise partitioning, transfers and fallbacks without the hardware.
"""

from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import psutil

from . import hardware, yamlfile
from .devices import CpuInfo, cpu_score, cuda_devices, match_cpu, openvino_devices, plugin_devices
from .errors import DescriptorError, PoolError
from .hardware import Descriptor, from_document, resolve
from .schema import LineMap, build, spec
from .telemetry import Sample, Telemetry

GiB = 1024 ** 3


@dataclass(frozen=True)
class Member:
    """One compute unit of the pool: a live device, the descriptor it matched, and how DIOE may use it."""

    id: str                        # unique in the pool: cpu0, cuda0, mlu0, or the pool file's id
    descriptor: Descriptor
    name: str                      # what the device calls itself (CPU brand, GPU product name)
    device: str | None             # torch device string ("cpu", "cuda:0"); None when torch cannot drive it
    present: bool = True
    reason: str = ""               # why absent, or why matched
    stand_in: bool = False         # obeys `descriptor` but executes on the CPU
    # CPU thread budget for the work placed here: ONNX Runtime and OpenVINO keep to it; torch and Inductor run on
    # torch's one intra-op pool per process, and a plan that puts them here says so (Backend.thread_budget)
    threads: int | None = None
    memory_bytes: int | None = None  # capacity DIOE may fill
    backends: tuple[str, ...] = ()   # usable here, in the descriptor's preference order
    # CPU cores this member's work is pinned to (its runtime worker thread's affinity); () runs it wherever the
    # OS schedules it. Pinned members are what let a drift drill take one member's core and not the other's
    cores: tuple[int, ...] = ()
    unavailable: dict = field(default_factory=dict, compare=False)  # backend -> why it cannot be used

    @property
    def kind(self) -> str:
        return self.descriptor.kind

    def describe(self) -> str:
        label = " (stand-in, runs on the CPU)" if self.stand_in else ""
        return f"{self.id}: {self.name} [{self.descriptor.name}]{label}"


@dataclass(frozen=True)
class PoolEntry:
    """One member declared in a pool file."""

    id: str = field(metadata=spec(doc="member id, unique in the pool"))
    descriptor: str = field(metadata=spec(doc="shipped descriptor name, a path relative to the pool file, "
                                              "or 'auto' for this machine's CPU"))
    stand_in: bool = field(default=False, metadata=spec(doc="obey the descriptor but execute on the CPU"))
    threads: int | None = field(default=None, metadata=spec(gt=0, doc="CPU threads for this member"))
    memory_gb: float | None = field(default=None, metadata=spec(gt=0, doc="cap on the memory DIOE may use"))
    backends: tuple[hardware.BackendName, ...] | None = field(default=None, metadata=spec(
        doc="restrict to these of the descriptor's backends"))
    cores: tuple[int, ...] | None = field(default=None, metadata=spec(
        doc="CPU cores to pin this member's work to (Linux); its thread budget defaults to their count"))


@dataclass(frozen=True)
class PoolFile:
    """A pool declared by hand."""

    pool: tuple[PoolEntry, ...] = field(metadata=spec(doc="the members"))


def _backend_reasons(d: Descriptor, device: str | None) -> tuple[tuple[str, ...], dict]:
    from .backends import backend_class, unavailable_reason  # registry; imports no backend library

    usable, why = [], {}
    for spec_ in d.backends:
        reason = unavailable_reason(spec_.name)
        if reason is None and device is None and backend_class(spec_.name).needs_torch_device:
            reason = "torch cannot drive this device"
        if reason:
            why[spec_.name] = reason
        else:
            usable.append(spec_.name)
    return tuple(usable), why


def _member(id_: str, d: Descriptor, name: str, device: str | None, **kw) -> Member:
    backends, why = _backend_reasons(d, device)
    restrict = kw.pop("restrict", None)
    if restrict is not None:
        for b in backends:
            if b not in restrict:
                why[b] = "excluded by the pool file"
        backends = tuple(b for b in backends if b in restrict)
    return Member(id=id_, descriptor=d, name=name, device=device, backends=backends, unavailable=why, **kw)


def _cpu_member(cpu: CpuInfo, d: Descriptor, id_: str = "cpu0") -> Member:
    mem = int(d.memory.capacity_gb * GiB) if d.memory.capacity_gb is not None else psutil.virtual_memory().total
    threads = d.optimizer.threads or cpu.usable_cores
    flags = sorted(set(d.match.isa_flags) & cpu.flags)
    return _member(id_, d, cpu.name, "cpu", threads=threads, memory_bytes=mem,
                   reason=f"matched on {', '.join(flags) or 'architecture'}")


def _find_accelerators(d: Descriptor, used: set[str]) -> list[Member] | str:
    """Live devices matching a non-CPU descriptor, or the reason there are none."""
    m = d.match
    found: list[Member] = []
    if m.torch_device == "cuda":
        gpus, why = cuda_devices()
        hits = [g for g in gpus if fnmatch.fnmatch(g["name"].lower(), m.name_pattern.lower())
                and f"cuda:{g['index']}" not in used]
        for g in hits:
            cap = d.memory.capacity_gb
            found.append(_member(f"cuda{g['index']}", d, g["name"], f"cuda:{g['index']}",
                                 memory_bytes=int(cap * GiB) if cap else g["memory"],
                                 reason=f"matched name {m.name_pattern!r}"))
        if not found:
            return why or ("no NVIDIA GPU matches " + repr(m.name_pattern) + "; found: "
                           + ", ".join(g["name"] for g in gpus))
        return found
    if m.torch_device is not None and m.torch_device != "cpu":
        count, why = plugin_devices(m.torch_device, m.torch_plugin)
        for i in range(count):
            dev = f"{m.torch_device}:{i}"
            if dev in used:
                continue
            cap = d.memory.capacity_gb
            found.append(_member(f"{m.torch_device}{i}", d, f"{d.vendor} {d.architecture}", dev,
                                 memory_bytes=int(cap * GiB) if cap else None, reason="found by torch"))
        return found or why
    if m.openvino_device is not None:
        devices, why = openvino_devices()
        hits = [x for x in devices if x.split(".")[0] == m.openvino_device and f"ov:{x}" not in used]
        for x in hits:
            cap = d.memory.capacity_gb
            found.append(_member(x.lower().replace(".", ""), d, f"{d.vendor} {d.architecture}", None,
                                 memory_bytes=int(cap * GiB) if cap else None, reason="found by OpenVINO"))
        return found or why or f"OpenVINO sees no {m.openvino_device} device (it sees: {', '.join(devices)})"
    return "the descriptor names no way to find the device"


def _add_accelerators(descriptors: Sequence[Descriptor], members: list[Member], absent: list[Member]) -> None:
    """Look each non-CPU descriptor up live; found devices join `members`, the rest `absent` with the reason."""
    used: set[str] = set()
    for d in descriptors:
        found = _find_accelerators(d, used)
        if isinstance(found, str):
            absent.append(_member(d.name, d, d.name, None, present=False, reason=found))
        else:
            members.extend(found)
            used.update(m.device or f"ov:{m.id.upper()}" for m in found)


class ResourcePool:
    """The members DIOE may place work on, and the ones it looked for and did not find (with reasons)."""

    def __init__(self, members: Sequence[Member], absent: Sequence[Member] = (), cpu: CpuInfo | None = None):
        ids = [m.id for m in members]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise PoolError(f"member ids must be unique; repeated: {', '.join(sorted(dup))}")
        self.members: tuple[Member, ...] = tuple(members)
        self.absent: tuple[Member, ...] = tuple(absent)
        self.cpu = cpu or CpuInfo.read()
        self._telemetry = Telemetry(self)

    # -- discovery ------------------------------------------------------------------------------------------
    @classmethod
    def discover(cls, hardware: str | Path | Sequence[str | Path] = "auto") -> "ResourcePool":
        """Find the members of this machine.

        `hardware` is "auto" (every shipped descriptor is tried), a descriptor name or path, a pool file
        (YAML with a top-level `pool:` list), or a list of descriptor names or paths.
        """
        if isinstance(hardware, (str, Path)) and str(hardware) == "auto":
            return cls._auto(CpuInfo.read())
        if isinstance(hardware, (str, Path)):
            refs = [hardware]
        elif isinstance(hardware, (list, tuple)) and hardware:
            refs = list(hardware)
        else:
            raise PoolError("hardware must be 'auto', a descriptor name or path, a pool file, or a list of "
                            f"descriptor names or paths; got {hardware!r}")
        # each file is read once, by the one reader descriptors and pool files share; its content says which it is
        documents = [yamlfile.read(resolve(r)) for r in refs]
        if len(documents) == 1 and _is_pool(documents[0][0]):
            return cls._from_pool_file(*documents[0], CpuInfo.read())
        return cls._from_descriptors([from_document(*doc) for doc in documents], CpuInfo.read())

    @classmethod
    def _auto(cls, cpu: CpuInfo) -> "ResourcePool":
        descriptors = hardware.load_all()
        members, absent = [], []
        best = match_cpu(cpu, descriptors)
        if best is None:
            raise PoolError(f"no shipped descriptor matches this CPU ({cpu.name}, {cpu.machine}); "
                            "pass one with hardware=PATH")
        members.append(_cpu_member(cpu, best))
        _add_accelerators([d for d in descriptors if d.kind != "cpu"], members, absent)
        return cls(members, absent, cpu)

    @classmethod
    def _from_descriptors(cls, descriptors: list[Descriptor], cpu: CpuInfo) -> "ResourcePool":
        members: list[Member] = []
        absent: list[Member] = []
        for d in descriptors:
            if d.kind != "cpu":
                continue
            if cpu_score(d, cpu) is None:
                absent.append(_member(d.name, d, d.name, None, present=False,
                                      reason=f"this CPU ({cpu.name}; {cpu.machine}) does not match: needs "
                                      f"{', '.join(d.match.isa_flags) or d.match.name_pattern}"))
            else:
                members.append(_cpu_member(cpu, d, id_=f"cpu{sum(m.kind == 'cpu' for m in members)}"))
        _add_accelerators([d for d in descriptors if d.kind != "cpu"], members, absent)
        return cls(members, absent, cpu)

    @classmethod
    def _from_pool_file(cls, data: Any, where: LineMap, cpu: CpuInfo) -> "ResourcePool":
        path = Path(where.file)
        spec_ = build(PoolFile, data, where)
        members, absent = [], []
        for i, e in enumerate(spec_.pool):
            d = _pool_descriptor(e, where, ("pool", i, "descriptor"), cpu)
            if e.backends:
                for b in e.backends:
                    if b not in d.backend_names():
                        raise where.error(("pool", i, "backends"), f"{b!r} is not among descriptor "
                                          f"{d.name!r}'s backends {list(d.backend_names())}")
            mem = int(e.memory_gb * GiB) if e.memory_gb is not None else None
            cores = _check_cores(e, where, ("pool", i, "cores"), d)
            if e.stand_in or d.kind == "cpu":
                if e.stand_in is False and cpu_score(d, cpu) is None:
                    absent.append(_member(e.id, d, d.name, None, present=False,
                                          reason=f"this CPU ({cpu.name}) does not match {d.name}"))
                    continue
                if mem is None:
                    mem = int(d.memory.capacity_gb * GiB) if d.memory.capacity_gb is not None \
                        else psutil.virtual_memory().total
                members.append(_member(e.id, d, cpu.name if not e.stand_in else f"stand-in for {d.name}",
                                       "cpu", stand_in=e.stand_in,
                                       threads=e.threads or len(cores) or cpu.usable_cores, cores=cores,
                                       memory_bytes=mem, restrict=e.backends,
                                       reason="stand-in" if e.stand_in else "declared"))
                continue
            found = _find_accelerators(d, set(m.device for m in members if m.device))
            if isinstance(found, str):
                absent.append(_member(e.id, d, d.name, None, present=False, reason=found))
                continue
            m = found[0]
            members.append(replace(m, id=e.id, memory_bytes=mem or m.memory_bytes, threads=e.threads))
        if not members:
            raise PoolError(f"{path}: no member of the pool is present: "
                            + "; ".join(f"{m.id}: {m.reason}" for m in absent))
        return cls(members, absent, cpu)

    # -- lookup ---------------------------------------------------------------------------------------------
    def __iter__(self):
        return iter(self.members)

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, member_id: str) -> Member:
        for m in self.members:
            if m.id == member_id:
                return m
        raise PoolError(f"no member {member_id!r} in the pool; members: {', '.join(m.id for m in self.members)}")

    @property
    def reference(self) -> Member:
        """The member that runs anything: the first real CPU (else the first CPU stand-in)."""
        cpus = [m for m in self.members if m.device == "cpu"]
        real = [m for m in cpus if not m.stand_in]
        if not (real or cpus):
            raise PoolError("the pool has no CPU member to serve as the reference")
        return (real or cpus)[0]

    def with_threads(self, threads: int) -> "ResourcePool":
        """This pool with every CPU member's thread budget capped at `threads`: a process given fewer cores than
        the machine has (a Ray replica with one CPU) keeps its engines to them, rather than run threads for cores
        its neighbours use."""
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise PoolError(f"threads must be a whole number >= 1, got {threads!r}")
        return ResourcePool([replace(m, threads=min(m.threads or threads, threads)) if m.device == "cpu" else m
                             for m in self.members], self.absent, self.cpu)

    def fingerprint(self) -> str:
        """Stable text that changes when the machine or the pool changes (keys profile caches)."""
        import torch

        parts = [self.cpu.name, self.cpu.machine, str(self.cpu.usable_cores), torch.__version__]
        parts += [f"{m.id}={m.descriptor.name}/{m.name}/{m.threads}/{','.join(m.backends)}" for m in self.members]
        return "|".join(parts)

    def same_machine(self, fingerprint: str) -> bool:
        """Whether `fingerprint` (a plan's) names this pool's machine, members and engines, whatever each member's
        thread budget: a process whose engines keep to fewer threads (`with_threads`, a Ray replica) still runs on
        the machine the plan was measured on, and a plan made there runs as planned. A process given fewer cores
        (an affinity mask) is another machine: the fingerprint counts the usable cores."""
        return _without_threads(fingerprint) == _without_threads(self.fingerprint())

    # -- telemetry ------------------------------------------------------------------------------------------
    def start_telemetry(self, interval_s: float = 0.5) -> None:
        """Sample every member in a background thread; `telemetry()` then returns the latest readings."""
        self._telemetry.start(interval_s)

    def stop_telemetry(self) -> None:
        self._telemetry.stop()

    @property
    def telemetry_running(self) -> bool:
        """Whether a background thread samples this pool (`start_telemetry`)."""
        t = self._telemetry._thread
        return t is not None and t.is_alive()

    def telemetry(self, member_id: str | None = None):
        """Latest sample of one member (or a dict of all). Never blocks: samples now if none is running."""
        samples = self._telemetry.latest()
        return samples if member_id is None else samples[self[member_id].id]

    def sample(self) -> dict[str, Sample]:
        """A fresh reading of every member now (what a trace's counter tracks record)."""
        return self._telemetry.sample()

    def to_dict(self) -> dict:
        tel = self.telemetry()

        def row(m: Member) -> dict:
            s = tel.get(m.id)
            return {"id": m.id, "name": m.name, "descriptor": m.descriptor.name, "kind": m.kind,
                    "device": m.device, "present": m.present, "stand_in": m.stand_in, "reason": m.reason,
                    "threads": m.threads, "cores": list(m.cores), "memory_bytes": m.memory_bytes,
                    "backends": list(m.backends),
                    "unavailable_backends": dict(m.unavailable),
                    "telemetry": None if s is None else s.__dict__}

        return {"cpu": {"name": self.cpu.name, "machine": self.cpu.machine, "usable_cores": self.cpu.usable_cores,
                        "flags": sorted(self.cpu.flags)},
                "members": [row(m) for m in self.members], "absent": [row(m) for m in self.absent]}


def _is_pool(data: Any) -> bool:
    return isinstance(data, dict) and "pool" in data


def _check_cores(entry: PoolEntry, where: LineMap, at: tuple, d: Descriptor) -> tuple[int, ...]:
    """The cores a pool entry pins its member to: each one this process may run on, none twice, and only for a
    member whose work runs on the CPU."""
    if entry.cores is None:
        return ()
    if not (entry.stand_in or d.kind == "cpu"):
        raise where.error(at, f"cores pin CPU work; member {entry.id!r} runs on a {d.kind}, not the CPU")
    if not entry.cores:
        raise where.error(at, "expected at least one core, got an empty list")
    if not hasattr(os, "sched_setaffinity"):
        raise where.error(at, "pinning members to cores needs Linux (os.sched_setaffinity)")
    usable = os.sched_getaffinity(0)
    bad = [c for c in entry.cores if c not in usable]
    if bad:
        raise where.error(at, f"core(s) {bad} are not among the cores this process may use {sorted(usable)}")
    if len(set(entry.cores)) != len(entry.cores):
        raise where.error(at, f"a core is named twice in {list(entry.cores)}")
    return tuple(entry.cores)


def _pool_descriptor(entry: PoolEntry, where: LineMap, at: tuple, cpu: CpuInfo) -> Descriptor:
    """The descriptor a pool entry names. A name that finds no file is the pool file's error; a broken descriptor
    is its own file's, at its own line and key, with the member that uses it."""
    if entry.descriptor == "auto":
        d = match_cpu(cpu, hardware.load_all())
        if d is None:
            raise PoolError(f"no shipped descriptor matches this CPU ({cpu.name})")
        return d
    local = Path(where.file).parent / entry.descriptor
    try:
        path = resolve(local if local.exists() else entry.descriptor)
    except DescriptorError as err:
        raise where.error(at, err.message) from None
    try:
        return from_document(*yamlfile.read(path))
    except DescriptorError as err:
        raise DescriptorError(err.file, err.line, err.key, f"{err.message} (the descriptor of member "
                              f"{entry.id!r}, {where.file}:{where.line(at)})") from None


def _without_threads(fingerprint: str) -> str:
    """A pool fingerprint with each member's thread budget left out (see `ResourcePool.fingerprint`: a member reads
    id=descriptor/name/threads/backends, and backends hold no slash)."""
    def member(part: str) -> str:
        head, _threads, backends = part.rsplit("/", 2)
        return f"{head}/{backends}"
    parts = fingerprint.split("|")
    return "|".join(parts[:4] + [member(p) if "=" in p and p.count("/") >= 2 else p for p in parts[4:]])
