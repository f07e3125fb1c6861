"""virtiofsd processes: their command lines (both syntaxes), and what each one really holds, from /proc alone.

virtiofsd resolves its shared directory once, at start (the C one: when its VM first connects), and keeps
serving that directory. What it holds is therefore the kernel's answer, not the command line's:

- namespace sandbox (the default of both implementations): the sandboxed child pivots into the directory,
  so the root line of its /proc/PID/mountinfo names it ("/3", "/3//deleted" once removed). That file is
  readable without privileges.
- chroot sandbox: /proc/PID/root is the directory.
- no sandbox: an O_PATH descriptor of the directory stays open in /proc/PID/fd.

/proc/PID/root and /proc/PID/fd of another user's process need CAP_SYS_PTRACE; without it the mountinfo
answer is still used, and the rest is reported as denied.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from sops_nix_exporter.readers import proc as procfs
from sops_nix_exporter.stores.scan import generation_number

COMMAND_NAME = "virtiofsd"
DELETED_MOUNTINFO_SUFFIX = "//deleted"
DELETED_LINK_SUFFIX = " (deleted)"


@dataclass(frozen=True, slots=True)
class Command:
    """What a virtiofsd command line asks for. Both syntaxes: Rust (--shared-dir) and QEMU's C (-o source=)."""

    source: str
    socket: str | None
    sandbox: str
    # --readonly (Rust virtiofsd; microvm.nix writes it for microvm.shares.*.readOnly). QEMU's C virtiofsd
    # has no such option: its shares are always writable by the guest.
    readonly: bool = False


def _options(text: str) -> dict[str, str]:
    """QEMU-style '-o key=value,key=value'."""
    options = {}
    for item in text.split(","):
        key, _, value = item.partition("=")
        if key:
            options[key.strip()] = value
    return options


def parse_command(argv: tuple[str, ...] | list[str]) -> Command | None:
    """None when the command line names no shared directory (garbage, truncated, or --help)."""
    source = socket = None
    sandbox = "namespace"
    readonly = False
    args = list(argv[1:])
    i = 0
    while i < len(args):
        arg = args[i]
        key, has_value, value = arg.partition("=")
        takes_value = key in ("--shared-dir", "--socket-path", "--socket", "--sandbox", "-o")
        if takes_value and not has_value:
            if i + 1 >= len(args):
                break  # truncated: the value is missing
            value = args[i + 1]
            i += 1
        elif key.startswith("-o") and len(key) > 2 and not takes_value:
            key, value = "-o", arg[2:]
        if key == "--readonly" and not has_value:
            readonly = True
        elif key == "--shared-dir":
            source = value
        elif key in ("--socket-path", "--socket"):
            socket = value
        elif key == "--sandbox":
            sandbox = value
        elif key == "-o":
            options = _options(value)
            source = options.get("source", source)
            socket = options.get("vhost_user_socket", socket)
            sandbox = options.get("sandbox", sandbox)
        i += 1
    if not source:
        return None
    return Command(source=source, socket=socket, sandbox=sandbox or "namespace", readonly=readonly)


@dataclass(frozen=True, slots=True)
class Held:
    """What one process holds in a store, as far as could be read.

    method: root (/proc/PID/root), mountinfo, fd, unpinned (readable, holds nothing in the store yet), or
    denied (the parts that would tell need CAP_SYS_PTRACE).
    """

    method: str
    generation: int | None = None
    deleted: bool = False
    whole_store: bool = False  # serves the mount point itself: every generation, never stale
    device: int | None = None
    inode: int | None = None

    @property
    def pins(self) -> bool:
        return self.generation is not None or self.whole_store


@dataclass(frozen=True, slots=True)
class StoreIdentity:
    """What is needed to recognise a store's directories from another process's point of view."""

    mountpoint: str  # as configured
    real_mountpoint: str
    fs_path: str  # the mount point's path inside its filesystem, as mount tables name it ("/" for a ramfs)
    devices: frozenset[int]  # every filesystem mounted at the mount point, hidden lower ones included
    mountpoint_inode: int | None
    generations: dict[tuple[int, int], int]  # (device, inode) of each generation directory -> its number


