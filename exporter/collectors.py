"""Collectors: from scanned values to metric families. No I/O happens in families()."""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import psutil
from prometheus_client.core import Metric

from exporter import __version__, mountinfo
from exporter.cache import CachingMeasurer
from exporter.config import Config
from exporter.framework import Collector, MetricSpec, Problem, Snapshot
from exporter.shares import FILE_HANDLE, Share, SharesResult, pinned_generations, recommended_keep_generations, scan_shares
from exporter.store import Measurer, StoreScan, SymlinkState, scan_store

MP = ("mountpoint",)

STORE_UP = MetricSpec("sopsnix_store_up", "1 if the store's mount point exists and could be listed, else 0.", MP)
GENERATIONS = MetricSpec("sopsnix_generations", "Number of generation directories in the store.", MP)
GENERATIONS_BYTES = MetricSpec(
    "sopsnix_generations_bytes", "Memory held by all generations (sum of st_blocks * 512 of their files).", MP
)
GENERATIONS_APPARENT_BYTES = MetricSpec(
    "sopsnix_generations_apparent_bytes", "Sum of st_size of the files of all generations.", MP
)
CURRENT_GENERATION = MetricSpec(
    "sopsnix_current_generation", "The generation the store's symlink points at (absent if none).", MP
)
CURRENT_GENERATION_BYTES = MetricSpec(
    "sopsnix_current_generation_bytes", "Memory held by the current generation (st_blocks * 512).", MP
)
CURRENT_GENERATION_FILES = MetricSpec(
    "sopsnix_current_generation_files", "Regular files in the current generation, nested directories included.", MP
)
OLDEST_GENERATION = MetricSpec("sopsnix_oldest_generation", "Lowest generation number present.", MP)
PENDING_GENERATIONS = MetricSpec(
    "sopsnix_pending_generations",
    "Generations numbered above the current one: written by an activation that never linked them.",
    MP,
)
SYMLINK_OK = MetricSpec(
    "sopsnix_symlink_ok", "1 if the symlink exists and resolves to a generation directory of this store.", MP
)
SYMLINK_INFO = MetricSpec(
    "sopsnix_symlink_info",
    "1, with the symlink's path and its state: ok, missing, dangling, outside (not a generation of this "
    "store) or unreadable.",
    ("mountpoint", "symlink", "state"),
)
LAST_SWITCH = MetricSpec(
    "sopsnix_last_switch_timestamp_seconds",
    "When the current generation was linked (lstat mtime of the symlink), in seconds since the epoch.",
    MP,
)
MOUNTS = MetricSpec(
    "sopsnix_mounts",
    "Filesystems mounted at the mount point; more than 1 means older generations are hidden underneath, "
    "still in memory.",
    MP,
)
STORE_INFO = MetricSpec(
    "sopsnix_store_info", "1, with the filesystem type that holds the store (ramfs, tmpfs).", ("mountpoint", "fstype")
)
KEEP_GENERATIONS = MetricSpec(
    "sopsnix_keep_generations", "The store's configured keepGenerations (absent when not configured).", MP
)
MEMORY_BUDGET = MetricSpec(
    "sopsnix_memory_budget_bytes", "The memory budget the operator set for the store, in bytes.", MP
)
SCAN_ERRORS = MetricSpec(
    "sopsnix_store_scan_errors",
    "Parts of the store the last scan could not read, by reason: permission_denied, vanished (removed "
    "during the scan, e.g. by a prune), error.",
    ("mountpoint", "reason"),
)
HOST_MEMORY = MetricSpec("sopsnix_host_memory_bytes", "Total host memory, in bytes.")
BUILD_INFO = MetricSpec(
    "sopsnix_exporter_build_info", "1, with the exporter's version and Python version.", ("version", "python_version")
)

SCAN_ERROR_REASONS = ("permission_denied", "vanished", "error")


@dataclass(frozen=True)
class StoresResult:
    host_memory_bytes: int
    stores: list[StoreScan]

    def store(self, mountpoint: str) -> StoreScan | None:
        for store in self.stores:
            if store.mountpoint == mountpoint:
                return store
        return None


