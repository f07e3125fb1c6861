"""Assembling the exporter: which collectors run, in which registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

from sops_nix_exporter.collector.build_info import BuildInfo
from sops_nix_exporter.collector.shares import SharesCollector
from sops_nix_exporter.collector.stores import StoresCollector
from sops_nix_exporter.config import Config
from sops_nix_exporter.collector.frame import Collector, Exporter, RegistryAdapter


def collectors(config: Config) -> list[Collector]:
    """In dependency order: a later collector may use an earlier one's result."""
    return [StoresCollector(config), SharesCollector(config)]


def build(config: Config, process_metrics: bool = True) -> tuple[Exporter, CollectorRegistry]:
    """Our own registry, never the global one. process_metrics is off for one-shot text files, where the
    exporter's own process says nothing about the host."""
    exporter = Exporter(collectors(config))
    registry = CollectorRegistry()
    registry.register(RegistryAdapter(exporter))
    registry.register(BuildInfo())
    if process_metrics:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return exporter, registry
