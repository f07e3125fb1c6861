"""What is known about each generation, kept between scrapes and re-checked with one stat per directory.

sops-nix writes a generation directory once and never touches it again; with keepGenerations = 0 a store
holds thousands of them, and walking every file of every generation on every scrape would cost as much as
`du` over the whole store. So the first scan walks each generation and remembers its Usage together with
the identity of every directory in it: (device, inode, mtime_ns, ctime_ns) of the generation directory and
of each directory below it (rendered/, nested ones), by path. A later scan lstat()s those directories and
serves the remembered Usage only when every identity is unchanged; anything else walks the generation
again. A warm scan therefore costs one stat per directory, not one per file.

Why that is enough: creating, removing or renaming an entry changes the mtime and ctime of the directory
that holds it; a directory replaced by another (rm -r and mkdir of the same number, after a reboot or of a
pending generation) has another inode or, if the filesystem hands out the same inode, a later ctime; a
filesystem mounted onto or off a directory changes what lstat of its path returns. Entries of generations
that no longer exist are dropped after every scan (forget_except), so nothing outlives what it describes.

The one assumption: a file's size and blocks do not change in place after its directory entry was
created (sops-nix creates each secret and template with its content, once). A file written slowly while
a scan runs is covered by the settle rule: a generation is remembered only when all of its directories
were last changed more than SETTLE_NS before the walk began, so one still being written is walked again
on every scrape until it has been quiet for that long. The same margin is what makes the identity check
sound despite coarse timestamps: a change after the walk stamps its directory with a time later than any
time remembered.

Nothing here opens a file: directories are opened to be listed (O_NOFOLLOW), files are only lstat()ed.
"""

from __future__ import annotations

import os
import stat
import struct
import sys
import time

from exporter.store import GenerationVanished, Measurer, Usage, error_reason

# A directory changed this recently may still be being written to: walk it again rather than remember it.
SETTLE_NS = 2_000_000_000

_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_TYPE = 0o170000  # S_IFMT

# (st_dev, st_ino, st_mtime_ns, st_ctime_ns) of each directory, flattened, in the order of its paths.
Signature = tuple[int, ...]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns


def walk(path: str, device: int, errors: dict[str, int]) -> tuple[Usage, list[str], Signature]:
    """Sum the regular files below path like store.measure, and note every directory on the way.

    Returns the usage, the paths of the directories below path (relative, walk order) and the signature:
    the identity of path itself followed by that of each of those directories, each taken before the
    directory was listed. Directories on another filesystem (something mounted inside a generation) are
    noted but not entered, as measure does. Raises GenerationVanished when path itself disappears.
    """
    files = blocks = size = 0
    complete = True
    relatives: list[str] = []
    signature: list[int] = []

    def failed(exc: OSError) -> None:
        nonlocal complete
        reason = error_reason(exc)
        if reason != "vanished":  # an entry removed between the listing and the stat costs nothing any more
            errors[reason] = errors.get(reason, 0) + 1
            complete = False

    try:
        root_fd = os.open(path, _DIRECTORY_FLAGS)
    except OSError as exc:
        if not os.path.lexists(path):
            raise GenerationVanished(path) from None
        failed(exc)
        return Usage(complete=complete), relatives, ()
    try:
        signature.extend(_identity(os.fstat(root_fd)))
    except OSError as exc:
        os.close(root_fd)
        failed(exc)
        return Usage(complete=False), relatives, ()

    lstat, listdir = os.lstat, os.listdir
    pending = [("", root_fd)]
    try:
        while pending:
            prefix, directory_fd = pending.pop()
            try:
                names = listdir(directory_fd)
                for name in names:
                    try:
                        st = lstat(name, dir_fd=directory_fd)
                    except OSError as exc:
                        failed(exc)
                        continue
                    kind = st.st_mode & _FILE_TYPE  # S_ISREG and S_ISDIR without a call each: once per file
                    if kind == stat.S_IFREG:
                        files += 1
                        blocks += st.st_blocks
                        size += st.st_size
                    elif kind == stat.S_IFDIR:
                        relative = sys.intern(prefix + name)
                        relatives.append(relative)
                        signature.extend(_identity(st))
                        if st.st_dev != device:
                            continue  # another filesystem mounted here: not part of the generation's cost
                        try:
                            # By its full path, not relative to directory_fd: a trace of the exporter then names
                            # every directory it opens (tests/test_stores.py checks that only directories are).
                            pending.append((relative + "/", os.open(path + "/" + relative, _DIRECTORY_FLAGS)))
                        except OSError as exc:
                            failed(exc)
            except OSError as exc:  # the listing itself
                failed(exc)
            finally:
                os.close(directory_fd)
    finally:
        for _, directory_fd in pending:  # left over only when something unexpected ended the walk
            os.close(directory_fd)
    return Usage(files=files, bytes=blocks * 512, apparent_bytes=size, complete=complete), relatives, tuple(signature)


