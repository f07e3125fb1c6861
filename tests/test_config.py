"""Configuration: every mistake exits 2 with a message that names the file and the field; valid files and
the defaults mean what the README says."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from sops_nix_exporter.config import DEFAULT_MICROVM_STATE_DIR, Config, ConfigError, load_config

from serving import ROOT

STORE = "  - mountpoint: /run/secrets.d\n    symlink: /run/secrets\n"
USERS = "  - mountpoint: /run/secrets-for-users.d\n    symlink: /run/secrets-for-users\n"

# (configuration text, what the one-line message must say after "<file>: ")
INVALID = {
    "unknown-top-level-key": ("storez: []\n", "storez: unknown key"),
    "unknown-store-key": ("stores:\n" + STORE + "    keep: 1\n", "stores[0].keep: unknown key"),
    "unknown-microvm-key": ("microvm:\n  statedir: /var/lib/microvms\n", "microvm.statedir: unknown key"),
    "keep-not-a-number": ("stores:\n" + STORE + "    keep_generations: two\n", "stores[0].keep_generations: "),
    "keep-quoted-number": ("stores:\n" + STORE + '    keep_generations: "1"\n', "stores[0].keep_generations: "),
    "keep-boolean": ("stores:\n" + STORE + "    keep_generations: true\n", "stores[0].keep_generations: "),
    "keep-fraction": ("stores:\n" + STORE + "    keep_generations: 1.5\n", "stores[0].keep_generations: "),
    "keep-negative": (
        "stores:\n" + STORE + "    keep_generations: -1\n",
        "stores[0].keep_generations: Input should be greater than or equal to 0",
    ),
    "budget-negative-second-store": (
        "stores:\n" + STORE + USERS + "    memory_budget_bytes: -4096\n",
        "stores[1].memory_budget_bytes: Input should be greater than or equal to 0",
    ),
    "budget-with-unit": ("stores:\n" + STORE + "    memory_budget_bytes: 64MiB\n", "stores[0].memory_budget_bytes: "),
    "ratio-negative": ("memory_budget_ratio: -0.5\n", "memory_budget_ratio: Input should be greater than 0"),
    "ratio-zero": ("memory_budget_ratio: 0\n", "memory_budget_ratio: Input should be greater than 0"),
    "ratio-above-one": ("memory_budget_ratio: 1.5\n", "memory_budget_ratio: Input should be less than or equal to 1"),
    "ratio-text": ("memory_budget_ratio: lots\n", "memory_budget_ratio: "),
    "ratio-quoted-number": ('memory_budget_ratio: "0.5"\n', "memory_budget_ratio: "),
    "ratio-boolean": ("memory_budget_ratio: true\n", "memory_budget_ratio: "),
    "stores-not-a-list": ("stores:\n  mountpoint: /run/secrets.d\n", "stores: Input should be a valid list"),
    "stores-null": ("stores:\n", "stores: Input should be a valid list"),
    "store-not-a-mapping": ("stores:\n  - /run/secrets.d\n", "stores[0]: "),
    "store-without-symlink": ("stores:\n  - mountpoint: /run/secrets.d\n", "stores[0].symlink: Field required"),
    "mountpoint-relative": (
        "stores:\n  - mountpoint: run/secrets.d\n    symlink: /run/secrets\n",
        "stores[0].mountpoint: must be an absolute path",
    ),
    "symlink-number": ("stores:\n  - mountpoint: /run/secrets.d\n    symlink: 42\n", "stores[0].symlink: "),
    "state-dir-relative": (
        "microvm:\n  state_dir: microvms\n",
        "microvm.state_dir: must be an absolute path",
    ),
    "duplicate-mountpoint": (
        "stores:\n" + STORE + "  - mountpoint: /run/secrets.d/\n    symlink: /run/other\n",
        "stores: mountpoint /run/secrets.d is listed twice",
    ),
    "bad-yaml": ("stores:\n  - mountpoint: /run/secrets.d\n   symlink: [\n", "not valid YAML at line 3, column "),
    "top-level-list": ("- mountpoint: /run/secrets.d\n", "the top level must be a mapping, got list"),
    "top-level-scalar": ("42\n", "the top level must be a mapping, got int"),
}


def run_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "sops_nix_exporter", "check", f"--config.file={config}"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


@pytest.mark.parametrize("case", sorted(INVALID))
def test_invalid_configuration(scratch, case):
    text, expected = INVALID[case]
    config = scratch / "config.yml"
    config.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(config)
    message = str(error.value)
    assert message.startswith(f"{config}: "), message
    assert expected in message, message
    assert "\n" not in message

    result = run_check(config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stdout == ""  # nothing was scanned
    assert result.stderr == f"sops-nix-exporter: configuration error: {message}\n"


def test_several_mistakes_are_all_named(scratch):
    config = scratch / "config.yml"
    config.write_text("stores:\n" + STORE + "    keep_generations: -1\n    colour: red\nmemory_budget_ratio: 2\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    message = str(error.value)
    for field in ("stores[0].keep_generations", "stores[0].colour: unknown key", "memory_budget_ratio"):
        assert field in message, message


def test_bad_yaml_points_at_the_place(scratch):
    config = scratch / "config.yml"
    config.write_text("stores:\n  - mountpoint: /run/secrets.d\n    symlink: /run/secrets\n  keep: [1\n")
    with pytest.raises(ConfigError) as error:
        load_config(config)
    assert str(error.value).startswith(f"{config}: not valid YAML at line 4, column ")


@pytest.mark.parametrize("kind", ["missing", "directory", "not-utf8"])
def test_unreadable_configuration_file(scratch, kind):
    config = scratch / "config.yml"
    if kind == "directory":
        config.mkdir()
        expected = "cannot read the configuration file: Is a directory"
    elif kind == "not-utf8":
        config.write_bytes(b"stores: []\n# caf\xe9\n")
        expected = "the configuration file is not UTF-8 text"
    else:
        expected = "cannot read the configuration file: No such file or directory"
    result = run_check(config)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr == f"sops-nix-exporter: configuration error: {config}: {expected}\n"


def test_configuration_file_closed_to_the_exporter(scratch, as_nobody):
    scratch.chmod(0o755)
    config = scratch / "config.yml"
    config.write_text("stores: []\n")
    config.chmod(0o600)
    result = as_nobody("check", f"--config.file={config}")
    assert result.returncode == 2, result.stdout + result.stderr
    expected = "cannot read the configuration file: Permission denied"
    assert result.stderr == f"sops-nix-exporter: configuration error: {config}: {expected}\n"


@pytest.mark.parametrize("command", ["serve", "textfile"])
def test_every_command_exits_2_on_a_configuration_error(scratch, command):
    config = scratch / "config.yml"
    config.write_text("stores:\n" + STORE + "    keep_generations: -3\n")
    args = {"serve": ["--web.listen-address=127.0.0.1:0"], "textfile": [f"--output={scratch / 'out.prom'}"]}[command]
    result = subprocess.run(
        [sys.executable, "-m", "sops_nix_exporter", command, f"--config.file={config}", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "stores[0].keep_generations" in result.stderr
    assert not (scratch / "out.prom").exists()


# ---------------------------------------------------------------------------------------------------------
# Valid configurations


def test_no_file_means_both_sops_nix_stores():
    config = load_config(None)
    assert [(s.mountpoint, s.symlink, s.keep_generations, s.memory_budget_bytes) for s in config.stores] == [
        ("/run/secrets.d", "/run/secrets", None, None),
        ("/run/secrets-for-users.d", "/run/secrets-for-users", None, None),
    ]
    assert config.memory_budget_ratio == 0.01
    assert config.microvm.state_dir == DEFAULT_MICROVM_STATE_DIR == "/var/lib/microvms"


@pytest.mark.parametrize("text", ["", "# nothing configured\n", "---\n"])
def test_an_empty_file_means_the_defaults(scratch, text):
    config_path = scratch / "config.yml"
    config_path.write_text(text)
    assert load_config(config_path) == load_config(None)


def test_a_full_configuration(scratch):
    config_path = scratch / "config.yml"
    config_path.write_text(
        "stores:\n"
        "  - mountpoint: /run/secrets.d/\n"
        "    symlink: /run/secrets\n"
        "    keep_generations: 0\n"
        "    memory_budget_bytes: 67108864\n"
        "  - mountpoint: /run/secrets-for-users.d\n"
        "    symlink: /run/secrets-for-users\n"
        "memory_budget_ratio: 1\n"
        "microvm:\n"
        "  state_dir: /srv/microvms/\n"
    )
    config = load_config(config_path)
    main, users = config.stores
    assert (main.mountpoint, main.keep_generations, main.memory_budget_bytes) == ("/run/secrets.d", 0, 67108864)
    assert (users.keep_generations, users.memory_budget_bytes) == (None, None)
    assert config.microvm.state_dir == "/srv/microvms"
    assert config.memory_budget_ratio == 1.0
    # A store's own budget wins; otherwise the host-wide ratio of host memory.
    assert config.budget_bytes(main, 8 << 30) == 67108864
    assert config.budget_bytes(users, 8 << 30) == 8 << 30


def test_no_stores_is_valid_and_healthy(scratch):
    config = scratch / "config.yml"
    config.write_text(f"stores: []\nmicrovm:\n  state_dir: {scratch / 'microvms'}\n")
    assert load_config(config).stores == []
    result = run_check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines()[-1] == "healthy"


def test_configuration_is_immutable():
    config = Config()
    with pytest.raises(Exception):
        config.memory_budget_ratio = 0.5  # type: ignore[misc]
