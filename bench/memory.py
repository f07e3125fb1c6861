"""Benchmark for issue 13: where the resident memory of `serve` goes at 5,000 generations.

Run as root from the repository (it mounts a ramfs and starts the exporter):

    sudo .venv/bin/python bench/memory.py                     # 5,000 generations, about 2 minutes
    sudo .venv/bin/python bench/memory.py --trace             # also tracemalloc inside the real serve process
    sudo .venv/bin/python bench/memory.py --env MALLOC_ARENA_MAX=2   # serve with this in its environment

It builds the reference store of bench/run.py (a real ramfs, generations of 50 files), measures the baseline
(`python -c "import sops_nix_exporter.cli"`), then starts the real `sops-nix-exporter serve` on it, scrapes it
(the first scrape is the cold one), waits for the generations to settle, scrapes again and reads the
process's /proc/PID/status and /proc/PID/smaps: VmRSS, and where the resident pages are (the heap, other
anonymous mappings such as malloc arenas, thread stacks, the files mapped).

With --trace the exporter runs under tracemalloc (bench/memory.py itself, as a thin wrapper around the
real cli.main; tracemalloc's own bookkeeping inflates RSS, so the RSS figures of that run are not the
exporter's): a snapshot after the import, and one after the scrapes, compared by line and by traceback.
Only file names and line numbers are printed, never a generation's content.

Everything it made is removed at the end: the exporter is stopped by its PID, the ramfs unmounted.
A benchmark is not a test: nothing here fails a build.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KIB = 1024


def status(pid: int | str) -> dict[str, int]:
    """The kB fields of /proc/PID/status, in bytes, and Threads."""
    fields = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            name, _, value = line.partition(":")
            value = value.split()
            if name == "Threads":
                fields[name] = int(value[0])
            elif len(value) == 2 and value[1] == "kB":
                fields[name] = int(value[0]) * KIB
    return fields


def smaps(pid: int) -> dict[str, int]:
    """Resident bytes by kind of mapping: heap, thread stacks, other anonymous mappings, files mapped."""
    kinds: dict[str, int] = {}
    with open(f"/proc/{pid}/smaps") as f:
        name, start, end, perms = "", 0, 0, ""
        previous = (0, "")  # where the mapping before this one ended, and its permissions
        for line in f:
            head = line.split()
            if "-" in head[0] and not head[0].endswith(":"):
                previous = (end, perms)
                start, end = (int(x, 16) for x in head[0].split("-"))
                perms = head[1]
                name = head[5] if len(head) > 5 else ""
            elif head[0] == "Rss:":
                rss = int(head[1]) * KIB
                if name == "[heap]":
                    kind = "brk heap (main arena)"
                elif name == "[stack]":
                    kind = "main thread stack"
                elif name.startswith("/"):
                    kind = "files mapped (interpreter, libraries, .so modules)"
                elif name:
                    kind = name
                elif previous == (start, "---p") and perms == "rw-p" and end - start == 8 * 2**20:
                    kind = "thread stacks (8 MiB after a guard page)"
                elif start % (64 * 2**20) == 0 and perms == "rw-p":
                    kind = "glibc thread arenas (64 MiB aligned)"
                else:
                    kind = "other anonymous (pymalloc arenas, large allocations)"
                kinds[kind] = kinds.get(kind, 0) + rss
    return kinds


def mib(n: float) -> str:
    return f"{n / 2**20:+.1f} MiB" if n < 0 else f"{n / 2**20:.1f} MiB"


def baseline(env: dict[str, str]) -> tuple[int, dict[str, int]]:
    """VmRSS of `python -c "import sops_nix_exporter.cli"`, and where its resident pages are: read from here
    while it waits, so that it imports nothing more than that."""
    code = "import sops_nix_exporter.cli, sys; sys.stdout.write('imported\\n'); sys.stdout.flush(); sys.stdin.read()"
    process = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        if process.stdout.readline() != "imported\n":
            raise RuntimeError("the baseline interpreter did not import the exporter")
        return status(process.pid)["VmRSS"], smaps(process.pid)
    finally:
        process.stdin.close()
        process.stdout.close()
        process.wait(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str = "/metrics", connection=None) -> bytes:
    own = connection is None
    connection = connection or http.client.HTTPConnection("127.0.0.1", port, timeout=120)
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


class Serve:
    """The real `serve`, directly or (trace) under this file's tracemalloc wrapper, stopped by its PID."""

    def __init__(self, config: Path, workdir: Path, env: dict[str, str], trace: bool, inspect: bool = False) -> None:
        self.port = free_port()
        self.workdir = workdir
        argv = ["serve", f"--web.listen-address=127.0.0.1:{self.port}", f"--config.file={config}"]
        command = [sys.executable, str(Path(__file__).resolve()), "--traced-serve", *argv] if trace or inspect else \
            [sys.executable, "-m", "sops_nix_exporter", *argv]  # fmt: skip
        if inspect and not trace:
            env = {**env, "BENCH_TRACE_FRAMES": "0"}
        self.log = open(workdir / "exporter.log", "w")
        self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                        stderr=self.log, text=True)  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            try:
                if get(self.port, "/healthz") == b"ok\n":
                    return
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the exporter did not start")
            time.sleep(0.1)

    requests = 0

    def snapshot(self, name: str) -> Path:
        self.requests += 1
        path = self.workdir / f"{self.requests}-{name}.tracemalloc"
        self.process.stdin.write(f"{path}\n")
        self.process.stdin.flush()
        deadline = time.monotonic() + 120
        while not Path(f"{path}.done").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("no snapshot")
            time.sleep(0.1)
        return path

    def allocators(self) -> dict[str, int]:
        return json.loads(self.snapshot("allocators").read_text())

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process.stdin:
            self.process.stdin.close()
        self.log.close()


