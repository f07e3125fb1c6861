"""The generation cache (exporter/stores/cache.py): a cached scan equals a fresh one after every kind of change.

Every test builds a real ramfs or tmpfs store, warms a CachingMeasurer on it, changes the store the way
sops-nix, an operator or a reboot would, and compares the cached scan with a scan by a plain Measurer
(no cache) of the same store. The walk counters show that the cache was really used and that a change
costs a walk of what changed, not of everything. No timing is asserted: figures live in bench/.

Every test that goes through Pair runs three times: with inotify (a warm scan stats no generation), with
inotify unavailable (watch_limit=0: every generation checked by lstat) and with fewer watches allowed than
the store has directories (some generations watched, the others checked by lstat).

The cache remembers only generations whose directories have been quiet for settle_ns. The tests use a
short settle time (still longer than any filesystem timestamp granularity) and wait it out where a test
needs what was just written to be remembered.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sops_nix_exporter import app, mountinfo
from sops_nix_exporter.stores.cache import PARALLEL_FROM, SETTLE_NS, CachingMeasurer
from sops_nix_exporter.collector.stores import StoresCollector
from sops_nix_exporter.config import Config, StoreConfig
from sops_nix_exporter.collector.frame import Exporter
from sops_nix_exporter.stores.scan import Measurer, StoreScan, Usage, measure, scan_store
from sops_nix_exporter.stores.walk import walk

from sopsnix import SopsStore, du_figures, mount, umount

ROOT = Path(__file__).resolve().parent.parent
SETTLE_SECONDS = 0.05  # above the coarsest timestamp granularity (one jiffy at HZ=100)


def secrets_for(generation: int, extra: int = 0) -> dict[str, bytes]:
    """What one activation writes: secrets, a name with "/" in it, and rendered templates (nested too)."""
    secrets: dict[str, bytes] = {f"secret-{i}": os.urandom(40 + 97 * i + generation) for i in range(6 + extra)}
    secrets["tls/key.pem"] = os.urandom(1704)
    secrets["rendered/app.env"] = b"A=1\n" * (600 + generation)
    secrets["rendered/nested/deep.conf"] = os.urandom(5000 + generation)
    return secrets


def settle() -> None:
    time.sleep(SETTLE_SECONDS + 0.02)


DIRECTORIES_PER_GENERATION = 4  # the generation, tls/, rendered/, rendered/nested/


@pytest.fixture(autouse=True, params=[None, 0, DIRECTORIES_PER_GENERATION + 1], ids=["inotify", "lstat", "few-watches"])
def watch_limit(request):
    """The watch budget of every Pair's measurer in this test."""
    Pair.watch_limit = request.param
    yield request.param
    Pair.watch_limit = None


class Pair:
    """A store scanned both ways: by a warm CachingMeasurer and by a plain Measurer."""

    watch_limit: int | None = None

    def __init__(self, store: SopsStore, keep_generations: int | None = 0, helpers: int | None = None) -> None:
        self.store = store
        self.config = StoreConfig(
            mountpoint=str(store.mountpoint), symlink=str(store.symlink), keep_generations=keep_generations
        )
        self.cached = CachingMeasurer(
            settle_ns=int(SETTLE_SECONDS * 1e9), watch_limit=self.watch_limit, helpers=helpers
        )

    def scan(self, measurer: Measurer) -> StoreScan:
        return scan_store(self.config, 0, mountinfo.read(), measurer)

    def compare(self) -> StoreScan:
        """Scan cached, then fresh, then cached again; all three must agree. Returns the fresh scan."""
        cached = self.scan(self.cached)
        fresh = self.scan(Measurer())
        assert cached == fresh
        assert self.scan(self.cached) == fresh
        return fresh

    def walks_for(self, action=None) -> int:
        """How many generations a cached scan walks (after action, if given)."""
        if action is not None:
            action()
        before = self.cached.walks
        self.scan(self.cached)
        return self.cached.walks - before


