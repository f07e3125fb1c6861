"""The sops-nix exporter's Grafana dashboards, built as code with grafana-foundation-sdk.

    python grafana/dashboards.py            # rewrite grafana/dashboards/*.json from this file
    python grafana/dashboards.py --check    # exit 1 if the committed JSON differs from this file

Two dashboards share one set of variables (datasource, job, instance, vm):

- sops-nix / host: what one host's secrets stores hold, how fast they grow against their budget,
  which VM serves which generation and what the next switch breaks, which containers, services and
  processes bind-mount which generation, which of them read outdated secrets and what each activation
  changed (content fingerprints), the alerts firing there, and the exporter's own health. The page an operator opens when a VM lost its secrets.
- sops-nix / fleet: every host at a glance, ranked by secrets memory, budget used and growth, with
  counts of stale, deleted and down VM shares, of shares that expose a whole store or are writable, and
  of stale and deleted consumers, of VM shares and consumers with outdated secrets;
  built from aggregations and topk so hundreds of hosts behind one Prometheus (or Thanos, Mimir) read in
  seconds.

Every query selects {job=~"$job", instance=~"$instance"} (VM metrics also vm=~"$vm") and reads raw
exporter metrics, so the dashboards need no recording rules. Uids are fixed: links and bookmarks to
a dashboard survive regeneration and re-provisioning.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, stat, table, timeseries
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard as dashboard_builders
from grafana_foundation_sdk.builders import prometheus
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common
from grafana_foundation_sdk.models import dashboard as models
from grafana_foundation_sdk.models import prometheus as prometheus_models

OUTPUT_DIR = Path(__file__).resolve().parent / "dashboards"

HOST_UID = "sopsnix-host"
FLEET_UID = "sopsnix-fleet"
TAG = "sops-nix"

DATASOURCE = models.DataSourceRef(type_val="prometheus", uid="${datasource}")

SEL = 'job=~"$job", instance=~"$instance"'
VM_SEL = SEL + ', vm=~"$vm"'
FIRING = f'ALERTS{{alertname=~"SopsNix.*", alertstate="firing", {SEL}}}'

# Windows for "at the current rate": sops-nix switches are rare events, so a day of samples is the
# shortest window in which a rate means anything, and short enough to show a change of habit.
RATE_WINDOW = "1d"
DAYS_LEFT_CAP = 3650  # "not growing": shown as text rather than as an absurd number of days

# VM share states, worst last; the share table colours each by severity.
SHARE_STATES = (
    (0, "current", "green"),
    (1, "stale", "yellow"),
    (2, "pruned on next switch", "orange"),
    (3, "down", "red"),
    (4, "deleted", "dark-red"),
)


def s(metric: str, selector: str = SEL) -> str:
    """A vector selector honouring the dashboard's variables."""
    return f"{metric}{{{selector}}}"


def vm(metric: str) -> str:
    return s(metric, VM_SEL)


# --- queries ---------------------------------------------------------------------------------------

BUDGET_USED = f'{s("sopsnix_generations_bytes")} / ({s("sopsnix_memory_budget_bytes")} > 0)'
HOST_MEMORY_USED = (
    f'{s("sopsnix_generations_bytes")} / on (job, instance) group_left () {s("sopsnix_host_memory_bytes")}'
)
GROWTH_PER_SECOND = f'deriv({s("sopsnix_generations_bytes")}[{RATE_WINDOW}])'
DAYS_OF_BUDGET_LEFT = (
    f'clamp_max(clamp_min(({s("sopsnix_memory_budget_bytes")} > 0) - {s("sopsnix_generations_bytes")}, 0)'
    f" / clamp_min({GROWTH_PER_SECOND} * 86400, 1), {DAYS_LEFT_CAP})"
)
SWITCHES_PER_DAY = f'changes({s("sopsnix_current_generation")}[{RATE_WINDOW}])'
KEPT_PER_SWITCH = (
    f'delta({s("sopsnix_generations_bytes")}[{RATE_WINDOW}]) / ({SWITCHES_PER_DAY} > 0)'
)
SHARE_KEY = "job, instance, vm, share, mountpoint"
CONSUMER_KEY = "job, instance, consumer, kind, mountpoint"
# Every state that applies to a share, as its number in SHARE_STATES; the table takes the max by share.
# label_replace gives each term its own label set so that `or` keeps them all for max to choose from.
SHARE_STATE_TERMS = (
    "\n"
    f'    label_replace(4 * {vm("sopsnix_vm_serving_deleted_generation")}, "state", "deleted", "", "")\n'
    f'  or label_replace(3 * (1 - {vm("sopsnix_vm_share_up")}), "state", "down", "", "")\n'
    f'  or label_replace(2 * {vm("sopsnix_vm_share_pruned_on_next_switch")}, "state", "pruned", "", "")\n'
    f'  or label_replace({vm("sopsnix_vm_serving_stale_generation")}, "state", "stale", "", "")\n'
)


# --- building blocks -------------------------------------------------------------------------------


def target(expr: str, ref: str = "A", legend: str | None = None, instant: bool = False, table_format: bool = False):
    query = prometheus.Dataquery().expr(expr).ref_id(ref).datasource(DATASOURCE)
    query.editor_mode(prometheus_models.QueryEditorMode.CODE)
    query.legend_format(legend if legend is not None else "__auto")
    if instant:
        query.instant()
    else:
        query.range()
    if table_format:
        query.format(prometheus_models.PromQueryFormat.TABLE)
    return query


def thresholds(*steps: tuple[float | None, str]):
    return (
        dashboard_builders.ThresholdsConfig()
        .mode(models.ThresholdsMode.ABSOLUTE)
        .steps([models.Threshold(value=value, color=color) for value, color in steps])
    )


