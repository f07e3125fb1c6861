"""`sops-nix-exporter prune`: remove exactly the generations nobody reads. Run as root, in a unit of its own,
without network; never part of `serve`.

With sops-nix's `keepGenerations = 0` nothing is ever deleted, and VMs and containers keep their mounts; this
deletes the rest. A generation is removed only if it is numbered below the current one, is not the one that
stopped being current less than --min-age seconds ago, and nothing holds it: no VM share (virtiofsd), no mount
namespace (containers, services), no process whose working directory, root or any open descriptor (O_PATH too)
lies inside it. A dry run by default; --apply removes, and checks the store and every reader again immediately
before each removal. Removal never follows a symlink and never leaves the store's filesystem: a directory of
another filesystem inside a generation (a bind mount) is left, said, and the generation kept. One run at a time.

Exit 0 when everything it meant to remove is gone, 1 when something could not be removed (or another run holds
the lock), 2 on a usage or configuration error. What it prints names stores, generation numbers and readers
(units or command names), never a file below a generation.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from sops_nix_exporter.collector.stores import human_bytes, scan_stores
from sops_nix_exporter.config import Config
from sops_nix_exporter.readers import holders
from sops_nix_exporter.readers.shares import StoreShares, scan_shares

DEFAULT_LOCK_FILE = "/run/sops-nix-exporter/prune.lock"
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Busy(Exception):
    """Another prune holds the lock."""


@dataclass
class Outcome:
    removed: list[tuple[str, int, int]] = field(default_factory=list)  # (store, generation, bytes)
    failed: list[str] = field(default_factory=list)  # what could not be removed, and why


def survey(config: Config, proc: str, min_age: float) -> list[StoreShares]:
    """Every store with its readers, open descriptors included, and its plan."""
    stores = [s for s in scan_stores(config).stores if s.up]
    result = scan_shares(stores, config.microvm.state_dir, proc, min_age=min_age)
    by_fd = holders.holders(stores, proc, descriptors=True)
    now = time.time()
    for group in result.stores:
        for (mountpoint, number), names in by_fd.held.items():
            if mountpoint == group.store.mountpoint:
                group.held_by_processes.setdefault(number, set()).update(names)
        group.uninspected = by_fd.uninspected
        group.plan = holders.plan(group.store, group.held(), now, min_age, by_fd.uninspected)
    return result.stores


def remove_generation(path: str, device: int) -> list[str]:
    """Remove the generation directory at path, entry by entry through directory descriptors: a symlink is
    removed, never followed; a directory of another filesystem is left. Returns what was left (relative
    paths are never returned: only counts), empty when the generation is gone."""
    left: list[str] = []
    try:
        fd = os.open(path, _DIRECTORY)
    except FileNotFoundError:
        return []  # removed meanwhile: nothing left to do
    try:
        if os.fstat(fd).st_dev != device:
            return ["the generation is on another filesystem than the store"]
        _clear(fd, device, left)
    finally:
        os.close(fd)
    if left:
        return left
    try:
        os.rmdir(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        return [f"rmdir: {exc.strerror}"]
    return []


def _clear(directory: int, device: int, left: list[str]) -> None:
    for entry in os.scandir(directory):
        try:
            st = os.stat(entry.name, dir_fd=directory, follow_symlinks=False)
        except FileNotFoundError:
            continue
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != device:
                left.append("a directory of another filesystem (a mount) inside it")
                continue
            try:
                sub = os.open(entry.name, _DIRECTORY, dir_fd=directory)
            except FileNotFoundError:
                continue
            try:
                if os.fstat(sub).st_dev != device:
                    left.append("a directory of another filesystem (a mount) inside it")
                    continue
                _clear(sub, device, left)
            finally:
                os.close(sub)
            try:
                os.rmdir(entry.name, dir_fd=directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not left:
                    left.append(f"a directory could not be removed ({exc.strerror})")
        else:
            try:
                os.unlink(entry.name, dir_fd=directory)
            except FileNotFoundError:
                pass
            except OSError as exc:
                left.append(f"a file could not be removed ({exc.strerror})")


def _lock(path: str) -> int:
    os.makedirs(os.path.dirname(path) or ".", mode=0o750, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise Busy(path) from None
    return fd


def run(config: Config, apply: bool = False, min_age: float = holders.DEFAULT_MIN_AGE_SECONDS,
        lock_file: str = DEFAULT_LOCK_FILE, proc: str = "/proc", out: TextIO = sys.stdout,
        before_removal: Callable[[str, int], None] | None = None) -> Outcome:  # fmt: skip
    """The prune. before_removal(store, generation), if given, runs just before each re-check (for tests)."""
    lock = _lock(lock_file)
    outcome = Outcome()
    try:
        groups = survey(config, proc, min_age)
        for group in groups:
            store, plan = group.store, group.plan
            assert plan is not None
            verb = "removes" if apply else "would remove"
            total = plan.bytes_of(store)
            out.write(f"store {store.mountpoint}: {verb} {len(plan.removable)} generation(s), "
                      f"{human_bytes(total)} ({total} bytes)\n")  # fmt: skip
            for number in plan.removable:
                generation = store.by_number(number)
                size = generation.usage.bytes if generation else 0
                out.write(f"  remove {number} ({size} bytes)\n")
            for number, why in sorted(plan.kept.items()):
                out.write(f"  keep {number}: {', '.join(why)}\n")
            if group.uninspected:
                outcome.failed.append(f"store {store.mountpoint}: {group.uninspected} process(es) could not be "
                                      "inspected (needs CAP_SYS_PTRACE, and CAP_DAC_READ_SEARCH for their descriptors): "
                                      "nothing removed")  # fmt: skip
        if not apply:
            return outcome
        for group in groups:
            for number in group.plan.removable if group.plan else []:
                mountpoint = group.store.mountpoint
                if before_removal is not None:
                    before_removal(mountpoint, number)
                _remove_if_still_free(config, proc, min_age, mountpoint, number, outcome, out)
    finally:
        os.close(lock)
    return outcome


def _remove_if_still_free(config: Config, proc: str, min_age: float, mountpoint: str, number: int,
                          outcome: Outcome, out: TextIO) -> None:  # fmt: skip
    fresh = next((g for g in survey(config, proc, min_age) if g.store.mountpoint == mountpoint), None)
    if fresh is None or fresh.plan is None:
        outcome.failed.append(f"store {mountpoint}: cannot be listed any more; generation {number} left")
        return
    if number not in fresh.plan.removable:
        why = ", ".join(fresh.plan.kept.get(number, ["gone"]))
        out.write(f"  kept {number} after all: {why}\n")
        return
    generation = fresh.store.by_number(number)
    assert generation is not None and fresh.store.device is not None
    left = remove_generation(os.path.join(mountpoint, str(number)), fresh.store.device)
    if left:
        reasons = sorted(set(left))
        outcome.failed.append(f"store {mountpoint} generation {number}: not removed: {'; '.join(reasons)}")
        out.write(f"  could not remove {number}: {'; '.join(reasons)}\n")
        return
    outcome.removed.append((mountpoint, number, generation.usage.bytes))
    out.write(f"  removed {number} ({generation.usage.bytes} bytes)\n")