def traced_serve(argv: list[str]) -> int:
    """The wrapper: tracemalloc, the import, a snapshot, then the real cli.main; each path on stdin gets a
    snapshot dumped there (from a thread: the main thread waits in sigwait)."""
    import tracemalloc

    frames = int(os.environ.get("BENCH_TRACE_FRAMES", "12"))
    if frames:
        tracemalloc.start(frames)
    sys.path.insert(0, str(ROOT))
    from sops_nix_exporter import cli

    imported = tracemalloc.take_snapshot() if frames else None
    # The highest traced size seen, what the snapshot held then itself, and the snapshot: what the cold scrape
    # held at its peak. A snapshot is traced too (tracemalloc.py's lines, filtered out when compared).
    highest: list = [0, 0, None]

    def sample_peak() -> None:
        while True:
            current = tracemalloc.get_traced_memory()[0] - highest[1]
            if current > highest[0] + 2**20:
                highest[:] = [0, 0, None]  # the old snapshot goes before the new one is taken
                before = tracemalloc.get_traced_memory()[0]
                snapshot = tracemalloc.take_snapshot()
                highest[:] = [current, tracemalloc.get_traced_memory()[0] - before, snapshot]
            time.sleep(0.005)

    def serve_snapshots() -> None:
        for line in sys.stdin:
            path = line.strip()
            if path.endswith("-allocators.tracemalloc"):
                Path(path).write_text(json.dumps(allocators()))
            elif path.endswith("-trim.tracemalloc"):
                import ctypes

                ctypes.CDLL(None).malloc_trim(0)
                Path(path).write_text("{}")
            elif path.endswith("-import.tracemalloc"):
                imported.dump(path)
            elif path.endswith("-peak.tracemalloc"):
                highest[2].dump(path)
            else:
                tracemalloc.take_snapshot().dump(path)
            current, peak = tracemalloc.get_traced_memory() if frames else (0, 0)
            Path(path + ".done").write_text(json.dumps({"current": current, "peak": peak}))

    threading.Thread(target=serve_snapshots, name="bench-snapshots", daemon=True).start()
    threading.Thread(target=sample_peak, name="bench-peak", daemon=True).start()
    return cli.main(argv)


def allocators() -> dict[str, int]:
    """In the process itself: pymalloc's arenas (sys._debugmallocstats, which writes to fd 2) and glibc's
    (mallinfo2): how much each holds from the system, and how much of it is in use."""
    import ctypes
    import re

    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as out:
        os.dup2(out.fileno(), 2)
        try:
            sys._debugmallocstats()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        out.seek(0)
        text = out.read()

    def figure(label: str) -> int:
        match = re.search(r"^# " + re.escape(label) + r"\s*=\s*([\d,]+)", text, re.M)
        return int(match.group(1).replace(",", "")) if match else -1

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]  # fmt: skip

    libc = ctypes.CDLL(None)
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    arenas = figure("arenas allocated current")
    return {
        "pymalloc arenas": arenas,
        "pymalloc arena bytes": arenas * 2**20 if arenas >= 0 else -1,  # ARENA_SIZE: 1 MiB on 64-bit 3.10+
        "pymalloc bytes in allocated blocks": figure("bytes in allocated blocks"),
        "pymalloc bytes in available blocks": figure("bytes in available blocks"),
        "pymalloc bytes in unused pools": int(re.search(r"^(\d+) unused pools", text, re.M).group(1)) * 16384,
        "pymalloc arenas highwater mark": figure("arenas highwater mark"),
        "pymalloc bytes lost to pool headers and quantization": figure("bytes lost to pool headers")
        + figure("bytes lost to quantization"),
        "glibc sbrk and thread heaps (arena)": info.arena,
        "glibc mmapped chunks (hblkhd)": info.hblkhd,
        "glibc in use (uordblks)": info.uordblks,
        "glibc free in arenas (fordblks)": info.fordblks,
        "glibc releasable at the top (keepcost)": info.keepcost,
    }


