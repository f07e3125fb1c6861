"""The Nix packaging and the systemd unit, checked as far as a machine without nixpkgs can.

Debian's nix-bin parses every .nix file and evaluates the parts written with builtins alone: the unit's
settings and the command line (nix/service.nix), the configuration document (nix/settings.nix) and what
the Nix files take from the repository (nix/repo.nix). Their results go through the exporter's own
validator and argument parser, and the documented unit is compared with the settings Nix sets. Debian's
systemd verifies and rates that unit, then boots in a container and runs it as written against a real
store and real pinning processes; strace shows the real exporter staying inside its system-call filter.
nix/module.nix is evaluated by nixpkgs' real lib.evalModules beside the real sops-nix and microvm.nix host
modules (tests/nixsources.py finds them). The module in a whole NixOS system, the package build and the
NixOS VM test need nixpkgs itself: `nix flake check` runs them where it can be fetched (docs/deployment.md,
"What is checked, and where").
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

from sops_nix_exporter import __version__
from sops_nix_exporter.stores.cache import PARALLEL_FROM
from sops_nix_exporter.cli import parse_args
from sops_nix_exporter.config import DEFAULT_FINGERPRINT_DIR, ConfigError, parse_config
from sops_nix_exporter.http.server import parse_listen_address

from nixsources import NixSourceMissing, nix_source
from pinning import make_unit_cgroup, remove_cgroup
from scrape import samples, value
from serving import free_port, write_config
from sopsnix import SAMPLE_SECRETS
from tools import require_tool

ROOT = Path(__file__).resolve().parent.parent
NIX = ROOT / "nix"
DEPLOYMENT = ROOT / "docs" / "deployment.md"

sys.path.insert(0, str(NIX))
import unit_check  # noqa: E402

NIX_FILES = sorted([ROOT / "flake.nix", *NIX.glob("*.nix")])
THE_CAPABILITIES = {"CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"}
FINGERPRINT_CAPABILITIES = {"CAP_DAC_READ_SEARCH", "CAP_CHOWN"}
FINGERPRINT_UNIT = "sops-nix-exporter-fingerprint.service"
DOCUMENTED_EXECUTABLE = "/opt/sops-nix-exporter/bin/sops-nix-exporter"
PRUNE_CAPABILITIES = {"CAP_DAC_READ_SEARCH", "CAP_SYS_PTRACE"}
PRUNE_UNIT = "sops-nix-exporter-prune.service"
DOCUMENTED_STORES = ["/run/secrets.d", "/run/secrets-for-users.d"]


# Paths are computed, never added: no Nix store or daemon is needed, and none is touched (any user can run this).
NO_STORE = ("--store", "dummy://")


def nix_eval(expression: str):
    """Strict evaluation with builtins only: no nixpkgs, no channel, no Nix store."""
    nix_instantiate = require_tool("nix-instantiate", "nix-bin")
    result = subprocess.run(
        [nix_instantiate, *NO_STORE, "--eval", "--strict", "--json", "-E", expression],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "NIX_PATH": ""},
    )  # fmt: skip
    assert result.returncode == 0, f"nix-instantiate --eval failed:\n{result.stderr}"
    return json.loads(result.stdout)


def nix_string(value: str) -> str:
    """A Nix string literal that reads back as exactly `value`."""
    for plain, escaped in (("\\", "\\\\"), ('"', '\\"'), ("${", "\\${"), ("\n", "\\n"), ("\r", "\\r"), ("\t", "\\t")):
        value = value.replace(plain, escaped)
    return f'"{value}"'


def nix_value(value) -> str:
    """A Python value written as a Nix expression (JSON is close enough: builtins.fromJSON reads it)."""
    return f"(builtins.fromJSON {nix_string(json.dumps(value))})"


def unit_values() -> dict:
    return nix_eval("let unit = import ./nix/service.nix; in { inherit (unit) capabilities user serviceConfig; }")


def fingerprint_values(fingerprint_dir: str = DEFAULT_FINGERPRINT_DIR) -> dict:
    """The fingerprint oneshot's settings, its capabilities and its directory, for that fingerprint_dir."""
    return nix_eval(
        f"""let unit = import ./nix/service.nix; in {{
              inherit (unit) fingerprintCapabilities fingerprintUnit;
              serviceConfig = unit.fingerprintServiceConfig {nix_string(fingerprint_dir)};
              directory = unit.fingerprintDirectory {nix_string(fingerprint_dir)};
              path = unit.fingerprintPath {{ symlinks = [ "/run/secrets" "/run/secrets-for-users" ]; }}; }}"""
    )  # fmt: skip


def prune_values(mountpoints: list[str] = DOCUMENTED_STORES) -> dict:
    """The prune oneshot's settings for those stores, its capabilities, its lock directory and its timer."""
    return nix_eval(
        f"""let unit = import ./nix/service.nix; in {{
              inherit (unit) pruneCapabilities pruneUnit pruneLockDirectory pruneTimer;
              serviceConfig = unit.pruneServiceConfig {nix_value(mountpoints)}; }}"""
    )  # fmt: skip


# --- every file parses ------------------------------------------------------------------------------


def test_the_nix_files_are_all_there():
    names = {path.relative_to(ROOT).as_posix() for path in NIX_FILES}
    assert {"flake.nix", "nix/module.nix", "nix/package.nix", "nix/service.nix", "nix/settings.nix",
            "nix/repo.nix", "nix/nixos-test.nix"} <= names  # fmt: skip


