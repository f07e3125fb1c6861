"""What is known about each generation, kept between scrapes: vouched for by inotify, or by one lstat per directory.

sops-nix writes a generation directory once and never touches it again; with keepGenerations = 0 a store
holds thousands of them, and walking every file of every generation on every scrape would cost as much as
`du` over the whole store. So the first scan walks each generation and remembers its Usage together with
the identity of every directory in it: (device, inode, mtime_ns, ctime_ns) of the generation directory and
of each directory below it (rendered/, nested ones), by path.

With inotify (Linux), the walk places a watch on each directory before opening it to list it. A watch on a
directory reports entries created, removed or renamed in it, writes to and attribute changes of the files
in it (IN_MODIFY, IN_ATTRIB, IN_CLOSE_WRITE), and the directory itself removed, moved or its filesystem
unmounted (IN_IGNORED). Each scan first reads the queue: a generation any of whose watches reported
anything is forgotten and walked again; a lost event (queue overflow) forgets everything. What is
remembered, fully watched and not reported is served as it is: scan_store asks vouched() with the inode
from the listing, and no generation is stat()ed. Since every watch is in place before its directory is
listed, whatever changes after the listing is reported; whatever changed before, the walk saw.

Without a watch (no inotify, the watch_limit of this measurer reached, the kernel's fs.inotify limits
reached, a generation something is mounted on or in, which scan_store never asks vouched() about), a scan
lstat()s the remembered directories and serves the Usage only when every identity is unchanged; anything
else walks the generation again. Why that is enough: creating, removing or renaming an entry changes the
mtime and ctime of the directory that holds it; a directory replaced by another (rm -r and mkdir of the
same number, after a reboot or of a pending generation) has another inode or, if the filesystem hands out
the same inode, a later ctime; a filesystem mounted onto or off a directory changes what lstat of its path
returns. Entries (and watches) of generations that no longer exist are dropped after every scan
(forget_except), so nothing outlives what it describes.

The one assumption, for generations checked by lstat only: a file's size and blocks do not change in place
after its directory entry was created (sops-nix creates each secret and template with its content, once).
A file written slowly while a scan runs is covered by the settle rule: a generation is remembered only
when all of its directories were last changed more than SETTLE_NS before the walk began, so one still
being written is walked again on every scrape until it has been quiet for that long. The same margin is
what makes the identity check sound despite coarse timestamps: a change after the walk stamps its
directory with a time later than any time remembered. Watched generations need neither (inotify reports
writes in place too), but the settle rule applies to them as well, so both ways remember the same.

A first scan with many generations to walk shares them with helper processes (prefetch; the walk and the
helper's main are in stores/walk.py): they place their watches on this measurer's inotify instance, and
what each found is taken in exactly as a walk of this process's own.

Nothing here opens a file: directories are opened to be listed (O_NOFOLLOW), files are only lstat()ed.
"""

from __future__ import annotations

import errno
import logging
import marshal
import os
import stat
import struct
import subprocess
import sys
from collections.abc import Iterator

from sops_nix_exporter.stores import walk as walker
from sops_nix_exporter.stores.inotify import WATCH_MASK, Inotify
from sops_nix_exporter.stores.scan import GenerationVanished, MeasureSession, Measurer, Usage

# A directory changed this recently may still be being written to: walk it again rather than remember it.
SETTLE_NS = 2_000_000_000

# One directory's identity, packed: thousands of generations are remembered, each in one small bytes object
# rather than a tuple of eight integers.
_IDENTITY = struct.Struct("=QQqq")

log = logging.getLogger(__name__)

class _Known:
    """One generation as last walked: its usage and the directories whose identity vouches for it."""

    __slots__ = ("usage", "relatives", "identities", "watches")

    def __init__(self, usage: Usage, relatives: tuple[str, ...], identities: bytes, watches: tuple[int, ...]) -> None:
        self.usage = usage
        self.relatives = relatives
        self.identities = identities  # the signature, packed with _IDENTITY
        # inotify watches on every directory of the generation, placed before each was listed; () when unwatched
        self.watches = watches


# A first scan with at least this many generations to walk shares them with helper processes: below it, starting
# an interpreter (about 20 ms) costs more than it saves.
PARALLEL_FROM = 200
MAX_HELPERS = 3


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class _Helper:
    """A helper process walking a share of the generations, and the paths of that share in order."""

    __slots__ = ("process", "paths", "reserved_watches")

    def __init__(self, process: subprocess.Popen, paths: list[str], reserved_watches: int) -> None:
        self.process = process
        self.paths = paths
        self.reserved_watches = reserved_watches


