"""Test support: the real exporter as a process serving HTTP(S), optionally behind setpriv or strace, and an
interpreter an unprivileged user can run it with."""

from __future__ import annotations

import atexit
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NOBODY = 65534


KEYS_GID = 64999  # sops-nix's `keys` group; its number does not matter, only membership does


def site_packages() -> list[str]:
    return [p for p in sys.path if p.endswith("site-packages") and Path(p).is_dir()]


_import_root: Path | None = None


def import_root() -> Path:
    """A directory in which `sops_nix_exporter` is this checkout's exporter/ (a symlink, as the installed
    package maps it), for interpreters that do not run the venv's editable-install hook: another user's
    Python, or one given the venv's site-packages on PYTHONPATH, where .pth files are not read. Open to every
    user, removed when the test session ends."""
    global _import_root
    if _import_root is None:
        _import_root = Path(tempfile.mkdtemp(prefix="sopsnix-import-"))
        _import_root.chmod(0o755)
        (_import_root / "sops_nix_exporter").symlink_to(ROOT / "exporter")
        atexit.register(shutil.rmtree, _import_root, ignore_errors=True)
    return _import_root


def exporter_env() -> dict[str, str]:
    return {"PYTHONPATH": ":".join([str(import_root()), *site_packages()]), "PATH": "/usr/bin:/bin"}


_interpreters: dict[int, str] = {}


def unprivileged_python(uid: int = NOBODY) -> str:
    """An interpreter the user uid may run, with the exporter and its dependencies importable (the approach
    of tests/test_shares.py): the venv's own if its directories are open to that user, else the system's."""
    if uid in _interpreters:
        return _interpreters[uid]
    for interpreter in (os.path.realpath(sys.executable), "/usr/bin/python3"):
        probe = subprocess.run(
            ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups", interpreter, "-c",
             "import sops_nix_exporter.cli, sops_nix_exporter.http.webconfig"],
            env=exporter_env(), capture_output=True, cwd="/",
        )  # fmt: skip
        if probe.returncode == 0:
            _interpreters[uid] = interpreter
            return interpreter
    pytest.skip(f"no Python interpreter that uid {uid} can run with the exporter's dependencies")


def setpriv_prefix(uid: int = NOBODY, groups: tuple[int, ...] = (), capabilities: tuple[str, ...] = ()) -> list[str]:
    """Drop to uid for real, keeping only the named capabilities (ambient, so they survive the exec as
    systemd's AmbientCapabilities= does) and nothing else in the bounding set."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv not installed (Debian package util-linux)")
    caps = "".join(f",+{c}" for c in capabilities)
    prefix = ["setpriv", f"--reuid={uid}", f"--regid={uid}"]
    prefix.append(f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups")
    prefix += [f"--inh-caps=-all{caps}", f"--bounding-set=-all{caps}"]
    if capabilities:
        prefix.append(f"--ambient-caps=-all{caps}")
    return prefix


@dataclass
class Served:
    """An exporter serving HTTP(S) on a loopback port."""

    process: subprocess.Popen
    port: int
    log_path: Path
    scheme: str = "http"
    traced: bool = False

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        """The exporter's own PID (under strace, the tracer's child)."""
        if not self.traced:
            return self.process.pid
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        return int(children[0])

    def get(self, path: str = "/metrics", **kwargs) -> requests.Response:
        kwargs.setdefault("timeout", 30)
        return requests.get(self.url + path, **kwargs)

    def metrics(self, **kwargs) -> str:
        response = self.get("/metrics", **kwargs)
        assert response.status_code == 200, response.text
        return response.text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def threads(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/task"))

    def rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmRSS")

    def stop(self) -> None:
        """SIGTERM, as systemd stops it; an exporter that does not exit within 20 s fails the test (after
        being killed, tracer and exporter both, so nothing outlives the test)."""
        if self.process.poll() is not None:
            return
        try:
            exporter = self.pid
        except (OSError, IndexError, ValueError):
            exporter = self.process.pid
        try:
            os.kill(exporter, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            for pid in {exporter, self.process.pid}:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            self.process.wait()
            raise AssertionError(f"the exporter did not exit within 20 s of SIGTERM:\n{self.log()[-2000:]}") from None


def write_config(directory: Path, data: dict) -> Path:
    """The configuration as DIRECTORY/config.yml."""
    path = directory / "config.yml"
    path.write_text(yaml.safe_dump(data))
    return path


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    path.chmod(0o644)
    return path


def start_serving(
    workdir: Path,
    config: dict | None,
    *flags: str,
    prefix: list[str] | None = None,
    interpreter: str | None = None,
    scheme: str = "http",
    traced: bool = False,
    startup_seconds: float = 30,
) -> Served:
    port = free_port()
    log_path = workdir / f"exporter-{port}.log"
    cmd = [*(prefix or []), interpreter or sys.executable, "-m", "sops_nix_exporter", "serve",
           f"--web.listen-address=127.0.0.1:{port}", *flags]  # fmt: skip
    if config is not None:
        cmd.append(f"--config.file={write_yaml(workdir / f'config-{port}.yml', config)}")
    with open(log_path, "w") as log:
        process = subprocess.Popen(cmd, cwd="/", env=exporter_env(), stdout=subprocess.DEVNULL, stderr=log)
    served = Served(process, port, log_path, scheme, traced)
    deadline = time.monotonic() + startup_seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"exporter exited with {process.returncode}:\n{served.log()}")
        if re.search(r"msg=listening|\"msg\": \"listening\"", served.log()):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", port)) == 0:
                    return served
        time.sleep(0.1)
    served.stop()
    raise AssertionError(f"exporter did not listen on {port}:\n{served.log()}")


def open_to_nobody(*paths: Path) -> None:
    for path in paths:
        path.chmod(0o755)


def run_cli(*args: str, cwd: Path = ROOT, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sops_nix_exporter", *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )
