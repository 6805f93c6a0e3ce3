"""DIOE's disk cache: what each backend compiled, one group of files per partition digest (an ONNX model and its
weights, an OpenVINO IR pair), and the profiles and race verdicts that make a warm optimize fast. Compiled
artifacts are kept under a size cap and the least recently used go first: the segment exports and losing rivals
of one transformer come to gigabytes, and nothing else ever removes them. Profiles are small and stay until
`clear`.

    >>> from dioe import cache
    >>> cache.parse_size("20G")
    21474836480
    >>> report = cache.usage()                       # doctest: +SKIP
    >>> cache.trim(max_bytes=5 * 2**30)              # doctest: +SKIP

The cap is $DIOE_CACHE_MAX (a size such as 20G, 500M, or "none"), 20 GiB when unset; every optimize trims to it
and never evicts what it has just compiled. `dioe cache` shows the cache, `dioe cache trim` and `dioe cache
clear` shrink it. Both delete only in a folder DIOE marked as its cache when it created it (`integrity.MARKER`);
artifacts are sealed and checked on reuse (`reuse`).
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from . import integrity
from .backend import cache_root
from .settings import ENV_CACHE_MAX as ENV_MAX
from .settings import env_cache_max as max_bytes
from .text import parse_size

PROFILES = "profiles"


@dataclass(frozen=True)
class Artifact:
    """Every file a backend keeps for one partition digest: evicted together, never one without the others."""

    backend: str
    digest: str
    paths: tuple[Path, ...]
    bytes: int
    used: float  # newest modification time: a backend touches an artifact when it reuses it


def artifacts(root: Path) -> list[Artifact]:
    """The cache's compiled artifacts, least recently used first."""
    groups: dict[tuple[str, str], list[Path]] = {}
    for folder in _folders(root):
        for f in folder.iterdir():
            if f.is_dir() and "." not in f.name:
                # an engine's own cache (OpenVINO's compiled blobs): a folder of the blobs compiled from one IR
                # (each with its seal), or one blob file where an older DIOE kept them all in one folder
                for blob in f.iterdir():
                    groups.setdefault((folder.name, f"{f.name}/{blob.name.split('.', 1)[0]}"), []).append(blob)
            else:  # <digest>.onnx, <digest>.onnx.data, <digest>.xml, <digest>.bin, or a <digest>.<tmp> scratch dir
                groups.setdefault((folder.name, f.name.split(".", 1)[0]), []).append(f)
    out = []
    for (backend, digest), paths in groups.items():
        size, used = 0, 0.0
        for p in paths:  # a folder (an export's scratch space) counts as used when it, or a file in it, was
            for f in ([p] if p.is_file() else [p, *(q for q in p.rglob("*") if q.is_file())]):
                try:
                    st = f.stat()
                except OSError:
                    continue  # removed meanwhile
                size, used = size + (st.st_size if f.is_file() else 0), max(used, st.st_mtime)
        out.append(Artifact(backend, digest, tuple(sorted(paths)), size, used))
    return sorted(out, key=lambda a: (a.used, a.backend, a.digest))


def _folders(root: Path) -> list[Path]:
    """The backends' artifact folders under `root`: only those, whatever else a shared cache folder holds."""
    from . import backends as registry

    return [root / name for name in registry.names() if (root / name).is_dir()]


def reuse(path: str | os.PathLike, what: str = "artifact") -> bool:
    """Whether the cached artifact at `path` can be used: there, and intact against its manifest; then it is
    marked as just used. A damaged one is deleted with a warning (`integrity.reusable`): build it again."""
    if not integrity.reusable(Path(path), what):
        return False
    touch(path)
    integrity.remember(Path(path))  # touched after its check: its new time is not a change of content
    return True


def touch(path: str | os.PathLike) -> None:
    """Mark an artifact as just used, so that trimming evicts it last."""
    try:
        os.utime(path)
    except OSError:
        pass  # read-only cache: it is still used, only its place in the eviction order is stale


def trim(cache_dir=None, *, max_bytes: int | None, keep: Iterable[str | os.PathLike] = ()) -> list[Artifact]:
    """Evict least recently used artifacts until the cache's artifacts fit in `max_bytes`; those holding any
    path in `keep` stay whatever their age. Returns what was evicted. A folder without DIOE's marker is refused
    (`integrity.check_owned`), since it may not be DIOE's alone."""
    if max_bytes is None:
        return []
    keep = {Path(p).resolve() for p in keep if p}
    root = cache_root(cache_dir)
    integrity.check_owned(root, "trim")
    found = artifacts(root)
    total = sum(a.bytes for a in found)
    evicted = []
    for a in found:
        if total <= max_bytes:
            break
        if any(p.resolve() in keep for p in a.paths):
            continue
        for p in a.paths:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
        total -= a.bytes
        evicted.append(a)
    return evicted


def clear(cache_dir=None) -> int:
    """Remove every artifact, profile and verdict (DIOE's own folders only, in a folder marked as DIOE's cache);
    returns the bytes freed."""
    root = cache_root(cache_dir)
    integrity.check_owned(root, "clear")
    freed = 0
    for p in _folders(root) + [root / PROFILES]:
        if p.is_dir():
            freed += sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
            shutil.rmtree(p, ignore_errors=True)
    return freed


def usage(cache_dir=None) -> dict:
    """Where the cache is, its cap, and its size per backend folder (artifacts) and for profiles."""
    root = cache_root(cache_dir)
    per: dict[str, dict] = {}
    oldest = time.time()
    for a in artifacts(root):
        row = per.setdefault(a.backend, {"artifacts": 0, "bytes": 0})
        row["artifacts"] += 1
        row["bytes"] += a.bytes
        oldest = min(oldest, a.used)
    prof = root / PROFILES
    profiles = [f for f in prof.iterdir() if f.is_file()] if prof.is_dir() else []
    return {"root": str(root), "max_bytes": max_bytes(), "backends": per,
            "artifact_bytes": sum(r["bytes"] for r in per.values()),
            "profiles": len(profiles), "profile_bytes": sum(f.stat().st_size for f in profiles),
            "oldest_use": oldest if per else None}


__all__ = ["ENV_MAX", "PROFILES", "Artifact", "artifacts", "clear", "max_bytes", "parse_size", "reuse", "touch",
           "trim", "usage"]