def warm(store: SopsStore, generations: int = 4, keep_generations: int | None = 0) -> Pair:
    for number in range(1, generations + 1):
        store.switch(secrets_for(number), keep_generations=keep_generations or 0)
    pair = Pair(store, keep_generations)
    settle()
    pair.compare()
    assert pair.walks_for() == 0, "a warm scan of an unchanged store walks nothing"
    assert pair.cached.known == generations
    limit = generations * DIRECTORIES_PER_GENERATION if pair.watch_limit is None else pair.watch_limit
    assert pair.cached.watches == limit // DIRECTORIES_PER_GENERATION * DIRECTORIES_PER_GENERATION
    return pair


def test_warm_scan_equals_fresh_and_find(store):
    pair = warm(store, generations=5)
    fresh = pair.compare()
    files, blocks, apparent = du_figures(store.mountpoint)
    assert (fresh.total.files, fresh.total.bytes, fresh.total.apparent_bytes) == (files, blocks, apparent)
    assert pair.cached.hits >= 5


def test_walk_equals_find(store):
    store.write_generation(1, secrets_for(1))
    path = str(store.generation_path(1))
    device = os.lstat(path).st_dev
    errors: dict[str, int] = {}
    files, blocks, size, complete, relatives, signature = walk(path, device, errors)
    usage = Usage.of_walk(files, blocks, size, complete)
    assert (usage.files, usage.bytes, usage.apparent_bytes) == du_figures(store.generation_path(1)) and not errors
    assert usage.complete and usage == measure(path, device, {})
    assert sorted(relatives) == ["rendered", "rendered/nested", "tls"]
    assert len(signature) == 4 * (1 + len(relatives))


def test_new_generation_costs_one_walk(store):
    pair = warm(store)
    assert pair.walks_for(lambda: store.switch(secrets_for(5), keep_generations=0)) == 1
    fresh = pair.compare()
    assert [g.number for g in fresh.generations] == [1, 2, 3, 4, 5] and fresh.current.number == 5


def test_pruned_generation_is_forgotten(store):
    pair = warm(store)
    assert pair.walks_for(lambda: store.switch(secrets_for(5), keep_generations=2)) == 1
    fresh = pair.compare()
    assert [g.number for g in fresh.generations] == [4, 5]
    settle()
    pair.scan(pair.cached)
    assert pair.cached.known == 2


def test_reused_number(store):
    """rm -r a generation and write it again under the same number with other content."""
    pair = warm(store)
    before = pair.scan(Measurer()).by_number(2)

    def rewrite():
        shutil.rmtree(store.generation_path(2))
        store.write_generation(2, secrets_for(2, extra=3))

    assert pair.walks_for(rewrite) == 1
    after = pair.compare().by_number(2)
    assert after.usage != before.usage


def test_rewritten_in_place(store):
    """The same directory (same inode) emptied and filled again: only its timestamps tell."""
    pair = warm(store)
    directory = store.generation_path(3)
    before = pair.scan(Measurer()).by_number(3)

    def rewrite():
        for entry in directory.iterdir():
            if entry.is_dir():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        for name, content in secrets_for(3, extra=2).items():
            (directory / name).parent.mkdir(parents=True, exist_ok=True)
            (directory / name).write_bytes(content)

    assert pair.walks_for(rewrite) == 1
    after = pair.compare().by_number(3)
    assert (after.inode, after.usage != before.usage) == (before.inode, True)


def test_recreated_pending_generation(store):
    """A generation written above the current one and never linked, then removed and written again."""
    pair = warm(store)
    store.write_generation(5, secrets_for(5))
    settle()
    pending = pair.compare()
    assert [g.number for g in pending.pending] == [5]

    def recreate():
        shutil.rmtree(store.generation_path(5))
        store.write_generation(5, secrets_for(5, extra=4))

    assert pair.walks_for(recreate) == 1
    again = pair.compare()
    assert again.by_number(5).usage != pending.by_number(5).usage