def scan_stores(config: Config, measurer: Measurer | None = None) -> StoresResult:
    host_memory = psutil.virtual_memory().total
    mounts = mountinfo.read()
    return StoresResult(
        host_memory_bytes=host_memory,
        stores=[scan_store(s, config.budget_bytes(s, host_memory), mounts, measurer) for s in config.stores],
    )


class StoresCollector(Collector):
    """The secrets stores and their generations.

        sopsnix_store_up{mountpoint="/run/secrets.d"} 1.0
        sopsnix_generations{mountpoint="/run/secrets.d"} 3.0
        sopsnix_generations_bytes{mountpoint="/run/secrets.d"} 24576.0
        sopsnix_current_generation{mountpoint="/run/secrets.d"} 3.0
        sopsnix_symlink_ok{mountpoint="/run/secrets.d"} 1.0
        sopsnix_store_info{fstype="ramfs",mountpoint="/run/secrets.d"} 1.0
        sopsnix_host_memory_bytes 2.5e+10
    """

    name = "stores"
    metrics = (
        STORE_UP, GENERATIONS, GENERATIONS_BYTES, GENERATIONS_APPARENT_BYTES, CURRENT_GENERATION,
        CURRENT_GENERATION_BYTES, CURRENT_GENERATION_FILES, OLDEST_GENERATION, PENDING_GENERATIONS, SYMLINK_OK,
        SYMLINK_INFO, LAST_SWITCH, MOUNTS, STORE_INFO, KEEP_GENERATIONS, MEMORY_BUDGET, SCAN_ERRORS, HOST_MEMORY,
    )  # fmt: skip

    def __init__(self, config: Config, measurer: Measurer | None = None) -> None:
        self.config = config
        # Kept across scrapes: a warm scrape re-checks each generation with one stat per directory.
        self.measurer = measurer or CachingMeasurer()

    def scan(self, snapshot: Snapshot) -> StoresResult:
        return scan_stores(self.config, self.measurer)

    def families(self, result: StoresResult) -> Iterator[Metric]:
        stores = result.stores
        up = [s for s in stores if s.up]
        linked = [s for s in up if s.current is not None]

        def each(selected: Iterable[StoreScan], value) -> list[tuple[tuple[str, ...], float]]:
            return [((s.mountpoint,), float(value(s))) for s in selected]

        yield STORE_UP.family(each(stores, lambda s: s.up))
        yield GENERATIONS.family(each(up, lambda s: len(s.generations)))
        yield GENERATIONS_BYTES.family(each(up, lambda s: s.total.bytes))
        yield GENERATIONS_APPARENT_BYTES.family(each(up, lambda s: s.total.apparent_bytes))
        yield CURRENT_GENERATION.family(each(linked, lambda s: s.current.number))
        yield CURRENT_GENERATION_BYTES.family(each(linked, lambda s: s.current.usage.bytes))
        yield CURRENT_GENERATION_FILES.family(each(linked, lambda s: s.current.usage.files))
        yield OLDEST_GENERATION.family(each([s for s in up if s.generations], lambda s: s.oldest.number))
        yield PENDING_GENERATIONS.family(each(linked, lambda s: len(s.pending)))
        yield SYMLINK_OK.family(each(stores, lambda s: s.symlink_state is SymlinkState.OK))
        yield SYMLINK_INFO.family(((s.mountpoint, s.symlink, s.symlink_state.value), 1.0) for s in stores)
        yield LAST_SWITCH.family(
            each([s for s in stores if s.last_switch_timestamp is not None], lambda s: s.last_switch_timestamp)
        )
        yield MOUNTS.family(each(stores, lambda s: s.mounts))
        yield STORE_INFO.family(((s.mountpoint, s.fstype), 1.0) for s in stores if s.fstype)
        yield KEEP_GENERATIONS.family(
            each([s for s in stores if s.keep_generations is not None], lambda s: s.keep_generations)
        )
        yield MEMORY_BUDGET.family(each(stores, lambda s: s.memory_budget_bytes))
        yield SCAN_ERRORS.family(
            ((s.mountpoint, reason), float(s.scan_errors.get(reason, 0))) for s in up for reason in SCAN_ERROR_REASONS
        )
        yield HOST_MEMORY.family([((), float(result.host_memory_bytes))])

    def problems(self, result: StoresResult) -> Iterator[Problem]:
        for store in result.stores:
            yield from store_problems(store)


