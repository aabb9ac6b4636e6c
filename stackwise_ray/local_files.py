"""Opening local files that a user, a sweep or a received rack names, so that opening
them can neither hang nor reach past where they are meant to be.

- A FIFO or a device opened for reading blocks until a writer comes (forever, for a
  FIFO nothing writes to): files are opened non-blocking and checked to be regular
  before a byte is read.
- A run directory's own files (logs) are opened with O_NOFOLLOW: a symbolic link planted
  there is refused, never followed to wherever it points.

It imports nothing from the package: config.py reads its YAML through it before torch,
pyarrow or Ray load.
"""

from __future__ import annotations

import errno
import os
import stat


class NotRegularFileError(OSError):
    """A path that is there but is not a regular file; `strerror` says what it is."""


def kind(mode: int) -> str:
    """What a file of this st_mode is, in words."""
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "a regular file" if stat.S_ISREG(mode) else "not a regular file"


def _not_regular(path: str, mode: int) -> NotRegularFileError:
    return NotRegularFileError(errno.EINVAL, f"not a regular file ({kind(mode)})", path)


def source_problem(path: str) -> str | None:
    """Why `path` cannot be read as a data or tokenizer file, or None: checked with stat
    alone, so a FIFO is never opened."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
        return f"cannot read: {getattr(e, 'strerror', None) or e}"
    return None if stat.S_ISREG(mode) else f"not a regular file ({kind(mode)})"


def open_regular(path: str):
    """`open(path, "rb")` for a regular file only: a FIFO, a device or a directory raises
    NotRegularFileError at once instead of blocking or reading what is not a file."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str) -> bytes:
    with open_regular(path) as f:
        return f.read()


def open_log(path: str):
    """A run directory's log, opened for appending text: created if missing; a symbolic link
    (O_NOFOLLOW) or anything but a regular file there raises NotRegularFileError, so a log
    is never written through a link to a file elsewhere."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise NotRegularFileError(errno.ELOOP, "a symbolic link; a run writes its files only inside its "
                                                   "directory (remove the link)", path) from None
        if e.errno == errno.ENXIO:  # a FIFO with no reader: O_NONBLOCK refuses it
            raise NotRegularFileError(errno.ENXIO, "not a regular file (a FIFO)", path) from None
        raise
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, mode)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "a", buffering=1, encoding="utf-8")
    except BaseException:
        os.close(fd)
        raise