def generation_in_fs(relative: str, prefix: str = "/") -> tuple[int | None, bool, bool]:
    """A path inside the store's filesystem ('/3', '/3/rendered', '/3//deleted' in a mount table) ->
    (3, deleted?, is the mount point itself?). prefix is where the mount point sits in that filesystem."""
    deleted = relative.endswith(DELETED_MOUNTINFO_SUFFIX)
    if deleted:
        relative = relative[: -len(DELETED_MOUNTINFO_SUFFIX)]
    prefix = prefix.rstrip("/")
    relative = relative.rstrip("/")
    if relative == prefix:
        return None, deleted, True
    if not relative.startswith(prefix + "/"):
        return None, deleted, False
    first = relative[len(prefix) + 1 :].split("/", 1)[0]
    return generation_number(first), deleted, False


def _generation_from_link(link: str, store: StoreIdentity) -> tuple[int | None, bool, bool]:
    """A /proc link target ('/run/secrets.d/3 (deleted)') -> (number, deleted?, is the mount point?)."""
    deleted = link.endswith(DELETED_LINK_SUFFIX)
    if deleted:
        link = link[: -len(DELETED_LINK_SUFFIX)]
    number, _, whole = generation_in_fs(link, store.real_mountpoint)
    return number, deleted, whole


def _from_stat(st: os.stat_result, link: str | None, store: StoreIdentity, method: str) -> Held | None:
    if st.st_dev not in store.devices:
        return None
    if st.st_ino == store.mountpoint_inode and st.st_nlink > 0:
        return Held(method, whole_store=True, device=st.st_dev, inode=st.st_ino)
    number = store.generations.get((st.st_dev, st.st_ino))
    if number is not None:
        return Held(method, generation=number, device=st.st_dev, inode=st.st_ino)
    # Not a generation directory we listed: removed since (link count 0), or below a generation.
    parsed_number, parsed_deleted, whole = _generation_from_link(link, store) if link else (None, False, False)
    if whole:
        return Held(method, whole_store=True, device=st.st_dev, inode=st.st_ino)
    deleted = st.st_nlink == 0 or parsed_deleted
    if parsed_number is None and not deleted:
        return None
    return Held(method, generation=parsed_number, deleted=deleted, device=st.st_dev, inode=st.st_ino)


def inspect(pid: int, store: StoreIdentity, own_root: tuple[int, int], proc: str = "/proc") -> Held:
    """What pid holds in store. Raises ProcessLookupError when the process is gone."""
    denied = False

    # 1. Its root directory: a chroot, or the directory a namespace sandbox pivoted into.
    try:
        st, link = procfs.root(pid, proc)
        if (st.st_dev, st.st_ino) != own_root:
            held = _from_stat(st, link, store, "root")
            if held is not None:
                if held.generation is None and not held.whole_store:
                    # Deleted and its path unreachable from here: the mount table still names it.
                    held = _from_mountinfo(pid, store, proc) or held
                return held
    except PermissionError:
        denied = True
    except ProcessLookupError:
        raise
    except OSError:
        pass

    # 2. The mount table: readable without privileges, names what a namespace sandbox pivoted into.
    held = _from_mountinfo(pid, store, proc)
    if held is not None:
        return held

    # 3. Open directory descriptors: what an unsandboxed virtiofsd keeps.
    directories, closed = procfs.open_directories(pid, proc)
    denied = denied or closed
    best: Held | None = None
    for st, link in directories:
        held = _from_stat(st, link, store, "fd")
        if held is not None and (best is None or (best.generation is None and held.generation is not None)):
            best = held
    if best is not None:
        return best
    return Held("denied" if denied else "unpinned")


def find(proc: str = "/proc", listing: list[tuple[int, bytes]] | None = None) -> list[procfs.Process]:
    return procfs.find(proc, COMMAND_NAME, listing)


def _from_mountinfo(pid: int, store: StoreIdentity, proc: str) -> Held | None:
    mounts = procfs.mounts(pid, proc)
    if mounts is None:
        return None
    roots = [m for m in mounts if m.mount_point == "/"]
    if not roots or roots[-1].device not in store.devices:
        return None
    top = roots[-1]
    number, deleted, whole = generation_in_fs(top.root, store.fs_path)
    if whole and not deleted:
        return Held("mountinfo", whole_store=True, device=top.device)
    if number is None:
        return None
    return Held("mountinfo", generation=number, deleted=deleted, device=top.device)