# One directory's identity, packed: thousands of generations are remembered, each in one small bytes object
# rather than a tuple of eight integers.
_IDENTITY = struct.Struct("=QQqq")


class _Known:
    """One generation as last walked: its usage and the directories whose identity vouches for it."""

    __slots__ = ("usage", "relatives", "identities")

    def __init__(self, usage: Usage, relatives: tuple[str, ...], identities: bytes) -> None:
        self.usage = usage
        self.relatives = relatives
        self.identities = identities  # the signature, packed with _IDENTITY


class CachingMeasurer(Measurer):
    """A Measurer that walks each generation once and afterwards re-checks it with one lstat per directory.

    What is known is grouped by the directory the generation was listed in (the store's mount point), so
    that forget_except, called at the end of each store's scan, drops only that store's gone generations
    even when one measurer serves several stores. A store that lists no generation at all (down, or
    emptied by hand) keeps its group until it lists one again; nothing in it is served before its
    directories check out unchanged.

    Used by one scan at a time (Exporter.collect lets concurrent scrapes share the scan in flight).
    walks and hits count generations walked and generations served from what was known (bench/ and the
    tests read them).
    """

    def __init__(self, settle_ns: int = SETTLE_NS) -> None:
        self.settle_ns = settle_ns
        self._groups: dict[str, dict[tuple[int, int], _Known]] = {}
        self._listed_in: set[str] = set()  # groups seen since the last forget_except
        self._last_shape: tuple[str, ...] = ()  # shared by the generations laid out alike, as most are
        self.walks = 0
        self.hits = 0

    @property
    def known(self) -> int:
        """Generations currently remembered."""
        return sum(len(group) for group in self._groups.values())

    def usage(self, path: str, device: int, errors: dict[str, int]) -> Usage:
        try:
            listed = os.lstat(path)
        except OSError:
            return self._walk(path, device, errors)  # it reports why, or that the generation vanished
        if not stat.S_ISDIR(listed.st_mode):
            return self._walk(path, device, errors)
        return self.usage_of(path, listed, errors)

    def usage_of(self, path: str, listed: os.stat_result, errors: dict[str, int]) -> Usage:
        group_name = path.rpartition("/")[0]
        if group_name not in self._listed_in:
            self._listed_in.add(group_name)
        group = self._groups.get(group_name)
        if group is None:
            group = self._groups[group_name] = {}
        known = group.get((listed.st_dev, listed.st_ino))
        if known is not None:
            # The check, inline: it runs for every generation on every scrape.
            pack = _IDENTITY.pack
            identities = pack(listed.st_dev, listed.st_ino, listed.st_mtime_ns, listed.st_ctime_ns)
            try:
                for relative in known.relatives:
                    st = os.lstat(path + "/" + relative)
                    identities += pack(st.st_dev, st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
            except OSError:
                identities = b""
            if identities == known.identities:
                self.hits += 1
                return known.usage
        return self._walk(path, listed.st_dev, errors, group)

    def _walk(
        self, path: str, device: int, errors: dict[str, int], group: dict[tuple[int, int], _Known] | None = None
    ) -> Usage:
        started_ns = time.time_ns()  # before any stat the walk takes
        self.walks += 1
        found: dict[str, int] = {}
        usage, relatives, signature = walk(path, device, found)
        for reason, count in found.items():
            errors[reason] = errors.get(reason, 0) + count
        if group is None or found or not usage.complete or not signature or signature[0] != device:
            return usage
        # Only what had settled before the walk began can be vouched for by its timestamps.
        settled_before = started_ns - self.settle_ns
        if all(signature[i] <= settled_before and signature[i + 1] <= settled_before
               for i in range(2, len(signature), 4)):  # fmt: skip
            shape = tuple(relatives)
            if shape == self._last_shape:
                shape = self._last_shape
            self._last_shape = shape
            identities = b"".join(_IDENTITY.pack(*signature[i : i + 4]) for i in range(0, len(signature), 4))
            group[(signature[0], signature[1])] = _Known(usage, shape, identities)
        return usage

    def forget_except(self, live: set[tuple[int, int]]) -> None:
        for group_name in self._listed_in:
            group = self._groups.get(group_name, {})
            gone = [key for key in group if key not in live]
            for key in gone:
                del group[key]
        self._listed_in.clear()
