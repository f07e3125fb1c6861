"""The command line, run as a real process: `check` (exit codes and text), `textfile` (atomic, valid,
no process metrics), logging formats, permission denied as an unprivileged user, and that no secret's name
or content reaches any output."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sops_nix_exporter import __version__

from scrape import samples, series, value
from serving import ROOT, run_cli, write_config
from sopsnix import (
    OTHER_FSTYPE,
    Secrets,
    SopsStore,
    config_data,
    du_figures,
    findmnt_fstype,
    mount,
    sops_layout,
    store_config,
    umount,
)
from pinning import declare_share
from tools import require_tool

NOBODY = 65534
# /run/secrets.d is root:keys, /run/secrets-for-users.d root:root: only the capability lists both.
LISTING_FIX = (
    "  fix: grant the exporter CAP_DAC_READ_SEARCH (the keys group lists /run/secrets.d, which is root:keys, but "
    "not /run/secrets-for-users.d, which is root:root)"
)
SETPRIV = [
    "setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
]  # fmt: skip


def check(scratch: Path, *stores: dict, flags: tuple[str, ...] = (), **extra) -> subprocess.CompletedProcess:
    config = write_config(scratch, config_data(*stores, **extra))
    return run_cli("check", f"--config.file={config}", *flags)


def linked_store(store: SopsStore, secrets: Secrets, generations=(1, 2), current: int | None = 2) -> None:
    for number in generations:
        store.write_generation(number, {secrets.name(): secrets.content(3000 * number), "rendered/x.conf": "y=1\n"})
    if current is not None:
        store.link(current)


# ---------------------------------------------------------------------------------------------------------
# check


def test_check_healthy(store, scratch):
    secrets = Secrets()
    sops_layout(store, secrets)
    used = sum(du_figures(store.generation_path(n))[1] for n in (3, 4, 5))
    result = check(scratch, store_config(store, keep_generations=2, memory_budget_bytes=1 << 30))
    assert result.returncode == 0, result.stdout + result.stderr
    mp, fstype = store.mountpoint, findmnt_fstype(store.mountpoint)
    lines = result.stdout.splitlines()
    assert lines[0] == (
        f"store {mp} ({fstype}): 3 generation(s), {used / 1024:.1f} KiB of a 1.0 GiB budget "
        f"({100 * used / (1 << 30):.1f}%), current generation 4, symlink {store.symlink} ok"
    )
    # The pending generation is worth telling, not worth failing.
    assert f"INFO: store {mp}: 1 generation(s) above the current one were written but never linked" in lines
    assert not any(line.startswith(("CRITICAL", "WARNING")) for line in lines)
    assert lines[-1] == "healthy"
    assert secrets.leaked(result.stdout + result.stderr) == []


def test_check_missing_store_is_not_a_problem(scratch):
    mp = scratch / "secrets-for-users.d"
    result = check(scratch, {"mountpoint": str(mp), "symlink": str(scratch / "secrets-for-users")})
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[0] == (
        f"store {mp}: not present (no secrets of this kind on this host, or sops-nix has not run)"
    )
    assert result.stdout.splitlines()[-1] == "healthy"


def test_check_empty_store_without_symlink_is_healthy(store, scratch):
    result = check(scratch, store_config(store))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 generation(s)" in result.stdout and f"symlink {store.symlink} missing" in result.stdout


@pytest.mark.parametrize("target,state", [("pruned", "dangling"), ("outside", "outside"), ("missing", "missing")])
def test_check_broken_symlink_with_generations(store, scratch, target, state):
    secrets = Secrets()
    linked_store(store, secrets, current=None)
    if target == "pruned":
        store.symlink.symlink_to(store.generation_path(9))
    elif target == "outside":
        (scratch / "old-secrets").mkdir()
        store.symlink.symlink_to(scratch / "old-secrets")
    result = check(scratch, store_config(store))
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    finding = lines.index(f"CRITICAL: store {store.mountpoint}: symlink {store.symlink} is {state}")
    assert lines[finding + 1] == "  fix: re-run the activation (nixos-rebuild switch) so sops-nix links a generation"
    assert "current generation none" in lines[0]
    assert lines[-1] == "problems found"
    assert secrets.leaked(result.stdout + result.stderr) == []


def test_check_stacked_mount(store, scratch):
    secrets = Secrets()
    linked_store(store, secrets)
    top = OTHER_FSTYPE[findmnt_fstype(store.mountpoint)]
    mount(top, store.mountpoint, "mode=0751")
    try:
        linked_store(store, secrets, generations=(1, 2, 3), current=3)
        result = check(scratch, store_config(store))
    finally:
        umount(store.mountpoint)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"store {store.mountpoint} ({top}): 3 generation(s)")
    assert (
        f"WARNING: store {store.mountpoint}: 2 filesystems are mounted on it; the lower ones still hold memory"
        in lines
    )
    assert lines[-1] == "problems found"


@pytest.mark.parametrize(
    "budget,expected",
    [
        (lambda used: used - 1, "over"),
        (lambda used: used, "over"),  # at the budget is over it
        (lambda used: int(used / 0.85), "near"),
        (lambda used: used * 2, "healthy"),
        (lambda used: 0, "healthy"),  # a zero budget is no budget
    ],
    ids=["over", "at", "near", "under", "zero"],
)
def test_check_memory_budget(store, scratch, budget, expected):
    secrets = Secrets()
    linked_store(store, secrets, generations=(1, 2, 3), current=3)
    used = du_figures(store.mountpoint)[1]
    assert used == 3 * 4096 + 4096 + 8192 + 12288  # x.conf in each, and 3000/6000/9000-byte secrets
    limit = budget(used)
    result = check(scratch, store_config(store, memory_budget_bytes=limit))
    lines = result.stdout.splitlines()
    mp = store.mountpoint
    if expected == "over":
        assert result.returncode == 1
        assert (
            f"CRITICAL: store {mp}: its generations hold {used} bytes, at or over the budget of {limit} bytes" in lines
        )
    elif expected == "near":
        assert result.returncode == 1
        assert f"WARNING: store {mp}: its generations hold {used} bytes, 85% of the budget of {limit} bytes" in lines
    else:
        assert result.returncode == 0, result.stdout
        assert "budget of" not in result.stdout and lines[-1] == "healthy"


def test_check_store_on_a_disk_filesystem(scratch):
    """A mount point that is a plain directory (sops-nix's ramfs not mounted) puts secrets on that disk."""
    findmnt = ["findmnt", "-n", "-o", "FSTYPE", "-T", str(scratch)]
    fstype = subprocess.run(findmnt, capture_output=True, text=True).stdout.strip()
    if fstype in ("ramfs", "tmpfs", ""):
        pytest.skip(f"the temporary directory is on {fstype or 'an unknown filesystem'}, not a disk")
    store = SopsStore(scratch / "secrets.d", scratch / "secrets")
    store.mountpoint.mkdir()
    linked_store(store, Secrets())
    result = check(scratch, store_config(store))
    assert result.returncode == 1, result.stdout + result.stderr
    assert (
        f"WARNING: store {store.mountpoint} is on {fstype}, not ramfs or tmpfs: its secrets may be written to disk"
        in result.stdout.splitlines()
    )


def test_check_mountpoint_not_a_directory(scratch):
    (scratch / "secrets.d").write_text("")
    result = check(scratch, {"mountpoint": str(scratch / "secrets.d"), "symlink": str(scratch / "secrets")})
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"CRITICAL: store {scratch / 'secrets.d'} cannot be listed (not_a_directory)" in result.stdout


@pytest.mark.parametrize("flags", [(), ("--log.level=debug",), ("--log.format=json",)], ids=["default", "debug", "json"])
def test_check_tells_each_finding_once(store, scratch, pinners, flags):
    """In a terminal, stdout and stderr are one screen: each finding and its fix are told once, in the report,
    not again as log lines. Findings of every kind: the store's and the shares', critical, warning and info."""
    secrets = Secrets()
    state_dir = scratch / "microvms"
    store.switch({secrets.name(): secrets.content(3000)})
    pinners(source=store.symlink, vm="web", state_dir=state_dir)  # serves generation 1 ...
    store.switch({secrets.name(): secrets.content(3000)}, keep_generations=1)  # ... which this deletes
    pinners(source=store.symlink, vm="api", state_dir=state_dir)  # generation 2: deleted by the next switch
    pinners(source=store.mountpoint, vm="vault", state_dir=state_dir)  # the whole store, age-keys.txt and all
    declare_share(state_dir, "mail", "secrets", store.symlink)  # declared, served by nothing
    store.write_generation(3, {secrets.name(): "never linked\n"})  # pending
    config = config_data(store_config(store, keep_generations=1, memory_budget_bytes=4096),
                         microvm={"state_dir": str(state_dir)})  # fmt: skip
    result = run_cli("check", f"--config.file={write_config(scratch, config)}", *flags)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    findings = [line for line in lines if line.startswith(("CRITICAL: ", "WARNING: ", "INFO: "))]
    fixes = [line.removeprefix("  fix: ") for line in lines if line.startswith("  fix: ")]
    mp = store.mountpoint
    expected = {
        f"CRITICAL: store {mp}: its generations hold",
        f"CRITICAL: VM web share secrets ({mp}): serves generation 1, which was deleted",
        f"CRITICAL: VM mail share secrets ({mp}): declared, but no virtiofsd serves it",
        f"WARNING: VM api share secrets ({mp}): serves generation 2, which the next switch deletes",
        f"CRITICAL: VM vault share secrets ({mp}): shares the store's mount point (or a directory above it)",
        # The pinners carry microvm.nix's command line without --readonly: the guests can write.
        *(f"WARNING: VM {vm} share secrets ({mp}): the guest can write the share" for vm in ("web", "api", "vault")),
        f"INFO: store {mp}: 1 generation(s) above the current one were written but never linked",
    }
    assert {next((e for e in expected if f.startswith(e)), f) for f in findings} == expected, findings
    assert len(fixes) == len(findings)
    everything = result.stdout + result.stderr
    for text in [f.split(": ", 1)[1] for f in findings] + fixes:
        assert everything.count(text) == 1, text
    if "--log.level=debug" not in flags:
        assert result.stderr == ""
    # No fix hands a VM the store's mount point (every generation and sops-nix's key), nor `start`s a
    # virtiofsd unit whose supervisord still runs.
    assert not [fix for fix in fixes if "mount point" in fix or "start microvm-virtiofsd" in fix], fixes
    assert "restart microvm@mail" in everything and "restart microvm@web" in everything
    assert secrets.leaked(everything) == []


def test_check_configuration_error(scratch):
    config = scratch / "config.yml"
    config.write_text("stores:\n  - mountpoint: /run/secrets.d\n    symlink: /run/secrets\n    keep_generations: -1\n")
    result = run_cli("check", f"--config.file={config}")
    assert result.returncode == 2
    assert result.stdout == ""
    assert "stores[0].keep_generations" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Permission denied, as an unprivileged user


def readable_by_nobody(store: SopsStore, scratch: Path) -> Path:
    """The store as sops-nix sets it up for the keys group (here nobody's group), and a directory nobody may
    write the text file into."""
    scratch.chmod(0o755)
    os.chown(store.mountpoint, 0, NOBODY)
    store.mountpoint.chmod(0o750)
    output = scratch / "textfile"
    output.mkdir()
    os.chown(output, NOBODY, NOBODY)
    return output


def test_permission_denied_on_a_generation(store, scratch, as_nobody, promtool_check):
    secrets = Secrets()
    linked_store(store, secrets)
    output = readable_by_nobody(store, scratch)
    for number in (1, 2):
        for directory in [store.generation_path(number), *store.generation_path(number).rglob("*")]:
            if directory.is_dir():
                os.chown(directory, 0, NOBODY)
    store.generation_path(2).chmod(0o700)  # the current generation is closed to the exporter
    config = write_config(scratch, config_data(store_config(store, memory_budget_bytes=1 << 30)))
    mp = str(store.mountpoint)

    result = as_nobody("check", f"--config.file={config}")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"store {mp} (") and "2 generation(s)" in lines[0] and "current generation 2" in lines[0]
    finding = lines.index(
        f"WARNING: store {mp}: 1 part(s) could not be read (permission_denied); byte counts are a lower bound"
    )
    assert lines[finding + 1] == LISTING_FIX
    assert secrets.leaked(result.stdout + result.stderr) == []

    prom = output / "sops-nix.prom"
    result = as_nobody("textfile", f"--config.file={config}", f"--output={prom}", "--log.level=debug")
    assert result.returncode == 0, result.stderr
    text = prom.read_text()
    promtool_check(text)
    assert os.stat(prom).st_uid == NOBODY
    assert value(text, "sopsnix_store_up", mountpoint=mp) == 1
    assert value(text, "sopsnix_generations", mountpoint=mp) == 2
    assert value(text, "sopsnix_current_generation", mountpoint=mp) == 2
    assert value(text, "sopsnix_store_scan_errors", mountpoint=mp, reason="permission_denied") == 1
    # What could be read is counted; the closed generation counts nothing (a lower bound, as check says).
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == du_figures(store.generation_path(1))[1] > 0
    assert value(text, "sopsnix_current_generation_bytes", mountpoint=mp) == 0
    assert value(text, "sopsnix_exporter_capability", capability="CAP_DAC_READ_SEARCH") == 0
    assert secrets.leaked(text + result.stderr) == []


