"""Issue 16: `sops-nix-exporter prune` removes exactly the generations nobody reads, on a real ramfs store with
real readers: the real Rust virtiofsd serving one generation, a real mount namespace bind-mounting another, a
process holding an O_PATH descriptor in a third."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import threading

import yaml
from prometheus_client import generate_latest

from sops_nix_exporter import app, prune
from sops_nix_exporter.config import parse_config

from consumers import consumers, descriptor_holders  # noqa: F401 (fixtures)
from scrape import samples, value
from sopsnix import SAMPLE_SECRETS, du_figures



def config_for(store, scratch) -> dict:
    return {"stores": [{"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), "keep_generations": 0}],
            "microvm": {"state_dir": str(scratch / "microvms")}}  # fmt: skip


def run_prune(config: dict, scratch, *flags: str) -> subprocess.CompletedProcess:
    path = scratch / "prune.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "sops_nix_exporter", "prune", f"--config.file={path}",
                           f"--lock-file={scratch / 'prune.lock'}", *flags],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


def test_prune_keeps_every_generation_someone_reads(make_store, shares, consumers, descriptor_holders, scratch):  # noqa: F811
    store = make_store("ramfs")
    mp = str(store.mountpoint)
    state_dir = scratch / "microvms"
    for _ in range(2):
        store.switch(SAMPLE_SECRETS, keep_generations=0)
    shares(source=store.symlink, vm="web", state_dir=state_dir, readonly=True)  # pins 2
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    namespace = consumers(store.symlink, "container@db.service")  # mounts 3
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    descriptor_holders(store.generation_path(4))  # an O_PATH descriptor in 4
    for _ in range(4):
        store.switch(SAMPLE_SECRETS, keep_generations=0)
    assert store.generations() == [1, 2, 3, 4, 5, 6, 7, 8] and store.current() == 8
    config = config_for(store, scratch)

    # The exporter's figures: it sees the share, the mount namespace and cwd/root, not descriptors, and keeps
    # 7 (replaced less than 60 s ago): 1, 4, 5 and 6.
    _, registry = app.build(parse_config(config), process_metrics=False)
    found = samples(generate_latest(registry).decode())
    sizes = {n: du_figures(store.generation_path(n))[1] for n in store.generations()}
    assert value(found, "sopsnix_reclaimable_generations", mountpoint=mp) == 4
    assert value(found, "sopsnix_reclaimable_bytes", mountpoint=mp) == sum(sizes[n] for n in (1, 4, 5, 6))

    dry = run_prune(config, scratch, "--min-age=0")
    assert dry.returncode == 0, dry.stderr
    assert store.generations() == [1, 2, 3, 4, 5, 6, 7, 8], "a dry run removes nothing"
    lines = dry.stdout.splitlines()
    assert [line.split()[1] for line in lines if line.startswith("  remove ")] == ["1", "5", "6", "7"]
    assert "  keep 2: microvm@web" in lines and "  keep 3: container@db.service" in lines
    holder = os.path.basename(sys.executable)[:15]  # its command name, as the kernel gives it: never its command line
    assert f"  keep 4: {holder}" in lines and "  keep 8: current" in lines

    before = du_figures(store.mountpoint)[1]
    applied = run_prune(config, scratch, "--min-age=0", "--apply")
    assert applied.returncode == 0, applied.stderr
    assert store.generations() == [2, 3, 4, 8]
    freed = sum(int(line.split("(")[1].split()[0]) for line in applied.stdout.splitlines()
                if line.startswith("  removed "))  # fmt: skip
    assert freed == sum(sizes[n] for n in (1, 5, 6, 7))
    assert before - du_figures(store.mountpoint)[1] == freed, "the store's bytes fall by what was reported"
    # The readers still read their secrets.
    assert sorted(SAMPLE_SECRETS)[0].split("/")[0] in namespace.listing()
    assert (store.generation_path(2) / "db-password").exists()

    # With the default min-age, the just-replaced generation stays.
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    kept = run_prune(config, scratch, "--apply")
    assert kept.returncode == 0 and 8 in store.generations(), kept.stdout
    assert "  keep 8: replaced less than 60 s ago" in kept.stdout


def test_hostile_layouts(make_store, scratch, tmp_path):
    """A symlink out of the store is removed, never followed; a bind mount of another filesystem inside a
    generation is left, said, and that generation kept; a generation that vanishes mid-run is no error."""
    store = make_store("ramfs")
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious").write_text("must survive\n")
    for _ in range(3):
        store.switch(SAMPLE_SECRETS, keep_generations=0)
    os.symlink(outside, store.generation_path(1) / "escape")
    os.symlink(outside / "precious", store.generation_path(1) / "escape-file")
    mounted = store.generation_path(2) / "mounted"
    mounted.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mounted)], check=True)
    try:
        (mounted / "other").write_text("another filesystem\n")
        config = config_for(store, scratch)
        out = io.StringIO()
        outcome = prune.run(parse_config(config), apply=True, min_age=0, lock_file=str(scratch / "lock"), out=out)
        assert (outside / "precious").read_text() == "must survive\n"
        assert not store.generation_path(1).exists()
        assert (mounted / "other").exists(), "nothing of another filesystem is touched"
        assert [f for f in outcome.failed if "generation 2" in f], outcome.failed
        assert "another filesystem" in out.getvalue() and "other" not in out.getvalue().replace("another", "")
    finally:
        subprocess.run(["umount", str(mounted)], check=True)

    # A generation that vanishes between the plan and its removal: no error, nothing else touched.
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    outcome = prune.run(parse_config(config), apply=True, min_age=0, lock_file=str(scratch / "lock"), out=io.StringIO(),
                        before_removal=lambda mp, n: subprocess.run(["rm", "-rf", str(store.generation_path(n))]))  # fmt: skip
    assert outcome.failed == []
    assert store.current() in store.generations()


def test_one_run_at_a_time(make_store, scratch):
    import fcntl

    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    lock = scratch / "prune.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        result = run_prune(config_for(store, scratch), scratch, "--apply")
    assert result.returncode == 1 and "another prune is running" in result.stderr


def test_switches_racing_prunes_and_scrapes(make_store, consumers, scratch):  # noqa: F811
    """Switches at full speed while prunes and scrapes run: no current or pending generation is removed, the
    current generation is complete whenever it is read, a reader holding an old generation keeps every file,
    and every scrape succeeds. Bounded by count, not time."""
    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    reader = consumers(store.symlink, "app.service")
    held = sorted(reader.listing())
    config = parse_config(config_for(store, scratch))
    exporter, _ = app.build(config, process_metrics=False)
    stop = threading.Event()
    problems: list[str] = []

    def switcher() -> None:
        for _ in range(150):
            store.switch(SAMPLE_SECRETS, keep_generations=0)
            if not set(SAMPLE_SECRETS) <= {str(p.relative_to(store.symlink.resolve()))
                                          for p in store.symlink.resolve().rglob("*") if p.is_file()}:  # fmt: skip
                problems.append("the current generation lost a file")
        stop.set()

    thread = threading.Thread(target=switcher)
    thread.start()
    prunes = scrapes = 0
    while not stop.is_set():
        prune.run(config, apply=True, min_age=0, lock_file=str(scratch / "lock"), out=io.StringIO())
        prunes += 1
        snapshot = exporter.collect()
        scrapes += 1
        if not all(run.success for run in snapshot.runs.values()):
            problems.append(f"a scrape failed: {[r.error for r in snapshot.runs.values() if not r.success]}")
        if sorted(reader.listing()) != held:
            problems.append("the reader lost a file")
    thread.join()
    assert problems == []
    assert prunes > 0 and scrapes > 0
    assert store.current() in store.generations()


def test_a_process_it_cannot_inspect_keeps_everything(make_store, scratch):
    """Without CAP_SYS_PTRACE another user's working directory cannot be read: the prune removes nothing, says
    why and exits 1, rather than delete what that process may be using."""
    store = make_store("ramfs")
    for _ in range(3):
        store.switch(SAMPLE_SECRETS, keep_generations=0)
    os.chmod(store.mountpoint, 0o755)
    for number in store.generations():
        os.chmod(store.generation_path(number), 0o755)
    sleeper = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "600"],
                               cwd=store.generation_path(2))  # fmt: skip
    try:
        path = scratch / "prune.yml"
        path.write_text(yaml.safe_dump(config_for(store, scratch)))
        result = subprocess.run(
            ["setpriv", "--inh-caps=-all", "--bounding-set=-all", sys.executable, "-m", "sops_nix_exporter", "prune",
             f"--config.file={path}", f"--lock-file={scratch / 'prune.lock'}", "--apply", "--min-age=0"],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert result.returncode == 1, result.stdout + result.stderr
        assert store.generations() == [1, 2, 3], result.stdout
        assert "could not be inspected (needs CAP_SYS_PTRACE" in result.stdout
        # With the capability it sees the holder, and removes only what nobody holds.
        result = run_prune(config_for(store, scratch), scratch, "--apply", "--min-age=0")
        assert result.returncode == 0, result.stdout + result.stderr
        assert store.generations() == [2, 3]
    finally:
        sleeper.kill()
        sleeper.wait()