@pytest.mark.parametrize("where", ["rendered/nested", "rendered", "."])
def test_file_added_and_removed_below(store, where):
    pair = warm(store)
    directory = store.generation_path(2) / where
    added = directory / "added-later"
    assert pair.walks_for(lambda: added.write_bytes(os.urandom(9000))) == 1
    assert pair.compare().by_number(2).usage.files == pair.scan(Measurer()).by_number(2).usage.files
    settle()
    pair.scan(pair.cached)
    assert pair.walks_for(added.unlink) == 1
    pair.compare()


def test_directory_replaced_below(store):
    """rendered/ swapped for another directory by rename: the generation directory changes too."""
    pair = warm(store)
    generation = store.generation_path(1)
    (generation / "rendered.new").mkdir()
    (generation / "rendered.new" / "only.env").write_bytes(b"x" * 100)
    settle()
    pair.scan(pair.cached)
    shutil.rmtree(generation / "rendered")
    assert pair.walks_for(lambda: os.rename(generation / "rendered.new", generation / "rendered")) == 1
    assert pair.compare().by_number(1).usage.files == len(secrets_for(1)) - 2 + 1


def test_stacked_mount(store):
    """A second ramfs mounted on top of the store hides every generation; unmounting it shows them again."""
    pair = warm(store)
    lower = pair.compare()
    mount("ramfs", store.mountpoint, "mode=0751")
    try:
        store.switch(secrets_for(1), keep_generations=0)
        upper = pair.compare()
        assert upper.mounts == 2 and [g.number for g in upper.generations] == [1]
        assert upper.device != lower.device
    finally:
        umount(store.mountpoint)
    store.link(4)
    again = pair.compare()
    assert (again.mounts, again.device, again.generations) == (1, lower.device, lower.generations)


def test_mount_inside_a_generation(store):
    """A filesystem mounted on rendered/ is not part of the generation, and unmounting it is noticed."""
    pair = warm(store)
    rendered = store.generation_path(2) / "rendered"
    mount("ramfs", rendered, "mode=0751")
    try:
        (rendered / "on-the-mount").write_bytes(os.urandom(8000))
        assert pair.walks_for() == 1
        pair.compare()
    finally:
        umount(rendered)
    # Back to exactly the directories that were remembered before the mount: served from the cache again.
    assert pair.walks_for() == 0
    pair.compare()


def test_same_numbers_after_a_remount(store):
    """A reboot in small: the store's filesystem replaced by a fresh one holding the same numbers.

    A fresh tmpfs numbers its inodes from the start again and the device number is usually handed out
    again, so the same (device, inode) can name another directory: the timestamps must tell them apart.
    """
    pair = warm(store, generations=3)
    fstype = mountinfo.mounts_at(mountinfo.read(), os.path.realpath(store.mountpoint))[-1].fstype
    before = pair.compare()
    umount(store.mountpoint)
    mount(fstype, store.mountpoint, "mode=0751" if fstype == "ramfs" else "mode=0751,size=64m")
    for number in (1, 2, 3):
        store.write_generation(number, secrets_for(number, extra=number))
    store.link(3)
    after = pair.compare()
    assert [g.number for g in after.generations] == [1, 2, 3]
    assert [g.usage for g in after.generations] != [g.usage for g in before.generations]


def test_unsettled_generation_is_walked_every_time(store):
    """What was written within the settle time may still be being written: never remembered."""
    for number in (1, 2):
        store.switch(secrets_for(number), keep_generations=0)
    pair = Pair(store)
    assert SETTLE_NS >= 1_000_000_000
    pair.cached = CachingMeasurer(settle_ns=60 * SETTLE_NS)  # longer than the exporter's: no slow machine outruns it
    assert pair.walks_for() == 2
    assert pair.walks_for() == 2
    pair.compare()
    assert pair.cached.known == 0


