"""A real QEMU guest reading a share served by a real virtiofsd, and what it prints on its console.

    kernel = fetch_kernel()                                   # tests/vm/kernel.py
    initramfs = build_initramfs(kernel, workdir / "initramfs.cpio")
    accelerator = probe_accelerator(kernel, initramfs, workdir)   # "kvm" or "tcg"
    share = MicrovmShare(kernel, initramfs, accelerator, state_dir, "vm1", "secrets", symlink, workdir,
                         daemon="rust", sandbox="chroot")   # or daemon="c" (QEMU's), sandbox namespace/none
    tick = share.start()       # virtiofsd, then the guest; its first complete console tick
    tick.files                 # {"db-password": "...", ...} as the guest read them
    tick = share.next_tick()   # the first tick the guest begins after this call
    share.stop(); share.start()    # restart the VM and its virtiofsd
    share.close()

The virtiofsd runs the way microvm.nix runs it, as far as the exporter can tell: from STATE_DIR/VM with
the relative socket path VM-virtiofs-TAG.sock, the share declared in STATE_DIR/VM/booted/share/microvm/
virtiofs/TAG/{source,socket}, and its processes in a cgroup named microvm-virtiofsd@VM.service. The Rust
virtiofsd (microvm.nix's) gets microvm.nix's command line (tests/virtiofsd.py) and runs in the host's mount
namespace, as under microvm-virtiofsd@VM; it writes its pid file beside its socket. QEMU's C virtiofsd runs
in a private mount namespace with a temporary directory bound over /run, so the pid file it writes under
/run/virtiofsd/ never reaches the real /run.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from pinning import cgroup2_root, declare_share
from virtiofsd import RustVirtiofsd, VirtiofsdUnavailable, rust_binary
from vm.kernel import Kernel

HERE = Path(__file__).resolve().parent
VIRTIOFSD = Path("/usr/lib/qemu/virtiofsd")
QEMU = "qemu-system-x86_64"
BUSYBOX = Path("/bin/busybox")

BOOT_TIMEOUT = 180  # seconds until the first tick; TCG on a busy 2-core machine is slow
KVM_PROBE_TIMEOUT = 30  # a KVM guest that has not booted by then is stuck (broken nested virtualisation)
TICK_TIMEOUT = 30  # seconds for one more tick once the guest runs


class GuestUnavailable(Exception):
    """QEMU or virtiofsd cannot run here; the message says why (the test skips with it)."""


def build_initramfs(kernel: Kernel, target: Path) -> Path:
    """An uncompressed newc cpio: busybox, init.sh as /init, and the kernel's virtio/virtiofs modules."""
    if not BUSYBOX.exists():
        raise GuestUnavailable(f"{BUSYBOX} missing (Debian package busybox-static)")
    if shutil.which("cpio") is None:
        raise GuestUnavailable("cpio is not installed (Debian package cpio)")
    with tempfile.TemporaryDirectory(prefix="initramfs-") as scratch:
        root = Path(scratch)
        (root / "bin").mkdir()
        shutil.copy(BUSYBOX, root / "bin" / "busybox")
        shutil.copy(HERE / "init.sh", root / "init")
        (root / "init").chmod(0o755)
        (root / "modules").mkdir()
        for module in kernel.modules:
            shutil.copy(module, root / "modules" / module.name)
        (root / "modules" / "load-order").write_text("\n".join(m.name for m in kernel.modules) + "\n")
        names = subprocess.run(["find", ".", "-mindepth", "1"], cwd=root, capture_output=True, check=True).stdout
        with open(target, "wb") as out:
            subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=root, input=names,
                           stdout=out, check=True)  # fmt: skip
    return target


