"""Test support: the real Rust virtiofsd, the daemon microvm.nix runs, started the way microvm.nix starts it.

scripts/rust-virtiofsd unpacks it from Debian 13 (scripts/test runs it and exports SOPSNIX_RUST_VIRTIOFSD);
where it could not be had, `rust_binary()` raises with the reason and the tests that need it skip.

    daemon = RustVirtiofsd.start(binary, source, socket, cgroup_procs=..., sandbox="chroot")
    daemon.pids()   # the daemon and, in namespace mode, its sandboxed child
    daemon.stop()   # ended by PID
"""

from __future__ import annotations

import grp
import os
import resource
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_BINARY = ROOT / "tests" / "vm" / "cache" / "rust-virtiofsd" / "bin" / "virtiofsd"
READY = "Waiting for vhost-user socket connection"
START_TIMEOUT = 20


class VirtiofsdUnavailable(Exception):
    """The daemon cannot run here; the message says why (the test skips with it)."""


def rust_binary() -> Path:
    configured = os.environ.get("SOPSNIX_RUST_VIRTIOFSD")
    candidate = Path(configured) if configured else DEFAULT_BINARY
    if candidate.is_file() and os.access(candidate, os.X_OK):
        return candidate
    reason = os.environ.get("SOPSNIX_RUST_VIRTIOFSD_UNAVAILABLE")
    if reason:
        raise VirtiofsdUnavailable(f"no Rust virtiofsd: {reason}")
    raise VirtiofsdUnavailable(f"no Rust virtiofsd at {candidate}: run scripts/rust-virtiofsd (scripts/test does)")


def socket_group() -> str:
    """microvm.virtiofsd.group defaults to kvm; a machine without that group gets root's (still a group
    microvm.nix may be configured with), since virtiofsd refuses a group it cannot resolve."""
    try:
        grp.getgrnam("kvm")
        return "kvm"
    except KeyError:
        return "root"


def rlimit_nofile() -> int:
    """microvm.nix passes --rlimit-nofile 1048576 when it runs as root; a machine whose hard limit is lower
    and that cannot raise it (a container without CAP_SYS_RESOURCE) gets its hard limit, which virtiofsd
    would otherwise refuse to start with."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    return 1048576 if hard == resource.RLIM_INFINITY else min(1048576, hard)


def microvm_command_line(binary: Path | str, socket: str, source: str, sandbox: str | None = None,
                         readonly: bool = False, inode_file_handles: str | None = "prefer") -> list[str]:  # fmt: skip
    """The command line microvm.nix's virtiofsd-TAG script execs (nixos-modules/microvm/virtiofsd): its
    defaults (threadPoolSize `nproc`, posixAcl, cache auto, inodeFileHandles prefer, readOnly -> --readonly);
    a sandbox other than the default comes from microvm.virtiofsd.extraArgs."""
    argv = [
        str(binary), f"--socket-path={socket}", f"--socket-group={socket_group()}", f"--shared-dir={source}",
        "--rlimit-nofile", str(rlimit_nofile()), "--thread-pool-size", str(os.cpu_count() or 1), "--posix-acl", "--xattr",
        "--cache=auto",
    ]  # fmt: skip
    if inode_file_handles is not None:
        argv.append(f"--inode-file-handles={inode_file_handles}")
    if readonly:
        argv.append("--readonly")
    if sandbox is not None:
        argv.append(f"--sandbox={sandbox}")
    return argv


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


@dataclass
class RustVirtiofsd:
    process: subprocess.Popen
    argv: list[str]
    socket: Path
    log_path: Path

    @classmethod
    def start(cls, binary: Path, source: str | Path, socket: Path, *, cgroup_procs: Path | None = None,
              sandbox: str | None = None, readonly: bool = False, inode_file_handles: str | None = "prefer",
              cwd: Path | None = None, log_path: Path | None = None) -> RustVirtiofsd:  # fmt: skip
        """Serve `source` on `socket` (relative to cwd when cwd is given, as microvm.nix passes it from the VM's
        state directory); returns once it waits for its VM, with its sandbox in place."""
        cwd = cwd or socket.parent
        socket_arg = socket.name if socket.parent == cwd else str(socket)
        socket.parent.mkdir(parents=True, exist_ok=True)
        for stale in (socket, Path(f"{socket}.pid")):
            if stale.exists():
                stale.unlink()
        argv = microvm_command_line(binary, socket_arg, str(source), sandbox, readonly, inode_file_handles)
        log_path = log_path or socket.parent / f"virtiofsd-{time.monotonic_ns()}.log"
        if cgroup_procs is not None:
            # Join the cgroup before exec: the sandboxed child it forks must start inside it too. The paths
            # are arguments, not spliced into the shell text; exec keeps the PID, so it is ours to end.
            command = ["sh", "-c", 'echo $$ > "$1" && shift && exec "$@"', "sh", str(cgroup_procs), *argv]
        else:
            command = argv
        with open(log_path, "wb") as log:
            process = subprocess.Popen(command, cwd=cwd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                       env={"PATH": "/usr/bin:/bin", "RUST_LOG": "info"})  # fmt: skip
        daemon = cls(process, argv, socket, log_path)
        deadline = time.monotonic() + START_TIMEOUT
        while READY not in daemon.log():
            if process.poll() is not None or time.monotonic() > deadline:
                daemon.stop()
                raise VirtiofsdUnavailable(f"the Rust virtiofsd did not start ({' '.join(argv)}):\n{daemon.log()}")
            time.sleep(0.02)
        return daemon

    @property
    def pid(self) -> int:
        return self.process.pid

    def pids(self) -> list[int]:
        return [self.pid, *_children(self.pid)] if self.process.poll() is None else []

    def children(self) -> list[int]:
        return _children(self.pid) if self.process.poll() is None else []

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL, by PID, only while not yet reaped (after that the PID may be another's).
        The sandboxed child dies with its parent (virtiofsd sets PR_SET_PDEATHSIG on it)."""
        if self.process.poll() is None:
            os.kill(self.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.pid, signal.SIGKILL)
                self.process.wait()
        for leftover in (self.socket, Path(f"{self.socket}.pid")):
            try:
                leftover.unlink()
            except FileNotFoundError:
                pass
