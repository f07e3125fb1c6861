"""Who reads a generation: /proc (every read of it), virtiofsd processes, microvm.nix's declared shares."""
