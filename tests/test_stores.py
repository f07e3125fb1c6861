"""The store scan and its metrics, on real ramfs and tmpfs mounts laid out and switched like sops-nix.

Every expected figure comes from outside the exporter: byte and file counts from find(1) (du_figures),
filesystem types from findmnt(8), host memory from /proc/meminfo, generation numbers from how the test
built the store. The golden expositions (tests/golden/, see its README) pin the whole output of
`python -m sops_nix_exporter textfile` for a fixed fixture.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from sops_nix_exporter import app, logs
from sops_nix_exporter.check import report
from sops_nix_exporter.collector.stores import StoresCollector, scan_stores
from sops_nix_exporter.config import Config, StoreConfig
from sops_nix_exporter.collector.frame import Collector, Exporter, MetricSpec, RegistryAdapter
from sops_nix_exporter.stores.scan import Measurer, SymlinkState

from goldens import compare_golden, golden_mask
from scrape import series, value
from serving import ROOT, run_cli, write_config
from sopsnix import (
    OTHER_FSTYPE,
    Secrets,
    SopsStore,
    add_non_generations,
    config_data,
    du_figures,
    findmnt_fstype,
    mount,
    mounted,
    sops_layout,
    store_config,
    umount,
)
from tools import require_tool

# ---------------------------------------------------------------------------------------------------------
# Helpers shared with test_cli.py and test_http.py


def host_memory_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no MemTotal in /proc/meminfo")


def exposition(config: Config) -> str:
    _, registry = app.build(config, process_metrics=False)
    return generate_latest(registry).decode()


# Never the host's /var/lib/microvms: an empty (never created) state directory unless a test sets one.


def config_for(*stores: dict, **extra) -> Config:
    return Config.model_validate(config_data(*stores, **extra))


# ---------------------------------------------------------------------------------------------------------
# The figures of a sops-nix store


def test_sops_layout_figures(store, promtool_check):
    secrets = Secrets()
    layout = sops_layout(store, secrets)
    assert layout == {"generations": [3, 4, 5], "current": 4, "pending": [5]}
    figures = {n: du_figures(store.generation_path(n)) for n in layout["generations"]}
    # The layout is only a meaningful test if the non-generations would change the figures.
    assert du_figures(store.mountpoint)[1] > sum(f[1] for f in figures.values()) + 40000
    # Sparse files make memory and size differ; the FIFO and symlinks are not regular files.
    assert sum(f[2] for f in figures.values()) > sum(f[1] for f in figures.values())

    text = exposition(config_for(store_config(store, keep_generations=2, memory_budget_bytes=123456789)))
    promtool_check(text)
    mp = str(store.mountpoint)
    assert value(text, "sopsnix_store_up", mountpoint=mp) == 1
    assert value(text, "sopsnix_generations", mountpoint=mp) == 3
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == sum(f[1] for f in figures.values())
    assert value(text, "sopsnix_generations_apparent_bytes", mountpoint=mp) == sum(f[2] for f in figures.values())
    assert value(text, "sopsnix_current_generation", mountpoint=mp) == 4
    assert value(text, "sopsnix_current_generation_bytes", mountpoint=mp) == figures[4][1]
    assert value(text, "sopsnix_current_generation_files", mountpoint=mp) == figures[4][0]
    assert figures[4][0] == 8  # seven secrets and the sparse file
    assert value(text, "sopsnix_oldest_generation", mountpoint=mp) == 3
    assert value(text, "sopsnix_pending_generations", mountpoint=mp) == 1
    assert value(text, "sopsnix_symlink_ok", mountpoint=mp) == 1
    assert value(text, "sopsnix_symlink_info", mountpoint=mp, symlink=str(store.symlink), state="ok") == 1
    assert value(text, "sopsnix_last_switch_timestamp_seconds", mountpoint=mp) == os.lstat(store.symlink).st_mtime
    assert value(text, "sopsnix_mounts", mountpoint=mp) == 1
    assert series(text, "sopsnix_store_info") == [{"mountpoint": mp, "fstype": findmnt_fstype(store.mountpoint)}]
    assert value(text, "sopsnix_keep_generations", mountpoint=mp) == 2
    assert value(text, "sopsnix_memory_budget_bytes", mountpoint=mp) == 123456789
    for reason in ("permission_denied", "vanished", "error"):
        assert value(text, "sopsnix_store_scan_errors", mountpoint=mp, reason=reason) == 0
    assert value(text, "sopsnix_host_memory_bytes") == host_memory_bytes()
    assert value(text, "sopsnix_scrape_collector_success", collector="stores") == 1
    assert secrets.leaked(text) == []


def test_store_info_names_the_filesystem_type(make_store):
    """Both kinds sops-nix uses, told apart through the mount table, not through the fixture's word."""
    ram, tmp = make_store("ramfs", "ram"), make_store("tmpfs", "tmp")
    for s in (ram, tmp):
        s.write_generation(1, {"x": "y"})
        s.link(1)
    text = exposition(config_for(store_config(ram), store_config(tmp)))
    assert {tuple(sorted(d.items())) for d in series(text, "sopsnix_store_info")} == {
        (("fstype", "ramfs"), ("mountpoint", str(ram.mountpoint))),
        (("fstype", "tmpfs"), ("mountpoint", str(tmp.mountpoint))),
    }


