"""The Grafana dashboards: generated from grafana/dashboards.py, and every panel's query proven.

Offline: regenerating reproduces the committed JSON; every panel has a description, a unit and
thresholds, uses the datasource variable and honours job and instance; every query parses as PromQL
(promtool) once Grafana's variables are substituted; every metric it names is documented.
Against data: a real Prometheus scrapes the real exporter serving real stores and real pinned shares
in several states, evaluates the project's alert rules, and every panel query returns data.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from consumers import consumers  # noqa: F401 (a fixture)
from tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "grafana"
METRICS_DOC = ROOT / "docs" / "metrics.md"

EXPECTED_UIDS = {"sops-nix-host.json": "sopsnix-host", "sops-nix-fleet.json": "sopsnix-fleet"}

# Series Prometheus itself makes, not the exporter: docs/metrics.md need not list them.
PROMETHEUS_SERIES = {
    "up": "written by Prometheus for every scrape target",
    "ALERTS": "written by Prometheus for every pending or firing alert",
}

PROMQL_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring", "group_left",
                   "group_right", "inf", "nan"}  # fmt: skip
LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
SELECTOR = re.compile(r"([A-Za-z_:][A-Za-z0-9_:]*)?\s*\{([^{}]*)\}")
NUMBER = re.compile(r"(?<![A-Za-z0-9_:])\d+(?:\.\d+)?(?:e[+-]?\d+)?(?![A-Za-z0-9_:])", re.IGNORECASE)
IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def load_dashboards_module():
    pytest.importorskip("grafana_foundation_sdk", reason="pip install -r grafana/requirements.txt")
    spec = importlib.util.spec_from_file_location("sopsnix_grafana_dashboards", GRAFANA / "dashboards.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def committed() -> dict[str, dict]:
    return {path.name: json.loads(path.read_text()) for path in sorted((GRAFANA / "dashboards").glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    """Every panel that shows data (rows are containers), collapsed rows' panels included."""
    found = []
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            found.extend(panel.get("panels") or [])
        else:
            found.append(panel)
    return found


def queries() -> list[tuple[str, str, str, str]]:
    """(dashboard file, panel title, refId, expr) of every panel target of every committed dashboard."""
    found = []
    for name, dashboard in committed().items():
        for panel in panels(dashboard):
            for query in panel["targets"]:
                found.append((name, panel["title"], query["refId"], query["expr"]))
    return found


def grafana_regex_escape(value: str) -> str:
    """What Grafana's Prometheus data source does to a multi-value variable's value inside =~"..."."""
    return re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", value)


def substitute(expr: str, job: str, instances: list[str] | None, vms: list[str] | None, range_: str = "1h") -> str:
    """expr as Grafana sends it: None for a multi-value variable means "All" (its allValue)."""

    def multi(values: list[str] | None, all_value: str) -> str:
        if values is None:
            return all_value
        escaped = [grafana_regex_escape(v) for v in values]
        return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"

    text = expr.replace("$__rate_interval", "1m").replace("$__interval", "15s").replace("$__range", range_)
    text = text.replace("$job", job)
    text = text.replace("$instance", multi(instances, ".+"))
    text = text.replace("$vm", multi(vms, ".*"))
    assert "$" not in text, f"unsubstituted Grafana variable in {text!r}"
    return text


def selectors(expr: str) -> list[tuple[str, str]]:
    """(metric name, matchers) of every vector selector with braces."""
    return [(m.group(1) or "", m.group(2)) for m in SELECTOR.finditer(expr)]


def metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression reads: what is left once strings, matchers, ranges, label lists,
    numbers, function names and keywords are taken out."""
    text = STRING.sub('""', expr)
    text = re.sub(r"\{[^{}]*\}", " ", text)
    text = re.sub(r"\[[^\[\]]*\]", " ", text)
    text = LABEL_LIST.sub(" ", text)
    text = NUMBER.sub(" ", text)
    names = set()
    for match in IDENTIFIER.finditer(text):
        rest = text[match.end():].lstrip()
        if rest.startswith("("):
            continue  # a function or an aggregation
        if match.group(0).lower() in PROMQL_KEYWORDS:
            continue
        names.add(match.group(0))
    return names


def documented_metrics() -> set[str]:
    if not METRICS_DOC.exists():
        pytest.fail(f"{METRICS_DOC.relative_to(ROOT)} is missing: it must list every metric the dashboards use")
    return set(re.findall(r"`([A-Za-z_:][A-Za-z0-9_:]*)", METRICS_DOC.read_text()))


# --- offline -------------------------------------------------------------------------------------


def test_regenerating_reproduces_the_committed_json():
    module = load_dashboards_module()
    generated = module.rendered()
    on_disk = {path.name: path.read_text() for path in (GRAFANA / "dashboards").glob("*.json")}
    assert sorted(generated) == sorted(on_disk), "a dashboard file is missing or left over"
    for name, text in generated.items():
        assert text == on_disk[name], f"grafana/dashboards/{name} is out of date: run python grafana/dashboards.py"


def test_check_mode_reports_stale_json(tmp_path):
    module = load_dashboards_module()
    assert module.main(["--output", str(tmp_path)]) == 0
    assert module.main(["--check", "--output", str(tmp_path)]) == 0
    victim = tmp_path / "sops-nix-host.json"
    victim.write_text(victim.read_text().replace('"sopsnix-host"', '"edited-by-hand"'))
    assert module.main(["--check", "--output", str(tmp_path)]) == 1


def test_sdk_is_the_pinned_build():
    pytest.importorskip("grafana_foundation_sdk", reason="pip install -r grafana/requirements.txt")
    from importlib.metadata import version

    pins = [line.split("#")[0].strip() for line in (GRAFANA / "requirements.txt").read_text().splitlines()]
    pin = next(line for line in pins if line.startswith("grafana-foundation-sdk"))
    assert re.fullmatch(r"grafana-foundation-sdk==\d+!\d+\.\d+\.\d+", pin), f"not an exact epoch!version pin: {pin}"
    assert version("grafana-foundation-sdk") == pin.split("==")[1], f"installed SDK differs from the pin {pin}"


def test_uids_are_stable_and_distinct():
    dashboards = committed()
    assert {name: d["uid"] for name, d in dashboards.items()} == EXPECTED_UIDS
    for name, dashboard in dashboards.items():
        ids = [p["id"] for p in dashboard["panels"]]
        ids += [p["id"] for row in dashboard["panels"] for p in row.get("panels") or []]
        assert len(ids) == len(set(ids)), f"{name}: duplicate panel ids"
        assert all(isinstance(i, int) and i > 0 for i in ids), f"{name}: panel without a stable id"
    # The fleet's hosts table links to the host dashboard by its uid.
    links = re.findall(r'"url": "/d/([^/"]+)/', json.dumps(dashboards["sops-nix-fleet.json"]))
    assert links and set(links) == {EXPECTED_UIDS["sops-nix-host.json"]}


def test_variables():
    for name, dashboard in committed().items():
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert list(variables) == ["datasource", "job", "instance", "vm"], name
        assert variables["datasource"]["type"] == "datasource"
        assert variables["datasource"]["query"] == "prometheus"
        assert variables["instance"]["multi"] is True, f"{name}: instance must be multi-select"
        assert variables["instance"]["includeAll"] is True
        for variable in ("job", "instance", "vm"):
            assert variables[variable]["type"] == "query"
            assert variables[variable]["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert "$job" in variables["instance"]["query"], "instances must be those of the selected job"


def test_every_panel_has_description_unit_thresholds_and_the_datasource_variable():
    for name, dashboard in committed().items():
        for panel in panels(dashboard):
            where = f"{name}: {panel['title']!r}"
            assert panel.get("description", "").strip(), f"{where} has no description"
            defaults = panel["fieldConfig"]["defaults"]
            assert defaults.get("unit"), f"{where} has no unit"
            steps = defaults.get("thresholds", {}).get("steps")
            assert steps and steps[0]["value"] is None, f"{where} has no thresholds (with a base step)"
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
            assert panel["targets"], f"{where} has no query"
            for query in panel["targets"]:
                assert query["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, where
                assert query["expr"].strip(), where


def test_every_query_honours_job_and_instance():
    for name, title, ref, expr in queries():
        where = f"{name}: {title!r} {ref}: {expr}"
        found = selectors(expr)
        assert found, f"{where}: no selector"
        for metric, matchers in found:
            assert metric, f"{where}: selector without a metric name"
            assert 'job=~"$job"' in matchers and 'instance=~"$instance"' in matchers, f"{where}: {metric}"
            if metric.startswith("sopsnix_vm_"):
                assert 'vm=~"$vm"' in matchers, f"{where}: {metric} ignores the VM variable"
        # Every metric read is read through a selector with those matchers, none bare.
        assert metric_names(expr) == {metric for metric, _ in found}, where


def test_every_metric_a_panel_names_is_documented():
    documented = documented_metrics()
    used = {metric for *_, expr in queries() for metric in metric_names(expr)}
    assert used, "no metric found in the dashboards"
    missing = sorted(used - documented - set(PROMETHEUS_SERIES))
    assert not missing, f"metrics used by dashboards but not in docs/metrics.md: {missing}"


def test_metric_name_extraction():
    """The extraction the documentation check relies on, on the shapes the dashboards use."""
    expr = (
        'topk(20, 86400 * sum by (job, instance) (deriv(a_bytes{job=~"$job", x="b{c}"}[1d]))) '
        '/ on (job) group_left (mountpoint) b_total{} or vector(0) and ALERTS{alertname=~"x.*"} > 1e-9'
    )
    assert metric_names(expr) == {"a_bytes", "b_total", "ALERTS"}


def test_every_query_parses_as_promql(tmp_path):
    binary = require_tool("promtool", "prometheus")
    rules = []
    variants = [
        {"job": "sops-nix", "instances": None, "vms": None},  # All
        {"job": "sops-nix", "instances": ["host-a.example:9785"], "vms": ["vm1"]},
        {"job": "node", "instances": ["10.0.0.1:9785", "[::1]:9785"], "vms": ["web", "db"]},
    ]
    for index, (name, title, ref, expr) in enumerate(queries()):
        for number, variant in enumerate(variants):
            rules.append({"record": f"dashboard_query_{index}_{number}", "expr": substitute(expr, **variant)})
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}, sort_keys=False))
    result = subprocess.run([binary, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, f"promtool check rules:\n{result.stdout}{result.stderr}"
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_provisioning_file_points_grafana_at_the_dashboards():
    provisioning = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "sops-nix.yaml").read_text())
    assert provisioning["apiVersion"] == 1
    (provider,) = provisioning["providers"]
    assert provider["type"] == "file"
    assert Path(provider["options"]["path"]).is_absolute()


# --- against a real Prometheus scraping the real exporter -------------------------------------------

RULES = ROOT / "alerts" / "sops-nix.rules.yml"

# The state number each VM share of the scenario must get in the share table (SHARE_STATES).
EXPECTED_SHARE_STATES = {"current-vm": 2, "stale-vm": 1, "down-vm": 3, "deleted-vm": 4}
# (consumer, kind) -> (serving generation, stale, deleted, outdated secrets) in the consumers table. The
# container's deleted generation had the values of the current one: deleted, but not outdated.
EXPECTED_CONSUMERS = {
    ("container@web.service", "container"): (1, 1, 1, 0),
    ("backup.service", "service"): (1, 1, 0, 1),
    ("app.service", "service"): (2, 0, 0, 0),
}
# The share table's Secrets column, from the fingerprints: stale-vm misses the rotated db-password; the pruned
# store's switch rewrote the same values, so deleted-vm's generation had the current secrets.
EXPECTED_OUTDATED_SHARES = {"current-vm": 0, "stale-vm": 1, "deleted-vm": 0}


def rules_firing_at_once(directory: Path) -> Path:
    """The project's rules with every `for:` dropped, so an alert fires at the first evaluation.

    How long each alert waits is the alert tests' business; here only the ALERTS series matters, and
    waiting a minute for the quickest alert would make the test slow.
    """
    if not RULES.exists():
        pytest.fail(f"{RULES.relative_to(ROOT)} is missing: the firing-alerts panels read its ALERTS")
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            rule.pop("for", None)
    path = directory / "rules-without-for.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    return path


def variable_values(prometheus, dashboard: dict, name: str, job: str, instances: str) -> set[str]:
    """Evaluate a label_values(selector, label) variable the way Grafana does: the label values API."""
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == name]
    match = re.fullmatch(r"label_values\((.*),\s*(\w+)\)", variable["query"])
    assert match, f"unexpected variable query {variable['query']!r}"
    selector = match.group(1).replace("$job", job).replace("$instance", instances)
    return set(prometheus.api(f"label/{match.group(2)}/values", **{"match[]": selector}))


def run(prometheus, query: dict, expr: str) -> list[dict]:
    """The query as Grafana runs it: instant, or a range over the last minute."""
    if query.get("instant"):
        return prometheus.query(expr)
    now = time.time()
    data = prometheus.api("query_range", query=expr, start=now - 60, end=now, step="1s")
    return [series for series in data["result"] if series["values"]]


@pytest.mark.slow
def test_every_panel_query_returns_data_from_the_real_exporter(make_store, pinners, consumers, scratch, serve):  # noqa: F811
    from fingerprinting import fingerprint, with_fingerprints
    from pinning import declare_share
    from promstack import Prometheus
    from sopsnix import SAMPLE_SECRETS

    growing = make_store("ramfs", name="secrets")  # keepGenerations = 0: every generation stays
    pruned = make_store("tmpfs", name="secrets-for-users")  # keepGenerations = 1
    state_dir = scratch / "microvms"
    growing.switch(SAMPLE_SECRETS, keep_generations=0)
    pruned.switch(SAMPLE_SECRETS, keep_generations=1)
    pinners(source=growing.symlink, vm="stale-vm", state_dir=state_dir)
    pinners(source=pruned.symlink, vm="deleted-vm", state_dir=state_dir, mode="chroot")
    declare_share(state_dir, "down-vm", "secrets", pruned.symlink)
    # Consumers: a NixOS container that bind-mounts the generation the prune below deletes, and a service
    # that stays on the first generation of the store that keeps them all.
    consumers(pruned.symlink, "container@web.service")
    consumers(growing.symlink, "backup.service")
    # Content fingerprints, as the fingerprint unit writes them after each switch.
    config = with_fingerprints(
        {
            "stores": [
                {"mountpoint": str(growing.mountpoint), "symlink": str(growing.symlink), "keep_generations": 0},
                {"mountpoint": str(pruned.mountpoint), "symlink": str(pruned.symlink), "keep_generations": 1},
            ],
            "microvm": {"state_dir": str(state_dir)},
        },
        scratch,
    )
    fingerprint(config, scratch)
    exporter = serve(config)
    instance = exporter.url.removeprefix("http://")
    with Prometheus.start(scratch, [instance], rule_files=[rules_firing_at_once(scratch)]) as prometheus:
        prometheus.wait_for("sopsnix_current_generation", lambda r: len(r) == 2, timeout=30)
        # Switches Prometheus sees happen: memory grows, generations change, VM shares fall behind.
        for _ in range(2):
            growing.switch({"db-password": os.urandom(4096)}, keep_generations=0)
            fingerprint(config, scratch)
            time.sleep(1.5)
        pruned.switch(SAMPLE_SECRETS, keep_generations=1)  # prunes what deleted-vm serves
        fingerprint(config, scratch)
        pinners(source=pruned.symlink, vm="current-vm", state_dir=state_dir)
        consumers(pruned.symlink, "app.service")  # started after the switch: current
        prometheus.wait_for("changes(sopsnix_current_generation[1d]) > 0", lambda r: len(r) == 2, timeout=30)
        prometheus.wait_for("sopsnix_vm_share_up", lambda r: len(r) == 4, timeout=30)
        prometheus.wait_for("sopsnix_consumer_serving_generation", lambda r: len(r) == 3, timeout=30)
        prometheus.wait_for("sopsnix_consumer_serving_deleted_generation == 1", timeout=30)
        prometheus.wait_for("sopsnix_vm_serving_outdated_secrets == 1", timeout=30)
        prometheus.wait_for('ALERTS{alertname="SopsNixVMServingDeletedGeneration", alertstate="firing"}', timeout=30)

        dashboards = committed()
        for name, dashboard in dashboards.items():
            assert variable_values(prometheus, dashboard, "job", "", "") >= {"sops-nix"}, name
            assert variable_values(prometheus, dashboard, "instance", "sops-nix", "") == {instance}, name
            assert variable_values(prometheus, dashboard, "vm", "sops-nix", ".+") == set(EXPECTED_SHARE_STATES), name

        empty = []
        for name, dashboard in dashboards.items():
            for panel in panels(dashboard):
                for query in panel["targets"]:
                    where = f"{name}: {panel['title']!r} {query['refId']}"
                    for vms in (None, sorted(EXPECTED_SHARE_STATES)):
                        expr = substitute(query["expr"], "sops-nix", [instance], vms, range_="5m")
                        if not run(prometheus, query, expr):
                            empty.append(f"{where} (vm={vms or 'All'}): {expr}")
                    # Another host selected: nothing of this one shows, except a count's explicit 0.
                    expr = substitute(query["expr"], "sops-nix", ["192.0.2.1:9785"], None, range_="5m")
                    for sample in run(prometheus, query, expr):
                        values = [v for _, v in sample.get("values", [])] or [sample["value"][1]]
                        assert sample["metric"] == {} and set(map(float, values)) == {0}, f"{where}: {sample}"
        assert not empty, "panel queries without data:\n" + "\n".join(empty)

        # The share table's state column says what each VM's share really is.
        (state_query,) = [
            q for p in panels(dashboards["sops-nix-host.json"]) if p["title"] == "VM shares"
            for q in p["targets"] if "label_replace" in q["expr"]
        ]  # fmt: skip
        result = prometheus.query(substitute(state_query["expr"], "sops-nix", [instance], None))
        assert {s["metric"]["vm"]: int(float(s["value"][1])) for s in result} == EXPECTED_SHARE_STATES

        # The exposure columns: no share of the scenario is a mount point; every served one is started without
        # --readonly, and the declared share nothing serves has no writable value at all.
        def column(metric: str) -> dict[str, int]:
            (query,) = [
                q for p in panels(dashboards["sops-nix-host.json"]) if p["title"] == "VM shares"
                for q in p["targets"] if metric in q["expr"]
            ]  # fmt: skip
            result = prometheus.query(substitute(query["expr"], "sops-nix", [instance], None))
            return {s["metric"]["vm"]: int(float(s["value"][1])) for s in result}

        assert column("sopsnix_vm_share_exposes_store") == dict.fromkeys(EXPECTED_SHARE_STATES, 0)
        assert column("sopsnix_vm_share_writable") == {"current-vm": 1, "stale-vm": 1, "deleted-vm": 1}
        assert column("sopsnix_vm_serving_outdated_secrets") == EXPECTED_OUTDATED_SHARES

        # The consumers table gives each consumer its generation and its true state.
        (consumers_panel,) = [p for p in panels(dashboards["sops-nix-host.json"]) if p["title"] == "Consumers"]
        found: dict[tuple[str, str], list[int]] = {}
        for query in consumers_panel["targets"]:
            result = prometheus.query(substitute(query["expr"], "sops-nix", [instance], None))
            for sample in result:
                key = (sample["metric"]["consumer"], sample["metric"]["kind"])
                found.setdefault(key, []).append(int(float(sample["value"][1])))
        assert {key: tuple(values) for key, values in found.items()} == EXPECTED_CONSUMERS

        # What a prune would free is published for both stores (the exporter runs as root and inspects every
        # process), 0 where nothing is: the growing store's older generations are read or replaced too recently.
        for title in ("Reclaimable memory", "Reclaimable generations"):
            (query,) = [
                q for p in panels(dashboards["sops-nix-host.json"]) if p["title"] == title for q in p["targets"]
            ]  # fmt: skip
            result = prometheus.query(substitute(query["expr"], "sops-nix", [instance], None))
            stores = {str(growing.mountpoint), str(pruned.mountpoint)}
            assert {s["metric"]["mountpoint"] for s in result} == stores, title
            assert all(float(s["value"][1]) >= 0 for s in result), title
