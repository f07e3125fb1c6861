"""Benchmark for issue 7: what a scrape costs at keepGenerations = 0 scale, next to what du(1) costs.

Run as root from the repository (it mounts a ramfs and starts processes):

    sudo .venv/bin/python bench/run.py            # the reference workload, about half an hour
    sudo .venv/bin/python bench/run.py --quick    # a smaller one, a few minutes
    sudo .venv/bin/python bench/run.py --store-only   # only the store figures (no processes, no HTTP)

It builds the reference workload itself in a temporary directory: a real ramfs (or --fstype tmpfs) holding
5,000 generations of 50 files each (45 small secrets and rendered/ with 5 templates of about 2.7 KB), a
symlink pointing at the newest, 1,000 `sleep` processes and three processes named virtiofsd pinning the
current generation (tests/pinning.py). Then it times the exporter's code and the baselines side by side
(`du -s -B1` over the store, a plain loop reading every /proc/PID/comm) and prints each figure with its
ratio and the target. Everything it made is removed at the end: processes are ended by their PID, the
mounts unmounted.

Timings are the best of several runs (the least disturbed by whatever else runs on the machine), with
the median beside it; CPU time is shown too. A benchmark is not a test: nothing here fails a build.
"""

from __future__ import annotations

import argparse
import http.client
import json
import logging
import os
import platform
import random
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from sops_nix_exporter import app
from sops_nix_exporter.readers import virtiofsd as processes  # noqa: E402
from sops_nix_exporter.stores.cache import CachingMeasurer  # noqa: E402
from sops_nix_exporter.collector.stores import scan_stores  # noqa: E402
from sops_nix_exporter.config import Config, MicrovmConfig, StoreConfig  # noqa: E402
from sops_nix_exporter.collector.frame import Exporter  # noqa: E402
from sops_nix_exporter.stores.scan import Measurer  # noqa: E402

SECRETS_PER_GENERATION = 45
TEMPLATES_PER_GENERATION = 5


# ---------------------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    wall: list[float]
    cpu: list[float]

    @property
    def best(self) -> float:
        return min(self.wall)

    @property
    def median(self) -> float:
        return statistics.median(self.wall)

    @property
    def cpu_best(self) -> float:
        return min(self.cpu)

    def __str__(self) -> str:
        return f"{ms(self.best)} (median {ms(self.median)}, cpu {ms(self.cpu_best)})"


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def timed(action, repeat: int, before=None) -> Timing:
    """Wall and CPU time (this process and the children it waited for) of action, repeat times."""
    wall, cpu = [], []
    for _ in range(repeat):
        if before is not None:
            before()
        r0, c0 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        action()
        wall.append(time.perf_counter() - start)
        r1, c1 = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(sum(getattr(after, f) - getattr(before, f)
                       for before, after in ((r0, r1), (c0, c1)) for f in ("ru_utime", "ru_stime")))  # fmt: skip
    return Timing(wall, cpu)


def interleaved(actions: dict, repeat: int) -> dict[str, Timing]:
    """Time several actions in turns, so that a change in the machine's load falls on all of them alike."""
    timings = {name: Timing([], []) for name in actions}
    for _ in range(repeat):
        for name, action in actions.items():
            once = timed(action, 1)
            timings[name].wall += once.wall
            timings[name].cpu += once.cpu
    return timings


@dataclass
class Figure:
    name: str
    value: str
    baseline: str = ""
    ratio: str = ""
    target: str = ""
    met: bool | None = None  # None: for information


@dataclass
class Report:
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, figure: Figure) -> None:
        self.figures.append(figure)
        verdict = {True: "MET", False: "NOT MET", None: ""}[figure.met]
        print(f"\n* {figure.name}\n    exporter: {figure.value}")
        if figure.baseline:
            print(f"    baseline: {figure.baseline}")
        if figure.ratio:
            print(f"    ratio:    {figure.ratio}")
        if figure.target:
            print(f"    target:   {figure.target}  -> {verdict}")
        sys.stdout.flush()

    def note(self, text: str) -> None:
        self.notes.append(text)
        print(f"  ({text})")
        sys.stdout.flush()


# ---------------------------------------------------------------------------------------------------------
# The workload


