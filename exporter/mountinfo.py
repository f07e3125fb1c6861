"""The mount table as the kernel shows it in /proc/PID/mountinfo.

Used for the stores (which filesystem holds a mount point, and how many are stacked on it) and, per
process, for what a sandboxed virtiofsd has mounted as its root.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as three octal digits."""
    return _OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), field)


@dataclass(frozen=True, slots=True)
class Mount:
    mount_id: int
    parent_id: int
    device: int  # comparable with st_dev of any file on the filesystem
    root: str  # the directory of the filesystem that is mounted here ("/3" for a bind of a generation)
    mount_point: str
    fstype: str
    source: str


def parse(text: str) -> list[Mount]:
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            separator = fields.index("-", 6)
            major, minor = fields[2].split(":")
            mounts.append(
                Mount(
                    mount_id=int(fields[0]),
                    parent_id=int(fields[1]),
                    device=os.makedev(int(major), int(minor)),
                    root=unescape(fields[3]),
                    mount_point=unescape(fields[4]),
                    fstype=fields[separator + 1],
                    source=unescape(fields[separator + 2]) if len(fields) > separator + 2 else "",
                )
            )
        except (ValueError, IndexError):
            continue  # a line we cannot read says nothing we could rely on
    return mounts


def read(pid: int | str = "self") -> list[Mount]:
    """Raises OSError when the process is gone or its table is closed to us."""
    with open(f"/proc/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        return parse(f.read())


def mounts_at(mounts: list[Mount], path: str) -> list[Mount]:
    """Every filesystem mounted exactly at path, bottom first (the kernel lists them in mount order)."""
    return [m for m in mounts if m.mount_point == path]


def containing(mounts: list[Mount], path: str) -> Mount | None:
    """The mount that holds path: the last one mounted at the longest prefix of it."""
    best: Mount | None = None
    for m in mounts:
        mp = m.mount_point
        if path == mp or mp == "/" or path.startswith(mp.rstrip("/") + "/"):
            if best is None or len(mp) >= len(best.mount_point):
                best = m
    return best
