#!/usr/bin/env python3
"""Renders the exporter's recording and alerting rules for Prometheus.

    python3 alerts/build.py                          # prints the rules with the defaults
    python3 alerts/build.py -o alerts/sops-nix.rules.yml
    python3 alerts/build.py --job=secrets --runbook-base=https://wiki.example.com/sops-nix/runbooks -o my.rules.yml

The committed alerts/sops-nix.rules.yml is this script's output with the defaults (a test checks that), so it
can be loaded as is. Two things differ between sites, and this script is the one way to change them:

  --job           the scrape job whose `up` series SopsNixExporterDown watches (default: sops-nix). Every
                  other rule selects by metric name alone, so it follows the exporter whatever job scrapes it.
  --runbook-base  the URL of docs/runbooks.md as your operators can open it; each alert's runbook_url is
                  this base plus '#' and the alert name in lower case (the heading's anchor).

--for-scale multiplies every `for` duration; it exists for end-to-end tests that cannot wait an hour
(tests/test_alerting_e2e.py renders with a scale of 1/60, so that one minute becomes one second).
Needs nothing but Python 3.11.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

DEFAULT_JOB = "sops-nix"
DEFAULT_RUNBOOK_BASE = "https://github.com/sops-nix-exporter/sops-nix-exporter/blob/main/docs/runbooks.md"

# No rule aggregates, and binary operators match on all labels but the ones they name in ignoring(), so an
# alert keeps every label of the series it fires on: instance, job, mountpoint, vm, share, consumer, kind, and
# whatever target labels a site adds. Numbers beside the firing series come from `query` in the annotations.


def value_of(metric: str, labels: tuple[str, ...], format: str = 'printf "%.0f"') -> str:
    """A template fragment that prints the value of `metric` for the alert's own label values."""
    selector = ",".join(f"{label}=%q" for label in labels)
    arguments = " ".join(f"$labels.{label}" for label in labels)
    return (
        f'{{{{ with printf "{metric}{{{selector}}}" {arguments} | query }}}}'
        f"{{{{ . | first | value | {format} }}}}{{{{ else }}}}unknown{{{{ end }}}}"
    )


STORE = ("instance", "mountpoint")
SHARE = ("instance", "vm", "share")
CONSUMER = ("instance", "consumer", "kind", "mountpoint")

CURRENT = value_of("sopsnix_current_generation", STORE)
KEEP = value_of("sopsnix_keep_generations", STORE)
SERVED = value_of("sopsnix_vm_serving_generation", SHARE)
BEHIND = value_of("sopsnix_vm_generations_behind", SHARE)
USED = value_of("sopsnix_generations_bytes", STORE, "humanize1024") + "B"
BUDGET = value_of("sopsnix_memory_budget_bytes", STORE, "humanize1024") + "B"
GENERATIONS = value_of("sopsnix_generations", STORE)
PER_GENERATION = value_of("sopsnix:memory_per_generation:bytes", STORE, "humanize1024") + "B"
SWITCHES = value_of("sopsnix:switches:per_day", STORE)
HELD = value_of("sopsnix_consumer_serving_generation", CONSUMER)
OUTDATED_FILES = value_of("sopsnix_vm_outdated_secret_files", SHARE)


def label_of(metric: str, labels: tuple[str, ...], label: str) -> str:
    """A template fragment that prints `label` of `metric`'s series for the alert's own label values."""
    selector = ",".join(f"{name}=%q" for name in labels)
    arguments = " ".join(f"$labels.{name}" for name in labels)
    return (
        f'{{{{ with printf "{metric}{{{selector}}}" {arguments} | query }}}}'
        f'{{{{ . | first | label "{label}" }}}}{{{{ else }}}}unknown{{{{ end }}}}'
    )


