"""The stores collector: the secrets stores, their generations and what they cost. No I/O in families()."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import psutil
from prometheus_client.core import Metric

from sops_nix_exporter import mountinfo
from sops_nix_exporter.collector.frame import Collector, MetricSpec, Problem, Snapshot
from sops_nix_exporter.config import Config
from sops_nix_exporter.stores.cache import CachingMeasurer
from sops_nix_exporter.stores.scan import Measurer, StoreScan, SymlinkState, scan_store

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


class StoresCollector(Collector["StoresResult"]):
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

    def summary(self, result: StoresResult) -> Iterator[str]:
        for store in result.stores:
            yield store_summary(store)


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


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def store_summary(store: StoreScan) -> str:
    """One line on a store, for `check`."""
    if not store.up:
        if store.down_reason == "missing":
            return f"store {store.mountpoint}: not present (no secrets of this kind on this host, or sops-nix has not run)"
        return f"store {store.mountpoint}: cannot be listed ({store.down_reason})"
    total = store.total
    budget = store.memory_budget_bytes
    share = f" ({100 * total.bytes / budget:.1f}%)" if budget else ""
    current = store.current.number if store.current else "none"
    return (
        f"store {store.mountpoint} ({store.fstype or 'unknown fs'}): {len(store.generations)} generation(s), "
        f"{human_bytes(total.bytes)} of a {human_bytes(budget)} budget{share}, current generation {current}, "
        f"symlink {store.symlink} {store.symlink_state.value}"
    )
