"""The shares scan and collector on a host that is only files: the fixture host (tests/fixtures/, its README
says what each process is) and small /proc trees whose links point at real directories standing in for
generations. tests/golden/shares.prom is the whole exposition for the fixture host.

Unprivileged: nothing is mounted and no process is started; the real-system tests (test_shares.py) prove
the same readers against the real virtiofsd.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sops_nix_exporter.collector.frame import Exporter, RegistryAdapter
from sops_nix_exporter.collector.shares import SharesCollector
from sops_nix_exporter.collector.stores import StoresCollector, StoresResult
from sops_nix_exporter.config import Config
from sops_nix_exporter.readers.shares import FILE_HANDLE, Share, scan_shares
from sops_nix_exporter.stores.scan import Generation, Measurer, StoreScan, SymlinkState, Usage

from goldens import compare_golden, golden_mask
from proctree import (
    C_VIRTIOFSD,
    FIXTURE_PROC,
    FIXTURE_STATE_DIR,
    HOST_MEMORY_BYTES,
    ProcTree,
    fixture_stores,
    rust_command,
)
from scrape import samples, value

pytestmark = pytest.mark.unit

SECRETS = "/run/secrets.d"
USERS = "/run/secrets-for-users.d"


def by_key(shares: list[Share]) -> dict[tuple[str, str, str], Share]:
    return {(s.vm, s.share, s.mountpoint): s for s in shares}


# ---------------------------------------------------------------------------------------------------------
# The fixture host


def test_every_share_of_the_fixture_host():
    result = scan_shares(fixture_stores(), str(FIXTURE_STATE_DIR), str(FIXTURE_PROC))
    shares = by_key(result.shares)
    # (up, method, served, sandbox, pids, stale, deleted, behind, pruned on next switch)
    assert {key: (s.up, s.method, s.served_generation, s.sandbox, s.pids, s.verdict.stale, s.verdict.deleted,
                  s.verdict.generations_behind, s.verdict.pruned_on_next_switch)
            for key, s in shares.items()} == {
        ("api", "sops", SECRETS): (True, "mountinfo", 3, "namespace", (2201, 2207), False, False, 0, False),
        ("build", "secrets", SECRETS): (True, "mountinfo", None, "namespace", (2301, 2307), False, False, None, None),
        ("ci", "secrets", SECRETS): (True, "mountinfo", 3, "namespace", (2501, 2507), False, False, 0, False),
        ("legacy", "secrets", SECRETS): (True, "mountinfo", 2, "namespace", (2401, 2407), True, False, 1, True),
        ("mail", "secrets", SECRETS): (False, "down", None, "unknown", (), False, False, None, None),
        ("web", "secrets", SECRETS): (True, "mountinfo", 1, "namespace", (2101, 2108), True, True, 2, False),
        ("web", "secrets-for-users", USERS): (True, "mountinfo", 1, "namespace", (2102, 2109), False, False, 0, None),
    }  # fmt: skip
    assert shares[("build", "secrets", SECRETS)].held.whole_store
    # The source as the command line names it, less a trailing slash (the C daemon's -o source=/run/secrets/).
    assert {s.source for s in result.shares} == {"/run/secrets", "/run/secrets-for-users", "/run/secrets.d"}
    # The store's generations 2 and 3 are listed; 1 is served though deleted: three pinned, and only
    # keepGenerations = 3 spares legacy's generation 2 at the next switch.
    secrets, users = result.stores
    assert (secrets.store.mountpoint, secrets.pinned_generations, secrets.recommended_keep_generations) == (
        SECRETS, {1, 2, 3}, 3)  # fmt: skip
    assert (users.store.mountpoint, users.pinned_generations, users.recommended_keep_generations) == (USERS, {1}, 2)
    assert result.capabilities == {"CAP_DAC_READ_SEARCH": False, "CAP_SYS_PTRACE": False}
    assert result.unreadable_processes == 0


def test_what_the_fixture_host_does_not_count_as_a_share():
    """Shares of things that are not stores, declarations of the current/ a running VM was not booted from,
    command lines naming no shared directory, and other programs are nobody's shares."""
    shares = scan_shares(fixture_stores(), str(FIXTURE_STATE_DIR), str(FIXTURE_PROC)).shares
    assert not [s for s in shares if s.share in ("ro-store", "storage", "secrets-next", "unknown")]
    assert not [s for s in shares if {2104, 2601, 2602, 2603, 812, 1} & set(s.pids)]


def test_a_store_that_is_down_has_no_shares():
    """The shares collector is given the listed stores only; a declared share of another store is not told."""
    secrets, _ = fixture_stores()
    shares = scan_shares([secrets], str(FIXTURE_STATE_DIR), str(FIXTURE_PROC)).shares
    assert {s.mountpoint for s in shares} == {SECRETS}
    assert len(shares) == 6


class FixtureStores(StoresCollector):
    """The stores collector, publishing the fixture host's stores (built, not scanned: there is no ramfs here)."""

    def scan(self, snapshot) -> StoresResult:
        return StoresResult(host_memory_bytes=HOST_MEMORY_BYTES, stores=fixture_stores())


def fixture_exposition() -> str:
    config = Config.model_validate({
        "stores": [{"mountpoint": SECRETS, "symlink": "/run/secrets", "keep_generations": 2},
                   {"mountpoint": USERS, "symlink": "/run/secrets-for-users"}],
        "microvm": {"state_dir": str(FIXTURE_STATE_DIR)},
    })  # fmt: skip
    exporter = Exporter([FixtureStores(config, measurer=Measurer()), SharesCollector(config, proc=str(FIXTURE_PROC))])
    exporter.problem_log = None  # the findings are the verdict tests' business; nothing to log here
    registry = CollectorRegistry()
    registry.register(RegistryAdapter(exporter))
    return generate_latest(registry).decode()


def test_golden_shares():
    """The whole exposition of the stores and shares collectors for the fixture host; see tests/golden/README.md."""
    text = fixture_exposition()
    found = samples(text)
    assert value(found, "sopsnix_scrape_collector_success", collector="shares") == 1
    assert value(found, "sopsnix_vm_serving_deleted_generation", vm="web", share="secrets", mountpoint=SECRETS) == 1
    assert value(found, "sopsnix_vm_share_up", vm="mail", share="secrets", mountpoint=SECRETS) == 0
    # db is declared only in current/: stopped on purpose, so its share is neither up nor down. api is declared
    # only in current/ too, but a virtiofsd serves it (a VM being started): reported as served.
    assert value(found, "sopsnix_vm_running", vm="db") == 0
    assert value(found, "sopsnix_vm_running", vm="mail") == 1
    assert value(found, "sopsnix_vm_running", vm="api") == 0
    assert value(found, "sopsnix_vm_share_up", vm="db", share="secrets", mountpoint=SECRETS) is None
    assert value(found, "sopsnix_vm_share_up", vm="api", share="sops", mountpoint=SECRETS) == 1
    compare_golden("shares.prom", golden_mask(text, {}))


def test_golden_shares_passes_promtool(promtool_check):
    promtool_check(fixture_exposition())


# ---------------------------------------------------------------------------------------------------------
# The chroot and unsandboxed readers, on links to real directories


@pytest.fixture
def host(tmp_path) -> tuple[ProcTree, StoreScan, Path]:
    """A store of plain directories (generations 2 and 3, 3 current) whose device and inodes the readers
    compare with what each process's links resolve to, and a /proc to fill."""
    mountpoint = tmp_path / "secrets.d"
    for name in ("2", "3", "4 (deleted)"):
        # "4 (deleted)": what the kernel names a removed directory a process still holds.
        (mountpoint / name).mkdir(parents=True)
    symlink = tmp_path / "secrets"
    symlink.symlink_to(mountpoint / "3")
    device = os.stat(mountpoint).st_dev
    generations = [Generation(n, device, os.stat(mountpoint / str(n)).st_ino, Usage(1, 4096, 64)) for n in (2, 3)]
    store = StoreScan(mountpoint=str(mountpoint), symlink=str(symlink), up=True, keep_generations=1,
                      memory_budget_bytes=0, generations=generations, symlink_state=SymlinkState.OK,
                      current=generations[-1], mounts=1, fstype="ramfs", device=device, devices=frozenset([device]),
                      fs_path=str(mountpoint))  # fmt: skip
    return ProcTree(tmp_path / "proc"), store, mountpoint


