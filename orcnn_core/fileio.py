"""Atomic file writes: a reader never sees a half-written file.

The data goes to a temporary file ``.NAME.XXXX.tmp`` in the target's folder, is flushed to
the disk, and is renamed over the target. A process killed at any moment leaves either the
old file or the new one (plus, at worst, the temporary file, which a failed write removes
itself and ``orcnn-core train`` removes on start). A failed write (disk full, file size
limit, permissions) raises :class:`WriteError` (an :class:`OSError`) whose ``filename``
is the target, and leaves the old file untouched.

It also owns where a command may write at all: :func:`check_not_an_input` refuses an output
path that is, or (for an output folder) holds, one of the command's input files, and
:func:`check_regular_file` refuses an input that is a folder, FIFO or device (opening a
FIFO blocks forever) before it is opened.
"""

import json
import os
import stat
import tempfile
from pathlib import Path

from orcnn_core.errors import InputError

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


# ------------------------------------------------------------------------------ path checks
def check_regular_file(path, what: str) -> Path:
    """``path`` as a Path when it names a regular file (symbolic links followed); else
    :class:`InputError` saying what it is: missing, a directory, not a regular file (a FIFO
    or device would block or never end when read). ``what`` (e.g. ``"--gt"``) starts the
    message when given."""
    name = f"{what} {path}" if what else f"{path}"
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise InputError(f"{name}: cannot read (no such file)") from None
    except OSError as exc:
        raise InputError(f"{name}: cannot read ({exc.strerror})") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"{name}: is a directory, expected a file")
    if not stat.S_ISREG(mode):
        raise InputError(f"{name}: is not a regular file (a FIFO, socket or device)")
    return Path(path)


def _same_file(a: str, b: str) -> bool:
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)  # hard links, bind mounts
    except OSError:
        return False


def check_not_an_input(output, inputs, what: str, folder: bool = False) -> None:
    """Refuse to write ``output`` when that would destroy an input, before any work.

    ``inputs`` are ``(name, path)`` pairs (``("--weights", W)``); paths are compared
    resolved (symbolic links, ``..``) and as files (hard links). A ``folder`` output is
    also refused when an input lies anywhere inside it. One line, naming both paths."""
    out = os.path.realpath(output)
    for name, path in inputs:
        if path is None:
            continue
        real = os.path.realpath(path)
        if _same_file(out, real):
            raise InputError(f"{what} {output}: is the input {name} {path}; refusing to "
                             f"overwrite it, choose another output path")
        if folder and real.startswith(out.rstrip(os.sep) + os.sep):
            raise InputError(f"{what} {output}: holds the input {name} {path}; refusing to "
                             f"write there, choose an output folder outside the inputs")
