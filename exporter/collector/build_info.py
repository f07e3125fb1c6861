"""The exporter's build: published beside the collectors, not as one."""

from __future__ import annotations

import platform
from collections.abc import Iterator

from prometheus_client.core import Metric

from sops_nix_exporter import __version__
from sops_nix_exporter.collector.frame import MetricSpec

BUILD_INFO = MetricSpec(
    "sopsnix_exporter_build_info", "1, with the exporter's version and Python version.", ("version", "python_version")
)


class BuildInfo:
    """Published beside the collectors, not as one: it cannot fail and needs no scan.

        sopsnix_exporter_build_info{python_version="3.11.7",version="0.1.0"} 1.0
    """

    def describe(self) -> Iterator[Metric]:
        yield BUILD_INFO.family()

    def collect(self) -> Iterator[Metric]:
        yield BUILD_INFO.family([((__version__, platform.python_version()), 1.0)])
