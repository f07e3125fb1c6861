"""`sops-nix-exporter check`: one scan, told in words, with what to do about each finding. It only formats
what the collectors say (their summary and problems).

Exit 0 when nothing needs doing, 1 when something does (a critical or warning finding).
"""

from __future__ import annotations

from sops_nix_exporter.collector.frame import Snapshot

SEVERITY_ORDER = {"critical": 0, "warning": 1, "info": 2}


def report(snapshot: Snapshot) -> tuple[str, int]:
    lines: list[str] = []
    findings = []
    for run in snapshot.runs.values():
        if run.success:
            lines.extend(run.collector.summary(run.result))
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

