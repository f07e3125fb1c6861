"""Issue 3: which generation every virtiofsd really serves, against real processes pinning a real ramfs store."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from sops_nix_exporter import app
from sops_nix_exporter.readers import proc as procfs
from sops_nix_exporter.readers import virtiofsd as processes
from sops_nix_exporter.check import report
from sops_nix_exporter.config import parse_config

from pinning import declare_share, start_pinner
from scrape import samples, value
from serving import NOBODY, exporter_env, setpriv_prefix, unprivileged_python
from sopsnix import SAMPLE_SECRETS, SopsStore


CHURN = 40  # short-lived virtiofsd processes started while scans run

# (mode, syntax): the real Rust virtiofsd plays namespace-rust and chroot-rust (pinning.start_share).
SANDBOXES = [
    ("namespace", "rust"),
    ("namespace", "c"),
    ("chroot", "rust"),
    ("chroot", "c"),
    ("none", "rust"),
]


def scrape(config: dict) -> tuple[str, dict]:
    _, registry = app.build(parse_config(config), process_metrics=False)
    text = generate_latest(registry).decode()
    return text, samples(text)


def share_values(found: dict, vm: str, share: str, mountpoint: str) -> dict[str, float | None]:
    labels = {"vm": vm, "share": share, "mountpoint": mountpoint}
    names = {
        "up": "sopsnix_vm_share_up",
        "served": "sopsnix_vm_serving_generation",
        "stale": "sopsnix_vm_serving_stale_generation",
        "deleted": "sopsnix_vm_serving_deleted_generation",
        "behind": "sopsnix_vm_generations_behind",
        "pruned_next": "sopsnix_vm_share_pruned_on_next_switch",
    }
    return {key: value(found, name, **labels) for key, name in names.items()}


def config_for(store: SopsStore, state_dir: Path, keep: int | None = 1) -> dict:
    entry = {"mountpoint": str(store.mountpoint), "symlink": str(store.symlink)}
    if keep is not None:
        entry["keep_generations"] = keep
    return {"stores": [entry], "microvm": {"state_dir": str(state_dir)}}


@pytest.mark.parametrize("mode,syntax", SANDBOXES, ids=[f"{m}-{s}" for m, s in SANDBOXES])
def test_switch_and_prune_as_sops_nix_does(make_store, shares, scratch, promtool_check, mode, syntax):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.write_generation(1, SAMPLE_SECRETS)
    store.link(1)
    config = config_for(store, state_dir, keep=1)
    mp = str(store.mountpoint)
    shares(source=store.symlink, mode=mode, syntax=syntax, vm="web", tag="secrets", state_dir=state_dir)

    text, found = scrape(config)
    promtool_check(text)
    assert value(found, "sopsnix_vm_share_info", vm="web", share="secrets", mountpoint=mp,
                 source=str(store.symlink), sandbox=mode) == 1  # fmt: skip
    # Serving the current generation: fine now, but with keepGenerations = 1 the next switch deletes it.
    assert share_values(found, "web", "secrets", mp) == {
        "up": 1, "served": 1, "stale": 0, "deleted": 0, "behind": 0, "pruned_next": 1
    }
    assert value(found, "sopsnix_recommended_keep_generations", mountpoint=mp) == 2
    assert value(found, "sopsnix_pinned_generations", mountpoint=mp) == 1

    # Switch: generation 2 is linked, 1 is still there (the prune has not run yet).
    store.write_generation(2, {"db-password": "rotated\n"})
    store.link(2)
    text, found = scrape(config)
    promtool_check(text)
    assert share_values(found, "web", "secrets", mp) == {
        "up": 1, "served": 1, "stale": 1, "deleted": 0, "behind": 1, "pruned_next": 1
    }
    assert value(found, "sopsnix_recommended_keep_generations", mountpoint=mp) == 3

    # Prune as keepGenerations = 1 does: generation 1 is deleted under the running virtiofsd.
    assert store.prune(1) == [1]
    text, found = scrape(config)
    promtool_check(text)
    assert share_values(found, "web", "secrets", mp) == {
        "up": 1, "served": 1, "stale": 1, "deleted": 1, "behind": 1, "pruned_next": 0
    }
    assert value(found, "sopsnix_pinned_generations", mountpoint=mp) == 1
    # A deleted generation cannot be saved by keepGenerations any more: only a restart helps.
    assert value(found, "sopsnix_recommended_keep_generations", mountpoint=mp) == 1


@pytest.mark.parametrize("mode,syntax", SANDBOXES, ids=[f"{m}-{s}" for m, s in SANDBOXES])
def test_restarted_virtiofsd_serves_the_current_generation(make_store, shares, scratch, mode, syntax):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    old = shares(source=store.symlink, mode=mode, syntax=syntax, vm="web", state_dir=state_dir)
    store.switch({"db-password": "rotated\n"}, keep_generations=1)
    old.stop()
    shares(source=store.symlink, mode=mode, syntax=syntax, vm="web", state_dir=state_dir)
    _, found = scrape(config_for(store, state_dir, keep=2))
    assert share_values(found, "web", "secrets", str(store.mountpoint)) == {
        "up": 1, "served": 2, "stale": 0, "deleted": 0, "behind": 0, "pruned_next": 0
    }


def test_keep_generations_zero_keeps_the_vm_on_old_secrets(make_store, shares, scratch):
    store = make_store("tmpfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    shares(source=store.symlink, vm="web", state_dir=state_dir)
    for _ in range(3):
        store.switch({"db-password": os.urandom(64)}, keep_generations=0)
    _, found = scrape(config_for(store, state_dir, keep=0))
    assert share_values(found, "web", "secrets", str(store.mountpoint)) == {
        "up": 1, "served": 1, "stale": 1, "deleted": 0, "behind": 3, "pruned_next": 0
    }
    assert value(found, "sopsnix_generations", mountpoint=str(store.mountpoint)) == 4


def test_parent_and_sandboxed_child_are_one_share(make_store, shares, scratch):
    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    pinner = shares(source=store.symlink, mode="namespace", vm="web", state_dir=scratch / "microvms")
    assert len(pinner.children()) == 1, "the namespace sandbox forks a child, as virtiofsd does"
    text, _ = scrape(config_for(store, scratch / "microvms"))
    info = [line for line in text.splitlines() if line.startswith("sopsnix_vm_share_info{")]
    assert len(info) == 1, info


def test_declared_share_that_nothing_serves_is_down(make_store, shares, scratch, promtool_check):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    shares(source=store.symlink, vm="web", state_dir=state_dir)
    declare_share(state_dir, "db", "secrets", store.symlink)
    # A declared share of something that is not a store is none of our business.
    declare_share(state_dir, "db", "nix-store", "/nix/.ro-store")
    text, found = scrape(config_for(store, state_dir))
    promtool_check(text)
    mp = str(store.mountpoint)
    assert value(found, "sopsnix_vm_share_up", vm="db", share="secrets", mountpoint=mp) == 0
    assert value(found, "sopsnix_vm_share_up", vm="web", share="secrets", mountpoint=mp) == 1
    assert value(found, "sopsnix_vm_share_detection", vm="db", share="secrets", mountpoint=mp, method="down") == 1
    assert not any(k[0] == "sopsnix_vm_share_up" and ("share", "nix-store") in k[1] for k in found)
    # Nothing is known about what a down share serves: no stale or deleted series at all.
    assert value(found, "sopsnix_vm_serving_stale_generation", vm="db", share="secrets", mountpoint=mp) is None


def test_a_vm_stopped_on_purpose_is_not_down(make_store, shares, scratch, promtool_check):
    """microvm.nix keeps STATE_DIR/VM/booted only while the VM runs. A VM declared only in current/ is stopped:
    its share gets no up series (so SopsNixVMShareDown cannot fire), and check calls it stopped and stays 0."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    shares(source=store.symlink, vm="web", state_dir=state_dir, readonly=True)  # running, the real Rust virtiofsd
    declare_share(state_dir, "db", "secrets", store.symlink, generation="current")  # stopped
    config = config_for(store, state_dir, keep=0)
    text, found = scrape(config)
    promtool_check(text)
    mp = str(store.mountpoint)
    assert value(found, "sopsnix_vm_running", vm="web") == 1
    assert value(found, "sopsnix_vm_running", vm="db") == 0
    assert value(found, "sopsnix_vm_share_up", vm="web", share="secrets", mountpoint=mp) == 1
    assert value(found, "sopsnix_vm_share_writable", vm="web", share="secrets", mountpoint=mp) == 0  # --readonly
    assert not [k for k in found if ("vm", "db") in k[1] and k[0] != "sopsnix_vm_running"], "no db share series"
    exporter, _ = app.build(parse_config(config), process_metrics=False)
    report_text, code = report(exporter.collect())
    assert code == 0, report_text
    assert "VM db: stopped" in report_text
    # Started again: booted/ appears, and until its virtiofsd serves the share, it is down.
    declare_share(state_dir, "db", "secrets", store.symlink, generation="booted")
    _, found = scrape(config)
    assert value(found, "sopsnix_vm_running", vm="db") == 1
    assert value(found, "sopsnix_vm_share_up", vm="db", share="secrets", mountpoint=mp) == 0


