"""inotify(7) through libc (ctypes): the one wrapper the exporter and its helper processes share.

Standard library only: a helper process loads it from a bare interpreter (stores/walk.py).
"""

from __future__ import annotations

import ctypes
import os
import struct
import weakref
from collections.abc import Callable

# inotify(7): every change to a directory's entries, to a file in it (IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE on a
# directory watch report those of the files it holds), or to the directory itself.
IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE = 0x2, 0x4, 0x8
IN_MOVED_FROM, IN_MOVED_TO, IN_CREATE, IN_DELETE = 0x40, 0x80, 0x100, 0x200
IN_DELETE_SELF, IN_MOVE_SELF = 0x400, 0x800
IN_Q_OVERFLOW = 0x4000
IN_ONLYDIR, IN_DONT_FOLLOW = 0x01000000, 0x02000000
_WATCH_MASK = (
    IN_CREATE | IN_DELETE | IN_MOVED_FROM | IN_MOVED_TO | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE
    | IN_DELETE_SELF | IN_MOVE_SELF | IN_ONLYDIR | IN_DONT_FOLLOW
)  # fmt: skip
WATCH_MASK = _WATCH_MASK
_EVENT = struct.Struct("=iIII")  # wd, mask, cookie, len; then len bytes of name


class Inotify:
    """An inotify instance through libc (ctypes): watch directories, read which watches saw something."""

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
        self.fd = fd
        self._finalizer = weakref.finalize(self, os.close, fd)

    def watch(self, path: str) -> int:
        """Watch the directory at path (never a symlink's target), returning the watch descriptor."""
        return _add_watch(self._libc, self.fd, path, _WATCH_MASK)

    def unwatch(self, wd: int) -> None:
        self._libc.inotify_rm_watch(self.fd, wd)  # EINVAL when the kernel already dropped it: nothing to do

    def read(self) -> tuple[set[int], bool]:
        """The watches that reported anything since the last read (IN_IGNORED and IN_UNMOUNT too), and whether
        the queue overflowed (then events were lost: every watch must be taken as having reported)."""
        seen: set[int] = set()
        overflowed = False
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return seen, overflowed
            offset = 0
            while offset < len(data):
                wd, mask, _, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size + length
                if mask & IN_Q_OVERFLOW:
                    overflowed = True
                else:
                    seen.add(wd)

    def close(self) -> None:
        self._finalizer()




def _add_watch(libc, fd: int, path: str, mask: int) -> int:
    wd = libc.inotify_add_watch(fd, os.fsencode(path), mask)
    if wd < 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    return wd


def watcher(fd: int, mask: int = WATCH_MASK) -> Callable[[str], int]:
    """Place watches on an inotify instance this process inherited (a helper's): path -> watch descriptor."""
    libc = ctypes.CDLL(None, use_errno=True)
    return lambda path: _add_watch(libc, fd, path, mask)