def value_texts(*entries: tuple[int | str, str, str]) -> list:
    """Value mappings value -> (text, colour)."""
    return [
        models.ValueMap(
            options={
                str(value): models.ValueMappingResult(text=text, color=color, index=index)
                for index, (value, text, color) in enumerate(entries)
            }
        )
    ]


UP_DOWN = value_texts((0, "down", "red"), (1, "up", "green"))
EXPOSES_TEXTS = value_texts((0, "no", "green"), (1, "whole store", "red"))
WRITABLE_TEXTS = value_texts((0, "read-only", "green"), (1, "writable", "orange"))
OK_BROKEN = value_texts((0, "broken", "red"), (1, "ok", "green"))
OK_FAILING = value_texts((0, "failing", "red"), (1, "ok", "green"))
SHARE_STATE_TEXTS = value_texts(*SHARE_STATES)
STALE_TEXTS = value_texts((0, "current", "green"), (1, "stale", "yellow"))
DELETED_TEXTS = value_texts((0, "no", "green"), (1, "deleted", "dark-red"))
OUTDATED_TEXTS = value_texts((0, "same", "green"), (1, "outdated", "orange"))

LEGEND_TABLE = (
    common_builders.VizLegendOptions()
    .display_mode(common.LegendDisplayMode.TABLE)
    .placement(common.LegendPlacement.BOTTOM)
    .show_legend(True)
    .calcs(["lastNotNull", "max"])
)


def last_value():
    return common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def stat_panel(title: str, description: str, unit: str, steps, *targets, mappings=None, decimals=None):
    panel = (
        stat.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .thresholds(steps)
        .reduce_options(last_value())
        .color_mode(common.BigValueColorMode.BACKGROUND)
        .graph_mode(common.BigValueGraphMode.NONE)
        .text_mode(common.BigValueTextMode.VALUE_AND_NAME)
        .height(4)
    )
    if mappings:
        panel.mappings(mappings)
    if decimals is not None:
        panel.decimals(decimals)
    for query in targets:
        panel.with_target(query)
    return panel


def timeseries_panel(title: str, description: str, unit: str, steps, *targets, bars: bool = False, min_value=0):
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .thresholds(steps)
        .legend(LEGEND_TABLE)
        .line_width(1)
        .fill_opacity(10)
        .show_points(common.VisibilityMode.NEVER)
        .height(8)
    )
    if min_value is not None:
        panel.min(min_value)
    if bars:
        panel.draw_style(common.GraphDrawStyle.BARS).fill_opacity(60)
    for query in targets:
        panel.with_target(query)
    return panel


def bargauge_panel(title: str, description: str, unit: str, steps, *targets, max_value=None):
    panel = (
        bargauge.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .thresholds(steps)
        .reduce_options(last_value())
        .display_mode(common.BarGaugeDisplayMode.GRADIENT)
        .orientation(common.VizOrientation.HORIZONTAL)
        .show_unfilled(True)
        .min(0)
        .height(8)
    )
    if max_value is not None:
        panel.max(max_value)
    for query in targets:
        panel.with_target(query)
    return panel


def merged_table(title: str, description: str, unit: str, steps, keys: str, columns: list[tuple]):
    """A table of one row per label set `keys`, one column per (header, expr, *field properties).

    Each query is aggregated `by (keys)` so that every frame has the same label columns and Grafana's
    merge transformation joins them into one row; the organize step names the value columns, and the
    properties apply to the column by that name.
    """
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .datasource(DATASOURCE)
        .unit(unit)
        .thresholds(steps)
        .filterable(True)
        .height(8)
    )
    order = [name.strip() for name in keys.split(",")]
    rename = {}
    for (header, expr, *properties), ref in zip(columns, refs()):
        panel.with_target(target(f"max by ({keys}) ({expr})", ref, instant=True, table_format=True))
        order.append(f"Value #{ref}")
        rename[f"Value #{ref}"] = header
        if properties:
            panel.override_by_name(header, properties)
    panel.with_transformation(models.DataTransformerConfig(id_val="merge", options={}))
    panel.with_transformation(
        models.DataTransformerConfig(
            id_val="organize",
            options={
                "excludeByName": {"Time": True},
                "indexByName": {name: index for index, name in enumerate(order)},
                "renameByName": rename,
            },
        )
    )
    return panel


def prop(name: str, value) -> models.DynamicConfigValue:
    return models.DynamicConfigValue(id_val=name, value=value)


def steps_value(*steps: tuple[float | None, str]) -> dict:
    """Thresholds as a field override value."""
    return {"mode": "absolute", "steps": [{"value": value, "color": color} for value, color in steps]}


COLOUR_BACKGROUND = prop("custom.cellOptions", {"type": "color-background", "mode": "basic"})
COLOUR_TEXT = prop("custom.cellOptions", {"type": "color-text"})


def refs() -> Iterator[str]:
    return iter("ABCDEFGHIJKLMNOPQRSTUVWXYZ")


