"""The console (stdout) as every script writes it: a run's work and its files never depend
on it, so a console that cannot take the output degrades quietly instead of stopping the
run or printing tracebacks.

- stdout closed (``python train_search.py ... >&-``): the output is dropped; descriptor 1
  is pointed at /dev/null first, so no file the run opens can take its place;
- a reader that went away (``... | head -1``) or a stream closed under the run: the rest
  of the output is dropped, silently;
- a stdout that cannot be written (``> /dev/full``, an I/O error): one warning on stderr,
  then the rest is dropped;
- an encoding that cannot show a character (``PYTHONIOENCODING=ascii``, latin-1 with a
  unicode path): the character is written as an escape (``\\u00e9``).

``runs.run_main`` wraps ``sys.stdout`` in a ``Console`` while a script's ``main`` runs;
log.txt is written by its own handler and is unaffected by any of this.
"""
from __future__ import annotations

import errno
import io
import os
import sys
from collections.abc import Callable
from typing import Any


def is_tty(stream: Any) -> bool:
    """Whether ``stream`` is a terminal; False for None, a closed or a broken stream."""
    try:
        return bool(stream is not None and stream.isatty())
    except (OSError, ValueError, AttributeError):
        return False


class Console(io.TextIOBase):
    """A text stream over ``stream`` (None: a closed stdout) that never raises: after the
    first failed write or flush it drops everything (see the module's docstring)."""

    def __init__(self, stream: Any, name: str = "stdout") -> None:
        super().__init__()
        self.stream = stream
        self.name = name
        self.broken = stream is None

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", None) or "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return not self.broken and is_tty(self.stream)

    def fileno(self) -> int:
        if self.stream is None:
            raise io.UnsupportedOperation("stdout is closed")
        return self.stream.fileno()

    def write(self, text: str) -> int:
        if not self.broken:
            try:
                self.stream.write(text)
            except UnicodeEncodeError:
                encoding = self.encoding
                try:
                    self.stream.write(text.encode(encoding, "backslashreplace").decode(encoding))
                except (OSError, ValueError) as e:
                    self._give_up(e)
            except (OSError, ValueError) as e:   # ValueError: the stream was closed
                self._give_up(e)
        return len(text)

    def flush(self) -> None:
        if not self.broken:
            try:
                self.stream.flush()
            except (OSError, ValueError) as e:
                self._give_up(e)

    def _give_up(self, e: Exception) -> None:
        self.broken = True
        # What the stream still buffers would fail again at its next flush (at the latest
        # when the interpreter exits, as one more traceback): send it to /dev/null.
        try:
            fd = self.stream.fileno()
            null = os.open(os.devnull, os.O_WRONLY)
            os.dup2(null, fd)
            os.close(null)
        except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
            pass
        if not isinstance(e, OSError) or e.errno == errno.EPIPE:
            return   # closed, or the reader went away (head, less quit): nothing to say
        reason = e.strerror or str(e) or type(e).__name__
        try:
            sys.stderr.write(f"warning: {self.name} cannot be written ({reason}); the console "
                             "output stops here, the run goes on (log.txt, where the script "
                             "writes one, keeps the whole log)\n")
        except (OSError, ValueError, AttributeError):
            pass


def _occupy_closed_stdout() -> None:
    """Descriptor 1 closed: open /dev/null onto it, so that neither a file the run opens
    (which would get the lowest free descriptor, 1) nor a library writing to descriptor 1
    mixes console output into the run's files."""
    try:
        os.fstat(1)
        return
    except OSError:
        pass
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        if null != 1:
            os.dup2(null, 1)
            os.close(null)
    except OSError:
        pass


def guard_stdout() -> Callable[[], None]:
    """Wrap ``sys.stdout`` in a Console (once); returns the function that restores it."""
    previous = sys.stdout
    if isinstance(previous, Console):
        return lambda: None
    if previous is None:
        _occupy_closed_stdout()
    sys.stdout = Console(previous)

    def restore() -> None:
        sys.stdout = previous
    return restore
