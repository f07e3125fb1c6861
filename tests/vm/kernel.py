"""Debian's own kernel for the test guest: downloaded with apt-get, unpacked with dpkg-deb, never installed.

Only what the guest needs is kept in the cache: the kernel image and the modules that virtio-pci and
virtiofs need (their closure in the modules.dep that depmod writes for the unpacked tree). The package
is looked up through linux-image-amd64, so the cache follows Debian's current kernel; once a kernel is
cached it is used as it is, without asking apt again.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

CACHE = Path(__file__).resolve().parent / "cache"

# What the guest loads: the virtio PCI transport, and the virtiofs file system (which pulls in fuse).
GUEST_MODULES = ("virtio_pci", "virtiofs")

METAPACKAGE = "linux-image-amd64"


class KernelUnavailable(Exception):
    """No Debian kernel could be fetched; the message says what failed."""


@dataclass(frozen=True)
class Kernel:
    release: str  # e.g. 6.1.0-56-amd64
    package: str  # e.g. linux-image-6.1.0-56-amd64 6.1.192-2
    vmlinuz: Path
    modules: tuple[Path, ...]  # in load order: every module after the modules it depends on


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kwargs)


def _kernel_package() -> str:
    """The versioned package linux-image-amd64 depends on, e.g. linux-image-6.1.0-56-amd64."""

    def lookup() -> str | None:
        result = _run(["apt-cache", "depends", METAPACKAGE])
        for line in result.stdout.splitlines():
            kind, _, name = line.strip().partition(": ")
            if kind == "Depends" and name.startswith("linux-image-"):
                return name
        return None

    package = lookup()
    if package is None:
        # A fresh machine has no package lists yet.
        update = _run(["apt-get", "update"])
        if update.returncode != 0:
            raise KernelUnavailable(f"apt-get update failed: {update.stderr.strip()[-500:]}")
        package = lookup()
    if package is None:
        raise KernelUnavailable(f"apt-cache finds no kernel package behind {METAPACKAGE}")
    return package


def module_closure(modules_dep: Path, wanted: tuple[str, ...]) -> list[str]:
    """Paths (relative to the modules directory) of `wanted` and everything they need, dependencies first."""
    depends: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in modules_dep.read_text().splitlines():
        module, _, rest = line.partition(":")
        depends[module] = rest.split()
        by_name[Path(module).name.split(".")[0].replace("-", "_")] = module
    ordered: list[str] = []

    def visit(module: str) -> None:
        if module in ordered:
            return
        for dependency in depends[module]:
            visit(dependency)
        ordered.append(module)

    for name in wanted:
        if name not in by_name:
            raise KernelUnavailable(f"module {name} is not in {modules_dep} (built in, or absent from this kernel?)")
        visit(by_name[name])
    return ordered


def _cached() -> Kernel | None:
    for directory in sorted(CACHE.glob("kernel-*")):
        stamp = directory / "package"
        if not stamp.exists():
            continue
        order = (directory / "load-order").read_text().split()
        return Kernel(
            release=directory.name.removeprefix("kernel-"),
            package=stamp.read_text().strip(),
            vmlinuz=directory / "vmlinuz",
            modules=tuple(directory / "modules" / Path(m).name for m in order),
        )
    return None


def fetch_kernel() -> Kernel:
    """The cached kernel, or Debian's current one downloaded and unpacked into the cache."""
    kernel = _cached()
    if kernel is not None:
        return kernel
    for tool in ("apt-get", "apt-cache", "dpkg-deb", "depmod"):
        if shutil.which(tool) is None:
            raise KernelUnavailable(f"{tool} is not installed (depmod: Debian package kmod)")
    package = _kernel_package()
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="download-", dir=CACHE) as scratch:
        work = Path(scratch)
        os.chmod(work, 0o755)  # apt drops to the _apt user for downloads where it can
        download = _run(["apt-get", "download", package], cwd=work)
        debs = list(work.glob("*.deb"))
        if download.returncode != 0 or not debs:
            raise KernelUnavailable(f"apt-get download {package} failed: {download.stderr.strip()[-500:]}")
        version = _run(["dpkg-deb", "--field", str(debs[0]), "Version"]).stdout.strip()
        tree = work / "tree"
        unpack = _run(["dpkg-deb", "-x", str(debs[0]), str(tree)])
        if unpack.returncode != 0:
            raise KernelUnavailable(f"dpkg-deb -x {debs[0].name} failed: {unpack.stderr.strip()}")
        releases = [p.name for p in (tree / "lib" / "modules").iterdir()]
        if len(releases) != 1:
            raise KernelUnavailable(f"{debs[0].name} holds modules for {releases}, expected one release")
        release = releases[0]
        modules_dir = tree / "lib" / "modules" / release
        # The package ships no modules.dep (the postinst runs depmod); write it for the unpacked tree.
        depmod = _run(["depmod", "-b", str(tree), release])
        if depmod.returncode != 0:
            raise KernelUnavailable(f"depmod -b failed: {depmod.stderr.strip()}")
        order = module_closure(modules_dir / "modules.dep", GUEST_MODULES)

        staged = work / "kernel"
        (staged / "modules").mkdir(parents=True)
        shutil.copy(tree / "boot" / f"vmlinuz-{release}", staged / "vmlinuz")
        for module in order:
            shutil.copy(modules_dir / module, staged / "modules" / Path(module).name)
        (staged / "load-order").write_text("\n".join(order) + "\n")
        (staged / "package").write_text(f"{package} {version}\n")
        try:
            staged.rename(CACHE / f"kernel-{release}")  # atomic: a cache entry is complete or absent
        except OSError:
            if _cached() is None:  # not lost to a concurrent fetch of the same kernel
                raise
    kernel = _cached()
    assert kernel is not None
    return kernel