def compare(before: Path, after: Path, peak_file: Path, top: int) -> None:
    import tracemalloc

    old, new = tracemalloc.Snapshot.load(str(before)), tracemalloc.Snapshot.load(str(after))
    traced = json.loads(peak_file.read_text())
    ignore = [tracemalloc.Filter(False, tracemalloc.__file__)]
    old, new = old.filter_traces(ignore), new.filter_traces(ignore)
    total_old = sum(s.size for s in old.statistics("filename"))
    total_new = sum(s.size for s in new.statistics("filename"))
    print(f"\ntracemalloc: traced after the import {mib(total_old)}, after the scrapes {mib(total_new)} "
          f"(+{mib(total_new - total_old)}); peak of the run {mib(traced['peak'])}")  # fmt: skip

    def short(frame) -> str:
        name = frame.filename
        for prefix in (str(ROOT / "exporter") + "/", str(ROOT) + "/"):
            if name.startswith(prefix):
                name = name[len(prefix):]
        if "/lib/python" in name:
            name = name.split("/lib/python", 1)[1].split("/", 1)[1]
        return f"{name}:{frame.lineno}"

    print(f"\nby line (the allocating line), top {top} of the growth:")
    for stat in new.compare_to(old, "lineno")[:top]:
        print(f"  {stat.size_diff / KIB:+9.0f} KiB {stat.count_diff:+8d} blocks  {short(stat.traceback[0])}")

    print(f"\nby traceback, top {top} of the growth (innermost frame first, exporter frames only below it):")
    for stat in new.compare_to(old, "traceback")[:top]:
        frames = [short(f) for f in reversed(stat.traceback)]
        ours = [f for f in frames[1:] if not f.startswith(("site-packages", "threading", "socketserver"))][:4]
        print(f"  {stat.size_diff / KIB:+9.0f} KiB {stat.count_diff:+8d} blocks  {frames[0]}  <- {' <- '.join(ours)}")

    by_file: dict[str, int] = {}
    for stat in new.compare_to(old, "filename"):
        name = short(stat.traceback[0]).rsplit(":", 1)[0]
        group = name if name.startswith(("stores", "collector", "readers", "http")) else \
            "prometheus_client" if "prometheus_client" in name else "other (stdlib and the rest)"  # fmt: skip
        by_file[group] = by_file.get(group, 0) + stat.size_diff
    print("\nby file of the allocating line:")
    for group, size in sorted(by_file.items(), key=lambda x: -x[1]):
        print(f"  {size / KIB:+9.0f} KiB  {group}")