def test_current_booted_fallback_and_socket_name(make_store, shares, scratch):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    # Declared only under current/ (no booted/), with a tag that differs from the socket's own name.
    declare_share(state_dir, "api", "sops", store.symlink, socket="api-virtiofs-sops.sock", generation="current")
    shares(source=store.symlink, vm="api", tag="sops", state_dir=state_dir, declare=False)
    _, found = scrape(config_for(store, state_dir))
    assert value(found, "sopsnix_vm_share_up", vm="api", share="sops", mountpoint=str(store.mountpoint)) == 1


@pytest.mark.parametrize("where", ["state_dir", "socket_name"])
def test_vm_name_without_a_cgroup(make_store, shares, scratch, where):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    shares(source=store.symlink, vm="mail", tag="secrets", cgroup=False,
            state_dir=state_dir if where == "state_dir" else None)  # fmt: skip
    _, found = scrape(config_for(store, state_dir))
    assert value(found, "sopsnix_vm_serving_generation", vm="mail", share="secrets",
                 mountpoint=str(store.mountpoint)) == 1  # fmt: skip


@pytest.mark.parametrize("source_kind", ["symlink-slash", "generation", "mountpoint", "above-mountpoint", "space-form"])
def test_source_forms(make_store, shares, pinners, scratch, source_kind):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    source = {
        "symlink-slash": f"{store.symlink}/",
        "generation": str(store.generation_path(1)),
        "mountpoint": str(store.mountpoint),
        "above-mountpoint": str(store.mountpoint.parent),  # like sharing /run: the store is inside
        "space-form": str(store.symlink),
    }[source_kind]
    if source_kind == "space-form":  # microvm.nix writes --shared-dir=...; the pinner carries the other form
        pinners(source=source, vm="web", state_dir=state_dir, space_form=True)
    else:
        shares(source=source, vm="web", state_dir=state_dir)
    store.switch({"db-password": "rotated\n"}, keep_generations=0)
    _, found = scrape(config_for(store, state_dir, keep=0))
    mp = str(store.mountpoint)
    values = share_values(found, "web", "secrets", mp)
    exposes = value(found, "sopsnix_vm_share_exposes_store", vm="web", share="secrets", mountpoint=mp)
    # Without --readonly (microvm.nix's readOnly = false) the guest can write what it is served.
    assert value(found, "sopsnix_vm_share_writable", vm="web", share="secrets", mountpoint=mp) == 1
    if source_kind == "mountpoint":
        # Sharing the mount point itself serves every generation and sops-nix's age-keys.txt: never stale,
        # but it exposes the store (critical).
        assert values == {"up": 1, "served": None, "stale": 0, "deleted": 0, "behind": None, "pruned_next": None}
        assert exposes == 1
    elif source_kind == "above-mountpoint":
        # The directory above holds the store on another filesystem: nothing of it is pinned, all of it is seen.
        assert values == {"up": 1, "served": None, "stale": 0, "deleted": 0, "behind": None, "pruned_next": None}
        assert exposes == 1
    else:
        assert values == {"up": 1, "served": 1, "stale": 1, "deleted": 0, "behind": 1, "pruned_next": 0}
        assert exposes == 0


