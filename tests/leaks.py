"""Test support: a guard that fails the test which leaks a descriptor or a process, instead of a later test.

Before each test it notes the test process's open descriptors and its child processes; after the test's own
fixtures are torn down it compares. The test process is made a child subreaper, so a process a test started
that outlives its parent (an orphaned sandbox child, a helper of an exporter that was killed) is re-parented
to it and counted too, instead of escaping to init unseen. Children that have ended are reaped here.
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
import time

PR_SET_CHILD_SUBREAPER = 36
# A process that has been sent SIGKILL or SIGTERM by its fixture is gone within milliseconds; this bound only
# keeps a broken teardown from hanging the suite, it is not a speed assumption.
GRACE_SECONDS = 10


def become_subreaper() -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def descriptors() -> dict[int, str]:
    """Open descriptor -> what it refers to, without the one used to list them."""
    listing = f"/proc/{os.getpid()}/fd"
    found = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            continue
        if target != listing:
            found[int(name)] = target
    return found


def children() -> dict[int, tuple[str, str]]:
    """Child PID -> (state, command name), zombies included."""
    me = os.getpid()
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        end = stat.rfind(b")")
        fields = stat[end + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == me:
            found[int(entry)] = (fields[0].decode(), stat[stat.find(b"(") + 1 : end].decode(errors="replace"))
    return found


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def leaked_children(before: set[int]) -> dict[int, str]:
    """The children started since `before` that are still running after the grace period; ended ones are
    reaped. Those still running are then killed by PID so they cannot disturb later tests."""
    deadline = time.monotonic() + GRACE_SECONDS
    while True:
        running = {}
        for pid, (state, name) in children().items():
            if pid in before:
                continue
            if state in ("Z", "X"):
                _reap(pid)
            else:
                running[pid] = name
        if not running or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for pid in running:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for pid in running:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    return running


def leaked_descriptors(before: dict[int, str]) -> dict[int, str]:
    """Descriptors opened since `before` and still held. Objects nothing refers to any more are collected
    first, so that what is reported does not depend on when the garbage collector last ran."""
    gc.collect()
    after = descriptors()
    return {fd: target for fd, target in after.items() if before.get(fd) != target}