# What `sops-nix-exporter prune --apply` would remove from the store now. The exporter leaves the series out
# while some process cannot be inspected, so "unknown" there means unknown, never 0.
RECLAIMABLE_GENERATIONS = value_of("sopsnix_reclaimable_generations", STORE)
PRUNE_WOULD_FREE = (
    '{{ with printf "sopsnix_reclaimable_bytes{instance=%q,mountpoint=%q}" $labels.instance $labels.mountpoint'
    " | query }}A prune would free {{ . | first | value | humanize1024 }}B now, in "
    f"{RECLAIMABLE_GENERATIONS} generation(s) nobody reads (sopsnix_reclaimable_bytes)."
    "{{ else }}What a prune would free is unknown: sopsnix_reclaimable_bytes is absent while the exporter cannot"
    " inspect every process.{{ end }}"
)
ENABLE_PRUNE = (
    "To remove what nobody reads after every switch, dry-run sops-nix-exporter prune (it prints what it would"
    " remove and who holds the rest), then set services.sops-nix-exporter.prune.enable = true with"
    " sops.keepGenerations = 0 (elsewhere, the prune units of docs/deployment.md)."
)

SOURCE = label_of("sopsnix_vm_share_info", SHARE + ("mountpoint",), "source")
SYMLINK = label_of("sopsnix_symlink_info", STORE, "symlink")


def recording_rules() -> list[dict]:
    return [
        {
            # What one more generation costs: the mean over the generations the store holds now.
            "record": "sopsnix:memory_per_generation:bytes",
            "expr": "sopsnix_generations_bytes / (sopsnix_generations > 0)",
        },
        {
            # Activations that linked a new generation in the last 24 hours. Generation numbers only grow
            # until a reboot empties the ramfs, and the drop to 1 at boot counts once, as the boot's own switch.
            "record": "sopsnix:switches:per_day",
            "expr": "changes(sopsnix_current_generation[1d])",
        },
        {
            "record": "sopsnix:memory_budget:ratio",
            "expr": "sopsnix_generations_bytes / (sopsnix_memory_budget_bytes > 0)",
        },
        {
            # Days until the budget is reached if every switch adds a generation of the mean size and none is
            # pruned. Absent where nothing switches, and where pruning (keep_generations > 0 in the exporter's
            # configuration) caps the store below its budget; a store whose keep_generations the exporter does
            # not know is assumed not to prune.
            "record": "sopsnix:memory_budget:days_left",
            "expr": multiline(
                """
                ((sopsnix_memory_budget_bytes > 0) - sopsnix_generations_bytes)
                  / (sopsnix:memory_per_generation:bytes * (sopsnix:switches:per_day > 0))
                unless
                  (sopsnix_keep_generations > 0)
                    * sopsnix:memory_per_generation:bytes < sopsnix_memory_budget_bytes
                """
            ),
        },
    ]


