"""The failure this project exists for, reproduced in a real VM, with the exporter watching.

A real ramfs store switched as sops-nix switches it, a real virtiofsd serving the store's symlink (the Rust
virtiofsd microvm.nix runs, with microvm.nix's command line, in each of its sandboxes; and QEMU's C
virtiofsd), a real QEMU guest (Debian's kernel, a busybox initramfs) printing what it reads from the share every
second, and the real exporter process. At every step the guest's console is read first (the first tick
it began after the step), then the exporter's /metrics must tell the same story.

Set SOPSNIX_VM_TRANSCRIPT=DIR to keep each run's console ticks and metrics (docs/reproduction.md is made
from them).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from consumers import consumers, descriptor_holders  # noqa: F401 (fixtures)
from scrape import value
from sopsnix import SopsStore, du_figures
from vm.guest import (
    GuestUnavailable,
    MicrovmShare,
    Tick,
    build_initramfs,
    probe_accelerator,
)
from vm.kernel import KernelUnavailable, fetch_kernel

pytestmark = pytest.mark.slow

VM = "sopsvm"
TAG = "secrets"

# (daemon, sandbox, read-only): microvm.nix runs the Rust virtiofsd in its default namespace sandbox; chroot
# and none come from microvm.virtiofsd.extraArgs, --readonly from microvm.shares.*.readOnly.
DAEMONS = [
    ("rust", "namespace", False),
    ("rust", "chroot", True),
    ("rust", "none", False),
    ("c", "namespace", False),
]
DAEMON_IDS = [f"{d}-{s}{'-readonly' if r else ''}" for d, s, r in DAEMONS]

SHARE_GAUGES = {
    "up": "sopsnix_vm_share_up",
    "serving": "sopsnix_vm_serving_generation",
    "stale": "sopsnix_vm_serving_stale_generation",
    "deleted": "sopsnix_vm_serving_deleted_generation",
    "behind": "sopsnix_vm_generations_behind",
    "pruned_on_next_switch": "sopsnix_vm_share_pruned_on_next_switch",
}


def secrets_of(generation: int) -> dict[str, str]:
    """Every value names its generation, so the guest's console shows which one it reads. Generation 2
    has one secret more, as an activation that adds a secret would write."""
    values = {
        "db-password": f"generation {generation}: db password",
        "api-token": f"generation {generation}: api token",
        "rendered/app.env": f"generation {generation}: APP_SECRET=value-{generation}",
    }
    if generation >= 2:
        values["tls/key.pem"] = f"generation {generation}: private key"
    return values


@pytest.fixture(scope="session")
def vm_parts(tmp_path_factory):
    """(kernel, initramfs, accelerator), made once per session; skips when no guest can boot here."""
    if os.geteuid() != 0:
        pytest.skip("needs root: ramfs store, virtiofsd's sandbox, cgroups")
    for tool, package in (("qemu-system-x86_64", "qemu-system-x86"), ("cpio", "cpio"), ("unshare", "util-linux")):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package {package}); run scripts/test")
    try:
        kernel = fetch_kernel()
        workdir = tmp_path_factory.mktemp("vm")
        initramfs = build_initramfs(kernel, workdir / "initramfs.cpio")
        accelerator = probe_accelerator(kernel, initramfs, workdir)
    except (KernelUnavailable, GuestUnavailable) as exc:
        pytest.skip(f"no test VM: {exc}")
    return kernel, initramfs, accelerator


@pytest.fixture
def microvm(vm_parts, tmp_path):
    """microvm(source, state_dir) -> MicrovmShare (not started); everything is stopped and removed afterwards."""
    kernel, initramfs, accelerator = vm_parts
    shares: list[MicrovmShare] = []

    def make(source: Path, state_dir: Path, daemon: str = "c", sandbox: str = "namespace",
             readonly: bool = False) -> MicrovmShare:  # fmt: skip
        try:
            share = MicrovmShare(kernel, initramfs, accelerator, state_dir, VM, TAG, source, tmp_path,
                                 daemon=daemon, sandbox=sandbox, readonly=readonly)  # fmt: skip
        except GuestUnavailable as exc:
            pytest.skip(f"no test VM: {exc}")
        shares.append(share)
        return share

    yield make
    for share in shares:
        share.close()


def start(share: MicrovmShare) -> Tick:
    try:
        return share.start()
    except GuestUnavailable as exc:
        pytest.skip(f"no test VM: {exc}")


class Transcript:
    """Each step as the guest printed it and as the exporter published it: for failure messages and docs."""

    def __init__(self, title: str, tmp_path: Path, share: MicrovmShare) -> None:
        self.title = title
        self.share = share
        self.path = tmp_path / "transcript.md"
        self.parts = [f"# {title}\n\n{share.describe()}; kernel {share.kernel.package}, "
                      f"accelerator {share.accelerator}\n"]

    def add(self, step: str, tick: Tick | None, metrics: str, store: SopsStore) -> None:
        lines = [
            line for line in metrics.splitlines()
            if line.startswith(("sopsnix_vm_", "sopsnix_pinned_", "sopsnix_recommended_", "sopsnix_generations",
                                "sopsnix_current_generation{"))
            and str(store.mountpoint) in line
        ]  # fmt: skip
        guest = tick.text if tick is not None else "(the guest is not running)"
        host = "\n".join(self.share.host_view()) or "(no virtiofsd)"
        self.parts.append(
            f"\n## {step}\n\nguest console:\n\n{guest}\n\nhost:\n\n{host}\n\nexporter:\n\n" + "\n".join(lines) + "\n"
        )
        self.path.write_text("".join(self.parts))
        keep = os.environ.get("SOPSNIX_VM_TRANSCRIPT")
        if keep:
            Path(keep).mkdir(parents=True, exist_ok=True)
            (Path(keep) / f"{self.title}.md").write_text("".join(self.parts))


def expect_share(exporter, store: SopsStore, transcript: Transcript, step: str, tick: Tick | None, **expected):
    """The exporter's share gauges for our VM must equal `expected`, scraped after the guest's tick."""
    text = exporter.metrics()
    transcript.add(step, tick, text, store)
    labels = {"vm": VM, "share": TAG, "mountpoint": str(store.mountpoint)}
    seen = {key: value(text, SHARE_GAUGES[key], **labels) for key in expected}
    guest = tick.text if tick is not None else "(the guest is not running)"
    assert seen == {k: None if v is None else float(v) for k, v in expected.items()}, (
        f"step '{step}': the exporter published {seen}, expected {expected}.\n"
        f"The guest saw:\n{guest}\nThe host saw:\n" + "\n".join(transcript.share.host_view())
        + "\nThe exporter's share lines:\n"
        + "\n".join(line for line in text.splitlines() if line.startswith("sopsnix_vm_"))
        + f"\nExporter log:\n{exporter.log()[-2000:]}"
    )
    return text


def exporter_config(store: SopsStore, keep_generations: int, state_dir: Path) -> dict:
    return {
        "stores": [
            {"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), "keep_generations": keep_generations}
        ],
        "microvm": {"state_dir": str(state_dir)},
    }


@pytest.mark.parametrize("daemon,sandbox,readonly", DAEMONS, ids=DAEMON_IDS)
def test_pruned_generation_empties_the_guest_mount(make_store, microvm, serve, scratch, tmp_path, daemon, sandbox,
                                                   readonly):  # fmt: skip
    """keepGenerations = 1: the switch prunes the generation the running VM is served; its mount turns empty."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.write_generation(1, secrets_of(1))
    store.link(1)
    share = microvm(store.symlink, state_dir, daemon, sandbox, readonly)
    transcript = Transcript(f"keep-generations-1-{daemon}-{sandbox}", tmp_path, share)
    exporter = serve(exporter_config(store, 1, state_dir))

    tick = start(share)
    assert tick.files == secrets_of(1), tick.text
    expect_share(exporter, store, transcript, "before the switch", tick,
                 up=1, serving=1, stale=0, deleted=0, behind=0, pruned_on_next_switch=1)  # fmt: skip

    # The switch, in two halves: write and link generation 2 ...
    store.write_generation(2, secrets_of(2))
    store.link(2)
    tick = share.next_tick()
    assert tick.files == secrets_of(1), f"the guest should still read generation 1:\n{tick.text}"
    expect_share(exporter, store, transcript, "after the switch, generation 1 still kept", tick,
                 up=1, serving=1, stale=1, deleted=0, behind=1, pruned_on_next_switch=1)  # fmt: skip

    # ... then prune as keepGenerations = 1 does: generation 1, the one the guest is served, goes.
    assert store.prune(1) == [1]
    tick = share.next_tick()
    assert tick.listing == [] and tick.files == {}, f"the guest's mount should be empty:\n{tick.text}"
    assert tick.links == 0, f"the served directory should be deleted (0 links):\n{tick.text}"
    expect_share(exporter, store, transcript, "after the prune", tick,
                 up=1, serving=1, stale=1, deleted=1, behind=1)  # fmt: skip

    share.stop()
    expect_share(exporter, store, transcript, "VM and virtiofsd stopped", None, up=0)

    tick = start(share)
    assert tick.files == secrets_of(2), f"after the restart the guest should read generation 2:\n{tick.text}"
    expect_share(exporter, store, transcript, "after restarting the VM and its virtiofsd", tick,
                 up=1, serving=2, stale=0, deleted=0, behind=0, pruned_on_next_switch=1)  # fmt: skip