def test_only_decimal_directories_are_generations(store):
    """age-keys.txt, gpg-home, "007" (a leading zero is not how sops-nix names one), signs, non-ASCII digits,
    a numeric file and a numeric symlink are never counted; "0" is a decimal name and counts."""
    secrets = Secrets()
    store.mountpoint.chmod(0o751)
    (store.mountpoint / "gpg-home").mkdir()
    (store.mountpoint / "gpg-home" / "pubring.kbx").write_bytes(secrets.content(20000))
    add_non_generations(store, secrets)
    text = exposition(config_for(store_config(store)))
    mp = str(store.mountpoint)
    assert value(text, "sopsnix_generations", mountpoint=mp) == 0
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == 0
    assert value(text, "sopsnix_oldest_generation", mountpoint=mp) is None

    (store.mountpoint / "0").mkdir()
    (store.mountpoint / "0" / secrets.name()).write_bytes(secrets.content(100))
    store.write_generation(12, {secrets.name(): secrets.content(5000)})
    text = exposition(config_for(store_config(store)))
    assert value(text, "sopsnix_generations", mountpoint=mp) == 2
    assert value(text, "sopsnix_oldest_generation", mountpoint=mp) == 0
    expected = du_figures(store.mountpoint / "0")[1] + du_figures(store.generation_path(12))[1]
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == expected == 4096 + 8192
    # "007" is a directory whose int() is 7 but it is not generation 7: linking it is "outside".
    store.symlink.symlink_to(store.mountpoint / "007")
    text = exposition(config_for(store_config(store)))
    assert value(text, "sopsnix_symlink_info", mountpoint=mp, symlink=str(store.symlink), state="outside") == 1
    assert value(text, "sopsnix_current_generation", mountpoint=mp) is None


def test_default_budget_is_a_share_of_host_memory(store):
    store.write_generation(1, {"a": "b"})
    memory = host_memory_bytes()
    other = store_config(store)
    fixed = {
        "mountpoint": str(store.mountpoint) + "-elsewhere",
        "symlink": str(store.symlink) + "-elsewhere",
        "memory_budget_bytes": 0,
    }
    text = exposition(config_for(other, fixed))
    assert value(text, "sopsnix_memory_budget_bytes", mountpoint=str(store.mountpoint)) == int(memory * 0.01)
    assert value(text, "sopsnix_memory_budget_bytes", mountpoint=fixed["mountpoint"]) == 0
    text = exposition(config_for(other, memory_budget_ratio=0.25))
    assert value(text, "sopsnix_memory_budget_bytes", mountpoint=str(store.mountpoint)) == int(memory * 0.25)
    assert value(text, "sopsnix_host_memory_bytes") == memory
    # keepGenerations is published only when configured.
    assert value(text, "sopsnix_keep_generations", mountpoint=str(store.mountpoint)) is None


