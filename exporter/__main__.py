import sys

from sops_nix_exporter.cli import main

sys.exit(main())
