"""Issue 14: containers, services and processes that bind-mount a store's symlink pin one generation, as
virtiofsd does. Real mount namespaces (unshare) that bind-mount the real symlink of a real ramfs store, in
real cgroups named as systemd names those units; a process inside lists the mount, so the prune that empties
it is seen from inside, then the exporter must tell the same."""

from __future__ import annotations

import os
import subprocess

from sops_nix_exporter import app
from sops_nix_exporter.check import report
from sops_nix_exporter.config import parse_config

from consumers import consumers  # noqa: F401 (a fixture)
from scrape import samples, value
from sopsnix import SAMPLE_SECRETS

def consumer_values(found: dict, consumer: str, kind: str, mountpoint: str) -> dict[str, float | None]:
    labels = {"consumer": consumer, "kind": kind, "mountpoint": mountpoint}
    return {
        "serving": value(found, "sopsnix_consumer_serving_generation", **labels),
        "stale": value(found, "sopsnix_consumer_serving_stale_generation", **labels),
        "deleted": value(found, "sopsnix_consumer_serving_deleted_generation", **labels),
    }


def scrape(config: dict) -> tuple[str, dict]:
    from prometheus_client import generate_latest

    _, registry = app.build(parse_config(config), process_metrics=False)
    text = generate_latest(registry).decode()
    return text, samples(text)


def test_bind_mounts_pin_a_generation_and_a_prune_empties_them(make_store, consumers, scratch, promtool_check):
    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    mp = str(store.mountpoint)
    config = {"stores": [{"mountpoint": mp, "symlink": str(store.symlink), "keep_generations": 1}],
              "microvm": {"state_dir": str(scratch / "microvms")}}  # fmt: skip
    container = consumers(store.symlink, "container@web.service")  # a NixOS container's bindMounts
    nspawn = consumers(store.symlink, "systemd-nspawn@db.service")
    service = consumers(store.symlink, "backup.service")  # BindReadOnlyPaths=/run/secrets
    process = consumers(store.symlink)  # no unit: named by its command name
    inside = sorted(SAMPLE_SECRETS)[0].split("/")[0]
    assert inside in container.listing()

    text, found = scrape(config)
    promtool_check(text)
    named = {("container@web.service", "container"): container, ("systemd-nspawn@db.service", "container"): nspawn,
             ("backup.service", "service"): service, ("sh", "process"): process}  # fmt: skip
    for (consumer, kind) in named:
        assert consumer_values(found, consumer, kind, mp) == {"serving": 1, "stale": 0, "deleted": 0}, consumer
    # Each namespace is one consumer; the test process's own namespace (the exporter's here) is none.
    assert len([k for k in found if k[0] == "sopsnix_consumer_serving_generation"]) == 4
    assert value(found, "sopsnix_pinned_generations", mountpoint=mp) == 1
    # keepGenerations = 1 deletes generation 1 at the next switch: keep 2 would spare what they hold.
    assert value(found, "sopsnix_recommended_keep_generations", mountpoint=mp) == 2

    # The switch, then the prune that keepGenerations = 1 does: every reader's directory turns empty.
    store.switch({"db-password": "rotated\n"}, keep_generations=1)
    assert container.listing() == [] and service.listing() == []
    text, found = scrape(config)
    promtool_check(text)
    for (consumer, kind) in named:
        assert consumer_values(found, consumer, kind, mp) == {"serving": 1, "stale": 1, "deleted": 1}, consumer
    exporter, _ = app.build(parse_config(config), process_metrics=False)
    report_text, code = report(exporter.collect())
    assert code == 1
    assert "container container@web.service" in report_text and "nixos-container restart web" in report_text
    assert "systemctl restart backup.service" in report_text
    assert "which was deleted" in report_text

    # Restarted (a fresh namespace mounts the symlink again): current, not stale.
    service.stop()
    consumers(store.symlink, "backup.service")
    _, found = scrape(config)
    assert consumer_values(found, "backup.service", "service", mp) == {"serving": 2, "stale": 0, "deleted": 0}


def test_keep_generations_zero_keeps_the_consumer_on_old_secrets(make_store, consumers, scratch):
    store = make_store("tmpfs")
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    mp = str(store.mountpoint)
    config = {"stores": [{"mountpoint": mp, "symlink": str(store.symlink), "keep_generations": 0}],
              "microvm": {"state_dir": str(scratch / "microvms")}}  # fmt: skip
    reader = consumers(store.symlink, "app.service")
    store.switch({"db-password": "rotated\n"}, keep_generations=0)
    store.switch({"db-password": "rotated again\n"}, keep_generations=0)
    assert "db-password" in reader.listing()
    _, found = scrape(config)
    assert consumer_values(found, "app.service", "service", mp) == {"serving": 1, "stale": 1, "deleted": 0}
    assert value(found, "sopsnix_recommended_keep_generations", mountpoint=mp) == 4


def test_a_mount_of_the_whole_store_is_not_a_consumer(make_store, consumers, scratch):
    """The host's own mount of the store (root /) reads every generation: not a consumer."""
    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    mp = str(store.mountpoint)
    consumers(store.mountpoint, "whole.service")
    _, found = scrape({"stores": [{"mountpoint": mp, "symlink": str(store.symlink)}],
                       "microvm": {"state_dir": str(scratch / "microvms")}})  # fmt: skip
    assert not [k for k in found if k[0] == "sopsnix_consumer_serving_generation"]


def test_without_ptrace_every_consumer_is_still_seen(make_store, consumers, scratch):
    """As nobody in the keys group, without CAP_SYS_PTRACE: other users' ns/mnt links are closed, so
    namespaces are told apart by their mount tables, which anyone may read. Nothing is missed."""
    import yaml

    from serving import NOBODY, exporter_env, setpriv_prefix, unprivileged_python

    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    consumers(store.symlink, "container@web.service")
    consumers(store.symlink, "backup.service")
    store.switch({"db-password": "rotated\n"}, keep_generations=0)
    keys_gid = 64999
    os.chown(store.mountpoint, 0, keys_gid)
    os.chmod(store.mountpoint, 0o750)
    os.chmod(scratch, 0o755)
    mp = str(store.mountpoint)
    config_path = scratch / "config.yml"
    config_path.write_text(yaml.safe_dump({"stores": [{"mountpoint": mp, "symlink": str(store.symlink)}],
                                           "microvm": {"state_dir": str(scratch / "microvms")}}))  # fmt: skip
    config_path.chmod(0o644)
    out = scratch / "out"
    out.mkdir()
    out.chmod(0o777)
    result = subprocess.run(
        [*setpriv_prefix(NOBODY, groups=(keys_gid,)), unprivileged_python(), "-m", "sops_nix_exporter", "textfile",
         f"--config.file={config_path}", f"--output={out}/metrics.prom"],
        env=exporter_env(), capture_output=True, text=True, cwd="/", timeout=60,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    found = samples((out / "metrics.prom").read_text())
    assert value(found, "sopsnix_exporter_capability", capability="CAP_SYS_PTRACE") == 0
    for consumer, kind in (("container@web.service", "container"), ("backup.service", "service")):
        assert consumer_values(found, consumer, kind, mp) == {"serving": 1, "stale": 1, "deleted": 0}, consumer