def host_mounts(store: StoreScan) -> str:
    """The host's mount table, as an unsandboxed (or not yet sandboxed) virtiofsd has it: its root is not the
    store's filesystem."""
    other = os.makedev(os.major(store.device), os.minor(store.device) + 1)
    return f"27 1 {os.major(other)}:{os.minor(other)} / / rw,relatime - ext4 /dev/vda rw\n"


def unit(vm: str) -> str:
    return f"/machine.slice/microvm-virtiofsd@{vm}.service"


def test_chroot_and_unsandboxed_readers(host, tmp_path):
    proc, store, mountpoint = host
    symlink = store.symlink
    # The chroot sandbox: its root is the directory; its mount table is empty (recorded from the real daemon).
    proc.process(10, rust_command("a.sock", symlink, "--sandbox=chroot"), cgroup=unit("chroot"), root=mountpoint / "2")
    proc.process(11, rust_command("b.sock", symlink, "--sandbox=chroot"), cgroup=unit("pruned"),
                 root=mountpoint / "4 (deleted)")
    proc.process(12, rust_command("c.sock", str(mountpoint), "--sandbox=chroot"), cgroup=unit("whole"), root=mountpoint)
    # No sandbox: the shared directory stays open as a descriptor, beside its log, socket and the root.
    plain = {0: "/dev/null", 1: "socket:[1486144]", 3: tmp_path / "d.sock.pid", 5: mountpoint / "3", 6: "/"}
    proc.process(13, rust_command("d.sock", symlink, "--sandbox=none"), cgroup=unit("none"),
                 mountinfo=host_mounts(store), fds=plain)
    proc.process(14, rust_command("e.sock", symlink, "--sandbox=none"), cgroup=unit("none-pruned"),
                 mountinfo=host_mounts(store), fds={5: mountpoint / "4 (deleted)"})
    # --inode-file-handles=prefer on a filesystem with file handles: only the mount point is held open.
    proc.process(15, rust_command("f.sock", symlink, "--sandbox=none"), cgroup=unit("handles"),
                 mountinfo=host_mounts(store), fds={5: mountpoint, 6: "/"})
    proc.process(16, rust_command("g.sock", str(mountpoint), "--sandbox=none"), cgroup=unit("none-whole"),
                 mountinfo=host_mounts(store), fds={5: mountpoint})
    # QEMU's C virtiofsd before its VM connects: no sandbox yet, nothing held.
    proc.process(17, [C_VIRTIOFSD, "--socket-path=h.sock", "-o", f"source={symlink}/", "-o", "sandbox=chroot"],
                 cgroup=unit("waiting"), mountinfo=host_mounts(store), fds={0: "/dev/null"})
    proc.capabilities("0000000000080004")

    result = scan_shares([store], str(tmp_path / "microvms"), str(proc))
    mp = store.mountpoint
    found = {vm: (s.method, s.served_generation, s.deleted, bool(s.held and s.held.whole_store), s.sandbox)
             for (vm, _, _), s in by_key(result.shares).items()}  # fmt: skip
    assert found == {
        "chroot": ("root", 2, False, False, "chroot"),
        "pruned": ("root", 4, True, False, "chroot"),
        "whole": ("root", None, False, True, "chroot"),
        "none": ("fd", 3, False, False, "none"),
        "none-pruned": ("fd", 4, True, False, "none"),
        "handles": (FILE_HANDLE, None, False, False, "none"),
        "none-whole": ("fd", None, False, True, "none"),
        "waiting": ("unpinned", None, False, False, "chroot"),
    }
    assert {s.vm for s in result.shares if s.mountpoint == mp and s.verdict.known} == {
        "chroot", "pruned", "whole", "none", "none-pruned", "none-whole", "waiting"}  # fmt: skip
    # The generation behind a file handle cannot be told, so no keepGenerations can honestly be recommended.
    assert result.stores[0].recommended_keep_generations is None
    assert result.capabilities == {"CAP_DAC_READ_SEARCH": True, "CAP_SYS_PTRACE": True}
