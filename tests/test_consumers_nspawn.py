"""Issue 14: a real systemd-nspawn container that bind-mounts a store's symlink (`--bind-ro=SYMLINK:/run/secrets`,
as NixOS containers' bindMounts and plain nspawn units do) holds one generation, and after the prune that
keepGenerations = 1 does it sees an empty directory; the exporter must say so of it, by its unit.

The container is the approach of tests/test_nix.py: this host's /usr under a volatile (tmpfs) root, no
machined registration and no scope of its own (--register=no --keep-unit), so it runs in the cgroup it was
started in: a real one named as systemd names the unit (SLICE/systemd-nspawn@NAME.service), in which nspawn
makes its own payload/ and supervisor/ cgroups. Its PID 1 is a shell that lists /run/secrets for each line on
its standard input (--pipe), so the test sees the secrets, then the empty directory, from inside."""

from __future__ import annotations

import os
import selectors
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sops_nix_exporter import app
from sops_nix_exporter.config import parse_config

from pinning import make_unit_cgroup, remove_cgroup
from scrape import samples, value
from sopsnix import SAMPLE_SECRETS
from tools import require_tool

INSIDE = "echo ready; while read -r _; do ls -A /run/secrets; echo @@end; done"
START_SECONDS = 60  # nspawn sets up a root and mounts in well under a second; this only bounds a hang


class Container:
    """`systemd-nspawn --bind-ro=SOURCE:/run/secrets` running in the cgroup SLICE/UNIT."""

    def __init__(self, nspawn: str, source: Path, unit: str, workdir: Path) -> None:
        self.process: subprocess.Popen | None = None
        self.output = b""
        self.dirs = make_unit_cgroup(unit)
        if self.dirs is None:
            pytest.skip("no writable cgroup v2 hierarchy: cannot place the container in a unit's cgroup")
        self.machine = f"sopsnix-{unit.split('@')[1].split('.')[0]}-{os.getpid()}"
        self.log_path = workdir / f"{self.machine}.log"
        self.log = open(self.log_path, "wb")
        # Join the unit's cgroup, then become nspawn (exec keeps the PID: ours to end).
        command = ["sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.dirs[0] / "cgroup.procs"),
                   nspawn, "--directory=/", "--volatile=yes", "--private-network", "--register=no", "--keep-unit",
                   "--link-journal=no", f"--machine={self.machine}", "--pipe", "--quiet",
                   f"--bind-ro={source}:/run/secrets", "--", "/bin/sh", "-c", INSIDE]  # fmt: skip
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                        bufsize=0)
        line = self._line(START_SECONDS)
        if line != b"ready\n":
            self.stop()
            reason = self.log_path.read_text(errors="replace").strip()[-800:]
            pytest.skip(f"systemd-nspawn cannot start a container on this machine: {line!r} {reason}")

    def _line(self, timeout: float) -> bytes:
        """The next line of its output, b"" after timeout. Read raw into our own buffer: a buffered readline
        would take several lines at once and leave the selector waiting for output that already came."""
        assert self.process is not None and self.process.stdout is not None
        deadline = time.monotonic() + timeout
        fd = self.process.stdout.fileno()
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self.output:
                if not selector.select(max(0.0, deadline - time.monotonic())):
                    return b""
                chunk = os.read(fd, 65536)
                if not chunk:
                    return b""
                self.output += chunk
        line, _, self.output = self.output.partition(b"\n")
        return line + b"\n"

    def listing(self) -> list[str]:
        """What the container's PID 1 sees in /run/secrets, now."""
        assert self.process is not None and self.process.stdin is not None
        self.process.stdin.write(b"\n")
        self.process.stdin.flush()
        names = []
        while (line := self._line(10)) not in (b"@@end\n", b""):
            names.append(line.decode().rstrip("\n"))
        return names

    def payload_pids(self) -> list[int]:
        """The processes in the container's cgroups, as the host sees them."""
        assert self.dirs is not None
        pids = []
        for procs in self.dirs[0].rglob("cgroup.procs"):
            try:
                pids += [int(pid) for pid in procs.read_text().split()]
            except OSError:
                continue
        return pids

    def stop(self) -> None:
        """Closing its standard input ends the container's PID 1, and nspawn with it; whatever is left is
        killed by its PID. Then the cgroups (nspawn's payload/ and supervisor/ too) are removed."""
        if self.process is not None:
            if self.process.stdin is not None:
                try:
                    self.process.stdin.close()
                except BrokenPipeError:
                    pass
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            for pipe in (self.process.stdout, self.process.stderr):
                if pipe is not None:
                    pipe.close()
        if self.dirs is not None:
            deadline = time.monotonic() + 10
            while (left := self.payload_pids()) and time.monotonic() < deadline:
                for pid in left:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                time.sleep(0.05)
            unit_dir, slice_dir = self.dirs
            inner = sorted((d for d in unit_dir.rglob("*") if d.is_dir()), key=lambda d: len(d.parts), reverse=True)
            remove_cgroup([*inner, unit_dir], [slice_dir])
            self.dirs = None
        self.log.close()
        # nspawn's per-machine propagation directory, if it left it: only ever an empty directory to remove.
        try:
            os.rmdir(f"/run/systemd/nspawn/propagate/{self.machine}")
        except OSError:
            pass


