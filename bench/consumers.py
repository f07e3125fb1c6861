"""Benchmark for issue 14: what finding consumers costs a scrape, next to a plain loop over /proc/PID/comm.

Run as root from the repository (it mounts a ramfs and starts processes in mount namespaces of their own):

    sudo .venv/bin/python bench/consumers.py                # 1,000 processes in 50 namespaces, 5 holding a mount
    sudo .venv/bin/python bench/consumers.py --namespaces 100 --per-namespace 10 --holding 20

It builds the workload in a temporary directory: a real ramfs store with one generation and its symlink,
then NAMESPACES `unshare -m` mount namespaces of PER_NAMESPACE sleeping processes each (a shell that starts
the others, then becomes a sleep itself), the first HOLDING of which bind-mount the symlink, as a container's
`--bind-ro=SYMLINK:/run/secrets` does. It times the process-reading part of a scrape as
readers/shares.scan_shares does it (one listing of /proc, then readers/mounts.scan_consumers and
readers/virtiofsd.find on it) against
bench/run.py's comm loop, in turns (a change of load falls on both), and prints the best and the median.

Then it does the same as nobody with no capability (setpriv), for whom another user's /proc/PID/ns/mnt is
closed, so scan_consumers tells namespaces apart by the content of each process's mount table. The store is
mounted 0755 for that run only so nobody can list it (a store's scan needs that; sops-nix's is 0751).
Everything is removed at the end: processes are ended by their PID, the store unmounted. A benchmark, not a
test: nothing here fails a build.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from run import Timing, comm_loop, interleaved, machine, ms  # noqa: E402

from sops_nix_exporter.collector.stores import scan_stores  # noqa: E402
from sops_nix_exporter.config import Config, MicrovmConfig, StoreConfig  # noqa: E402
from sops_nix_exporter.readers import holders, mounts, virtiofsd  # noqa: E402
from sops_nix_exporter.readers import proc as procfs  # noqa: E402

TARGET = 3.0  # within 3x the comm loop
NOBODY = 65534

# $1 symlink, $2 target, $3 whether to mount, $4 processes in all. Prints the PIDs it started, then "ready".
NAMESPACE = """
if [ "$3" = 1 ]; then mount --bind "$1" "$2" || exit 1; fi
i=1
while [ "$i" -lt "$4" ]; do sleep 3600 </dev/null >/dev/null & echo "$!"; i=$((i + 1)); done
echo ready
exec sleep 3600 >/dev/null
"""


class Namespace:
    def __init__(self, symlink: Path, target: Path, hold: bool, processes: int) -> None:
        target.mkdir()
        self.process = subprocess.Popen(
            ["unshare", "-m", "--propagation", "private", "sh", "-c", NAMESPACE, "sh", str(symlink), str(target),
             "1" if hold else "0", str(processes)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
        )  # fmt: skip
        self.children: list[int] = []
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line == b"ready\n":
                break
            self.children.append(int(line))
        else:
            raise RuntimeError("a namespace did not start (unshare -m and mount --bind need root)")
        self.process.stdout.close()

    def stop(self) -> None:
        for pid in self.children:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait()


def scrape_part(stores) -> tuple[mounts.ConsumersScan, list]:
    """What scan_shares reads of processes per scrape: one pass over /proc for both readers."""
    listing = procfs.processes("/proc")
    older = [s for s in stores if s.current is not None and s.generations[0].number < s.current.number]
    if older:  # working directories and roots, where a generation below the current one could be freed
        holders.holders(older, "/proc", listing=listing)
    return mounts.scan_consumers(stores, "/proc", listing), virtiofsd.find("/proc", listing)


def measure(mountpoint: str, symlink: str, state_dir: str, repeat: int) -> dict:
    stores = scan_stores(Config(stores=[StoreConfig(mountpoint=mountpoint, symlink=symlink)],
                                microvm=MicrovmConfig(state_dir=state_dir))).stores  # fmt: skip
    found, _ = scrape_part(stores)
    timings = interleaved({
        "comm": comm_loop,
        "scrape": lambda: scrape_part(stores),
        "scan_consumers": lambda: mounts.scan_consumers(stores),
        "find": virtiofsd.find,
    }, repeat)  # fmt: skip
    return {
        "processes": sum(1 for e in os.listdir("/proc") if e.isdigit()),
        "namespaces_read": found.namespaces,
        "unreadable": found.unreadable,
        "consumers": [(c.consumer, c.kind, c.generation, c.deleted) for c in found.consumers],
        "ns_mnt_readable": sum(1 for pid, _ in mounts.procfs.processes("/proc")
                               if mounts.procfs.mount_namespace(pid, "/proc") is not None),
        "timings": {name: {"wall": t.wall, "cpu": t.cpu} for name, t in timings.items()},
    }


def show(title: str, result: dict) -> float:
    timings = {name: Timing(t["wall"], t["cpu"]) for name, t in result["timings"].items()}
    comm, scrape = timings["comm"], timings["scrape"]
    ratio = scrape.best / comm.best
    print(f"\n{title}")
    print(f"  processes on the host: {result['processes']}; mount namespaces read: {result['namespaces_read']}; "
          f"unreadable: {result['unreadable']}; processes whose ns/mnt we can read: {result['ns_mnt_readable']}")  # fmt: skip
    print(f"  consumers found: {result['consumers']}")
    print(f"  comm loop:                       {comm}")
    print(f"  scan_consumers + virtiofsd.find: {scrape}")
    print(f"    scan_consumers alone:          {timings['scan_consumers']}")
    print(f"    virtiofsd.find alone:          {timings['find']}")
    print(f"  scrape part / comm loop = {ratio:.2f} (median {scrape.median / comm.median:.2f}, "
          f"cpu {scrape.cpu_best / comm.cpu_best:.2f}); target <= {TARGET:.0f}x: {'met' if ratio <= TARGET else 'NOT met'}")  # fmt: skip
    return ratio


def worker(args: argparse.Namespace) -> None:
    print(json.dumps(measure(args.mountpoint, args.symlink, args.state_dir, args.repeat)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--namespaces", type=int, default=50)
    parser.add_argument("--per-namespace", type=int, default=20)
    parser.add_argument("--holding", type=int, default=5, help="namespaces that bind-mount the generation")
    parser.add_argument("--repeat", type=int, default=21)
    parser.add_argument("--no-unprivileged", action="store_true", help="skip the run as nobody")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--mountpoint", help=argparse.SUPPRESS)
    parser.add_argument("--symlink", help=argparse.SUPPRESS)
    parser.add_argument("--state-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    if os.geteuid() != 0:
        sys.exit("run as root: it mounts a ramfs and bind-mounts in new mount namespaces")

    base = Path(tempfile.mkdtemp(prefix="sopsnix-bench-consumers-"))
    base.chmod(0o755)
    store = base / "store"
    store.mkdir()
    namespaces: list[Namespace] = []
    mounted = False
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    try:
        subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0755", "ramfs", str(store)], check=True)
        mounted = True
        (store / "1").mkdir(mode=0o755)
        for name in ("db-password", "api-token", "tls-key"):
            (store / "1" / name).write_text("secret\n")
        symlink = base / "secrets"
        symlink.symlink_to(store / "1")
        print(f"starting {args.namespaces} mount namespaces of {args.per_namespace} processes, "
              f"{args.holding} holding generation 1")  # fmt: skip
        for index in range(args.namespaces):
            namespaces.append(Namespace(symlink, base / f"target-{index}", index < args.holding, args.per_namespace))
        # An activation after they mounted it: generation 1 is now an older one, as readers' generations are,
        # so the scrape also reads every process's working directory and root (readers/holders.py).
        (store / "2").mkdir(mode=0o755)
        for name in ("db-password", "api-token", "tls-key"):
            (store / "2" / name).write_text("rotated\n")
        (base / "secrets.tmp").symlink_to(store / "2")
        os.rename(base / "secrets.tmp", symlink)
        print("machine: " + "; ".join(f"{k}: {v}" for k, v in machine().items()))

        root_result = measure(str(store), str(symlink), str(base / "microvms"), args.repeat)
        ratios = {"root": show("As root (namespaces told apart by /proc/PID/ns/mnt)", root_result)}
        results = {"root": root_result}
        if not args.no_unprivileged:
            command = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all",
                       "--bounding-set=-all", sys.executable, str(Path(__file__).resolve()), "--worker",
                       "--mountpoint", str(store), "--symlink", str(symlink), "--state-dir", str(base / "microvms"),
                       "--repeat", str(args.repeat)]  # fmt: skip
            run = subprocess.run(command, capture_output=True, text=True, cwd="/")
            if run.returncode != 0:
                print(f"\nthe run as nobody failed: {run.stderr.strip()[-800:]}")
            else:
                results["nobody"] = json.loads(run.stdout)
                ratios["nobody"] = show("As nobody without capabilities (ns/mnt closed: told apart by mount-table "
                                        "content)", results["nobody"])  # fmt: skip
        print("\nsummary: " + ", ".join(f"{who} {ratio:.2f}x the comm loop" for who, ratio in ratios.items()))
        best = {who: {n: ms(min(t["wall"])) for n, t in r["timings"].items()} for who, r in results.items()}
        print("best: " + json.dumps(best))
    finally:
        for namespace in namespaces:
            namespace.stop()
        if mounted:
            subprocess.run(["umount", str(store)], check=False)
        shutil.rmtree(base, ignore_errors=True)
        signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    main()
