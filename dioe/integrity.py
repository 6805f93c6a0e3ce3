"""Whether what DIOE finds in its cache is what it wrote there, and whether a folder is DIOE's to delete from.

An artifact (an ONNX model and its weights, an OpenVINO IR pair, a blob OpenVINO compiled into its own cache
folder) is sealed once its files are in place: a manifest beside it, written last, holds each file's size and
sha256. Reuse checks the seal; a file that differs, is missing, or has no seal (a crash between the files and the
seal, a disk error, an edit) is deleted with a warning and built again, so that a damaged file never runs in place
of the model. Profiles and verdicts carry a sha256 of their own content and are measured or decided again when it
does not match.

    >>> import tempfile, pathlib
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "m.onnx").write_bytes(b"model"); _ = seal(d / "m.onnx")
    >>> damage(d / "m.onnx") is None
    True

Every reuse hashes every file in full: a check of sizes and times alone misses bytes changed in place by
anything that keeps or restores the time, and a damaged weight gives wrong numbers, not an error. bert-base's
440 MB of weights took 0.95-1.2 s to check on a loaded two-core AVX2 server (sha256 with the CPU's SHA
instructions), once per process and artifact, beside the seconds an engine takes to build a session from them.
Within one process a file already hashed or written, whose size, inode and modification time have not
changed since, is not hashed again: one optimize reuses an export for its profile, its plan, its rivals and its
precision candidates.

A cache root carries a marker file (`MARKER`), written when DIOE creates the folder or finds it empty. DIOE
reads and writes artifacts in a folder without it (a cache an older DIOE made), but deletes nothing there:
$DIOE_CACHE_DIR pointed at a home or project folder must never cost its owner a folder named `torch/`.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Iterable

from .errors import DIOEError
from .files import DIR_MODE, private_dir, write_text

MARKER = ".dioe-cache"
MARKER_VERSION = 1
SEAL = ".manifest.json"        # `<artifact file name>` + SEAL: the artifact's manifest
_CHUNK = 1 << 22

# path -> (size, inode, mtime_ns) of files this process wrote or hashed and found intact
_known: dict[str, tuple[int, int, int]] = {}


# -- the cache root and its marker -----------------------------------------------------------------------------------
def mark(root: Path) -> Path:
    """Make `root` a DIOE cache where it is new or empty: owner-only, with the marker. A folder holding anything
    else keeps what it holds, unmarked."""
    root = Path(root)
    fresh = not root.exists() or (root.is_dir() and not any(root.iterdir()))
    private_dir(root)
    if fresh and not (root / MARKER).exists():
        os.chmod(root, DIR_MODE)  # an empty folder DIOE was pointed at is its cache now: it will hold weights
        write_text(root / MARKER, json.dumps({"dioe_cache": MARKER_VERSION}) + "\n")
    return root


def check_owned(root: Path, doing: str) -> None:
    """Raise unless `root` carries DIOE's marker; `doing` says what was refused ("clear", "trim")."""
    if not (Path(root) / MARKER).is_file():
        raise DIOEError(f"cache folder {root} has no {MARKER} marker file, so DIOE did not create it (or an older "
                        f"DIOE did) and will not {doing} it: it deletes nothing in a folder that may hold someone "
                        f"else's files. Point $DIOE_CACHE_DIR (or cache_dir=) at a folder of DIOE's own, or, if "
                        f"{root} holds only DIOE's cache, remove it yourself.")


# -- artifacts: sealed after they are written, checked when reused ---------------------------------------------------
def seal_path(main: Path) -> Path:
    return main.with_name(main.name + SEAL)


def side_files(main: Path) -> list[Path]:
    """The files an engine may write beside model file `main`, by their conventional names."""
    return [main.with_name(main.name + ".data"), main.with_suffix(".bin")]


def fingerprints(files: Iterable[Path]) -> dict:
    """Each file's size and sha256, by name: what `seal` writes."""
    return {f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)} for f in dict.fromkeys(map(Path, files))}


def seal(main: Path, files: Iterable[Path] = (), *, entries: dict | None = None) -> Path:
    """Write `main`'s manifest (each of `main` and `files`: its size and sha256), last and atomically, once every
    file is in place. `entries`: those fingerprints taken already, before the files were moved into place (a
    rename changes neither). Returns the manifest's path."""
    main = Path(main)
    paths = list(dict.fromkeys([main, *map(Path, files)]))
    entries = fingerprints(paths) if entries is None else entries
    if main.name not in entries:
        raise ValueError(f"the manifest of {main} must list {main.name} itself")
    for f in paths:
        _remember(f)
    return write_text(seal_path(main), json.dumps({"version": 1, "files": entries}, indent=1))


