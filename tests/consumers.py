"""Consumers for tests that need one: a process in a mount namespace of its own holding a bind mount of a store's
symlink (as a NixOS container's bindMounts, systemd-nspawn --bind-ro, docker -v or BindReadOnlyPaths= do), in a
cgroup named as systemd names the unit. The minimal part of tests/test_consumers.py's Reader, for test files that
may not import from another test file."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
from pathlib import Path

import pytest

from pinning import make_unit_cgroup, remove_cgroup
from tools import require_tool

# In its own mount namespace: bind the symlink (mount(2) follows it: the generation it names now) on a
# directory, say so, then wait for stdin to close. The paths are arguments.
INSIDE = '''
mount --bind "$1" "$2" || exit 1
echo ready
read -r _
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
        assert self.process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(self.process.stdout, selectors.EVENT_READ)
            line = self.process.stdout.readline() if selector.select(10) else b""
        if line != b"ready\n":
            self.stop()
            pytest.skip(f"cannot bind-mount in a new mount namespace here: {line!r}")

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
    """consumers(source, unit=None) starts a Consumer; every one is stopped at the end of the test."""
    started: list[Consumer] = []

    def start(source: Path, unit: str | None = None) -> Consumer:
        consumer = Consumer(source, scratch / f"consumer-target-{len(started)}", unit)
        started.append(consumer)
        return consumer

    yield start
    for consumer in reversed(started):
        consumer.stop()