@pytest.mark.parametrize("path", NIX_FILES, ids=[p.relative_to(ROOT).as_posix() for p in NIX_FILES])
def test_nix_file_parses(path):
    nix_instantiate = require_tool("nix-instantiate", "nix-bin")
    result = subprocess.run(
        [nix_instantiate, *NO_STORE, "--parse", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, f"{path.name} does not parse:\n{result.stderr}"


# --- the unit: one set of settings, documented and set -------------------------------------------------


def test_the_capabilities_are_named_once_and_are_the_two_the_exporter_needs():
    unit = unit_values()
    assert set(unit["capabilities"]) == THE_CAPABILITIES
    service = unit["serviceConfig"]
    assert service["AmbientCapabilities"].split() == unit["capabilities"]
    assert service["CapabilityBoundingSet"].split() == unit["capabilities"]


def test_documented_unit_sets_exactly_what_the_module_sets():
    documented = unit_check.parse_unit(unit_check.documented_unit(DEPLOYMENT.read_text()))["Service"]
    rendered = unit_check.render_service(unit_values()["serviceConfig"])
    assert unit_check.difference(documented, rendered) == []
    # Nothing may be documented twice with different values (a repeated key accumulates in systemd).
    assert len(documented) - sum(1 for key, _ in documented if key in unit_check.NOT_COMPARED) == len(rendered)


def test_the_fingerprint_capabilities_are_named_once_and_bound_the_oneshot():
    values = fingerprint_values()
    assert set(values["fingerprintCapabilities"]) == FINGERPRINT_CAPABILITIES
    service = values["serviceConfig"]
    assert service["CapabilityBoundingSet"].split() == values["fingerprintCapabilities"]
    assert "AmbientCapabilities" not in service and "User" not in service  # root, bounded to the two
    assert service["PrivateNetwork"] is True and service["Type"] == "oneshot"
    assert service["ProtectSystem"] == "strict" and service["ReadWritePaths"] == DEFAULT_FINGERPRINT_DIR
    assert values["fingerprintUnit"] + ".service" == FINGERPRINT_UNIT


def test_documented_fingerprint_unit_sets_exactly_what_service_nix_sets():
    documented = unit_check.parse_unit(unit_check.documented_unit(DEPLOYMENT.read_text(), FINGERPRINT_UNIT))
    rendered = unit_check.render_service(fingerprint_values()["serviceConfig"])
    assert unit_check.difference(documented["Service"], rendered) == []
    assert len(documented["Service"]) - sum(1 for k, _ in documented["Service"] if k in unit_check.NOT_COMPARED) == len(
        rendered
    )
    argv = dict(documented["Service"])["ExecStart"].split()
    args = parse_args(argv[1:])
    assert (argv[0], args.command, args.config_file) == (
        DOCUMENTED_EXECUTABLE, "fingerprint", "/etc/sops-nix-exporter/config.yml")  # fmt: skip
    # The same configuration file as the documented exporter's unit.
    exporter = dict(unit_check.parse_unit(unit_check.documented_unit(DEPLOYMENT.read_text()))["Service"])
    assert parse_args(exporter["ExecStart"].split()[1:]).config_file == args.config_file
    assert dict(documented["Install"]) == {"WantedBy": "multi-user.target"}
    assert "Before" not in dict(documented["Unit"]) and "RequiredBy" not in dict(documented["Install"])


def test_documented_path_unit_and_directory_are_service_nix_s():
    values = fingerprint_values()
    units = unit_check.documented_units(DEPLOYMENT.read_text())
    path = unit_check.parse_unit(units["sops-nix-exporter-fingerprint.path"])
    rendered = unit_check.render_service(values["path"]["pathConfig"])
    assert sorted(path["Path"]) == sorted(rendered)
    assert dict(path["Unit"])["Description"] == values["path"]["description"]
    assert dict(path["Install"]) == {"WantedBy": "multi-user.target"}
    directory = values["directory"]
    line = " ".join([directory["type"], directory["path"], directory["mode"], directory["user"], directory["group"], "-"])
    assert f"\n{line}\n" in DEPLOYMENT.read_text()
    assert directory == {"type": "d", "path": DEFAULT_FINGERPRINT_DIR, "mode": "0750", "user": "root",
                         "group": unit_values()["user"]}  # fmt: skip


def test_documented_fingerprint_directory_is_made_by_systemd_tmpfiles(scratch):
    """systemd-tmpfiles makes the documented line's directory, parents included, as the exporter needs it."""
    tmpfiles = require_tool("systemd-tmpfiles", "systemd")
    directory = fingerprint_values()["directory"]
    root = scratch / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0::/root:/bin/sh\n")
    (root / "etc" / "group").write_text(f"root:x:0:\n{directory['group']}:x:64999:\n")
    conf = scratch / "sops-nix-exporter.conf"
    conf.write_text(" ".join([directory["type"], directory["path"], directory["mode"], directory["user"],
                              directory["group"], "-"]) + "\n")  # fmt: skip
    made = subprocess.run([tmpfiles, f"--root={root}", "--create", str(conf)], capture_output=True, text=True)
    if made.returncode != 0 and os.geteuid() != 0:
        pytest.skip(f"systemd-tmpfiles cannot give a file to another user without root: {made.stderr.strip()}")
    assert made.returncode == 0, made.stderr
    made_dir = root / directory["path"].lstrip("/")
    st = made_dir.stat()
    assert (oct(st.st_mode & 0o7777), st.st_uid, st.st_gid) == ("0o750", 0, 64999)
    assert made_dir.parent.stat().st_mode & 0o005 == 0o005  # the exporter can walk to it


def test_module_takes_every_service_setting_from_service_nix():
    """The tests above speak for the module only if it adds no systemd setting of its own."""
    module = (NIX / "module.nix").read_text()
    assert "import ./service.nix" in module
    assert "systemd.services.sops-nix-exporter = unit.service {" in module
    assert "unit.fingerprintService {" in module and "unit.fingerprintPath {" in module
    assert "unit.pruneService {" in module and "unit.pruneTimer" in module
    assert not {"serviceConfig", "pathConfig", "timerConfig"} & set(re.findall(r"[a-zA-Z]+Config", module))


def test_module_declares_the_options_of_the_issue():
    module = (NIX / "module.nix").read_text()
    declared = set(re.findall(r"^    ([A-Za-z.]+) = (?:mkOption|lib\.mkEnableOption)", module, re.M))
    assert declared == {
        "enable", "package", "port", "listenAddress", "openFirewall", "settings", "memoryBudget",
        "microvmStateDir", "webConfigFile", "extraFlags", "dashboards", "ruleFiles", "fingerprints.enable",
        "prune.enable",
    }  # fmt: skip


def test_hardening_hides_nothing_the_exporter_reads():
    service = unit_values()["serviceConfig"]
    # Each of these would hide virtiofsd processes, /proc/meminfo, the stores or the host's identities.
    left_out = (
        "ProtectProc", "ProcSubset", "PrivateUsers", "PrivateNetwork", "DynamicUser", "RootDirectory",
        "InaccessiblePaths", "TemporaryFileSystem", "BindPaths", "BindReadOnlyPaths", "IPAddressDeny",
    )  # fmt: skip
    for key in left_out:
        assert key not in service, f"{key} is set: see docs/deployment.md, 'Settings left out on purpose'"
    assert service["ProtectSystem"] == "strict"  # read-only, /run included, nothing hidden
    assert "AF_UNIX" in service["RestrictAddressFamilies"].split()


def test_documented_unit_passes_systemd_analyze(scratch):
    systemd_analyze = require_tool("systemd-analyze", "systemd")
    executable = Path(sys.executable).parent / "sops-nix-exporter"
    if not executable.exists():
        pytest.skip(f"{executable} missing: install the package into the venv (pip install -e .)")
    text = unit_check.documented_unit(DEPLOYMENT.read_text())
    text = text.replace("/opt/sops-nix-exporter/bin/sops-nix-exporter", str(executable))
    unit = scratch / "sops-nix-exporter.service"
    unit.write_text(text)

    verify = subprocess.run([systemd_analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and unit.name not in verify.stderr, verify.stderr

    # systemd's exposure score, 0 (sealed) to 10 (exposed); --threshold is in tenths.
    security = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--threshold=25", "--no-pager", str(unit)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert security.returncode == 0, f"exposure above 2.5:\n{security.stdout}{security.stderr}"


def test_documented_fingerprint_units_pass_systemd_analyze(scratch):
    systemd_analyze = require_tool("systemd-analyze", "systemd")
    executable = Path(sys.executable).parent / "sops-nix-exporter"
    if not executable.exists():
        pytest.skip(f"{executable} missing: install the package into the venv (pip install -e .)")
    units = unit_check.documented_units(DEPLOYMENT.read_text())
    paths = []
    for name in (FINGERPRINT_UNIT, "sops-nix-exporter-fingerprint.path"):
        paths.append(scratch / name)
        paths[-1].write_text(units[name].replace(DOCUMENTED_EXECUTABLE, str(executable)))
    verify = subprocess.run([systemd_analyze, "verify", "--man=no", *map(str, paths)], capture_output=True, text=True)
    assert verify.returncode == 0 and not any(p.name in verify.stderr for p in paths), verify.stderr

    # Root with two capabilities scores higher than the exporter's own user would; no network, no writes.
    security = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(paths[0])],
        capture_output=True, text=True,
    )  # fmt: skip
    assert security.returncode == 0, f"exposure above 2.0:\n{security.stdout}{security.stderr}"


def test_fingerprint_command_needs_exactly_its_capabilities(require_root, scratch):
    """The real command, as root bounded to the capabilities service.nix names (and no group but root's),
    fingerprints secrets of another user's, mode 0400 in 0700 directories, into a directory of the exporter's
    group; without CAP_CHOWN it cannot hand the files to that group, without CAP_DAC_READ_SEARCH it cannot
    read the secrets."""
    setpriv = require_tool("setpriv", "util-linux")
    executable = Path(sys.executable).parent / "sops-nix-exporter"
    if not executable.exists():
        pytest.skip(f"{executable} missing: install the package into the venv (pip install -e .)")
    capabilities = fingerprint_values()["fingerprintCapabilities"]
    store, symlink = scratch / "secrets.d", scratch / "secrets"
    for number, value in ((1, b"one"), (2, b"two")):
        generation = store / str(number)
        (generation / "sub").mkdir(parents=True)
        for name in ("db", "sub/pw"):
            (generation / name).write_bytes(value)
            os.chmod(generation / name, 0o400)
        for path in (generation / "db", generation / "sub" / "pw", generation / "sub", generation):
            os.chown(path, 65534, 65534)
        os.chmod(generation / "sub", 0o700)
        os.chmod(generation, 0o700)
    symlink.symlink_to(store / "2")
    group = 65533  # a group root is not in: setpriv --clear-groups drops the rest
    config = scratch / "config.yml"

    def run(*bounding: str) -> tuple[subprocess.CompletedProcess, Path]:
        fingerprints = scratch / f"fingerprints-{len(list(scratch.glob('fingerprints-*')))}"
        fingerprints.mkdir(mode=0o750)
        os.chown(fingerprints, 0, group)
        config.write_text(json.dumps({"stores": [{"mountpoint": str(store), "symlink": str(symlink)}],
                                      "fingerprint_dir": str(fingerprints)}))  # fmt: skip
        caps = ",".join(["-all", *(f"+{name.removeprefix('CAP_').lower()}" for name in bounding)])
        result = subprocess.run(
            [setpriv, f"--bounding-set={caps}", "--inh-caps=-all", "--clear-groups", "--no-new-privs",
             str(executable), "fingerprint", f"--config.file={config}"],
            capture_output=True, text=True, timeout=60, preexec_fn=lambda: os.umask(0o027),
        )  # fmt: skip
        return result, fingerprints

    result, fingerprints = run(*capabilities)
    assert result.returncode == 0, result.stderr
    written = sorted(p for p in fingerprints.rglob("*.json"))
    assert len(written) == 3, written  # two generations and the status
    for path in written:
        st = path.stat()
        assert (st.st_uid, st.st_gid, oct(st.st_mode & 0o777)) == (0, group, "0o640"), path
    key = (fingerprints / "key").stat()
    assert (key.st_uid, oct(key.st_mode & 0o777)) == (0, "0o600")

    for missing in capabilities:
        result, _ = run(*(c for c in capabilities if c != missing))
        assert result.returncode != 0, f"fingerprinted without {missing}: {result.stderr}"


def test_the_prune_capabilities_are_named_once_and_bound_the_oneshot():
    values = prune_values()
    assert set(values["pruneCapabilities"]) == PRUNE_CAPABILITIES
    service = values["serviceConfig"]
    assert service["CapabilityBoundingSet"].split() == values["pruneCapabilities"]
    assert "AmbientCapabilities" not in service and "User" not in service  # root, bounded to the one
    assert service["PrivateNetwork"] is True and service["Type"] == "oneshot"
    assert "ProtectProc" not in service  # a process it cannot see is a reader it would miss
    # Writable: each store (skipped when absent) and the lock's directory, nothing else.
    lock_dir = os.path.dirname(parse_args(["prune"]).lock_file)
    assert service["ProtectSystem"] == "strict"
    assert service["ReadWritePaths"] == [f"-{m}" for m in DOCUMENTED_STORES] + [lock_dir]
    assert values["pruneLockDirectory"] == {"type": "d", "path": lock_dir, "mode": "0755", "user": "root",
                                            "group": "root"}  # fmt: skip
    assert values["pruneUnit"] + ".service" == PRUNE_UNIT
    assert values["pruneTimer"]["timerConfig"] == {"OnCalendar": "hourly", "Unit": PRUNE_UNIT}
    assert values["pruneTimer"]["wantedBy"] == ["timers.target"]


def test_documented_prune_units_are_service_nix_s():
    units = unit_check.documented_units(DEPLOYMENT.read_text())
    documented = unit_check.parse_unit(units[PRUNE_UNIT])
    values = prune_values()
    rendered = unit_check.render_service(values["serviceConfig"])
    assert unit_check.difference(documented["Service"], rendered) == []
    assert len(documented["Service"]) - sum(1 for k, _ in documented["Service"] if k in unit_check.NOT_COMPARED) == len(
        rendered
    )
    argv = dict(documented["Service"])["ExecStart"].split()
    args = parse_args(argv[1:])
    assert (argv[0], args.command, args.apply, args.config_file) == (
        DOCUMENTED_EXECUTABLE, "prune", True, "/etc/sops-nix-exporter/config.yml")  # fmt: skip
    exporter = dict(unit_check.parse_unit(unit_check.documented_unit(DEPLOYMENT.read_text()))["Service"])
    assert parse_args(exporter["ExecStart"].split()[1:]).config_file == args.config_file
    # Started with the fingerprint oneshot, after it; nothing an activation waits for wants it.
    assert dict(documented["Install"]) == {"WantedBy": FINGERPRINT_UNIT}
    assert FINGERPRINT_UNIT in dict(documented["Unit"])["After"].split()
    assert "Before" not in dict(documented["Unit"]) and "RequiredBy" not in dict(documented["Install"])
    timer = unit_check.parse_unit(units["sops-nix-exporter-prune.timer"])
    assert sorted(timer["Timer"]) == sorted(unit_check.render_service(values["pruneTimer"]["timerConfig"]))
    assert dict(timer["Unit"])["Description"] == values["pruneTimer"]["description"]
    assert dict(timer["Install"]) == {"WantedBy": "timers.target"}
    directory = values["pruneLockDirectory"]
    line = " ".join([directory["type"], directory["path"], directory["mode"], directory["user"], directory["group"], "-"])
    assert f"\n{line}\n" in DEPLOYMENT.read_text()


def test_documented_prune_units_pass_systemd_analyze(scratch):
    systemd_analyze = require_tool("systemd-analyze", "systemd")
    executable = Path(sys.executable).parent / "sops-nix-exporter"
    if not executable.exists():
        pytest.skip(f"{executable} missing: install the package into the venv (pip install -e .)")
    units = unit_check.documented_units(DEPLOYMENT.read_text())
    paths = []
    for name in (PRUNE_UNIT, "sops-nix-exporter-prune.timer", FINGERPRINT_UNIT):
        paths.append(scratch / name)
        paths[-1].write_text(units[name].replace(DOCUMENTED_EXECUTABLE, str(executable)))
    verify = subprocess.run([systemd_analyze, "verify", "--man=no", *map(str, paths)], capture_output=True, text=True)
    assert verify.returncode == 0 and not any(p.name in verify.stderr for p in paths), verify.stderr
    security = subprocess.run(
        [systemd_analyze, "security", "--offline=true", "--threshold=20", "--no-pager", str(paths[0])],
        capture_output=True, text=True,
    )  # fmt: skip
    print(security.stdout.splitlines()[-1] if security.stdout else security.stderr)
    assert security.returncode == 0, f"exposure above 2.0:\n{security.stdout}{security.stderr}"


def test_prune_command_needs_exactly_its_capabilities(require_root, scratch):
    """The real command, as root bounded to the capabilities service.nix names (and no group but root's), on a
    store laid out as sops-nix lays it out (root:keys 0751 directories, another user's files, mode 0400): it
    removes the free generations and keeps the one another user's process works in. Without either capability
    that process cannot be inspected, and the prune, failing closed, removes nothing."""
    setpriv = require_tool("setpriv", "util-linux")
    executable = Path(sys.executable).parent / "sops-nix-exporter"
    if not executable.exists():
        pytest.skip(f"{executable} missing: install the package into the venv (pip install -e .)")
    capabilities = prune_values()["pruneCapabilities"]
    keys, service_user = 65532, 65534

    def run(*bounding: str) -> tuple[subprocess.CompletedProcess, list[str]]:
        base = scratch / f"run-{len(list(scratch.glob('run-*')))}"
        store, symlink = base / "secrets.d", base / "secrets"
        store.mkdir(parents=True)
        for directory_path in (store, *(store / str(n) for n in (1, 2, 3, 4))):
            directory_path.mkdir(exist_ok=True)
            (directory_path / "sub").mkdir() if directory_path != store else None
            for path in (directory_path, directory_path / "sub") if directory_path != store else (directory_path,):
                os.chown(path, 0, keys)
                os.chmod(path, 0o751)
            if directory_path != store:
                for name in ("db", "sub/pw"):
                    (directory_path / name).write_bytes(b"value")
                    os.chown(directory_path / name, service_user, service_user)
                    os.chmod(directory_path / name, 0o400)
        symlink.symlink_to(store / "4")
        os.utime(symlink, (0, 0), follow_symlinks=False)  # replaced long ago: 3 is not "just replaced"
        config = base / "config.yml"
        config.write_text(json.dumps({"stores": [{"mountpoint": str(store), "symlink": str(symlink)}],
                                      "microvm": {"state_dir": str(base / "microvms")}}))  # fmt: skip
        holder = subprocess.Popen(
            [setpriv, f"--reuid={service_user}", f"--regid={service_user}", "--clear-groups", "sleep", "60"],
            cwd=store / "2",
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 10
            while os.readlink(f"/proc/{holder.pid}/exe").endswith("setpriv"):
                assert time.monotonic() < deadline, "the holder did not start"
                time.sleep(0.05)
            caps = ",".join(["-all", *(f"+{name.removeprefix('CAP_').lower()}" for name in bounding)])
            result = subprocess.run(
                [setpriv, f"--bounding-set={caps}", "--inh-caps=-all", "--clear-groups", "--no-new-privs",
                 str(executable), "prune", "--apply", f"--config.file={config}", f"--lock-file={base / 'lock'}"],
                capture_output=True, text=True, timeout=120, preexec_fn=lambda: os.umask(0o077),
            )  # fmt: skip
        finally:
            holder.kill()
            holder.wait()
        return result, sorted(p.name for p in store.iterdir())

    result, left = run(*capabilities)
    assert result.returncode == 0, result.stdout + result.stderr
    assert left == ["2", "4"], result.stdout  # held by the other user's process, and current
    assert "keep 2: sleep" in result.stdout, result.stdout

    for missing in capabilities:
        result, left = run(*(c for c in capabilities if c != missing))
        # Without either the holder cannot be inspected: the prune removes nothing, says why, and exits 1.
        assert result.returncode == 1, f"{missing} not needed: {result.stdout}"
        assert left == ["1", "2", "3", "4"], result.stdout
        assert "could not be inspected" in result.stdout, result.stdout


def test_nix_rendered_command_line_is_read_by_systemd(scratch):
    """ExecStart as service.nix writes it (quoted, % and $ doubled) names the executable systemd runs."""
    systemd_analyze = require_tool("systemd-analyze", "systemd")
    executable = Path(sys.executable).parent / "sops-nix-exporter"
    if not executable.exists():
        pytest.skip(f"{executable} missing: install the package into the venv (pip install -e .)")
    service = nix_eval(
        f"""let unit = import ./nix/service.nix; in unit.service {{
              command = unit.command {{ executable = {nix_string(str(executable))};
                configFile = "/etc/sops nix exporter/100% $HOME.yml"; listenAddress = unit.listenAddress "::1" 9785; }};
              after = [ "sops-install-secrets.service" ]; }}"""
    )  # fmt: skip
    assert service["wants"] == ["sops-install-secrets.service"]
    assert "sops-install-secrets.service" in service["after"]
    lines = [f"Description={service['description']}", "", "[Service]"]
    lines += [f"{key}={value}" for key, value in unit_check.render_service(service["serviceConfig"])]
    unit = scratch / "sops-nix-exporter.service"
    unit.write_text("[Unit]\n" + "\n".join(lines) + "\n")
    verify = subprocess.run([systemd_analyze, "verify", "--man=no", str(unit)], capture_output=True, text=True)
    assert verify.returncode == 0 and unit.name not in verify.stderr, verify.stderr


# --- the command line and the configuration document, as the exporter reads them -------------------------


@pytest.mark.parametrize(
    "host,port,expected",
    [("", 9785, ("", 9785)), ("127.0.0.1", 9100, ("127.0.0.1", 9100)), ("::1", 9785, ("::1", 9785)),
     ("[::]", 1, ("::", 1)), ("localhost", 9785, ("localhost", 9785))],
)  # fmt: skip
def test_command_line_is_what_the_exporter_parses(host, port, expected):
    argv = nix_eval(
        f"""let unit = import ./nix/service.nix; in unit.command {{
              executable = "/nix/store/x/bin/sops-nix-exporter"; configFile = "/nix/store/y-sops-nix-exporter.yml";
              listenAddress = unit.listenAddress {nix_string(host)} {port};
              extraFlags = [ "--log.level=debug" "--log.format=json" ]; }}"""
    )  # fmt: skip
    assert argv[0] == "/nix/store/x/bin/sops-nix-exporter"
    args = parse_args(argv[1:])
    assert args.command == "serve"
    assert args.config_file == "/nix/store/y-sops-nix-exporter.yml"
    assert (args.log_level, args.log_format) == ("debug", "json")
    assert parse_listen_address(args.listen_address) == expected


def test_web_config_file_flag_is_what_the_exporter_parses():
    argv = nix_eval(
        """let unit = import ./nix/service.nix; in unit.command {
             executable = "/bin/sops-nix-exporter"; configFile = "/etc/c.yml"; listenAddress = ":9785";
             webConfigFile = "/run/secrets/sops-nix-exporter/web.yml"; }"""
    )
    assert "--web.config.file=/run/secrets/sops-nix-exporter/web.yml" in argv
    try:
        args = parse_args(argv[1:])
    except SystemExit:
        pytest.skip("the exporter has no --web.config.file yet (issue 8)")
    assert "/run/secrets/sops-nix-exporter/web.yml" in vars(args).values()


SOPS_CASES = {
    # config.sops as sops-nix's module declares it: keepGenerations, and secrets with neededForUsers.
    "without sops-nix": (None, {"/run/secrets.d": None, "/run/secrets-for-users.d": None}),
    "sops-nix, regular secrets": (
        {"keepGenerations": 1, "secrets": {"db": {"neededForUsers": False}, "api": {"neededForUsers": False}}},
        {"/run/secrets.d": 1},
    ),
    "sops-nix, a secret for users": (
        {"keepGenerations": 0, "secrets": {"db": {"neededForUsers": False}, "pw": {"neededForUsers": True}}},
        {"/run/secrets.d": 0, "/run/secrets-for-users.d": 0},
    ),
    "sops-nix, no secret yet": ({"keepGenerations": 3, "secrets": {}}, {"/run/secrets.d": 3}),
}


@pytest.mark.parametrize("case", list(SOPS_CASES))
def test_default_stores_are_those_sops_nix_manages(case):
    sops, expected = SOPS_CASES[case]
    stores = nix_eval(f"(import ./nix/settings.nix).defaultStores {nix_value(sops)}")
    config = parse_config({"stores": stores}, source=case)
    assert {s.mountpoint: s.keep_generations for s in config.stores} == expected
    symlinks = {"/run/secrets.d": "/run/secrets", "/run/secrets-for-users.d": "/run/secrets-for-users"}
    assert all(s.symlink == symlinks[s.mountpoint] for s in config.stores)


def test_configuration_document_is_accepted_by_the_exporter():
    # The shape the module hands over: declared-but-unset options are null.
    settings = {
        "stores": [
            {"mountpoint": "/run/secrets.d", "symlink": "/run/secrets", "keep_generations": 1,
             "memory_budget_bytes": None},
            {"mountpoint": "/run/secrets-for-users.d", "symlink": "/run/secrets-for-users", "keep_generations": None,
             "memory_budget_bytes": 4096},
        ],
        "memory_budget_ratio": None,
        "microvm": {"state_dir": "/srv/microvms"},
        "fingerprint_dir": "/srv/fingerprints",
    }  # fmt: skip
    for memory_budget, budgets in [(None, [None, 4096]), (1 << 26, [1 << 26, 4096])]:
        document = nix_eval(
            f"(import ./nix/settings.nix).document {{ settings = {nix_value(settings)}; "
            f"memoryBudget = {nix_value(memory_budget)}; }}"
        )
        assert "memory_budget_ratio" not in document  # unset: the exporter's default applies
        config = parse_config(document, source="the module's document")
        assert [s.memory_budget_bytes for s in config.stores] == budgets
        assert [s.keep_generations for s in config.stores] == [1, None]
        assert config.microvm.state_dir == "/srv/microvms"
        assert config.fingerprint_dir == "/srv/fingerprints"


# --- the module under the real module system ---------------------------------------------------------------

# nixpkgs' lib/, sops-nix and microvm.nix come from their variables or from shared/nix-sources/ beside the
# checkout (tests/nixsources.py); without either, these tests skip with the reason.


def module_eval_expression(configuration: str, with_sources: tuple[str, ...] = (), attribute: str = "") -> str:
    """nix/module-eval.nix: the module in lib.evalModules; see that file for what is real there and what not."""
    try:
        paths = {name: nix_source(name) for name in ("lib", *with_sources)}
    except NixSourceMissing as exc:
        pytest.skip(str(exc))
    sources = "".join(f" {name} = {nix_string(str(paths[name]))};" for name in with_sources)
    return (f"(import ./nix/module-eval.nix {{ lib = import {nix_string(str(paths['lib']))};{sources} "
            f"configuration = {{ {configuration} }}; }}){attribute}")  # fmt: skip


def eval_module(configuration: str, with_sources: tuple[str, ...] = ()) -> dict:
    return nix_eval(module_eval_expression(configuration, with_sources))


def module_refused(configuration: str, with_sources: tuple[str, ...] = (), attribute: str = "") -> str:
    """The error of an evaluation that must fail."""
    result = subprocess.run(
        [require_tool("nix-instantiate", "nix-bin"), *NO_STORE, "--eval", "--strict", "--json", "-E",
         module_eval_expression(configuration, with_sources, attribute)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env={**os.environ, "NIX_PATH": ""},
    )  # fmt: skip
    assert result.returncode != 0, f"the evaluation succeeded:\n{result.stdout}"
    return result.stderr


BOTH_MODULES = ("sops-nix", "microvm")
# sops-nix refuses secrets without a key source (an assertion); the key is never read here.
SOPS_KEY = 'sops.age.keyFile = "/var/lib/sops-nix/key.txt";'


def exec_argv(exec_start: str) -> list[str]:
    """service.nix writes each word as a JSON string with % and $ doubled."""
    words = re.findall(r'"(?:[^"\\]|\\.)*"', exec_start)
    return [json.loads(word).replace("%%", "%").replace("$$", "$") for word in words]


def test_module_evaluates_alone_with_the_exporter_defaults():
    result = eval_module("services.sops-nix-exporter.enable = true;")
    service = result["service"]
    assert {k: v for k, v in service["serviceConfig"].items() if k != "ExecStart"} == unit_values()["serviceConfig"]
    assert service["after"] == ["network.target"] and service["wants"] == []
    assert result["users"]["sops-nix-exporter"]["isSystemUser"] is True
    assert result["groups"] == {"sops-nix-exporter": {}}
    assert result["firewall"] == []
    config = parse_config(result["document"], source="the module's document")
    assert [(s.mountpoint, s.keep_generations) for s in config.stores] == [
        ("/run/secrets.d", None), ("/run/secrets-for-users.d", None)]  # fmt: skip
    args = parse_args(exec_argv(service["serviceConfig"]["ExecStart"])[1:])
    assert parse_listen_address(args.listen_address) == ("", 9785)
    assert result["ruleFiles"] and all(path.endswith(".rules.yml") for path in result["ruleFiles"])


def test_module_disabled_sets_nothing():
    result = eval_module("")
    assert result["service"] is None and result["users"] == {} and result["firewall"] == []
    assert result["fingerprintService"] is None and result["fingerprintPath"] is None and result["tmpfiles"] is None
    assert result["pruneService"] is None and result["pruneTimer"] is None


def test_module_fingerprints_every_store_by_default():
    result = eval_module(
        "services.sops-nix-exporter = { enable = true; settings.stores = ["
        ' { mountpoint = "/srv/a.d"; symlink = "/srv/a"; } { mountpoint = "/srv/b.d"; symlink = "/srv/b"; } ]; };'
    )
    config = parse_config(result["document"], source="the module's document")
    assert config.fingerprint_dir == DEFAULT_FINGERPRINT_DIR
    fingerprint, path = result["fingerprintService"], result["fingerprintPath"]
    assert {k: v for k, v in fingerprint["serviceConfig"].items() if k != "ExecStart"} == fingerprint_values()[
        "serviceConfig"
    ]
    assert fingerprint["wantedBy"] == ["multi-user.target"]
    assert set(fingerprint) <= {"description", "wantedBy", "after", "wants", "serviceConfig"}  # no requiredBy, before
    assert path["pathConfig"] == {"PathChanged": ["/srv/a", "/srv/b"], "Unit": FINGERPRINT_UNIT}
    assert path["wantedBy"] == ["multi-user.target"]
    # Both run with the one configuration file, whose content is the document.
    argv = exec_argv(fingerprint["serviceConfig"]["ExecStart"])
    args = parse_args(argv[1:])
    assert args.command == "fingerprint" and args.config_file == result["configFile"]
    assert parse_args(exec_argv(result["service"]["serviceConfig"]["ExecStart"])[1:]).config_file == result["configFile"]
    # The directory: root's, readable by the exporter's group, written by the oneshot only.
    assert result["tmpfiles"] == {DEFAULT_FINGERPRINT_DIR: {"d": {"mode": "0750", "user": "root",
                                                              "group": result["service"]["serviceConfig"]["Group"]}}}  # fmt: skip
    exporter = result["service"]["serviceConfig"]
    assert exporter["ProtectSystem"] == "strict"
    assert not {"ReadWritePaths", "RuntimeDirectory", "StateDirectory"} & set(exporter)
    assert "sops-nix-exporter-fingerprint" in result["units"]


def test_module_fingerprints_off():
    result = eval_module("services.sops-nix-exporter = { enable = true; fingerprints.enable = false; };")
    assert result["service"] is not None
    assert result["fingerprintService"] is None and result["fingerprintPath"] is None and result["tmpfiles"] is None
    assert result["pruneService"] is None and result["pruneTimer"] is None
    assert "sops-nix-exporter-fingerprint" not in result["units"]


def test_module_fingerprint_dir_reaches_the_document_the_directory_and_the_sandbox():
    result = eval_module('services.sops-nix-exporter = { enable = true; settings.fingerprint_dir = "/var/lib/fp"; };')
    assert parse_config(result["document"], source="the module's document").fingerprint_dir == "/var/lib/fp"
    assert list(result["tmpfiles"]) == ["/var/lib/fp"]
    assert result["fingerprintService"]["serviceConfig"]["ReadWritePaths"] == "/var/lib/fp"
    error = module_refused('services.sops-nix-exporter = { enable = true; settings.fingerprint_dir = "fp"; };')
    assert "fingerprint_dir" in error, error


def test_module_prunes_nothing_by_default():
    result = eval_module("services.sops-nix-exporter.enable = true;")
    assert result["pruneService"] is None and result["pruneTimer"] is None
    assert "sops-nix-exporter-prune" not in result["units"]
    assert list(result["tmpfiles"]) == [DEFAULT_FINGERPRINT_DIR]


PRUNE_STORES = (
    'settings.stores = [ { mountpoint = "/srv/a.d"; symlink = "/srv/a"; } { mountpoint = "/srv/b.d"; symlink = "/srv/b"; } ];'
)


@pytest.mark.parametrize("fingerprints", [True, False], ids=["with fingerprints", "fingerprints off"])
def test_module_prune_service_timer_and_path(fingerprints):
    result = eval_module(
        f"services.sops-nix-exporter = {{ enable = true; prune.enable = true; "
        f"fingerprints.enable = {str(fingerprints).lower()}; {PRUNE_STORES} }};"
    )
    prune, timer, path = result["pruneService"], result["pruneTimer"], result["fingerprintPath"]
    values = prune_values(["/srv/a.d", "/srv/b.d"])
    assert {k: v for k, v in prune["serviceConfig"].items() if k != "ExecStart"} == values["serviceConfig"]
    args = parse_args(exec_argv(prune["serviceConfig"]["ExecStart"])[1:])
    assert (args.command, args.apply, args.config_file) == ("prune", True, result["configFile"])
    assert args.lock_file.startswith(values["pruneLockDirectory"]["path"] + "/")
    assert result["tmpfiles"][values["pruneLockDirectory"]["path"]] == {"d": {"mode": "0755", "user": "root",
                                                                             "group": "root"}}  # fmt: skip
    assert timer == values["pruneTimer"]
    # After the fingerprints, started with them by the path unit on every store's symlink; nothing that an
    # activation waits for is tied to it.
    assert prune["after"][0] == FINGERPRINT_UNIT
    assert set(prune) <= {"description", "wantedBy", "after", "wants", "serviceConfig"}  # no requiredBy, before
    assert path["pathConfig"]["PathChanged"] == ["/srv/a", "/srv/b"]
    if fingerprints:
        assert prune["wantedBy"] == [FINGERPRINT_UNIT] and path["pathConfig"]["Unit"] == FINGERPRINT_UNIT
        assert result["fingerprintService"] is not None
    else:
        assert prune["wantedBy"] == [] and path["pathConfig"]["Unit"] == PRUNE_UNIT
        assert result["fingerprintService"] is None and DEFAULT_FINGERPRINT_DIR not in result["tmpfiles"]
    assert "multi-user.target" not in prune["wantedBy"]


@pytest.mark.parametrize("keep", [1, 5])
def test_module_prune_refuses_keep_generations_other_than_zero(keep):
    error = module_refused(
        f"services.sops-nix-exporter = {{ enable = true; prune.enable = true; }}; sops.keepGenerations = {keep};"
        f" {SOPS_KEY} sops.secrets.db = {{ }};",
        with_sources=BOTH_MODULES,
    )
    assert "Failed assertions" in error and "sops.keepGenerations = 0" in error and f"(it is {keep})" in error, error
    assert "VMs" in error and "whatever the prune keeps" in error, error


def test_module_prune_with_keep_generations_zero():
    result = eval_module(
        "services.sops-nix-exporter = { enable = true; prune.enable = true; }; sops.keepGenerations = 0;"
        f" {SOPS_KEY} sops.secrets.db = {{ }}; systemd.sysusers.enable = true;",
        with_sources=BOTH_MODULES,
    )
    prune = result["pruneService"]
    assert prune["after"] == [FINGERPRINT_UNIT, "sops-install-secrets.service"]
    assert prune["wants"] == ["sops-install-secrets.service"] == result["service"]["wants"]
    assert prune["serviceConfig"]["ReadWritePaths"] == ["-/run/secrets.d", "/run/sops-nix-exporter"]
    # sops-nix's own default (1) is refused too: the assertion reads what sops-nix declares.
    error = module_refused(
        f"services.sops-nix-exporter = {{ enable = true; prune.enable = true; }}; {SOPS_KEY} sops.secrets.db = {{ }};",
        with_sources=BOTH_MODULES,
    )
    assert "(it is 1)" in error, error


@pytest.mark.parametrize("case", ["systemd-sysusers", "activation scripts", "systemd-sysusers, only secrets for users"])
def test_fingerprint_oneshot_is_ordered_as_the_exporter_is(case):
    host, secrets, expected = SECRETS_UNITS_CASES[case]
    definitions = {"db": "{ }", "pw": "{ neededForUsers = true; }"}
    result = eval_module(
        f"services.sops-nix-exporter.enable = true; {SOPS_KEY} {host}"
        + "".join(f" sops.secrets.{name} = {definitions[name]};" for name in secrets),
        with_sources=BOTH_MODULES,
    )
    fingerprint = result["fingerprintService"]
    assert fingerprint["after"] == expected and fingerprint["wants"] == expected
    assert [u for u in result["service"]["after"] if u != "network.target"] == fingerprint["after"]
    config = parse_config(result["document"], source="the module's document")
    assert result["fingerprintPath"]["pathConfig"]["PathChanged"] == [s.symlink for s in config.stores]


@pytest.mark.parametrize("needed_for_users", [False, True])
def test_module_reads_sops_nix_and_microvm_nix(needed_for_users):
    result = eval_module(
        f"services.sops-nix-exporter.enable = true; sops.keepGenerations = 3; {SOPS_KEY}"
        f" sops.secrets.db = {{ }}; sops.secrets.pw.neededForUsers = {str(needed_for_users).lower()};"
        ' microvm.stateDir = "/srv/vms";',
        with_sources=BOTH_MODULES,
    )
    config = parse_config(result["document"], source="the module's document")
    expected = [("/run/secrets.d", 3)] + ([("/run/secrets-for-users.d", 3)] if needed_for_users else [])
    assert [(s.mountpoint, s.keep_generations) for s in config.stores] == expected
    assert config.microvm.state_dir == "/srv/vms"


# When sops-nix installs secrets with a unit rather than an activation script (modules/sops/default.nix and
# secrets-for-users/default.nix): sops-install-secrets for secrets not neededForUsers when
# sops.useSystemdActivation is on, which systemd-sysusers or userborn turn on by default;
# sops-install-secrets-for-users for secrets neededForUsers only with systemd-sysusers or userborn.
SECRETS_UNITS_CASES = {
    "activation scripts": ("", ["db", "pw"], []),
    "systemd activation, users by the activation script": (
        "sops.useSystemdActivation = true;", ["db", "pw"], ["sops-install-secrets.service"]
    ),
    "systemd-sysusers": (
        "systemd.sysusers.enable = true;", ["db", "pw"],
        ["sops-install-secrets.service", "sops-install-secrets-for-users.service"],
    ),
    "userborn": (
        "services.userborn.enable = true;", ["db", "pw"],
        ["sops-install-secrets.service", "sops-install-secrets-for-users.service"],
    ),
    "systemd-sysusers, only secrets for users": (
        "systemd.sysusers.enable = true;", ["pw"], ["sops-install-secrets-for-users.service"]
    ),
    "systemd-sysusers, no secret for users": (
        "systemd.sysusers.enable = true;", ["db"], ["sops-install-secrets.service"]
    ),
    "userborn, no secret yet": ("services.userborn.enable = true;", [], []),
}  # fmt: skip


@pytest.mark.parametrize("case", list(SECRETS_UNITS_CASES))
def test_exporter_starts_after_the_units_that_install_the_secrets(case):
    """Ordered after, and wanting, exactly the units real sops-nix defines on that host, and no other."""
    host, secrets, expected = SECRETS_UNITS_CASES[case]
    definitions = {"db": "{ }", "pw": "{ neededForUsers = true; }"}
    result = eval_module(
        f"services.sops-nix-exporter.enable = true; {SOPS_KEY} {host}"
        + "".join(f" sops.secrets.{name} = {definitions[name]};" for name in secrets),
        with_sources=BOTH_MODULES,
    )
    service = result["service"]
    assert [unit for unit in service["after"] if unit != "network.target"] == expected
    assert service["wants"] == expected
    # The oracle above is read from sops-nix's source; sops-nix itself agrees.
    sops_units = sorted(f"{unit}.service" for unit in result["units"] if unit.startswith("sops-install-secrets"))
    assert sops_units == sorted(expected)


def test_evaluation_refuses_a_failed_assertion():
    """As NixOS does; the configurations above pass sops-nix's assertions, not merely its option types."""
    error = module_refused(
        f"services.sops-nix-exporter.enable = true; {SOPS_KEY} systemd.sysusers.enable = true;"
        " users.mutableUsers = false; sops.secrets.pw.neededForUsers = true;",
        with_sources=BOTH_MODULES,
    )
    assert "Failed assertions" in error and "users.mutableUsers" in error, error


@pytest.mark.parametrize("with_sources", [(), BOTH_MODULES], ids=["alone", "with sops-nix and microvm.nix"])
@pytest.mark.parametrize(
    "definition,option",
    [("services.sops-nix-exporter.enabel = true;", "services.sops-nix-exporter.enabel"),
     ("services.sops-nix-exporter = { enable = true; listenAdress = \"127.0.0.1\"; };",
      "services.sops-nix-exporter.listenAdress")],
)  # fmt: skip
def test_misspelt_option_is_refused(with_sources, definition, option):
    error = module_refused(definition, with_sources)
    assert f"The option `{option}' does not exist" in error, error


def test_misspelt_option_of_sops_nix_is_refused_too():
    """_module.check is on for the whole evaluation, not only below services.sops-nix-exporter."""
    error = module_refused("services.sops-nix-exporter.enable = true; sops.keepGeneration = 2;", BOTH_MODULES)
    assert "The option `sops.keepGeneration' does not exist" in error, error


@pytest.mark.parametrize(
    "setting,document,option",
    [("settings.memory_budget = 1024;", {"memory_budget": 1024}, "settings.memory_budget"),
     ('settings.microvm.stateDir = "/srv/vms";', {"microvm": {"stateDir": "/srv/vms"}}, "settings.microvm.stateDir"),
     ('settings.stores = [ { mountpoint = "/a.d"; symlink = "/a"; keep = 1; } ];',
      {"stores": [{"mountpoint": "/a.d", "symlink": "/a", "keep": 1}]}, "keep")],
)  # fmt: skip
def test_unknown_settings_key_is_refused_when_the_unit_is_evaluated(setting, document, option):
    """What the exporter would refuse at start (oracle: its own validator) the unit cannot even be evaluated with."""
    with pytest.raises(ConfigError, match="unknown key"):
        parse_config(document, source="the same key in a file")
    error = module_refused(
        f"services.sops-nix-exporter = {{ enable = true; {setting} }};", attribute=".service.serviceConfig.ExecStart"
    )
    assert "does not exist" in error and option in error and "services.sops-nix-exporter.settings" in error, error


def test_module_options_reach_the_command_line_and_the_document():
    result = eval_module(
        """services.sops-nix-exporter = { enable = true; openFirewall = true; port = 9100; listenAddress = "::1";
             memoryBudget = 1024; webConfigFile = "/run/secrets/web.yml"; extraFlags = [ "--log.level=debug" ];
             settings.stores = [ { mountpoint = "/srv/a.d"; symlink = "/srv/a"; }
                                 { mountpoint = "/srv/b.d"; symlink = "/srv/b"; memory_budget_bytes = 5; } ];
             settings.memory_budget_ratio = 0.05; };"""
    )
    assert result["firewall"] == [9100]
    config = parse_config(result["document"], source="the module's document")
    assert [(s.mountpoint, s.memory_budget_bytes) for s in config.stores] == [("/srv/a.d", 1024), ("/srv/b.d", 5)]
    assert config.memory_budget_ratio == 0.05
    argv = exec_argv(result["service"]["serviceConfig"]["ExecStart"])
    assert "--web.config.file=/run/secrets/web.yml" in argv and "--log.level=debug" in argv
    assert "--web.listen-address=[::1]:9100" in argv


@pytest.mark.parametrize(
    "setting,option",
    [("settings.memory_budget_ratio = 2;", "settings.memory_budget_ratio"),
     ('settings.stores = [ { mountpoint = "/a"; symlink = "/b"; keep_generations = -1; } ];', "keep_generations"),
     ('settings.stores = [ { mountpoint = "a"; symlink = "/b"; } ];', "mountpoint"),
     ('settings.stores = [ { mountpoint = "/a"; symlink = "/b"; keepGenerations = 1; } ];', "keepGenerations"),
     ('microvmStateDir = "microvms";', "microvmStateDir")],
)  # fmt: skip
def test_module_refuses_what_the_exporter_would_refuse(setting, option):
    error = module_refused(f"services.sops-nix-exporter = {{ enable = true; {setting} }};")
    assert option in error and "services.sops-nix-exporter" in error, error


# --- what the Nix files take from the repository ---------------------------------------------------------


def test_repo_nix_selects_the_version_rules_and_dashboards():
    repo = nix_eval("let repo = import ./nix/repo.nix; in { inherit (repo) version ruleFileNames dashboardFileNames; }")
    assert repo["version"] == __version__
    assert repo["ruleFileNames"] == sorted(p.name for p in (ROOT / "alerts").glob("*.rules.yml"))
    assert repo["dashboardFileNames"] == sorted(p.name for p in (ROOT / "grafana" / "dashboards").glob("*.json"))
    assert repo["ruleFileNames"] and repo["dashboardFileNames"], "nothing to hand to Prometheus or Grafana"


def nix_list(text: str, attribute: str) -> set[str]:
    """The names in `attribute = with python3Packages; [ ... ];` of nix/package.nix."""
    match = re.search(rf"^  {attribute} = with python3Packages; \[(.*?)\];", text, re.M | re.S)
    assert match, f"nix/package.nix: no {attribute} list"
    return {line.split("#")[0].strip() for line in match.group(1).splitlines()} - {""}


def test_package_dependencies_follow_pyproject():
    """nixpkgs names are PyPI's, lowercased; pytest comes as pytestCheckHook."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~ \[;]", requirement, maxsplit=1)[0].lower() for requirement in requirements}

    package = (NIX / "package.nix").read_text()
    dependencies = nix_list(package, "dependencies")
    assert dependencies == names(project["dependencies"])
    # The test extras nixpkgs has; the Grafana SDK is not packaged there, and its tests skip without it.
    test_extras = names(project["optional-dependencies"]["test"])
    wanted = (test_extras - {"grafana-foundation-sdk", "pytest"} - dependencies) | {"pytestcheckhook"}
    assert wanted == {name.lower() for name in nix_list(package, "nativeCheckInputs")}


def test_nixos_test_script_is_python():
    script = nix_eval(
        '(import ./nix/nixos-test.nix { self = { nixosModules.default = { }; }; sops-nix = "/sops-nix"; }).testScript'
    )
    compile(script, "nix/nixos-test.nix testScript", "exec")
    assert "sops-nix-exporter.service" in script


# --- what the hardening allows, against the real exporter ------------------------------------------------


def syscall_groups(systemd_analyze: str) -> dict[str, list[str]]:
    out = subprocess.run([systemd_analyze, "syscall-filter", "--no-pager"], capture_output=True, text=True,
                         check=True).stdout  # fmt: skip
    groups: dict[str, list[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif line.startswith("    ") and current is not None and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(name: str, groups: dict[str, list[str]]) -> set[str]:
    if not name.startswith("@"):
        return {name}
    return set().union(*(expand(member, groups) for member in groups[name]))


def allowed_syscalls(filters: list[str], groups: dict[str, list[str]]) -> set[str]:
    """systemd's reading of SystemCallFilter= lines: the first (allow) list, minus every ~ list after it."""
    allowed: set[str] = set()
    for line in filters:
        deny = line.startswith("~")
        names = set().union(*(expand(n, groups) for n in line.lstrip("~").split()))
        allowed = allowed - names if deny else allowed | names
    return allowed


def collector_success(text: str) -> dict[str, float]:
    return {dict(labels)["collector"]: found for (name, labels), found in samples(text).items()
            if name == "sopsnix_scrape_collector_success"}  # fmt: skip


def test_exporter_makes_no_system_call_the_filter_blocks(make_store, pinners, scratch):
    strace = require_tool("strace", "strace")
    groups = syscall_groups(require_tool("systemd-analyze", "systemd"))
    allowed = allowed_syscalls(unit_values()["serviceConfig"]["SystemCallFilter"], groups)

    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    store.switch(SAMPLE_SECRETS, keep_generations=0)
    state_dir = scratch / "microvms"
    # One virtiofsd per way of pinning, so every /proc read of the shares scan happens.
    pinners(source=store.symlink, mode="namespace", vm="ns", state_dir=state_dir)
    pinners(source=store.symlink, mode="chroot", vm="chroot", state_dir=state_dir)
    pinners(source=store.symlink, mode="none", vm="plain", state_dir=state_dir)
    config = write_config(scratch, {
        "stores": [{"mountpoint": str(store.mountpoint), "symlink": str(store.symlink), "keep_generations": 0}],
        "microvm": {"state_dir": str(state_dir)},
    })  # fmt: skip

    trace = scratch / "strace.out"
    port = free_port()
    command = [strace, "-f", "-qq", "-o", str(trace), sys.executable, "-m", "sops_nix_exporter", "serve",
               f"--config.file={config}", f"--web.listen-address=127.0.0.1:{port}"]  # fmt: skip
    tracer = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except requests.ConnectionError:
                assert tracer.poll() is None, tracer.stderr.read().decode(errors="replace")
                assert time.monotonic() < deadline, "the traced exporter did not start"
                time.sleep(0.2)
        for _ in range(3):
            text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=30).text
        assert collector_success(text) == {"stores": 1.0, "shares": 1.0}
        assert 'sopsnix_vm_share_up{' in text
        requests.get(f"http://127.0.0.1:{port}/", timeout=10)
        requests.get(f"http://127.0.0.1:{port}/nowhere", timeout=10)
        for child in psutil.Process(tracer.pid).children():
            os.kill(child.pid, signal.SIGTERM)  # the exporter; strace ends when it does
        tracer.wait(timeout=30)
    finally:
        if tracer.poll() is None:
            for child in psutil.Process(tracer.pid).children():
                os.kill(child.pid, signal.SIGKILL)
            tracer.kill()
            tracer.wait()
        tracer.stderr.close()

    used = set(re.findall(r"^\d+\s+([a-z0-9_]+)\(", trace.read_text(errors="replace"), re.M))
    print("system calls:", " ".join(sorted(used)))
    # The trace must cover what the unit is about: serving, and reading other processes' /proc links.
    assert {"accept4", "bind", "listen"} <= used or {"accept", "bind", "listen"} <= used, sorted(used)
    assert used & {"readlink", "readlinkat"}, sorted(used)
    assert used - allowed == set(), f"blocked by SystemCallFilter: {sorted(used - allowed)}"


def test_procsubset_pid_would_break_the_stores_collector(make_store, scratch):
    """Why the unit leaves ProcSubset= alone: with /proc limited to processes, /proc/meminfo is gone."""
    unshare = require_tool("unshare", "util-linux")
    store = make_store("ramfs")
    store.switch(SAMPLE_SECRETS)
    config = write_config(scratch, {"stores": [{"mountpoint": str(store.mountpoint), "symlink": str(store.symlink)}]})

    def stores_collector_with(proc_options: str) -> float:
        output = scratch / f"metrics-{proc_options or 'default'}.prom"
        mount = f"mount -t proc {'-o ' + proc_options if proc_options else ''} proc /proc"
        script = f'{mount} && exec "$0" -m sops_nix_exporter textfile --config.file="$1" --output="$2"'
        result = subprocess.run(
            [unshare, "--mount", "--pid", "--fork", "--propagation", "private", "sh", "-c", script,
             sys.executable, str(config), str(output)],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        if "mount" in result.stderr and not output.exists():
            pytest.skip(f"cannot mount proc with {proc_options or 'defaults'}: {result.stderr.strip()}")
        assert result.returncode == 0, result.stderr
        return collector_success(output.read_text())["stores"]

    assert stores_collector_with("") == 1.0
    assert stores_collector_with("subset=pid") == 0.0


# --- the documented unit, run by a real systemd ------------------------------------------------------------

# Scripts the container's own units run with Debian's python3 and the test helpers of this checkout.
CONTAINER_STORES = '''
import grp, os, subprocess, sys
from pathlib import Path
sys.path.insert(0, TESTS)  # this checkout's tests/, filled in by the test
from sopsnix import SAMPLE_SECRETS, SopsStore

def make(mountpoint, symlink, switches):
    """A ramfs store laid out like sops-nix's, root:keys 0751, with a closed subdirectory in each generation."""
    keys = grp.getgrnam("keys").gr_gid
    Path(mountpoint).mkdir()
    subprocess.run(["mount", "-t", "ramfs", "-o", "mode=0751", "ramfs", mountpoint], check=True)
    os.chown(mountpoint, 0, keys)
    store = SopsStore(Path(mountpoint), Path(symlink))
    for _ in range(switches):
        store.switch(SAMPLE_SECRETS, keep_generations=0)
    for number in store.generations():
        os.chown(store.generation_path(number), 0, keys)
        os.chmod(store.generation_path(number) / "rendered", 0o700)  # only CAP_DAC_READ_SEARCH gets in

if __name__ == "__main__":
    make("/run/secrets.d", "/run/secrets", switches=2)
'''

# microvm-virtiofsd@MODE.service: a virtiofsd command line of that sandbox mode, pinning what /run/secrets
# points at, in the cgroup microvm.nix gives it, with the share declared in the microvm.nix state directory.
CONTAINER_PIN = '''
import subprocess, sys
from pathlib import Path
sys.path.insert(0, TESTS)  # this checkout's tests/, filled in by the test
from pinning import command_line, declare_share, socket_name

binary, mode = sys.argv[1:]
vm, state = mode, Path("/var/lib/microvms")
(state / vm).mkdir(parents=True, exist_ok=True)
declare_share(state, vm, "secrets", "/run/secrets")
process = subprocess.Popen(
    command_line("rust", mode, "/run/secrets", socket_name(vm, "secrets")), executable=binary, cwd=state / vm,
    env={"PIN_MODE": mode, "PIN_SOURCE": "/run/secrets", "PATH": "/usr/bin:/bin"},
    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
)
process.stdin.write(b"g")
process.stdin.flush()
assert process.stdout.readline() == b"ready\\n", "the pinner did not pin"
Path(f"/run/pinned-{vm}").write_text("")
sys.exit(process.wait())
'''

CONTAINER_CHECK = '''
import json, subprocess, sys, time, traceback, urllib.request
from pathlib import Path
sys.path.insert(0, "/results")
import stores

def run(*argv):
    return subprocess.run(argv, capture_output=True, text=True).stdout

def scrape():
    deadline = time.monotonic() + 60
    while True:
        try:
            return urllib.request.urlopen("http://127.0.0.1:9785/metrics", timeout=30).read().decode()
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

result = {}
try:
    for vm in sys.argv[1:]:
        deadline = time.monotonic() + 60
        while not Path(f"/run/pinned-{vm}").exists():
            assert time.monotonic() < deadline, f"microvm-virtiofsd@{vm} did not pin"
            time.sleep(0.1)
    result["before"] = scrape()
    # A store mounted after the service started must show up inside its mount namespace. It has enough
    # generations for the first scan to be shared with helper processes, which need the capability too.
    stores.make("/run/secrets-for-users.d", "/run/secrets-for-users", switches=USERS_GENERATIONS)
    result["after"] = scrape()
    pid = run("systemctl", "show", "--property=MainPID", "--value", "sops-nix-exporter.service").strip()
    result["status"] = Path(f"/proc/{pid}/status").read_text()
    result["security"] = run("systemd-analyze", "security", "--no-pager", "sops-nix-exporter.service")
except Exception:
    result["error"] = traceback.format_exc()
result["journal"] = run("journalctl", "--no-pager", "-u", "sops-nix-exporter.service")
Path("/results/result.json").write_text(json.dumps(result))
'''

SANDBOX_MODES = ("namespace", "chroot", "none")  # one VM per mode, named after it
CAPABILITY_BITS = {"CAP_DAC_READ_SEARCH": 2, "CAP_SYS_PTRACE": 19}  # linux/capability.h


def free_id(taken: set[int]) -> int:
    return next(n for n in range(64900, 65500) if n not in taken)


def unit_output(name: str) -> str:
    """Service lines that keep a test unit's output in /results, where a failing run can show it."""
    return f"StandardOutput=append:/results/{name}.log\nStandardError=append:/results/{name}.log\n"


def container_etc(scratch: Path, executable: Path, pinner: Path) -> tuple[Path, int, int]:
    """A copy of the host's /etc with the exporter's user, `keys`, the documented unit and the test's units.
    Returns it with the exporter's uid and the gid of `keys`."""
    etc = scratch / "etc"
    shutil.copytree("/etc", etc, symlinks=True)
    (etc / "machine-id").write_text("")  # systemd makes up a transient one: no journal shared with the host
    passwd = [line.split(":") for line in (etc / "passwd").read_text().splitlines() if line]
    group = [line.split(":") for line in (etc / "group").read_text().splitlines() if line]
    taken = {int(entry[2]) for entry in passwd + group}
    uid = free_id(taken)
    keys_gid = next((int(entry[2]) for entry in group if entry[0] == "keys"), None)
    new_groups = f"sops-nix-exporter:x:{uid}:\n"
    if keys_gid is None:
        keys_gid = free_id(taken | {uid})
        new_groups += f"keys:x:{keys_gid}:\n"
    with open(etc / "group", "a") as f:
        f.write(new_groups)
    with open(etc / "passwd", "a") as f:
        f.write(f"sops-nix-exporter:x:{uid}:{uid}:sops-nix exporter:/nonexistent:/usr/sbin/nologin\n")
    (etc / "sops-nix-exporter").mkdir()
    (etc / "sops-nix-exporter" / "config.yml").write_text(json.dumps({
        "stores": [{"mountpoint": "/run/secrets.d", "symlink": "/run/secrets", "keep_generations": 1},
                   {"mountpoint": "/run/secrets-for-users.d", "symlink": "/run/secrets-for-users"}],
        "microvm": {"state_dir": "/var/lib/microvms"},
    }))  # fmt: skip

    units = etc / "systemd" / "system"
    documented = unit_check.documented_unit(DEPLOYMENT.read_text())
    (units / "sops-nix-exporter.service").write_text(
        documented.replace("/opt/sops-nix-exporter/bin/sops-nix-exporter", str(executable))
    )
    # The test's ordering goes in a drop-in, so that the documented unit runs exactly as written.
    (units / "sops-nix-exporter.service.d").mkdir()
    (units / "sops-nix-exporter.service.d" / "test.conf").write_text(
        "[Unit]\nWants=sopsnix-test-store.service\nAfter=sopsnix-test-store.service\n"
    )
    (units / "sopsnix-test-store.service").write_text(
        f"[Service]\nType=oneshot\nRemainAfterExit=yes\nExecStart=/usr/bin/python3 /results/stores.py\n"
        f"{unit_output('store')}"
    )
    (units / "microvm-virtiofsd@.service").write_text(
        "[Unit]\nRequires=sopsnix-test-store.service\nAfter=sopsnix-test-store.service\n"
        f"[Service]\nExecStart=/usr/bin/python3 /results/pin.py {pinner} %i\n{unit_output('pin-%i')}"
    )
    pinners = " ".join(f"microvm-virtiofsd@{mode}.service" for mode in SANDBOX_MODES)
    (units / "sopsnix-test-check.service").write_text(
        f"[Unit]\nWants=sops-nix-exporter.service {pinners}\nAfter=sops-nix-exporter.service {pinners}\n"
        "SuccessAction=poweroff\nFailureAction=poweroff\n"
        "[Service]\nType=oneshot\nTimeoutStartSec=180\n"
        f"ExecStart=/usr/bin/python3 /results/check.py {' '.join(SANDBOX_MODES)}\n"
    )
    (units / "sopsnix-test-check.service").write_text(
        (units / "sopsnix-test-check.service").read_text() + unit_output("check")
    )
    (units / "sopsnix-test.target").write_text("[Unit]\nWants=sopsnix-test-check.service\n")
    return etc, uid, keys_gid


def test_documented_unit_runs_the_exporter_under_systemd(require_root, scratch):
    """Debian's systemd boots in a container (systemd-nspawn over this host's /usr, with a private network
    that has only loopback) and starts the documented unit as written. The exporter runs as its own user
    with its two capabilities under every sandboxing setting, and still reads the store, the subdirectories
    closed to `keys`, virtiofsd processes of all three sandbox modes, and a store mounted after it started,
    whose first scan it shares with helper processes (they need the capability too)."""
    nspawn = require_tool("systemd-nspawn", "systemd-container")
    from pinning import PinnerUnavailable, pinner_binary

    executable = Path(sys.executable).parent / "sops-nix-exporter"
    if not executable.exists():
        pytest.skip(f"{executable} missing: install the package into the venv (pip install -e .)")
    # The container sees this host's /usr, the checkout, and the venv and interpreter bound in below.
    shared = {ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    for path in shared:
        hidden = next((h for h in ("/root", "/home", "/run/user", "/tmp", "/var/tmp") if path.is_relative_to(h)), None)
        if hidden:
            pytest.skip(f"{path} is under {hidden}, which the unit hides from the service (ProtectHome=, "
                        "PrivateTmp=): run the tests from a venv of a system Python, as scripts/test does")  # fmt: skip
    try:
        pinner = pinner_binary()
    except PinnerUnavailable as exc:
        pytest.skip(str(exc))

    etc, uid, keys_gid = container_etc(scratch, executable, pinner)
    results = scratch / "results"
    results.mkdir()
    for name, script in (("stores", CONTAINER_STORES), ("pin", CONTAINER_PIN), ("check", CONTAINER_CHECK)):
        script = script.replace("USERS_GENERATIONS", str(PARALLEL_FROM + 10))
        (results / f"{name}.py").write_text(script.replace("TESTS", repr(str(ROOT / "tests"))))
    console = scratch / "console.log"
    command = [
        nspawn, "--directory=/", "--volatile=yes", "--private-network", "--register=no", "--keep-unit",
        "--link-journal=no", f"--machine=sopsnix-test-{os.getpid()}", f"--bind={etc}:/etc",
        f"--bind={results}:/results", f"--bind-ro={pinner.parent}",
        *(f"--bind-ro={path}" for path in sorted(shared) if not path.is_relative_to("/usr")),
        "--boot", "--", "systemd.unit=sopsnix-test.target",
    ]  # fmt: skip
    # nspawn --keep-unit makes its payload/ and supervisor/ cgroups inside the cgroup it starts in: a test
    # cgroup of its own, removed afterwards, not the machine's root.
    dirs = make_unit_cgroup(f"sopsnix-nspawn-{os.getpid()}.scope")
    if dirs is not None:
        command = ["sh", "-c", f'echo $$ > "{dirs[0] / "cgroup.procs"}" && exec "$@"', "sh", *command]
    try:
        with open(console, "w") as out:
            container = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
            try:
                container.wait(timeout=240)
            finally:
                if container.poll() is None:
                    os.kill(container.pid, signal.SIGKILL)  # the container's processes die with nspawn
                    container.wait()
    finally:
        if dirs is not None:
            for directory in sorted((p for p in dirs[0].rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                remove_cgroup([directory], [])
            remove_cgroup([dirs[0]], [dirs[1]])
    log = console.read_text(errors="replace")
    if not (results / "result.json").exists():
        if "Reached target" not in log:
            pytest.skip(f"systemd-nspawn cannot boot a container on this machine: {log.strip()[-800:]}")
        outputs = "".join(
            f"\n--- {path.name}:\n{path.read_text(errors='replace')[-3000:]}" for path in sorted(results.glob("*.log"))
        )
        raise AssertionError(f"the container booted but the check did not finish:\n{log[-4000:]}{outputs}")

    result = json.loads((results / "result.json").read_text())
    assert "error" not in result, f"{result['error']}\nthe exporter's journal:\n{result['journal']}"
    before, after = samples(result["before"]), samples(result["after"])
    secrets = {"mountpoint": "/run/secrets.d"}
    assert value(before, "sopsnix_store_up", **secrets) == 1
    assert value(before, "sopsnix_current_generation", **secrets) == 2
    # Every file, the ones in the subdirectory only CAP_DAC_READ_SEARCH may enter included.
    assert value(before, "sopsnix_current_generation_files", **secrets) == len(SAMPLE_SECRETS)
    assert not [v for (name, _), v in before.items() if name == "sopsnix_store_scan_errors" and v], result["before"]
    for collector in ("stores", "shares"):
        assert value(before, "sopsnix_scrape_collector_success", collector=collector) == 1, result["journal"]
    for capability in CAPABILITY_BITS:
        assert value(before, "sopsnix_exporter_capability", capability=capability) == 1
    for mode in SANDBOX_MODES:
        share = {"vm": mode, "share": "secrets", "mountpoint": "/run/secrets.d"}
        assert value(before, "sopsnix_vm_share_up", **share) == 1, (mode, result["before"])
        assert value(before, "sopsnix_vm_serving_generation", **share) == 2, (mode, result["before"])
        methods = {dict(labels)["method"] for (name, labels), v in before.items()
                   if name == "sopsnix_vm_share_detection" and dict(labels)["vm"] == mode and v == 1}  # fmt: skip
        assert methods and "denied" not in methods, (mode, methods)
    # The store mounted after the exporter started propagated into the service's mount namespace.
    users = {"mountpoint": "/run/secrets-for-users.d"}
    assert value(before, "sopsnix_store_up", **users) == 0
    assert value(after, "sopsnix_store_up", **users) == 1
    assert value(after, "sopsnix_current_generation", **users) == PARALLEL_FROM + 10
    # Every generation walked whole, by the exporter or a helper: the subdirectories closed to `keys` too.
    assert not [v for (name, labels), v in after.items() if name == "sopsnix_store_scan_errors" and v], result["after"]
    assert value(after, "sopsnix_generations_bytes", **users) == (PARALLEL_FROM + 10) * value(
        after, "sopsnix_current_generation_bytes", **users
    )
    assert "helper" not in result["journal"], result["journal"]

    status = dict(line.split(":\t", 1) for line in result["status"].splitlines() if ":\t" in line)
    assert status["Uid"].split() == [str(uid)] * 4
    assert str(keys_gid) in status["Groups"].split()
    expected = sum(1 << CAPABILITY_BITS[name] for name in unit_values()["capabilities"])
    for capability_set in ("CapEff", "CapPrm", "CapAmb", "CapBnd"):
        assert int(status[capability_set], 16) == expected, f"{capability_set}: {status[capability_set]}"
    assert status["NoNewPrivs"].strip() == "1"
    assert status["Seccomp"].strip() == "2"  # a system-call filter is installed
    exposure = re.search(r"Overall exposure level for sops-nix-exporter\.service: ([0-9.]+)", result["security"])
    assert exposure and float(exposure.group(1)) <= 2.5, result["security"]
