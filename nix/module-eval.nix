# nix/module.nix evaluated by the real NixOS module system (nixpkgs' lib.evalModules) without the rest of
# nixpkgs, for machines where nixpkgs cannot be fetched but its lib/ can (tests/test_nix.py, when
# SOPSNIX_NIXPKGS_LIB is set). With the real sops-nix and microvm.nix host modules when their sources are
# given, so the guards and the defaults read from config.sops and config.microvm run against the options
# those projects really declare.
#
# What is not real here, and therefore not checked: the NixOS options the module sets (systemd.services,
# users, networking.firewall) are declared loosely below instead of by NixOS's modules; pkgs is reduced
# to formats.yaml (the YAML type without its generator: the document is returned as a value) and the
# package is a placeholder. Undeclared definitions of sops-nix and microvm.nix are ignored
# (_module.check = false). `nix flake check` evaluates the module in a whole NixOS system instead.
{
  lib,
  sops-nix ? null,
  microvm ? null,
  configuration ? { },
}:
let
  valueType =
    with lib.types;
    nullOr (oneOf [
      bool
      int
      float
      str
      path
      (attrsOf valueType)
      (listOf valueType)
    ]);

  pkgs = {
    formats.yaml = { }: {
      type = valueType;
      generate = name: value: {
        outPath = "/nix/store/00000000000000000000000000000000-${name}";
        inherit value;
      };
    };
  };

  nixosOptions = {
    config._module.check = false;
    options = {
      systemd.services = lib.mkOption {
        type = lib.types.attrsOf (lib.types.attrsOf lib.types.anything);
        default = { };
      };
      users.users = lib.mkOption {
        type = lib.types.attrsOf (lib.types.attrsOf lib.types.anything);
        default = { };
      };
      users.groups = lib.mkOption {
        type = lib.types.attrsOf (lib.types.attrsOf lib.types.anything);
        default = { };
      };
      networking.firewall.allowedTCPPorts = lib.mkOption {
        type = lib.types.listOf lib.types.port;
        default = [ ];
      };
    };
  };

  placeholderPackage = {
    type = "derivation";
    name = "sops-nix-exporter";
    outPath = "/nix/store/11111111111111111111111111111111-sops-nix-exporter";
    meta.mainProgram = "sops-nix-exporter";
  };

  evaluated = lib.evalModules {
    specialArgs = {
      inherit pkgs;
    };
    modules =
      [
        nixosOptions
        ./module.nix
        { services.sops-nix-exporter.package = placeholderPackage; }
        configuration
      ]
      ++ lib.optional (sops-nix != null) (sops-nix + "/modules/sops")
      ++ lib.optional (microvm != null) (microvm + "/nixos-modules/host");
  };
  inherit (evaluated) config;
  cfg = config.services.sops-nix-exporter;
  service = config.systemd.services.sops-nix-exporter or null;
in
{
  inherit service;
  users = lib.filterAttrs (name: _: name == "sops-nix-exporter") config.users.users;
  groups = lib.filterAttrs (name: _: name == "sops-nix-exporter") config.users.groups;
  firewall = config.networking.firewall.allowedTCPPorts;
  # What module.nix hands to pkgs.formats.yaml's generate.
  document =
    if service == null then null else (import ./settings.nix).document { inherit (cfg) settings memoryBudget; };
  ruleFiles = map toString cfg.ruleFiles;
}
