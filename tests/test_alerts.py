"""Issue 5: the alerting and recording rules, their unit tests, the runbooks and the example routing.

promtool and amtool (Debian packages prometheus and prometheus-alertmanager) do the checking; a test whose
tool is missing is skipped with the reason. The end-to-end proof is tests/test_alerting_e2e.py.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "alerts"
RULES = ALERTS / "sops-nix.rules.yml"
EXAMPLE = ALERTS / "alertmanager.example.yml"
UNIT_TESTS = sorted((ROOT / "tests" / "alerts").glob("*.test.yml"))
RUNBOOKS = ROOT / "docs" / "runbooks.md"

# The contract of issues 5, 14 and 15: alert name -> (severity, for).
CONTRACT = {
    "SopsNixVMServingDeletedGeneration": ("critical", "1m"),
    "SopsNixVMShareDown": ("critical", "5m"),
    "SopsNixVMSecretsPrunedOnNextSwitch": ("warning", "10m"),
    "SopsNixVMServingStaleGeneration": ("warning", "1h"),
    "SopsNixVMServingOutdatedSecrets": ("warning", "15m"),
    "SopsNixVMShareExposesStore": ("critical", "1m"),
    "SopsNixVMShareWritable": ("warning", "10m"),
    "SopsNixConsumerServingDeletedGeneration": ("critical", "1m"),
    "SopsNixConsumerServingStaleGeneration": ("warning", "1h"),
    "SopsNixConsumerServingOutdatedSecrets": ("warning", "15m"),
    "SopsNixFingerprintRunFailing": ("warning", "10m"),
    "SopsNixFingerprintsBehind": ("warning", "30m"),
    "SopsNixSecretsMemoryNearBudget": ("warning", "15m"),
    "SopsNixSecretsMemoryOverBudget": ("critical", "15m"),
    "SopsNixSecretsMemoryBudgetExhaustionPredicted": ("warning", "1h"),
    "SopsNixSymlinkBroken": ("critical", "5m"),
    "SopsNixStackedMounts": ("warning", "10m"),
    "SopsNixPendingGeneration": ("info", "1h"),
    "SopsNixExporterCollectorFailing": ("warning", "10m"),
    "SopsNixExporterDown": ("critical", "5m"),
}
RECORDING = {
    "sopsnix:memory_per_generation:bytes",
    "sopsnix:switches:per_day",
    "sopsnix:memory_budget:ratio",
    "sopsnix:memory_budget:days_left",
}
# How long a normal switch-to-configuration (activation plus the VM restarts it triggers) may take.
SWITCH_WINDOW_SECONDS = 60


def load_build():
    spec = importlib.util.spec_from_file_location("alerts_build", ALERTS / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = load_build()


def run(*cmd: str | Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=ROOT)


def rules_of(text: str) -> list[dict]:
    return [rule for group in yaml.safe_load(text)["groups"] for rule in group["rules"]]


def alerts_of(text: str) -> dict[str, dict]:
    return {rule["alert"]: rule for rule in rules_of(text) if "alert" in rule}


def seconds(duration: str) -> float:
    match = re.fullmatch(r"(\d+)(ms|s|m|h|d)", duration)
    assert match, duration
    return int(match.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]


# --- the rules file ------------------------------------------------------------------------------------


def test_committed_rules_are_the_default_render():
    stale = "alerts/sops-nix.rules.yml is stale: run python3 alerts/build.py -o alerts/sops-nix.rules.yml"
    assert RULES.read_text() == build.render(), stale


def test_render_is_the_rules_build_describes():
    # The hand-written YAML writer must write exactly the data build.py holds.
    assert yaml.safe_load(build.render()) == build.rules()


def test_promtool_check_rules():
    promtool = require_tool("promtool", "prometheus")
    result = run(promtool, "check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(CONTRACT) + len(RECORDING)} rules found" in result.stdout


def test_alert_names_severities_and_durations_are_the_contract():
    alerts = alerts_of(RULES.read_text())
    assert {name: (rule["labels"]["severity"], rule.get("for")) for name, rule in alerts.items()} == CONTRACT
    assert {rule["record"] for rule in rules_of(RULES.read_text()) if "record" in rule} == RECORDING


def test_every_alert_has_severity_summary_description_and_runbook():
    for name, rule in alerts_of(RULES.read_text()).items():
        assert rule["labels"]["severity"] in ("critical", "warning", "info"), name
        annotations = rule["annotations"]
        assert set(annotations) == {"summary", "description", "runbook_url"}, name
        for key, text in annotations.items():
            assert text.strip(), f"{name}: empty {key}"
        assert annotations["runbook_url"] == f"{build.DEFAULT_RUNBOOK_BASE}#{name.lower()}"
        # The description names the host, and the VM and share, the consumer and its kind, or the store.
        description = annotations["description"]
        assert "$labels.instance" in description or "{{ . }}" in description, name
        labels_used = set(re.findall(r"\$labels\.(\w+)", rule["expr"] + description))
        if name.startswith("SopsNixVM"):
            assert {"vm", "share", "mountpoint"} <= labels_used, name
        elif name.startswith("SopsNixConsumer"):
            assert {"consumer", "kind", "mountpoint"} <= labels_used, name
            assert {"consumer", "kind"} <= set(re.findall(r"\$labels\.(\w+)", annotations["summary"])), name
        elif name.startswith("SopsNixS") or name == "SopsNixPendingGeneration":
            assert "mountpoint" in labels_used, name


def test_every_runbook_url_has_its_section():
    text = RUNBOOKS.read_text()
    headings = {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}
    for name in CONTRACT:
        assert name in headings, f"docs/runbooks.md has no '## {name}' section"
        section = text.split(f"## {name}\n", 1)[1].split("\n## ", 1)[0]
        paragraphs = section.split("\n\n")
        confirm = [p for p in paragraphs if p.startswith("**Confirm")]
        fix = [p for p in paragraphs if p.startswith("**Fix")]
        assert confirm and fix, f"docs/runbooks.md: {name} needs a **Confirm** and a **Fix** paragraph"
        assert "`check`" in confirm[0], f"{name}: the Confirm part does not say what `check` shows"
        assert "cost" in fix[0].lower(), f"{name}: the Fix part does not say what the fix costs"
        severity, _ = CONTRACT[name]
        assert f"**Severity {severity}" in section, name


def test_stale_alerts_fire_only_while_the_content_is_unknown():
    """Issue 15: the outdated series exists, 0 or 1, exactly when both fingerprints do; the stale alerts step
    back for it (matching on every label, so a site's target labels match too) and the outdated ones take over."""
    alerts = alerts_of(RULES.read_text())
    for reader in ("VM", "Consumer"):
        metric = f"sopsnix_{reader.lower()}_serving_outdated_secrets"
        stale = alerts[f"SopsNix{reader}ServingStaleGeneration"]["expr"]
        assert stale.rstrip().endswith(f"unless {metric}"), stale
        outdated = alerts[f"SopsNix{reader}ServingOutdatedSecrets"]["expr"]
        assert outdated.startswith(f"{metric} == 1"), outdated
        assert f"unless sopsnix_{reader.lower()}_serving_deleted_generation == 1" in outdated, outdated


def test_for_durations_outlast_a_switch():
    for name, rule in alerts_of(RULES.read_text()).items():
        assert seconds(rule["for"]) >= SWITCH_WINDOW_SECONDS, name


def test_rules_select_by_metric_name_and_keep_identifying_labels():
    for rule in rules_of(RULES.read_text()):
        expr = rule["expr"]
        name = rule.get("alert") or rule["record"]
        # No aggregation and no on()/without(): every alert keeps instance, mountpoint, vm, share, consumer, kind.
        aggregation = r"\b(sum|min|max|avg|count|topk|bottomk|quantile|group)\b\s*(by|without)?\s*\("
        assert not re.search(aggregation, expr), name
        assert not re.search(r"\b(on|without|by)\s*\(\s*[a-z]", expr), name
        if name == "SopsNixExporterDown":
            assert expr == 'up{job="sops-nix"} == 0 or absent(up{job="sops-nix"})'
        else:
            assert "job" not in expr and "instance" not in expr, name


def test_job_and_runbook_base_are_changed_by_the_generator(tmp_path):
    output = tmp_path / "custom.rules.yml"
    result = subprocess.run(
        [sys.executable, ALERTS / "build.py", "--job=node-secrets", "--runbook-base=https://wiki.example.com/rb",
         "-o", output],
        capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},  # no PyYAML or venv needed
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    alerts = alerts_of(output.read_text())
    assert alerts["SopsNixExporterDown"]["expr"] == 'up{job="node-secrets"} == 0 or absent(up{job="node-secrets"})'
    for name, rule in alerts.items():
        assert rule["annotations"]["runbook_url"] == f"https://wiki.example.com/rb#{name.lower()}"
    default = alerts_of(RULES.read_text())
    for name, rule in alerts.items():
        if name != "SopsNixExporterDown":
            assert rule["expr"] == default[name]["expr"], name
    check = run(require_tool("promtool", "prometheus"), "check", "rules", output)
    assert check.returncode == 0, check.stdout + check.stderr


def test_for_scale_shortens_every_for_and_nothing_else():
    scaled = alerts_of(build.render(for_scale=1 / 60))
    default = alerts_of(RULES.read_text())
    for name, rule in scaled.items():
        assert seconds(rule["for"]) == pytest.approx(seconds(default[name]["for"]) / 60, abs=0.001), name
        assert {k: v for k, v in rule.items() if k != "for"} == {k: v for k, v in default[name].items() if k != "for"}


# --- promtool unit tests -----------------------------------------------------------------------------


def test_promtool_unit_tests_pass():
    promtool = require_tool("promtool", "prometheus")
    assert UNIT_TESTS, "no tests/alerts/*.test.yml"
    result = run(promtool, "test", "rules", *UNIT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(UNIT_TESTS), result.stdout


def test_every_alert_is_unit_tested_firing_and_silent():
    firing: dict[str, list[dict]] = {name: [] for name in CONTRACT}
    silent: set[str] = set()
    for path in UNIT_TESTS:
        document = yaml.safe_load(path.read_text())
        assert document["rule_files"] == ["../../alerts/sops-nix.rules.yml"], path
        for test in document["tests"]:
            for case in test.get("alert_rule_test", []):
                if case.get("exp_alerts"):
                    firing[case["alertname"]].extend(case["exp_alerts"])
                else:
                    silent.add(case["alertname"])
    for name, (severity, _) in CONTRACT.items():
        assert firing[name], f"{name}: no unit test where it fires"
        assert name in silent, f"{name}: no unit test where it stays silent"
        for expected in firing[name]:
            assert expected["exp_labels"]["severity"] == severity, name
            assert set(expected["exp_annotations"]) == {"summary", "description", "runbook_url"}, name


def test_unit_tests_fail_when_an_alert_is_wrong(tmp_path):
    """The unit tests can fail: a rules file with one threshold changed makes promtool report it."""
    promtool = require_tool("promtool", "prometheus")
    broken = build.render().replace(">= 0.8", ">= 0.9")
    assert broken != build.render()
    (tmp_path / "alerts").mkdir()
    (tmp_path / "alerts" / "sops-nix.rules.yml").write_text(broken)
    (tmp_path / "tests" / "alerts").mkdir(parents=True)
    copy = tmp_path / "tests" / "alerts" / "stores.test.yml"
    shutil.copy(ROOT / "tests" / "alerts" / "stores.test.yml", copy)
    result = run(promtool, "test", "rules", copy)
    assert result.returncode != 0
    assert "SopsNixSecretsMemoryNearBudget" in result.stdout + result.stderr


# --- Alertmanager example ------------------------------------------------------------------------------


def test_amtool_check_config():
    amtool = require_tool("amtool", "prometheus-alertmanager")
    result = run(amtool, "check-config", EXAMPLE)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    "labels,receiver",
    [
        ({"alertname": "SopsNixVMServingDeletedGeneration", "severity": "critical"}, "page"),
        ({"alertname": "SopsNixExporterDown", "severity": "critical"}, "page"),
        ({"alertname": "SopsNixVMServingStaleGeneration", "severity": "warning"}, "ticket"),
        ({"alertname": "SopsNixConsumerServingDeletedGeneration", "severity": "critical"}, "page"),
        ({"alertname": "SopsNixConsumerServingStaleGeneration", "severity": "warning"}, "ticket"),
        ({"alertname": "SopsNixVMServingOutdatedSecrets", "severity": "warning"}, "ticket"),
        ({"alertname": "SopsNixConsumerServingOutdatedSecrets", "severity": "warning"}, "ticket"),
        ({"alertname": "SopsNixFingerprintRunFailing", "severity": "warning"}, "ticket"),
        ({"alertname": "SopsNixPendingGeneration", "severity": "info"}, "drop"),
        ({"alertname": "SomethingElse", "severity": "unknown"}, "ticket"),
    ],
)
def test_example_routes_by_severity(labels, receiver):
    amtool = require_tool("amtool", "prometheus-alertmanager")
    pairs = [f"{key}={value}" for key, value in labels.items()]
    result = run(amtool, "config", "routes", "test", f"--config.file={EXAMPLE}", *pairs)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.split() == [receiver]


def test_example_groups_by_host_and_vm_drops_info_and_inhibits_stale_under_deleted():
    config = yaml.safe_load(EXAMPLE.read_text())
    assert config["route"]["group_by"] == ["instance", "vm", "consumer"]
    receivers = {r["name"]: r for r in config["receivers"]}
    assert set(receivers["drop"]) == {"name"}, "the info receiver must notify nobody"
    inhibit = [
        rule for rule in config["inhibit_rules"]
        if rule["target_matchers"] == ['alertname = "SopsNixVMServingStaleGeneration"']
    ]  # fmt: skip
    assert inhibit == [
        {
            "source_matchers": ['alertname = "SopsNixVMServingDeletedGeneration"'],
            "target_matchers": ['alertname = "SopsNixVMServingStaleGeneration"'],
            "equal": ["instance", "vm", "share"],
        }
    ]
    consumer_inhibit = [
        rule for rule in config["inhibit_rules"]
        if rule["target_matchers"] == ['alertname = "SopsNixConsumerServingStaleGeneration"']
    ]  # fmt: skip
    assert consumer_inhibit == [
        {
            "source_matchers": ['alertname = "SopsNixConsumerServingDeletedGeneration"'],
            "target_matchers": ['alertname = "SopsNixConsumerServingStaleGeneration"'],
            "equal": ["instance", "consumer", "kind", "mountpoint"],
        }
    ]