def test_file_growing_during_the_settle_time(store):
    """A file still being written just after its entry was created is not frozen into the cache."""
    store.switch(secrets_for(1), keep_generations=0)
    pair = Pair(store)
    pair.cached = CachingMeasurer(settle_ns=60 * SETTLE_NS)  # what follows takes far less than that
    store.write_generation(2, {"secret": b"", "rendered/app.env": b""})
    assert pair.scan(pair.cached).by_number(2).usage.apparent_bytes == 0
    (store.generation_path(2) / "rendered" / "app.env").write_bytes(b"x" * 20000)
    (store.generation_path(2) / "secret").write_bytes(b"y" * 5000)
    assert pair.compare().by_number(2).usage.apparent_bytes == 25000


def test_stores_sharing_one_measurer(make_store):
    """forget_except after one store's scan keeps what is known about the other store."""
    first, second = make_store("ramfs", "first"), make_store("tmpfs", "second")
    for store in (first, second):
        for number in (1, 2, 3):
            store.switch(secrets_for(number), keep_generations=0)
    configs = [StoreConfig(mountpoint=str(s.mountpoint), symlink=str(s.symlink)) for s in (first, second)]
    cached = CachingMeasurer(settle_ns=int(SETTLE_SECONDS * 1e9))
    settle()
    scan = lambda measurer: [scan_store(c, 0, mountinfo.read(), measurer) for c in configs]  # noqa: E731
    assert scan(cached) == scan(Measurer())
    walks = cached.walks
    assert scan(cached) == scan(Measurer())
    assert cached.walks == walks and cached.known == 6
    second.switch(secrets_for(4), keep_generations=1)
    assert scan(cached) == scan(Measurer())
    assert cached.walks == walks + 1, "only the new generation is walked; the first store stays known"
    settle()
    scan(cached)
    assert cached.known == 3 + 1


def test_the_exporter_scrapes_through_the_cache(store):
    for number in (1, 2, 3):
        store.switch(secrets_for(number), keep_generations=0)
    config = Config(stores=[StoreConfig(mountpoint=str(store.mountpoint), symlink=str(store.symlink))])
    assert isinstance(next(c for c in app.collectors(config) if c.name == "stores").measurer, CachingMeasurer)
    stores = StoresCollector(config)
    exporter = Exporter([stores])
    stores.measurer.settle_ns = int(SETTLE_SECONDS * 1e9)
    settle()
    first = exporter.collect().result(StoresCollector)
    second = exporter.collect().result(StoresCollector)
    assert stores.measurer.walks == 3 and stores.measurer.hits == 3
    assert first == second == Exporter([StoresCollector(config, Measurer())]).collect().result(StoresCollector)


def test_a_walk_leaves_no_descriptor_open(store):
    warm(store)
    before = set(os.listdir("/proc/self/fd"))
    for number in (1, 2, 3, 4):
        path = str(store.generation_path(number))
        walk(path, os.lstat(path).st_dev, {})
    assert set(os.listdir("/proc/self/fd")) == before


# inotify: what timestamps cannot tell


# Without a watch on the generation, this is the one assumption the lstat check makes: inotify only.
@pytest.mark.parametrize("watch_limit", [None])
@pytest.mark.parametrize("change", ["same size", "larger", "truncated"])
def test_file_modified_in_place(store, watch_limit, change):
    """A file written again in place leaves its directory's timestamps alone: only inotify sees it."""
    pair = warm(store)
    before = pair.scan(Measurer()).by_number(2)
    target = store.generation_path(2) / "rendered" / "app.env"
    content = target.read_bytes()
    new = {"same size": os.urandom(len(content)), "larger": content * 3, "truncated": content[:10]}[change]

    def rewrite():
        with open(target, "r+b") as f:
            f.write(new)
            f.truncate()

    assert pair.walks_for(rewrite) == 1
    after = pair.compare().by_number(2)
    assert (after.usage == before.usage) == (change == "same size")
    settle()
    assert pair.walks_for() == 0, "remembered and watched again after the walk"
    assert pair.cached.watches == 4 * DIRECTORIES_PER_GENERATION


