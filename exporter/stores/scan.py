"""Reading a sops-nix secrets store: its generations, what they cost in memory, and where the symlink points.

A store is a mount point (ramfs or noswap tmpfs) holding one directory per generation, named by a decimal
number, plus a symlink elsewhere that points at the current one. This module only lists directories and
calls lstat/stat/readlink: it never opens a file, and no file name below a generation ever leaves it.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import Enum

from sops_nix_exporter import mountinfo
from sops_nix_exporter.config import StoreConfig
from sops_nix_exporter.stores.walk import GenerationVanished, error_reason, walk


class SymlinkState(str, Enum):
    OK = "ok"  # resolves to a generation directory of this store
    MISSING = "missing"  # no symlink at all
    DANGLING = "dangling"  # points at something that does not exist (or a loop)
    OUTSIDE = "outside"  # resolves, but not to a generation of this store
    UNREADABLE = "unreadable"  # permission denied on the way


@dataclass(frozen=True, slots=True)
class Usage:
    """What one generation costs: regular files below it, nested directories included."""

    files: int = 0
    bytes: int = 0  # st_blocks * 512: the memory the files hold
    apparent_bytes: int = 0  # st_size
    complete: bool = True  # False when part of the tree could not be listed

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.files + other.files,
            self.bytes + other.bytes,
            self.apparent_bytes + other.apparent_bytes,
            self.complete and other.complete,
        )

    @classmethod
    def of_walk(cls, files: int, blocks: int, size: int, complete: bool) -> Usage:
        """The usage a walk found (stores/walk.py: st_blocks and st_size summed)."""
        return cls(files=files, bytes=blocks * 512, apparent_bytes=size, complete=complete)


@dataclass(frozen=True, slots=True)
class Generation:
    number: int
    device: int
    inode: int
    usage: Usage


@dataclass(slots=True)
class StoreScan:
    mountpoint: str
    symlink: str
    up: bool
    keep_generations: int | None
    memory_budget_bytes: int
    down_reason: str | None = None  # "missing", "not_a_directory", "permission_denied", "error"
    generations: list[Generation] = field(default_factory=list)  # sorted by number
    symlink_state: SymlinkState = SymlinkState.MISSING
    current: Generation | None = None
    last_switch_timestamp: float | None = None
    mounts: int = 0
    fstype: str | None = None
    device: int | None = None  # st_dev of the mount point, for matching what processes pin
    # Every filesystem mounted at the mount point (hidden lower ones too), and the mount point's path inside
    # its filesystem ("/" for sops-nix's own ramfs): what another process's mount table is compared with.
    devices: frozenset[int] = frozenset()
    fs_path: str = "/"
    # Parts of the scan that failed, by reason (permission_denied, vanished, error): reported, never raised.
    scan_errors: dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> Usage:
        # Plain sums, not a chain of Usage objects: a scrape asks several times, of thousands of generations.
        usages = [generation.usage for generation in self.generations]
        return Usage(
            files=sum(u.files for u in usages),
            bytes=sum(u.bytes for u in usages),
            apparent_bytes=sum(u.apparent_bytes for u in usages),
            complete=all(u.complete for u in usages),
        )

    @property
    def oldest(self) -> Generation | None:
        return self.generations[0] if self.generations else None

    @property
    def pending(self) -> list[Generation]:
        """Generations above the current one: written by an activation that never linked them."""
        if self.current is None:
            return []
        return [g for g in self.generations if g.number > self.current.number]

    def by_number(self, number: int) -> Generation | None:
        for generation in self.generations:
            if generation.number == number:
                return generation
        return None

    def note_error(self, reason: str) -> None:
        self.scan_errors[reason] = self.scan_errors.get(reason, 0) + 1


def generation_number(name: str) -> int | None:
    """A generation is named by a decimal number as sops-nix writes it: no sign, no leading zero."""
    if name.isascii() and name.isdigit() and (name == "0" or not name.startswith("0")):
        return int(name)
    return None


def measure(path: str, device: int, errors: dict[str, int]) -> Usage:
    """Sum the regular files below path, never following symlinks nor leaving the filesystem.

    Raises GenerationVanished when path itself disappears; everything else becomes an incomplete Usage
    with the reason counted in errors.
    """
    tally = walk(path, device, errors)
    return Usage.of_walk(tally.files, tally.blocks, tally.size, tally.complete)


def _resolve_symlink(scan: StoreScan) -> None:
    try:
        link = os.lstat(scan.symlink)
    except FileNotFoundError:
        scan.symlink_state = SymlinkState.MISSING
        return
    except OSError as exc:
        scan.symlink_state = SymlinkState.UNREADABLE if isinstance(exc, PermissionError) else SymlinkState.MISSING
        return
    scan.last_switch_timestamp = link.st_mtime
    try:
        target = os.stat(scan.symlink)
    except PermissionError:
        scan.symlink_state = SymlinkState.UNREADABLE
        return
    except OSError:
        scan.symlink_state = SymlinkState.DANGLING  # ENOENT, ELOOP, ENOTDIR
        return
    for generation in scan.generations:
        if (generation.device, generation.inode) == (target.st_dev, target.st_ino):
            scan.current = generation
            scan.symlink_state = SymlinkState.OK
            return
    scan.symlink_state = SymlinkState.OUTSIDE


class MeasureSession:
    """One store scan's use of a measurer (Measurer.session): scan_store asks it for the usage of each
    generation it lists, then says which generations exist before the session ends. This one measures each
    afresh; exporter/stores/cache.py's remembers what it measured."""

    def __init__(self, measurer: Measurer) -> None:
        self.measurer = measurer

    def __enter__(self) -> MeasureSession:
        return self

    def __exit__(self, *exc_info: object) -> None:
        """Whatever the session started and the scan did not take (helper processes' walks) is dropped."""

    def vouched(self, path: str, device: int, inode: int) -> Usage | None:
        """The usage of the generation directory listed at path, when it can be told without any system call:
        device is the store's mount point's, inode the one the listing gave. None: stat it and measure it.
        scan_store never asks about a generation something is mounted on or in."""
        return None

    def usage_of(self, path: str, listed: os.stat_result, errors: dict[str, int]) -> Usage:
        """listed is the generation directory's lstat, taken just before, so a cache can check the directory
        without a second stat."""
        return self.measurer.usage(path, listed.st_dev, errors)

    def usages(self, listed: list[tuple[str, os.stat_result]], errors: dict[str, int]) -> Iterator[Usage | Exception]:
        """usage_of for each, in order; a generation that vanished or could not be read yields its exception.
        A session may start on all of them at once (helper processes)."""
        for path, st in listed:
            try:
                yield self.usage_of(path, st, errors)
            except (GenerationVanished, OSError) as exc:
                yield exc

    def retain(self, live: set[tuple[int, int]]) -> None:
        """These (device, inode) are the store's generations now; whatever is known of others may be dropped."""