def _end(process: subprocess.Popen, timeout: float = 10) -> None:
    """End a process we started, by its PID: SIGTERM, then SIGKILL."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


class Cgroup:
    """A real cgroup v2 directory SLICE/microvm-virtiofsd@VM.service, as systemd names microvm.nix's units."""

    def __init__(self, slice_dir: Path, service_dir: Path) -> None:
        self.slice_dir = slice_dir
        self.path = service_dir

    @classmethod
    def create(cls, vm: str) -> Cgroup:
        root = cgroup2_root()
        if root is None:
            raise GuestUnavailable("no cgroup v2 hierarchy is mounted")
        slice_dir = root / f"sopsnix-test-{secrets.token_hex(4)}.slice"
        try:
            slice_dir.mkdir()
            service_dir = slice_dir / f"microvm-virtiofsd@{vm}.service"
            service_dir.mkdir()
        except OSError as exc:
            try:
                slice_dir.rmdir()
            except OSError:
                pass
            raise GuestUnavailable(f"cannot create a cgroup under {root}: {exc}") from None
        return cls(slice_dir, service_dir)

    def pids(self) -> list[int]:
        try:
            return [int(p) for p in (self.path / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return []

    def remove(self) -> None:
        """Remove both directories once the processes in them have ended (they are ended by PID before)."""
        deadline = time.monotonic() + 10
        while self.pids() and time.monotonic() < deadline:
            time.sleep(0.1)
        for directory in (self.path, self.slice_dir):
            try:
                directory.rmdir()
            except FileNotFoundError:
                pass

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


@dataclass
class Virtiofsd:
    """QEMU's C virtiofsd serving `source` (a symlink, resolved once at start) on a vhost-user socket."""

    process: subprocess.Popen
    socket: Path
    source: Path
    log_path: Path
    run_dir: Path

    @classmethod
    def start(cls, source: Path, socket: Path, cgroup: Cgroup, workdir: Path) -> Virtiofsd:
        """Serve `source` on `socket`, run from the socket's directory with a relative --socket-path, as
        microvm.nix runs it from the VM's state directory."""
        if not VIRTIOFSD.exists():
            raise GuestUnavailable(f"{VIRTIOFSD} missing (Debian package qemu-system-common)")
        if shutil.which("unshare") is None:
            raise GuestUnavailable("unshare is not installed (Debian package util-linux)")
        socket.parent.mkdir(parents=True, exist_ok=True)
        if socket.exists():
            socket.unlink()
        run_dir = Path(tempfile.mkdtemp(prefix="virtiofsd-run-", dir=workdir))
        (run_dir / "virtiofsd").mkdir()
        log_path = workdir / f"virtiofsd-{time.monotonic_ns()}.log"
        # Join the cgroup before exec: virtiofsd forks its sandboxed child, which must start inside it too.
        # The paths are passed as arguments, not spliced into the shell text.
        script = 'echo $$ > "$1" && mount --bind "$2" /run && shift 2 && exec "$@"'
        cmd = [
            "unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh",
            str(cgroup.path / "cgroup.procs"), str(run_dir),
            str(VIRTIOFSD), f"--socket-path={socket.name}", "-o", f"source={source}/", "-o", "cache=none",
        ]  # fmt: skip
        with open(log_path, "w") as log:
            process = subprocess.Popen(
                cmd, cwd=socket.parent, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        daemon = cls(process, socket, source, log_path, run_dir)
        deadline = time.monotonic() + 20
        while not socket.exists():
            if process.poll() is not None or time.monotonic() > deadline:
                daemon.stop()
                raise GuestUnavailable(f"virtiofsd did not open its socket:\n{log_path.read_text()}")
            time.sleep(0.05)
        return daemon

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        # The sandboxed child dies with its parent (virtiofsd sets PR_SET_PDEATHSIG on it).
        _end(self.process)
        shutil.rmtree(self.run_dir, ignore_errors=True)
        if self.socket.exists():
            self.socket.unlink()

    def log(self) -> str:
        return self.log_path.read_text()


def start_rust(source: Path, socket: Path, cgroup: Cgroup, workdir: Path, sandbox: str,
               readonly: bool = False) -> RustVirtiofsd:  # fmt: skip
    """The Rust virtiofsd with microvm.nix's command line, run from the socket's directory (the VM's state
    directory) in the share's cgroup; namespace, its default, stays implicit as microvm.nix leaves it."""
    try:
        return RustVirtiofsd.start(
            rust_binary(), source, socket, cwd=socket.parent, cgroup_procs=cgroup.path / "cgroup.procs",
            sandbox=None if sandbox == "namespace" else sandbox, readonly=readonly,
            log_path=workdir / f"virtiofsd-{time.monotonic_ns()}.log",
        )  # fmt: skip
    except VirtiofsdUnavailable as exc:
        raise GuestUnavailable(str(exc)) from None


TICK = re.compile(r"^@@tick (\d+) begin\n(.*?)^@@tick \1 end$", re.S | re.M)


@dataclass
class Tick:
    """One second of the guest's view of its share, parsed from the console."""

    number: int
    listing: list[str]  # names `ls -la` shows in the mount, without . and ..
    files: dict[str, str]  # relative path -> content, as `cat` printed it
    stat: str  # `stat` of the mount point
    text: str = field(repr=False)  # the tick as printed, for the docs and for failure messages

    @property
    def links(self) -> int:
        return int(re.search(r"Links: (\d+)", self.stat).group(1))

    @classmethod
    def parse(cls, number: int, body: str) -> Tick:
        sections: dict[str, list[str]] = {}
        files: dict[str, list[str]] = {}
        current: list[str] = []
        for line in body.splitlines():
            if line.startswith("@@file "):
                current = files.setdefault(line.removeprefix("@@file "), [])
            elif line.startswith("@@"):
                current = sections.setdefault(line[2:], [])
            else:
                current.append(line)
        listing = [
            line.split()[-1] for line in sections.get("ls", [])
            if not line.startswith("total") and line.split() and line.split()[-1] not in (".", "..")
        ]  # fmt: skip
        text = f"@@tick {number} begin\n{body}@@tick {number} end"
        return cls(
            number=number,
            listing=listing,
            files={name: "\n".join(lines).rstrip("\n") for name, lines in files.items()},
            stat="\n".join(sections.get("stat", [])),
            text=text,
        )


class Guest:
    """qemu-system-x86_64 with vhost-user-fs-pci; its serial console goes to a file that ticks are read from."""

    def __init__(self, process: subprocess.Popen, console_path: Path, accelerator: str) -> None:
        self.process = process
        self.console_path = console_path
        self.accelerator = accelerator

    @staticmethod
    def command(kernel: Kernel, initramfs: Path, accelerator: str, append: str, extra: list[str]) -> list[str]:
        cpu = "host" if accelerator == "kvm" else "max"
        return [
            QEMU, "-machine", f"q35,accel={accelerator}", "-cpu", cpu, "-smp", "1", "-m", "256M",
            "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-numa", "node,memdev=mem",
            "-nodefaults", "-nographic", "-serial", "stdio", "-no-reboot",
            "-kernel", str(kernel.vmlinuz), "-initrd", str(initramfs),
            "-append", f"console=ttyS0 quiet loglevel=1 panic=-1 {append}", *extra,
        ]  # fmt: skip

    @classmethod
    def boot(cls, kernel: Kernel, initramfs: Path, socket: Path, tag: str, workdir: Path, accelerator: str) -> Guest:
        if shutil.which(QEMU) is None:
            raise GuestUnavailable(f"{QEMU} is not installed (Debian package qemu-system-x86)")
        console_path = workdir / f"console-{time.monotonic_ns()}.log"
        extra = ["-chardev", f"socket,id=fs0,path={socket}", "-device", f"vhost-user-fs-pci,chardev=fs0,tag={tag}"]
        cmd = cls.command(kernel, initramfs, accelerator, f"sopsnix.tag={tag}", extra)
        with open(console_path, "wb") as console:
            process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT)
        guest = cls(process, console_path, accelerator)
        try:
            guest.wait_for(lambda: "@@mount" in guest.console(), BOOT_TIMEOUT, "the guest to mount its share")
            if "@@mounted" not in guest.console():
                raise AssertionError(f"the guest could not mount its share:\n{guest.console()[-3000:]}")
        except BaseException:
            guest.stop()
            raise
        return guest

    def console(self) -> str:
        return self.console_path.read_bytes().decode(errors="replace").replace("\r\n", "\n")

    def ticks(self) -> list[Tick]:
        return [Tick.parse(int(m.group(1)), m.group(2)) for m in TICK.finditer(self.console())]

    def begun(self) -> int:
        """The number of the last tick the guest has begun printing (0 before the first)."""
        numbers = re.findall(r"^@@tick (\d+) begin$", self.console(), re.M)
        return int(numbers[-1]) if numbers else 0

    def wait_for(self, condition, timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                code = self.process.returncode
                raise AssertionError(f"QEMU exited ({code}) waiting for {what}:\n{self.console()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}:\n{self.console()[-3000:]}")
            time.sleep(0.05)

    def next_tick(self, timeout: float = TICK_TIMEOUT) -> Tick:
        """The first tick the guest begins after this call, once complete: it saw everything done before."""
        wanted = self.begun() + 1
        found: list[Tick] = []

        def complete() -> bool:
            found[:] = [t for t in self.ticks() if t.number == wanted]
            return bool(found)

        self.wait_for(complete, timeout, f"guest tick {wanted}")
        return found[0]

    def stop(self) -> None:
        _end(self.process)


def probe_accelerator(kernel: Kernel, initramfs: Path, workdir: Path) -> str:
    """"kvm" if a KVM guest really boots here (not only opens /dev/kvm), else "tcg"; raises if neither boots."""
    failures = []
    candidates = ["kvm", "tcg"] if os.access("/dev/kvm", os.R_OK | os.W_OK) else ["tcg"]
    for accelerator in candidates:
        cmd = Guest.command(kernel, initramfs, accelerator, "sopsnix.probe=1", [])
        try:
            timeout = KVM_PROBE_TIMEOUT if accelerator == "kvm" else BOOT_TIMEOUT
            result = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        except FileNotFoundError:
            raise GuestUnavailable(f"{QEMU} is not installed (Debian package qemu-system-x86)") from None
        except subprocess.TimeoutExpired:
            failures.append(f"{accelerator}: no boot within {timeout} s")
            continue
        output = result.stdout.decode(errors="replace") + result.stderr.decode(errors="replace")
        if "@@probe ok" in output:
            return accelerator
        failures.append(f"{accelerator}: exit {result.returncode}: {output.strip()[-500:]}")
    raise GuestUnavailable("QEMU boots no guest here: " + "; ".join(failures))


class MicrovmShare:
    """One VM reading one share, laid out as microvm.nix lays it out: the share declared in the VM's state
    directory, its virtiofsd in microvm-virtiofsd@VM.service with its socket beside the declaration, and
    the guest on that socket. start(), stop() and start() again is a restart of the VM and its virtiofsd."""

    def __init__(self, kernel: Kernel, initramfs: Path, accelerator: str, state_dir: Path, vm: str, tag: str,
                 source: Path, workdir: Path, daemon: str = "c", sandbox: str = "namespace",
                 readonly: bool = False) -> None:  # fmt: skip
        if daemon == "c" and (sandbox != "namespace" or readonly):
            raise ValueError("the C virtiofsd runs here in its namespace sandbox, read-write")
        self.daemon_kind = daemon
        self.sandbox = sandbox
        self.readonly = readonly
        self.kernel = kernel
        self.initramfs = initramfs
        self.accelerator = accelerator
        self.vm = vm
        self.tag = tag
        self.source = source
        self.workdir = workdir
        self.socket = state_dir / vm / f"{vm}-virtiofs-{tag}.sock"
        self.cgroup = Cgroup.create(vm)
        self.daemon: Virtiofsd | RustVirtiofsd | None = None
        self.guest: Guest | None = None
        declare_share(state_dir, vm, tag, source, socket=self.socket.name)

    def start(self) -> Tick:
        """Start virtiofsd and boot the guest; returns the guest's first complete tick."""
        if self.daemon_kind == "rust":
            self.daemon = start_rust(self.source, self.socket, self.cgroup, self.workdir, self.sandbox, self.readonly)
        else:
            self.daemon = Virtiofsd.start(self.source, self.socket, self.cgroup, self.workdir)
        self.guest = Guest.boot(self.kernel, self.initramfs, self.socket, self.tag, self.workdir, self.accelerator)
        return self.guest.next_tick()

    def next_tick(self) -> Tick:
        assert self.guest is not None, "the guest is not running"
        return self.guest.next_tick()

    def describe(self) -> str:
        """The daemon as the docs and failure messages name it."""
        if self.daemon_kind == "c":
            return "QEMU's C virtiofsd, namespace sandbox"
        return f"the Rust virtiofsd, {self.sandbox} sandbox" + (", --readonly" if self.readonly else "")

    def host_view(self) -> list[str]:
        """What the kernel says each virtiofsd process of the share holds, for the transcript: its root (a
        chroot, or the generation a namespace sandbox pivoted into, "/1//deleted" once pruned) and the
        directories it holds open (an unsandboxed daemon)."""
        lines = []
        for pid in self.cgroup.pids():
            try:
                mounts = Path(f"/proc/{pid}/mountinfo").read_text().splitlines()
                root = os.readlink(f"/proc/{pid}/root")
                held = []
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        target = os.readlink(f"/proc/{pid}/fd/{fd}")
                        path = f"/proc/{pid}/fd/{fd}"
                        if target.startswith("/") and not target.startswith("/proc/") and os.path.isdir(path):
                            held.append(target)
                    except OSError:
                        continue
            except OSError:
                continue
            # Mount points are shown relative to the process's root: a chroot's may have none at "/".
            roots = [line.split()[3] for line in mounts if line.split()[4] == "/"]
            top = roots[-1] if roots else "(no mount at its root)"
            directories = ", ".join(sorted(set(held))) or "none"
            lines.append(f"virtiofsd pid {pid}: /proc/{pid}/root -> {root}; mountinfo root {top}; "
                         f"open directories: {directories}")  # fmt: skip
        return lines

    def stop(self) -> None:
        if self.guest is not None:
            self.guest.stop()
            self.guest = None
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    def close(self) -> None:
        try:
            self.stop()
        finally:
            self.cgroup.remove()