def write_file(path: str, content: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o400)
    try:
        os.write(fd, content)
    finally:
        os.close(fd)


class Store:
    """A sops-nix store on a fresh mount: generations written once, a symlink renamed onto the newest."""

    def __init__(self, base: Path, name: str, fstype: str, secrets: int, templates: int, seed: int) -> None:
        self.mountpoint = base / name
        self.mountpoint.mkdir()
        self.symlink = base / f"{name}.link"
        self.secrets, self.templates = secrets, templates
        self.random = random.Random(seed)
        options = "mode=0751" if fstype == "ramfs" else "mode=0751,size=90%,nr_inodes=0"
        subprocess.run(["mount", "-t", fstype, "-o", options, fstype, str(self.mountpoint)], check=True)
        self.mounted = True
        self.numbers: list[int] = []

    def write_generation(self, number: int) -> None:
        directory = f"{self.mountpoint}/{number}"
        os.mkdir(directory, 0o751)
        for i in range(self.secrets):
            write_file(f"{directory}/secret-{i:03d}", self.random.randbytes(self.random.randint(16, 200)))
        os.mkdir(f"{directory}/rendered", 0o751)
        for i in range(self.templates):
            content = self.random.randbytes(self.random.randint(2600, 2800))  # about 2.7 KB
            write_file(f"{directory}/rendered/template-{i:03d}.conf", content)
        self.numbers.append(number)

    def link(self, number: int) -> None:
        temporary = self.symlink.with_name(self.symlink.name + ".tmp")
        temporary.symlink_to(f"{self.mountpoint}/{number}")
        os.rename(temporary, self.symlink)

    def grow(self, generations: int) -> None:
        for number in range(len(self.numbers) + 1, generations + 1):
            self.write_generation(number)
        self.link(self.numbers[-1])

    def switch(self) -> None:
        """One activation: write the next generation, link it, remove the oldest one."""
        self.write_generation(self.numbers[-1] + 1)
        self.link(self.numbers[-1])
        shutil.rmtree(f"{self.mountpoint}/{self.numbers.pop(0)}")

    def config(self) -> StoreConfig:
        return StoreConfig(mountpoint=str(self.mountpoint), symlink=str(self.symlink), keep_generations=0)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
            self.mounted = False


def wait_until_settled(seconds: float = 2.2) -> None:
    """The cache remembers only generations quiet for two seconds (exporter/stores/cache.py)."""
    time.sleep(seconds)


class TimedMeasurer(CachingMeasurer):
    """The exporter's measurer, counting the time spent walking generations (what a cache miss costs)."""

    walk_seconds = 0.0

    def _walk(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return super()._walk(*args, **kwargs)
        finally:
            self.walk_seconds += time.perf_counter() - start


def cold_scan(config: Config) -> None:
    """The scan of an exporter just started: its cache is empty."""
    scan_stores(config, CachingMeasurer())


def du(path: Path) -> None:
    subprocess.run(["du", "-s", "-B1", str(path)], check=True, stdout=subprocess.DEVNULL)


def comm_loop() -> int:
    """The baseline for process discovery: read every /proc/PID/comm, nothing else."""
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fd = os.open(f"/proc/{entry}/comm", os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                os.read(fd, 64)
                count += 1
            except OSError:
                pass
            finally:
                os.close(fd)
    return count


# ---------------------------------------------------------------------------------------------------------
# The real exporter process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServedExporter:
    def __init__(self, config_path: Path, workdir: Path) -> None:
        self.port = free_port()
        self.log = open(workdir / "exporter.log", "w")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sops_nix_exporter", "serve", f"--web.listen-address=127.0.0.1:{self.port}",
             f"--config.file={config_path}"],
            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=self.log,
        )  # fmt: skip
        self.ps = psutil.Process(self.process.pid)
        deadline = time.monotonic() + 30
        while True:
            try:
                if self.get("/healthz", timeout=1) == b"ok\n":
                    break
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the exporter did not start; see {workdir / 'exporter.log'}")
            time.sleep(0.1)

    def get(self, path: str = "/metrics", timeout: float = 120, connection=None) -> bytes:
        own = connection is None
        connection = connection or http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            response = connection.getresponse()
            body = response.read()
            if response.status != 200:
                raise RuntimeError(f"GET {path}: {response.status}")
            return body
        finally:
            if own:
                connection.close()

    def cpu_seconds(self) -> float:
        times = self.ps.cpu_times()
        return times.user + times.system

    def rss_bytes(self) -> int:
        return self.ps.memory_info().rss

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self.log.close()


