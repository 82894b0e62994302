"""Atomic file writes: a temporary file in the same folder, then ``os.replace``."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(
    path: str | os.PathLike, data: bytes | str, encoding: str = "utf-8", *, parents: bool = False
) -> Path:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, never a part.

    ``parents=True`` creates the missing folders above ``path`` first. A filesystem fault (missing
    or read-only folder, full disk) raises ``OSError`` naming ``path``.
    """
    path = Path(path)
    try:
        if parents:
            path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as exc:
        raise _naming(exc, path) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data.encode(encoding) if isinstance(data, str) else data)
            fh.flush()
            os.fsync(fh.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _naming(exc, path) from None
        raise
    return path


def _naming(exc: OSError, path: Path) -> OSError:
    """The same fault, naming the file that was to be written (not its temporary name)."""
    return type(exc)(exc.errno, exc.strerror or str(exc), os.fspath(path))
