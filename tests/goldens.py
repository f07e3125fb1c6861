"""Test support: golden expositions (tests/golden/, its README says what each file holds and what is masked)."""

from __future__ import annotations

import os
import re
from pathlib import Path

GOLDEN = Path(__file__).parent / "golden"


def golden_mask(text: str, paths: dict[str, str]) -> str:
    """Make an exposition comparable across runs; documented in tests/golden/README.md."""
    for real, placeholder in paths.items():
        text = text.replace(f'"{real}"', f'"{placeholder}"')
    masked = []
    for line in text.splitlines():
        if line.startswith(("sopsnix_host_memory_bytes ", "sopsnix_scrape_collector_duration_seconds{")):
            line = line.rsplit(" ", 1)[0] + " NaN"
        if line.startswith("sopsnix_exporter_build_info{"):
            line = re.sub(r'="[^"]*"', '="MASKED"', line)
        masked.append(line)
    return "\n".join(masked) + "\n"


def compare_golden(name: str, text: str) -> None:
    """text must be tests/golden/NAME byte for byte; UPDATE_GOLDEN=1 rewrites the file instead."""
    path = GOLDEN / name
    if os.environ.get("UPDATE_GOLDEN") == "1":
        path.write_text(text)
    assert path.exists(), f"{path} missing; create it with UPDATE_GOLDEN=1 and review it"
    expected = path.read_text()
    assert text == expected, f"exposition differs from {path} (UPDATE_GOLDEN=1 rewrites it; review the diff)"