# sops-nix makes /run/secrets.d root:keys, but writes /run/secrets-for-users.d with -ignore-passwd (before
# users and groups exist), so that one is root:root: only CAP_DAC_READ_SEARCH lists it, and a secret's
# subdirectory whose mode shuts keys out.
LISTING_HINT = (
    "grant the exporter CAP_DAC_READ_SEARCH (the keys group lists /run/secrets.d, which is root:keys, but "
    "not /run/secrets-for-users.d, which is root:root)"
)


def store_problems(store: StoreScan) -> Iterator[Problem]:
    """What is wrong with a store, in words an operator can act on. Shared by the log and `check`."""
    mp = store.mountpoint
    if not store.up:
        if store.down_reason == "missing":
            return  # a host without secrets of this kind: not a problem, and not worth a log line
        hints = {
            "permission_denied": LISTING_HINT,
            "not_a_directory": "check the store's mountpoint in the configuration",
        }
        yield Problem(
            f"{mp}:down",
            f"store {mp} cannot be listed ({store.down_reason})",
            hints.get(store.down_reason or "", ""),
            severity="critical",
        )
        return
    if store.generations and store.symlink_state is not SymlinkState.OK:
        yield Problem(
            f"{mp}:symlink",
            f"store {mp}: symlink {store.symlink} is {store.symlink_state.value}",
            LISTING_HINT
            if store.symlink_state is SymlinkState.UNREADABLE
            else "re-run the activation (nixos-rebuild switch) so sops-nix links a generation",
            severity="critical",
        )
    if store.mounts > 1:
        yield Problem(
            f"{mp}:stacked",
            f"store {mp}: {store.mounts} filesystems are mounted on it; the lower ones still hold memory",
            "reboot, or unmount the hidden lower mount once nothing serves it",
        )
    if store.fstype is not None and store.fstype not in ("ramfs", "tmpfs"):
        yield Problem(
            f"{mp}:fstype",
            f"store {mp} is on {store.fstype}, not ramfs or tmpfs: its secrets may be written to disk",
            "let sops-nix mount its ramfs there (the default), or set sops.useTmpfs",
        )
    used, budget = store.total.bytes, store.memory_budget_bytes
    if budget > 0 and used >= budget:
        yield Problem(
            f"{mp}:over_budget",
            f"store {mp}: its generations hold {used} bytes, at or over the budget of {budget} bytes",
            "lower keepGenerations, or reboot to reclaim the memory, or raise memory_budget_bytes",
            severity="critical",
        )
    elif budget > 0 and used >= 0.8 * budget:
        yield Problem(
            f"{mp}:near_budget",
            f"store {mp}: its generations hold {used} bytes, {100 * used / budget:.0f}% of the budget of {budget} bytes",
            "lower keepGenerations before the budget is reached, or raise memory_budget_bytes",
        )
    if store.pending:
        yield Problem(
            f"{mp}:pending",
            f"store {mp}: {len(store.pending)} generation(s) above the current one were written but never linked",
            "an activation failed or was a dry-activate; the next successful switch supersedes them",
            severity="info",
        )
    for reason, count in sorted(store.scan_errors.items()):
        if reason == "vanished":
            continue  # a prune racing the scan: expected, and already reflected in the figures
        yield Problem(
            f"{mp}:scan:{reason}",
            f"store {mp}: {count} part(s) could not be read ({reason}); byte counts are a lower bound",
            LISTING_HINT if reason == "permission_denied" else "",
        )