def variables(builder) -> None:
    builder.with_variable(
        dashboard_builders.DatasourceVariable("datasource")
        .label("Data source")
        .description("The Prometheus (or Thanos, Mimir) that scrapes the sops-nix exporters.")
        .type("prometheus")
    )
    builder.with_variable(
        dashboard_builders.QueryVariable("job")
        .label("Job")
        .description("The scrape job of the sops-nix exporters.")
        .datasource(DATASOURCE)
        .query("label_values(sopsnix_exporter_build_info, job)")
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
    )
    builder.with_variable(
        dashboard_builders.QueryVariable("instance")
        .label("Instance")
        .description("Hosts to show; up{} lists exporters that are down as well.")
        .datasource(DATASOURCE)
        .query('label_values(up{job=~"$job"}, instance)')
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        # A regex, not the list of every value: stays short however many hosts there are.
        .all_value(".+")
        .current(models.VariableOption(selected=True, text="All", value="$__all"))
    )
    builder.with_variable(
        dashboard_builders.QueryVariable("vm")
        .label("VM")
        .description("microvm.nix VMs whose shares to show.")
        .datasource(DATASOURCE)
        .query(f'label_values(sopsnix_vm_share_info{{{SEL}}}, vm)')
        .refresh(models.VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(models.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
        .current(models.VariableOption(selected=True, text="All", value="$__all"))
    )


def new_dashboard(uid: str, title: str, description: str, time_from: str):
    builder = (
        dashboard_builders.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags([TAG])
        .editable()
        .timezone("browser")
        .time(time_from, "now")
        .refresh("1m")
        .tooltip(models.DashboardCursorSync.CROSSHAIR)
        .link(
            dashboard_builders.DashboardLink("sops-nix dashboards")
            .type(models.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(False)
            .include_vars(True)
            .keep_time(True)
        )
    )
    variables(builder)
    return builder


def add(builder, ids: Iterator[int], *panels) -> None:
    """Panels in reading order; ids are assigned here so they stay stable as long as the order does."""
    for panel in panels:
        if isinstance(panel, dashboard_builders.Row):
            builder.with_row(panel.id(next(ids)))
        else:
            builder.with_panel(panel.id(next(ids)))


# --- host dashboard --------------------------------------------------------------------------------

STORE_LEGEND = "{{instance}} {{mountpoint}}"


def host_dashboard() -> models.Dashboard:
    builder = new_dashboard(
        HOST_UID,
        "sops-nix / host",
        "Secrets stores of the selected hosts: generations and memory against budget, which VM serves "
        "which generation and what the next switch breaks, firing alerts, and the exporter's health.",
        "now-7d",
    )
    ids = itertools.count(1)

    add(
        builder,
        ids,
        dashboard_builders.Row("Stores now"),
        stat_panel(
            "Store",
            "1 if the store's mount point exists and could be listed. A store that is down has no other "
            "figures: check the mount point in the exporter's configuration and the exporter's permissions.",
            "none",
            thresholds((None, "red"), (1, "green")),
            target(s("sopsnix_store_up"), legend=STORE_LEGEND, instant=True),
            mappings=UP_DOWN,
        ).span(4),
        stat_panel(
            "Symlink",
            "Whether the store's symlink (e.g. /run/secrets) resolves to a generation of the store. Broken "
            "means services read missing, dangling or foreign secrets: re-run the activation.",
            "none",
            thresholds((None, "red"), (1, "green")),
            target(s("sopsnix_symlink_ok"), legend=STORE_LEGEND, instant=True),
            mappings=OK_BROKEN,
        ).span(4),
        stat_panel(
            "Budget used",
            "Memory held by all generations as a share of the store's memory budget. Yellow from 80 %, "
            "red at the budget: lower keepGenerations, reboot, or raise the budget.",
            "percentunit",
            thresholds((None, "green"), (0.8, "yellow"), (1, "red")),
            target(BUDGET_USED, legend=STORE_LEGEND, instant=True),
        ).span(4),
        stat_panel(
            "Days of budget left",
            f"Days until the generations fill the memory budget at the growth of the last {RATE_WINDOW} "
            f"(least-squares slope). {DAYS_LEFT_CAP} or more means not growing.",
            "d",
            thresholds((None, "red"), (7, "orange"), (30, "yellow"), (90, "green")),
            target(DAYS_OF_BUDGET_LEFT, legend=STORE_LEGEND, instant=True),
            mappings=[
                models.RangeMap(
                    options=models.DashboardRangeMapOptions(
                        from_val=DAYS_LEFT_CAP,
                        to=None,
                        result=models.ValueMappingResult(text="not growing", color="green", index=0),
                    )
                )
            ],
            decimals=1,
        ).span(4),
        stat_panel(
            "Since last switch",
            "Time since the store's symlink was last re-pointed (its mtime). Not a fault in itself: yellow "
            "after 30 days as a reminder that rotated secrets only take effect at a switch.",
            "s",
            thresholds((None, "green"), (30 * 86400, "yellow")),
            target(f'time() - {s("sopsnix_last_switch_timestamp_seconds")}', legend=STORE_LEGEND, instant=True),
        ).span(4),
        stat_panel(
            "Pending generations",
            "Generations numbered above the current one: written by an activation that never linked "
            "them (a failed switch or a dry-activate). The next successful switch supersedes them.",
            "none",
            thresholds((None, "green"), (1, "yellow")),
            target(s("sopsnix_pending_generations"), legend=STORE_LEGEND, instant=True),
        ).span(4),
    )
    add(
        builder,
        ids,
        stat_panel(
            "Mounts on the store",
            "Filesystems mounted at the store's mount point. More than one means older generations are "
            "hidden under a newer mount and still hold memory: reboot once nothing serves them.",
            "none",
            thresholds((None, "red"), (1, "green"), (2, "red")),
            target(s("sopsnix_mounts"), legend=STORE_LEGEND, instant=True),
        ).span(6),
        bargauge_panel(
            "Secrets memory against host memory",
            "Memory held by each store's generations as a share of the host's total memory. ramfs cannot "
            "be swapped out. Yellow at the exporter's default budget ratio (1 %), red at 5 %.",
            "percentunit",
            thresholds((None, "green"), (0.01, "yellow"), (0.05, "red")),
            target(HOST_MEMORY_USED, legend=STORE_LEGEND, instant=True),
        )
        .height(4)
        .span(9),
        stat_panel(
            "Switches in the last day",
            f"Times the current generation changed in the last {RATE_WINDOW}: one per activation that "
            "touched secrets (a reboot, which empties the ramfs, counts too). Many a day means memory "
            "grows quickly when generations are kept.",
            "none",
            thresholds((None, "green"), (24, "yellow")),
            target(SWITCHES_PER_DAY, legend=STORE_LEGEND, instant=True),
        ).span(9),
    )

    add(
        builder,
        ids,
        dashboard_builders.Row("Memory and generations over time"),
        timeseries_panel(
            "Secrets memory",
            "Memory held by all generations of each store (st_blocks of their files), the part held by "
            "the current generation, and the store's budget. The gap between all and current is what "
            "older generations kept for VMs or by keepGenerations cost.",
            "bytes",
            thresholds((None, "green")),
            target(s("sopsnix_generations_bytes"), "A", "{{instance}} {{mountpoint}} all generations"),
            target(s("sopsnix_current_generation_bytes"), "B", "{{instance}} {{mountpoint}} current"),
            target(s("sopsnix_memory_budget_bytes"), "C", "{{instance}} {{mountpoint}} budget"),
        )
        .span(12)
        .override_by_regexp(
            ".* budget",
            [
                prop("custom.lineStyle", {"fill": "dash", "dash": [10, 10]}),
                prop("custom.fillOpacity", 0),
                prop("color", {"mode": "fixed", "fixedColor": "red"}),
            ],
        ),
        timeseries_panel(
            "Generations",
            "Generation directories in each store, those above the current one (pending), and those "
            "VMs or consumers still hold (pinned). With keepGenerations = 1 a store holds one generation plus the "
            "pinned ones.",
            "none",
            thresholds((None, "green")),
            target(s("sopsnix_generations"), "A", "{{instance}} {{mountpoint}} generations"),
            target(s("sopsnix_pending_generations"), "B", "{{instance}} {{mountpoint}} pending"),
            target(s("sopsnix_pinned_generations"), "C", "{{instance}} {{mountpoint}} pinned"),
        ).span(12),
        timeseries_panel(
            "Memory added per switch",
            "Memory each switch writes (the size of the current generation) and the memory each switch "
            f"added net of pruning over the last {RATE_WINDOW}. Net close to the written size means "
            "nothing is pruned: keepGenerations = 0, or VMs pin every generation.",
            "bytes",
            thresholds((None, "green")),
            target(s("sopsnix_current_generation_bytes"), "A", "{{instance}} {{mountpoint}} written"),
            target(KEPT_PER_SWITCH, "B", "{{instance}} {{mountpoint}} net growth"),
            min_value=None,
        ).span(8),
        timeseries_panel(
            "Switches per day",
            f"Changes of the current generation in the {RATE_WINDOW} before each point.",
            "none",
            thresholds((None, "green"), (24, "yellow")),
            target(SWITCHES_PER_DAY, "A", STORE_LEGEND),
        ).span(8),
        timeseries_panel(
            "Days of budget left",
            f"Days until the generations fill the memory budget at the growth of the {RATE_WINDOW} before "
            f"each point; capped at {DAYS_LEFT_CAP} (not growing).",
            "d",
            thresholds((None, "red"), (7, "orange"), (30, "yellow"), (90, "green")),
            target(DAYS_OF_BUDGET_LEFT, "A", STORE_LEGEND),
        )
        .span(8)
        .thresholds_style(common_builders.GraphThresholdsStyleConfig().mode(common.GraphThresholdsStyleMode.AREA)),
        timeseries_panel(
            "Reclaimable memory",
            "What `sops-nix-exporter prune --apply` would free now: the memory of the generations below the "
            "current one that no VM share, mount namespace, working directory or root reads (the prune also "
            "checks open descriptors, so it may keep one more). With keepGenerations = 0 and no prune it grows "
            "with every switch; with the prune enabled it falls back to 0. Empty while the exporter cannot "
            "inspect every process (without CAP_SYS_PTRACE): then it is unknown. Dry-run "
            "`sops-nix-exporter prune`, then set services.sops-nix-exporter.prune.enable = true with "
            "sops.keepGenerations = 0 (docs/deployment.md).",
            "bytes",
            thresholds((None, "green")),
            target(s("sopsnix_reclaimable_bytes"), "A", STORE_LEGEND),
        ).span(12),
        timeseries_panel(
            "Reclaimable generations",
            "Generations a prune would remove now, as far as the exporter sees readers: never the current "
            "one, a pending one, or the one replaced less than 60 s ago. A generation that stays here across "
            "switches is one nobody reads but that keepGenerations = 0 keeps; one that a VM or consumer reads "
            "is not counted. Empty while the exporter cannot inspect every process.",
            "none",
            thresholds((None, "green")),
            target(s("sopsnix_reclaimable_generations"), "A", STORE_LEGEND),
        ).span(12),
    )

    shares = merged_table(
        "VM shares",
        "Every virtiofs share of the selected VMs that serves a secrets store: the generation it serves, "
        "how many switches behind the store's current one it is, and its worst state. current: serves "
        "the current generation. stale: serves an older one, the guest reads old secrets. pruned on next "
        "switch: keepGenerations will delete what it serves at the next switch. down: declared but no "
        "virtiofsd serves it. deleted: the generation it serves was pruned, the guest sees an empty "
        "directory; restart the VM. Exposes store: whole store if the share's source is the store's mount "
        "point or a directory above it, handing the guest every generation and sops-nix's key: share the "
        "symlink instead and rotate. Writable: the virtiofsd lacks --readonly (empty while nothing serves "
        "the share): set microvm.shares.*.readOnly = true. Secrets and Outdated files (from the content "
        "fingerprints, empty without them): outdated if a file of the subtree the share serves differs from "
        "the current generation, so the guest reads rotated values: restart the VM; same if a stale share "
        "reads exactly the host's secrets.",
        "none",
        thresholds((None, "green")),
        SHARE_KEY,
        [
            ("Served generation", vm("sopsnix_vm_serving_generation")),
            (
                "Generations behind",
                vm("sopsnix_vm_generations_behind"),
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "yellow"))),
            ),
            (
                "State",
                SHARE_STATE_TERMS,
                COLOUR_BACKGROUND,
                prop("mappings", SHARE_STATE_TEXTS),
                prop("thresholds", steps_value(*[(None if v == 0 else v, c) for v, _, c in SHARE_STATES])),
            ),
            (
                "Exposes store",
                vm("sopsnix_vm_share_exposes_store"),
                COLOUR_BACKGROUND,
                prop("mappings", EXPOSES_TEXTS),
                prop("thresholds", steps_value((None, "green"), (1, "red"))),
            ),
            (
                "Writable",
                vm("sopsnix_vm_share_writable"),
                COLOUR_BACKGROUND,
                prop("mappings", WRITABLE_TEXTS),
                prop("thresholds", steps_value((None, "green"), (1, "orange"))),
            ),
            (
                "Secrets",
                vm("sopsnix_vm_serving_outdated_secrets"),
                COLOUR_BACKGROUND,
                prop("mappings", OUTDATED_TEXTS),
                prop("thresholds", steps_value((None, "green"), (1, "orange"))),
            ),
            (
                "Outdated files",
                vm("sopsnix_vm_outdated_secret_files"),
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "orange"))),
            ),
        ],
    ).span(16)
    shares.sort_by([common_builders.TableSortByFieldState().display_name("State").desc(True)])

    keep = merged_table(
        "keepGenerations",
        "Per store: keepGenerations as configured for the exporter, the generations VMs and consumers "
        "pin, and the smallest keepGenerations with which the next switch would delete no generation a VM "
        "or consumer holds.",
        "none",
        thresholds((None, "green")),
        "job, instance, mountpoint",
        [
            ("Configured", s("sopsnix_keep_generations")),
            ("Pinned", s("sopsnix_pinned_generations")),
            ("Recommended", s("sopsnix_recommended_keep_generations")),
        ],
    ).span(8)

    add(builder, ids, dashboard_builders.Row("VM shares"), shares, keep)

    consumers = merged_table(
        "Consumers",
        "Containers, services and processes whose mount namespace holds a bind mount of a store's "
        "symlink: the generation it resolved when the namespace was set up, which it keeps until it "
        "restarts. consumer is the systemd unit of its cgroup (container@NAME.service, "
        "systemd-nspawn@NAME.service, docker-ID.scope, libpod-ID.scope, UNIT.service), else its command "
        "name. stale: it reads the secrets of before the last rotation. deleted: the generation was pruned "
        "and it sees an empty directory: restart it (nixos-container restart NAME, systemctl restart UNIT, "
        "docker or podman restart ID). Secrets (from the content fingerprints, empty without them): outdated "
        "if what its mount holds differs from the current generation, same if a stale mount reads exactly the "
        "host's secrets.",
        "none",
        thresholds((None, "green")),
        CONSUMER_KEY,
        [
            ("Serving generation", s("sopsnix_consumer_serving_generation")),
            (
                "Stale",
                s("sopsnix_consumer_serving_stale_generation"),
                COLOUR_BACKGROUND,
                prop("mappings", STALE_TEXTS),
                prop("thresholds", steps_value((None, "green"), (1, "yellow"))),
            ),
            (
                "Deleted",
                s("sopsnix_consumer_serving_deleted_generation"),
                COLOUR_BACKGROUND,
                prop("mappings", DELETED_TEXTS),
                prop("thresholds", steps_value((None, "green"), (1, "dark-red"))),
            ),
            (
                "Secrets",
                s("sopsnix_consumer_serving_outdated_secrets"),
                COLOUR_BACKGROUND,
                prop("mappings", OUTDATED_TEXTS),
                prop("thresholds", steps_value((None, "green"), (1, "orange"))),
            ),
        ],
    ).span(24)
    consumers.sort_by([common_builders.TableSortByFieldState().display_name("Deleted").desc(True)])

    add(builder, ids, dashboard_builders.Row("Consumers"), consumers)

    add(
        builder,
        ids,
        dashboard_builders.Row("Content fingerprints"),
        timeseries_panel(
            "Files changed by each activation",
            "Files that differ between the current generation and the one it replaced, from the content "
            "fingerprints: 0 means the last activation wrote a new generation with the same secrets, so readers "
            "of the older one read the host's values. Empty while either fingerprint is missing.",
            "none",
            thresholds((None, "green")),
            target(s("sopsnix_current_generation_changed_files"), "A", STORE_LEGEND),
            bars=True,
        ).span(12),
        stat_panel(
            "Fingerprinted generations",
            "Generations of each store that have a content fingerprint. Empty where fingerprints are not "
            "enabled (no fingerprint directory): then only generation numbers judge the VMs and consumers.",
            "none",
            thresholds((None, "green")),
            target(s("sopsnix_fingerprinted_generations"), legend=STORE_LEGEND, instant=True),
        )
        .span(4)
        .height(8),
        stat_panel(
            "Fingerprint run errors",
            "Generations or stores the last sops-nix-exporter fingerprint run could not fingerprint; "
            "journalctl -u sops-nix-exporter-fingerprint names them. Their readers are judged by number only.",
            "none",
            thresholds((None, "green"), (1, "orange")),
            target(s("sopsnix_fingerprint_run_errors"), legend="{{instance}}", instant=True),
        )
        .span(4)
        .height(8),
        stat_panel(
            "Since last fingerprint run",
            "Time since the last fingerprint run finished. It runs at each switch, so a long time is normal; "
            "compare with Since last switch: a switch after the run means the current generation has none.",
            "s",
            thresholds((None, "green")),
            target(f'time() - {s("sopsnix_fingerprint_last_run_timestamp_seconds")}', legend="{{instance}}",
                   instant=True),
        )
        .span(4)
        .height(8),
    )

    alerts = (
        table.Panel()
        .title("Firing alerts")
        .description(
            "sops-nix alerts firing for the selected hosts (the ALERTS series of the Prometheus rules in "
            "alerts/). Each row names the store, VM or share it concerns; the runbook is in the alert's "
            "annotations."
        )
        .datasource(DATASOURCE)
        .unit("none")
        .thresholds(thresholds((None, "red")))
        .filterable(True)
        .height(8)
        .span(12)
        .with_target(target(FIRING, "A", instant=True, table_format=True))
        .with_transformation(
            models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "Value": True, "__name__": True, "alertstate": True},
                    "indexByName": {"alertname": 0, "severity": 1, "instance": 2, "mountpoint": 3, "vm": 4},
                    "renameByName": {},
                },
            )
        )
    )
    alerts.override_by_name(
        "severity",
        [
            COLOUR_BACKGROUND,
            prop("mappings", value_texts(("critical", "critical", "red"), ("warning", "warning", "orange"),
                                         ("info", "info", "blue"))),
        ],
    )

    add(
        builder,
        ids,
        dashboard_builders.Row("Alerts and exporter health"),
        alerts,
        stat_panel(
            "Exporter",
            "Whether Prometheus could scrape the exporter (the up series). Down means every other panel "
            "shows old data or none.",
            "none",
            thresholds((None, "red"), (1, "green")),
            target(s("up"), legend="{{instance}}", instant=True),
            mappings=UP_DOWN,
        )
        .span(4)
        .height(8),
        stat_panel(
            "Collectors",
            "Whether each collector's last scan succeeded. A failing collector's metrics are missing "
            "from the scrape; the exporter's log says why.",
            "none",
            thresholds((None, "red"), (1, "green")),
            target(s("sopsnix_scrape_collector_success"), legend="{{instance}} {{collector}}", instant=True),
            mappings=OK_FAILING,
        )
        .span(4)
        .height(8),
        stat_panel(
            "Capabilities",
            "Whether the exporter holds the capabilities it needs to see every share: CAP_SYS_PTRACE to "
            "read virtiofsd's root and descriptors, CAP_DAC_READ_SEARCH to measure closed directories. "
            "Without them some shares or bytes go unseen.",
            "none",
            thresholds((None, "orange"), (1, "green")),
            target(s("sopsnix_exporter_capability"), legend="{{instance}} {{capability}}", instant=True),
            mappings=value_texts((0, "missing", "orange"), (1, "held", "green")),
        )
        .span(4)
        .height(8),
    )
    add(
        builder,
        ids,
        timeseries_panel(
            "Collector duration",
            "How long each collector's scan took. Yellow above 1 s; red near Prometheus's default scrape "
            "timeout of 10 s.",
            "s",
            thresholds((None, "green"), (1, "yellow"), (8, "red")),
            target(s("sopsnix_scrape_collector_duration_seconds"), "A", "{{instance}} {{collector}}"),
        ).span(8),
        timeseries_panel(
            "Store scan errors",
            "Parts of a store the last scan could not read, by reason. vanished is a prune racing the "
            "scan and harmless; permission_denied means byte counts are a lower bound: grant the exporter "
            "CAP_DAC_READ_SEARCH (the keys group does not open /run/secrets-for-users.d).",
            "none",
            thresholds((None, "green"), (1, "yellow")),
            target(s("sopsnix_store_scan_errors"), "A", "{{instance}} {{mountpoint}} {{reason}}"),
        ).span(8),
        table.Panel()
        .title("Exporter version")
        .description("The exporter's version and Python version on each host.")
        .datasource(DATASOURCE)
        .unit("none")
        .thresholds(thresholds((None, "green")))
        .height(8)
        .span(8)
        .with_target(target(s("sopsnix_exporter_build_info"), "A", instant=True, table_format=True))
        .with_transformation(
            models.DataTransformerConfig(
                id_val="organize",
                options={
                    "excludeByName": {"Time": True, "Value": True, "__name__": True, "job": True},
                    "indexByName": {"instance": 0, "version": 1, "python_version": 2},
                    "renameByName": {},
                },
            )
        ),
    )
    return builder.build()