@pytest.mark.parametrize("daemon,sandbox,readonly", DAEMONS, ids=DAEMON_IDS)
def test_kept_generation_is_stale_and_grows_the_store(make_store, microvm, serve, scratch, tmp_path, daemon, sandbox,
                                                      readonly):  # fmt: skip
    """keepGenerations = 0: nothing is pruned; the guest keeps reading old secrets and memory grows."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.write_generation(1, secrets_of(1))
    store.link(1)
    share = microvm(store.symlink, state_dir, daemon, sandbox, readonly)
    transcript = Transcript(f"keep-generations-0-{daemon}-{sandbox}", tmp_path, share)
    exporter = serve(exporter_config(store, 0, state_dir))

    tick = start(share)
    assert tick.files == secrets_of(1), tick.text
    before = expect_share(exporter, store, transcript, "before the switch", tick,
                          up=1, serving=1, stale=0, deleted=0, behind=0, pruned_on_next_switch=0)  # fmt: skip
    mountpoint = str(store.mountpoint)
    bytes_before = value(before, "sopsnix_generations_bytes", mountpoint=mountpoint)
    assert bytes_before == du_figures(store.generation_path(1))[1]

    assert store.switch(secrets_of(2), keep_generations=0) == 2
    assert store.generations() == [1, 2]
    generation_2_bytes = du_figures(store.generation_path(2))[1]
    assert generation_2_bytes > 0, "ramfs should account the new generation's pages in st_blocks"
    tick = share.next_tick()
    assert tick.files == secrets_of(1), f"the guest should still read generation 1:\n{tick.text}"
    after = expect_share(exporter, store, transcript, "after the switch (nothing pruned)", tick,
                         up=1, serving=1, stale=1, deleted=0, behind=1, pruned_on_next_switch=0)  # fmt: skip
    assert value(after, "sopsnix_generations", mountpoint=mountpoint) == 2
    assert value(after, "sopsnix_current_generation_bytes", mountpoint=mountpoint) == generation_2_bytes
    assert value(after, "sopsnix_generations_bytes", mountpoint=mountpoint) == bytes_before + generation_2_bytes


def test_unsandboxed_file_handles_on_tmpfs_are_reported_as_unknown(make_store, microvm, serve, scratch, tmp_path):
    """sops-nix's useTmpfs store, served by the Rust virtiofsd with --sandbox=none and microvm.nix's default
    --inode-file-handles=prefer: tmpfs has file handles, so virtiofsd keeps the shared directory as one and holds
    only the store's mount point open. The exporter cannot tell the generation, and says so; it must not call
    it a share of the whole store (never stale), nor invent a verdict."""
    store = make_store("tmpfs")
    state_dir = scratch / "microvms"
    store.write_generation(1, secrets_of(1))
    store.link(1)
    share = microvm(store.symlink, state_dir, "rust", "none")
    transcript = Transcript("tmpfs-file-handles-rust-none", tmp_path, share)
    exporter = serve(exporter_config(store, 1, state_dir))

    tick = start(share)
    assert tick.files == secrets_of(1), tick.text
    # What virtiofsd holds, as the kernel tells it: the mount point, no directory inside the store.
    open_directories = " ".join(share.host_view())
    assert f"open directories: /, {store.mountpoint}" in open_directories, open_directories
    labels = {"vm": VM, "share": TAG, "mountpoint": str(store.mountpoint)}
    store.write_generation(2, secrets_of(2))
    store.link(2)
    tick = share.next_tick()
    assert tick.files == secrets_of(1), f"the guest should still read generation 1:\n{tick.text}"
    text = expect_share(exporter, store, transcript, "after the switch", tick,
                        up=1, serving=None, stale=None, deleted=None, behind=None)  # fmt: skip
    assert value(text, "sopsnix_vm_share_detection", method="file_handle", **labels) == 1


def test_outdated_secrets_only_when_the_values_differ(make_store, microvm, serve, scratch, tmp_path):
    """Issue 15 on a real guest and the real Rust virtiofsd, keepGenerations = 0 with fingerprints: an
    activation that changes nothing leaves the guest on an older number with the host's very values (stale,
    not outdated); one that rotates a secret to a value of the same length (sizes and names identical) leaves
    the guest on the old value, and the exporter says outdated."""
    import subprocess
    import sys

    import yaml

    values = {"db-password": "value-one-of-24-bytes...", "app/api-token": "token-of-24-bytes-exactly"}
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.write_generation(1, values)
    store.link(1)
    share = microvm(store.symlink, state_dir, "rust", "namespace", True)
    transcript = Transcript("fingerprints-rust-namespace", tmp_path, share)
    config = {**exporter_config(store, 0, state_dir), "fingerprint_dir": str(scratch / "fingerprints")}
    config_path = scratch / "fingerprint.yml"
    config_path.write_text(yaml.safe_dump(config))
    exporter = serve(config)
    labels = {"vm": VM, "share": TAG, "mountpoint": str(store.mountpoint)}

    def fingerprint() -> None:
        result = subprocess.run([sys.executable, "-m", "sops_nix_exporter", "fingerprint",
                                 f"--config.file={config_path}"], capture_output=True, text=True, timeout=60)  # fmt: skip
        assert result.returncode == 0, result.stderr

    def content(text: str) -> dict:
        return {"outdated": value(text, "sopsnix_vm_serving_outdated_secrets", **labels),
                "files": value(text, "sopsnix_vm_outdated_secret_files", **labels)}  # fmt: skip

    tick = start(share)
    assert tick.files == values, tick.text
    fingerprint()

    # An activation that changes no secret: generation 2, the same values.
    store.switch(values, keep_generations=0)
    fingerprint()
    tick = share.next_tick()
    assert tick.files == values, f"the guest reads generation 1, which holds the host's values:\n{tick.text}"
    text = expect_share(exporter, store, transcript, "an activation that changed nothing", tick,
                        up=1, serving=1, stale=1, deleted=0, behind=1)  # fmt: skip
    assert content(text) == {"outdated": 0, "files": 0}
    assert value(text, "sopsnix_current_generation_changed_files", mountpoint=str(store.mountpoint)) == 0

    # A rotation to a value of the same length: the guest keeps reading the old one.
    rotated = {**values, "db-password": "value-two-of-24-bytes..."}
    assert len(rotated["db-password"]) == len(values["db-password"])
    store.switch(rotated, keep_generations=0)
    fingerprint()
    tick = share.next_tick()
    assert tick.files == values, f"the guest should still read the old value:\n{tick.text}"
    text = expect_share(exporter, store, transcript, "a secret rotated to a value of the same length", tick,
                        up=1, serving=1, stale=1, deleted=0, behind=2)  # fmt: skip
    assert content(text) == {"outdated": 1, "files": 1}
    assert value(text, "sopsnix_current_generation_changed_files", mountpoint=str(store.mountpoint)) == 1


def test_prune_frees_what_nobody_reads_while_the_guest_keeps_its_secrets(make_store, microvm, consumers,
                                                                          descriptor_holders, scratch, tmp_path):  # noqa: F811
    """Issue 16 on a real guest: the Rust virtiofsd serving generation 2, a mount namespace holding 3, a process
    with an O_PATH descriptor in 4, switches up to 8 under keepGenerations = 0: `prune --apply` removes exactly
    1, 5, 6 and 7, keeps 2, 3, 4 and 8, the guest and the namespace still read their secrets, and the store's
    bytes fall by exactly what it reported."""
    import subprocess
    import sys

    import yaml

    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    for number in (1, 2):
        store.write_generation(number, secrets_of(number))
        store.link(number)
    share = microvm(store.symlink, state_dir, "rust", "namespace", True)
    tick = start(share)
    assert tick.files == secrets_of(2), tick.text
    store.write_generation(3, secrets_of(3))
    store.link(3)
    namespace = consumers(store.symlink, "container@db.service")
    store.write_generation(4, secrets_of(4))
    store.link(4)
    descriptor_holders(store.generation_path(4))
    for number in range(5, 9):
        store.write_generation(number, secrets_of(number))
        store.link(number)
    assert store.generations() == list(range(1, 9))
    config = {**exporter_config(store, 0, state_dir)}
    path = scratch / "prune.yml"
    path.write_text(yaml.safe_dump(config))
    before = du_figures(store.mountpoint)[1]
    result = subprocess.run([sys.executable, "-m", "sops_nix_exporter", "prune", f"--config.file={path}", "--apply",
                             "--min-age=0", f"--lock-file={scratch / 'prune.lock'}"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert store.generations() == [2, 3, 4, 8], result.stdout
    freed = sum(int(line.split("(")[1].split()[0]) for line in result.stdout.splitlines()
                if line.startswith("  removed "))  # fmt: skip
    assert before - du_figures(store.mountpoint)[1] == freed
    tick = share.next_tick()
    assert tick.files == secrets_of(2), f"the guest still reads its generation:\n{tick.text}"
    assert "db-password" in namespace.listing()
