"""Test support: real processes that serve a generation the way each virtiofsd sandbox mode does.

`start_share` runs the real Rust virtiofsd wherever it can play the part: in its namespace and chroot
sandboxes it resolves and pins the shared directory at start, before any VM connects. The rest is played by
the pinner (support/pinner.c): an unsandboxed daemon pins nothing until a guest connects (the real one is
proven with a real guest in test_vm_e2e.py), and neither daemon can exit after a chosen number of
milliseconds or carry a garbage command line. The pinner is compiled once into a file named `virtiofsd`, so
the kernel gives it the command name the exporter looks for; it carries a real Rust or C virtiofsd command
line. Both are placed in a real cgroup named like microvm.nix's unit, and can be declared the way
microvm.nix declares its shares.
"""

from __future__ import annotations

import atexit
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from virtiofsd import RustVirtiofsd, microvm_command_line, rust_binary

SUPPORT = Path(__file__).parent / "support"
RUST_VIRTIOFSD = "/nix/store/0k6v6d4zq2y2zg6d7x2x9yq3b5jv4r2c-virtiofsd-1.13.2/bin/virtiofsd"
# The modes in which the real Rust virtiofsd pins its shared directory at start, with no VM connected.
REAL_RUST_MODES = ("namespace", "chroot")
C_VIRTIOFSD = "/usr/lib/qemu/virtiofsd"


class PinnerUnavailable(Exception):
    pass


_binary: Path | None = None


def pinner_binary() -> Path:
    """Compile the pinner once per test session."""
    global _binary
    if _binary is not None and _binary.exists():
        return _binary
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise PinnerUnavailable("no C compiler (Debian package gcc) to build the pinning process")
    directory = Path(tempfile.mkdtemp(prefix="sopsnix-pinner-"))
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    os.chmod(directory, 0o755)
    binary = directory / "virtiofsd"
    result = subprocess.run([cc, "-O1", "-Wall", "-o", str(binary), str(SUPPORT / "pinner.c")], capture_output=True)
    if result.returncode != 0:
        raise PinnerUnavailable(f"cannot compile the pinner: {result.stderr.decode(errors='replace')}")
    _binary = binary
    return binary


def cgroup2_root() -> Path | None:
    """A writable cgroup v2 hierarchy: /sys/fs/cgroup on pure v2 hosts, /sys/fs/cgroup/unified on hybrid ones."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2" and os.access(fields[4], os.W_OK):
            return Path(fields[4])
    return None


def socket_name(vm: str, tag: str) -> str:
    """microvm.nix names each share's socket HOSTNAME-virtiofs-TAG.sock."""
    return f"{vm}-virtiofs-{tag}.sock"


def declare_share(state_dir: Path, vm: str, tag: str, source: str | Path, socket: str | None = None,
                  generation: str = "booted") -> Path:  # fmt: skip
    """Write a share the way microvm.nix's runner does: share/microvm/virtiofs/TAG/{socket,source}."""
    directory = state_dir / vm / generation / "share" / "microvm" / "virtiofs" / tag
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "socket").write_text(f"{socket or socket_name(vm, tag)}\n")
    (directory / "source").write_text(f"{source}\n")
    return directory


def command_line(syntax: str, mode: str, source: str, socket: str, space_form: bool = False) -> list[str]:
    if syntax == "rust":
        # namespace is the default; leave it implicit as microvm.nix does (another comes from extraArgs)
        argv = microvm_command_line(RUST_VIRTIOFSD, socket, source, sandbox=None if mode == "namespace" else mode)
        if space_form:
            shared = argv.index(f"--shared-dir={source}")
            argv[shared : shared + 1] = ["--shared-dir", source]
        return argv
    if syntax == "c":
        if mode not in ("namespace", "chroot"):
            raise ValueError("QEMU's C virtiofsd knows only the namespace and chroot sandboxes")
        return [C_VIRTIOFSD, f"--socket-path={socket}", "-o", f"source={source}", "-o", "cache=auto",
                "-o", f"sandbox={mode}"]  # fmt: skip
    raise ValueError(f"unknown syntax {syntax}")


@dataclass
class Pinner:
    process: subprocess.Popen
    argv: list[str]
    cgroup: Path | None = None
    extra_cgroup_dirs: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.process.pid

    def children(self) -> list[int]:
        try:
            text = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in text.split()]

    def stop(self) -> None:
        # Once reaped, the PID may belong to someone else: signal only a process we have not waited for.
        # (A sandboxed child dies with its parent: the pinner sets PR_SET_PDEATHSIG.)
        if self.process.poll() is None:
            for pid in [*self.children(), self.pid]:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        remove_cgroup([self.cgroup] if self.cgroup else [], self.extra_cgroup_dirs)


@dataclass
class RealVirtiofsd:
    """The real Rust virtiofsd serving one share, in its cgroup; the same interface as Pinner."""

    daemon: RustVirtiofsd
    cgroup: Path | None = None
    extra_cgroup_dirs: list[Path] = field(default_factory=list)

    @property
    def pid(self) -> int:
        return self.daemon.pid

    @property
    def argv(self) -> list[str]:
        return self.daemon.argv

    def children(self) -> list[int]:
        return self.daemon.children()

    def stop(self) -> None:
        self.daemon.stop()
        remove_cgroup([self.cgroup] if self.cgroup else [], self.extra_cgroup_dirs)


