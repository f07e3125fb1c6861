"""VM shares of the secrets stores: which VM serves which generation, and what the next switch does to it.

A share is found two ways: a running virtiofsd whose source is (or resolves into) a store (readers/virtiofsd),
and a share microvm.nix declared in its state directory (readers/microvm). A declared share that no
virtiofsd serves is a VM that lost its secrets.

The join of a store and its shares is made here, once: `scan_shares` returns one StoreShares per store,
and every verdict (stale, deleted, pruned on the next switch, the keepGenerations that would spare it) is
computed from that store alone, in `judge`. Metrics, problems and `check` all read those values.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

from sops_nix_exporter.readers import holders, microvm, mounts, virtiofsd
from sops_nix_exporter.readers import proc as procfs
from sops_nix_exporter.readers.holders import DEFAULT_MIN_AGE_SECONDS, Plan, plan
from sops_nix_exporter.readers.fingerprints import FingerprintReader, StoreFingerprints, differing
from sops_nix_exporter.readers.mounts import Consumer
from sops_nix_exporter.readers.verdict import Verdict, serving
from sops_nix_exporter.readers.virtiofsd import Held, StoreIdentity
from sops_nix_exporter.stores.scan import StoreScan

# An unsandboxed virtiofsd with --inode-file-handles=prefer (microvm.nix's default) on a filesystem that has
# file handles (tmpfs, sops-nix's useTmpfs) keeps its shared directory as a file handle, which /proc does not
# show, and holds only the filesystem's mount point open (for open_by_handle_at). What it serves cannot be
# told then; that open mount point is not a share of the whole store.
FILE_HANDLE = "file_handle"
UNKNOWN = microvm.UNKNOWN


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
    verdict: Verdict = field(default_factory=Verdict)
    # The source is the store's mount point or a directory above it: the guest can read every generation
    # of every secret, and sops-nix's key file (age-keys.txt lives in the mount point).
    exposes_store: bool = False
    writable: bool | None = None  # the guest can write the share (no --readonly); None when nothing serves it
    # Files of the served subtree that differ from, are missing from or are new in the current generation;
    # None while either fingerprint is missing (or the share exposes the store: every generation is there).
    outdated_files: int | None = None

    @property
    def method(self) -> str:
        return self.held.method if self.held else "down"

    @property
    def served_generation(self) -> int | None:
        return self.held.generation if self.held else None

    @property
    def deleted(self) -> bool:
        return bool(self.held and self.held.deleted)


def judge(share: Share, store: StoreScan) -> Verdict:
    """The verdicts on one share, from its store (readers/verdict.py)."""
    held = share.held
    if held is None:
        return Verdict()
    known = held.method not in ("denied", FILE_HANDLE)
    if held.whole_store or held.generation is None:
        return Verdict(known=known, stale=held.deleted, deleted=held.deleted)
    return serving(held.generation, held.deleted, store, known=known)


@dataclass(slots=True)
class StoreShares:
    """One store and the shares that serve it, with what they mean for it together."""

    store: StoreScan
    shares: list[Share] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)  # containers, services, processes (readers/mounts)
    # Generation -> who holds it through a process's working directory or root (readers/holders.py).
    held_by_processes: dict[int, set[str]] = field(default_factory=dict)
    plan: Plan | None = None  # what a prune would remove now, as far as shares, mounts, cwd and root tell
    uninspected: int = 0  # processes whose cwd and root could not be read: the plan then frees nothing
    fingerprinted: int | None = None  # generations with a fingerprint; None without a fingerprint directory
    changed_files: int | None = None  # files the last activation changed; None when that is unknown

    @property
    def pinned_generations(self) -> set[int]:
        """Distinct generations some running share or consumer holds."""
        served = {s.served_generation for s in self.shares if s.served_generation is not None}
        return served | {c.generation for c in self.consumers}

    def held(self) -> dict[int, set[str]]:
        """Generation -> every reader that holds it: VM shares, consumers, processes' cwd and root."""
        held: dict[int, set[str]] = {n: set(names) for n, names in self.held_by_processes.items()}
        for share in self.shares:
            if share.served_generation is not None:
                held.setdefault(share.served_generation, set()).add(f"microvm@{share.vm}")
        for consumer in self.consumers:
            held.setdefault(consumer.generation, set()).add(consumer.consumer)
        return held

    @property
    def recommended_keep_generations(self) -> int | None:
        """The smallest keepGenerations under which the next switch deletes no generation a share serves; one,
        sops-nix's default, is the least. None while the store has no current generation, or while a running
        share's generation cannot be told (denied, file handle): no number would be honest then."""
        if self.store.current is None:
            return None
        if any(s.up and not s.verdict.known for s in self.shares):
            return None
        verdicts = [s.verdict for s in self.shares] + [c.verdict for c in self.consumers]
        return max([1] + [v.keep_to_spare for v in verdicts if v.keep_to_spare is not None])