class BuildInfo:
    """Published beside the collectors, not as one: it cannot fail and needs no scan.

        sopsnix_exporter_build_info{python_version="3.11.7",version="0.1.0"} 1.0
    """

    def describe(self) -> Iterator[Metric]:
        yield BUILD_INFO.family()

    def collect(self) -> Iterator[Metric]:
        yield BUILD_INFO.family([((__version__, platform.python_version()), 1.0)])


SHARE = ("vm", "share", "mountpoint")
PROC_CAPABILITIES = ("CAP_SYS_PTRACE", "CAP_DAC_READ_SEARCH")

VM_SHARE_INFO = MetricSpec(
    "sopsnix_vm_share_info",
    "1 for every VM share of a secrets store, with its source path and virtiofsd sandbox mode.",
    ("vm", "share", "mountpoint", "source", "sandbox"),
)
VM_SHARE_UP = MetricSpec(
    "sopsnix_vm_share_up", "1 if a virtiofsd serves the share, 0 if it is declared but nothing serves it.", SHARE
)
VM_SERVING_GENERATION = MetricSpec(
    "sopsnix_vm_serving_generation", "The generation number the share serves to its VM.", SHARE
)
VM_SERVING_STALE = MetricSpec(
    "sopsnix_vm_serving_stale_generation", "1 if the share serves a generation other than the current one.", SHARE
)
VM_SERVING_DELETED = MetricSpec(
    "sopsnix_vm_serving_deleted_generation",
    "1 if the generation the share serves has been deleted: the guest sees an empty directory.",
    SHARE,
)
VM_GENERATIONS_BEHIND = MetricSpec(
    "sopsnix_vm_generations_behind", "Current generation minus the generation the share serves.", SHARE
)
VM_PRUNED_ON_NEXT_SWITCH = MetricSpec(
    "sopsnix_vm_share_pruned_on_next_switch",
    "1 if the store's keep_generations is set and the next activation will delete the served generation.",
    SHARE,
)
VM_SHARE_DETECTION = MetricSpec(
    "sopsnix_vm_share_detection",
    "1, with how the served generation was found: root, mountinfo, fd, unpinned (virtiofsd holds nothing "
    "yet), denied (needs CAP_SYS_PTRACE), file_handle (an unsandboxed virtiofsd holds it as a file handle: "
    "unknown) or down.",
    ("vm", "share", "mountpoint", "method"),
)
PINNED_GENERATIONS = MetricSpec(
    "sopsnix_pinned_generations", "Distinct generations of the store that some running share serves.", MP
)
RECOMMENDED_KEEP = MetricSpec(
    "sopsnix_recommended_keep_generations",
    "The smallest keepGenerations under which the next switch deletes no generation a running share serves.",
    MP,
)
CAPABILITY = MetricSpec(
    "sopsnix_exporter_capability",
    "1 if the exporter holds the capability it needs to see every share (CAP_SYS_PTRACE: other processes' "
    "root and descriptors; CAP_DAC_READ_SEARCH: closed directories), else 0.",
    ("capability",),
)


