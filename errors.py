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
import stat
import sys
from importlib import metadata
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
# Reading a user's JSON; what a path is when it is not a regular file
# ---------------------------------------------------------------------------------------

# Every JSON file of this project nests a few levels (arch_state.json: object, stages,
# rows, numbers); a file nested deeper is not one of them. Python's parser raises
# RecursionError (not a decode error) from about 1000 levels on, and code that walks a
# parsed value recursively can meet it sooner.
MAX_JSON_DEPTH = 64


class JSONTooDeep(json.JSONDecodeError):
    """A JSON text nested deeper than MAX_JSON_DEPTH: a decode error to every caller that
    catches ``json.JSONDecodeError`` (or ValueError)."""

    def __str__(self) -> str:   # no line and column: the whole text is the fault
        return self.msg


def _depth(value: Any) -> int:
    """How deeply lists and objects nest in a parsed JSON value (iteratively: no recursion)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, (list, dict)):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                break
            stack.extend((x, d + 1) for x in (v.values() if isinstance(v, dict) else v))
    return deepest


def parse_json(text: str | bytes) -> Any:
    """``json.loads``, with a text nested deeper than MAX_JSON_DEPTH levels refused as a
    decode error (JSONTooDeep) instead of a RecursionError."""
    too_deep = JSONTooDeep(f"nested more than {MAX_JSON_DEPTH} levels deep; the project's files "
                           "nest a few levels", "", 0)
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    if _depth(value) > MAX_JSON_DEPTH:
        raise too_deep
    return value


def load_json(f) -> Any:
    """``json.load`` of an open text file, as ``parse_json``."""
    return parse_json(f.read())


def special_path(path: str) -> str | None:
    """What ``path`` is when it exists but is not a regular file (a folder, a dangling
    symbolic link, a FIFO, a device, a socket), in words; None for a regular file (or a
    link to one) and for a path that does not exist."""
    try:
        st = os.lstat(path)
    except OSError:
        return None
    if stat.S_ISLNK(st.st_mode):
        target = os.readlink(path)
        if not os.path.exists(path):
            return f"a symbolic link to {target}, which does not exist"
        inner = special_path(os.path.realpath(path))
        return f"a symbolic link to {target}, {inner}" if inner else None
    if stat.S_ISREG(st.st_mode):
        return None
    if stat.S_ISDIR(st.st_mode):
        return "a folder"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "a device file"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket"
    return "not a regular file"


# ---------------------------------------------------------------------------------------
# A torchvision built for another torch
# ---------------------------------------------------------------------------------------

# torchvision 0.(M + 15) is built for torch 2.M (0.16 for 2.1, ..., 0.29 for 2.14), the
# same patch release: torch 2.5.1 takes torchvision 0.20.1.
TORCHVISION_MINOR_OFFSET = 15
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def torchvision_error_line(error: BaseException, torch_version: str,
                           torchvision_version: str | None) -> str:
    """The one line for an ``import torchvision`` that failed: a torchvision wheel built
    for another torch fails with ``RuntimeError: operator torchvision::nms does not
    exist``; say which versions do not fit and the pip command that pairs them."""
    said = (f"{type(error).__name__}: {error}".strip().splitlines() or [""])[0]
    if torchvision_version is None:
        return (f"torchvision is not installed ({said}); install it with the matching torch: "
                "pip install -r requirements.txt")
    torch_base, vision_base = torch_version.split("+")[0], torchvision_version.split("+")[0]
    parts = torch_base.split(".")
    wanted = (f"0.{int(parts[1]) + TORCHVISION_MINOR_OFFSET}.{parts[2]}"
              if len(parts) >= 3 and parts[0] == "2" and parts[1].isdigit() else None)
    if wanted and vision_base.split(".")[:2] != wanted.split(".")[:2]:
        vision_minor = vision_base.split(".")[1] if vision_base.count(".") >= 1 else "?"
        made_for = (f"torch 2.{int(vision_minor) - TORCHVISION_MINOR_OFFSET}"
                    if vision_minor.isdigit() else "another torch")
        return (f"torchvision {torchvision_version} is built for {made_for}, not for the "
                f"installed torch {torch_version} (import torchvision failed: {said}); install "
                f"the one made for this torch: pip install torchvision=={wanted} (or the pair "
                f"again: pip install --force-reinstall torch=={torch_base} torchvision=={wanted}"
                f"{' --index-url ' + CPU_INDEX if '+cpu' in torch_version else ''})")
    return (f"torchvision {torchvision_version} cannot be imported with torch {torch_version} "
            f"({said}); reinstall the pair together: pip install --force-reinstall "
            f"torch=={torch_base} torchvision=={vision_base}")


def exit_on_torchvision_error(error: BaseException, torch_version: str) -> None:
    """Called where torchvision is first imported, when that failed: print the one line
    (``error: ...``) and exit with status 2 instead of a traceback from every script."""
    try:
        version = metadata.version("torchvision")
    except metadata.PackageNotFoundError:
        version = None
    sys.stderr.write(f"error: {torchvision_error_line(error, torch_version, version)}\n")
    raise SystemExit(2)


# ---------------------------------------------------------------------------------------
# Atomic writes
# ---------------------------------------------------------------------------------------

def storage_error(e: OSError, path: str, what: str = "",
                  fix: str = "choose another --save") -> StorageError:
    """One line for a failed write of ``path``: what went wrong and where; ``fix`` says
    where else the output can go (the flag of the script at hand)."""
    what = f"{what} " if what else ""
    folder = os.path.dirname(os.path.abspath(path))
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StorageError(f"the disk is full (no space left on the device holding {folder}) "
                            f"while writing {what}{path}")
    if e.errno in (errno.EACCES, errno.EPERM):
        return StorageError(f"cannot write {what}{path}: the folder {folder} is not writable "
                            f"(permission denied); make it writable or {fix}")
    if e.errno == errno.EROFS:
        return StorageError(f"cannot write {what}{path}: the folder {folder} is on a read-only "
                            f"file system; {fix}")
    return StorageError(f"cannot write {what}{path}: {e.strerror or e}; {fix}")


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