def assert_serves_nothing_yet(found: dict, vm: str, mountpoint: str) -> None:
    """A virtiofsd whose VM has not connected pins nothing: up, neither stale nor deleted, nothing predicted."""
    assert share_values(found, vm, "secrets", mountpoint) == {
        "up": 1, "served": None, "stale": 0, "deleted": 0, "behind": None, "pruned_next": None
    }
    assert value(found, "sopsnix_vm_share_detection", vm=vm, share="secrets", mountpoint=mountpoint,
                 method="unpinned") == 1  # fmt: skip


def test_rust_virtiofsd_without_sandbox_pins_nothing_until_its_vm_connects(make_store, shares, scratch):
    """The real daemon with --sandbox=none opens the shared directory only when a guest connects (proven
    with a real guest in test_vm_e2e.py): until then it serves nothing, stale or not."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    shares(source=store.symlink, mode="none", vm="web", state_dir=state_dir, real=True)
    store.switch({"db-password": "rotated\n"}, keep_generations=1)
    _, found = scrape(config_for(store, state_dir))
    assert_serves_nothing_yet(found, "web", str(store.mountpoint))


def test_real_c_virtiofsd_not_yet_connected_is_not_stale(make_store, scratch):
    """QEMU's C virtiofsd sets up its sandbox only when its VM connects; before that it pins nothing."""
    from vm.guest import Cgroup, GuestUnavailable, Virtiofsd

    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    socket = state_dir / "web" / "web-virtiofs-secrets.sock"
    declare_share(state_dir, "web", "secrets", store.symlink, socket=socket.name)
    try:
        cgroup = Cgroup.create("web")
    except GuestUnavailable as exc:
        pytest.skip(str(exc))
    with cgroup:
        try:
            daemon = Virtiofsd.start(store.symlink, socket, cgroup, scratch)
        except GuestUnavailable as exc:
            pytest.skip(str(exc))
        try:
            store.switch({"db-password": "rotated\n"}, keep_generations=1)
            _, found = scrape(config_for(store, state_dir))
        finally:
            daemon.stop()
    assert_serves_nothing_yet(found, "web", str(store.mountpoint))