def _share_of_user_watches() -> int:
    try:
        with open("/proc/sys/fs/inotify/max_user_watches") as f:
            return int(f.read()) // 4
    except (OSError, ValueError):
        return 8192  # the kernel's smallest default


Key = tuple[str, tuple[int, int]]  # the group (the directory listed) and (st_dev, st_ino) of the generation


class CachingMeasurer(Measurer):
    """A Measurer that walks each generation once, then serves it as inotify vouches, or after one lstat per
    directory.

    What is known is grouped by the directory the generation was listed in (the store's mount point), so
    that forget_except, called at the end of each store's scan, drops only that store's gone generations
    even when one measurer serves several stores. A store that lists no generation at all (down, or
    emptied by hand) keeps its group until it lists one again; nothing in it is served before its
    directories check out unchanged.

    watch_limit caps the inotify watches this measurer holds (0: no inotify, every generation is checked by
    lstat; None: a quarter of fs.inotify.max_user_watches, which all of root's processes share, systemd
    too). Used by one scan at a time (Exporter.collect lets concurrent scrapes share the scan in flight).
    walks and hits count generations walked and generations served from what was known (bench/ and the
    tests read them).
    """

    def __init__(self, settle_ns: int = SETTLE_NS, watch_limit: int | None = None, helpers: int | None = None) -> None:
        self.settle_ns = settle_ns
        if helpers is None:
            helpers = min(_usable_cpus() - 1, MAX_HELPERS)
        self.helpers = max(helpers, 0)
        self.helpers_started = 0
        self._helper_of: dict[str, _Helper] = {}  # path of a generation -> the helper walking it
        self._prefetched: dict[str, walker.Walk] = {}  # path of a generation -> what a helper found there
        self._reserved = 0  # watches promised to helpers still running
        if watch_limit is None:
            watch_limit = _share_of_user_watches()
        self.watch_limit = watch_limit
        self._groups: dict[str, dict[tuple[int, int], _Known]] = {}
        self._listed_in: set[str] = set()  # groups seen since the last forget_except
        self._last_shape: tuple[str, ...] = ()  # shared by the generations laid out alike, as most are
        self._watched: dict[int, Key] = {}  # inotify watch descriptor -> the generation it vouches for
        self._drained = False  # the inotify queue has been read since the last forget_except
        self._vouching_for: str | None = None  # the group vouched() last looked in, and that group
        self._vouching_group: dict[tuple[int, int], _Known] = {}
        self._inotify: Inotify | None = None
        self._said_unwatched = False
        if watch_limit != 0:
            try:
                self._inotify = Inotify()
            except (OSError, AttributeError) as exc:  # no inotify in this kernel or libc
                self._unwatched(f"inotify unavailable ({exc})")
        self.walks = 0
        self.hits = 0

    @property
    def _limit_reached(self) -> str:
        """Why a walk stops placing watches when the budget runs out (logged once, at debug level)."""
        return f"the watch limit of {self.watch_limit} is reached"

    @property
    def known(self) -> int:
        """Generations currently remembered."""
        return sum(len(group) for group in self._groups.values())

    @property
    def watches(self) -> int:
        """inotify watches currently held."""
        return len(self._watched)

    def close(self) -> None:
        """Drop every watch and the inotify descriptor (also done when the measurer is garbage-collected)."""
        self.end_prefetch()
        if self._inotify is not None:
            self._inotify.close()
            self._inotify = None
        self._watched.clear()
        for group in self._groups.values():
            for known in group.values():
                known.watches = ()

    def _unwatched(self, reason: str) -> None:
        if not self._said_unwatched:
            self._said_unwatched = True
            log.debug("generations checked by lstat instead of inotify: %s", reason)

    def _drain(self) -> None:
        """Forget every generation whose watches reported anything since the last drain."""
        self._drained = True
        if self._inotify is None:
            return  # read even with nothing watched: the queue of removed watches' IN_IGNORED must not fill up
        seen, overflowed = self._inotify.read()
        if overflowed:
            for group_name, group in self._groups.items():
                for key in list(group):
                    self._forget(group_name, key)
            return
        for wd in seen:
            owner = self._watched.get(wd)  # None: a watch already removed (its IN_IGNORED)
            if owner is not None:
                self._forget(*owner)

    def _forget(self, group_name: str, key: tuple[int, int]) -> None:
        known = self._groups.get(group_name, {}).pop(key, None)
        if known is not None:
            self._release(known.watches)

    def _release(self, watches: tuple[int, ...], keep: tuple[int, ...] = ()) -> None:
        """Remove the watches of a generation no longer remembered (or remembered with others now)."""
        for wd in watches:
            if wd not in keep and self._watched.pop(wd, None) is not None and self._inotify is not None:
                self._inotify.unwatch(wd)

    def _discard(self, added: list[int], keep: tuple[int, ...]) -> None:
        """Remove the watches a walk placed that vouch for nothing: neither kept nor held for a generation."""
        for wd in added:
            if wd not in keep and wd not in self._watched and self._inotify is not None:
                self._inotify.unwatch(wd)

    def vouched(self, path: str, device: int, inode: int) -> Usage | None:
        if not self._drained:
            self._drain()
        group_name = path.rpartition("/")[0]
        if group_name != self._vouching_for:  # once per store and scan, not once per generation
            self._listed_in.add(group_name)
            self._vouching_for, self._vouching_group = group_name, self._groups.get(group_name, {})
        known = self._vouching_group.get((device, inode))
        if known is None or not known.watches:
            return None
        self.hits += 1
        return known.usage

    def usage(self, path: str, device: int, errors: dict[str, int]) -> Usage:
        try:
            listed = os.lstat(path)
        except OSError:
            return self._walk(path, device, errors)  # it reports why, or that the generation vanished
        if not stat.S_ISDIR(listed.st_mode):
            return self._walk(path, device, errors)
        return self.usage_of(path, listed, errors)

    def usage_of(self, path: str, listed: os.stat_result, errors: dict[str, int]) -> Usage:
        if not self._drained:
            self._drain()
        # One string for the store's directory, however many generations refer to it (their watches do).
        group_name = sys.intern(path.rpartition("/")[0])
        if group_name not in self._listed_in:
            self._listed_in.add(group_name)
        group = self._groups.get(group_name)
        if group is None:
            group = self._groups[group_name] = {}
        known = group.get((listed.st_dev, listed.st_ino))
        if known is not None:
            # The check, inline: it runs for every generation on every scrape that inotify cannot vouch for.
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
        return self._walk(path, listed.st_dev, errors, group_name)

    def _walk(self, path: str, device: int, errors: dict[str, int], group_name: str | None = None) -> Usage:
        self.walks += 1
        group = self._groups.get(group_name) if group_name is not None else None
        result = self._from_helper(path) if group is not None else None
        if result is None:
            watching = self._inotify is not None and group is not None
            result = walker.walk_for_exporter(
                path,
                device,
                self._inotify.watch if watching else None,
                self.watch_limit - len(self._watched) - self._reserved,
                self._limit_reached,
            )
        status, started_ns, files, blocks, size, complete, found, relatives, signature, added, stopped = result
        if status == walker.VANISHED:
            self._discard(added, keep=())
            raise GenerationVanished(path)
        usage = Usage.of_walk(files, blocks, size, complete)
        for reason, count in found.items():
            errors[reason] = errors.get(reason, 0) + count
        key = (signature[0], signature[1]) if len(signature) >= 2 else None
        old = group.get(key) if group is not None and key is not None else None
        watches = tuple(added)
        if stopped:
            self._unwatched(stopped)
            watches = ()
        elif any(self._watched.get(wd, (group_name, key)) != (group_name, key) for wd in watches):
            watches = ()  # a directory that already vouches for another generation (a bind mount): not this one's
        if group is None or found or not usage.complete or not signature or signature[0] != device:
            self._discard(added, keep=())
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
            if old is not None:
                self._release(old.watches, keep=watches)
            self._discard(added, keep=watches)
            owner = (group_name, key)  # one tuple for all of the generation's watches
            for wd in watches:
                self._watched[wd] = owner
            group[key] = _Known(usage, shape, identities, watches)
        else:
            self._discard(added, keep=())
        return usage

    def prefetch(self, listed: list[tuple[str, os.stat_result]]) -> None:
        """Share the walk of a first scan with helper processes: from PARALLEL_FROM generations not known yet,
        the exporter keeps the first share and each helper walks one of the others at the same time, placing
        its watches on the exporter's inotify instance (inherited). What each helper found is taken in when
        usage_of reaches its share, and then treated exactly as a walk of the exporter's own."""
        if self.helpers == 0 or not listed:
            return
        if not self._drained:
            self._drain()
        group_name = listed[0][0].rpartition("/")[0]
        group = self._groups.get(group_name, {})
        unknown = [(path, st) for path, st in listed if (st.st_dev, st.st_ino) not in group]  # all in one store
        if len(unknown) < PARALLEL_FROM:
            return
        share = -(-len(unknown) // (self.helpers + 1))
        available = max(self.watch_limit - len(self._watched) - self._reserved, 0)
        for start in range(share, len(unknown), share):
            chunk = unknown[start : start + share]
            if not self._start_helper(group_name, chunk, available * len(chunk) // len(unknown)):
                return

    def _start_helper(self, group_name: str, chunk: list[tuple[str, os.stat_result]], watches: int) -> bool:
        inotify_fd = self._inotify.fd if self._inotify is not None and watches > 0 else -1
        if inotify_fd < 0:
            watches = 0
        request = marshal.dumps((
            group_name,
            [(path.rpartition("/")[2], st.st_dev) for path, st in chunk],
            inotify_fd,
            WATCH_MASK,
            watches,
            self._limit_reached,
        ))  # fmt: skip
        try:
            if not sys.executable:
                raise OSError(errno.ENOENT, "the interpreter's path is unknown (sys.executable is empty)")
            process = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", walker.HELPER_CODE, walker.HELPER_PATH],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.DEVNULL,
                pass_fds=(inotify_fd,) if inotify_fd >= 0 else (),
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self.helpers = 0
            log.warning(
                "first scans walk every generation in the exporter's own process: cannot start a helper process "
                "(%s: %s)", type(exc).__name__, exc.strerror if isinstance(exc, OSError) else exc,
            )  # fmt: skip
            return False
        try:
            process.stdin.write(request)
            process.stdin.close()
        except OSError:
            pass  # it ended before reading its request: collecting it says so, and the exporter walks its share
        self.helpers_started += 1
        helper = _Helper(process, [path for path, _ in chunk], watches)
        self._reserved += helper.reserved_watches
        for path in helper.paths:
            self._helper_of[path] = helper
        return True

    def _from_helper(self, path: str) -> walker.Walk | None:
        """What a helper found at path, waiting for it if it is still walking; None if no helper walked it."""
        helper = self._helper_of.get(path)
        if helper is not None:
            self._collect(helper)
        return self._prefetched.pop(path, None)

    def _collect(self, helper: _Helper) -> None:
        for path in helper.paths:
            self._helper_of.pop(path, None)
        self._reserved -= helper.reserved_watches
        results = None
        with helper.process.stdout:
            try:
                answer = helper.process.stdout.read()
                if helper.process.wait() == 0:
                    results = marshal.loads(answer)
            except (OSError, EOFError, ValueError, TypeError):
                pass
            answer = None  # not held while the walks are taken in
        if not isinstance(results, list) or len(results) != len(helper.paths):
            # Its watches, if it placed any, come back to the exporter as it walks the same directories again:
            # inotify_add_watch returns the descriptor already placed on a directory.
            log.warning(
                "a helper process walking %d generations ended with status %s and no answer: the exporter walks "
                "them itself", len(helper.paths), helper.process.returncode,
            )  # fmt: skip
            return
        try:
            walks = [walker.Walk(*result) for result in results]
        except TypeError:
            walks = None
        results = None  # the plain tuples go before the walks are kept: a first scan's peak is what RSS keeps
        if walks is None:
            log.warning("a helper process answered in a form the exporter does not read: the exporter walks %d "
                        "generations itself", len(helper.paths))  # fmt: skip
            return
        self._prefetched.update(zip(helper.paths, walks, strict=True))

    def end_prefetch(self) -> None:
        for helper in {id(helper): helper for helper in self._helper_of.values()}.values():
            self._collect(helper)
        for result in self._prefetched.values():
            self._discard(result.watches, keep=())
        self._prefetched.clear()

    def forget_except(self, live: set[tuple[int, int]]) -> None:
        for group_name in self._listed_in:
            group = self._groups.get(group_name, {})
            gone = [key for key in group if key not in live]
            for key in gone:
                self._forget(group_name, key)
        self._listed_in.clear()
        self._drained = False
        self._vouching_for, self._vouching_group = None, {}

    def session(self) -> MeasureSession:
        return _CachingSession(self)


class _CachingSession(MeasureSession):
    """One store scan through the cache: a first scan of many generations starts helper processes on them all
    (prefetch), the scan takes their walks in order, and what it did not take is dropped when it ends."""

    measurer: CachingMeasurer

    def __exit__(self, *exc_info: object) -> None:
        self.measurer.end_prefetch()

    def vouched(self, path: str, device: int, inode: int) -> Usage | None:
        return self.measurer.vouched(path, device, inode)

    def usage_of(self, path: str, listed: os.stat_result, errors: dict[str, int]) -> Usage:
        return self.measurer.usage_of(path, listed, errors)

    def usages(self, listed: list[tuple[str, os.stat_result]], errors: dict[str, int]) -> Iterator[Usage | Exception]:
        self.measurer.prefetch(listed)
        yield from super().usages(listed, errors)

    def retain(self, live: set[tuple[int, int]]) -> None:
        self.measurer.forget_except(live)
