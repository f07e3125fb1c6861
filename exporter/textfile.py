"""One scan written for node_exporter's textfile collector, atomically: a reader sees the old file or the
new one, never half of one."""

from __future__ import annotations

import os
import tempfile

from prometheus_client import CollectorRegistry, generate_latest


def write_atomically(path: str, registry: CollectorRegistry) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    body = generate_latest(registry)
    # The temporary name must not end in .prom, or the textfile collector could read it half-written.
    fd, tmp = tempfile.mkstemp(prefix=".sops-nix-exporter.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(body)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