# --- fleet dashboard -------------------------------------------------------------------------------

HOST_LINK = (
    f"/d/{HOST_UID}/?${{datasource:queryparam}}&var-job=${{__data.fields.job}}"
    "&var-instance=${__data.fields.instance}&${__url_time_range}"
)


def count_or_zero(expr: str) -> str:
    """A count that reads 0, not "No data", when nothing matches."""
    return f"{expr} or vector(0)"


def fleet_dashboard() -> models.Dashboard:
    builder = new_dashboard(
        FLEET_UID,
        "sops-nix / fleet",
        "Every host's secrets stores at a glance: hosts ranked by secrets memory, budget used and growth, "
        "and the VM shares that are stale, deleted or down. Click a host to open its host dashboard.",
        "now-24h",
    )
    ids = itertools.count(1)

    add(
        builder,
        ids,
        dashboard_builders.Row("Fleet now"),
        stat_panel(
            "Hosts",
            "Exporters Prometheus scrapes successfully.",
            "none",
            thresholds((None, "blue")),
            target(f'sum({s("up")})', legend="hosts", instant=True),
        ).span(3),
        stat_panel(
            "Exporters down",
            "Exporters Prometheus cannot scrape: their hosts are missing from every other panel.",
            "none",
            thresholds((None, "green"), (1, "red")),
            target(count_or_zero(f'count({s("up")} == 0)'), legend="down", instant=True),
        ).span(3),
        stat_panel(
            "Firing alerts",
            "sops-nix alerts firing on the selected hosts.",
            "none",
            thresholds((None, "green"), (1, "red")),
            target(count_or_zero(f"count({FIRING})"), legend="firing", instant=True),
        ).span(3),
        stat_panel(
            "Stores over budget",
            "Stores whose generations hold at least their memory budget.",
            "none",
            thresholds((None, "green"), (1, "red")),
            target(count_or_zero(f"count(({BUDGET_USED}) >= 1)"), legend="over budget", instant=True),
        ).span(3),
        stat_panel(
            "Deleted VM shares",
            "VM shares serving a generation that was pruned: those guests see an empty secrets directory "
            "until the VM restarts.",
            "none",
            thresholds((None, "green"), (1, "red")),
            target(
                count_or_zero(f'sum({vm("sopsnix_vm_serving_deleted_generation")})'), legend="deleted", instant=True
            ),
        ).span(3),
        stat_panel(
            "Down VM shares",
            "Declared VM shares no virtiofsd serves.",
            "none",
            thresholds((None, "green"), (1, "red")),
            target(count_or_zero(f'count({vm("sopsnix_vm_share_up")} == 0)'), legend="down", instant=True),
        ).span(3),
        stat_panel(
            "Stale VM shares",
            "VM shares serving an older generation than their store's current one: those guests read old "
            "secrets.",
            "none",
            thresholds((None, "green"), (1, "yellow")),
            target(
                count_or_zero(f'sum({vm("sopsnix_vm_serving_stale_generation")})'), legend="stale", instant=True
            ),
        ).span(3),
        stat_panel(
            "Pruned on next switch",
            "VM shares whose generation the next switch deletes (keepGenerations too low for them).",
            "none",
            thresholds((None, "green"), (1, "orange")),
            target(
                count_or_zero(f'sum({vm("sopsnix_vm_share_pruned_on_next_switch")})'), legend="at risk", instant=True
            ),
        ).span(3),
        stat_panel(
            "VM shares exposing the store",
            "VM shares, served or declared, whose source is a store's mount point or a directory above it: "
            "those guests can read every generation the host keeps and sops-nix's private key. Share the "
            "symlink instead, restart the VM, and rotate the key and the secrets.",
            "none",
            thresholds((None, "green"), (1, "red")),
            target(
                count_or_zero(f'sum({vm("sopsnix_vm_share_exposes_store")})'), legend="exposing", instant=True
            ),
        ).span(6),
        stat_panel(
            "Writable VM shares",
            "Served VM shares whose virtiofsd lacks --readonly: those guests can change the host's secrets. "
            "Set microvm.shares.*.readOnly = true and restart the VM.",
            "none",
            thresholds((None, "green"), (1, "orange")),
            target(count_or_zero(f'sum({vm("sopsnix_vm_share_writable")})'), legend="writable", instant=True),
        ).span(6),
        stat_panel(
            "Deleted consumers",
            "Containers, services and processes whose bind mount holds a pruned generation: they see an "
            "empty secrets directory until restarted.",
            "none",
            thresholds((None, "green"), (1, "red")),
            target(
                count_or_zero(f'sum({s("sopsnix_consumer_serving_deleted_generation")})'),
                legend="deleted",
                instant=True,
            ),
        ).span(6),
        stat_panel(
            "Stale consumers",
            "Containers, services and processes whose bind mount holds an older generation than their "
            "store's current one: they read old secrets until restarted.",
            "none",
            thresholds((None, "green"), (1, "yellow")),
            target(
                count_or_zero(f'sum({s("sopsnix_consumer_serving_stale_generation")})'), legend="stale", instant=True
            ),
        ).span(6),
        stat_panel(
            "Reclaimable by a prune",
            "Memory `sops-nix-exporter prune --apply` would free now on the selected hosts: generations nobody "
            "reads. Hosts whose exporter cannot inspect every process do not count (their figure is unknown). "
            "Enable the prune (services.sops-nix-exporter.prune.enable with sops.keepGenerations = 0) where "
            "it stays above 0.",
            "bytes",
            thresholds((None, "green"), (1024 * 1024, "yellow")),
            target(count_or_zero(f'sum({s("sopsnix_reclaimable_bytes")})'), legend="reclaimable", instant=True),
        ).span(8),
        stat_panel(
            "Outdated VM shares",
            "VM shares whose content fingerprints say a file they serve differs from the current generation: "
            "those guests read rotated values until the VM restarts. Shares without fingerprints are not counted.",
            "none",
            thresholds((None, "green"), (1, "orange")),
            target(
                count_or_zero(f'sum({vm("sopsnix_vm_serving_outdated_secrets")})'), legend="outdated", instant=True
            ),
        ).span(8),
        stat_panel(
            "Outdated consumers",
            "Containers, services and processes whose mount differs from the current generation by its "
            "fingerprints: they read rotated values until restarted.",
            "none",
            thresholds((None, "green"), (1, "orange")),
            target(
                count_or_zero(f'sum({s("sopsnix_consumer_serving_outdated_secrets")})'),
                legend="outdated",
                instant=True,
            ),
        ).span(8),
    )

    hosts = merged_table(
        "Hosts",
        "One row per host: exporter up, secrets memory of all its stores, the highest share of a store's "
        "budget used, generations held, memory a prune would free (empty where unknown), stale and deleted "
        "VM shares, VM shares that expose a whole store or are writable, stale and deleted consumers "
        "(containers, services, processes), firing sops-nix alerts. Sorted by budget used; click an instance to open its host dashboard.",
        "none",
        thresholds((None, "green")),
        "job, instance",
        [
            (
                "Exporter",
                s("up"),
                COLOUR_BACKGROUND,
                prop("mappings", UP_DOWN),
                prop("thresholds", steps_value((None, "red"), (1, "green"))),
            ),
            ("Secrets memory", f'sum by (job, instance) ({s("sopsnix_generations_bytes")})', prop("unit", "bytes")),
            (
                "Budget used",
                BUDGET_USED,
                prop("unit", "percentunit"),
                prop("custom.cellOptions", {"type": "gauge", "mode": "basic"}),
                prop("min", 0),
                prop("max", 1),
                prop("thresholds", steps_value((None, "green"), (0.8, "yellow"), (1, "red"))),
            ),
            ("Generations", f'sum by (job, instance) ({s("sopsnix_generations")})'),
            (
                "Reclaimable",
                f'sum by (job, instance) ({s("sopsnix_reclaimable_bytes")})',
                prop("unit", "bytes"),
            ),
            (
                "Stale shares",
                f'sum by (job, instance) ({vm("sopsnix_vm_serving_stale_generation")})',
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "yellow"))),
            ),
            (
                "Deleted shares",
                f'sum by (job, instance) ({vm("sopsnix_vm_serving_deleted_generation")})',
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "red"))),
            ),
            (
                "Shares exposing the store",
                f'sum by (job, instance) ({vm("sopsnix_vm_share_exposes_store")})',
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "red"))),
            ),
            (
                "Writable shares",
                f'sum by (job, instance) ({vm("sopsnix_vm_share_writable")})',
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "orange"))),
            ),
            (
                "Stale consumers",
                f'sum by (job, instance) ({s("sopsnix_consumer_serving_stale_generation")})',
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "yellow"))),
            ),
            (
                "Deleted consumers",
                f'sum by (job, instance) ({s("sopsnix_consumer_serving_deleted_generation")})',
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "red"))),
            ),
            (
                "Firing alerts",
                f"count by (job, instance) ({FIRING})",
                COLOUR_TEXT,
                prop("thresholds", steps_value((None, "green"), (1, "red"))),
            ),
        ],
    ).span(24).height(10)
    hosts.override_by_name("instance", [prop("links", [{"title": "Host dashboard", "url": HOST_LINK}])])
    hosts.sort_by([common_builders.TableSortByFieldState().display_name("Budget used").desc(True)])

    add(builder, ids, dashboard_builders.Row("Hosts"), hosts)

    top = 20
    add(
        builder,
        ids,
        dashboard_builders.Row("Rankings"),
        bargauge_panel(
            "Most secrets memory",
            f"The {top} hosts whose secrets stores hold the most memory (all stores, all generations).",
            "bytes",
            thresholds((None, "green")),
            target(
                f'topk({top}, sum by (job, instance) ({s("sopsnix_generations_bytes")}))',
                legend="{{instance}}",
                instant=True,
            ),
        ).span(6).height(10),
        bargauge_panel(
            "Most budget used",
            f"The {top} hosts with the fullest store, as a share of that store's memory budget.",
            "percentunit",
            thresholds((None, "green"), (0.8, "yellow"), (1, "red")),
            target(f"topk({top}, max by (job, instance) ({BUDGET_USED}))", legend="{{instance}}", instant=True),
            max_value=1,
        ).span(6).height(10),
        bargauge_panel(
            "Fastest memory growth",
            f"The {top} hosts whose secrets memory grew fastest over the last {RATE_WINDOW}, in bytes per day "
            "(least-squares slope): kept generations pile up there first.",
            "bytes",
            thresholds((None, "green"), (1024 * 1024, "yellow")),
            target(
                f"topk({top}, 86400 * sum by (job, instance) ({GROWTH_PER_SECOND}))",
                legend="{{instance}}",
                instant=True,
            ),
        ).span(6).height(10),
        bargauge_panel(
            "Most reclaimable by a prune",
            f"The {top} hosts where `sops-nix-exporter prune --apply` would free the most memory now "
            "(generations nobody reads, all stores): enable the prune there first.",
            "bytes",
            thresholds((None, "green"), (1024 * 1024, "yellow")),
            target(
                f'topk({top}, sum by (job, instance) ({s("sopsnix_reclaimable_bytes")}))',
                legend="{{instance}}",
                instant=True,
            ),
        ).span(6).height(10),
    )

    add(
        builder,
        ids,
        dashboard_builders.Row("Over time"),
        timeseries_panel(
            "Secrets memory across the fleet",
            "Memory held by all generations of all selected hosts, the sum of their budgets, and what a prune "
            "would free (hosts whose exporter can inspect every process).",
            "bytes",
            thresholds((None, "green")),
            target(f'sum({s("sopsnix_generations_bytes")})', "A", "all generations"),
            target(f'sum({s("sopsnix_memory_budget_bytes")})', "B", "budget"),
            target(f'sum({s("sopsnix_reclaimable_bytes")})', "C", "reclaimable by a prune"),
        ).span(12),
        timeseries_panel(
            "VM shares by state",
            "VM shares that are stale, deleted, down or pruned on the next switch, that expose a whole store "
            "or that the guest can write, across the selected hosts.",
            "none",
            thresholds((None, "green"), (1, "red")),
            target(count_or_zero(f'sum({vm("sopsnix_vm_serving_stale_generation")})'), "A", "stale"),
            target(count_or_zero(f'sum({vm("sopsnix_vm_serving_deleted_generation")})'), "B", "deleted"),
            target(count_or_zero(f'count({vm("sopsnix_vm_share_up")} == 0)'), "C", "down"),
            target(count_or_zero(f'sum({vm("sopsnix_vm_share_pruned_on_next_switch")})'), "D", "pruned on next switch"),
            target(count_or_zero(f'sum({vm("sopsnix_vm_share_exposes_store")})'), "E", "exposing the store"),
            target(count_or_zero(f'sum({vm("sopsnix_vm_share_writable")})'), "F", "writable"),
        ).span(12),
    )
    return builder.build()


DASHBOARDS = {
    "sops-nix-host.json": host_dashboard,
    "sops-nix-fleet.json": fleet_dashboard,
}


def render(dashboard: models.Dashboard) -> str:
    return json.dumps(dashboard, cls=JSONEncoder, indent=2, ensure_ascii=False) + "\n"


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard, as committed under grafana/dashboards/."""
    return {name: render(build()) for name, build in DASHBOARDS.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if the committed JSON is out of date")
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR, help="directory for the JSON files")
    args = parser.parse_args(argv)
    stale = []
    for name, text in rendered().items():
        path = args.output / name
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(str(path))
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    if stale:
        print("out of date, run python grafana/dashboards.py: " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