def test_permission_denied_on_the_mount_point(store, scratch, as_nobody):
    secrets = Secrets()
    linked_store(store, secrets)
    output = readable_by_nobody(store, scratch)
    store.mountpoint.chmod(0o700)
    config = write_config(scratch, config_data(store_config(store)))
    mp = str(store.mountpoint)
    result = as_nobody("check", f"--config.file={config}")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"store {mp}: cannot be listed (permission_denied)"
    finding = lines.index(f"CRITICAL: store {mp} cannot be listed (permission_denied)")
    assert lines[finding + 1] == LISTING_FIX

    prom = output / "sops-nix.prom"
    result = as_nobody("textfile", f"--config.file={config}", f"--output={prom}")
    assert result.returncode == 0, result.stderr
    text = prom.read_text()
    assert value(text, "sopsnix_store_up", mountpoint=mp) == 0
    assert value(text, "sopsnix_generations", mountpoint=mp) is None
    assert secrets.leaked(text + result.stderr) == []


def test_symlink_closed_to_the_exporter(store, scratch, as_nobody):
    """The symlink sits in a directory the exporter may not search: its state is unreadable, and the fix
    is the exporter's permissions, not another activation."""
    linked_store(store, Secrets(), current=None)
    output = readable_by_nobody(store, scratch)
    closed = scratch / "closed"
    closed.mkdir(mode=0o700)
    link = SopsStore(store.mountpoint, closed / "secrets")
    link.link(2)
    config = write_config(scratch, config_data(store_config(link)))
    result = as_nobody("check", f"--config.file={config}")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    finding = lines.index(f"CRITICAL: store {store.mountpoint}: symlink {link.symlink} is unreadable")
    assert lines[finding + 1] == LISTING_FIX

    prom = output / "sops-nix.prom"
    result = as_nobody("textfile", f"--config.file={config}", f"--output={prom}")
    assert result.returncode == 0, result.stderr
    text = prom.read_text()
    mp = str(store.mountpoint)
    assert series(text, "sopsnix_symlink_info") == [
        {"mountpoint": mp, "symlink": str(link.symlink), "state": "unreadable"}
    ]
    assert value(text, "sopsnix_symlink_ok", mountpoint=mp) == 0
    assert value(text, "sopsnix_generations", mountpoint=mp) == 2


