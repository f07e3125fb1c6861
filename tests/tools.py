"""Test support: the external programs the tests run, found on PATH or the test skipped with the reason."""

from __future__ import annotations

import shutil

import pytest


def require_tool(name: str, package: str) -> str:
    """The program's path; skips the calling test, naming the Debian package, when it is not installed."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed (Debian package {package}); run scripts/test")
    return path
