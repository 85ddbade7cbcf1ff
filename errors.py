"""The project's error classes and its one way of writing a file, the lowest layer: every
other module may import it, and it imports no other module of the project.

Every error a user can cause is one of these classes; ``runs.run_main`` prints it as one
line (``error: ...``) and exits with status 2, never with a traceback. Files are written
atomically (a temporary beside the file, then a rename): a crash or a full disk leaves
the previous file intact, and a failed write is one ``StorageError`` line.
"""
from __future__ import annotations

import errno
import json
import os
from typing import Any


class UserError(Exception):
    """Bad input from the user. Scripts print it as one line and exit with status 2."""


class NonFiniteLossError(UserError):
    pass


class StorageError(UserError):
    """A write that failed: disk full, permission denied, read-only file system."""


class DataError(UserError):
    """A dataset folder that is missing or unreadable."""


class BadImageError(DataError):
    """An image file that cannot be decoded; the message names the file."""

    def __init__(self, message: str) -> None:
        # A DataLoader worker's error comes back as "Caught ... Original Traceback ...":
        # keep the one line that says which file and why.
        if "Original Traceback" in message:
            message = message.rstrip().splitlines()[-1].split("BadImageError: ", 1)[-1]
        super().__init__(message)


class RunFolderError(UserError):
    """A folder that is not a readable run folder; the message says which and why."""


class OutOfMemory(UserError):
    """The step does not fit in the device memory; the message says what to do."""


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit; the message says how to fix it."""


class GenotypeError(ValueError):
    """A genotype name or file that cannot be used; the message says why and how to fix it."""


# What run_main reports as one line (CheckpointError and GenotypeError predate UserError
# and keep their bases: callers catch them as RuntimeError / ValueError).
ONE_LINE_ERRORS = (UserError, CheckpointError, GenotypeError)


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------

def storage_error(e: OSError, path: str, what: str = "") -> StorageError:
    """One line for a failed write of ``path``: what went wrong and where."""
    what = f"{what} " if what else ""
    folder = os.path.dirname(os.path.abspath(path))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"the disk is full (no space left on the device holding {folder}) "
                            f"while writing {what}{path}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {what}{path}: the folder {folder} is not writable "
                            "(permission denied); make it writable or choose another --save")
    if e.errno == errno.EROFS:
        return StorageError(f"cannot write {what}{path}: the folder {folder} is on a read-only "
                            "file system; choose another --save")
    return StorageError(f"cannot write {what}{path}: {e.strerror or e}")


def write_bytes_atomic(data: bytes, path: str, what: str = "") -> None:
    """Write ``data`` to a temporary file beside ``path`` (one write, flushed to disk),
    then rename it over ``path``: a crash or a full disk leaves the previous file intact
    and no temporary behind (StorageError on failure)."""
    tmp = f"{path}{TMP_INFIX}{os.getpid()}"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        raise storage_error(e, path, what) from None
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json_atomic(obj: Any, path: str, what: str = "") -> None:
    """``obj`` as indented JSON, written atomically."""
    write_bytes_atomic((json.dumps(obj, indent=1) + "\n").encode(), path, what)


def write_all(fd: int, data: bytes) -> None:
    """Write all of ``data`` to the open file ``fd`` (os.write may write less)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


# Temporary files are named {file}.tmp.{pid}; a kill while writing leaves one behind.
TMP_INFIX = ".tmp."


def remove_stale_temporaries(folder: str) -> list[str]:
    """Remove the temporaries of interrupted writes in ``folder`` (call it while holding
    the folder's lock, so no other process is writing them); return their names."""
    removed = []
    for name in sorted(os.listdir(folder)):
        stem, sep, pid = name.rpartition(TMP_INFIX)
        if sep and stem and pid.isdigit():
            try:
                os.remove(os.path.join(folder, name))
                removed.append(name)
            except FileNotFoundError:
                pass
    return removed
