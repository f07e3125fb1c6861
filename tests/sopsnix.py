"""Test support: real ramfs/tmpfs stores laid out and switched the way sops-nix does it.

sops-install-secrets writes every secret of an activation into a new directory N+1 on its mount, points
the symlink at it by creating a temporary symlink and renaming it over the old one, then removes every
generation numbered at or below N+1 - keepGenerations (0 keeps them all).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path


class MountUnavailable(Exception):
    pass


def mount(fstype: str, target: Path, options: str = "") -> None:
    cmd = ["mount", "-t", fstype]
    if options:
        cmd += ["-o", options]
    cmd += [fstype, str(target)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise MountUnavailable(f"mount -t {fstype} failed: {result.stderr.strip() or result.returncode}")


def umount(target: Path) -> None:
    subprocess.run(["umount", "-l", str(target)], capture_output=True)


@contextmanager
def mounted(fstype: str, base: Path | None = None, options: str = ""):
    """A fresh ramfs or tmpfs in a temporary directory, unmounted and removed afterwards."""
    target = Path(tempfile.mkdtemp(prefix=f"sopsnix-{fstype}-", dir=base))
    try:
        mount(fstype, target, options or ("mode=0751" if fstype == "ramfs" else "mode=0751,size=64m"))
        try:
            yield target
        finally:
            umount(target)
    finally:
        shutil.rmtree(target, ignore_errors=True)


class SopsStore:
    """A sops-nix store: mountpoint holding generations, and a symlink beside it pointing at one."""

    def __init__(self, mountpoint: Path, symlink: Path) -> None:
        self.mountpoint = mountpoint
        self.symlink = symlink

    def generation_path(self, number: int) -> Path:
        return self.mountpoint / str(number)

    def generations(self) -> list[int]:
        return sorted(int(p.name) for p in self.mountpoint.iterdir() if p.name.isdigit() and p.is_dir())

    def current(self) -> int | None:
        try:
            return int(Path(os.readlink(self.symlink)).name)
        except (FileNotFoundError, ValueError):
            return None

    def write_generation(self, number: int, secrets: dict[str, bytes | str], mode: int = 0o400) -> Path:
        """Write secrets (relative paths, nested allowed) into generation `number`, as sops-nix does."""
        directory = self.generation_path(number)
        directory.mkdir(mode=0o751)
        for name, content in secrets.items():
            path = directory / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(content.encode() if isinstance(content, str) else content)
            path.chmod(mode)
        return directory

    def link(self, number: int) -> None:
        """Atomically re-point the symlink: a new symlink renamed over the old one."""
        temporary = self.symlink.with_name(self.symlink.name + ".tmp")
        if temporary.is_symlink():
            temporary.unlink()
        temporary.symlink_to(self.generation_path(number))
        os.rename(temporary, self.symlink)

    def prune(self, keep_generations: int) -> list[int]:
        """Remove every generation numbered at or below current - keepGenerations; 0 keeps everything."""
        current = self.current()
        if keep_generations == 0 or current is None:
            return []
        removed = []
        for number in self.generations():
            if number <= current - keep_generations:
                shutil.rmtree(self.generation_path(number))
                removed.append(number)
        return removed

    def switch(self, secrets: dict[str, bytes | str], keep_generations: int = 1) -> int:
        """One activation: write the next generation, link it, prune. Returns the new number."""
        number = max(self.generations(), default=0) + 1
        self.write_generation(number, secrets)
        self.link(number)
        self.prune(keep_generations)
        return number


def du_figures(path: Path) -> tuple[int, int, int]:
    """(files, bytes, apparent bytes) of the regular files below path, computed by find(1), not by us."""
    out = subprocess.run(
        ["find", str(path), "-type", "f", "-printf", "%b %s\n"], capture_output=True, text=True, check=True
    ).stdout
    files = blocks = size = 0
    for line in out.splitlines():
        b, s = line.split()
        files += 1
        blocks += int(b)
        size += int(s)
    return files, blocks * 512, size


SAMPLE_SECRETS: dict[str, bytes | str] = {
    "db-password": "hunter2\n",
    "api-token": "x" * 300,
    "tls/key.pem": os.urandom(1704),
    "rendered/app.env": "A=1\n" * 700,
    "rendered/nested/deep.conf": os.urandom(5000),
}