@pytest.mark.parametrize("watch_limit", [None])
def test_a_warm_scan_stats_no_generation(store, watch_limit):
    """With every generation watched, a warm scan serves them all from what inotify vouches for."""
    pair = warm(store, generations=3)
    pair.cached.usage_of = None  # the stat path, made unusable: any generation checked by lstat fails the scan
    try:
        hits = pair.cached.hits
        assert pair.scan(pair.cached) == pair.scan(Measurer())
        assert pair.cached.hits == hits + 3
    finally:
        del pair.cached.usage_of


def test_watches_follow_what_is_remembered(store, watch_limit):
    """Pruned and replaced generations give their watches back; nothing is left watched after close()."""
    pair = warm(store)
    store.switch(secrets_for(5), keep_generations=2)
    settle()
    pair.compare()
    expected = 2 * DIRECTORIES_PER_GENERATION if watch_limit is None else min(watch_limit, 2 * 4) // 4 * 4
    assert pair.cached.known == 2 and pair.cached.watches == expected
    pair.cached.close()
    assert pair.cached.watches == 0
    assert pair.walks_for() == 0, "still served, by the lstat check"
    pair.compare()


def test_a_discarded_measurer_closes_its_descriptor(store, watch_limit):
    before = set(os.listdir("/proc/self/fd"))
    pair = warm(store, generations=2)
    del pair
    import gc

    gc.collect()
    assert set(os.listdir("/proc/self/fd")) == before


# A first scan shared with helper processes (from PARALLEL_FROM generations not known yet)


def many_generations(store: SopsStore, count: int = PARALLEL_FROM + 40) -> None:
    for number in range(1, count + 1):
        store.write_generation(number, secrets_for(number))
    store.link(count)


def with_helpers(store: SopsStore, helpers: int = 2) -> Pair:
    """A Pair whose measurer may start helpers, on a store with enough generations for them to start."""
    many_generations(store)
    pair = Pair(store, helpers=helpers)
    settle()
    return pair


def test_first_scan_shared_with_helpers(store, watch_limit):
    """Helpers walk two thirds of a first scan: the result equals a fresh walk, the watches they placed are
    the exporter's, and a change in a generation a helper walked is noticed like any other."""
    pair = with_helpers(store)
    count = PARALLEL_FROM + 40
    assert pair.scan(pair.cached) == pair.scan(Measurer())
    assert pair.cached.helpers_started == 2 and pair.cached.walks == count
    assert pair.cached.known == count
    expected = count * DIRECTORIES_PER_GENERATION if watch_limit is None else watch_limit // 4 * 4
    if watch_limit is None:
        assert pair.cached.watches == expected  # every directory, whichever process walked it
    else:
        assert pair.cached.watches <= expected  # the budget, shared out: never exceeded
    assert pair.walks_for() == 0
    assert pair.cached.helpers_started == 2, "a warm scan starts no helper"

    last = store.generation_path(count)  # in the last helper's share
    assert pair.walks_for(lambda: (last / "rendered" / "nested" / "added").write_bytes(os.urandom(3000))) == 1
    pair.compare()
    settle()
    pair.walks_for()  # once quiet, the changed generation is remembered (compare() may have done it already)
    shutil.rmtree(store.generation_path(count - 1))
    assert pair.walks_for() == 0
    assert pair.compare().by_number(count - 1) is None
    assert pair.cached.known == count - 1


