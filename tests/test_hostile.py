"""Issue 8, hostile input: store layouts and processes an operator's host can throw at the exporter.

Nothing may crash, every case must show in the metrics, and the exposition must stay valid (promtool).
The layouts are real directories on real ramfs mounts, scraped by the real exporter process; the processes
are real processes named virtiofsd (the pinner of tests/pinning.py, or its binary started directly).
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sops_nix_exporter import app
from sops_nix_exporter.readers import virtiofsd as processes
from sops_nix_exporter.config import parse_config

from pinning import pinner_binary, start_pinner
from scrape import series, share, value
from serving import KEYS_GID, open_to_nobody, setpriv_prefix, unprivileged_python
from sopsnix import Secrets, SopsStore, du_figures, mounted


def store_entry(store: SopsStore, **extra) -> dict:
    return {"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), **extra}


def findmnt_target_fstype(path: Path) -> str:
    return subprocess.run(["findmnt", "-n", "-T", str(path), "-o", "FSTYPE"], capture_output=True, text=True,
                          check=True).stdout.split()[-1]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Store layouts


def test_hostile_layouts(make_store, scratch, serve, promtool_check):
    secrets = Secrets()
    stores = {}

    # Symlink loops inside a generation (never followed), and a store symlink that is a loop itself.
    loops = stores["loops"] = make_store("ramfs", "loops")
    gen = loops.write_generation(1, {secrets.name(): secrets.content(3000)})
    (gen / "a").symlink_to(gen / "b")
    (gen / "b").symlink_to(gen / "a")
    (gen / "self").symlink_to(gen / "self")
    (gen / "up").symlink_to(gen)
    loops.link(1)
    looped = stores["symlink-loop"] = make_store("ramfs", "symlink-loop")
    looped.write_generation(1, {secrets.name(): secrets.content(100)})
    looped.symlink.symlink_to(looped.symlink)

    # A store symlink pointing outside the store; inside a generation, a symlink to / (never followed).
    outside = stores["outside"] = make_store("ramfs", "outside")
    gen = outside.write_generation(1, {secrets.name(): secrets.content(500)})
    (gen / "root").symlink_to("/")
    elsewhere = scratch / "elsewhere"
    elsewhere.mkdir()
    outside.symlink.symlink_to(elsewhere)

    # Names that are not UTF-8 or hold newlines: in a generation, and at the top (none is a generation).
    names = stores["names"] = make_store("ramfs", "names")
    gen = names.write_generation(1, {secrets.name(): secrets.content(200)})
    raw = os.fsencode(gen)
    for name in (b"\xff\xfe", b"with\nnewline", b"\x1b[31mred", b"tab\there", b"\xc3("):
        with open(raw + b"/" + name, "wb") as f:
            f.write(secrets.content(5000))
    os.mkdir(raw + b"/\x80dir\n")
    with open(raw + b"/\x80dir\n/\xffinner", "wb") as f:
        f.write(secrets.content(7000))
    top = os.fsencode(names.mountpoint)
    for name in (b"1\n", b"\xff", b"2\n3"):
        os.mkdir(top + b"/" + name)
        with open(top + b"/" + name + b"/x", "wb") as f:
            f.write(secrets.content(9000))
    names.link(1)

    # A file where a directory is expected: as the mount point, as a generation, as the symlink's target.
    not_dir = scratch / "a-file.d"
    not_dir.write_bytes(b"")
    files = stores["file-as-dir"] = make_store("ramfs", "file-as-dir")
    files.write_generation(1, {secrets.name(): secrets.content(100)})
    (files.mountpoint / "2").write_bytes(secrets.content(4000))
    files.symlink.symlink_to(files.mountpoint / "2")

    # A mount point that is a plain directory, and an empty mount point.
    plain_dir = scratch / "plain.d"
    plain_dir.mkdir()
    plain = SopsStore(plain_dir, scratch / "plain")
    plain.write_generation(1, {secrets.name(): secrets.content(100)})
    plain.link(1)
    empty = stores["empty"] = make_store("ramfs", "empty")

    # A mount point whose path holds a newline, a space, a quote and a backslash (escaped in mountinfo).
    odd_base = scratch / 'odd "store"\n\\'
    odd_base.mkdir()
    odd_context = mounted("ramfs", base=odd_base)
    odd = SopsStore(odd_context.__enter__(), scratch / "odd")
    try:
        odd.write_generation(1, {secrets.name(): secrets.content(100)})
        odd.link(1)
        config = {
            "stores": [store_entry(s) for s in stores.values()]
            + [{"mountpoint": str(not_dir), "symlink": str(scratch / "a-file")}, store_entry(plain),
               store_entry(odd)],
            "microvm": {"state_dir": str(scratch / "microvms")},
        }  # fmt: skip
        served = serve(config, "--log.level=debug")
        text = served.metrics()
        promtool_check(text)
        served.stop()
    finally:
        odd_context.__exit__(None, None, None)

    def v(name: str, store: SopsStore | Path, **labels):
        mountpoint = store.mountpoint if isinstance(store, SopsStore) else store
        return value(text, name, mountpoint=str(mountpoint), **labels)

    def symlink_state(store: SopsStore) -> str:
        return next(s["state"] for s in series(text, "sopsnix_symlink_info") if s["mountpoint"] == str(store.mountpoint))

    assert value(text, "sopsnix_scrape_collector_success", collector="stores") == 1
    assert value(text, "sopsnix_scrape_collector_success", collector="shares") == 1
    # Loops are symlinks: never followed, never counted, no error.
    assert v("sopsnix_current_generation_files", loops) == 1
    assert v("sopsnix_current_generation_bytes", loops) == du_figures(loops.generation_path(1))[1]
    assert v("sopsnix_store_scan_errors", loops, reason="error") == 0
    assert symlink_state(looped) == "dangling" and v("sopsnix_current_generation", looped) is None
    assert v("sopsnix_generations", looped) == 1
    # Outside the store: named as such, no current generation; the / inside a generation is not walked.
    assert symlink_state(outside) == "outside" and v("sopsnix_current_generation", outside) is None
    assert v("sopsnix_generations_bytes", outside) == du_figures(outside.generation_path(1))[1]
    # Odd names are files like any other; odd top-level directories are not generations.
    assert v("sopsnix_current_generation_files", names) == du_figures(names.generation_path(1))[0] == 7
    assert v("sopsnix_current_generation_bytes", names) == du_figures(names.generation_path(1))[1]
    assert v("sopsnix_generations", names) == 1
    # A file as the mount point: down, with the reason in the log; a file named 2 is no generation.
    assert v("sopsnix_store_up", not_dir) == 0
    assert "not_a_directory" in served.log()
    assert v("sopsnix_generations", files) == 1 and symlink_state(files) == "outside"
    # A plain directory: up, but nothing is mounted there and its filesystem is the host's disk.
    assert v("sopsnix_store_up", plain) == 1 and v("sopsnix_mounts", plain) == 0
    assert series(text, "sopsnix_store_info") and {"mountpoint": str(plain.mountpoint),
        "fstype": findmnt_target_fstype(plain.mountpoint)} in series(text, "sopsnix_store_info")  # fmt: skip
    assert f"store {plain.mountpoint} is on" in served.log() or "is on" in served.log()
    # Empty: up, no generation, no symlink.
    assert v("sopsnix_store_up", empty) == 1 and v("sopsnix_generations", empty) == 0
    assert symlink_state(empty) == "missing" and v("sopsnix_oldest_generation", empty) is None
    # The odd path is one label value, escaped, matched through mountinfo's own escapes.
    assert v("sopsnix_mounts", odd) == 1 and v("sopsnix_current_generation", odd) == 1
    assert {"mountpoint": str(odd.mountpoint), "fstype": "ramfs"} in series(text, "sopsnix_store_info")
    assert secrets.leaked(text + served.log()) == []


def test_hundred_thousand_entries_in_one_generation(make_store, serve, scratch, promtool_check):
    store = make_store("ramfs")
    gen = store.write_generation(1, {})
    fd = os.open(gen, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for i in range(100_000):
            os.close(os.open(f"s{i}", os.O_CREAT | os.O_WRONLY, 0o400, dir_fd=fd))
    finally:
        os.close(fd)
    with open(gen / "s7", "wb") as f:
        f.write(b"x" * 5000)
    store.link(1)
    served = serve({"stores": [store_entry(store)], "microvm": {"state_dir": str(scratch)}})
    text = served.metrics()
    promtool_check(text)
    assert value(text, "sopsnix_current_generation_files", mountpoint=str(store.mountpoint)) == 100_000
    assert value(text, "sopsnix_current_generation_bytes", mountpoint=str(store.mountpoint)) == du_figures(gen)[1] > 0
    assert value(text, "sopsnix_store_scan_errors", mountpoint=str(store.mountpoint), reason="error") == 0


def test_permission_denied_on_a_generation(make_store, serve, scratch, promtool_check):
    """As sops-nix leaves it (root:keys 0751 everywhere), but one generation closed to the keys group; the
    exporter runs as nobody in the keys group, without capabilities."""
    store = make_store("ramfs")
    secrets = Secrets()
    for number in (1, 2, 3):
        store.write_generation(number, {secrets.name(): secrets.content(6000), f"d/{secrets.name()}": "x"})
        for path in [store.generation_path(number), store.generation_path(number) / "d"]:
            os.chown(path, 0, KEYS_GID)
            path.chmod(0o751)
    store.generation_path(2).chmod(0o700)
    store.link(3)
    os.chown(store.mountpoint, 0, KEYS_GID)
    store.mountpoint.chmod(0o751)
    open_to_nobody(scratch)
    served = serve({"stores": [store_entry(store)], "microvm": {"state_dir": str(scratch)}},
                   prefix=setpriv_prefix(groups=(KEYS_GID,)), interpreter=unprivileged_python())  # fmt: skip
    text = served.metrics()
    promtool_check(text)
    mp = str(store.mountpoint)
    assert value(text, "sopsnix_store_up", mountpoint=mp) == 1
    assert value(text, "sopsnix_generations", mountpoint=mp) == 3  # listed, though not measurable
    assert value(text, "sopsnix_store_scan_errors", mountpoint=mp, reason="permission_denied") == 1
    # The bytes are a lower bound: generations 1 and 3 only.
    expected = du_figures(store.generation_path(1))[1] + du_figures(store.generation_path(3))[1]
    assert value(text, "sopsnix_generations_bytes", mountpoint=mp) == expected
    assert value(text, "sopsnix_current_generation_files", mountpoint=mp) == 2
    assert "permission_denied" in served.log() and "lower bound" in served.log()
    assert secrets.leaked(text + served.log()) == []


# ---------------------------------------------------------------------------------------------------------
# Processes


def scrape(config: dict) -> str:
    _, registry = app.build(parse_config(config), process_metrics=False)
    return generate_latest(registry).decode()


def shares_config(store: SopsStore, state_dir: Path) -> dict:
    return {"stores": [store_entry(store, keep_generations=1)], "microvm": {"state_dir": str(state_dir)}}


def share_infos(text: str) -> list[dict[str, str]]:
    return series(text, "sopsnix_vm_share_info")


JUNK = ["\x01" * 10000] * 10  # 100 KB of arguments: more than the 64 KiB of command line the exporter reads


@pytest.mark.parametrize(
    "case",
    ["non-utf8", "newline", "empty-source", "huge-after-source", "huge-before-source", "only-name", "option-junk"],
)
def test_garbage_command_lines(make_store, pinners, scratch, promtool_check, case):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch({"k": "v"})
    source = str(store.symlink)
    argv = {
        "non-utf8": ["virtiofsd", "--socket-path=\udcff\udcfe.sock", f"--shared-dir={source}", "--\udc80"],
        "newline": ["virtiofsd\nx", "--socket-path=a\nb-virtiofs-c\nd.sock", f"--shared-dir={source}"],
        "empty-source": ["virtiofsd", "--shared-dir=", "--socket-path=x.sock"],
        "huge-after-source": ["virtiofsd", f"--shared-dir={source}", "--socket-path=big-virtiofs-secrets.sock", *JUNK],
        "huge-before-source": ["virtiofsd", *JUNK, f"--shared-dir={source}"],
        "only-name": ["virtiofsd"],
        "option-junk": ["virtiofsd", "-o", f",,=,source={source},,sandbox=,=x", "-o"],
    }[case]
    pinner = pinners(source=store.symlink, mode="chroot", vm="hostile", state_dir=state_dir, declare=False, argv=argv)
    pinners(source=store.symlink, mode="namespace", vm="good", state_dir=state_dir)
    text = scrape(shares_config(store, state_dir))
    promtool_check(text)
    assert value(text, "sopsnix_scrape_collector_success", collector="shares") == 1
    assert share(text, "good", store)["served"] == 1
    hostile = [s for s in share_infos(text) if s["vm"] != "good"]
    if case in ("non-utf8", "newline", "huge-after-source", "option-junk"):
        # A usable source: a share, whatever the rest says; its odd names are escaped label values.
        assert len(hostile) == 1 and hostile[0]["source"] == source
        assert value(text, "sopsnix_vm_serving_generation", vm=hostile[0]["vm"], share=hostile[0]["share"],
                     mountpoint=str(store.mountpoint)) == 1  # fmt: skip
    else:
        # No usable source (or it lies past what is read): not a share of ours.
        assert hostile == []
    assert pinner.process.poll() is None


def test_vm_names_that_are_not_utf8(make_store, pinners, scratch, promtool_check):
    """A VM state directory whose name is not UTF-8: declared and running (named from its working
    directory), it must become a readable label, never break the exposition or `check`."""
    from sops_nix_exporter.check import report

    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch({"k": "v"})
    running, declared_only = "run\udcffvm", "down\udcfe\nvm"  # surrogates: the bytes 0xff, 0xfe on disk
    pinners(source=store.symlink, mode="chroot", vm=running, state_dir=state_dir, cgroup=False, declare=False)
    declared = state_dir / declared_only / "booted" / "share" / "microvm" / "virtiofs" / "sec\udcffrets"
    declared.mkdir(parents=True)
    (declared / "source").write_bytes(os.fsencode(store.symlink) + b"\n")
    (declared / "socket").write_bytes(b"down\xfe-virtiofs-sec\xffrets.sock\n")
    assert os.fsencode(state_dir / running) in [os.fsencode(state_dir / n) for n in os.listdir(state_dir)]
    config = parse_config(shares_config(store, state_dir))
    exporter, registry = app.build(config, process_metrics=False)
    text = generate_latest(registry).decode()
    promtool_check(text)
    mp = str(store.mountpoint)
    assert value(text, "sopsnix_vm_serving_generation", vm="run\\xffvm", share="secrets", mountpoint=mp) == 1
    assert value(text, "sopsnix_vm_share_up", vm="run\\xffvm", share="secrets", mountpoint=mp) == 1
    assert value(text, "sopsnix_vm_share_up", vm="down\\xfe\nvm", share="sec\\xffrets", mountpoint=mp) == 0
    words, code = report(exporter.collect())
    assert code == 1 and "run\\xffvm" in words
    words.encode("utf-8")  # what `check` prints is UTF-8 text


def test_zombie_virtiofsd_is_a_share_down(make_store, pinners, scratch, promtool_check):
    """A virtiofsd that exited and was not reaped keeps its name but has no command line, root or mounts."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch({"k": "v"})
    zombie = start_pinner(scratch, store.symlink, mode="none", vm="dead", state_dir=state_dir, exit_after_ms=1)
    try:
        deadline = time.monotonic() + 5
        while Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] != "Z":
            assert time.monotonic() < deadline, "the pinner did not exit"
            time.sleep(0.01)
        assert Path(f"/proc/{zombie.pid}/comm").read_text() == "virtiofsd\n"
        text = scrape(shares_config(store, state_dir))
        promtool_check(text)
        mp = str(store.mountpoint)
        assert value(text, "sopsnix_vm_share_up", vm="dead", share="secrets", mountpoint=mp) == 0
        assert value(text, "sopsnix_scrape_collector_success", collector="shares") == 1
    finally:
        zombie.stop()