class SharesCollector(Collector):
    """The VM shares of the stores and the generation each one serves.

        sopsnix_vm_share_info{mountpoint="/run/secrets.d",sandbox="namespace",share="secrets",source="/run/secrets",vm="web"} 1.0
        sopsnix_vm_share_up{mountpoint="/run/secrets.d",share="secrets",vm="web"} 1.0
        sopsnix_vm_serving_generation{mountpoint="/run/secrets.d",share="secrets",vm="web"} 4.0
        sopsnix_vm_serving_stale_generation{mountpoint="/run/secrets.d",share="secrets",vm="web"} 1.0
        sopsnix_vm_serving_deleted_generation{mountpoint="/run/secrets.d",share="secrets",vm="web"} 0.0
        sopsnix_vm_generations_behind{mountpoint="/run/secrets.d",share="secrets",vm="web"} 1.0
        sopsnix_recommended_keep_generations{mountpoint="/run/secrets.d"} 3.0
    """

    name = "shares"
    metrics = (
        VM_SHARE_INFO, VM_SHARE_UP, VM_SERVING_GENERATION, VM_SERVING_STALE, VM_SERVING_DELETED,
        VM_GENERATIONS_BEHIND, VM_PRUNED_ON_NEXT_SWITCH, VM_SHARE_DETECTION, PINNED_GENERATIONS, RECOMMENDED_KEEP,
        CAPABILITY,
    )  # fmt: skip

    def __init__(self, config: Config, proc: str = "/proc") -> None:
        self.config = config
        self.proc = proc

    def scan(self, snapshot: Snapshot) -> tuple[StoresResult, SharesResult]:
        stores: StoresResult = snapshot.result(StoresCollector.name)
        up = [s for s in stores.stores if s.up]
        return stores, scan_shares(up, self.config.microvm.state_dir, self.proc)

    def families(self, result: tuple[StoresResult, SharesResult]) -> Iterator[Metric]:
        stores, found = result
        shares = found.shares
        known = [s for s in shares if s.known]

        def each(selected, value):
            return [((s.vm, s.share, s.mountpoint), float(value(s))) for s in selected]

        yield VM_SHARE_INFO.family(((s.vm, s.share, s.mountpoint, s.source, s.sandbox), 1.0) for s in shares)
        yield VM_SHARE_UP.family(each(shares, lambda s: s.up))
        yield VM_SERVING_GENERATION.family(each([s for s in shares if s.served_generation is not None],
                                                lambda s: s.served_generation))  # fmt: skip
        yield VM_SERVING_STALE.family(each(known, lambda s: s.stale))
        yield VM_SERVING_DELETED.family(each(known, lambda s: s.deleted))
        yield VM_GENERATIONS_BEHIND.family(each([s for s in shares if s.generations_behind is not None],
                                                lambda s: s.generations_behind))  # fmt: skip
        yield VM_PRUNED_ON_NEXT_SWITCH.family(each([s for s in shares if s.pruned_on_next_switch is not None],
                                                   lambda s: s.pruned_on_next_switch))  # fmt: skip
        yield VM_SHARE_DETECTION.family(((s.vm, s.share, s.mountpoint, s.method), 1.0) for s in shares)
        up_stores = [s for s in stores.stores if s.up]
        yield PINNED_GENERATIONS.family(
            ((s.mountpoint,), float(len(pinned_generations(found.for_store(s.mountpoint))))) for s in up_stores
        )
        recommended = [(s, recommended_keep_generations(s, found.for_store(s.mountpoint))) for s in up_stores]
        yield RECOMMENDED_KEEP.family(((s.mountpoint,), float(r)) for s, r in recommended if r is not None)
        yield CAPABILITY.family(((name,), float(held)) for name, held in sorted(found.capabilities.items()))

    def problems(self, result: tuple[StoresResult, SharesResult]) -> Iterator[Problem]:
        stores, found = result
        for share in found.shares:
            yield from share_problems(share, stores.store(share.mountpoint))
        # /proc/PID/root needs the ptrace check; /proc/PID/fd (a root-owned 0500 directory) needs both.
        if found.unreadable_processes and not all(found.capabilities.get(c) for c in PROC_CAPABILITIES):
            yield Problem(
                "ptrace",
                f"{found.unreadable_processes} virtiofsd process(es) could not be inspected: reading another "
                "process's root needs CAP_SYS_PTRACE, and its descriptors CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH",
                "grant the exporter AmbientCapabilities=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
            )


