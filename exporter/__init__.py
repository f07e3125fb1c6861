"""sops-nix-exporter: how many sops-nix secret generations a host holds, and which one each VM serves."""

__version__ = "0.1.0"
