"""`sops-nix-exporter check`: one scan, told in words, with what to do about each finding.

Exit 0 when nothing needs doing, 1 when something does (a critical or warning finding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

from exporter.collectors import share_summary
from exporter.framework import Snapshot
from exporter.store import StoreScan

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def human_bytes(value: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(value) < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def store_summary(store: StoreScan) -> str:
    if not store.up:
        if store.down_reason == "missing":
            return f"store {store.mountpoint}: not present (no secrets of this kind on this host, or sops-nix has not run)"
        return f"store {store.mountpoint}: cannot be listed ({store.down_reason})"
    total = store.total
    budget = store.memory_budget_bytes
    share = f" ({100 * total.bytes / budget:.1f}%)" if budget else ""
    current = store.current.number if store.current else "none"
    return (
        f"store {store.mountpoint} ({store.fstype or 'unknown fs'}): {len(store.generations)} generation(s), "
        f"{human_bytes(total.bytes)} of a {human_bytes(budget)} budget{share}, current generation {current}, "
        f"symlink {store.symlink} {store.symlink_state.value}"
    )


# Summaries by collector; a collector without one is reported by its findings alone.
SUMMARIES: dict[str, Callable[[object], Iterator[str]]] = {
    "stores": lambda result: (store_summary(s) for s in result.stores),  # type: ignore[attr-defined]
    "shares": lambda result: (share_summary(s) for s in result[1].shares),  # type: ignore[index]
}


def report(snapshot: Snapshot) -> tuple[str, int]:
    lines: list[str] = []
    findings = []
    for run in snapshot.runs.values():
        if run.success and run.name in SUMMARIES:
            lines.extend(SUMMARIES[run.name](run.result))
        findings.extend(run.problems)
    findings.sort(key=lambda p: SEVERITY_ORDER.get(p.severity, 3))
    if findings:
        lines.append("")
    for problem in findings:
        lines.append(f"{problem.severity.upper()}: {problem.message}")
        if problem.hint:
            lines.append(f"  fix: {problem.hint}")
    failing = any(p.severity in ("critical", "warning") for p in findings)
    lines.append("")
    lines.append("problems found" if failing else "healthy")
    return "\n".join(lines) + "\n", 1 if failing else 0