@pytest.mark.parametrize(
    "argv",
    [["virtiofsd", "--shared-dir"], ["virtiofsd", "-o"], ["virtiofsd", "\x01\x02garbage", "--sandbox="], ["virtiofsd"]],
)
def test_garbage_or_truncated_command_lines_are_ignored(make_store, pinners, scratch, argv):
    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    pinners(source=store.symlink, vm="web", state_dir=scratch / "microvms", declare=False, argv=argv)
    _, found = scrape(config_for(store, scratch / "microvms"))
    assert value(found, "sopsnix_scrape_collector_success", collector="shares") == 1
    assert not any(k[0] == "sopsnix_vm_share_info" for k in found)


def test_process_that_exits_mid_scan(make_store, pinners, scratch):
    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    pinner = pinners(source=store.symlink, mode="none", vm="web", state_dir=scratch / "microvms")
    config = parse_config(config_for(store, scratch / "microvms"))
    exporter, _ = app.build(config, process_metrics=False)
    stores = exporter.collect().runs["stores"].result.stores
    from sops_nix_exporter.readers.shares import store_identity

    identity = store_identity(stores[0])
    assert processes.inspect(pinner.pid, identity, procfs.own_root()).generation == 1
    pinner.stop()  # killed and reaped: its /proc entry is gone, as when it exits between listing and reading
    with pytest.raises(ProcessLookupError):
        processes.inspect(pinner.pid, identity, procfs.own_root())

    # And for real, many times: virtiofsd processes that live a few milliseconds while scans run. A fixed
    # count, each ended and its pipes closed as soon as its scan is done, whatever the machine's speed.
    for number in range(CHURN):
        short = start_pinner(scratch, store.symlink, mode="none", vm=f"short{number}", exit_after_ms=3,
                             state_dir=scratch / "microvms", declare=False)  # fmt: skip
        try:
            snapshot = exporter.collect()
        finally:
            short.stop()
        assert snapshot.runs["shares"].success, snapshot.runs["shares"].error