def multiline(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    indent = min(len(line) - len(line.lstrip()) for line in lines)
    return "\n".join(line[indent:].rstrip() for line in lines) + "\n"


def alert(name: str, severity: str, expr: str, duration: str | None, summary: str, description: str) -> dict:
    rule: dict = {"alert": name, "expr": expr}
    if duration is not None:
        rule["for"] = duration
    rule["labels"] = {"severity": severity}
    rule["annotations"] = {"summary": summary, "description": " ".join(description.split())}
    return rule


def vm_alerts() -> list[dict]:
    share = "share {{ $labels.share }} of VM {{ $labels.vm }} on {{ $labels.instance }}"
    Share = "S" + share[1:]  # noqa: N806 (the same words at the start of a sentence)
    return [
        alert(
            "SopsNixVMServingDeletedGeneration", "critical",
            # The flag alone decides: the exporter may know a generation is deleted without its number.
            "sopsnix_vm_serving_deleted_generation == 1",
            "1m",
            "VM {{ $labels.vm }} serves a deleted secrets generation: its secrets directory is empty",
            f"""The virtiofsd of {share} still serves generation {SERVED} of
            {{{{ $labels.mountpoint }}}}, which has been deleted; the store's current generation is {CURRENT}.
            The guest sees an empty secrets directory, so every service in it that reads a secret fails.
            Restart microvm@{{{{ $labels.vm }}}} so that it serves the current generation.""",
        ),
        alert(
            "SopsNixVMShareDown", "critical",
            "sopsnix_vm_share_up == 0",
            "5m",
            "VM {{ $labels.vm }} declares secrets share {{ $labels.share }} but no virtiofsd serves it",
            f"""{Share} is declared (from {{{{ $labels.mountpoint }}}}) but no virtiofsd
            serves it: the guest cannot mount its secrets. Restart microvm@{{{{ $labels.vm }}}}, which
            restarts microvm-virtiofsd@{{{{ $labels.vm }}}} too (starting that unit does nothing while its
            supervisord runs).""",
        ),
        alert(
            "SopsNixVMSecretsPrunedOnNextSwitch", "warning",
            # Once the generation is deleted the forecast is moot: SopsNixVMServingDeletedGeneration pages.
            "sopsnix_vm_share_pruned_on_next_switch == 1 unless sopsnix_vm_serving_deleted_generation == 1",
            "10m",
            "The next activation will delete the secrets VM {{ $labels.vm }} serves",
            f"""{Share} serves generation {SERVED} of {{{{ $labels.mountpoint }}}};
            the current generation is {CURRENT} and keepGenerations is {KEEP},
            so the next activation deletes it and the guest's secrets directory turns empty. Raise
            keepGenerations (or set it to 0), or restart microvm@{{{{ $labels.vm }}}} after every switch.""",
        ),
        alert(
            "SopsNixVMServingStaleGeneration", "warning",
            # Only while the content is unknown: the outdated series exists, 0 or 1, exactly when both
            # fingerprints do, and then SopsNixVMServingOutdatedSecrets says whether the old number matters.
            # `unless` matches on every label, so whatever target labels a site adds match too.
            multiline(
                """
                sopsnix_vm_serving_stale_generation == 1
                  unless sopsnix_vm_serving_deleted_generation == 1
                  unless sopsnix_vm_serving_outdated_secrets
                """
            ),
            "1h",
            "VM {{ $labels.vm }} has not seen rotated secrets for an hour",
            f"""{Share} serves generation {SERVED} of {{{{ $labels.mountpoint }}}},
            {BEHIND} generation(s) behind the current one ({CURRENT}): the guest still
            reads the secrets of before the last rotation. Restart microvm@{{{{ $labels.vm }}}} to serve the
            current generation.""",
        ),
        alert(
            "SopsNixVMServingOutdatedSecrets", "warning",
            # A deleted generation pages instead; its fingerprint may outlive it and say "outdated" too.
            "sopsnix_vm_serving_outdated_secrets == 1 unless sopsnix_vm_serving_deleted_generation == 1",
            # Shorter than the stale hour: the content is known to differ, so the guest reads values the host
            # has rotated; a quarter of an hour still outlasts an activation and the restarts it triggers.
            "15m",
            "VM {{ $labels.vm }} reads secrets the host has rotated",
            f"""{Share} serves generation {SERVED} of {{{{ $labels.mountpoint }}}}, and
            {OUTDATED_FILES} file(s) of what it serves differ from the current generation ({CURRENT}): the guest
            reads values the host has rotated (or misses added ones, or still has removed ones). Restart
            microvm@{{{{ $labels.vm }}}} to serve the current generation.""",
        ),
        alert(
            "SopsNixVMShareExposesStore", "critical",
            # Published for a declared share that nothing serves too: the VM gets the store at its next start.
            "sopsnix_vm_share_exposes_store == 1",
            # The source is configuration, not a passing state, and waiting does not make the exposure
            # worse or better: the minute only spares a page for a series that exists for one evaluation.
            "1m",
            "VM {{ $labels.vm }} is handed the whole secrets store {{ $labels.mountpoint }} and sops-nix's key",
            f"""{Share} shares {SOURCE}, the mount point of store {{{{ $labels.mountpoint }}}}
            or a directory above it, not its symlink: the guest can read every generation the host keeps (the
            old values of rotated and revoked secrets) and sops-nix's private key file age-keys.txt. Share
            {SYMLINK} (or a subdirectory of secrets meant for this VM) in microvm.shares and restart
            microvm@{{{{ $labels.vm }}}}; treat the key and every secret the guest could read as known to it, and
            rotate them.""",
        ),
        alert(
            "SopsNixVMShareWritable", "warning",
            # Absent for a share nothing serves: a VM that is down writes nothing.
            "sopsnix_vm_share_writable == 1",
            # A ticket, like the other configuration findings: ten minutes let a switch that sets readOnly
            # restart the VM's virtiofsd without one.
            "10m",
            "VM {{ $labels.vm }} can write its secrets share {{ $labels.share }}",
            f"""The virtiofsd of {share} serves {SOURCE} of {{{{ $labels.mountpoint }}}}
            without --readonly: the guest can change, add or delete files in the host's secrets store,
            including the secrets the host's own services read from the same generation, and fill the store's
            memory. Set microvm.shares.*.readOnly = true for this share and restart
            microvm@{{{{ $labels.vm }}}}.""",
        ),
    ]


# How to make a consumer mount the current generation, as `check` says it (restart_hint in
# exporter/collector/shares.py): its bind mount resolved the symlink when its namespace was set up.
RESTART_CONSUMER = (
    '{{ if match "^container@.+[.]service$" $labels.consumer }}Restart the NixOS container: nixos-container '
    'restart {{ reReplaceAll "^container@(.+)[.]service$" "$1" $labels.consumer }}'
    '{{ else if match "^docker-" $labels.consumer }}Restart the container: docker restart '
    '{{ reReplaceAll "^docker-(.{1,12}).*$" "$1" $labels.consumer }}'
    '{{ else if match "^libpod-" $labels.consumer }}Restart the container: podman restart '
    '{{ reReplaceAll "^libpod-(.{1,12}).*$" "$1" $labels.consumer }}'
    '{{ else if eq $labels.kind "process" }}Restart whatever started the process {{ $labels.consumer }}'
    "{{ else }}Restart it: systemctl restart {{ $labels.consumer }}{{ end }}"
)


def consumer_alerts() -> list[dict]:
    consumer = "{{ $labels.kind }} {{ $labels.consumer }} on {{ $labels.instance }}"
    Consumer = "The " + consumer  # noqa: N806 (the same words at the start of a sentence)
    return [
        alert(
            "SopsNixConsumerServingDeletedGeneration", "critical",
            "sopsnix_consumer_serving_deleted_generation == 1",
            # As for a VM: a consumer restarted by the switch that pruned its generation mounts the new one
            # within the minute.
            "1m",
            "{{ $labels.kind | title }} {{ $labels.consumer }} mounts a deleted secrets generation: its "
            "secrets directory is empty",
            f"""{Consumer} bind-mounts generation {HELD} of {{{{ $labels.mountpoint }}}}, which has
            been deleted; the store's current generation is {CURRENT}. It sees an empty secrets directory, so
            whatever in it reads a secret fails. {RESTART_CONSUMER} so that it mounts the current
            generation.""",
        ),
        alert(
            "SopsNixConsumerServingStaleGeneration", "warning",
            multiline(
                """
                sopsnix_consumer_serving_stale_generation == 1
                  unless sopsnix_consumer_serving_deleted_generation == 1
                  unless sopsnix_consumer_serving_outdated_secrets
                """
            ),
            "1h",
            "{{ $labels.kind | title }} {{ $labels.consumer }} has not seen rotated secrets for an hour",
            f"""{Consumer} bind-mounts generation {HELD} of {{{{ $labels.mountpoint }}}}, older than
            the current one ({CURRENT}): it still reads the secrets of before the last rotation.
            {RESTART_CONSUMER} so that it mounts the current generation.""",
        ),
        alert(
            "SopsNixConsumerServingOutdatedSecrets", "warning",
            multiline(
                """
                sopsnix_consumer_serving_outdated_secrets == 1
                  unless sopsnix_consumer_serving_deleted_generation == 1
                """
            ),
            # The for of its VM counterpart, as for the other consumer alerts.
            "15m",
            "{{ $labels.kind | title }} {{ $labels.consumer }} reads secrets the host has rotated",
            f"""{Consumer} bind-mounts generation {HELD} of {{{{ $labels.mountpoint }}}}, and what its
            mount holds differs from the current generation ({CURRENT}): it reads values the host has rotated
            (or misses added ones, or still has removed ones). {RESTART_CONSUMER} so that it mounts the current
            generation.""",
        ),
    ]


def fingerprint_alerts() -> list[dict]:
    run = "the sops-nix-exporter fingerprint run on {{ $labels.instance }}"
    return [
        alert(
            "SopsNixFingerprintRunFailing", "warning",
            "sopsnix_fingerprint_run_errors > 0",
            # The run starts at each switch (a path unit on the symlinks), so an error stays until the next
            # one: ten minutes only spare a ticket for a run repeated at once.
            "10m",
            "The fingerprint run on {{ $labels.instance }} could not fingerprint {{ $value }} generation(s) or store(s)",
            f"""The last time {run} ran it could not fingerprint {{{{ $value }}}} generation(s) or store(s):
            for readers of those generations the content is unknown, so the stale-generation alerts stand in
            for the outdated-secrets ones. journalctl -u sops-nix-exporter-fingerprint names the store and the
            generation; fix the cause and start sops-nix-exporter-fingerprint.service again.""",
        ),
        alert(
            "SopsNixFingerprintsBehind", "warning",
            # The symlink was re-pointed after the last run finished: the current generation has no
            # fingerprint. Absent where fingerprints are not enabled (no run, no timestamp).
            "sopsnix_last_switch_timestamp_seconds > ignoring (mountpoint) group_left ()"
            " sopsnix_fingerprint_last_run_timestamp_seconds",
            # The run follows a switch within seconds; half an hour is a run that did not happen.
            "30m",
            "Secrets store {{ $labels.mountpoint }} switched after the last fingerprint run on {{ $labels.instance }}",
            f"""Store {{{{ $labels.mountpoint }}}} on {{{{ $labels.instance }}}} linked a new generation
            ({CURRENT}) after {run} last finished, half an hour ago or more: the current generation has no
            fingerprint, so no VM or consumer of it is judged by content and the stale-generation alerts stand
            in for the outdated-secrets ones. Check sops-nix-exporter-fingerprint.path and its service
            (systemctl status, journalctl -u sops-nix-exporter-fingerprint) and start the service.""",
        ),
    ]


def store_alerts() -> list[dict]:
    store = "store {{ $labels.mountpoint }} on {{ $labels.instance }}"
    return [
        alert(
            "SopsNixSecretsMemoryNearBudget", "warning",
            "sopsnix_generations_bytes / (sopsnix_memory_budget_bytes > 0) >= 0.8",
            "15m",
            "Secrets store {{ $labels.mountpoint }} uses {{ $value | humanizePercentage }} of its memory budget",
            f"""The generations of {store} hold {USED} in memory, {{{{ $value | humanizePercentage }}}} of its
            budget of {BUDGET}, in {GENERATIONS} generation(s). {PRUNE_WOULD_FREE} {ENABLE_PRUNE} Otherwise
            lower keepGenerations, reboot to reclaim the memory, or raise the budget.""",
        ),
        alert(
            "SopsNixSecretsMemoryOverBudget", "critical",
            "sopsnix_generations_bytes / (sopsnix_memory_budget_bytes > 0) >= 1",
            "15m",
            "Secrets store {{ $labels.mountpoint }} is over its memory budget",
            f"""The generations of {store} hold {USED} in memory, {{{{ $value | humanizePercentage }}}} of its
            budget of {BUDGET}, in {GENERATIONS} generation(s). That memory is never swapped out, and comes
            back only when generations are deleted or at reboot. {PRUNE_WOULD_FREE} {ENABLE_PRUNE} Otherwise
            lower keepGenerations, reboot to reclaim the memory, or raise the budget.""",
        ),
        alert(
            "SopsNixSecretsMemoryBudgetExhaustionPredicted", "warning",
            "sopsnix:memory_budget:days_left > 0 < 7",
            "1h",
            "Secrets store {{ $labels.mountpoint }} will reach its memory budget within a week",
            f"""At {SWITCHES} switch(es) per day and {PER_GENERATION} per generation, {store} reaches its
            budget of {BUDGET} in {{{{ printf "%.1f" $value }}}} day(s); it holds {USED} now, and pruning
            does not keep it below the budget. {PRUNE_WOULD_FREE} {ENABLE_PRUNE} Otherwise set keepGenerations
            above 0, reboot to reclaim the memory, or raise the budget.""",
        ),
        alert(
            "SopsNixSymlinkBroken", "critical",
            'sopsnix_symlink_info{state=~"missing|dangling"} == 1'
            " and ignoring (symlink, state) sopsnix_generations > 0",
            "5m",
            "The symlink of secrets store {{ $labels.mountpoint }} is {{ $labels.state }}",
            f"""The symlink {{{{ $labels.symlink }}}} of {store} is {{{{ $labels.state }}}} while the store
            holds {GENERATIONS} generation(s): services on the host that read secrets through it fail. Run the
            activation again (nixos-rebuild switch) so that sops-nix links a generation.""",
        ),
        alert(
            "SopsNixStackedMounts", "warning",
            "sopsnix_mounts > 1",
            "10m",
            "{{ $value }} filesystems are mounted on secrets store {{ $labels.mountpoint }}",
            f"""{{{{ $value }}}} filesystems are mounted on {store}: the lower ones are hidden but still hold
            their generations in memory, and a VM may serve a hidden one. Reboot, or unmount the lower mount
            once nothing serves it.""",
        ),
        alert(
            "SopsNixPendingGeneration", "info",
            "sopsnix_pending_generations > 0",
            "1h",
            "Secrets store {{ $labels.mountpoint }} has a generation that was written but never linked",
            f"""{{{{ $value }}}} generation(s) above the current one ({CURRENT}) of {store} were written but
            never linked, for over an hour: an activation failed or was a dry-activate. They hold memory until
            the next successful activation replaces them.""",
        ),
    ]


def exporter_alerts(job: str) -> list[dict]:
    up = f"up{{job={json.dumps(job)}}}"
    return [
        alert(
            "SopsNixExporterCollectorFailing", "warning",
            "sopsnix_scrape_collector_success == 0",
            "10m",
            "The {{ $labels.collector }} collector of the sops-nix exporter on {{ $labels.instance }} fails",
            """The {{ $labels.collector }} collector of the sops-nix exporter on {{ $labels.instance }} has
            failed every scrape for 10 minutes, so its metrics are missing and the alerts that need them are
            blind. The exporter's log says why.""",
        ),
        alert(
            "SopsNixExporterDown", "critical",
            f"{up} == 0 or absent({up})",
            "5m",
            "The sops-nix exporter{{ with $labels.instance }} on {{ . }}{{ end }} cannot be scraped",
            """{{ with $labels.instance }}Prometheus cannot scrape the sops-nix exporter on {{ . }} (job
            {{ $labels.job }}){{ else }}Prometheus has no target in job {{ $labels.job }}{{ end }}: every
            other sops-nix alert is blind while this lasts. Check the exporter's service on the host
            (sops-nix-exporter.service with the NixOS module) and Prometheus's scrape configuration.""",
        ),
    ]


def rules(job: str = DEFAULT_JOB, runbook_base: str = DEFAULT_RUNBOOK_BASE, for_scale: float = 1.0) -> dict:
    groups = [
        # Rules of one group run in order at each evaluation: the store alerts read the recording rules
        # of the same evaluation, never one interval late.
        {"name": "sops-nix.stores", "rules": recording_rules() + store_alerts()},
        {"name": "sops-nix.vms", "rules": vm_alerts()},
        {"name": "sops-nix.consumers", "rules": consumer_alerts()},
        {"name": "sops-nix.fingerprints", "rules": fingerprint_alerts()},
        {"name": "sops-nix.exporter", "rules": exporter_alerts(job)},
    ]
    for group in groups:
        for rule in group["rules"]:
            if "alert" in rule:
                rule["annotations"]["runbook_url"] = f"{runbook_base}#{rule['alert'].lower()}"
                if "for" in rule and for_scale != 1.0:
                    rule["for"] = scale_duration(rule["for"], for_scale)
    return {"groups": groups}


UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def scale_duration(duration: str, factor: float) -> str:
    milliseconds = round(int(duration[:-1]) * UNITS[duration[-1]] * 1000 * factor)
    return f"{max(milliseconds, 1)}ms"


# A small block-style YAML writer for the one shape this file has (mappings, lists, strings): it keeps
# expressions on their own lines and wraps prose between template actions, never inside one.
WIDTH = 110
PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_./:@-]*(#[A-Za-z0-9_-]+)?|[0-9]+(ms|[smhd])")
NOT_PLAIN = {"true", "false", "yes", "no", "on", "off", "null", "y", "n"}


def words(text: str) -> list[str]:
    """Split prose at single spaces that are not inside a {{ ... }} template action."""
    result, current, depth, i = [], "", 0, 0
    while i < len(text):
        if text.startswith("{{", i):
            depth, current, i = depth + 1, current + "{{", i + 2
        elif text.startswith("}}", i):
            depth, current, i = depth - 1, current + "}}", i + 2
        elif text[i] == " " and depth == 0:
            result, current, i = result + [current], "", i + 1
        else:
            current, i = current + text[i], i + 1
    return result + [current]


def scalar(value: str, indent: int) -> list[str]:
    """The text after 'key:' and any lines of a block scalar, indented by `indent`."""
    pad = " " * indent
    if "\n" in value:
        return [" |" if value.endswith("\n") else " |-"] + [pad + line for line in value.rstrip("\n").split("\n")]
    if PLAIN.fullmatch(value) and value.lower() not in NOT_PLAIN:
        return [" " + value]
    if indent + len(value) <= WIDTH or "  " in value or value != value.strip():
        return [" '" + value.replace("'", "''") + "'"]
    lines, line = [], ""
    for word in words(value):
        if line and indent + len(line) + 1 + len(word) > WIDTH:
            lines.append(pad + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return [" >-"] + lines + [pad + line]


def emit(node: dict | list, indent: int = 0) -> list[str]:
    pad = " " * indent
    out: list[str] = []
    if isinstance(node, list):
        for item in node:
            body = emit(item, indent + 2)
            out.append(pad + "- " + body[0][indent + 2 :])
            out.extend(body[1:])
        return out
    for key, value in node.items():
        if isinstance(value, str):
            first, *rest = scalar(value, indent + 2)
            out.append(f"{pad}{key}:{first}")
            out.extend(rest)
        else:
            out.append(f"{pad}{key}:")
            out.extend(emit(value, indent + 2))
    return out


HEADER = """\
# Recording and alerting rules for sops-nix-exporter. Generated by alerts/build.py: edit that, not this.
# Rendered with --job={job} --runbook-base={runbook_base}
"""


def render(job: str = DEFAULT_JOB, runbook_base: str = DEFAULT_RUNBOOK_BASE, for_scale: float = 1.0) -> str:
    body = "\n".join(emit(rules(job, runbook_base, for_scale))) + "\n"
    return HEADER.format(job=job, runbook_base=runbook_base) + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--job", default=DEFAULT_JOB, help=f"scrape job of the exporter (default {DEFAULT_JOB})")
    parser.add_argument(
        "--runbook-base", default=DEFAULT_RUNBOOK_BASE, help=f"URL of docs/runbooks.md (default {DEFAULT_RUNBOOK_BASE})"
    )
    parser.add_argument("--for-scale", type=float, default=1.0, help="multiply every `for` duration (tests only)")
    parser.add_argument("-o", "--output", type=Path, help="write here instead of to standard output")
    args = parser.parse_args(argv)
    if args.for_scale <= 0:
        parser.error("--for-scale must be above 0")
    text = render(args.job, args.runbook_base.rstrip("#"), args.for_scale)
    if args.output is None:
        sys.stdout.write(text)
    else:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
