"""Test support: /proc trees and microvm.nix state directories for the readers to read instead of the host's
(their `proc` and `state_dir` parameters, as node_exporter's --path.procfs).

- The fixture host (tests/fixtures/, its README says what each process is): a committed /proc and state
  directory, and `fixture_stores()`, the two sops-nix stores that host has, as StoreScan values whose
  devices are those its mount tables name.
- `ProcTree`: a small tree written in a test's own directory, for the cases one host cannot show at once.

Nothing here mounts anything or starts a process: any user can run what uses it.
"""

from __future__ import annotations

import os
from pathlib import Path

from sops_nix_exporter.stores.scan import Generation, StoreScan, SymlinkState, Usage

FIXTURES = Path(__file__).parent / "fixtures"
FIXTURE_PROC = FIXTURES / "proc"
FIXTURE_STATE_DIR = FIXTURES / "microvms"

# The devices the fixture's mount tables name: sops-nix's ramfs (0:41, the number recorded from the real Rust
# virtiofsd) and the users' store's ramfs (0:42).
SECRETS_DEVICE = os.makedev(0, 41)
USERS_DEVICE = os.makedev(0, 42)
RUST_VIRTIOFSD = "/nix/store/0k6v6d4zq2y2zg6d7x2x9yq3b5jv4r2c-virtiofsd-1.13.2/bin/virtiofsd"
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"
HOST_MEMORY_BYTES = 8 * 1024**3
LAST_SWITCH = 1700000000.0


def generation(number: int, device: int, files: int = 4) -> Generation:
    """A generation of `files` secrets of one 4 KiB page each (what sops-nix's ramfs gives a small file)."""
    return Generation(number=number, device=device, inode=1000 + number,
                      usage=Usage(files=files, bytes=4096 * files, apparent_bytes=64 * files))  # fmt: skip


def store_scan(mountpoint: str, symlink: str, device: int, numbers: list[int], current: int | None,
               keep_generations: int | None, memory_budget_bytes: int = 1048576) -> StoreScan:  # fmt: skip
    """A listed store on its own ramfs, as scan_store returns it."""
    generations = [generation(n, device) for n in numbers]
    linked = next((g for g in generations if g.number == current), None)
    return StoreScan(
        mountpoint=mountpoint,
        symlink=symlink,
        up=True,
        keep_generations=keep_generations,
        memory_budget_bytes=memory_budget_bytes,
        generations=generations,
        symlink_state=SymlinkState.OK if linked else SymlinkState.DANGLING,
        current=linked,
        last_switch_timestamp=LAST_SWITCH,
        mounts=1,
        fstype="ramfs",
        device=device,
        devices=frozenset([device]),
    )


def fixture_stores() -> list[StoreScan]:
    """The fixture host's stores: /run/secrets.d after three activations with keepGenerations = 2 (generation 1
    pruned, 2 and 3 left, 3 current), and /run/secrets-for-users.d with its one generation."""
    return [
        store_scan("/run/secrets.d", "/run/secrets", SECRETS_DEVICE, [2, 3], current=3, keep_generations=2),
        store_scan("/run/secrets-for-users.d", "/run/secrets-for-users", USERS_DEVICE, [1], current=1,
                   keep_generations=None),  # fmt: skip
    ]


def rust_command(socket: str, source: str, *extra: str) -> list[str]:
    """The command line microvm.nix's virtiofsd-TAG script execs (a sandbox other than the default, and
    --readonly, are extra)."""
    return [RUST_VIRTIOFSD, f"--socket-path={socket}", "--socket-group=kvm", f"--shared-dir={source}",
            "--rlimit-nofile", "1048576", "--thread-pool-size", "2", "--posix-acl", "--xattr", "--cache=auto",
            "--inode-file-handles=prefer", *extra]  # fmt: skip


def read_cmdline(pid: int, proc: Path = FIXTURE_PROC) -> list[str]:
    """A process's command line as the kernel gives it: NUL-terminated arguments."""
    return (proc / str(pid) / "cmdline").read_bytes().decode().split("\0")[:-1]


class ProcTree:
    """A /proc of a few processes, written under `root`. Links are real symlinks: the readers stat() and
    readlink() them as they do the kernel's, so a link meant to resolve must name an existing path."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def __str__(self) -> str:
        return str(self.root)

    def capabilities(self, cap_eff: str) -> None:
        (self.root / "self").mkdir(exist_ok=True)
        (self.root / "self" / "status").write_text(f"Name:\tpython3\nCapInh:\t0000000000000000\nCapEff:\t{cap_eff}\n")

    def process(self, pid: int, argv: list[str], *, ppid: int = 1, comm: str = "virtiofsd", cgroup: str | None = None,
                mountinfo: str | None = "", root: str | Path = "/", cwd: str | Path | None = None,
                fds: dict[int, str | Path] | None = None) -> Path:  # fmt: skip
        """One process's entry. mountinfo None leaves the file out; root "/" is the reader's own root (no
        sandbox, or a namespace sandbox seen without CAP_SYS_PTRACE)."""
        directory = self.root / str(pid)
        directory.mkdir()
        (directory / "comm").write_text(comm + "\n")
        (directory / "cmdline").write_bytes(b"".join(a.encode() + b"\0" for a in argv))
        (directory / "stat").write_text(f"{pid} ({comm}) S {ppid} {pid} {pid} 0 -1 4194560 0 0 0 0 0 0 0 0 20 0 1 0\n")
        if cgroup is not None:
            (directory / "cgroup").write_text(f"0::{cgroup}\n")
        if mountinfo is not None:
            (directory / "mountinfo").write_text(mountinfo)
        os.symlink(root, directory / "root")
        if cwd is not None:
            os.symlink(cwd, directory / "cwd")
        (directory / "fd").mkdir()
        for fd, target in (fds or {}).items():
            os.symlink(target, directory / "fd" / str(fd))
        return directory
