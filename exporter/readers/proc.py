"""Every read of /proc the readers make, in one place; `proc` is its root, so fixture trees can stand in for it
(as node_exporter's --path.procfs).

Another process's comm, cmdline, stat, cgroup and mountinfo are readable without privileges; its root, cwd
and fd/ need CAP_SYS_PTRACE (fd/ also CAP_DAC_READ_SEARCH, being a root-owned 0500 directory). Nothing here
opens anything below those links: they are stat()ed and readlink()ed.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from sops_nix_exporter import mountinfo

CAPABILITIES = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19}


@dataclass(frozen=True, slots=True)
class Process:
    pid: int
    ppid: int
    argv: tuple[str, ...]


def read(path: str, limit: int = 65536) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.read(fd, limit)
    finally:
        os.close(fd)


def label(name: str) -> str:
    """A name as listed (undecodable bytes as surrogates) made fit for a label: UTF-8, escapes visible."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def find(proc: str, name: str, listing: list[tuple[int, bytes]] | None = None) -> list[Process]:
    """Every process whose command name is `name`, from `listing` (processes(proc)) when a scan has one. The
    name is read first and alone, so the cost of a host with thousands of other processes is one small read
    each; processes that exit meanwhile are simply not there."""
    found = []
    expected = (name + "\n").encode()
    for pid, comm in processes(proc) if listing is None else listing:
        if comm != expected:
            continue
        entry = str(pid)
        try:
            argv = read(f"{proc}/{entry}/cmdline").split(b"\0")
            status = read(f"{proc}/{entry}/stat", 4096)
        except OSError:
            continue  # exited, or not ours to read
        # The command name in stat is in parentheses and may itself contain ") ": parse after the last one.
        try:
            ppid = int(status[status.rindex(b")") + 2 :].split()[1])
        except (ValueError, IndexError):
            continue
        if argv and argv[-1] == b"":
            argv.pop()
        found.append(
            Process(
                pid=int(entry),
                ppid=ppid,
                # Bytes that are not UTF-8 become visible escapes (\xff): these strings end up in labels,
                # which must be UTF-8, and a store's path (from the UTF-8 configuration) is never among them.
                argv=tuple(a.decode("utf-8", "backslashreplace") for a in argv),
            )
        )
    return found


def processes(proc: str) -> list[tuple[int, bytes]]:
    """(PID, command name with its newline) of every process that is still there when asked."""
    found = []
    for entry in os.listdir(proc):
        if entry.isdigit():
            try:
                found.append((int(entry), read(f"{proc}/{entry}/comm", 64)))
            except OSError:
                continue  # exited, or not ours to read
    return found


def mount_namespace(pid: int, proc: str) -> str | None:
    """The process's mount namespace ("mnt:[4026531841]"); None when it is closed to us (another user's
    process, without CAP_SYS_PTRACE) or gone."""
    try:
        return os.readlink(f"{proc}/{pid}/ns/mnt")
    except OSError:
        return None


def mount_namespace_of_self(proc: str) -> str | None:
    try:
        return os.readlink(f"{proc}/self/ns/mnt")
    except OSError:
        return None


def root_mount_id(pid: int, proc: str) -> str | None:
    """The ID of the first mount in the process's mount table (its root's), from one small read. Every
    namespace has mounts of its own, so this tells namespaces apart where ns/mnt is closed to us."""
    try:
        head = read(f"{proc}/{pid}/mountinfo", 64)
    except OSError:
        return None
    return head.split(b" ", 1)[0].decode("ascii", "replace") if head else None


def mountinfo_text(pid: int, proc: str) -> str | None:
    """The process's mount table; None when it is gone. Raises PermissionError when it is closed to us (a
    /proc mounted with hidepid=)."""
    try:
        with open(f"{proc}/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return f.read()
    except PermissionError:
        raise
    except OSError:
        return None


def cgroup(pid: int, proc: str) -> str | None:
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return None


def cwd(pid: int, proc: str) -> str | None:
    try:
        return label(os.readlink(f"{proc}/{pid}/cwd"))  # it may name the VM, a label
    except OSError:
        return None


def mounts(pid: int, proc: str) -> list[mountinfo.Mount] | None:
    """The process's mount table; None when it cannot be read. Raises ProcessLookupError when it is gone."""
    try:
        with open(f"{proc}/{pid}/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
            return mountinfo.parse(f.read())
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    except OSError:
        return None


def root(pid: int, proc: str) -> tuple[os.stat_result, str | None]:
    """stat and readlink of the process's root. Raises PermissionError without CAP_SYS_PTRACE,
    ProcessLookupError when it is gone, OSError otherwise."""
    try:
        return os.stat(f"{proc}/{pid}/root"), readlink(f"{proc}/{pid}/root")
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None


def open_directories(pid: int, proc: str) -> tuple[list[tuple[os.stat_result, str | None]], bool]:
    """(stat, link) of each directory the process holds open, and whether some descriptor was closed to us.
    Raises ProcessLookupError when it is gone."""
    denied = False
    try:
        descriptors = os.listdir(f"{proc}/{pid}/fd")
    except PermissionError:
        return [], True
    except FileNotFoundError:
        raise ProcessLookupError(pid) from None
    found = []
    for fd in descriptors:
        path = f"{proc}/{pid}/fd/{fd}"
        try:
            st = os.stat(path)
        except PermissionError:
            denied = True
            continue
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode):
            found.append((st, readlink(path)))
    return found, denied


def readlink(path: str) -> str | None:
    try:
        return os.readlink(path)
    except OSError:
        return None


def own_root() -> tuple[int, int]:
    st = os.stat("/")
    return st.st_dev, st.st_ino


def effective_capabilities(proc: str = "/proc") -> dict[str, bool]:
    """The capabilities that decide what the exporter can see, from its own CapEff."""
    try:
        for line in read(f"{proc}/self/status").decode().splitlines():
            if line.startswith("CapEff:"):
                mask = int(line.split()[1], 16)
                return {name: bool(mask >> bit & 1) for name, bit in CAPABILITIES.items()}
    except (OSError, ValueError):
        pass
    return {name: False for name in CAPABILITIES}
