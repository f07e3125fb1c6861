from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import requests
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from sopsnix import MountUnavailable, SopsStore, mounted  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


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


def write_config(directory: Path, data: dict) -> Path:
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def store_config(store: SopsStore, **extra) -> dict:
    return {"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), **extra}


def promtool_check_metrics(text: str) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (Debian package prometheus); run scripts/test")
    result = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert result.returncode == 0, f"promtool check metrics failed:\n{result.stdout}{result.stderr}"


@pytest.fixture
def promtool_check():
    return promtool_check_metrics


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningExporter:
    def __init__(self, process: subprocess.Popen, url: str, stderr_path: Path) -> None:
        self.process = process
        self.url = url
        self.stderr_path = stderr_path

    def metrics(self) -> str:
        response = requests.get(self.url + "/metrics", timeout=30)
        response.raise_for_status()
        return response.text

    def log(self) -> str:
        return self.stderr_path.read_text()

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()


def start_exporter(config_path: Path | None, workdir: Path, *extra: str, port: int | None = None) -> RunningExporter:
    port = port or free_port()
    stderr_path = workdir / f"exporter-{port}.log"
    cmd = [sys.executable, "-m", "exporter", "serve", f"--web.listen-address=127.0.0.1:{port}", *extra]
    if config_path is not None:
        cmd.append(f"--config.file={config_path}")
    stderr = open(stderr_path, "w")
    process = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr)
    stderr.close()
    url = f"http://127.0.0.1:{port}"
    running = RunningExporter(process, url, stderr_path)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exporter exited with {process.returncode}:\n{stderr_path.read_text()}")
        try:
            if requests.get(url + "/healthz", timeout=1).status_code == 200:
                return running
        except requests.ConnectionError:
            time.sleep(0.1)
    running.stop()
    raise AssertionError(f"exporter did not answer on {url}:\n{stderr_path.read_text()}")


@pytest.fixture
def exporter_process(scratch):
    """exporter_process(config_dict or None, *flags) -> RunningExporter, stopped by its PID afterwards."""
    running: list[RunningExporter] = []

    def start(config: dict | None, *extra: str) -> RunningExporter:
        path = write_config(scratch, config) if config is not None else None
        exporter = start_exporter(path, scratch, *extra)
        running.append(exporter)
        return exporter

    yield start
    for exporter in running:
        exporter.stop()


@pytest.fixture
def pinners(require_root, scratch):
    """start_pinner(...) from tests/pinning.py; every process it started is ended by its PID afterwards."""
    from pinning import PinnerUnavailable, start_pinner

    started = []

    def start(*args, **kwargs):
        kwargs.setdefault("workdir", scratch)
        try:
            pinner = start_pinner(*args, **kwargs)
        except PinnerUnavailable as exc:
            pytest.skip(str(exc))
        started.append(pinner)
        return pinner

    yield start
    for pinner in reversed(started):
        pinner.stop()
