"""VM shares of the secrets stores: which VM serves which generation, and what the next switch does to it.

A share is found two ways: a running virtiofsd whose source is (or resolves into) a store, and a share
microvm.nix declared in STATE_DIR/NAME/booted/share/microvm/virtiofs/TAG/{source,socket}. A declared
share that no virtiofsd serves is a VM that lost its secrets.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

from exporter import processes
from exporter.processes import Command, Held, Process, StoreIdentity
from exporter.store import StoreScan

UNIT_PATTERN = re.compile(r"microvm-virtiofsd@(.+?)\.service")
SOCKET_PATTERN = re.compile(r"^(.+)-virtiofs-(.+)\.sock$")
UNKNOWN = "unknown"
# An unsandboxed virtiofsd with --inode-file-handles=prefer (microvm.nix's default) on a filesystem that has
# file handles (tmpfs, sops-nix's useTmpfs) keeps its shared directory as a file handle, which /proc does not
# show, and holds only the filesystem's mount point open (for open_by_handle_at). What it serves cannot be
# told then; that open mount point is not a share of the whole store.
FILE_HANDLE = "file_handle"
DECLARED_LIMIT = 4096  # a source or socket file is one path; anything longer is not microvm.nix's


@dataclass(frozen=True, slots=True)
class DeclaredShare:
    vm: str
    tag: str
    source: str
    socket: str


@dataclass(slots=True)
class Share:
    vm: str
    share: str
    mountpoint: str
    source: str
    sandbox: str
    up: bool
    pids: tuple[int, ...] = ()
    held: Held | None = None  # None when nothing serves it
    current_generation: int | None = None
    keep_generations: int | None = None

    @property
    def method(self) -> str:
        return self.held.method if self.held else "down"

    @property
    def known(self) -> bool:
        """Whether what it serves could be told (a share not yet connected serves nothing stale)."""
        return self.held is not None and self.held.method not in ("denied", FILE_HANDLE)

    @property
    def served_generation(self) -> int | None:
        return self.held.generation if self.held else None

    @property
    def deleted(self) -> bool:
        return bool(self.held and self.held.deleted)

    @property
    def stale(self) -> bool:
        if self.held is None or self.held.whole_store or self.served_generation is None:
            return self.deleted
        return self.served_generation != self.current_generation

    @property
    def generations_behind(self) -> int | None:
        if self.served_generation is None or self.current_generation is None:
            return None
        return self.current_generation - self.served_generation

    @property
    def pruned_on_next_switch(self) -> bool | None:
        """None when unknowable: no keepGenerations configured, or nothing served."""
        if self.keep_generations is None or self.served_generation is None or self.current_generation is None:
            return None
        if self.deleted or self.keep_generations == 0:
            return False
        return self.served_generation <= self.current_generation + 1 - self.keep_generations


@dataclass(slots=True)
class SharesResult:
    shares: list[Share] = field(default_factory=list)
    capabilities: dict[str, bool] = field(default_factory=dict)
    unreadable_processes: int = 0  # virtiofsd processes some of whose state needs CAP_SYS_PTRACE

    def for_store(self, mountpoint: str) -> list[Share]:
        return [s for s in self.shares if s.mountpoint == mountpoint]


def pinned_generations(shares: list[Share]) -> set[int]:
    return {s.served_generation for s in shares if s.served_generation is not None}


def recommended_keep_generations(store: StoreScan, shares: list[Share]) -> int | None:
    """The smallest keepGenerations under which the next switch deletes no generation a share serves.

    The next switch makes current + 1 current and deletes every generation <= current + 1 - keep, so a
    served generation s survives when keep >= current + 2 - s. One is sops-nix's default and the least.
    """
    if store.current is None:
        return None
    served = [s.served_generation for s in shares if s.served_generation is not None and not s.deleted]
    return max([1] + [store.current.number + 2 - generation for generation in served])


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


def _label(name: str) -> str:
    """A file name as listed (undecodable bytes as surrogates) made fit for a label: UTF-8, escapes visible."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


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
                    found.append(DeclaredShare(vm=_label(vm), tag=_label(tag), source=source, socket=socket or ""))
            break  # booted wins over current: it is what the running VM was started from
    return found


def store_for_source(source: str, stores: list[StoreScan]) -> StoreScan | None:
    """The store a share's source is, or resolves into: the symlink, a path under it, a generation, or the
    mount point itself."""
    if not source.startswith("/"):
        return None
    normal = os.path.normpath(source)
    for store in stores:
        for base in (store.symlink, store.mountpoint):
            if normal == base or normal.startswith(base.rstrip("/") + "/"):
                return store
    try:
        resolved = os.path.realpath(normal)
    except OSError:
        return None
    for store in stores:
        real = os.path.realpath(store.mountpoint)
        if resolved == real or resolved.startswith(real.rstrip("/") + "/"):
            return store
    return None


