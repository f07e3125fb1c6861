"""The frame every collector runs in, in the manner of node_exporter.

A collector is a Collector[R]: it reads the system in scan() and returns a typed result R; families(R) turns
it into metric families and problems(R) into findings, both without any I/O, and summary(R) into the lines
`check` prints. The frame times each collector, turns an exception into
sopsnix_scrape_collector_success{collector} = 0 with the reason logged (once), and leaves every other
collector's output intact. Concurrent scrapes share one collection in flight instead of each starting
their own.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, TypeVar

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector as RegistryCollector

from sops_nix_exporter.logs import describe_exception

log = logging.getLogger("sops_nix_exporter")


@dataclass(frozen=True)
class MetricSpec:
    """One metric a collector publishes: the single source of its name, help text and labels."""

    name: str
    documentation: str
    labels: tuple[str, ...] = ()

    def family(self, samples: Iterable[tuple[tuple[str, ...], float]] = ()) -> GaugeMetricFamily:
        family = GaugeMetricFamily(self.name, self.documentation, labels=list(self.labels))
        for label_values, value in samples:
            family.add_metric(list(label_values), value)
        return family


@dataclass(frozen=True)
class Problem:
    """Something an operator should know, with what to do about it. Never carries a secret's name."""

    key: str  # stable identity, so the same problem is logged once, not on every scrape
    message: str
    hint: str = ""
    severity: str = "warning"  # critical, warning (both make `check` exit 1) or info


R = TypeVar("R")


class Collector(Generic[R]):
    """One concern. Subclasses set name and metrics, and implement scan() and families()."""

    name: ClassVar[str]
    metrics: ClassVar[tuple[MetricSpec, ...]]

    def scan(self, snapshot: Snapshot) -> R:
        raise NotImplementedError

    def families(self, result: R) -> Iterator[Metric]:
        raise NotImplementedError

    def problems(self, result: R) -> Iterable[Problem]:
        return ()

    def summary(self, result: R) -> Iterable[str]:
        """Lines `check` prints about what was found, before the findings."""
        return ()


@dataclass
class CollectorRun:
    """One collector's part of a collection."""

    collector: Collector[Any]
    success: bool
    duration_seconds: float
    result: Any = None
    error: str | None = None
    families: list[Metric] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.collector.name


@dataclass
class Snapshot:
    """One collection: every collector's typed result, in order, so later collectors can use earlier ones."""

    runs: dict[str, CollectorRun] = field(default_factory=dict)

    def result(self, collector: type[Collector[R]]) -> R:
        """The result of an earlier collector; raises if it failed, so the dependent collector fails too."""
        run = self.runs.get(collector.name)
        if run is None or not run.success:
            raise RuntimeError(f"needs the {collector.name} collector, which failed")
        return run.result


SCRAPE_SUCCESS = MetricSpec(
    "sopsnix_scrape_collector_success",
    "1 if the collector's last scan succeeded, 0 if it failed (see the exporter's log for why).",
    ("collector",),
)
SCRAPE_DURATION = MetricSpec(
    "sopsnix_scrape_collector_duration_seconds",
    "How long the collector's last scan took.",
    ("collector",),
)


class ProblemLog:
    """Logs each problem when it appears and once more when it clears, never on every scrape."""

    def __init__(self) -> None:
        self._active: dict[str, Problem] = {}
        self._lock = threading.Lock()

    def update(self, scope: str, problems: Iterable[Problem]) -> None:
        current = {f"{scope}:{p.key}": p for p in problems}
        with self._lock:
            for key, problem in current.items():
                if key not in self._active:
                    level = {"info": logging.INFO, "critical": logging.ERROR}.get(problem.severity, logging.WARNING)
                    log.log(level, problem.message, extra={"kv": {"hint": problem.hint} if problem.hint else {}})
            for key, problem in self._active.items():
                if key.startswith(scope + ":") and key not in current:
                    log.info("resolved: " + problem.message)
            self._active = {k: v for k, v in self._active.items() if not k.startswith(scope + ":")}
            self._active.update(current)


class Exporter:
    def __init__(self, collectors: list[Collector]) -> None:
        self.collectors = collectors
        # None where the caller tells the problems itself: `check` prints each finding in its report, and
        # logging it too would show it twice in a terminal.
        self.problem_log: ProblemLog | None = ProblemLog()
        self._lock = threading.Lock()
        self._in_flight: Future[Snapshot] | None = None

    def _collect_now(self) -> Snapshot:
        snapshot = Snapshot()
        for collector in self.collectors:
            start = time.perf_counter()
            run = CollectorRun(collector=collector, success=False, duration_seconds=0.0)
            try:
                run.result = collector.scan(snapshot)
                run.families = list(collector.families(run.result))
                run.problems = list(collector.problems(run.result))
                run.success = True
            except Exception as exc:  # a broken collector must never empty the whole scrape
                run.error = describe_exception(exc)
                run.families = []
                run.problems = [Problem("failed", f"collector {collector.name} failed: {run.error}", severity="critical")]
                log.debug("collector failed", exc_info=True, extra={"kv": {"collector": collector.name}})
            run.duration_seconds = time.perf_counter() - start
            if self.problem_log is not None:
                self.problem_log.update(collector.name, run.problems)
            snapshot.runs[collector.name] = run
        return snapshot

    def collect(self) -> Snapshot:
        """A fresh snapshot; callers that arrive while one is being taken share it."""
        with self._lock:
            future = self._in_flight
            leader = future is None
            if leader:
                future = self._in_flight = Future()
        assert future is not None
        if leader:
            try:
                future.set_result(self._collect_now())
            except BaseException as exc:
                future.set_exception(exc)
            finally:
                with self._lock:
                    self._in_flight = None
        return future.result()


def health_families(snapshot: Snapshot) -> list[Metric]:
    runs = list(snapshot.runs.values())
    return [
        SCRAPE_SUCCESS.family(((run.name,), 1.0 if run.success else 0.0) for run in runs),
        SCRAPE_DURATION.family(((run.name,), run.duration_seconds) for run in runs),
    ]


class RegistryAdapter(RegistryCollector):
    """Presents an Exporter to a prometheus_client CollectorRegistry."""

    def __init__(self, exporter: Exporter) -> None:
        self.exporter = exporter

    def describe(self) -> Iterator[Metric]:
        for collector in self.exporter.collectors:
            for spec in collector.metrics:
                yield spec.family()
        yield SCRAPE_SUCCESS.family()
        yield SCRAPE_DURATION.family()

    def collect(self) -> Iterator[Metric]:
        snapshot = self.exporter.collect()
        for run in snapshot.runs.values():
            yield from run.families
        yield from health_families(snapshot)