# ---------------------------------------------------------------------------------------------------------
# Where the symlink points


def _link_ok(store: SopsStore) -> None:
    store.link(2)


def _link_relative(store: SopsStore) -> None:
    store.symlink.symlink_to(os.path.relpath(store.generation_path(2), store.symlink.parent))


def _link_chain(store: SopsStore) -> None:
    hop = store.symlink.with_name("hop")
    hop.symlink_to(store.generation_path(2))
    store.symlink.symlink_to(hop)


def _link_missing(store: SopsStore) -> None:
    pass


def _link_pruned(store: SopsStore) -> None:
    store.symlink.symlink_to(store.mountpoint / "9")  # a generation that no longer exists


def _link_loop(store: SopsStore) -> None:
    store.symlink.symlink_to(store.symlink)


def _link_outside_dir(store: SopsStore) -> None:
    elsewhere = store.symlink.with_name("elsewhere")
    elsewhere.mkdir()
    store.symlink.symlink_to(elsewhere)


def _link_mountpoint(store: SopsStore) -> None:
    store.symlink.symlink_to(store.mountpoint)


def _link_into_generation(store: SopsStore) -> None:
    store.symlink.symlink_to(store.generation_path(2) / "rendered")


def _link_to_file(store: SopsStore) -> None:
    store.symlink.symlink_to(store.mountpoint / "age-keys.txt")


SYMLINKS = {
    "ok": (_link_ok, "ok"),
    "relative": (_link_relative, "ok"),
    "chain": (_link_chain, "ok"),
    "missing": (_link_missing, "missing"),
    "pruned": (_link_pruned, "dangling"),
    "loop": (_link_loop, "dangling"),
    "outside_dir": (_link_outside_dir, "outside"),
    "mountpoint": (_link_mountpoint, "outside"),
    "into_generation": (_link_into_generation, "outside"),
    "to_file": (_link_to_file, "outside"),
}


@pytest.mark.parametrize("case", sorted(SYMLINKS))
def test_symlink_states(make_store, case):
    store = make_store("ramfs")
    secrets = Secrets()
    for number in (1, 2, 3):
        store.write_generation(number, {secrets.name(): secrets.content(3000), "rendered/x": "y"})
    (store.mountpoint / "age-keys.txt").write_bytes(secrets.content(80))
    link, state = SYMLINKS[case]
    link(store)
    text = exposition(config_for(store_config(store)))
    mp = str(store.mountpoint)
    assert series(text, "sopsnix_symlink_info") == [{"mountpoint": mp, "symlink": str(store.symlink), "state": state}]
    assert value(text, "sopsnix_symlink_ok", mountpoint=mp) == (1 if state == "ok" else 0)
    assert value(text, "sopsnix_generations", mountpoint=mp) == 3
    if state == "ok":
        assert value(text, "sopsnix_current_generation", mountpoint=mp) == 2
        assert value(text, "sopsnix_pending_generations", mountpoint=mp) == 1
        assert value(text, "sopsnix_current_generation_bytes", mountpoint=mp) == du_figures(store.generation_path(2))[1]
    else:
        for name in ("current_generation", "current_generation_bytes", "current_generation_files",
                     "pending_generations"):  # fmt: skip
            assert value(text, f"sopsnix_{name}", mountpoint=mp) is None, name
    if state == "missing":
        assert value(text, "sopsnix_last_switch_timestamp_seconds", mountpoint=mp) is None
    else:
        assert value(text, "sopsnix_last_switch_timestamp_seconds", mountpoint=mp) == os.lstat(store.symlink).st_mtime


def test_last_switch_is_the_symlink_mtime(store):
    store.write_generation(1, {"a": "b"})
    store.link(1)
    os.utime(store.symlink, (1600000000, 1700000000.25), follow_symlinks=False)
    os.utime(store.generation_path(1), (1, 2))  # the target's times must not matter
    text = exposition(config_for(store_config(store)))
    assert value(text, "sopsnix_last_switch_timestamp_seconds", mountpoint=str(store.mountpoint)) == 1700000000.25


