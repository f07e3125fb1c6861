{
  description = "Prometheus exporter for sops-nix secrets generations and the VM shares that serve them";

  inputs = {
    nixpkgs.url = "github:NixOS/nixpkgs/nixos-unstable";
    # Only the checks use sops-nix: the NixOS test installs real secrets with it.
    sops-nix = {
      url = "github:Mic92/sops-nix";
      inputs.nixpkgs.follows = "nixpkgs";
    };
  };

  outputs =
    {
      self,
      nixpkgs,
      sops-nix,
    }:
    let
      inherit (nixpkgs) lib;
      systems = [
        "x86_64-linux"
        "aarch64-linux"
      ];
      forEachSystem = f: lib.genAttrs systems (system: f nixpkgs.legacyPackages.${system});
      repo = import ./nix/repo.nix;
    in
    {
      overlays.default = final: _prev: {
        sops-nix-exporter = final.callPackage ./nix/package.nix { };
      };

      packages = forEachSystem (pkgs: rec {
        sops-nix-exporter = pkgs.callPackage ./nix/package.nix { };
        default = sops-nix-exporter;
      });

      # The module builds the package from its own pkgs (or takes pkgs.sops-nix-exporter from the
      # overlay), so it needs nothing from this flake but the file.
      nixosModules = {
        sops-nix-exporter = ./nix/module.nix;
        default = self.nixosModules.sops-nix-exporter;
      };

      # For a Prometheus or Grafana host that does not import the module:
      # services.prometheus.ruleFiles = sops-nix-exporter.lib.ruleFiles;
      # services.grafana.provision.dashboards.settings.providers =
      #   [ { name = "sops-nix"; options.path = sops-nix-exporter.lib.dashboards; } ];
      lib = {
        inherit (repo) dashboards ruleFiles;
      };

      checks = forEachSystem (
        pkgs:
        let
          # The module evaluated in a real NixOS configuration, and the unit NixOS renders from it.
          host = lib.nixosSystem {
            inherit (pkgs.stdenv.hostPlatform) system;
            modules = [
              self.nixosModules.default
              {
                boot.isContainer = true;
                system.stateVersion = "25.05";
                services.sops-nix-exporter.enable = true;
                services.sops-nix-exporter.prune.enable = true;
              }
            ];
          };
          unitFile = name: pkgs.writeText name host.config.systemd.units.${name}.text;
          # The [Service] settings docs/deployment.md documents for a unit are exactly those NixOS renders.
          unitMatchesDocs =
            name:
            pkgs.runCommand "${name}-matches-docs" { nativeBuildInputs = [ pkgs.python3 ]; } ''
              python3 ${./nix/unit_check.py} ${unitFile name} ${./docs/deployment.md} ${name}
              touch $out
            '';
        in
        {
          package = self.packages.${pkgs.stdenv.hostPlatform.system}.default;

          unit-matches-docs = unitMatchesDocs "sops-nix-exporter.service";
          fingerprint-unit-matches-docs = unitMatchesDocs "sops-nix-exporter-fingerprint.service";
          prune-unit-matches-docs = unitMatchesDocs "sops-nix-exporter-prune.service";

          nixos = pkgs.testers.runNixOSTest (import ./nix/nixos-test.nix { inherit self sops-nix; });
        }
      );
    };
}