def test_check_lists_every_share_with_its_verdict_and_fix(make_store, shares, scratch):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    shares(source=store.symlink, vm="web", state_dir=state_dir)
    shares(source=store.symlink, mode="chroot", vm="db", state_dir=state_dir)
    store.switch({"db-password": "rotated\n"}, keep_generations=1)  # deletes generation 1 under both VMs
    shares(source=store.symlink, vm="api", state_dir=state_dir)
    declare_share(state_dir, "mail", "secrets", store.symlink)
    exporter, _ = app.build(parse_config(config_for(store, state_dir)), process_metrics=False)
    text, code = report(exporter.collect())
    assert code == 1
    assert "VM web share secrets" in text and "serves generation 1, current 2: deleted" in text
    assert "VM api share secrets" in text and "serves generation 2, current 2: current" in text
    assert "VM mail share secrets" in text and "DOWN" in text
    assert "restart microvm@web" in text and "restart microvm@db" in text
    assert "microvm-virtiofsd@mail" in text
    # api serves the current generation, but keepGenerations = 1 deletes it at the next switch.
    assert "sops.keepGenerations = 2" in text


def test_scan_without_privileges_uses_mountinfo_and_names_the_missing_capability(make_store, shares, scratch):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    store.switch(SAMPLE_SECRETS)
    shares(source=store.symlink, mode="namespace", vm="web", state_dir=state_dir)
    shares(source=store.symlink, mode="chroot", vm="db", state_dir=state_dir)
    store.switch({"db-password": "rotated\n"}, keep_generations=1)
    # sops-nix's store is root:keys 0751; the exporter runs as a user of the keys group.
    keys_gid = 64999
    os.chown(store.mountpoint, 0, keys_gid)
    os.chmod(store.mountpoint, 0o750)
    os.chmod(scratch, 0o755)
    state_dir.chmod(0o755)
    config_path = scratch / "config.yml"
    import yaml

    config_path.write_text(yaml.safe_dump(config_for(store, state_dir)))
    config_path.chmod(0o644)
    out = scratch / "out"
    out.mkdir(mode=0o777)
    out.chmod(0o777)
    result = subprocess.run(
        [*setpriv_prefix(NOBODY, groups=(keys_gid,)), unprivileged_python(), "-m", "sops_nix_exporter", "textfile",
         f"--config.file={config_path}", f"--output={out}/metrics.prom"],
        env=exporter_env(), capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = samples((out / "metrics.prom").read_text())
    mp = str(store.mountpoint)
    assert value(found, "sopsnix_exporter_capability", capability="CAP_SYS_PTRACE") == 0
    # The namespace sandbox is read from its mount table, which needs no privilege.
    assert share_values(found, "web", "secrets", mp)["deleted"] == 1
    assert value(found, "sopsnix_vm_share_detection", vm="web", share="secrets", mountpoint=mp, method="mountinfo") == 1
    # The chroot's root is closed to us: reported as denied, with no made-up verdict.
    assert value(found, "sopsnix_vm_share_detection", vm="db", share="secrets", mountpoint=mp, method="denied") == 1
    assert share_values(found, "db", "secrets", mp)["stale"] is None
    assert "CAP_SYS_PTRACE" in result.stderr
