from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from serving import (  # noqa: E402
    NOBODY,
    Served,
    exporter_env,
    setpriv_prefix,
    start_serving,
    unprivileged_python,
)
from sopsnix import MountUnavailable, SopsStore, mounted  # noqa: E402
from tools import require_tool
import leaks  # noqa: E402

# The fixture host's /proc has root links to / (as the kernel shows a sandboxed process's): never collect there.
collect_ignore = ["fixtures"]


def pytest_configure(config):
    leaks.become_subreaper()


@pytest.fixture(autouse=True)
def no_leaks(request):
    """Fails the test that leaves a descriptor open or a process running (after its own fixtures ended)."""
    descriptors = leaks.descriptors()
    children = set(leaks.children())
    yield
    processes = leaks.leaked_children(children)
    opened = leaks.leaked_descriptors(descriptors)
    problems = []
    if processes:
        problems.append("processes still running (now killed): "
                        + ", ".join(f"{pid} ({name})" for pid, name in sorted(processes.items())))  # fmt: skip
    if opened:
        shown = ", ".join(f"{fd} -> {target}" for fd, target in sorted(opened.items())[:20])
        problems.append(f"{len(opened)} descriptors left open: {shown}")
    if problems:
        pytest.fail(f"{request.node.nodeid} leaked: " + "; ".join(problems), pytrace=False)


def pytest_report_header(config):
    return f"running as uid {os.getuid()}; tests that need root or a missing tool are skipped with the reason"


@pytest.fixture
def require_root():
    if os.geteuid() != 0:
        pytest.skip("needs root to mount ramfs/tmpfs stores")


@pytest.fixture
def scratch():
    """A temporary directory outside any store (for symlinks, configs, sockets)."""
    path = Path(tempfile.mkdtemp(prefix="sopsnix-test-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)



@pytest.fixture
def make_store(require_root, scratch):
    """make_store(fstype="ramfs", name="secrets") -> SopsStore on a fresh mount, removed afterwards."""
    contexts = []

    def make(fstype: str = "ramfs", name: str = "secrets") -> SopsStore:
        context = mounted(fstype)
        try:
            mountpoint = context.__enter__()
        except MountUnavailable as exc:
            pytest.skip(str(exc))
        contexts.append(context)
        return SopsStore(mountpoint, scratch / name)

    yield make
    for context in reversed(contexts):
        context.__exit__(None, None, None)


@pytest.fixture(params=["ramfs", "tmpfs"])
def store(request, make_store) -> SopsStore:
    return make_store(request.param)


def promtool_check_metrics(text: str) -> None:
    promtool = require_tool("promtool", "prometheus")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, f"promtool check metrics failed:\n{result.stdout}{result.stderr}"


@pytest.fixture
def promtool_check():
    return promtool_check_metrics


def _ended_afterwards(start_process, unavailable: tuple[type[Exception], ...], scratch: Path):
    """A fixture's body: start_process(...) with workdir defaulting to scratch, skipping the test with the reason
    when the part cannot start; every process it started is ended by its PID afterwards."""
    started = []

    def start(*args, **kwargs):
        kwargs.setdefault("workdir", scratch)
        try:
            process = start_process(*args, **kwargs)
        except unavailable as exc:
            pytest.skip(str(exc))
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()


@pytest.fixture
def pinners(require_root, scratch):
    """start_pinner(...) from tests/pinning.py; every process it started is ended by its PID afterwards."""
    from pinning import PinnerUnavailable, start_pinner

    yield from _ended_afterwards(start_pinner, (PinnerUnavailable,), scratch)


@pytest.fixture
def shares(require_root, scratch):
    """start_share(...) from tests/pinning.py: the real Rust virtiofsd where it can play the part, else the
    pinner; every process it started is ended by its PID afterwards."""
    from pinning import PinnerUnavailable, start_share
    from virtiofsd import VirtiofsdUnavailable

    yield from _ended_afterwards(start_share, (PinnerUnavailable, VirtiofsdUnavailable), scratch)


@pytest.fixture
def serve(scratch):
    """serve(config or None, *flags, prefix=..., ...) -> Served: the real exporter serving HTTP on loopback,
    stopped by its PID afterwards."""
    started: list[Served] = []

    def start(config: dict | None, *flags: str, **kwargs) -> Served:
        kwargs.setdefault("workdir", scratch)
        served = start_serving(kwargs.pop("workdir"), config, *flags, **kwargs)
        started.append(served)
        return served

    yield start
    for served in reversed(started):
        served.stop()


@pytest.fixture
def as_nobody(require_root):
    """run(*args) runs `python -m sops_nix_exporter ARGS` as nobody with no group and no capability at all."""
    prefix = setpriv_prefix(NOBODY)
    interpreter = unprivileged_python(NOBODY)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*prefix, interpreter, "-m", "sops_nix_exporter", *args], cwd="/", env=exporter_env(),
                              capture_output=True, text=True, timeout=60)  # fmt: skip

    return run