# ---------------------------------------------------------------------------------------------------------
# Stores that are absent, not directories, or hidden under another mount


def test_missing_store(scratch):
    mp = scratch / "never-mounted.d"
    text = exposition(config_for({"mountpoint": str(mp), "symlink": str(scratch / "never-linked"),
                                  "keep_generations": 1}))  # fmt: skip
    assert value(text, "sopsnix_store_up", mountpoint=str(mp)) == 0
    assert value(text, "sopsnix_mounts", mountpoint=str(mp)) == 0
    assert value(text, "sopsnix_symlink_ok", mountpoint=str(mp)) == 0
    assert series(text, "sopsnix_symlink_info") == [
        {"mountpoint": str(mp), "symlink": str(scratch / "never-linked"), "state": "missing"}
    ]
    # Nothing about generations, no scan errors, and no filesystem type: there is no filesystem there.
    for name in ("generations", "generations_bytes", "generations_apparent_bytes", "current_generation",
                 "oldest_generation", "pending_generations", "last_switch_timestamp_seconds"):  # fmt: skip
        assert value(text, f"sopsnix_{name}", mountpoint=str(mp)) is None, name
    assert series(text, "sopsnix_store_scan_errors") == []
    assert series(text, "sopsnix_store_info") == []
    assert value(text, "sopsnix_keep_generations", mountpoint=str(mp)) == 1
    assert value(text, "sopsnix_scrape_collector_success", collector="stores") == 1


def test_mountpoint_that_is_a_file(scratch):
    mp = scratch / "secrets.d"
    mp.write_text("not a directory\n")
    scan = scan_stores(config_for({"mountpoint": str(mp), "symlink": str(scratch / "secrets")})).stores[0]
    assert (scan.up, scan.down_reason, scan.generations) == (False, "not_a_directory", [])


def test_stacked_mount_shows_the_top(store):
    """A second filesystem mounted over the store hides the generations below, which still hold memory."""
    secrets = Secrets()
    for number in (1, 2, 3):
        store.write_generation(number, {secrets.name(): secrets.content(9000)})
    store.link(3)
    bottom_type = findmnt_fstype(store.mountpoint)
    top_type = OTHER_FSTYPE[bottom_type]
    config = config_for(store_config(store))
    mp = str(store.mountpoint)
    mount(top_type, store.mountpoint, "mode=0751")
    try:
        assert findmnt_fstype(store.mountpoint) == top_type
        store.write_generation(1, {secrets.name(): secrets.content(100)})
        text = exposition(config)
        assert value(text, "sopsnix_mounts", mountpoint=mp) == 2
        assert series(text, "sopsnix_store_info") == [{"mountpoint": mp, "fstype": top_type}]
        assert value(text, "sopsnix_generations", mountpoint=mp) == 1
        assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == du_figures(store.mountpoint)[1] == 4096
        # The symlink names .../3, which the top mount does not have.
        assert value(text, "sopsnix_symlink_info", mountpoint=mp, symlink=str(store.symlink), state="dangling") == 1
    finally:
        umount(store.mountpoint)
    text = exposition(config)  # each scrape reads afresh: the stack is gone
    assert value(text, "sopsnix_mounts", mountpoint=mp) == 1
    assert series(text, "sopsnix_store_info") == [{"mountpoint": mp, "fstype": bottom_type}]
    assert value(text, "sopsnix_generations", mountpoint=mp) == 3
    assert value(text, "sopsnix_current_generation", mountpoint=mp) == 3


def test_mountpoint_with_escaped_characters(require_root, scratch):
    """The kernel escapes space, tab and backslash in /proc/self/mountinfo."""
    parent = scratch / "odd name\twith\\escapes"
    parent.mkdir()
    with mounted("ramfs", base=parent) as mp:
        s = SopsStore(mp, scratch / "secrets")
        s.write_generation(1, {"a": "b"})
        s.link(1)
        text = exposition(config_for(store_config(s)))
        assert value(text, "sopsnix_mounts", mountpoint=str(mp)) == 1
        assert series(text, "sopsnix_store_info") == [{"mountpoint": str(mp), "fstype": "ramfs"}]