def damage(main: Path) -> str | None:
    """What is wrong with artifact `main` against its manifest, or None when every file is as sealed."""
    main = Path(main)
    try:
        entries = json.loads(seal_path(main).read_text())["files"]
        if not isinstance(entries, dict) or main.name not in entries:
            raise KeyError(main.name)
    except FileNotFoundError:
        return f"it has no manifest ({seal_path(main).name}): it was not sealed after it was written"
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its manifest {seal_path(main).name} is unreadable ({type(e).__name__})"
    for name, want in entries.items():
        f = main.with_name(name)
        try:
            size = f.stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size} bytes, the manifest says {want['bytes']}"
            if not _unchanged(f) and _sha256(f) != want["sha256"]:
                return f"{name}'s sha256 differs from the manifest's (same size: its content changed)"
        except FileNotFoundError:
            return f"{name} is missing"
        except (OSError, KeyError, TypeError) as e:
            return f"{name} could not be checked ({type(e).__name__}: {e})"
        _remember(f)
    return None


def reusable(main: Path, what: str = "artifact") -> bool:
    """Whether artifact `main` is there and intact. A damaged one is deleted, with a warning naming the file and
    what differed, so the caller builds it again; one that is not there is simply False."""
    main = Path(main)
    if not main.exists():
        return False
    why = damage(main)
    if why is None:
        return True
    discard(main)
    warnings.warn(f"dioe: cached {what} {main} is damaged: {why}. Deleted; building it again.", RuntimeWarning,
                  stacklevel=2)
    return False


def discard(main: Path) -> None:
    """Delete artifact `main`: its manifest first (so no half-deleted artifact looks sealed), then its files."""
    main = Path(main)
    listed: list[Path] = []
    try:
        listed = [main.with_name(n) for n in json.loads(seal_path(main).read_text())["files"]]
    except (OSError, ValueError, KeyError, TypeError):
        pass
    seal_path(main).unlink(missing_ok=True)
    for f in dict.fromkeys([*listed, main, *side_files(main)]):
        f.unlink(missing_ok=True)
        _known.pop(str(f), None)


# -- an engine's own cache folder: files the engine names and writes itself, each sealed on its own ----------------
def check_folder(folder: Path, what: str) -> None:
    """Before the engine reads `folder`: delete, with a warning, each file there that is not as sealed or was never
    sealed, and each seal whose file is gone, so that the engine finds only intact files and builds the rest.
    An engine that checks its own files misses bytes changed in place: OpenVINO loads a compiled blob with
    flipped weights and runs it."""
    for f in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        if f.name.endswith(SEAL):
            if not f.with_name(f.name[:-len(SEAL)]).exists():
                f.unlink(missing_ok=True)
        elif f.is_file():
            reusable(f, what)


def seal_folder(folder: Path) -> None:
    """After the engine wrote into `folder`: seal each file there that has no seal yet."""
    for f in sorted(Path(folder).iterdir()) if Path(folder).is_dir() else ():
        if f.is_file() and not f.name.endswith(SEAL) and not seal_path(f).exists():
            try:
                seal(f)
            except FileNotFoundError:
                pass  # removed meanwhile (another process found it unsealed): built again when next needed


def remember(path: Path) -> None:
    """Note that `path`, as it is now, was found intact: the artifact was touched after it was checked."""
    _remember(Path(path))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _stamp(path: Path) -> tuple[int, int, int]:
    st = path.stat()
    return st.st_size, st.st_ino, st.st_mtime_ns


def _remember(path: Path) -> None:
    try:
        _known[str(path)] = _stamp(path)
    except OSError:
        _known.pop(str(path), None)


def _unchanged(path: Path) -> bool:
    return _known.get(str(path)) == _stamp(path)


# -- JSON records (profiles, verdicts): a sha256 of their own content ------------------------------------------------
def dumps_checked(record: dict, **kw) -> str:
    """`record` as JSON with a "sha256" field over the rest of it, checked by `load_checked`."""
    body = {k: v for k, v in record.items() if k != "sha256"}
    return json.dumps({**body, "sha256": _record_hash(body)}, **kw)


def load_checked(path: Path, what: str) -> dict | None:
    """The record at `path` when it is whole and its sha256 matches; None when there is none. A damaged one
    (unparsable, no checksum, a mismatch) is deleted with a warning, so that it is computed again."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        warnings.warn(f"dioe: cached {what} {path} could not be read ({e}); computing it again", RuntimeWarning,
                      stacklevel=2)
        return None
    try:
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        body = {k: v for k, v in data.items() if k != "sha256"}
        why = ("it has no sha256 field" if "sha256" not in data
               else None if data["sha256"] == _record_hash(body) else "its sha256 differs from its content's")
    except ValueError as e:
        why = f"it is not valid JSON ({e})"
    if why is None:
        return body
    forget(path, what, why)
    return None


def forget(path: Path, what: str, why: str) -> None:
    """Delete cached record `path`, which is wrong because `why`, with a warning."""
    Path(path).unlink(missing_ok=True)
    warnings.warn(f"dioe: cached {what} {path} is damaged: {why}. Deleted; computing it again.", RuntimeWarning,
                  stacklevel=3)


def _record_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


__all__ = ["MARKER", "check_folder", "check_owned", "damage", "discard", "dumps_checked", "fingerprints", "forget",
           "load_checked", "mark", "remember", "reusable", "seal", "seal_folder", "seal_path", "side_files"]