def scrape(config: dict) -> tuple[str, dict]:
    from prometheus_client import generate_latest

    _, registry = app.build(parse_config(config), process_metrics=False)
    text = generate_latest(registry).decode()
    return text, samples(text)


def consumer_values(found: dict, consumer: str, kind: str, mountpoint: str) -> dict[str, float | None]:
    labels = {"consumer": consumer, "kind": kind, "mountpoint": mountpoint}
    return {
        "serving": value(found, "sopsnix_consumer_serving_generation", **labels),
        "stale": value(found, "sopsnix_consumer_serving_stale_generation", **labels),
        "deleted": value(found, "sopsnix_consumer_serving_deleted_generation", **labels),
    }


@pytest.fixture
def containers(make_store, scratch):
    """start(source, unit) -> Container; each is stopped (by its PID) before the store is unmounted."""
    nspawn = require_tool("systemd-nspawn", "systemd-container")
    started: list[Container] = []

    def start(source: Path, unit: str) -> Container:
        container = Container(nspawn, source, unit, scratch)
        started.append(container)
        return container

    yield start
    for container in reversed(started):
        container.stop()


def test_an_nspawn_container_holds_its_generation_and_sees_the_prune(make_store, containers, scratch, promtool_check):
    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    mp = str(store.mountpoint)
    config = {"stores": [{"mountpoint": mp, "symlink": str(store.symlink), "keep_generations": 1}],
              "microvm": {"state_dir": str(scratch / "microvms")}}  # fmt: skip
    # A plain nspawn unit and a NixOS container (containers.NAME.bindMounts): both are kind container.
    units = ["systemd-nspawn@db.service", "container@web.service"]
    started = {unit: containers(store.symlink, unit) for unit in units}
    inside = sorted({name.split("/")[0] for name in SAMPLE_SECRETS})
    for unit, container in started.items():
        assert sorted(container.listing()) == inside, unit
        assert container.payload_pids(), f"{unit}: nothing runs in the unit's cgroup"

    text, found = scrape(config)
    promtool_check(text)
    for unit in units:
        assert consumer_values(found, unit, "container", mp) == {"serving": 1, "stale": 0, "deleted": 0}, text
    # One consumer per container: its payload and its nspawn are one unit, and nspawn's own namespace is the host's.
    consumers = [labels for (name, labels) in found if name == "sopsnix_consumer_serving_generation"]
    assert len(consumers) == len(units), consumers
    assert value(found, "sopsnix_recommended_keep_generations", mountpoint=mp) == 2

    store.switch({"db-password": "rotated\n"}, keep_generations=1)
    assert store.generations() == [2]
    for unit, container in started.items():
        assert container.listing() == [], unit  # the container's secrets are gone, seen from inside
    text, found = scrape(config)
    promtool_check(text)
    for unit in units:
        assert consumer_values(found, unit, "container", mp) == {"serving": 1, "stale": 1, "deleted": 1}, text