@pytest.mark.parametrize("watch_limit", [None])
@pytest.mark.parametrize("interpreter", ["/nonexistent/python3", "/bin/false"], ids=["cannot-start", "fails"])
def test_helpers_that_fail_leave_the_walk_to_the_exporter(store, watch_limit, interpreter, monkeypatch, caplog):
    """An interpreter that cannot start (missing, or forbidden by a sandbox) or a helper that ends without an
    answer: the exporter walks those generations itself, the figures are the same, and the log says so."""
    pair = with_helpers(store)
    count = PARALLEL_FROM + 40
    monkeypatch.setattr("sys.executable", interpreter)
    with caplog.at_level("WARNING", logger="sops_nix_exporter.stores.cache"):
        assert pair.scan(pair.cached) == pair.scan(Measurer())
    monkeypatch.undo()
    assert pair.cached.walks == count and pair.cached.known == count
    assert pair.cached.watches == count * DIRECTORIES_PER_GENERATION
    warned = " ".join(record.getMessage() for record in caplog.records)
    if interpreter == "/bin/false":
        assert pair.cached.helpers_started == 2 and "ended with status 1 and no answer" in warned
    else:
        assert pair.cached.helpers == 0 and "cannot start a helper process" in warned
    assert str(store.mountpoint) not in warned
    assert pair.walks_for() == 0


@pytest.mark.parametrize("watch_limit", [None])
def test_helpers_open_only_directories(store, watch_limit, scratch):
    """Traced with strace(1) -f: the helper processes really walk (they list generation directories) and, like
    the exporter, open nothing below the mount point but directories."""
    from tools import require_tool

    strace = require_tool("strace", "strace")
    many_generations(store)
    trace = scratch / "trace"
    script = (
        "import sys; from sops_nix_exporter import mountinfo; from sops_nix_exporter.stores.cache import CachingMeasurer; "
        "from sops_nix_exporter.config import StoreConfig; from sops_nix_exporter.stores.scan import scan_store; "
        "measurer = CachingMeasurer(settle_ns=0, helpers=2); "
        "scan = scan_store(StoreConfig(mountpoint=sys.argv[1], symlink=sys.argv[2]), 0, mountinfo.read(), measurer); "
        "assert measurer.helpers_started == 2 and len(scan.generations) == int(sys.argv[3])"
    )
    traced = "trace=open,openat,openat2,creat,execve"
    command = [strace, "-f", "-qq", "-s", "4096", "-e", traced, "-o", str(trace), sys.executable, "-c", script]
    command += [str(store.mountpoint), str(store.symlink), str(PARALLEL_FROM + 40)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    lines = trace.read_text().splitlines()
    helpers = {line.split()[0] for line in lines if "execve(" in line and '"-I", "-S", "-c"' in line}
    assert len(helpers) == 2, "the trace shows no helper process started"
    below = re.escape(str(store.mountpoint)) + r'(?:/[^"]*)?'
    inside = re.compile(r'open(?:at2?)?\((?:[^,]+, )?"(' + below + r')", ([^,)]+)')
    opened = [(line.split()[0], *m.groups()) for line in lines if (m := inside.search(line))]
    assert {pid for pid, _, _ in opened} >= helpers, "each helper lists generation directories"
    assert [(path, flags) for _, path, flags in opened if "O_DIRECTORY" not in flags] == []


@pytest.mark.parametrize("watch_limit", [None])
def test_a_helper_does_not_inherit_blocked_signals(watch_limit):
    """The exporter blocks SIGTERM and SIGINT in every thread (exporter/cli.py) and a child inherits the mask:
    a helper unblocks them first thing, so that stopping the service ends it too. It then waits for its
    request, which is when its mask is read here."""
    from sops_nix_exporter.stores import walk as walker

    blocked = {signal.SIGTERM, signal.SIGINT}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
    try:
        helper = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", walker.HELPER_CODE, walker.HELPER_PATH],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )  # fmt: skip
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    try:
        deadline = time.monotonic() + 10
        while True:
            status = Path(f"/proc/{helper.pid}/status").read_text()
            mask = int(re.search(r"^SigBlk:\s+([0-9a-f]+)$", status, re.MULTILINE).group(1), 16)
            if mask == 0 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert mask == 0, f"the helper still blocks signals {mask:#x}"
        helper.terminate()
        assert helper.wait(timeout=10) == -signal.SIGTERM
    finally:
        if helper.poll() is None:
            helper.kill()
            helper.wait()
        helper.stdin.close()
        helper.stdout.close()
