"""docs/metrics.md documents every metric the exporter can publish, with its labels."""

import re
from pathlib import Path

from exporter.app import collectors
from exporter.collectors import BUILD_INFO
from exporter.config import Config
from exporter.framework import SCRAPE_DURATION, SCRAPE_SUCCESS

DOC = (Path(__file__).resolve().parent.parent / "docs" / "metrics.md").read_text()


def documented_rows() -> dict[str, set[str]]:
    rows = {}
    for match in re.finditer(r"^\| `(sopsnix_[a-z0-9_]+)` \| ([^|]*) \|", DOC, re.M):
        labels = {label.strip() for label in match.group(2).split(",") if label.strip() and "(none)" not in label}
        rows[match.group(1)] = labels
    return rows


def published_specs():
    specs = [spec for collector in collectors(Config()) for spec in collector.metrics]
    return specs + [BUILD_INFO, SCRAPE_SUCCESS, SCRAPE_DURATION]


def test_every_metric_is_documented_with_its_labels():
    rows = documented_rows()
    for spec in published_specs():
        assert spec.name in rows, f"{spec.name} is missing from docs/metrics.md"
        assert rows[spec.name] == set(spec.labels), f"{spec.name}: documented labels differ"


def test_nothing_documented_that_is_not_published():
    published = {spec.name for spec in published_specs()}
    assert set(documented_rows()) <= published


def test_every_documented_metric_has_an_example_line():
    examples = set(re.findall(r"^(sopsnix_[a-z0-9_]+)[{ ]", DOC, re.M))
    assert set(documented_rows()) - examples == set()