def names_mountpoint(source: str, store: StoreScan) -> bool:
    """Whether a share's source is the store's mount point itself (and not the symlink, or a path below)."""
    normal = os.path.normpath(source)
    if normal == os.path.normpath(store.mountpoint):
        return True
    try:
        return os.path.realpath(normal) == os.path.realpath(store.mountpoint)
    except OSError:
        return False


def store_identity(store: StoreScan) -> StoreIdentity:
    try:
        inode: int | None = os.stat(store.mountpoint).st_ino
    except OSError:
        inode = None
    return StoreIdentity(
        mountpoint=store.mountpoint,
        real_mountpoint=os.path.realpath(store.mountpoint),
        fs_path=store.fs_path,
        devices=store.devices,
        mountpoint_inode=inode,
        generations={(g.device, g.inode): g.number for g in store.generations},
    )


def _group(found: list[Process]) -> dict[int, list[Process]]:
    """The parent and the sandboxed child of one virtiofsd are one share: group by the topmost
    virtiofsd ancestor carrying the same command line."""
    by_pid = {p.pid: p for p in found}
    groups: dict[int, list[Process]] = {}
    for process in found:
        leader = process
        seen = {leader.pid}
        while leader.ppid in by_pid and by_pid[leader.ppid].argv == process.argv and leader.ppid not in seen:
            leader = by_pid[leader.ppid]
            seen.add(leader.pid)
        groups.setdefault(leader.pid, []).append(process)
    return groups


def _vm_name(pid: int, command: Command, state_dir: str, proc: str) -> str:
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            match = UNIT_PATTERN.search(f.read())
        if match:
            return _unescape_unit(match.group(1))
    except OSError:
        pass
    socket = command.socket
    if socket:
        if not socket.startswith("/"):
            cwd = processes_cwd(pid, proc)
            socket = os.path.join(cwd, socket) if cwd else socket
        base = state_dir.rstrip("/") + "/"
        if socket.startswith(base):
            return socket[len(base) :].split("/", 1)[0]
        match = SOCKET_PATTERN.match(os.path.basename(socket))
        if match:
            return match.group(1)
    return UNKNOWN


def processes_cwd(pid: int, proc: str) -> str | None:
    try:
        return _label(os.readlink(f"{proc}/{pid}/cwd"))  # it may name the VM, a label
    except OSError:
        return None


def _tag(vm: str, command: Command, declared: list[DeclaredShare]) -> str:
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


def _severity(share: Share) -> tuple[int, int]:
    """When two processes claim one share, report the worse one (deleted, then the oldest served)."""
    return (1 if share.deleted else 0, -(share.served_generation or 0))


def scan_shares(
    stores: list[StoreScan],
    state_dir: str,
    proc: str = "/proc",
) -> SharesResult:
    result = SharesResult(capabilities=processes.effective_capabilities(proc))
    declared = [d for d in declared_shares(state_dir) if store_for_source(d.source, stores) is not None]
    identities = {s.mountpoint: store_identity(s) for s in stores}
    root = processes.own_root()
    shares: dict[tuple[str, str, str], Share] = {}

    for members in _group(processes.find(proc)).values():
        command = processes.parse_command(members[0].argv)
        if command is None:
            continue
        store = store_for_source(command.source, stores)
        if store is None or not identities[store.mountpoint].devices:
            continue
        held: Held | None = None
        alive = []
        for process in members:
            try:
                candidate = processes.inspect(process.pid, identities[store.mountpoint], root, proc)
            except ProcessLookupError:
                continue  # exited mid-scan
            alive.append(process.pid)
            if held is None or (candidate.pins and not held.pins) or (held.method == "unpinned" and candidate.method == "denied"):
                held = candidate
        if held is None:
            continue
        if held.whole_store and held.method == "fd" and not names_mountpoint(command.source, store):
            held = Held(FILE_HANDLE, device=held.device, inode=held.inode)
        if held.method == "denied":
            result.unreadable_processes += 1
        vm = _vm_name(members[0].pid, command, state_dir, proc)
        share = Share(
            vm=vm,
            share=_tag(vm, command, declared),
            mountpoint=store.mountpoint,
            source=command.source.rstrip("/") or "/",
            sandbox=command.sandbox,
            up=True,
            pids=tuple(sorted(alive)),
            held=held,
            current_generation=store.current.number if store.current else None,
            keep_generations=store.keep_generations,
        )
        key = (share.vm, share.share, share.mountpoint)
        if key not in shares or _severity(share) > _severity(shares[key]):
            shares[key] = share

    for declaration in declared:
        store = store_for_source(declaration.source, stores)
        assert store is not None
        key = (declaration.vm, declaration.tag, store.mountpoint)
        if key in shares:
            continue
        shares[key] = Share(
            vm=declaration.vm,
            share=declaration.tag,
            mountpoint=store.mountpoint,
            source=declaration.source.rstrip("/") or "/",
            sandbox=UNKNOWN,
            up=False,
            current_generation=store.current.number if store.current else None,
            keep_generations=store.keep_generations,
        )
    result.shares = sorted(shares.values(), key=lambda s: (s.mountpoint, s.vm, s.share))
    return result
