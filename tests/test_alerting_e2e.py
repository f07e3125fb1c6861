"""Issue 5 end to end: the real exporter, a real Prometheus with the rules, a real Alertmanager with the
example routing, and a webhook receiver in the test that sees what an operator's pager would see.

Two things differ from production, both to keep the test short, neither in what is being tested:
- the rules are rendered by alerts/build.py with --for-scale=1/60, so a `for: 1m` waits one second (and
  are loaded once the exporter has been scraped, since a scaled `for: 5m` is shorter than Prometheus's
  wait before a new target's first scrape);
- the Alertmanager configuration is a copy of alerts/alertmanager.example.yml whose receiver URLs point at
  the test's webhook and whose group_wait/group_interval are one second. Routes, receivers, grouping and
  inhibit rules are the example's, unchanged.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import requests
import yaml

from consumers import consumers  # noqa: F401 (a fixture)
from fingerprinting import fingerprint, with_fingerprints
from promstack import Alertmanager, Prometheus, WebhookReceiver
from sopsnix import SAMPLE_SECRETS, Secrets

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "alerts" / "alertmanager.example.yml"

pytestmark = pytest.mark.slow


def load_build():
    spec = importlib.util.spec_from_file_location("alerts_build", ROOT / "alerts" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build()


def alertmanager_test_copy(directory: Path, hook: WebhookReceiver) -> Path:
    """The example routing with every webhook pointed at `hook` (one path per receiver) and short timers."""
    config = yaml.safe_load(EXAMPLE.read_text())
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = hook.url_for(receiver["name"])
    config["route"]["group_wait"] = "1s"
    config["route"]["group_interval"] = "1s"
    path = directory / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def post_alerts(alertmanager: Alertmanager, alerts: list[dict]) -> None:
    """Hand alerts to Alertmanager the way Prometheus does (API v2)."""
    response = requests.post(f"{alertmanager.url}/api/v2/alerts", json=alerts, timeout=10)
    response.raise_for_status()


def named(name: str, **labels: str):
    def matches(alert: dict) -> bool:
        return alert["labels"].get("alertname") == name and all(alert["labels"].get(k) == v for k, v in labels.items())

    return matches


def test_deleted_generation_pages_through_alertmanager_and_resolves_after_restart(
    make_store, pinners, scratch, serve
):
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    mountpoint = str(store.mountpoint)
    store.switch(SAMPLE_SECRETS, keep_generations=1)  # generation 1
    virtiofsd = pinners(source=store.symlink, vm="vm1", tag="secrets", state_dir=state_dir)  # microvm@vm1 serves it
    store.switch({"db-password": "rotated\n"}, keep_generations=1)  # generation 2 linked, 1 deleted under vm1

    exporter = serve(
        {
            "stores": [{"mountpoint": mountpoint, "symlink": str(store.symlink), "keep_generations": 1}],
            "microvm": {"state_dir": str(state_dir)},
        }
    )
    instance = exporter.url.removeprefix("http://")
    rules = scratch / "sops-nix.rules.yml"
    rules.write_text(build.render(for_scale=1 / 60))

    with WebhookReceiver() as hook:
        config = alertmanager_test_copy(scratch, hook)
        with Alertmanager.start(scratch, config) as alertmanager, Prometheus.start(
            scratch, [instance], alertmanager_url=alertmanager.url
        ) as prometheus:
            prometheus.wait_for(f'sopsnix_vm_serving_deleted_generation{{vm="vm1",mountpoint="{mountpoint}"}} == 1')
            # Rules only once the target is scraped: scaled down, SopsNixExporterDown's `for: 5m` is 5s,
            # no longer than Prometheus takes to hand a new scrape target its first scrape.
            prometheus.load_rules([rules])

            alert = hook.wait_for(named("SopsNixVMServingDeletedGeneration"), name="page", timeout=60)
            assert alert["status"] == "firing"
            assert alert["labels"] == {
                "alertname": "SopsNixVMServingDeletedGeneration",
                "severity": "critical",
                "instance": instance,
                "job": "sops-nix",
                "vm": "vm1",
                "share": "secrets",
                "mountpoint": mountpoint,
            }
            annotations = alert["annotations"]
            summary = "VM vm1 serves a deleted secrets generation: its secrets directory is empty"
            assert annotations["summary"] == summary
            assert annotations["description"].startswith(
                f"The virtiofsd of share secrets of VM vm1 on {instance} still serves generation 1 of {mountpoint}, "
                "which has been deleted; the store's current generation is 2. "
            ), annotations["description"]
            assert "Restart microvm@vm1" in annotations["description"]
            assert annotations["runbook_url"] == f"{build.DEFAULT_RUNBOOK_BASE}#sopsnixvmservingdeletedgeneration"
            (page,) = [p for p in hook.payloads("page") if alert in p["alerts"]]
            assert page["receiver"] == "page"
            assert page["groupLabels"] == {"instance": instance, "vm": "vm1"}

            # The fix the runbook gives: restart the VM's virtiofsd, which then serves the current generation.
            virtiofsd.stop()
            pinners(source=store.symlink, vm="vm1", tag="secrets", state_dir=state_dir)
            resolved = hook.wait_for(
                lambda a: named("SopsNixVMServingDeletedGeneration")(a) and a["status"] == "resolved",
                name="page",
                timeout=60,
            )
            assert resolved["labels"] == alert["labels"]

        # Nothing else paged, and no staleness ticket for a share whose generation is gone.
        paged = {a["labels"]["alertname"] for a in hook.alerts("page")}
        assert paged == {"SopsNixVMServingDeletedGeneration"}, hook.alerts("page")
        ticketed = {a["labels"]["alertname"] for a in hook.alerts("ticket")}
        assert "SopsNixVMServingStaleGeneration" not in ticketed, hook.alerts("ticket")
        assert not hook.payloads("drop")


def test_example_routing_pages_tickets_drops_and_inhibits(scratch):
    host = "host1:9785"
    share = {"instance": host, "job": "sops-nix", "mountpoint": "/run/secrets.d", "share": "secrets"}

    def alert(name: str, severity: str, **labels: str) -> dict:
        return {
            "labels": {"alertname": name, "severity": severity, **labels},
            "annotations": {"summary": name, "description": name, "runbook_url": f"https://runbooks/#{name.lower()}"},
        }

    with WebhookReceiver() as hook:
        with Alertmanager.start(scratch, alertmanager_test_copy(scratch, hook)) as alertmanager:
            post_alerts(
                alertmanager,
                [
                    alert("SopsNixVMServingDeletedGeneration", "critical", vm="vm1", **share),
                    alert("SopsNixVMSecretsPrunedOnNextSwitch", "warning", vm="vm3", **share),
                    alert("SopsNixPendingGeneration", "info", instance=host, mountpoint="/run/secrets.d"),
                ],
            )
            post_alerts(
                alertmanager,
                [
                    # Same share as the deleted generation: inhibited. Another VM's share: a ticket.
                    alert("SopsNixVMServingStaleGeneration", "warning", vm="vm1", **share),
                    alert("SopsNixVMServingStaleGeneration", "warning", vm="vm2", **share),
                ],
            )

            hook.wait_for(named("SopsNixVMServingDeletedGeneration", vm="vm1"), name="page", timeout=30)
            hook.wait_for(named("SopsNixVMSecretsPrunedOnNextSwitch", vm="vm3"), name="ticket", timeout=30)
            hook.wait_for(named("SopsNixVMServingStaleGeneration", vm="vm2"), name="ticket", timeout=30)

            # What Alertmanager decided for each alert, not only what happened to arrive so far.
            state = {
                (a["labels"]["alertname"], a["labels"].get("vm")): a for a in alertmanager.alerts(inhibited="true")
            }
            stale_vm1 = state[("SopsNixVMServingStaleGeneration", "vm1")]
            assert stale_vm1["status"]["state"] == "suppressed"
            assert stale_vm1["status"]["inhibitedBy"], stale_vm1
            assert not state[("SopsNixVMServingStaleGeneration", "vm2")]["status"]["inhibitedBy"]
            assert [r["name"] for r in state[("SopsNixPendingGeneration", None)]["receivers"]] == ["drop"]
            assert [r["name"] for r in state[("SopsNixVMServingDeletedGeneration", "vm1")]["receivers"]] == ["page"]

            # Give a wrongly routed or uninhibited notification the time to arrive: group_wait is 1s.
            time.sleep(3)

    assert {(a["labels"]["alertname"], a["labels"]["vm"]) for a in hook.alerts("page")} == {
        ("SopsNixVMServingDeletedGeneration", "vm1")
    }
    assert {(a["labels"]["alertname"], a["labels"]["vm"]) for a in hook.alerts("ticket")} == {
        ("SopsNixVMSecretsPrunedOnNextSwitch", "vm3"),
        ("SopsNixVMServingStaleGeneration", "vm2"),
    }
    assert not hook.payloads("drop")
    # Grouped by host and VM: one notification per VM, never one for two VMs.
    for payload in hook.payloads():
        assert set(payload["groupLabels"]) == {"instance", "vm"}
        assert len({a["labels"]["vm"] for a in payload["alerts"]}) == 1


def test_share_of_the_mount_point_pages_and_writable_share_tickets(make_store, shares, scratch, serve):
    """Issue 14: real Rust virtiofsd processes, one sharing the store's mount point (read-only: it pages for
    the exposure alone), one sharing the symlink without --readonly (a ticket), one doing it right (silent)."""
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    mountpoint = str(store.mountpoint)
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    shares(source=store.mountpoint, vm="exposing", state_dir=state_dir, readonly=True, real=True)
    shares(source=store.symlink, vm="writable", state_dir=state_dir, real=True)
    shares(source=store.symlink, vm="right", state_dir=state_dir, readonly=True, real=True)

    exporter = serve(
        {
            "stores": [{"mountpoint": mountpoint, "symlink": str(store.symlink), "keep_generations": 0}],
            "microvm": {"state_dir": str(state_dir)},
        }
    )
    instance = exporter.url.removeprefix("http://")
    rules = scratch / "sops-nix.rules.yml"
    rules.write_text(build.render(for_scale=1 / 60))

    with WebhookReceiver() as hook:
        config = alertmanager_test_copy(scratch, hook)
        with Alertmanager.start(scratch, config) as alertmanager, Prometheus.start(
            scratch, [instance], alertmanager_url=alertmanager.url
        ) as prometheus:
            prometheus.wait_for("sopsnix_vm_share_exposes_store", lambda r: len(r) == 3)
            prometheus.wait_for("sopsnix_vm_share_writable", lambda r: len(r) == 3)
            prometheus.load_rules([rules])

            page = hook.wait_for(named("SopsNixVMShareExposesStore"), name="page", timeout=60)
            assert page["labels"] == {
                "alertname": "SopsNixVMShareExposesStore",
                "severity": "critical",
                "instance": instance,
                "job": "sops-nix",
                "vm": "exposing",
                "share": "secrets",
                "mountpoint": mountpoint,
            }
            description = page["annotations"]["description"]
            assert description.startswith(
                f"Share secrets of VM exposing on {instance} shares {mountpoint}, the mount point of store {mountpoint}"
            ), description
            assert f"Share {store.symlink} (or a subdirectory" in description, description
            assert page["annotations"]["runbook_url"] == f"{build.DEFAULT_RUNBOOK_BASE}#sopsnixvmshareexposesstore"

            ticket = hook.wait_for(named("SopsNixVMShareWritable"), name="ticket", timeout=60)
            assert ticket["labels"]["vm"] == "writable", ticket
            assert f"serves {store.symlink} of {mountpoint} without --readonly" in ticket["annotations"]["description"]
            # Writable's scaled `for` is 10s: give a wrong ticket for a read-only share the time to arrive.
            time.sleep(3)

    assert {(a["labels"]["alertname"], a["labels"]["vm"]) for a in hook.alerts("page")} == {
        ("SopsNixVMShareExposesStore", "exposing")
    }
    assert {(a["labels"]["alertname"], a["labels"]["vm"]) for a in hook.alerts("ticket")} == {
        ("SopsNixVMShareWritable", "writable")
    }
    assert not hook.payloads("drop")


def test_consumer_of_a_deleted_generation_pages_and_resolves_after_restart(make_store, consumers, scratch, serve):  # noqa: F811
    """Issue 14, part 2: a NixOS container (a real mount namespace bind-mounting the real symlink, in a cgroup
    named container@web.service) whose generation a switch deletes pages; restarted, it resolves."""
    store = make_store("ramfs")
    mountpoint = str(store.mountpoint)
    store.switch(SAMPLE_SECRETS, keep_generations=1)  # generation 1
    container = consumers(store.symlink, "container@web.service")  # its bindMounts hold generation 1
    store.switch({"db-password": "rotated\n"}, keep_generations=1)  # generation 2 linked, 1 deleted under it

    exporter = serve(
        {
            "stores": [{"mountpoint": mountpoint, "symlink": str(store.symlink), "keep_generations": 1}],
            "microvm": {"state_dir": str(scratch / "microvms")},
        }
    )
    instance = exporter.url.removeprefix("http://")
    rules = scratch / "sops-nix.rules.yml"
    rules.write_text(build.render(for_scale=1 / 60))
    labels = {"consumer": "container@web.service", "kind": "container", "mountpoint": mountpoint}

    with WebhookReceiver() as hook:
        config = alertmanager_test_copy(scratch, hook)
        with Alertmanager.start(scratch, config) as alertmanager, Prometheus.start(
            scratch, [instance], alertmanager_url=alertmanager.url
        ) as prometheus:
            prometheus.wait_for('sopsnix_consumer_serving_deleted_generation{consumer="container@web.service"} == 1')
            prometheus.load_rules([rules])

            alert = hook.wait_for(named("SopsNixConsumerServingDeletedGeneration"), name="page", timeout=60)
            assert alert["status"] == "firing"
            assert alert["labels"] == {
                "alertname": "SopsNixConsumerServingDeletedGeneration",
                "severity": "critical",
                "instance": instance,
                "job": "sops-nix",
                **labels,
            }
            annotations = alert["annotations"]
            assert annotations["summary"] == (
                "Container container@web.service mounts a deleted secrets generation: its secrets directory is empty"
            )
            assert annotations["description"].startswith(
                f"The container container@web.service on {instance} bind-mounts generation 1 of {mountpoint}, "
                "which has been deleted; the store's current generation is 2. "
            ), annotations["description"]
            assert "nixos-container restart web " in annotations["description"], annotations["description"]
            assert annotations["runbook_url"] == (
                f"{build.DEFAULT_RUNBOOK_BASE}#sopsnixconsumerservingdeletedgeneration"
            )
            (page,) = [p for p in hook.payloads("page") if alert in p["alerts"]]
            assert page["groupLabels"] == {"instance": instance, "consumer": "container@web.service"}

            # The fix the runbook gives: restart the container, whose new namespace mounts generation 2.
            container.stop()
            consumers(store.symlink, "container@web.service")
            resolved = hook.wait_for(
                lambda a: named("SopsNixConsumerServingDeletedGeneration")(a) and a["status"] == "resolved",
                name="page",
                timeout=60,
            )
            assert resolved["labels"] == alert["labels"]

        paged = {a["labels"]["alertname"] for a in hook.alerts("page")}
        assert paged == {"SopsNixConsumerServingDeletedGeneration"}, hook.alerts("page")
        ticketed = {a["labels"]["alertname"] for a in hook.alerts("ticket")}
        assert "SopsNixConsumerServingStaleGeneration" not in ticketed, hook.alerts("ticket")
        assert not hook.payloads("drop")


def test_content_fingerprints_decide_which_reader_is_outdated(make_store, shares, consumers, scratch, serve):  # noqa: F811
    """Issue 15: with fingerprints in place and keepGenerations = 0, an activation that changes no secret raises
    nothing for any VM or consumer, however stale their numbers; one that changes a secret a VM serves tickets
    SopsNixVMServingOutdatedSecrets for that VM alone, and a VM that serves only another subtree stays quiet.

    Real Rust virtiofsd shares (read-only; one of the whole symlink, one of SYMLINK/app), a NixOS container
    bind-mounting the symlink, the real `fingerprint` command after each switch as its unit runs it."""
    secrets = Secrets()
    values = {"db-password": secrets.content(40), "app/api-token": secrets.content(40),
              "other/key": secrets.content(40)}  # fmt: skip
    store = make_store("ramfs")
    state_dir = scratch / "microvms"
    mountpoint = str(store.mountpoint)
    config = with_fingerprints(
        {
            "stores": [{"mountpoint": mountpoint, "symlink": str(store.symlink), "keep_generations": 0}],
            "microvm": {"state_dir": str(state_dir)},
        },
        scratch,
    )
    store.switch(values, keep_generations=0)  # generation 1
    shares(source=store.symlink, vm="web", state_dir=state_dir, readonly=True, real=True)  # all of it
    shares(source=f"{store.symlink}/app", vm="api", state_dir=state_dir, readonly=True, real=True)  # app/ only
    consumers(store.symlink, "container@web.service")
    fingerprint(config, scratch)
    store.switch(values, keep_generations=0)  # generation 2: the same values
    fingerprint(config, scratch)

    exporter = serve(config)
    instance = exporter.url.removeprefix("http://")
    # 1/360: the stale hour is 10s, the outdated quarter of an hour 2.5s; waiting 12s outlasts every `for`
    # a VM or consumer alert has, so silence then is silence for good.
    scale = 1 / 360
    outlast = 12
    rules = scratch / "sops-nix.rules.yml"
    rules.write_text(build.render(for_scale=scale))
    readers = {"vm", "consumer"}

    with WebhookReceiver() as hook:
        config_path = alertmanager_test_copy(scratch, hook)
        with Alertmanager.start(scratch, config_path) as alertmanager, Prometheus.start(
            scratch, [instance], alertmanager_url=alertmanager.url
        ) as prometheus:
            # Every reader is stale by number, and known to read the same secrets.
            prometheus.wait_for("sopsnix_vm_serving_stale_generation == 1", lambda r: len(r) == 2)
            prometheus.wait_for("sopsnix_consumer_serving_stale_generation == 1", lambda r: len(r) == 1)
            prometheus.wait_for("sopsnix_vm_serving_outdated_secrets == 0", lambda r: len(r) == 2)
            prometheus.wait_for("sopsnix_consumer_serving_outdated_secrets == 0", lambda r: len(r) == 1)
            prometheus.wait_for(f'sopsnix_current_generation_changed_files{{mountpoint="{mountpoint}"}} == 0')
            prometheus.load_rules([rules])

            time.sleep(outlast)
            assert prometheus.alerts() == [], prometheus.alerts()
            assert not hook.alerts(), hook.alerts()

            # A secret outside app/ rotated: web reads it (and the container, which mounts all of it); api does not.
            store.switch({**values, "other/key": secrets.content(40)}, keep_generations=0)  # generation 3
            fingerprint(config, scratch)

            ticket = hook.wait_for(named("SopsNixVMServingOutdatedSecrets"), name="ticket", timeout=60)
            assert ticket["status"] == "firing"
            assert ticket["labels"] == {
                "alertname": "SopsNixVMServingOutdatedSecrets",
                "severity": "warning",
                "instance": instance,
                "job": "sops-nix",
                "vm": "web",
                "share": "secrets",
                "mountpoint": mountpoint,
            }
            description = ticket["annotations"]["description"]
            assert description.startswith(
                f"Share secrets of VM web on {instance} serves generation 1 of {mountpoint}, and 1 file(s) of what "
                "it serves differ from the current generation (3): "
            ), description
            assert "Restart microvm@web " in description, description
            assert ticket["annotations"]["runbook_url"] == f"{build.DEFAULT_RUNBOOK_BASE}#sopsnixvmservingoutdatedsecrets"
            (payload,) = [p for p in hook.payloads("ticket") if ticket in p["alerts"]]
            assert payload["groupLabels"] == {"instance": instance, "vm": "web"}

            container = hook.wait_for(named("SopsNixConsumerServingOutdatedSecrets"), name="ticket", timeout=60)
            assert container["labels"]["consumer"] == "container@web.service", container
            assert "nixos-container restart web " in container["annotations"]["description"], container

            # Past every `for` again: api (stale, same app/) raised nothing, nor did any stale alert.
            time.sleep(outlast)
            firing = {(a["labels"]["alertname"], a["labels"].get("vm") or a["labels"].get("consumer"))
                      for a in prometheus.alerts()}  # fmt: skip
            assert firing == {("SopsNixVMServingOutdatedSecrets", "web"),
                              ("SopsNixConsumerServingOutdatedSecrets", "container@web.service")}, firing  # fmt: skip

    ticketed = {(a["labels"]["alertname"], a["labels"].get("vm") or a["labels"].get("consumer"))
                for a in hook.alerts("ticket")}  # fmt: skip
    assert ticketed == {("SopsNixVMServingOutdatedSecrets", "web"),
                        ("SopsNixConsumerServingOutdatedSecrets", "container@web.service")}, ticketed  # fmt: skip
    assert not hook.payloads("page"), hook.alerts("page")
    assert not hook.payloads("drop")
    assert all(readers & set(a["labels"]) for a in hook.alerts()), hook.alerts()
