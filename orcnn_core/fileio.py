"""Atomic file writes: a reader never sees a half-written file.

The data goes to a temporary file ``.NAME.XXXX.tmp`` in the target's folder, is flushed to
the disk, and is renamed over the target. A process killed at any moment leaves either the
old file or the new one (plus, at worst, the temporary file, which a failed write removes
itself and ``orcnn-core train`` removes on start). A failed write (disk full, file size
limit, permissions) raises :class:`WriteError` (an :class:`OSError`) whose ``filename``
is the target, and leaves the old file untouched.
"""

import json
import os
import tempfile
from pathlib import Path

#: Suffix of the temporary files; ``orcnn-core train`` deletes stale ones in its folder.
TEMP_SUFFIX = ".tmp"


class WriteError(OSError):
    """Writing a file failed; ``filename`` is that file, ``strerror`` says why."""


def atomic_write_bytes(path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX,
                                   dir=path.parent)
    except OSError as exc:
        raise WriteError(exc.errno, exc.strerror, str(path)) from None
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp makes the file owner-only; give it the permissions open() would.
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            # Name the file the caller asked for, not the temporary one (f.write's errors
            # name no file at all).
            raise WriteError(exc.errno, exc.strerror, str(path)) from None
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (a power cut after it must not bring back the old
    file); best effort: some file systems cannot open or sync a folder."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_json(path, obj, indent=None) -> None:
    """Serialise ``obj`` as JSON and write it atomically to ``path``."""
    atomic_write_bytes(path, json.dumps(obj, indent=indent).encode("utf-8"))