# ---------------------------------------------------------------------------------------------------------
# textfile


def test_textfile_output(store, scratch, promtool_check):
    secrets = Secrets()
    sops_layout(store, secrets)
    config = write_config(scratch, config_data(store_config(store, keep_generations=2)))
    directory = scratch / "node-exporter-textfiles"
    directory.mkdir()
    output = directory / "sops-nix.prom"
    output.write_text("# an older scrape\nsopsnix_store_up 0\n")
    old_inode = os.stat(output).st_ino

    result = run_cli("textfile", f"--config.file={config}", f"--output={output}")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert sorted(os.listdir(directory)) == ["sops-nix.prom"]  # no temporary file left behind
    st = os.stat(output)
    assert st.st_ino != old_inode  # replaced by a rename, not rewritten in place
    assert st.st_mode & 0o777 == 0o644
    text = output.read_text()
    promtool_check(text)
    names = {name for name, _ in samples(text)}
    assert not [n for n in names if n.startswith(("process_", "python_"))], names
    mp = str(store.mountpoint)
    assert value(text, "sopsnix_generations", mountpoint=mp) == 3
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == sum(
        du_figures(store.generation_path(n))[1] for n in (3, 4, 5)
    )
    assert value(text, "sopsnix_scrape_collector_success", collector="stores") == 1
    assert series(text, "sopsnix_exporter_build_info")[0]["version"] == __version__
    assert secrets.leaked(text + result.stderr) == []


