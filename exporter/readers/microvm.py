"""microvm.nix's view of its VMs: the shares each VM declares in its state directory, and the names it gives.

microvm.nix declares each virtiofs share in STATE_DIR/VM/{booted,current}/share/microvm/virtiofs/TAG/ with a
file `source` (the host directory) and `socket` (VM-virtiofs-TAG.sock, relative to STATE_DIR/VM); it runs a
VM's virtiofsd processes in microvm-virtiofsd@VM.service, from STATE_DIR/VM. STATE_DIR/VM/booted exists only
while the VM runs (microvm-set-booted@VM removes it when the VM stops); current/ is what it would start from.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from sops_nix_exporter.readers import proc as procfs
from sops_nix_exporter.readers.virtiofsd import Command

UNIT_PATTERN = re.compile(r"microvm-virtiofsd@(.+?)\.service")
SOCKET_PATTERN = re.compile(r"^(.+)-virtiofs-(.+)\.sock$")
UNKNOWN = "unknown"
DECLARED_LIMIT = 4096  # a source or socket file is one path; anything longer is not microvm.nix's


@dataclass(frozen=True, slots=True)
class DeclaredShare:
    vm: str
    tag: str
    source: str
    socket: str
    running: bool = True  # declared under booted/: the VM runs; under current/ alone: it is stopped


def _unescape_unit(name: str) -> str:
    return re.sub(r"\\x([0-9a-fA-F]{2})", lambda m: chr(int(m.group(1), 16)), name)


def _read_small(path: str) -> str | None:
    try:
        with open(path, "rb") as f:
            data = f.read(DECLARED_LIMIT + 1)
    except OSError:
        return None
    if len(data) > DECLARED_LIMIT:
        return None
    return data.decode("utf-8", "replace").strip()


def declared_shares(state_dir: str) -> list[DeclaredShare]:
    """The virtiofs shares microvm.nix declared for each VM under its state directory."""
    try:
        vms = sorted(os.listdir(state_dir))
    except OSError:
        return []
    found = []
    for vm in vms:
        for generation in ("booted", "current"):
            base = os.path.join(state_dir, vm, generation, "share", "microvm", "virtiofs")
            try:
                tags = sorted(os.listdir(base))
            except OSError:
                continue
            for tag in tags:
                source = _read_small(os.path.join(base, tag, "source"))
                socket = _read_small(os.path.join(base, tag, "socket"))
                if source:
                    found.append(DeclaredShare(vm=procfs.label(vm), tag=procfs.label(tag), source=source,
                                               socket=socket or "", running=generation == "booted"))  # fmt: skip
            break  # booted wins over current: it is what the running VM was started from
    return found


def vm_name(pid: int, command: Command, state_dir: str, proc: str) -> str:
    """The VM a virtiofsd serves: its cgroup's unit, else its socket's place under the state directory, else
    the socket's name; never its command line's other words."""
    text = procfs.cgroup(pid, proc)
    match = UNIT_PATTERN.search(text) if text else None
    if match:
        return _unescape_unit(match.group(1))
    socket = command.socket
    if socket:
        if not socket.startswith("/"):
            cwd = procfs.cwd(pid, proc)
            socket = os.path.join(cwd, socket) if cwd else socket
        base = state_dir.rstrip("/") + "/"
        if socket.startswith(base):
            return socket[len(base) :].split("/", 1)[0]
        match = SOCKET_PATTERN.match(os.path.basename(socket))
        if match:
            return match.group(1)
    return UNKNOWN


def share_tag(vm: str, command: Command, declared: list[DeclaredShare]) -> str:
    """The share's tag: the declaration with the same socket or source, else the socket's name."""
    socket_base = os.path.basename(command.socket) if command.socket else None
    for share in declared:
        if share.vm == vm and socket_base and os.path.basename(share.socket) == socket_base:
            return share.tag
    for share in declared:
        if share.vm == vm and os.path.normpath(share.source) == os.path.normpath(command.source):
            return share.tag
    if socket_base:
        match = SOCKET_PATTERN.match(socket_base)
        if match:
            return match.group(2)
        return socket_base.removesuffix(".sock")
    return UNKNOWN
