"""Consumers: containers, services and processes whose mount namespace holds a mount of one generation.

NixOS containers (`containers.NAME.bindMounts`: systemd-nspawn --bind-ro=/run/secrets...), plain
systemd-nspawn, podman and docker volumes, and units with BindPaths=/BindReadOnlyPaths= resolve the symlink
when they mount it, as virtiofsd does: the mount holds one generation, and after a prune the directory is
empty. Their mount tables say so: a mount of the store's filesystem whose root is `/N` (or `/N/sub`, and
`/N//deleted` once removed). The host's own mount of the store (its root is the store itself) reads every
generation and is not a consumer.

Each mount namespace is read once, through one of its processes: namespaces are told apart by
/proc/PID/ns/mnt where it can be read (another user's process needs CAP_SYS_PTRACE), else by the ID of the
first mount of the mount table, which anyone may read (every namespace has mounts of its own). virtiofsd processes are left out: they are the VM shares' family.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from sops_nix_exporter import mountinfo
from sops_nix_exporter.readers import proc as procfs
from sops_nix_exporter.readers.verdict import Verdict
from sops_nix_exporter.readers.virtiofsd import COMMAND_NAME, generation_in_fs
from sops_nix_exporter.stores.scan import StoreScan

CONTAINER_UNIT = re.compile(r"^(container@.+\.service|systemd-nspawn@.+\.service|docker-.+\.scope|libpod-.+\.scope)$")
SERVICE_UNIT = re.compile(r"^.+\.service$")
_VIRTIOFSD = (COMMAND_NAME + "\n").encode()


@dataclass(slots=True)
class Consumer:
    """One reader's mount of one store: the generation it holds."""

    consumer: str  # the systemd unit of its cgroup, else the process's command name
    kind: str  # container, service or process
    mountpoint: str  # the store's, as configured
    generation: int
    deleted: bool
    pid: int  # the process it was read through
    subtree: str = ""  # the part of the generation it mounts ("" for all of it, "app" for N/app)
    verdict: Verdict = field(default_factory=Verdict)
    outdated_files: int | None = None  # files of its subtree that differ from the current generation's


def _unit(cgroup: str | None) -> tuple[str, str] | None:
    """(unit, kind) from a cgroup v2 line: the outermost container unit on the path, else the innermost
    service."""
    if not cgroup:
        return None
    for line in cgroup.splitlines():
        if not line.startswith("0::"):
            continue
        components = [c for c in line[3:].split("/") if c]
        for component in components:
            if CONTAINER_UNIT.match(component):
                return procfs.label(_unescape(component)), "container"
        for component in reversed(components):
            if SERVICE_UNIT.match(component):
                return procfs.label(_unescape(component)), "service"
    return None


def _unescape(name: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), name)


def name_of(pid: int, comm: bytes, proc: str) -> tuple[str, str]:
    """(consumer, kind): the unit in the process's cgroup, else its command name; never its command line."""
    unit = _unit(procfs.cgroup(pid, proc))
    if unit is not None:
        return unit
    return procfs.label(comm.rstrip(b"\n").decode("utf-8", "surrogateescape")), "process"


@dataclass(frozen=True, slots=True)
class ConsumersScan:
    consumers: list[Consumer]
    namespaces: int  # distinct mount namespaces read
    unreadable: int  # processes whose mount table is closed to us (a hidepid /proc); those that exited are not


def _held(mounts: list[mountinfo.Mount], store: StoreScan) -> tuple[int, bool, str] | None:
    """The worst generation a mount table holds of store (deleted first, then the oldest), and the subtree."""
    found = []
    for mount in mounts:
        if mount.device not in store.devices:
            continue
        number, deleted, whole = generation_in_fs(mount.root, store.fs_path)
        if number is not None and not whole:
            found.append((number, deleted, _subtree(mount.root, store.fs_path)))
    if not found:
        return None
    return max(found, key=lambda held: (held[1], -held[0]))


def _subtree(root: str, fs_path: str) -> str:
    """'/3/app//deleted' below fs_path '/' -> 'app'."""
    root = root.removesuffix("//deleted")
    inside = root[len(fs_path.rstrip("/")) :].strip("/")
    return inside.partition("/")[2]


def scan_consumers(stores: list[StoreScan], proc: str = "/proc",
                   listing: list[tuple[int, bytes]] | None = None) -> ConsumersScan:  # fmt: skip
    """Every mount namespace but the exporter's own that holds a generation of a (listable) store; `listing`
    is procfs.processes(proc) when the scan has already read it."""
    # A mount table that names none of the stores' devices holds none of them: not parsed.
    devices = {f" {os.major(d)}:{os.minor(d)} " for store in stores for d in store.devices}
    own = procfs.mount_namespace_of_self(proc)
    seen: set[str] = {own} if own else set()
    consumers: list[Consumer] = []
    namespaces = unreadable = 0
    for pid, comm in procfs.processes(proc) if listing is None else listing:
        if comm == _VIRTIOFSD:
            continue
        namespace = procfs.mount_namespace(pid, proc)
        if namespace is None:
            # Closed to us (another user's, without CAP_SYS_PTRACE): the namespace is told by the ID of its
            # root's mount instead, which no other namespace has (a chroot's process may be read twice).
            root_id = procfs.root_mount_id(pid, proc)
            namespace = f"root-mount:{root_id}" if root_id is not None else None
        if namespace is not None and namespace in seen:
            continue
        try:
            text = procfs.mountinfo_text(pid, proc)
        except PermissionError:
            unreadable += 1
            continue
        if text is None:
            continue  # exited meanwhile
        if namespace is not None:
            seen.add(namespace)
        namespaces += 1
        if not any(device in text for device in devices):
            continue
        mounts = mountinfo.parse(text)
        name = None
        for store in stores:
            held = _held(mounts, store)
            if held is None:
                continue
            if name is None:
                name = name_of(pid, comm, proc)
            consumers.append(Consumer(consumer=name[0], kind=name[1], mountpoint=store.mountpoint,
                                      generation=held[0], deleted=held[1], pid=pid, subtree=held[2]))  # fmt: skip
    return ConsumersScan(consumers=_worst_per_name(consumers), namespaces=namespaces, unreadable=unreadable)


def _worst_per_name(consumers: list[Consumer]) -> list[Consumer]:
    """Two namespaces of one unit (a container's payload and its nspawn) are one consumer: the worse wins."""
    worst: dict[tuple[str, str, str], Consumer] = {}
    for consumer in consumers:
        key = (consumer.consumer, consumer.kind, consumer.mountpoint)
        other = worst.get(key)
        if other is None or (consumer.deleted, -consumer.generation) > (other.deleted, -other.generation):
            worst[key] = consumer
    return sorted(worst.values(), key=lambda c: (c.mountpoint, c.kind, c.consumer))