def test_textfile_is_written_by_rename(store, scratch):
    """Traced with strace(1): the final path is never opened, only renamed onto, from a name the textfile
    collector ignores (it reads *.prom only)."""
    strace = require_tool("strace", "strace")
    linked_store(store, Secrets())
    config = write_config(scratch, config_data(store_config(store)))
    output = scratch / "sops-nix.prom"
    trace = scratch / "trace"
    result = subprocess.run(
        [strace, "-f", "-qq", "-s", "4096", "-e", "trace=open,openat,creat,rename,renameat,renameat2", "-o", str(trace),
         sys.executable, "-m", "sops_nix_exporter", "textfile", f"--config.file={config}", f"--output={output}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if result.returncode != 0 and "ptrace" in result.stderr:
        pytest.skip(f"strace cannot trace here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    calls = [line for line in trace.read_text().splitlines() if str(scratch) in line and "config.yml" not in line]
    opened = [line for line in calls if re.search(r"open(at)?\(", line)]
    renamed = [line for line in calls if "rename" in line]
    assert len(renamed) == 1, calls
    source = re.search(r'"([^"]+)"', renamed[0]).group(1)
    assert f'"{output}"' in renamed[0] and source != str(output)
    assert not source.endswith(".prom")
    assert [line for line in opened if f'"{output}"' in line] == []
    assert len([line for line in opened if f'"{source}"' in line and "O_CREAT" in line]) == 1
    assert not os.path.exists(source)


@pytest.mark.parametrize("where", ["directory", "no_such_directory"])
def test_textfile_failure_leaves_nothing_behind(scratch, where):
    config = write_config(scratch, config_data())
    directory = scratch / "out"
    directory.mkdir()
    output = directory / "sops-nix.prom"
    if where == "directory":
        output.mkdir()  # the rename onto it fails after the temporary file was written
    else:
        output = directory / "missing" / "sops-nix.prom"
    result = run_cli("textfile", f"--config.file={config}", f"--output={output}")
    assert result.returncode == 1
    assert f"cannot write {output}" in result.stderr
    assert sorted(os.listdir(directory)) == (["sops-nix.prom"] if where == "directory" else [])
    if where == "directory":
        assert os.listdir(output) == []


def test_textfile_requires_output(scratch):
    result = run_cli("textfile", f"--config.file={write_config(scratch, config_data())}")
    assert result.returncode == 2
    assert "--output" in result.stderr


# ---------------------------------------------------------------------------------------------------------
# Logging and usage


def textfile(scratch: Path, *stores: dict, flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`textfile`, which logs each problem as it appears (as `serve` does); `check` tells them in its report."""
    config = write_config(scratch, config_data(*stores))
    return run_cli("textfile", f"--config.file={config}", f"--output={scratch / 'sops-nix.prom'}", *flags)


def test_log_format_json(store, scratch):
    secrets = Secrets()
    linked_store(store, secrets, current=None)
    store.symlink.symlink_to(store.generation_path(7))
    result = textfile(scratch, store_config(store), flags=("--log.format=json", "--log.level=debug"))
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is one JSON object
    assert records, "nothing was logged"
    for record in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", record["ts"]), record
        assert record["level"] in ("debug", "info", "warn", "error")
    dangling = [r for r in records if r["msg"] == f"store {store.mountpoint}: symlink {store.symlink} is dangling"]
    assert len(dangling) == 1 and dangling[0]["level"] == "error"  # a critical finding
    assert dangling[0]["hint"].startswith("re-run the activation")
    assert secrets.leaked(result.stderr + result.stdout) == []


def test_log_format_logfmt_is_the_default(store, scratch):
    linked_store(store, Secrets(), current=None)
    store.symlink.symlink_to(store.generation_path(7))
    result = textfile(scratch, store_config(store))
    lines = result.stderr.splitlines()
    assert lines
    for line in lines:
        assert re.match(r'ts=\S+ level=(debug|info|warn|error) msg=("([^"\\]|\\.)*"|\S+)( |$)', line), line
    expected = f'level=error msg="store {store.mountpoint}: symlink {store.symlink} is dangling"'
    assert len([line for line in lines if expected in line]) == 1


@pytest.mark.parametrize(
    "args",
    [["frobnicate"], ["check", "--no-such-flag"], ["check", "--log.format=xml"], ["check", "--log.level=loud"]],
    ids=["unknown-command", "unknown-flag", "bad-log-format", "bad-log-level"],
)
def test_usage_errors_exit_2(args):
    result = run_cli(*args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "error:" in result.stderr and result.stdout == ""


def test_version():
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"sops-nix-exporter {__version__}"
