"""Writing DIOE's own files: whole or not at all, and readable by their owner only.

A plan, profile, verdict or trace is written to a scratch file beside its destination and renamed over it, so a
crash mid-write leaves the old file or none, never half of one; the rename is atomic on one file system. Cache
files hold a user's model weights, and folders DIOE creates for them are made owner-only (0700), files 0600.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.json"
    >>> write_text(p, "{}") == p and p.read_text()
    '{}'
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

FILE_MODE = 0o600
DIR_MODE = 0o700


def private_dir(path: str | os.PathLike) -> Path:
    """Make folder `path` (and any missing parents) owner-only where DIOE creates it; an existing folder keeps its
    mode, since it may be the user's."""
    path = Path(path)
    missing = []
    while not path.is_dir() and path not in missing:
        missing.append(path)
        path = path.parent
    for folder in reversed(missing):  # mkdir(parents=True) would make the parents with the umask's mode
        folder.mkdir(mode=DIR_MODE, exist_ok=True)
        os.chmod(folder, DIR_MODE)  # mkdir's mode is masked by the umask too
    return missing[0] if missing else path


def write_bytes(path: str | os.PathLike, data: bytes, *, mode: int = FILE_MODE) -> Path:
    """Write `data` to `path` atomically (scratch file + rename), with permissions `mode`."""
    path = Path(path)
    private_dir(path.parent)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return path


def write_text(path: str | os.PathLike, text: str, *, mode: int = FILE_MODE) -> Path:
    """Write `text` as UTF-8 to `path` atomically, with permissions `mode`."""
    return write_bytes(path, text.encode("utf-8"), mode=mode)


__all__ = ["DIR_MODE", "FILE_MODE", "private_dir", "write_bytes", "write_text"]
