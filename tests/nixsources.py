"""Test support: the Nix sources that evaluate nix/module.nix in the real module system.

nixpkgs' lib/, sops-nix and microvm.nix, each from its environment variable when that is set (on a NixOS
machine, point SOPSNIX_NIXPKGS_LIB at a nixpkgs checkout), else from `shared/nix-sources/` beside the
checkout, whose README names the commits. CI runs in a fresh clone with a copy of `shared/` beside it, so
the folder is found from this checkout, never from a fixed path. Nothing is fetched.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_SOURCES = ROOT.parent / "shared" / "nix-sources"


@dataclass(frozen=True)
class NixSource:
    variable: str
    shared: str  # its folder below SHARED_SOURCES
    marker: str  # a file every copy of it has, relative to the folder
    what: str


SOURCES = {
    "lib": NixSource("SOPSNIX_NIXPKGS_LIB", "nixpkgs-lib/lib", "default.nix", "nixpkgs' lib/"),
    "sops-nix": NixSource("SOPSNIX_SOPS_NIX", "sops-nix", "modules/sops/default.nix", "sops-nix"),
    "microvm": NixSource("SOPSNIX_MICROVM_NIX", "microvm.nix", "nixos-modules/host/default.nix", "microvm.nix"),
}


class NixSourceMissing(Exception):
    """The source is neither named by its variable nor beside the checkout; the message says how to give it."""


def nix_source(name: str) -> Path:
    """The folder of one source: `lib` (nixpkgs' lib/), `sops-nix` or `microvm`."""
    source = SOURCES[name]
    given = os.environ.get(source.variable)
    if given:
        path = Path(given)
        # nixpkgs itself, or the nixpkgs.lib mirror, holds lib/ one level down.
        if name == "lib" and (path / "lib" / source.marker).is_file():
            path = path / "lib"
        if not (path / source.marker).is_file():
            raise NixSourceMissing(f"{source.variable}={given} holds no {source.what} (no {source.marker} there)")
        return path
    path = SHARED_SOURCES / source.shared
    if not (path / source.marker).is_file():
        raise NixSourceMissing(
            f"{source.what} not found: set {source.variable}, or put it in {path} "
            "(shared/nix-sources/ beside the checkout)"
        )
    return path
