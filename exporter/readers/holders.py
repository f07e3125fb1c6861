"""Processes that hold a generation without mounting it: their working directory, their root, or (for the prune
alone) any open descriptor, O_PATH ones included, lies inside the generation. And the plan that follows: which
generations nobody reads, and what freeing them would free.

/proc/PID/cwd and /proc/PID/root are readlink()ed (another user's need CAP_SYS_PTRACE); their text names the
path as the kernel knows it, "/run/secrets.d/3/app" or "/run/secrets.d/3 (deleted)".
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sops_nix_exporter.readers import proc as procfs
from sops_nix_exporter.readers.mounts import name_of
from sops_nix_exporter.stores.scan import StoreScan, generation_number

DELETED = " (deleted)"
# The generation that stopped being current less than this ago may still be opened by a reader starting up.
DEFAULT_MIN_AGE_SECONDS = 60


def generation_of_path(path: str, real_mountpoint: str) -> int | None:
    """'/run/secrets.d/3/app (deleted)' -> 3; None for a path that is not inside a generation of the store."""
    path = path.removesuffix(DELETED)
    prefix = real_mountpoint.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    return generation_number(path[len(prefix) :].split("/", 1)[0])


@dataclass(slots=True)
class Holders:
    """(store mount point, generation) -> who holds it; and the processes that could not be inspected (their
    cwd, root or descriptors are closed to us: another user's, without CAP_SYS_PTRACE). While any could not,
    what they hold is unknown, and nothing may be called free."""

    held: dict[tuple[str, int], set[str]]
    uninspected: int = 0


def _link(path: str) -> str | None:
    """readlink, None when the process is gone; PermissionError propagates."""
    try:
        return os.readlink(path)
    except PermissionError:
        raise
    except OSError:
        return None


def holders(stores: list[StoreScan], proc: str = "/proc", descriptors: bool = False,
            listing: list[tuple[int, bytes]] | None = None) -> Holders:  # fmt: skip
    """Who holds each generation through cwd, root and, with descriptors, open descriptors: the unit of the
    process's cgroup, else its command name."""
    real = {store.mountpoint: os.path.realpath(store.mountpoint) for store in stores}
    found = Holders(held={})
    held = found.held
    own = os.getpid()
    for pid, comm in procfs.processes(proc) if listing is None else listing:
        # Not ourselves, nor init: PID 1's working directory and root are the system's own, and a container
        # manager's init may be closed even to root with CAP_SYS_PTRACE (it holds capabilities we lack).
        if pid in (own, 1):
            continue
        try:
            links = [_link(f"{proc}/{pid}/cwd"), _link(f"{proc}/{pid}/root")]
            if descriptors:
                try:
                    names = os.listdir(f"{proc}/{pid}/fd")
                except FileNotFoundError:
                    names = []
                links += [_link(f"{proc}/{pid}/fd/{fd}") for fd in names]
        except PermissionError:
            found.uninspected += 1
            continue
        for link in links:
            if not link or not link.startswith("/"):
                continue
            for store in stores:
                number = generation_of_path(link, real[store.mountpoint])
                if number is not None:
                    held.setdefault((store.mountpoint, number), set()).add(name_of(pid, comm, proc)[0])
    return found


@dataclass(frozen=True, slots=True)
class Plan:
    """What a prune of one store would do now."""

    removable: list[int]  # generations numbered below the current one that nobody holds
    kept: dict[int, list[str]]  # generation -> who holds it, or why it stays ("current", "pending", "just replaced")

    def bytes_of(self, store: StoreScan) -> int:
        return sum(g.usage.bytes for g in store.generations if g.number in self.removable)


def plan(store: StoreScan, held: dict[int, set[str]], now: float, min_age: float = DEFAULT_MIN_AGE_SECONDS,
         uninspected: int = 0) -> Plan:  # fmt: skip
    """Never the current generation, never a pending one (above current: an activation may be writing it), never
    the one that stopped being current less than min_age seconds ago (from the symlink's mtime), never one
    someone holds. Without a current generation, or while some process could not be inspected, nothing is
    removable."""
    kept: dict[int, list[str]] = {}
    removable: list[int] = []
    current = store.current.number if store.current else None
    below = [g.number for g in store.generations if current is not None and g.number < current]
    just_replaced = max(below) if below else None
    recent = store.last_switch_timestamp is not None and now - store.last_switch_timestamp < min_age
    for generation in store.generations:
        number = generation.number
        if current is None:
            kept[number] = ["no current generation"]
        elif number == current:
            kept[number] = ["current"]
        elif number > current:
            kept[number] = ["pending"]
        elif held.get(number):
            kept[number] = sorted(held[number])
        elif uninspected:
            kept[number] = [f"{uninspected} process(es) could not be inspected "
                            "(needs CAP_SYS_PTRACE, and CAP_DAC_READ_SEARCH for their descriptors)"]
        elif number == just_replaced and recent:
            kept[number] = [f"replaced less than {min_age:g} s ago"]
        else:
            removable.append(number)
    return Plan(removable=removable, kept=kept)