@pytest.mark.parametrize("moment", ["listing-then-reading", "found-then-inspected"])
@pytest.mark.parametrize("mode", ["chroot", "none"])
def test_process_exits_between_listing_and_reading(make_store, pinners, scratch, monkeypatch, mode, moment):
    """The exit is placed exactly: the real process is killed and reaped after /proc was listed (or after it
    was recognised as a virtiofsd), before the exporter reads it."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch({"k": "v"})
    victim = pinners(source=store.symlink, mode=mode, vm="victim", state_dir=state_dir)
    pinners(source=store.symlink, mode="namespace", vm="survivor", state_dir=state_dir)
    exporter, registry = app.build(parse_config(shares_config(store, state_dir)), process_metrics=False)
    killed = []

    def kill_victim():
        if not killed:
            victim.stop()
            assert not Path(f"/proc/{victim.pid}").exists()
            killed.append(victim.pid)

    if moment == "listing-then-reading":
        real_listdir = os.listdir

        def listdir(path="."):
            entries = real_listdir(path)
            if str(path) == "/proc":
                kill_victim()
            return entries

        monkeypatch.setattr(processes.os, "listdir", listdir)
    else:
        real_find = processes.find

        def find(*args, **kwargs):
            found = real_find(*args, **kwargs)
            assert victim.pid in [p.pid for p in found]
            kill_victim()
            return found

        monkeypatch.setattr(processes, "find", find)
    text = generate_latest(registry).decode()
    assert killed == [victim.pid]
    mp = str(store.mountpoint)
    assert value(text, "sopsnix_scrape_collector_success", collector="shares") == 1
    assert share(text, "survivor", store)["served"] == 1
    # The VM whose virtiofsd is gone: its declared share is down, not a stale or made-up verdict.
    assert value(text, "sopsnix_vm_share_up", vm="victim", share="secrets", mountpoint=mp) == 0
    assert value(text, "sopsnix_vm_serving_generation", vm="victim", share="secrets", mountpoint=mp) is None


@pytest.mark.parametrize("mode", ["namespace", "chroot"])
def test_virtiofsd_in_another_pid_namespace(make_store, scratch, promtool_check, mode):
    """A virtiofsd started in its own PID namespace (unshare --pid --fork --mount-proc) is PID 1 there;
    the exporter, reading the host's /proc, still finds it and what it pins."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch({"k": "v"})
    binary = pinner_binary()
    argv = [str(binary), "--socket-path=ns-virtiofs-secrets.sock", f"--shared-dir={store.symlink}"]
    if mode != "namespace":
        argv += ["--sandbox", mode]
    outer = subprocess.Popen(
        ["unshare", "--pid", "--fork", "--mount-proc", "--", *argv],
        env={"PIN_MODE": mode, "PIN_SOURCE": str(store.symlink), "PATH": "/usr/bin:/bin"},
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        outer.stdin.write(b"g")
        outer.stdin.flush()
        line = outer.stdout.readline()
        if line != b"ready\n":
            pytest.skip(f"cannot start a process in a new PID namespace: {outer.stderr.read1(4096).decode()}")
        inner = int(Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split()[0])
        nspid = next(line for line in Path(f"/proc/{inner}/status").read_text().splitlines() if line.startswith("NSpid:"))
        assert nspid.split()[1:] == [str(inner), "1"], f"not PID 1 in a namespace of its own: {nspid}"
        text = scrape(shares_config(store, state_dir))
        promtool_check(text)
        assert share(text, "ns", store)["served"] == 1
        assert value(text, "sopsnix_vm_serving_stale_generation", vm="ns", share="secrets",
                     mountpoint=str(store.mountpoint)) == 0  # fmt: skip
        store.switch({"k": "rotated"}, keep_generations=1)
        text = scrape(shares_config(store, state_dir))
        assert value(text, "sopsnix_vm_serving_deleted_generation", vm="ns", share="secrets",
                     mountpoint=str(store.mountpoint)) == 1  # fmt: skip
    finally:
        # unshare --fork waits for its child; killing the child (PID 1 there) ends the namespace.
        for pid in Path(f"/proc/{outer.pid}/task/{outer.pid}/children").read_text().split() if outer.poll() is None else []:
            os.kill(int(pid), signal.SIGKILL)
        outer.kill()
        outer.wait(timeout=10)


def test_thousands_of_short_lived_processes_while_scanning(make_store, pinners, scratch, promtool_check):
    """A shell starts thousands of processes named virtiofsd with a real command line, each exiting at once
    (and as many short ordinary ones), while scans run back to back."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch({"k": "v"})
    pinners(source=store.symlink, mode="chroot", vm="steady", state_dir=state_dir)
    binary = pinner_binary()
    count = 3000
    script = (
        f'for i in $(seq {count}); do '
        f'"$BIN" --socket-path=short-virtiofs-secrets.sock --shared-dir="$SRC" </dev/null >/dev/null 2>&1 & '
        f'/bin/true & '
        f'if [ $((i % 40)) = 0 ]; then wait; echo $i; fi; done; wait; echo done'
    )  # fmt: skip
    spawner = subprocess.Popen(["bash", "-c", script], env={"BIN": str(binary), "SRC": str(store.symlink),
                               "PATH": "/usr/bin:/bin"}, stdout=subprocess.PIPE, text=True)  # fmt: skip
    progress = []
    reader = threading.Thread(target=lambda: progress.extend(spawner.stdout), daemon=True)
    reader.start()
    exporter, registry = app.build(parse_config(shares_config(store, state_dir)), process_metrics=False)
    scans = 0
    try:
        while spawner.poll() is None:
            text = generate_latest(registry).decode()
            scans += 1
            if scans % 10 == 1:
                promtool_check(text)
            assert value(text, "sopsnix_scrape_collector_success", collector="shares") == 1
            assert share(text, "steady", store)["served"] == 1
            for info in share_infos(text):
                assert info["vm"] in ("steady", "short"), info
    finally:
        if spawner.poll() is None:
            spawner.kill()
        spawner.wait(timeout=30)
        reader.join(timeout=10)
    assert progress and progress[-1] == "done\n", progress[-3:]
    assert scans >= 10, f"only {scans} scans ran while the processes came and went"
