"""The shares collector: which VM serves which generation of each store, and what the next switch does to it."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import Metric

from sops_nix_exporter.collector.frame import Collector, MetricSpec, Problem, Snapshot
from sops_nix_exporter.collector.stores import MP, StoresCollector, human_bytes
from sops_nix_exporter.config import Config
from sops_nix_exporter.readers.fingerprints import FingerprintReader
from sops_nix_exporter.readers.mounts import Consumer
from sops_nix_exporter.readers.shares import FILE_HANDLE, Share, SharesResult, scan_shares
from sops_nix_exporter.stores.scan import StoreScan

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
VM_SHARE_EXPOSES_STORE = MetricSpec(
    "sopsnix_vm_share_exposes_store",
    "1 if the share's source is the store's mount point or a directory above it: the VM can read every "
    "generation of every secret and sops-nix's key file. 0 for other shares.",
    SHARE,
)
VM_SHARE_WRITABLE = MetricSpec(
    "sopsnix_vm_share_writable",
    "1 if the guest can write the served share (no --readonly; QEMU's C virtiofsd has no such option), 0 if "
    "it is read-only; absent while nothing serves it.",
    SHARE,
)
CONSUMER = ("consumer", "kind", "mountpoint")
CONSUMER_SERVING_GENERATION = MetricSpec(
    "sopsnix_consumer_serving_generation",
    "The generation a container's, service's or process's mount of the store holds; kind is container, "
    "service or process.",
    CONSUMER,
)
CONSUMER_SERVING_STALE = MetricSpec(
    "sopsnix_consumer_serving_stale_generation", "1 if the consumer's mount holds a generation other than the current one.",
    CONSUMER,
)
CONSUMER_SERVING_DELETED = MetricSpec(
    "sopsnix_consumer_serving_deleted_generation",
    "1 if the generation the consumer's mount holds has been deleted: the consumer sees an empty directory.",
    CONSUMER,
)
VM_SERVING_OUTDATED = MetricSpec(
    "sopsnix_vm_serving_outdated_secrets",
    "1 if some file of the subtree the share serves differs from, is missing from, or is new in the current "
    "generation; 0 if identical; absent while either fingerprint is missing.",
    SHARE,
)
VM_OUTDATED_FILES = MetricSpec(
    "sopsnix_vm_outdated_secret_files", "How many files of the served subtree differ, were added or were removed.",
    SHARE,
)
CONSUMER_SERVING_OUTDATED = MetricSpec(
    "sopsnix_consumer_serving_outdated_secrets",
    "1 if some file the consumer's mount holds differs from, is missing from, or is new in the current "
    "generation; 0 if identical; absent while either fingerprint is missing.",
    CONSUMER,
)
FINGERPRINTED_GENERATIONS = MetricSpec(
    "sopsnix_fingerprinted_generations", "Generations of the store that have a content fingerprint.", MP
)
CURRENT_CHANGED_FILES = MetricSpec(
    "sopsnix_current_generation_changed_files",
    "Files that differ between the current generation and the one it replaced (0 when the last activation "
    "changed nothing); absent when that is unknown.",
    MP,
)
FINGERPRINT_LAST_RUN = MetricSpec(
    "sopsnix_fingerprint_last_run_timestamp_seconds",
    "When the last `sops-nix-exporter fingerprint` run finished, in seconds since the epoch; absent before any.",
)
FINGERPRINT_RUN_ERRORS = MetricSpec(
    "sopsnix_fingerprint_run_errors",
    "Generations or stores the last fingerprint run could not fingerprint (its unit's journal says which).",
)
RECLAIMABLE_GENERATIONS = MetricSpec(
    "sopsnix_reclaimable_generations",
    "Generations a prune would remove now, as far as the exporter sees readers (shares, mount namespaces, cwd and "
    "root of processes; open descriptors are checked by the prune itself).",
    MP,
)
RECLAIMABLE_BYTES = MetricSpec("sopsnix_reclaimable_bytes", "The memory the reclaimable generations hold.", MP)
VM_RUNNING = MetricSpec(
    "sopsnix_vm_running",
    "1 for a VM that declares a share of a store and runs (microvm.nix's STATE_DIR/VM/booted exists), 0 for "
    "one declared only in current/: stopped. A stopped VM's shares are neither up nor down.",
    ("vm",),
)
CAPABILITY = MetricSpec(
    "sopsnix_exporter_capability",
    "1 if the exporter holds the capability it needs to see every share (CAP_SYS_PTRACE: other processes' "
    "root and descriptors; CAP_DAC_READ_SEARCH: closed directories), else 0.",
    ("capability",),
)


class SharesCollector(Collector[SharesResult]):
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
        VM_SHARE_EXPOSES_STORE, VM_SHARE_WRITABLE, VM_SERVING_OUTDATED, VM_OUTDATED_FILES, VM_RUNNING,
        CONSUMER_SERVING_GENERATION, CONSUMER_SERVING_STALE, CONSUMER_SERVING_DELETED, CONSUMER_SERVING_OUTDATED,
        FINGERPRINTED_GENERATIONS, CURRENT_CHANGED_FILES, FINGERPRINT_LAST_RUN, FINGERPRINT_RUN_ERRORS,
        RECLAIMABLE_GENERATIONS, RECLAIMABLE_BYTES, CAPABILITY,
    )  # fmt: skip

    def __init__(self, config: Config, proc: str = "/proc") -> None:
        self.config = config
        self.proc = proc
        # Kept across scrapes: a fingerprint never changes once written, so each is parsed once.
        self.fingerprints = FingerprintReader(config.fingerprint_dir)

    def scan(self, snapshot: Snapshot) -> SharesResult:
        stores = snapshot.result(StoresCollector)
        return scan_shares([s for s in stores.stores if s.up], self.config.microvm.state_dir, self.proc,
                           self.fingerprints)  # fmt: skip

    def families(self, result: SharesResult) -> Iterator[Metric]:
        shares = result.shares
        known = [s for s in shares if s.verdict.known]

        def each(selected, value):
            return [((s.vm, s.share, s.mountpoint), float(value(s))) for s in selected]

        yield VM_SHARE_INFO.family(((s.vm, s.share, s.mountpoint, s.source, s.sandbox), 1.0) for s in shares)
        yield VM_SHARE_UP.family(each(shares, lambda s: s.up))
        yield VM_SERVING_GENERATION.family(each([s for s in shares if s.served_generation is not None],
                                                lambda s: s.served_generation))  # fmt: skip
        yield VM_SERVING_STALE.family(each(known, lambda s: s.verdict.stale))
        yield VM_SERVING_DELETED.family(each(known, lambda s: s.verdict.deleted))
        yield VM_GENERATIONS_BEHIND.family(each([s for s in shares if s.verdict.generations_behind is not None],
                                                lambda s: s.verdict.generations_behind))  # fmt: skip
        yield VM_PRUNED_ON_NEXT_SWITCH.family(each([s for s in shares if s.verdict.pruned_on_next_switch is not None],
                                                   lambda s: s.verdict.pruned_on_next_switch))  # fmt: skip
        yield VM_SHARE_DETECTION.family(((s.vm, s.share, s.mountpoint, s.method), 1.0) for s in shares)
        yield PINNED_GENERATIONS.family(((g.store.mountpoint,), float(len(g.pinned_generations))) for g in result.stores)
        yield RECOMMENDED_KEEP.family(((g.store.mountpoint,), float(g.recommended_keep_generations))
                                      for g in result.stores if g.recommended_keep_generations is not None)  # fmt: skip
        yield VM_SHARE_EXPOSES_STORE.family(each(shares, lambda s: s.exposes_store))
        yield VM_SHARE_WRITABLE.family(each([s for s in shares if s.writable is not None], lambda s: s.writable))
        compared = [s for s in shares if s.outdated_files is not None]
        yield VM_SERVING_OUTDATED.family(each(compared, lambda s: s.outdated_files > 0))
        yield VM_OUTDATED_FILES.family(each(compared, lambda s: s.outdated_files))
        consumers = result.consumers

        def by_consumer(value):
            return [((c.consumer, c.kind, c.mountpoint), float(value(c))) for c in consumers]

        yield CONSUMER_SERVING_GENERATION.family(by_consumer(lambda c: c.generation))
        yield CONSUMER_SERVING_STALE.family(by_consumer(lambda c: c.verdict.stale))
        yield CONSUMER_SERVING_DELETED.family(by_consumer(lambda c: c.verdict.deleted))
        yield CONSUMER_SERVING_OUTDATED.family(((c.consumer, c.kind, c.mountpoint), float(c.outdated_files > 0))
                                               for c in consumers if c.outdated_files is not None)  # fmt: skip
        yield FINGERPRINTED_GENERATIONS.family(((g.store.mountpoint,), float(g.fingerprinted))
                                               for g in result.stores if g.fingerprinted is not None)  # fmt: skip
        yield CURRENT_CHANGED_FILES.family(((g.store.mountpoint,), float(g.changed_files))
                                           for g in result.stores if g.changed_files is not None)  # fmt: skip
        # Unknown, not 0, while some process's cwd or root could not be read.
        planned = [g for g in result.stores if g.plan is not None and not g.uninspected]
        yield RECLAIMABLE_GENERATIONS.family(((g.store.mountpoint,), float(len(g.plan.removable))) for g in planned)
        yield RECLAIMABLE_BYTES.family(((g.store.mountpoint,), float(g.plan.bytes_of(g.store))) for g in planned)
        run = result.fingerprint_run
        yield FINGERPRINT_LAST_RUN.family([((), run[0])] if run else [])
        yield FINGERPRINT_RUN_ERRORS.family([((), float(run[1]))] if run else [])
        yield VM_RUNNING.family(((vm,), float(running)) for vm, running in sorted(result.vms.items()))
        yield CAPABILITY.family(((name,), float(held)) for name, held in sorted(result.capabilities.items()))

    def problems(self, result: SharesResult) -> Iterator[Problem]:
        if result.unreadable_namespaces:
            yield Problem("mount_tables", f"{result.unreadable_namespaces} process(es) whose mount table could not be "
                          "read: a container or service among them that mounts a generation is not seen",
                          "mount /proc without hidepid= for the exporter, or run it as root's group of /proc "
                          "(ProcSubset= and ProtectProc= left at their defaults)")  # fmt: skip
        if result.fingerprint_run and result.fingerprint_run[1]:
            yield Problem("fingerprint", f"the last fingerprint run could not fingerprint {result.fingerprint_run[1]} "
                          "generation(s) or store(s): whether readers' secrets are outdated is unknown for those",
                          "see journalctl -u sops-nix-exporter-fingerprint.service")  # fmt: skip
        for group in result.stores:
            for share in group.shares:
                yield from share_problems(share, group.store)
            for consumer in group.consumers:
                yield from consumer_problems(consumer, group.store)
        # /proc/PID/root needs the ptrace check; /proc/PID/fd (a root-owned 0500 directory) needs both.
        if result.unreadable_processes and not all(result.capabilities.get(c) for c in PROC_CAPABILITIES):
            yield Problem(
                "ptrace",
                f"{result.unreadable_processes} virtiofsd process(es) could not be inspected: reading another "
                "process's root needs CAP_SYS_PTRACE, and its descriptors CAP_SYS_PTRACE and CAP_DAC_READ_SEARCH",
                "grant the exporter AmbientCapabilities=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH",
            )


    def summary(self, result: SharesResult) -> Iterator[str]:
        for group in result.stores:
            for share in group.shares:
                yield share_summary(share, group.store)
            for consumer in group.consumers:
                yield consumer_summary(consumer, group.store)
        for group in result.stores:
            if group.plan is not None and group.plan.removable:
                size = group.plan.bytes_of(group.store)
                yield (f"store {group.store.mountpoint}: {len(group.plan.removable)} generation(s) nobody reads hold "
                       f"{human_bytes(size)}: `sops-nix-exporter prune --apply` (as root) frees them")  # fmt: skip
        for vm, running in sorted(result.vms.items()):
            if not running:
                yield f"VM {vm}: stopped (declared in current/, not booted): its shares are not expected to be served"


def share_problems(share: Share, store: StoreScan) -> Iterator[Problem]:
    """The verdict on one share and its fix, shared by the log and `check`.

    Never "share the store's mount point": that hands the guest every generation of every secret, and
    sops-nix's private key (age-keys.txt, which it writes into the mount point). docs/runbooks.md says why.
    """
    who = f"VM {share.vm} share {share.share} ({share.mountpoint})"
    key = f"{share.vm}/{share.share}/{share.mountpoint}"
    # microvm-virtiofsd@VM is PartOf microvm@VM: restarting the VM restarts its virtiofsd, which resolves
    # the symlink again. Restarting the virtiofsd alone is not enough: a running guest does not reconnect.
    restart = f"restart microvm@{share.vm} (restarts its virtiofsd too) to serve the current generation"
    if share.exposes_store:
        yield Problem(f"{key}:whole_store", f"{who}: shares the store's mount point (or a directory above it), not "
                      "its symlink: the guest can read every generation the host keeps and sops-nix's key file "
                      "(age-keys.txt) if one is there",
                      f"share {store.symlink} (or a subdirectory of secrets meant for this VM) instead and restart "
                      f"microvm@{share.vm}; treat the key and every secret the guest could read as known to it",
                      severity="critical")  # fmt: skip
    if share.up and share.writable:
        yield Problem(f"{key}:writable", f"{who}: the guest can write the share (virtiofsd without --readonly), "
                      "and so change the secrets the host reads from the same generation",
                      f"set microvm.shares.*.readOnly = true for it, then restart microvm@{share.vm}")  # fmt: skip
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
    if share.exposes_store:
        return  # every generation is there: no stale or deleted verdict means anything
    if share.held is not None and share.held.method == FILE_HANDLE:
        yield Problem(f"{key}:file_handle", f"{who}: cannot tell which generation it serves: its unsandboxed "
                      "virtiofsd holds the shared directory as a file handle, which /proc does not show",
                      f"run it in virtiofsd's default namespace sandbox (drop --sandbox=none from "
                      f"microvm.virtiofsd.extraArgs), or set microvm.virtiofsd.inodeFileHandles = \"never\"; "
                      f"then restart microvm@{share.vm}")  # fmt: skip
        return
    served = share.served_generation
    current = store.current.number if store.current else None
    verdict = share.verdict
    if verdict.deleted:
        yield Problem(f"{key}:deleted", f"{who}: serves generation {served if served is not None else '?'}, "
                      "which was deleted: the guest sees an empty directory", restart, severity="critical")  # fmt: skip
        return
    if verdict.pruned_on_next_switch:
        keep = verdict.keep_to_spare
        keep_text = f"set sops.keepGenerations = {keep}" if keep is not None else "raise sops.keepGenerations"
        yield Problem(f"{key}:pruned_next", f"{who}: serves generation {served}, which the next switch deletes "
                      f"(keepGenerations = {store.keep_generations})",
                      f"{keep_text}, or 0 to never prune (each kept generation costs memory, and the VM reads "
                      f"stale secrets until restarted), or restart microvm@{share.vm} right after each "
                      "switch")  # fmt: skip
    if verdict.stale and share.outdated_files:
        yield Problem(f"{key}:outdated", f"{who}: serves generation {served}, current is {current}: "
                      f"{share.outdated_files} secret(s) outdated", restart)  # fmt: skip
    elif verdict.stale and share.outdated_files is None:
        yield Problem(f"{key}:stale", f"{who}: serves generation {served}, current is {current}: "
                      "the VM does not see rotated secrets", restart)  # fmt: skip


def share_summary(share: Share, store: StoreScan) -> str:
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
    current = store.current.number if store.current else None
    state = "deleted" if share.verdict.deleted else "stale" if share.verdict.stale else "current"
    if share.verdict.stale and not share.verdict.deleted and share.outdated_files is not None:
        state = (f"{share.outdated_files} secret(s) outdated, restart microvm@{share.vm}" if share.outdated_files
                 else "same secrets")  # fmt: skip
    return f"{who}: serves generation {share.served_generation}, current {current}: {state}"


def restart_hint(consumer: Consumer) -> str:
    """How to make a consumer mount the current generation: its mount is resolved when it starts."""
    name = consumer.consumer
    if consumer.kind == "container" and name.startswith("container@"):
        return f"restart the NixOS container: nixos-container restart {name.removeprefix('container@').removesuffix('.service')}"
    if name.startswith(("docker-", "libpod-")):
        engine = "docker" if name.startswith("docker-") else "podman"
        container = name.split("-", 1)[1].removesuffix(".scope")[:12]
        return f"restart the container ({engine} restart {container}) so its volume mounts the current generation"
    if consumer.kind in ("container", "service"):
        return f"systemctl restart {name}"
    return f"restart the process {name} (PID {consumer.pid}) so that it mounts the current generation"


def consumer_problems(consumer: Consumer, store: StoreScan) -> Iterator[Problem]:
    who = f"{consumer.kind} {consumer.consumer} ({consumer.mountpoint})"
    key = f"consumer/{consumer.kind}/{consumer.consumer}/{consumer.mountpoint}"
    current = store.current.number if store.current else None
    if consumer.verdict.deleted:
        yield Problem(f"{key}:deleted", f"{who}: its mount holds generation {consumer.generation}, which was "
                      "deleted: it sees an empty secrets directory", restart_hint(consumer),
                      severity="critical")  # fmt: skip
    elif consumer.verdict.stale and consumer.outdated_files:
        yield Problem(f"{key}:outdated", f"{who}: its mount holds generation {consumer.generation}, current is "
                      f"{current}: {consumer.outdated_files} secret(s) outdated", restart_hint(consumer))  # fmt: skip
    elif consumer.verdict.stale and consumer.outdated_files is None:
        yield Problem(f"{key}:stale", f"{who}: its mount holds generation {consumer.generation}, current is "
                      f"{current}: it does not see rotated secrets", restart_hint(consumer))  # fmt: skip


def consumer_summary(consumer: Consumer, store: StoreScan) -> str:
    state = "deleted" if consumer.verdict.deleted else "stale" if consumer.verdict.stale else "current"
    if consumer.verdict.stale and not consumer.verdict.deleted and consumer.outdated_files is not None:
        state = f"{consumer.outdated_files} secret(s) outdated" if consumer.outdated_files else "same secrets"
    current = store.current.number if store.current else None
    return (f"{consumer.kind} {consumer.consumer} ({consumer.mountpoint}): mounts generation {consumer.generation}, "
            f"current {current}: {state}")