@dataclass(slots=True)
class SharesResult:
    stores: list[StoreShares] = field(default_factory=list)
    # Each VM that declares a share of a store -> whether it runs (STATE_DIR/VM/booted exists).
    vms: dict[str, bool] = field(default_factory=dict)
    # The last `fingerprint` run: (finished, errors); None before any run or without fingerprints.
    fingerprint_run: tuple[float, int] | None = None
    namespaces: int = 0  # distinct mount namespaces read for consumers
    unreadable_namespaces: int = 0  # processes whose mount table could not be read

    @property
    def consumers(self) -> list[Consumer]:
        return [consumer for group in self.stores for consumer in group.consumers]
    capabilities: dict[str, bool] = field(default_factory=dict)
    unreadable_processes: int = 0  # virtiofsd processes some of whose state needs CAP_SYS_PTRACE

    @property
    def shares(self) -> list[Share]:
        return [share for group in self.stores for share in group.shares]


def _within(path: str, base: str) -> bool:
    return path == base or path.startswith(base.rstrip("/") + "/")


def store_for_source(source: str, stores: list[StoreScan]) -> StoreScan | None:
    """The store a share's source is, or resolves into: the symlink, a path under it, a generation, the
    mount point itself, or a directory above the mount point (which exposes the whole store)."""
    if not source.startswith("/"):
        return None
    normal = os.path.normpath(source)
    for store in stores:
        for base in (store.symlink, store.mountpoint):
            if _within(normal, base):
                return store
    try:
        resolved = os.path.realpath(normal)
    except OSError:
        return None
    for store in stores:
        if _within(resolved, os.path.realpath(store.mountpoint)):
            return store
    for store in stores:
        if exposes_store(source, store):
            return store
    return None


def exposes_store(source: str, store: StoreScan) -> bool:
    """Whether a share's source is the store's mount point or a directory above it (and not the symlink, a
    generation, or a path below them)."""
    normal = os.path.normpath(source)
    if _within(os.path.normpath(store.mountpoint), normal):
        return True
    try:
        return _within(os.path.realpath(store.mountpoint), os.path.realpath(normal))
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


def _group(found: list[procfs.Process]) -> dict[int, list[procfs.Process]]:
    """The parent and the sandboxed child of one virtiofsd are one share: group by the topmost
    virtiofsd ancestor carrying the same command line."""
    by_pid = {p.pid: p for p in found}
    groups: dict[int, list[procfs.Process]] = {}
    for process in found:
        leader = process
        seen = {leader.pid}
        while leader.ppid in by_pid and by_pid[leader.ppid].argv == process.argv and leader.ppid not in seen:
            leader = by_pid[leader.ppid]
            seen.add(leader.pid)
        groups.setdefault(leader.pid, []).append(process)
    return groups


def _severity(share: Share) -> tuple[int, int]:
    """When two processes claim one share, report the worse one (deleted, then the oldest served)."""
    return (1 if share.deleted else 0, -(share.served_generation or 0))


def share_subtree(source: str, store: StoreScan) -> str | None:
    """The part of a generation a share of `source` serves: "" for the symlink itself, "app" for
    SYMLINK/app or MOUNTPOINT/N/app; None for the mount point or above (every generation)."""
    normal = os.path.normpath(source)
    symlink = os.path.normpath(store.symlink)
    if _within(normal, symlink):
        return normal[len(symlink) :].strip("/")
    mountpoint = os.path.normpath(store.mountpoint)
    if normal.startswith(mountpoint.rstrip("/") + "/"):
        return normal[len(mountpoint) :].strip("/").partition("/")[2]
    return None


def _compare(fingerprints: StoreFingerprints, store: StoreScan, served: int, subtree: str | None) -> int | None:
    if subtree is None or store.current is None:
        return None
    old, new = fingerprints.of(served), fingerprints.of(store.current.number)
    if old is None or new is None:
        return None
    return differing(old, new, subtree)


def compare_contents(group: StoreShares, fingerprints: StoreFingerprints | None) -> None:
    """Whether each reader's secrets differ from the current generation's, from the fingerprints alone."""
    if fingerprints is None:
        return
    store = group.store
    group.fingerprinted = fingerprints.fingerprinted
    current = fingerprints.of(store.current.number) if store.current else None
    replaced = fingerprints.replaced()
    group.changed_files = differing(replaced, current) if current is not None and replaced is not None else None
    for share in group.shares:
        if share.served_generation is not None and not share.exposes_store:
            share.outdated_files = _compare(fingerprints, store, share.served_generation,
                                            share_subtree(share.source, store))  # fmt: skip
    for consumer in group.consumers:
        consumer.outdated_files = _compare(fingerprints, store, consumer.generation, consumer.subtree)