class Measurer:
    """Measures generations; a scan of one store is one session (`with measurer.session() as session`)."""

    def usage(self, path: str, device: int, errors: dict[str, int]) -> Usage:
        return measure(path, device, errors)

    def session(self) -> MeasureSession:
        return MeasureSession(self)


def scan_store(
    config: StoreConfig,
    budget_bytes: int,
    mounts: list[mountinfo.Mount],
    measurer: Measurer | None = None,
) -> StoreScan:
    """The store as it is now. An activation that links a generation the listing had not seen (it ran during
    the scan) makes the scan stale, not the store broken: one fresh scan sees it after the switch."""
    measurer = measurer or Measurer()
    with measurer.session() as session:
        scan, switched = _scan(config, budget_bytes, mounts, session, first=True)
    if switched:
        with measurer.session() as session:
            scan, _ = _scan(config, budget_bytes, mounts, session, first=False)
    return scan


def _scan(
    config: StoreConfig, budget_bytes: int, mounts: list[mountinfo.Mount], measurer: MeasureSession, first: bool
) -> tuple[StoreScan, bool]:
    """One scan, and whether it found that a switch ran meanwhile (only asked on the first)."""
    scan = StoreScan(
        mountpoint=config.mountpoint,
        symlink=config.symlink,
        up=False,
        keep_generations=config.keep_generations,
        memory_budget_bytes=budget_bytes,
    )
    real_mountpoint = os.path.realpath(config.mountpoint)
    stacked = mountinfo.mounts_at(mounts, real_mountpoint)
    scan.mounts = len(stacked)
    holder = stacked[-1] if stacked else mountinfo.containing(mounts, real_mountpoint)
    scan.fstype = holder.fstype if holder else None
    scan.devices = frozenset(m.device for m in stacked) or frozenset([holder.device] if holder else [])
    if holder is not None and not stacked:
        below = real_mountpoint[len(holder.mount_point.rstrip("/")) :]
        scan.fs_path = os.path.normpath(holder.root.rstrip("/") + "/" + below.lstrip("/"))
    elif holder is not None:
        scan.fs_path = holder.root

    try:
        top = os.stat(config.mountpoint)
        if not stat.S_ISDIR(top.st_mode):
            scan.down_reason = "not_a_directory"
            _resolve_symlink(scan)
            return scan, False
        scan.device = top.st_dev
        scan.devices = scan.devices | {top.st_dev}
        candidates = []
        with os.scandir(config.mountpoint) as entries:
            for entry in entries:
                number = generation_number(entry.name)
                if number is None:
                    continue  # age-keys.txt, gpg-home, anything not a generation
                try:
                    if not entry.is_dir(follow_symlinks=False):
                        continue
                except OSError as exc:
                    scan.note_error(error_reason(exc))
                    continue
                candidates.append((number, entry))
    except FileNotFoundError:
        scan.down_reason = "missing"
        scan.fstype = None  # no filesystem holds a store that is not there, whatever holds its parent
        _resolve_symlink(scan)
        return scan, False
    except OSError as exc:
        scan.down_reason = error_reason(exc)
        _resolve_symlink(scan)
        return scan, False
    scan.up = True

    # A generation with a filesystem mounted on it or inside it: the listing's inode is the covered directory's.
    below = real_mountpoint.rstrip("/") + "/"
    covered = {m.mount_point[len(below) :].partition("/")[0] for m in mounts if m.mount_point.startswith(below)}
    vouched: set[int] = set()
    to_measure: list[tuple[int, str, os.stat_result]] = []
    linked_before = _link_target(scan.symlink)
    for number, entry in sorted(candidates, key=lambda c: c[0]):
        if entry.name not in covered:
            inode = entry.inode()  # from the listing: no system call
            usage = measurer.vouched(entry.path, top.st_dev, inode)
            if usage is not None:
                scan.generations.append(Generation(number=number, device=top.st_dev, inode=inode, usage=usage))
                vouched.add(number)
                continue
        try:
            to_measure.append((number, entry.path, entry.stat(follow_symlinks=False)))
        except OSError as exc:
            scan.note_error(error_reason(exc))
    usages = measurer.usages([(path, st) for _, path, st in to_measure], scan.scan_errors)
    for (number, _, st), usage in zip(to_measure, usages, strict=True):
        if isinstance(usage, GenerationVanished):
            scan.note_error("vanished")
        elif isinstance(usage, OSError):
            scan.note_error(error_reason(usage))
        else:
            scan.generations.append(Generation(number=number, device=st.st_dev, inode=st.st_ino, usage=usage))
    scan.generations.sort(key=lambda generation: generation.number)
    measurer.retain({(g.device, g.inode) for g in scan.generations})
    _resolve_symlink(scan)
    if _switched_meanwhile(scan):
        if first:
            return scan, True
        # Switches faster than scans: not a third scan, which would race the same way, but catching up
        # with the one generation now linked; only another switch within that moment needs a retry.
        for _ in range(CATCH_UP_ATTEMPTS):
            _resolve_symlink(scan)
            if scan.symlink_state is SymlinkState.OUTSIDE and _switched_meanwhile(scan):
                _catch_up_with_switch(scan, measurer)
            if not _switched_meanwhile(scan):
                break
    _confirm_current(scan, measurer, vouched, linked_before)
    return scan, False