def make_cgroup(vm: str) -> tuple[Path, Path] | None:
    """(unit, slice): SLICE/microvm-virtiofsd@VM.service in a fresh test slice, or None without cgroup v2."""
    return make_unit_cgroup(f"microvm-virtiofsd@{vm}.service")


def make_unit_cgroup(unit: str) -> tuple[Path, Path] | None:
    """(unit, slice): SLICE/UNIT in a fresh test slice, as systemd names a unit's cgroup; None without cgroup v2."""
    root = cgroup2_root()
    if root is None:
        return None
    slice_dir = root / f"sopsnix-test-{secrets.token_hex(4)}.slice"
    unit_dir = slice_dir / unit
    unit_dir.mkdir(parents=True)
    return unit_dir, slice_dir


def remove_cgroup(units: list[Path], slices: list[Path]) -> None:
    deadline = time.monotonic() + 5
    for directory in units + slices:
        while True:
            try:
                directory.rmdir()
                break
            except FileNotFoundError:
                break
            except OSError:  # the killed sandbox child may take a moment to leave the cgroup
                if time.monotonic() > deadline:
                    break
                time.sleep(0.05)


def start_pinner(
    workdir: Path,
    source: str | Path,
    mode: str = "namespace",
    syntax: str = "rust",
    vm: str = "vm1",
    tag: str = "secrets",
    state_dir: Path | None = None,
    declare: bool = True,
    cgroup: bool = True,
    space_form: bool = False,
    exit_after_ms: int | None = None,
    argv: list[str] | None = None,
) -> Pinner:
    """argv overrides the whole command line (garbage, truncated)."""
    binary = pinner_binary()
    source = str(source)
    if state_dir is not None:
        cwd = state_dir / vm
        cwd.mkdir(parents=True, exist_ok=True)
        socket = socket_name(vm, tag)  # relative to the VM's state directory, as microvm.nix passes it
        if declare:
            declare_share(state_dir, vm, tag, source)
    else:
        cwd = workdir
        socket = str(workdir / socket_name(vm, tag))
    argv = argv or command_line(syntax, mode, source, socket, space_form)
    env = {"PIN_MODE": mode, "PIN_SOURCE": source, "PATH": "/usr/bin:/bin"}
    if exit_after_ms is not None:
        env["PIN_EXIT_MS"] = str(exit_after_ms)
    process = subprocess.Popen(
        argv, executable=str(binary), cwd=cwd, env=env,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    pinner = Pinner(process=process, argv=argv)
    try:
        dirs = make_cgroup(vm) if cgroup else None
        if dirs is not None:
            pinner.cgroup, slice_dir = dirs
            pinner.extra_cgroup_dirs.append(slice_dir)
            (pinner.cgroup / "cgroup.procs").write_text(str(process.pid))
        assert process.stdin is not None and process.stdout is not None
        process.stdin.write(b"g")
        process.stdin.flush()
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            ready = selector.select(10)
        line = process.stdout.readline() if ready else b""
        if line != b"ready\n":
            stderr = process.stderr.read1(4096) if process.poll() is not None and process.stderr else b""
            raise PinnerUnavailable(f"the pinner did not pin {source} ({mode}): {stderr.decode(errors='replace')}")
    except BaseException:
        pinner.stop()
        raise
    return pinner


def start_share(
    workdir: Path,
    source: str | Path,
    mode: str = "namespace",
    syntax: str = "rust",
    vm: str = "vm1",
    tag: str = "secrets",
    state_dir: Path | None = None,
    declare: bool = True,
    cgroup: bool = True,
    readonly: bool = False,
    real: bool | None = None,
) -> Pinner | RealVirtiofsd:
    """A virtiofsd serving `source` for VM's share TAG: the real Rust daemon for the Rust syntax in the modes
    where it pins at start, or wherever `real` asks for it (raises VirtiofsdUnavailable where it cannot be
    had), else the pinner."""
    if real is None:
        real = syntax == "rust" and mode in REAL_RUST_MODES
    if not real:
        if readonly:
            raise ValueError("the pinner plays no --readonly share; use the real Rust virtiofsd")
        return start_pinner(workdir, source, mode=mode, syntax=syntax, vm=vm, tag=tag, state_dir=state_dir,
                            declare=declare, cgroup=cgroup)  # fmt: skip
    binary = rust_binary()
    source = str(source)
    if state_dir is not None:
        cwd = state_dir / vm
        cwd.mkdir(parents=True, exist_ok=True)
        if declare:
            declare_share(state_dir, vm, tag, source)
    else:
        cwd = workdir
    dirs = make_cgroup(vm) if cgroup else None
    unit, slices = (dirs[0], [dirs[1]]) if dirs else (None, [])
    try:
        daemon = RustVirtiofsd.start(
            binary, source, cwd / socket_name(vm, tag), cwd=cwd, sandbox=None if mode == "namespace" else mode,
            cgroup_procs=unit / "cgroup.procs" if unit else None, readonly=readonly,
            log_path=workdir / f"virtiofsd-{vm}-{tag}-{time.monotonic_ns()}.log",
        )  # fmt: skip
    except BaseException:
        remove_cgroup([unit] if unit else [], slices)
        raise
    return RealVirtiofsd(daemon=daemon, cgroup=unit, extra_cgroup_dirs=slices)
