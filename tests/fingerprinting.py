"""Test support: the real `sops-nix-exporter fingerprint` command, as root, with a test's configuration, as
its oneshot runs it after each switch. The dashboards' data test and the alerting end to end use it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml


def with_fingerprints(config: dict, directory: Path) -> dict:
    """The exporter's configuration with fingerprint_dir in the test's scratch directory."""
    return {**config, "fingerprint_dir": str(directory / "fingerprints")}


def fingerprint(config: dict, directory: Path) -> None:
    """One run over every store of `config` (which names fingerprint_dir); fails the test if it fails."""
    path = directory / "fingerprint-config.yml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "sops_nix_exporter", "fingerprint", f"--config.file={path}"],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    assert result.returncode == 0, f"sops-nix-exporter fingerprint exited {result.returncode}:\n{result.stderr}"