def main() -> int:
    if sys.argv[1:2] == ["--traced-serve"]:
        return traced_serve(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--generations", type=int, default=5000)
    parser.add_argument("--scrapes", type=int, default=20, help="warm scrapes after the settle time")
    parser.add_argument("--fstype", choices=("ramfs", "tmpfs"), default="ramfs")
    parser.add_argument("--trace", action="store_true", help="tracemalloc inside the serve process")
    parser.add_argument("--inspect", action="store_true",
                        help="serve under the wrapper without tracemalloc: pymalloc's and glibc's own figures, and "
                             "what malloc_trim(0) gives back")  # fmt: skip
    parser.add_argument("--runs", type=int, default=1,
                        help="start serve this many times on the same store (RSS varies by 1-2 MiB between "
                             "processes): each one's figures, then the median")  # fmt: skip
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="extra environment of the exporter and the baseline (repeatable)")  # fmt: skip
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench/memory.py needs root: it mounts a ramfs (sudo .venv/bin/python bench/memory.py)")
        return 2
    sys.path.insert(0, str(ROOT / "bench"))
    from run import SECRETS_PER_GENERATION, TEMPLATES_PER_GENERATION, Store, wait_until_settled

    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "PYTHONMALLOC"))}
    env.update(item.split("=", 1) for item in args.env)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(f"bench/memory.py: signal {signum}, cleaning up"))
    base = Path(tempfile.mkdtemp(prefix="sopsnix-bench-memory-"))
    os.chmod(base, 0o755)
    cleanup: list = []
    try:
        (base / "microvms").mkdir()
        store = Store(base, "secrets.d", args.fstype, SECRETS_PER_GENERATION, TEMPLATES_PER_GENERATION, seed=7)
        cleanup.append(store.unmount)
        print(f"building {args.generations} generations of "
              f"{SECRETS_PER_GENERATION + TEMPLATES_PER_GENERATION} files on {args.fstype}")  # fmt: skip
        store.grow(args.generations)
        config = base / "config.yml"
        config.write_text(json.dumps({
            "stores": [{"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), "keep_generations": 0}],
            "microvm": {"state_dir": str(base / "microvms")},
        }))  # fmt: skip
        wait_until_settled()
        extra = " ".join(args.env) or "(none)"
        print(f"environment: {extra}")
        figures = []
        for run in range(1, args.runs + 1):
            if args.runs > 1:
                print(f"\n--- run {run} of {args.runs}")
            figures.append(measure(args, config, base, env, cleanup))
        if args.runs > 1:
            print(f"\nmedian of {args.runs} runs:")
            for name in figures[0]:
                values = sorted(f[name] for f in figures)
                print(f"  {name}: {mib(statistics.median(values))} "
                      f"(runs: {', '.join(mib(v) for v in values)})")  # fmt: skip
    finally:
        for action in reversed(cleanup):
            try:
                action()
            except Exception as exc:
                print(f"cleanup: {exc!r}", file=sys.stderr)
        shutil.rmtree(base, ignore_errors=True)
    return 0


def measure(args: argparse.Namespace, config: Path, base: Path, env: dict[str, str], cleanup: list) -> dict[str, int]:
    """One baseline and one serve process: its figures printed, the main ones returned."""
    from run import wait_until_settled

    imported, imported_kinds = baseline(env)
    print(f"baseline, python -c 'import sops_nix_exporter.cli': VmRSS {mib(imported)}")
    served = Serve(config, base, env, args.trace, args.inspect)
    cleanup.append(served.stop)
    pid = served.process.pid
    started = status(pid)["VmRSS"]
    seen = {}
    if args.inspect:
        seen["started"] = served.allocators()
    start = time.perf_counter()
    get(served.port)
    cold = time.perf_counter() - start
    after_cold = status(pid)
    if args.inspect:
        seen["after the cold scrape"] = served.allocators()
    wait_until_settled()
    connection = http.client.HTTPConnection("127.0.0.1", served.port, timeout=120)
    for _ in range(args.scrapes):
        body = get(served.port, connection=connection)
    late = status(pid)
    kinds = smaps(pid)
    connection.close()
    print(f"serve: VmRSS {mib(started)} started; {mib(after_cold['VmRSS'])} after the cold scrape "
          f"({cold:.2f} s); {mib(late['VmRSS'])} after {args.scrapes} more (VmHWM {mib(late['VmHWM'])}, "
          f"RssAnon {mib(late['RssAnon'])}, RssFile {mib(late['RssFile'])}, threads {late['Threads']}); "
          f"exposition {len(body) / KIB:.0f} KiB")  # fmt: skip
    print(f"serve minus baseline: {mib(late['VmRSS'] - imported)}")
    print("resident by mapping (smaps): serve, the baseline, the difference")
    for kind, size in sorted(kinds.items(), key=lambda x: -x[1]):
        if size >= 2**20 // 10:
            print(f"  {mib(size):>10} {mib(imported_kinds.get(kind, 0)):>10} "
                  f"{mib(size - imported_kinds.get(kind, 0)):>10}  {kind}")  # fmt: skip
    if args.inspect:
        seen[f"after {args.scrapes} more"] = served.allocators()
        served.snapshot("trim")
        trimmed = status(pid)
        seen["after malloc_trim(0)"] = served.allocators()
        print(f"\nafter malloc_trim(0): VmRSS {mib(trimmed['VmRSS'])} ({mib(trimmed['VmRSS'] - late['VmRSS'])})")
        print(f"\n{'':52}" + "".join(f"{moment:>24}" for moment in seen))
        for name in seen["started"]:
            show = (lambda n: str(n)) if name.endswith(("arenas", "mark")) else mib
            print(f"  {name:50}" + "".join(f"{show(values[name]):>24}" for values in seen.values()))
        for _ in range(args.scrapes):
            get(served.port)
        print(f"after {args.scrapes} more scrapes: VmRSS {mib(status(pid)['VmRSS'])}")
    if args.trace:
        first = served.snapshot("import")
        last = served.snapshot("scraped")
        compare(first, last, Path(str(last) + ".done"), args.top)
        print("\n--- the highest sample of the run (taken when the traced size grew by 1 MiB), against the import:")
        peak = served.snapshot("peak")
        compare(first, peak, Path(str(peak) + ".done"), args.top)
    served.stop()
    cleanup.remove(served.stop)
    return {"baseline VmRSS": imported, "serve VmRSS after the cold scrape": after_cold["VmRSS"],
            f"serve VmRSS after {args.scrapes} more": late["VmRSS"],
            "serve minus baseline": late["VmRSS"] - imported}  # fmt: skip


if __name__ == "__main__":
    sys.exit(main())