def _link_target(symlink: str) -> tuple[int, int] | None:
    try:
        st = os.stat(symlink)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _confirm_current(
    scan: StoreScan, measurer: MeasureSession, vouched: set[int], linked_before: tuple[int, int] | None
) -> None:
    """Make the current generation's figures those of a complete generation.

    sops-nix writes a generation completely, links it, and deletes it only once it is no longer linked. So a
    walk that began after the symlink was seen naming a generation and ended with the symlink still naming
    it saw that generation whole. A generation measured before its link was seen (a switch during the scan)
    is measured again; one switched away from during its walk (switches faster than scans) is replaced by
    the generation linked then. A generation the cache vouched for is settled, hence complete.
    """
    for _ in range(CATCH_UP_ATTEMPTS):
        current = scan.current
        if current is not None:
            identity = (current.device, current.inode)
            if current.number not in vouched and identity != linked_before and _link_target(scan.symlink) == identity:
                _measure_current_again(scan, measurer)
            if scan.current is not None and _link_target(scan.symlink) == (scan.current.device, scan.current.inode):
                return
        _resolve_symlink(scan)
        linked_before = None  # whatever the symlink names now was measured before this moment
        if not _switched_meanwhile(scan):
            if scan.current is None:
                return  # missing, dangling or outside for real: reported as found
            continue
        if scan.symlink_state is SymlinkState.OUTSIDE:
            linked_before = _link_target(scan.symlink)
            _catch_up_with_switch(scan, measurer)  # measures the generation after seeing its link


