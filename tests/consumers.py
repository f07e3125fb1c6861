"""Test support: consumers, processes in a mount namespace of their own holding a bind mount of a store's symlink
(as a NixOS container's bindMounts, systemd-nspawn --bind-ro, docker -v or BindReadOnlyPaths= do), in a cgroup
named as systemd names the unit; a process inside lists the mount on request, so a test sees what it sees."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from pinning import make_unit_cgroup, remove_cgroup
from tools import require_tool

# In its own mount namespace: bind the symlink (mount(2) follows it: the generation it names now) on a
# directory, then answer each line on stdin with a listing of that directory. The paths are arguments.
INSIDE = '''
mount --bind "$1" "$2" || exit 1
echo ready
while read -r _; do ls -A "$2"; echo @@end; done
'''


class Consumer:
    """A process in a mount namespace of its own holding a bind mount of `source`, in cgroup UNIT (or none)."""

    def __init__(self, source: Path, target: Path, unit: str | None) -> None:
        unshare = require_tool("unshare", "util-linux")
        target.mkdir(parents=True, exist_ok=True)
        self.dirs = make_unit_cgroup(unit) if unit else None
        join = f'echo $$ > "{self.dirs[0] / "cgroup.procs"}" && ' if self.dirs else ""
        # Join the cgroup, then become the namespace's process (exec keeps the PID: ours to end).
        command = ["sh", "-c", join + 'exec "$@"', "sh", unshare, "-m", "--propagation", "private",
                   "sh", "-c", INSIDE, "consumer", str(source), str(target)]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._buffer = b""
        line = self._line(10)
        if line != b"ready\n":
            self.stop()
            pytest.skip(f"cannot bind-mount in a new mount namespace here: {line!r}")

    def _line(self, timeout: float) -> bytes:
        """The next line the process wrote, b"" after timeout. Read raw into a buffer of our own: a buffered
        readline() may take several lines at once, and the selector would then wait for what already came."""
        assert self.process.stdout is not None
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                if not selector.select(timeout):
                    return b""
                chunk = os.read(fd, 4096)
                if not chunk:
                    return b""
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line + b"\n"

    def listing(self) -> list[str]:
        """What the process inside sees in its mount, now."""
        assert self.process.stdin is not None
        self.process.stdin.write(b"\n")
        self.process.stdin.flush()
        names = []
        while (line := self._line(10)) not in (b"@@end\n", b""):
            names.append(line.decode().rstrip("\n"))
        return names

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        for pipe in (self.process.stdin, self.process.stdout, self.process.stderr):
            if pipe is not None:
                pipe.close()
        if self.dirs:
            remove_cgroup([self.dirs[0]], [self.dirs[1]])


@pytest.fixture
def consumers(require_root, scratch):
    """consumers(source, unit=None) starts a Consumer; every one is ended by its PID at the end of the test."""
    started: list[Consumer] = []

    def start(source: Path, unit: str | None = None) -> Consumer:
        consumer = Consumer(source, scratch / f"consumer-target-{len(started)}", unit)
        started.append(consumer)
        return consumer

    yield start
    for consumer in reversed(started):
        consumer.stop()


# A process that holds an O_PATH descriptor of a directory (what an unsandboxed reader keeps), until stdin closes.
HOLD_DESCRIPTOR = "import os, sys; os.open(sys.argv[1], os.O_PATH); print('held', flush=True); sys.stdin.read()"


@pytest.fixture
def descriptor_holders(require_root):
    """hold(path) starts a process holding an O_PATH descriptor of path; each is ended by its PID afterwards."""
    started = []

    def hold(path) -> subprocess.Popen:
        process = subprocess.Popen([sys.executable, "-c", HOLD_DESCRIPTOR, str(path)], stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE)  # fmt: skip
        assert process.stdout.readline() == b"held\n"
        started.append(process)
        return process

    yield hold
    for process in started:
        process.kill()
        process.wait()
        process.stdin.close()
        process.stdout.close()
