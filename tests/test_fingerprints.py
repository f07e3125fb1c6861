"""Issue 15: content fingerprints, so a VM is flagged only when the secrets it reads differ from the host's.

The real `fingerprint` command (as root, as its unit runs it) over a real ramfs store switched as sops-nix
switches it, the real Rust virtiofsd serving the symlink (or a subdirectory of it), and the exporter, which
reads only the fingerprints."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import yaml
from prometheus_client import generate_latest

from sops_nix_exporter import app
from sops_nix_exporter.check import report
from sops_nix_exporter.config import parse_config

from scrape import samples, value
from sopsnix import Secrets


def config_for(store, scratch, keep: int = 0) -> dict:
    return {
        "stores": [{"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), "keep_generations": keep}],
        "microvm": {"state_dir": str(scratch / "microvms")},
        "fingerprint_dir": str(scratch / "fingerprints"),
    }


def fingerprint(config: dict, scratch) -> subprocess.CompletedProcess:
    path = scratch / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return subprocess.run([sys.executable, "-m", "sops_nix_exporter", "fingerprint", f"--config.file={path}"],
                          capture_output=True, text=True, timeout=60)  # fmt: skip


def scrape(config: dict) -> dict:
    _, registry = app.build(parse_config(config), process_metrics=False)
    return samples(generate_latest(registry).decode())


def share_content(found: dict, vm: str, mp: str) -> dict:
    labels = {"vm": vm, "share": "secrets", "mountpoint": mp}
    return {
        "stale": value(found, "sopsnix_vm_serving_stale_generation", **labels),
        "outdated": value(found, "sopsnix_vm_serving_outdated_secrets", **labels),
        "files": value(found, "sopsnix_vm_outdated_secret_files", **labels),
    }


def test_outdated_only_when_the_content_differs(make_store, shares, scratch):
    secrets = Secrets()
    values = {"db-password": secrets.content(40), "app/api-token": secrets.content(40),
              "other/key": secrets.content(40)}  # fmt: skip
    store = make_store("ramfs")
    store.switch(values, keep_generations=0)
    mp = str(store.mountpoint)
    config = config_for(store, scratch)
    state_dir = scratch / "microvms"
    shares(source=store.symlink, vm="web", state_dir=state_dir, readonly=True)  # the whole generation
    shares(source=f"{store.symlink}/app", vm="api", state_dir=state_dir, readonly=True)  # only app/

    result = fingerprint(config, scratch)
    assert result.returncode == 0, result.stderr
    found = scrape(config)
    assert value(found, "sopsnix_fingerprinted_generations", mountpoint=mp) == 1
    assert share_content(found, "web", mp) == {"stale": 0, "outdated": 0, "files": 0}

    # An activation that changes nothing: a new generation with the same values. Stale, but not outdated.
    store.switch(values, keep_generations=0)
    assert fingerprint(config, scratch).returncode == 0
    found = scrape(config)
    assert value(found, "sopsnix_current_generation_changed_files", mountpoint=mp) == 0
    assert share_content(found, "web", mp) == {"stale": 1, "outdated": 0, "files": 0}
    exporter, _ = app.build(parse_config(config), process_metrics=False)
    text, code = report(exporter.collect())
    assert code == 0, text
    assert "serves generation 1, current 2: same secrets" in text

    # A secret outside app/ rotated to a value of the same length: web reads it, api does not.
    rotated = {**values, "other/key": secrets.content(40)}
    store.switch(rotated, keep_generations=0)
    assert fingerprint(config, scratch).returncode == 0
    found = scrape(config)
    assert value(found, "sopsnix_current_generation_changed_files", mountpoint=mp) == 1
    assert share_content(found, "web", mp) == {"stale": 1, "outdated": 1, "files": 1}
    assert share_content(found, "api", mp) == {"stale": 1, "outdated": 0, "files": 0}
    exporter, _ = app.build(parse_config(config), process_metrics=False)
    text, code = report(exporter.collect())
    assert code == 1
    assert "serves generation 1, current 3: 1 secret(s) outdated, restart microvm@web" in text
    assert "VM api share secrets" in text and "current 3: same secrets" in text

    # A secret in app/ added: api's subtree gained a file.
    store.switch({**rotated, "app/new": secrets.content(10)}, keep_generations=0)
    assert fingerprint(config, scratch).returncode == 0
    assert share_content(scrape(config), "api", mp) == {"stale": 1, "outdated": 1, "files": 1}


def test_no_fingerprint_no_verdict_on_content(make_store, shares, scratch):
    """Without fingerprints (not enabled, or not run yet) the content is unknown: no outdated series at all."""
    store = make_store("ramfs")
    store.switch({"db-password": "one\n"}, keep_generations=0)
    shares(source=store.symlink, vm="web", state_dir=scratch / "microvms")
    store.switch({"db-password": "two\n"}, keep_generations=0)
    found = scrape(config_for(store, scratch))
    mp = str(store.mountpoint)
    assert share_content(found, "web", mp) == {"stale": 1, "outdated": None, "files": None}
    assert value(found, "sopsnix_fingerprinted_generations", mountpoint=mp) is None
    assert value(found, "sopsnix_current_generation_changed_files", mountpoint=mp) is None


def test_what_fingerprint_writes(make_store, scratch):
    secrets = Secrets()
    store = make_store("tmpfs")
    values = {secrets.name(): secrets.content(100), f"rendered/{secrets.name()}": secrets.content(100)}
    store.switch(values, keep_generations=0)
    store.switch(values, keep_generations=0)
    store.write_generation(3, values)  # pending: an activation may still be writing it
    config = config_for(store, scratch)
    (scratch / "fingerprints").mkdir(mode=0o750)
    os.chown(scratch / "fingerprints", 0, 64999)  # the exporter's group
    result = fingerprint(config, scratch)
    assert result.returncode == 0, result.stderr
    # Nothing it prints names a secret or carries a value.
    texts = [t if isinstance(t, str) else t.decode(errors="replace") for t in [*values, *values.values()]]
    for secret in texts:
        assert secret.strip() not in result.stdout + result.stderr
    key = scratch / "fingerprints" / "key"
    assert stat.S_IMODE(key.stat().st_mode) == 0o600 and key.stat().st_uid == 0
    directory = next(p for p in (scratch / "fingerprints").iterdir() if p.is_dir())
    assert sorted(p.name for p in directory.iterdir()) == ["1.json", "2.json"]  # not the pending 3
    for path in directory.iterdir():
        st = path.stat()
        assert stat.S_IMODE(st.st_mode) == 0o640 and st.st_gid == 64999
        text = path.read_text()
        assert not any(t.strip() in text for t in texts[len(values):]), "a value in a fingerprint"
        document = json.loads(text)
        assert sorted(document["files"]) == sorted(values)
    first = json.loads((directory / "1.json").read_text())
    second = json.loads((directory / "2.json").read_text())
    assert first["files"] == second["files"], "same values, same digests"

    # A prune: the fingerprint of a removed generation goes, but for the one the current replaced.
    store.link(3)
    store.prune(1)  # keepGenerations = 1: generations 1 and 2 go
    assert store.generations() == [3]
    assert fingerprint(config, scratch).returncode == 0
    assert sorted(p.name for p in directory.iterdir()) == ["2.json", "3.json"]


def test_a_remounted_store_is_fingerprinted_anew(make_store, scratch):
    """A number reused on a new filesystem (a remount, as after a reboot) is another directory: the old
    fingerprint does not count, and the next run writes its own."""
    store = make_store("ramfs")
    store.switch({"db-password": "one\n"}, keep_generations=0)
    mp = str(store.mountpoint)
    config = config_for(store, scratch)
    assert fingerprint(config, scratch).returncode == 0
    assert value(scrape(config), "sopsnix_fingerprinted_generations", mountpoint=mp) == 1
    subprocess.run(["umount", mp], check=True)
    subprocess.run(["mount", "-t", "ramfs", "ramfs", mp], check=True)  # the fixture unmounts it afterwards
    store.switch({"db-password": "two\n"}, keep_generations=0)  # generation 1 again, on the new ramfs
    found = scrape(config)
    share_dir = next(p for p in (scratch / "fingerprints").iterdir() if p.is_dir())
    document = json.loads((share_dir / "1.json").read_text())
    assert document["identity"][:2] != [os.stat(store.generation_path(1)).st_dev, os.stat(store.generation_path(1)).st_ino]
    assert value(found, "sopsnix_current_generation_changed_files", mountpoint=mp) is None
    assert fingerprint(config, scratch).returncode == 0
    document = json.loads((share_dir / "1.json").read_text())
    assert document["identity"][:2] == [os.stat(store.generation_path(1)).st_dev, os.stat(store.generation_path(1)).st_ino]


def test_the_exporter_commands_never_load_the_fingerprint_command():
    """Only `fingerprint` reads secrets; serve, check and textfile do not even import it."""
    code = ("import sys, sops_nix_exporter.cli, sops_nix_exporter.app; "
            "print('sops_nix_exporter.fingerprint' in sys.modules)")  # fmt: skip
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "False", result.stderr


def test_the_last_run_and_its_errors_show_in_the_metrics(make_store, scratch):
    store = make_store("ramfs")
    store.switch({"db-password": "one\n", "app/token": "two\n"}, keep_generations=0)
    config = config_for(store, scratch)
    found = scrape(config)
    assert value(found, "sopsnix_fingerprint_last_run_timestamp_seconds") is None
    assert fingerprint(config, scratch).returncode == 0
    found = scrape(config)
    assert value(found, "sopsnix_fingerprint_run_errors") == 0
    assert value(found, "sopsnix_fingerprint_last_run_timestamp_seconds") > 0
    # Part of the next generation closed to the run (root without CAP_DAC_READ_SEARCH and a 0000 directory): the
    # run says which generation, never which file, exits 1, and the exporter publishes and tells it.
    store.switch({"db-password": "three\n", "app/token": "four\n"}, keep_generations=0)
    os.chmod(store.generation_path(2) / "app", 0)
    try:
        result = subprocess.run(
            ["setpriv", "--reuid=0", "--regid=0", "--clear-groups", "--inh-caps=-all", "--bounding-set=-all",
             sys.executable, "-m", "sops_nix_exporter", "fingerprint", f"--config.file={scratch / 'config.yml'}"],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    finally:
        os.chmod(store.generation_path(2) / "app", 0o755)
    assert result.returncode == 1, result.stderr
    assert "generation 2" in result.stderr and "token" not in result.stderr
    found = scrape(config)
    assert value(found, "sopsnix_fingerprint_run_errors") == 1
    exporter, _ = app.build(parse_config(config), process_metrics=False)
    text, code = report(exporter.collect())
    assert "the last fingerprint run could not fingerprint 1" in text and code == 1
