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
from secrets import token_hex


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


class Secrets:
    """Distinctive random secret names and contents, so that every output can be searched for them."""

    def __init__(self) -> None:
        self.markers: list[str] = []

    def name(self) -> str:
        marker = f"s3cretname{token_hex(6)}"
        self.markers.append(marker)
        return marker

    def content(self, size: int) -> bytes:
        """Exactly size bytes; from 24 bytes up they carry a searchable marker."""
        if size < 24:
            return b"k" * size
        marker = f"s3cretdata{token_hex(7)}"
        self.markers.append(marker)
        return (marker.encode() * (size // len(marker) + 1))[:size]

    def leaked(self, text: str) -> list[str]:
        return [marker for marker in self.markers if marker in text]


OTHER_FSTYPE = {"ramfs": "tmpfs", "tmpfs": "ramfs"}


def generation_secrets(secrets: Secrets, generation: int) -> dict[str, bytes]:
    """What one activation writes: sizes are fixed (the golden files depend on them), names are random."""
    return {
        secrets.name(): secrets.content(40),  # a password
        secrets.name(): secrets.content(4096),  # exactly one page
        secrets.name(): secrets.content(4097),  # one byte into a second page
        f"{secrets.name()}/{secrets.name()}": secrets.content(1704),  # a secret name containing "/"
        f"rendered/{secrets.name()}.env": secrets.content(700 * generation),  # a template, grows
        f"rendered/nested/{secrets.name()}.conf": secrets.content(10000),
        secrets.name(): b"",  # an empty secret: a file that costs no page
    }


def populate(store: SopsStore, number: int, secrets: Secrets) -> Path:
    """Write generation `number` as sops-nix would, plus what a generation may also hold: files of several
    modes, a sparse file, a FIFO (opening it would hang the exporter), an empty directory and a symlink to a
    large file outside the generation (never followed)."""
    directory = store.write_generation(number, generation_secrets(secrets, number))
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    for path, mode in zip(files, (0o440, 0o444, 0o600, 0o400, 0o640)):
        path.chmod(mode)
    sparse = directory / "rendered" / secrets.name()
    sparse.touch(mode=0o400)
    os.truncate(sparse, 1 << 20)  # a megabyte of size, no page of memory
    os.mkfifo(directory / secrets.name(), 0o600)
    (directory / "rendered" / "empty").mkdir(mode=0o500)
    (directory / secrets.name()).symlink_to(store.mountpoint / "gpg-home" / "pubring.kbx")
    return directory


def add_non_generations(store: SopsStore, secrets: Secrets) -> None:
    """Everything sops-nix (or an operator) may leave in the mount point that is not a generation."""
    mp = store.mountpoint
    (mp / "age-keys.txt").write_bytes(b"AGE-SECRET-KEY-" + secrets.content(60))
    (mp / "age-keys.txt").chmod(0o600)
    gpg = mp / "gpg-home"
    (gpg / "private-keys-v1.d").mkdir(parents=True, mode=0o700, exist_ok=True)
    (gpg / "pubring.kbx").write_bytes(secrets.content(30000))
    (gpg / "private-keys-v1.d" / f"{secrets.name()}.key").write_bytes(secrets.content(9000))
    for name in NOT_GENERATIONS:
        if name == "0":
            continue  # "0" is a valid decimal name; kept out of the way of the numbering here
        (mp / name).mkdir(mode=0o751)
        (mp / name / secrets.name()).write_bytes(secrets.content(9000))
    (mp / "40").write_bytes(secrets.content(5000))  # a numeric name, but a file
    (mp / "41").symlink_to(mp / "007")  # a numeric name, but a symlink to a directory


def sops_layout(store: SopsStore, secrets: Secrets, activations: int = 4, keep_generations: int = 2) -> dict:
    """`activations` switches with keepGenerations, then one pending generation written but never linked.

    With the defaults the store holds generations 3 and 4 (current) and 5 (pending)."""
    store.mountpoint.chmod(0o751)
    (store.mountpoint / "gpg-home").mkdir(mode=0o700)
    (store.mountpoint / "gpg-home" / "pubring.kbx").write_bytes(b"")
    for number in range(1, activations + 1):
        populate(store, number, secrets)
        store.link(number)
        store.prune(keep_generations)
    add_non_generations(store, secrets)
    pending = activations + 1
    populate(store, pending, secrets)
    kept = [n for n in range(1, activations + 1) if keep_generations == 0 or n > activations - keep_generations]
    return {"generations": [*kept, pending], "current": activations, "pending": [pending]}


def findmnt_fstype(path: Path) -> str:
    """The type of the filesystem mounted last at path, per util-linux."""
    out = subprocess.run(
        ["findmnt", "-n", "-o", "FSTYPE", "--mountpoint", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()
    return out[-1]


NO_MICROVMS = {"state_dir": str(Path(tempfile.gettempdir()) / f"sopsnix-test-no-microvms-{token_hex(8)}")}


def config_data(*stores: dict, **extra) -> dict:
    return {"stores": list(stores), "microvm": NO_MICROVMS, **extra}


def store_config(store: SopsStore, **extra) -> dict:
    """The configuration entry of a store: its mount point and symlink, and any other setting."""
    return {"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), **extra}


NOT_GENERATIONS = ("007", "0", "0012", "notes", "1a", "-1", "+2", "\u0663", " 5")