def scan_shares(stores: list[StoreScan], state_dir: str, proc: str = "/proc",
                fingerprints: FingerprintReader | None = None,
                min_age: float = DEFAULT_MIN_AGE_SECONDS) -> SharesResult:  # fmt: skip
    """Every reader of the (listable) stores: the VM shares virtiofsd serves, those declared that nothing
    serves, and the consumers whose mount namespace holds a generation."""
    result = SharesResult(capabilities=procfs.effective_capabilities(proc))
    declared = [d for d in microvm.declared_shares(state_dir) if store_for_source(d.source, stores) is not None]
    identities = {s.mountpoint: store_identity(s) for s in stores}
    root = procfs.own_root()
    shares: dict[tuple[str, str, str], Share] = {}
    listing = procfs.processes(proc)  # one pass over /proc for the virtiofsd processes and the consumers

    for members in _group(virtiofsd.find(proc, listing)).values():
        command = virtiofsd.parse_command(members[0].argv)
        if command is None:
            continue
        store = store_for_source(command.source, stores)
        if store is None or not identities[store.mountpoint].devices:
            continue
        held: Held | None = None
        alive = []
        for process in members:
            try:
                candidate = virtiofsd.inspect(process.pid, identities[store.mountpoint], root, proc)
            except ProcessLookupError:
                continue  # exited mid-scan
            alive.append(process.pid)
            if held is None or (candidate.pins and not held.pins) or (held.method == "unpinned" and candidate.method == "denied"):
                held = candidate
        if held is None:
            continue
        exposing = exposes_store(command.source, store)
        if held.whole_store and held.method == "fd" and not exposing:
            held = Held(FILE_HANDLE, device=held.device, inode=held.inode)
        if held.method == "denied":
            result.unreadable_processes += 1
        vm = microvm.vm_name(members[0].pid, command, state_dir, proc)
        share = Share(
            vm=vm,
            share=microvm.share_tag(vm, command, declared),
            mountpoint=store.mountpoint,
            source=command.source.rstrip("/") or "/",
            sandbox=command.sandbox,
            up=True,
            pids=tuple(sorted(alive)),
            held=held,
            exposes_store=exposing,
            writable=not command.readonly,
        )
        key = (share.vm, share.share, share.mountpoint)
        if key not in shares or _severity(share) > _severity(shares[key]):
            shares[key] = share

    for declaration in declared:
        result.vms[declaration.vm] = declaration.running
        store = store_for_source(declaration.source, stores)
        assert store is not None
        key = (declaration.vm, declaration.tag, store.mountpoint)
        if key in shares or not declaration.running:
            continue  # served; or a VM stopped on purpose, whose shares are neither up nor down
        shares[key] = Share(
            vm=declaration.vm,
            share=declaration.tag,
            mountpoint=store.mountpoint,
            source=declaration.source.rstrip("/") or "/",
            sandbox=UNKNOWN,
            up=False,
            exposes_store=exposes_store(declaration.source, store),
        )

    by_store = {store.mountpoint: StoreShares(store) for store in stores}
    for share in sorted(shares.values(), key=lambda s: (s.mountpoint, s.vm, s.share)):
        group = by_store[share.mountpoint]
        share.verdict = judge(share, group.store)
        group.shares.append(share)
    # Working directories and roots matter only where a generation below the current one could be freed.
    older = [s for s in stores if s.current is not None and s.generations[0].number < s.current.number]
    held = holders.holders(older, proc, listing=listing) if older else holders.Holders(held={})
    found = mounts.scan_consumers(stores, proc, listing)
    result.namespaces, result.unreadable_namespaces = found.namespaces, found.unreadable
    for consumer in found.consumers:
        group = by_store[consumer.mountpoint]
        consumer.verdict = serving(consumer.generation, consumer.deleted, group.store)
        group.consumers.append(consumer)
    now = time.time()
    for group in by_store.values():
        group.held_by_processes = {n: names for (mp, n), names in held.held.items() if mp == group.store.mountpoint}
        group.uninspected = held.uninspected
        group.plan = plan(group.store, group.held(), now, min_age, held.uninspected)
    if fingerprints is not None:
        result.fingerprint_run = fingerprints.last_run()
        for group in by_store.values():
            compare_contents(group, fingerprints.store(group.store))
    result.stores = list(by_store.values())
    return result