def _measure_current_again(scan: StoreScan, measurer: MeasureSession) -> None:
    current = scan.current
    assert current is not None
    path = os.path.join(scan.mountpoint, str(current.number))
    try:
        st = os.lstat(path)
        if (st.st_dev, st.st_ino) != (current.device, current.inode):
            return
        usage = measurer.usage_of(path, st, scan.scan_errors)
    except (OSError, GenerationVanished):
        return
    if usage != current.usage:
        scan.current = Generation(number=current.number, device=current.device, inode=current.inode, usage=usage)
        scan.generations = [scan.current if g is current else g for g in scan.generations]


CATCH_UP_ATTEMPTS = 10


def _switched_meanwhile(scan: StoreScan) -> bool:
    """The symlink looked outside the store or dangling only because switches ran during the scan: it now
    names an existing generation directory that the listing had not seen (outside), or that the prune of
    later switches removed while the kernel followed the symlink (dangling, keepGenerations switches
    within one stat)."""
    if scan.symlink_state not in (SymlinkState.OUTSIDE, SymlinkState.DANGLING):
        return False
    target = os.path.realpath(scan.symlink)
    number = generation_number(os.path.basename(target))
    return (
        number is not None
        and os.path.dirname(target) == os.path.realpath(scan.mountpoint)
        and os.path.isdir(target)
        and (scan.symlink_state is SymlinkState.DANGLING or scan.by_number(number) is None)
    )


def _catch_up_with_switch(scan: StoreScan, measurer: MeasureSession) -> None:
    """The symlink names a generation created after the listing. Measure it, and drop the listed ones that
    the switch's prune has removed since: the figures then describe the store just after the switch, never
    more generations than existed at once, nor a store without a current generation."""
    name = os.path.basename(os.path.realpath(scan.symlink))
    number = generation_number(name)
    path = os.path.join(scan.mountpoint, name)
    try:
        listed = os.lstat(path)
        if number is None or not stat.S_ISDIR(listed.st_mode) or listed.st_dev != scan.device:
            return
        usage = measurer.usage_of(path, listed, scan.scan_errors)
    except (OSError, GenerationVanished):
        return  # switched again meanwhile: the symlink stays reported as it was found
    still_there = []
    for generation in scan.generations:
        try:
            st = os.lstat(os.path.join(scan.mountpoint, str(generation.number)))
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) == (generation.device, generation.inode):
            still_there.append(generation)
        else:
            scan.note_error("vanished")
    scan.current = Generation(number=number, device=listed.st_dev, inode=listed.st_ino, usage=usage)
    scan.generations = sorted([*still_there, scan.current], key=lambda g: g.number)
    scan.symlink_state = SymlinkState.OK