def test_every_scrape_reads_afresh(store):
    """A switch with pruning shows on the next scrape: the pruned generation is gone from every figure."""
    secrets = Secrets()
    config = config_for(store_config(store, keep_generations=1))
    mp = str(store.mountpoint)
    _, registry = app.build(config, process_metrics=False)
    for expected_current in (1, 2, 3):
        store.switch({secrets.name(): secrets.content(6000 * expected_current)}, keep_generations=1)
        text = generate_latest(registry).decode()
        assert value(text, "sopsnix_current_generation", mountpoint=mp) == expected_current
        assert value(text, "sopsnix_oldest_generation", mountpoint=mp) == expected_current
        assert value(text, "sopsnix_generations", mountpoint=mp) == 1
        assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == du_figures(store.mountpoint)[1]


# ---------------------------------------------------------------------------------------------------------
# Races and failures


class PruningMeasurer(Measurer):
    """Deletes a generation for real just before the scan measures it, as a concurrent prune would."""

    def __init__(self, victim: Path) -> None:
        self.victim = victim
        self.deleted = False

    def usage(self, path, device, errors):
        if Path(path) == self.victim and not self.deleted:
            shutil.rmtree(self.victim)
            self.deleted = True
        return super().usage(path, device, errors)


@pytest.mark.parametrize("victim", [1, 3], ids=["old", "current"])
def test_generation_deleted_mid_scan(store, victim):
    secrets = Secrets()
    for number in (1, 2, 3):
        store.write_generation(number, {secrets.name(): secrets.content(5000 * number), "rendered/a": "b"})
    store.link(3)
    survivors = [n for n in (1, 2, 3) if n != victim]
    expected_bytes = sum(du_figures(store.generation_path(n))[1] for n in survivors)
    config = config_for(store_config(store))
    measurer = PruningMeasurer(store.generation_path(victim))
    exporter = Exporter([StoresCollector(config, measurer)])
    registry = CollectorRegistry()
    registry.register(RegistryAdapter(exporter))
    text = generate_latest(registry).decode()
    assert measurer.deleted and not store.generation_path(victim).exists()
    mp = str(store.mountpoint)
    assert value(text, "sopsnix_scrape_collector_success", collector="stores") == 1
    assert value(text, "sopsnix_generations", mountpoint=mp) == 2
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == expected_bytes
    assert value(text, "sopsnix_oldest_generation", mountpoint=mp) == survivors[0]
    assert value(text, "sopsnix_store_scan_errors", mountpoint=mp, reason="vanished") == 1
    assert value(text, "sopsnix_store_scan_errors", mountpoint=mp, reason="error") == 0
    if victim == 3:
        assert value(text, "sopsnix_symlink_info", mountpoint=mp, symlink=str(store.symlink), state="dangling") == 1
        assert value(text, "sopsnix_current_generation", mountpoint=mp) is None
    else:
        assert value(text, "sopsnix_current_generation", mountpoint=mp) == 3
    # The next scrape has nothing left to race with.
    text = generate_latest(registry).decode()
    assert value(text, "sopsnix_store_scan_errors", mountpoint=mp, reason="vanished") == 0
    assert value(text, "sopsnix_generations", mountpoint=mp) == 2


class SwitchingMeasurer(Measurer):
    """Runs a whole sops-nix activation (write N+1, link it, prune) just before the scan measures its first
    generation: the listing the scan took no longer matches where the symlink points."""

    def __init__(self, store: SopsStore, secrets: Secrets, keep_generations: int) -> None:
        self.store, self.secrets, self.keep_generations = store, secrets, keep_generations
        self.switched_to: int | None = None

    def usage(self, path, device, errors):
        if self.switched_to is None:
            secrets = {self.secrets.name(): self.secrets.content(7000)}
            self.switched_to = self.store.switch(secrets, self.keep_generations)
        return super().usage(path, device, errors)


