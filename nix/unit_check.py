"""The [Service] settings of the exporter's units, as documented and as Nix sets them, compared.

    python3 nix/unit_check.py RENDERED.service docs/deployment.md [NAME.service]

exits 1 and prints the difference when the unit NixOS rendered from the module (flake check
`unit-matches-docs`) does not carry exactly the [Service] settings of the unit the document shows as
/etc/systemd/system/NAME.service (by default sops-nix-exporter.service).
tests/test_nix.py uses the same functions on the values service.nix evaluates to.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

# Set per host (the command line) or by NixOS itself (Environment="PATH=...", locale and time zone data):
# not part of the sandbox, and different on every host.
NOT_COMPARED = {"ExecStart", "Environment"}

_INI_BLOCK = re.compile(r"^```ini\n(.*?)^```", re.M | re.S)
_UNIT_PATH = re.compile(r"/etc/systemd/system/([A-Za-z0-9@._-]+)")
EXPORTER_UNIT = "sops-nix-exporter.service"


def parse_unit(text: str) -> dict[str, list[tuple[str, str]]]:
    """Sections of a unit file, each a list of (key, value) in order; repeated keys stay repeated."""
    sections: dict[str, list[tuple[str, str]]] = {}
    current = None
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], [])
            continue
        if current is None or "=" not in line:
            raise ValueError(f"not a unit file line: {raw!r}")
        key, value = line.split("=", 1)
        current.append((key.strip(), value.strip()))
    return sections


def documented_units(markdown: str) -> dict[str, str]:
    """Every ```ini block of the document, by the /etc/systemd/system/ file the text before it names last."""
    units: dict[str, str] = {}
    previous_end = 0
    for block in _INI_BLOCK.finditer(markdown):
        named = _UNIT_PATH.findall(markdown, previous_end, block.start())
        if named:
            if named[-1] in units:
                raise ValueError(f"{named[-1]} is documented twice")
            units[named[-1]] = block.group(1)
        previous_end = block.end()
    return units


def documented_unit(markdown: str, name: str = EXPORTER_UNIT) -> str:
    """The ```ini block the document introduces as /etc/systemd/system/NAME."""
    units = documented_units(markdown)
    if name not in units:
        raise ValueError(f"no ```ini block after a mention of /etc/systemd/system/{name}; found {sorted(units)}")
    return units[name]


def render_value(value) -> list[str]:
    """A serviceConfig value as NixOS writes it: a list becomes repeated lines, booleans true/false."""
    values = value if isinstance(value, list) else [value]
    return ["true" if v is True else "false" if v is False else str(v) for v in values]


def render_service(service_config: dict) -> list[tuple[str, str]]:
    return [(key, line) for key, value in service_config.items() for line in render_value(value)]


def compared(settings: list[tuple[str, str]]) -> set[tuple[str, str]]:
    return {(key, value) for key, value in settings if key not in NOT_COMPARED}


def difference(documented: list[tuple[str, str]], nix: list[tuple[str, str]]) -> list[str]:
    """Lines only one side has; empty when both set the same settings."""
    doc, rendered = compared(documented), compared(nix)
    return [f"only documented: {k}={v}" for k, v in sorted(doc - rendered)] + [
        f"only set by Nix: {k}={v}" for k, v in sorted(rendered - doc)
    ]


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        sys.stderr.write(__doc__)
        return 2
    name = argv[2] if len(argv) == 3 else EXPORTER_UNIT
    rendered = parse_unit(Path(argv[0]).read_text()).get("Service", [])
    documented = parse_unit(documented_unit(Path(argv[1]).read_text(), name)).get("Service", [])
    problems = difference(documented, rendered)
    for problem in problems:
        print(problem)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