def concurrent(count: int, action) -> float:
    """Wall time for count threads released together, each running action once."""
    barrier = threading.Barrier(count + 1)
    errors: list[BaseException] = []

    def run() -> None:
        barrier.wait()
        try:
            action()
        except BaseException as exc:  # reported below; a thread must not die silently
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(count)]
    for thread in threads:
        thread.start()
    barrier.wait()
    start = time.perf_counter()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


@dataclass
class Batch:
    wall: float
    cpu: float
    collections: int


STORES_DURATION = re.compile(rb'^sopsnix_scrape_collector_duration_seconds\{collector="stores"\} (\S+)$', re.M)


class CountingExporter(Exporter):
    """The real Exporter, counting the collections it really ran."""

    collections = 0

    def _collect_now(self):
        self.collections += 1
        return super()._collect_now()


# ---------------------------------------------------------------------------------------------------------
# The run


def machine() -> dict[str, str]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "memory": f"{psutil.virtual_memory().total / 2**30:.1f} GiB",
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


class Bench:
    """The reference workload and the figures taken on it, section by section."""

    def __init__(self, args: argparse.Namespace, base: Path, cleanup: list) -> None:
        self.args, self.base, self.cleanup = args, base, cleanup
        self.report = Report()
        self.generations, self.repeat = args.generations, args.repeat
        self.state_dir = base / "microvms"
        self.state_dir.mkdir()

    def config(self, store: Store) -> Config:
        return Config(stores=[store.config()], microvm=MicrovmConfig(state_dir=str(self.state_dir)))

    def mount_store(self, name: str, secrets: int, templates: int, seed: int) -> Store:
        store = Store(self.base, name, self.args.fstype, secrets, templates, seed)
        self.cleanup.append(store.unmount)
        return store

    def run(self) -> Report:
        files = SECRETS_PER_GENERATION + TEMPLATES_PER_GENERATION
        print(f"building the store: {self.generations} generations of {files} files on {self.args.fstype}")
        self.store = self.mount_store("secrets.d", SECRETS_PER_GENERATION, TEMPLATES_PER_GENERATION, seed=7)
        self.growth()
        self.against_du()
        self.switch()
        if self.args.store_only:
            return self.report
        self.discovery()
        self.collection()
        self.served()
        return self.report

    def warm_timing(self, config: Config) -> Timing:
        measurer = CachingMeasurer()
        scan_stores(config, measurer)
        return timed(lambda: scan_stores(config, measurer), self.repeat)

    def growth(self) -> None:
        """The store part of a warm scrape grows with generations, not with the files in them."""
        steps = sorted({max(1, self.generations // 4), max(1, self.generations // 2), self.generations})
        by_step: dict[int, Timing] = {}
        for step in steps:
            self.store.grow(step)
            wait_until_settled()
            by_step[step] = self.warm_timing(self.config(self.store))
            print(f"  {step} generations: warm store scan {by_step[step]}")

        count = max(1, self.generations // 5)
        print(f"building two more stores of {count} generations: 50 files each, and 250 (225 secrets, 25 templates)")
        narrow = self.mount_store("narrow.d", SECRETS_PER_GENERATION, TEMPLATES_PER_GENERATION, seed=8)
        wide = self.mount_store("wide.d", 225, 25, seed=9)
        narrow.grow(count)
        wide.grow(count)
        wait_until_settled()
        configs = {"50": self.config(narrow), "250": self.config(wide)}
        measurers = {label: CachingMeasurer() for label in configs}
        for label, config in configs.items():
            scan_stores(config, measurers[label])
        timings = interleaved({
            **{f"cold {label}": partial(cold_scan, config) for label, config in configs.items()},
            **{f"warm {label}": partial(scan_stores, config, measurers[label]) for label, config in configs.items()},
        }, self.repeat)  # fmt: skip
        cold = {label: timings[f"cold {label}"].best / count for label in configs}
        warm = {label: timings[f"warm {label}"].best / count for label in configs}
        narrow.unmount()
        wide.unmount()

        per_step = ", ".join(f"{n}: {t.best / n * 1e6:.1f} us" for n, t in by_step.items())
        first, last = steps[0], steps[-1]
        self.report.add(Figure(
            "Store part of a warm scrape: grows with generations, not files",
            f"warm, per generation: {per_step}; {count} generations of 50 files: {warm['50'] * 1e6:.1f} us, "
            f"of 250 files: {warm['250'] * 1e6:.1f} us",
            f"cold (every file walked), per generation: 50 files {cold['50'] * 1e6:.0f} us, "
            f"250 files {cold['250'] * 1e6:.0f} us",
            f"warm 250 / 50 files = {warm['250'] / warm['50']:.2f} (cold: {cold['250'] / cold['50']:.2f}); "
            f"warm {last} / {first} generations = {by_step[last].best / by_step[first].best:.2f} (x{last / first:.0f})",
            "per-generation warm cost independent of the files (about 1, where a walk's grows about 5x)",
            warm["250"] / warm["50"] < 1.5,
        ))  # fmt: skip

    def against_du(self) -> None:
        store, config = self.store, self.config(self.store)
        self.measurer = TimedMeasurer()
        scan_stores(config, self.measurer)
        timings = interleaved({
            "du": lambda: du(store.mountpoint),
            "cold": lambda: scan_stores(config, CachingMeasurer()),
            "cold, one process": lambda: scan_stores(config, CachingMeasurer(helpers=0)),
            "uncached": lambda: scan_stores(config, Measurer()),
            "warm": lambda: scan_stores(config, self.measurer),
        }, self.repeat)  # fmt: skip
        self.du, self.cold, self.warm = timings["du"], timings["cold"], timings["warm"]
        self.cold_alone = timings["cold, one process"]  # a walk of the exporter's own, as after a switch
        self.report.note(
            f"the warm measurer holds {self.measurer.watches} inotify watches for {self.measurer.known} generations"
        )
        du_, cold, warm = self.du, self.cold, self.warm
        print(f"du -s -B1 over the store: {du_}")
        self.report.add(Figure(
            f"Warm scrape, store part ({self.generations} generations, nothing changed)",
            f"{warm}",
            f"du -s -B1: {du_}",
            f"du / warm = {du_.best / warm.best:.1f}x (cpu {du_.cpu_best / warm.cpu_best:.1f}x)",
            ">= 20x faster than du",
            du_.best / warm.best >= 20,
        ))  # fmt: skip
        helpers = CachingMeasurer(watch_limit=0).helpers
        alone = timings["cold, one process"]
        self.report.add(Figure(
            "Cold scrape, store part (first after start: every file walked once)",
            f"{cold}, the exporter and {helpers} helper process(es) (cpu: all of them); "
            f"in one process: {alone} ({alone.best / du_.best:.2f}x du); "
            f"plain Measurer (no cache, no watches): {timings['uncached']}",
            f"du -s -B1: {du_}",
            f"cold / du = {cold.best / du_.best:.2f} (cpu {cold.cpu_best / du_.cpu_best:.2f})",
            "<= 2x du",
            cold.best / du_.best <= 2,
        ))  # fmt: skip

    def switch(self) -> None:
        """One new generation and one pruned: the next scrape walks the new one and nothing else."""
        config, measurer = self.config(self.store), self.measurer
        one_walk = self.cold_alone.best / self.generations  # a switch's generation is walked in the exporter
        scans, walked, walking = [], [], []
        for _ in range(self.args.switches):
            wait_until_settled()
            scan_stores(config, measurer)  # everything remembered, the previous switch's generation too
            self.store.switch()
            walks, seconds = measurer.walks, measurer.walk_seconds
            scans.append(timed(lambda: scan_stores(config, measurer), 1).best)
            walked.append(measurer.walks - walks)
            walking.append(measurer.walk_seconds - seconds)
        self.report.add(Figure(
            "A switch (one new generation, one pruned): the next scrape",
            f"{ms(min(scans))} (median {ms(statistics.median(scans))}) over {len(scans)} switches; generations "
            f"walked: {sorted(set(walked))}; time spent walking: {statistics.median(walking) * 1e6:.0f} us",
            f"warm scrape {ms(self.warm.best)}; one generation's walk {one_walk * 1e6:.0f} us "
            f"(cold in one process / generations); a full rescan {ms(self.cold.best)}",
            f"walking = {statistics.median(walking) / one_walk:.1f} generation walks; scrape / warm scrape = "
            f"{min(scans) / self.warm.best:.2f}",
            "about one generation's walk, not a full rescan",
            set(walked) == {1} and statistics.median(walking) < 3 * one_walk,
        ))  # fmt: skip
        self.report.note("for two seconds after a switch its new generation is walked on every scrape (settle time)")

    def discovery(self) -> None:
        print(f"starting {self.args.processes} sleep processes and 3 virtiofsd pinners")
        sleepers: list[subprocess.Popen] = []

        def stop_sleepers() -> None:
            for sleeper in sleepers:
                if sleeper.poll() is None:
                    os.kill(sleeper.pid, signal.SIGKILL)
            for sleeper in sleepers:
                sleeper.wait()

        self.cleanup.append(stop_sleepers)
        for _ in range(self.args.processes):
            sleepers.append(subprocess.Popen(["sleep", "3600"], stdin=subprocess.DEVNULL))
        pinners = start_pinners(self.base, self.store, self.state_dir, self.cleanup)
        on_host = sum(1 for e in os.listdir("/proc") if e.isdigit())
        self.report.note(f"virtiofsd pinners (vm:sandbox:pid): {pinners}; processes on the host: {on_host}; "
                         f"named virtiofsd: {len(processes.find())}")  # fmt: skip
        timings = interleaved({"comm": comm_loop, "find": processes.find}, self.repeat * 3)
        comm, found = timings["comm"], timings["find"]
        self.report.add(Figure(
            f"Process discovery (processes.find) with {self.args.processes} other processes",
            f"{found}",
            f"a loop reading every /proc/PID/comm: {comm}",
            f"find / loop = {found.best / comm.best:.2f} (cpu {found.cpu_best / comm.cpu_best:.2f})",
            "<= 2x the comm loop",
            found.best / comm.best <= 2,
        ))  # fmt: skip

    def collection(self) -> None:
        """The whole collection (stores and shares) in process, alone and with 16 callers at once."""
        exporter = CountingExporter(app.collectors(self.config(self.store)))
        exporter.collect()
        wait_until_settled()
        snapshots = [exporter.collect() for _ in range(self.repeat)]
        assert all(run.success for snapshot in snapshots for run in snapshot.runs.values()), "a collector failed"
        one = timed(exporter.collect, self.repeat)
        parts = ", ".join(
            f"{name} {ms(min(snapshot.runs[name].duration_seconds for snapshot in snapshots))}"
            for name in snapshots[0].runs
        )  # fmt: skip
        self.report.add(Figure(
            "Warm scrape, whole collection in process (stores and shares collectors)",
            f"{one}; best of each collector: {parts}",
            f"du -s -B1: {self.du}",
            f"du / whole collection = {self.du.best / one.best:.1f}x",
            "(for information: du covers only the store)",
        ))  # fmt: skip
        batches = []
        for _ in range(self.repeat):
            before = exporter.collections
            seconds = concurrent(16, exporter.collect)
            batches.append((seconds, exporter.collections - before))
        wall = min(s for s, _ in batches)
        self.report.add(Figure(
            "16 concurrent collections in process (Exporter.collect)",
            f"collections run for 16 callers: {sorted(c for _, c in batches)}; wall {ms(wall)} "
            f"(median {ms(statistics.median(s for s, _ in batches))})",
            f"one collection: {one}",
            f"16 concurrent / one = {wall / one.best:.2f}",
            "about one scan, not sixteen",
            statistics.median(c for _, c in batches) <= 2,
        ))  # fmt: skip

    def sixteen_at_once(self, served: ServedExporter, connected: bool) -> Batch:
        """16 scrapes released together: over 16 connections made beforehand, or each making its own."""
        connections = []
        if connected:
            connections = [http.client.HTTPConnection("127.0.0.1", served.port, timeout=120) for _ in range(16)]
            for connection in connections:
                connection.connect()
            time.sleep(0.3)  # let the server accept them all and start their threads
        free = list(connections)
        lock = threading.Lock()
        bodies: list[bytes] = []

        def scrape() -> None:
            with lock:
                connection = free.pop() if free else None
            bodies.append(served.get(connection=connection))

        cpu_before = served.cpu_seconds()
        wall = concurrent(16, scrape)
        cpu = served.cpu_seconds() - cpu_before
        for connection in connections:
            connection.close()
        durations = {m.group(1) for m in map(STORES_DURATION.search, bodies) if m}
        return Batch(wall, cpu, len(durations))

    def served(self) -> None:
        """The real exporter process: scrapes over HTTP, 16 at once, and its memory over many."""
        config_path = self.base / "config.yml"
        config_path.write_text(json.dumps({
            "stores": [{"mountpoint": str(self.store.mountpoint), "symlink": str(self.store.symlink),
                        "keep_generations": 0}],
            "microvm": {"state_dir": str(self.state_dir)},
        }))  # fmt: skip
        served = ServedExporter(config_path, self.base)
        self.cleanup.append(served.stop)
        start = time.perf_counter()
        body = served.get()
        first = time.perf_counter() - start
        assert b"sopsnix_vm_serving_generation{" in body and b"sopsnix_generations{" in body, "incomplete scrape"
        wait_until_settled()
        served.get()
        one = timed(served.get, self.repeat)  # a new connection each, like the concurrent ones below
        connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=120)
        kept_alive = timed(lambda: served.get(connection=connection), self.repeat)
        cpu_before = served.cpu_seconds()
        for _ in range(self.repeat):
            served.get()
        cpu_one = (served.cpu_seconds() - cpu_before) / self.repeat
        self.report.add(Figure(
            "Scrapes over HTTP, the real exporter process",
            f"first after start (cold) {ms(first)}; warm {one} on a new connection, {kept_alive} on a kept-alive one",
            f"du -s -B1: {self.du}",
            f"du / warm scrape = {self.du.best / one.best:.1f}x",
            "(for information)",
        ))  # fmt: skip
        if kept_alive.median > one.median + 0.030:
            self.report.note("a kept-alive connection (as Prometheus keeps) waits about 40 ms per scrape: the "
                             "response leaves in two writes and Nagle's algorithm holds the second one back until "
                             "the client's delayed ACK")  # fmt: skip

        for connected in (True, False):
            batches = [self.sixteen_at_once(served, connected) for _ in range(self.repeat)]
            wall = min(b.wall for b in batches)
            cpu = statistics.median(b.cpu for b in batches)
            collections = sorted(b.collections for b in batches)
            how = "16 connected clients send their request at once" if connected else "16 clients connect at once"
            self.report.add(Figure(
                f"16 concurrent scrapes over HTTP, the real exporter process: {how}",
                f"collections run per 16 scrapes: {collections}; wall {ms(wall)} (median "
                f"{ms(statistics.median(b.wall for b in batches))}), exporter cpu {ms(cpu)}",
                f"one scrape: wall {one}, exporter cpu {ms(cpu_one)}; 16 one after another: {ms(16 * one.best)}",
                f"16 concurrent / one: wall {wall / one.best:.2f}, exporter cpu {cpu / cpu_one:.2f}",
                "about one scan, not sixteen" if connected else "(for information)",
                statistics.median(collections) <= 2 if connected else None,
            ))  # fmt: skip
        self.report.note("collections are counted by their stores duration: the 16 responses of one collection "
                         "carry the same sopsnix_scrape_collector_duration_seconds")  # fmt: skip

        total, early = self.args.scrapes, 100
        rss_early = 0
        start = time.perf_counter()
        for done in range(1, total + 1):
            served.get(connection=connection)
            if done == early:
                rss_early = served.rss_bytes()
            if done % max(1, total // 10) == 0:
                elapsed = time.perf_counter() - start
                print(f"  {done} scrapes, rss {served.rss_bytes() / 2**20:.1f} MiB, {elapsed:.0f} s")
        rss_late = served.rss_bytes()
        connection.close()
        growth = rss_late / rss_early - 1
        self.report.add(Figure(
            f"Resident memory of the exporter process ({self.generations} generations known)",
            f"after {early} scrapes {rss_early / 2**20:.1f} MiB ({rss_early / 1e6:.1f} MB), after {total} scrapes "
            f"{rss_late / 2**20:.1f} MiB ({rss_late / 1e6:.1f} MB)",
            "",
            f"growth {growth * 100:+.1f}%",
            f"within 10% of the figure after 100 scrapes, and below 60 MB (after {total} scrapes)",
            abs(growth) <= 0.10 and rss_late < 60e6,
        ))  # fmt: skip


def start_pinners(base: Path, store: Store, state_dir: Path, cleanup: list) -> str:
    """Three processes named virtiofsd pinning the current generation, one per sandbox mode."""
    try:
        import pinning
        from pinning import PinnerUnavailable, start_pinner
    except ImportError as exc:
        return f"none (tests/pinning.py: {exc})"
    if pinning._binary is None:  # compiled below, into a temporary directory of its own: remove it at the end
        cleanup.append(lambda: pinning._binary and shutil.rmtree(pinning._binary.parent, ignore_errors=True))
    started = []
    for vm, mode in (("bench-a", "namespace"), ("bench-b", "chroot"), ("bench-c", "none")):
        try:
            pinner = start_pinner(base, source=store.symlink, mode=mode, vm=vm, state_dir=state_dir)
        except PinnerUnavailable as exc:
            return f"{len(started)} ({exc})"
        cleanup.append(pinner.stop)
        started.append(f"{vm}:{mode}:{pinner.pid}")
    return ", ".join(started)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smaller run: 500 generations, 200 processes, 1,000 scrapes")  # fmt: skip
    parser.add_argument("--fstype", choices=("ramfs", "tmpfs"), default="ramfs")
    parser.add_argument("--store-only", action="store_true",
                        help="only the store figures (warm, cold, growth, switch): no processes, no HTTP")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures to this file")
    args = parser.parse_args()
    args.generations, args.processes, args.scrapes, args.repeat, args.switches = (
        (500, 200, 1000, 5, 5) if args.quick else (5000, 1000, 10000, 7, 7)
    )
    if os.geteuid() != 0:
        print("bench/run.py needs root: it mounts a ramfs and starts processes (sudo .venv/bin/python bench/run.py)")
        return 2
    for tool in ("du", "mount", "umount", "sleep"):
        if shutil.which(tool) is None:
            print(f"bench/run.py needs {tool}")
            return 2

    # The in-process exporter would log the store's problems (over its memory budget, naturally): not news here.
    logging.getLogger("sops_nix_exporter").setLevel(logging.CRITICAL)
    info = machine()
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    # Clean up on Ctrl-C or kill as well: a background job ignores SIGINT unless told otherwise.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"bench/run.py: signal {signum}, cleaning up"))
    base = Path(tempfile.mkdtemp(prefix="sopsnix-bench-"))
    os.chmod(base, 0o755)
    cleanup: list = []
    started = time.monotonic()
    try:
        report = Bench(args, base, cleanup).run()
    finally:
        for action in reversed(cleanup):
            try:
                action()
            except Exception as exc:  # keep cleaning up; say what was left behind
                print(f"cleanup: {exc!r}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
    info["load average at end"] = " ".join(f"{x:.2f}" for x in os.getloadavg())
    info["duration"] = f"{time.monotonic() - started:.0f} s"
    print("\nsummary:")
    for figure in report.figures:
        verdict = {True: "met", False: "NOT MET", None: "info"}[figure.met]
        print(f"  [{verdict:>7}] {figure.name}: {figure.ratio}")
    print("machine: " + "; ".join(f"{k} {v}" for k, v in info.items()))
    if args.json:
        args.json.write_text(json.dumps({
            "quick": args.quick, "store_only": args.store_only, "fstype": args.fstype, "machine": info,
            "figures": [figure.__dict__ for figure in report.figures], "notes": report.notes,
        }, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