@pytest.mark.parametrize("keep_generations", [1, 2, 0])
def test_switch_during_the_scan(store, keep_generations):
    """An activation racing the scan must not make the symlink look broken: it points at a generation of
    this store, one the listing had not seen yet."""
    secrets = Secrets()
    for number in (3, 4):
        store.write_generation(number, {secrets.name(): secrets.content(3000)})
    store.link(4)
    measurer = SwitchingMeasurer(store, secrets, keep_generations)
    scan = scan_stores(config_for(store_config(store, keep_generations=keep_generations)), measurer).stores[0]
    assert measurer.switched_to == 5
    assert scan.symlink_state is SymlinkState.OK
    assert scan.current is not None and scan.current.number == 5
    present = store.generations()
    assert [g.number for g in scan.generations] == present == {1: [5], 2: [4, 5], 0: [3, 4, 5]}[keep_generations]
    assert scan.total.bytes == sum(du_figures(store.generation_path(n))[1] for n in present)


class FailingCollector(Collector):
    """A collector that fails the way a real one might: an OSError whose text carries a secret's path."""

    name = "failing"
    metrics = (MetricSpec("sopsnix_test_failing", "Never published: the scan always fails."),)

    def __init__(self, secret_path: str, secret_content: str) -> None:
        self.secret_path = secret_path
        self.secret_content = secret_content
        self.failing = True
        self.scans = 0

    def scan(self, snapshot):
        self.scans += 1
        if self.failing and self.scans % 2:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), self.secret_path)
        if self.failing:
            raise ValueError(f"cannot parse {self.secret_content}")
        return 1.0

    def families(self, result):
        yield self.metrics[0].family([((), result)])


@pytest.fixture
def exporter_log(monkeypatch):
    """The exporter's log as JSON lines, set up the way the CLI does it; the logger is restored afterwards."""
    logger = logging.getLogger("sops_nix_exporter")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    stream = io.StringIO()

    def setup(level: str) -> io.StringIO:
        monkeypatch.setattr(sys, "stderr", stream)
        logs.setup(level, "json")
        return stream

    yield setup
    logger.handlers[:], logger.level, logger.propagate = saved


@pytest.mark.parametrize("failing_first", [False, True], ids=["stores-first", "failing-first"])
def test_failing_collector_leaves_the_others_intact(store, exporter_log, failing_first):
    secrets = Secrets()
    secret_name, secret_content = secrets.name(), secrets.content(64).decode()
    store.write_generation(1, {secret_name: secret_content})
    store.link(1)
    config = config_for(store_config(store))
    failing = FailingCollector(str(store.generation_path(1) / secret_name), secret_content)
    stores = StoresCollector(config)
    exporter = Exporter([failing, stores] if failing_first else [stores, failing])
    registry = CollectorRegistry()
    registry.register(RegistryAdapter(exporter))
    log = exporter_log("info")
    mp = str(store.mountpoint)
    expected_bytes = du_figures(store.mountpoint)[1]
    for _ in range(4):
        text = generate_latest(registry).decode()
        assert value(text, "sopsnix_scrape_collector_success", collector="failing") == 0
        assert value(text, "sopsnix_scrape_collector_success", collector="stores") == 1
        assert value(text, "sopsnix_scrape_collector_duration_seconds", collector="failing") >= 0
        assert value(text, "sopsnix_test_failing") is None
        assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == expected_bytes == 4096
        assert value(text, "sopsnix_current_generation", mountpoint=mp) == 1
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    failures = [line for line in lines if "failing" in line["msg"]]
    assert len(failures) == 1, lines  # logged when it starts failing, not on every scrape
    assert failures[0]["level"] == "error" and "FileNotFoundError" in failures[0]["msg"]
    # `check` tells the failure and still reports the store.
    text, code = report(exporter.collect())
    assert code == 1
    assert "CRITICAL: collector failing failed: " in text
    assert f"store {mp} (" in text and "current generation 1" in text
    assert secrets.leaked(text) == []

    failing.failing = False
    text = generate_latest(registry).decode()
    assert value(text, "sopsnix_scrape_collector_success", collector="failing") == 1
    assert value(text, "sopsnix_test_failing") == 1
    generate_latest(registry)
    lines = [json.loads(line) for line in log.getvalue().splitlines()]
    resolved = [line for line in lines if line["msg"].startswith("resolved:") and "failing" in line["msg"]]
    assert len(resolved) == 1, lines
    assert secrets.leaked(log.getvalue() + text) == []