def share_problems(share: Share, store: StoreScan | None) -> Iterator[Problem]:
    """The verdict on one share and its fix, shared by the log and `check`.

    Never "share the store's mount point": that hands the guest every generation of every secret, and
    sops-nix's private key (age-keys.txt, which it writes into the mount point). docs/runbooks.md says why.
    """
    who = f"VM {share.vm} share {share.share} ({share.mountpoint})"
    key = f"{share.vm}/{share.share}/{share.mountpoint}"
    # microvm-virtiofsd@VM is PartOf microvm@VM: restarting the VM restarts its virtiofsd, which resolves
    # the symlink again. Restarting the virtiofsd alone is not enough: a running guest does not reconnect.
    restart = f"restart microvm@{share.vm} (restarts its virtiofsd too) to serve the current generation"
    if not share.up:
        # supervisord, the unit's main process, can outlive the virtiofsd that died: `start` does nothing then.
        yield Problem(f"{key}:down", f"{who}: declared, but no virtiofsd serves it: the VM has no secrets",
                      f"restart microvm@{share.vm}, which restarts microvm-virtiofsd@{share.vm} too (starting "
                      f"microvm-virtiofsd@{share.vm} does nothing while its supervisord runs)",
                      severity="critical")  # fmt: skip
        return
    if share.held is not None and share.held.method == "denied":
        yield Problem(f"{key}:denied", f"{who}: cannot tell which generation it serves (needs CAP_SYS_PTRACE, "
                      "and CAP_DAC_READ_SEARCH for an unsandboxed virtiofsd)",
                      "grant the exporter CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH")  # fmt: skip
        return
    if share.held is not None and share.held.method == FILE_HANDLE:
        yield Problem(f"{key}:file_handle", f"{who}: cannot tell which generation it serves: its unsandboxed "
                      "virtiofsd holds the shared directory as a file handle, which /proc does not show",
                      f"run it in virtiofsd's default namespace sandbox (drop --sandbox=none from "
                      f"microvm.virtiofsd.extraArgs), or set microvm.virtiofsd.inodeFileHandles = \"never\"; "
                      f"then restart microvm@{share.vm}")  # fmt: skip
        return
    if share.held is not None and share.held.whole_store:
        symlink = store.symlink if store else "the store's symlink"
        yield Problem(f"{key}:whole_store", f"{who}: shares the store's mount point, not its symlink: the guest "
                      "can read every generation the host keeps and sops-nix's key file (age-keys.txt) if one "
                      "is there",
                      f"share {symlink} instead and restart microvm@{share.vm}; treat a key the guest could "
                      "read as known to it")  # fmt: skip
        return
    served = share.served_generation
    current = share.current_generation
    if share.deleted:
        yield Problem(f"{key}:deleted", f"{who}: serves generation {served if served is not None else '?'}, "
                      "which was deleted: the guest sees an empty directory", restart, severity="critical")  # fmt: skip
        return
    if share.pruned_on_next_switch:
        keep = recommended_keep_generations(store, [share]) if store else None
        keep_text = f"set sops.keepGenerations = {keep}" if keep is not None else "raise sops.keepGenerations"
        yield Problem(f"{key}:pruned_next", f"{who}: serves generation {served}, which the next switch deletes "
                      f"(keepGenerations = {share.keep_generations})",
                      f"{keep_text}, or 0 to never prune (each kept generation costs memory, and the VM reads "
                      f"stale secrets until restarted), or restart microvm@{share.vm} right after each "
                      "switch")  # fmt: skip
    if share.stale:
        yield Problem(f"{key}:stale", f"{who}: serves generation {served}, current is {current}: "
                      "the VM does not see rotated secrets", restart)  # fmt: skip


def share_summary(share: Share) -> str:
    who = f"VM {share.vm} share {share.share} ({share.source} in {share.mountpoint})"
    if not share.up:
        return f"{who}: DOWN (declared, no virtiofsd)"
    if share.held is None or share.held.method == "denied":
        return f"{who}: served generation unknown (needs CAP_SYS_PTRACE)"
    if share.held.method == "unpinned":
        return f"{who}: virtiofsd holds nothing yet (its VM has not connected)"
    if share.held.method == FILE_HANDLE:
        return f"{who}: served generation unknown (an unsandboxed virtiofsd holds it as a file handle)"
    if share.held.whole_store:
        return f"{who}: serves the store's whole mount point: every generation, and sops-nix's key file if it is there"
    state = "deleted" if share.deleted else "stale" if share.stale else "current"
    return f"{who}: serves generation {share.served_generation}, current {share.current_generation}: {state}"
