# A NixOS VM test (checks.<system>.nixos): real sops-nix installs real secrets with its public test
# key, the module runs the exporter under its hardened unit, and the test reads what it publishes.
{
  self,
  sops-nix,
}:
let
  testAssets = "${sops-nix}/pkgs/sops-install-secrets/test-assets";
  inherit (import ./service.nix) capabilities;
in
{
  name = "sops-nix-exporter";

  nodes.machine =
    { pkgs, ... }:
    {
      imports = [
        sops-nix.nixosModules.sops
        self.nixosModules.default
      ];

      sops = {
        # sops-nix's public test key, read straight from the Nix store: it guards nothing.
        age.keyFile = "${testAssets}/age-keys.txt";
        defaultSopsFile = "${testAssets}/secrets.yaml";
        keepGenerations = 2;
        secrets.test_key = { };
        secrets."nested/test/file".owner = "nobody";
      };
      system.switch.enable = true;

      services.sops-nix-exporter = {
        enable = true;
        listenAddress = "127.0.0.1";
        memoryBudget = 1048576;
      };

      environment.systemPackages = [
        pkgs.curl
        pkgs.libcap # capsh
      ];
    };

  testScript = ''
    import re

    def metrics():
        return machine.succeed("curl --fail --silent http://127.0.0.1:9785/metrics")

    def value(text, name, **labels):
        wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
        for line in text.splitlines():
            m = re.fullmatch(r'(\w+)(?:\{(.*)\})? (\S+)', line)
            if m and m.group(1) == name and ",".join(sorted((m.group(2) or "").split(","))) == wanted:
                return float(m.group(3))
        raise AssertionError(f"{name}{labels} not published:\n{text}")

    machine.wait_for_unit("sops-nix-exporter.service")
    machine.wait_for_open_port(9785)

    with subtest("the exporter reads the store sops-nix wrote, as configured by the module"):
        text = metrics()
        store = {"mountpoint": "/run/secrets.d"}
        assert value(text, "sopsnix_store_up", **store) == 1
        assert value(text, "sopsnix_symlink_ok", **store) == 1
        assert value(text, "sopsnix_current_generation", **store) == 1
        assert value(text, "sopsnix_current_generation_files", **store) == 2
        assert value(text, "sopsnix_keep_generations", **store) == 2
        assert value(text, "sopsnix_memory_budget_bytes", **store) == 1048576
        for collector in ("stores", "shares"):
            assert value(text, "sopsnix_scrape_collector_success", collector=collector) == 1
        errors = [line for line in text.splitlines() if line.startswith("sopsnix_store_scan_errors{")]
        assert all(line.endswith(" 0.0") for line in errors), errors
        assert "/run/secrets-for-users.d" not in text, "no secret needs the users' store"
        assert "test_key" not in text and "nested" not in text, "a secret's name was published"

    with subtest("a switch is seen without a restart"):
        machine.succeed("/run/current-system/bin/switch-to-configuration test")
        text = metrics()
        assert value(text, "sopsnix_current_generation", mountpoint="/run/secrets.d") == 2
        assert value(text, "sopsnix_generations", mountpoint="/run/secrets.d") == 2

    with subtest("it runs as its own user, in keys, with only its two capabilities"):
        pid = machine.succeed("systemctl show --property=MainPID --value sops-nix-exporter").strip()
        status = machine.succeed(f"cat /proc/{pid}/status")
        fields = dict(line.split(":", 1) for line in status.splitlines())
        uid = fields["Uid"].split()[0]
        assert uid != "0", status
        assert machine.succeed(f"id -un {uid}").strip() == "sops-nix-exporter"
        keys_gid = machine.succeed("getent group keys | cut -d: -f3").strip()
        assert keys_gid in fields["Groups"].split(), status
        expected = {name.lower() for name in ${builtins.toJSON capabilities}}
        for capability_set in ("CapEff", "CapPrm", "CapBnd", "CapAmb"):
            decoded = machine.succeed(f"capsh --decode={fields[capability_set].strip()}").strip()
            assert set(decoded.split("=", 1)[1].split(",")) == expected, f"{capability_set}: {decoded}"
        assert fields["NoNewPrivs"].strip() == "1", status

    with subtest("systemd rates the sandbox"):
        print(machine.succeed("systemd-analyze security --no-pager sops-nix-exporter.service"))
        machine.succeed("systemd-analyze security --threshold=25 sops-nix-exporter.service")
  '';
}