def test_failure_details_at_debug_level_carry_no_secret(store, exporter_log):
    """Even the debug log of a failing collector (exception type, place) never repeats a path or a message
    that may hold a secret."""
    secrets = Secrets()
    secret_name, secret_content = secrets.name(), secrets.content(64).decode()
    store.write_generation(1, {secret_name: secret_content})
    failing = FailingCollector(str(store.generation_path(1) / secret_name), secret_content)
    exporter = Exporter([StoresCollector(config_for(store_config(store))), failing])
    log = exporter_log("debug")
    exporter.collect()  # fails with an OSError naming the secret's path
    exporter.collect()  # fails with a ValueError quoting the secret's content
    text = log.getvalue()
    lines = [json.loads(line) for line in text.splitlines()]
    debug = [line for line in lines if line["level"] == "debug" and line.get("collector") == "failing"]
    assert len(debug) == 2, lines
    assert "FileNotFoundError" in json.dumps(debug[0]) and "ValueError" in json.dumps(debug[1])
    assert secrets.leaked(text) == []


# ---------------------------------------------------------------------------------------------------------
# The exporter never opens a file in a store


def test_never_opens_a_file_in_the_store(store, scratch):
    """Traced with strace(1): every open below the mount point is of a directory (O_DIRECTORY). A FIFO in
    every generation would also hang a reader that opened it."""
    strace = require_tool("strace", "strace")
    secrets = Secrets()
    sops_layout(store, secrets)
    config = write_config(scratch, config_data(store_config(store)))
    trace = scratch / "trace"
    cmd = [strace, "-f", "-qq", "-s", "4096", "-e", "trace=open,openat,openat2,creat", "-o", str(trace),
           sys.executable, "-m", "sops_nix_exporter", "textfile", f"--config.file={config}",
           f"--output={scratch / 'o.prom'}"]  # fmt: skip
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    path_below = re.escape(str(store.mountpoint)) + r'(?:/[^"]*)?'
    inside = re.compile(r'open(?:at2?)?\((?:[^,]+, )?"(' + path_below + r')", ([^,)]+)')
    opened = [(m.group(1), m.group(2)) for m in map(inside.search, trace.read_text().splitlines()) if m]
    assert len(opened) > 10, "the trace shows no listing of the store: is the pattern right?"
    assert [(path, flags) for path, flags in opened if "O_DIRECTORY" not in flags] == []
    # Only generations are walked: never gpg-home, "007" or other non-generations.
    walked = {Path(path).relative_to(store.mountpoint).parts[:1] for path, _ in opened}
    assert walked == {(), ("3",), ("4",), ("5",)}


# ---------------------------------------------------------------------------------------------------------
# Golden expositions


def fixed_generation(store: SopsStore, number: int, sizes: list[int]) -> None:
    secrets = Secrets()
    store.write_generation(number, {f"rendered/{secrets.name()}": secrets.content(size) for size in sizes})


def fixed_link(store: SopsStore, number: int, when: float) -> None:
    store.symlink.unlink(missing_ok=True)
    store.symlink.symlink_to(store.generation_path(number))
    os.utime(store.symlink, (when, when), follow_symlinks=False)


@pytest.fixture
def page_size_4k():
    if os.sysconf("SC_PAGESIZE") != 4096:
        pytest.skip("the golden byte counts assume 4 KiB pages")


