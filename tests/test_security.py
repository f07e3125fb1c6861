"""Issue 8, security: the exporter never opens a secret, never repeats one, and runs as an unprivileged
user with only the capabilities it needs.

Everything here runs the real exporter as a process (`serve` answering HTTP, `check`, `textfile`) against a
real ramfs store with nested generations and real processes pinning generations the way virtiofsd does.
The helpers at the top (serve, unprivileged_python, setpriv_prefix) are shared with test_webconfig.py,
test_hostile.py, test_races.py and test_load.py.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scrape import share, value
from serving import (
    KEYS_GID,
    exporter_env,
    open_to_nobody,
    setpriv_prefix,
    start_serving,
    unprivileged_python,
    write_yaml,
)
from sopsnix import Secrets, SopsStore
from tools import require_tool

CAPABILITY_BITS = {"dac_read_search": 2, "sys_ptrace": 19}


# ---------------------------------------------------------------------------------------------------------
# Shared helpers: a real exporter process, optionally behind setpriv or strace


# ---------------------------------------------------------------------------------------------------------
# A sops-nix host in miniature: three generations, nested secrets, three VMs pinning three generations


def nested_secrets(secrets: Secrets, generation: int) -> dict[str, bytes]:
    return {
        secrets.name(): secrets.content(64),
        f"{secrets.name()}/{secrets.name()}": secrets.content(2000),
        f"rendered/{secrets.name()}.env": secrets.content(300 * generation),
        f"rendered/nested/{secrets.name()}/{secrets.name()}.conf": secrets.content(5000),
    }


def sops_host(store: SopsStore, pinners, state_dir: Path, secrets: Secrets, keys_gid: int | None = None) -> dict:
    """Generations 1-3 (keepGenerations = 0, so all stay), a FIFO in each (opening one would hang), and VM
    web (namespace sandbox) on 1, db (chroot) on 2, api (no sandbox, an O_PATH descriptor) on 3. Returns the
    pinners by VM."""
    started = {}
    for number, (vm, mode) in enumerate((("web", "namespace"), ("db", "chroot"), ("api", "none")), start=1):
        directory = store.write_generation(number, nested_secrets(secrets, number))
        os.mkfifo(directory / secrets.name(), 0o600)
        if keys_gid is not None:  # as sops-nix leaves it: every directory root:keys 0751, secrets root 0400
            for path in [directory, *directory.rglob("*")]:
                if path.is_dir():
                    os.chown(path, 0, keys_gid)
                    path.chmod(0o751)
        store.link(number)
        started[vm] = pinners(source=store.symlink, mode=mode, vm=vm, tag="secrets", state_dir=state_dir)
    if keys_gid is not None:
        os.chown(store.mountpoint, 0, keys_gid)
        store.mountpoint.chmod(0o751)
    return started


def host_config(store: SopsStore, state_dir: Path, keep: int = 0) -> dict:
    return {
        "stores": [{"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), "keep_generations": keep}],
        "microvm": {"state_dir": str(state_dir)},
    }


# ---------------------------------------------------------------------------------------------------------
# Never opens a secret: strace over a real scrape


OPEN_CALL = re.compile(
    r"^(?P<pid>\d+)\s+(?P<call>open|openat|openat2|creat|open_by_handle_at|open_tree)\("
    r"(?:(?P<dirfd>AT_FDCWD|-?\d+)(?:<(?P<dirpath>[^>]*)>)?, )?\"(?P<path>[^\"]*)\"(?P<rest>.*)$"
)
RESULT_PATH = re.compile(r"= \d+<(?P<path>[^>]*)>\s*$")
PROC_THROUGH = re.compile(r"^/proc/(\d+|self|thread-self)/(root|cwd)(/.*)?$|^/proc/(\d+|self)/fd/\d+$")


def opens_inside(trace: str, inside: list[str], cwd: str) -> tuple[list[tuple[str, str]], int]:
    """Every open of a path inside one of `inside` (requested or actually opened), and how many opens of
    any kind the trace holds. /proc/PID/root/..., /cwd/... and /fd/N reach into another process's view of
    a store, so they count as inside too."""
    found = []
    total = 0
    for line in trace.splitlines():
        match = OPEN_CALL.match(line)
        if match is None:
            continue
        total += 1
        path = match["path"]
        if not path.startswith("/"):
            base = match["dirpath"] or cwd
            path = os.path.join(base, path)
        result = RESULT_PATH.search(line)
        candidates = [os.path.normpath(path)] + ([result["path"]] if result else [])
        for candidate in candidates:
            through_proc = PROC_THROUGH.match(candidate) is not None
            if through_proc or any(candidate == d or candidate.startswith(d.rstrip("/") + "/") for d in inside):
                found.append((candidate, match["rest"]))
                break
    return found, total


def test_never_opens_a_secret_while_serving(make_store, pinners, scratch):
    strace = require_tool("strace", "strace")
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    secrets = Secrets()
    vms = sops_host(store, pinners, state_dir, secrets)
    trace = scratch / "trace"
    served = start_serving(
        scratch, host_config(store, state_dir), "--log.level=debug",
        prefix=[strace, "-f", "-qq", "-y", "-s", "4096", "-e", "trace=open,openat,openat2,creat,open_by_handle_at,"
                "open_tree", "-e", "signal=none", "-o", str(trace)],
        traced=True, startup_seconds=90,
    )  # fmt: skip
    try:
        texts = [served.metrics() for _ in range(3)]
    finally:
        served.stop()
    text = texts[-1]
    # The scrape really saw everything: three generations and what each VM serves, through each sandbox.
    assert value(text, "sopsnix_generations", mountpoint=str(store.mountpoint)) == 3
    assert {vm: share(text, vm, store)["served"] for vm in ("web", "db", "api")} == {"web": 1, "db": 2, "api": 3}

    real_store = os.path.realpath(store.mountpoint)
    inside = [real_store, str(store.symlink)]

    # The analysis itself catches the ways a secret could be opened: through the symlink, relative to a
    # directory descriptor, and through another process's root.
    secret = next(p for p in store.generation_path(3).iterdir() if p.is_file())
    served_to_db = next(p for p in store.generation_path(2).iterdir() if p.is_file())  # db's chroot is 2
    chroot_pid = vms["db"].pid
    probe = scratch / "probe-trace"
    script = ("import os, sys\n"
              "open(sys.argv[1], 'rb').read(1)\n"
              "d = os.open(sys.argv[2], os.O_RDONLY | os.O_DIRECTORY)\n"
              "os.close(os.open(sys.argv[3], os.O_RDONLY, dir_fd=d))\n"
              "open(sys.argv[4], 'rb').read(1)\n")  # fmt: skip
    subprocess.run([strace, "-f", "-qq", "-y", "-e", "trace=open,openat", "-o", str(probe), sys.executable, "-c", script,
                    str(store.symlink / secret.name), str(secret.parent), secret.name,
                    f"/proc/{chroot_pid}/root/{served_to_db.name}"], check=True, capture_output=True)  # fmt: skip
    caught = [path for path, flags in opens_inside(probe.read_text(), inside, cwd="/")[0] if "O_DIRECTORY" not in flags]
    assert caught == [str(store.symlink / secret.name), str(secret), f"/proc/{chroot_pid}/root/{served_to_db.name}"]

    found, total = opens_inside(trace.read_text(), inside, cwd="/")
    listings = [(path, flags) for path, flags in found if "O_DIRECTORY" in flags and not PROC_THROUGH.match(path)]
    assert total > 100, "the trace holds hardly any open: is strace's output format what the pattern expects?"
    # Every directory of every generation was listed at least once (the first scrape walks them all; later
    # ones may be served from the generation cache), so the check below saw the whole store being read.
    store_directories = {os.path.realpath(d) for d, _, _ in os.walk(store.mountpoint)}
    assert store_directories <= {os.path.realpath(path) for path, _ in listings}, (
        "the store's directories were not listed: is the pattern right?"
    )
    offending = [(path, flags) for path, flags in found if (path, flags) not in listings]
    assert offending == []
    assert secrets.leaked(text + served.log()) == []


# ---------------------------------------------------------------------------------------------------------
# No secret name or content in /metrics, logs (debug too) or `check`


@pytest.mark.parametrize("user", ["root", "nobody"])
@pytest.mark.parametrize("log_format", ["logfmt", "json"])
def test_no_secret_in_any_output(make_store, pinners, scratch, serve, log_format, user):
    """Secret names and contents are random tokens; every output is searched for each of them. The
    exporter runs as root, and unprivileged, where permission errors give it most to say."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    secrets = Secrets()
    sops_host(store, pinners, state_dir, secrets, keys_gid=KEYS_GID)
    # A directory below the current generation that the keys group cannot list, named like a secret.
    closed = store.generation_path(3) / secrets.name()
    closed.mkdir(mode=0o700)
    (closed / secrets.name()).write_bytes(secrets.content(900))
    # A non-generation, a symlink loop and a symlink out of the store, all named like secrets.
    (store.mountpoint / secrets.name()).write_bytes(secrets.content(100))
    (store.generation_path(2) / secrets.name()).symlink_to(store.generation_path(2) / secrets.name())
    (store.generation_path(1) / secrets.name()).symlink_to(scratch)
    open_to_nobody(scratch, state_dir)
    config = host_config(store, state_dir, keep=1)
    flags = ("--log.level=debug", f"--log.format={log_format}")

    outputs = []
    prefix, interpreter = ([], sys.executable) if user == "root" else (setpriv_prefix(groups=(KEYS_GID,)), unprivileged_python())
    served = serve(config, *flags, prefix=prefix, interpreter=interpreter)
    outputs += [served.metrics(), served.metrics(), served.get("/").text, served.get("/nope").text]
    served.stop()
    outputs.append(served.log())
    config_path = write_yaml(scratch / "check.yml", config)
    output_dir = scratch / "out"
    output_dir.mkdir(mode=0o777)
    output_dir.chmod(0o777)
    for command in (["check"], ["textfile", f"--output={output_dir / 'out.prom'}"]):
        result = subprocess.run(
            [*prefix, interpreter, "-m", "sops_nix_exporter", *command, f"--config.file={config_path}", *flags],
            env=exporter_env(), cwd="/", capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode in (0, 1), result.stderr
        outputs += [result.stdout, result.stderr]
    outputs.append((output_dir / "out.prom").read_text())
    everything = "\n".join(outputs)
    # The outputs are substantial: problems were found and told, at debug level.
    assert "level=debug" in everything or '"level": "debug"' in everything
    assert "msg=request" in everything or "\"msg\": \"request\"" in everything  # debug lines of each request
    if user == "nobody":
        assert "permission_denied" in everything and "CAP_SYS_PTRACE" in everything
    assert len(secrets.markers) > 20
    assert secrets.leaked(everything) == []


# ---------------------------------------------------------------------------------------------------------
# Least privilege: as an unprivileged user, with and without each capability


PRIVILEGE_CASES = {
    # name: (in the keys group?, capabilities)
    "keys-group": (True, ()),
    "keys-group+ptrace": (True, ("sys_ptrace",)),
    "keys-group+ptrace+dac_read_search": (True, ("sys_ptrace", "dac_read_search")),
    "no-group": (False, ()),
    "no-group+dac_read_search": (False, ("dac_read_search",)),
}


@pytest.mark.parametrize("case", list(PRIVILEGE_CASES))
def test_privileges(make_store, pinners, scratch, serve, promtool_check, case):
    """What an unprivileged exporter can see, by group membership and capability. The recommended unit runs
    it as its own user in the keys group with AmbientCapabilities=CAP_SYS_PTRACE CAP_DAC_READ_SEARCH."""
    in_keys, capabilities = PRIVILEGE_CASES[case]
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    secrets = Secrets()
    sops_host(store, pinners, state_dir, secrets, keys_gid=KEYS_GID)
    # A directory in the current generation that even the keys group cannot list.
    closed = store.generation_path(3) / "closed"
    closed.mkdir(mode=0o700)
    (closed / secrets.name()).write_bytes(secrets.content(5000))
    open_to_nobody(scratch, state_dir)
    prefix = setpriv_prefix(groups=(KEYS_GID,) if in_keys else (), capabilities=capabilities)
    served = serve(host_config(store, state_dir), prefix=prefix, interpreter=unprivileged_python())

    # The privileges were really dropped: the process is nobody, with exactly the capabilities asked for.
    status = Path(f"/proc/{served.pid}/status").read_text()
    assert re.search(r"^Uid:\s+65534\s+65534\s+65534\s+65534$", status, re.M)
    effective = int(re.search(r"^CapEff:\s+([0-9a-f]+)$", status, re.M).group(1), 16)
    assert effective == sum(1 << CAPABILITY_BITS[c] for c in capabilities)

    text = served.metrics()
    promtool_check(text)
    mp = str(store.mountpoint)
    ptrace, dac = "sys_ptrace" in capabilities, "dac_read_search" in capabilities
    assert value(text, "sopsnix_exporter_capability", capability="CAP_SYS_PTRACE") == float(ptrace)
    assert value(text, "sopsnix_exporter_capability", capability="CAP_DAC_READ_SEARCH") == float(dac)
    assert value(text, "sopsnix_scrape_collector_success", collector="stores") == 1
    assert value(text, "sopsnix_scrape_collector_success", collector="shares") == 1
    if not in_keys and not dac:
        # The store is root:keys 0751: without the group or CAP_DAC_READ_SEARCH it cannot be listed.
        assert value(text, "sopsnix_store_up", mountpoint=mp) == 0
        assert value(text, "sopsnix_generations", mountpoint=mp) is None
        assert "permission_denied" in served.log() and "keys group" in served.log()
        return
    assert value(text, "sopsnix_store_up", mountpoint=mp) == 1
    assert value(text, "sopsnix_generations", mountpoint=mp) == 3
    assert value(text, "sopsnix_current_generation", mountpoint=mp) == 3
    # Only CAP_DAC_READ_SEARCH opens the directory that is closed to the keys group.
    denied = value(text, "sopsnix_store_scan_errors", mountpoint=mp, reason="permission_denied")
    files = value(text, "sopsnix_current_generation_files", mountpoint=mp)
    assert (denied, files) == ((0, 5) if dac else (1, 4))
    # The namespace sandbox's mount table is readable without any privilege ...
    assert share(text, "web", store)["served"] == 1
    denied_share = {"served": None, "stale": None, "method": "denied"}
    # ... CAP_SYS_PTRACE opens the chroot's root ...
    assert share(text, "db", store) == ({"served": 2, "stale": 1, "method": "root"} if ptrace else denied_share)
    # ... and the unsandboxed one's descriptors need it and CAP_DAC_READ_SEARCH: /proc/PID/fd of a root
    # process is a 0500 directory, closed even after the ptrace check.
    assert share(text, "api", store) == ({"served": 3, "stale": 0, "method": "fd"} if ptrace and dac else denied_share)
    if ptrace and dac:
        assert "CAP_SYS_PTRACE" not in served.log()
    else:
        # What cannot be seen is reported as denied, with no made-up verdict, and the log names the fix.
        assert "CAP_SYS_PTRACE" in served.log() and "CAP_DAC_READ_SEARCH" in served.log()