def test_golden_stores(make_store, scratch, promtool_check, page_size_4k):
    """Four stores: sops-nix's main store on ramfs (keepGenerations 2, a pending generation, the files that
    are not generations), the users' store on tmpfs over its budget, a store with another mount stacked on
    top and a dangling symlink, and a store that is not there."""
    main = make_store("ramfs", "secrets")
    sops_layout(main, Secrets())
    os.utime(main.symlink, (1700000000, 1700000000), follow_symlinks=False)

    users = make_store("tmpfs", "secrets-for-users")
    fixed_generation(users, 1, [3000, 200])
    fixed_link(users, 1, 1700000100)

    stacked = make_store("ramfs", "stacked")
    fixed_generation(stacked, 1, [100000])
    mount("tmpfs", stacked.mountpoint, "mode=0751")
    try:
        fixed_generation(stacked, 1, [10])
        fixed_generation(stacked, 2, [5000, 5000])
        fixed_link(stacked, 7, 1700000200)

        absent = SopsStore(scratch / "absent.d", scratch / "absent")
        config = write_config(scratch, config_data(
            store_config(main, keep_generations=2, memory_budget_bytes=1048576),
            store_config(users, memory_budget_bytes=4096),
            store_config(stacked, keep_generations=0, memory_budget_bytes=65536),
            store_config(absent, memory_budget_bytes=0),
        ))  # fmt: skip
        output = scratch / "sops-nix.prom"
        result = run_cli("textfile", f"--config.file={config}", f"--output={output}")
        assert result.returncode == 0, result.stderr
        text = output.read_text()
    finally:
        umount(stacked.mountpoint)
    promtool_check(text)
    paths = {}
    for label, s in (("main", main), ("users", users), ("stacked", stacked), ("absent", absent)):
        paths[str(s.mountpoint)] = f"/golden/{label}.d"
        paths[str(s.symlink)] = f"/golden/{label}"
    compare_golden("stores.prom", golden_mask(text, paths))


def test_golden_no_stores(scratch, promtool_check):
    """With no store configured, every family is still described and the collector still reports."""
    config = write_config(scratch, config_data())
    output = scratch / "empty.prom"
    result = run_cli("textfile", f"--config.file={config}", f"--output={output}")
    assert result.returncode == 0, result.stderr
    text = output.read_text()
    promtool_check(text)
    compare_golden("no-stores.prom", golden_mask(text, {}))


@pytest.mark.unit
def test_golden_mask_keeps_what_matters():
    """The mask touches only the documented volatile values."""
    text = (
        'sopsnix_host_memory_bytes 1.2e+10\n'
        'sopsnix_scrape_collector_duration_seconds{collector="stores"} 0.004\n'
        'sopsnix_exporter_build_info{python_version="3.11.7",version="0.1.0"} 1.0\n'
        'sopsnix_generations_bytes{mountpoint="/tmp/x"} 4096.0\n'
        'sopsnix_symlink_info{mountpoint="/tmp/x",state="ok",symlink="/tmp/x-link"} 1.0\n'
    )
    assert golden_mask(text, {"/tmp/x": "/golden/x.d", "/tmp/x-link": "/golden/x"}) == (
        'sopsnix_host_memory_bytes NaN\n'
        'sopsnix_scrape_collector_duration_seconds{collector="stores"} NaN\n'
        'sopsnix_exporter_build_info{python_version="MASKED",version="MASKED"} 1.0\n'
        'sopsnix_generations_bytes{mountpoint="/golden/x.d"} 4096.0\n'
        'sopsnix_symlink_info{mountpoint="/golden/x.d",state="ok",symlink="/golden/x"} 1.0\n'
    )


def test_scan_values_are_plain_data(store):
    """The scan is usable without the collector (check and textfile reuse it)."""
    secrets = Secrets()
    sops_layout(store, secrets)
    result = scan_stores(Config(stores=[StoreConfig(**store_config(store))]))
    scan = result.store(str(store.mountpoint))
    assert [g.number for g in scan.generations] == [3, 4, 5]
    assert scan.symlink_state is SymlinkState.OK and scan.current.number == 4
    assert [g.number for g in scan.pending] == [5]
    for generation in scan.generations:
        files, used, apparent = du_figures(store.generation_path(generation.number))
        usage = generation.usage
        assert (usage.files, usage.bytes, usage.apparent_bytes) == (files, used, apparent)
        assert generation.usage.complete
